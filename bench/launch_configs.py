"""The CUDA KD-loss launch configurations of the headline and boundary sizes, and their occupancy.

    python -m bench.launch_configs [--device cuda|cpu]

On a GPU: each configuration as the launcher chooses it on this device (threads, dynamic shared
memory, the opt-in, the blocks per SM it was budgeted for), fastkd's count of resident blocks per SM
(csrc/kd_loss/kd_loss_launch.h) and cudaOccupancyMaxActiveBlocksPerMultiprocessor's. Exit status 1 when the
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}: fastkd's blocks_per_sm against the runtime's occupancy")
        rows = rows_cuda()
    else:
        print("# fastkd's launch arithmetic for the H200's and the A100's properties (no GPU)")
        rows = rows_cpu()
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLS}
    print(" ".join(c.rjust(widths[c]) for c in COLS))
    bad = []
    for r in rows:
        print(" ".join(str(r[c]).rjust(widths[c]) for c in COLS), flush=True)
        if args.device == "cuda" and (r["occupancy"] != r["blocks_per_sm"] or r["occupancy"] < r["target_blocks_per_sm"]):
            bad.append(r)
    for r in bad:
        print(f"MISMATCH: {r['student']}/{r['teacher']} V={r['vocab']} {r['divergence']}: occupancy {r['occupancy']}, "
              f"fastkd {r['blocks_per_sm']}, budgeted {r['target_blocks_per_sm']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
