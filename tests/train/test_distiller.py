"""fastkd.Distiller, schedules and checkpoint I/O (CPU; small models, seconds in all)."""

from __future__ import annotations

import copy
import csv
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd.train.checkpoint import CheckpointError, load_checkpoint, save_atomic
from fastkd.train.distiller import Callback, Distiller, RunDirError
from fastkd.train.schedules import Constant, Cosine, Linear, as_schedule

IGNORE = -100


class TokenModel(nn.Module):
    """(B, S) token ids -> (B, S, V) logits."""

    def __init__(self, vocab=11, dim=8, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.emb(x))))


def mlp(d_in=6, hidden=12, classes=5, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))


def class_data(n=48, d_in=6, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = IGNORE  # uneven valid rows per micro-batch
    return TensorDataset(x, y)


def token_data(n=24, seq=7, vocab=11, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = torch.roll(x, -1, dims=1)
    lengths = torch.randint(2, seq + 1, (n,), generator=g)
    y[torch.arange(seq)[None, :] >= lengths[:, None]] = IGNORE  # padding
    return TensorDataset(x, y)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


# ---- gradient accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classification", "tokens"])
def test_accumulation_matches_one_big_batch(kind):
    """4 micro-batches of 6 give the update of one batch of 24, with uneven ignore_index padding."""
    if kind == "classification":
        data, make = class_data(), lambda s: mlp(seed=s)
    else:
        data, make = token_data(), lambda s: (torch.manual_seed(s), TokenModel())[1]
    teacher = make(10)
    results = []
    for batch, accum in ((24, 1), (6, 4)):
        student = make(0)
        d = Distiller(copy.deepcopy(teacher), student, sgd, temperature=2.0, hard_weight=0.3, max_grad_norm=5.0,
                      accumulation_steps=accum, progress=False)
        d.fit(DataLoader(data, batch_size=batch), epochs=3)
        results.append(weights(student))
    assert d.state.step == 3 * len(data) // 24
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_partial_last_window_is_normalised_by_its_own_rows():
    # 5 micro-batches with accumulation 2: the last window holds one micro-batch.
    data = class_data(n=30)
    teacher = mlp(seed=3)
    a, b = mlp(), mlp()
    Distiller(teacher, a, sgd, accumulation_steps=2, progress=False).fit(DataLoader(data, batch_size=6))
    # Reference: the same windows as single batches.
    xs, ys = data.tensors
    windows = [(xs[0:12], ys[0:12]), (xs[12:24], ys[12:24]), (xs[24:30], ys[24:30])]
    Distiller(teacher, b, sgd, progress=False).fit(windows)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- exact resume ----------------------------------------------------------------------------------------
class Interrupt(Callback):
    def __init__(self, at, crash):
        self.at, self.crash = at, crash

    def on_step_end(self, distiller, logs):
        if logs["step"] == self.at:
            if self.crash:
                raise KeyboardInterrupt("simulated crash")
            distiller.should_stop = True


def _resume_run(run_dir, callbacks=(), resume=False, seed=0):
    torch.manual_seed(123)
    teacher = mlp(seed=7, hidden=16)
    student = mlp(seed=seed, dropout=0.2)  # dropout: the RNG must be restored exactly
    loader = DataLoader(class_data(n=40), batch_size=6, shuffle=True)  # shuffling from torch's RNG
    d = Distiller(teacher, student, lambda p: torch.optim.AdamW(p, lr=3e-2),
                  scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7),
                  temperature={"schedule": "cosine", "start": 4.0, "end": 1.0}, hard_weight=0.5,
                  accumulation_steps=2, max_grad_norm=1.0, run_dir=run_dir, checkpoint_every=5, log_every=1,
                  callbacks=callbacks, progress=False)
    d.fit(loader, epochs=3, eval_loader=DataLoader(class_data(n=16, seed=9), batch_size=8), resume=resume)
    return d


@pytest.mark.parametrize("how", ["stop_mid_epoch", "crash_after_checkpoint"])
def test_interrupted_and_resumed_run_is_bit_exact(tmp_path, how):
    ref = _resume_run(tmp_path / "ref")
    crash = how == "crash_after_checkpoint"
    run = tmp_path / "run"
    if crash:
        with pytest.raises(KeyboardInterrupt):
            _resume_run(run, callbacks=[Interrupt(7, crash=True)])  # last checkpoint: step 5
    else:
        _resume_run(run, callbacks=[Interrupt(6, crash=False)])
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == (5 if crash else 6)
    resumed = _resume_run(run, resume=True, seed=99)  # fresh, differently initialised models
    assert resumed.state.step == ref.state.step == 12
    for a, b in zip(ref.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == ref.optimizer.state_dict()["state"][0]["step"]
    # The metrics log holds every step exactly once (rows after the checkpoint were dropped and rewritten).
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, 13))
    with open(run / "eval.csv") as f, open(tmp_path / "ref" / "eval.csv") as g:
        assert [r["student_acc"] for r in csv.DictReader(f)] == [r["student_acc"] for r in csv.DictReader(g)]


