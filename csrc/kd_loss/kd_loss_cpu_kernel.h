// The CPU row kernels of the fused KD loss, compiled once per instruction set: kd_loss_cpu.cpp
// includes this file with the extension's flags (AVX2, or the portable DEFAULT), and
// kd_loss_cpu_avx512.cpp with AVX-512 flags into the separate module fastkd._C_avx512, which
// fastkd/_extension.py installs when torch itself runs AVX-512 kernels (cpu_isa/kernel_table.h).
// Everything is in namespace fastkd::<CPU_CAPABILITY> so the copies never share a symbol; the one
// entry point, kd_rows(), takes the raw arguments of kd_loss/kd_rows.h.
//
// Rows run in parallel (at::parallel_for); the vocabulary is processed in chunks that stay in L1,
// with at::vec::Vectorized<float> inner loops; the per-element maths is kd_loss_math.h.
//
// Sweep 1 (every divergence): per chunk, the maxima of a = s/T and b = t/T, then the exponentials
// exp(a - chunk max) and exp(b - chunk max) and their sums; the chunk statistics merge into the
// row's online log-sum-exp. For forward KL the sweep also sums, per chunk,
//     C_k = sum_j exp(b_j - mb_k) * ((b_j - mb_k) - (a_j - ma_k)),
// from which the row's KL follows without another pass over the logits:
//     log p_t - log p_s = (b - mb_k) - (a - ma_k) + [(mb_k - MB) - (ma_k - MA)] + (log SA - log SB)
// (MA, SA: the row's max and sum for a), so with p_t = exp(b - mb_k) * fb_k, fb_k = exp(mb_k - MB) / SB,
//     KL = sum_k fb_k * (C_k + [(mb_k - MB) - (ma_k - MA)] * E_k) + (log SA - log SB) * sum_k fb_k E_k,
// E_k = sum_{j in k} exp(b_j - mb_k). Every difference is of logits near their own chunk's maximum,
// as in torch's log_softmax, so no large log-sum-exps cancel.
// Sweep 2 (forward KL with a gradient): p_s - p_t (+ the cross-entropy's softmax) from the kept
// exponentials and the per-chunk factors alone: the logits are not read again.
// Reverse KL and JSD: sweep 2 sums the divergence from normalised log-probabilities
// (x - max) - log(sum) and the kept exponentials; sweep 3 writes the gradient, which needs the row's
// divergence (JSD keeps log M from sweep 2, so sweep 3 takes no logarithm). The row (logits and kept exponentials) stays in L2 between the sweeps for vocabularies
// up to ~64k, so DRAM sees about one read of both logits and one write of the gradient.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float for every instruction set

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa/kernel_table.h"
#include "kd_loss/kd_rows.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastkd {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2048;  // floats per chunk buffer: 2 x 8 KiB stay in L1

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

// Non-temporal (streaming) store of one full vector register; false where the instruction set has
// none, the pointer is not aligned to the register, or the type is not handled.
template <typename VecT, typename T>
inline bool stream_store(const VecT& v, T* dst) {
  if (reinterpret_cast<uintptr_t>(dst) % sizeof(VecT) != 0) return false;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(reinterpret_cast<float*>(dst), __m512(v));
  else _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), __m512i(v));
  return true;
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(reinterpret_cast<float*>(dst), __m256(v));
  else _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), __m256i(v));
  return true;
#else
  (void)v; (void)dst;
  return false;
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// `stream`: non-temporal stores for gradients far larger than the caches. A normal store first reads
// the line it writes (read-for-ownership); a gradient of 0.5 GB written that way costs 0.5 GB of
// extra reads, and it will not be read again before the optimizer step evicts it anyway.
template <typename T>
void store_from_float(const float* src, T* dst, int64_t n, bool stream) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (stream && n >= Vec::size() && stream_store(Vec::loadu(src), dst)) {
      for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) stream_store(Vec::loadu(src + i), dst + i);
    }
    std::copy(src + i, src + n, dst + i);
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      const VecT v = at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()));
      if (!stream || !stream_store(v, dst + i)) v.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// ---- exp of the shifted logits (x - max <= 0) ----------------------------------------------------
