// Warp and block all-reductions for the CUDA kernels, and the groups of threads that process one row
// (a warp or a block) with their reductions and barriers (the one home of them; the KD-loss, top-k
// KD-loss and clipping kernels use them). The order is fixed -- a butterfly within each warp, then warp 0
// over the warps' partials in warp order -- so the same input gives bit-identical results, and no
// float atomics are involved.
//
// A value type X needs a `merge` functor and a shfl_xor(X, int) overload (float and double are
// here; a kernel declares its own for its structs, found by argument-dependent lookup).
#pragma once

namespace fastkd {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ double shfl_xor(double v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

// Butterfly: every lane ends with the same value (merge must be commutative, so that the two lanes
// of each exchange compute the same bits). All 32 lanes of the warp must take part.
template <typename X, typename Merge>
__device__ __forceinline__ X warp_allreduce(X v, Merge merge) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = merge(v, shfl_xor(v, m));
  return v;
}

// Block-wide: warps reduce, warp 0 reduces the warps' partials (identity-padded), broadcast through
// sm[kWarpSize]. Every thread of the block must call it, blockDim.x a multiple of kWarpSize.
// sm: [kWarpSize + 1] in shared memory. There is no barrier on entry: a second call on the same sm
// must come after a __syncthreads() that follows every thread's read of the first result (kernels
// that reduce repeatedly alternate arrays, or have such a barrier in between).
template <typename X, typename Merge>
__device__ __forceinline__ X block_allreduce(X v, Merge merge, const X& identity, X* sm) {
  v = warp_allreduce(v, merge);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    X x = lane < nwarps ? sm[lane] : identity;
    x = warp_allreduce(x, merge);
    if (lane == 0) sm[kWarpSize] = x;
  }
  __syncthreads();
  return sm[kWarpSize];
}

// ---- row groups: the threads that process one row, a warp or the whole block -------------------------
// kWarpGroup: blockDim.x / 32 rows per block, one per warp; else one row per block. Rows are visited
// grid-stride: for (r = id; r < rows; r += count).
template <bool kWarpGroup>
struct RowGroup {
  int rank, size;
  int64_t id, count;
  __device__ __forceinline__ RowGroup() {
    if constexpr (kWarpGroup) {
      const int per_block = blockDim.x / kWarpSize;
      rank = threadIdx.x % kWarpSize;
      size = kWarpSize;
      id = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / kWarpSize;
      count = static_cast<int64_t>(gridDim.x) * per_block;
    } else {
      rank = threadIdx.x;
      size = blockDim.x;
      id = blockIdx.x;
      count = gridDim.x;
    }
  }
};

// merge(x, y) found by argument-dependent lookup: the kernel's own overloads for its value types.
struct Merge {
  template <typename X>
  __device__ __forceinline__ X operator()(const X& x, const X& y) const { return merge(x, y); }
};

// All-reduce over a row group. sm: [kWarpSize + 1] in shared memory (unused by a warp group), with
// block_allreduce's rule for reusing it: a kernel that reduces repeatedly alternates arrays (one per
// value type) or has a barrier between two uses of one.
template <bool kWarpGroup, typename X>
__device__ __forceinline__ X group_allreduce(const X& v, X* sm, const X& identity) {
  if constexpr (kWarpGroup) {
    (void)sm; (void)identity;
    return warp_allreduce(v, Merge{});
  } else {
    return block_allreduce(v, Merge{}, identity, sm);
  }
}

// A barrier of the row group that also orders its shared- and global-memory accesses.
template <bool kWarpGroup>
__device__ __forceinline__ void group_sync() {
  if constexpr (kWarpGroup) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Whether `pred` holds on any thread of the row group; a barrier as group_sync.
template <bool kWarpGroup>
__device__ __forceinline__ bool group_any(bool pred) {
  if constexpr (kWarpGroup) {
    return __any_sync(0xffffffffu, pred);
  } else {
    return __syncthreads_or(pred) != 0;
  }
}

}  // namespace fastkd
