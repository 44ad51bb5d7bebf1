// Per-row and per-element maths of the fused KD loss, shared by the CPU kernel (kd_loss_cpu.cpp,
// where V is at::vec::Vectorized<float>) and the CUDA kernel (kd_loss_cuda.cu, where V is float),
// so the CPU tests exercise the same formulas the GPU runs.
//
// Notation for one row: a = student / T, b = teacher / T, lps = a - lse(a) = log p_s,
// lpt = b - lse(b) = log p_t. The soft term of a row is T^2 * D and its gradient with respect to the
// student logits is T * dD/da (the 1/T of a = s/T times T^2). Everything is computed in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

#if defined(__CUDACC__)
#include "common/reduce.cuh"
#else
#include <ATen/cpu/vec/vec.h>
#endif

namespace fastkd {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2 };
enum class Reduction : int { None = 0, Sum = 1, BatchMean = 2 };

// ---- scalar and vector primitives ---------------------------------------------------------------
FKD_HD float fkd_exp(float x) { return expf(x); }
FKD_HD float fkd_log(float x) { return logf(x); }
// p == 0 ? 0 : x for a probability p -- the 0 * log 0 = 0 convention, and no 0 * (-inf) = NaN on
// masked entries (-inf logits). A NaN p (from a NaN or +inf logit) is not 0: it passes x through, so a
// non-finite input makes the loss and gradient non-finite as torch's textbook formula does, never 0.
FKD_HD float fkd_if_pos(float p, float x) { return p == 0.f ? 0.f : x; }
FKD_HD float fkd_max(float a, float b) { return fmaxf(a, b); }
FKD_HD float fkd_fma(float a, float b, float c) { return fmaf(a, b, c); }

#if !defined(__CUDACC__)
using VecF = at::vec::Vectorized<float>;
// ATen's polynomial exp (20 ulp; results below FLT_MIN flush to 0) is ~3x faster than Sleef's
// 1-ulp expf and what ATen's own CPU attention kernels use; the float64-oracle tests hold the
// kernel to at most 2x the error of torch's fp32 maths with it.
inline VecF fkd_exp(const VecF& x) { return x.exp_u20(); }
inline VecF fkd_log(const VecF& x) { return x.log(); }
inline VecF fkd_if_pos(const VecF& p, const VecF& x) {
  return VecF::blendv(x, VecF(0.f), p == VecF(0.f));
}
inline VecF fkd_max(const VecF& a, const VecF& b) { return at::vec::maximum(a, b); }
inline VecF fkd_fma(const VecF& a, const VecF& b, const VecF& c) { return at::vec::fmadd(a, b, c); }
#endif

// ---- online log-sum-exp --------------------------------------------------------------------------
// (m, s) stands for log(s) + m, with s = sum exp(x - m). Merging is associative and commutative up
// to rounding; kernels merge in a fixed order so results are deterministic.
struct LseState {
  float m;
  float s;
};

FKD_HD LseState lse_empty() { return {-INFINITY, 0.f}; }

// x * y and x + y each rounded on their own, never contracted into a fused multiply-add (nvcc
// contracts by default; the C++ build has -ffp-contract=off, where they are the plain operators).
FKD_HD float fkd_mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}
FKD_HD float fkd_add_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}

// Bit-for-bit commutative: merge(x, y) == merge(y, x). The two lanes of a shuffle exchange merge the
// same pair in opposite orders and each goes on to normalise its entries with its own result, so
// a * b + c * d must not become fma(a, b, c * d) on one lane and fma(c, d, a * b) on the other.
// (fmaxf may return either zero when the maxima are +0 and -0; every later use of m, x - m and
// exp(x.m - m), gives the same values with either, up to the sign of an exact zero.)
FKD_HD LseState lse_merge(LseState x, LseState y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return lse_empty();  // both empty or all entries masked so far
  // exp(-inf - m) = 0: an empty side contributes nothing.
  return {m, fkd_add_rn(fkd_mul_rn(x.s, fkd_exp(x.m - m)), fkd_mul_rn(y.s, fkd_exp(y.m - m)))};
}

// Online log-sum-exp of N more values (the CUDA kernels' per-thread statistics): one max, one rescale
// when the max grows, N exps. A NaN max (all N values NaN) makes the state NaN for good, so that a NaN
// logit reaches the log-sum-exp even as a row's first value (where `mx > st.m` alone would drop it).
template <int N>
FKD_HD void lse_add(LseState& st, const float (&x)[N]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mx = fmaxf(mx, x[k]);
  if (!(mx <= st.m)) {
    st.s *= fkd_exp(st.m - mx);  // exp(-inf) = 0 on the first values (st.s is 0 then anyway)
    st.m = mx;
  }
  if (st.m == -INFINITY) return;  // all entries so far are -inf (masked): exp(-inf - -inf) is NaN
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) acc += fkd_exp(x[k] - st.m);
  st.s += acc;
}

#if defined(__CUDACC__)
__device__ __forceinline__ LseState shfl_xor(LseState v, int m) { return {shfl_xor(v.m, m), shfl_xor(v.s, m)}; }
#endif

// Log-probabilities are formed as (x - m) - log(s), never x - (m + log s): with logits of 1e4 / T
// the rounded sum m + log s would carry an absolute error of ulp(1e5) ~ 0.01 into every log-prob
// (and 1% into p = exp(log p)), where (x - m) is exact near the maximum (as in torch's log_softmax).
struct LogNorm {
  float m;      // running max
  float log_s;  // log sum exp(x - m)
};

FKD_HD LogNorm lse_finish(LseState x) { return {x.m, fkd_log(x.s)}; }

template <typename V>
FKD_HD V log_prob(const V& x, const LogNorm& n) { return (x - V(n.m)) - V(n.log_s); }