#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for x <= 0 (and NaN -> NaN): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is
// exact), exp(r) by a degree-5 polynomial (coefficients fitted here by least squares on Chebyshev
// nodes; <= 3 ulp on the interval), then 2^n by vscalefps, which also rounds results below FLT_MIN
// to subnormals and 0. 11 instructions against ATen's exp_u20's 16 (whose clamps and integer
// exponent assembly serve arguments of either sign), and a few ulp instead of 20.
inline Vec exp_nonpos(const Vec& v) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(v));  // exp(-104) rounds to 0; NaN stays
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.008333837613463402f), r, _mm512_set1_ps(0.04189857840538025f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.1666688621044159f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999141693115234f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#else
inline Vec exp_nonpos(const Vec& v) { return fkd_exp(v); }
#endif
inline float exp_nonpos(float x) { return fkd_exp(x); }

// Vec::size() logits as fp32 (V = Vec), or one (V = float).
template <typename V, typename T>
inline V ldc(const T* p) {
  if constexpr (std::is_same_v<V, float>) {
    return static_cast<float>(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  } else {
    alignas(64) float tmp[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) tmp[k] = static_cast<float>(p[k]);
    return Vec::loadu(tmp);
  }
}

// Software prefetch into L1 (no fault past the end of a buffer: prefetches never fault).
template <typename T>
inline void prefetch(const T* p) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
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

// Maximum of x[0, n) (-inf when empty or all masked). Four independent accumulators keep the loop
// from waiting on one dependency chain (the NaN-propagating vector max alone was a third of the
// kernel's time with a single one).
template <typename T>
float chunk_max(const T* x, int64_t n) {
  constexpr int64_t W = Vec::size();
  Vec m0(-INFINITY), m1(-INFINITY), m2(-INFINITY), m3(-INFINITY);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    m0 = at::vec::maximum(m0, ldc<Vec>(x + i));
    m1 = at::vec::maximum(m1, ldc<Vec>(x + i + W));
    m2 = at::vec::maximum(m2, ldc<Vec>(x + i + 2 * W));
    m3 = at::vec::maximum(m3, ldc<Vec>(x + i + 3 * W));
  }
  for (; i + W <= n; i += W) m0 = at::vec::maximum(m0, ldc<Vec>(x + i));
  float m = -INFINITY;
  for (; i < n; ++i) m = fmaxf(m, static_cast<float>(x[i]));
  alignas(64) float lanes[W];
  at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)).store(lanes);
  for (int64_t k = 0; k < W; ++k) m = fmaxf(m, lanes[k]);
  return m;
}

// The shift of a chunk's exponentials: its maximum, or 0 where every entry is -inf (then every
// exponential is exp(-inf) = 0 and (x - shift) stays -inf, never -inf - (-inf) = NaN).
inline float exp_shift(float m) { return m == -INFINITY ? 0.f : m; }

// Writes e[i] = exp(x[i] - m) for the chunk's maximum m (x at T = 1) and returns (m, sum e).
template <typename T>
LseState chunk_exp(const T* x, float* e, int64_t n) {
  const float m = chunk_max(x, n);
  const float sh = exp_shift(m);
  Acc sum;
  for_each_vec(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    const V ei = exp_nonpos(ldc<V>(x + i) - V(sh));
    st(ei, e + i);
    sum.add(ei);
  });
  return {m, sum.total()};
}

// Statistics of one chunk of a student/teacher pair (sweep 1).
struct PairChunk {
  float ma, mb;  // maxima of a = s/T and b = t/T (-inf when all masked)
  float sa, sb;  // sum exp(a - exp_shift(ma)), sum exp(b - exp_shift(mb))
  float cross;   // C_k = sum exp(b - mb) * ((b - mb) - (a - ma)), terms with exp(b - mb) = 0 omitted
};

// Reads the logits directly (no fp32 copy): one pass for the maxima (max(s) / T = max(s / T) for
// T > 0: rounding is monotonic), one for the exponentials. a = s / T is rounded to fp32 before the
// shift (no fused multiply-add): with |a| ~ 100 its rounding is 1e-5 relative, and sweep 2 forms
// the log-probabilities of reverse KL and JSD from the same rounded a.
// kKeep: store the exponentials (ea, eb) for the later sweeps; kCross: sum C_k (forward KL).
template <bool kKeep, bool kCross, typename S, typename T>
PairChunk pair_chunk(const S* s, const T* t, float inv_t, float* ea, float* eb, int64_t n) {
  PairChunk c;
  c.ma = chunk_max(s, n) * inv_t;
  c.mb = chunk_max(t, n) * inv_t;
  const float sha = exp_shift(c.ma), shb = exp_shift(c.mb);
  Acc sa, sb, cross;
  for_each_vec(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    if constexpr (std::is_same_v<V, Vec>) {  // the next chunk (or row) arrives while this one computes
      prefetch(s + i + kChunk);
      prefetch(t + i + kChunk);
    }
    const V da = ldc<V>(s + i) * V(inv_t) - V(sha);  // a rounded to fp32 first, as torch's s / T
    const V db = ldc<V>(t + i) * V(inv_t) - V(shb);
    const V xa = exp_nonpos(da), xb = exp_nonpos(db);
    if constexpr (kKeep) {
      st(xa, ea + i);
      st(xb, eb + i);
    }
    sa.add(xa);
    sb.add(xb);
    if constexpr (kCross) cross.add(fkd_if_pos(xb, xb * (db - da)));
  });
  c.sa = sa.total();
  c.sb = sb.total();
  c.cross = kCross ? cross.total() : 0.f;
  return c;
}

