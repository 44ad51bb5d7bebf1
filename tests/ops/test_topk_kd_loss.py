"""fastkd.topk_kd_loss against float64 oracles: the sparse reference (fastkd.reference.topk_kd_loss in float64)
and, independently, the dense one (the teacher's values scattered into a -inf-filled (..., V) teacher, then
fastkd.reference.kd_loss).

Tolerance as tests/ops/test_kd_loss.py (DESIGN.md, flash-attention's rule): the kernel's error may be at most
2x the error of the reference maths run in fp32 on the same inputs (for low-precision gradients including
the rounding to the student's dtype), plus a small floor.

The same tests run with the compiled kernels (each CPU instruction set: the fixture cpu_kernel) and, in CI,
again with FASTKD_DISABLE_EXTENSION=1.
"""

import math

import pytest
import torch
from conftest import (
    LAYOUTS,
    bytes_allocated_in,
    check_against_float64,
    layout_view,
    loss_and_grad,
    random_labels,
)

import fastkd
from fastkd import reference
from fastkd.ops._args import loss_options

DIVERGENCES = [("kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 0.9)]


def make_case(rows, vocab, k, dtype=torch.float32, vdtype=None, idx_dtype=torch.int64, scale=3.0, seed=0,
              lead=None):
    """Student logits (..., V) and the top-k (values, indices) of a correlated teacher, the indices of each row
    in a random order (as a cache may store them)."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, vocab) if lead is None else (*lead, vocab)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.5 * s
    values, indices = t.topk(k, dim=-1)
    order = torch.rand(values.shape, generator=g).argsort(-1)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    return s.to(dtype), values.to(vdtype or dtype), indices.to(idx_dtype)


def dense_teacher(values, indices, vocab):
    full = torch.full((*values.shape[:-1], vocab), -math.inf, dtype=values.dtype)
    return full.scatter(-1, indices.long(), values)


def run(fn, s, v, i, labels, grad_out=None, **kw):
    """Loss and student gradient of fn (fastkd.topk_kd_loss or reference.topk_kd_loss)."""
    return loss_and_grad(fn, s, (v, i), labels, grad_out, **kw)


def check(s, v, i, labels=None, grad_out=None, floor=1e-6, **kw):
    """Compare fastkd with the float64 sparse oracle under the 2x-plain-PyTorch rule."""
    return check_against_float64(fastkd.topk_kd_loss, reference.topk_kd_loss, s, (v, i), labels, grad_out, floor,
                                 **kw)


# ---- the float64 oracles agree ---------------------------------------------------------------------------
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_sparse_oracle_equals_dense_oracle(divergence, beta, k):
    """The sparse maths (support renormalisation, JSD's off-support term in closed form) is the dense KD loss
    of the scattered teacher, loss and autograd gradient, with -inf values and the hard term included."""
    s, v, i = make_case(9, 40, k, dtype=torch.float64, seed=k)
    if k > 1:
        v[2, 0] = -math.inf  # an entry with no mass
    labels = random_labels((9,), 40)
    kw = dict(temperature=1.7, divergence=divergence, beta=beta, soft_weight=0.8, hard_weight=0.3, reduction="sum")
    loss, grad = run(reference.topk_kd_loss, s, v, i, labels, **kw)
    s2 = s.clone().requires_grad_(True)
    dense = reference.kd_loss(s2, dense_teacher(v, i, 40), labels, **kw)
    dense.backward()
    torch.testing.assert_close(loss, dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, s2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_closed_form_gradient_equals_autograd(divergence, beta, reduction):
    """The fallback kernel's closed-form gradient equals autograd through the oracle (both fp64)."""
    s, v, i = make_case(8, 57, 9, dtype=torch.float64, seed=2)
    v[3] = -math.inf  # a row with no soft term
    labels = random_labels((8,), 57)
    kw = dict(temperature=1.3, divergence=divergence, beta=beta, soft_weight=0.8, hard_weight=0.4, reduction=reduction)
    loss, grad = reference.topk_kd_loss_and_grad(s, v, i, labels, 1.3, divergence, beta, 0.8, 0.4, -100, reduction,
                                                 True)
    ref_loss, expected = run(reference.topk_kd_loss, s, v, i, labels, **kw)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss.float())


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_reference_gradcheck_fp64(divergence, beta):
    s, v, i = make_case(3, 11, 4, dtype=torch.float64, seed=3)
    labels = torch.tensor([1, -100, 4])
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: reference.topk_kd_loss(x, v, i, labels, temperature=1.7, divergence=divergence, beta=beta,
                                         hard_weight=0.3), (s,))


def test_textbook_baseline_is_the_same_loss():
    """The benchmarks' eager baseline (gather + log_softmax, the DistillKit/TRL way) computes the same forward KL
    where it applies (no ignored rows, no -inf values)."""
    s, v, i = make_case(None, 300, 16, dtype=torch.float64, seed=4, lead=(2, 5))
    labels = random_labels((2, 5), 300, ignore_frac=0.0)
    kw = dict(temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(reference.textbook_topk_kd_loss(s, v, i, labels, **kw),
                               reference.topk_kd_loss(s, v, i, labels, **kw), rtol=1e-12, atol=1e-12)


# ---- the op against the oracle -------------------------------------------------------------------------
@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 0.0)])
@pytest.mark.parametrize("vocab", [7, 1271])
def test_full_support_equals_kd_loss(divergence, beta, vocab):
    """K = V with the indices a permutation of the vocabulary: the result is fastkd.kd_loss's."""
    s, v, i = make_case(13, vocab, vocab, seed=5)
    t = dense_teacher(v, i, vocab)
    labels = random_labels((13,), vocab)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, soft_weight=0.9, hard_weight=0.2)
    loss, grad = run(fastkd.topk_kd_loss, s, v, i, labels, **kw)
    s2 = s.clone().requires_grad_(True)
    dense = fastkd.kd_loss(s2, t, labels, **kw)
    dense.backward()
    torch.testing.assert_close(loss, dense.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad, s2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("vocab,k", [(1, 1), (7, 1), (7, 3), (769, 64), (1271, 1271), (4100, 1), (32000, 64),
                                     (128256, 256)])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_vocab_sizes_and_k(vocab, k, divergence, beta):
    rows = 21 if vocab < 5000 else 3
    s, v, i = make_case(rows, vocab, k, seed=vocab + k)
    check(s, v, i, temperature=2.0, divergence=divergence, beta=beta)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("dtype,vdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float32, torch.float16),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
@pytest.mark.parametrize("hard_weight,temperature", [(0.0, 4.0), (0.5, 1.0), (0.3, 2.5)])
def test_dtypes_and_hard_term(dtype, vdtype, divergence, beta, hard_weight, temperature):
    s, v, i = make_case(19, 1271, 50, dtype=dtype, vdtype=vdtype, seed=6)
    labels = random_labels((19,), 1271)
    check(s, v, i, labels, temperature=temperature, divergence=divergence, beta=beta, soft_weight=0.7,
          hard_weight=hard_weight)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64, torch.int16])
