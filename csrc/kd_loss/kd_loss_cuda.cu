// CUDA kernels of the fused KD loss (kd_loss_fwd) and of its backward scaling (kd_loss_scale_).
// The per-element maths is kd_loss_math.h (with V = float), shared with the CPU kernel, so the CPU
// tests exercise the formulas the GPU runs; the host-side argument handling is kd_loss.h; the row
// kernel's launcher kd_rows_cuda is the internal API of kd_rows.h, which kd_loss_fwd calls too.
//
// One row is processed by a group of threads: a whole block (vocab > kWarpRowMaxVocab) or one warp
// (small vocabularies, kWarpKernelThreads / 32 rows per block). Like the CPU kernel, a row takes two
// sweeps over its logits (three for reverse KL and JSD with a gradient):
//   1. statistics: per-thread online (rescaled) max / log-sum-exp of a = s/T and b = t/T together,
//      and of s at T = 1 when the cross-entropy term needs it; merged across the group with
//      lse_merge in a fixed order (warp butterfly, then warp 0 over the warps' partials);
//   2. the divergence with normalised log-probabilities, and the gradient when its formula needs no
//      row sum (forward KL);
//   3. (reverse KL, JSD with a gradient) the gradient, which needs the row's sum from sweep 2.
// Nothing uses float atomics and every reduction has a fixed order: the same input on the same
// device gives bit-identical output. Nothing here synchronises with the host: the batchmean weight
// is read by the kernel from a device tensor and bad labels trip a device assert.
//
// Memory traffic (the kernel is bandwidth bound; the target is one read of both logits and one
// write of the gradient): a row of 128256 bf16 logits is 2 x 256 KB. With one row per SM in flight
// the re-read set is 132 SMs x 513 KB = 67 MB, more than the 50 MB L2 of an H100/H200, and a
// forward-then-forward re-read would miss L2 almost everywhere (every element's reuse distance is a
// whole row per SM). So:
//   * the first `cache_packs` packs of the row's body are kept on chip, in dynamic shared memory
//     (up to ~227 KB per block on sm_90, ~163 KB on sm_80), and re-read from there: for V <= ~57k
//     bf16 (~28k fp32) the whole row lives in shared memory and DRAM sees exactly one read;
//   * the rest is re-read from L2: sweep 1 reads the on-chip part first and the L2 part last, and
//     sweep 2 walks the L2 part backwards (most recently read first), sweep 3 forwards again, so
//     the reuse distance of an element is 2 x (its distance from the turning point) instead of a
//     whole row; loads that are an element's last use are evict-first (ld.global.cs), as are the
//     gradient stores (st.global.cs), so they do not push the pending re-reads out of L2;
//   * rows that need more than a block's share of two blocks per SM run one block (512 threads)
//     per SM, so the rows in flight -- and the L2 working set -- are bounded by the SM count;
//     smaller rows run two blocks per SM (256 threads each), which overlaps one row's exp-bound
//     on-chip sweep with another row's DRAM-bound sweep 1 (also chosen when the part of the row
//     left in L2 is small next to the L2 size). A block's share counts what the SM really gives it:
//     half of sharedMemPerMultiprocessor, less the driver's reserved 1 KiB per block and the
//     kernel's static shared memory. The choice is plain arithmetic on the device's properties,
//     kd_loss/kd_loss_launch.h, tested without a GPU; the opt-in for more than 48 KiB is raised once per
//     device and kernel.
//   For (8192, 128256) bf16 on an H200: 227 KB of each 513 KB row stays on chip, the other 286 KB
//   is re-read backwards from L2, of which roughly the last 190 KB per row hits (50 MB / (132 rows
//   x 2)), so DRAM traffic is about 1.13x the ideal (an estimate, to be measured).
//
// Vectorisation: a "pack" is 16 bytes of the wider of the two logit dtypes (8 bf16/fp16 or 4 fp32
// elements; the narrower dtype loads 8 bytes). Each row is split into a scalar head (until the
// student and teacher pointers are pack-aligned), packs, and a scalar tail; their alignment is
// checked at run time, per row (so odd vocabularies such as 50257 and offset views are vectorised
// too). When the student and teacher cannot be aligned together the whole row is scalar. The
// gradient (its own pointer and row stride, grad_stride: its rows may start at another phase than
// the logits', e.g. a contiguous gradient of logits with a padded row stride) is stored in pieces of
// the widest width its own row's alignment allows (16, 8, 4 or 2 bytes; store_pack_aligned,
// common/vec_pack.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cuda_launch.cuh"
#include "common/reduce.cuh"
#include "common/vec_pack.cuh"
#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_loss_launch.h"

