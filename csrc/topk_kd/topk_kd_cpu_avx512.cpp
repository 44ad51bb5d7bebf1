// The AVX-512 copy of the CPU top-k KD-loss row kernel (topk_kd_cpu_kernel.h) for the module
// fastkd._C_avx512 (cpu_isa/module_avx512.cpp puts it in that module's kernel table).
#if !defined(CPU_CAPABILITY_AVX512)
#error "topk_kd_cpu_avx512.cpp must be compiled with CPU_CAPABILITY_AVX512 (see setup.py)"
#endif

#include "topk_kd/topk_kd_cpu_kernel.h"