def test_index_dtypes(idx_dtype):
    s, v, i = make_case(7, 300, 20, idx_dtype=idx_dtype, seed=7)
    labels = random_labels((7,), 300)
    check(s, v, i, labels, temperature=2.0, divergence="jsd", beta=0.4, hard_weight=0.2)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_reductions_and_3d(reduction, with_labels):
    s, v, i = make_case(None, 769, 32, seed=8, lead=(3, 11))
    labels = random_labels((3, 11), 769) if with_labels else None
    loss, _ = check(s, v, i, labels, temperature=1.5, hard_weight=0.4 if with_labels else 0.0, reduction=reduction)
    assert loss.shape == ((3, 11) if reduction == "none" else ())
    if with_labels and reduction == "none":
        assert (loss[labels == -100] == 0).all()


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_ignored_rows(divergence, beta):
    s, v, i = make_case(8, 40, 6, seed=9)
    labels = random_labels((8,), 40, ignore_frac=0.5, seed=9)
    keep = labels != -100
    kw = dict(temperature=3.0, divergence=divergence, beta=beta)
    loss, grad = run(fastkd.topk_kd_loss, s, v, i, labels, **kw)
    expected, _ = run(fastkd.topk_kd_loss, s[keep], v[keep], i[keep], None, **kw)
    torch.testing.assert_close(loss, expected)
    assert (grad[~keep] == 0).all()
    check(s, v, i, labels, **kw)


