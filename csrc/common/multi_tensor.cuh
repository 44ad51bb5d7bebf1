// Multi-tensor launches: one kernel launch covers every tensor of a list, however many.
//
// The host builds a table of the (non-empty) tensors' addresses and sizes and of where each tensor's
// chunks start, in pinned host memory, and copies it to the device with one non-blocking H2D copy on
// the current stream (the caching host allocator keeps the pinned block alive until the copy is
// done). The kernel gets a grid of one block per chunk of kChunk elements; block b finds its tensor
// by a binary search in the chunk prefix sums (log2(#tensors) steps on a table that stays in L1/L2).
// Unlike apex's multi_tensor_apply (at most ~110 tensors per launch through kernel parameters, so
// thousands of tensors take dozens of launches), the launch count does not grow with the list.
//
// Sizes and offsets are 64-bit throughout; zero-size tensors are left out of the table.
//
// CUDA graphs: a copy captured from pinned host memory would be replayed from that host block, which
// the caching host allocator may have handed to someone else by then. So under stream capture the
// table is written by small kernels that carry it in their parameters (captured by value into the
// graph), into a device buffer from the graph's memory pool; the ticket counter is reset to 0 by the
// last block of grad_norm_kernel, so every replay (and every later launch) finds it zeroed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/common.h"
#include "common/vec_pack.cuh"

namespace fastkd {
namespace mt {

constexpr int64_t kChunk = 65536;  // elements per block: 256 KiB of fp32, enough to hide the block's start-up
constexpr int kThreads = 512;

// What the kernels receive (by value): device pointers into the uploaded table.
struct TensorTable {
  void* const* ptrs;             // [T] first element of each tensor (dense, any stride order)
  const int64_t* numel;          // [T]
  const int64_t* chunk_start;    // [T + 1] prefix sums of each tensor's chunk count
  unsigned int* counter;         // one zeroed word: the ticket of the last finishing block
  int ntensors;
};

// Under capture: 8-byte words carried in a kernel's parameters (<= 4 KiB of them, the limit of every
// driver), kParamWords per launch.
constexpr int kParamWords = 480;
struct ParamWords {
  int64_t w[kParamWords];
};

template <int kUnused = 0>  // a template: the header may be included by several .cu files
__global__ void __launch_bounds__(256) write_words_kernel(int64_t* __restrict__ dst /* [n] */, ParamWords src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src.w[i];
}

struct UploadedTable {
  TensorTable view{};
  int64_t nchunks = 0;
  at::Tensor device_buffer;  // keeps the device copy alive until the launches are queued
};

// Table of `ptrs`/`numels` (all non-empty) uploaded to `device` on the current stream.
inline UploadedTable upload_table(const std::vector<void*>& ptrs, const std::vector<int64_t>& numels,
                                  const at::Device& device) {
  UploadedTable out;
  const int64_t T = static_cast<int64_t>(ptrs.size());
  std::vector<int64_t> starts(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) starts[t + 1] = starts[t] + (numels[t] + kChunk - 1) / kChunk;
  out.nchunks = starts[T];
  if (T == 0) return out;
  // Layout (8-byte words): [counter][ptrs: T][numel: T][chunk_start: T + 1]
  const int64_t words = 1 + T + T + (T + 1);
  const auto fill = [&](int64_t* w) {
    w[0] = 0;
    std::memcpy(w + 1, ptrs.data(), T * sizeof(void*));
    std::memcpy(w + 1 + T, numels.data(), T * sizeof(int64_t));
    std::memcpy(w + 1 + 2 * T, starts.data(), (T + 1) * sizeof(int64_t));
  };
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    at::Tensor host = at::empty({words * 8}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    fill(reinterpret_cast<int64_t*>(host.data_ptr()));
    // Non-blocking from pinned memory: no host sync; copy_ records the stream on the pinned block.
    out.device_buffer = host.to(device, /*non_blocking=*/true);
  } else {
    // Captured: the words travel in kernel parameters (see the header comment); no host memory is
    // read at replay.
    std::vector<int64_t> w(words);
    fill(w.data());
    out.device_buffer = at::empty({words * 8}, at::TensorOptions().dtype(at::kByte).device(device));
    auto* dst = reinterpret_cast<int64_t*>(out.device_buffer.data_ptr());
    const auto stream = at::cuda::getCurrentCUDAStream();
    for (int64_t i = 0; i < words; i += kParamWords) {
      const int n = static_cast<int>(std::min<int64_t>(kParamWords, words - i));
      ParamWords p;
      std::memcpy(p.w, w.data() + i, n * sizeof(int64_t));
      write_words_kernel<0><<<1, 256, 0, stream>>>(dst + i, p, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  auto* d = reinterpret_cast<int64_t*>(out.device_buffer.data_ptr());
  out.view.counter = reinterpret_cast<unsigned int*>(d);
  out.view.ptrs = reinterpret_cast<void* const*>(d + 1);
  out.view.numel = d + 1 + T;
  out.view.chunk_start = d + 1 + 2 * T;
  out.view.ntensors = static_cast<int>(T);
  return out;
}

// Block `chunk` -> (tensor, first element, element count).
struct ChunkRef {
  int tensor;
  int64_t offset;
  int64_t n;
};

__device__ __forceinline__ ChunkRef locate(const TensorTable& tab, int64_t chunk) {
  int lo = 0, hi = tab.ntensors - 1;  // last t with chunk_start[t] <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  const int64_t offset = (chunk - tab.chunk_start[lo]) * kChunk;
  const int64_t n = tab.numel[lo] - offset;
  return {lo, offset, n < kChunk ? n : kChunk};
}

// 16 bytes of T for aligned loads/stores (common/vec_pack.cuh).
template <typename T>
using Pack16 = Pack<T, pack16_elems<T>()>;

// Calls f(x, index) on each element of x[0, n) owned by this thread, loading 16 bytes at a time
// when x is 16-byte aligned (checked at run time: a tensor may be a view at any offset).
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(const T* x, int64_t n, F&& f) {
  constexpr int N = pack16_elems<T>();
  int64_t i0 = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const int64_t nvec = n / N;
    const auto* xv = reinterpret_cast<const Pack16<T>*>(x);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const Pack16<T> p = xv[v];
#pragma unroll
      for (int k = 0; k < N; ++k) f(p.v[k], v * N + k);
    }
    i0 = nvec * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) f(x[i], i);
}

// In place: x[i] = op(x[i]), 16 bytes at a time where aligned.
template <typename T, typename Op>
__device__ __forceinline__ void transform_in_place(T* x, int64_t n, Op&& op) {
  constexpr int N = pack16_elems<T>();
  int64_t i0 = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const int64_t nvec = n / N;
    auto* xv = reinterpret_cast<Pack16<T>*>(x);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Pack16<T> p = xv[v];
#pragma unroll
      for (int k = 0; k < N; ++k) p.v[k] = op(p.v[k]);
      xv[v] = p;
    }
    i0 = nvec * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) x[i] = op(x[i]);
}

}  // namespace mt
}  // namespace fastkd
