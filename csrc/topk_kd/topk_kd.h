// Host-side argument handling of the top-k KD loss op, shared by the CPU and CUDA implementations:
// from the op's tensors to the row kernel's raw arguments (topk_kd/topk_rows.h) and back.
//
// Op (schema in fastkd/ops/topk.py, beside the wrapper):
//   fastkd::topk_kd_loss_fwd(student [..., V], teacher_values [..., K], teacher_indices [..., K],
//                            labels [...]?, options, divergence, ignore_index, reduction, with_grad)
//       -> (loss, grad)
//     options, loss and grad as kd_loss_fwd (kd_loss/kd_loss.h): options float64 CPU [temperature, beta,
//     soft_weight, hard_weight]; loss fp32 [] or [...] ("none"); grad the dense d(loss)/d(student) for
//     grad_output = 1, student dtype and shape, contiguous, or an empty [0] tensor without with_grad.
//     The backward is kd_loss_scale_ (the same in-place scaling of the saved gradient).
//   An implementation for a backend reads (as kd_loss_fwd's; the forward helpers kd_op_forward_cpu,
//   kd_loss/kd_grad_cpu.h, and kd_op_forward_cuda, common/cuda_launch.cuh):
//     return kd_op_forward_<backend>(make_topk_loss_args(student, values, indices, labels, options,
//                                                        divergence, ignore_index, reduction),
//                                    student.sizes(), with_grad, topk_rows_args, topk_rows_<backend>);
#pragma once

#include <optional>
#include <string_view>
#include <vector>

#include "common/common.h"
#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_loss_math.h"
#include "kd_loss/kd_rows.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {

// KdOpArgs (kd_loss/kd_loss.h; its params: KL or JSD with 0 < beta < 1) and the top-k teacher.
struct TopkLossArgs : KdOpArgs {
  at::Tensor values;   // [rows, K], last dim contiguous, fp32/fp16/bf16
  at::Tensor indices;  // [rows, K], last dim contiguous, int32 or int64
  int64_t k;
};

// Validates the op's arguments (the Python wrapper validates first and names the user's arguments;
// this is the op's own contract for direct callers; index values are checked by the kernels) and
// normalises the layout: fp64 logits or values become fp32, integer indices other than int32 int64.
inline TopkLossArgs make_topk_loss_args(const at::Tensor& student, const at::Tensor& values,
                                        const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                        const at::Tensor& options, c10::string_view divergence_,
                                        int64_t ignore_index, c10::string_view reduction_) {
  const std::string_view divergence(divergence_.data(), divergence_.size());
  const std::string_view reduction(reduction_.data(), reduction_.size());
  FKD_CHECK_ARG(student.dim() >= 1, "student_logits", "expected shape [..., vocab], got a 0-d tensor");
  FKD_CHECK_ARG(values.dim() >= 1 && values.sizes() == indices.sizes(), "teacher_values",
                "expected shape [..., K], the shape of teacher_indices; got ", values.sizes(), " and ",
                indices.sizes());
  FKD_CHECK_ARG(student.sizes().slice(0, student.dim() - 1) == values.sizes().slice(0, values.dim() - 1),
                "teacher_values", "leading shapes differ: student ", student.sizes(), ", teacher_values ",
                values.sizes());
  FKD_CHECK_ARG(values.device() == student.device() && indices.device() == student.device(), "teacher_values",
                "teacher_values on ", values.device(), " and teacher_indices on ", indices.device(),
                " but student_logits on ", student.device());
  const auto st = student.scalar_type(), vt = values.scalar_type(), it = indices.scalar_type();
  FKD_CHECK_ARG(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "student_logits",
                "expected a floating dtype, got ", st);
  FKD_CHECK_ARG(vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16 || vt == at::kDouble, "teacher_values",
                "expected a floating dtype, got ", vt);
  FKD_CHECK_ARG(at::isIntegralType(it, /*includeBool=*/false), "teacher_indices", "expected an integer dtype, got ",
                it);
  const KdOptions o = read_kd_options(options);
  Divergence div = parse_divergence(divergence);
  FKD_CHECK_ARG(div == Divergence::KL || (div == Divergence::JSD && o.beta < 1), "divergence",
                div == Divergence::ReverseKL ? "'reverse_kl'" : "'jsd' with beta = 1",
                " is infinite whenever the student has mass outside the teacher's top-k support; use 'kl' or "
                "'jsd' with beta < 1");
  TopkLossArgs a;
  set_student_args(a, student);
  a.k = values.size(-1);
  FKD_CHECK_ARG(a.k >= 1 && a.k <= a.vocab, "teacher_values", "K = ", a.k, " entries per row; expected 1 <= K <= "
                "vocab (", a.vocab, ")");
  a.values = as_rows(vt == at::kDouble ? values.to(at::kFloat) : values);
  a.indices = as_rows(it == at::kInt || it == at::kLong ? indices : indices.to(at::kLong));
  set_loss_args(a, labels, student.device(), o, div, ignore_index, reduction);
  return a;
}

// The row kernel's arguments for this call (student_rows_args, kd_loss/kd_loss.h, and the top-k teacher).
inline TopkRowsArgs topk_rows_args(const TopkLossArgs& a, float* row_losses, void* grad) {
  TopkRowsArgs r = student_rows_args<TopkRowsArgs>(a, row_losses, grad);
  r.values = a.values.data_ptr();
  r.values_dtype = a.values.scalar_type();
  r.values_stride = a.values.stride(0);
  r.indices = a.indices.data_ptr();
  r.indices_int64 = a.indices.scalar_type() == at::kLong;
  r.indices_stride = a.indices.stride(0);
  r.k = a.k;
  return r;
}

}  // namespace fastkd
