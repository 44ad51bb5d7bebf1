"""The CSV logs: one header, rows after a resumed checkpoint dropped, nothing written without a folder."""

from __future__ import annotations

import csv

from fastkd.train.metrics import EVAL_FIELDS, TRAIN_FIELDS, MetricsLog


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    m = MetricsLog(tmp_path, tensorboard=False)
    m.open(resume=False, step=0)
    for step in (1, 2, 3):
        m.write("train", {"step": step, "epoch": 0, "loss": 0.5, "finite": True})  # extra keys are ignored
    m.write("eval", {"step": 3, "epoch": 1, "rows": 9})
    assert open(tmp_path / "metrics.csv").readline().strip().split(",") == TRAIN_FIELDS
    assert open(tmp_path / "eval.csv").readline().strip().split(",") == EVAL_FIELDS
    MetricsLog(tmp_path, tensorboard=False).open(resume=True, step=2)
    assert [r["step"] for r in _rows(tmp_path / "metrics.csv")] == ["1", "2"]
    assert _rows(tmp_path / "eval.csv") == []


def test_no_folder_writes_nothing(tmp_path):
    m = MetricsLog(None, tensorboard=True)
    m.open(resume=False, step=0)
    m.write("train", {"step": 1})
    m.flush()
    assert list(tmp_path.iterdir()) == []