namespace fastkd {
namespace {

// Block sizes, the warp-row limit and the shared-memory budget: kd_loss/kd_loss_launch.h.
constexpr int kBatchElems = 16;          // elements loaded per thread before any is used: 2 packs of
                                         // 8 (4 of 4 with fp32): 32-64 KB in flight per SM
constexpr int kScaleMaxThreads = 512;
constexpr int kScaleUnroll = 4;

// ---- packs (common/vec_pack.cuh): 16-byte (or 8-byte) vector loads and stores, for_packs -----------
// Elements per pack: 16 bytes of the wider logit dtype.
template <typename S, typename T>
constexpr int pack_elems() {
  return 16 / static_cast<int>(sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
}

// Split of one row (kd_loss/kd_loss_launch.h): packs placed by the student's and teacher's phase, the
// gradient stored in pieces of its own alignment (g: this row of the gradient, grad + r * grad_stride).
template <int N, typename S, typename T>
__device__ __forceinline__ RowLayout row_layout(const S* s, const T* t, const S* g, int vocab) {
  return kd_row_layout(reinterpret_cast<uintptr_t>(s), sizeof(S), reinterpret_cast<uintptr_t>(t), sizeof(T),
                       reinterpret_cast<uintptr_t>(g), vocab, N);
}

// ---- row groups and their reductions (common/reduce.cuh; fixed order: deterministic) ----------------
struct Stats {  // online log-sum-exp of a = s/T, b = t/T, and s (T = 1, only with separate_lse1)
  LseState a, b, c;
};
struct Sums {  // the row's divergence and the auxiliary sum (JSD: KL(p_s || M))
  float d, aux;
};

__device__ __forceinline__ Stats merge(const Stats& x, const Stats& y) {
  return {lse_merge(x.a, y.a), lse_merge(x.b, y.b), lse_merge(x.c, y.c)};
}
__device__ __forceinline__ Sums merge(const Sums& x, const Sums& y) { return {x.d + y.d, x.aux + y.aux}; }

using fastkd::shfl_xor;  // float (common/reduce.cuh), LseState (kd_loss_math.h): the overloads below would hide them
__device__ __forceinline__ Stats shfl_xor(const Stats& v, int m) {
  return {shfl_xor(v.a, m), shfl_xor(v.b, m), shfl_xor(v.c, m)};
}
__device__ __forceinline__ Sums shfl_xor(const Sums& v, int m) { return {shfl_xor(v.d, m), shfl_xor(v.aux, m)}; }

__device__ __forceinline__ int align16(int bytes) { return (bytes + 15) & ~15; }

// ---- the loss / gradient kernel --------------------------------------------------------------------
// kWarpGroup: one warp per row (vocab <= kWarpRowMaxVocab), no shared-memory row cache.
template <Divergence D, typename S, typename T, bool kWarpGroup>
__global__ void __launch_bounds__(kWarpGroup ? kWarpKernelThreads : kMaxBlockThreads, kWarpGroup ? 2 : 1)
kd_loss_fwd_kernel(const S* __restrict__ student,      // student logits, row r at student_rows.offset(r)
                   RowBlocks student_rows,
                   const T* __restrict__ teacher,      // teacher logits, row r at teacher_rows.offset(r)
                   RowBlocks teacher_rows,
                   const int64_t* __restrict__ labels,  // [rows] or nullptr
                   const float* __restrict__ weight,    // [] the reduction weight w of a valid row
                   float* __restrict__ row_losses,      // [rows] out
                   float* __restrict__ row_terms,       // [rows, 2] out, or nullptr (kd_rows.h)
                   S* __restrict__ grad,                // [rows, grad_stride] out, or nullptr
                   int64_t grad_stride,
                   int64_t rows, int vocab, KdParams p,
                   int cache_packs) {                   // packs per row kept in shared memory
  constexpr int N = pack_elems<S, T>();
  constexpr int kUnroll = kBatchElems / N;
  using PS = Pack<S, N>;
  using PT = Pack<T, N>;
  struct Item {
    PS s;
    PT t;
  };

  __shared__ Stats red_stats[kWarpSize + 1];
  __shared__ Sums red_sums[kWarpSize + 1];
  extern __shared__ __align__(16) unsigned char fkd_smem[];
  // [cache_packs] student packs, then [cache_packs] teacher packs. Pack j of a row is only ever
  // touched by thread j % blockDim.x, so the cache needs no barrier between sweeps or rows.
  PS* cache_s = reinterpret_cast<PS*>(fkd_smem);
  PT* cache_t = reinterpret_cast<PT*>(fkd_smem + align16(cache_packs * static_cast<int>(sizeof(PS))));

  const RowGroup<kWarpGroup> grp;
  const int rank = grp.rank, size = grp.size;
  const float w = *weight;
  const bool sep = p.separate_lse1;
  const float inv_t = p.inv_temperature;
  const float beta = p.beta;
  const Stats stats_id{lse_empty(), lse_empty(), lse_empty()};
  const Sums sums_id{0.f, 0.f};

  for (int64_t r = grp.id; r < rows; r += grp.count) {
    const S* s = student + student_rows.offset(r);
    const T* t = teacher + teacher_rows.offset(r);
    S* g = grad != nullptr ? grad + r * grad_stride : nullptr;
    const RowLayout L = row_layout<N>(s, t, g, vocab);
    const int n_scalar = L.head + (vocab - L.tail);
    const auto scalar_idx = [&](int i) { return i < L.head ? i : L.tail + (i - L.head); };
    const S* sb = s + L.head;  // pack-aligned bodies
    const T* tb = t + L.head;
    S* gb = g != nullptr ? g + L.head : nullptr;
    const int cached = kWarpGroup ? 0 : min(L.body, cache_packs);

    int64_t label = -1;
    if (labels != nullptr) {
      label = labels[r];
      if (label == p.ignore_index) {  // ignored row: loss 0, zero gradient
        if (rank == 0) row_losses[r] = 0.f;
        if (rank == 0 && row_terms != nullptr) row_terms[2 * r] = row_terms[2 * r + 1] = 0.f;
        if (g != nullptr) zero_row<N>(g, L, vocab, rank, size);
        continue;
      }
      // Like cross_entropy: an out-of-range label is a device-side assert, not a host check (sync).
      CUDA_KERNEL_ASSERT(label >= 0 && label < vocab);
    }

    // ---- sweep 1: statistics ----
    Stats st = stats_id;
    const auto stats_pack = [&](const PS& ps, const PT& pt) {
      float a[N], b[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        a[k] = to_f(ps.v[k]) * inv_t;
        b[k] = to_f(pt.v[k]) * inv_t;
      }
      lse_add(st.a, a);
      lse_add(st.b, b);
      if (sep) {
        float c[N];
#pragma unroll
        for (int k = 0; k < N; ++k) c[k] = to_f(ps.v[k]);
        lse_add(st.c, c);
      }
    };
    for (int i = rank; i < n_scalar; i += size) {
      const int j = scalar_idx(i);
      const float sv = to_f(s[j]), tv = to_f(t[j]);
      const float a[1] = {sv * inv_t}, b[1] = {tv * inv_t}, c[1] = {sv};
      lse_add(st.a, a);
      lse_add(st.b, b);
      if (sep) lse_add(st.c, c);
    }
    // On-chip part first (its global read is its last), the L2 part last (closest to its re-read).
    for_packs<kUnroll, false>(
        0, cached, rank, size,
        [&](int j) { return Item{load_pack<Hint::Last, S, N>(sb + j * N), load_pack<Hint::Last, T, N>(tb + j * N)}; },
        [&](int j, const Item& x) {
          cache_s[j] = x.s;
          cache_t[j] = x.t;
          stats_pack(x.s, x.t);
        });
    for_packs<kUnroll, false>(
        cached, L.body, rank, size,
        [&](int j) { return Item{load_pack<Hint::Keep, S, N>(sb + j * N), load_pack<Hint::Keep, T, N>(tb + j * N)}; },
        [&](int j, const Item& x) { (void)j; stats_pack(x.s, x.t); });
    st = group_allreduce<kWarpGroup>(st, red_stats, stats_id);
    const LogNorm na = lse_finish(st.a), nb = lse_finish(st.b);
    const LogNorm n1 = sep ? lse_finish(st.c) : na;  // without `sep`, T = 1 and a = s
    float s_label = 0.f;
    if (p.hard && rank == 0) s_label = (label >= 0 && label < vocab) ? to_f(s[label]) : NAN;

    // ---- sweeps 2 and 3 ----
    // kLoss: accumulate the divergence; kGrad: write the gradient (row_c: the row constant of
    // div_grad); kReverse: walk the L2 part backwards; kLast: this sweep is the row's last read.
    const auto sweep = [&](auto loss_tag, auto grad_tag, auto reverse_tag, auto last_tag, float row_c) -> Sums {
      constexpr bool kLoss = decltype(loss_tag)::value;
      constexpr bool kGrad = decltype(grad_tag)::value;
      constexpr bool kReverse = decltype(reverse_tag)::value;
      constexpr Hint kHint = decltype(last_tag)::value ? Hint::Last : Hint::Keep;
      constexpr bool kNeedPs = kGrad || D != Divergence::KL;
      Sums acc = sums_id;
      // One entry: accumulates its divergence term, returns its gradient (0 without kGrad).
      const auto entry = [&](float sv, float tv, int idx) -> float {
        const float lps = log_prob(sv * inv_t, na);
        const float lpt = log_prob(tv * inv_t, nb);
        const float pt = fkd_exp(lpt);
        const float ps = kNeedPs ? fkd_exp(lps) : 0.f;
        if constexpr (kLoss) {
          float x = 0.f;
          acc.d += div_term<D>(lps, lpt, ps, pt, beta, &x);
          acc.aux += x;
        }
        if constexpr (kGrad) {
          const float p1 = !p.hard ? 0.f : (sep ? fkd_exp(log_prob(sv, n1)) : ps);
          float gv = grad_combine(p, w, div_grad<D>(lps, lpt, ps, pt, beta, row_c), p1);
          if (p.hard && idx == label) gv -= w * p.hard_weight;
          return gv;
        } else {
          (void)idx;
          return 0.f;
        }
      };
      for (int i = rank; i < n_scalar; i += size) {
        const int j = scalar_idx(i);
        const float gv = entry(to_f(s[j]), to_f(t[j]), j);
        if constexpr (kGrad) g[j] = static_cast<S>(gv);
      }
      const auto use = [&](int j, const Item& x) {
        PS out;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float gv = entry(to_f(x.s.v[k]), to_f(x.t.v[k]), L.head + j * N + k);
          if constexpr (kGrad) out.v[k] = static_cast<S>(gv);
        }
        if constexpr (kGrad) store_pack_aligned(gb + j * N, out, L.g_align);
      };
      // The L2 part first: its lines are the ones at risk of eviction.
      for_packs<kUnroll, kReverse>(
          cached, L.body, rank, size,
          [&](int j) { return Item{load_pack<kHint, S, N>(sb + j * N), load_pack<kHint, T, N>(tb + j * N)}; }, use);
      for_packs<kUnroll, false>(0, cached, rank, size, [&](int j) { return Item{cache_s[j], cache_t[j]}; }, use);
      return acc;
    };
    using True = std::true_type;
    using False = std::false_type;

    float d;
    if (g != nullptr && !grad_needs_row_sum<D>()) {
      d = group_allreduce<kWarpGroup>(sweep(True{}, True{}, True{}, True{}, 0.f), red_sums, sums_id).d;
    } else if (g == nullptr) {
      d = group_allreduce<kWarpGroup>(sweep(True{}, False{}, True{}, True{}, 0.f), red_sums, sums_id).d;
    } else {
      const Sums tot = group_allreduce<kWarpGroup>(sweep(True{}, False{}, True{}, False{}, 0.f), red_sums, sums_id);
      d = tot.d;
      sweep(False{}, True{}, False{}, True{}, D == Divergence::ReverseKL ? tot.d : tot.aux);
    }
    if (rank == 0) row_losses[r] = row_loss(p, d, n1, s_label, row_terms != nullptr ? row_terms + 2 * r : nullptr);
  }
}

// ---- grad *= grad_output ----------------------------------------------------------------------------
template <typename X, bool kWarpGroup>
__global__ void __launch_bounds__(kWarpGroup ? kWarpKernelThreads : kScaleMaxThreads)
kd_loss_scale_kernel(X* __restrict__ grad,              // [rows, vocab] contiguous, scaled in place
                     const float* __restrict__ factors,  // [rows] (per_row) or [1]
                     bool per_row, int64_t rows, int vocab) {
  constexpr int N = 16 / static_cast<int>(sizeof(X));
  using C = std::conditional_t<std::is_same<X, double>::value, double, float>;  // as the CPU kernel
  if (!per_row && factors[0] == 1.f) return;  // the usual loss.backward(): no pass over memory
  const RowGroup<kWarpGroup> grp;
  for (int64_t r = grp.id; r < rows; r += grp.count) {
    const float f = factors[per_row ? r : 0];
    if (f == 1.f) continue;
    X* row = grad + r * static_cast<int64_t>(vocab);
    const RowLayout L = row_layout<N, X, X>(row, nullptr, nullptr, vocab);
    const int n_scalar = L.head + (vocab - L.tail);
    for (int i = grp.rank; i < n_scalar; i += grp.size) {
      const int j = i < L.head ? i : L.tail + (i - L.head);
      row[j] = static_cast<X>(static_cast<C>(row[j]) * static_cast<C>(f));
    }
    X* body = row + L.head;
    for_packs<kScaleUnroll, false>(
        0, L.body, grp.rank, grp.size, [&](int j) { return load_pack<Hint::Last, X, N>(body + j * N); },
        [&](int j, Pack<X, N> v) {
#pragma unroll
          for (int k = 0; k < N; ++k) v.v[k] = static_cast<X>(static_cast<C>(v.v[k]) * static_cast<C>(f));
          store_pack(body + j * N, v);
        });
  }
}

// ---- host side -----------------------------------------------------------------------------------------
// One instantiation of the forward kernel (its attributes and opt-in: common/cuda_launch.cuh).
template <Divergence D, typename S, typename T, bool kWarpGroup>
struct FwdKernel {
  static auto fn() { return kd_loss_fwd_kernel<D, S, T, kWarpGroup>; }

