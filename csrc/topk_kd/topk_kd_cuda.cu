// CUDA kernel of the top-k KD loss (topk_kd_loss_fwd): the launcher topk_rows_cuda of the internal row
// API (topk_kd/topk_rows.h, whose header states what a call computes) and the op's CUDA implementation.
// The maths is shared with the CPU kernel: the O(K) per-row part (the support's terms, the divergence,
// the gradient's row constant and support entries: KL, and JSD in log-ratio form) is topk_kd/topk_kd_math.h,
// the O(V) part kd_loss_math.h's (log-sum-exp states, log_prob, grad_combine, row_loss); the host-side
// argument handling is topk_kd/topk_kd.h; the launch configuration is topk_kd/topk_kd_launch.h (tested
// without a GPU).
//
// One row is processed by a group of threads: a whole block (vocab > kWarpRowMaxVocab) or one warp
// (small vocabularies, kWarpKernelThreads / 32 rows per block). Per row:
//   1. pass 1 reads the student row once (16-byte packs, kept in L2 for pass 2): the per-thread online
//      log-sum-exp of a = s / T (and of s at T = 1 when the cross-entropy needs it and T != 1), while
//      the same threads fold the row's K teacher values into the log-sum-exp of v = values / T; one
//      group reduction (fixed order: warp butterfly, then warp 0 over the warps' partials);
//   2. the K support entries (each thread a strided share of k): the index is range-checked and
//      checked for duplicates, the student logit at it is gathered, and the row's sums of topk_term --
//      the divergence's and, for JSD, R = sum_S p_s softplus(z) -- are reduced across the group (fixed
//      order); the row's loss follows;
//   3. with a gradient, pass 2 reads the student row again (walking it backwards, most recently read
//      first, with evict-first loads) and writes the dense gradient w (soft_weight T alpha p_s +
//      hard_weight p1) in vector packs: off the support the soft gradient is the row constant alpha
//      times p_s (topk_dense_coef: KL 1, JSD (1 - beta) R); then,
//      after a group barrier, the K support entries and the label get their exact values. Every entry
//      is rounded once, from fp32, to the gradient's dtype.
// Indices out of [0, vocab) and an index repeated within a row trip device-side asserts (no host sync).
// Duplicates are found in O(K) with a shared-memory bitmap of vocab bits per row group (atomicOr; the
// bit already set is the duplicate), or where K is small next to vocab / 32 (or the bitmap does not
// fit) by an O(K^2 / threads) pairwise check (topk_kd_launch.h's choice).
//
// Nothing uses float atomics and every reduction has a fixed order: the same input on the same device
// gives bit-identical output. Nothing synchronises with the host: the row weight is read by the kernel
// from a device tensor and bad indices or labels trip device asserts.
//
// Non-finite values (docs/reliability.md): a NaN or +inf student logit makes the row's log-sum-exp NaN
// (lse_add keeps a NaN even as a thread's first value), so every log-probability, the loss and the
// gradient of the row are NaN; a NaN or +inf teacher value makes the teacher's log-sum-exp, and so the
// loss and the support's gradient, NaN (fkd_if_pos keeps NaN terms). -inf is a masked entry; a row
// whose K values are all -inf has no soft term and no support corrections ("live" below: NaN counts as
// live, so a NaN among -inf values is a NaN row).
//
// Dtypes: the student (and gradient) dtype is a template parameter (its packs); the teacher values'
// dtype, the indices' width and the divergence are read at run time (uniform branches in the O(K)
// loops), which keeps the kernel to six instantiations.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/cuda_launch.cuh"
#include "common/reduce.cuh"
#include "common/vec_pack.cuh"
#include "topk_kd/topk_kd.h"
#include "topk_kd/topk_kd_launch.h"
#include "topk_kd/topk_kd_math.h"

