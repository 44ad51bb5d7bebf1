// The fused linear + KD losses, shared by the CPU and CUDA implementations: the ops' argument handling
// and the chunked algorithm, written once against a backend that supplies the GEMMs and the row kernels
// (fused_linear_cpu.cpp, fused_linear_cuda.cu) and a teacher (DenseTeacher, TopkTeacher below).
//
// Op (schema in fastkd/ops/fused_linear.py, beside the wrapper):
//   fastkd::fused_linear_kd_loss_fwd(student_hidden [..., Hs], student_weight [V, Hs], student_bias [V]?,
//       teacher_hidden [..., Ht], teacher_weight [V, Ht], teacher_bias [V]?, labels [...]?, row_scale [rows]?,
//       options, normalizer []?, divergence, ignore_index, reduction, chunk_size, grad_hidden, grad_weight,
//       grad_bias) -> (loss, d/d student_hidden, d/d student_weight, d/d student_bias)
//   options: float64 CPU [temperature, beta, soft_weight, hard_weight, logit_scale, softcap (0 = none)].
//   normalizer: as kd_loss_fwd's (one number on the student's device or the CPU; "batchmean" divides the sum by
//       it instead of the valid rows): it goes into row_weight(), so the chunks' gradients come out divided.
//   fastkd::fused_linear_topk_kd_loss_fwd(student_hidden, student_weight, student_bias, teacher_values [..., K],
//       teacher_indices [..., K], labels?, row_scale?, options, normalizer?, ...) -> the same four outputs, with
//       topk_kd_loss_fwd's maths against the sparse teacher (logit_scale and softcap apply to the student's head
//       only).
//   The loss is kd_loss_fwd's of the logits head(h) = cap(logit_scale * (h @ weight^T + bias)),
//   cap(z) = softcap * tanh(z / softcap); the gradients are for grad_output = 1, each one only when its
//   flag is set (else an empty [0] tensor), every row's gradient multiplied by row_scale when given.
//
// The algorithm, per chunk of `chunk_size` rows (no [rows, V] tensor is ever allocated):
//   S, T [chunk, V] fp32 <- the chunk's student and teacher logits (GEMMs with fp32 output), bias,
//                           logit_scale and softcap applied in place;
//   (top-k: no T; the chunk's rows of the teacher's values and indices instead)
//   kd_rows (kd_loss/kd_rows.h) on S, T, or topk_rows (topk_kd/topk_rows.h) on S and the chunk's top-k
//                           -> the chunk's row losses and, when a gradient is wanted,
//                           G [chunk, V] fp32 = d(loss)/d(head output) (the reduction's weight included);
//   G *= row_scale, G *= d head / d z (logit_scale * (1 - (S / softcap)^2), computed in T's buffer, or
//                           top-k, in a buffer of its own);
//   grad_hidden[chunk] = G @ W; grad_weight (fp32 accumulator) += G^T @ h; grad_bias (fp32) += sum_rows G.
// Peak memory beyond the inputs and the gradients: three fp32 [chunk, V] buffers (top-k: two, three with
// softcap; + a low-precision copy of G on CUDA), and the fp32 accumulators of the weight and bias gradients
// when those are bf16/fp16; on the CPU, fp32 copies of bf16/fp16 weights (fused_linear_cpu.cpp).
#pragma once

#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/common.h"
#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_rows.h"
#include "topk_kd/topk_rows.h"

