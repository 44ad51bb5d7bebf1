"""Batches and model outputs the trainer accepts, and the windows of micro-batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastkd.train.batches import logits_of, split_batch, to_device, valid_rows, windows


def test_batch_forms():
    x, y = torch.zeros(2, 3), torch.tensor([1, -100])
    assert split_batch((x, y)) == ((x,), {}, y)
    assert split_batch([x]) == ((x,), {}, None)
    assert split_batch(x) == ((x,), {}, None)
    assert split_batch(((x, x), y)) == ((x, x), {}, y)
    assert split_batch(({"input_ids": x}, y)) == ((), {"input_ids": x}, y)
    assert split_batch({"input_ids": x, "labels": y}) == ((), {"input_ids": x}, y)
    with pytest.raises(ValueError, match="must be \\(inputs, labels\\) or \\(inputs,\\), got 3"):
        split_batch((x, x, y))
    moved = to_device({"a": [x, (y,)], "n": 3}, "cpu")
    assert moved["n"] == 3 and isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple)


def test_outputs_and_valid_rows():
    t = torch.randn(2, 5, 7)
    assert logits_of(t) is t and logits_of(SimpleNamespace(logits=t)) is t and logits_of((t, None)) is t
    with pytest.raises(TypeError, match="expected a logits tensor"):
        logits_of({"logits": t})
    labels = torch.tensor([[1, -100, 2, 3, -100], [0, 0, 0, 0, 0]])
    assert int(valid_rows(t, labels, -100).sum()) == 8
    assert valid_rows(t, None, -100).shape == (2, 5) and bool(valid_rows(t, None, -100).all())


def test_windows_draw_lazily():
    it = iter(range(7))
    assert next(windows(it, 3)) == [0, 1, 2]
    assert next(it) == 3  # nothing beyond the first window was drawn
    assert list(windows(iter(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert list(windows(iter([]), 4)) == []