namespace fastkd {
namespace {

constexpr int kStatsPacks = 2;  // 16-byte packs per thread in flight in pass 1
constexpr int kGradPacks = 2;   // and in pass 2 (more live registers per element)

enum class ValueType : int { F32, F16, BF16 };

ValueType value_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ValueType::F16;
    case at::kBFloat16: return ValueType::BF16;
    default: return ValueType::F32;  // check_topk_rows_args allows fp32, fp16 and bf16 only
  }
}

__device__ __forceinline__ float load_value(const void* row, ValueType t, int k) {
  switch (t) {
    case ValueType::F16: return to_f(static_cast<const c10::Half*>(row)[k]);
    case ValueType::BF16: return to_f(static_cast<const c10::BFloat16*>(row)[k]);
    default: return static_cast<const float*>(row)[k];
  }
}

__device__ __forceinline__ int64_t load_index(const void* row, bool int64, int k) {
  return int64 ? static_cast<const int64_t*>(row)[k] : static_cast<int64_t>(static_cast<const int32_t*>(row)[k]);
}

// ---- row-group reductions (common/reduce.cuh; fixed order: deterministic) ---------------------------
struct Stats {  // online log-sum-exp of a = s/T, b = values/T, s (T = 1, only with separate_lse1)
  LseState a, b, c;
  float live;   // 1 if some value is not -inf (NaN included), else 0: a row with no soft term
};
struct Sums {   // over the support: topk_term's d and r (JSD's R)
  float d, r;
};

__device__ __forceinline__ Stats merge(const Stats& x, const Stats& y) {
  return {lse_merge(x.a, y.a), lse_merge(x.b, y.b), lse_merge(x.c, y.c), fmaxf(x.live, y.live)};
}
__device__ __forceinline__ Sums merge(const Sums& x, const Sums& y) {
  return {x.d + y.d, x.r + y.r};
}

using fastkd::shfl_xor;  // float (common/reduce.cuh), LseState (kd_loss_math.h): the overloads below would hide them
__device__ __forceinline__ Stats shfl_xor(const Stats& v, int m) {
  return {shfl_xor(v.a, m), shfl_xor(v.b, m), shfl_xor(v.c, m), shfl_xor(v.live, m)};
}
__device__ __forceinline__ Sums shfl_xor(const Sums& v, int m) {
  return {shfl_xor(v.d, m), shfl_xor(v.r, m)};
}

// The kernel's arguments (topk_rows.h's TopkRowsArgs, with the launch's choices).
struct TopkKernelArgs {
  const void* student;
  RowBlocks student_rows;
  const void* values;
  ValueType values_type;
  int64_t values_stride;  // in bytes
  const void* indices;
  bool indices_int64;
  int64_t indices_stride;  // in bytes
  int k;
  const int64_t* labels;  // [rows] or nullptr
  const float* weight;    // [] the row weight
  float* row_losses;      // [rows] out
  float* row_terms;       // [rows, 2] out, or nullptr (topk_rows.h)
  void* grad;             // [rows, grad_stride] out, or nullptr
  int64_t grad_stride;
  int64_t rows;
  int vocab;
  KdParams p;
  TopkJsd jsd;       // JSD's row constants (topk_kd_math.h); unused for KL
  bool bitmap;       // duplicate check: bitmap (else pairwise)
  int bitmap_words;  // per row group
};

// ---- the loss / gradient kernel --------------------------------------------------------------------
template <typename S, bool kWarpGroup>
__global__ void __launch_bounds__(kWarpGroup ? kWarpKernelThreads : kTopkBlockThreads,
                                  kWarpGroup ? kTopkWarpMinBlocksPerSm : kTopkMinBlocksPerSm)
