"""fastkd.clip_grad_norm_ and friends against torch.nn.utils (and a float64 oracle).

The suite runs with the compiled kernels and again with FASTKD_DISABLE_EXTENSION=1 (the reference
fallback); ``fastkd.backend(device)`` says which one serves a device.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import no_sync

import fastkd
from fastkd import reference

INF = float("inf")
NORM_TYPES = [1.0, 2.0, 3.0, INF]
LOW = (torch.float16, torch.bfloat16)


def _shapes(n=41, seed=0):
    """41 shapes: awkward sizes (1, 7, 769, 1271, 32000 ...), 0-d to 4-D, one large one."""
    g = torch.Generator().manual_seed(seed)
    fixed = [(), (1,), (7,), (769,), (1271,), (32000,), (3, 7), (64, 769), (2, 3, 129), (1, 1, 1, 1), (40000, 9),
             (5, 1271), (16, 16, 3, 3)]
    out = list(fixed)
    while len(out) < n:
        dims = int(torch.randint(1, 4, (1,), generator=g))
        out.append(tuple(int(torch.randint(1, 300 if dims > 1 else 70000, (1,), generator=g)) for _ in range(dims)))
    return out


SHAPES = _shapes()


def _params(shapes, dtypes=(torch.float32,), device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(s, dtype=dt, device=device))
        p.grad = (torch.randn(s, generator=g) * scale * (1 + i % 5)).to(dtype=dt, device=device)
        params.append(p)
    return params


def _clone(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def _bit_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _eps(dtype):
    return torch.finfo(dtype).eps


# ---- against torch, fp32 ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("clipped", [True, False])
def test_matches_torch_fp32(norm_type, clipped):
    ours = _params(SHAPES)
    theirs = _clone(ours)
    oracle_norm, oracle_grads = reference.clip_grad_norm_float64([p.grad for p in ours], 1.0, norm_type)
    max_norm = 0.25 * float(oracle_norm) if clipped else 4.0 * float(oracle_norm)
    _, oracle_grads = reference.clip_grad_norm_float64([p.grad for p in ours], max_norm, norm_type)

    n_ours = fastkd.clip_grad_norm_(ours, max_norm, norm_type)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    assert n_ours.dtype == torch.float32 and n_ours.shape == ()
    # torch's fp32 norm of a large tensor can be off by 1e-3 relative (measured on the 11.5M-element
    # shape); ours is within 2e-6 of the float64 norm, and never further from it than torch's.
    exact = float(oracle_norm)
    err_ours = abs(float(n_ours) - exact) / exact
    err_torch = abs(float(n_torch) - exact) / exact
    assert err_ours <= 2e-6
    assert err_ours <= 2 * err_torch + 1e-7
    diff = abs(float(n_ours) - float(n_torch)) / exact
    for a, b, o in zip(ours, theirs, oracle_grads):
        if clipped:
            torch.testing.assert_close(a.grad.double(), o, rtol=4e-6, atol=1e-12)
            torch.testing.assert_close(a.grad, b.grad, rtol=diff * 1.01 + 4e-6, atol=1e-12)
        else:
            assert _bit_equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_low_precision_and_fp64_against_float64(dtype, norm_type):
    ours = _params(SHAPES[:20], dtypes=(dtype,), scale=0.1)
    theirs = _clone(ours)
    oracle_norm, _ = reference.clip_grad_norm_float64([p.grad for p in ours], 1.0, norm_type)
    max_norm = 0.3 * float(oracle_norm)
    _, oracle_grads = reference.clip_grad_norm_float64([p.grad for p in ours], max_norm, norm_type)
    n_ours = fastkd.clip_grad_norm_(ours, max_norm, norm_type)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    expect = torch.float64 if dtype == torch.float64 else torch.float32
    assert n_ours.dtype == expect  # torch returns a bf16/fp16 norm; ours is accumulated and returned in fp32
    rel_ours = abs(float(n_ours) - float(oracle_norm)) / float(oracle_norm)
    rel_torch = abs(float(n_torch) - float(oracle_norm)) / float(oracle_norm)
    assert rel_ours <= (1e-12 if dtype == torch.float64 else 2e-6)
    assert rel_ours <= rel_torch + 1e-12
    for a, o in zip(ours, oracle_grads):
        # one rounding to the gradient's dtype of the exact clipped value (plus the fp32 coefficient);
        # fp64: the norm's summation order differs from the oracle's
        if dtype == torch.float64:
            torch.testing.assert_close(a.grad, o, rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(a.grad.double(), o, rtol=_eps(dtype), atol=1e-7)


def test_mixed_dtypes_one_call():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    ours = _params(SHAPES, dtypes=dtypes, scale=0.05)
    grads0 = [p.grad.clone() for p in ours]
    oracle_norm, _ = reference.clip_grad_norm_float64(grads0, 1.0)
    max_norm = 0.5 * float(oracle_norm)
    _, oracle_grads = reference.clip_grad_norm_float64(grads0, max_norm)
    n = fastkd.clip_grad_norm_(ours, max_norm)
    assert n.dtype == torch.float32
    assert abs(float(n) - float(oracle_norm)) <= 2e-6 * float(oracle_norm)
    for p, o in zip(ours, oracle_grads):
        torch.testing.assert_close(p.grad.double(), o, rtol=_eps(p.dtype), atol=1e-7)


# ---- argument forms ----------------------------------------------------------------------------------
def test_generator_single_tensor_and_none_grads():
    ps = _params([(5, 3), (7,), (2, 2)])
    ps[1].grad = None
    no_grad = torch.nn.Parameter(torch.ones(4))
    theirs = _clone(ps)
    n1 = fastkd.clip_grad_norm_((p for p in ps + [no_grad]), 0.5)
    n2 = torch.nn.utils.clip_grad_norm_((p for p in theirs), 0.5)
    torch.testing.assert_close(n1, n2, rtol=2e-6, atol=0)
    assert ps[1].grad is None and no_grad.grad is None
    for a, b in zip(ps, theirs):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=4e-6, atol=0)
    single = _params([(10,)])[0]
    ref = single.grad.clone()
    n = fastkd.clip_grad_norm_(single, 0.1)
    torch.testing.assert_close(n, ref.norm(), rtol=2e-6, atol=0)
    torch.testing.assert_close(single.grad, ref * (0.1 / (ref.norm() + 1e-6)), rtol=4e-6, atol=0)


def test_empty_inputs_give_zero_norm():
    n = fastkd.clip_grad_norm_([], 1.0)
    assert n.shape == () and float(n) == 0.0 and n.dtype == torch.float32
    assert float(fastkd.get_total_norm([])) == 0.0
    assert float(fastkd.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0  # grad None
    with pytest.warns(UserWarning, match="empty generator"):
        fastkd.clip_grad_norm_((p for p in []), 1.0)
    fastkd.clip_grad_value_([], 1.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_zero_size_gradients(norm_type):
    ps = _params([(0,), (3, 0), (5,), (0, 7)])
    ref = ps[2].grad.clone()
    n = fastkd.clip_grad_norm_(ps, 0.1, norm_type)  # torch's inf-norm refuses empty tensors; we skip them
    torch.testing.assert_close(n, torch.linalg.vector_norm(ref, norm_type), rtol=2e-6, atol=0)
    only_empty = _params([(0,), (0, 3)])
    assert float(fastkd.clip_grad_norm_(only_empty, 1.0, norm_type)) == 0.0


def test_non_dense_gradients_are_clipped_in_place():
    base = torch.randn(64, 48)
    p1 = torch.nn.Parameter(torch.zeros(48, 64))
    p1.grad = base.t()  # dense, permuted strides
    big = torch.randn(32, 40)
    p2 = torch.nn.Parameter(torch.zeros(32, 20))
    p2.grad = big[:, ::2]  # strided, not dense
    g1, g2 = p1.grad.clone(), p2.grad.clone()
    n = fastkd.clip_grad_norm_([p1, p2], 1.0)
    expect = torch.linalg.vector_norm(torch.cat([g1.flatten(), g2.flatten()]).double())
    torch.testing.assert_close(n.double(), expect, rtol=2e-6, atol=0)
    coef = 1.0 / (float(n) + 1e-6)
    torch.testing.assert_close(p1.grad, g1 * coef, rtol=4e-6, atol=0)
    torch.testing.assert_close(p2.grad, g2 * coef, rtol=4e-6, atol=0)
    assert p1.grad.data_ptr() == base.data_ptr() and big[:, 1::2].abs().sum() > 0  # the untouched half is intact
    torch.testing.assert_close(big[:, ::2], p2.grad)


def test_split_api_mirrors_torch():
    ours = _params(SHAPES[:10])
    theirs = _clone(ours)
    n1 = fastkd.get_total_norm([p.grad for p in ours], 2.0)
    n2 = torch.nn.utils.get_total_norm([p.grad for p in theirs], 2.0)
    torch.testing.assert_close(n1, n2, rtol=2e-6, atol=0)
    fastkd.clip_grads_with_norm_(ours, 1.0, n2)  # torch's norm: the identical coefficient
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, n2)
    for a, b in zip(ours, theirs):
        assert _bit_equal(a.grad, b.grad)


@pytest.mark.parametrize("norm_type", [0.0, -INF, 0.5])
def test_other_norm_orders(norm_type):
    ours = _params(SHAPES[:6])
    theirs = _clone(ours)
    n1 = fastkd.clip_grad_norm_(ours, 1.0, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-12)


# ---- non-finite gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), INF])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_non_finite_like_torch(bad, norm_type):
    ours = _params([(10,), (3, 4), (7,)])
    ours[1].grad[1, 2] = bad
    theirs = _clone(ours)
    n1 = fastkd.clip_grad_norm_(ours, 1.0, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not math.isfinite(float(n1))
    torch.testing.assert_close(n1, n2, equal_nan=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    assert float(fastkd.nonfinite_flag(n1)) == 1.0 and fastkd.nonfinite_flag(n1).dtype == torch.float32

    raising = _params([(10,), (3, 4)])
    raising[0].grad[0] = bad
    before = [p.grad.clone() for p in raising]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastkd.clip_grad_norm_(raising, 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(raising, before):
        torch.testing.assert_close(p.grad, b, equal_nan=True)  # nothing scaled when it raises


def test_nonfinite_flag_finite():
    assert float(fastkd.nonfinite_flag(torch.tensor(3.0))) == 0.0


def _fused_adam_run(grad_value):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    w.grad = torch.randn(6)
    fastkd.clip_grad_norm_([w], 1.0)
    opt.step()  # one real step first: moments are not zero
    w.grad = torch.full((6,), grad_value)
    before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
    norm = fastkd.clip_grad_norm_([w], 1.0)
    fastkd.step_if_finite(opt, norm)
    return w, opt, before


def test_step_if_finite_skips_fused_step_without_sync():
    w, opt, (w0, s0) = _fused_adam_run(float("nan"))
    assert torch.equal(w.detach(), w0)
    for k, v in opt.state[w].items():
        assert torch.equal(v, s0[k]), k  # moments and step count untouched
    assert not hasattr(opt, "found_inf")
    w, opt, (w0, s0) = _fused_adam_run(0.5)
    assert not torch.equal(w.detach(), w0) and float(opt.state[w]["step"]) == float(s0["step"]) + 1


def test_step_if_finite_plain_optimizer():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    fastkd.step_if_finite(opt, fastkd.clip_grad_norm_([w], 1.0))
    assert torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    fastkd.step_if_finite(opt, fastkd.clip_grad_norm_([w], 1.0))
    torch.testing.assert_close(w.detach(), torch.tensor([1 - 0.6, 1 - 0.8, 1.0]), rtol=1e-5, atol=1e-6)


# ---- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_not_clipped_is_bit_identical(dtype):
    ps = _params(SHAPES, dtypes=(dtype,), scale=1e-3)
    before = [p.grad.clone() for p in ps]
    ptrs = [p.grad.data_ptr() for p in ps]
    fastkd.clip_grad_norm_(ps, 1e6)
    for p, b, ptr in zip(ps, before, ptrs):
        assert _bit_equal(p.grad, b) and p.grad.data_ptr() == ptr


def test_norm_is_deterministic_across_threads():
    grads = [p.grad for p in _params(SHAPES + [(3_000_000,)], dtypes=(torch.float32, torch.bfloat16))]
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            results.append(fastkd.get_total_norm(grads))
    finally:
        torch.set_num_threads(threads)
    assert all(_bit_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_norm_is_deterministic_across_threads(norm_type, dtype):
    """The pure-PyTorch grad_norm (the fallback kernel on the CPU) gives the same bits with 1 and 2
    threads, for sizes on both sides of ATen's parallel grain (32768) and odd ones; and it is accurate."""
    grads = [p.grad for p in _params([(7,), (32768,), (32769,), (1000, 77), (3_000_001,)], dtypes=(dtype,))]
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            results.append(reference.grad_norm(grads, norm_type))
    finally:
        torch.set_num_threads(threads)
    assert all(_bit_equal(r, results[0]) for r in results)
    exact, _ = reference.clip_grad_norm_float64(grads, 1.0, norm_type)
    torch.testing.assert_close(results[0].double(), exact, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


# ---- gradients that share memory (tied weights gathered twice, overlapping views) ----------------------------
def _aliased_cases(dtype, device="cpu"):
    """name -> a function making the parameters (a fresh copy of the same gradients each call)."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3_000_000, generator=g).to(dtype=dtype, device=device)  # above the CPU kernel's parallel grain
    small = torch.randn(1271, generator=g).to(dtype=dtype, device=device)
    mat = torch.randn(64, 80, generator=g).to(dtype=dtype, device=device)

    def view_params(buf, *views):
        buf = buf.clone()
        return [_with_grad(v(buf)) for v in views]

    return {
        "same parameter twice": lambda: [_with_grad(big.clone())] * 2,
        "same parameter three times, with others": lambda: (
            lambda p, q: [p, q, p, p])(_with_grad(big.clone()), _with_grad(small.clone())),
        "overlapping slices": lambda: view_params(big, lambda b: b[:2_000_000], lambda b: b[1_000_000:]),
        "interleaved slices": lambda: view_params(small, lambda b: b[::2], lambda b: b[1::2]),
        "non-dense view twice": lambda: view_params(mat, lambda b: b[:, ::2], lambda b: b[:, ::2]),
        "a view of another gradient": lambda: view_params(mat, lambda b: b, lambda b: b[3:9]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(_aliased_cases(torch.float32)))
def test_aliased_gradients_match_torch_deterministically(case, dtype):
    """clip_grad_norm_([p, p]) and friends: every element scaled (clamped) once per list entry that holds it,
    as torch's foreach ops do one entry after the other; the same bits on every run and thread count."""
    make = _aliased_cases(dtype)[case]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        theirs = make()
        ours_norm = fastkd.get_total_norm([p.grad for p in make()])
        exact, _ = reference.clip_grad_norm_float64([p.grad for p in theirs], 1.0)  # every entry counted
        torch.testing.assert_close(ours_norm.double(), exact, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
        # (fp32: for bf16 gradients torch's own norm is bf16 and so is its coefficient; fastkd's is fp32)
        torch_norm = torch.nn.utils.get_total_norm([p.grad for p in theirs]).float()
        max_norm = 1e-3 * float(torch_norm)  # clipped hard: a gradient scaled twice is visibly not scaled once
        with_ours = make()
        torch.nn.utils.clip_grads_with_norm_(with_ours, max_norm, ours_norm)
        torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, torch_norm)
        for nt in (2, 1, 2, 2):
            torch.set_num_threads(nt)
            ours = make()
            fastkd.clip_grads_with_norm_(ours, max_norm, torch_norm)  # torch's norm: bit-identical gradients
            assert all(_bit_equal(a.grad, b.grad) for a, b in zip(ours, theirs)), nt
            ours = make()
            assert _bit_equal(fastkd.clip_grad_norm_(ours, max_norm), ours_norm)  # the norm and scaling in one call
            assert all(_bit_equal(a.grad, b.grad) for a, b in zip(ours, with_ours)), nt
        clamped_theirs = make()
        torch.nn.utils.clip_grad_value_(clamped_theirs, 0.5)
        for nt in (2, 1):
            torch.set_num_threads(nt)
            clamped = make()
            fastkd.clip_grad_value_(clamped, 0.5)
            assert all(_bit_equal(a.grad, b.grad) for a, b in zip(clamped, clamped_theirs))
    finally:
        torch.set_num_threads(threads)


def test_aliased_gradients_through_the_fused_op():
    """The one-call op (norm and scale) with a tied weight listed twice: torch's result, twice scaled."""
    g = torch.randn(3_000_000)
    x, y = g.clone(), g.clone()
    n = torch.ops.fastkd.clip_grad_norm_([x, x], 1.0, 2.0)
    coef = reference.clip_coef(n, 1.0)
    torch._foreach_mul_([y, y], coef)  # torch's sequential scaling by the same coefficient
    assert _bit_equal(x, y)


def test_import_does_not_load_dtensor():
    """DTensor support costs `import fastkd` nothing: torch.distributed.tensor (about a second to import)
    is only looked at once something else has imported it (test_clip_distributed covers that case)."""
    code = "import sys, fastkd; print('torch.distributed.tensor' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]


def test_coefficient_formula_is_torchs():
    # a norm whose coefficient rounding depends on evaluating reciprocal(norm + 1e-6) * max_norm
    for v in (0.3, 1.7, 3.3333333, 123.456, 9.99e-7):
        total = torch.tensor(v)
        g1 = torch.randn(100)
        g2 = g1.clone()
        fastkd.clip_grads_with_norm_([_with_grad(g1)], 0.7, total)
        torch.nn.utils.clip_grads_with_norm_([_with_grad(g2)], 0.7, total)
        assert _bit_equal(g1, g2)


def _with_grad(g):
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    return p


# ---- clip_grad_value_ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("clip_value", [0.1, 1.0, 0.0])
def test_clip_grad_value_matches_torch(dtype, clip_value):
    ours = _params(SHAPES[:15] + [(0,)], dtypes=(dtype,))
    ours[3].grad.view(-1)[0] = float("nan")
    theirs = _clone(ours)
    fastkd.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("clip_value", [float("nan"), INF])
def test_clip_grad_value_non_finite_bound_like_torch(dtype, clip_value):
    """clip_value = nan makes every gradient NaN (vector bodies and scalar tails alike), inf changes nothing."""
    ours = _params([(7,), (19,), (1271,), (3, 5)], dtypes=(dtype,))
    theirs = _clone(ours)
    fastkd.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        assert _bit_equal(a.grad, b.grad) or (a.grad.isnan().all() and b.grad.isnan().all())
        assert bool(a.grad.isnan().all()) == math.isnan(clip_value)


# ---- complex gradients --------------------------------------------------------------------------------
def _complex_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (1271,), (40, 33)]
    params = [_with_grad(torch.randn(s, dtype=dtype, generator=g)) for s in shapes]
    strided = torch.randn(30, 20, dtype=dtype, generator=g)
    params.append(_with_grad(strided[:, ::3]))  # not dense
    params.append(_with_grad(torch.randn(50, dtype=dtype.to_real(), generator=g)))  # a real one beside them
    return params


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_complex_gradients_match_torch(dtype, norm_type):
    """torch's norm of complex gradients is the norm of their moduli |z|; the scaling multiplies them by the
    real coefficient. Both as in torch: with torch's norm the scaled gradients are equal to torch's."""
    ours, theirs = _complex_params(dtype), _complex_params(dtype)
    n_torch = torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type)
    n_ours = fastkd.get_total_norm([p.grad for p in ours], norm_type)
    assert n_ours.dtype == n_torch.dtype == (torch.float64 if dtype == torch.complex128 else torch.float32)
    torch.testing.assert_close(n_ours, n_torch, rtol=1e-5 if dtype == torch.complex64 else 1e-12, atol=0)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.1, n_torch)
    fastkd.clip_grads_with_norm_(ours, 0.1, n_torch)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
    ours, theirs = _complex_params(dtype), _complex_params(dtype)
    n1 = fastkd.clip_grad_norm_(ours, 0.1, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
    torch.testing.assert_close(n1, n2, rtol=1e-5 if dtype == torch.complex64 else 1e-12, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5 if dtype == torch.complex64 else 1e-12, atol=0)
    single = _with_grad(torch.randn(100, dtype=dtype))  # one group: the one-call path
    twin = _with_grad(single.grad.clone())
    torch.testing.assert_close(fastkd.clip_grad_norm_(single, 0.1, norm_type),
                               torch.nn.utils.clip_grad_norm_(twin, 0.1, norm_type), rtol=1e-5, atol=0)
    torch.testing.assert_close(single.grad, twin.grad, rtol=2e-5, atol=0)


def test_complex_gradients_cannot_be_clamped_as_in_torch():
    ours, theirs = _complex_params(torch.complex64), _complex_params(torch.complex64)
    with pytest.raises(NotImplementedError, match="clamp"):
        torch.nn.utils.clip_grad_value_(theirs, 0.1)
    before = [p.grad.clone() for p in ours]
    with pytest.raises(NotImplementedError, match=r"fastkd.clip_grad_value_: a gradient is complex .*"
                                                  r"torch.view_as_real\(p.grad\).clamp_"):
        fastkd.clip_grad_value_(ours, 0.1)
    assert all(torch.equal(p.grad, b) for p, b in zip(ours, before))  # nothing clamped before the error


# ---- ops: opcheck, compile, fallback -------------------------------------------------------------------
def _op_samples():
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        grads = [torch.randn(s, dtype=dt) for s in [(3, 5), (129,), (0,), (1,)]]
        yield dt, grads


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, INF])
def test_opcheck_grad_norm(norm_type):
    for _, grads in _op_samples():
        torch.library.opcheck(torch.ops.fastkd.grad_norm.default, (grads, norm_type))


