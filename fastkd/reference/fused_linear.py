"""Pure-PyTorch maths of the fused linear + KD loss (op ``fastkd::fused_linear_kd_loss_fwd``, wrapper in
``fastkd/ops/fused_linear.py``).

The loss is ``kd_loss(head(student_hidden), head(teacher_hidden), labels, ...)`` with, for each model,
``head(h) = cap(logit_scale * (h @ weight.T + bias))`` and ``cap(z) = softcap * tanh(z / softcap)`` (the
identity when softcap is None). Two forms:

- :func:`fused_linear_kd_loss`: the oracle, differentiable by autograd, on the materialised logits (run it in
  float64 for the tests; the float64 and torch.func paths of ``fastkd.fused_linear_kd_loss`` use it).
- :func:`fused_linear_kd_loss_fwd`: the op's fallback kernel, the compiled kernels' algorithm in torch ops:
  rows in chunks, each chunk's logits in fp32, the closed-form KD gradient of the chunk
  (``fastkd.reference.kd.kd_loss_and_grad``), then the chunk's hidden gradient and an fp32 accumulation of the
  weight and bias gradients. No (rows x V) tensor.

The same two forms with a sparse teacher (its top-k values and indices, the maths of ``fastkd.topk_kd_loss``; the
student's head alone is fused, ``logit_scale`` and ``softcap`` apply to it): :func:`fused_linear_topk_kd_loss`
and :func:`fused_linear_topk_kd_loss_fwd`.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype as _compute_dtype
from .kd import (
    _batchmean_divisor,
    _check_op_args,
    _normalizer_tensor,
    _reduce,
    check_op_normalizer,
    kd_loss,
    kd_loss_and_grad,
    kd_loss_rows,
    kd_loss_terms,
    reduce_terms,
    term_rows,
    unpack_options,
)
from .topk import topk_kd_loss, topk_kd_loss_and_grad, topk_kd_loss_rows, topk_kd_loss_terms

__all__ = ["head_logits", "fused_linear_kd_loss", "fused_linear_kd_loss_fwd", "fused_linear_kd_loss_terms_fwd",
           "fused_linear_kd_loss_terms", "fused_linear_topk_kd_loss", "fused_linear_topk_kd_loss_fwd",
           "fused_linear_topk_kd_loss_terms_fwd", "fused_linear_topk_kd_loss_terms", "unpack_fused_options"]


def head_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None):
    """The logits of an output head: cap(logit_scale * (hidden @ weight.T + bias)), in the maths dtype (fp32 at
    least: low-precision inputs are multiplied in fp32, never rounded to their dtype)."""
    dtype = torch.promote_types(_compute_dtype(hidden), _compute_dtype(weight))
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                         student_bias=None, teacher_bias=None, temperature=1.0, divergence="kl", beta=0.5,
                         soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="batchmean", logit_scale=1.0,
                         softcap=None, normalizer=None):
    """The loss of ``fastkd.fused_linear_kd_loss`` through materialised logits, differentiable by autograd
    (the oracle). The teacher is constant (detached)."""
    s = head_logits(student_hidden, student_weight, student_bias, logit_scale, softcap)
    with torch.no_grad():
        t = head_logits(teacher_hidden, teacher_weight, teacher_bias, logit_scale, softcap)
    return kd_loss(s, t, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction,
                   normalizer)


def fused_linear_kd_loss_terms(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                               student_bias=None, teacher_bias=None, temperature=1.0, divergence="kl", beta=0.5,
                               ignore_index=-100, reduction="batchmean", logit_scale=1.0, softcap=None,
                               normalizer=None):
    """The soft and hard terms of ``fastkd.fused_linear_kd_loss(..., return_terms=True)`` through materialised
    logits (``fastkd.reference.kd.kd_loss_terms``; the float64 and torch.func paths)."""
    with torch.no_grad():
        s = head_logits(student_hidden, student_weight, student_bias, logit_scale, softcap)
        t = head_logits(teacher_hidden, teacher_weight, teacher_bias, logit_scale, softcap)
        return kd_loss_terms(s, t, labels, temperature, divergence, beta, ignore_index, reduction,
                             _normalizer_tensor(normalizer))


def unpack_fused_options(options: torch.Tensor):
    """The fused op's ``options`` -> (temperature, beta, soft_weight, hard_weight, logit_scale, softcap or None);
    options: float64 CPU [temperature, beta, soft_weight, hard_weight, logit_scale, softcap (0 = none)]."""
    if options.device.type != "cpu" or options.dtype != torch.float64 or options.shape != (6,):
        raise ValueError("fastkd: argument 'options': expected a float64 CPU tensor [temperature, beta, soft_weight, "
                         "hard_weight, logit_scale, softcap], got "
                         f"{options.dtype} {tuple(options.shape)} on {options.device}")
    temperature, beta, soft_weight, hard_weight = unpack_options(options[:4])
    logit_scale, softcap = options[4:].tolist()
    return temperature, beta, soft_weight, hard_weight, logit_scale, (softcap if softcap != 0 else None)


def _empty(x):
    return x.new_empty((0,))


def fused_linear_kd_loss_fwd(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             teacher_bias, labels, row_scale, options, normalizer, divergence, ignore_index, reduction,
                             chunk_size, grad_hidden, grad_weight, grad_bias, with_terms=False):
    """Fallback kernel of ``fastkd::fused_linear_kd_loss_fwd``: (loss, d/d hidden, d/d weight, d/d bias) of the
    student for grad_output = 1 (each gradient an empty [0] tensor unless asked for), the gradient rows scaled by
    ``row_scale`` ([rows] or None) when given; ``normalizer`` (None or one number): "batchmean"'s divisor instead
    of the valid rows, as ``fastkd.reference.kd_loss_fwd``'s."""
    temperature, beta, soft_weight, hard_weight, logit_scale, softcap = unpack_fused_options(options)
    _check_op_args(temperature, divergence, beta, reduction)
    check_op_normalizer(normalizer, reduction)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    dtype = torch.promote_types(_compute_dtype(ht), _compute_dtype(teacher_weight))
    wt = teacher_weight.to(dtype)  # once per call (a copy only for low-precision weights)

    def rows_fn(s, r0, r1, lab, with_grad, with_terms):
        t = head_logits(ht[r0:r1], wt, teacher_bias, logit_scale, softcap)  # once per chunk, for both
        rl, g = kd_loss_and_grad(s, t, lab, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                                 "none", with_grad)
        soft = kd_loss_rows(s, t, lab, temperature, divergence, beta, 1.0, 0.0, ignore_index)[0] if with_terms else None
        return rl, g, soft

    return _chunked(student_hidden, student_weight, student_bias, labels, row_scale, normalizer, ignore_index,
                    reduction, chunk_size, (grad_hidden, grad_weight, grad_bias), logit_scale, softcap, rows_fn,
                    with_terms)


