"""Pure-PyTorch maths of the KD loss (op ``fastkd::kd_loss_fwd``, wrapper in ``fastkd/ops/kd.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import DIVERGENCES, REDUCTIONS
from ._common import compute_dtype as _compute_dtype

__all__ = ["kd_loss_rows", "kd_loss", "kd_loss_and_grad", "kd_loss_fwd", "kd_loss_terms_fwd", "kd_loss_terms",
           "kd_loss_scale_", "loss_terms", "unpack_options", "textbook_kd_loss"]


def _if_pos(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # 0 * log 0 = 0, and no 0 * (-inf) = NaN on masked entries; a NaN p (from a NaN or +inf logit) passes x
    # through, so non-finite inputs give a non-finite loss as the textbook formula does (the kernels' rule).
    return torch.where(p != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _plogr(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p * (lp - lq), 0 where p == 0 -- with the operands masked too, so that autograd through the
    oracle gets no NaN from the branch torch.where discards (masked -inf logits)."""
    pos = p != 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(pos, p * (torch.where(pos, lp, zero) - torch.where(pos, lq, zero)), zero)


def _log_mixture(ps, pt, beta: float) -> torch.Tensor:
    # log M, M = beta p_t + (1 - beta) p_s; only read where p_s != 0 or p_t != 0, i.e. where M != 0.
    m = beta * pt + (1.0 - beta) * ps
    return torch.where(m != 0, m, torch.ones((), dtype=m.dtype, device=m.device)).log()


def _effective_divergence(divergence: str, beta: float) -> str:
    # beta = 0 is forward KL and beta = 1 reverse KL exactly (the JSD formula tends to 0 there).
    if divergence == "jsd" and beta == 0.0:
        return "kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def _divergence_rows(lps, lpt, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "kl":
        return _plogr(lpt.exp(), lpt, lps).sum(-1)
    if divergence == "reverse_kl":
        return _plogr(lps.exp(), lps, lpt).sum(-1)
    ps, pt = lps.exp(), lpt.exp()
    lm = _log_mixture(ps, pt, beta)
    return (beta * _plogr(pt, lpt, lm) + (1.0 - beta) * _plogr(ps, lps, lm)).sum(-1)


def kd_loss_rows(student, teacher, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index):
    """Per-row losses of logits [..., V] (0 on ignored rows) and the valid-row mask (or None)."""
    dtype = torch.promote_types(_compute_dtype(student), _compute_dtype(teacher))
    s, t = student.to(dtype), teacher.to(dtype)
    divergence = _effective_divergence(divergence, beta)
    lps = F.log_softmax(s / temperature, dim=-1)
    lpt = F.log_softmax(t / temperature, dim=-1)
    soft = soft_weight * temperature * temperature * _divergence_rows(lps, lpt, divergence, beta)
    return add_hard_term(soft, s, labels, hard_weight, ignore_index)


def add_hard_term(rows, s, labels, hard_weight, ignore_index):
    """rows + hard_weight * CE(s, labels) (s: the student logits at T = 1, in the maths dtype), 0 on rows
    whose label is ignore_index; returns (rows, valid-row mask or None). Shared by the KD losses."""
    valid = None
    if labels is not None:
        valid = labels != ignore_index
        if hard_weight != 0:
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            ce = torch.logsumexp(s, dim=-1) - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            rows = rows + hard_weight * ce
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, valid


def _batchmean_divisor(like: torch.Tensor, valid, normalizer) -> torch.Tensor:
    """"batchmean"'s divisor: the caller's normalizer, else the valid rows (at least 1); like: rows [...]."""
    if normalizer is not None:
        return normalizer.reshape(()).to(device=like.device, dtype=like.dtype)
    count = like.new_tensor(like.numel()) if valid is None else valid.sum().to(like.dtype)
    return count.clamp_min(1)


def _reduce(rows: torch.Tensor, valid, reduction: str, normalizer=None) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / _batchmean_divisor(rows, valid, normalizer)


