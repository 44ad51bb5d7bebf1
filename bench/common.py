"""Shared benchmark harness: timing, peak memory, the copy ceiling, machine info and CSV output.

Timings are medians with 20th/80th percentiles over repeats after warm-up; on CUDA every timed call
is synchronised before the timer is read. Peak memory is what a call adds above its inputs: on CUDA
torch.cuda.max_memory_allocated; on the CPU the process's resident high-water mark (VmHWM, reset
through /proc/self/clear_refs), since torch keeps no CPU allocation statistics and large CPU blocks
go straight back to the OS when freed.
"""

from __future__ import annotations

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

RESULTS = Path(__file__).resolve().parent / "results"


def device(name: str) -> torch.device:
    """The torch.device a benchmark was asked for; a clear exit where it is not there (no GPU)."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench: --device {name} asked for, but torch {torch.__version__} sees no CUDA GPU "
                         f"(torch.version.cuda = {torch.version.cuda}); run with --device cpu")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0, setup=None):
    """Median, p20 and p80 of fn()'s wall time in milliseconds (setup(), if given, runs untimed before
    every call)."""
    setup = setup or (lambda: None)
    for _ in range(warmup):
        setup()
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_time and len(times) < 10 * repeats):
        setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_now(device: torch.device, *, reset_peak: bool = False) -> float | None:
    """Memory in use now, in MiB (CUDA: allocated; CPU: resident), the peak counter reset first when
    ``reset_peak``; None where unmeasurable."""
    if device.type == "cuda":
        sync(device)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark
        return _rss_kib("VmRSS") / 1024
    except OSError:
        return None


def memory_peak_since(device: torch.device, base: float | None) -> float | None:
    """The peak since ``memory_now(device, reset_peak=True)`` returned ``base``, above it, in MiB."""
    if base is None:
        return None
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    try:
        return max(0.0, _rss_kib("VmHWM") / 1024 - base)
    except OSError:
        return None


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Memory fn() needs above what is allocated when it starts, in MiB (None where unmeasurable). On the
    CPU, fastkd's cached gradient buffers are freed first, so a buffer fn() reuses counts."""
    if device.type == "cpu":
        import fastkd  # noqa: PLC0415

        fastkd.empty_cache()  # fastkd's cached CPU gradient buffers count as memory the call needs
    base = memory_now(device, reset_peak=True)
    fn()
    return memory_peak_since(device, base)


def copy_ceiling_gbps(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Bandwidth of a plain tensor copy (bytes read + bytes written per second), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med, _, _ = time_call(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    return 2 * nbytes / (med * 1e-3) / 1e9


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                               timeout=10).stdout.strip()  # results being written do not make the code dirty
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fastkd_kernel(device: torch.device) -> str:
    """What serves fastkd's ops here: the compiled kernels (on the CPU, the KD kernel's instruction set)
    or the pure-PyTorch reference."""
    import fastkd  # noqa: PLC0415

    kernel = fastkd.kernel_info()[device.type]
    return kernel if kernel in ("reference", "cuda") else f"cpu-{kernel}"


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "fastkd_kernel": fastkd_kernel(device),
        "git": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def machine_header(device: torch.device, backend: str, *, quick: bool) -> tuple[dict, float]:
    """machine_info and the copy ceiling (measured on 64 MiB with quick, else 512 MiB) of a benchmark run, printed
    as its output's header line with fastkd's backend."""
    info = machine_info(device)
    ceiling = copy_ceiling_gbps(device, 1 << 26 if quick else 1 << 29)
    print(f"# {info['cpu']} x{info['cores']} ({info['threads']} threads) {info['gpu']} torch {info['torch']} "
          f"git {info['git']}; fastkd backend: {backend}; copy ceiling {ceiling:.1f} GB/s", flush=True)
    return info, ceiling


def modes_arg(ap, value: str, modes: tuple[str, ...]) -> list[str]:
    """A benchmark's --modes (comma-separated, each one of modes; else an argparse error)."""
    chosen = value.split(",")
    if set(chosen) - set(modes):
        ap.error(f"--modes: unknown {sorted(set(chosen) - set(modes))}; choose from {modes}")
    return chosen


def providers_arg(provs: dict, value: str | None) -> dict:
    """The providers a benchmark's --providers keeps (comma-separated names; all without it)."""
    return provs if not value else {k: v for k, v in provs.items() if k in value.split(",")}


def run_providers(provs: dict, run, *, what: str, quick: bool, device: torch.device, rows: list[dict], out: Path,
                  speedup: bool = True) -> None:
    """One benchmark case for every provider: run(name, provs[name], repeats) measures it and returns its CSV
    row (with median_ms); a provider that cannot run the case (it raises) is reported on stderr, naming the
    case (`what`), and left out. Every row gets fastkd_speedup, its median over fastkd's (None without a
    fastkd row, or with speedup false: not the same work); the rows are appended to `rows` and the CSV `out`
    is rewritten (after every case: a run cut short keeps what it measured)."""
    results = {}
    for name, prov in provs.items():
        repeats = 3 if quick else (3 if name == "eager" and device.type == "cpu" else 7)
        try:
            results[name] = run(name, prov, repeats)
        except Exception as exc:  # a provider that cannot run this case is reported, not hidden
            print(f"  {name} failed on {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
    base = results.get("fastkd") if speedup else None
    for row in results.values():
        row["fastkd_speedup"] = row["median_ms"] / base["median_ms"] if base else None
    rows.extend(results.values())
    write_csv(out, rows)


def scenario_main(argv, description: str, configs: dict, stem: str, run, cols: list[str]) -> int:
    """main() of a whole-step benchmark (bench_step, bench_hf_step): --device, --quick (configs["quick"], else
    configs[device type]), --repeats, --out (default RESULTS/<stem>_<device>[_quick].csv); prints the header,
    runs run(cfg, device, repeats, on_row) (on_row(rows) rewrites the CSV after each row: a run cut short
    keeps what it measured), then the table of cols and the CSV."""
    import argparse  # noqa: PLC0415

    import fastkd  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny model and vocabulary (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = configs["quick" if args.quick else dev.type]
    out = Path(args.out) if args.out else RESULTS / f"{stem}_{dev.type}{'_quick' if args.quick else ''}.csv"
    info = machine_info(dev)
    print(f"# {info['cpu']} x{info['cores']} ({info['threads']} threads) {info['gpu']} torch {info['torch']} "
          f"git {info['git']}; fastkd backend: {fastkd.backend(dev)}; {cfg}", flush=True)
    rows = [{**r, **info} for r in run(cfg, dev, args.repeats or cfg.repeats,
                                       on_row=lambda rs: write_csv(out, [{**r, **info} for r in rs]))]
    print_and_write(rows, cols, out)
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def print_and_write(rows: list[dict], cols: list[str], out: Path) -> None:
    """The end of a benchmark run: its table (the columns cols) printed, all of its rows written to the CSV
    out, and where."""
    print_table(rows, cols)
    write_csv(out, rows)
    print(f"wrote {out}")


def print_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in table]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
