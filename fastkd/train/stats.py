"""Named sums on the device: a training window's statistics and an evaluation's counts.

Each set of sums is one device tensor, so that summing it over the ranks is one ``all_reduce`` and
reading it is one host synchronisation; the names (fields of a NamedTuple) say which slot is which.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

import torch
import torch.distributed as dist

__all__ = ["WindowSums", "EvalSums", "DeviceSums"]


class WindowSums(NamedTuple):
    """One optimizer step, summed over its window of micro-batches and over the ranks."""

    rows: float  # valid (non-ignored) rows: the gradients are divided by their count
    loss: float  # the loss as trained (kd_loss with the step's weights, reduction "sum")
    kd: float  # the soft term alone (weights 1, 0); log steps only
    ce: float  # the hard term alone (weights 0, 1); log steps only
    samples: float  # batch elements (the first dimension of the logits)


class EvalSums(NamedTuple):
    """An evaluation, summed over its batches and over the ranks."""

    rows: float  # valid rows
    student_correct: float  # student top-1 == label
    teacher_correct: float  # teacher top-1 == label
    agree: float  # student top-1 == teacher top-1
    kd: float  # T^2-scaled divergence at the current temperature
    ce: float  # student cross-entropy
    teacher_ce: float


T = TypeVar("T", WindowSums, EvalSums)


class DeviceSums(Generic[T]):
    """Zeros on ``device`` with one slot per field of ``names``; ``read()`` returns a ``names`` of floats."""

    def __init__(self, names: type[T], device, dtype: torch.dtype = torch.float32):
        self.names = names
        self._slot = {name: i for i, name in enumerate(names._fields)}
        self.tensor = torch.zeros(len(names._fields), dtype=dtype, device=device)

    def add(self, **values) -> None:
        """Add to the named slots (device tensors or numbers; no host synchronisation)."""
        for name, value in values.items():
            self.tensor[self._slot[name]] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        """The slot ``name`` as a 0-d device tensor (a view: it follows later additions)."""
        return self.tensor[self._slot[name]]

    def all_reduce(self, world_size: int) -> None:
        """Sum over the ranks (one collective; nothing to do in a single process)."""
        if world_size > 1:
            dist.all_reduce(self.tensor)

    def read(self) -> T:
        """The sums as Python floats (one host synchronisation)."""
        return self.names(*self.tensor.tolist())