topk_kd_fwd_kernel(const __grid_constant__ TopkKernelArgs a) {  // read in place: no copy to local memory
  constexpr int N = pack16_elems<S>();
  using PS = Pack<S, N>;

  __shared__ Stats red_stats[kWarpSize + 1];
  __shared__ Sums red_sums[kWarpSize + 1];
  extern __shared__ unsigned int fkd_topk_bitmap[];  // [groups per block][bitmap_words]

  const RowGroup<kWarpGroup> grp;
  const int rank = grp.rank, size = grp.size;
  const int vocab = a.vocab, k = a.k;
  const KdParams& p = a.p;
  const float w = *a.weight;
  const bool sep = p.separate_lse1;
  const bool jsd = p.divergence == Divergence::JSD;
  const float inv_t = p.inv_temperature;
  const Stats stats_id{lse_empty(), lse_empty(), lse_empty(), 0.f};
  const Sums sums_id{0.f, 0.f};
  unsigned int* bits = fkd_topk_bitmap + (kWarpGroup ? (threadIdx.x / kWarpSize) * a.bitmap_words : 0);
  if (a.bitmap) {
    for (int i = rank; i < a.bitmap_words; i += size) bits[i] = 0u;
  }

  for (int64_t r = grp.id; r < a.rows; r += grp.count) {
    const S* __restrict__ s = static_cast<const S*>(a.student) + a.student_rows.offset(r);
    const void* vrow = static_cast<const char*>(a.values) + r * a.values_stride;
    const void* irow = static_cast<const char*>(a.indices) + r * a.indices_stride;
    S* __restrict__ g = a.grad != nullptr ? static_cast<S*>(a.grad) + r * a.grad_stride : nullptr;
    const RowLayout L = kd_row_layout(reinterpret_cast<uintptr_t>(s), sizeof(S), 0, 0, reinterpret_cast<uintptr_t>(g),
                                      vocab, N);
    const int n_scalar = L.head + (vocab - L.tail);
    const auto scalar_idx = [&](int i) { return i < L.head ? i : L.tail + (i - L.head); };
    const S* sb = s + L.head;  // pack-aligned bodies
    S* gb = g != nullptr ? g + L.head : nullptr;

    int64_t label = -1;
    if (a.labels != nullptr) {
      label = a.labels[r];
      if (label == p.ignore_index) {  // ignored row: loss 0, zero gradient
        if (rank == 0) a.row_losses[r] = 0.f;
        if (rank == 0 && a.row_terms != nullptr) a.row_terms[2 * r] = a.row_terms[2 * r + 1] = 0.f;
        if (g != nullptr) zero_row<N>(g, L, vocab, rank, size);
        continue;
      }
      // Like cross_entropy: an out-of-range label is a device-side assert, not a host check (sync).
      CUDA_KERNEL_ASSERT_MSG(label >= 0 && label < vocab, "fastkd: a label is outside [0, vocab) (topk_kd_loss)");
    }

    // ---- pass 1: the student's statistics (and the teacher values') ----
    Stats st = stats_id;
    for (int i = rank; i < n_scalar; i += size) {
      const float sv = to_f(s[scalar_idx(i)]);
      const float x[1] = {sv * inv_t}, c[1] = {sv};
      lse_add(st.a, x);
      if (sep) lse_add(st.c, c);
    }
    for_packs<kStatsPacks, false>(
        0, L.body, rank, size, [&](int j) { return load_pack<Hint::Keep, S, N>(sb + j * N); },
        [&](int, const PS& ps) {
          float x[N];
#pragma unroll
          for (int e = 0; e < N; ++e) x[e] = to_f(ps.v[e]) * inv_t;
          lse_add(st.a, x);
          if (sep) {
#pragma unroll
            for (int e = 0; e < N; ++e) x[e] = to_f(ps.v[e]);
            lse_add(st.c, x);
          }
        });
    for (int kk = rank; kk < k; kk += size) {
      const float v = load_value(vrow, a.values_type, kk);
      const float x[1] = {v * inv_t};
      lse_add(st.b, x);
      if (v != -INFINITY) st.live = 1.f;
    }
    st = group_allreduce<kWarpGroup>(st, red_stats, stats_id);
    const LogNorm na = lse_finish(st.a), nb = lse_finish(st.b);
    const LogNorm n1 = sep ? lse_finish(st.c) : na;  // without `sep`, T = 1 and a = s
    const bool empty = st.live == 0.f;  // all K values -inf: no soft term
    float s_label = 0.f;
    if (p.hard && rank == 0) s_label = (label >= 0 && label < vocab) ? to_f(s[label]) : NAN;

    // One support entry: the student's and the teacher's log-probabilities and probabilities, and its
    // topk_term (for JSD, sp = softplus(z) is its gradient's part).
    struct Entry {
      float ps, pt;
      TopkTerm t;
    };
    const auto entry = [&](int64_t idx, bool in_range, int kk) {
      Entry e;
      const float sv = in_range ? to_f(s[idx]) : NAN;
      const float lps = log_prob(sv * inv_t, na);
      const float lpt = log_prob(load_value(vrow, a.values_type, kk) * inv_t, nb);
      e.ps = fkd_exp(lps);
      e.pt = fkd_exp(lpt);
      e.t = jsd ? topk_term<Divergence::JSD>(lpt, e.pt, lps, e.ps, a.jsd)
                : topk_term<Divergence::KL>(lpt, e.pt, lps, e.ps, a.jsd);
      return e;
    };
    // The gradient of an entry whose student logit is sv, before the support's correction: the soft
    // part alpha p_s (topk_rows.h), the hard part's softmax at T = 1.
    float alpha = 0.f;
    const auto dense = [&](float sv) {
      const float ps = fkd_exp(log_prob(sv * inv_t, na));
      const float p1 = !p.hard ? 0.f : (sep ? fkd_exp(log_prob(sv, n1)) : ps);
      return grad_combine(p, w, empty ? 0.f : alpha * ps, p1);
    };

    // ---- the support: index checks and the row's sums ----
    if (a.bitmap) group_sync<kWarpGroup>();  // the bitmap's clear (start, previous row) before its use
    Sums acc = sums_id;
    for (int kk = rank; kk < k; kk += size) {
      const int64_t idx = load_index(irow, a.indices_int64, kk);
      const bool in_range = idx >= 0 && idx < vocab;
      CUDA_KERNEL_ASSERT_MSG(in_range, "fastkd: a teacher_indices entry is outside [0, vocab) (topk_kd_loss)");
      if (a.bitmap && in_range) {
        const unsigned int bit = 1u << (idx & 31);
        const unsigned int old = atomicOr(&bits[idx >> 5], bit);
        CUDA_KERNEL_ASSERT_MSG((old & bit) == 0u,
                               "fastkd: a row of teacher_indices holds an index twice (topk_kd_loss)");
      }
      if (empty) continue;
      const Entry e = entry(idx, in_range, kk);
      acc.d += e.t.d;
      acc.r += e.t.r;
    }
    if (!a.bitmap) {
      // Pairwise: in each chunk of `size` entries, thread rank compares its index with every later one;
      // the later ones are loaded by all threads together (the same address: one broadcast load).
      for (int k0 = 0; k0 < k; k0 += size) {
        const int mine = k0 + rank;
        const int64_t idx = mine < k ? load_index(irow, a.indices_int64, mine) : -1;
        for (int j = k0 + 1; j < k; ++j) {
          const int64_t other = load_index(irow, a.indices_int64, j);
          CUDA_KERNEL_ASSERT_MSG(!(j > mine && mine < k && other == idx),
                                 "fastkd: a row of teacher_indices holds an index twice (topk_kd_loss)");
        }
      }
    }
    acc = group_allreduce<kWarpGroup>(acc, red_sums, sums_id);
    // D and the dense gradient's row constant (topk_kd_math.h); none without a soft term.
    float d = 0.f;
    if (!empty && jsd) {
      d = topk_divergence<Divergence::JSD>(acc.d, acc.r, a.jsd);
      alpha = topk_dense_coef<Divergence::JSD>(acc.r, a.jsd);
    } else if (!empty) {
      d = topk_divergence<Divergence::KL>(acc.d, acc.r, a.jsd);
      alpha = topk_dense_coef<Divergence::KL>(acc.r, a.jsd);
    }
    if (rank == 0) a.row_losses[r] = row_loss(p, d, n1, s_label, a.row_terms != nullptr ? a.row_terms + 2 * r : nullptr);

    // ---- pass 2: the gradient ----
    if (g != nullptr) {
      for (int i = rank; i < n_scalar; i += size) {
        const int j = scalar_idx(i);
        g[j] = static_cast<S>(dense(to_f(s[j])));
      }
      // Backwards: the end of the row was read last by pass 1, so it is the likeliest still in L2.
      for_packs<kGradPacks, true>(
          0, L.body, rank, size, [&](int j) { return load_pack<Hint::Last, S, N>(sb + j * N); },
          [&](int j, const PS& ps) {
            PS out;
#pragma unroll
            for (int e = 0; e < N; ++e) out.v[e] = static_cast<S>(dense(to_f(ps.v[e])));
            store_pack_aligned(gb + j * N, out, L.g_align);
          });
      group_sync<kWarpGroup>();  // every dense store before the support's and the label's
      bool label_hit = false;
      if (!empty) {
        for (int kk = rank; kk < k; kk += size) {
          const int64_t idx = load_index(irow, a.indices_int64, kk);
          if (!(idx >= 0 && idx < vocab)) continue;  // asserted above
          const Entry e = entry(idx, true, kk);
          const float ddiv = jsd ? topk_support_grad<Divergence::JSD>(e.ps, e.pt, e.t.sp, acc.r, a.jsd)
                                 : topk_support_grad<Divergence::KL>(e.ps, e.pt, e.t.sp, acc.r, a.jsd);
          const float sv = to_f(s[idx]);
          const float p1 = !p.hard ? 0.f : (sep ? fkd_exp(log_prob(sv, n1)) : e.ps);
          float gv = grad_combine(p, w, ddiv, p1);
          if (p.hard && idx == label) {
            gv -= w * p.hard_weight;
            label_hit = true;
          }
          g[idx] = static_cast<S>(gv);
        }
      }
      if (p.hard) {
        const bool in_support = group_any<kWarpGroup>(label_hit);
        if (!in_support && rank == 0 && label >= 0 && label < vocab) {
          g[label] = static_cast<S>(dense(s_label) - w * p.hard_weight);
        }
      }
    }

    if (a.bitmap) {  // clear the bits this row set, after every thread's check
      group_sync<kWarpGroup>();
      for (int kk = rank; kk < k; kk += size) {
        const int64_t idx = load_index(irow, a.indices_int64, kk);
        if (idx >= 0 && idx < vocab) bits[idx >> 5] = 0u;
      }
    }
  }
}

