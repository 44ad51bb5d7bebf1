"""Named device sums: one tensor, read at once."""

from __future__ import annotations

import torch

from fastkd.train.stats import DeviceSums, EvalSums, WindowSums


def test_named_slots():
    s = DeviceSums(WindowSums, "cpu")
    s.add(rows=torch.tensor(3), loss=torch.tensor(1.5), samples=2)
    s.add(rows=torch.tensor(4), kd=0.25)
    view = s["rows"]
    assert view.dtype == torch.float32 and float(view) == 7.0
    s.add(rows=1)
    assert float(view) == 8.0  # a view: it follows later additions
    v = s.read()
    assert isinstance(v, WindowSums) and v == WindowSums(rows=8.0, loss=1.5, kd=0.25, ce=0.0, samples=2.0)
    e = DeviceSums(EvalSums, "cpu", dtype=torch.float64)
    e.add(teacher_ce=torch.tensor(0.1, dtype=torch.float64))
    e.all_reduce(world_size=1)
    assert e.tensor.dtype == torch.float64 and e.read().teacher_ce == 0.1 and e.read().rows == 0.0