namespace fastkd {

struct FusedLinearArgs {
  // The fields row_weight() and reduce_rows() (kd_loss/kd_loss.h) read.
  at::Tensor student;  // [rows, Hs] the student's hidden states, last dim contiguous
  at::Tensor labels;   // [rows] int64, or undefined
  std::vector<int64_t> lead;  // the hidden states' leading shape (rows = its product)
  int64_t rows = 0;
  Reduction reduction = Reduction::BatchMean;
  KdParams params{};
  at::Tensor normalizer;  // [] one real number, or undefined: "batchmean"'s divisor instead of the valid rows
  // The heads.
  at::Tensor student_weight;  // [V, Hs]
  at::Tensor student_bias;    // [V], or undefined
  // The dense teacher (fused_linear_kd_loss_fwd) ...
  at::Tensor teacher;         // [rows, Ht] the teacher's hidden states
  at::Tensor teacher_weight;  // [V, Ht]
  at::Tensor teacher_bias;    // [V], or undefined
  // ... or the sparse one (fused_linear_topk_kd_loss_fwd).
  at::Tensor values;   // [rows, K] fp32/fp16/bf16, last dim contiguous
  at::Tensor indices;  // [rows, K] int32 or int64, last dim contiguous
  at::Tensor row_scale;       // [rows] fp32, or undefined
  int64_t vocab = 0;
  int64_t chunk = 0;
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0: none
  bool grad_hidden = false, grad_weight = false, grad_bias = false;
};

namespace detail {

inline bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_head(const char* hidden_name, const at::Tensor& hidden, const char* weight_name,
                       const at::Tensor& weight, const char* bias_name, const std::optional<at::Tensor>& bias,
                       const at::Device& device) {
  FKD_CHECK_ARG(hidden.dim() >= 1, hidden_name, "expected shape [..., hidden], got a 0-d tensor");
  FKD_CHECK_ARG(weight.dim() == 2, weight_name, "expected shape [vocab, hidden], got ", weight.sizes());
  FKD_CHECK_ARG(hidden.size(-1) == weight.size(1), weight_name, "shape ", weight.sizes(), " does not match ",
                hidden_name, "'s hidden size ", hidden.size(-1), " (the weight is [vocab, hidden], as nn.Linear's)");
  FKD_CHECK_ARG(float_dtype(hidden.scalar_type()), hidden_name, "expected fp32, fp16 or bf16, got ",
                hidden.scalar_type());
  FKD_CHECK_ARG(weight.scalar_type() == hidden.scalar_type(), weight_name, "dtype ", weight.scalar_type(),
                " differs from ", hidden_name, "'s ", hidden.scalar_type());
  FKD_CHECK_ARG(hidden.device() == device && weight.device() == device, weight_name, "and ", hidden_name,
                " must be on ", device);
  if (bias.has_value() && bias->defined()) {
    FKD_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name, "expected shape [",
                  weight.size(0), "], got ", bias->sizes());
    FKD_CHECK_ARG(bias->scalar_type() == weight.scalar_type() && bias->device() == device, bias_name,
                  "expected ", weight.scalar_type(), " on ", device, ", got ", bias->scalar_type(), " on ",
                  bias->device());
  }
}

// [..., W] -> [rows, W] with unit stride along W (a view where possible).
inline at::Tensor row_matrix(const at::Tensor& x) {
  const int64_t h = x.size(-1);
  if (x.dim() == 2 && x.stride(1) == 1) return x;
  return x.reshape({-1, h}).contiguous();
}

}  // namespace detail

// The arguments both ops share (the student's head, labels, options, flags); the caller adds the teacher.
inline FusedLinearArgs make_fused_student_args(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale, const at::Tensor& options,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence_, int64_t ignore_index,
    c10::string_view reduction_, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const at::Device device = student_hidden.device();
  detail::check_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias,
                     device);
  FKD_CHECK_ARG(student_weight.size(0) >= 1, "student_weight", "the vocabulary (first) dimension is empty");
  FKD_CHECK_ARG(chunk_size > 0, "chunk_size", "must be > 0, got ", chunk_size);
  FKD_CHECK_ARG(options.device().is_cpu() && options.scalar_type() == at::kDouble && options.dim() == 1 &&
                    options.size(0) == 6,
                "options", "expected a float64 CPU tensor [temperature, beta, soft_weight, hard_weight, logit_scale, "
                "softcap], got ", options.scalar_type(), " ", options.sizes(), " on ", options.device());
  const at::Tensor o = options.contiguous();
  const KdOptions k = read_kd_options(o.narrow(0, 0, 4));
  FusedLinearArgs a;
  a.logit_scale = o.data_ptr<double>()[4];
  a.softcap = o.data_ptr<double>()[5];
  FKD_CHECK_ARG(std::isfinite(a.logit_scale) && a.logit_scale > 0, "logit_scale", "must be finite and > 0, got ",
                a.logit_scale);
  FKD_CHECK_ARG(std::isfinite(a.softcap) && a.softcap >= 0, "softcap", "must be finite and > 0 (0: none), got ",
                a.softcap);
  a.lead = student_hidden.sizes().slice(0, student_hidden.dim() - 1).vec();
  a.student = detail::row_matrix(student_hidden);
  a.rows = a.student.size(0);
  a.student_weight = student_weight;
  if (student_bias.has_value()) a.student_bias = *student_bias;
  a.vocab = student_weight.size(0);
  a.chunk = chunk_size;
  a.reduction = parse_reduction(std::string_view(reduction_.data(), reduction_.size()));
  const Divergence div = parse_divergence(std::string_view(divergence_.data(), divergence_.size()));
  a.labels = labels_arg(labels, a.lead, device, k.hard_weight);
  a.params = make_kd_params(div, k.temperature, k.beta, k.soft_weight, k.hard_weight, ignore_index);
  if (row_scale.has_value() && row_scale->defined()) {
    FKD_CHECK_ARG(row_scale->numel() == a.rows && row_scale->device() == device, "row_scale", "expected ", a.rows,
                  " factors on ", device, ", got ", row_scale->numel(), " on ", row_scale->device());
    a.row_scale = row_scale->reshape({-1}).to(at::kFloat);
  }
  FKD_CHECK_ARG(!grad_bias || a.student_bias.defined(), "grad_bias", "set but student_bias is None");
  a.grad_hidden = grad_hidden;
  a.grad_weight = grad_weight;
  a.grad_bias = grad_bias;
  return with_normalizer(std::move(a), normalizer);  // after student and reduction, which its checks read
}

