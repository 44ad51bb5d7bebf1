// Vector packs for the CUDA kernels: N elements of X loaded or stored as one 16-, 8- or 4-byte
// access, or stored in pieces of 8, 4 or 2 bytes where the address has less alignment, and the loop
// that walks a row's packs with several loads in flight (the one home of Pack; the KD-loss and top-k
// KD-loss kernels and the multi-tensor launches use it). A pack access needs a pointer
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

// An element as fp32 (the kernels' maths type), whatever its storage type.
template <typename X>
__device__ __forceinline__ float to_f(X x) {
  return static_cast<float>(x);
}

// Calls use(j, load(j)) for the packs j = begin + rank + k * size of this thread, k ascending (or
// descending), loading kU packs before using any so that kU loads per thread are in flight.
template <int kU, bool kReverse, typename LoadF, typename UseF>
__device__ __forceinline__ void for_packs(int begin, int end, int rank, int size, LoadF&& load, UseF&& use) {
  const int first = begin + rank;
  if (first >= end) return;
  const int count = (end - first + size - 1) / size;
  using Item = decltype(load(0));
  for (int k0 = 0; k0 < count; k0 += kU) {
    Item buf[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int k = k0 + u;
      if (k < count) buf[u] = load(first + (kReverse ? count - 1 - k : k) * size);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int k = k0 + u;
      if (k < count) use(first + (kReverse ? count - 1 - k : k) * size, buf[u]);
    }
  }
}

// Zeros into row[0, vocab) split as kd_row_layout (kd_loss/kd_loss_launch.h) splits it: scalars
// [0, L.head) and [L.tail, vocab), L.body packs of N from row + L.head stored in pieces of L.g_align
// bytes; the threads rank, rank + size, ... of a row group share the work.
template <int N, typename X, typename Layout>
__device__ __forceinline__ void zero_row(X* row, const Layout& L, int vocab, int rank, int size) {
  const int n_scalar = L.head + (vocab - L.tail);
  for (int i = rank; i < n_scalar; i += size) row[i < L.head ? i : L.tail + (i - L.head)] = X(0.f);
  Pack<X, N> zero;
#pragma unroll
  for (int k = 0; k < N; ++k) zero.v[k] = X(0.f);
  for (int j = rank; j < L.body; j += size) store_pack_aligned(row + L.head + j * N, zero, L.g_align);
}

}  // namespace fastkd
