"""The fastkd command line: a short demo run, distill/resume from a config, and the bad-input errors."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastkd.cli import main
from fastkd.train.checkpoint import load_checkpoint
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

def boom():
    raise RuntimeError("the weights server is down")

def not_a_loader():
    return 42

def empty_loader():
    return []

def one_pass_loader():
    return (batch for batch in train_loader())

def bf16_teacher():
    return teacher().to(torch.bfloat16)

def other_train_loader():
    return DataLoader(_data(5), batch_size=8, shuffle=True)

def batch_list():
    return list(train_loader())
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


@pytest.mark.backend_independent
def test_python_dash_m_fastkd_runs():
    r = subprocess.run([sys.executable, "-m", "fastkd", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "distill" in r.stdout and "resume" in r.stdout


# ---- distill / resume ------------------------------------------------------------------------------------
def test_distill_is_reproducible_from_the_config(project, tmp_path):
    cfg = project(epochs=3)
    for name in ("a", "b"):
        assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / name)]) == 0
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt") for n in ("a", "b"))
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
    a = load_checkpoint(ref / "checkpoints" / "last.pt")["student"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["student"]
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


# ---- config values that cannot run: caught before anything is written or trained ------------------------------
SCHEDULER = 'name = "cosine"\nwarmup_steps = 2'
BAD_CONFIGS = {  # case: (text in the config, its replacement, what the message says)
    "accumulation_steps=0": ("accumulation_steps = 2", "accumulation_steps = 0",
                             "[train] accumulation_steps must be >= 1, got 0"),
    "log_every=0": ("progress = false", "progress = false\nlog_every = 0", "[train] log_every must be >= 1"),
    "eval_every=0": ("progress = false", "progress = false\neval_every = 0", "[train] eval_every must be >= 1, got 0"),
    "checkpoint_epochs=0": ("progress = false", "progress = false\ncheckpoint_epochs = 0", "[train] checkpoint_epochs must be >= 1, got 0"),
    "checkpoint_every=-1": ("progress = false", "progress = false\ncheckpoint_every = -1",
                            "[train] checkpoint_every must be >= 1, got -1; leave it out"),
    "best_metric=acc": ("progress = false", 'progress = false\nbest_metric = "acc"',
                        "[train] best_metric 'acc' is not an evaluation metric; use one of ('student_acc'"),
    "device=banana": ("progress = false", 'progress = false\ndevice = "banana"',
                      "[train] device 'banana' is not a device"),
    "epochs=0": ("epochs = 3", "epochs = 0", "[train] epochs = 0: must be >= 1"),
    "epochs=-2": ("epochs = 3", "epochs = -2", "[train] epochs = -2: must be >= 1"),
    "optimizer kwargs": ("lr = 0.01", "lr = 0.01\nkwargs = { nesterov = true }",
                         "[optimizer] name = 'adamw' (AdamW) failed (kwargs {"),
    "optimizer kwargs, the fix": ("lr = 0.01", "lr = 0.01\nkwargs = { nesterov = true }",
                                  "; give [optimizer] only arguments that torch.optim.AdamW takes"),
    "betas=[0.9]": ("lr = 0.01", "lr = 0.01\nbetas = [0.9]", "[optimizer] betas = [0.9]: give two numbers"),
    "optimizer factory + ignored lr": ('name = "adamw"', 'factory = "torch.optim:SGD"',
                                       "[optimizer] lr: not read with optimizer.factory"),
    "scheduler factory missing an argument": (SCHEDULER, 'factory = "torch.optim.lr_scheduler:StepLR"',
                                              "[scheduler] factory = 'torch.optim.lr_scheduler:StepLR' failed: "
                                              "TypeError: StepLR.__init__() missing 1 required positional argument: 'step_size'; it is "
                                              "called as factory(optimizer, **kwargs): give its other arguments in "
                                              "[scheduler] kwargs"),
    "ignored scheduler kwargs": (SCHEDULER, SCHEDULER + "\nkwargs = { T_max = 3 }",
                                 "[scheduler] kwargs: not read with scheduler.name"),
    "string in a schedule": ("start = 4.0", 'start = "4"', "[loss] temperature: bad linear schedule"),
    "temperature reaches 0": ("end = 1.0", "end = 0.0",
                              "[loss] temperature: the temperature schedule gives 0.0 at the end of its ramp; a "
                              "temperature must be in [0.05, 100]"),
    "a factory that raises": ('"userproj:student"', '"userproj:boom"',
                              "student.factory = 'userproj:boom' failed: RuntimeError: the weights server is down"),
    "data factory returning a non-iterable": ('train = "userproj:train_loader"', 'train = "userproj:not_a_loader"',
                                              "data.train = 'userproj:not_a_loader' gave a int, not an iterable"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_value_is_exit_2_before_anything_is_written(project, tmp_path, capsys, case):
    old, new, message = BAD_CONFIGS[case]
    cfg = project()
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    err = _err(capsys)
    assert message in err and err.count("\n") == 1, err  # one message
    assert not (tmp_path / "r").exists()


def test_device_cuda_without_a_gpu(project, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = project(extra='device = "cuda"\n')
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "[train] device 'cuda': no CUDA GPU is available here" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_lm_demo_seq_len_beyond_the_model(tmp_path, capsys):
    assert main(["lm-demo", "--seq-len", "1000000", "--out", str(tmp_path / "lm")]) == 2
    assert "--seq-len must be in [2, 4096], got 1000000" in _err(capsys)
    assert not (tmp_path / "lm").exists()


def test_failure_at_the_first_step_leaves_a_reusable_folder(project, tmp_path, capsys):
    cfg = project(student="wide_student", epochs=1)
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2  # shapes differ: found at the first step
    assert "differ in shape" in _err(capsys)
    assert (tmp_path / "r" / "run.json").exists() and not (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    assert main(["resume", "r"]) == 2
    err = _err(capsys)
    assert "holds no checkpoint: its run stopped before its first checkpoint" in err and "fastkd distill" in err
    cfg.write_text(cfg.read_text().replace("userproj:wide_student", "userproj:student"))  # the fix
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 0  # the folder is reused
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["epoch"] == 1


def test_corrupt_last_checkpoint_advice_can_be_followed(project, tmp_path, capsys):
    cfg = project(epochs=2)
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 0
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x04  # one flipped bit inside a tensor
    last.write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "fastkd", "resume", "r"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "checksum does not match" in r.stderr and "`fastkd resume r --checkpoint best`" in r.stderr
    assert main(["resume", "r", "--checkpoint", "best"]) == 0  # the advice, followed
    assert main(["resume", "r", "--checkpoint", "nothing.pt"]) == 2
    assert "use --checkpoint last, best or a checkpoint's path" in _err(capsys)


# ---- runs that cannot write or would train nothing: one message, exit 2 ------------------------------------------
def _run_folder_failures(tmp_path, monkeypatch, case):
    from fastkd.train import checkpoint  # noqa: PLC0415

    run = tmp_path / "r"
    if case == "disk full at a checkpoint":
        def full(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint._HashingWriter, "write", full)
        return "no space is left on its device. Free space on it or choose another run folder"
    if case == "folder not writable":
        real = Path.mkdir

        def denied(self, *args, **kwargs):
            if self.absolute() == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", denied)
        return "it is not writable (permission denied) (writing r). Make it writable or choose another run folder"
    run.write_text("a file where the run folder should be")
    return "is a file, not a folder; choose a new or empty folder"


@pytest.mark.parametrize("case", ["disk full at a checkpoint", "folder not writable", "--out is a file"])
def test_unwritable_or_full_run_folder_is_exit_2(project, tmp_path, capsys, monkeypatch, case):
    cfg = project(epochs=1)
    message = _run_folder_failures(tmp_path, monkeypatch, case)
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and ("r:" in err or "r " in err), err
    if case == "disk full at a checkpoint":  # trained, then could not save: no temporary file left behind
        assert "cannot write to the run folder r: " in err and not list((tmp_path / "r").rglob("*.tmp"))


@pytest.mark.parametrize("case", ["empty loader", "generator, 3 epochs"])
def test_data_that_would_train_nothing_is_exit_2(project, tmp_path, capsys, case):
    cfg = project(epochs=3)
    factory, message = {
        "empty loader": ("empty_loader", "data.train is empty (len 0): there is nothing to train on"),
        "generator, 3 epochs": ("one_pass_loader", "data.train is an iterator (generator), used up by the first "
                                "epoch: epochs 2 to 3 would train nothing. Pass a loader that can be iterated once per "
                                "epoch"),
    }[case]
    text = cfg.read_text().replace("userproj:train_loader", f"userproj:{factory}")
    cfg.write_text(text.replace('name = "cosine"', 'name = "constant"'))  # a generator has no len()
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    err = _err(capsys)
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_bf16_teacher_under_fp32(project, tmp_path):
    cfg = project(epochs=1)
    cfg.write_text(cfg.read_text().replace('teacher = "userproj:teacher"', 'teacher = "userproj:bf16_teacher"'))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 0
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["step"] == 3


# ---- offline distillation: cache-teacher, then [teacher] cache -------------------------------------------
def _offline_config(project, cache="cache", train="train_loader", name="offline.toml"):
    cfg = project(name=name, epochs=2)
    text = cfg.read_text().replace('teacher = "userproj:teacher"\n', "")
    text = text.replace('train = "userproj:train_loader"', f'train = "userproj:{train}"')
    cfg.write_text(text + f'\n[teacher]\nfactory = "userproj:teacher"\ncache = "{cache}"\n')
    return cfg


def test_cache_teacher_then_distill_offline_and_resume(project, tmp_path, capsys, monkeypatch):
    cfg = _offline_config(project)
    assert main(["cache-teacher", "--config", str(cfg), "--top-k", "2", "--out", "cache"]) == 0
    printed = capsys.readouterr().out
    assert "train: TeacherCache(" in printed and "40 examples" in printed and "top_k=2" in printed
    assert "eval: TeacherCache(" in printed and '[teacher] cache = "cache"' in printed
    mtime = (tmp_path / "cache" / "train" / "manifest.json").stat().st_mtime_ns
    assert main(["cache-teacher", "--config", str(cfg), "--top-k", "2", "--out", "cache"]) == 0  # reused
    assert (tmp_path / "cache" / "train" / "manifest.json").stat().st_mtime_ns == mtime
    assert main(["distill", "--config", str(cfg), "--out", "ref"]) == 0
    meta = json.loads((tmp_path / "ref" / "run.json").read_text())["fingerprint"]
    assert meta["teacher"] is None and meta["teacher_cache"]["top_k"] == 2
    rows = (tmp_path / "ref" / "eval.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert last["teacher_ce"] == "nan"  # the eval split's cache holds the top-k alone
    # The teacher metrics come from the eval split's cache: those of the online run with the same teacher.
    assert main(["distill", "--config", str(project(name="online.toml", epochs=2)), "--out", "online"]) == 0
    rows = (tmp_path / "online" / "eval.csv").read_text().splitlines()
    online = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert last["teacher_acc"] == online["teacher_acc"] and last["rows"] == online["rows"]
    # Interrupted and resumed with `fastkd resume`: the same weights as the uninterrupted run.
    real = Distiller._run_epoch

    def interrupted(self, loader, n):
        if self.state.epoch == 1:
            raise KeyboardInterrupt
        return real(self, loader, n)

    monkeypatch.setattr(Distiller, "_run_epoch", interrupted)
    assert main(["distill", "--config", str(cfg), "--out", "run"]) == 130
    monkeypatch.setattr(Distiller, "_run_epoch", real)
    assert main(["resume", "run"]) == 0
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["student"]
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_offline_config_errors(project, tmp_path, capsys):
    cfg = _offline_config(project, cache="nowhere")
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "[teacher] cache = 'nowhere': no teacher cache there" in _err(capsys)
    cfg.write_text(cfg.read_text().replace("cache = ", "cahce = "))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "unknown key 'cahce' in [teacher] (did you mean 'cache'?)" in _err(capsys)
    cfg.write_text(cfg.read_text().replace('factory = "userproj:teacher"\ncahce = "nowhere"\n', ""))
    assert main(["distill", "--config", str(cfg), "--out", "r"]) == 2
    assert "missing teacher.factory" in _err(capsys) and not Path("r").exists()
    # A cache built from other data of the same length: refused before anything is written.
    built = _offline_config(project, name="built.toml")
    assert main(["cache-teacher", "--config", str(built), "--top-k", "2", "--out", "cache"]) == 0
    other = _offline_config(project, train="other_train_loader", name="other.toml")
    assert main(["distill", "--config", str(other), "--out", "r"]) == 2
    err = _err(capsys)
    assert "[teacher] cache = 'cache' (data.train)" in err and "another dataset of the same length" in err
    assert not Path("r").exists()
    # cache-teacher needs a DataLoader over a dataset, and a teacher to run.
    assert main(["cache-teacher", "--config", str(_offline_config(project, train="batch_list", name="list.toml")),
                 "--top-k", "2", "--out", "c2"]) == 2
    assert "data.train: fastkd cache-teacher needs a torch.utils.data.DataLoader" in _err(capsys)
    assert main(["cache-teacher", "--config", str(built), "--top-k", "9", "--out", "c3"]) == 2
    assert "top_k=9 is more than the teacher's vocabulary (3 logits per position)" in _err(capsys)
