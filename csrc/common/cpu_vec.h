// The vectorised helpers of fastkd's CPU row kernels, compiled once per instruction set like the
// kernels that include them (kd_loss/kd_loss_cpu_kernel.h, topk_kd/topk_kd_cpu_kernel.h): everything is
// in namespace fastkd::<CPU_CAPABILITY>, so the AVX2 (fastkd._C) and AVX-512 (fastkd._C_avx512) copies
// never share a symbol (cpu_isa/kernel_table.h). Loads and stores between logits of any of the three
// dtypes and fp32 chunk buffers (non-temporal stores for gradients far larger than the caches), an exp
// for non-positive arguments, chunk maxima and online log-sum-exp statistics, and a loop that serves
// full vectors and the scalar tail with one generic body (the maths headers' templates).
#pragma once

#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float for every instruction set
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kd_loss/kd_loss_math.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastkd {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
inline constexpr int64_t kChunk = 2048;  // floats per chunk buffer: 2 x 8 KiB stay in L1

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
// kScaled: the same for x * scale (scale = 1 / T > 0; x * scale rounded to fp32 before the shift, as
// torch's s / T), prefetching the next chunk: the one read of a row that nothing else streams along
// (the top-k kernel's student sweep). kKeep = false: only the sum (e is not written, may be null).
template <bool kScaled = false, bool kKeep = true, typename T>
LseState chunk_exp(const T* x, float* e, int64_t n, float scale = 1.f) {
  const float m = kScaled ? chunk_max(x, n) * scale : chunk_max(x, n);  // max(s) / T = max(s / T): rounding is monotonic
  const float sh = exp_shift(m);
  Acc sum;
  for_each_vec(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    V xi = ldc<V>(x + i);
    if constexpr (kScaled) {
      if constexpr (std::is_same_v<V, Vec>) prefetch(x + i + kChunk);
      xi = xi * V(scale);
    }
    const V ei = exp_nonpos(xi - V(sh));
    if constexpr (kKeep) st(ei, e + i);
    sum.add(ei);
  });
  return {m, sum.total()};
}

// Chunk shifts -> factors f_k = exp(shift_k - m) / s, so that p = e * f_k.
inline void to_prob_factors(float* mk, int64_t chunks, const LogNorm& n) {
  for (int64_t k = 0; k < chunks; ++k) mk[k] = fkd_exp(mk[k] - n.m - n.log_s);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