// ---- per-element terms ---------------------------------------------------------------------------
// log M for JSD, M = beta p_t + (1 - beta) p_s. M is clamped to FLT_MIN: where both probabilities
// are so small that M underflows, log M would be -inf and p * (log p - log M) = +inf; with the clamp
// the term is p * O(1) with p < FLT_MIN, i.e. 0, as in exact arithmetic.
template <typename V>
FKD_HD V log_mixture(const V& ps, const V& pt, float beta) {
  return fkd_log(fkd_max(V(beta) * pt + V(1.f - beta) * ps, V(1.17549435e-38f)));
}

// JSD's terms given lm = log M (kernels that keep log M between sweeps call these directly):
// D = beta KL(p_t || M) + (1 - beta) KL(p_s || M), *aux = this entry's part of KL(p_s || M);
// dD/da_j = (1 - beta) p_s (log p_s - log M - KL(p_s || M)), row_c = KL(p_s || M).
template <typename V>
FKD_HD V jsd_term(const V& lps, const V& lpt, const V& ps, const V& pt, const V& lm, float beta, V* aux) {
  const V ks = fkd_if_pos(ps, ps * (lps - lm));
  *aux = ks;
  return V(beta) * fkd_if_pos(pt, pt * (lpt - lm)) + V(1.f - beta) * ks;
}

template <typename V>
FKD_HD V jsd_grad(const V& lps, const V& ps, const V& lm, float beta, float row_c) {
  return V(1.f - beta) * fkd_if_pos(ps, ps * (lps - lm - V(row_c)));
}

// Contribution of one vocabulary entry to the row's divergence D (summed over the row), and the
// auxiliary sum the gradient needs (only JSD has one: KL(p_s || M)).
template <Divergence D, typename V>
FKD_HD V div_term(const V& lps, const V& lpt, const V& ps, const V& pt, float beta, V* aux) {
  if constexpr (D == Divergence::KL) {
    (void)ps; (void)beta; (void)aux;
    return fkd_if_pos(pt, pt * (lpt - lps));  // KL(p_t || p_s)
  } else if constexpr (D == Divergence::ReverseKL) {
    (void)pt; (void)beta; (void)aux;
    return fkd_if_pos(ps, ps * (lps - lpt));  // KL(p_s || p_t)
  } else {
    return jsd_term(lps, lpt, ps, pt, log_mixture(ps, pt, beta), beta, aux);
  }
}

// Whether the gradient needs the row's sums (D or KL(p_s || M)) first, i.e. one more pass.
template <Divergence D>
constexpr bool grad_needs_row_sum() { return D != Divergence::KL; }

// dD/da_j for one entry. row_c is the row constant: D for reverse KL, KL(p_s || M) for JSD.
//   KL:      p_s - p_t
//   reverse: p_s (log p_s - log p_t - D)
//   JSD:     (1 - beta) p_s (log p_s - log M - KL(p_s || M))
template <Divergence D, typename V>
FKD_HD V div_grad(const V& lps, const V& lpt, const V& ps, const V& pt, float beta, float row_c) {
  if constexpr (D == Divergence::KL) {
    (void)lps; (void)lpt; (void)beta; (void)row_c;
    return ps - pt;
  } else if constexpr (D == Divergence::ReverseKL) {
    (void)pt; (void)beta;
    return fkd_if_pos(ps, ps * (lps - lpt - V(row_c)));
  } else {
    return jsd_grad(lps, ps, log_mixture(ps, pt, beta), beta, row_c);
  }
}

// ---- row assembly --------------------------------------------------------------------------------
struct KdParams {
  float temperature;
  float inv_temperature;
  float beta;
  float soft_weight;
  float hard_weight;
  int64_t ignore_index;
  bool hard;          // hard_weight != 0: the cross-entropy term and its gradient are needed
  bool separate_lse1; // hard and T != 1: the T = 1 log-sum-exp of the student is its own statistic
  Divergence divergence;  // JSD only for 0 < beta < 1 (make_kd_params, kd_loss/kd_rows.h)
};

// Row loss from its sums: soft_weight * T^2 * D + hard_weight * CE, CE = -log softmax(s)[label]. (hard
// with hard_weight 0: the cross-entropy is computed for the terms only; a 0 * inf must not reach the loss.)
FKD_HD float row_loss(const KdParams& p, float d, const LogNorm& n1, float s_label) {
  float loss = p.soft_weight * p.temperature * p.temperature * d;
  if (p.hard && p.hard_weight != 0) loss -= p.hard_weight * log_prob(s_label, n1);
  return loss;
}

// The same, and the row's unweighted terms into terms[0], terms[1] (T^2 * D and CE, 0 without the hard
// term) where terms != nullptr (the row APIs' row_terms, kd_rows.h).
FKD_HD float row_loss(const KdParams& p, float d, const LogNorm& n1, float s_label, float* terms) {
  if (terms != nullptr) {
    terms[0] = p.temperature * p.temperature * d;
    terms[1] = p.hard ? -log_prob(s_label, n1) : 0.f;
  }
  return row_loss(p, d, n1, s_label);
}

// Gradient of one entry with respect to the student logit, times the row's reduction weight w:
//   w * (soft_weight * T * dD/da + hard_weight * softmax(s)_j)   (minus w * hard_weight at the label,
// which the kernels apply to that one entry).
template <typename V>
FKD_HD V grad_combine(const KdParams& p, float w, const V& ddiv, const V& p1) {
  V g = V(w * p.soft_weight * p.temperature) * ddiv;
  if (p.hard) g = g + V(w * p.hard_weight) * p1;
  return g;
}

}  // namespace fastkd