def test_opcheck_scale_and_clamp():
    for dt, grads in _op_samples():
        for max_norm in (1.0, 1e3):
            torch.library.opcheck(torch.ops.fastkd.clip_grad_norm_.default, ([g.clone() for g in grads], max_norm, 2.0))
        norm = torch.tensor(50.0, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        torch.library.opcheck(torch.ops.fastkd.scale_grads_.default, ([g.clone() for g in grads], norm, 1.0))
        torch.library.opcheck(torch.ops.fastkd.scale_grads_.default, ([g.clone() for g in grads], norm, 1e3))
        torch.library.opcheck(torch.ops.fastkd.clamp_grads_.default, ([g.clone() for g in grads], 0.5))


def test_ops_match_reference_kernels():
    """The dispatcher's kernel (compiled or fallback) against the reference functions called directly."""
    for dt, grads in _op_samples():
        for p in NORM_TYPES:
            a = torch.ops.fastkd.grad_norm(grads, p)
            b = reference.grad_norm(grads, p)
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=2e-6 if dt != torch.float64 else 1e-13, atol=0)
        for max_norm in (1.0, 1e4):
            x, y = [g.clone() for g in grads], [g.clone() for g in grads]
            n1 = torch.ops.fastkd.clip_grad_norm_(x, max_norm, 2.0)
            n2 = reference.clip_grad_norm_(y, max_norm, 2.0)
            torch.testing.assert_close(n1, n2, rtol=2e-6 if dt != torch.float64 else 1e-13, atol=0)
            for u, v in zip(x, y):
                torch.testing.assert_close(u, v, rtol=_eps(dt) if dt in LOW else 4e-6, atol=0)
            x, y = [g.clone() for g in grads], [g.clone() for g in grads]
            norm = reference.grad_norm(grads, 2.0)
            torch.ops.fastkd.scale_grads_(x, norm, max_norm)
            reference.scale_grads_(y, norm, max_norm)
            for u, v in zip(x, y):
                assert _bit_equal(u, v)


