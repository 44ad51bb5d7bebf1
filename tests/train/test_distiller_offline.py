"""fastkd.Distiller distilling offline from a TeacherCache: the loss is fastkd.topk_kd_loss on the batches'
cached top-k, with K = V it trains as the online teacher does, resume is bit-exact, and a cache that does not
fit the run is an error before anything trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd.data import CachedExample, TeacherCache, TeacherCacheError, with_teacher_cache
from fastkd.train import OptionError, RunDirError
from fastkd.train.distiller import Callback, Distiller

IGNORE = -100
V, SEQ = 11, 7


class TokenModel(nn.Module):
    """(B, S) token ids -> (B, S, V) logits."""

    def __init__(self, seed, dim=8, dropout=0.0, vocab=V):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.emb(x))))


class Fp16Teacher(nn.Module):
    """A teacher whose logits are float16 numbers (held in fp32): its cache (float16 values) stores them
    exactly, so offline with K = V and online distillation see the same teacher."""

    def __init__(self, seed=5):
        super().__init__()
        self.inner = TokenModel(seed, dim=16)
        with torch.no_grad():
            for p in self.inner.parameters():
                p.mul_(3.0)

    def forward(self, x):
        return self.inner(x).half().float()


def token_data(n=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, SEQ), generator=g)
    y = torch.roll(x, -1, dims=1)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    y[torch.arange(SEQ)[None, :] >= lengths[:, None]] = IGNORE  # padding
    return TensorDataset(x, y)


def sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(teacher, train data, its caches at K = V and K = 4, eval data, its cache at K = V)."""
    root = tmp_path_factory.mktemp("caches")
    teacher, train, evald = Fp16Teacher(), token_data(), token_data(n=10, seed=3)
    caches = {k: TeacherCache.build(root / f"train-{k}", teacher, train, top_k=k, batch_size=8, progress=False)
              for k in (V, 4)}
    ev = TeacherCache.build(root / "eval", teacher, evald, top_k=V, progress=False)
    return teacher, train, caches, evald, ev


LOSS = dict(temperature=2.0, hard_weight=0.3, max_grad_norm=5.0, progress=False, log_every=1)


def _fit(teacher, cache, train, student, epochs=2, **kw):
    torch.manual_seed(0)
    loader = DataLoader(train, batch_size=6, shuffle=True)
    if cache is not None:
        loader = with_teacher_cache(loader, cache)
    d = Distiller(teacher, student, sgd, teacher_cache=cache, **{**LOSS, **kw})
    d.fit(loader, epochs=epochs)
    return d


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_offline_with_the_whole_vocabulary_trains_as_online(built, divergence):
    """K = V: the renormalised top-k teacher is the teacher; the offline run's weights equal the online
    run's to the kernels' tolerance (topk_kd_loss vs kd_loss), step for step."""
    teacher, train, caches, _, _ = built
    online = _fit(teacher, None, train, TokenModel(0), divergence=divergence, beta=0.3)
    offline = _fit(None, caches[V], train, TokenModel(0), divergence=divergence, beta=0.3)
    assert offline.state.step == online.state.step == 8
    for a, b in zip(offline.student.parameters(), online.student.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_offline_loss_is_the_topk_loss_of_the_cached_entries(built, monkeypatch):
    """With K < V each micro-batch's loss is topk_kd_loss of the student's logits and that batch's cached
    values and indices (the trainer calls the op; nothing else is in the loss)."""
    teacher, train, caches, _, _ = built
    seen = []
    real = fastkd.topk_kd_loss

    def spy(s, values, indices, labels, **kw):
        out = real(s, values, indices, labels, **kw)
        if torch.is_grad_enabled():
            seen.append((s.detach().clone(), values, indices, labels, kw, out.detach()))
        return out

    monkeypatch.setattr(fastkd.train.teacher, "topk_kd_loss", spy)
    d = _fit(None, caches[4], train, TokenModel(0), epochs=1)
    assert d.state.step == len(seen) == 4
    for s, values, indices, labels, kw, out in seen:
        assert values.shape == indices.shape == (*s.shape[:-1], 4) and values.dtype == torch.float16
        assert kw["reduction"] == "sum" and kw["temperature"] == 2.0 and kw["hard_weight"] == 0.3
        ref = fastkd.reference.topk_kd_loss(s.double(), values.double(), indices, labels, **kw)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, distiller, logs):
        if logs["step"] == self.at:
            distiller.should_stop = True


