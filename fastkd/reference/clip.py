"""Pure-PyTorch maths of gradient clipping (ops ``fastkd::grad_norm``, ``scale_grads_``, ``clamp_grads_``,
``clip_grad_norm_``; wrappers in ``fastkd/ops/clip.py``)."""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype as _compute_dtype

__all__ = ["grad_norm", "clip_coef", "scale_grads_", "clamp_grads_", "clip_grad_norm_", "clip_grad_norm_float64"]


def grad_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Fallback kernel of ``fastkd::grad_norm``: the ``norm_type``-norm of one device's gradients of
    one dtype, viewed as one vector, as a 0-d tensor accumulated and returned in fp32 (fp64 for fp64
    gradients), whatever the gradients' dtype."""
    acc, device = _compute_dtype(grads[0]), grads[0].device
    # Empty tensors add nothing to any norm (torch's inf-norm refuses them: max has no identity).
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros((), dtype=acc, device=device)
    p = float(norm_type)
    if device.type != "cpu" or p <= 0 or math.isinf(p):
        norms = torch._foreach_norm(grads, p, dtype=acc)
        return torch.linalg.vector_norm(torch.stack(norms), p)
    # On the CPU: the elementwise terms (x^2, |x| or |x|^p), one tensor at a time in the accumulation
    # dtype (the temporary is one gradient's size), summed by _pairwise_sum; the per-tensor sums in the
    # same way. torch.sum is not used: how it splits a long vector depends on the thread count (the
    # bits then do too), and torch's norm kernel loses up to ~1e-3 relative on long vectors (measured:
    # 11.5M fp32 elements).
    if p == 2.0:
        sums = [_pairwise_sum(g.to(acc).square()) for g in grads]
    elif p == 1.0:
        sums = [_pairwise_sum(g.to(acc).abs()) for g in grads]
    else:
        sums = [_pairwise_sum(g.to(acc).abs().pow(p)) for g in grads]
    total = _pairwise_sum(torch.stack(sums))
    return total.sqrt() if p == 2.0 else (total if p == 1.0 else total.pow(1.0 / p))


def _pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x``'s elements as a 0-d tensor, by a fixed pairwise tree of elementwise additions
    (the first half plus the second, level by level; an odd last element joins the last pair).
    Elementwise IEEE additions round the same way on every thread count and every CPU, so the same
    input gives the same bits everywhere; the error grows as log2(n), as in a cascade sum. It costs
    about five times torch.sum (10M fp32 elements: ~9 ms against ~2 ms), in the fallback only."""
    x = x.reshape(-1)
    while x.numel() > 1:
        n = x.numel()
        half = n // 2
        y = x[:half] + x[half:2 * half]
        if n % 2:
            y[-1] += x[-1]
        x = y
    return x.reshape(())


def clip_coef(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(max_norm / (total_norm + 1e-6), 1) in fp32 (fp64 for an fp64 norm), computed as torch's
    ``clip_grads_with_norm_`` computes it (``float / Tensor`` is ``reciprocal() * float``), so the
    same norm gives the bit-identical coefficient; a NaN norm gives a NaN coefficient as in torch."""
    norm = total_norm.to(_compute_dtype(total_norm))
    return torch.clamp((norm + 1e-6).reciprocal() * max_norm, max=1.0)


def scale_grads_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Fallback kernel of ``fastkd::scale_grads_``: grads *= clip_coef(total_norm, max_norm), in place.

    Multiplying by a coefficient of exactly 1 leaves every value bit-identical, so no branch on the
    (device) coefficient is needed here."""
    coef = clip_coef(total_norm, max_norm)
    torch._foreach_mul_(grads, coef.to(grads[0].device))


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """Fallback kernel of ``fastkd::clip_grad_norm_``: ``grad_norm`` then ``scale_grads_``; returns the norm."""
    norm = grad_norm(grads, norm_type)
    scale_grads_(grads, norm, max_norm)
    return norm


def clamp_grads_(grads: list[torch.Tensor], clip_value: float) -> None:
    """Fallback kernel of ``fastkd::clamp_grads_``: every gradient element clamped to [-c, c] in place
    (the bound rounded to the gradient's dtype first, as torch's clamp does; NaN stays NaN)."""
    torch._foreach_clamp_min_(grads, -clip_value)
    torch._foreach_clamp_max_(grads, clip_value)


def clip_grad_norm_float64(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0):
    """The tests' oracle: the total norm of ``grads`` and the clipped gradients, computed in float64
    on the CPU (returned there in float64; the gradients are not modified)."""
    g64 = [g.detach().double().cpu() for g in grads]
    if not g64:
        return torch.zeros((), dtype=torch.float64), []
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in g64]), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, [g * coef for g in g64]
