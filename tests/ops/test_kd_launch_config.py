"""The CUDA KD-loss kernel's launch configuration (csrc/kd_loss/kd_loss_launch.h) as arithmetic on device
properties, with the values of an H100/H200 and an A100: no GPU needed.

On a GPU, test_kd_loss_cuda.py checks the same configurations against the runtime
(cudaOccupancyMaxActiveBlocksPerMultiprocessor) and runs them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fastkd import _extension

pytestmark = pytest.mark.skipif(_extension.EXT is None, reason="needs the compiled extension")

ROOT = Path(__file__).resolve().parents[2]

# cudaDeviceProp values (sharedMemPerBlock, ...Optin, ...PerMultiprocessor, reservedSharedMemPerBlock, ...).
H100 = dict(major=9, smem_per_block=49152, smem_per_block_optin=232448, smem_per_sm=233472,
            reserved_smem_per_block=1024, sm_count=132, l2_bytes=50 << 20, regs_per_sm=65536,
            max_threads_per_sm=2048, max_blocks_per_sm=32)
H200 = dict(H100)  # the same GH100 chip: only the memory differs
A100 = dict(major=8, smem_per_block=49152, smem_per_block_optin=166912, smem_per_sm=167936,
            reserved_smem_per_block=1024, sm_count=108, l2_bytes=40 << 20, regs_per_sm=65536,
            max_threads_per_sm=2048, max_blocks_per_sm=32)
DEVICES = {"h100": H100, "h200": H200, "a100": A100}
STATIC = 1056  # ptxas: the block kernel's two reduction arrays (33 x 24 + 33 x 8 bytes)
REGS = 128  # the most __launch_bounds__(512, 1) allows; ptxas reports 103-128
DTYPES = {"fp32/fp32": (4, 4), "bf16/bf16": (2, 2), "bf16/fp32": (2, 4), "fp32/fp16": (4, 2)}


def config(dev, vocab, sizes, static=STATIC, regs=REGS):
    return _extension.kd_cuda_launch_config(dev, vocab, *sizes, static, regs)


def sweep():
    return list(range(2049, 300_000, 97)) + [6012, 6143, 8016, 8191, 12024, 12287, 32000, 32768, 50257, 128256,
                                             151936, 262144]


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_every_launch_is_valid(dev, dtypes):
    d = DEVICES[dev]
    max_dyn = {config(d, v, DTYPES[dtypes])["max_dyn_smem"] for v in sweep()}
    assert max_dyn == {d["smem_per_block_optin"] - STATIC}  # one value per kernel: set once, no race
    for vocab in sweep():
        c = config(d, vocab, DTYPES[dtypes])
        total = STATIC + c["dyn_smem"]
        # Without the opt-in a block may have 48 KiB of static + dynamic shared memory (not of dynamic).
        assert c["opt_in"] == (total > d["smem_per_block"]), (vocab, c)
        assert total <= d["smem_per_block_optin"], (vocab, c)
        assert c["cache_packs"] * c["pack_elems"] <= vocab
        assert c["cache_packs"] * c["pack_elems"] * sum(DTYPES[dtypes]) + 15 <= c["dyn_smem"]
        assert c["threads"] in (128, 256, 512) and not c["warp_kernel"]


@pytest.mark.parametrize("dtypes,lo,hi", [("fp32/fp32", 6012, 6143), ("bf16/bf16", 12024, 12287),
                                          ("bf16/fp32", 8016, 8191), ("fp32/fp16", 8016, 8191)])
@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_opt_in_window(dtypes, lo, hi, dev):
    # The dynamic sizes in (48 KiB - static, 48 KiB]: launched without the opt-in they fail.
    d = DEVICES[dev]
    for vocab in range(lo - 1, hi + 2):
        c = config(d, vocab, DTYPES[dtypes])
        inside = lo <= vocab <= hi
        assert (d["smem_per_block"] - STATIC < c["dyn_smem"] <= d["smem_per_block"]) == inside, vocab
        assert c["opt_in"] == (vocab >= lo), vocab


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_two_blocks_per_sm_fit_where_budgeted(dev, dtypes):
    d = DEVICES[dev]
    for vocab in sweep():
        c = config(d, vocab, DTYPES[dtypes])
        assert c["blocks_per_sm"] >= c["target_blocks_per_sm"], (vocab, c)
        if c["target_blocks_per_sm"] == 2:
            assert c["threads"] <= 256


@pytest.mark.parametrize("dtypes,lo,hi", [("bf16/bf16", 29000, 41000), ("fp32/fp32", 14500, 20500)])
def test_medium_rows_run_two_blocks_per_sm_on_hopper(dtypes, lo, hi):
    # These sizes (bf16 32000 and 32768 among them) ran one 256-thread block per SM: the two-block
    # budget ignored the reserved and static shared memory of each block.
    for vocab in list(range(lo, hi, 50)) + ([32000, 32768] if dtypes == "bf16/bf16" else []):
        c = config(H200, vocab, DTYPES[dtypes])
        assert c["target_blocks_per_sm"] == 2 and c["blocks_per_sm"] == 2 and c["threads"] == 256, (vocab, c)
        # Two blocks' allocations (static + dynamic + reserved, in 128-byte units) fit in the SM.
        per_block = -(-(STATIC + c["dyn_smem"] + H200["reserved_smem_per_block"]) // 128) * 128
        assert 2 * per_block <= H200["smem_per_sm"]


def test_big_rows_and_registers():
    c = config(H200, 128256, DTYPES["bf16/bf16"])
    assert c["target_blocks_per_sm"] == 1 and c["threads"] == 512 and c["blocks_per_sm"] == 1
    assert c["dyn_smem"] == H200["smem_per_block_optin"] - STATIC and c["opt_in"]
    # More than 128 registers: two 256-thread blocks no longer fit, and the count says so.
    c = config(H200, 32000, DTYPES["bf16/bf16"], regs=136)
    assert c["target_blocks_per_sm"] == 2 and c["blocks_per_sm"] == 1


def test_warp_kernel_rows():
    for vocab in (1, 7, 769, 2048):
        c = config(H200, vocab, DTYPES["bf16/bf16"])
        assert c["warp_kernel"] and c["threads"] == 256 and c["dyn_smem"] == 0 and not c["opt_in"]
        assert c["blocks_per_sm"] >= 2


def test_row_layout_padded_stride():
    # logits[..., :50257] of a 50304-wide bf16 buffer: the inputs' rows all start 16-byte aligned, the
    # contiguous gradient's rows at every phase. Every row is vectorised on the inputs' phase; the
    # gradient is stored in pieces of its own alignment (it sent 7 rows in 8 to scalar loads before).
    vocab, width, base_s, base_t, base_g = 50257, 50304, 1 << 32, 1 << 33, 1 << 34
    widths = []
    for r in range(16):
        head, body, tail, g_align = _extension.kd_cuda_row_layout(
            base_s + 2 * r * width, 2, base_t + 2 * r * width, 2, base_g + 2 * r * vocab, vocab, 8)
        assert (head, body, tail) == (0, vocab // 8, vocab // 8 * 8), r
        widths.append(g_align)
    assert widths[:8] == [16, 2, 4, 2, 8, 2, 4, 2] and widths[8:] == widths[:8]
    # A gradient with its own padded row stride (kd_rows.h's grad_stride, here 50260 elements): its
    # store width follows its own rows' addresses, not the logits'.
    g_stride = 50260
    widths = [_extension.kd_cuda_row_layout(base_s + 2 * r * width, 2, base_t + 2 * r * width, 2,
                                            base_g + 2 * r * g_stride, vocab, 8)[3] for r in range(4)]
    assert widths == [16, 8, 16, 8]


def test_row_layout_phases():
    # The common head of student and teacher; a teacher at another phase: the whole row is scalar.
    assert _extension.kd_cuda_row_layout(1 << 20 | 6, 2, 1 << 21 | 6, 2, 1 << 22, 100, 8) == (5, 11, 93, 2)
    assert _extension.kd_cuda_row_layout(1 << 20 | 6, 2, 1 << 21 | 2, 2, 1 << 22, 100, 8)[:3] == (100, 0, 100)
    # Mixed bf16 student / fp32 teacher: 4-element packs, an 8-byte gradient pack.
    assert _extension.kd_cuda_row_layout(1 << 20 | 4, 2, 1 << 21 | 8, 4, 1 << 22 | 12, 50, 4) == (2, 12, 50, 8)
    # No gradient (forward only): no store width; the scale kernel's own row (no teacher).
    assert _extension.kd_cuda_row_layout(1 << 20, 4, 0, 4, 0, 7, 4) == (0, 1, 4, 0)
    assert _extension.kd_cuda_row_layout(1 << 20 | 4, 4, 0, 0, 0, 3, 4) == (3, 0, 3, 0)


OCC_PROGRAM = r"""
#include <cstdio>
#include <cuda_occupancy.h>
#include "kd_loss/kd_loss_launch.h"
using namespace fastkd;
int main() {
  const KdDeviceLimits devs[] = {{9, 49152, 232448, 233472, 1024, 132, 52428800, 65536, 2048, 32},
                                 {8, 49152, 166912, 167936, 1024, 108, 41943040, 65536, 2048, 32}};
  const int elems[] = {4, 8, 4};
  const long pack_bytes[] = {32, 32, 24};
  long n = 0, bad = 0;
  for (const KdDeviceLimits& d : devs) {
    cudaOccDeviceProp p;
    p.computeMajor = d.major; p.computeMinor = 0; p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiprocessor = d.max_threads_per_sm; p.regsPerBlock = 65536;
    p.regsPerMultiprocessor = d.regs_per_sm; p.warpSize = 32; p.sharedMemPerBlock = d.smem_per_block;
    p.sharedMemPerMultiprocessor = d.smem_per_sm; p.numSms = d.sm_count;
    p.sharedMemPerBlockOptin = d.smem_per_block_optin; p.reservedSharedMemPerBlock = d.reserved_smem_per_block;
    for (int regs : {96, 112, 128, 136}) for (int e = 0; e < 3; ++e) for (long v = 1; v < 300000; v += 13) {
      const KdLaunchConfig c = kd_launch_config(d, {1056, regs}, v, elems[e], pack_bytes[e]);
      cudaOccFuncAttributes a;
      a.maxThreadsPerBlock = 512; a.numRegs = regs; a.sharedSizeBytes = c.warp_kernel ? 0 : 1056;
      a.partitionedGCConfig = PARTITIONED_GC_OFF;
      a.shmemLimitConfig = c.opt_in ? FUNC_SHMEM_LIMIT_OPTIN : FUNC_SHMEM_LIMIT_DEFAULT;
      a.maxDynamicSharedSizeBytes = c.opt_in ? c.max_dyn_smem : d.smem_per_block - 1056;
      cudaOccDeviceState st;
      cudaOccResult r;
      const KdLaunchConfig w = c.warp_kernel ? kd_launch_config(d, {0, regs}, v, elems[e], pack_bytes[e]) : c;
      ++n;
      if (cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &st, w.threads, w.dyn_smem) != CUDA_OCC_SUCCESS ||
          r.activeBlocksPerMultiprocessor != w.blocks_per_sm) {
        if (++bad <= 5) printf("mismatch: major %ld regs %d vocab %ld: fastkd %d, cuda_occupancy.h %d\n",
                               (long)d.major, regs, v, w.blocks_per_sm, r.activeBlocksPerMultiprocessor);
      }
    }
  }
  printf("%ld configurations, %ld mismatches\n", n, bad);
  return bad != 0;
}
"""


def _cuda_include():
    nvcc = shutil.which("nvcc")
    cands = [Path("/usr/local/cuda/include")]
    if nvcc:
        cands.insert(0, Path(nvcc).resolve().parent.parent / "include")
    return next((c for c in cands if (c / "cuda_occupancy.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA toolkit's cuda_occupancy.h")
def test_blocks_per_sm_matches_cuda_occupancy_h(tmp_path):
    # fastkd's count of resident blocks against the toolkit's own occupancy calculator (the header
    # behind cudaOccupancyMaxActiveBlocksPerMultiprocessor's rules), over every configuration.
    src = tmp_path / "occ.cpp"
    src.write_text(OCC_PROGRAM)
    exe = tmp_path / "occ"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{_cuda_include()}", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
