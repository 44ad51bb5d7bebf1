"""Label helpers for the losses: the causal shift without copying the logits."""

from __future__ import annotations

import torch

__all__ = ["shift_labels"]


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for a causal LM's logits *unshifted*: ``out[..., i] = labels[..., i + 1]`` and the last
    position ``ignore_index``.

    The usual pattern ``loss(logits[:, :-1], labels[:, 1:])`` slices the logits, and a slice of a
    ``(B, S, V)`` tensor along S is not one strided block of rows: a kernel must copy both models' logits
    (two (B, S, V) tensors). ``loss(logits, teacher_logits, shift_labels(labels))`` gives the same loss and
    the same gradient (the last position of each sequence has no target: it counts nowhere) and reads the
    logits in place. Costs one small copy of the labels."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 1:
        raise TypeError("fastkd.shift_labels: labels must be an integer tensor [..., seq], got "
                        f"{type(labels).__name__}{'' if not isinstance(labels, torch.Tensor) else f' {labels.dtype}'}")
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out
