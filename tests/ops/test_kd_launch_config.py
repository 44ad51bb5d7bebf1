"""The CUDA KD-loss kernel's launch configuration (csrc/kd_loss/kd_loss_launch.h) as arithmetic on device
properties, with the values of an H100/H200 and an A100: no GPU needed.

On a GPU, test_kd_loss_cuda.py checks the same configurations against the runtime
(cudaOccupancyMaxActiveBlocksPerMultiprocessor) and runs them.
"""

from __future__ import annotations

import pytest
from conftest import check_occupancy

from bench.launch_configs import A100, H200
from fastkd import _extension

pytestmark = pytest.mark.skipif(_extension.EXT is None, reason="needs the compiled extension")

# cudaDeviceProp values (sharedMemPerBlock, ...Optin, ...PerMultiprocessor, reservedSharedMemPerBlock, ...):
# bench/launch_configs.py's H200 and A100.
H100 = H200  # the same GH100 chip: only the memory differs
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


OCC_BODY = r"""
    const int elems[] = {4, 8, 4};
    const long pack_bytes[] = {32, 32, 24};
    for (int regs : {96, 112, 128, 136}) for (int e = 0; e < 3; ++e) for (long v = 1; v < 300000; v += 13) {
      const KdLaunchConfig c = kd_launch_config(d, {1056, regs}, v, elems[e], pack_bytes[e]);
      const KdLaunchConfig w = c.warp_kernel ? kd_launch_config(d, {0, regs}, v, elems[e], pack_bytes[e]) : c;
      tally(d, regs, v, -1, w.blocks_per_sm,
            occ_blocks(d, 512, regs, c.warp_kernel ? 0 : 1056, c.opt_in,
                       c.opt_in ? c.max_dyn_smem : d.smem_per_block - 1056, w.threads, w.dyn_smem));
    }
"""


def test_blocks_per_sm_matches_cuda_occupancy_h(tmp_path):
    # fastkd's count of resident blocks against the toolkit's own occupancy calculator (the header
    # behind cudaOccupancyMaxActiveBlocksPerMultiprocessor's rules), over every configuration.
    check_occupancy(tmp_path, "kd_loss/kd_loss_launch.h", [H100, A100], OCC_BODY)
