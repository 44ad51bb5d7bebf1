// The CPU ops of the fused KD loss: argument handling, the gradient buffer, the row-kernel entry
// kd_rows_cpu (kd_loss/kd_rows.h), which runs the instruction set's copy in use
// (cpu_isa/kernel_table.h), and the in-place backward scale. The row kernels themselves are
// kd_loss_cpu_kernel.h, whose copy for this module's instruction set this file compiles.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_isa/kernel_table.h"
#include "kd_loss/kd_loss.h"
#include "kd_loss/kd_loss_cpu.h"
#include "kd_loss/kd_grad_cpu.h"
#include "kd_loss/kd_loss_cpu_kernel.h"
#include "kd_loss/kd_rows.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {

namespace {

using CPU_CAPABILITY::kChunk;
using CPU_CAPABILITY::load_float;
using CPU_CAPABILITY::store_from_float;

// ---- gradient buffers ------------------------------------------------------------------------------
// A fresh gradient buffer is untouched memory: on Linux its first write faults in every 4 KiB page,
// and glibc hands blocks of this size straight back to the OS when they are freed, so every call
// pays again (seen here: 27 ms for fwd+bwd at 1024 x 8192 fp32, whose kernel work is 4 ms). Training
// loops free the logits' gradient every step and ask for the same size in the next, so fastkd keeps
// the last kCachedBlocks freed gradient buffers of 1 MiB or more and hands them out again, as torch's
// CUDA caching allocator does on GPUs; fastkd.empty_cache() frees them, FASTKD_CPU_GRAD_CACHE=0 turns
// the cache off. Fresh blocks are 2 MiB-aligned and advised for transparent huge pages (512-fold
// fewer faults where THP is on; advice only).
class GradAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kCachedBlocks = 2;

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::kCPU)};
    const size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = std::find_if(free_.rbegin(), free_.rend(), [&](const Block& b) { return b.bytes == bytes; });
      if (it != free_.rend()) {
        p = it->ptr;
        free_.erase(std::next(it).base());
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kHuge, bytes);
      FKD_CHECK(p != nullptr, "out of memory allocating a ", bytes, "-byte gradient buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);
#endif
    }
    return {p, new Block{p, bytes}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // Frees every cached block; returns the bytes freed.
  size_t empty_cache() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
    }
    size_t total = 0;
    for (const Block& b : blocks) {
      total += b.bytes;
      std::free(b.ptr);
    }
    return total;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t total = 0;
    for (const Block& b : free_) total += b.bytes;
    return total;
  }

  static GradAllocator& get() {
    static auto* allocator = new GradAllocator();  // never destroyed: buffers may outlive static teardown
    return *allocator;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  static void release(void* ctx) {
    if (ctx == nullptr) return;
    const Block b = *static_cast<Block*>(ctx);
    delete static_cast<Block*>(ctx);
    get().give_back(b);
  }

  void give_back(const Block& b) {
    Block evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);  // most recently freed last
      if (free_.size() > kCachedBlocks) {
        evicted = free_.front();
        free_.erase(free_.begin());
      }
    }
    std::free(evicted.ptr);
  }

  std::mutex mu_;
  std::vector<Block> free_;
};

// Set once at import from FASTKD_CPU_GRAD_CACHE, parsed by fastkd/_env.py (the one parser of every
// switch): the C++ side reads no environment variable.
std::atomic<bool> g_grad_cache_enabled{true};

bool grad_cache_enabled() { return g_grad_cache_enabled.load(std::memory_order_relaxed); }


// kTerms: the op's twin with the terms, *_terms_fwd (kd_loss/kd_loss.h's op_outputs).
template <bool kTerms>
auto kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& options, const std::optional<at::Tensor>& normalizer, c10::string_view divergence,
    int64_t ignore_index, c10::string_view reduction, bool with_grad) {
  return op_outputs<kTerms>(kd_op_forward_cpu(
      with_normalizer(make_kd_loss_args(student, teacher, labels, options, divergence, ignore_index,
                                        reduction), normalizer),
      student.sizes(), with_grad, kTerms, kd_rows_args, kd_rows_cpu));
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

at::Tensor new_cpu_grad(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) < (int64_t(1) << 20) || !grad_cache_enabled()) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &GradAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

void kd_rows_cpu(const KdRowsArgs& a, float row_weight, bool stream) {
  check_kd_rows_args(a, /*in_place_ok=*/true);
  if (a.rows == 0) return;
  cpu_kernels().kd_rows(a, row_weight, stream);
}

size_t empty_cpu_grad_cache() { return GradAllocator::get().empty_cache(); }
void set_cpu_grad_cache(bool enabled) { g_grad_cache_enabled.store(enabled, std::memory_order_relaxed); }
size_t cpu_grad_cache_bytes() { return GradAllocator::get().cached_bytes(); }

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu<false>);
  m.impl("kd_loss_terms_fwd", &kd_loss_fwd_cpu<true>);
  m.impl("kd_loss_scale_", &kd_loss_scale_cpu);
}

}  // namespace fastkd
