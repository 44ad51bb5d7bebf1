// Shared by the clipping kernels of both backends (clip_cpu.cpp, clip_cuda.cu): the norm kinds and
// the clip coefficient, written once so that CPU and CUDA compute the bit-identical coefficient.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastkd {

enum class NormKind : int { L1 = 0, L2 = 1, Inf = 2, P = 3 };

inline NormKind norm_kind(double p) {
  if (std::isinf(p)) return NormKind::Inf;
  if (p == 2.0) return NormKind::L2;
  if (p == 1.0) return NormKind::L1;
  return NormKind::P;
}

// min(max_norm / (norm + 1e-6), 1) exactly as torch's clip_grads_with_norm_ evaluates it on a
// norm tensor of dtype Acc: `max_norm / (total_norm + 1e-6)` is `(total_norm + 1e-6).reciprocal()
// * max_norm` (Tensor.__rtruediv__), the Python scalars converted to Acc first; then clamp(max=1),
// which keeps a NaN (NaN > 1 is false).
template <typename Acc>
FKD_HD Acc clip_coefficient(Acc norm, double max_norm) {
  const Acc c = (Acc(1) / (norm + Acc(1e-6))) * Acc(max_norm);
  return c > Acc(1) ? Acc(1) : c;
}

// The scale kernels do nothing when this is false: a coefficient of 1 leaves every gradient as it is
// (a NaN coefficient scales, so NaN propagates into the gradients as with torch).
template <typename Acc>
FKD_HD bool needs_scaling(Acc coef) {
  return !(coef >= Acc(1));
}

// clamp_min(x, lo) then clamp_max(., hi), as torch.nn.utils.clip_grad_value_ does: a NaN element stays
// NaN, and a NaN bound (clip_value = nan) makes every element NaN, as torch's clamp does.
template <typename A>
FKD_HD A clamp_like_torch(A x, A lo, A hi) {
  if (x != x) return x;
  if (lo != lo) return lo;
  if (hi != hi) return hi;
  return x < lo ? lo : (x > hi ? hi : x);
}

}  // namespace fastkd
