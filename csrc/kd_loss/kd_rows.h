// The KD-loss row kernel over raw memory: the internal API through which fastkd's C++ computes the
// per-row KD losses of a [rows, V] block of logits and their gradient. The op kd_loss_fwd
// (kd_loss_cpu.cpp, kd_loss_cuda.cu) is one caller: it validates the user's tensors, allocates the
// outputs and calls kd_rows_cpu / kd_rows_cuda. Another op's C++ calls the same functions on
// buffers it owns; e.g. a fused linear + KD loss, per chunk of rows:
//
//   GEMMs: student and teacher logits of the chunk into fp32 buffers [chunk, V] (row stride ld)
//   KdRowsArgs a;
//   a.student = s_logits; a.student_dtype = at::kFloat; a.student_stride = ld;
//   a.teacher = t_logits; a.teacher_dtype = at::kFloat; a.teacher_stride = ld;
//   a.labels = labels + first_row;  // or nullptr
//   a.rows = chunk; a.vocab = V; a.row_losses = losses + first_row;
//   a.grad = grad_logits; a.grad_dtype = at::kFloat; a.grad_stride = ld;  // see "In place" below
//   a.params = make_kd_params(Divergence::KL, temperature, beta, soft_weight, hard_weight, ignore_index);
//   kd_rows_cpu(a, 1.f / valid_rows, /*stream=*/false);                     // CPU, or
//   kd_rows_cuda(a, weight /* device [] */, at::cuda::getCurrentCUDAStream());  // CUDA
//   GEMMs: grad_input and grad_weight from grad_logits
//
// What a call computes, for every row r < rows (p_s = softmax(student / T), p_t = softmax(teacher / T),
// D the divergence of params, fp32 maths whatever the dtypes):
//   row_losses[r] = soft_weight * T^2 * D(p_t, p_s) + hard_weight * CE(student row, labels[r]),
//     unweighted (the caller reduces them), 0 for a row whose label is ignore_index;
//   grad row r    = row_weight * d(row_losses[r]) / d(student row), all zeros for an ignored row,
//     only when grad != nullptr;
//   row_terms[r]  = (T^2 * D, CE) without the weights, (0, 0) for an ignored row, only when row_terms !=
//     nullptr (the soft and hard terms for logging, from the same pass; CE is 0 unless params.hard:
//     with_terms_params computes it at hard_weight 0 too).
// Labels: when labels != nullptr, rows with labels[r] == ignore_index are skipped (even with
// hard_weight == 0); every other label must be in [0, vocab): the CPU throws c10::ValueError, CUDA
// trips a device assert (no host sync). labels may be nullptr only when hard_weight == 0.
//
// Memory: row r of a [rows, stride] buffer is the elements [r * stride, r * stride + vocab); the
// last dimension is contiguous, rows may be padded (stride >= vocab) and the pointers need only the
// alignment of their element type (vector paths are chosen per row at run time). The input logits
// may also come in blocks (RowBlocks below: a [B, S, V] tensor's logits[:, :-1], or a transpose,
// which no one row stride describes): *_block_rows rows *_stride apart per block, the blocks
// *_block_stride apart; 0 (the default) is one block. The gradient is always one block. No (rows x V) memory
// is allocated: the CPU keeps a per-worker-thread scratch of at most 16 bytes x V + 16 KiB (a row's
// kept exponentials), grown on demand and held for the thread's lifetime; CUDA allocates nothing
// (it uses dynamic shared memory only).
//
// In place: on the CPU the gradient may overwrite the student logits -- grad == student with the
// same stride and dtype: a row's gradient is written by its last sweep only, after student[label]
// was read, and that sweep reads each chunk of the student row (if at all) before it writes the
// chunk's gradient; rows are disjoint and each is processed by one thread. The CUDA kernel cannot
// do that today (its student and gradient pointers are __restrict__, and with forward KL one thread
// reads student[label] while others already write the gradient), so kd_rows_cuda rejects it; an
// in-place caller needs a separate fp32 [chunk, V] gradient buffer there until the kernel changes.
// Any other overlap of grad with either input is rejected by both.
//
// Threads: the CPU entry is reentrant (concurrent calls on disjoint outputs are fine); it runs the
// rows in parallel with at::parallel_for. The CUDA launcher enqueues its work on `stream` and never
// synchronises with the host; it uses the current device's properties, so the current device must
// be the one that holds the buffers (a c10::cuda::CUDAGuard in the caller). Its launch configuration
// is kd_loss/kd_loss_launch.h's arithmetic on the device's properties; the kernel's dynamic
// shared-memory limit is raised once per device and instantiation (std::call_once), to the most any
// launch asks (sharedMemPerBlockOptin - static), never per call, so concurrent calls from several
// host threads with different vocabularies are fine.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/common.h"
#include "common/host_device.h"
#include "kd_loss/kd_loss_math.h"

