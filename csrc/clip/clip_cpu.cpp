// CPU kernels of gradient clipping (ops fastkd::grad_norm, scale_grads_, clamp_grads_; schemas in
// fastkd/ops/clip.py). One call handles every gradient of one dtype on the CPU.
//
// The gradients are viewed as one virtual concatenation cut into fixed chunks of kChunk elements
// (a chunk may span several small tensors, a large tensor spans many chunks), so the work is
// balanced across threads whatever the mix of sizes, and 2000 small tensors cost 62 chunks, not
// 2000 tasks. Chunk boundaries depend only on the sizes, never on the thread count:
//   grad_norm:    each chunk writes one fp32 partial (fp64 for fp64 grads) into its own slot; the
//                 slots are then combined in index order in double -> the same input gives the
//                 bit-identical norm whatever at::get_num_threads() says.
//   scale_grads_: the coefficient is computed from the 0-d norm tensor (a CPU tensor: reading it is
//                 no device sync); when it is >= 1 the kernel returns before touching any gradient.
// Every pass is a streaming read (and write) of the gradients: the bound is memory bandwidth.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "clip/clip.h"
#include "clip/passes.h"
#include "common/common.h"

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 32768;  // elements per chunk: 128 KiB of fp32, a few L2-resident blocks per thread
// A thread is only worth waking for >= 512K elements (~2 MiB of fp32, ~0.1 ms of streaming): below
// that the fork/join costs more than the second thread's bandwidth brings. Measured on 2 cores,
// 2000 x 1000 fp32: 0.67 ms on one thread, ~0.4 ms on two. On an oversubscribed machine (another
// process busy on a core) waiting for a descheduled worker costs milliseconds: run with
// torch.set_num_threads(<free cores>), as for any ATen op.
constexpr int64_t kGrainChunks = 16;

// ---- the chunk table -------------------------------------------------------------------------------
// Tensors that are not a dense, non-overlapping block of memory (a strided slice) are processed
// through a contiguous copy (copied back after an in-place op); dense ones in any stride order are
// processed flat in place since norms, scaling and clamping do not depend on element order.
struct Table {
  std::vector<char*> ptr;          // [T] first element of each non-empty tensor
  std::vector<int64_t> start;      // [T + 1] prefix sums of numel: tensor t is elements [start[t], start[t+1])
  std::vector<at::Tensor> copies;  // contiguous copies of non-dense tensors
  std::vector<at::Tensor> origin;  // ... and the tensors they must be copied back into
  int64_t total = 0;
  int64_t chunks() const { return (total + kChunk - 1) / kChunk; }
};

at::ScalarType check_group(at::TensorList grads, const char* op) {
  FKD_CHECK(!grads.empty(), op, ": empty gradient list (fastkd.clip handles that case before calling the op)");
  const auto dtype = grads[0].scalar_type();
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    FKD_CHECK(g.device().is_cpu(), op, ": grads[", i, "] is on ", g.device(), "; the CPU kernel takes CPU tensors");
    FKD_CHECK(g.scalar_type() == dtype, op, ": grads[", i, "] is ", g.scalar_type(), " but grads[0] is ", dtype,
              "; call the op once per dtype (fastkd.clip groups the gradients)");
  }
  FKD_CHECK(at::isFloatingType(dtype), op, ": gradients must be floating point, got ", dtype);
  return dtype;
}

Table make_table(at::TensorList grads, bool in_place) {
  Table tab;
  tab.start.push_back(0);
  for (const auto& g : grads) {
    if (g.numel() == 0) continue;
    at::Tensor t = g;
    if (!g.is_non_overlapping_and_dense()) {
      t = g.contiguous();
      tab.copies.push_back(t);
      if (in_place) tab.origin.push_back(g);
    }
    tab.ptr.push_back(static_cast<char*>(t.data_ptr()));
    tab.total += t.numel();
    tab.start.push_back(tab.total);
  }
  return tab;
}

