"""The run folder: run.json, the fingerprint's format (run folders of earlier versions must still
resume), and the checks that keep a run from writing over anything else."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastkd.train.distiller import Distiller
from fastkd.train.run_dir import RunDirError, RunFolder, refuse_non_empty
from fastkd.train.schedules import Linear


def _distiller(**kw):
    torch.manual_seed(0)
    teacher = kw.pop("teacher", nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)))
    student = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.0), nn.Linear(12, 5))
    return Distiller(teacher, student, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), progress=False, **kw)


def test_fingerprint_format_is_that_of_existing_run_folders():
    # Written by the trainer before DistillerConfig existed: a resumed run compares against such a dict.
    stored = {
        "teacher": "Sequential", "student": "Sequential", "student_parameters": 149, "optimizer": "SGD",
        "scheduler": None,
        "schedules": {"temperature": {"schedule": "linear", "start": 3.0, "end": 1.0, "steps": 10, "warmup": 2},
                      "soft_weight": {"schedule": "constant", "value": 0.7},
                      "hard_weight": {"schedule": "constant", "value": 0.3}},
        "divergence": "reverse_kl", "beta": 0.2, "ignore_index": -1, "accumulation_steps": 3, "max_grad_norm": 2,
        "clip_value": 0.1, "precision": "bf16", "world_size": 1, "config": {"a": [1, 2], "p": "/x"},
    }
    fp = _distiller(temperature=Linear(3.0, 1.0, steps=10, warmup=2), divergence="reverse_kl", beta=0.2,
                    soft_weight=0.7, hard_weight=0.3, ignore_index=-1, accumulation_steps=3, max_grad_norm=2,
                    clip_value=0.1, precision="bf16", log_every=3, best_metric="ce",
                    config={"a": (1, 2), "p": "/x"}).fingerprint()
    defaults = fp.pop("optimizer_defaults")  # torch's own list of SGD defaults varies between versions
    assert defaults["lr"] == 0.1 and defaults["momentum"] == 0.9
    assert fp == stored
    baseline = _distiller(teacher=None).fingerprint()
    assert baseline["teacher"] is None and baseline["schedules"]["hard_weight"] == {"schedule": "constant",
                                                                                    "value": 1.0}


def test_meta_round_trip_and_checks(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.read_meta() is None
    folder.check({"a": 1}, resume=False)  # a new folder takes any run
    with pytest.raises(RunDirError, match="holds no run to resume"):
        folder.check({"a": 1}, resume=True)
    folder.write_meta({"a": 1})
    meta = json.loads(folder.meta.read_text())
    assert set(meta) == {"fastkd_version", "torch_version", "fingerprint"} and folder.read_meta() == meta
    folder.check({"a": 1}, resume=False)  # this run, never checkpointed: started afresh
    folder.check({"a": 2, "b": 0}, resume=False)  # another run: a folder without a checkpoint is reused
    with pytest.raises(RunDirError, match="no checkpoint to resume: its run stopped before its first checkpoint"):
        folder.check({"a": 1}, resume=True)
    folder.last.parent.mkdir()
    folder.last.write_bytes(b"")
    with pytest.raises(RunDirError, match="differs in: a, b"):
        folder.check({"a": 2, "b": 0}, resume=False)
    with pytest.raises(RunDirError, match="already holds this run"):
        folder.check({"a": 1}, resume=False)
    folder.check({"a": 1}, resume=True)
    folder.meta.write_text("[1, 2")
    with pytest.raises(RunDirError, match="unreadable"):
        folder.read_meta()


def test_a_folder_with_other_files_is_refused(tmp_path):
    refuse_non_empty(tmp_path / "missing", "")
    refuse_non_empty(tmp_path, "")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty: try elsewhere"):
        refuse_non_empty(tmp_path, ": try elsewhere")
    with pytest.raises(RunDirError, match="not empty .and holds no fastkd run"):
        RunFolder(tmp_path).check({}, resume=False)