def test_resume_refuses_changed_settings(tmp_path):
    _resume_run(tmp_path / "run", callbacks=[Interrupt(3, crash=False)])
    torch.manual_seed(0)
    d = Distiller(mlp(seed=7, hidden=16), mlp(dropout=0.2), lambda p: torch.optim.AdamW(p, lr=1e-3),
                  run_dir=tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="different run .*optimizer_defaults"):
        d.fit(DataLoader(class_data(), batch_size=6), resume=True)


# ---- run folder protection ---------------------------------------------------------------------------------
def test_run_dir_holding_another_run_is_not_overwritten(tmp_path):
    data = DataLoader(class_data(), batch_size=12)
    Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False).fit(data)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="different run"):
        Distiller(mlp(seed=1), mlp(), sgd, temperature=3.0, run_dir=tmp_path, progress=False).fit(data)
    with pytest.raises(RunDirError, match="already holds this run"):
        Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False).fit(data)
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path / "other", progress=False).fit(data)


# ---- non-finite steps --------------------------------------------------------------------------------------
def test_non_finite_gradient_step_is_skipped_and_counted(tmp_path):
    x, y = class_data(n=36).tensors
    x = x.clone()
    x[14] = float("inf")  # third micro-batch of 6 -> NaN loss and gradient
    student = mlp()
    seen = []

    class Watch(Callback):
        def on_step_end(self, distiller, logs):
            seen.append((logs["step"], logs["finite"], weights(distiller.student)))

    d = Distiller(mlp(seed=4), student, lambda p: torch.optim.Adam(p, lr=1e-2),
                  scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
                  max_grad_norm=1.0, run_dir=tmp_path, log_every=100, callbacks=[Watch()], progress=False)
    d.fit(DataLoader(TensorDataset(x, y), batch_size=6), epochs=1)
    assert d.state.skipped == 1 and d.state.step == 6
    assert [f for _, f, _ in seen] == [True, True, False, True, True, True]
    for a, b in zip(seen[1][2], seen[2][2]):  # the skipped step changed nothing
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert d.optimizer.state_dict()["state"][0]["step"] == 5  # no optimizer step
    assert d.scheduler.last_epoch == 5  # no scheduler step
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["skipped"]) for r in rows] == [("3", "1")]  # logged although log_every=100
    assert not math.isfinite(float(rows[0]["grad_norm"]))


