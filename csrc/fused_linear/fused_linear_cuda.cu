// The CUDA ops of the fused linear + KD losses: the algorithm of fused_linear/fused_linear.h with cuBLAS
// GEMMs and fastkd's CUDA row kernels (kd_rows_cuda, kd_loss/kd_rows.h; topk_rows_cuda, topk_kd/topk_rows.h),
// all on the current stream,
// with no host synchronisation (the reduction's weight stays on the device; ignored rows are computed
// and zeroed by the row kernel, since skipping them would need their count on the host).
//
// bf16/fp16 inputs: the logits GEMMs write fp32 (aten::mm with out_dtype = fp32, fp32 accumulation);
// the weight gradient is accumulated in fp32 by cublasGemmEx with bf16/fp16 operands and an fp32 C
// (beta = 1: ATen's addmm with out_dtype requires C in the operands' dtype); the hidden-state gradient
// is a GEMM in the inputs' dtype (fp32 accumulation) from a low-precision copy of the chunk's fp32
// logits gradient, as an unfused backward would compute it.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "fused_linear/fused_linear.h"
#include "kd_loss/kd_rows.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {

namespace {

cudaDataType_t cuda_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? CUDA_R_16BF : t == at::kHalf ? CUDA_R_16F : CUDA_R_32F;
}

struct CudaGemms {
  at::Tensor low_buf;  // [chunk, V] the chunk's logits gradient in the student's dtype (bf16/fp16 only)
  at::Tensor low;      // its rows of the current chunk

  at::Tensor weight(const at::Tensor& w) const { return w; }
  at::Tensor hidden_chunk(const at::Tensor& h) const { return h; }
  void logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& w) const {
    if (h.scalar_type() == at::kFloat) {
      at::mm_out(out, h, w.t());
    } else {
      at::mm_out(out, h, w.t(), at::kFloat);
    }
  }
  void chunk_gradient(const at::Tensor& g) {
    if (!low_buf.defined()) return;
    low = low_buf.narrow(0, 0, g.size(0));
    low.copy_(g);
  }
  void grad_hidden(at::Tensor& out, const at::Tensor& g, const at::Tensor& w) const {
    at::mm_out(out, low.defined() ? low : g, w);
  }
  void grad_weight(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h) const {
    if (!low.defined()) {
      acc.addmm_(g.t(), h);
      return;
    }
    // Row-major acc [V, H] += g^T [V, n] @ h [n, H] is, column-major, acc^T [H, V] += h^T [H, n] @ g [n, V].
    FKD_CHECK(h.stride(1) == 1 && low.is_contiguous() && acc.is_contiguous(), "fused_linear: unexpected layout");
    const float one = 1.f;
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    const cudaDataType_t t = cuda_dtype(h.scalar_type());
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(h.size(1)),
                                      static_cast<int>(low.size(1)), static_cast<int>(h.size(0)), &one, h.data_ptr(),
                                      t, static_cast<int>(h.stride(0)), low.data_ptr(), t,
                                      static_cast<int>(low.stride(0)), &one, acc.data_ptr(), CUDA_R_32F,
                                      static_cast<int>(acc.stride(0)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  void kd_rows(const KdRowsArgs& r, const at::Tensor& weight) const {
    kd_rows_cuda(r, weight.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  }
  void topk_rows(const TopkRowsArgs& r, const at::Tensor& weight) const {
    topk_rows_cuda(r, weight.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  }
};

template <typename Teacher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(const FusedLinearArgs& a) {
  FKD_CHECK_ARG(a.vocab <= (int64_t{1} << 30), "student_weight", "vocabulary of ", a.vocab,
                " entries is too large (at most 2^30)");
  const at::Tensor weight = row_weight(a);  // a 0-d device tensor: the kernels read it, the host never does
  CudaGemms gemms;
  if (a.student.scalar_type() != at::kFloat && (a.grad_hidden || a.grad_weight || a.grad_bias)) {
    gemms.low_buf = at::empty({std::max<int64_t>(1, std::min(a.chunk, a.rows)), a.vocab}, a.student.options());
  }
  return fused_linear_forward<Teacher>(a, weight, gemms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_loss_fwd_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale, const at::Tensor& options,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence, int64_t ignore_index,
    c10::string_view reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  FKD_CHECK_ARG(student_hidden.is_cuda(), "student_hidden", "expected a CUDA tensor, got one on ",
                student_hidden.device());
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  return forward_cuda<DenseTeacher<CudaGemms>>(make_fused_linear_args(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, row_scale,
      options, normalizer, divergence, ignore_index, reduction, chunk_size, grad_hidden, grad_weight, grad_bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_topk_kd_loss_fwd_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_values, const at::Tensor& teacher_indices, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& row_scale, const at::Tensor& options, const std::optional<at::Tensor>& normalizer,
    c10::string_view divergence, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  FKD_CHECK_ARG(student_hidden.is_cuda(), "student_hidden", "expected a CUDA tensor, got one on ",
                student_hidden.device());
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  return forward_cuda<TopkTeacher<CudaGemms>>(make_fused_topk_args(
      student_hidden, student_weight, student_bias, teacher_values, teacher_indices, labels, row_scale, options,
      normalizer, divergence, ignore_index, reduction, chunk_size, grad_hidden, grad_weight, grad_bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("fused_linear_kd_loss_fwd", &fused_linear_kd_loss_fwd_cuda);
  m.impl("fused_linear_topk_kd_loss_fwd", &fused_linear_topk_kd_loss_fwd_cuda);
}

}  // namespace fastkd
