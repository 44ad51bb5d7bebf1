"""fastkd.integrations.trl against TRL's own GKDTrainer loss (trl.experimental.gkd) on random inputs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # (trl.experimental says it is experimental)
pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations import trl as fkd_trl  # noqa: E402

B, S, V = 3, 6, 37


def inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, V, generator=g) * scale).requires_grad_()
    t = torch.randn(B, S, V, generator=g) * scale
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 4:] = -100
    labels[2, 1:] = -100  # skewed padding
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_loss_and_gradient_equal_trls(beta, temperature, reduction, with_labels):
    s, t, labels = inputs()
    labels = labels if with_labels else None
    s2 = s.detach().clone().requires_grad_()
    ours = fkd_trl.generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    theirs = GKDTrainer.generalized_jsd_loss(s2, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # Gradients: both fp32 computations against TRL's formula in float64 (fp32 rounding differs between
    # them by a few 1e-7: the oracle decides).
    s64 = s.detach().double().requires_grad_()
    ref = GKDTrainer.generalized_jsd_loss(s64, t.double(), labels, beta=beta, temperature=temperature,
                                          reduction=reduction)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    for loss in (ours, theirs, ref):
        (loss * weights.to(loss.dtype)).sum().backward()
    scale = float(s64.grad.abs().max())
    err_ours = float((s.grad.double() - s64.grad).abs().max()) / scale
    err_theirs = float((s2.grad.double() - s64.grad).abs().max()) / scale
    assert err_ours <= max(2 * err_theirs, 1e-6), (err_ours, err_theirs)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch_normalises_as_trl(beta):
    s, t, labels = inputs(seed=3)
    n = torch.tensor(11)
    ours = fkd_trl.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=n)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_mixin_computes_gkd_trainers_loss_without_slicing(monkeypatch):
    """GKDLossMixin.compute_loss = GKDTrainer.compute_loss (same models, batch, beta), and the kernel gets
    the whole logits (contiguous: nothing copied) with the shifted labels."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)
    student, teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), \
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    ids = torch.randint(0, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = []
    real = fkd_trl.kd_loss

    def spy(s, t, lab, **kw):
        seen.append((s.is_contiguous(), t.is_contiguous(), tuple(s.shape)))
        return real(s, t, lab, **kw)

    monkeypatch.setattr(fkd_trl, "kd_loss", spy)
    for beta in (0.0, 0.5, 1.0):
        fake = SimpleNamespace(teacher_model=teacher, beta=beta, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
        theirs = GKDTrainer.compute_loss(fake, student, batch, num_items_in_batch=torch.tensor(7))
        ours = fkd_trl.GKDLossMixin.compute_loss(fake, student, batch, num_items_in_batch=torch.tensor(7))
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        theirs = GKDTrainer.compute_loss(fake, student, batch)
        ours = fkd_trl.GKDLossMixin.compute_loss(fake, student, batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert seen and all(c == (True, True, (B, S, V)) for c in seen)
    assert issubclass(type("FastGKD", (fkd_trl.GKDLossMixin, GKDTrainer), {}), GKDTrainer)


def test_bad_arguments():
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        fkd_trl.generalized_jsd_loss(s, t, labels, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        fkd_trl.generalized_jsd_loss(s, t, labels, beta=1.5)
    assert fastkd.shift_labels is fkd_trl.shift_labels