def kd_loss(student, teacher, labels=None, temperature=1.0, divergence="kl", beta=0.5, soft_weight=1.0,
            hard_weight=0.0, ignore_index=-100, reduction="batchmean", normalizer=None):
    """The loss of ``fastkd.kd_loss``, differentiable by autograd (the oracle)."""
    rows, valid = kd_loss_rows(student, teacher, labels, temperature, divergence, beta, soft_weight,
                               hard_weight, ignore_index)
    return _reduce(rows, valid, reduction, _normalizer_tensor(normalizer))


def _normalizer_tensor(normalizer):
    # None and tensors as they are (a tensor's value is never read on the host), a number as a tensor.
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        return normalizer
    return torch.tensor(float(normalizer))


def check_op_normalizer(normalizer, reduction: str) -> None:
    # The op's own contract for `normalizer` (fastkd.kd_loss checks it before and names the user's argument).
    if normalizer is not None and reduction != "batchmean":
        raise ValueError("fastkd: argument 'normalizer': divides the batch mean's sum; it needs reduction='batchmean'")
    if normalizer is not None and normalizer.numel() != 1:
        raise ValueError(f"fastkd: argument 'normalizer': expected one number, got {normalizer.numel()}")


def _check_op_args(temperature, divergence, beta, reduction):
    # The op's own contract, for direct callers of torch.ops.fastkd.kd_loss_fwd (the same checks as the
    # compiled kernels; fastkd.kd_loss checks everything before and names the user's arguments).
    if divergence not in DIVERGENCES:
        raise ValueError(f"fastkd: argument 'divergence': unknown value {divergence!r}; use 'kl', 'reverse_kl' or 'jsd'")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastkd: argument 'reduction': unknown value {reduction!r}; use 'batchmean', 'sum' or 'none'")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"fastkd: argument 'beta': must be in [0, 1], got {beta}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"fastkd: argument 'temperature': must be finite and > 0, got {temperature}")


def unpack_options(options: torch.Tensor) -> tuple[float, float, float, float]:
    """The KD ops' ``options`` tensor -> (temperature, beta, soft_weight, hard_weight)."""
    if options.device.type != "cpu" or options.dtype != torch.float64 or options.shape != (4,):
        raise ValueError("fastkd: argument 'options': expected a float64 CPU tensor [temperature, beta, soft_weight, "
                         f"hard_weight], got {options.dtype} {tuple(options.shape)} on {options.device}")
    temperature, beta, soft_weight, hard_weight = options.tolist()
    return temperature, beta, soft_weight, hard_weight


def kd_loss_fwd(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction, with_grad):
    """Fallback kernel of ``fastkd::kd_loss_fwd`` (options: see ``unpack_options``; normalizer: None or a
    one-number tensor, "batchmean"'s divisor instead of the valid rows)."""
    temperature, beta, soft_weight, hard_weight = unpack_options(options)
    return kd_loss_and_grad(student, teacher, labels, temperature, divergence, beta, soft_weight, hard_weight,
                            ignore_index, reduction, with_grad, normalizer)


def kd_loss_terms_fwd(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction, with_grad):
    """Fallback kernel of ``fastkd::kd_loss_terms_fwd``: ``kd_loss_fwd``'s outputs and ``kd_loss_terms``."""
    temperature, beta, _, _ = unpack_options(options)
    loss, grad = kd_loss_fwd(student, teacher, labels, options, normalizer, divergence, ignore_index, reduction,
                             with_grad)
    return loss, grad, kd_loss_terms(student, teacher, labels, temperature, divergence, beta, ignore_index, reduction,
                                     normalizer)


def kd_loss_terms(student, teacher, labels, temperature, divergence, beta, ignore_index, reduction, normalizer=None):
    """The terms of ``fastkd.kd_loss(..., return_terms=True)`` (``loss_terms``), never differentiated; normalizer:
    None or a one-number tensor."""
    with torch.no_grad():
        soft, valid = kd_loss_rows(student, teacher, labels, temperature, divergence, beta, 1.0, 0.0, ignore_index)
        return loss_terms(soft, valid, student, labels, ignore_index, reduction, normalizer)


def loss_terms(soft, valid, student, labels, ignore_index, reduction, normalizer=None):
    """The KD ops' terms (their *_terms_fwd twins): each row's soft term T^2 * D (``soft``, [...], 0 on ignored
    rows; ``valid`` its mask or None) and cross-entropy (0 without labels), unweighted, reduced as the loss is:
    fp32 [..., 2] for "none", else [2] (the sums, divided by "batchmean"'s divisor). Shared by the KD losses."""
    return reduce_terms(term_rows(soft, student, labels, ignore_index), valid, reduction, normalizer)


