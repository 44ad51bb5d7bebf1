// The CPU op of the top-k KD loss: argument handling (topk_kd/topk_kd.h), the gradient buffer
// (kd_loss/kd_grad_cpu.h), and the row-kernel entry topk_rows_cpu (topk_kd/topk_rows.h), which runs the
// instruction set's copy in use (cpu_isa/kernel_table.h). The row kernel is topk_kd_cpu_kernel.h, whose
// copy for this module's instruction set this file compiles. The backward is kd_loss_scale_
// (kd_loss_cpu.cpp).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu_isa/kernel_table.h"
#include "kd_loss/kd_grad_cpu.h"
#include "kd_loss/kd_loss.h"
#include "topk_kd/topk_kd.h"
#include "topk_kd/topk_kd_cpu_kernel.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {

namespace {

// kTerms: the op's twin with the terms, *_terms_fwd (kd_loss/kd_loss.h's op_outputs).
template <bool kTerms>
auto topk_kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& values,
    const at::Tensor& indices, const std::optional<at::Tensor>& labels,
    const at::Tensor& options, const std::optional<at::Tensor>& normalizer, c10::string_view divergence,
    int64_t ignore_index, c10::string_view reduction, bool with_grad) {
  return op_outputs<kTerms>(kd_op_forward_cpu(
      with_normalizer(make_topk_loss_args(student, values, indices, labels, options, divergence, ignore_index,
                                        reduction), normalizer),
      student.sizes(), with_grad, kTerms, topk_rows_args, topk_rows_cpu));
}

}  // namespace

void topk_rows_cpu(const TopkRowsArgs& a, float row_weight, bool stream) {
  check_topk_rows_args(a, /*in_place_ok=*/true);
  if (a.rows == 0) return;
  cpu_kernels().topk_rows(a, row_weight, stream);
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_kd_loss_fwd", &topk_kd_loss_fwd_cpu<false>);
  m.impl("topk_kd_loss_terms_fwd", &topk_kd_loss_fwd_cpu<true>);
}

}  // namespace fastkd
