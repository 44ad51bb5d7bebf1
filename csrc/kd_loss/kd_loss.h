// Host-side argument handling of the fused KD loss ops, shared by the CPU and CUDA implementations:
// from the op's tensors to the row kernel's raw arguments (kd_loss/kd_rows.h) and back.
//
// Ops (schemas in fastkd/ops/kd.py, beside the wrapper):
//   fastkd::kd_loss_fwd(student [..., V], teacher [..., V], labels [...]?, options, ...) -> (loss, grad)
//     options: float64 CPU [temperature, beta, soft_weight, hard_weight] (a tensor, so that
//     torch.compile keeps a changing temperature symbolic; fastkd/ops/_args.py loss_options);
//     loss: fp32, [] for "sum"/"batchmean", [...] (the leading shape) for "none";
//     grad: d(loss)/d(student) for grad_output = 1 (per row for "none"), student dtype and shape,
//           contiguous; an empty [0] tensor when with_grad is false.
//     The leading dimensions are flattened inside the op, so the gradient handed to autograd is a
//     fresh, non-view tensor that autograd adopts as .grad without copying it.
//   fastkd::kd_loss_scale_(grad [..., V], grad_output [] or [...]) -> ()
//     grad *= grad_output, in place, skipping rows whose factor is exactly 1 (the usual
//     loss.backward()), so the common backward costs no pass over memory.
#pragma once

#include <c10/util/accumulate.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "common/common.h"
#include "kd_loss/kd_loss_math.h"
#include "kd_loss/kd_rows.h"

namespace fastkd {

inline Divergence parse_divergence(std::string_view s) {
  if (s == "kl") return Divergence::KL;
  if (s == "reverse_kl") return Divergence::ReverseKL;
  if (s == "jsd") return Divergence::JSD;
  FKD_CHECK_ARG(false, "divergence", "unknown value '", std::string(s), "'; use 'kl', 'reverse_kl' or 'jsd'");
  return Divergence::KL;
}

inline Reduction parse_reduction(std::string_view s) {
  if (s == "none") return Reduction::None;
  if (s == "sum") return Reduction::Sum;
  if (s == "batchmean") return Reduction::BatchMean;
  FKD_CHECK_ARG(false, "reduction", "unknown value '", std::string(s), "'; use 'batchmean', 'sum' or 'none'");
  return Reduction::None;
}

// The real-valued options of the KD ops (read on the host from their float64 CPU options tensor).
struct KdOptions {
  double temperature, beta, soft_weight, hard_weight;
};

inline KdOptions read_kd_options(const at::Tensor& options) {
  FKD_CHECK_ARG(options.device().is_cpu() && options.scalar_type() == at::kDouble && options.dim() == 1 &&
                    options.size(0) == 4,
                "options", "expected a float64 CPU tensor [temperature, beta, soft_weight, hard_weight], got ",
                options.scalar_type(), " ", options.sizes(), " on ", options.device());
  const at::Tensor o = options.contiguous();
  const double* v = o.data_ptr<double>();
  const KdOptions k{v[0], v[1], v[2], v[3]};
  FKD_CHECK_ARG(std::isfinite(k.temperature) && k.temperature > 0, "temperature", "must be finite and > 0, got ",
                k.temperature);
  FKD_CHECK_ARG(k.beta >= 0 && k.beta <= 1, "beta", "must be in [0, 1], got ", k.beta);
  return k;
}

// The arguments every KD op has, whatever its teacher (KdLossArgs below; TopkLossArgs,
// topk_kd/topk_kd.h): the student's side, the labels, the reduction and the row kernel's parameters.
struct KdOpArgs {
  at::ScalarType grad_dtype;  // the student's dtype (fp64 logits are computed in fp32, see below)
  at::Tensor student;  // [..., V] (the op's, or a contiguous copy), its rows at student_rows (row_view)
  RowBlocks student_rows;
  at::Tensor labels;   // [rows] int64, or undefined
  std::vector<int64_t> lead;  // the student's leading shape (rows = its product)
  int64_t rows;
  int64_t vocab;
  Reduction reduction;
  KdParams params;  // the divergence included
  at::Tensor normalizer;  // [] one real number, or undefined: "batchmean"'s divisor instead of the valid rows
};

struct KdLossArgs : KdOpArgs {
  at::Tensor teacher;  // [..., V], its rows at teacher_rows (row_view)
  RowBlocks teacher_rows;
};

// Logits [..., V] as the row kernels read them in place (kd_rows.h's RowBlocks): the leading
// dimensions of more than one index, adjacent ones merged where the outer stride is the inner one's
// span, must come down to one (rows `stride` apart: contiguous or padded rows, a 2-D slice of a wider
// vocabulary) or two (blocks of rows: logits[:, :-1] of a [B, S, V] tensor, a transpose, a slice of a
// padded vocabulary), with the vocabulary contiguous and rows at least V apart. Anything else (three
// unmergeable levels, a strided vocabulary, an expanded row) is copied to contiguous rows.
struct RowView {
  at::Tensor data;
  RowBlocks rows;
};

inline RowView row_view(const at::Tensor& x) {
  const int64_t vocab = x.size(-1);
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    rows *= x.size(d);
    if (x.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == x.size(d) * x.stride(d)) {
      dims.back() = {dims.back().first * x.size(d), x.stride(d)};
    } else {
      dims.emplace_back(x.size(d), x.stride(d));
    }
  }
  if (rows > 0 && (vocab == 1 || x.stride(-1) == 1) && dims.size() <= 2) {
    RowBlocks b{vocab};
    if (dims.size() == 1) b.stride = dims[0].second;
    if (dims.size() == 2) b = {dims[1].second, dims[1].first, dims[0].second};
    if (rows_disjoint(b, rows, vocab)) return {x, b};
  }
  return {x.contiguous(), RowBlocks{vocab}};
}