inline FusedLinearArgs make_fused_linear_args(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale, const at::Tensor& options,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence, int64_t ignore_index,
    c10::string_view reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  FusedLinearArgs a = make_fused_student_args(student_hidden, student_weight, student_bias, labels, row_scale, options,
                                              normalizer, divergence, ignore_index, reduction, chunk_size, grad_hidden,
                                              grad_weight, grad_bias);
  detail::check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias,
                     student_hidden.device());
  FKD_CHECK_ARG(a.vocab == teacher_weight.size(0), "teacher_weight", "vocabulary sizes differ: student ", a.vocab,
                ", teacher ", teacher_weight.size(0));
  FKD_CHECK_ARG(at::IntArrayRef(a.lead) == teacher_hidden.sizes().slice(0, teacher_hidden.dim() - 1),
                "teacher_hidden", "leading shapes differ: student ", student_hidden.sizes(), ", teacher ",
                teacher_hidden.sizes());
  a.teacher = detail::row_matrix(teacher_hidden);
  a.teacher_weight = teacher_weight;
  if (teacher_bias.has_value()) a.teacher_bias = *teacher_bias;
  return a;
}

inline FusedLinearArgs make_fused_topk_args(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& values, const at::Tensor& indices, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& row_scale, const at::Tensor& options, const std::optional<at::Tensor>& normalizer,
    c10::string_view divergence, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  FusedLinearArgs a = make_fused_student_args(student_hidden, student_weight, student_bias, labels, row_scale, options,
                                              normalizer, divergence, ignore_index, reduction, chunk_size, grad_hidden,
                                              grad_weight, grad_bias);
  FKD_CHECK_ARG(values.dim() >= 1 && values.sizes() == indices.sizes(), "teacher_values",
                "expected shape [..., K], the shape of teacher_indices; got ", values.sizes(), " and ",
                indices.sizes());
  FKD_CHECK_ARG(at::IntArrayRef(a.lead) == values.sizes().slice(0, values.dim() - 1), "teacher_values",
                "leading shape ", values.sizes(), " differs from student_hidden's ", student_hidden.sizes());
  FKD_CHECK_ARG(values.size(-1) >= 1 && values.size(-1) <= a.vocab, "teacher_values", "K = ", values.size(-1),
                " entries per row; K must be in [1, ", a.vocab, "]");
  FKD_CHECK_ARG(values.device() == student_hidden.device() && indices.device() == student_hidden.device(),
                "teacher_values", "teacher_values on ", values.device(), " and teacher_indices on ", indices.device(),
                " but student_hidden on ", student_hidden.device());
  FKD_CHECK_ARG(detail::float_dtype(values.scalar_type()), "teacher_values", "expected fp32, fp16 or bf16, got ",
                values.scalar_type());
  const auto it = indices.scalar_type();
  FKD_CHECK_ARG(at::isIntegralType(it, /*includeBool=*/false), "teacher_indices", "expected an integer dtype, got ",
                it);
  a.values = detail::row_matrix(values);
  a.indices = detail::row_matrix(it == at::kInt || it == at::kLong ? indices : indices.to(at::kLong));
  return a;
}

// The rows of every row-wise tensor of `a` listed in `keep` ([n] int64): the CPU drops ignored rows with it.
inline FusedLinearArgs select_rows(const FusedLinearArgs& a, const at::Tensor& keep) {
  FusedLinearArgs c = a;
  for (auto [dst, src] : {std::pair{&c.student, &a.student}, std::pair{&c.teacher, &a.teacher},
                          std::pair{&c.values, &a.values}, std::pair{&c.indices, &a.indices},
                          std::pair{&c.labels, &a.labels}, std::pair{&c.row_scale, &a.row_scale}}) {
    if (src->defined()) *dst = src->index_select(0, keep);
  }
  c.rows = keep.numel();
  c.lead = {c.rows};
  return c;
}