// ---- host side -----------------------------------------------------------------------------------------
template <typename S, bool kWarpGroup>
struct TopkKernel {
  static auto fn() { return topk_kd_fwd_kernel<S, kWarpGroup>; }
};

// The configuration of rows of `vocab` entries and k indices on `device` (the current device), with the
// opt-in raised where it needs it; calls f(config, kernel tag).
template <typename S, typename F>
void with_config(int device, int64_t vocab, int64_t k, F&& f) {
  const auto run = [&](auto warp_tag) {
    using K = TopkKernel<S, decltype(warp_tag)::value>;
    const TopkLaunchConfig c =
        topk_launch_config(kd_device_limits(*at::cuda::getDeviceProperties(device)),
                           kd_kernel_facts(KernelOnDevice<K>::attributes(device)), vocab, k, pack16_elems<S>());
    if (c.opt_in) KernelOnDevice<K>::opt_in_dyn_smem(device, c.max_dyn_smem);
    f(c, K{});
  };
  if (vocab <= kWarpRowMaxVocab) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

template <typename S>
void launch_topk(const TopkRowsArgs& r, const float* weight, cudaStream_t stream) {
  TopkKernelArgs a;
  a.student = r.student;
  a.student_rows = r.student_rows();
  a.values = r.values;
  a.values_type = value_type(r.values_dtype);
  a.values_stride = r.values_stride * static_cast<int64_t>(c10::elementSize(r.values_dtype));
  a.indices = r.indices;
  a.indices_int64 = r.indices_int64;
  a.indices_stride = r.indices_stride * (r.indices_int64 ? 8 : 4);
  a.k = static_cast<int>(r.k);
  a.labels = r.labels;
  a.weight = weight;
  a.row_losses = r.row_losses;
  a.row_terms = r.row_terms;
  a.grad = r.grad;
  a.grad_stride = r.grad_stride;
  a.rows = r.rows;
  a.vocab = static_cast<int>(r.vocab);
  a.p = r.params;
  a.jsd = make_topk_jsd(r.params.divergence == Divergence::JSD ? r.params.beta : 0.5f);  // no log(0) for KL
  // topk_rows.h: the current device holds the buffers (the caller's CUDAGuard).
  with_config<S>(c10::cuda::current_device(), r.vocab, r.k, [&](const TopkLaunchConfig& c, auto kernel) {
    a.bitmap = c.bitmap;
    a.bitmap_words = static_cast<int>(c.bitmap_words);
    const int64_t rows_per_block = c.warp_kernel ? kWarpKernelThreads / kWarpSize : 1;
    const int64_t blocks = std::min<int64_t>({ceil_div(a.rows, rows_per_block), c.max_blocks, INT_MAX});
    const auto fn = decltype(kernel)::fn();
    fn<<<static_cast<unsigned>(blocks), c.threads, static_cast<size_t>(c.dyn_smem), stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S>
std::vector<std::pair<std::string, int64_t>> launch_info(int64_t vocab, int64_t k) {
  const int device = c10::cuda::current_device();
  std::vector<std::pair<std::string, int64_t>> out;
  with_config<S>(device, vocab, k, [&](const TopkLaunchConfig& c, auto kernel) {
    using K = decltype(kernel);
    out = launch_info_of(c, K::fn());
    out.emplace_back("local_bytes", static_cast<int64_t>(KernelOnDevice<K>::attributes(device).localSizeBytes));
  });
  return out;
}

}  // namespace

void topk_rows_cuda(const TopkRowsArgs& a, const float* row_weight, cudaStream_t stream) {
  // In place is not supported: pass 2 overwrites student entries that the support's correction reads.
  check_topk_rows_args(a, /*in_place_ok=*/false);
  if (!rows_to_launch(a, row_weight, "topk_rows_cuda")) return;
  dispatch_logits(a.student_dtype, "student_logits", [&](auto s_tag) {
    launch_topk<decltype(s_tag)>(a, row_weight, stream);
  });
}

namespace {

// kTerms: the op's twin with the terms, *_terms_fwd (kd_loss/kd_loss.h's op_outputs).
template <bool kTerms>
auto topk_kd_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& values,
    const at::Tensor& indices, const std::optional<at::Tensor>& labels,
    const at::Tensor& options, const std::optional<at::Tensor>& normalizer, c10::string_view divergence,
    int64_t ignore_index, c10::string_view reduction, bool with_grad) {
  return op_outputs<kTerms>(kd_op_forward_cuda(
      with_normalizer(make_topk_loss_args(student, values, indices, labels, options, divergence, ignore_index,
                                        reduction), normalizer),
      student.sizes(), with_grad, kTerms, topk_rows_args, topk_rows_cuda));
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> topk_cuda_launch_info(const std::string& student_dtype, int64_t vocab,
                                                                    int64_t k) {
  FKD_CHECK(vocab >= 1 && vocab <= kMaxCudaVocab, "vocab must be in [1, 2^30], got ", vocab);
  FKD_CHECK(k >= 1 && k <= vocab, "k must be in [1, vocab], got ", k);
  std::vector<std::pair<std::string, int64_t>> out;
  dispatch_logits(logit_dtype(student_dtype), "student_dtype", [&](auto s_tag) {
    out = launch_info<decltype(s_tag)>(vocab, k);
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("topk_kd_loss_fwd", &topk_kd_loss_fwd_cuda<false>);
  m.impl("topk_kd_loss_terms_fwd", &topk_kd_loss_fwd_cuda<true>);
}

}  // namespace fastkd
