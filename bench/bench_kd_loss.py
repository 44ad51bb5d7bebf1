"""KD loss: fastkd vs the eager reference vs torch.compile(reference) (and Liger-Kernel on CUDA),
side by side in one process.

    python -m bench.bench_kd_loss [--device cpu|cuda] [--quick] [--out bench/results/kd_loss_cpu.csv]

The eager reference is what users write today (fastkd.reference.textbook_kd_loss):
F.kl_div(F.log_softmax(s / T), F.softmax(t / T), reduction="batchmean") * T^2 (+ cross-entropy).
Modes: fwd (no grad), fwd+bwd (loss and loss.backward()), bwd (loss.backward() alone: each call gets
a fresh graph from a forward in the untimed setup; its peak memory is what backward adds above what the
forward left). fastkd computes the gradient in its forward kernel when the logits require grad, so its
bwd is only the hand-over of that gradient: neither GB/s nor a speedup ratio is given for bwd, whose
work differs between providers (compare fwd+bwd for the whole).

GB/s counts one read of both logits (and one write of the student gradient for fwd+bwd); the copy
ceiling (read + write of a 512 MiB buffer) is measured in the same run. On the CPU the shapes sweep the
vocabulary at 1024 rows (8192, 32000, 128256) after a batch of 4096 rows at 32000 (where the
cross-entropy mix kl+ce is measured too, in fp32).

``--causal S``: the logits are the causal shift ``logits[:, :-1]`` of ``(rows / S, S + 1, V)`` tensors, the view
every LM loss takes (strided: its rows come in blocks of S); fastkd reads it in place, the textbook loss
flattens it (a copy of each), as users write it; ``fastkd_copied`` is fastkd on ``.contiguous()`` copies of the
views (what it did before it read them in place).
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

CPU_SHAPES = [(4096, 32000), (1024, 8192), (1024, 32000), (1024, 128256)]
CUDA_SHAPES = [(8192, 128256), (16384, 131072)]
QUICK_SHAPES = [(64, 512), (64, 2048)]
MODES = ("fwd", "bwd", "fwd+bwd")
TEMPERATURE = 2.0


def _liger():
    """Liger-Kernel's KL divergence and JSD losses, when importable (CUDA only)."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss  # noqa: PLC0415
    except Exception as exc:  # not installed, or no Triton: said, not hidden
        print(f"# Liger-Kernel not used: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None
    kl = LigerKLDIVLoss(reduction="batchmean")
    jsd = LigerJSD(beta=0.0)  # beta = 0 is forward KL in Liger's convention too

    def liger_kl(s, t, labels, hard_weight):
        T = TEMPERATURE
        loss = kl(torch.log_softmax(s.float() / T, -1), torch.softmax(t.float() / T, -1)) * T * T
        if hard_weight:
            loss = loss + hard_weight * torch.nn.functional.cross_entropy(s, labels)
        return loss

    def liger_jsd(s, t, labels, hard_weight):
        T = TEMPERATURE
        # LigerJSD takes log-probabilities of a flattened (BT, V) batch.
        return jsd(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)) * T * T

    return {"liger_kl": liger_kl, "liger_jsd_beta0": liger_jsd}


def providers(device: torch.device) -> dict:
    def fastkd_fn(s, t, labels, hard_weight):
        return fastkd.kd_loss(s, t, labels, temperature=TEMPERATURE, hard_weight=hard_weight)

    def eager(s, t, labels, hard_weight):
        return reference.textbook_kd_loss(s, t, labels, temperature=TEMPERATURE, hard_weight=hard_weight)

    # One compiled graph per shape, dtype and grad mode: raise dynamo's recompile limit (8) so that no
    # case silently falls back to eager.
    import torch._dynamo  # noqa: PLC0415

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    compiled = torch.compile(reference.textbook_kd_loss, dynamic=False)

    def compile_fn(s, t, labels, hard_weight):
        return compiled(s, t, labels, temperature=TEMPERATURE, hard_weight=hard_weight)

    out = {"fastkd": fastkd_fn, "eager": eager, "compile": compile_fn}
    if device.type == "cuda":
        out.update(_liger() or {})
    return out


def _flattened(fn):
    def flat(s, t, labels, hard_weight):
        return fn(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), labels.reshape(-1), hard_weight)
    return flat


