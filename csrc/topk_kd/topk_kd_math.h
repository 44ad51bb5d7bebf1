// Per-entry and per-row maths of the top-k KD loss, shared by the CPU kernel (topk_kd_cpu_kernel.h) and
// the CUDA kernel (topk_kd_cuda.cu), so that the CPU tests exercise the formulas the GPU runs. Scalar
// fp32: this part is O(K) per row; the O(V) part (the student's log-sum-exp and the dense gradient) is
// kd_loss_math.h's online log-sum-exp and each backend's vector loops.
//
// Notation for one row (topk_kd/topk_rows.h): a = student / T, lps = log p_s (over V), v = values / T,
// lpt = log p~ (over the K entries), S the support. For JSD (0 < beta < 1), with c = -log(1 - beta)
// and the log-ratio z_k = log(beta / (1 - beta)) + lpt_k - lps[i_k]:
//   on S:  log p_s - log M = c - softplus(z),   log p~ - log M = -log(beta) - softplus(-z);
//   off S: log p_s - log M = c (M = (1 - beta) p_s there).
// As sum_S p_s + (the student's mass off S) = 1, KL(p_s || M) = c - R with R = sum_S p_s softplus(z) >= 0:
//   D = beta sum_S p~ (-log(beta) - softplus(-z)) + (1 - beta) (c - R),
//   dD/da_j = (1 - beta) p_s_j R off S and (1 - beta) p_s_j (R - softplus(z_j)) on S.
// This form subtracts no probabilities from 1 (1 - sum_S p_s cancels where the support holds nearly all
// of the student's mass, and T multiplies the error into the gradient) and takes no log M (which needs a
// clamp where M underflows): every term is a probability times a softplus. Forward KL:
//   D = sum_S p~ (lpt - lps), dD/da_j = p_s_j - p~_j (p~ = 0 off S).
// Terms p * x are 0 where p == 0 (0 log 0 = 0; no 0 * inf); a NaN probability propagates.
#pragma once

#include <cmath>

#include "common/host_device.h"
#include "kd_loss/kd_loss_math.h"

namespace fastkd {

// log(1 + exp(z)) for any z (+-inf included) without overflow; NaN stays NaN (through exp(-|z|)).
FKD_HD float fkd_softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }

// p * x, 0 where p == 0.
FKD_HD float topk_pterm(float p, float x) { return p != 0.f ? p * x : 0.f; }

// The row constants of JSD for beta in (0, 1).
struct TopkJsd {
  float beta;
  float c;             // -log(1 - beta)
  float log_odds;      // log(beta / (1 - beta))
  float neg_log_beta;  // -log(beta)
};

FKD_HD TopkJsd make_topk_jsd(float beta) {
  const float c = -log1pf(-beta);
  return {beta, c, logf(beta) + c, -logf(beta)};
}

// One support entry's sums. KL: d = p~ (lpt - lps). JSD: d = p~ (-log(beta) - softplus(-z)) (the
// teacher's part, before the factor beta), r = p_s softplus(z) (R's term), sp = softplus(z) (for the
// entry's gradient). lpt, lps: log p~_k and log p_s[i_k]; pt = exp(lpt), ps = exp(lps).
struct TopkTerm {
  float d;
  float r;
  float sp;
};

template <Divergence D>
FKD_HD TopkTerm topk_term(float lpt, float pt, float lps, float ps, const TopkJsd& j) {
  if constexpr (D == Divergence::KL) {
    (void)ps; (void)j;
    return {topk_pterm(pt, lpt - lps), 0.f, 0.f};
  } else {
    const float z = j.log_odds + (lpt - lps);
    const float sp = fkd_softplus(z);
    return {topk_pterm(pt, j.neg_log_beta - fkd_softplus(-z)), topk_pterm(ps, sp), sp};
  }
}

// The row's divergence from the summed terms (d_sum = sum of TopkTerm::d, r_sum = R).
template <Divergence D>
FKD_HD float topk_divergence(float d_sum, float r_sum, const TopkJsd& j) {
  if constexpr (D == Divergence::KL) {
    (void)r_sum; (void)j;
    return d_sum;
  } else {
    return j.beta * d_sum + (1.f - j.beta) * (j.c - r_sum);
  }
}

// dD/da_j = alpha * p_s_j off the support (alpha: 1 for KL, (1 - beta) R for JSD) ...
template <Divergence D>
FKD_HD float topk_dense_coef(float r_sum, const TopkJsd& j) {
  if constexpr (D == Divergence::KL) {
    (void)r_sum; (void)j;
    return 1.f;
  } else {
    return (1.f - j.beta) * r_sum;
  }
}

// ... and on the support, from the entry's p_s_j and p~_k: KL p_s_j - p~_k, JSD (1 - beta) p_s_j (R - sp_k).
template <Divergence D>
FKD_HD float topk_support_grad(float ps, float pt, float sp, float r_sum, const TopkJsd& j) {
  if constexpr (D == Divergence::KL) {
    (void)sp; (void)r_sum; (void)j;
    return ps - pt;
  } else {
    (void)pt;
    return topk_pterm(ps, (1.f - j.beta) * (r_sum - sp));
  }
}

}  // namespace fastkd
