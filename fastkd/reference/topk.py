"""Pure-PyTorch maths of the top-k KD loss (op ``fastkd::topk_kd_loss_fwd``, wrapper in ``fastkd/ops/topk.py``).

The teacher is given by its top-k: ``values`` (..., K) (its logits or log-probabilities) at ``indices``
(..., K) of the student's vocabulary. Per row, with a = student / T over the whole vocabulary V, v = values / T
and S = {indices}:

- p_s = softmax(a) over V; p~ = softmax(v) over the K entries (the teacher renormalised over its support),
  0 off S. A row whose K values are all -inf has no soft term (its loss and the soft gradient are 0).
- "kl": D = sum_k p~_k (log p~_k - log p_s[i_k]), dD/da = p_s - p~.
- "jsd" (0 < beta < 1): M = beta p~ + (1 - beta) p_s over V. Off S, M = (1 - beta) p_s, so the off-support
  part is exactly c (1 - beta) Q with c = -log(1 - beta) and Q = 1 - sum_k p_s[i_k] (the student's mass off
  S); KL(p_s || M) = sum_S p_s (log p_s - log M) + c Q, and dD/da_j = (1 - beta) p_s_j (log p_s_j - log M_j -
  KL(p_s || M)), which off S is (1 - beta) p_s_j (c - KL(p_s || M)). beta = 0 is "kl".
- "reverse_kl" and "jsd" with beta = 1 are infinite whenever the student has mass off S: refused.

docs/topk_kd_loss.md derives these and lists the errors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import compute_dtype as _compute_dtype
from .kd import (
    _check_op_args,
    _if_pos,
    _log_mixture,
    _normalizer_tensor,
    _plogr,
    _reduce,
    add_hard_term,
    check_op_normalizer,
    finish_grad,
    loss_terms,
    unpack_options,
)

__all__ = ["topk_kd_loss_rows", "topk_kd_loss", "topk_kd_loss_and_grad", "topk_kd_loss_fwd", "topk_kd_loss_terms_fwd",
           "topk_kd_loss_terms", "check_topk_divergence", "check_topk_indices", "textbook_topk_kd_loss"]


def check_topk_divergence(op: str, divergence: str, beta: float) -> None:
    """Refuses the divergences that a top-k teacher makes infinite (``op``: the message's prefix)."""
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        what = "divergence='reverse_kl'" if divergence == "reverse_kl" else "divergence='jsd' with beta=1"
        raise ValueError(
            f"{op}: {what} is not supported with a top-k teacher: KL(p_student || p_teacher) is infinite "
            "whenever the student has any probability outside the teacher's top-k support (where the "
            "renormalised teacher is 0). Use divergence='kl', or 'jsd' with beta < 1."
        )


def check_topk_indices(indices: torch.Tensor, vocab: int) -> None:
    """Index values in [0, vocab) and distinct within each row (host tensors only: costs a pass over them)."""
    flat = indices.reshape(-1, indices.shape[-1])
    bad = (flat < 0) | (flat >= vocab)
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        value = int(flat[row][bad[row]][0])
        raise ValueError(f"fastkd: argument 'teacher_indices': row {row} holds {value}, outside [0, {vocab}) "
                         "(the student's vocabulary)")
    srt = flat.sort(-1).values
    dup = srt[:, 1:] == srt[:, :-1]
    if bool(dup.any()):
        row = int(dup.any(-1).nonzero()[0])
        value = int(srt[row, 1:][dup[row]][0])
        raise ValueError(f"fastkd: argument 'teacher_indices': row {row} holds {value} twice; each row's top-k "
                         "indices must be distinct")


def _effective(divergence: str, beta: float) -> str:
    return "kl" if divergence == "jsd" and beta == 0.0 else divergence


def _sparse_terms(student, values, indices, temperature):
    """The maths dtype's student logits s, log p_s over V, log p_s at the support, log p~ and p~ (0 on rows
    with no soft term) and the mask of those rows."""
    dtype = torch.promote_types(_compute_dtype(student), _compute_dtype(values))
    s, v = student.to(dtype), values.to(dtype)
    lps = F.log_softmax(s / temperature, dim=-1)
    lps_k = lps.gather(-1, indices.long())
    empty = (v == -math.inf).all(-1, keepdim=True)  # NaN is not -inf: a NaN value propagates
    zero = torch.zeros((), dtype=dtype, device=v.device)
    lpt = F.log_softmax(torch.where(empty, zero, v) / temperature, dim=-1)
    pt = torch.where(empty, zero, lpt.exp())
    return s, lps, lps_k, lpt, pt, empty


def _jsd_parts(lps_k, lpt, pt, beta):
    """log M on the support, D and KL(p_s || M) per row ([..., 1])."""
    c = -math.log1p(-beta)
    ps_k = lps_k.exp()
    lm = _log_mixture(ps_k, pt, beta)
    q = (1.0 - ps_k.sum(-1, keepdim=True)).clamp_min(0.0)  # the student's mass off the support
    ks = _plogr(ps_k, lps_k, lm)
    d = (beta * _plogr(pt, lpt, lm) + (1.0 - beta) * ks).sum(-1, keepdim=True) + (1.0 - beta) * c * q
    ksm = ks.sum(-1, keepdim=True) + c * q
    return lm, d, ksm


def _softplus(z):
    # log(1 + exp(z)) without overflow, exact at z = +-inf (torch's softplus switches to z above a threshold).
    return z.clamp_min(0.0) + torch.exp(-z.abs()).log1p()


def _jsd_fused_parts(lps_k, lpt, pt, beta):
    """JSD from the log-ratios z_k = log(beta / (1 - beta)) + log p~_k - log p_s[i_k] (the kernels' form).

    On the support, log p_s - log M = c - softplus(z) and log p~ - log M = -log(beta) - softplus(-z), with
    c = -log(1 - beta); off it, log p_s - log M = c. As sum_S p_s + Q = 1, KL(p_s || M) = c - R with
    R = sum_S p_s softplus(z) >= 0, so D = beta sum_S p~ (-log(beta) - softplus(-z)) + (1 - beta)(c - R) and
    dD/da_j = (1 - beta) p_s_j (R - softplus(z_j)) on the support, (1 - beta) p_s_j R off it. No 1 - sum of
    probabilities is formed (it cancels where the support holds the student's mass) and no log M (which
    underflows): returns (D, R, softplus(z)), D and R of shape [..., 1]."""
    c = -math.log1p(-beta)
    ps_k = lps_k.exp()
    z = (math.log(beta) + c) + (lpt - lps_k)
    sp = _softplus(z)
    r = _if_pos(ps_k, ps_k * sp).sum(-1, keepdim=True)
    teacher = _if_pos(pt, pt * (-math.log(beta) - _softplus(-z))).sum(-1, keepdim=True)
    return beta * teacher + (1.0 - beta) * (c - r), r, sp


def topk_kd_loss_rows(student, values, indices, labels, temperature, divergence, beta, soft_weight, hard_weight,
                      ignore_index):
    """Per-row losses (0 on ignored rows) and the valid-row mask (or None)."""
    divergence = _effective(divergence, beta)
    s, _, lps_k, lpt, pt, empty = _sparse_terms(student, values, indices, temperature)
    if divergence == "kl":
        d = _plogr(pt, lpt, lps_k).sum(-1, keepdim=True)
    else:
        _, d, _ = _jsd_parts(lps_k, lpt, pt, beta)
    d = torch.where(empty, torch.zeros((), dtype=d.dtype, device=d.device), d).squeeze(-1)
    return add_hard_term(soft_weight * temperature * temperature * d, s, labels, hard_weight, ignore_index)


def topk_kd_loss(student, values, indices, labels=None, temperature=1.0, divergence="kl", beta=0.5,
                 soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="batchmean", normalizer=None):
    """The loss of ``fastkd.topk_kd_loss``, differentiable by autograd (the oracle)."""
    check_topk_divergence("fastkd.reference.topk_kd_loss", divergence, beta)
    rows, valid = topk_kd_loss_rows(student, values, indices, labels, temperature, divergence, beta, soft_weight,
                                    hard_weight, ignore_index)
    return _reduce(rows, valid, reduction, _normalizer_tensor(normalizer))


def _check_op_tensors(student, values, indices):
    # The op's own contract for direct callers (the compiled kernels check the same; fastkd.topk_kd_loss
    # checks everything before and names the user's arguments).
    if values.shape != indices.shape or values.dim() < 1 or values.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"fastkd: argument 'teacher_values': expected [..., K] with teacher_indices' shape and the "
                         f"student's leading shape; got student {tuple(student.shape)}, teacher_values "
                         f"{tuple(values.shape)}, teacher_indices {tuple(indices.shape)}")
    if not 1 <= values.shape[-1] <= student.shape[-1]:
        raise ValueError(f"fastkd: argument 'teacher_values': K = {values.shape[-1]} must be in [1, vocab = "
                         f"{student.shape[-1]}]")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise ValueError(f"fastkd: argument 'teacher_indices': expected an integer dtype, got {indices.dtype}")
    if indices.device.type == "cpu":
        check_topk_indices(indices, student.shape[-1])


