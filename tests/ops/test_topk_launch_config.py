"""The CUDA top-k KD-loss kernel's launch configuration (csrc/topk_kd/topk_kd_launch.h) as arithmetic on device
properties, with the values of an H100/H200 and an A100: no GPU needed.

On a GPU, test_topk_kd_loss_cuda.py checks the same configurations against the runtime
(cudaOccupancyMaxActiveBlocksPerMultiprocessor) and runs them.
"""

from __future__ import annotations

import pytest
from conftest import check_occupancy

from bench.launch_configs import A100, H200
from fastkd import _extension

pytestmark = pytest.mark.skipif(_extension.EXT is None, reason="needs the compiled extension")

H100 = H200  # bench/launch_configs.py's (the same GH100 chip: only the memory differs)
DEVICES = {"h100": H100, "a100": A100}
STATIC = 1200  # ptxas: the block kernel's two reduction arrays (33 x 28 + 33 x 8 bytes, aligned)
REGS = {True: 79, False: 64}  # ptxas, sm_90: the warp kernel's most (bf16), the block kernel's bound


def config(dev, vocab, k, student_bytes=2, static=None, regs=None):
    warp = vocab <= 2048
    static = (0 if warp else STATIC) if static is None else static
    regs = REGS[warp] if regs is None else regs
    return _extension.topk_cuda_launch_config(dev, vocab, k, student_bytes, static, regs)


def ks_for(vocab):
    return sorted({k for k in (1, 2, 3, 11, 12, 64, 128, 129, 256, 1024, vocab // 2, vocab) if 1 <= k <= vocab})


def vocabs():
    return [1, 2, 7, 33, 769, 2048, 2049, 32000, 50257, 128256, 151936, 262144, 1 << 20, 1_800_000, 1 << 21]


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("student_bytes", [2, 4])
def test_every_launch_is_valid(dev, student_bytes):
    d = DEVICES[dev]
    for vocab in vocabs():
        for k in ks_for(vocab):
            c = config(d, vocab, k, student_bytes)
            static = 0 if c["warp_kernel"] else STATIC
            assert c["max_dyn_smem"] == d["smem_per_block_optin"] - static  # one value per kernel: no race
            total = static + c["dyn_smem"]
            assert c["opt_in"] == (total > d["smem_per_block"]), (vocab, k, c)
            assert total <= d["smem_per_block_optin"], (vocab, k, c)
            groups = 8 if c["warp_kernel"] else 1
            assert c["bitmap_words"] == -(-vocab // 32)
            assert c["dyn_smem"] == (groups * c["bitmap_words"] * 4 if c["bitmap"] else 0), (vocab, k, c)
            assert c["blocks_per_sm"] >= 1, (vocab, k, c)
            assert c["max_blocks"] == c["blocks_per_sm"] * d["sm_count"]  # the persistent grid
            if c["warp_kernel"]:
                assert vocab <= 2048 and c["threads"] == 256
            else:
                assert vocab > 2048 and c["threads"] in (128, 256, 512)


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_duplicate_check_choice(dev):
    d = DEVICES[dev]
    # Pairwise exactly where its k (k - 1) / 2 comparisons are no more than the bitmap's vocab / 32 words.
    for vocab in vocabs()[:-3]:
        for k in ks_for(vocab):
            assert config(d, vocab, k)["bitmap"] == (k * (k - 1) // 2 > -(-vocab // 32)), (vocab, k)
    # The sizes the CUDA tests use for each path.
    assert not config(d, 262144, 64)["bitmap"] and not config(d, 262144, 128)["bitmap"]
    c = config(d, 262144, 256)
    assert c["bitmap"] and c["dyn_smem"] == 32768 and not c["opt_in"]
    assert config(d, 262144, 262144)["bitmap"]
    assert not config(d, 128256, 64)["bitmap"] and config(d, 128256, 256)["bitmap"]
    assert not config(d, 2048, 11)["bitmap"] and config(d, 2048, 12)["bitmap"]  # the warp kernel: 64 words
    assert config(d, 2048, 64)["dyn_smem"] == 8 * 64 * 4
    # A bitmap past the opt-in limit: pairwise whatever k.
    c = config(d, 1 << 21, 1 << 20)
    assert not c["bitmap"] and c["dyn_smem"] == 0
    # The opt-in window: a bitmap over 48 KiB less the static arrays.
    vocab = (d["smem_per_block"] - STATIC + 4) * 8
    c = config(d, vocab, 4096)
    assert c["bitmap"] and c["opt_in"]


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_resident_blocks(dev):
    d = DEVICES[dev]
    # The __launch_bounds__ minimum (2 x 512-thread blocks at 64 registers, 3 x 256 warp-kernel blocks at
    # up to 80) holds wherever the bitmap leaves room for it.
    assert config(d, 128256, 64)["blocks_per_sm"] == 2 and config(d, 128256, 64)["threads"] == 512
    assert config(d, 262144, 256)["blocks_per_sm"] == 2
    for vocab in (1, 7, 769, 2048):
        for k in ks_for(vocab):
            assert config(d, vocab, k)["blocks_per_sm"] >= 3, (vocab, k)
            assert config(d, vocab, k, regs=80)["blocks_per_sm"] == 3, (vocab, k)


OCC_BODY = r"""
    for (int regs : {52, 64, 79, 85}) for (int bytes : {2, 4}) for (long v = 1; v < 2000000; v = v * 5 / 4 + 7)
      for (long k : {1L, 16L, 200L, 5000L, v}) {
        if (k > v) continue;
        const long stat = v <= kWarpRowMaxVocab ? 0 : 1200;
        const TopkLaunchConfig c = topk_launch_config(d, {stat, regs}, v, k, 16 / bytes);
        tally(d, regs, v, k, c.blocks_per_sm,
              occ_blocks(d, c.warp_kernel ? 256 : 512, regs, stat, c.opt_in,
                         c.opt_in ? c.max_dyn_smem : d.smem_per_block - stat, c.threads, c.dyn_smem));
      }
"""


def test_blocks_per_sm_matches_cuda_occupancy_h(tmp_path):
    # fastkd's count of resident blocks (kd_blocks_per_sm, shared with the KD-loss kernel) against the
    # toolkit's occupancy calculator, for the top-k kernel's configurations (bitmaps up to the opt-in limit).
    check_occupancy(tmp_path, "topk_kd/topk_kd_launch.h", [H100, A100], OCC_BODY)
