// The gradient buffers of the fused KD ops on the CPU (kd_loss_cpu.cpp), for every op that returns a
// logits-sized gradient from its forward (kd_loss_fwd, topk_kd_loss_fwd), and those ops' CPU forward.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <tuple>

#include "kd_loss/kd_loss.h"

namespace fastkd {

// A contiguous buffer for a gradient: 1 MiB and more from fastkd's cache of freed gradient buffers
// (kd_loss_cpu.cpp says why; FASTKD_CPU_GRAD_CACHE=0 turns it off), smaller ones from torch's allocator.
at::Tensor new_cpu_grad(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether a gradient of `bytes` is written with non-temporal stores: when it is much larger than the
// caches (the row kernels' `stream` argument, kd_loss/kd_rows.h).
inline bool stream_cpu_grad(size_t bytes) { return bytes >= (size_t(64) << 20); }

// The CPU forward of a KD op from its checked arguments a (KdLossArgs, topk_kd/topk_kd.h's
// TopkLossArgs): the op's outputs (kd_loss/kd_loss.h; sizes: the student's shape; the terms only
// with_terms), computed by the row kernel rows_cpu on the arguments rows_args makes of a and the outputs.
template <typename Args, typename RowsArgs>
KdOpOutputs kd_op_forward_cpu(const Args& a, at::IntArrayRef sizes, bool with_grad, bool with_terms,
                              RowsArgs (*rows_args)(const Args&, float*, void*),
                              void (*rows_cpu)(const RowsArgs&, float, bool)) {
  const at::Tensor weight = row_weight(a);
  const float w = weight.item<float>();  // a CPU tensor: no device to wait for
  at::Tensor row_losses = at::empty({a.rows}, a.student.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? new_cpu_grad(sizes, a.student.options()) : at::empty({0}, a.student.options());
  at::Tensor row_terms = with_terms ? at::empty({a.rows, 2}, row_losses.options()) : at::Tensor();
  // Stream the gradient past the caches when it is much larger than them (see store_from_float).
  const bool stream = with_grad && stream_cpu_grad(grad.nbytes());
  rows_cpu(with_row_terms(rows_args(a, row_losses.data_ptr<float>(), with_grad ? grad.data_ptr() : nullptr),
                          row_terms),
           w, stream);
  if (grad.scalar_type() != a.grad_dtype) grad = grad.to(a.grad_dtype);
  return {reduce_rows(a, row_losses, weight), grad, reduce_terms(a, row_terms, weight)};
}

}  // namespace fastkd
