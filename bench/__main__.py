"""The benchmark grid: every registered benchmark in turn (bench/registry.py), then the report.

    python -m bench                       # the full grid on the default device (`make bench`)
    python -m bench --quick               # tiny shapes, seconds: a smoke run (docs left alone)
    python -m bench --only kd,step --device cuda --out-dir /tmp/gpu --no-docs

Writes one CSV per benchmark, {stem}_{device}[_quick].csv in --out-dir (default bench/results; the
stems are the registry's: kd_loss, topk_kd_loss, clip, step, cache), one row per provider x case (shape
or tensor set) x dtype x mode with the machine columns; then runs bench.report on them: the plots beside
the CSVs, and the Markdown tables into docs/benchmarks.md's generated blocks and the README's headline
table (a full run into bench/results) or else into report[_quick].md in --out-dir. The grids themselves
live in the registered modules (bench_kd_loss, bench_topk, bench_clip, bench_step, bench_cache); this only
runs them. A benchmark that fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from . import common, registry, report

NAMES = [b.name for b in registry.BENCHES]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run, seconds)")
    ap.add_argument("--only", default=",".join(NAMES), help=f"subset of {','.join(NAMES)}")
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where the CSVs, plots, report go")
    ap.add_argument("--no-docs", "--no-readme", dest="no_docs", action="store_true",
                    help="leave docs/benchmarks.md and README.md as they are (--no-readme: the old name)")
    ap.add_argument("--kd-providers", default=None,
                    help="subset of the KD losses' providers (kd and topk), e.g. fastkd,eager (leaves out "
                         "torch.compile)")
    args = ap.parse_args(argv)
    only = [b for b in args.only.split(",") if b]
    unknown = [b for b in only if b not in registry.BY_NAME]
    if unknown or not only:
        ap.error(f"--only: unknown {unknown}; choose from {','.join(NAMES)}")
    device = common.device(args.device)
    suffix = "_quick" if args.quick else ""
    paths, failed = [], []
    for key in only:
        bench = registry.BY_NAME[key]
        out = args.out_dir / f"{bench.stem}_{device.type}{suffix}.csv"
        out.unlink(missing_ok=True)  # a failed run must not report an older file's numbers
        bench_args = ["--device", str(device), "--out", str(out), *bench.args] + (["--quick"] if args.quick else [])
        if key in ("kd", "kd_causal", "topk") and args.kd_providers:
            bench_args += ["--providers", args.kd_providers]
        print(f"\n=== {key}: python -m {bench.module} {' '.join(bench_args)}", flush=True)
        try:
            bench.load().main(bench_args)
        except Exception:  # the other benchmarks still run; the CSV keeps the cases measured so far
            traceback.print_exc()
            failed.append(key)
        if out.exists():
            paths.append(out)
    publish = not (args.no_docs or args.quick) and args.out_dir.resolve() == common.RESULTS
    report.render(paths, docs=publish, md=None if publish else args.out_dir / f"report{suffix}.md")
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see the tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
