// Launch configuration of the CUDA top-k KD-loss kernel (topk_kd_cuda.cu) as plain arithmetic on device
// properties passed in: no CUDA call here, so the choices are tested on machines without a GPU
// (tests/ops/test_topk_launch_config.py, through fastkd._C.topk_cuda_launch_config) with the property
// values of an H100/H200 and an A100. The device limits, the shared-memory accounting and the
// occupancy count are the KD-loss kernel's (kd_loss/kd_loss_launch.h).
//
// The kernel keeps no row in shared memory (there is one dense input, the student row, re-read from L2
// by the gradient pass); its dynamic shared memory is the duplicate-index bitmap: vocab bits per row
// group (per warp in the warp kernel), cleared once per block and then only where a row set bits. The
// grid is the blocks resident at once (a persistent grid: each row group takes rows grid-stride).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kd_loss/kd_loss_launch.h"

namespace fastkd {

// Rows of at most kWarpRowMaxVocab entries are processed by one warp each (kWarpKernelThreads / 32
// rows per block), longer ones by a block of block_threads(packs, kTopkBlockThreads) threads. With one
// dense input per row, occupancy is what keeps enough loads in flight, so the kernels are compiled for
// several resident blocks (ptxas, sm_90, CUDA 13: the block kernel fits 64 registers without spills, 52-64
// used; the warp kernel uses 66-79 and spilled at 64).
constexpr int kTopkBlockThreads = 512;
constexpr int kTopkMinBlocksPerSm = 2;       // block kernel: 2 x 512 threads, <= 64 registers
constexpr int kTopkWarpMinBlocksPerSm = 3;   // warp kernel: 3 x 256 threads, <= 80 registers

struct TopkLaunchConfig {
  bool warp_kernel;       // one warp per row
  int threads;            // per block
  bool bitmap;            // duplicate check with a shared-memory bitmap (else pairwise)
  int64_t bitmap_words;   // 32-bit words of one row group's bitmap: ceil(vocab / 32)
  int64_t dyn_smem;       // dynamic shared memory per block: the bitmaps, or 0
  bool opt_in;            // static + dynamic > smem_per_block: the attribute must be raised
  int64_t max_dyn_smem;   // what it is raised to, the same for every size: optin - static
  int blocks_per_sm;      // what fits (kd_blocks_per_sm)
  int64_t max_blocks;     // the grid's cap: the blocks resident at once, blocks_per_sm x sm_count (>= 1);
                          // a group takes rows grid-stride, so its bitmap is cleared once per block
};

// Calls f(name, value) for every field of c, in order (as kd_loss/kd_loss_launch.h's for KdLaunchConfig:
// module.cpp's topk_cuda_launch_config, topk_kd_cuda.cu's topk_cuda_launch_info).
template <typename F>
void for_each_field(const TopkLaunchConfig& c, F&& f) {
  f("warp_kernel", c.warp_kernel);
  f("threads", c.threads);
  f("bitmap", c.bitmap);
  f("bitmap_words", c.bitmap_words);
  f("dyn_smem", c.dyn_smem);
  f("opt_in", c.opt_in);
  f("max_dyn_smem", c.max_dyn_smem);
  f("blocks_per_sm", c.blocks_per_sm);
  f("max_blocks", c.max_blocks);
}

inline int64_t topk_bitmap_words(int64_t vocab) { return (vocab + 31) / 32; }

// The duplicate check of a row of k indices into a vocabulary of `vocab` entries: the bitmap costs a
// clear of its vocab / 32 words (per block; a block usually processes one row) and k shared-memory
// atomics, the pairwise check k (k - 1) / 2 comparisons of indices the threads load together (one
// broadcast load each). Pairwise where that is no more than the bitmap's clear (e.g. k <= 128 for
// vocab = 262144), and wherever the bitmap does not fit (vocab beyond ~1.8M entries on sm_90).
inline bool topk_pairwise_cheaper(int64_t vocab, int64_t k) { return k * (k - 1) / 2 <= topk_bitmap_words(vocab); }

inline TopkLaunchConfig topk_launch_config(const KdDeviceLimits& d, const KdKernelFacts& f, int64_t vocab, int64_t k,
                                           int pack_elems) {
  TopkLaunchConfig c{};
  c.max_dyn_smem = d.smem_per_block_optin - f.static_smem;
  c.warp_kernel = vocab <= kWarpRowMaxVocab;
  c.threads = c.warp_kernel ? kWarpKernelThreads
                            : block_threads((vocab + pack_elems - 1) / pack_elems, kTopkBlockThreads);
  const int64_t groups = c.warp_kernel ? kWarpKernelThreads / 32 : 1;
  c.bitmap_words = topk_bitmap_words(vocab);
  const int64_t bytes = groups * c.bitmap_words * 4;
  c.bitmap = !topk_pairwise_cheaper(vocab, k) && bytes <= c.max_dyn_smem;
  c.dyn_smem = c.bitmap ? bytes : 0;
  c.opt_in = f.static_smem + c.dyn_smem > d.smem_per_block;
  c.blocks_per_sm = kd_blocks_per_sm(d, f, c.threads, c.dyn_smem);
  c.max_blocks = std::max<int64_t>(1, static_cast<int64_t>(c.blocks_per_sm) * d.sm_count);
  return c;
}

#ifdef FASTKD_WITH_CUDA
// topk_kd_cuda.cu: the configuration a launch for rows of `vocab` entries and k indices gets on the
// current device (the fields of TopkLaunchConfig, the kernel's static shared memory, registers, local
// memory (spills) and max-dynamic-shared-memory attribute) and "occupancy",
// cudaOccupancyMaxActiveBlocksPerMultiprocessor's count for it. Student dtype "float32", "bfloat16"
// or "float16".
std::vector<std::pair<std::string, int64_t>> topk_cuda_launch_info(const std::string& student_dtype,
                                                                    int64_t vocab, int64_t k);
#endif

}  // namespace fastkd
