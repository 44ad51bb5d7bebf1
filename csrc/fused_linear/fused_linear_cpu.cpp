// The CPU ops of the fused linear + KD losses: the algorithm of fused_linear/fused_linear.h with ATen's CPU
// GEMMs and fastkd's row kernels (kd_rows_cpu, kd_loss/kd_rows.h; topk_rows_cpu, topk_kd/topk_rows.h). ATen's CPU GEMMs have no fp32
// output for bf16/fp16 inputs, so low-precision weights are converted to fp32 once per call (and each
// chunk's hidden rows as it is processed): a chunk's logits are never rounded to the inputs' dtype. Rows
// whose label is ignore_index are dropped before the GEMMs (their loss and gradient are 0).
#include <ATen/ops/index_copy.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "fused_linear/fused_linear.h"
#include "kd_loss/kd_rows.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {

namespace {

struct CpuGemms {
  float row_weight;  // "batchmean": 1 / valid rows or 1 / normalizer; else 1 (read once from its CPU tensor)

  at::Tensor weight(const at::Tensor& w) const { return w.to(at::kFloat); }
  at::Tensor hidden_chunk(const at::Tensor& h) const { return h.to(at::kFloat); }
  void logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& w) const { at::mm_out(out, h, w.t()); }
  void chunk_gradient(const at::Tensor&) const {}
  void grad_hidden(at::Tensor& out, const at::Tensor& g, const at::Tensor& w) const {
    if (out.scalar_type() == at::kFloat) {
      at::mm_out(out, g, w);
    } else {
      out.copy_(at::mm(g, w));
    }
  }
  void grad_weight(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h) const { acc.addmm_(g.t(), h); }
  void kd_rows(const KdRowsArgs& r, const at::Tensor&) const { kd_rows_cpu(r, row_weight, /*stream=*/false); }
  void topk_rows(const TopkRowsArgs& r, const at::Tensor&) const { topk_rows_cpu(r, row_weight, /*stream=*/false); }
};

// Both ops after their arguments: ignored rows dropped before the GEMMs, their outputs put back as zeros.
template <typename Teacher>
FusedOutputs forward_cpu(const FusedLinearArgs& a, at::IntArrayRef hidden_shape) {
  FKD_CHECK_ARG(a.student.device().is_cpu(), "student_hidden", "expected a CPU tensor, got one on ",
                a.student.device());
  const at::Tensor weight = row_weight(a);
  CpuGemms gemms{weight.item<float>()};  // a CPU tensor: no device to wait for
  at::Tensor keep;  // the rows to compute, when some are ignored
  if (a.labels.defined()) {
    const at::Tensor valid = a.labels.ne(a.params.ignore_index);
    if (valid.sum().item<int64_t>() < a.rows) keep = valid.nonzero().view({-1});
  }
  if (!keep.defined()) return fused_linear_forward<Teacher>(a, weight, gemms);
  FusedOutputs o = fused_linear_forward<Teacher>(select_rows(a, keep), weight, gemms);
  if (a.reduction == Reduction::None) {  // the kept rows' values back among zeros: per row, then a's shape
    const auto put_back = [&](const at::Tensor& kept) {
      std::vector<int64_t> rows_shape = kept.sizes().vec();
      rows_shape[0] = a.rows;
      return reduce_rows(a, at::zeros(rows_shape, kept.options()).index_copy_(0, keep, kept), weight);
    };
    o.loss = put_back(o.loss);
    if (a.with_terms) o.terms = put_back(o.terms);
  }
  if (a.grad_hidden) o.gh = at::zeros(a.student.sizes(), o.gh.options()).index_copy_(0, keep, o.gh).view(hidden_shape);
  return o;
}

// kTerms: the op's twin with the terms (*_terms_fwd).
template <bool kTerms>
auto fused_linear_kd_loss_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale, const at::Tensor& options,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence, int64_t ignore_index,
    c10::string_view reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  FusedLinearArgs a = make_fused_linear_args(student_hidden, student_weight, student_bias, teacher_hidden,
                                             teacher_weight, teacher_bias, labels, row_scale, options, normalizer,
                                             divergence, ignore_index, reduction, chunk_size, grad_hidden, grad_weight,
                                             grad_bias);
  a.with_terms = kTerms;
  return fused_outputs<kTerms>(forward_cpu<DenseTeacher<CpuGemms>>(a, student_hidden.sizes()));
}

// kTerms: the op's twin with the terms (*_terms_fwd).
template <bool kTerms>
auto fused_linear_topk_kd_loss_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_values, const at::Tensor& teacher_indices, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& row_scale, const at::Tensor& options, const std::optional<at::Tensor>& normalizer,
    c10::string_view divergence, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  FusedLinearArgs a = make_fused_topk_args(student_hidden, student_weight, student_bias, teacher_values,
                                           teacher_indices, labels, row_scale, options, normalizer, divergence,
                                           ignore_index, reduction, chunk_size, grad_hidden, grad_weight, grad_bias);
  a.with_terms = kTerms;
  return fused_outputs<kTerms>(forward_cpu<TopkTeacher<CpuGemms>>(a, student_hidden.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fused_linear_kd_loss_fwd", &fused_linear_kd_loss_fwd_cpu<false>);
  m.impl("fused_linear_kd_loss_terms_fwd", &fused_linear_kd_loss_fwd_cpu<true>);
  m.impl("fused_linear_topk_kd_loss_fwd", &fused_linear_topk_kd_loss_fwd_cpu<false>);
  m.impl("fused_linear_topk_kd_loss_terms_fwd", &fused_linear_topk_kd_loss_fwd_cpu<true>);
}

}  // namespace fastkd
