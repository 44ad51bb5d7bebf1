"""Gradient clipping: fastkd.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (foreach=True and
foreach=False), side by side in one process.

    python bench/bench_clip.py            # CPU (all cores torch sees), CUDA too when a GPU is visible
    python bench/bench_clip.py --quick    # fewer repeats

Cases: 2000 x 1000 (many small tensors), a transformer-like mix (a few hundred tensors, ~100M
elements), 10 x 10M (few large tensors); fp32 and bf16; "clip" (coefficient < 1: a norm pass and a
scale pass) and "noclip" (coefficient 1: fastkd's scale kernel returns at once, torch multiplies by 1).
Median and 20th/80th percentiles over repeats (time.perf_counter; torch.cuda.synchronize() before
each reading on CUDA). GB/s counts the bytes a pass must move (norm: read; scale: read + write), next
to a copy ceiling (read + write of a 400 MB buffer) measured in the same run.
Writes bench/results/clip_cpu.csv (and clip_cuda.csv on a GPU) with the machine, torch and git sha.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fastkd  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def transformer_mix(total=100_000_000, d=512, vocab=32000):
    """Shapes of a decoder with embeddings, per-layer attention/MLP matrices, biases and norms."""
    shapes = [(vocab, d)]
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    n_layers = max(1, (total - vocab * d) // per_layer)
    shapes += layer * n_layers
    shapes += [(d,), (d,)]
    return shapes


CASES = {
    "2000x1000": [(1000,)] * 2000,
    "transformer": transformer_mix(),
    "10x10M": [(10_000_000,)] * 10,
}


def machine_info(device):
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        sha += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    info = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_sha": sha,
        "fastkd_backend": fastkd.backend(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = torch.randn(s, generator=g, dtype=torch.float32, device=device).to(dtype) * 1e-2
        params.append(p)
    return params


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, setup, repeats, device, warmup=2):
    for _ in range(warmup):
        setup()
        fn()
    times = []
    for _ in range(repeats):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times) * 1e3, q[0] * 1e3, q[3] * 1e3


def copy_ceiling(device, repeats):
    a = torch.ones(100_000_000, device=device)
    b = torch.empty_like(a)
    med, _, _ = time_it(lambda: b.copy_(a), lambda: None, repeats, device)
    return 2 * a.numel() * 4 / (med * 1e-3) / 1e9


PROVIDERS = {
    "fastkd": lambda ps, m: fastkd.clip_grad_norm_(ps, m),
    "torch_foreach": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
    "torch_loop": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
}


def run(device, repeats, cases):
    rows = []
    for case in cases:
        shapes = CASES[case]
        for dtype in (torch.float32, torch.bfloat16):
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
                    med, p20, p80 = time_it(lambda: fn(params, state["max_norm"]), setup, repeats, device)
                    results[name] = (med, p20, p80)
                    if clipped:  # keep the values away from subnormals across providers
                        for g in grads:
                            g.mul_(2.0 ** (repeats + 2))  # warm-up + repeats calls, each halving
                moved = nbytes * (3 if clipped else 1)  # norm: read; scale: read + write
                for name, (med, p20, p80) in results.items():
                    rows.append({
                        "device": device, "case": case, "dtype": str(dtype).replace("torch.", ""),
                        "clipped": clipped, "provider": name, "tensors": len(grads), "elements": elems,
                        "median_ms": round(med, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3),
                        "gbps": round(moved / (med * 1e-3) / 1e9, 1),
                        "speedup_vs_foreach": round(results["torch_foreach"][0] / med, 2),
                    })
            del params, grads
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
    grads = [p.grad for p in params]
    nbytes = sum(g.numel() for g in grads) * 2
    for name, fn in PROVIDERS.items():
        med, _, _ = time_it(lambda: fn(params, 1e30), lambda: None, max(3, repeats // 2), "cuda")
        out[f"noclip_1e9_bf16_{name}_GBps"] = round(nbytes / (med * 1e-3) / 1e9, 1)
    return out


def print_table(rows, info, ceiling):
    print(f"# {info['cpu_model']} ({info['cores']} cores, {info['threads']} threads) "
          f"{info.get('gpu', '')} torch {info['torch']} fastkd@{info['git_sha']} backend={info['fastkd_backend']}")
    print(f"# copy ceiling: {ceiling:.1f} GB/s (read + write)")
    hdr = f"{'case':12} {'dtype':9} {'clip':5} {'provider':14} {'median ms':>10} {'p20':>9} {'p80':>9} {'GB/s':>7} {'vs foreach':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['case']:12} {r['dtype']:9} {str(r['clipped']):5} {r['provider']:14} {r['median_ms']:10.3f} "
              f"{r['p20_ms']:9.3f} {r['p80_ms']:9.3f} {r['gbps']:7.1f} {r['speedup_vs_foreach']:9.2f}x")


def write_csv(rows, info, ceiling, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) + ["copy_ceiling_gbps"] + list(info)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "copy_ceiling_gbps": round(ceiling, 1), **info})
    print(f"# wrote {path.relative_to(ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-cuda", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    repeats = args.repeats or (7 if args.quick else 21)

    info = machine_info("cpu")
    ceiling = copy_ceiling("cpu", repeats)
    rows = run("cpu", repeats, args.cases)
    print_table(rows, info, ceiling)
    write_csv(rows, info, ceiling, RESULTS / "clip_cpu.csv")

    if torch.cuda.is_available() and not args.no_cuda:
        info = machine_info("cuda")
        ceiling = copy_ceiling("cuda", repeats)
        rows = run("cuda", repeats, args.cases)
        extras = cuda_extras(repeats)
        print_table(rows, info, ceiling)
        for k, v in extras.items():
            print(f"# {k}: {v}")
        write_csv(rows, {**info, **extras}, ceiling, RESULTS / "clip_cuda.csv")


if __name__ == "__main__":
    main()
