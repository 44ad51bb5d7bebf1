// CPU kernels of the fused KD loss: rows in parallel (at::parallel_for), the vocabulary in chunks
// that stay in L1, at::vec::Vectorized<float> inner loops; the per-element maths is kd_loss_math.h.
//
// One row takes two sweeps over its logits (three for reverse KL and JSD with a gradient):
//   1. statistics: online (chunk-wise rescaled) max / log-sum-exp of a = s/T and b = t/T together,
//      and of s at T = 1 when the cross-entropy term needs it; the exponentials are kept (RowScratch);
//   2. the divergence with normalised log-probabilities (x - max) - log(sum), as torch's log_softmax
//      forms them (no cancellation between large log-sum-exps), probabilities from the kept
//      exponentials, and the gradient when its formula needs no row sum;
//   3. (reverse KL, JSD) the gradient, which needs the row's divergence from sweep 2.
// The row (logits and kept exponentials) stays in L2 between sweeps for vocabularies up to ~64k, so
// DRAM sees about one read of both logits and one write of the gradient. The only (rows x V) buffer
// is the gradient.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#include <type_traits>

#include "kd_loss.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2048;  // floats per chunk buffer: 3 x 8 KiB stay in L1

// ---- loads and stores through fp32 chunk buffers -------------------------------------------------
template <typename T>
void load_float(const T* src, float* dst, int64_t n, float scale) {  // dst = float(src) * scale
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * Vec(scale)).store(dst + i);
  } else {
    using VecT = at::vec::Vectorized<T>;
    static_assert(VecT::size() == 2 * Vec::size());
    for (; i + VecT::size() <= n; i += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
      (lo * Vec(scale)).store(dst + i);
      (hi * Vec(scale)).store(dst + i + Vec::size());
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// `stream`: non-temporal stores for gradients far larger than the caches. A normal store first reads
// the line it writes (read-for-ownership); a gradient of 0.5 GB written that way costs 0.5 GB of
// extra reads, and it will not be read again before the optimizer step evicts it anyway.
template <typename T>
void store_from_float(const float* src, T* dst, int64_t n, bool stream) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  stream = stream && (reinterpret_cast<uintptr_t>(dst) % 32 == 0);
#else
  stream = false;
#endif
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    if (stream) {
      for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    }
#endif
    std::copy(src + i, src + n, dst + i);
    return;
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      const VecT v = at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()));
#if defined(CPU_CAPABILITY_AVX2)
      if (stream) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), __m256i(v));
        continue;
      }
#endif
      v.store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A fresh gradient buffer is untouched memory: on Linux its first write faults in every 4 KiB page
// (seen here: 3 ns per fp32 entry, more than the kernel's own work). Asking for transparent huge
// pages on the 2 MiB-aligned interior (what torch's THP_MEM_ALLOC_ENABLE does for every allocation)
// cuts the faults 512-fold. Advice only: where THP is off, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ---- generic vector/scalar loop --------------------------------------------------------------------
// f(i, V{}) is called for full vectors with V = Vec, then for the tail element by element with
// V = float, so one generic body (the shared header's templates) serves both.
template <typename F>
inline void for_each_vec(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) f(i, Vec());
  for (; i < n; ++i) f(i, 0.f);
}

template <typename V>
inline V ld(const float* p) {
  if constexpr (std::is_same_v<V, Vec>) return Vec::loadu(p); else return *p;
}
inline void st(const Vec& v, float* p) { v.store(p); }
inline void st(float v, float* p) { *p = v; }

// Sum accumulator fed by both vector and tail elements.
struct Acc {
  Vec v{0.f};
  float s = 0.f;
  void add(const Vec& x) { v = v + x; }
  void add(float x) { s += x; }
  float total() const {
    alignas(64) float lanes[Vec::size()];
    v.store(lanes);
    float t = 0.f;
    for (int k = 0; k < Vec::size(); ++k) t += lanes[k];
    return t + s;
  }
};