def bench_case(name, fn, s, t, labels, hard_weight, mode, device, repeats):
    def fwd():
        with torch.no_grad():
            return fn(s, t, labels, hard_weight)

    def fwd_bwd():
        fn(s, t, labels, hard_weight).backward()

    def clear_grad():  # outside the timed call: the previous gradient is not part of the next one
        s.grad = None

    graph = {}

    def forward():  # bwd's untimed setup: a fresh graph for every backward
        clear_grad()
        graph["loss"] = fn(s, t, labels, hard_weight)

    def bwd():
        graph.pop("loss").backward()

    call, setup = {"fwd": (fwd, clear_grad), "fwd+bwd": (fwd_bwd, clear_grad), "bwd": (bwd, forward)}[mode]
    # Fresh gradient memory is faulted in (huge pages) over the first calls: >= 3 warm-up calls, except
    # for the eager reference on the CPU (seconds per call; its first call is as fast as the next).
    warmup = 1 if name == "eager" and device.type == "cpu" else 3
    med, p20, p80 = common.time_call(call, device, repeats=repeats, warmup=warmup, setup=setup)
    setup()
    mem = common.peak_memory_mb(call, device)  # above what setup left (bwd: the graph); includes s.grad
    clear_grad()
    nbytes = s.nbytes + t.nbytes + (s.nbytes if mode == "fwd+bwd" else 0)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80,
            "gbps": nbytes / (med * 1e-3) / 1e9 if mode != "bwd" else None, "peak_mem_mib": mem}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="two small shapes, few repeats (a smoke run)")
    ap.add_argument("--shapes", default=None, help="rows x vocab list instead of the device's grid, e.g. 8192x128256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    ap.add_argument("--causal", type=int, default=0, metavar="S",
                    help="logits[:, :-1] views of (rows / S, S + 1, V) logits instead of contiguous (rows, V)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = common.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    modes = common.modes_arg(ap, args.modes, MODES)
    provs = common.providers_arg(providers(device), args.providers)
    if args.causal:  # the others as users write them: F.kl_div / cross_entropy on (B * S, V) rows, copies
        provs = {name: fn if name == "fastkd" else _flattened(fn) for name, fn in provs.items()}
        if "fastkd" in provs:  # what fastkd did before it read such views in place: a copy of each
            provs["fastkd_copied"] = lambda s, t, labels, hw: provs["fastkd"](s.contiguous(), t.contiguous(), labels, hw)
    info, ceiling = common.machine_header(device, fastkd.backend(device), quick=args.quick)
    out = Path(args.out) if args.out else common.RESULTS / f"kd_loss_{device.type}{'_quick' if args.quick else ''}.csv"
    rows = []
    configs = [(0.0,)] + ([(0.5,)] if not args.quick else [])
    for rows_, vocab in shapes:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            shape, lead = (rows_, vocab), (rows_,)
            if args.causal:
                if rows_ % args.causal:
                    ap.error(f"--causal {args.causal}: rows ({rows_}) must be a multiple of it")
                shape, lead = (rows_ // args.causal, args.causal + 1, vocab), (rows_ // args.causal, args.causal)

            def logits():
                x = (torch.randn(shape, device=device, generator=g) * 2).to(dtype)
                return x[:, :-1] if args.causal else x

            s, t = logits().requires_grad_(True), logits()  # (a view made a leaf: its gradient is s.grad)
            labels = torch.randint(0, vocab, lead, device=device, generator=g)
            for (hard_weight,) in configs:
                if hard_weight and (dtype != torch.float32 or (rows_, vocab) != shapes[0]):
                    continue  # the cross-entropy mix once, at the first shape in fp32
                for mode in modes:
                    def run(name, fn, repeats):
                        r = bench_case(name, fn, s, t, labels, hard_weight, mode, device, repeats)
                        return {"op": "kd_loss", "loss": "kl" + ("+ce" if hard_weight else ""),
                                "layout": f"causal {args.causal}" if args.causal else "rows",
                                "provider": name, "rows": rows_, "vocab": vocab,
                                "dtype": str(dtype).replace("torch.", ""), "mode": mode, **r,
                                "pct_copy_ceiling": 100 * r["gbps"] / ceiling if r["gbps"] else None,
                                "copy_gbps": ceiling, **info}

                    case_provs = {name: fn for name, fn in provs.items()
                                  if not (name.startswith("liger") and hard_weight and name != "liger_kl")}
                    common.run_providers(case_provs, run, what=f"{rows_}x{vocab} {dtype} {mode}", quick=args.quick,
                                         device=device, rows=rows, out=out,
                                         speedup=mode != "bwd")  # bwd: not the same work
    cols = ["loss", "layout", "provider", "rows", "vocab", "dtype", "mode", "median_ms", "p20_ms", "p80_ms", "gbps",
            "pct_copy_ceiling", "peak_mem_mib", "fastkd_speedup"]
    common.print_and_write(rows, cols, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
