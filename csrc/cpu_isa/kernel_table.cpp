// fastkd._C's side of the per-ISA kernel table (cpu_isa/kernel_table.h): its own table, the table
// in use, and installing another module's.
#include "cpu_isa/capsule.h"

#include <atomic>
#include <string>

#include "common/common.h"

namespace fastkd {

namespace {

// The table in use: this module's own until install_cpu_kernels() hands over another.
std::atomic<const CpuKernelTable*> g_cpu_kernels{nullptr};

// This module's own copies, compiled for setup.py's FASTKD_CPU_ISA.
constexpr CpuKernelTable kOwnCpuKernels = CPU_CAPABILITY::isa_kernel_table(FASTKD_CPU_ISA);

}  // namespace

const CpuKernelTable& cpu_kernels() {
  const CpuKernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  return t ? *t : kOwnCpuKernels;
}

std::string cpu_kernel_isa() { return cpu_kernels().isa; }

void install_cpu_kernels(PyObject* capsule) {
  FKD_CHECK(PyCapsule_IsValid(capsule, kCpuKernelCapsule), "install_cpu_kernels: expected a '",
            kCpuKernelCapsule, "' capsule");
  const auto* t = static_cast<const CpuKernelTable*>(PyCapsule_GetPointer(capsule, kCpuKernelCapsule));
  FKD_CHECK(t->abi == kCpuKernelAbi, "install_cpu_kernels: the ", t->isa, " kernel module has ABI ", t->abi,
            ", fastkd._C expects ", kCpuKernelAbi, "; rebuild the extension");
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::string(t->isa) == "avx512") {
    FKD_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"),
              "install_cpu_kernels: this CPU lacks AVX-512 F/BW/VL/DQ");
  }
#endif
  g_cpu_kernels.store(t, std::memory_order_release);  // the capsule's table is static in its module
}

PyObject* own_cpu_kernel_table() { return cpu_kernel_capsule(&kOwnCpuKernels); }

}  // namespace fastkd
