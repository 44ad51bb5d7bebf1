// The CPU ops of the fused KD loss: argument handling, the gradient buffer, the choice of the row
// kernel's instruction set (kd_loss_cpu.h) and the in-place backward scale. The row kernels
// themselves are kd_loss_cpu_kernel.h.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kd_loss_cpu.h"
#include "kd_loss_cpu_kernel.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {

namespace {

using CPU_CAPABILITY::kChunk;
using CPU_CAPABILITY::load_float;
using CPU_CAPABILITY::store_from_float;

// The row kernel in use: this module's own copy until install_cpu_kernels() hands over another.
std::atomic<const CpuKernelTable*> g_cpu_kernels{nullptr};

// This module's own copy of the row kernel.
const CpuKernelTable& own_cpu_kernels() {
#if defined(CPU_CAPABILITY_AVX2)
  static const CpuKernelTable own{kCpuKernelAbi, "avx2", &CPU_CAPABILITY::kd_rows};
#else
  static const CpuKernelTable own{kCpuKernelAbi, "default", &CPU_CAPABILITY::kd_rows};
#endif
  return own;
}

const CpuKernelTable& cpu_kernels() {
  const CpuKernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  return t ? *t : own_cpu_kernels();
}

// A fresh gradient buffer is untouched memory: on Linux its first write faults in every 4 KiB page
// (seen here: 3 ns per fp32 entry, more than the kernel's own work). Asking for transparent huge
// pages on the 2 MiB-aligned interior (what torch's THP_MEM_ALLOC_ENABLE does for every allocation)
// cuts the faults 512-fold. Advice only: where THP is off, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    c10::string_view divergence, double beta, double soft_weight,
                                                    double hard_weight, int64_t ignore_index,
                                                    c10::string_view reduction, bool with_grad) {
  KdLossArgs a = make_kd_loss_args(student, teacher, labels, temperature, divergence, beta, soft_weight,
                                   hard_weight, ignore_index, reduction);
  const at::Tensor weight = row_weight(a);
  const float w = weight.item<float>();  // a CPU tensor: no device to wait for
  at::Tensor row_losses = at::empty({a.rows}, a.student.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty(student.sizes(), a.student.options()) : at::empty({0}, a.student.options());
  if (with_grad) advise_huge_pages(grad);
  // Stream the gradient past the caches when it is much larger than them (see store_from_float).
  const bool stream = with_grad && grad.nbytes() >= (size_t(64) << 20);
  cpu_kernels().kd_rows(a, w, row_losses.data_ptr<float>(), with_grad ? grad.data_ptr() : nullptr, stream);
  if (grad.scalar_type() != a.grad_dtype) grad = grad.to(a.grad_dtype);
  return {reduce_rows(a, row_losses, weight), grad};
}

void kd_loss_scale_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_args(grad, grad_output);
  const at::Tensor go = grad_output.to(at::kFloat).contiguous();
  const float* f = go.data_ptr<float>();
  const bool per_row = go.numel() != 1;
  const int64_t vocab = grad.size(-1), rows = vocab == 0 ? 0 : grad.numel() / vocab;
  FKD_DISPATCH_FLOATING(grad.scalar_type(), "kd_loss_scale_cpu", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)), [&](int64_t b, int64_t e) {
      alignas(64) float tmp[kChunk];
      for (int64_t r = b; r < e; ++r) {
        const float factor = f[per_row ? r : 0];
        if (factor == 1.f) continue;  // the usual loss.backward(): nothing to do
        scalar_t* row = g + r * vocab;
        for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
          const int64_t n = std::min(kChunk, vocab - c0);
          if constexpr (std::is_same_v<scalar_t, double>) {
            for (int64_t i = 0; i < n; ++i) row[c0 + i] *= factor;
          } else {
            load_float(row + c0, tmp, n, factor);
            store_from_float(tmp, row + c0, n, false);
          }
        }
      }
    });
  });
}

}  // namespace

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

std::string cpu_kernel_isa() { return cpu_kernels().isa; }

PyObject* own_cpu_kernel_table() {
  return PyCapsule_New(const_cast<CpuKernelTable*>(&own_cpu_kernels()), kCpuKernelCapsule, nullptr);
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_scale_", &kd_loss_scale_cpu);
}

}  // namespace fastkd
