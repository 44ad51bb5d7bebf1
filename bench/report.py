"""Render benchmark CSVs (bench/results/*.csv) as Markdown tables and PNG plots, and refresh the
README's generated sections.

    python -m bench.report            # print the tables, write the plots, update README.md

README.md holds blocks delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; NAME is a
CSV's stem (e.g. kd_loss_cpu). Everything between the markers is regenerated from the CSV, so the
numbers in the README are always those of a committed, real run.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from . import common

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Columns shown per kind of result (the CSV keeps everything).
COLUMNS = {
    "kd_loss": ["loss", "provider", "rows", "vocab", "dtype", "mode", "median_ms", "p20_ms", "p80_ms", "gbps",
                "pct_copy_ceiling", "peak_mem_mib", "fastkd_speedup"],
    "clip": ["case", "provider", "tensors", "elements", "dtype", "clipped", "median_ms", "p20_ms", "p80_ms", "gbps",
             "fastkd_speedup"],
}


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    return x


def markdown(rows: list[dict], kind: str) -> str:
    cols = [c for c in COLUMNS.get(kind, list(rows[0])) if c in rows[0]]
    conv = [{c: _num(r.get(c)) for c in cols} for r in rows]
    text = common.print_table(conv, cols)
    r0 = rows[0]
    machine = f"{r0.get('cpu')} x{r0.get('cores')} ({r0.get('threads')} threads)"
    if r0.get("gpu"):
        machine = f"{r0['gpu']}, host {machine}"
    head = (f"Machine: {machine}; torch {r0.get('torch')}"
            f"{' CUDA ' + r0['cuda'] if r0.get('gpu') else ''}; git {r0.get('git')}; {r0.get('date')}"
            + (f"; copy ceiling {float(r0['copy_gbps']):.1f} GB/s" if r0.get("copy_gbps") else ""))
    return head + "\n\n" + text + "\n"


def plot_kd(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    sel = [r for r in rows if r["mode"] == "fwd+bwd" and r["loss"] == "kl"]
    if not sel:
        return None
    dtypes = sorted({r["dtype"] for r in sel})
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5 * len(dtypes), 7), squeeze=False)
    for j, dt in enumerate(dtypes):
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted(((int(r["vocab"]), int(r["rows"]), float(r["median_ms"]), r["peak_mem_mib"])
                          for r in sel if r["dtype"] == dt and r["provider"] == prov))
            labels = [f"{rw}x{v}" for v, rw, _, _ in pts]
            axes[0][j].plot(labels, [p[2] for p in pts], marker="o", label=prov)
            mem = [float(p[3]) if p[3] not in ("", None) else float("nan") for p in pts]
            axes[1][j].plot(labels, mem, marker="o", label=prov)
        axes[0][j].set_title(f"KD loss fwd+bwd, {dt}")
        axes[0][j].set_ylabel("median time (ms, log)")
        axes[0][j].set_yscale("log")
        axes[1][j].set_ylabel("peak memory above inputs (MiB)")
        axes[1][j].set_xlabel("rows x vocab")
        axes[0][j].legend()
    r0 = rows[0]
    fig.suptitle(f"{r0.get('gpu') or r0.get('cpu')} ({r0.get('threads')} threads), torch {r0.get('torch')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def update_readme(blocks: dict[str, str]) -> None:
    if not README.exists():
        return
    text = README.read_text()
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        text, n = pat.subn(lambda m: m.group(1) + body + m.group(2), text)
        if n:
            print(f"README.md: refreshed bench:{name}")
    README.write_text(text)


def main(argv=None) -> int:
    blocks = {}
    for path in sorted(common.RESULTS.glob("*.csv")):
        if path.stem.endswith("_quick"):
            continue
        rows = load(path)
        if not rows:
            continue
        kind = "kd_loss" if path.stem.startswith("kd_loss") else ("clip" if path.stem.startswith("clip") else path.stem)
        print(f"\n## {path.name}")
        blocks[path.stem] = markdown(rows, kind)
        if kind == "kd_loss":
            png = plot_kd(rows, path.with_suffix(".png"))
            if png:
                print(f"plot: {png.relative_to(ROOT)}")
    update_readme(blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