// Writes e[i] = exp(x[i] - m) for the chunk's maximum m and returns (m, sum e). Independent
// accumulators (4 for the max, 2 for the sum) keep the loops from waiting on one dependency chain
// (the NaN-propagating vector max alone was a third of the kernel's time with a single one).
LseState chunk_exp(const float* x, float* e, int64_t n) {
  constexpr int64_t W = Vec::size();
  Vec m0(-INFINITY), m1(-INFINITY), m2(-INFINITY), m3(-INFINITY);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + W));
    m2 = at::vec::maximum(m2, Vec::loadu(x + i + 2 * W));
    m3 = at::vec::maximum(m3, Vec::loadu(x + i + 3 * W));
  }
  for (; i + W <= n; i += W) m0 = at::vec::maximum(m0, Vec::loadu(x + i));
  float m = -INFINITY;
  for (; i < n; ++i) m = fmaxf(m, x[i]);
  alignas(64) float lanes[W];
  at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)).store(lanes);
  for (int64_t k = 0; k < W; ++k) m = fmaxf(m, lanes[k]);
  if (m == -INFINITY) {  // every entry masked: nothing to add
    std::fill(e, e + n, 0.f);
    return lse_empty();
  }
  const Vec vm(m);
  Vec s0(0.f), s1(0.f);
  i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec e0 = fkd_exp(Vec::loadu(x + i) - vm), e1 = fkd_exp(Vec::loadu(x + i + W) - vm);
    e0.store(e + i);
    e1.store(e + i + W);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  Acc sum;
  sum.add(s0 + s1);
  for_each_vec(n - i, [&](int64_t j, auto tag) {
    using V = decltype(tag);
    const V ej = fkd_exp(ld<V>(x + i + j) - V(m));
    st(ej, e + i + j);
    sum.add(ej);
  });
  return {m, sum.total()};
}

// Per-thread scratch for one row. Sweep 1 keeps every exponential it computes (exp(x - chunk max))
// so later sweeps turn them into probabilities with one multiply (a per-chunk factor) instead of
// another exp: 2 exps per entry instead of 4. At 16 bytes per entry with the logits, a row of a
// 32k vocabulary (512 KiB) stays in L2 between the sweeps.
struct RowScratch {
  std::vector<float> ea, eb, e1;  // [vocab] exp(a - chunk max), same for b, s (T = 1)
  std::vector<float> ma, mb, m1;  // [chunks] chunk maxima, then probability factors
  alignas(64) float a[kChunk];    // student / T (then the gradient chunk)
  alignas(64) float b[kChunk];    // teacher / T

  // Grows only: the scratch of a worker thread lives as long as the thread (2 x 4 bytes per entry of
  // the largest vocabulary seen, 3 x with a separate cross-entropy statistic). Allocating it per call
  // cost a quarter of a call's time in page faults for buffers above malloc's mmap threshold.
  void reserve(int64_t vocab, bool sep) {
    const size_t v = static_cast<size_t>(vocab), chunks = static_cast<size_t>((vocab + kChunk - 1) / kChunk);
    if (ea.size() < v) { ea.resize(v); eb.resize(v); }
    if (ma.size() < chunks) { ma.resize(chunks); mb.resize(chunks); m1.resize(chunks); }
    if (sep && e1.size() < v) e1.resize(v);
  }
};

RowScratch& thread_scratch(int64_t vocab, bool sep) {
  thread_local RowScratch scratch;
  scratch.reserve(vocab, sep);
  return scratch;
}

// Chunk maxima -> factors f_k = exp(m_k - m) / s, so that p = e * f_k.
void to_prob_factors(float* mk, int64_t chunks, const LogNorm& n) {
  for (int64_t k = 0; k < chunks; ++k) mk[k] = fkd_exp(mk[k] - n.m - n.log_s);  // exp(-inf) = 0: all masked
}

