// The AVX-512 copy of the CPU KD-loss row kernel (kd_loss_cpu_kernel.h) for the module
// fastkd._C_avx512 (cpu_isa/module_avx512.cpp puts it in that module's kernel table).
#if !defined(CPU_CAPABILITY_AVX512)
#error "kd_loss_cpu_avx512.cpp must be compiled with CPU_CAPABILITY_AVX512 (see setup.py)"
#endif

#include "kd_loss/kd_loss_cpu_kernel.h"

static_assert(fastkd::AVX512::Vec::size() == 16, "AVX-512 build without 512-bit vectors");