// Per-thread scratch for one row. Sweep 1 keeps every exponential it computes so later sweeps turn
// them into probabilities with one multiply (a per-chunk factor) instead of another exp. At 8 bytes
// per entry, a row of a 32k vocabulary (256 KiB) stays in L2 between the sweeps.
struct RowScratch {
  std::vector<float> ea, eb, e1;  // [vocab] exp(a - chunk max), same for b, s (T = 1)
  std::vector<float> ma, mb, m1;  // [chunks] chunk shifts, then probability factors
  std::vector<float> lm;          // [vocab] log M of JSD, from sweep 2 to sweep 3
  std::vector<float> cross, sb;   // [chunks] C_k and E_k of forward KL
  alignas(64) float a[kChunk];    // student / T for reverse KL and JSD; a non-fp32 gradient chunk
  alignas(64) float b[kChunk];    // teacher / T for reverse KL and JSD

  // Grows only: the scratch of a worker thread lives as long as the thread (2 x 4 bytes per entry of
  // the largest vocabulary seen with a gradient, one more 4 for a separate cross-entropy statistic,
  // one more for JSD's log M).
  // Allocating it per call cost a quarter of a call's time in page faults for buffers above malloc's
  // mmap threshold.
  void reserve(int64_t vocab, bool keep, bool sep, bool jsd_grad) {
    const size_t v = static_cast<size_t>(vocab), chunks = static_cast<size_t>((vocab + kChunk - 1) / kChunk);
    if (keep && ea.size() < v) { ea.resize(v); eb.resize(v); }
    if (jsd_grad && lm.size() < v) lm.resize(v);
    if (sep && e1.size() < v) e1.resize(v);
    if (ma.size() < chunks) { ma.resize(chunks); mb.resize(chunks); m1.resize(chunks); cross.resize(chunks); sb.resize(chunks); }
  }
};

RowScratch& thread_scratch(int64_t vocab, bool keep, bool sep, bool jsd_grad) {
  thread_local RowScratch scratch;
  scratch.reserve(vocab, keep, sep, jsd_grad);
  return scratch;
}

// Chunk shifts -> factors f_k = exp(shift_k - m) / s, so that p = e * f_k.
void to_prob_factors(float* mk, int64_t chunks, const LogNorm& n) {
  for (int64_t k = 0; k < chunks; ++k) mk[k] = fkd_exp(mk[k] - n.m - n.log_s);
}

