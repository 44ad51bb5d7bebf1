// The module fastkd._C_avx512: the AVX-512 copies of the per-ISA CPU kernels (the other
// *_avx512.cpp files, e.g. kd_loss/kd_loss_cpu_avx512.cpp), compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq (setup.py), in a module of their own so that no code of it can be picked
// for the extension's other paths on a CPU without AVX-512. It registers nothing: kernel_table()
// returns the table that fastkd._C.install_cpu_kernels() takes (cpu_isa/kernel_table.h).
#include "cpu_isa/capsule.h"

#if !defined(CPU_CAPABILITY_AVX512)
#error "module_avx512.cpp must be compiled with CPU_CAPABILITY_AVX512 (see setup.py)"
#endif

namespace {

constexpr fastkd::CpuKernelTable kTable = fastkd::AVX512::isa_kernel_table("avx512");

PyObject* kernel_table(PyObject*, PyObject*) { return fastkd::cpu_kernel_capsule(&kTable); }

PyMethodDef methods[] = {
    {"kernel_table", kernel_table, METH_NOARGS, "The AVX-512 CPU kernel table for fastkd._C.install_cpu_kernels."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_avx512", "fastkd's AVX-512 CPU kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_avx512() { return PyModule_Create(&module); }
