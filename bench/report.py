"""Render benchmark CSVs (bench/results/*.csv) as Markdown tables and PNG plots, and refresh the
README's generated sections.

    python -m bench.report                       # the full runs in bench/results: tables, plots, README.md
    python -m bench.report DIR/kd_loss_cuda.csv --no-readme --md DIR/report.md   # e.g. a GPU run's CSVs

Plots (a PNG beside its CSV): KD loss time and peak memory against the vocabulary size, clipping time
and GB/s against the number of tensors; the step benchmark has a table only.

README.md holds blocks delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; NAME is a
CSV's stem (e.g. kd_loss_cpu). Everything between the markers is regenerated from the CSV, so the
numbers in the README are always those of a committed, real run.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from . import common, registry

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Columns shown per kind of result (the CSV keeps everything): the registry's.
COLUMNS = {b.stem: list(b.columns) for b in registry.BENCHES if b.columns}


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


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def _float(v) -> float:
    return float(v) if v not in ("", None) else float("nan")


def _log_axes(ax, xs, log_y: bool, base: int = 10) -> None:
    """Log x with a tick at each measured x; plain numbers on the ticks; a light grid."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator  # noqa: PLC0415

    ax.set_xscale("log", base=base)
    ax.set_xticks(sorted(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def _save(plt, fig, rows: list[dict], out: Path) -> Path:
    r0 = rows[0]
    fig.suptitle(f"{r0.get('gpu') or r0.get('cpu')} ({r0.get('threads')} threads), torch {r0.get('torch')}, "
                 f"git {r0.get('git')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _provider_lines(ax_time, ax_other, sel: list[dict], panel: list[dict], x: str, other: str) -> None:
    """One line per provider and dtype of `panel`: the median time (ax_time) and column `other`
    (ax_other) against column `x`; colours by provider and line styles by dtype over all of `sel`."""
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in sel))}
    dtypes = list(dict.fromkeys(r["dtype"] for r in sel))
    for prov, dt in dict.fromkeys((r["provider"], r["dtype"]) for r in panel):
        pts = sorted((int(r[x]), float(r["median_ms"]), _float(r[other])) for r in panel
                     if r["provider"] == prov and r["dtype"] == dt)
        style = {"color": colors[prov], "ls": ("-", "--", ":")[dtypes.index(dt) % 3], "marker": "o",
                 "label": f"{prov} {dt}"}
        ax_time.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        ax_other.plot([p[0] for p in pts], [p[2] for p in pts], **style)


def plot_kd(rows: list[dict], out: Path) -> Path | None:
    """Time and peak memory against the vocabulary size (the row count with the most vocabularies),
    one panel per mode, one line per provider and dtype."""
    sel = [r for r in rows if r["loss"] == "kl"]
    plt = _pyplot() if sel else None
    if plt is None:
        return None
    vocabs: dict[int, set] = {}
    for r in sel:
        vocabs.setdefault(int(r["rows"]), set()).add(int(r["vocab"]))
    n_rows = max(vocabs, key=lambda k: len(vocabs[k]))
    sel = [r for r in sel if int(r["rows"]) == n_rows]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in sel)]
    fig, axes = plt.subplots(2, len(modes), figsize=(4.6 * len(modes), 7.5), squeeze=False)
    for j, mode in enumerate(modes):
        _provider_lines(axes[0][j], axes[1][j], sel, [r for r in sel if r["mode"] == mode], "vocab", "peak_mem_mib")
        axes[0][j].set_title(f"KD loss {mode}, {n_rows} rows")
        _log_axes(axes[0][j], vocabs[n_rows], log_y=True)
        _log_axes(axes[1][j], vocabs[n_rows], log_y=False)
        axes[1][j].set_xlabel("vocabulary size")
    axes[0][0].set_ylabel("median time (ms)")
    axes[1][0].set_ylabel("peak memory above inputs (MiB)")
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, rows, out)