void copy_back(Table& tab) {
  for (size_t i = 0; i < tab.origin.size(); ++i) tab.origin[i].copy_(tab.copies[i]);
}

// Calls f(ptr, n) on every tensor span of chunk c, in order.
template <typename T, typename F>
inline void for_each_span(const Table& tab, int64_t c, F&& f) {
  int64_t lo = c * kChunk;
  const int64_t hi = std::min(lo + kChunk, tab.total);
  auto t = static_cast<size_t>(std::upper_bound(tab.start.begin(), tab.start.end(), lo) - tab.start.begin() - 1);
  while (lo < hi) {
    const int64_t end = std::min(hi, tab.start[t + 1]);
    f(reinterpret_cast<T*>(tab.ptr[t]) + (lo - tab.start[t]), end - lo);
    lo = end;
    ++t;
  }
}

// ---- norms -----------------------------------------------------------------------------------------
template <NormKind K, typename V>
inline V norm_step(const V& acc, const V& x, float p) {
  if constexpr (K == NormKind::L2) {
    if constexpr (std::is_same_v<V, Vec>) return at::vec::fmadd(x, x, acc); else return acc + x * x;
  } else if constexpr (K == NormKind::L1) {
    if constexpr (std::is_same_v<V, Vec>) return acc + x.abs(); else return acc + std::abs(x);
  } else if constexpr (K == NormKind::Inf) {
    // NaN-propagating max, as torch's inf-norm: a NaN gradient gives a NaN norm.
    if constexpr (std::is_same_v<V, Vec>) return at::vec::maximum(acc, x.abs());
    else return (std::isnan(acc) || std::isnan(x)) ? NAN : std::max(acc, std::abs(x));
  } else {
    if constexpr (std::is_same_v<V, Vec>) return acc + x.abs().pow(Vec(p)); else return acc + std::pow(std::abs(x), p);
  }
}

template <NormKind K, typename A>
inline A norm_merge(A a, A b) {
  if constexpr (K == NormKind::Inf) return (std::isnan(a) || std::isnan(b)) ? A(NAN) : std::max(a, b);
  else return a + b;
}

// fp32 accumulation of one chunk of a reduced-precision or fp32 dtype: 4 independent vector
// accumulators (the FMA latency), folded in a fixed order.
template <typename T, NormKind K>
struct ChunkAcc {
  Vec v[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  float s = 0.f;
  float p;
  explicit ChunkAcc(float p_) : p(p_) {}

  void add(const T* x, int64_t n) {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; i + 4 * Vec::size() <= n; i += 4 * Vec::size()) {
        for (int k = 0; k < 4; ++k) v[k] = norm_step<K>(v[k], Vec::loadu(x + i + k * Vec::size()), p);
      }
      for (; i + Vec::size() <= n; i += Vec::size()) v[0] = norm_step<K>(v[0], Vec::loadu(x + i), p);
    } else {
      using VecT = at::vec::Vectorized<T>;
      for (; i + 2 * VecT::size() <= n; i += 2 * VecT::size()) {
        auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(x + i));
        auto [c, d] = at::vec::convert_to_float<T>(VecT::loadu(x + i + VecT::size()));
        v[0] = norm_step<K>(v[0], a, p);
        v[1] = norm_step<K>(v[1], b, p);
        v[2] = norm_step<K>(v[2], c, p);
        v[3] = norm_step<K>(v[3], d, p);
      }
    }
    for (; i < n; ++i) s = norm_step<K>(s, static_cast<float>(x[i]), p);
  }

  float total() const {
    alignas(64) float lanes[4][Vec::size()];
    for (int k = 0; k < 4; ++k) v[k].store(lanes[k]);
    float t = s;
    for (int j = 0; j < Vec::size(); ++j) {
      for (int k = 0; k < 4; ++k) t = norm_merge<K>(t, lanes[k][j]);
    }
    return t;
  }
};

