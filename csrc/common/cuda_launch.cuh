// Host-side helpers of the CUDA launchers (the one home of them; the KD-loss and top-k KD-loss
// launchers use them): the logit dtypes the kernels take, a kernel's per-device facts and
// dynamic-shared-memory opt-in, each settled once per device, the runtime's side of the
// launch-information functions, and the ops' CUDA forward around their row kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/common.h"
#include "kd_loss/kd_loss.h"

namespace fastkd {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest vocabulary the CUDA kernels take (2^30: a row's entries are indexed with int).
constexpr int64_t kMaxCudaVocab = int64_t{1} << 30;

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

// What a launch-information function (kd_cuda_launch_info, topk_cuda_launch_info) reports of the
// configuration c of kernel fn: c's fields (for_each_field, kd_loss/kd_loss_launch.h), then the runtime's
// side: fn's static shared memory, registers and dynamic-shared-memory limit as they are now (after any
// opt-in), and cudaOccupancyMaxActiveBlocksPerMultiprocessor's resident blocks per SM of c's launch.
template <typename Config, typename Fn>
std::vector<std::pair<std::string, int64_t>> launch_info_of(const Config& c, Fn fn) {
  std::vector<std::pair<std::string, int64_t>> out;
  for_each_field(c, [&](const char* name, auto value) { out.emplace_back(name, static_cast<int64_t>(value)); });
  int occupancy = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, fn, c.threads,
                                                               static_cast<size_t>(c.dyn_smem)));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fn));
  out.emplace_back("static_smem", static_cast<int64_t>(attr.sharedSizeBytes));
  out.emplace_back("regs", attr.numRegs);
  out.emplace_back("max_dyn_smem_attr", attr.maxDynamicSharedSizeBytes);
  out.emplace_back("occupancy", occupancy);
  return out;
}

// The checks of a CUDA row launcher (kd_rows_cuda, topk_rows_cuda; api: its name) beyond its row API's:
// the vocabulary (at most kMaxCudaVocab) and a row weight. Returns whether there are rows to launch.
template <typename RowsArgs>
bool rows_to_launch(const RowsArgs& a, const float* row_weight, const char* api) {
  FKD_CHECK(a.vocab <= kMaxCudaVocab, api, ": vocabulary of ", a.vocab, " entries (at most 2^30)");
  FKD_CHECK(row_weight != nullptr, api, ": null row_weight");
  return a.rows != 0;
}

// The CUDA forward of a KD op from its checked arguments a (KdLossArgs, kd_loss/kd_loss.h;
// TopkLossArgs, topk_kd/topk_kd.h): the op's outputs (kd_loss/kd_loss.h; sizes: the student's shape),
// computed on the student's device and the current stream by the row kernel rows_cuda on the
// arguments rows_args makes of a and the outputs. Nothing waits for the device.
template <typename Args, typename RowsArgs>
KdOpOutputs kd_op_forward_cuda(const Args& a, at::IntArrayRef sizes, bool with_grad, bool with_terms,
                               RowsArgs (*rows_args)(const Args&, float*, void*),
                               void (*rows_cuda)(const RowsArgs&, const float*, cudaStream_t)) {
  FKD_CHECK_ARG(a.student.is_cuda(), "student_logits", "expected a CUDA tensor, got one on ", a.student.device());
  FKD_CHECK_ARG(a.vocab <= kMaxCudaVocab, "student_logits", "vocabulary of ", a.vocab,
                " entries is too large (at most 2^30)");
  const c10::cuda::CUDAGuard guard(a.student.device());
  const at::Tensor weight = row_weight(a);  // a 0-d device tensor: the kernel reads it, the host never does
  at::Tensor row_losses = at::empty({a.rows}, a.student.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty(sizes, a.student.options()) : at::empty({0}, a.student.options());
  at::Tensor row_terms = with_terms ? at::empty({a.rows, 2}, row_losses.options()) : at::Tensor();
  rows_cuda(with_row_terms(rows_args(a, row_losses.data_ptr<float>(), with_grad ? grad.data_ptr() : nullptr),
                           row_terms),
            weight.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  if (grad.scalar_type() != a.grad_dtype) grad = grad.to(a.grad_dtype);
  return {reduce_rows(a, row_losses, weight), grad, reduce_terms(a, row_terms, weight)};
}

}  // namespace fastkd