def topk_kd_loss_fwd(student, values, indices, labels, options, normalizer, divergence, ignore_index, reduction,
                     with_grad):
    """Fallback kernel of ``fastkd::topk_kd_loss_fwd`` (options and normalizer: as ``fastkd.reference.kd_loss_fwd``)."""
    temperature, beta, soft_weight, hard_weight = unpack_options(options)
    return topk_kd_loss_and_grad(student, values, indices, labels, temperature, divergence, beta, soft_weight,
                                 hard_weight, ignore_index, reduction, with_grad, normalizer)


def topk_kd_loss_terms_fwd(student, values, indices, labels, options, normalizer, divergence, ignore_index, reduction,
                           with_grad):
    """Fallback kernel of ``fastkd::topk_kd_loss_terms_fwd``: ``topk_kd_loss_fwd``'s outputs and
    ``topk_kd_loss_terms``."""
    temperature, beta, _, _ = unpack_options(options)
    loss, grad = topk_kd_loss_fwd(student, values, indices, labels, options, normalizer, divergence, ignore_index,
                                  reduction, with_grad)
    return loss, grad, topk_kd_loss_terms(student, values, indices, labels, temperature, divergence, beta,
                                          ignore_index, reduction, normalizer)


def topk_kd_loss_terms(student, values, indices, labels, temperature, divergence, beta, ignore_index, reduction,
                       normalizer=None):
    """The terms of ``fastkd.topk_kd_loss(..., return_terms=True)`` (``fastkd.reference.kd.loss_terms``)."""
    with torch.no_grad():
        soft, valid = topk_kd_loss_rows(student, values, indices, labels, temperature, divergence, beta, 1.0, 0.0,
                                        ignore_index)
        return loss_terms(soft, valid, student, labels, ignore_index, reduction, normalizer)