#if defined(FASTKD_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastkd {

// Where row r of a block of input logits starts, in elements from its pointer (see "Memory" above):
// rows `stride` apart, in blocks of `block_rows` rows `block_stride` apart (block_rows = 0: one block).
// The row kernels compute it once per row.
struct RowBlocks {
  int64_t stride = 0;
  int64_t block_rows = 0;
  int64_t block_stride = 0;
  FKD_HD int64_t offset(int64_t r) const {
    return block_rows == 0 ? r * stride : (r / block_rows) * block_stride + (r % block_rows) * stride;
  }
};

struct KdRowsArgs {
  // Inputs: fp32, fp16 or bf16 logits, in any combination.
  const void* student = nullptr;  // [rows, student_stride] student logits
  at::ScalarType student_dtype = at::kFloat;
  int64_t student_stride = 0;     // elements between rows, >= vocab (when rows > 1)
  int64_t student_block_rows = 0, student_block_stride = 0;  // one block (0), or blocks: "Memory" above
  const void* teacher = nullptr;  // [rows, teacher_stride] teacher logits
  at::ScalarType teacher_dtype = at::kFloat;
  int64_t teacher_stride = 0;
  int64_t teacher_block_rows = 0, teacher_block_stride = 0;
  const int64_t* labels = nullptr;  // [rows] hard labels, or nullptr (see above)
  int64_t rows = 0;
  int64_t vocab = 0;                // >= 1; at most 2^30 on CUDA
  // Outputs (written, never read).
  float* row_losses = nullptr;      // [rows] per-row losses, unweighted
  float* row_terms = nullptr;       // [rows, 2] each row's T^2 * D and CE (unweighted), or nullptr: see above
  void* grad = nullptr;             // [rows, grad_stride] the weighted gradient, or nullptr: no gradient
  at::ScalarType grad_dtype = at::kFloat;  // must be student_dtype
  int64_t grad_stride = 0;
  KdParams params{};                // from make_kd_params

  RowBlocks student_rows() const { return {student_stride, student_block_rows, student_block_stride}; }
  RowBlocks teacher_rows() const { return {teacher_stride, teacher_block_rows, teacher_block_stride}; }
};

// The row kernel's parameters from an op's arguments, which the caller has checked (temperature
// finite and > 0, beta in [0, 1], labels present when hard_weight != 0). JSD with beta = 0 is
// forward KL and with beta = 1 reverse KL, exactly (the JSD formula itself tends to 0 there).
inline KdParams make_kd_params(Divergence divergence, double temperature, double beta, double soft_weight,
                               double hard_weight, int64_t ignore_index) {
  if (divergence == Divergence::JSD && beta == 0) divergence = Divergence::KL;
  if (divergence == Divergence::JSD && beta == 1) divergence = Divergence::ReverseKL;
  KdParams p;
  p.temperature = static_cast<float>(temperature);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.beta = static_cast<float>(beta);
  p.soft_weight = static_cast<float>(soft_weight);
  p.hard_weight = static_cast<float>(hard_weight);
  p.ignore_index = ignore_index;
  p.hard = hard_weight != 0;
  p.separate_lse1 = p.hard && temperature != 1.0;
  p.divergence = divergence;
  return p;
}

// params for a call that also writes row_terms: the cross-entropy is computed whenever there are labels
// (at hard_weight 0 it enters neither the loss nor the gradient: row_loss, grad_combine).
inline KdParams with_terms_params(KdParams p, bool has_labels) {
  if (has_labels && !p.hard) {
    p.hard = true;
    p.separate_lse1 = p.temperature != 1.f;
  }
  return p;
}

// CPU: runs the instruction set's copy of the row kernel in use (cpu_isa/kernel_table.h).
// row_weight: the factor of every gradient row (e.g. 1 / valid rows for "batchmean"); stream:
// non-temporal stores for the gradient (worth it when the gradient is far larger than the caches,
// kd_loss_fwd uses it from 64 MiB). Buffers in host memory. (kd_loss_cpu.cpp)
void kd_rows_cpu(const KdRowsArgs& a, float row_weight, bool stream);

#if defined(FASTKD_WITH_CUDA)
// CUDA: enqueues the row kernel on `stream`. row_weight: [] fp32 in device memory, read by the
// kernel (so that a weight computed on the device, e.g. 1 / valid rows, needs no host sync).
// Buffers in the current device's memory. (kd_loss_cuda.cu)
void kd_rows_cuda(const KdRowsArgs& a, const float* row_weight, cudaStream_t stream);
#endif

