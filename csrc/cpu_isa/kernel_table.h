// The CPU row kernel of the fused KD loss exists once per instruction set (kd_loss_cpu_kernel.h):
// fastkd._C carries the AVX2 (or portable) copy, the optional module fastkd._C_avx512 the AVX-512
// copy. fastkd/_extension.py hands the AVX-512 table to fastkd._C (install_cpu_kernels) when torch's own
// CPU capability is AVX512, so fastkd follows torch's choice, ATEN_CPU_CAPABILITY included.
//
// The table crosses the module boundary in a PyCapsule named kCpuKernelCapsule; both modules are
// built from the same sources in one build, and the ABI number guards against a stale module.
#pragma once

#include <Python.h>

#include <string>

#include "kd_loss/kd_loss.h"

namespace fastkd {

// Writes the per-row losses and, when grad != nullptr, the gradient (the student's dtype, contiguous
// [rows, vocab]); `stream`: non-temporal stores for the gradient.
using KdRowsFn = void (*)(const KdLossArgs& a, float w, float* row_losses, void* grad, bool stream);

struct CpuKernelTable {
  int abi;          // kCpuKernelAbi of the module that filled it
  const char* isa;  // "avx512", "avx2" or "default"
  KdRowsFn kd_rows;
};

constexpr int kCpuKernelAbi = 1;
constexpr const char* kCpuKernelCapsule = "fastkd.cpu_kernel_table";

// fastkd._C: use the table in `capsule` from now on (checks its ABI and, for AVX-512, the CPU).
void install_cpu_kernels(PyObject* capsule);
// The instruction set of the row kernel in use: "avx512", "avx2" or "default".
std::string cpu_kernel_isa();
// fastkd._C's own table (AVX2 or portable), e.g. to go back to it.
PyObject* own_cpu_kernel_table();

// The cache of freed CPU gradient buffers (kd_loss_cpu.cpp): free it (returns the bytes freed), its size,
// and turn it on or off (off: new gradients come from torch's allocator; what is cached stays until freed).
size_t empty_cpu_grad_cache();
void set_cpu_grad_cache(bool enabled);
size_t cpu_grad_cache_bytes();

}  // namespace fastkd