def fused_linear_kd_loss_terms_fwd(*args):
    """Fallback kernel of ``fastkd::fused_linear_kd_loss_terms_fwd``: fused_linear_kd_loss_fwd's outputs and the
    terms (as ``fastkd.reference.kd.loss_terms``), computed chunk by chunk."""
    return fused_linear_kd_loss_fwd(*args, with_terms=True)


def _chunked(student_hidden, student_weight, student_bias, labels, row_scale, normalizer, ignore_index, reduction,
             chunk_size, flags, logit_scale, softcap, rows_fn, with_terms=False):
    """The chunk loop the fused ops share: per chunk, the student's logits, ``rows_fn(s, r0, r1, labels, with_grad,
    with_terms)`` -> (row losses, d rows / d s with grad_output 1 per row, the rows' soft terms or None), the chain
    rule through the head, the gradients' GEMMs (the weight's and bias' accumulated in the maths dtype); then the
    reduction. ``with_terms``: a fifth output, the terms (``fastkd.reference.kd.loss_terms``)."""
    if chunk_size <= 0:
        raise ValueError(f"fastkd: argument 'chunk_size': must be > 0, got {chunk_size}")
    grad_hidden, grad_weight, grad_bias = flags
    lead = student_hidden.shape[:-1]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    rows, vocab = hs.shape[0], student_weight.shape[0]
    dtype = torch.promote_types(_compute_dtype(hs), _compute_dtype(student_weight))
    with_grad = grad_hidden or grad_weight or grad_bias
    ws = student_weight.to(dtype)
    gh = torch.zeros((rows, hs.shape[1]), dtype=dtype, device=hs.device) if grad_hidden else None
    gw = torch.zeros(ws.shape, dtype=dtype, device=hs.device) if grad_weight else None
    gb = torch.zeros((vocab,), dtype=dtype, device=hs.device) if grad_bias else None
    valid = None if flat_labels is None else flat_labels != ignore_index
    # The reduction's factor of every gradient row: 1 / (the normalizer, else all rows' valid labels), a tensor
    # (no host sync).
    like = hs.new_empty((rows,), dtype=dtype)
    weight = 1.0 / _batchmean_divisor(like, valid, normalizer) if reduction == "batchmean" else None
    row_losses, term_chunks = [], []
    for r0 in range(0, rows, chunk_size):
        r1 = min(rows, r0 + chunk_size)
        h = hs[r0:r1].to(dtype)
        s = head_logits(h, ws, student_bias, logit_scale, softcap)
        lab = None if flat_labels is None else flat_labels[r0:r1]
        rl, g, soft = rows_fn(s, r0, r1, lab, with_grad, with_terms)
        row_losses.append(rl)
        if with_terms:
            term_chunks.append(term_rows(soft, s, lab, ignore_index))
        if not with_grad:
            continue
        if weight is not None:
            g = g * weight
        if row_scale is not None:
            g = g * row_scale.reshape(-1)[r0:r1, None].to(dtype)
        # Through the head: d cap(u) / du = 1 - (cap / softcap)^2, u = logit_scale * z.
        if softcap is not None:
            g = g * (1.0 - (s / softcap) ** 2)
        if logit_scale != 1.0:
            g = g * logit_scale
        if grad_hidden:
            gh[r0:r1] = g @ ws
        if grad_weight:
            gw += g.T @ h
        if grad_bias:
            gb += g.sum(0)
    rows_t = torch.cat(row_losses) if row_losses else hs.new_zeros((0,), dtype=dtype)
    loss = _reduce(rows_t, valid, reduction, normalizer)
    if reduction == "none":
        loss = loss.reshape(lead)
    loss = loss.float()
    out = (loss,
           gh.to(student_hidden.dtype).reshape(student_hidden.shape) if grad_hidden else _empty(student_hidden),
           gw.to(student_weight.dtype) if grad_weight else _empty(student_weight),
           gb.to(student_bias.dtype) if grad_bias else _empty(student_weight))
    if not with_terms:
        return out
    terms = torch.cat(term_chunks) if term_chunks else hs.new_zeros((0, 2), dtype=dtype)
    terms = reduce_terms(terms, valid, reduction, normalizer)
    return (*out, terms.reshape(*lead, 2) if reduction == "none" else terms)


