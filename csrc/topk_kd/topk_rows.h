// The top-k KD-loss row kernel over raw memory: the internal API through which fastkd's C++ computes
// the per-row losses of a [rows, V] block of student logits against a sparse (top-k) teacher, and
// their dense gradient. The op topk_kd_loss_fwd (topk_kd_cpu.cpp, topk_kd_cuda.cu) is one caller: it
// validates the user's tensors (topk_kd/topk_kd.h), allocates the outputs and calls topk_rows_cpu /
// topk_rows_cuda. Another op's C++ calls the same functions on buffers it owns; e.g. a fused linear +
// top-k KD loss, per chunk of rows:
//
//   GEMM: the student logits of the chunk into an fp32 buffer [chunk, V] (row stride ld)
//   TopkRowsArgs a;
//   a.student = s_logits; a.student_dtype = at::kFloat; a.student_stride = ld;
//   a.values = values + first_row * K; a.values_dtype = at::kHalf; a.values_stride = K;
//   a.indices = indices + first_row * K; a.indices_int64 = false; a.indices_stride = K;
//   a.k = K;
//   a.labels = labels + first_row;  // or nullptr
//   a.rows = chunk; a.vocab = V; a.row_losses = losses + first_row;
//   a.grad = s_logits; a.grad_dtype = at::kFloat; a.grad_stride = ld;  // in place: CPU only, see below
//   a.params = make_kd_params(Divergence::KL, temperature, beta, soft_weight, hard_weight, ignore_index);
//   topk_rows_cpu(a, 1.f / valid_rows, /*stream=*/false);                      // CPU, or
//   topk_rows_cuda(a, weight /* device [] */, at::cuda::getCurrentCUDAStream());  // CUDA
//   GEMMs: grad_input and grad_weight from the chunk's gradient
//
// What a call computes, for every row r < rows, in fp32 whatever the dtypes. With a = student / T over
// the whole vocabulary, v = values / T over the row's K entries and S = {indices[r][k]}:
//   p_s = softmax(a) over V;  p~ = softmax(v) over the K entries (the teacher renormalised over its
//   support; values may be logits or log-probabilities: they differ by a row constant), 0 off S;
//   log-sum-exps over the finite entries (a -inf value is an entry with no mass).
//   D = KL(p~ || p_s) = sum_k p~_k (log p~_k - log p_s[i_k])                      (Divergence::KL)
//   D = beta KL(p~ || M) + (1 - beta) KL(p_s || M), M = beta p~ + (1 - beta) p_s   (Divergence::JSD,
//       0 < beta < 1). Off S, M = (1 - beta) p_s exactly, so that part of D is c (1 - beta) Q with
//       c = -log(1 - beta) and Q the student's mass off S. Computed in the log-ratio form of
//       topk_kd/topk_kd_math.h (per support entry a probability times a softplus; no 1 - sum_S p_s, no
//       log M), which both backends use.
//   Divergence::ReverseKL (and JSD with beta = 1, which make_kd_params maps to it) is infinite as soon
//   as the student has mass off S: rejected (check_topk_rows_args).
//   row_losses[r] = soft_weight * T^2 * D + hard_weight * CE(student row at T = 1, labels[r]),
//     unweighted (the caller reduces them), 0 for a row whose label is ignore_index. A row whose K
//     values are all -inf has no soft term (only its cross-entropy). A NaN or +inf student logit or value
//     makes the row's loss and gradient non-finite (kd_loss's rule; NaN among -inf values included).
//   grad row r    = row_weight * d(row_losses[r]) / d(student row), dense over all V entries, all
//     zeros for an ignored row, only when grad != nullptr:
//       KL:  soft_weight T (p_s - p~) + hard_weight (softmax(s) - onehot(label))
//       JSD: soft_weight T (1 - beta) p_s (log p_s - log M - KL(p_s || M)) + the same hard part;
//            off S that is a row constant times p_s: (1 - beta) (c - KL(p_s || M)) p_s.
//     A row with no soft term gets the hard part alone (none of the above, no support entries).
//     Every entry is rounded once, from fp32, to grad_dtype.
// Indices: every indices[r][k] must be in [0, vocab) and a row's K indices distinct; the CPU throws
// c10::ValueError naming 'teacher_indices' and the row, CUDA trips a device assert (no host sync).
// Labels: as kd_loss/kd_rows.h (rows labelled ignore_index are skipped even with hard_weight == 0;
// other labels in [0, vocab) or the same errors as for indices; nullptr only when hard_weight == 0).
//
// Memory: row r of a [rows, stride] buffer is the elements [r * stride, r * stride + width) (width =
// vocab for student and grad, k for values and indices); the last dimension is contiguous, rows may
// be padded (stride >= width) and pointers need only their element type's alignment. 1 <= k <= vocab.
// No (rows x V) memory is allocated: the CPU keeps a per-worker-thread scratch of 4 bytes x V (the
// row's kept exponentials; 4 more with a separate T = 1 cross-entropy statistic) + 24 bytes x K +
// 16 KiB, grown on demand and held for the thread's lifetime.
//
// In place: on the CPU the gradient may overwrite the student logits -- grad == student with the
// same stride and dtype: a row's student logits are read (the log-sum-exp sweep, then the K support
// entries and the label's logit) before its gradient sweep, which reads only the kept exponentials;
// rows are disjoint and each is processed by one thread. topk_rows_cuda's support of it is stated by
// its implementation (topk_kd_cuda.cu: check_topk_rows_args' in_place_ok); until it says so, a CUDA
// caller passes a separate gradient buffer. Any other overlap of grad with an input is rejected.
//
// Threads and streams: as kd_loss/kd_rows.h (the CPU entry is reentrant and runs rows in parallel
// with at::parallel_for; the CUDA launcher enqueues on `stream`, never synchronises with the host and
// uses the current device, which must hold the buffers).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/common.h"
#include "kd_loss/kd_loss_math.h"
#include "kd_loss/kd_rows.h"

