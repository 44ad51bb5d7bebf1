"""What the trainer reports: ``metrics.csv`` (a row per log step), ``eval.csv`` (a row per evaluation),
TensorBoard scalars (when it is installed) and the tqdm bar (when tqdm is installed).

Only rank 0 writes: the other ranks (and runs without a folder) get a :class:`MetricsLog` of ``None``
that writes nothing. On resume, the rows after the checkpoint's step are dropped (they will be written
again), so every step appears once.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from .run_dir import writing

__all__ = ["MetricsLog", "TRAIN_FIELDS", "EVAL_FIELDS", "progress_bar"]

log = logging.getLogger("fastkd.train")

TRAIN_FIELDS = ["step", "epoch", "loss", "kd_loss", "ce", "grad_norm", "lr", "temperature", "soft_weight",
                "hard_weight", "rows_per_s", "samples_per_s", "skipped", "time"]
EVAL_FIELDS = ["step", "epoch", "student_acc", "teacher_acc", "agreement", "kd_loss", "ce", "teacher_ce", "rows"]
# kind (also the TensorBoard prefix of its scalars) -> (file name, columns)
_LOGS = {"train": ("metrics.csv", TRAIN_FIELDS), "eval": ("eval.csv", EVAL_FIELDS)}


class MetricsLog:
    """The CSV logs of a run folder (``folder`` None: nothing is written) and its TensorBoard writer."""

    def __init__(self, folder: Path | None, tensorboard: bool):
        self.folder = folder
        self.tensorboard = tensorboard
        self._tb = None

    def open(self, resume: bool, step: int) -> None:
        """Start the CSV files (with the rows up to ``step`` when resuming) and TensorBoard."""
        if self.folder is None:
            return
        for name, fields in _LOGS.values():
            path = self.folder / name
            if resume and path.exists():
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            else:
                rows = []
            with writing(self.folder), open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
        if self.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.debug("tensorboard not installed: CSV logs only")
            else:
                self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def write(self, kind: str, row: dict) -> None:
        """Append ``row`` to the ``kind`` ("train" or "eval") log; its finite numbers to TensorBoard."""
        if self.folder is None:
            return
        name, fields = _LOGS[kind]
        with writing(self.folder), open(self.folder / name, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, row["step"])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()


def progress_bar(enabled: bool, total: int | None, initial: int, epoch: int):
    """A tqdm bar over an epoch's micro-batches, or None (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                dynamic_ncols=True)