# ---- schedules ---------------------------------------------------------------------------------------------
def test_schedules():
    assert Constant(2.0)(10**6) == 2.0
    lin = Linear(4.0, 1.0, steps=10)
    assert [lin(s) for s in (0, 5, 10, 20)] == [4.0, 2.5, 1.0, 1.0]
    cos = Cosine(4.0, 1.0, steps=10, warmup=2)
    assert cos(0) == cos(2) == 4.0 and cos(7) == pytest.approx(2.5) and cos(12) == cos(99) == 1.0
    assert as_schedule(3) == Constant(3.0)
    assert as_schedule({"schedule": "linear", "start": 1, "end": 0}).with_total_steps(4)(2) == 0.5
    assert as_schedule(lambda s: 0.1 * s)(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        as_schedule({"schedule": "cosin", "start": 1, "end": 0})
    with pytest.raises(ValueError, match="unknown key"):
        as_schedule({"schedule": "linear", "start": 1, "end": 0, "stps": 3})
    with pytest.raises(RuntimeError, match="no length"):
        Linear(1.0, 0.0)(3)


def test_trainer_schedules_reach_the_kernel(monkeypatch):
    seen = []
    real = fastkd.kd_loss

    def spy(*args, **kw):
        if torch.is_grad_enabled():
            seen.append((kw["temperature"], kw["soft_weight"], kw["hard_weight"]))
        return real(*args, **kw)

    monkeypatch.setattr(fastkd.train.teacher, "kd_loss", spy)  # the name the trainer calls
    d = Distiller(mlp(seed=1), mlp(), sgd, temperature={"schedule": "linear", "start": 5.0, "end": 1.0},
                  soft_weight=lambda step: 1.0 - 0.1 * step, hard_weight=Cosine(0.0, 1.0, steps=3), progress=False)
    d.fit(DataLoader(class_data(n=30), batch_size=6), epochs=1)  # 5 steps: the linear ramp spans them
    assert [round(t, 6) for t, _, _ in seen] == [5.0, 4.2, 3.4, 2.6, 1.8]
    assert [round(w, 6) for _, w, _ in seen] == [1.0, 0.9, 0.8, 0.7, 0.6]
    assert [round(h, 6) for _, _, h in seen] == [0.0, 0.25, 0.75, 1.0, 1.0]


# ---- checkpoints -------------------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"format": "fastkd.checkpoint", "version": 1, "w": torch.arange(1000.0)}
    save_atomic(good, path)
    def dies_mid_write(obj, f, *a, **kw):
        f.write(b"half a checkpoint")  # a half-written file...
        raise OSError("disk full")  # ...and the writer dies

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({**good, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], good["w"])  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(bad)
    torch.save({"some": "dict"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fastkd trainer checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_best_checkpoint_follows_the_metric(tmp_path):
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, best_metric="ce", progress=False)
    hist = d.fit(DataLoader(class_data(), batch_size=12), epochs=3, eval_loader=DataLoader(class_data(seed=5)))
    assert d.best_mode == "min"
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["state"]["best"] == min(h["ce"] for h in hist)


# ---- evaluation, teacher handling, errors ------------------------------------------------------------------
def test_evaluate_metrics_and_frozen_teacher():
    teacher = mlp(seed=1)
    student = copy.deepcopy(teacher)
    d = Distiller(teacher, student, sgd, temperature=2.0, progress=False)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    m = d.evaluate(DataLoader(class_data(), batch_size=10))
    assert m["agreement"] == 1.0 and m["student_acc"] == m["teacher_acc"]
    assert abs(m["kd_loss"]) < 1e-6 and m["ce"] == pytest.approx(m["teacher_ce"])
    assert m["rows"] == int((class_data().tensors[1] != IGNORE).sum())
    d.fit(DataLoader(class_data(), batch_size=12))
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_token_outputs_and_dict_batches():
    class DictModel(TokenModel):
        def forward(self, input_ids):
            return SimpleNamespace(logits=super().forward(input_ids))  # a Hugging Face-like output

    x, y = token_data().tensors
    batches = [{"input_ids": x[i:i + 6], "labels": y[i:i + 6]} for i in range(0, 24, 6)]
    d = Distiller(DictModel(), DictModel(), sgd, temperature=2.0, hard_weight=0.5, progress=False)
    d.fit(batches, epochs=1)
    m = d.evaluate(batches)
    assert m["rows"] == int((y != IGNORE).sum()) and 0 <= m["student_acc"] <= 1


def test_mismatched_output_shapes_are_a_clear_error():
    d = Distiller(mlp(classes=7), mlp(classes=5), sgd, progress=False)
    with pytest.raises(ValueError, match=r"teacher \(12, 7\), student \(12, 5\)"):
        d.fit(DataLoader(class_data(), batch_size=12))


def test_bf16_autocast_on_cpu_and_fp16_refused():
    d = Distiller(mlp(seed=1), mlp(), sgd, precision="bf16", hard_weight=0.5, progress=False)
    d.fit(DataLoader(class_data(), batch_size=12))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in d.student.parameters())
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        Distiller(mlp(), mlp(), sgd, precision="fp16", device="cpu")


def test_value_clipping_and_labels_only_baseline():
    student = mlp()
    d = Distiller(None, student, lambda p: torch.optim.SGD(p, lr=1.0), clip_value=1e-3, progress=False)
    before = weights(student)
    d.fit([next(iter(DataLoader(class_data(), batch_size=48)))], epochs=1)
    step = max(float((a - b).abs().max()) for a, b in zip(weights(student), before))
    assert 0 < step <= 1e-3 + 1e-7  # lr 1 x |grad| <= clip_value
    m = d.evaluate(DataLoader(class_data(), batch_size=12))
    assert math.isnan(m["teacher_acc"]) and math.isfinite(m["ce"])


def test_csv_log_has_every_term(tmp_path):
    d = Distiller(mlp(seed=1), mlp(), sgd, hard_weight=0.5, temperature=2.0, run_dir=tmp_path, log_every=1,
                  progress=False)
    d.fit(DataLoader(class_data(), batch_size=12))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    r = {k: float(v) for k, v in rows[0].items()}
    assert r["loss"] == pytest.approx(r["kd_loss"] + 0.5 * r["ce"], rel=1e-5)
    assert r["temperature"] == 2.0 and r["lr"] == 0.5 and r["grad_norm"] > 0 and r["rows_per_s"] > 0
    assert os.path.exists(tmp_path / "run.json")


# ---- reliability: the loader, the run length, the teacher's dtype, the run folder -------------------------------
class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, distiller, logs):
        if distiller.state.step == self.step:
            distiller.should_stop = True