def plot_clip(rows: list[dict], out: Path) -> Path | None:
    """Time and GB/s against the number of tensors the same elements are split into (the sweep rows),
    clipped and not clipped, one line per provider."""
    sel = [r for r in rows if r.get("sweep") == "True"]
    plt = _pyplot() if sel else None
    if plt is None:
        return None
    panels = list(dict.fromkeys(r["clipped"] for r in sel))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 7.5), squeeze=False)
    for j, clipped in enumerate(panels):
        _provider_lines(axes[0][j], axes[1][j], sel, [r for r in sel if r["clipped"] == clipped], "tensors", "gbps")
        elements = int(sel[0]["elements"])
        axes[0][j].set_title(f"clip_grad_norm_, {elements:,} elements in n tensors, "
                             f"{'clipped' if clipped == 'True' else 'not clipped'}", fontsize=10)
        if sel[0].get("copy_gbps"):
            axes[1][j].axhline(float(sel[0]["copy_gbps"]), color="gray", ls=":", label="copy ceiling")
        counts = {int(r["tensors"]) for r in sel}
        _log_axes(axes[0][j], counts, log_y=True, base=2)
        _log_axes(axes[1][j], counts, log_y=False, base=2)
        axes[1][j].set_xlabel("number of tensors (same total elements)")
    axes[0][0].set_ylabel("median time (ms)")
    axes[1][0].set_ylabel("GB/s (bytes a pass must move)")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    return _save(plt, fig, rows, out)


PLOTS = {"kd_loss": plot_kd, "clip": plot_clip}


def update_readme(blocks: dict[str, str]) -> None:
    if not blocks or not README.exists():
        return
    text = README.read_text()
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        text, n = pat.subn(lambda m: m.group(1) + body + m.group(2), text)
        if n:
            print(f"README.md: refreshed bench:{name}")
    README.write_text(text)


def kind_of(path: Path) -> str:
    bench = registry.of_csv(path.stem)
    return bench.stem if bench else path.stem


def _image(name: str, png: Path | None, base: Path) -> str:
    """A Markdown image line for png, relative to the folder of the file it goes into."""
    return f"\n![{name}]({Path(os.path.relpath(png, base)).as_posix()})\n" if png else ""


def render(paths: list[Path], readme: bool = True, md: Path | None = None) -> dict[str, str]:
    """Tables (printed; into the README blocks and/or the Markdown file md) and plots (a PNG beside
    each CSV that has one, linked under its table) of the CSVs at paths. Only full runs in
    bench/results reach the README: its blocks and image links are about those files. Returns
    {CSV stem: README block}."""
    blocks, sections = {}, []
    for path in paths:
        rows = load(path)
        if not rows:
            print(f"{path}: no rows", file=sys.stderr)
            continue
        kind = kind_of(path)
        print(f"\n## {path.name}")
        table = markdown(rows, kind)
        png = PLOTS[kind](rows, path.with_suffix(".png")) if kind in PLOTS else None
        if png:
            print(f"plot: {png}")
        blocks[path.stem] = table + _image(path.stem, png, ROOT)
        sections.append(f"## {path.stem}\n\n{table}" + (_image(path.stem, png, md.parent) if md else ""))
    if readme:
        official = {k: v for k, v in blocks.items() if not k.endswith("_quick")
                    and any(p.stem == k and p.parent.resolve() == common.RESULTS for p in paths)}
        for k in blocks.keys() - official.keys():
            print(f"README.md: not refreshed from {k} (only full runs in {common.RESULTS} go there)")
        update_readme(official)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text("\n".join(sections))
        print(f"wrote {md}")
    return blocks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csvs", nargs="*", type=Path,
                    help="CSV files (default: the full runs in bench/results, i.e. not *_quick.csv)")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    ap.add_argument("--md", type=Path, default=None, help="also write the tables and plot links to this file")
    args = ap.parse_args(argv)
    paths = args.csvs or [p for p in sorted(common.RESULTS.glob("*.csv")) if not p.stem.endswith("_quick")]
    render(paths, readme=not args.no_readme, md=args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
