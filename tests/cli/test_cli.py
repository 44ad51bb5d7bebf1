"""The fastkd command line: a short demo run, distill/resume from a config, and the bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastkd.cli import main
from fastkd.train.distiller import Distiller

ROOT = Path(__file__).resolve().parents[2]

# A user's project: teacher, student and data factories, importable from the config's folder.
USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

def teacher(hidden=16):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

def student():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

def wide_student():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())

def train_loader():
    return DataLoader(_data(0), batch_size=8, shuffle=True)

def eval_loader():
    return DataLoader(_data(1), batch_size=20)
'''

CONFIG = '''
seed = 3
teacher = "userproj:teacher"
student = {{ factory = "userproj:{student}" }}

[data]
train = "userproj:train_loader"
eval = "userproj:eval_loader"

[optimizer]
name = "adamw"
lr = 0.01

[scheduler]
name = "cosine"
warmup_steps = 2

[loss]
temperature = {{ schedule = "linear", start = 4.0, end = 1.0 }}
hard_weight = 0.5

[train]
epochs = {epochs}
accumulation_steps = 2
max_grad_norm = 1.0
progress = false
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "userproj.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name="run.toml", student="student", epochs=3, extra=""):
        path = tmp_path / name
        path.write_text(CONFIG.format(student=student, epochs=epochs) + extra)
        return path

    return write


def _err(capsys) -> str:
    return capsys.readouterr().err


# ---- demo ------------------------------------------------------------------------------------------------
def test_short_demo_run_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--seeds", "2", "--teacher-epochs", "2", "--student-epochs", "3",
               "--teacher-hidden", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "distilled" in printed and "±" in printed
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "scratch", "distilled"):
        assert 0.0 <= report[name]["accuracy_mean"] <= 1.0
        assert report[name]["accuracy_std"] >= 0 and report[name]["seconds"] > 0
    assert (out / "learning_curves.png").stat().st_size > 1000
    for seed in (0, 1):
        for name in ("teacher", "scratch", "distilled"):
            run = out / f"seed{seed}" / name
            assert (run / "metrics.csv").is_file() and (run / "eval.csv").is_file()
            assert (run / "checkpoints" / "last.pt").is_file()
    # The same folder again: refused, nothing overwritten.
    before = (out / "report.json").read_bytes()
    assert main(["demo", "--out", str(out), "--seeds", "1"]) == 2
    assert "not empty" in _err(capsys)
    assert (out / "report.json").read_bytes() == before


def test_python_dash_m_fastkd_runs():
    r = subprocess.run([sys.executable, "-m", "fastkd", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "distill" in r.stdout and "resume" in r.stdout


# ---- distill / resume ------------------------------------------------------------------------------------
def test_distill_is_reproducible_from_the_config(project, tmp_path):
    cfg = project(epochs=3)
    for name in ("a", "b"):
        assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=False) for n in ("a", "b"))
    assert a["state"]["epoch"] == 3 and a["state"]["step"] == 9  # 5 batches, accumulation 2: 3 steps/epoch
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert json.loads((tmp_path / "a" / "run.json").read_text())["fingerprint"]["config"]["seed"] == 3


def test_resume_after_interruption(project, tmp_path, monkeypatch):
    cfg = project(epochs=3)
    ref = tmp_path / "ref"
    assert main(["distill", "--config", str(cfg), "--out", str(ref)]) == 0
    run = tmp_path / "run"
    real = Distiller._run_epoch

    def interrupted(self, loader, n):
        if self.state.epoch == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return real(self, loader, n)

    monkeypatch.setattr(Distiller, "_run_epoch", interrupted)
    assert main(["distill", "--config", str(cfg), "--out", str(run)]) == 130
    monkeypatch.setattr(Distiller, "_run_epoch", real)
    assert main(["resume", str(run)]) == 0
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=False)["student"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input: one clear message, exit status 2, nothing lost ---------------------------------------------
def test_unknown_option_suggests_the_closest(capsys):
    assert main(["demo", "--sedes", "3"]) == 2
    assert "unknown option '--sedes' (did you mean '--seeds'?)" in _err(capsys)
    assert main(["demo", "--student-epoch", "3"]) == 2  # no silent abbreviation either
    assert "did you mean '--student-epochs'" in _err(capsys)
    assert main(["distil", "--config", "x.toml"]) == 2
    assert "unknown command 'distil' (did you mean 'distill'?)" in _err(capsys)


def test_unknown_config_key_suggests_the_closest(project, capsys):
    cfg = project(extra="\n[train.extra]\n")
    cfg.write_text(cfg.read_text().replace("max_grad_norm", "max_grad_nrom"))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "unknown key 'max_grad_nrom' in [train] (did you mean 'max_grad_norm'?)" in _err(capsys)
    cfg.write_text("[trian]\nepochs = 1\n")
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "(did you mean 'train'?)" in _err(capsys)
    cfg.write_text("this is = not [toml")
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "not valid TOML" in _err(capsys)
    assert not Path("r").exists()


def test_import_path_that_does_not_resolve(project, capsys):
    cfg = project(student="studnet")
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "'userproj' has no attribute 'studnet' (did you mean 'student'?)" in _err(capsys)
    cfg.write_text(cfg.read_text().replace('teacher = "userproj:teacher"', 'teacher = "nosuchpkg.models:teacher"'))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "cannot import module 'nosuchpkg.models'" in _err(capsys)
    cfg.write_text(cfg.read_text().replace('"nosuchpkg.models:teacher"', '"userproj.teacher"'))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "expected an import path 'package.module:factory'" in _err(capsys)
    assert not Path("r").exists()


def test_teacher_and_student_outputs_of_different_shapes(project, capsys):
    cfg = project(student="wide_student")
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "teacher and student outputs differ in shape: teacher (8, 3), student (8, 5)" in _err(capsys)
    assert not Path("r/checkpoints").exists()


def test_corrupt_checkpoint_is_a_clear_error(project, tmp_path, capsys):
    cfg = project(epochs=1)
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 0
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])  # truncated by a faulty disk
    assert main(["resume", "r"]) == 2
    assert "unreadable or corrupt" in _err(capsys)
    assert main(["resume", str(tmp_path / "nothing-here")]) == 2
    assert "not a fastkd run folder" in _err(capsys)
    bad_teacher = tmp_path / "teacher.pt"
    bad_teacher.write_bytes(b"garbage")
    cfg2 = project(name="t.toml")
    cfg2.write_text(cfg2.read_text().replace('teacher = "userproj:teacher"',
                                             f'teacher = {{ factory = "userproj:teacher", checkpoint = "{bad_teacher}" }}'))
    assert main(["distill", "--config", str(cfg2), "--out", "r2"]) == 2
    assert "teacher.checkpoint" in _err(capsys)


def test_run_folder_holding_a_different_run_is_not_overwritten(project, tmp_path, capsys):
    cfg = project(epochs=1)
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 0
    files = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    cfg.write_text(cfg.read_text().replace("lr = 0.01", "lr = 0.02"))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "already holds a different run" in _err(capsys)
    cfg.write_text(cfg.read_text().replace("lr = 0.02", "lr = 0.01"))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "already holds this run" in _err(capsys)
    assert files == {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}


def test_config_file_errors(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in _err(capsys)
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent('''
        teacher = "a:b"
        [data]
        train = "a:c"
    '''))
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "missing student.factory" in _err(capsys)
