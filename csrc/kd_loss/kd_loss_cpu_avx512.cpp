// The module fastkd._C_avx512: the AVX-512 copy of the CPU KD-loss row kernel, compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq (setup.py), in a module of its own so that no code of
// it can be picked for the extension's other paths on a CPU without AVX-512. It registers nothing:
// kernel_table() returns the table that fastkd._C.install_cpu_kernels() takes (csrc/cpu_isa/kernel_table.h).
#include <Python.h>

#if !defined(CPU_CAPABILITY_AVX512)
#error "kd_loss_cpu_avx512.cpp must be compiled with CPU_CAPABILITY_AVX512 (see setup.py)"
#endif

#include "kd_loss/kd_loss_cpu_kernel.h"
#include "cpu_isa/kernel_table.h"

static_assert(fastkd::AVX512::Vec::size() == 16, "AVX-512 build without 512-bit vectors");

namespace {

fastkd::CpuKernelTable table{fastkd::kCpuKernelAbi, "avx512", &fastkd::AVX512::kd_rows};

PyObject* kernel_table(PyObject*, PyObject*) {
  return PyCapsule_New(&table, fastkd::kCpuKernelCapsule, nullptr);
}

PyMethodDef methods[] = {
    {"kernel_table", kernel_table, METH_NOARGS, "The AVX-512 CPU kernel table for fastkd._C.install_cpu_kernels."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_avx512", "fastkd's AVX-512 CPU kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_avx512() { return PyModule_Create(&module); }