class NoLen:
    """A re-iterable loader without len() (a streaming dataset, say)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _stopped_run(run_dir, at=3, **kw):
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=run_dir, callbacks=[StopAt(at)], progress=False, **kw)
    d.fit(DataLoader(class_data(), batch_size=6), epochs=2)  # 8 micro-batches per epoch; stopped mid-epoch 1
    assert d.state.batch_in_epoch == at
    return d


@pytest.mark.parametrize("loader", ["with len", "without len"])
def test_loader_shorter_on_resume_is_a_clear_error(tmp_path, loader):
    """The checkpoint is at micro-batch 3 of epoch 1; a loader that now ends before it cannot continue that
    run: one OptionError naming train_loader and the fix (never a bare StopIteration)."""
    _stopped_run(tmp_path)
    short = list(DataLoader(class_data(n=12), batch_size=6))  # 2 batches
    with pytest.raises(fastkd.train.OptionError, match=r"checkpoint is at micro-batch 3 of epoch 1, but train_loader "
                                                       r"now ends after 2 batches: it is not the loader of the "
                                                       r"interrupted run\. Resume with that run's data") as exc:
        d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False)
        d.fit(short if loader == "with len" else NoLen(short), epochs=2, resume=True)
    assert exc.value.option == "train_loader"
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False)  # the right loader still resumes it
    d.fit(DataLoader(class_data(), batch_size=6), epochs=2, resume=True)
    assert d.state.step == 16


@pytest.mark.parametrize("change", ["more epochs", "more data"])
def test_resume_with_another_run_length_keeps_the_schedules_and_warns(tmp_path, caplog, change):
    """The schedules are part of the run being continued: resumed over another length they keep the one they
    started with (re-laid mid-run they would jump), and a warning says so, with the numbers."""
    temperature = {"schedule": "linear", "start": 4.0, "end": 1.0}
    _stopped_run(tmp_path, temperature=temperature)  # 2 epochs x 8 steps: the ramp over 16 steps
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False, temperature=temperature)
    epochs, n = (4, 48) if change == "more epochs" else (2, 96)
    with caplog.at_level("WARNING", logger="fastkd.train"):
        d.fit(DataLoader(class_data(n=n), batch_size=6), epochs=epochs, resume=True)
    total = 32
    assert (f"resuming with {epochs} epoch(s) of this train_loader ({total} optimizer steps), but the run's schedules "
            "were laid out over 16 steps when it started: they keep that length") in caplog.text
    assert d.state.total_steps == 16 and d.state.step == total
    assert d.hparams(8)["temperature"] == 2.5 and d.hparams(16)["temperature"] == d.hparams(30)["temperature"] == 1.0
    caplog.clear()
    same = tmp_path / "same"
    _stopped_run(same)
    with caplog.at_level("WARNING", logger="fastkd.train"):
        Distiller(mlp(seed=1), mlp(), sgd, run_dir=same, progress=False).fit(
            DataLoader(class_data(), batch_size=6), epochs=2, resume=True)
    assert "resuming with" not in caplog.text  # the same length: no warning


def test_teacher_in_another_dtype_under_fp32(tmp_path):
    """A bf16 teacher with fp32 batches and precision fp32: its floating-point inputs are cast to its dtype
    (it runs as it would alone: no matmul dtype error); kd_loss takes its bf16 logits."""
    teacher = mlp(seed=1).to(torch.bfloat16)
    d = Distiller(teacher, mlp(), sgd, precision="fp32", progress=False)
    loader = DataLoader(class_data(), batch_size=12)
    d.fit(loader)
    assert d.state.step == 4 and d.state.skipped == 0
    x = next(iter(loader))[0]
    assert torch.equal(d._target((x,), {}, None, like=torch.empty(12, 5)), teacher(x.to(torch.bfloat16)))
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    ids = torch.randint(0, 11, (4, 7))  # integer inputs (token ids) are never cast
    tok = Distiller(TokenModel().to(torch.bfloat16), TokenModel(), sgd, progress=False)
    tok.fit([(ids, torch.roll(ids, -1, 1))])
    assert tok.state.step == 1


def test_a_window_without_valid_rows_logs_no_valid_rows(caplog):
    x, y = class_data(n=24).tensors
    y = y.clone()
    y[6:12] = IGNORE  # the second micro-batch: every label ignored
    with caplog.at_level("WARNING", logger="fastkd.train"):
        d = Distiller(mlp(seed=1), mlp(), sgd, progress=False)
        d.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    assert d.state.skipped == 1 and d.state.step == 4
    assert ("step 1 skipped: no valid rows in its window (every label is ignore_index=-100) (1 skipped so far)"
            in caplog.text)
    assert "gradient norm" not in caplog.text


@pytest.mark.parametrize("case", ["empty list", "empty DataLoader", "generator, 2 epochs", "used-up iterator"])
def test_a_run_that_would_train_nothing_is_an_error(tmp_path, case):
    batches = list(DataLoader(class_data(), batch_size=12))
    loader, epochs, message = {
        "empty list": ([], 1, "train_loader is empty (len 0)"),
        "empty DataLoader": (DataLoader(class_data(n=0), batch_size=4), 1, "train_loader is empty (len 0)"),
        "generator, 2 epochs": ((b for b in batches), 2, "train_loader is an iterator (generator), used up by the "
                                "first epoch: epochs 2 to 2 would train nothing"),
        "used-up iterator": ((lambda it: (list(it), it)[1])(iter(batches)), 1,
                             "train_loader gave no batch in epoch 1 (empty, or an iterator already used up), so the "
                             "epoch trained nothing"),
    }[case]
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path / "r", progress=False)
    with pytest.raises(fastkd.train.OptionError, match=re.escape(message)) as exc:
        d.fit(loader, epochs=epochs)
    assert exc.value.option == "train_loader" and d.state.step == 0
    assert not (tmp_path / "r" / "checkpoints").exists()
    one = Distiller(mlp(seed=1), mlp(), sgd, progress=False)
    one.fit((b for b in batches), epochs=1)  # a generator for one epoch is fine
    assert one.state.step == 4


def test_a_new_run_removes_temp_files_of_a_killed_writer(tmp_path):
    """A run killed (kill -9) while writing its first checkpoint leaves run.json and a temporary file; the next
    run in that folder removes every such file before it starts (best.pt's too, which it may never write)."""
    Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, progress=False).folder.write_meta({"a": "killed run"})
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in (".last.pt.k1ll3d.tmp", ".best.pt.h4lf.tmp"):
        (ckpts / name).write_bytes(b"half a checkpoint")
    seen = []

    class Look(Callback):
        def on_step_end(self, distiller, logs):
            seen.append(sorted(p.name for p in ckpts.iterdir()))

    Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path, callbacks=[Look()], progress=False).fit(
        DataLoader(class_data(), batch_size=12))
    assert seen[0] == []  # gone before the first step
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("where", ["run.json", "metrics.csv", "checkpoint"])
def test_full_disk_is_one_error_naming_the_run_folder(tmp_path, monkeypatch, where):
    import errno  # noqa: PLC0415

    from fastkd.train import checkpoint, metrics, run_dir  # noqa: PLC0415

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"run.json": (run_dir.Path, "write_text"), "metrics.csv": (metrics.csv.DictWriter, "writeheader"),
              "checkpoint": (checkpoint._HashingWriter, "write")}[where]
    monkeypatch.setattr(*target, full)
    d = Distiller(mlp(seed=1), mlp(), sgd, run_dir=tmp_path / "r", progress=False)
    with pytest.raises(RunDirError, match=re.escape(f"cannot write to the run folder {tmp_path / 'r'}: no space is left "
                                                    "on its device")) as exc:
        d.fit(DataLoader(class_data(), batch_size=12))
    assert "Free space on it or choose another run folder" in str(exc.value)
    assert d.state.step == (4 if where == "checkpoint" else 0)  # the first write comes before any training
    assert not list((tmp_path / "r").rglob("*.tmp"))


def test_shift_labels_option_trains_on_the_next_token():
    """shift_labels=True with Hugging Face-convention labels (labels = inputs) = the labels shifted by hand
    (position i towards label i + 1, the last position nowhere); the option joins the run's fingerprint
    only when set (run folders made before it existed stay resumable)."""
    x, _ = token_data().tensors
    hf = [(x[i:i + 6], x[i:i + 6]) for i in range(0, 24, 6)]
    shifted = [(a, fastkd.shift_labels(b)) for a, b in hf]
    results = []
    for batches, shift in ((hf, True), (shifted, False)):
        student = (torch.manual_seed(0), TokenModel())[1]
        d = Distiller((torch.manual_seed(5), TokenModel())[1], student, sgd, hard_weight=0.5, shift_labels=shift,
                      progress=False)
        d.fit(batches)
        results.append(weights(student))
        assert ("shift_labels" in d.fingerprint()) is shift
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(fastkd.train.OptionError, match="shift_labels must be true or false"):
        Distiller(None, TokenModel(), sgd, shift_labels="yes")
