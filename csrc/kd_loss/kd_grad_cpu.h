// The gradient buffers of the fused KD ops on the CPU (kd_loss_cpu.cpp), for every op that returns a
// logits-sized gradient from its forward (kd_loss_fwd, topk_kd_loss_fwd).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fastkd {

// A contiguous buffer for a gradient: 1 MiB and more from fastkd's cache of freed gradient buffers
// (kd_loss_cpu.cpp says why; FASTKD_CPU_GRAD_CACHE=0 turns it off), smaller ones from torch's allocator.
at::Tensor new_cpu_grad(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether a gradient of `bytes` is written with non-temporal stores: when it is much larger than the
// caches (the row kernels' `stream` argument, kd_loss/kd_rows.h).
inline bool stream_cpu_grad(size_t bytes) { return bytes >= (size_t(64) << 20); }

}  // namespace fastkd