def test_backend_follows_environment():
    disabled = os.environ.get("FASTKD_DISABLE_EXTENSION", "").lower() in ("1", "true", "yes", "on")
    assert fastkd.backend("cpu") == ("reference" if disabled else "extension")
    if not disabled and fastkd.extension_error() is None:
        assert fastkd.backend("cpu") == "extension"


def test_torch_compile_fullgraph():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 16)
    for m in (model, twin):
        m(x).square().sum().backward()

    def clip(params, max_norm):
        return fastkd.clip_grad_norm_(params, max_norm)

    compiled = torch.compile(clip, fullgraph=True, backend="aot_eager")
    n1 = compiled(list(model.parameters()), 0.5)
    n2 = clip(list(twin.parameters()), 0.5)
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)

    compiled_value = torch.compile(lambda ps: fastkd.clip_grad_value_(ps, 0.01), fullgraph=True, backend="aot_eager")
    compiled_value(list(model.parameters()))
    fastkd.clip_grad_value_(list(twin.parameters()), 0.01)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---- patching torch ------------------------------------------------------------------------------------
def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_patch_torch_clip_grad():
    original = torch.nn.utils.clip_grad_norm_
    original_mod = torch.nn.utils.clip_grad.clip_grad_norm_
    params = _params(SHAPES[:5])

    def loop():
        for _ in range(3):
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            torch.nn.utils.clip_grad.clip_grad_norm_(params, 0.1)

    handle = fastkd.patch_torch_clip_grad()
    try:
        assert torch.nn.utils.clip_grad_norm_ is fastkd.clip_grad_norm_
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is fastkd.clip_grad_norm_
        names = _ops_run(loop)
        assert "fastkd::clip_grad_norm_" in names  # the fused op: norm and scale in one call
    finally:
        handle.restore()
    assert torch.nn.utils.clip_grad_norm_ is original and torch.nn.utils.clip_grad.clip_grad_norm_ is original_mod
    names = _ops_run(loop)
    assert not any(n.startswith("fastkd::") for n in names) and "aten::_foreach_norm" in names

    with fastkd.patch_torch_clip_grad() as h:
        assert h.active and torch.nn.utils.clip_grad_value_ is fastkd.clip_grad_value_
        assert torch.nn.utils.get_total_norm is fastkd.get_total_norm
    assert torch.nn.utils.clip_grad_norm_ is original and not h.active



