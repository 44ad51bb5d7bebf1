"""``fastkd.kd_loss`` and ``fastkd.KDLoss``: the fused knowledge-distillation loss.

The op's one home: its schemas, the fallback registration (``fastkd.reference.kd``), the fake kernels,
the autograd formula and the public wrapper. The compiled kernels of the same ops are in
``csrc/kd_loss/`` (CPU per instruction set, CUDA); the dispatcher prefers them where they are built.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..reference import kd as reference
from ..reference._common import DIVERGENCES, REDUCTIONS
from ._args import (
    as_int,
    check_flag,
    check_labels,
    check_logits,
    check_loss_options,
    loss_options,
    normalizer_arg,
    use_reference_maths,
)
from ._autograd import define_terms_twin, register_fused_gradient

__all__ = ["kd_loss", "KDLoss", "KDTerms", "DIVERGENCES", "REDUCTIONS"]

_LIB = torch.library.Library("fastkd", "FRAGMENT")

# ---- schemas ----------------------------------------------------------------------------------------
_LIB.define(
    "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, Tensor options, Tensor? normalizer, str divergence, "
    "int ignore_index, str reduction, bool with_grad) -> (Tensor, Tensor)"
)  # options: float64 CPU [temperature, beta, soft_weight, hard_weight] (fastkd.ops._args.loss_options);
#   normalizer: None or one number (the logits' device or the CPU), "batchmean"'s divisor (normalizer_arg)
define_terms_twin(_LIB, "kd_loss")  # kd_loss_terms_fwd: + the terms (return_terms=True; the CE is computed at
#   hard_weight 0 too when there are labels)
_LIB.define("kd_loss_scale_(Tensor(a!) grad, Tensor grad_output) -> ()")

# ---- fallback (reference) kernels --------------------------------------------------------------------
_LIB.impl("kd_loss_fwd", reference.kd_loss_fwd, "CompositeExplicitAutograd")
_LIB.impl("kd_loss_terms_fwd", reference.kd_loss_terms_fwd, "CompositeExplicitAutograd")
_LIB.impl("kd_loss_scale_", reference.kd_loss_scale_, "CompositeExplicitAutograd")


# ---- fake kernels (torch.compile, meta tensors) ------------------------------------------------------
@torch.library.register_fake("fastkd::kd_loss_fwd")
def _kd_loss_fwd_fake(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction, with_grad):
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if with_grad else (0,))
    return loss, grad


def terms_fake(student, reduction):
    """The fake terms output of a KD op's *_terms_fwd twin."""
    return student.new_empty((*student.shape[:-1], 2) if reduction == "none" else (2,), dtype=torch.float32)


@torch.library.register_fake("fastkd::kd_loss_terms_fwd")
def _kd_loss_terms_fwd_fake(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction,
                            with_grad):
    return (*_kd_loss_fwd_fake(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction,
                               with_grad), terms_fake(student, reduction))


@torch.library.register_fake("fastkd::kd_loss_scale_")
def _kd_loss_scale_fake(grad, grad_output):
    return None


# ---- autograd ----------------------------------------------------------------------------------------
register_fused_gradient("kd_loss_fwd", "fastkd.kd_loss", "fastkd.reference.kd_loss")
register_fused_gradient("kd_loss_terms_fwd", "fastkd.kd_loss", "fastkd.reference.kd_loss")


class KDTerms(NamedTuple):
    """A KD loss's two terms without their weights (``return_terms=True``), reduced as the loss is (0-d, or the
    leading shape for ``reduction="none"``): ``soft`` = T² · D, ``hard`` = the cross-entropy at T = 1 (0 without
    labels). fp32 and never differentiated: for logging."""

    soft: torch.Tensor
    hard: torch.Tensor

    @classmethod
    def of(cls, terms: torch.Tensor) -> KDTerms:
        """From an op's terms output ([..., 2])."""
        return cls(terms[..., 0], terms[..., 1])


# ---- the public wrapper ----------------------------------------------------------------------------
_OP = "fastkd.kd_loss"


