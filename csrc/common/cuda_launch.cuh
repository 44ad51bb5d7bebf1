// Host-side helpers of the CUDA launchers (the one home of them; the KD-loss and top-k KD-loss
// launchers use them): the logit dtypes the kernels take, and a kernel's per-device facts and
// dynamic-shared-memory opt-in, each settled once per device.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>

#include "common/common.h"

namespace fastkd {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(X{}) for the logit dtypes the CUDA kernels take (fp64 is converted to fp32 before).
template <typename F>
void dispatch_logits(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: FKD_CHECK(false, what, ": unsupported dtype ", st);
  }
}

// A logit dtype by name, for the launch-information functions ("float32", "bfloat16", "float16").
inline at::ScalarType logit_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  FKD_CHECK(false, "unknown logit dtype '", name, "' (float32, bfloat16 or float16)");
  return at::kFloat;
}

// One kernel K (a type with `static auto fn()` returning the kernel) on one device: its attributes,
// queried once per device, and its opt-in for more than 48 KiB of dynamic shared memory, raised once
// per device to the most any of its launches asks (the caller passes that one value, e.g.
// sharedMemPerBlockOptin - static), never per call to that call's size: two host threads launching
// different sizes would race between one's attribute and the other's launch.
template <typename K>
struct KernelOnDevice {
  static const cudaFuncAttributes& attributes(int device) {
    static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
    static std::array<cudaFuncAttributes, C10_COMPILE_TIME_MAX_GPUS> attrs;
    std::call_once(once[device], [&] { C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs[device], K::fn())); });
    return attrs[device];
  }

  static void opt_in_dyn_smem(int device, int64_t max_dyn_smem) {
    static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
    std::call_once(once[device], [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(K::fn(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(max_dyn_smem)));
    });
  }
};

}  // namespace fastkd
