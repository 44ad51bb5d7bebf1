"""fastkd.Distiller under DDP: 2 CPU processes (gloo) spawned from pytest."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import spawn_ranks
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastkd.data import CachedTeacherDataset, TeacherCache
from fastkd.train.distiller import Distiller

IGNORE = -100
WORLD = 2


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.4] = IGNORE  # the ranks see different numbers of valid rows
    return TensorDataset(x, y)


def _models():
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    return teacher, student


def _opt(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


KW = dict(temperature=2.0, hard_weight=0.5, max_grad_norm=2.0, progress=False, log_every=1)


def _setup(cache_dir):
    """(teacher or None, student, data, teacher_cache or None): online, or offline from the cache in cache_dir."""
    teacher, student = _models()
    data = _data()
    if cache_dir is None:
        return teacher, student, data, None
    cache = TeacherCache(cache_dir)
    return None, student, CachedTeacherDataset(data, cache), cache


def _worker(rank, run_dir, out, cache_dir):
    teacher, student, data, cache = _setup(cache_dir)
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    # Per rank: micro-batches of 6, 2 per step -> a global window of 24 rows before masking.
    d = Distiller(teacher, student, _opt, accumulation_steps=2, run_dir=run_dir, teacher_cache=cache, **KW)
    d.fit(DataLoader(data, batch_size=6, sampler=sampler), epochs=2,
          eval_loader=DataLoader(data, batch_size=8, sampler=sampler))
    if rank == 0:
        torch.save({"weights": d.student.state_dict(), "history": d.state.history}, out)


@pytest.mark.parametrize("teacher_kind", ["online", "offline"])
def test_two_process_ddp_equals_one_process_global_batch(tmp_path, teacher_kind):
    """Also offline (a teacher cache, top-3 of 5 classes): DistributedSampler over CachedTeacherDataset."""
    out = tmp_path / "ddp.pt"
    cache_dir = None
    if teacher_kind == "offline":
        cache_dir = str(tmp_path / "cache")
        TeacherCache.build(cache_dir, _models()[0], _data(), top_k=3, progress=False)
    spawn_ranks(_worker, str(tmp_path / "run"), str(out), cache_dir, world=WORLD)
    ddp = torch.load(out)

    # One process, one batch of 24 = the union of the two ranks' windows (DistributedSampler interleaves).
    teacher, student, data, cache = _setup(cache_dir)
    ref = Distiller(teacher, student, _opt, teacher_cache=cache, **KW)
    hist = ref.fit(DataLoader(data, batch_size=24), epochs=2, eval_loader=DataLoader(data, batch_size=8))
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ddp["weights"][k], v, rtol=1e-5, atol=1e-6)
    # Evaluation sums over the ranks.
    assert ddp["history"][-1]["rows"] == hist[-1]["rows"] == int((_data().tensors[1] != IGNORE).sum())
    assert abs(ddp["history"][-1]["student_acc"] - hist[-1]["student_acc"]) < 1e-6

    # Rank 0 alone wrote the logs: each step once.
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