// In place on a chunk's fp32 logits z = h @ W^T: z = cap(logit_scale * (z + bias)).
inline void apply_head(at::Tensor& z, const at::Tensor& bias, double logit_scale, double softcap) {
  if (bias.defined()) z.add_(bias);
  if (softcap > 0) {
    z.mul_(logit_scale / softcap).tanh_().mul_(softcap);
  } else if (logit_scale != 1.0) {
    z.mul_(logit_scale);
  }
}

// What a backend supplies (all fp32 results; `g` is a chunk's fp32 gradient of the logits [n, V]):
//   at::Tensor weight(const at::Tensor& w)                     the weight as the GEMMs take it (once per call)
//   at::Tensor hidden_chunk(const at::Tensor& h)               the chunk's hidden rows as the GEMMs take them
//   void logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& w)      out [n, V] fp32 = h @ w^T
//   void kd_rows(const KdRowsArgs& r, const at::Tensor& weight)       the row kernels (weight: row_weight(a))
//   void topk_rows(const TopkRowsArgs& r, const at::Tensor& weight)
//   void chunk_gradient(const at::Tensor& g)                   called once per chunk before the two below
//   void grad_hidden(at::Tensor& out, const at::Tensor& g, const at::Tensor& w)   out [n, H] = g @ w
//   void grad_weight(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h)   acc [V, H] fp32 += g^T @ h

// The dense teacher: its chunk's logits by GEMM into T, then the KD row kernel on S and T.
// The student's side of a row API's arguments (KdRowsArgs, TopkRowsArgs) for the chunk of rows [r0, r0 + n) whose
// fp32 logits are s [n, V]: the chunk's labels, row losses and gradient (nullptr: none), the row kernel's parameters.
template <typename RowsArgs>
RowsArgs chunk_rows_args(const FusedLinearArgs& a, const at::Tensor& s, int64_t r0, float* row_losses, void* grad) {
  RowsArgs r;
  r.student = s.data_ptr();
  r.student_stride = a.vocab;
  r.labels = a.labels.defined() ? a.labels.data_ptr<int64_t>() + r0 : nullptr;
  r.rows = s.size(0);
  r.vocab = a.vocab;
  r.row_losses = row_losses;
  r.grad = grad;
  r.grad_stride = a.vocab;
  r.params = a.params;
  return r;
}

template <typename Backend>
struct DenseTeacher {
  const FusedLinearArgs& a;
  Backend& be;
  at::Tensor weight, bias, t_buf;  // the teacher's head as the GEMMs take it; T [chunk, V] fp32

  DenseTeacher(const FusedLinearArgs& args, Backend& backend, int64_t chunk)
      : a(args), be(backend), weight(backend.weight(args.teacher_weight)),
        bias(args.teacher_bias.defined() ? args.teacher_bias.to(at::kFloat) : at::Tensor()),
        t_buf(at::empty({chunk, args.vocab}, args.student.options().dtype(at::kFloat))) {}

  // The chunk's row losses (and gradient into `grad`, or none when nullptr) from its student logits s [n, V].
  void rows(const at::Tensor& s, int64_t r0, float* row_losses, void* grad, const at::Tensor& row_weight) {
    const int64_t n = s.size(0);
    at::Tensor t = t_buf.narrow(0, 0, n);
    be.logits(t, be.hidden_chunk(a.teacher.narrow(0, r0, n)), weight);
    apply_head(t, bias, a.logit_scale, a.softcap);
    KdRowsArgs r = chunk_rows_args<KdRowsArgs>(a, s, r0, row_losses, grad);
    r.teacher = t.data_ptr();
    r.teacher_stride = a.vocab;
    be.kd_rows(r, row_weight);
  }
  // A [n, V] fp32 buffer free after rows(): T's.
  at::Tensor scratch(int64_t n) { return t_buf.narrow(0, 0, n); }
};

// The sparse teacher: the chunk's rows of its top-k values and indices, the top-k row kernel on S.
template <typename Backend>
struct TopkTeacher {
  const FusedLinearArgs& a;
  Backend& be;
  int64_t chunk;
  at::Tensor scratch_buf;  // allocated on first use (softcap only)

  TopkTeacher(const FusedLinearArgs& args, Backend& backend, int64_t chunk_rows)
      : a(args), be(backend), chunk(chunk_rows) {}

