// Launch configuration of the CUDA KD-loss kernels (kd_loss_cuda.cu) as plain arithmetic on device
// properties passed in: no CUDA call here, so the choices are tested on machines without a GPU
// (tests/ops/test_kd_launch_config.py, through fastkd._C.kd_cuda_launch_config and
// kd_cuda_row_layout) with the property values of an H100/H200 and an A100.
//
// Shared memory, as the hardware and cuda_occupancy.h count it (sm_80 and later):
//   * a block may have static + dynamic <= sharedMemPerBlock (48 KiB) unless the kernel's
//     cudaFuncAttributeMaxDynamicSharedMemorySize is raised (the "opt-in"), and never more than
//     sharedMemPerBlockOptin (227 KiB on sm_90, 163 KiB on sm_80) of static + dynamic;
//   * each resident block takes round_up(static + dynamic + reservedSharedMemPerBlock, 128) of the
//     SM's sharedMemPerMultiprocessor (228 KiB on sm_90, 164 KiB on sm_80; 1 KiB is reserved per
//     block by the driver), so two blocks fit only if each stays within half of that.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/host_device.h"

namespace fastkd {

// Rows of at most kWarpRowMaxVocab entries are processed by one warp each (kWarpKernelThreads / 32
// rows per block), longer ones by a block each. Registers: the row kernels need ~100-128 registers
// per thread without spilling (two packs of 8 elements in flight, each entry with its exps and
// log-probabilities); at 64 registers (1024 threads per SM) ptxas spilled 150-900 bytes per thread.
// So a block has at most 512 threads (128 registers) and an SM runs 512 of them: one 512-thread
// block for big rows, two 256-thread blocks for medium ones.
constexpr int kMaxBlockThreads = 512;    // block-per-row kernel, one block per SM for big rows
constexpr int kMinBlockThreads = 128;
constexpr int kTwoPerSmThreads = 256;    // when two blocks share an SM
constexpr int kWarpKernelThreads = 256;  // warp-per-row kernel: 8 rows per block, 2 blocks per SM
constexpr int kWarpRowMaxVocab = 2048;   // up to 64 elements per lane
constexpr int kPacksPerThread = 4;       // block size ~ packs per row / 4 (enough independent loads)

// Threads per row for the block kernels: about kPacksPerThread packs per thread, 128..max_threads.
inline int block_threads(int64_t packs, int max_threads) {
  int threads = kMinBlockThreads;
  while (threads < max_threads && threads * static_cast<int64_t>(kPacksPerThread) < packs) threads *= 2;
  return threads;
}

// The device properties the configuration depends on (cudaDeviceProp's fields of the same names).
struct KdDeviceLimits {
  int64_t major;                     // compute capability (the shared-memory allocation granularity)
  int64_t smem_per_block;            // sharedMemPerBlock: static + dynamic without the opt-in
  int64_t smem_per_block_optin;      // sharedMemPerBlockOptin
  int64_t smem_per_sm;               // sharedMemPerMultiprocessor
  int64_t reserved_smem_per_block;   // reservedSharedMemPerBlock
  int64_t sm_count;                  // multiProcessorCount
  int64_t l2_bytes;                  // l2CacheSize
  int64_t regs_per_sm;               // regsPerMultiprocessor
  int64_t max_threads_per_sm;        // maxThreadsPerMultiProcessor
  int64_t max_blocks_per_sm;         // maxBlocksPerMultiProcessor
};

// What the kernel was compiled to (cudaFuncAttributes).
struct KdKernelFacts {
  int64_t static_smem;  // sharedSizeBytes (1056 for the block kernel: two reduction arrays)
  int64_t regs;         // numRegs per thread
};

struct KdLaunchConfig {
  bool warp_kernel;             // one warp per row (no dynamic shared memory)
  int threads;                  // per block
  int64_t dyn_smem;             // dynamic shared memory per block (the row cache)
  int cache_packs;              // packs of a row kept in shared memory
  bool opt_in;                  // static + dynamic > smem_per_block: the attribute must be raised
  int64_t max_dyn_smem;         // what it is raised to, the same for every size: optin - static
  int target_blocks_per_sm;     // what the shared-memory budget was made for
  int blocks_per_sm;            // what fits (cuda_occupancy.h's rules for threads, registers, smem)
};

// Calls f(name, value) for every field of c, in order: the one list of them for the functions that
// report a configuration (module.cpp's kd_cuda_launch_config, kd_loss_cuda.cu's kd_cuda_launch_info).
template <typename F>
void for_each_field(const KdLaunchConfig& c, F&& f) {
  f("warp_kernel", c.warp_kernel);
  f("threads", c.threads);
  f("dyn_smem", c.dyn_smem);
  f("cache_packs", c.cache_packs);
  f("opt_in", c.opt_in);
  f("max_dyn_smem", c.max_dyn_smem);
  f("target_blocks_per_sm", c.target_blocks_per_sm);
  f("blocks_per_sm", c.blocks_per_sm);
}

inline int64_t smem_granularity(int64_t major) { return major >= 8 ? 128 : 256; }

// Resident blocks per SM of `threads` threads with `dyn_smem` bytes (cudaOccupancyMaxActiveBlocks-
// PerMultiprocessor's rules on sm_70 and later; 4 register sub-partitions, 256-register units per warp).
inline int kd_blocks_per_sm(const KdDeviceLimits& d, const KdKernelFacts& k, int threads, int64_t dyn_smem) {
  const int64_t warps = (threads + 31) / 32;
  int64_t blocks = d.max_blocks_per_sm;
  blocks = std::min<int64_t>(blocks, d.max_threads_per_sm / (warps * 32));
  if (k.regs > 0) {
    const int64_t regs_per_warp = (k.regs * 32 + 255) / 256 * 256;
    const int64_t warps_per_sm = (d.regs_per_sm / 4) / regs_per_warp * 4;
    blocks = std::min<int64_t>(blocks, warps_per_sm / warps);
  }
  const int64_t g = smem_granularity(d.major);
  const int64_t per_block = (k.static_smem + dyn_smem + d.reserved_smem_per_block + g - 1) / g * g;
  if (k.static_smem + dyn_smem > d.smem_per_block_optin) return 0;
  blocks = std::min<int64_t>(blocks, d.smem_per_sm / per_block);
  return static_cast<int>(std::max<int64_t>(blocks, 0));
}

// The configuration of a row of `vocab` entries whose student + teacher pack (pack_elems elements
// each) takes pack_bytes bytes. The shared-memory budget (kd_loss_cuda.cu's header comment says why):
// the whole row when it fits with two blocks per SM; that half when the part of the row left in L2 is
// small next to the L2 (two rows per SM overlap one's exp-bound sweeps with the other's DRAM-bound
// sweep 1); else as much as one block may have, one block of up to 512 threads per SM.
inline KdLaunchConfig kd_launch_config(const KdDeviceLimits& d, const KdKernelFacts& k, int64_t vocab,
                                       int pack_elems, int64_t pack_bytes) {
  KdLaunchConfig c{};
  c.max_dyn_smem = d.smem_per_block_optin - k.static_smem;
  if (vocab <= kWarpRowMaxVocab) {
    c.warp_kernel = true;
    c.threads = kWarpKernelThreads;
    c.target_blocks_per_sm = 2;
    c.blocks_per_sm = kd_blocks_per_sm(d, k, c.threads, 0);
    return c;
  }
  const int64_t packs = vocab / pack_elems;             // >= the body of any row
  const int64_t want = packs * pack_bytes + 16;          // + alignment padding between the two caches
  const int64_t avail = c.max_dyn_smem;                  // one block per SM
  const int64_t g = smem_granularity(d.major);
  // Two blocks per SM: each takes round_up(static + dynamic + reserved, g) of half the SM.
  const int64_t half = std::min(avail, (d.smem_per_sm / 2) / g * g - d.reserved_smem_per_block - k.static_smem) &
                       ~int64_t{15};
  int max_threads;
  if (want <= half) {
    c.dyn_smem = want;
    max_threads = kTwoPerSmThreads;
    c.target_blocks_per_sm = 2;
  } else if ((want - half) * 2 * d.sm_count <= d.l2_bytes / 4) {
    c.dyn_smem = half;
    max_threads = kTwoPerSmThreads;
    c.target_blocks_per_sm = 2;
  } else {
    c.dyn_smem = std::min(want, avail);
    max_threads = kMaxBlockThreads;
    c.target_blocks_per_sm = 1;
  }
  c.dyn_smem = std::max<int64_t>(c.dyn_smem, 0);
  c.cache_packs = c.dyn_smem >= 16 ? static_cast<int>((c.dyn_smem - 16) / pack_bytes) : 0;
  c.threads = block_threads(packs, max_threads);
  c.opt_in = k.static_smem + c.dyn_smem > d.smem_per_block;
  c.blocks_per_sm = kd_blocks_per_sm(d, k, c.threads, c.dyn_smem);
  return c;
}

// Split of one row: scalars [0, head), packs at head + N * j for j in [0, body), scalars [tail, vocab).
// The packs are placed by the student's and the teacher's element phase (their loads are the 16-byte
// vector loads); the gradient (contiguous, so its rows have their own phase whenever the logits have
// a padded row stride, e.g. logits[..., :50257] of a 50304-wide buffer) is stored in pieces of
// g_align bytes: the largest power of two up to its pack size that divides the address of its first
// pack, the same for every pack of the row.
struct RowLayout {
  int head;
  int body;
  int tail;
  int g_align;  // bytes; 0 without a gradient
};

// Addresses as integers; t = 0 or g = 0: no teacher / no gradient row. n: elements per pack.
FKD_HD RowLayout kd_row_layout(uintptr_t s, int s_size, uintptr_t t, int t_size, uintptr_t g, int vocab, int n) {
  // Element offset of each pointer within its pack (-1: not even element-aligned).
  const auto phase = [n](uintptr_t addr, int size) {
    return addr % size != 0 ? -1 : static_cast<int>((addr / size) % n);
  };
  const int ps = phase(s, s_size);
  const bool ok = ps >= 0 && (t == 0 || phase(t, t_size) == ps);
  RowLayout L;
  L.head = ok ? ((n - ps) % n < vocab ? (n - ps) % n : vocab) : vocab;  // not alignable together: all scalar
  L.body = (vocab - L.head) / n;
  L.tail = L.head + L.body * n;
  L.g_align = 0;
  if (g != 0) {
    const uintptr_t first = g + static_cast<uintptr_t>(L.head) * s_size;
    int a = n * s_size;
    while (a > s_size && first % a != 0) a /= 2;
    L.g_align = a;
  }
  return L;
}

#if defined(__CUDACC__)
// The limits and facts above from the runtime's structs (host code of the .cu launchers).
inline KdDeviceLimits kd_device_limits(const cudaDeviceProp& p) {
  return {p.major,
          static_cast<int64_t>(p.sharedMemPerBlock),
          static_cast<int64_t>(p.sharedMemPerBlockOptin),
          static_cast<int64_t>(p.sharedMemPerMultiprocessor),
          static_cast<int64_t>(p.reservedSharedMemPerBlock),
          p.multiProcessorCount,
          p.l2CacheSize,
          p.regsPerMultiprocessor,
          p.maxThreadsPerMultiProcessor,
          p.maxBlocksPerMultiProcessor};
}

inline KdKernelFacts kd_kernel_facts(const cudaFuncAttributes& a) {
  return {static_cast<int64_t>(a.sharedSizeBytes), a.numRegs};
}
#endif

#ifdef FASTKD_WITH_CUDA
// kd_loss_cuda.cu: the configuration a forward launch for rows of `vocab` entries gets on the current
// device (the fields of KdLaunchConfig, the kernel's static shared memory, registers and
// max-dynamic-shared-memory attribute) and "occupancy", cudaOccupancyMaxActiveBlocksPerMultiprocessor's
// count for it. Dtypes "float32", "bfloat16", "float16"; divergence "kl", "reverse_kl", "jsd".
std::vector<std::pair<std::string, int64_t>> kd_cuda_launch_info(const std::string& student_dtype,
                                                                  const std::string& teacher_dtype,
                                                                  const std::string& divergence, int64_t vocab);
#endif

}  // namespace fastkd