#if defined(FASTKD_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastkd {

struct TopkRowsArgs {
  // Inputs.
  const void* student = nullptr;  // [rows, student_stride] fp32, fp16 or bf16 student logits
  at::ScalarType student_dtype = at::kFloat;
  int64_t student_stride = 0;     // elements between rows, >= vocab (when rows > 1)
  int64_t student_block_rows = 0, student_block_stride = 0;  // one block, or blocks: RowBlocks (kd_loss/kd_rows.h)
  const void* values = nullptr;   // [rows, values_stride] fp32, fp16 or bf16 teacher values at the indices
  at::ScalarType values_dtype = at::kFloat;
  int64_t values_stride = 0;      // >= k (when rows > 1)
  const void* indices = nullptr;  // [rows, indices_stride] int32 or int64 vocabulary indices
  bool indices_int64 = true;      // int64_t elements, else int32_t
  int64_t indices_stride = 0;     // >= k (when rows > 1)
  int64_t k = 0;                  // entries per row, 1 <= k <= vocab
  const int64_t* labels = nullptr;  // [rows] hard labels, or nullptr (see above)
  int64_t rows = 0;
  int64_t vocab = 0;              // >= 1
  // Outputs (written, never read).
  float* row_losses = nullptr;    // [rows] per-row losses, unweighted
  float* row_terms = nullptr;     // [rows, 2] T^2 * D and CE per row, or nullptr: as KdRowsArgs's
  void* grad = nullptr;           // [rows, grad_stride] the weighted dense gradient, or nullptr: none
  at::ScalarType grad_dtype = at::kFloat;  // must be student_dtype
  int64_t grad_stride = 0;
  KdParams params{};              // from make_kd_params (kd_loss/kd_rows.h): KL or JSD