def test_all_rows_ignored_gives_zero():
    s, v, i = make_case(5, 33, 4, seed=10)
    labels = torch.full((5,), -1, dtype=torch.long)
    loss, grad = run(fastkd.topk_kd_loss, s, v, i, labels, hard_weight=1.0, ignore_index=-1)
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_masked_values_and_rows_without_soft_term(divergence, beta):
    """-inf values are entries with no teacher mass; a row whose K values are all -inf has no soft term: its loss
    is its cross-entropy alone and its gradient that of the cross-entropy (zero without a hard term)."""
    s, v, i = make_case(6, 500, 30, seed=11)
    v[:, 20:] = -math.inf
    v[2] = -math.inf
    v[4, 1:] = -math.inf  # one finite value: p~ is one-hot
    labels = random_labels((6,), 500, ignore_frac=0.0)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta)
    check(s, v, i, labels, hard_weight=0.3, **kw)
    rows, grad = run(fastkd.topk_kd_loss, s, v, i, labels, hard_weight=0.3, reduction="none", **kw)
    ce = torch.nn.functional.cross_entropy(s[2:3], labels[2:3], reduction="none")
    torch.testing.assert_close(rows[2:3], 0.3 * ce)
    _, soft_grad = run(fastkd.topk_kd_loss, s, v, i, None, reduction="none", **kw)
    assert (soft_grad[2] == 0).all() and (soft_grad[[0, 1, 3, 4, 5]] != 0).any(-1).all()


@pytest.mark.usefixtures("cpu_kernel")
def test_all_rows_without_soft_term():
    s, v, i = make_case(4, 64, 8, seed=12)
    loss, grad = run(fastkd.topk_kd_loss, s, torch.full_like(v, -math.inf), i, None, temperature=2.0)
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_give_non_finite_rows(divergence, beta, dtype):
    """A NaN or +inf student logit (off the support, in the kernel's second chunk) or teacher value makes its
    row's loss and gradient non-finite, as the textbook formula does (kd_loss's rule); -inf stays an entry
    without mass; NaN among all -inf values is not a row without a soft term; other rows are untouched."""
    s, v, i = make_case(8, 3000, 16, seed=13)
    off = [int(torch.isin(torch.arange(3000), i[r], invert=True).nonzero()[-1]) for r in range(8)]
    s[1, off[1]], s[2, off[2]] = math.nan, math.inf
    v[3, 5], v[4, 5] = math.nan, math.inf
    v[5] = -math.inf
    v[5, 0] = math.nan
    s[6, off[6]], v[7, 2] = -math.inf, -math.inf  # masked entries: finite rows
    s, v = s.to(dtype), v.to(dtype)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    x = s.clone().requires_grad_(True)
    loss = fastkd.topk_kd_loss(x, v, i, **kw)
    loss.sum().backward()
    bad = [False, True, True, True, True, True, False, False]
    assert (~torch.isfinite(loss)).tolist() == bad
    assert (~torch.isfinite(x.grad.float()).all(-1)).tolist() == bad
    s2 = s.clone()
    s2[0, 7] = math.nan
    v2 = torch.full_like(v, -math.inf)
    x2 = s2.clone().requires_grad_(True)
    fastkd.topk_kd_loss(x2, v2, i, **kw).sum().backward()  # rows without a soft term have no loss at all
    assert (x2.grad == 0).all()
    good = ~torch.tensor(bad)
    ref = reference.topk_kd_loss(s[good].double(), v[good].double(), i[good], **kw)
    torch.testing.assert_close(loss[good].double(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_kernel")
def test_log_probability_values_equal_logits():
    """Values given as the teacher's log-probabilities (over V) give the loss of its logits: p~ is the same."""
    s, v, i = make_case(5, 300, 12, seed=14)
    shifted = v - 7.25
    a = run(fastkd.topk_kd_loss, s, v, i, None, temperature=2.0, divergence="jsd", beta=0.3)
    b = run(fastkd.topk_kd_loss, s, shifted, i, None, temperature=2.0, divergence="jsd", beta=0.3)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-7)


@pytest.mark.usefixtures("cpu_kernel")
def test_index_order_within_a_row_does_not_matter():
    s, v, i = make_case(6, 200, 17, seed=15)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(0))
    a = run(fastkd.topk_kd_loss, s, v, i, None, temperature=2.0, divergence="jsd", beta=0.5)
    b = run(fastkd.topk_kd_loss, s, v[:, perm], i[:, perm], None, temperature=2.0, divergence="jsd", beta=0.5)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_grad_output_not_one(reduction, divergence, beta):
    s, v, i = make_case(13, 300, 20, seed=16)
    labels = random_labels((13,), 300)
    g = torch.randn(13, dtype=torch.float64).float() if reduction == "none" else torch.tensor(-2.5)
    check(s, v, i, labels, grad_out=g, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.2,
          reduction=reduction)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_extreme_logits(temperature, divergence, beta):
    s, v, i = make_case(5, 1000, 40, scale=3e3, seed=17)
    s, v = s.clamp(-1e4, 1e4), v.clamp(-1e4, 1e4)
    s[0, 0] = 1e4
    labels = random_labels((5,), 1000, ignore_frac=0.0)
    check(s, v, i, labels, temperature=temperature, divergence=divergence, beta=beta, hard_weight=0.1)


