"""Gradient clipping: fastkd.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (foreach=True and
foreach=False), side by side in one process.

    python -m bench.bench_clip [--device cpu|cuda] [--quick] [--out bench/results/clip_cpu.csv]

Cases: 2000 x 1000 (many small tensors), a transformer-like mix (a few hundred tensors, ~100M
elements), 10 x 10M (few large tensors), in fp32 and bf16; and a sweep, in fp32, of 8M elements
(32 MB) split into 1 to 4096 equal tensors: time against tensor count at a fixed size, i.e. the
per-tensor overhead (32 MB can stay in a large last-level cache, so the sweep's GB/s may pass the
copy ceiling, which is measured on 1 GiB). Each case clipped (coefficient < 1: a norm pass and a
scale pass) and not clipped (coefficient 1: fastkd's scale kernel returns at once, torch multiplies
by 1). GB/s counts the bytes a pass must move (norm: read; scale: read + write), next to the copy
ceiling measured in the same run. On CUDA it also counts kernel launches (torch.profiler) for 2000
tensors and measures bandwidth on 1e9 bf16 elements.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import fastkd

from . import common


def transformer_mix(total=100_000_000, d=512, vocab=32000):
    """Shapes of a decoder with embeddings, per-layer attention/MLP matrices, biases and norms."""
    shapes = [(vocab, d)]
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    n_layers = max(1, (total - vocab * d) // per_layer)
    return shapes + layer * n_layers + [(d,), (d,)]


def sweep(total: int, counts) -> dict:
    """``total`` elements split into n equal 1-D tensors, for each n in counts."""
    return {f"{n}x{total // n}": [(total // n,)] * n for n in counts}


CASES = {
    "2000x1000": [(1000,)] * 2000,
    "transformer": transformer_mix(),
    "10x10M": [(10_000_000,)] * 10,
}
SWEEP = sweep(1 << 23, (1, 8, 64, 512, 4096))
QUICK_CASES = {"200x1000": [(1000,)] * 200}
QUICK_SWEEP = sweep(1 << 16, (1, 16, 256))
SWEEP_DTYPES = (torch.float32,)

PROVIDERS = {
    "fastkd": lambda ps, m: fastkd.clip_grad_norm_(ps, m),
    "torch_foreach": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
    "torch_loop": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
}


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = torch.randn(s, generator=g, dtype=torch.float32, device=device).to(dtype) * 1e-2
        params.append(p)
    return params


def run(device, repeats, cases, info, ceiling, out):
    """cases: {name: (shapes, dtypes, is_sweep)}."""
    rows = []
    for case, (shapes, dtypes, is_sweep) in cases.items():
        for dtype in dtypes:
            params = make_params(shapes, dtype, device)
            grads = [p.grad for p in params]
            elems = sum(g.numel() for g in grads)
            nbytes = elems * grads[0].element_size()
            for clipped in (False, True):
                state = {"max_norm": 1e30}

                def setup():
                    if clipped:  # halve the gradients on every call: the coefficient is 0.5, never 1
                        state["max_norm"] = 0.5 * float(fastkd.get_total_norm(grads))

                results = {}
                for name, fn in PROVIDERS.items():
                    results[name] = common.time_call(lambda: fn(params, state["max_norm"]), device,
                                                     repeats=repeats, setup=setup)
                    if clipped:  # keep the values away from subnormals across providers
                        for g in grads:
                            g.mul_(2.0 ** (repeats + 2))  # warm-up + repeats calls, each halving
                moved = nbytes * (3 if clipped else 1)  # norm: read; scale: read + write
                for name, (med, p20, p80) in results.items():
                    rows.append({
                        "op": "clip_grad_norm_", "case": case, "sweep": is_sweep, "provider": name,
                        "tensors": len(grads),
                        "elements": elems, "dtype": str(dtype).replace("torch.", ""), "clipped": clipped,
                        "median_ms": med, "p20_ms": p20, "p80_ms": p80, "gbps": moved / (med * 1e-3) / 1e9,
                        "fastkd_speedup": med / results["fastkd"][0], "copy_gbps": ceiling, **info,
                    })
                common.write_csv(out, rows)  # after every case: a run cut short keeps what it measured
            params = grads = None  # freed before the next case allocates its own
    return rows


def cuda_extras(repeats):
    """Launch counts (torch.profiler) for 2000 tensors, and bandwidth on 1e9 bf16 elements."""
    out = {}
    params = make_params([(1000,)] * 2000, torch.float32, "cuda")
    for name, fn in PROVIDERS.items():
        fn(params, 1e-3)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(params, 1e-3)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "Memcpy" not in e.name and "Memset" not in e.name]
        out[f"launches_2000x1000_{name}"] = len(kernels)
    del params
    params = make_params([(2_000_000,)] * 500, torch.bfloat16, "cuda")  # 1e9 bf16 elements, 2 GB
    nbytes = sum(p.grad.numel() for p in params) * 2
    for name, fn in PROVIDERS.items():
        med, _, _ = common.time_call(lambda: fn(params, 1e30), torch.device("cuda"), repeats=max(3, repeats // 2))
        out[f"noclip_1e9_bf16_{name}_GBps"] = nbytes / (med * 1e-3) / 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small cases, fewer repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=None, choices=list(CASES) + list(SWEEP),
                    help="a subset of the full-size cases (default: all, or the quick ones with --quick)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = common.device(args.device)
    both = (torch.float32, torch.bfloat16)
    if args.cases:
        cases = {c: (CASES[c], both, False) if c in CASES else (SWEEP[c], SWEEP_DTYPES, True)
                 for c in args.cases}
    else:
        named, swept = (QUICK_CASES, QUICK_SWEEP) if args.quick else (CASES, SWEEP)
        cases = {**{c: (s, both, False) for c, s in named.items()},
                 **{c: (s, SWEEP_DTYPES, True) for c, s in swept.items()}}
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    repeats = args.repeats or (7 if args.quick else 21)
    out = Path(args.out) if args.out else common.RESULTS / f"clip_{device.type}{'_quick' if args.quick else ''}.csv"
    info, ceiling = common.machine_header(device, fastkd.backend(device), quick=args.quick)
    extras = cuda_extras(repeats) if device.type == "cuda" and not args.quick else {}
    rows = run(device, repeats, cases, {**info, **extras}, ceiling, out)
    common.print_table(rows, ["case", "provider", "dtype", "clipped", "median_ms", "p20_ms", "p80_ms", "gbps",
                              "fastkd_speedup"])
    for k, v in extras.items():
        print(f"# {k}: {v:.1f}" if isinstance(v, float) else f"# {k}: {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
