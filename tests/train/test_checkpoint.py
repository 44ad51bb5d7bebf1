"""Checkpoint files: verified (every flipped byte, every truncation, every foreign format is one
CheckpointError), atomic, the pre-checksum format still loading, and the temporary files of a killed
writer cleaned up."""

from __future__ import annotations

import io
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastkd.train.checkpoint import (
    MAGIC,
    CheckpointError,
    load_checkpoint,
    remove_stale_temp_files,
    save_atomic,
)
from fastkd.train.distiller import Distiller

ROOT = Path(__file__).resolve().parents[2]
HEADER = 48  # magic, SHA-256, length


def _distiller(run_dir, **kw):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return Distiller(teacher, student, lambda p: torch.optim.AdamW(p, lr=1e-2), run_dir=run_dir, progress=False,
                     tensorboard=False, **kw)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (24,), generator=g)), batch_size=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run folder: last.pt and best.pt after 2 epochs."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    _distiller(run).fit(_data(), epochs=2, eval_loader=_data())
    return run


def _student_after_load(path):
    d = _distiller(None)
    d.load_checkpoint(path)
    return d.student.state_dict()


def test_every_flipped_byte_is_detected(run, tmp_path):
    good = (run / "checkpoints" / "last.pt").read_bytes()
    assert good.startswith(MAGIC)
    rng = random.Random(14)
    positions = sorted(set(range(HEADER)) | set(rng.sample(range(len(good)), 200)))  # the header, and 200 more
    bad = tmp_path / "last.pt"
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 1 << rng.randrange(8)  # one bit, hence one byte
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match="unreadable or corrupt") as exc:
            load_checkpoint(bad)
        assert str(bad) in str(exc.value), pos
    # A handful through the trainer: the same error, with advice, and the student left untouched.
    d = _distiller(run)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    for pos in positions[::50]:
        data = bytearray(good)
        data[pos] ^= 0xFF
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match="corrupt"):
            d.load_checkpoint(bad)
        assert all(torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    bad.write_bytes(good)  # the untouched bytes load
    assert load_checkpoint(bad)["state"]["epoch"] == 2


def test_every_truncation_is_detected(run, tmp_path):
    good = (run / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "last.pt"
    for n in sorted({0, 1, 7, 8, 40, HEADER - 1, HEADER, HEADER + 1, len(good) // 2, len(good) - 1}):
        bad.write_bytes(good[:n])
        with pytest.raises(CheckpointError, match="unreadable or corrupt"):
            load_checkpoint(bad)
    bad.write_bytes(good + b"\0")  # grown is altered too
    with pytest.raises(CheckpointError, match="header says"):
        load_checkpoint(bad)


def test_wrong_formats_are_one_error(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b'{"not": "a checkpoint"}', "random.pt": bytes(range(256)) * 4,
             "zip.pt": b"PK\x03\x04 not really a zip"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="unreadable or corrupt"):
            load_checkpoint(tmp_path / name)
    save_atomic({"some": "dict"}, tmp_path / "foreign.pt")  # verified, but not the trainer's
    with pytest.raises(CheckpointError, match="not a fastkd trainer checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "folder.pt")


def test_checkpoint_of_before_checksums_loads_with_a_warning(run, tmp_path):
    """Written by torch.save alone (fastkd before the header): loaded unverified, with a warning; it resumes."""
    old = tmp_path / "old.pt"
    torch.save(torch.load(io.BytesIO((run / "checkpoints" / "last.pt").read_bytes()[HEADER:]),
                          weights_only=False), old)
    with pytest.warns(UserWarning, match="written before checkpoints carried a checksum"):
        ckpt = load_checkpoint(old)
    assert ckpt["state"]["epoch"] == 2
    with pytest.warns(UserWarning):
        assert all(torch.equal(a, b) for a, b in zip(_student_after_load(old).values(),
                                                      load_checkpoint(run / "checkpoints" / "last.pt")["student"].values()))


def test_corrupt_last_points_to_an_intact_best(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 3] ^= 0x10
    last.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum does not match") as exc:
        _distiller(copy).fit(_data(), epochs=3, resume=True)
    best = copy / "checkpoints" / "best.pt"
    assert f"{best} is intact" in str(exc.value) and "--checkpoint best" in str(exc.value)
    d = _distiller(copy)  # the advice can be followed
    d.fit(_data(), epochs=3, resume=str(best))
    assert d.state.epoch == 3


KILLED_WRITER = textwrap.dedent('''
    import os, sys, time
    from fastkd.train import checkpoint
    real_fsync = os.fsync
    def stall(fd):  # the data is in the temp file; the writer is killed before the rename
        print("writing", flush=True)
        time.sleep(60)
    checkpoint.os.fsync = stall
    checkpoint.save_atomic({"format": "fastkd.checkpoint", "version": 1}, sys.argv[1])
''')


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    target = folder / "last.pt"
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)  # kill -9
        p.wait(timeout=30)
    leftovers = list(folder.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()
    save_atomic({"format": "fastkd.checkpoint", "version": 1}, target)  # the next save cleans up
    assert sorted(f.name for f in folder.iterdir()) == ["last.pt"]
    (folder / "best.pt").write_bytes(b"")
    (folder / ".best.pt.x1y2.tmp").write_bytes(b"half")
    assert [f.name for f in remove_stale_temp_files(folder)] == [".best.pt.x1y2.tmp"]


def test_resume_removes_temp_files(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in (".last.pt.abc123.tmp", ".best.pt.def456.tmp"):
        (copy / "checkpoints" / name).write_bytes(b"half a checkpoint")
    _distiller(copy).fit(_data(), epochs=2, resume=True)  # nothing left to train: the cleanup alone
    assert sorted(f.name for f in (copy / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_run_checkpoint_initialises_a_model_from_the_cli(run, tmp_path):
    from fastkd.cli.distill import _load_weights  # noqa: PLC0415

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    _load_weights(model, run / "checkpoints" / "best.pt", "student")  # [student] checkpoint = ".../best.pt"
    best = load_checkpoint(run / "checkpoints" / "best.pt")["student"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a plain state_dict: read with weights_only
    _load_weights(model, tmp_path / "plain.pt", "student")