@pytest.mark.usefixtures("cpu_kernel")
def test_non_contiguous_inputs():
    s, v, i = make_case(10, 600, 30, seed=18)
    s_wide = torch.zeros(10, 700)
    s_wide[:, :600] = s
    v_wide, i_wide = torch.stack([v, v], -1).flatten(-2), torch.stack([i, i], -1).flatten(-2)
    # a student row stride of 700; values and indices with a last-dimension stride of 2 (copied inside)
    check(s_wide[:, :600], v_wide[:, ::2], i_wide[:, ::2], temperature=2.0)
    s3, v3, i3 = make_case(None, 64, 5, seed=19, lead=(6, 5))
    labels = random_labels((6, 5), 64)
    check(s3.transpose(0, 1), v3.transpose(0, 1), i3.transpose(0, 1), labels.t(), hard_weight=0.5)


def _layout_case(layout, vocab, k, dtype=torch.float32, seed=0):
    """Student logits in the LAYOUTS view and a top-k teacher of the same leading shape, its values and indices
    in another memory order (views of a [..., K] tensor whose last two dimensions are swapped in memory)."""
    g = torch.Generator().manual_seed(seed)
    s = layout_view(layout, lambda shape: (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype), vocab)
    t = torch.randn(s.shape, generator=g, dtype=torch.float64) * 3 + 0.5 * s.double()
    values, indices = t.topk(k, dim=-1)
    order = torch.rand(values.shape, generator=g).argsort(-1)
    values, indices = values.gather(-1, order).to(dtype), indices.gather(-1, order)
    return s, values.transpose(-1, -2).contiguous().transpose(-1, -2), indices


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("vocab,k,divergence,dtype", [(300, 20, "kl", torch.float32),
                                                      (5000, 64, "jsd", torch.bfloat16)], ids=str)
def test_strided_layouts(layout, vocab, k, divergence, dtype):
    """Sliced, transposed, padded and 4-D student views (LAYOUTS) give the float64 oracle's loss and gradient."""
    s, v, i = _layout_case(layout, vocab, k, dtype, seed=vocab)
    labels = random_labels(s.shape[:-1], vocab, seed=4)
    check(s, v, i, labels, temperature=2.0, divergence=divergence, hard_weight=0.3)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.skipif(fastkd.kernel_info()["cpu"] == "reference", reason="the extension is disabled or not built")
@pytest.mark.parametrize("layout", sorted(name for name, case in LAYOUTS.items() if case[3]))
def test_strided_layouts_are_read_in_place(layout):
    """The kernel reads these student views where they are: no copy of the logits (the top-k teacher's K
    columns may be copied: they are K / V of the logits' size)."""
    vocab, k = 4000, 32
    s, v, i = _layout_case(layout, vocab, k, seed=8)
    logits_bytes = s[..., 0].numel() * vocab * 4
    with torch.no_grad():
        loss, allocated = bytes_allocated_in(lambda: fastkd.topk_kd_loss(s, v, i, temperature=2.0))
    assert allocated < logits_bytes / 8, (allocated, logits_bytes)
    s.requires_grad_(True)
    _, allocated = bytes_allocated_in(lambda: fastkd.topk_kd_loss(s, v, i, temperature=2.0))
    assert allocated < 1.25 * logits_bytes, (allocated, logits_bytes)  # the gradient only
    assert torch.equal(loss, fastkd.topk_kd_loss(s.detach().contiguous(), v, i, temperature=2.0))


