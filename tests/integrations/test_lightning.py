"""fastkd.integrations.lightning.DistillationModule with a real lightning.Trainer: token-weighted gradient
accumulation equals the big batch, the teacher is in no checkpoint, clipping goes through fastkd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

lightning = pytest.importorskip("lightning")

import fastkd  # noqa: E402
from fastkd.integrations import lightning as fkd_lightning  # noqa: E402
from fastkd.integrations.lightning import DistillationModule  # noqa: E402

V, SEQ = 13, 7
KD = dict(temperature=2.0, hard_weight=0.5)


class TokenModel(nn.Module):
    def __init__(self, seed, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(V, dim), nn.Linear(dim, V)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def data(n=10, seed=0):
    """Sequences with skewed padding (labels -100 past each length)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, SEQ), generator=g)
    y = x.roll(-1, 1)
    lengths = torch.tensor([1 + (i * 5) % SEQ for i in range(n)])
    y[torch.arange(SEQ)[None, :] >= lengths[:, None]] = -100
    return TensorDataset(x, y)


def trainer(**kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return lightning.Trainer(**{**base, **kw})


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def reference(student, teacher, windows):
    """SGD steps, each on kd_loss batchmean over one window's examples."""
    student = copy.deepcopy(student)
    for x, y in windows:
        student.zero_grad()
        fastkd.kd_loss(student(x), teacher(x).detach(), y, **KD).backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= 0.5 * p.grad
    return student


def test_accumulated_windows_equal_their_big_batches():
    """10 examples, micro-batches of 2, accumulate 4: windows of 8 and 2 examples (the last one short); each
    optimizer step equals one SGD step on its window's examples as one batch."""
    teacher, student0 = TokenModel(1, dim=16), TokenModel(2)
    ds = data()
    module = DistillationModule(copy.deepcopy(student0), teacher, optimizer=sgd, **KD)
    tr = trainer(max_epochs=1, accumulate_grad_batches=4)
    tr.fit(module, DataLoader(ds, batch_size=2))
    assert tr.global_step == 2
    x, y = ds.tensors
    ref = reference(student0, teacher, [(x[:8], y[:8]), (x[8:], y[8:])])
    for a, b in zip(module.student.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lightnings_own_normalisation_would_be_wrong_here():
    """Why the module rescales: the mean of per-micro-batch batchmean losses (what a plain LightningModule
    returning kd_loss(..., batchmean) trains on) differs from the window's per-target mean with this padding."""
    teacher, student0 = TokenModel(1, dim=16), TokenModel(2)
    x, y = data().tensors

    class Plain(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.student = copy.deepcopy(student0)

        def training_step(self, batch, _):
            bx, by = batch
            return fastkd.kd_loss(self.student(bx), teacher(bx).detach(), by, **KD)

        def configure_optimizers(self):
            return sgd(self.student.parameters())

    plain = Plain()
    trainer(max_steps=1, accumulate_grad_batches=4).fit(plain, DataLoader(TensorDataset(x[:8], y[:8]), batch_size=2))
    ref = reference(student0, teacher, [(x[:8], y[:8])])
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(plain.student.parameters(), ref.parameters()))
    assert diff > 1e-4


def test_teacher_is_in_no_checkpoint_and_clipping_is_fastkds(tmp_path, monkeypatch):
    calls = []
    real = fkd_lightning.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        calls.append(max_norm)
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(fkd_lightning, "clip_grad_norm_", spy)
    teacher = TokenModel(1, dim=16)
    module = DistillationModule(TokenModel(2), teacher, optimizer=sgd, **KD)
    tr = trainer(max_epochs=1, limit_train_batches=3, gradient_clip_val=0.25)
    tr.fit(module, DataLoader(data(), batch_size=2), val_dataloaders=DataLoader(data(seed=1), batch_size=5))
    assert calls == [0.25, 0.25, 0.25]
    assert float(tr.callback_metrics["grad_norm"]) > 0 and "val_loss" in tr.callback_metrics
    tr.save_checkpoint(tmp_path / "m.ckpt")
    keys = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)
    assert "_teacher" not in dict(module.named_modules()) and all(not p.requires_grad for p in teacher.parameters())
    assert all(p is not q for p in module.parameters() for q in teacher.parameters())


def test_causal_shift_and_bad_input():
    teacher, student = TokenModel(1), TokenModel(2)
    x, y = data().tensors
    m = DistillationModule(student, teacher, causal=True, **KD)
    loss, n = m._sum_and_targets((x, y))
    want = fastkd.kd_loss(student(x)[:, :-1], teacher(x)[:, :-1].detach(), y[:, 1:], reduction="sum", **KD)
    torch.testing.assert_close(loss, want)
    assert int(n) == int((y[:, 1:] != -100).sum())
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        DistillationModule(student, None)
    with pytest.raises(ValueError, match="temperature"):
        DistillationModule(student, teacher, temperature=-1.0)
    with pytest.raises(ValueError, match="gradient_clip_algorithm='norm'"):
        m.configure_gradient_clipping(None, 1.0, "value")


@pytest.mark.backend_independent
def test_two_process_ddp_equals_the_global_batch():
    """2 ranks (ddp_spawn, gloo) x micro-batches of 2 x accumulate 2: one window of 8 examples; the valid
    targets are summed over the ranks, the gradients (averaged by DDP) rescaled by world x accumulation / N."""
    teacher, student0 = TokenModel(1, dim=16), TokenModel(2)
    x, y = data(n=8).tensors
    module = DistillationModule(copy.deepcopy(student0), teacher, optimizer=sgd, **KD)
    tr = trainer(max_steps=1, accumulate_grad_batches=2, devices=2, strategy="ddp_spawn")
    tr.fit(module, DataLoader(TensorDataset(x, y), batch_size=2))
    ref = reference(student0, teacher, [(x, y)])
    for a, b in zip(module.student.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