@pytest.mark.parametrize("order", [p for n in (2, 3) for p in itertools.permutations(range(n))],
                         ids=lambda p: "-".join(map(str, p)))
def test_patch_handles_restored_in_any_order(order):
    """Handles count: torch's functions stay fastkd's while one is active, and are torch's own again once
    every handle is restored, whatever the order (restoring one twice changes nothing)."""
    names = [(torch.nn.utils, "clip_grad_norm_"), (torch.nn.utils.clip_grad, "clip_grad_norm_"),
             (torch.nn.utils, "clip_grad_value_"), (torch.nn.utils.clip_grad, "clip_grad_value_"),
             (torch.nn.utils, "get_total_norm"), (torch.nn.utils, "clip_grads_with_norm_")]
    originals = [getattr(mod, name) for mod, name in names]
    assert torch.nn.utils.clip_grad_norm_ is not fastkd.clip_grad_norm_
    handles = [fastkd.patch_torch_clip_grad() for _ in order]
    try:
        for k, i in enumerate(order):
            handles[i].restore()
            handles[i].restore()
            left = len(order) - k - 1
            assert sum(h.active for h in handles) == left and not handles[i].active
            patched = [getattr(mod, name) is getattr(fastkd, name) for mod, name in names]
            assert patched == [left > 0] * len(names), (k, patched)
        assert all(getattr(mod, name) is orig for (mod, name), orig in zip(names, originals))
        with fastkd.patch_torch_clip_grad():  # and a later patch still works
            assert torch.nn.utils.clip_grad_norm_ is fastkd.clip_grad_norm_
        assert torch.nn.utils.clip_grad_norm_ is originals[0]
    finally:
        for h in handles:
            h.restore()


