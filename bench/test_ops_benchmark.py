"""Per-op timings with pytest-benchmark (providers of one op share a group, so its table compares them):

    python -m pytest bench/test_ops_benchmark.py --benchmark-only [--benchmark-json out.json]

Not collected by `make test` (testpaths = tests): timings belong to benchmarks, never to tests. The
grids with CSVs, GB/s and peak memory are bench_kd_loss.py and bench_clip.py.
"""

import pytest
import torch

import fastkd
from fastkd import reference

pytest.importorskip("pytest_benchmark")

KD_SHAPE = (1024, 32000)
T = 2.0


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(KD_SHAPE, generator=g) * 2).requires_grad_(True)
    t = torch.randn(KD_SHAPE, generator=g) * 2
    return s, t


_compiled = torch.compile(reference.textbook_kd_loss, dynamic=False)
KD_PROVIDERS = {
    "fastkd": lambda s, t: fastkd.kd_loss(s, t, temperature=T),
    "eager": lambda s, t: reference.textbook_kd_loss(s, t, temperature=T),
    "compile": lambda s, t: _compiled(s, t, temperature=T),
}


@pytest.mark.parametrize("provider", list(KD_PROVIDERS))
def test_kd_loss_fwd_bwd(benchmark, logits, provider):
    s, t = logits
    fn = KD_PROVIDERS[provider]
    benchmark.group = f"kd_loss fwd+bwd {KD_SHAPE[0]}x{KD_SHAPE[1]} fp32"

    def setup():
        s.grad = None

    benchmark.pedantic(lambda: fn(s, t).backward(), setup=setup, rounds=10, warmup_rounds=3)  # first calls fault in fresh memory
    assert s.grad is not None and torch.isfinite(s.grad).all()


CLIP_PROVIDERS = {
    "fastkd": lambda ps: fastkd.clip_grad_norm_(ps, 1e30),
    "torch_foreach": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e30, foreach=True),
    "torch_loop": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e30, foreach=False),
}


@pytest.fixture(scope="module")
def small_grads():
    params = [torch.nn.Parameter(torch.empty(1000)) for _ in range(2000)]
    for p in params:
        p.grad = torch.randn(1000) * 1e-2
    return params


@pytest.mark.parametrize("provider", list(CLIP_PROVIDERS))
def test_clip_grad_norm_2000x1000(benchmark, small_grads, provider):
    benchmark.group = "clip_grad_norm_ 2000 x 1000 fp32 (not clipped)"
    norm = benchmark(CLIP_PROVIDERS[provider], small_grads)
    expected = torch.linalg.vector_norm(torch.cat([p.grad for p in small_grads]).double())
    torch.testing.assert_close(norm.double(), expected, rtol=1e-3, atol=0)