# ---- the sparse (top-k) teacher ------------------------------------------------------------------------
def fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_values, teacher_indices, labels=None,
                              student_bias=None, temperature=1.0, divergence="kl", beta=0.5, soft_weight=1.0,
                              hard_weight=0.0, ignore_index=-100, reduction="batchmean", logit_scale=1.0,
                              softcap=None, normalizer=None):
    """The loss of ``fastkd.fused_linear_topk_kd_loss`` through materialised student logits, differentiable by
    autograd (the oracle): ``topk_kd_loss(head(student_hidden), teacher_values, teacher_indices, ...)``."""
    s = head_logits(student_hidden, student_weight, student_bias, logit_scale, softcap)
    return topk_kd_loss(s, teacher_values, teacher_indices, labels, temperature, divergence, beta, soft_weight,
                        hard_weight, ignore_index, reduction, normalizer)


def fused_linear_topk_kd_loss_fwd(student_hidden, student_weight, student_bias, teacher_values, teacher_indices,
                                  labels, row_scale, options, normalizer, divergence, ignore_index, reduction,
                                  chunk_size, grad_hidden, grad_weight, grad_bias, with_terms=False):
    """Fallback kernel of ``fastkd::fused_linear_topk_kd_loss_fwd`` (normalizer and outputs as
    fused_linear_kd_loss_fwd's)."""
    temperature, beta, soft_weight, hard_weight, logit_scale, softcap = unpack_fused_options(options)
    _check_op_args(temperature, divergence, beta, reduction)
    check_op_normalizer(normalizer, reduction)
    k = teacher_values.shape[-1]
    values, indices = teacher_values.reshape(-1, k), teacher_indices.reshape(-1, k)

    def rows_fn(s, r0, r1, lab, with_grad, with_terms):
        v, i = values[r0:r1], indices[r0:r1]
        rl, g = topk_kd_loss_and_grad(s, v, i, lab, temperature, divergence, beta, soft_weight, hard_weight,
                                      ignore_index, "none", with_grad)
        soft = (topk_kd_loss_rows(s, v, i, lab, temperature, divergence, beta, 1.0, 0.0, ignore_index)[0]
                if with_terms else None)
        return rl, g, soft

    return _chunked(student_hidden, student_weight, student_bias, labels, row_scale, normalizer, ignore_index,
                    reduction, chunk_size, (grad_hidden, grad_weight, grad_bias), logit_scale, softcap, rows_fn,
                    with_terms)


def fused_linear_topk_kd_loss_terms_fwd(*args):
    """Fallback kernel of ``fastkd::fused_linear_topk_kd_loss_terms_fwd`` (as fused_linear_kd_loss_terms_fwd)."""
    return fused_linear_topk_kd_loss_fwd(*args, with_terms=True)


def fused_linear_topk_kd_loss_terms(student_hidden, student_weight, teacher_values, teacher_indices, labels=None,
                                    student_bias=None, temperature=1.0, divergence="kl", beta=0.5, ignore_index=-100,
                                    reduction="batchmean", logit_scale=1.0, softcap=None, normalizer=None):
    """The terms of ``fastkd.fused_linear_topk_kd_loss(..., return_terms=True)`` through materialised logits."""
    with torch.no_grad():
        s = head_logits(student_hidden, student_weight, student_bias, logit_scale, softcap)
        return topk_kd_loss_terms(s, teacher_values, teacher_indices, labels, temperature, divergence, beta,
                                  ignore_index, reduction, _normalizer_tensor(normalizer))