// [..., K] -> [rows, K] with unit stride along K (the top-k teacher's values and indices, K << V: a
// copy is cheap); 2-D inputs keep any row stride, others are viewed when contiguous and copied otherwise.
inline at::Tensor as_rows(const at::Tensor& x) {
  const int64_t vocab = x.size(-1);
  if (x.dim() == 2 && x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= vocab)) return x;
  return x.contiguous().view({-1, vocab});
}

// The op's labels (optional; required when hard_weight != 0) as a flat int64 [rows] tensor, or an
// undefined one; lead: the logits' leading shape.
inline at::Tensor labels_arg(const std::optional<at::Tensor>& labels, at::IntArrayRef lead, const at::Device& device,
                             double hard_weight) {
  at::Tensor out;
  if (labels.has_value() && labels->defined()) {
    FKD_CHECK_ARG(labels->sizes() == lead, "labels", "expected the logits' leading shape ", lead, ", got ",
                  labels->sizes());
    FKD_CHECK_ARG(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool, "labels",
                  "expected an integer dtype, got ", labels->scalar_type());
    FKD_CHECK_ARG(labels->device() == device, "labels", "on ", labels->device(), " but student_logits on ", device);
    out = labels->to(at::kLong).reshape({-1}).contiguous();
  }
  FKD_CHECK_ARG(hard_weight == 0 || out.defined(), "labels", "required when hard_weight != 0");
  return out;
}

// The student's side of a KD op's arguments, after the op's own checks of its tensors: the leading
// shape, the vocabulary (checked non-empty), the gradient's dtype and the fp32/fp16/bf16 student and its
// rows (row_view; fp64 logits are converted to fp32: fastkd's maths is fp32 throughout; the gradient goes
// back to grad_dtype).
inline void set_student_args(KdOpArgs& a, const at::Tensor& student) {
  a.lead = student.sizes().slice(0, student.dim() - 1).vec();
  a.vocab = student.size(-1);
  FKD_CHECK_ARG(a.vocab >= 1, "student_logits", "the vocabulary (last) dimension is empty");
  a.grad_dtype = student.scalar_type();
  RowView v = row_view(student.scalar_type() == at::kDouble ? student.to(at::kFloat) : student);
  a.student = std::move(v.data);
  a.student_rows = v.rows;
  a.rows = c10::multiply_integers(a.lead);
}

// The rest of a KD op's arguments, after set_student_args: the reduction, the labels (checked against
// the student's leading shape and device) and the row kernel's parameters.
inline void set_loss_args(KdOpArgs& a, const std::optional<at::Tensor>& labels, const at::Device& device,
                          const KdOptions& o, Divergence divergence, int64_t ignore_index,
                          std::string_view reduction) {
  a.reduction = parse_reduction(reduction);
  a.labels = labels_arg(labels, a.lead, device, o.hard_weight);
  a.params = make_kd_params(divergence, o.temperature, o.beta, o.soft_weight, o.hard_weight, ignore_index);
}