# ---- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_cuda_matches_float64_without_sync(dtype, norm_type):
    assert fastkd.backend("cuda") in ("extension", "reference")
    ours = _params(SHAPES, dtypes=(dtype,), device="cuda", scale=0.1)
    grads0 = [p.grad.clone() for p in ours]
    oracle_norm, _ = reference.clip_grad_norm_float64(grads0, 1.0, norm_type)
    max_norm = 0.3 * float(oracle_norm)
    _, oracle_grads = reference.clip_grad_norm_float64(grads0, max_norm, norm_type)
    with no_sync():
        n = fastkd.clip_grad_norm_(ours, max_norm, norm_type)
        flag = fastkd.nonfinite_flag(n)
    assert n.device.type == "cuda" and n.dtype == torch.float32 and float(flag) == 0.0
    assert abs(float(n) - float(oracle_norm)) <= 2e-6 * float(oracle_norm)
    for p, o in zip(ours, oracle_grads):
        torch.testing.assert_close(p.grad.double().cpu(), o, rtol=_eps(dtype), atol=1e-7)


@pytest.mark.cuda
def test_cuda_launch_count_and_determinism():
    params = _params([(1000,)] * 2000, device="cuda")
    fastkd.clip_grad_norm_(params, 1e-3)  # warm-up (allocator, pinned host blocks)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        norm = fastkd.clip_grad_norm_(params, 1e-3)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name and "Memset" not in e.name]
    if fastkd.backend("cuda") == "extension":
        assert sum("grad_norm_kernel" in k for k in kernels) == 1, kernels
        assert sum("scale_kernel" in k for k in kernels) == 1, kernels
        assert len(kernels) == 2, kernels
    grads = [p.grad for p in params]
    norms = [fastkd.get_total_norm(grads) for _ in range(3)]
    assert all(_bit_equal(x, norms[0]) for x in norms) and float(norm) > 0