// One row: returns its loss and, when grad != nullptr, writes w * d(row loss)/d(student row).
template <Divergence D, typename S, typename T>
float kd_row(const S* s, const T* t, S* grad, int64_t vocab, int64_t label, const KdParams& p, float w,
             bool stream, RowScratch& buf) {
  const bool sep = p.separate_lse1;
  // Sweep 1: statistics (online over chunks), keeping the exponentials.
  LseState la = lse_empty(), lb = lse_empty(), l1 = lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
    const int64_t n = std::min(kChunk, vocab - c0);
    load_float(s + c0, buf.a, n, p.inv_temperature);
    load_float(t + c0, buf.b, n, p.inv_temperature);
    const LseState ca = chunk_exp(buf.a, buf.ea.data() + c0, n);
    const LseState cb = chunk_exp(buf.b, buf.eb.data() + c0, n);
    buf.ma[k] = ca.m;
    buf.mb[k] = cb.m;
    la = lse_merge(la, ca);
    lb = lse_merge(lb, cb);
    if (sep) {
      load_float(s + c0, buf.a, n, 1.f);
      const LseState c1 = chunk_exp(buf.a, buf.e1.data() + c0, n);
      buf.m1[k] = c1.m;
      l1 = lse_merge(l1, c1);
    }
  }
  const LogNorm na = lse_finish(la), nb = lse_finish(lb);
  const LogNorm n1 = sep ? lse_finish(l1) : na;  // without `sep`, T = 1 and a = s
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  to_prob_factors(buf.ma.data(), chunks, na);
  to_prob_factors(buf.mb.data(), chunks, nb);
  if (sep) to_prob_factors(buf.m1.data(), chunks, n1);
  const float s_label = p.hard ? static_cast<float>(s[label]) : 0.f;
  const float beta = p.beta;

  // Sweeps 2 (and 3): `with_grad` writes the gradient (row_c is then the row constant).
  auto sweep = [&](bool with_grad, bool with_loss, float row_c, float* d_out, float* aux_out) {
    // Two-level sums (lanes within a chunk, then chunk totals) keep the rounding error of a 262k
    // vocabulary near that of torch's pairwise sum.
    float dsum = 0.f, auxsum = 0.f;
    for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
      const int64_t n = std::min(kChunk, vocab - c0);
      Acc dchunk, auxchunk;
      load_float(s + c0, buf.a, n, p.inv_temperature);
      load_float(t + c0, buf.b, n, p.inv_temperature);
      const float* ea = buf.ea.data() + c0;
      const float* eb = buf.eb.data() + c0;
      const float* e1 = sep ? buf.e1.data() + c0 : nullptr;
      const float fa = buf.ma[k], fb = buf.mb[k], f1 = sep ? buf.m1[k] : 0.f;
      for_each_vec(n, [&](int64_t i, auto tag) {
        using V = decltype(tag);
        const V lps = log_prob(ld<V>(buf.a + i), na);
        const V lpt = log_prob(ld<V>(buf.b + i), nb);
        const V ps = ld<V>(ea + i) * V(fa);
        const V pt = ld<V>(eb + i) * V(fb);
        if (with_loss) {
          V x(0.f);
          dchunk.add(div_term<D>(lps, lpt, ps, pt, beta, &x));
          auxchunk.add(x);
        }
        if (with_grad) {
          const V p1 = !p.hard ? V(0.f) : (sep ? ld<V>(e1 + i) * V(f1) : ps);
          st(grad_combine(p, w, div_grad<D>(lps, lpt, ps, pt, beta, row_c), p1), buf.a + i);
        }
      });
      dsum += dchunk.total();
      auxsum += auxchunk.total();
      if (with_grad) {
        if (p.hard && label >= c0 && label < c0 + n) buf.a[label - c0] -= w * p.hard_weight;
        store_from_float(buf.a, grad + c0, n, stream);
      }
    }
    *d_out = dsum;
    *aux_out = auxsum;
  };

  float d = 0.f, aux = 0.f, unused = 0.f;
  if (grad != nullptr && !grad_needs_row_sum<D>()) {
    sweep(/*with_grad=*/true, /*with_loss=*/true, 0.f, &d, &aux);
  } else {
    sweep(false, true, 0.f, &d, &aux);
    if (grad != nullptr) sweep(true, false, D == Divergence::ReverseKL ? d : aux, &unused, &unused);
  }
  return row_loss(p, d, n1, s_label);
}