@pytest.mark.usefixtures("cpu_kernel")
def test_deterministic_and_no_grad_forward_matches():
    s, v, i = make_case(64, 4000, 64, seed=20)
    a = run(fastkd.topk_kd_loss, s, v, i, None, temperature=2.0, divergence="jsd")
    b = run(fastkd.topk_kd_loss, s, v, i, None, temperature=2.0, divergence="jsd")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with torch.no_grad():
        c = fastkd.topk_kd_loss(s.requires_grad_(True), v, i, temperature=2.0, divergence="jsd")
    assert torch.equal(c, a[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_gradient_equals_row_blocks(cpu_kernel, dtype):
    """Gradients of 64 MiB and more are written with non-temporal stores by the C++ CPU kernel: the values
    must be the same, bit for bit, as for the same rows computed in small blocks."""
    if cpu_kernel == "reference":
        pytest.skip("the non-temporal store path is the compiled CPU kernel's")
    vocab = 32000 if dtype == torch.float32 else 56000
    s, v, i = make_case(600, vocab, 64, dtype=dtype, seed=21)
    labels = random_labels((600,), vocab)
    kw = dict(temperature=2.0, hard_weight=0.3, reduction="sum")
    loss, grad = run(fastkd.topk_kd_loss, s, v, i, labels, **kw)
    parts = [run(fastkd.topk_kd_loss, s[r:r + 100], v[r:r + 100], i[r:r + 100], labels[r:r + 100], **kw)
             for r in range(0, 600, 100)]
    assert torch.equal(grad, torch.cat([g for _, g in parts]))
    torch.testing.assert_close(loss, sum(p for p, _ in parts), rtol=1e-6, atol=0)


def test_teacher_is_constant_and_module_matches_function():
    s, v, i = make_case(6, 90, 7, seed=22)
    labels = random_labels((6,), 90)
    v = v.clone().requires_grad_(True)
    kw = dict(temperature=3.0, divergence="jsd", beta=0.2, soft_weight=0.5, hard_weight=0.5, reduction="sum")
    mod = fastkd.TopKKDLoss(**kw)
    x = s.clone().requires_grad_(True)
    out = mod(x, v, i, labels)
    out.backward()
    assert v.grad is None and x.grad is not None
    assert torch.equal(out, fastkd.topk_kd_loss(s, v, i, labels, **kw))
    assert "temperature=3.0" in repr(mod)


# ---- autograd, float64, transforms, compile ----------------------------------------------------------------
def test_double_backward_is_an_error():
    s, v, i = make_case(3, 20, 4, seed=23)
    s.requires_grad_(True)
    loss = fastkd.topk_kd_loss(s, v, i)
    with pytest.raises(RuntimeError, match="fastkd.topk_kd_loss does not support double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_second_backward_through_same_graph_is_an_error():
    s, v, i = make_case(3, 20, 4, seed=24)
    s.requires_grad_(True)
    loss = fastkd.topk_kd_loss(s, v, i)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fastkd.topk_kd_loss: backward through the same loss twice"):
        loss.backward()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2])
def test_gradcheck_float64(divergence, beta):
    """float64 inputs run the reference maths in float64: gradcheck and gradgradcheck hold on the public op."""
    s, v, i = make_case(3, 11, 4, dtype=torch.float64, seed=25)
    labels = random_labels((3,), 11, ignore_frac=0.0)
    x = s.clone().requires_grad_(True)

    def f(u):
        return fastkd.topk_kd_loss(u, v, i, labels, temperature=1.5, divergence=divergence, beta=beta,
                                   hard_weight=0.2)

    assert f(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_torch_func_grad():
    s, v, i = make_case(5, 40, 6, seed=26)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3)
    _, fused = run(fastkd.topk_kd_loss, s, v, i, None, **kw)
    g = torch.func.grad(lambda x: fastkd.topk_kd_loss(x, v, i, **kw))(s)
    torch.testing.assert_close(g, fused, rtol=1e-4, atol=1e-7)


def _op_args(reduction, with_grad, idx_dtype=torch.int64):
    s, v, i = make_case(6, 97, 9, idx_dtype=idx_dtype, seed=27)
    labels = random_labels((6,), 97)
    return (s.requires_grad_(with_grad), v, i, labels, loss_options(2.0, 0.4, 1.0, 0.5), None, "jsd", -100, reduction,
            with_grad)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_opcheck(reduction, idx_dtype):
    torch.library.opcheck(torch.ops.fastkd.topk_kd_loss_fwd, _op_args(reduction, False, idx_dtype))
    # With with_grad=True the second output is the fused gradient, which the registered backward scales in
    # place (as kd_loss_fwd's: tests/ops/test_kd_loss.py::test_opcheck says why the AOT tests do not apply).
    torch.library.opcheck(torch.ops.fastkd.topk_kd_loss_fwd, _op_args(reduction, True, idx_dtype),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastkd.topk_kd_loss_terms_fwd, _op_args(reduction, False, idx_dtype))
    torch.library.opcheck(torch.ops.fastkd.topk_kd_loss_terms_fwd, _op_args(reduction, True, idx_dtype),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,hard_weight,temperature", [("kl", 0.0, 2.0), ("jsd", 0.4, 1.0)])
def test_return_terms(reduction, divergence, hard_weight, temperature):
    """As test_kd_loss.py's: the terms of the loss's own pass are the float64 oracle's terms alone; the loss and
    gradient are those without return_terms. One row's teacher values are all -inf (no soft term)."""
    s, v, i = make_case(None, 500, 24, seed=35, lead=(3, 5))
    v[1, 2] = -math.inf
    labels = random_labels((3, 5), 500, seed=36)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, reduction=reduction)
    x = s.clone().requires_grad_(True)
    loss, terms = fastkd.topk_kd_loss(x, v, i, labels, hard_weight=hard_weight, return_terms=True, **kw)
    loss.sum().backward()
    ref_soft = reference.topk_kd_loss(s.double(), v.double(), i, labels, soft_weight=1.0, hard_weight=0.0, **kw)
    ref_hard = reference.topk_kd_loss(s.double(), v.double(), i, labels, soft_weight=0.0, hard_weight=1.0, **kw)
    torch.testing.assert_close(terms.soft.double(), ref_soft, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(terms.hard.double(), ref_hard, rtol=2e-5, atol=1e-6)
    y = s.clone().requires_grad_(True)
    plain = fastkd.topk_kd_loss(y, v, i, labels, hard_weight=hard_weight, **kw)
    plain.sum().backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(reduction):
    s, v, i = make_case(None, 301, 16, seed=28, lead=(2, 5))
    labels = random_labels((2, 5), 301)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.3, reduction=reduction)

    def step(x, val, idx, lab):
        return (fastkd.topk_kd_loss(x, val, idx, lab, **kw) * 1.5).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x = s.clone().requires_grad_(True)
    out = compiled(x, v, i, labels)
    out.backward()
    xr = s.double().requires_grad_(True)
    ref = (reference.topk_kd_loss(xr, v.double(), i, labels, **kw) * 1.5).sum()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


def test_torch_compile_changing_temperature_compiles_once():
    """A temperature and weight schedule changes the options every step: fullgraph keeps working and the graph
    is compiled once for the changing values (the first call's static graph aside), as for kd_loss."""
    s, v, i = make_case(6, 97, 8, seed=31)
    labels = random_labels((6,), 97)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, val, idx, lab, T, hw):
        return fastkd.topk_kd_loss(x, val, idx, lab, temperature=T, divergence="jsd", beta=0.3, hard_weight=hw)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counting)
    with torch._dynamo.config.patch(recompile_limit=2):  # a recompile per value would fail here
        for T, hw in [(1.0, 0.5), (1.5, 0.4), (2.0, 0.3), (3.0, 0.1)]:
            x = s.clone().requires_grad_(True)
            loss = compiled(x, v, i, labels, T, hw)
            loss.backward()
            ref_loss, ref_grad = run(reference.topk_kd_loss, s.double(), v.double(), i, labels, temperature=T,
                                     divergence="jsd", beta=0.3, hard_weight=hw)
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert len(graphs) <= 2, len(graphs)


