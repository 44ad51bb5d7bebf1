"""The demos' own machinery: tensor batches, seeds in worker processes, and a tiny token-level run."""

from __future__ import annotations

import errno
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastkd.demos.byte_lm import LMDemoConfig, run_lm_demo
from fastkd.demos.common import tensor_batches, write_report
from fastkd.demos.digits import DemoConfig, run_demo
from fastkd.train.run_dir import RunDirError


def _batches(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def test_tensor_batches_are_dataloaders_batches():
    data = TensorDataset(torch.randn(103, 5), torch.randint(0, 10, (103,)))
    for shuffle in (False, True):
        torch.manual_seed(7)
        ref = [_batches(DataLoader(data, batch_size=16, shuffle=shuffle)) for _ in range(2)]  # two epochs
        torch.manual_seed(7)
        got = [_batches(tensor_batches(data, 16, shuffle=shuffle)) for _ in range(2)]
        assert len(got[0]) == len(ref[0]) == 7
        for epoch_ref, epoch_got in zip(ref, got):
            for (xr, yr), (xg, yg) in zip(epoch_ref, epoch_got):
                assert torch.equal(xr, xg) and torch.equal(yr, yg)


TINY = DemoConfig(seeds=2, teacher_epochs=2, student_epochs=3, teacher_hidden=32)


@pytest.mark.backend_independent
def test_seeds_in_worker_processes_give_the_one_process_results(tmp_path):
    one = run_demo(replace(TINY, out=str(tmp_path / "one"), workers=1))
    two = run_demo(replace(TINY, out=str(tmp_path / "two"), workers=2))
    for name in ("teacher", "scratch", "distilled"):
        for a, b in zip(one[name]["per_seed"], two[name]["per_seed"]):
            assert (a["seed"], a["accuracy"], a["ce"]) == (b["seed"], b["accuracy"], b["ce"])
    assert (tmp_path / "two" / "seed1" / "distilled" / "checkpoints" / "last.pt").is_file()


def test_token_level_demo_tiny_run(tmp_path):
    cfg = LMDemoConfig(out=str(tmp_path / "lm"), seq_len=32, train_bytes=12_000, val_bytes=4_000, batch_size=8,
                       teacher_dim=32, teacher_layers=1, teacher_epochs=1, student_dim=16, student_layers=1,
                       student_epochs=1)
    report = run_lm_demo(cfg)
    saved = json.loads((tmp_path / "lm" / "report.json").read_text())
    for name in ("teacher", "scratch", "distilled"):
        assert math.isfinite(report[name]["val_perplexity"]) and report[name]["val_perplexity"] > 1.0
        assert saved[name]["steps"] == report[name]["steps"] > 0
    assert "distillation lowers" in (tmp_path / "lm" / "table.txt").read_text()


def test_token_level_demo_offline_students(tmp_path):
    """--top-k 8,257: a student per K from a cache of the trained teacher. With K = 257 (the whole vocabulary)
    the offline student sees the online teacher (rounded to float16) in the same batches from the same init:
    its perplexity is the online distilled student's to float16 rounding. The cache's size is K x (2 + 4)
    bytes per token plus its offsets and headers."""
    cfg = LMDemoConfig(out=str(tmp_path / "lm"), seq_len=32, train_bytes=12_000, val_bytes=4_000, batch_size=8,
                       teacher_dim=32, teacher_layers=1, teacher_epochs=1, student_dim=16, student_layers=1,
                       student_epochs=1, top_k="8,257")
    report = run_lm_demo(cfg)
    full, k8 = report["offline_k257"], report["offline_k8"]
    assert full["steps"] == k8["steps"] == report["distilled"]["steps"]
    assert full["val_perplexity"] == pytest.approx(report["distilled"]["val_perplexity"], rel=2e-3)
    assert full["val_perplexity"] != report["scratch"]["val_perplexity"]
    assert 48 <= k8["cache_bytes_per_token"] < 56 and 257 * 6 <= full["cache_bytes_per_token"] < 257 * 6 + 8
    assert (tmp_path / "lm" / "cache-k8" / "manifest.json").is_file()
    assert "offline from the top-8 cache: val perplexity" in (tmp_path / "lm" / "table.txt").read_text()
    with pytest.raises(ValueError, match=r"--top-k values must be distinct and in \[1, 257\]"):
        LMDemoConfig(top_k="8,300")
    with pytest.raises(ValueError, match="--top-k must be comma-separated integers"):
        LMDemoConfig(top_k="8;16")


def test_demo_report_on_a_full_disk_names_the_folder(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(RunDirError, match=f"cannot write to the run folder {tmp_path}: no space is left on its device"):
        write_report(tmp_path, {"a": 1}, "table")