def _resumable(run_dir, cache, train, evald, ev, callbacks=(), resume=False):
    torch.manual_seed(123)
    student = TokenModel(0, dropout=0.2)  # dropout: the RNG must be restored exactly
    loader = with_teacher_cache(DataLoader(train, batch_size=5, shuffle=True), cache)
    d = Distiller(None, student, lambda p: torch.optim.AdamW(p, lr=3e-2), teacher_cache=cache,
                  temperature={"schedule": "cosine", "start": 4.0, "end": 1.0}, hard_weight=0.5,
                  accumulation_steps=2, max_grad_norm=1.0, run_dir=run_dir, checkpoint_every=2, best_metric="ce",
                  callbacks=callbacks, progress=False, log_every=1)
    d.fit(loader, epochs=3, eval_loader=with_teacher_cache(DataLoader(evald, batch_size=4), ev), resume=resume)
    return d


def test_interrupted_and_resumed_offline_run_is_bit_exact(built, tmp_path):
    _, train, caches, evald, ev = built
    full = _resumable(tmp_path / "full", caches[4], train, evald, ev)
    part = _resumable(tmp_path / "part", caches[4], train, evald, ev, callbacks=[Interrupt(4)])
    assert part.state.step == 4 and part.state.batch_in_epoch == 2  # stopped mid-epoch 2 (3 steps/epoch)
    resumed = _resumable(tmp_path / "part", caches[4], train, evald, ev, resume=True)
    assert resumed.state.step == full.state.step == 9
    for a, b in zip(resumed.student.parameters(), full.student.parameters()):
        assert torch.equal(a, b)
    last = {k: v for k, v in full.state.history[-1].items() if k != "teacher_ce"}  # (NaN offline)
    assert {k: resumed.state.history[-1][k] for k in last} == last


def test_resume_with_another_cache_is_refused(built, tmp_path):
    _, train, caches, evald, ev = built
    _resumable(tmp_path / "run", caches[4], train, evald, ev, callbacks=[Interrupt(2)])
    with pytest.raises(RunDirError, match="teacher_cache"):
        _resumable(tmp_path / "run", caches[V], train, evald, ev, resume=True)


def test_offline_evaluation_uses_the_cached_teacher(built):
    """teacher_acc and agreement from the cache's top-1 equal the online teacher's; kd_loss at K = V equals
    the online kd_loss; teacher_ce is NaN (the cache holds the top-k alone); an eval loader without the
    cache gives NaN for the teacher metrics and the student's own metrics as usual."""
    teacher, train, caches, evald, ev = built
    student = TokenModel(1)
    online = Distiller(teacher, copy.deepcopy(student), sgd, **LOSS).evaluate(DataLoader(evald, batch_size=4))
    offline_d = Distiller(None, copy.deepcopy(student), sgd, teacher_cache=caches[V], **LOSS)
    offline = offline_d.evaluate(with_teacher_cache(DataLoader(evald, batch_size=4), ev))
    for key in ("student_acc", "teacher_acc", "agreement", "ce", "rows"):
        assert offline[key] == online[key], key
    assert offline["kd_loss"] == pytest.approx(online["kd_loss"], rel=1e-5)
    assert math.isnan(offline["teacher_ce"]) and math.isfinite(online["teacher_ce"])
    plain = offline_d.evaluate(DataLoader(evald, batch_size=4))
    assert plain["ce"] == online["ce"] and plain["student_acc"] == online["student_acc"]
    assert all(math.isnan(plain[k]) for k in ("teacher_acc", "agreement", "kd_loss", "teacher_ce"))


# ---- what does not fit ----------------------------------------------------------------------------------
def test_teacher_and_cache_together_or_a_cache_of_another_type_are_refused(built):
    teacher, _, caches, _, _ = built
    with pytest.raises(ValueError, match="not both"):
        Distiller(teacher, TokenModel(0), sgd, teacher_cache=caches[V])
    with pytest.raises(TypeError, match=r"teacher_cache must be a fastkd.TeacherCache"):
        Distiller(None, TokenModel(0), sgd, teacher_cache=str(caches[V].path))


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 1.0)])
def test_divergences_a_topk_teacher_makes_infinite_are_option_errors(built, divergence, beta):
    with pytest.raises(OptionError, match="not supported with a top-k teacher") as info:
        Distiller(None, TokenModel(0), sgd, teacher_cache=built[2][4], divergence=divergence, beta=beta)
    assert info.value.option == "divergence"