template <NormKind K>
struct ChunkAccDouble {  // fp64 gradients are accumulated in fp64
  double a[4] = {0, 0, 0, 0};
  double p;
  explicit ChunkAccDouble(double p_) : p(p_) {}
  void add(const double* x, int64_t n) {
    auto step = [&](double acc, double y) {
      if constexpr (K == NormKind::L2) return acc + y * y;
      else if constexpr (K == NormKind::L1) return acc + std::abs(y);
      else if constexpr (K == NormKind::Inf) return (std::isnan(acc) || std::isnan(y)) ? NAN : std::max(acc, std::abs(y));
      else return acc + std::pow(std::abs(y), p);
    };
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) a[k] = step(a[k], x[i + k]);
    }
    for (; i < n; ++i) a[0] = step(a[0], x[i]);
  }
  double total() const {
    return norm_merge<K>(norm_merge<K>(a[0], a[1]), norm_merge<K>(a[2], a[3]));
  }
};

template <typename T, NormKind K>
double norm_of_table(const Table& tab, double p) {
  const int64_t nchunks = tab.chunks();
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::vector<Acc> partial(static_cast<size_t>(nchunks));
  at::parallel_for(0, nchunks, kGrainChunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      if constexpr (std::is_same_v<T, double>) {
        ChunkAccDouble<K> acc(p);
        for_each_span<const double>(tab, c, [&](const double* x, int64_t n) { acc.add(x, n); });
        partial[c] = acc.total();
      } else {
        ChunkAcc<T, K> acc(static_cast<float>(p));
        for_each_span<const T>(tab, c, [&](const T* x, int64_t n) { acc.add(x, n); });
        partial[c] = acc.total();
      }
    }
  });
  // Fixed-order combination in double: deterministic, and no fp32 rounding across chunks.
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) total = norm_merge<K>(total, static_cast<double>(partial[c]));
  switch (K) {
    case NormKind::L2: return std::sqrt(total);
    case NormKind::P: return std::pow(total, 1.0 / p);
    default: return total;
  }
}

at::Tensor grad_norm_cpu(at::TensorList grads, double norm_type) {
  const auto dtype = check_group(grads, "fastkd::grad_norm");
  FKD_CHECK_ARG(norm_type > 0, "norm_type", "must be > 0 or inf, got ", norm_type,
                " (fastkd.get_total_norm hands other orders to torch)");
  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, grads[0].options().dtype(out_dtype));
  const Table tab = make_table(grads, /*in_place=*/false);
  double result = 0.0;
  if (tab.total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grad_norm_cpu", [&] {
      switch (norm_kind(norm_type)) {
        case NormKind::L1: result = norm_of_table<scalar_t, NormKind::L1>(tab, norm_type); break;
        case NormKind::L2: result = norm_of_table<scalar_t, NormKind::L2>(tab, norm_type); break;
        case NormKind::Inf: result = norm_of_table<scalar_t, NormKind::Inf>(tab, norm_type); break;
        case NormKind::P: result = norm_of_table<scalar_t, NormKind::P>(tab, norm_type); break;
      }
    });
  }
  if (out_dtype == at::kDouble) out.fill_(result); else *out.data_ptr<float>() = static_cast<float>(result);
  return out;
}

// ---- in-place element-wise passes -------------------------------------------------------------------
// x = op(x) over every element, op given float vectors (or doubles for fp64 gradients).
template <typename T, typename VF, typename SF>
void apply_in_place(Table& tab, VF&& vop, SF&& sop) {
  at::parallel_for(0, tab.chunks(), kGrainChunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      for_each_span<T>(tab, c, [&](T* x, int64_t n) {
        int64_t i = 0;
        if constexpr (std::is_same_v<T, float>) {
          for (; i + Vec::size() <= n; i += Vec::size()) vop(Vec::loadu(x + i)).store(x + i);
        } else if constexpr (!std::is_same_v<T, double>) {
          using VecT = at::vec::Vectorized<T>;
          for (; i + VecT::size() <= n; i += VecT::size()) {
            auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(x + i));
            at::vec::convert_from_float<T>(vop(lo), vop(hi)).store(x + i);
          }
        }
        for (; i < n; ++i) x[i] = static_cast<T>(sop(x[i]));
      });
    }
  });
}

