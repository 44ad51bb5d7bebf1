"""Top-k KD loss: fastkd.topk_kd_loss vs the dense fastkd.kd_loss on the same student vs the eager top-k
textbook loss vs torch.compile of it, side by side in one process.

    python -m bench.bench_topk [--device cpu|cuda] [--quick] [--out bench/results/topk_kd_loss_cpu.csv]

The teacher of a case is one [rows, V] logit tensor: its top-k (torch.topk, values in the student's dtype,
int64 indices) feeds the top-k providers, the whole tensor the dense one. Providers:
  fastkd        fastkd.topk_kd_loss(student, values, indices, temperature=T)
  fastkd_dense  fastkd.kd_loss(student, teacher, temperature=T): the dense loss the top-k one replaces
  eager         fastkd.reference.textbook_topk_kd_loss: log_softmax over V, gathered at the indices, against
                the softmax of the values (what DistillKit- and TRL-style trainers compute)
  compile       torch.compile of that function
Modes: fwd (no grad) and fwd+bwd (the loss and loss.backward()). GB/s counts one read of every input the
provider takes (student and values + indices; student and teacher for the dense loss) and, for fwd+bwd,
one write of the student gradient; the copy ceiling (read + write of a 512 MiB buffer) is measured in the
same run. Peak memory is what a call adds above its inputs (bench.common.peak_memory_mb).
Cases: on the CPU (4096, 32000) fp32, K = 64; on CUDA (8192, 128256) bf16, K = 64 and 256; T = 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import fastkd
from fastkd import reference

from . import common

CPU_CASES = [((4096, 32000), (64,))]
CUDA_CASES = [((8192, 128256), (64, 256))]
QUICK_CASES = [((64, 2048), (64,))]
MODES = ("fwd", "fwd+bwd")
TEMPERATURE = 2.0


def providers() -> dict:
    """name -> (fn(student, values, indices, teacher), dense: whether it reads the dense teacher)."""
    def fastkd_fn(s, v, i, t):
        return fastkd.topk_kd_loss(s, v, i, temperature=TEMPERATURE)

    def dense(s, v, i, t):
        return fastkd.kd_loss(s, t, temperature=TEMPERATURE)

    def eager(s, v, i, t):
        return reference.textbook_topk_kd_loss(s, v, i, temperature=TEMPERATURE)

    # One compiled graph per shape, dtype and grad mode: raise dynamo's recompile limit (8) so that no case
    # silently falls back to eager.
    import torch._dynamo  # noqa: PLC0415

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    compiled = torch.compile(reference.textbook_topk_kd_loss, dynamic=False)

    def compile_fn(s, v, i, t):
        return compiled(s, v, i, temperature=TEMPERATURE)

    return {"fastkd": (fastkd_fn, False), "fastkd_dense": (dense, True), "eager": (eager, False),
            "compile": (compile_fn, False)}


def bench_case(name, fn, inputs, mode, device, repeats):
    s = inputs[0]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        fn(*inputs).backward()

    def clear_grad():  # outside the timed call: the previous gradient is not part of the next one
        s.grad = None

    call = fwd if mode == "fwd" else fwd_bwd
    # Fresh gradient memory is faulted in (huge pages) over the first calls: >= 3 warm-up calls, except for
    # the eager loss on the CPU (seconds per call; its first call is as fast as the next).
    warmup = 1 if name == "eager" and device.type == "cpu" else 3
    med, p20, p80 = common.time_call(call, device, repeats=repeats, warmup=warmup, setup=clear_grad)
    clear_grad()
    mem = common.peak_memory_mb(call, device)  # includes s.grad for fwd+bwd
    clear_grad()
    return med, p20, p80, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small case, few repeats (a smoke run)")
    ap.add_argument("--shapes", default=None, help="rows x vocab list instead of the device's cases, e.g. 8192x128256")
    ap.add_argument("--ks", default=None, help="top-k sizes for --shapes (default 64)")
    ap.add_argument("--dtypes", default=None, help="student dtypes (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = common.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    cases = QUICK_CASES if args.quick else (CUDA_CASES if device.type == "cuda" else CPU_CASES)
    if args.shapes:
        ks = tuple(int(k) for k in (args.ks or "64").split(","))
        cases = [(tuple(int(x) for x in sh.split("x")), ks) for sh in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in
              (args.dtypes or ("bfloat16" if device.type == "cuda" else "float32")).split(",")]
    modes = common.modes_arg(ap, args.modes, MODES)
    provs = common.providers_arg(providers(), args.providers)
    info, ceiling = common.machine_header(device, fastkd.backend(device), quick=args.quick)
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else common.RESULTS / f"topk_kd_loss_{device.type}{suffix}.csv"
    rows = []
    for (rows_, vocab), ks in cases:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            s = (torch.randn(rows_, vocab, device=device, generator=g) * 2).to(dtype).requires_grad_(True)
            t = (torch.randn(rows_, vocab, device=device, generator=g) * 2).to(dtype)
            for k in ks:
                v, i = t.topk(k, dim=-1)
                for mode in modes:
                    def run(name, prov, repeats):
                        fn, reads_dense = prov
                        med, p20, p80, mem = bench_case(name, fn, (s, v, i, t), mode, device, repeats)
                        nbytes = s.nbytes + (t.nbytes if reads_dense else v.nbytes + i.nbytes)
                        nbytes += s.nbytes if mode == "fwd+bwd" else 0
                        gbps = nbytes / (med * 1e-3) / 1e9
                        return {"op": "topk_kd_loss", "provider": name, "rows": rows_, "vocab": vocab, "k": k,
                                "dtype": str(dtype).replace("torch.", ""), "mode": mode, "median_ms": med,
                                "p20_ms": p20, "p80_ms": p80, "gbps": gbps,
                                "pct_copy_ceiling": 100 * gbps / ceiling, "peak_mem_mib": mem,
                                "copy_gbps": ceiling, **info}

                    common.run_providers(provs, run, what=f"{rows_}x{vocab} k={k} {dtype} {mode}", quick=args.quick,
                                         device=device, rows=rows, out=out)
    cols = ["provider", "rows", "vocab", "k", "dtype", "mode", "median_ms", "p20_ms", "p80_ms", "gbps",
            "pct_copy_ceiling", "peak_mem_mib", "fastkd_speedup"]
    common.print_and_write(rows, cols, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
