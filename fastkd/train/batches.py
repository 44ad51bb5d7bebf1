"""Batches in, logits out: what the trainer accepts from a loader and from a model.

- A batch is ``(inputs, labels)``, ``(inputs,)``, ``{"labels": ..., **model_kwargs}`` or bare inputs;
  ``inputs`` may itself be a tensor, a tuple of positional inputs or a dict of keyword inputs.
- A model's output is a logits tensor, an object with ``.logits`` (Hugging Face), or a tuple whose first
  element is the logits.
- A batch of an offline-distillation loader (``fastkd.CachedTeacherDataset``) is a :class:`CachedExample`:
  one of the batches above with the teacher's cached top-k values and indices of its positions.
- An optimizer step takes a *window* of up to ``accumulation_steps`` micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

__all__ = ["CachedExample", "to_device", "cast_floating", "floating_dtype", "split_batch", "logits_of", "valid_rows", "windows"]


class CachedExample(NamedTuple):
    """A dataset item (or, collated, a batch) with its cached teacher top-k; ``default_collate`` keeps the
    fields, stacking ``values`` and ``indices`` over the batch."""

    example: Any
    values: torch.Tensor  # [n_i, K], the teacher's K largest logits per position, descending
    indices: torch.Tensor  # [n_i, K] int32, their vocabulary indices


def to_device(obj, device):
    """``obj`` with every tensor in it (through dicts, tuples and lists) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return _same_sequence(obj, [to_device(v, device) for v in obj])
    return obj


def cast_floating(obj, dtype: torch.dtype):
    """``obj`` with every floating-point tensor in it (through dicts, tuples and lists) cast to ``dtype``;
    integer tensors (token ids, masks) and everything else as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return _same_sequence(obj, [cast_floating(v, dtype) for v in obj])
    return obj


def _same_sequence(obj: tuple | list, items: list):
    """``items`` in a sequence of ``obj``'s type (a NamedTuple such as CachedExample takes them as fields)."""
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


def floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The one floating dtype of ``module``'s parameters and buffers; None when it has none or several."""
    dtypes = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def split_batch(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """A batch -> the model's ``(args, kwargs)`` and the labels (None when it has none)."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            inputs, labels = batch
        elif len(batch) == 1:
            inputs, labels = batch[0], None
        else:
            raise ValueError(f"fastkd.Distiller: a batch tuple must be (inputs, labels) or (inputs,), got {len(batch)} "
                             "elements; pack several inputs as a tuple or dict: ((x1, x2), labels)")
        if isinstance(inputs, dict):
            return (), inputs, labels
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}, labels
        return (inputs,), {}, labels
    return (batch,), {}, None


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"fastkd.Distiller: the model returned {type(out).__name__}; expected a logits tensor, an "
                    "object with .logits, or a tuple whose first element is the logits")


def valid_rows(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Boolean mask over the rows of ``logits`` (all but the last dimension): the rows that count."""
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return labels != ignore_index


def windows(batches: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` batches from ``batches`` (the last one shorter); a window is drawn
    from the iterator only when asked for."""
    while True:
        window = []
        for _ in range(size):
            try:
                window.append(next(batches))
            except StopIteration:
                break
        if not window:
            return
        yield window
