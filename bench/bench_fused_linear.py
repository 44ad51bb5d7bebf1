"""Fused linear + KD loss: fastkd.fused_linear_kd_loss vs the unfused paths vs the four GEMMs alone, side by side
in one process, fwd+bwd (gradients for the student's hidden states and head weight; the teacher is constant).

    python -m bench.bench_fused_linear [--device cpu|cuda] [--quick] [--rows 1024,4096,16384]
                                       [--out bench/results/fused_linear_cpu.csv]

A case is N rows of hidden states, the student's head (V, Hs) and the teacher's (V, Ht); T = 2, forward KL.
Providers:
  fastkd          fastkd.fused_linear_kd_loss(hs, ws, ht, wt, temperature=T): no (N x V) tensor
  fastkd_unfused  hs @ ws.T and ht @ wt.T materialised, then fastkd.kd_loss, autograd through the GEMMs
  eager           the same logits into fastkd.reference.textbook_kd_loss (log_softmax / softmax / kl_div)
  liger, liger_compiled
                  Liger-Kernel's LigerFusedLinearJSDLoss (beta = 0: forward KL, weight_hard_loss = 0), where
                  liger-kernel is installed (not a dependency of fastkd); its loss has no T^2 factor
  gemms           the four GEMMs every provider does (student and teacher logits, the hidden and weight
                  gradients), chunk by chunk with fastkd's default chunk size, nothing else: the bound
Columns: median / p20 / p80 time, peak memory above the inputs (bench.common.peak_memory_mb: RSS high-water mark
on the CPU, the caching allocator's peak on CUDA), the rate of the four GEMMs' work (gemm_flop) in GFLOP/s,
and the time relative to the GEMMs alone.
Cases: CPU fp32, Hs = 512, Ht = 1024, V = 32000, N in (1024, 4096, 16384); CUDA bf16, N = 8192,
H = 4096, V = 128256 (Liger's benchmark shape). Memory of the largest CPU case: at N = 2048 the unfused
path needed 750 MiB above the inputs and the eager one 1750 MiB (3 and 7 fp32 N x V tensors), so about 6 and
14 GiB at N = 16384: the grid fits in 24 GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import fastkd
from fastkd import reference
from fastkd.ops.fused_linear import default_chunk_size

from . import common

CPU_CASE = dict(rows=(1024, 4096, 16384), hs=512, ht=1024, vocab=32000, dtype=torch.float32)
CUDA_CASE = dict(rows=(8192,), hs=4096, ht=4096, vocab=128256, dtype=torch.bfloat16)
QUICK_CASE = dict(rows=(64, 128), hs=32, ht=48, vocab=512, dtype=torch.float32)
TEMPERATURE = 2.0


def gemm_flop(rows: int, hs: int, ht: int, vocab: int) -> int:
    """The four GEMMs' floating-point operations: the two logits GEMMs (2 N V H each), the hidden and the weight
    gradients of the student (2 N V Hs each)."""
    return 2 * rows * vocab * (3 * hs + ht)


def _liger(device: torch.device) -> dict:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: PLC0415 (an optional bench extra)
    except Exception as exc:  # not installed: said, not hidden
        print(f"# Liger-Kernel not used: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {}
    out = {}
    for name, compiled in (("liger", False), ("liger_compiled", True)):
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                          temperature=TEMPERATURE, compiled=compiled)

        def fn(hs, ws, ht, wt, labels, loss_fn=loss_fn):
            return loss_fn(hs, ws, ht, wt, labels)

        out[name] = fn
    return out


def providers(device: torch.device) -> dict:
    """name -> fn(hs, ws, ht, wt, labels) returning the loss (the GEMM bound returns None: no loss)."""
    def fused(hs, ws, ht, wt, labels):
        return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, temperature=TEMPERATURE)

    def unfused(hs, ws, ht, wt, labels):
        with torch.no_grad():
            t = ht @ wt.T
        return fastkd.kd_loss(hs @ ws.T, t, temperature=TEMPERATURE)

    def eager(hs, ws, ht, wt, labels):
        with torch.no_grad():
            t = ht @ wt.T
        return reference.textbook_kd_loss(hs @ ws.T, t, temperature=TEMPERATURE)

    return {"fastkd": fused, "fastkd_unfused": unfused, "eager": eager, **_liger(device)}


def gemms_alone(hs, ws, ht, wt):
    """The four GEMMs of the fused op, chunk by chunk into reused buffers, with no loss maths: the logits with fp32
    output (the inputs' dtype where the device has no such GEMM: the CPU), the gradients' GEMMs in the inputs'
    dtype (the logits' buffer stands for their gradient)."""
    rows, vocab = hs.shape[0], ws.shape[0]
    chunk = min(rows, default_chunk_size(vocab, hs.shape[1], hs.device))
    out_dtype = torch.float32 if hs.device.type == "cuda" else hs.dtype
    s = torch.empty(chunk, vocab, dtype=out_dtype, device=hs.device)
    t = torch.empty(chunk, vocab, dtype=out_dtype, device=hs.device)
    g = torch.empty(chunk, vocab, dtype=hs.dtype, device=hs.device)
    gw, gh = torch.zeros_like(ws), torch.empty_like(hs)
    kw = {"out_dtype": out_dtype} if out_dtype != hs.dtype else {}
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        h = hs[r0:r0 + n]
        torch.mm(h, ws.T, out=s[:n], **kw)
        torch.mm(ht[r0:r0 + n], wt.T, out=t[:n], **kw)
        torch.mm(g[:n], ws, out=gh[r0:r0 + n])
        gw.addmm_(g[:n].T, h)
    return gh, gw


def bench_case(name, fn, inputs, device, repeats):
    hs, ws, ht, wt, labels = inputs

    def clear():
        hs.grad = ws.grad = None

    if name == "gemms":
        def call():
            with torch.no_grad():
                gemms_alone(hs, ws, ht, wt)
    else:
        def call():
            fn(hs, ws, ht, wt, labels).backward()

    slow = device.type == "cpu" and name not in ("fastkd", "gemms")
    med, p20, p80 = common.time_call(call, device, repeats=repeats, warmup=1 if slow else 2, setup=clear)
    clear()
    mem = common.peak_memory_mb(call, device)
    clear()
    return med, p20, p80, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny cases, few repeats (a smoke run)")
    ap.add_argument("--rows", default=None, help="comma-separated N instead of the device's")
    ap.add_argument("--providers", default=None, help="comma-separated subset (gemms is the bound)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = common.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    case = QUICK_CASE if args.quick else (CUDA_CASE if device.type == "cuda" else CPU_CASE)
    rows_list = tuple(int(r) for r in args.rows.split(",")) if args.rows else case["rows"]
    provs = {**providers(device), "gemms": None}
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers.split(",")}
    info = common.machine_info(device)
    print(f"# {info['cpu']} x{info['cores']} ({info['threads']} threads) {info['gpu']} torch {info['torch']} "
          f"git {info['git']}; fastkd backend: {fastkd.backend(device)}", flush=True)
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else common.RESULTS / f"fused_linear_{device.type}{suffix}.csv"
    hs_, ht_, vocab, dtype = case["hs"], case["ht"], case["vocab"], case["dtype"]
    results = []
    for n in rows_list:
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, scale):
            return (torch.randn(shape, device=device, generator=g) * scale).to(dtype)

        hs = rnd(n, hs_, scale=1.0).requires_grad_(True)
        ws = rnd(vocab, hs_, scale=hs_ ** -0.5).requires_grad_(True)
        ht, wt = rnd(n, ht_, scale=1.0), rnd(vocab, ht_, scale=ht_ ** -0.5)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        flop = gemm_flop(n, hs_, ht_, vocab)
        case_rows = []
        for name, fn in provs.items():
            repeats = 3 if args.quick or device.type == "cpu" else 7
            try:
                med, p20, p80, mem = bench_case(name, fn, (hs, ws, ht, wt, labels), device, repeats)
            except Exception as exc:  # a provider that cannot run this case (e.g. out of memory) is reported
                print(f"  {name} failed on N={n}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            case_rows.append({"op": "fused_linear_kd_loss", "provider": name, "rows": n, "hidden_student": hs_,
                              "hidden_teacher": ht_, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
                              "mode": "fwd+bwd", "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                              "gemm_gflops": flop / (med * 1e-3) / 1e9, "peak_mem_mib": mem, **info})
        bound = next((r["median_ms"] for r in case_rows if r["provider"] == "gemms"), None)
        for r in case_rows:
            r["vs_gemms"] = r["median_ms"] / bound if bound else None
        results += case_rows
        common.write_csv(out, results)  # after every case: a run cut short keeps what it measured
    cols = ["provider", "rows", "vocab", "dtype", "median_ms", "p20_ms", "p80_ms", "gemm_gflops", "peak_mem_mib",
            "vs_gemms"]
    common.print_table(results, cols)
    common.write_csv(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
