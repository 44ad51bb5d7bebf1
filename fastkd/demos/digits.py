"""``fastkd demo``: Hinton-style distillation on scikit-learn's bundled digits (no download).

For each seed: a teacher MLP is trained on the full training split; a small student is trained twice
with the same budget (same labelled subset, epochs, batch size, optimizer, learning rate and seed):
once from the labels alone ("scratch"), once distilled from that seed's teacher ("distilled"). The
train/test split and the student's labelled subset are fixed; the seed sets initialisation and
batch order. Every run goes through ``fastkd.Distiller`` (the scratch student with ``teacher=None``).

Writes to the run folder: one Distiller run folder per (seed, model) with metrics.csv, eval.csv and
checkpoints; learning_curves.png; report.json (top-level keys teacher, scratch, distilled, each with
accuracy_mean, accuracy_std, seconds, ...) and the printed table as table.txt.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..train.distiller import Distiller
from ..train.run_dir import refuse_non_empty, writing
from .common import tensor_batches, write_report

__all__ = ["DemoConfig", "run_demo", "load_digits_split", "mlp"]


@dataclass
class DemoConfig:
    out: str = ""
    seeds: int = 5
    teacher_hidden: int = 128  # two hidden layers, dropout 0.2
    teacher_epochs: int = 30
    teacher_batch_size: int = 64
    teacher_lr: float = 3e-3
    student_hidden: int = 16  # one hidden layer
    student_samples: int = 150  # labelled examples the students see (stratified, fixed)
    student_epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-2
    temperature: float = 4.0
    soft_weight: float = 1.0
    hard_weight: float = 0.5
    test_fraction: float = 0.4
    threads: int = 1  # torch threads per process: one is fastest for these tiny matrices (0: torch's default)
    workers: int = 0  # processes the seeds are spread over (0: one per CPU core, at most one per seed)


def _need(module: str, extra: str = "demo"):
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"fastkd demo needs {module.split('.')[0]}: pip install 'fastkd[{extra}]' "
                         "(scikit-learn, matplotlib, tqdm)") from None


def load_digits_split(test_fraction: float, student_samples: int):
    """Fixed split of the 1797 8x8 digits: (x_train, y_train, x_test, y_test, student_index)."""
    datasets = _need("sklearn.datasets")
    model_selection = _need("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    xtr, xte, ytr, yte = model_selection.train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)
    if not 10 <= student_samples <= len(ytr):
        raise ValueError(f"--student-samples must be in [10, {len(ytr)}], got {student_samples}")
    if student_samples == len(ytr):
        idx = torch.arange(len(ytr))
    else:
        idx, _ = model_selection.train_test_split(torch.arange(len(ytr)), train_size=student_samples, stratify=ytr,
                                                  random_state=0)
        idx = torch.as_tensor(idx)
    return xtr, ytr, xte, yte, idx


def mlp(hidden: int, layers: int = 1, dropout: float = 0.0) -> nn.Module:
    mods, d = [], 64
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, 10))


def _train(name, run_dir, teacher, student, train, test, epochs, cfg, seed, **loss):
    torch.manual_seed(seed)
    is_teacher = name == "teacher"
    loader = tensor_batches(train, cfg.teacher_batch_size if is_teacher else cfg.batch_size, shuffle=True)
    lr = cfg.teacher_lr if is_teacher else cfg.lr
    d = Distiller(teacher, student, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=1e-4),
                  scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs * len(loader)),
                  run_dir=run_dir, log_every=max(1, len(loader)), checkpoint_epochs=10, max_grad_norm=5.0,
                  progress=False,
                  tensorboard=False, config={"demo": name, "seed": seed}, **loss)
    t0 = time.perf_counter()
    history = d.fit(loader, epochs=epochs, eval_loader=tensor_batches(test, 1024))
    return d, history, time.perf_counter() - t0


def _summary(rows: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run_seed(cfg: DemoConfig, out: Path, data, seed: int):
    """One seed: the teacher, then the scratch and the distilled student (the same initial weights).
    Returns ({model: result}, {model: learning curve}, {model: parameters}, the seed's printed line)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    full, test, subset = data
    torch.manual_seed(seed)
    teacher = mlp(cfg.teacher_hidden, layers=2, dropout=0.2)
    torch.manual_seed(10_000 + seed)
    student_init = mlp(cfg.student_hidden)
    scratch, distilled = student_init, mlp(cfg.student_hidden)
    distilled.load_state_dict(student_init.state_dict())  # the same initial student for both
    sizes = {"teacher": _params(teacher), "scratch": _params(scratch), "distilled": _params(distilled)}
    runs = [
        ("teacher", None, teacher, full, cfg.teacher_epochs, {}),
        ("scratch", None, scratch, subset, cfg.student_epochs, {}),
        ("distilled", teacher, distilled, subset, cfg.student_epochs,
         {"temperature": cfg.temperature, "soft_weight": cfg.soft_weight, "hard_weight": cfg.hard_weight}),
    ]
    results, curves, line = {}, {}, [f"seed {seed}:"]
    for name, t, s, train, epochs, loss in runs:
        d, history, secs = _train(name, out / f"seed{seed}" / name, t, s, train, test, epochs, cfg, seed, **loss)
        final = history[-1]
        results[name] = {"seed": seed, "accuracy": final["student_acc"], "ce": final["ce"],
                         "agreement": d.evaluate(tensor_batches(test, 1024))["agreement"]
                         if t is not None else math.nan, "seconds": secs}
        curves[name] = history
        line.append(f"{name} {final['student_acc']:.4f}")
    return results, curves, sizes, " ".join(line)


def _workers(cfg: DemoConfig) -> int:
    return min(cfg.workers or os.cpu_count() or 1, cfg.seeds)


def _seed_runs(cfg: DemoConfig, out: Path, data):
    """_run_seed for every seed, in seed order; the seeds are independent, so with workers > 1 they run
    in that many processes (each with cfg.threads torch threads): the same results, sooner."""
    workers = _workers(cfg)
    if workers <= 1:
        for seed in range(cfg.seeds):
            yield _run_seed(cfg, out, data, seed)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_seed, cfg, out, data, seed) for seed in range(cfg.seeds)]
        for f in futures:
            yield f.result()


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    refuse_non_empty(out, ": choose another --out (nothing was overwritten)")
    if cfg.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if cfg.workers < 0:
        raise ValueError("--workers must be >= 0 (0: one process per CPU core)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    xtr, ytr, xte, yte, idx = load_digits_split(cfg.test_fraction, cfg.student_samples)
    full, test = TensorDataset(xtr, ytr), TensorDataset(xte, yte)
    subset = TensorDataset(xtr[idx], ytr[idx])
    print(f"digits: {len(ytr)} train / {len(yte)} test images (fixed split); students see {len(idx)} labelled "
          f"train images; {cfg.seeds} seed(s) in {_workers(cfg)} process(es), torch threads: {torch.get_num_threads()} "
          "each", flush=True)
    results: dict[str, list[dict]] = {"teacher": [], "scratch": [], "distilled": []}
    curves: dict[str, list[list[dict]]] = {k: [] for k in results}
    data = (full, test, subset)
    sizes: dict[str, int] = {}  # parameters per model: the same for every seed
    for seed_results, seed_curves, seed_sizes, line in _seed_runs(cfg, out, data):
        sizes = seed_sizes
        print(line, flush=True)
        for name in results:
            results[name].append(seed_results[name])
            curves[name].append(seed_curves[name])

    report = {}
    for name, rows in results.items():
        acc_m, acc_s = _summary(rows, "accuracy")
        ce_m, _ = _summary(rows, "ce")
        report[name] = {"accuracy_mean": acc_m, "accuracy_std": acc_s, "ce_mean": ce_m,
                        "seconds": statistics.fmean(r["seconds"] for r in rows), "parameters": sizes[name],
                        "train_samples": len(ytr) if name == "teacher" else len(idx), "per_seed": rows}
    wins = sum(d["accuracy"] > s["accuracy"] for d, s in zip(results["distilled"], results["scratch"]))
    report["distilled_beats_scratch"] = {"seeds_won": wins, "seeds": cfg.seeds,
                                        "mean_gain": report["distilled"]["accuracy_mean"]
                                        - report["scratch"]["accuracy_mean"]}
    report["config"] = asdict(cfg)
    table = format_table(report)
    plot = _plot(curves, out / "learning_curves.png")
    report["plot"] = str(plot) if plot else None
    write_report(out, report, table)
    print(f"\nrun folder: {out}\n  report:  {out / 'report.json'}\n  plot:    {plot or '(matplotlib missing)'}")
    return report


def format_table(report: dict) -> str:
    head = f"{'model':<10} {'params':>7} {'train imgs':>10} {'test accuracy':>17} {'test CE':>8} {'s/run':>6}"
    lines = [head, "-" * len(head)]
    for name in ("teacher", "scratch", "distilled"):
        r = report[name]
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} %"
        lines.append(f"{name:<10} {r['parameters']:>7} {r['train_samples']:>10} {acc:>17} {r['ce_mean']:>8.4f} "
                     f"{r['seconds']:>6.1f}")
    b = report["distilled_beats_scratch"]
    lines.append(f"distilled - scratch: {100 * b['mean_gain']:+.2f} points on average; distilled better on "
                 f"{b['seeds_won']}/{b['seeds']} seeds")
    return "\n".join(lines)


def _plot(curves: dict, path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"teacher": "tab:gray", "scratch": "tab:red", "distilled": "tab:blue"}
    for name, runs in curves.items():
        for ax, key in zip(axes, ("student_acc", "ce")):
            mat = torch.tensor([[h[key] for h in hist] for hist in runs], dtype=torch.float64)
            mean = mat.mean(0)
            std = mat.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            epochs = range(1, mat.shape[1] + 1)
            ax.plot(epochs, mean, label=name, color=colors[name])
            ax.fill_between(epochs, mean - std, mean + std, color=colors[name], alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="digits: test accuracy (mean ± std over seeds)")
    axes[1].set(xlabel="epoch", ylabel="test cross-entropy", title="test cross-entropy", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    try:
        with writing(path.parent):
            fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
