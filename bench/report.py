"""Render benchmark CSVs (bench/results/*.csv) as Markdown tables and PNG plots, and refresh the
generated blocks of docs/benchmarks.md and the README's headline table.

    python -m bench.report                       # the full runs in bench/results: tables, plots, docs, README
    python -m bench.report DIR/kd_loss_cuda.csv --no-docs --md DIR/report.md   # e.g. a GPU run's CSVs

Plots (a PNG beside its CSV): KD loss time and peak memory against the vocabulary size, clipping time
and GB/s against the number of tensors; the step benchmark has a table only.

docs/benchmarks.md holds blocks delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
NAME is a CSV's stem (e.g. kd_loss_cpu): the CSV's full table and its plot. README.md holds one block,
``bench:headline``: per CSV, its registry entry's headline cases (bench/registry.py), fastkd against
the fastest other provider measured in that CSV, with the CSV's machine line. Everything between the
markers is regenerated from the CSVs, so the numbers in both files are always those of a committed,
real run. ``--no-docs`` (old name ``--no-readme``) leaves both files alone.
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
README = ROOT / "README.md"  # the headline block
DOCS = ROOT / "docs" / "benchmarks.md"  # a block per CSV: its table and plot
HEADLINE = "headline"

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
    return machine_line(rows) + "\n\n" + text + "\n"


def machine_line(rows: list[dict]) -> str:
    """The machine, torch, git sha and date of a CSV's run (its first row), as one line."""
    r0 = rows[0]
    machine = f"{r0.get('cpu')} x{r0.get('cores')} ({r0.get('threads')} threads)"
    if r0.get("gpu"):
        machine = f"{r0['gpu']}, host {machine}"
    return (f"Machine: {machine}; torch {r0.get('torch')}"
            f"{' CUDA ' + r0['cuda'] if r0.get('gpu') else ''}; git {r0.get('git')}; {r0.get('date')}"
            + (f"; copy ceiling {float(r0['copy_gbps']):.1f} GB/s" if r0.get("copy_gbps") else ""))


def headline_rows(rows: list[dict], bench: registry.Bench) -> list[dict]:
    """The registry entry's headline cases found in a CSV's rows: per case, fastkd's median and the
    fastest other provider's median and fastkd_speedup, as the CSV has them."""
    out = []
    for h in bench.headline:
        cases: dict[str, list[dict]] = {}
        for r in rows:
            if all(r.get(k) == v for k, v in h.where.items()):
                cases.setdefault(h.case.format(**r), []).append(r)
        if not cases:
            continue
        case, group = next(iter(cases.items()))  # the first matching case, in the CSV's order
        ours = [r for r in group if r["provider"] == "fastkd"]
        others = [r for r in group if r["provider"] != "fastkd" and r.get("fastkd_speedup")]
        if not ours or not others:
            continue
        best = min(others, key=lambda r: float(r["median_ms"]))
        out.append({"what": h.label, "case": case, "fastkd median_ms": float(ours[0]["median_ms"]),
                    "fastest alternative": best["provider"], "its median_ms": float(best["median_ms"]),
                    "fastkd_speedup": float(best["fastkd_speedup"])})
    return out


def headline(tables: list[tuple[Path, list[dict]]], base: Path) -> str:
    """The headline block: a table of every CSV's headline rows, each row naming its CSV (a link
    relative to base), then each CSV's machine line."""
    order = {b.stem: i for i, b in enumerate(registry.BENCHES)}
    tables = sorted(tables, key=lambda t: order.get(kind_of(t[0]), len(order)))  # the registry's order
    rows, machines = [], []
    for path, csv_rows in tables:
        bench = registry.of_csv(path.stem)
        found = headline_rows(csv_rows, bench) if bench else []
        link = f"[{path.name}]({Path(os.path.relpath(path, base)).as_posix()})"
        rows += [{**r, "CSV": link} for r in found]
        if found:
            machines.append(f"`{path.name}`: {machine_line(csv_rows)}")
    if not rows:
        return ""
    cols = ["what", "case", "fastkd median_ms", "fastest alternative", "its median_ms", "fastkd_speedup",
            "CSV"]
    return common.print_table(rows, cols) + "\n\n" + "\n".join(f"- {m}" for m in machines) + "\n"


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