def test_batches_without_the_cache_are_refused(built):
    _, train, caches, _, _ = built
    d = Distiller(None, TokenModel(0), sgd, teacher_cache=caches[4], progress=False)
    with pytest.raises(ValueError, match="CachedTeacherDataset"):
        d.fit(DataLoader(train, batch_size=6))
    online = Distiller(built[0], TokenModel(0), sgd, progress=False)
    with pytest.raises(ValueError, match="teacher=None, teacher_cache=cache"):
        online.fit(with_teacher_cache(DataLoader(train, batch_size=6), caches[4]))


def test_a_student_of_another_vocabulary_or_other_positions_is_refused(built):
    _, train, caches, _, _ = built
    loader = with_teacher_cache(DataLoader(train, batch_size=6), caches[4])
    d = Distiller(None, TokenModel(0, vocab=V + 2), sgd, teacher_cache=caches[4], progress=False)
    with pytest.raises(ValueError, match=f"13 classes but the teacher cache .* vocabulary of {V}"):
        d.fit(loader)
    short = [CachedExample((b.example[0][:, :3], b.example[1][:, :3]), b.values, b.indices) for b in loader]
    d = Distiller(None, TokenModel(0), sgd, teacher_cache=caches[4], progress=False)
    with pytest.raises(ValueError, match="covers 42 positions but the student's logits .* have 18"):
        d.fit(short)
    other_k = [CachedExample(b.example, b.values[..., :3], b.indices[..., :3]) for b in loader]
    with pytest.raises(ValueError, match="holds top_k=4"):
        d.fit(other_k)


def test_with_teacher_cache_keeps_the_loaders_batches(built):
    """The same batches in the same order (the loader's own sampler, shuffling from torch's RNG), each
    with its examples' cache entries; a loader that is not a DataLoader, or unbatched, is refused."""
    _, train, caches, _, _ = built
    loader = DataLoader(train, batch_size=5, shuffle=True)
    torch.manual_seed(4)
    plain = list(loader)
    torch.manual_seed(4)
    cached = list(with_teacher_cache(loader, caches[4]))
    assert len(plain) == len(cached) == 5
    x_all = train.tensors[0]
    for (x, y), c in zip(plain, cached):
        assert isinstance(c, CachedExample)
        assert torch.equal(c.example[0], x) and torch.equal(c.example[1], y)
        assert c.values.shape == (len(x), SEQ, 4) and c.indices.dtype == torch.int32
        for row, xi in enumerate(x):
            i = int(torch.nonzero((x_all == xi).all(1))[0])
            assert torch.equal(c.values[row], caches[4][i][0]) and torch.equal(c.indices[row], caches[4][i][1])
    with pytest.raises(TypeError, match="must be a torch.utils.data.DataLoader"):
        with_teacher_cache(plain, caches[4])
    with pytest.raises(ValueError, match="batch_size=None"):
        with_teacher_cache(DataLoader(train, batch_size=None), caches[4])


def test_a_batch_of_examples_with_different_positions_is_an_error(tmp_path):
    teacher = Fp16Teacher()
    data = [(torch.arange(n) % V, torch.arange(n) % V) for n in (3, 3, 5)]
    cache = TeacherCache.build(tmp_path / "c", teacher, data, top_k=3, progress=False)
    loader = with_teacher_cache(DataLoader(data, batch_size=3, collate_fn=lambda items: items), cache)
    with pytest.raises(ValueError, match=r"mixes examples with \[3, 5\] cached positions"):
        next(iter(loader))


def test_check_data_refuses_another_dataset_of_the_same_length(built):
    _, train, caches, _, _ = built
    x, y = train.tensors
    other = TensorDataset(x.flip(0), y.flip(0))
    fastkd.CachedTeacherDataset(other, caches[4])  # only the count is checked by default
    with pytest.raises(TeacherCacheError, match=r"another dataset of the same length \(examples 0\.\.23 differ\)"):
        fastkd.CachedTeacherDataset(other, caches[4], check_data=True)
    with pytest.raises(TeacherCacheError, match=r"another dataset of the same length"):
        with_teacher_cache(DataLoader(other, batch_size=4), caches[4], check_data=True)
    fastkd.CachedTeacherDataset(train, caches[4], check_data=True)
    with pytest.raises(TeacherCacheError, match="examples 23 \\(expected 24\\)|examples 24 \\(expected 23\\)"):
        caches[4].check_dataset(TensorDataset(x[:23], y[:23]))
