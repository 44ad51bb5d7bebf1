"""The teacher side of a training step: a model run frozen (online), or its top-k read from a cache (offline).

Both give, per micro-batch, a *target* for the student's logits and know which loss takes it:

- :class:`OnlineTeacher`: the teacher module's logits (same shape as the student's) -> ``fastkd.kd_loss``;
- :class:`CachedTeacher`: the cached ``(values, indices)`` of the batch's positions, shaped like the student's
  logits with K in place of the vocabulary -> ``fastkd.topk_kd_loss``. No teacher runs.

The loop (distiller.py) asks ``target(batch_args, kwargs, cached, like=student_logits)``, passes the result
to ``loss``, and to ``top1`` for the evaluation's agreement and teacher accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..ops.kd import kd_loss
from ..ops.topk import topk_kd_loss
from ..reference.topk import check_topk_divergence
from .batches import cast_floating, floating_dtype, logits_of
from .config import OptionError

if TYPE_CHECKING:
    from ..data.teacher_cache import TeacherCache

__all__ = ["OnlineTeacher", "CachedTeacher", "NO_CACHE_ERROR"]

NO_CACHE_ERROR = ("fastkd.Distiller: with teacher_cache, every batch must carry its cached top-k: wrap the dataset "
                  "as fastkd.CachedTeacherDataset(dataset, cache) (or the loader with "
                  "fastkd.with_teacher_cache(loader, cache))")


class OnlineTeacher:
    """A frozen teacher module (eval mode, no gradients), run on every micro-batch."""

    name = "online"

    def __init__(self, module: nn.Module, device: torch.device, autocast):
        self.module = module.to(device).eval().requires_grad_(False)
        self.autocast = autocast  # () -> the step's autocast context
        # A teacher kept in a floating dtype of its own (a bf16 teacher, fp32 batches and precision="fp32")
        # gets its floating-point inputs in that dtype: it runs as it would on its own, and kd_loss takes its
        # logits in any floating dtype.
        self.dtype = floating_dtype(module)

    def identity(self) -> dict:
        return {"teacher": type(self.module).__qualname__}

    def target(self, args, kwargs, cached, like: torch.Tensor, *, training: bool = True) -> torch.Tensor:
        if cached is not None:
            raise ValueError("fastkd.Distiller: the batches carry a cached teacher top-k (fastkd.CachedTeacherDataset) "
                             "and a teacher model was given too: for offline distillation pass teacher=None, "
                             "teacher_cache=cache; for online distillation give the dataset without its cache")
        if self.dtype is not None:
            args, kwargs = cast_floating((args, kwargs), self.dtype)
        with torch.no_grad(), self.autocast():
            t = logits_of(self.module(*args, **kwargs))
        if t.shape != like.shape:
            raise ValueError(
                f"fastkd.Distiller: teacher and student outputs differ in shape: teacher {tuple(t.shape)}, student "
                f"{tuple(like.shape)}. Both must be (N, classes) or (batch, seq, vocab) with the same classes/vocabulary "
                "(slice a padded teacher vocabulary to the student's).")
        return t

    @staticmethod
    def loss(s, t, labels, **kw) -> torch.Tensor:
        return kd_loss(s, t, labels, **kw)

    @staticmethod
    def top1(t) -> torch.Tensor:
        return t.argmax(-1)

    @staticmethod
    def teacher_ce(t, labels, **kw) -> torch.Tensor:
        """The teacher's own cross-entropy on the labels (evaluation)."""
        return kd_loss(t, t, labels, **{**kw, "soft_weight": 0.0, "hard_weight": 1.0})


class CachedTeacher:
    """A teacher's top-k from a :class:`fastkd.TeacherCache`, carried by the batches (``CachedExample``)."""

    name = "cache"

    def __init__(self, cache: TeacherCache, divergence: str, beta: float):
        self.cache = cache
        try:
            check_topk_divergence("fastkd.Distiller", divergence, beta)
        except ValueError as exc:
            raise OptionError("divergence", str(exc)) from None

    def identity(self) -> dict:
        m = self.cache.manifest
        ident = m["identity"]
        return {"teacher": None, "teacher_cache": {
            "top_k": ident["top_k"], "vocab_size": ident["vocab_size"], "values_dtype": ident["values_dtype"],
            "teacher_sha256": ident["teacher"]["sha256"], "dataset_sha256": m["dataset"]["sha256"]}}

    def target(self, args, kwargs, cached, like: torch.Tensor, *, training: bool = True):
        """``(values, indices)`` shaped like ``like`` with K classes. In training the batches must come
        from this very cache (its top_k); an evaluation set has a cache of its own (any top_k)."""
        if cached is None:
            raise ValueError(NO_CACHE_ERROR)
        values, indices = cached
        K, V = values.shape[-1] if not training else self.cache.top_k, self.cache.vocab_size
        if like.shape[-1] != V:
            raise ValueError(f"fastkd.Distiller: the student's logits have {like.shape[-1]} classes but the teacher cache "
                             f"{self.cache.path} was built over a vocabulary of {V}: the student must predict the "
                             "teacher's vocabulary")
        if values.shape[-1] != K or indices.shape != values.shape:
            raise ValueError(f"fastkd.Distiller: a batch's cached top-k has values {tuple(values.shape)} and indices "
                             f"{tuple(indices.shape)}, but the cache {self.cache.path} holds top_k={K}: the batches "
                             "must come from fastkd.CachedTeacherDataset over this cache")
        rows = like.shape[:-1]
        if values.numel() != rows.numel() * K:
            raise ValueError(f"fastkd.Distiller: a batch's cached top-k covers {values.numel() // K} positions but the "
                             f"student's logits {tuple(like.shape)} have {rows.numel()}: the cache was built for other "
                             "inputs (another sequence length or padding); build it from the dataset the student "
                             "trains on")
        return values.reshape(*rows, K), indices.reshape(*rows, K)

    @staticmethod
    def loss(s, t, labels, **kw) -> torch.Tensor:
        return topk_kd_loss(s, t[0], t[1], labels, **kw)

    @staticmethod
    def top1(t) -> torch.Tensor:
        return t[1][..., 0].long()  # the cache keeps each position's values in descending order

    @staticmethod
    def teacher_ce(t, labels, **kw):
        return None  # the cache holds the top-k alone: the teacher's full cross-entropy is unknown
