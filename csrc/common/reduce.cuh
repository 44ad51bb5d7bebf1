// Warp and block all-reductions for the CUDA kernels (the one home of them; the KD-loss kernel and
// the clipping kernels use them). The order is fixed -- a butterfly within each warp, then warp 0
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

}  // namespace fastkd
