// The kernel table crosses from fastkd._C_avx512 to fastkd._C in a PyCapsule named
// kCpuKernelCapsule (cpu_isa/kernel_table.h describes the table and the modules).
#pragma once

#include <Python.h>

#include "cpu_isa/kernel_table.h"

namespace fastkd {

constexpr const char* kCpuKernelCapsule = "fastkd.cpu_kernel_table";

// A capsule that points to `table` (static storage in its module: the capsule does not own it).
inline PyObject* cpu_kernel_capsule(const CpuKernelTable* table) {
  return PyCapsule_New(const_cast<CpuKernelTable*>(table), kCpuKernelCapsule, nullptr);
}

// fastkd._C: use the table in `capsule` from now on (checks its ABI and, for AVX-512, the CPU).
void install_cpu_kernels(PyObject* capsule);
// fastkd._C's own table (AVX2 or portable) as a capsule, e.g. to go back to it.
PyObject* own_cpu_kernel_table();

}  // namespace fastkd
