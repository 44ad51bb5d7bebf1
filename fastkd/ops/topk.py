"""``fastkd.topk_kd_loss`` and ``fastkd.TopKKDLoss``: the KD loss from a sparse (top-k) teacher.

The op's one home: its schema, the fallback registration (``fastkd.reference.topk``), the fake kernel, the
autograd (the fused gradient of ``fastkd/ops/_autograd.py``, scaled by ``fastkd::kd_loss_scale_``) and the
public wrapper. The compiled kernels of the op are in ``csrc/topk_kd/`` (CPU per instruction set, CUDA);
the dispatcher prefers them where they are built. docs/topk_kd_loss.md has the maths.
"""

from __future__ import annotations

import torch

from ..reference import topk as reference
from ._args import (
    as_int,
    check_flag,
    check_labels,
    check_logits,
    check_loss_options,
    check_topk_teacher,
    loss_options,
    normalizer_arg,
    use_reference_maths,
    values_on_host,
)
from ._autograd import define_terms_twin, register_fused_gradient
from .kd import KDLossOptions, KDTerms, terms_fake  # (kd defines kd_loss_scale_, the backward calls it)

__all__ = ["topk_kd_loss", "TopKKDLoss"]

_LIB = torch.library.Library("fastkd", "FRAGMENT")

# ---- schema ------------------------------------------------------------------------------------------
_LIB.define(
    "topk_kd_loss_fwd(Tensor student, Tensor teacher_values, Tensor teacher_indices, Tensor? labels, Tensor options, "
    "Tensor? normalizer, str divergence, int ignore_index, str reduction, bool with_grad) -> (Tensor, Tensor)"
)  # options and normalizer: as fastkd::kd_loss_fwd's (fastkd/ops/kd.py)
define_terms_twin(_LIB, "topk_kd_loss")  # topk_kd_loss_terms_fwd: + the terms, as fastkd::kd_loss_terms_fwd's

# ---- fallback (reference) kernel ---------------------------------------------------------------------
_LIB.impl("topk_kd_loss_fwd", reference.topk_kd_loss_fwd, "CompositeExplicitAutograd")
_LIB.impl("topk_kd_loss_terms_fwd", reference.topk_kd_loss_terms_fwd, "CompositeExplicitAutograd")


# ---- fake kernel (torch.compile, meta tensors) -------------------------------------------------------
@torch.library.register_fake("fastkd::topk_kd_loss_fwd")
def _topk_kd_loss_fwd_fake(student, values, indices, labels, options, normalizer, divergence, ignore_index, reduction,
                           with_grad):
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if with_grad else (0,))
    return loss, grad


@torch.library.register_fake("fastkd::topk_kd_loss_terms_fwd")
def _topk_kd_loss_terms_fwd_fake(student, values, indices, labels, options, normalizer, divergence, ignore_index,
                                 reduction, with_grad):
    return (*_topk_kd_loss_fwd_fake(student, values, indices, labels, options, normalizer, divergence, ignore_index,
                                    reduction, with_grad), terms_fake(student, reduction))


# ---- autograd ----------------------------------------------------------------------------------------
register_fused_gradient("topk_kd_loss_fwd", "fastkd.topk_kd_loss", "fastkd.reference.topk_kd_loss")
register_fused_gradient("topk_kd_loss_terms_fwd", "fastkd.topk_kd_loss", "fastkd.reference.topk_kd_loss")


# ---- the public wrapper ----------------------------------------------------------------------------
_OP = "fastkd.topk_kd_loss"


def _check_args(student, values, indices, labels, temperature, divergence, beta, soft_weight, hard_weight,
                ignore_index, reduction):
    check_logits(_OP, "student_logits", student)
    check_logits(_OP, "teacher_values", values)
    check_topk_teacher(_OP, values, indices, student, "student_logits", student.shape[-1])
    check_loss_options(_OP, temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction)
    reference.check_topk_divergence(_OP, divergence, beta)
    check_labels(_OP, labels, student, ignore_index, hard_weight)


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 labels: torch.Tensor | None = None, *, temperature: float = 1.0, divergence: str = "kl",
                 beta: float = 0.5, soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean", normalizer: float | torch.Tensor | None = None,
                 return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
    """Knowledge-distillation loss from a sparse teacher: its top-k logits (or log-probabilities).

    ``teacher_values`` (..., K) are the teacher's values at ``teacher_indices`` (..., K) (int32 or int64, in
    [0, V), distinct within a row) of the student's vocabulary; ``student_logits`` is (..., V), 1 <= K <= V.
    The teacher distribution is renormalised over its support: p~ = softmax(teacher_values / T) over the K
    entries, 0 elsewhere; the student is the full softmax of student_logits / T over V. Row loss =
    soft_weight * T^2 * D(p~, p_student) + hard_weight * CE(student, labels) (at T = 1), with ``divergence``
    ``"kl"`` = KL(p~ || p_s) or ``"jsd"`` (0 <= beta < 1; M = beta p~ + (1 - beta) p_s over the whole
    vocabulary, beta = 0 is "kl"). ``"reverse_kl"`` and beta = 1 are refused: they are infinite whenever the
    student has mass outside the support. A row whose K values are all -inf has no soft term.

    Everything else is as :func:`fastkd.kd_loss`: ignore_index rows, reductions, ``normalizer`` and ``return_terms``
    (the soft term: T^2 * D against the renormalised top-k teacher), fp32 maths and loss, the
    gradient (dense over V, w.r.t. ``student_logits`` only) in the student's dtype, float64 and torch.func
    calls through the reference maths (``fastkd.reference.topk_kd_loss``).
    """
    _check_args(student_logits, teacher_values, teacher_indices, labels, temperature, divergence, beta, soft_weight,
                hard_weight, ignore_index, reduction)
    norm = normalizer_arg(_OP, normalizer, reduction, student_logits)
    check_flag(_OP, "return_terms", return_terms)
    if use_reference_maths(student_logits, teacher_values):
        if values_on_host(teacher_indices):  # the op's kernels check them on the other paths
            reference.check_topk_indices(teacher_indices, student_logits.shape[-1])
        loss = reference.topk_kd_loss(student_logits, teacher_values, teacher_indices, labels, temperature, divergence,
                                      beta, soft_weight, hard_weight, ignore_index, reduction, norm)
        if not return_terms:
            return loss
        return loss, KDTerms.of(reference.topk_kd_loss_terms(student_logits, teacher_values, teacher_indices, labels,
                                                             temperature, divergence, beta, ignore_index, reduction,
                                                             norm))
    op = torch.ops.fastkd.topk_kd_loss_terms_fwd if return_terms else torch.ops.fastkd.topk_kd_loss_fwd
    out = op(
        student_logits, teacher_values, teacher_indices, labels,
        loss_options(temperature, beta, soft_weight, hard_weight), norm, divergence, as_int(ignore_index), reduction,
        torch.is_grad_enabled() and student_logits.requires_grad,
    )
    return (out[0], KDTerms.of(out[2])) if return_terms else out[0]


class TopKKDLoss(KDLossOptions):
    """Module form of :func:`fastkd.topk_kd_loss` with the same keywords:
    ``TopKKDLoss(temperature=2.0)(student_logits, teacher_values, teacher_indices, labels)``."""

    def forward(self, student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                labels: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
        return topk_kd_loss(student_logits, teacher_values, teacher_indices, labels, normalizer=normalizer,
                            return_terms=return_terms, **self.options())