// Validates the op's arguments (the Python wrapper validates first and names the user's arguments;
// this is the op's own contract for direct callers) and normalises the layout; fp64 logits are
// converted to fp32 like the others (fastkd's maths is fp32 throughout; the gradient goes back to
// grad_dtype).
inline KdLossArgs make_kd_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& labels, const at::Tensor& options,
                                    c10::string_view divergence_, int64_t ignore_index,
                                    c10::string_view reduction_) {
  const std::string_view divergence(divergence_.data(), divergence_.size());
  const std::string_view reduction(reduction_.data(), reduction_.size());
  FKD_CHECK_ARG(student.dim() >= 1, "student_logits", "expected shape [..., vocab], got a 0-d tensor");
  FKD_CHECK_ARG(teacher.dim() >= 1, "teacher_logits", "expected shape [..., vocab], got a 0-d tensor");
  FKD_CHECK_ARG(student.size(-1) == teacher.size(-1), "teacher_logits",
                "vocabulary sizes differ: student ", student.size(-1), ", teacher ", teacher.size(-1));
  FKD_CHECK_ARG(student.sizes().slice(0, student.dim() - 1) == teacher.sizes().slice(0, teacher.dim() - 1),
                "teacher_logits", "leading shapes differ: student ", student.sizes(), ", teacher ", teacher.sizes());
  FKD_CHECK_ARG(student.device() == teacher.device(), "teacher_logits", "on ", teacher.device(),
                " but student_logits on ", student.device());
  for (const auto* t : {&student, &teacher}) {
    const auto st = t->scalar_type();
    FKD_CHECK_ARG(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                  t == &student ? "student_logits" : "teacher_logits", "expected a floating dtype, got ", st);
  }
  const KdOptions o = read_kd_options(options);
  KdLossArgs a;
  set_student_args(a, student);
  RowView t = row_view(teacher.scalar_type() == at::kDouble ? teacher.to(at::kFloat) : teacher);
  a.teacher = std::move(t.data);
  a.teacher_rows = t.rows;
  const Divergence div = parse_divergence(divergence);
  set_loss_args(a, labels, student.device(), o, div, ignore_index, reduction);
  return a;
}

// The op's `normalizer` (optional: one real number on the logits' device or the CPU; "batchmean" divides the
// sum by it instead of the number of valid rows) into a's normalizer; Args: KdOpArgs or alike. Returns a.
template <typename Args>
Args with_normalizer(Args a, const std::optional<at::Tensor>& normalizer) {
  if (!normalizer.has_value() || !normalizer->defined()) return a;
  const at::Tensor& n = *normalizer;
  FKD_CHECK_ARG(a.reduction == Reduction::BatchMean, "normalizer",
                "divides the batch mean's sum: it needs reduction=\"batchmean\"");
  FKD_CHECK_ARG(n.numel() == 1, "normalizer", "expected one number, got ", n.numel());
  FKD_CHECK_ARG(!n.is_complex() && n.scalar_type() != at::kBool, "normalizer", "expected a real number, got ",
                n.scalar_type());
  FKD_CHECK_ARG(n.device() == a.student.device() || n.device().is_cpu(), "normalizer", "on ", n.device(),
                " but the student on ", a.student.device());
  a.normalizer = n.reshape({});
  return a;
}

// The fields every row API's arguments share (KdRowsArgs; TopkRowsArgs, topk_kd/topk_rows.h), for
// this call: the student logits, labels, sizes and parameters; row_losses [rows] fp32 and grad
// (nullptr, or a contiguous [rows, vocab] buffer of a.student's dtype) are the op's outputs.
template <typename RowsArgs>
RowsArgs student_rows_args(const KdOpArgs& a, float* row_losses, void* grad) {
  RowsArgs r;
  r.student = a.student.data_ptr();
  r.student_dtype = a.student.scalar_type();
  r.student_stride = a.student_rows.stride;
  r.student_block_rows = a.student_rows.block_rows;
  r.student_block_stride = a.student_rows.block_stride;
  r.labels = a.labels.defined() ? a.labels.data_ptr<int64_t>() : nullptr;
  r.rows = a.rows;
  r.vocab = a.vocab;
  r.row_losses = row_losses;
  r.grad = grad;
  r.grad_dtype = a.student.scalar_type();
  r.grad_stride = a.vocab;
  r.params = a.params;
  return r;
}

// The row kernel's arguments for this call (student_rows_args and the teacher logits).
inline KdRowsArgs kd_rows_args(const KdLossArgs& a, float* row_losses, void* grad) {
  KdRowsArgs r = student_rows_args<KdRowsArgs>(a, row_losses, grad);
  r.teacher = a.teacher.data_ptr();
  r.teacher_dtype = a.teacher.scalar_type();
  r.teacher_stride = a.teacher_rows.stride;
  r.teacher_block_rows = a.teacher_rows.block_rows;
  r.teacher_block_stride = a.teacher_rows.block_stride;
  return r;
}