// One row: returns its loss and, when grad != nullptr, writes w * d(row loss)/d(student row).
template <Divergence D, typename S, typename T>
float kd_row(const S* s, const T* t, S* grad, int64_t vocab, int64_t label, const KdParams& p, float w,
             bool stream, RowScratch& buf) {
  constexpr bool kFusedKL = D == Divergence::KL;
  const bool sep = p.separate_lse1;
  const bool keep = grad != nullptr || !kFusedKL;
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  // Sweep 1: statistics (online over chunks), keeping the exponentials where later sweeps need them.
  LseState la = lse_empty(), lb = lse_empty(), l1 = lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
    const int64_t n = std::min(kChunk, vocab - c0);
    float* ea = keep ? buf.ea.data() + c0 : nullptr;
    float* eb = keep ? buf.eb.data() + c0 : nullptr;
    const float it = p.inv_temperature;
    const PairChunk c = !kFusedKL ? pair_chunk<true, false>(s + c0, t + c0, it, ea, eb, n)
                        : keep    ? pair_chunk<true, true>(s + c0, t + c0, it, ea, eb, n)
                                  : pair_chunk<false, true>(s + c0, t + c0, it, ea, eb, n);
    buf.ma[k] = exp_shift(c.ma);
    buf.mb[k] = exp_shift(c.mb);
    buf.cross[k] = c.cross;
    buf.sb[k] = c.sb;
    la = lse_merge(la, {c.ma, c.sa});
    lb = lse_merge(lb, {c.mb, c.sb});
    if (sep) {
      const LseState c1 = chunk_exp(s + c0, buf.e1.data() + c0, n);
      buf.m1[k] = exp_shift(c1.m);
      l1 = lse_merge(l1, c1);
    }
  }
  const LogNorm na = lse_finish(la), nb = lse_finish(lb);
  const LogNorm n1 = sep ? lse_finish(l1) : na;  // without `sep`, T = 1 and a = s
  float d = 0.f;
  if constexpr (kFusedKL) {
    // KL = sum_k fb_k (C_k + [(mb_k - MB) - (ma_k - MA)] E_k) + (log SA - log SB) sum_k fb_k E_k
    float mass = 0.f;
    for (int64_t k = 0; k < chunks; ++k) {
      if (buf.sb[k] == 0.f) continue;  // no teacher mass in this chunk
      const float fb = fkd_exp(buf.mb[k] - nb.m - nb.log_s);
      d += fb * (buf.cross[k] + ((buf.mb[k] - nb.m) - (buf.ma[k] - na.m)) * buf.sb[k]);
      mass += fb * buf.sb[k];
    }
    d += (na.log_s - nb.log_s) * mass;
  }
  to_prob_factors(buf.ma.data(), chunks, na);
  to_prob_factors(buf.mb.data(), chunks, nb);
  if (sep) to_prob_factors(buf.m1.data(), chunks, n1);
  const float s_label = p.hard ? static_cast<float>(s[label]) : 0.f;

  // Writes the gradient of chunk [c0, c0 + n) from buf.a (which holds it in fp32).
  auto finish_grad_chunk = [&](int64_t c0, int64_t n) {
    if (p.hard && label >= c0 && label < c0 + n) buf.a[label - c0] -= w * p.hard_weight;
    store_from_float(buf.a, grad + c0, n, stream);
  };

  if constexpr (kFusedKL) {
    if (grad != nullptr) {
      // Sweep 2: g = w (soft_weight T (p_s - p_t) + hard_weight softmax(s)) from the kept exponentials.
      // An fp32 gradient is written straight from the registers (the label's entry fixed in its
      // vector); other dtypes go through buf.a and store_from_float.
      const float cs = w * p.soft_weight * p.temperature, ch = w * p.hard_weight;
      for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const float* ea = buf.ea.data() + c0;
        const float* eb = buf.eb.data() + c0;
        const float fa = (cs + (p.hard && !sep ? ch : 0.f)) * buf.ma[k], fb = cs * buf.mb[k];
        const int64_t lab = p.hard && label >= c0 && label < c0 + n ? label - c0 : -1;
        auto emit = [&](int64_t i, auto v) {
          using V = decltype(v);
          if constexpr (std::is_same_v<S, float>) {
            float* dst = grad + c0 + i;
            if constexpr (std::is_same_v<V, Vec>) {
              if (lab >= i && lab < i + Vec::size()) {
                alignas(64) float lanes[Vec::size()];
                v.store(lanes);
                lanes[lab - i] -= ch;
                v = Vec::loadu(lanes);
              }
              if (!stream || !stream_store(v, dst)) v.store(dst);
            } else {
              *dst = lab == i ? v - ch : v;
            }
          } else {
            st(v, buf.a + i);
          }
        };
        if (sep) {
          const float* e1 = buf.e1.data() + c0;
          const float f1 = ch * buf.m1[k];
          for_each_vec(n, [&](int64_t i, auto tag) {
            using V = decltype(tag);
            emit(i, fkd_fma(ld<V>(ea + i), V(fa), fkd_fma(ld<V>(e1 + i), V(f1), ld<V>(eb + i) * V(-fb))));
          });
        } else {
          for_each_vec(n, [&](int64_t i, auto tag) {
            using V = decltype(tag);
            emit(i, fkd_fma(ld<V>(ea + i), V(fa), ld<V>(eb + i) * V(-fb)));
          });
        }
        if constexpr (!std::is_same_v<S, float>) finish_grad_chunk(c0, n);
      }
    }
    return row_loss(p, d, n1, s_label);
  } else {
    const float beta = p.beta;
    // JSD keeps log M from sweep 2 (buf.lm) so that sweep 3 computes no logarithm and needs no
    // teacher logits.
    constexpr bool kJSD = D == Divergence::JSD;
    float* lm_row = kJSD && grad != nullptr ? buf.lm.data() : nullptr;
    // Sweeps 2 and 3: `with_grad` writes the gradient (row_c is then the row constant).
    auto sweep = [&](bool with_grad, float row_c, float* d_out, float* aux_out) {
      // Two-level sums (lanes within a chunk, then chunk totals) keep the rounding error of a 262k
      // vocabulary near that of torch's pairwise sum.
      float dsum = 0.f, auxsum = 0.f;
      for (int64_t c0 = 0, k = 0; c0 < vocab; c0 += kChunk, ++k) {
        const int64_t n = std::min(kChunk, vocab - c0);
        Acc dchunk, auxchunk;
        load_float(s + c0, buf.a, n, p.inv_temperature);
        if (!kJSD || !with_grad) load_float(t + c0, buf.b, n, p.inv_temperature);
        const float* ea = buf.ea.data() + c0;
        const float* eb = buf.eb.data() + c0;
        const float* e1 = sep ? buf.e1.data() + c0 : nullptr;
        float* lmk = lm_row ? lm_row + c0 : nullptr;
        const float fa = buf.ma[k], fb = buf.mb[k], f1 = sep ? buf.m1[k] : 0.f;
        for_each_vec(n, [&](int64_t i, auto tag) {
          using V = decltype(tag);
          const V lps = log_prob(ld<V>(buf.a + i), na);
          const V ps = ld<V>(ea + i) * V(fa);
          if (!with_grad) {
            const V lpt = log_prob(ld<V>(buf.b + i), nb);
            const V pt = ld<V>(eb + i) * V(fb);
            V x(0.f);
            if constexpr (kJSD) {
              const V lm = log_mixture(ps, pt, beta);
              if (lmk) st(lm, lmk + i);
              dchunk.add(jsd_term(lps, lpt, ps, pt, lm, beta, &x));
            } else {
              dchunk.add(div_term<D>(lps, lpt, ps, pt, beta, &x));
            }
            auxchunk.add(x);
          } else {
            const V p1 = !p.hard ? V(0.f) : (sep ? ld<V>(e1 + i) * V(f1) : ps);
            const V dg = [&] {
              if constexpr (kJSD) {
                return jsd_grad(lps, ps, ld<V>(lmk + i), beta, row_c);
              } else {
                return div_grad<D>(lps, log_prob(ld<V>(buf.b + i), nb), ps, ld<V>(eb + i) * V(fb), beta, row_c);
              }
            }();
            st(grad_combine(p, w, dg, p1), buf.a + i);
          }
        });
        dsum += dchunk.total();
        auxsum += auxchunk.total();
        if (with_grad) finish_grad_chunk(c0, n);
      }
      *d_out = dsum;
      *aux_out = auxsum;
    };
    float aux = 0.f, unused = 0.f;
    sweep(/*with_grad=*/false, 0.f, &d, &aux);
    if (grad != nullptr) sweep(true, D == Divergence::ReverseKL ? d : aux, &unused, &unused);
    return row_loss(p, d, n1, s_label);
  }
}

