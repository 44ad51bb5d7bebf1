// CPU kernels that exist once per instruction set, and the table through which fastkd._C calls
// the copy in use.
//
// fastkd._C carries the copies compiled with its own flags (AVX2, or the portable DEFAULT build);
// the optional module fastkd._C_avx512 carries AVX-512 copies (every csrc/**/*_avx512.cpp, built
// with -mavx512* flags; cpu_isa/module_avx512.cpp is the module itself). fastkd/_extension.py hands
// that module's table to fastkd._C (install_cpu_kernels, cpu_isa/capsule.h) when torch's own CPU
// capability is AVX512, so fastkd follows torch's choice, ATEN_CPU_CAPABILITY included. An op calls
// its per-ISA kernel through cpu_kernels(), never through an ISA namespace directly.
//
// A new op's per-ISA CPU kernel joins the table with:
//   * a field below (its entry point's type) and kCpuKernelAbi + 1;
//   * its entry point declared in namespace CPU_CAPABILITY below and listed in isa_kernel_table();
//   * the kernel (a header defining the entry point in namespace fastkd::CPU_CAPABILITY) included by
//     one .cpp of fastkd._C and by one <op>/<op>_cpu_avx512.cpp of fastkd._C_avx512.
#pragma once

#include <string>

namespace fastkd {

struct KdRowsArgs;    // kd_loss/kd_rows.h
struct TopkRowsArgs;  // topk_kd/topk_rows.h

struct CpuKernelTable {
  int abi;          // kCpuKernelAbi of the module that filled it
  const char* isa;  // "avx512", "avx2" or "default"
  // The KD-loss row kernel (kd_loss/kd_loss_cpu_kernel.h), behind kd_rows_cpu (kd_loss/kd_rows.h).
  void (*kd_rows)(const KdRowsArgs& a, float row_weight, bool stream);
  // The top-k KD-loss row kernel (topk_kd/topk_kd_cpu_kernel.h), behind topk_rows_cpu (topk_kd/topk_rows.h).
  void (*topk_rows)(const TopkRowsArgs& a, float row_weight, bool stream);
};

// Raise on every change of CpuKernelTable or of an argument struct its entries take: both modules
// come from one build, and install_cpu_kernels refuses a table from a stale module.
constexpr int kCpuKernelAbi = 3;

#if defined(CPU_CAPABILITY)  // C++ translation units: setup.py passes the ISA of each module
namespace CPU_CAPABILITY {

// This instruction set's copies of the entry points, defined by the kernel headers.
void kd_rows(const KdRowsArgs& a, float row_weight, bool stream);
void topk_rows(const TopkRowsArgs& a, float row_weight, bool stream);

// The table of this translation unit's instruction set, named `isa`.
constexpr CpuKernelTable isa_kernel_table(const char* isa) { return {kCpuKernelAbi, isa, &kd_rows, &topk_rows}; }

}  // namespace CPU_CAPABILITY
#endif

// fastkd._C: the table in use -- its own until install_cpu_kernels() hands over another.
const CpuKernelTable& cpu_kernels();
// The instruction set of the table in use: "avx512", "avx2" or "default".
std::string cpu_kernel_isa();

}  // namespace fastkd