def topk_kd_loss_and_grad(student, values, indices, labels, temperature, divergence, beta, soft_weight, hard_weight,
                          ignore_index, reduction, with_grad, normalizer=None):
    """The fp32 loss and, when asked, its gradient with respect to ``student`` (dense over V, in the
    student's dtype) from the closed-form formulas the kernels use (JSD: ``_jsd_fused_parts``)."""
    _check_op_args(temperature, divergence, beta, reduction)
    check_op_normalizer(normalizer, reduction)
    check_topk_divergence("fastkd: argument 'divergence'", divergence, beta)
    _check_op_tensors(student, values, indices)
    s, lps, lps_k, lpt, pt, empty = _sparse_terms(student, values, indices, temperature)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    kl = _effective(divergence, beta) == "kl"
    if kl:
        d = _plogr(pt, lpt, lps_k).sum(-1, keepdim=True)
    else:
        d, r, sp = _jsd_fused_parts(lps_k, lpt, pt, beta)
    d = torch.where(empty, zero, d).squeeze(-1)
    rows, valid = add_hard_term(soft_weight * temperature * temperature * d, s, labels, hard_weight, ignore_index)
    loss = _reduce(rows, valid, reduction, normalizer).float()  # the op's loss is fp32 whatever the logits
    if not with_grad:
        return loss, student.new_empty((0,))
    idx = indices.long()
    ps = lps.exp()
    if kl:
        ddiv = ps.scatter(-1, idx, ps.gather(-1, idx) - pt)  # p_s - p~, exact on the support
    else:
        ps_k = lps_k.exp()
        ddiv = ((1.0 - beta) * r * ps).scatter(-1, idx, (1.0 - beta) * _if_pos(ps_k, ps_k * (r - sp)))
    ddiv = torch.where(empty, zero, ddiv)
    grad = finish_grad(soft_weight * temperature * ddiv, s, labels, valid, hard_weight, reduction, normalizer)
    return loss, grad.to(student.dtype)


def textbook_topk_kd_loss(student, values, indices, labels=None, temperature=1.0, hard_weight=0.0,
                          ignore_index=-100):
    """What DistillKit- and TRL-style trainers compute from a top-k teacher; the benchmarks' eager baseline.

    The student's log-softmax over the whole vocabulary, gathered at the teacher's indices, against the
    softmax of the teacher's values over its K entries; forward KL summed over K, averaged over every row
    (no ignore_index in the soft term, no all -inf rows), times T^2; plus the optional cross-entropy.
    """
    T = temperature
    log_student = torch.log_softmax(student / T, dim=-1).gather(-1, indices.long())
    log_teacher = torch.log_softmax(values / T, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    loss = kl.mean() * T * T
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1),
                                                    ignore_index=ignore_index)
    return loss