def term_rows(soft, student, labels, ignore_index):
    """[..., 2]: each row's soft term (``soft``) and cross-entropy of the student logits (0 on ignored rows and
    without labels)."""
    ce, _ = add_hard_term(torch.zeros_like(soft), student.to(soft.dtype), labels, 1.0, ignore_index)
    return torch.stack([soft, ce], -1)


def reduce_terms(rows, valid, reduction, normalizer=None):
    """term_rows' [..., 2] reduced as the loss is (``loss_terms``: each term by ``_reduce``), fp32."""
    return torch.stack([_reduce(rows[..., i], valid, reduction, normalizer) for i in range(2)], -1).float()


def kd_loss_and_grad(student, teacher, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                     reduction, with_grad, normalizer=None):
    """The fp32 loss and, when asked, its gradient with respect to ``student`` (in the student's dtype)
    from the closed-form formulas."""
    _check_op_args(temperature, divergence, beta, reduction)
    check_op_normalizer(normalizer, reduction)
    rows, valid = kd_loss_rows(student, teacher, labels, temperature, divergence, beta, soft_weight,
                               hard_weight, ignore_index)
    loss = _reduce(rows, valid, reduction, normalizer).float()  # the op's loss is fp32 whatever the logits
    if not with_grad:
        return loss, student.new_empty((0,))
    dtype = rows.dtype
    T = temperature
    s, t = student.to(dtype), teacher.to(dtype)
    lps = F.log_softmax(s / T, dim=-1)
    lpt = F.log_softmax(t / T, dim=-1)
    ps, pt = lps.exp(), lpt.exp()
    div = _effective_divergence(divergence, beta)
    if div == "kl":
        ddiv = ps - pt
    elif div == "reverse_kl":
        d = _plogr(ps, lps, lpt).sum(-1, keepdim=True)
        ddiv = _if_pos(ps, ps * (lps - lpt - d))
    else:
        lm = _log_mixture(ps, pt, beta)
        ksm = _plogr(ps, lps, lm).sum(-1, keepdim=True)
        ddiv = (1.0 - beta) * _if_pos(ps, ps * (lps - lm - ksm))
    return loss, finish_grad(soft_weight * T * ddiv, s, labels, valid, hard_weight, reduction,
                             normalizer).to(student.dtype)


def finish_grad(grad, s, labels, valid, hard_weight, reduction, normalizer=None):
    """The soft term's gradient (soft_weight * T * dD/da, [..., V]) plus the cross-entropy's, zero on
    ignored rows, divided by "batchmean"'s divisor (the valid rows or the normalizer). Shared by the KD losses."""
    if labels is not None and hard_weight != 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        onehot = F.one_hot(safe, s.shape[-1]).to(grad.dtype)
        grad = grad + hard_weight * (F.softmax(s, dim=-1) - onehot)
    if valid is not None:
        grad = grad * valid.unsqueeze(-1).to(grad.dtype)
    if reduction == "batchmean":
        grad = grad / _batchmean_divisor(grad[..., 0], valid, normalizer)
    return grad


def kd_loss_scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """Fallback kernel of ``fastkd::kd_loss_scale_``: grad *= grad_output (one factor or one per row)."""
    factor = grad_output.unsqueeze(-1) if grad_output.numel() != 1 else grad_output.reshape(())
    grad.copy_(grad.to(_compute_dtype(grad)) * factor)


def textbook_kd_loss(student, teacher, labels=None, temperature=1.0, hard_weight=0.0, ignore_index=-100):
    """What users write today (Hinton's KD with optional cross-entropy); the benchmarks' eager baseline.

    batchmean over all rows (kl_div does not know about ignore_index), forward KL only.
    """
    T = temperature
    soft = F.kl_div(F.log_softmax(student / T, dim=-1), F.softmax(teacher / T, dim=-1), reduction="batchmean")
    loss = soft * T * T
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(student, labels, ignore_index=ignore_index)
    return loss