# ---- bad input -------------------------------------------------------------------------------------------
def _dup(i):
    i = i.clone()
    i[2, 3] = i[2, 0]
    return i


def _out_of_range(i, value):
    i = i.clone()
    i[2, 1] = value
    return i


BAD = [
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v[:, :4], i), ValueError, r"teacher_values \(6, 4\) and teacher_indices "
     r"\(6, 5\) must have the same shape"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v[:3], i[:3]), ValueError, r"rows differ"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s[:, :4], v, i % 4), ValueError, r"K = 5 teacher entries per row but the "
     r"student's vocabulary has 4"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v[:, :0], i[:, :0]), ValueError, r"K = 0"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i.float()), TypeError, r"teacher_indices must be an integer tensor"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i.bool()), TypeError, r"teacher_indices must be an integer tensor"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i.tolist()), TypeError, r"teacher_indices must be an integer tensor"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v.long(), i), TypeError, r"teacher_values must be float"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s.long(), v, i), TypeError, r"student_logits must be float"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v.to("meta"), i), ValueError, r"teacher_values is on meta"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i.to("meta")), ValueError, r"teacher_indices is on meta"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, divergence="reverse_kl"), ValueError,
     r"'reverse_kl' is not supported with a top-k teacher.*infinite.*outside the teacher's top-k support.*Use "
     r"divergence='kl', or 'jsd' with beta < 1"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, divergence="jsd", beta=1.0), ValueError,
     r"'jsd' with beta=1 is not supported.*infinite"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, divergence="js"), ValueError, r"unknown divergence 'js'"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, temperature=0.0), ValueError, r"fastkd.topk_kd_loss: temperature"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, reduction="mean"), ValueError, r"unknown reduction 'mean'"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, hard_weight=0.5), ValueError, r"labels are required"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, l[:3]), ValueError, r"labels must have the logits' leading"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, i, l + 100), ValueError, r"labels hold .* outside \[0, 50\)"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, _out_of_range(i, 50)), ValueError,
     r"teacher_indices'?: row 2 holds 50, outside \[0, 50\)"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, _out_of_range(i, -1)), ValueError,
     r"teacher_indices'?: row 2 holds -1, outside \[0, 50\)"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, _dup(i)), ValueError, r"teacher_indices'?: row 2 holds \d+ twice"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s.double(), v, _dup(i)), ValueError, r"teacher_indices'?: row 2 holds"),
    (lambda s, v, i, l: fastkd.topk_kd_loss(s, v, _dup(i).int()), ValueError, r"teacher_indices'?: row 2 holds"),
]


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("call,exc,pattern", BAD)
def test_bad_input(call, exc, pattern):
    s, v, i = make_case(6, 50, 5, seed=29)
    labels = random_labels((6,), 50, ignore_frac=0.0)
    with pytest.raises(exc, match=pattern):
        call(s, v, i, labels)


