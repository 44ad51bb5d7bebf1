"""CUDA kernel of fastkd::fused_linear_kd_loss_fwd against the float64 oracle (fastkd.reference.fused_linear) on
the same GPU, and against the CPU kernel on the same inputs.

Skipped without a GPU (it has not run yet: written and compiled on a machine without one). Every op call runs
under torch.cuda.set_sync_debug_mode("error"): the op must never synchronise with the host. Tolerances as in
test_fused_linear_kd_loss.py: fp32 within 1e-5 relative of float64, bf16 gradients within 1% of float64
(relative to their largest entry).
"""

from __future__ import annotations

import pytest
import torch
from conftest import no_sync

import fastkd
from fastkd import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")


def problem(rows, hs, ht, vocab, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, device=DEV, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, vocab, (rows,), device=DEV, generator=g)
    labels[::5] = -100
    return (rnd(rows, hs), rnd(vocab, hs, scale=hs ** -0.5 * 3), rnd(vocab, scale=0.5), rnd(rows, ht),
            rnd(vocab, ht, scale=ht ** -0.5 * 3), rnd(vocab, scale=0.5)), labels


def grads(fn, tensors, labels, dtype, grad_out=None, **kw):
    hs, ws, bs, ht, wt, bt = (x.to(dtype).clone() for x in tensors)
    for x in (hs, ws, bs):
        x.requires_grad_(True)
    loss = fn(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach().double(), [x.grad.double() for x in (hs, ws, bs)]


def oracle(hs, ws, ht, wt, labels, student_bias, teacher_bias, chunk_size=None, **kw):
    return reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias, teacher_bias, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("vocab", [7, 2049, 32000])
def test_against_float64(dtype, reduction, divergence, beta, vocab):
    tensors, labels = problem(37, 64, 48, vocab, dtype, seed=vocab)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.3, reduction=reduction,
              softcap=4.0, logit_scale=0.8)
    grad_out = torch.randn(37, device=DEV) if reduction == "none" else None
    ref_loss, ref_grads = grads(oracle, tensors, labels, torch.float64, grad_out, **kw)
    with no_sync():
        loss, got = grads(fastkd.fused_linear_kd_loss, tensors, labels, dtype, grad_out, chunk_size=8, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (loss - ref_loss).abs().max() <= tol * max(1.0, ref_loss.abs().max().item())
    for g, r in zip(got, ref_grads, strict=True):
        assert (g - r).abs().max() <= tol * r.abs().max().clamp_min(1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_cpu_kernel(dtype):
    tensors, labels = problem(50, 32, 40, 1000, dtype, seed=1)
    kw = dict(temperature=1.5, hard_weight=0.2, chunk_size=16)
    with no_sync():
        a, ga = grads(fastkd.fused_linear_kd_loss, tensors, labels, dtype, **kw)
    b, gb = grads(fastkd.fused_linear_kd_loss, [x.cpu() for x in tensors], labels.cpu(), dtype, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x.cpu(), y, rtol=tol, atol=tol * y.abs().max().item())


def test_frozen_head_and_no_grad():
    tensors, labels = problem(9, 16, 16, 300, torch.bfloat16, seed=2)
    hs, ws, bs, ht, wt, bt = tensors
    hs = hs.clone().requires_grad_(True)
    with no_sync():
        loss = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=2.0)
        loss.backward()
        with torch.no_grad():
            again = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=2.0)
    assert hs.grad is not None and ws.grad is None
    torch.testing.assert_close(again, loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_topk_against_float64(dtype, divergence, beta, reduction):
    (hs, ws, bs, ht, wt, _), labels = problem(37, 64, 48, 2049, dtype, seed=3)
    values, indices = (ht.double() @ wt.double().T).topk(64, dim=-1)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.3, reduction=reduction, softcap=4.0)
    grad_out = torch.randn(37, device=DEV) if reduction == "none" else None

    def run(fn, dt, **extra):
        x = [t.to(dt).clone().requires_grad_(True) for t in (hs, ws, bs)]
        loss = fn(x[0], x[1], values.to(dt), indices, labels, student_bias=x[2], **kw, **extra)
        loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
        return loss.detach().double(), [t.grad.double() for t in x]

    def oracle_topk(h, w, v, i, lab, student_bias, **kw):
        return reference.fused_linear_topk_kd_loss(h, w, v, i, lab, student_bias, **kw)

    ref_loss, ref_grads = run(oracle_topk, torch.float64)
    with no_sync():
        loss, got = run(fastkd.fused_linear_topk_kd_loss, dtype, chunk_size=8)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (loss - ref_loss).abs().max() <= tol * max(1.0, ref_loss.abs().max().item())
    for g, r in zip(got, ref_grads, strict=True):
        assert (g - r).abs().max() <= tol * r.abs().max().clamp_min(1e-6)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["cuda", "cpu"])
@pytest.mark.parametrize("op", ["dense", "topk"])
def test_normalizer_on_the_device_or_the_cpu(dtype, where, op):
    """normalizer: a one-number tensor on the GPU (as the HF Trainer's num_items_in_batch) or on the CPU divides
    the sum, loss and gradients against the float64 oracle's sum / n, with no host sync."""
    (hs, ws, bs, ht, wt, bt), labels = problem(37, 64, 48, 2049, dtype, seed=4)
    if op == "dense":
        fused, ref = fastkd.fused_linear_kd_loss, reference.fused_linear_kd_loss

        def teacher(dt):
            return (ht.to(dt), wt.to(dt)), dict(teacher_bias=bt.to(dt))
    else:
        fused, ref = fastkd.fused_linear_topk_kd_loss, reference.fused_linear_topk_kd_loss
        values, indices = (ht.double() @ wt.double().T).topk(64, dim=-1)

        def teacher(dt):
            return (values.to(dt), indices), {}

    def run(fn, dt, **extra):
        x = [t.to(dt).clone().requires_grad_(True) for t in (hs, ws, bs)]
        t_args, t_kw = teacher(dt)
        loss = fn(x[0], x[1], *t_args, labels, student_bias=x[2], **t_kw, temperature=2.0, hard_weight=0.3,
                  softcap=4.0, **extra)
        loss.backward()
        return loss.detach().double(), [t.grad.double() for t in x]

    want, want_grads = run(lambda *a, **k: ref(*a, **k, reduction="sum") / 41, torch.float64)
    n = torch.tensor(41, device=where)
    with no_sync():
        loss, got = run(fused, dtype, chunk_size=8, normalizer=n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (loss - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    for g, r in zip(got, want_grads, strict=True):
        assert (g - r).abs().max() <= tol * r.abs().max().clamp_min(1e-6)