  void rows(const at::Tensor& s, int64_t r0, float* row_losses, void* grad, const at::Tensor& row_weight) {
    const int64_t n = s.size(0), k = a.values.size(1);
    const at::Tensor v = a.values.narrow(0, r0, n), i = a.indices.narrow(0, r0, n);
    TopkRowsArgs r = chunk_rows_args<TopkRowsArgs>(a, s, r0, row_losses, grad);
    r.values = v.data_ptr();
    r.values_dtype = v.scalar_type();
    r.values_stride = v.stride(0);
    r.indices = i.data_ptr();
    r.indices_int64 = i.scalar_type() == at::kLong;
    r.indices_stride = i.stride(0);
    r.k = k;
    be.topk_rows(r, row_weight);
  }
  at::Tensor scratch(int64_t n) {
    if (!scratch_buf.defined()) scratch_buf = at::empty({chunk, a.vocab}, a.student.options().dtype(at::kFloat));
    return scratch_buf.narrow(0, 0, n);
  }
};

template <typename Teacher, typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_forward(const FusedLinearArgs& a,
                                                                                const at::Tensor& weight,
                                                                                Backend& be) {
  const auto f32 = a.student.options().dtype(at::kFloat);
  const bool with_grad = a.grad_hidden || a.grad_weight || a.grad_bias;
  const int64_t chunk = std::max<int64_t>(1, std::min(a.chunk, a.rows));
  const at::Tensor ws = be.weight(a.student_weight);
  const at::Tensor bs = a.student_bias.defined() ? a.student_bias.to(at::kFloat) : at::Tensor();
  at::Tensor row_losses = at::empty({a.rows}, f32);
  at::Tensor gh = a.grad_hidden ? at::empty({a.rows, a.student.size(1)}, a.student.options())
                                : at::empty({0}, a.student.options());
  at::Tensor gw = a.grad_weight ? at::zeros(a.student_weight.sizes(), f32) : at::Tensor();
  at::Tensor gb = a.grad_bias ? at::zeros({a.vocab}, f32) : at::Tensor();
  if (a.rows > 0) {
    Teacher teacher(a, be, chunk);
    at::Tensor s_buf = at::empty({chunk, a.vocab}, f32);
    at::Tensor g_buf = with_grad ? at::empty({chunk, a.vocab}, f32) : at::Tensor();
    for (int64_t r0 = 0; r0 < a.rows; r0 += chunk) {
      const int64_t n = std::min(chunk, a.rows - r0);
      at::Tensor s = s_buf.narrow(0, 0, n);
      const at::Tensor h = be.hidden_chunk(a.student.narrow(0, r0, n));
      be.logits(s, h, ws);
      apply_head(s, bs, a.logit_scale, a.softcap);
      teacher.rows(s, r0, row_losses.data_ptr<float>() + r0, with_grad ? g_buf.data_ptr() : nullptr, weight);
      if (!with_grad) continue;
      at::Tensor g = g_buf.narrow(0, 0, n);
      if (a.row_scale.defined()) g.mul_(a.row_scale.narrow(0, r0, n).unsqueeze(1));
      if (a.softcap > 0) {  // d cap(u)/du = 1 - (cap / softcap)^2, u = logit_scale * z
        at::Tensor d = teacher.scratch(n);
        at::mul_out(d, s, s);
        d.mul_(-a.logit_scale / (a.softcap * a.softcap)).add_(a.logit_scale);
        g.mul_(d);
      } else if (a.logit_scale != 1.0) {
        g.mul_(a.logit_scale);
      }
      be.chunk_gradient(g);
      if (a.grad_hidden) {
        at::Tensor out = gh.narrow(0, r0, n);
        be.grad_hidden(out, g, ws);
      }
      if (a.grad_weight) be.grad_weight(gw, g, h);
      if (a.grad_bias) gb.add_(g.sum(0));
    }
  }
  at::Tensor loss = reduce_rows(a, row_losses, weight);
  const auto out_or_empty = [&](const at::Tensor& acc, bool wanted, at::ScalarType dtype) {
    if (!wanted) return at::empty({0}, a.student_weight.options());
    return acc.scalar_type() == dtype ? acc : acc.to(dtype);
  };
  if (a.grad_hidden) {
    std::vector<int64_t> shape = a.lead;
    shape.push_back(a.student.size(1));
    gh = gh.view(shape);
  }
  return {loss, gh, out_or_empty(gw, a.grad_weight, a.student_weight.scalar_type()),
          out_or_empty(gb, a.grad_bias, a.student_weight.scalar_type())};
}

}  // namespace fastkd