template <Divergence D, typename S, typename T>
void kd_rows(const KdLossArgs& a, float w, float* row_losses, S* grad) {
  const S* s = a.student.data_ptr<S>();
  const T* t = a.teacher.data_ptr<T>();
  const int64_t ss = a.student.stride(0), ts = a.teacher.stride(0), vocab = a.vocab;
  const int64_t* labels = a.labels.defined() ? a.labels.data_ptr<int64_t>() : nullptr;
  const KdParams p = a.params;
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  // Stream the gradient past the caches when it is much larger than them (see store_from_float).
  const bool stream = grad != nullptr && a.rows * vocab * int64_t(sizeof(S)) >= (int64_t(64) << 20);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    RowScratch& buf = thread_scratch(vocab, p.separate_lse1);
    for (int64_t r = begin; r < end; ++r) {
      S* g = grad ? grad + r * vocab : nullptr;
      const int64_t label = labels ? labels[r] : 0;
      if (labels && label == p.ignore_index) {
        row_losses[r] = 0.f;
        if (g) std::fill(g, g + vocab, S(0));
        continue;
      }
      FKD_CHECK_ARG(!labels || (label >= 0 && label < vocab), "labels", "labels[", r, "] = ", label,
                    " is outside [0, ", vocab, ") and is not ignore_index (", p.ignore_index, ")");
      row_losses[r] = kd_row<D>(s + r * ss, t + r * ts, g, vocab, label, p, w, stream, buf);
    }
#if defined(CPU_CAPABILITY_AVX2)
    if (stream) _mm_sfence();  // order the non-temporal stores before the task ends
#endif
  });
}

template <typename S, typename T>
void kd_rows_dispatch(const KdLossArgs& a, float w, float* row_losses, S* grad) {
  switch (a.divergence) {
    case Divergence::KL: return kd_rows<Divergence::KL, S, T>(a, w, row_losses, grad);
    case Divergence::ReverseKL: return kd_rows<Divergence::ReverseKL, S, T>(a, w, row_losses, grad);
    case Divergence::JSD: return kd_rows<Divergence::JSD, S, T>(a, w, row_losses, grad);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    c10::string_view divergence, double beta, double soft_weight,
                                                    double hard_weight, int64_t ignore_index,
                                                    c10::string_view reduction, bool with_grad) {
  KdLossArgs a = make_kd_loss_args(student, teacher, labels, temperature, divergence, beta, soft_weight,
                                   hard_weight, ignore_index, reduction);
  const at::Tensor weight = row_weight(a);
  const float w = weight.item<float>();  // a CPU tensor: no device to wait for
  at::Tensor row_losses = at::empty({a.rows}, a.student.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty(student.sizes(), a.student.options()) : at::empty({0}, a.student.options());
  if (with_grad) advise_huge_pages(grad);
  FKD_DISPATCH_FLOATING(a.student.scalar_type(), "kd_loss_cpu", [&] {
    using S = scalar_t;
    S* g = with_grad ? grad.data_ptr<S>() : nullptr;
    FKD_DISPATCH_FLOATING(a.teacher.scalar_type(), "kd_loss_cpu", [&] {
      if constexpr (!std::is_same_v<S, double> && !std::is_same_v<scalar_t, double>) {
        kd_rows_dispatch<S, scalar_t>(a, w, row_losses.data_ptr<float>(), g);
      }
    });
  });
  if (grad.scalar_type() != a.grad_dtype) grad = grad.to(a.grad_dtype);
  return {reduce_rows(a, row_losses, weight), grad};
}

void kd_loss_scale_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_args(grad, grad_output);
  const at::Tensor go = grad_output.to(at::kFloat).contiguous();
  const float* f = go.data_ptr<float>();
  const bool per_row = go.numel() != 1;
  const int64_t vocab = grad.size(-1), rows = vocab == 0 ? 0 : grad.numel() / vocab;
  FKD_DISPATCH_FLOATING(grad.scalar_type(), "kd_loss_scale_cpu", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)), [&](int64_t b, int64_t e) {
      alignas(64) float tmp[kChunk];
      for (int64_t r = b; r < e; ++r) {
        const float factor = f[per_row ? r : 0];
        if (factor == 1.f) continue;  // the usual loss.backward(): nothing to do
        scalar_t* row = g + r * vocab;
        for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
          const int64_t n = std::min(kChunk, vocab - c0);
          if constexpr (std::is_same_v<scalar_t, double>) {
            for (int64_t i = 0; i < n; ++i) row[c0 + i] *= factor;
          } else {
            load_float(row + c0, tmp, n, factor);
            store_from_float(tmp, row + c0, n, false);
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_scale_", &kd_loss_scale_cpu);
}

}  // namespace fastkd