void scale_grads_cpu(at::TensorList grads, const at::Tensor& total_norm, double max_norm) {
  const auto dtype = check_group(grads, "fastkd::scale_grads_");
  FKD_CHECK_ARG(total_norm.numel() == 1 && total_norm.device().is_cpu(), "total_norm",
                "must be a one-element CPU tensor, got shape ", total_norm.sizes(), " on ", total_norm.device());
  // The coefficient in the norm's precision (fp32, or fp64 for an fp64 norm), as torch does.
  double coef = 0.0;
  bool scale = false;
  if (total_norm.scalar_type() == at::kDouble) {
    const double c = clip_coefficient<double>(total_norm.item<double>(), max_norm);
    coef = c;
    scale = needs_scaling(c);
  } else {
    const float c = clip_coefficient<float>(total_norm.item<float>(), max_norm);
    coef = c;
    scale = needs_scaling(c);
  }
  if (!scale) return;  // coefficient >= 1: gradients stay bit-identical, nothing is read or written
  // Entries sharing memory (a tied weight listed twice) are scaled once each, one pass after the other.
  for_each_disjoint_pass(grads, [&](at::TensorList pass) {
    Table tab = make_table(pass, /*in_place=*/true);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_grads_cpu", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        apply_in_place<double>(tab, [](Vec v) { return v; }, [&](double x) { return x * coef; });
      } else {
        // fp16/bf16: float(x) * coef rounded once, as torch's mul_ by an fp32 0-d tensor does.
        const float cf = static_cast<float>(coef);
        apply_in_place<scalar_t>(tab, [&](Vec v) { return v * Vec(cf); },
                                 [&](scalar_t x) { return static_cast<float>(x) * cf; });
      }
    });
    copy_back(tab);
  });
}

void clamp_grads_cpu(at::TensorList grads, double clip_value) {
  const auto dtype = check_group(grads, "fastkd::clamp_grads_");
  for_each_disjoint_pass(grads, [&](at::TensorList pass) {  // entries sharing memory: one pass each
    Table tab = make_table(pass, /*in_place=*/true);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clamp_grads_cpu", [&] {
      // torch's clamp converts the bounds to the tensor's dtype first; clamp_min then clamp_max.
      const auto lo_t = static_cast<scalar_t>(-clip_value), hi_t = static_cast<scalar_t>(clip_value);
      if constexpr (std::is_same_v<scalar_t, double>) {
        const double lo = lo_t, hi = hi_t;
        apply_in_place<double>(tab, [](Vec v) { return v; }, [&](double x) { return clamp_like_torch(x, lo, hi); });
      } else {
        const float lo = static_cast<float>(lo_t), hi = static_cast<float>(hi_t);
        // at::vec::maximum/minimum propagate NaN (from an element or a bound), as torch's clamp does.
        apply_in_place<scalar_t>(
            tab, [&](Vec v) { return at::vec::minimum(at::vec::maximum(v, Vec(lo)), Vec(hi)); },
            [&](scalar_t x) { return clamp_like_torch(static_cast<float>(x), lo, hi); });
      }
    });
    copy_back(tab);
  });
}

at::Tensor clip_grad_norm_cpu(at::TensorList grads, double max_norm, double norm_type) {
  at::Tensor norm = grad_norm_cpu(grads, norm_type);
  scale_grads_cpu(grads, norm, max_norm);
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("clip_grad_norm_", &clip_grad_norm_cpu);
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("scale_grads_", &scale_grads_cpu);
  m.impl("clamp_grads_", &clamp_grads_cpu);
}

}  // namespace fastkd
