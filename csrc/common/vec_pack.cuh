// Vector packs for the CUDA kernels: N elements of X loaded or stored as one 16-, 8- or 4-byte
// access, or stored in pieces of 8, 4 or 2 bytes where the address has less alignment (the one home
// of Pack; the KD-loss kernel and the multi-tensor launches use it). A pack access needs a pointer
// aligned to the pack: callers check the alignment at run time (a tensor may be a view at any
// offset) and fall back to scalar accesses or to store_pack_aligned where it fails.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastkd {

template <typename X, int N>
struct alignas(sizeof(X) * N) Pack {
  X v[N];
};

// Elements of X in one 16-byte pack.
template <typename X>
constexpr int pack16_elems() {
  return 16 / static_cast<int>(sizeof(X));
}

// The integer vector type of a pack's size, for the cache-hinted load/store intrinsics.
template <int Bytes> struct RawOf;
template <> struct RawOf<16> { using type = int4; };
template <> struct RawOf<8> { using type = int2; };
template <> struct RawOf<4> { using type = int; };
template <> struct RawOf<2> { using type = short; };

// Keep: the data is read again (L1/L2 allocate normally). Last: the element's last read from global
// memory (evict-first, so it does not displace lines still waiting for their re-read).
enum class Hint { Keep, Last };

// p: pack-aligned, read-only for the kernel's lifetime (Keep loads go through the non-coherent
// read-only path, __ldg).
template <Hint H, typename X, int N>
__device__ __forceinline__ Pack<X, N> load_pack(const X* p) {
  using R = typename RawOf<sizeof(X) * N>::type;
  const R* rp = reinterpret_cast<const R*>(p);
  const R r = H == Hint::Last ? __ldcs(rp) : __ldg(rp);
  Pack<X, N> out;
  memcpy(&out, &r, sizeof(R));
  return out;
}

template <typename X, int N>
__device__ __forceinline__ void store_pack(X* p, const Pack<X, N>& v) {  // streaming: never re-read here
  using R = typename RawOf<sizeof(X) * N>::type;
  R r;
  memcpy(&r, &v, sizeof(R));
  __stcs(reinterpret_cast<R*>(p), r);
}

// A pack stored at an address aligned to `align` bytes only (a power of two from sizeof(X) to the
// pack's size; the same for every pack of a row, so the branch is uniform): in pieces of that width.
template <int W, typename X, int N>
__device__ __forceinline__ void store_pieces(X* p, const Pack<X, N>& v) {
  using R = typename RawOf<W>::type;
  constexpr int K = static_cast<int>(sizeof(X)) * N / W;
  R r[K];
  memcpy(r, &v, sizeof(r));
#pragma unroll
  for (int k = 0; k < K; ++k) __stcs(reinterpret_cast<R*>(p) + k, r[k]);
}

template <typename X, int N>
__device__ __forceinline__ void store_pack_aligned(X* p, const Pack<X, N>& v, int align) {
  constexpr int B = static_cast<int>(sizeof(X)) * N;
  if (align >= B) {
    store_pack(p, v);
    return;
  }
  if constexpr (B > 8) {
    if (align >= 8) return store_pieces<8>(p, v);
  }
  if constexpr (B > 4 && sizeof(X) <= 4) {
    if (align >= 4) return store_pieces<4>(p, v);
  }
  if constexpr (sizeof(X) == 2) store_pieces<2>(p, v);
}

}  // namespace fastkd
