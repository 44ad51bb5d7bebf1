// Vector packs for the CUDA kernels: N elements of X loaded or stored as one 16-, 8- or 4-byte
// access (the one home of Pack; the KD-loss kernel and the multi-tensor launches use it). A pack
// access needs a pointer aligned to the pack: callers check the alignment at run time (a tensor may
// be a view at any offset) and fall back to scalar accesses where it fails.
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

}  // namespace fastkd