def plot_fused_linear(rows: list[dict], out: Path) -> Path | None:
    """Time and peak memory against the number of rows N, one line per provider (the GEMMs alone included)."""
    plt = _pyplot() if rows else None
    if plt is None:
        return None
    ns = {int(r["rows"]) for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(5.5, 7.5), squeeze=False)
    _provider_lines(axes[0][0], axes[1][0], rows, rows, "rows", "peak_mem_mib")
    r0 = rows[0]
    axes[0][0].set_title(f"fused linear + KD loss fwd+bwd, H = {r0['hidden_student']}/{r0['hidden_teacher']}, "
                         f"V = {r0['vocab']}", fontsize=9)
    _log_axes(axes[0][0], ns, log_y=True, base=2)
    _log_axes(axes[1][0], ns, log_y=False, base=2)
    axes[1][0].set_xlabel("rows N")
    axes[0][0].set_ylabel("median time (ms)")
    axes[1][0].set_ylabel("peak memory above inputs (MiB)")
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, rows, out)


PLOTS = {"kd_loss": plot_kd, "clip": plot_clip, "fused_linear": plot_fused_linear}


def update_blocks(target: Path, blocks: dict[str, str]) -> None:
    """Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in target by
    blocks[NAME]; everything else in the file stays as it is."""
    if not blocks or not target.exists():
        return
    text = target.read_text()
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        text, n = pat.subn(lambda m: m.group(1) + body + m.group(2), text)
        if n:
            print(f"{target.name}: refreshed bench:{name}")
    target.write_text(text)


def kind_of(path: Path) -> str:
    bench = registry.of_csv(path.stem)
    return bench.stem if bench else path.stem


def _image(name: str, png: Path | None, base: Path) -> str:
    """A Markdown image line for png, relative to the folder of the file it goes into."""
    return f"\n![{name}]({Path(os.path.relpath(png, base)).as_posix()})\n" if png else ""


def _official(path: Path) -> bool:
    """A full run's CSV in bench/results: the only kind that docs/benchmarks.md and the README show."""
    return not path.stem.endswith("_quick") and path.parent.resolve() == common.RESULTS


def render(paths: list[Path], docs: bool = True, md: Path | None = None) -> dict[str, str]:
    """Tables (printed; into docs/benchmarks.md's blocks and/or the Markdown file md) and plots (a PNG
    beside each CSV that has one, linked under its table) of the CSVs at paths, and the headline table
    (into the README's block and/or md). Only full runs in bench/results reach docs/benchmarks.md and
    the README: their blocks and links are about those files. Returns {CSV stem: docs block}."""
    blocks, sections, tables = {}, [], []
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
        blocks[path.stem] = table + _image(path.stem, png, DOCS.parent)
        sections.append(f"## {path.stem}\n\n{table}" + (_image(path.stem, png, md.parent) if md else ""))
        tables.append((path, rows))
    if docs:
        official = [(p, r) for p, r in tables if _official(p)]
        for p, _ in tables:
            if not _official(p):
                print(f"{DOCS.name}, README.md: not refreshed from {p.stem} "
                      f"(only full runs in {common.RESULTS} go there)")
        update_blocks(DOCS, {p.stem: blocks[p.stem] for p, _ in official})
        print("\n## headline")
        top = headline(official, README.parent)
        if top:
            update_blocks(README, {HEADLINE: top})
    if md:
        top = headline(tables, md.parent)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text("\n".join(([f"## {HEADLINE}\n\n{top}"] if top else []) + sections))
        print(f"wrote {md}")
    return blocks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csvs", nargs="*", type=Path,
                    help="CSV files (default: the full runs in bench/results, i.e. not *_quick.csv)")
    ap.add_argument("--no-docs", "--no-readme", dest="no_docs", action="store_true",
                    help="leave docs/benchmarks.md and README.md as they are (--no-readme: the old name)")
    ap.add_argument("--md", type=Path, default=None, help="also write the tables and plot links to this file")
    args = ap.parse_args(argv)
    paths = args.csvs or [p for p in sorted(common.RESULTS.glob("*.csv")) if not p.stem.endswith("_quick")]
    render(paths, docs=not args.no_docs, md=args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