template <Divergence D, typename S, typename T>
void kd_rows_typed(const KdRowsArgs& a, float w, bool stream) {
  const S* s = static_cast<const S*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  S* grad = static_cast<S*>(a.grad);
  float* row_losses = a.row_losses;
  const int64_t ss = a.student_stride, ts = a.teacher_stride, gs = a.grad_stride, vocab = a.vocab;
  const int64_t* labels = a.labels;
  const KdParams p = a.params;
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  const bool keep = grad != nullptr || D != Divergence::KL;
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    RowScratch& buf = thread_scratch(vocab, keep, p.separate_lse1, D == Divergence::JSD && grad != nullptr);
    for (int64_t r = begin; r < end; ++r) {
      S* g = grad ? grad + r * gs : nullptr;
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
    if (stream) stream_fence();  // order the non-temporal stores before the task ends
  });
}

}  // namespace

// The entry point of this instruction set's copy (declared in cpu_isa/kernel_table.h; callers go
// through kd_rows_cpu, kd_loss/kd_rows.h, which checks the arguments first).
void kd_rows(const KdRowsArgs& a, float w, bool stream) {
  FKD_DISPATCH_FLOATING(a.student_dtype, "kd_loss_cpu", [&] {
    using S = scalar_t;
    FKD_DISPATCH_FLOATING(a.teacher_dtype, "kd_loss_cpu", [&] {
      using T = scalar_t;
      if constexpr (!std::is_same_v<S, double> && !std::is_same_v<T, double>) {  // fp64: kd_loss_fwd makes it fp32
        switch (a.params.divergence) {
          case Divergence::KL: return kd_rows_typed<Divergence::KL, S, T>(a, w, stream);
          case Divergence::ReverseKL: return kd_rows_typed<Divergence::ReverseKL, S, T>(a, w, stream);
          case Divergence::JSD: return kd_rows_typed<Divergence::JSD, S, T>(a, w, stream);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