@pytest.mark.usefixtures("cpu_kernel")
def test_op_checks_its_own_arguments():
    """Direct callers of torch.ops.fastkd.topk_kd_loss_fwd get errors that name the argument too."""
    s, v, i = make_case(4, 30, 5, seed=30)
    op = torch.ops.fastkd.topk_kd_loss_fwd
    with pytest.raises(ValueError, match="divergence.*infinite"):
        op(s, v, i, None, loss_options(1.0, 0.5, 1.0, 0.0), None, "reverse_kl", -100, "sum", False)
    with pytest.raises(ValueError, match="divergence.*infinite"):
        op(s, v, i, None, loss_options(1.0, 1.0, 1.0, 0.0), None, "jsd", -100, "sum", False)
    with pytest.raises(ValueError, match="teacher_values"):
        op(s, v[:, :3], i, None, loss_options(1.0, 0.5, 1.0, 0.0), None, "kl", -100, "sum", False)
    with pytest.raises(ValueError, match="teacher_indices"):
        op(s, v, i.float(), None, loss_options(1.0, 0.5, 1.0, 0.0), None, "kl", -100, "sum", False)
    with pytest.raises(ValueError, match="teacher_indices.*row 1 holds 30"):
        op(s, v, torch.where(torch.arange(4).unsqueeze(1) == 1, 30, i), None, loss_options(1.0, 0.5, 1.0, 0.0), None, "kl",
           -100, "sum", True)
    with pytest.raises(ValueError, match="options"):
        op(s, v, i, None, torch.tensor([1.0, 0.5, 1.0, 0.0]), None, "kl", -100, "sum", False)


def test_normalizer_divides_the_sum_and_its_gradient(cpu_kernel):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 40, generator=g).requires_grad_()
    top = torch.randn(5, 40, generator=g).topk(7)
    labels = torch.tensor([1, -100, 3, 4, 5])
    n = torch.tensor(13)
    loss = fastkd.topk_kd_loss(s, top.values, top.indices, labels, temperature=2.0, hard_weight=0.5, normalizer=n)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    want = fastkd.reference.topk_kd_loss(s64, top.values.double(), top.indices, labels, 2.0, "kl", 0.5, 1.0, 0.5,
                                         -100, "sum") / 13
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