  // The configuration of rows of `vocab` entries on `device` (the current device), with the opt-in
  // raised where it needs it.
  static KdLaunchConfig config(int device, int64_t vocab) {
    constexpr int N = pack_elems<S, T>();
    const KdLaunchConfig c = kd_launch_config(kd_device_limits(*at::cuda::getDeviceProperties(device)),
                                              kd_kernel_facts(KernelOnDevice<FwdKernel>::attributes(device)), vocab,
                                              N, sizeof(Pack<S, N>) + sizeof(Pack<T, N>));
    if (c.opt_in) KernelOnDevice<FwdKernel>::opt_in_dyn_smem(device, c.max_dyn_smem);
    return c;
  }
};

template <Divergence D, typename S, typename T>
KdLaunchConfig fwd_config(int device, int64_t vocab) {
  return vocab <= kWarpRowMaxVocab ? FwdKernel<D, S, T, true>::config(device, vocab)
                                   : FwdKernel<D, S, T, false>::config(device, vocab);
}

template <Divergence D, typename S, typename T>
void launch_kd_loss_fwd(const KdRowsArgs& a, const float* weight, cudaStream_t stream) {
  const S* s = static_cast<const S*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  const int64_t* labels = a.labels;
  float* row_losses = a.row_losses;
  S* grad = static_cast<S*>(a.grad);
  const int vocab = static_cast<int>(a.vocab);
  const RowBlocks ss = a.student_rows(), ts = a.teacher_rows();
  const int64_t gs = a.grad_stride;
  // kd_rows.h: the current device holds the buffers (the caller's CUDAGuard).
  const KdLaunchConfig c = fwd_config<D, S, T>(c10::cuda::current_device(), vocab);

  if (c.warp_kernel) {
    // Small rows: one warp each. The row is re-read from L1/L2 right after sweep 1 (a few KB per
    // warp, microseconds later), so no shared-memory cache is needed.
    const int64_t blocks = std::min<int64_t>(ceil_div(a.rows, kWarpKernelThreads / kWarpSize), INT_MAX);
    kd_loss_fwd_kernel<D, S, T, true><<<static_cast<unsigned>(blocks), c.threads, 0, stream>>>(
        s, ss, t, ts, labels, weight, row_losses, a.row_terms, grad, gs, a.rows, vocab, a.params, 0);
  } else {
    const int64_t blocks = std::min<int64_t>(a.rows, INT_MAX);
    kd_loss_fwd_kernel<D, S, T, false><<<static_cast<unsigned>(blocks), c.threads, static_cast<size_t>(c.dyn_smem),
                                         stream>>>(s, ss, t, ts, labels, weight, row_losses, a.row_terms, grad, gs, a.rows, vocab,
                                                   a.params, c.cache_packs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The configuration a launch for rows of `vocab` entries gets on the current device, and the runtime's
// occupancy of it (cudaOccupancyMaxActiveBlocksPerMultiprocessor) beside fastkd's own count.
template <Divergence D, typename S, typename T>
std::vector<std::pair<std::string, int64_t>> fwd_launch_info(int64_t vocab) {
  const int device = c10::cuda::current_device();
  const KdLaunchConfig c = fwd_config<D, S, T>(device, vocab);
  return launch_info_of(c, c.warp_kernel ? FwdKernel<D, S, T, true>::fn() : FwdKernel<D, S, T, false>::fn());
}

}  // namespace

void kd_rows_cuda(const KdRowsArgs& a, const float* row_weight, cudaStream_t stream) {
  check_kd_rows_args(a, /*in_place_ok=*/false);
  if (!rows_to_launch(a, row_weight, "kd_rows_cuda")) return;
  dispatch_logits(a.student_dtype, "student_logits", [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_logits(a.teacher_dtype, "teacher_logits", [&](auto t_tag) {
      using T = decltype(t_tag);
      switch (a.params.divergence) {
        case Divergence::KL: return launch_kd_loss_fwd<Divergence::KL, S, T>(a, row_weight, stream);
        case Divergence::ReverseKL: return launch_kd_loss_fwd<Divergence::ReverseKL, S, T>(a, row_weight, stream);
        case Divergence::JSD: return launch_kd_loss_fwd<Divergence::JSD, S, T>(a, row_weight, stream);
      }
    });
  });
}

namespace {

// kTerms: the op's twin with the terms, *_terms_fwd (kd_loss/kd_loss.h's op_outputs).
template <bool kTerms>
auto kd_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& options, const std::optional<at::Tensor>& normalizer, c10::string_view divergence,
    int64_t ignore_index, c10::string_view reduction, bool with_grad) {
  return op_outputs<kTerms>(kd_op_forward_cuda(
      with_normalizer(make_kd_loss_args(student, teacher, labels, options, divergence, ignore_index,
                                        reduction), normalizer),
      student.sizes(), with_grad, kTerms, kd_rows_args, kd_rows_cuda));
}

template <typename X>
void launch_kd_loss_scale(const at::Tensor& grad, const at::Tensor& factors, bool per_row) {
  constexpr int N = 16 / static_cast<int>(sizeof(X));
  X* g = grad.data_ptr<X>();
  const float* f = factors.data_ptr<float>();
  const int vocab = static_cast<int>(grad.size(-1));
  const int64_t rows = grad.numel() / vocab;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vocab <= kWarpRowMaxVocab) {
    const int64_t blocks = std::min<int64_t>(ceil_div(rows, kWarpKernelThreads / kWarpSize), INT_MAX);
    kd_loss_scale_kernel<X, true><<<static_cast<unsigned>(blocks), kWarpKernelThreads, 0, stream>>>(
        g, f, per_row, rows, vocab);
  } else {
    const int threads = block_threads(ceil_div(vocab, N), kScaleMaxThreads);
    const int64_t blocks = std::min<int64_t>(rows, INT_MAX);
    kd_loss_scale_kernel<X, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(g, f, per_row, rows, vocab);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kd_loss_scale_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_args(grad, grad_output);
  FKD_CHECK_ARG(grad.is_cuda(), "grad", "expected a CUDA tensor, got one on ", grad.device());
  FKD_CHECK_ARG(grad.size(-1) <= kMaxCudaVocab, "grad", "vocabulary too large (at most 2^30)");
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  // Factors as fp32 on the device (an async conversion when needed); the kernel reads them.
  const at::Tensor factors = grad_output.to(at::kFloat).contiguous();
  const bool per_row = factors.numel() != 1;
  switch (grad.scalar_type()) {
    case at::kFloat: return launch_kd_loss_scale<float>(grad, factors, per_row);
    case at::kDouble: return launch_kd_loss_scale<double>(grad, factors, per_row);
    case at::kHalf: return launch_kd_loss_scale<c10::Half>(grad, factors, per_row);
    case at::kBFloat16: return launch_kd_loss_scale<c10::BFloat16>(grad, factors, per_row);
    default: FKD_CHECK_ARG(false, "grad", "expected a floating dtype, got ", grad.scalar_type());
  }
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> kd_cuda_launch_info(const std::string& student_dtype,
                                                                  const std::string& teacher_dtype,
                                                                  const std::string& divergence, int64_t vocab) {
  FKD_CHECK(vocab >= 1 && vocab <= kMaxCudaVocab, "vocab must be in [1, 2^30], got ", vocab);
  const Divergence d = parse_divergence(divergence);
  std::vector<std::pair<std::string, int64_t>> out;
  dispatch_logits(logit_dtype(student_dtype), "student_dtype", [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_logits(logit_dtype(teacher_dtype), "teacher_dtype", [&](auto t_tag) {
      using T = decltype(t_tag);
      switch (d) {
        case Divergence::KL: out = fwd_launch_info<Divergence::KL, S, T>(vocab); break;
        case Divergence::ReverseKL: out = fwd_launch_info<Divergence::ReverseKL, S, T>(vocab); break;
        case Divergence::JSD: out = fwd_launch_info<Divergence::JSD, S, T>(vocab); break;
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cuda<false>);
  m.impl("kd_loss_terms_fwd", &kd_loss_fwd_cuda<true>);
  m.impl("kd_loss_scale_", &kd_loss_scale_cuda);
}

}  // namespace fastkd
