"""The CUDA KD-loss and top-k KD-loss launch configurations of the headline and boundary sizes, and their
occupancy.

    python -m bench.launch_configs [--device cuda|cpu]

On a GPU: each configuration as the launcher chooses it on this device (threads, dynamic shared
memory, the opt-in, the blocks per SM it was budgeted for), fastkd's count of resident blocks per SM
(csrc/kd_loss/kd_loss_launch.h, csrc/topk_kd/topk_kd_launch.h) and
cudaOccupancyMaxActiveBlocksPerMultiprocessor's; for the top-k kernel also its duplicate check (bitmap
or pairwise) and local memory (spills). Exit status 1 when the
runtime's count differs from fastkd's or falls short of the budget. --device cpu prints fastkd's
arithmetic for the H200's and the A100's properties (no GPU needed: the GPU check's dry run).
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastkd import _extension

CASES = [("bfloat16", "bfloat16", 128256), ("bfloat16", "bfloat16", 131072), ("bfloat16", "bfloat16", 32000),
         ("bfloat16", "bfloat16", 32768), ("float32", "float32", 16384), ("bfloat16", "bfloat16", 50257),
         ("float32", "float32", 6100), ("bfloat16", "bfloat16", 12200), ("bfloat16", "float32", 8100),
         ("float32", "float32", 1271)]
H200 = dict(major=9, smem_per_block=49152, smem_per_block_optin=232448, smem_per_sm=233472,
            reserved_smem_per_block=1024, sm_count=132, l2_bytes=50 << 20, regs_per_sm=65536,
            max_threads_per_sm=2048, max_blocks_per_sm=32)
A100 = dict(major=8, smem_per_block=49152, smem_per_block_optin=166912, smem_per_sm=167936,
            reserved_smem_per_block=1024, sm_count=108, l2_bytes=40 << 20, regs_per_sm=65536,
            max_threads_per_sm=2048, max_blocks_per_sm=32)
# (student dtype, vocab, k): warp and block kernels, pairwise and bitmap checks, the bitmap's opt-in.
TOPK_CASES = [("bfloat16", 128256, 64), ("bfloat16", 128256, 256), ("bfloat16", 32000, 64), ("float32", 262144, 256),
              ("bfloat16", 400000, 4096), ("bfloat16", 2048, 64), ("float32", 1000, 4)]
SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
COLS = ["student", "teacher", "vocab", "divergence", "threads", "dyn_smem", "opt_in", "target_blocks_per_sm",
        "blocks_per_sm", "occupancy", "regs", "static_smem"]


def rows_cuda():
    out = []
    for sd, td, vocab in CASES:
        for div in ("kl", "jsd"):
            out.append({"student": sd, "teacher": td, "vocab": vocab, "divergence": div,
                        **_extension.kd_cuda_launch_info(sd, td, div, vocab)})
    return out


def rows_cpu():
    out = []
    for name, dev in (("h200", H200), ("a100", A100)):
        for sd, td, vocab in CASES:
            c = _extension.kd_cuda_launch_config(dev, vocab, SIZE[sd], SIZE[td], 1056, 128)
            out.append({"student": sd, "teacher": td, "vocab": vocab, "divergence": f"({name}, 128 regs)", **c,
                        "occupancy": "", "regs": 128, "static_smem": 1056})
    return out


TOPK_COLS = ["student", "vocab", "k", "device", "warp_kernel", "threads", "bitmap", "dyn_smem", "opt_in",
             "blocks_per_sm", "occupancy", "regs", "static_smem", "local_bytes"]


def topk_rows_cuda():
    return [{"student": sd, "vocab": vocab, "k": k, "device": "this GPU", **_extension.topk_cuda_launch_info(sd, vocab, k)}
            for sd, vocab, k in TOPK_CASES]


def topk_rows_cpu():
    out = []
    for name, dev in (("h200", H200), ("a100", A100)):
        for sd, vocab, k in TOPK_CASES:
            warp = vocab <= 2048  # ptxas on sm_90: the warp kernel has no static shared memory, 79 registers
            static, regs = (0, 79) if warp else (1200, 64)
            c = _extension.topk_cuda_launch_config(dev, vocab, k, SIZE[sd], static, regs)
            out.append({"student": sd, "vocab": vocab, "k": k, "device": name, **c, "occupancy": "", "regs": regs,
                        "static_smem": static, "local_bytes": ""})
    return out


def print_rows(rows, cols):
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print(" ".join(str(r[c]).rjust(widths[c]) for c in cols), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}: fastkd's blocks_per_sm against the runtime's occupancy")
        rows, topk = rows_cuda(), topk_rows_cuda()
    else:
        print("# fastkd's launch arithmetic for the H200's and the A100's properties (no GPU)")
        rows, topk = rows_cpu(), topk_rows_cpu()
    print_rows(rows, COLS)
    print("# top-k KD loss")
    print_rows(topk, TOPK_COLS)
    bad = []
    if args.device == "cuda":
        bad = [r for r in rows if r["occupancy"] != r["blocks_per_sm"] or r["occupancy"] < r["target_blocks_per_sm"]]
        bad += [r for r in topk if r["occupancy"] != r["blocks_per_sm"]]
    for r in bad:
        what = f"V={r['vocab']} {r['divergence']}" if "divergence" in r else f"V={r['vocab']} k={r['k']}"
        budget = f", budgeted {r['target_blocks_per_sm']}" if "target_blocks_per_sm" in r else ""
        print(f"MISMATCH: {r['student']} {what}: occupancy {r['occupancy']}, fastkd {r['blocks_per_sm']}{budget}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