@pytest.mark.cuda
def test_cuda_not_clipped_bit_identical_and_value():
    ps = _params(SHAPES, dtypes=(torch.float32, torch.bfloat16, torch.float16), device="cuda", scale=1e-3)
    before = [p.grad.clone() for p in ps]
    with no_sync():
        fastkd.clip_grad_norm_(ps, 1e6)
        fastkd.clip_grad_value_(ps, 1e6)
    assert all(_bit_equal(p.grad, b) for p, b in zip(ps, before))
    theirs = _clone(ps)
    with no_sync():
        fastkd.clip_grad_value_(ps, 1e-4)
    torch.nn.utils.clip_grad_value_(theirs, 1e-4)
    assert all(_bit_equal(a.grad, b.grad) for a, b in zip(ps, theirs))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_aliased_cases(torch.float32)))
def test_cuda_aliased_gradients_match_torch_deterministically(case, dtype):
    """The CUDA kernels with gradients that share memory: torch's result with torch's norm, the same bits on
    every run, no host sync (the passes are found on the host from the tensors' sizes and addresses)."""
    make = _aliased_cases(dtype, device="cuda")[case]
    theirs = make()
    norm = torch.nn.utils.get_total_norm([p.grad for p in theirs]).float()
    max_norm = 1e-3 * float(norm)
    torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, norm)
    clamped_theirs = make()
    torch.nn.utils.clip_grad_value_(clamped_theirs, 0.5)
    for _ in range(3):
        ours = make()
        with no_sync():
            fastkd.clip_grads_with_norm_(ours, max_norm, norm)
        assert all(_bit_equal(a.grad, b.grad) for a, b in zip(ours, theirs))
        ours = make()
        with no_sync():
            n = fastkd.clip_grad_norm_(ours, max_norm)  # the one-call op
        with_ours = make()
        torch.nn.utils.clip_grads_with_norm_(with_ours, max_norm, n)
        assert all(_bit_equal(a.grad, b.grad) for a, b in zip(ours, with_ours))
        clamped = make()
        with no_sync():
            fastkd.clip_grad_value_(clamped, 0.5)
        assert all(_bit_equal(a.grad, b.grad) for a, b in zip(clamped, clamped_theirs))