// The reduction weight of every valid row, as a 0-d fp32 tensor on the logits' device:
// 1 / max(1, number of valid rows) for "batchmean" (1 / normalizer when the op has one), 1 otherwise.
// Computed with tensor ops so the kernels read it from memory and nothing waits for the device (a CPU
// normalizer of device logits is read on the host: no device sync). Args: KdOpArgs, or any arguments
// with its student, labels, rows, reduction, params and normalizer fields (fused_linear.h's FusedLinearArgs).
template <typename Args>
at::Tensor row_weight(const Args& a) {
  const auto opts = a.student.options().dtype(at::kFloat);
  if (a.reduction != Reduction::BatchMean) return at::ones({}, opts);
  if (a.normalizer.defined()) {
    if (a.normalizer.device() != a.student.device())
      return at::full({}, static_cast<float>(1.0 / a.normalizer.template item<double>()), opts);
    return a.normalizer.to(at::kFloat).reciprocal();
  }
  if (!a.labels.defined()) return at::full({}, 1.0f / static_cast<float>(std::max<int64_t>(1, a.rows)), opts);
  return a.labels.ne(a.params.ignore_index).sum().clamp_min(1).to(at::kFloat).reciprocal();
}

// A row API's arguments (KdRowsArgs, TopkRowsArgs) writing the rows' terms into row_terms ([rows, 2] fp32),
// or unchanged for an undefined row_terms.
template <typename RowsArgs>
RowsArgs with_row_terms(RowsArgs r, const at::Tensor& row_terms) {
  if (!row_terms.defined()) return r;
  r.row_terms = row_terms.data_ptr<float>();
  r.params = with_terms_params(r.params, r.labels != nullptr);
  return r;
}

// The outputs of a KD op's forward: (loss, grad) and, for its twin *_terms_fwd, the terms (reduce_terms).
struct KdOpOutputs {
  at::Tensor loss, grad, terms;
};

// The op's (loss, grad) or, kTerms, (loss, grad, terms): each KD op and its *_terms_fwd twin.
template <bool kTerms>
auto op_outputs(KdOpOutputs o) {
  if constexpr (kTerms) {
    return std::tuple<at::Tensor, at::Tensor, at::Tensor>{o.loss, o.grad, o.terms};
  } else {
    return std::tuple<at::Tensor, at::Tensor>{o.loss, o.grad};
  }
}

// The op's output from per-row values ([rows, ...]: the row losses, ignored rows holding 0, or the rows'
// terms [rows, 2]): the leading shape for "none" ([..., ...]), else their sum over the rows (times the batch
// mean's weight). Args as for row_weight.
template <typename Args>
at::Tensor reduce_rows(const Args& a, const at::Tensor& per_row, const at::Tensor& weight) {
  if (a.reduction == Reduction::None) {
    std::vector<int64_t> shape = a.lead;
    for (int64_t d = 1; d < per_row.dim(); ++d) shape.push_back(per_row.size(d));
    return per_row.view(shape);
  }
  at::Tensor total = per_row.sum(0);
  return a.reduction == Reduction::BatchMean ? total * weight : total;
}

// The op's terms output (reduce_rows of the rows' terms [rows, 2]: T^2 * D and CE, unweighted), or an
// undefined tensor without them.
template <typename Args>
at::Tensor reduce_terms(const Args& a, const at::Tensor& row_terms, const at::Tensor& weight) {
  return row_terms.defined() ? reduce_rows(a, row_terms, weight) : row_terms;
}

inline void check_scale_args(const at::Tensor& grad, const at::Tensor& grad_output) {
  FKD_CHECK_ARG(grad.dim() >= 1 && grad.is_contiguous(), "grad", "expected a contiguous [..., vocab] tensor");
  const int64_t rows = grad.size(-1) == 0 ? 0 : grad.numel() / grad.size(-1);
  FKD_CHECK_ARG(grad_output.numel() == 1 || grad_output.numel() == rows, "grad_output",
                "expected one factor or one per row (", rows, "), got ", grad_output.numel());
  FKD_CHECK_ARG(grad_output.device() == grad.device(), "grad_output", "on ", grad_output.device(),
                " but grad on ", grad.device());
}

}  // namespace fastkd