// The bytes [first, last) spanned by the rows of a [rows, stride] buffer of `width` elements per row
// (rows >= 1), for the overlap checks of the row APIs.
struct ByteSpan {
  uintptr_t first, last;
  bool overlaps(const ByteSpan& o) const { return first < o.last && o.first < last; }
};

inline ByteSpan row_span(const void* p, int64_t rows, const RowBlocks& at, int64_t width, size_t elem_bytes) {
  const auto first = reinterpret_cast<uintptr_t>(p);  // strides are >= 0: the last row ends last
  return {first, first + static_cast<uintptr_t>((at.offset(rows - 1) + width) * static_cast<int64_t>(elem_bytes))};
}

inline ByteSpan row_span(const void* p, int64_t rows, int64_t stride, int64_t width, size_t elem_bytes) {
  return row_span(p, rows, RowBlocks{stride}, width, elem_bytes);
}

// The contract's stride rule for a block layout (rows >= 1): rows `width` elements apart at least within
// a block, and blocks too (the blocks may interleave, as a transpose's do; blocks of one row are written
// as one block with stride = block_stride by the callers).
inline bool rows_disjoint(const RowBlocks& at, int64_t rows, int64_t width) {
  if (at.block_rows == 0) return rows == 1 || at.stride >= width;
  return at.block_rows >= 2 && at.stride >= width && at.block_stride >= width;
}

// The gradient's span, and its check against the student logits, of a row API's arguments (KdRowsArgs;
// TopkRowsArgs, topk_kd/topk_rows.h) with a gradient: grad == student (same stride and dtype) is in
// place, accepted where in_place_ok; any other overlap is rejected. api, header: the row API's name and
// header, for the messages.
template <typename RowsArgs>
ByteSpan grad_span(const RowsArgs& a) {
  return row_span(a.grad, a.rows, a.grad_stride, a.vocab, c10::elementSize(a.grad_dtype));
}

template <typename RowsArgs>
void check_grad_over_student(const RowsArgs& a, bool in_place_ok, const char* api, const char* header) {
  const bool in_place = a.grad == a.student && a.grad_stride == a.student_stride && a.student_block_rows == 0 &&
                        a.grad_dtype == a.student_dtype;
  FKD_CHECK(!in_place || in_place_ok, api, ": this backend cannot write the gradient in place over the student "
            "logits (", header, "); pass a separate gradient buffer");
  FKD_CHECK(in_place || !grad_span(a).overlaps(row_span(a.student, a.rows, a.student_rows(), a.vocab,
                                                        c10::elementSize(a.student_dtype))),
            api, ": the gradient overlaps the student logits other than exactly in place");
}

// The contract above, checked on the host in O(1) (no device access). in_place_ok: the backend
// accepts grad == student (same stride and dtype).
inline void check_kd_rows_args(const KdRowsArgs& a, bool in_place_ok) {
  const auto logit_dtype = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
  };
  FKD_CHECK(a.rows >= 0 && a.vocab >= 1, "kd_rows: rows = ", a.rows, ", vocab = ", a.vocab);
  FKD_CHECK(logit_dtype(a.student_dtype) && logit_dtype(a.teacher_dtype), "kd_rows: logits must be fp32, fp16 or bf16, got ",
            a.student_dtype, " and ", a.teacher_dtype);
  FKD_CHECK(a.grad == nullptr || a.grad_dtype == a.student_dtype, "kd_rows: the gradient's dtype (", a.grad_dtype,
            ") must be the student's (", a.student_dtype, ")");
  FKD_CHECK(a.labels != nullptr || !a.params.hard, "kd_rows: labels are required when hard_weight != 0");
  if (a.rows == 0) return;
  FKD_CHECK(a.student != nullptr && a.teacher != nullptr && a.row_losses != nullptr,
            "kd_rows: null student, teacher or row_losses");
  FKD_CHECK(rows_disjoint(a.student_rows(), a.rows, a.vocab) && rows_disjoint(a.teacher_rows(), a.rows, a.vocab) &&
                (a.grad == nullptr || rows_disjoint(RowBlocks{a.grad_stride}, a.rows, a.vocab)),
            "kd_rows: row strides (student ", a.student_stride, " in blocks of ", a.student_block_rows, " rows ",
            a.student_block_stride, " apart, teacher ", a.teacher_stride, " / ", a.teacher_block_rows, " / ",
            a.teacher_block_stride, ", grad ", a.grad_stride, ") must be >= vocab (", a.vocab, ")");
  if (a.grad == nullptr) return;
  FKD_CHECK(!grad_span(a).overlaps(row_span(a.teacher, a.rows, a.teacher_rows(), a.vocab,
                                            c10::elementSize(a.teacher_dtype))),
            "kd_rows: the gradient overlaps the teacher logits");
  check_grad_over_student(a, in_place_ok, "kd_rows", "kd_loss/kd_rows.h");
}

}  // namespace fastkd