@pytest.mark.cuda
def test_cuda_clip_value_nan_and_complex_like_torch():
    ours = _params([(7,), (1271,), (3, 5)], dtypes=(torch.float32, torch.bfloat16), device="cuda")
    with no_sync():
        fastkd.clip_grad_value_(ours, float("nan"))
    assert all(p.grad.isnan().all() for p in ours)
    z = [_with_grad(torch.randn(s, dtype=torch.complex64, device="cuda")) for s in [(7,), (40, 33)]]
    w = [_with_grad(p.grad.clone()) for p in z]
    n1, n2 = fastkd.clip_grad_norm_(z, 0.1), torch.nn.utils.clip_grad_norm_(w, 0.1)
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=0)
    for a, b in zip(z, w):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=0)


@pytest.mark.cuda
def test_cuda_non_finite_and_opcheck():
    ps = _params([(10,), (3, 4)], device="cuda")
    ps[1].grad[0, 0] = float("nan")
    theirs = _clone(ps)
    with no_sync():
        n = fastkd.clip_grad_norm_(ps, 1.0)
        flag = fastkd.nonfinite_flag(n)
    assert float(flag) == 1.0
    torch.testing.assert_close(n, torch.nn.utils.clip_grad_norm_(theirs, 1.0), equal_nan=True)
    for a, b in zip(ps, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    grads = [torch.randn(s, device="cuda") for s in [(3, 5), (129,), (0,)]]
    torch.library.opcheck(torch.ops.fastkd.grad_norm.default, (grads, 2.0))
    torch.library.opcheck(torch.ops.fastkd.scale_grads_.default, (grads, torch.tensor(1.0, device="cuda"), 0.5))
    torch.library.opcheck(torch.ops.fastkd.clamp_grads_.default, (grads, 0.5))


@pytest.mark.cuda
def test_cuda_and_cpu_mixed_devices():
    ps = _params(SHAPES[:10], device="cuda") + _params(SHAPES[10:20])
    grads0 = [p.grad.clone() for p in ps]
    oracle, oracle_grads = reference.clip_grad_norm_float64(grads0, 0.5)
    n = fastkd.clip_grad_norm_(ps, 0.5)
    assert n.device.type == "cuda"
    torch.testing.assert_close(n.double().cpu(), oracle, rtol=2e-6, atol=0)
    for p, o in zip(ps, oracle_grads):
        torch.testing.assert_close(p.grad.double().cpu(), o, rtol=4e-6, atol=1e-12)


def _churn_pinned_memory(n=8):
    # Non-blocking copies from fresh pinned blocks: the caching host allocator hands freed pinned
    # blocks out again, so a graph that replays a copy from one of them reads someone else's bytes.
    for i in range(n):
        host = torch.full((4096,), float(i), pin_memory=True)
        host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype):
    # Under capture the gradient table is written by kernels from their parameters (no pinned host
    # memory read at replay) and the last block of the norm kernel re-zeroes the ticket counter.
    ps = _params(SHAPES[:12] + [(1000,)] * 1500, dtypes=(dtype,), device="cuda")  # > 480 table words
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graphs asks
        fastkd.clip_grad_norm_(ps, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = fastkd.clip_grad_norm_(ps, 0.5)
        fastkd.clip_grad_value_(ps, 0.01)
    g = torch.Generator().manual_seed(7)
    for trial in range(3):
        for p in ps:  # new gradients in the same storage, as a training loop's backward writes them
            p.grad.copy_(torch.randn(p.grad.shape, generator=g).to(dtype))
        oracle, clipped = reference.clip_grad_norm_float64([p.grad for p in ps], 0.5)
        _churn_pinned_memory()
        graph.replay()
        torch.cuda.synchronize()
        assert abs(float(norm) - float(oracle)) <= 2e-6 * float(oracle), trial
        for p, o in zip(ps, clipped):
            torch.testing.assert_close(p.grad.double().cpu(), o.clamp(-0.01, 0.01), rtol=_eps(dtype), atol=1e-7)
    # Eager calls after the capture still find the counter at 0.
    n_eager = fastkd.get_total_norm([p.grad for p in ps])
    torch.testing.assert_close(n_eager.double().cpu(), reference.clip_grad_norm_float64(
        [p.grad for p in ps], 1e9)[0], rtol=2e-6, atol=0)