def _check_args(student, teacher, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                reduction):
    check_logits(_OP, "student_logits", student)
    check_logits(_OP, "teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{_OP}: vocabulary sizes differ: student_logits has {student.shape[-1]}, teacher_logits has "
            f"{teacher.shape[-1]}. Teachers often pad their vocabulary: slice the teacher's logits to the student's "
            f"vocabulary (teacher_logits[..., :{student.shape[-1]}]) if the extra entries are padding."
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{_OP}: rows differ: student_logits has leading shape {tuple(student.shape[:-1])}, "
            f"teacher_logits {tuple(teacher.shape[:-1])}; both must hold the same positions"
        )
    if student.device != teacher.device:
        raise ValueError(f"{_OP}: teacher_logits is on {teacher.device} but student_logits on "
                         f"{student.device}; move both to one device")
    check_loss_options(_OP, temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction)
    check_labels(_OP, labels, student, ignore_index, hard_weight)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
            temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5, soft_weight: float = 1.0,
            hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "batchmean",
            normalizer: float | torch.Tensor | None = None,
            return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
    """Fused knowledge-distillation loss from raw logits.

    Row loss = soft_weight * T^2 * D(p_teacher, p_student) + hard_weight * CE(student, labels), with
    p = softmax(logits / T). ``divergence``: ``"kl"`` = KL(p_t || p_s) (Hinton), ``"reverse_kl"`` =
    KL(p_s || p_t), ``"jsd"`` = beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s
    (beta = 0 is forward KL, beta = 1 reverse KL). The cross-entropy uses T = 1. Rows whose label is
    ``ignore_index`` count in neither term nor in the row count.

    Logits: shape (..., V), fp32/fp16/bf16 (student and teacher may differ). Maths in fp32; the loss is
    fp32, the gradient (w.r.t. ``student_logits`` only) has the student's dtype. float64 logits, and calls
    under torch.func transforms (grad, vmap, jacrev, ...), run the reference maths
    (``fastkd.reference.kd_loss``: autograd through torch ops, float64 kept, derivatives of any order).
    ``temperature`` in [0.05, 100] (``fastkd.ops._args.TEMPERATURE_RANGE``).
    ``reduction``: ``"batchmean"`` (sum over valid rows / number of valid rows, per token for (B, S, V)),
    ``"sum"``, or ``"none"`` (per-row losses with the leading shape, 0 on ignored rows).
    ``normalizer`` (with "batchmean"): divide the sum by it instead of the number of valid rows, e.g. the
    valid targets of a whole accumulated batch (Hugging Face's ``num_items_in_batch``); a number, or a
    one-number tensor on the logits' device whose value is never read on the host. The division is part of
    the fused gradient: ``loss.backward()`` then costs no extra pass over the gradient, where
    ``kd_loss(..., reduction="sum") / n`` costs one.
    ``return_terms=True``: returns ``(loss, KDTerms(soft, hard))``, the two terms without their weights and
    reduced as the loss, from the same kernel pass (for logging; with labels the cross-entropy is computed even
    at hard_weight 0).
    """
    _check_args(student_logits, teacher_logits, labels, temperature, divergence, beta, soft_weight, hard_weight,
                ignore_index, reduction)
    norm = normalizer_arg(_OP, normalizer, reduction, student_logits)
    check_flag(_OP, "return_terms", return_terms)
    if use_reference_maths(student_logits, teacher_logits):
        loss = reference.kd_loss(student_logits, teacher_logits, labels, temperature, divergence, beta, soft_weight,
                                 hard_weight, ignore_index, reduction, norm)
        if not return_terms:
            return loss
        return loss, KDTerms.of(reference.kd_loss_terms(student_logits, teacher_logits, labels, temperature,
                                                        divergence, beta, ignore_index, reduction, norm))
    op = torch.ops.fastkd.kd_loss_terms_fwd if return_terms else torch.ops.fastkd.kd_loss_fwd
    out = op(
        student_logits, teacher_logits, labels, loss_options(temperature, beta, soft_weight, hard_weight), norm,
        divergence, as_int(ignore_index), reduction, torch.is_grad_enabled() and student_logits.requires_grad,
    )
    return (out[0], KDTerms.of(out[2])) if return_terms else out[0]


class KDLossOptions(nn.Module):
    """The keywords of the KD losses' module forms (:class:`KDLoss`, :class:`fastkd.TopKKDLoss`), kept as
    attributes and shown in the module's repr."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean"):
        super().__init__()
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def options(self) -> dict:
        """The keywords, for the loss function."""
        return dict(temperature=self.temperature, divergence=self.divergence, beta=self.beta,
                    soft_weight=self.soft_weight, hard_weight=self.hard_weight, ignore_index=self.ignore_index,
                    reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class KDLoss(KDLossOptions):
    """Module form of :func:`fastkd.kd_loss` with the same keywords: ``KDLoss(temperature=2.0)(s, t, labels)``."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
        return kd_loss(student_logits, teacher_logits, labels, normalizer=normalizer, return_terms=return_terms,
                       **self.options())