  RowBlocks student_rows() const { return {student_stride, student_block_rows, student_block_stride}; }
};

// CPU: runs the instruction set's copy of the row kernel in use (cpu_isa/kernel_table.h).
// row_weight: the factor of every gradient row (e.g. 1 / valid rows for "batchmean"); stream:
// non-temporal stores for the gradient (worth it when it is far larger than the caches; the op uses
// them from 64 MiB). Buffers in host memory. (topk_kd_cpu.cpp)
void topk_rows_cpu(const TopkRowsArgs& a, float row_weight, bool stream);

#if defined(FASTKD_WITH_CUDA)
// CUDA: enqueues the row kernel on `stream`. row_weight: [] fp32 in device memory, read by the kernel
// (a weight computed on the device, e.g. 1 / valid rows, needs no host sync). Buffers in the current
// device's memory. (topk_kd_cuda.cu)
void topk_rows_cuda(const TopkRowsArgs& a, const float* row_weight, cudaStream_t stream);
#endif

// The contract above, checked on the host in O(1) (no device access: index values are the kernels'
// to check). in_place_ok: the backend accepts grad == student (same stride and dtype).
inline void check_topk_rows_args(const TopkRowsArgs& a, bool in_place_ok) {
  const auto float_dtype = [](at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; };
  FKD_CHECK(a.rows >= 0 && a.vocab >= 1 && a.k >= 1 && a.k <= a.vocab, "topk_rows: rows = ", a.rows, ", vocab = ",
            a.vocab, ", k = ", a.k, " (1 <= k <= vocab)");
  FKD_CHECK(float_dtype(a.student_dtype) && float_dtype(a.values_dtype), "topk_rows: student logits and teacher "
            "values must be fp32, fp16 or bf16, got ", a.student_dtype, " and ", a.values_dtype);
  FKD_CHECK(a.grad == nullptr || a.grad_dtype == a.student_dtype, "topk_rows: the gradient's dtype (", a.grad_dtype,
            ") must be the student's (", a.student_dtype, ")");
  FKD_CHECK(a.labels != nullptr || !a.params.hard, "topk_rows: labels are required when hard_weight != 0");
  FKD_CHECK(a.params.divergence == Divergence::KL || a.params.divergence == Divergence::JSD,
            "topk_rows: reverse KL (and JSD with beta = 1) is infinite with a top-k teacher; use KL or JSD with "
            "beta < 1");
  if (a.rows == 0) return;
  FKD_CHECK(a.student != nullptr && a.values != nullptr && a.indices != nullptr && a.row_losses != nullptr,
            "topk_rows: null student, values, indices or row_losses");
  const auto stride_ok = [&](int64_t stride, int64_t width) { return a.rows == 1 || stride >= width; };
  FKD_CHECK(rows_disjoint(a.student_rows(), a.rows, a.vocab) && stride_ok(a.values_stride, a.k) &&
                stride_ok(a.indices_stride, a.k) && (a.grad == nullptr || stride_ok(a.grad_stride, a.vocab)),
            "topk_rows: row strides (student ", a.student_stride, " in blocks of ", a.student_block_rows, " rows ",
            a.student_block_stride, " apart, values ", a.values_stride, ", indices ",
            a.indices_stride, ", grad ", a.grad_stride, ") must be >= the row widths (vocab ", a.vocab, ", k ", a.k,
            ")");
  if (a.grad == nullptr) return;
  const ByteSpan g = grad_span(a);
  FKD_CHECK(!g.overlaps(row_span(a.values, a.rows, a.values_stride, a.k, c10::elementSize(a.values_dtype))) &&
                !g.overlaps(row_span(a.indices, a.rows, a.indices_stride, a.k, a.indices_int64 ? 8 : 4)),
            "topk_rows: the gradient overlaps the teacher values or indices");
  check_grad_over_student(a, in_place_ok, "topk_rows", "topk_kd/topk_rows.h");
}

}  // namespace fastkd
