"""fastkd.kd_loss against a float64 oracle (fastkd.reference.kd_loss run in float64).

Tolerance (DESIGN.md, flash-attention's rule): the kernel's error may be at most 2x the error plain
PyTorch makes on the same inputs in the same working precision, plus a small floor. "Plain PyTorch"
is the reference maths run in fp32 (the precision fastkd computes in); for low-precision gradients
its error includes rounding the fp32 gradient to the student's dtype.

The same tests run with the compiled kernels and, in CI, again with FASTKD_DISABLE_EXTENSION=1.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    bytes_allocated_in,
    check_against_float64,
    layout_view,
    loss_and_grad,
    random_labels,
)

import fastkd
from fastkd import _extension, reference
from fastkd.ops._args import loss_options

CPU = torch.device("cpu")
DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def make_logits(rows, vocab, dtype=torch.float32, scale=3.0, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, vocab) if lead is None else (*lead, vocab)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.5 * s.double()).to(dtype)
    return s, t


def run(fn, s, t, labels, grad_out=None, **kw):
    """Loss and student gradient of fn (fastkd.kd_loss or reference.kd_loss)."""
    return loss_and_grad(fn, s, (t,), labels, grad_out, **kw)


def check(s, t, labels=None, grad_out=None, floor=1e-6, **kw):
    """Compare fastkd with the float64 oracle under the 2x-plain-PyTorch rule."""
    return check_against_float64(fastkd.kd_loss, reference.kd_loss, s, (t,), labels, grad_out, floor, **kw)


# ---- the CPU kernel's instruction sets (the fixture cpu_kernel: tests/conftest.py) -------------------------
_TABLES = _extension.cpu_kernel_tables()


@pytest.mark.skipif(fastkd.kernel_info()["cpu"] == "reference", reason="the extension is disabled or not built")
@pytest.mark.parametrize("capability", ["", "avx2", "default"])
def test_cpu_kernel_follows_torch_capability(capability):
    """fastkd runs the AVX-512 copy exactly where torch runs its own AVX-512 kernels (ATEN_CPU_CAPABILITY
    included) and the module was built; otherwise fastkd._C's own copy."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    code = ("import torch, fastkd; "
            "print(torch.backends.cpu.get_cpu_capability(), fastkd.kernel_info()['cpu'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch_cap, isa = out.stdout.split()
    expect = "avx512" if torch_cap == "AVX512" and "avx512" in _TABLES else fastkd.kernel_info()["cpu_build_isa"]
    assert isa == expect, (torch_cap, isa)


# ---- maths ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("vocab", [1, 7, 769, 1271, 32000, 128256])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_vocab_sizes_and_divergences(vocab, divergence, beta):
    rows = 37 if vocab < 5000 else 3
    s, t = make_logits(rows, vocab, seed=vocab)
    check(s, t, temperature=2.0, divergence=divergence, beta=beta)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
@pytest.mark.parametrize("hard_weight,temperature", [(0.0, 4.0), (0.5, 1.0), (0.3, 2.5)])
def test_dtypes_and_hard_term(dtype, divergence, beta, hard_weight, temperature):
    s, t = make_logits(19, 1271, dtype=dtype, seed=3)
    labels = random_labels((19,), 1271)
    check(s, t, labels, temperature=temperature, divergence=divergence, beta=beta, soft_weight=0.7,
          hard_weight=hard_weight)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_reductions_and_3d(reduction, with_labels):
    s, t = make_logits(None, 769, lead=(3, 11), seed=5)
    labels = random_labels((3, 11), 769) if with_labels else None
    loss, _ = check(s, t, labels, temperature=1.5, hard_weight=0.4 if with_labels else 0.0, reduction=reduction)
    assert loss.shape == ((3, 11) if reduction == "none" else ())
    if with_labels and reduction == "none":
        assert (loss[labels == -100] == 0).all()


def test_batchmean_is_per_valid_token():
    s, t = make_logits(None, 50, lead=(4, 6), seed=6)
    labels = random_labels((4, 6), 50, ignore_frac=0.4)
    rows = fastkd.kd_loss(s, t, labels, temperature=2.0, reduction="none")
    mean = fastkd.kd_loss(s, t, labels, temperature=2.0)
    n_valid = (labels != -100).sum()
    torch.testing.assert_close(mean, rows.sum() / n_valid)


def test_all_rows_ignored_gives_zero():
    s, t = make_logits(5, 33, seed=7)
    labels = torch.full((5,), -1, dtype=torch.long)
    loss, grad = run(fastkd.kd_loss, s, t, labels, hard_weight=1.0, ignore_index=-1)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_ignored_rows_excluded_without_hard_term():
    s, t = make_logits(8, 40, seed=8)
    labels = random_labels((8,), 40, ignore_frac=0.5, seed=9)
    keep = labels != -100
    loss, grad = run(fastkd.kd_loss, s, t, labels, temperature=3.0)
    expected, _ = run(fastkd.kd_loss, s[keep], t[keep], None, temperature=3.0)
    torch.testing.assert_close(loss, expected)
    assert (grad[~keep] == 0).all()


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_grad_output_not_one(reduction, divergence, beta):
    s, t = make_logits(13, 300, seed=10)
    labels = random_labels((13,), 300)
    g = torch.randn(13, dtype=torch.float64).float() if reduction == "none" else torch.tensor(-2.5)
    check(s, t, labels, grad_out=g, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.2,
          reduction=reduction)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_masked_vocabulary_entries(divergence, beta):
    s, t = make_logits(6, 500, seed=11)
    mask = torch.zeros(6, 500, dtype=torch.bool)
    mask[:, 400:] = True  # e.g. a padded vocabulary, masked in both models
    mask[2, :100] = True
    check(s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf), temperature=2.0, divergence=divergence,
          beta=beta)


@pytest.mark.usefixtures("cpu_kernel")
def test_masked_only_where_divergence_stays_finite():
    s, t = make_logits(4, 200, seed=12)
    mask = torch.zeros(4, 200, dtype=torch.bool)
    mask[:, ::3] = True
    # forward KL: entries the teacher rules out (p_t = 0) cost nothing.
    check(s, t.masked_fill(mask, -math.inf), temperature=1.0, divergence="kl")
    # reverse KL: entries the student rules out.
    check(s.masked_fill(mask, -math.inf), t, temperature=1.0, divergence="reverse_kl")


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_give_non_finite_rows(divergence, beta, dtype):
    """A NaN or +inf logit (student or teacher) makes its row's loss and gradient non-finite, as torch's
    textbook log_softmax formula does, in every divergence; -inf stays a masked entry; other rows are
    untouched. (Vocabulary 3000: two chunks of the CPU kernel, the bad value in the second.)"""
    s, t = make_logits(7, 3000, seed=34)
    bad = {1: ("s", math.nan), 2: ("s", math.inf), 3: ("t", math.nan), 4: ("t", math.inf)}
    for row, (which, value) in bad.items():
        (s if which == "s" else t)[row, 2500] = value
    s[5, 10], t[6, 10] = -math.inf, -math.inf  # masked entries: finite rows (p = 0 on the other side too below)
    t[5, 10] = -math.inf
    s[6, 10] = -math.inf
    s, t = s.to(dtype), t.to(dtype)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, t, **kw)
    loss.sum().backward()
    textbook = F.log_softmax(s.double() / 2.0, -1) + F.log_softmax(t.double() / 2.0, -1)
    textbook_bad = (textbook.isnan() | textbook.isposinf()).any(-1)
    assert textbook_bad.tolist() == [False, True, True, True, True, False, False]
    assert (~torch.isfinite(loss)).tolist() == textbook_bad.tolist()
    assert (~torch.isfinite(x.grad.float()).all(-1)).tolist() == textbook_bad.tolist()
    good = ~textbook_bad
    ref = reference.kd_loss(s[good].double(), t[good].double(), **kw)
    torch.testing.assert_close(loss[good].double(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_extreme_logits_no_overflow(temperature, divergence, beta):
    s, t = make_logits(5, 1000, scale=3e3, seed=13)
    s, t = s.clamp(-1e4, 1e4), t.clamp(-1e4, 1e4)
    s[0, 0], t[0, 1] = 1e4, -1e4
    labels = random_labels((5,), 1000, ignore_frac=0.0)
    check(s, t, labels, temperature=temperature, divergence=divergence, beta=beta, hard_weight=0.1)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_range(dtype):
    info = torch.finfo(dtype)
    s, t = make_logits(4, 600, dtype=torch.float32, scale=1.0, seed=14)
    big = min(info.max / 4, 3e4)
    s, t = (s * big).clamp(-info.max, info.max).to(dtype), (t * big).clamp(-info.max, info.max).to(dtype)
    check(s, t, temperature=50.0)


@pytest.mark.usefixtures("cpu_kernel")
def test_non_contiguous_inputs():
    s_wide, t_wide = make_logits(10, 700, seed=15)
    s, t = s_wide[:, :600], t_wide[:, 50:650]  # row stride 700
    check(s, t, temperature=2.0)
    s_tr, t_tr = make_logits(300, 9, seed=16)
    check(s_tr.t(), t_tr.t(), temperature=2.0)  # last-dim stride != 1
    s3, t3 = make_logits(None, 64, lead=(6, 5), seed=17)
    labels = random_labels((6, 5), 64)
    check(s3.transpose(0, 1), t3.transpose(0, 1), labels.t(), hard_weight=0.5)


def _logits_maker(dtype, seed):
    """make(shape): student-like logits of that shape, a new draw per call."""
    g = torch.Generator().manual_seed(seed)
    return lambda shape: (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("vocab,divergence,dtype", [(300, "kl", torch.float32), (5000, "jsd", torch.bfloat16),
                                                    (1, "reverse_kl", torch.float32)], ids=str)
def test_strided_layouts(layout, vocab, divergence, dtype):
    """Sliced, transposed, padded and 4-D logits views (LAYOUTS) give the float64 oracle's loss and gradient,
    student and teacher in the layout, or only the student (the teacher contiguous)."""
    make = _logits_maker(dtype, seed=vocab)
    s, t = layout_view(layout, make, vocab), layout_view(layout, make, vocab)
    labels = random_labels(s.shape[:-1], vocab, seed=3)
    check(s, t, labels, temperature=2.0, divergence=divergence, hard_weight=0.3)
    check(s, t.contiguous(), labels, temperature=2.0, divergence=divergence, reduction="none")


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.skipif(fastkd.kernel_info()["cpu"] == "reference", reason="the extension is disabled or not built")
@pytest.mark.parametrize("layout", sorted(name for name, case in LAYOUTS.items() if case[3]))
def test_strided_layouts_are_read_in_place(layout):
    """The kernels read these views where they are: the call allocates the gradient and a few bytes per row,
    never a copy of the logits (which would be 2 x the logits' bytes more)."""
    vocab = 4000
    make = _logits_maker(torch.float32, seed=7)
    s, t = layout_view(layout, make, vocab), layout_view(layout, make, vocab)
    logits_bytes = s[..., 0].numel() * vocab * 4
    s.requires_grad_(True)
    with torch.no_grad():
        loss, allocated = bytes_allocated_in(lambda: fastkd.kd_loss(s, t, temperature=2.0))
    assert allocated < logits_bytes / 8, (allocated, logits_bytes)
    _, allocated = bytes_allocated_in(lambda: fastkd.kd_loss(s, t, temperature=2.0))
    assert allocated < 1.25 * logits_bytes, (allocated, logits_bytes)  # the gradient only
    assert torch.equal(loss, fastkd.kd_loss(s.detach().contiguous(), t.contiguous(), temperature=2.0))


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("sd,td", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.float16, torch.bfloat16)])
def test_mixed_dtypes(sd, td):
    s, _ = make_logits(9, 1000, dtype=sd, seed=18)
    _, t = make_logits(9, 1000, dtype=td, seed=18)
    check(s, t, temperature=2.0)


def test_teacher_is_constant():
    s, t = make_logits(4, 50, seed=19)
    t = t.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    fastkd.kd_loss(s, t, temperature=2.0).backward()
    assert t.grad is None and s.grad is not None


def test_no_grad_forward_matches():
    s, t = make_logits(7, 333, seed=20)
    with torch.no_grad():
        a = fastkd.kd_loss(s.requires_grad_(True), t, divergence="jsd", temperature=2.0)
    b = fastkd.kd_loss(s, t, divergence="jsd", temperature=2.0)
    assert torch.equal(a, b.detach())


def test_deterministic():
    s, t = make_logits(64, 4000, seed=21)
    a = run(fastkd.kd_loss, s, t, None, temperature=2.0)
    b = run(fastkd.kd_loss, s, t, None, temperature=2.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_module_matches_function():
    s, t = make_logits(6, 90, seed=22)
    labels = random_labels((6,), 90)
    kw = dict(temperature=3.0, divergence="jsd", beta=0.2, soft_weight=0.5, hard_weight=0.5, reduction="sum")
    mod = fastkd.KDLoss(**kw)
    assert torch.equal(mod(s, t, labels), fastkd.kd_loss(s, t, labels, **kw))
    assert "temperature=3.0" in repr(mod)


# ---- autograd ----------------------------------------------------------------------------------------
def test_double_backward_is_an_error():
    s, t = make_logits(3, 20, seed=23)
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_second_backward_through_same_graph_is_an_error():
    s, t = make_logits(3, 20, seed=24)
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_reference_gradcheck_fp64(divergence, beta):
    s, t = make_logits(3, 11, dtype=torch.float64, seed=25)
    labels = torch.tensor([1, -100, 4])
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: reference.kd_loss(x, t, labels, temperature=1.7, divergence=divergence, beta=beta,
                                    hard_weight=0.3), (s,))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_reference_closed_form_gradient(divergence, beta, reduction):
    """The fallback kernel's closed-form gradient equals autograd through the oracle (both fp64)."""
    s, t = make_logits(8, 57, dtype=torch.float64, seed=26)
    labels = random_labels((8,), 57)
    kw = dict(temperature=1.3, divergence=divergence, beta=beta, soft_weight=0.8, hard_weight=0.4,
              ignore_index=-100, reduction=reduction)
    _, grad = reference.kd_loss_and_grad(s, t, labels, kw["temperature"], divergence, beta, 0.8, 0.4, -100, reduction,
                                         True)
    _, expected = run(reference.kd_loss, s, t, labels, **kw)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# ---- the soft and hard terms (return_terms) -----------------------------------------------------------
@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta,hard_weight,temperature,with_labels",
                         [("kl", 0.5, 0.0, 2.0, True), ("jsd", 0.3, 0.4, 1.0, True), ("reverse_kl", 0.5, 0.7, 3.0, True),
                          ("kl", 0.5, 0.0, 1.5, False)])
def test_return_terms(reduction, divergence, beta, hard_weight, temperature, with_labels):
    """The terms from the loss's own pass are the float64 oracle's losses of each term alone (soft_weight=1,
    hard_weight=0 and the reverse; the hard term is 0 without labels), reduced as the loss; the loss and the
    gradient are those of the call without return_terms (the cross-entropy computed at hard_weight 0 does not
    enter them)."""
    s, t = make_logits(None, 700, lead=(4, 6), seed=30)
    labels = random_labels((4, 6), 700, seed=31) if with_labels else None
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    x = s.clone().requires_grad_(True)
    loss, terms = fastkd.kd_loss(x, t, labels, hard_weight=hard_weight, soft_weight=0.6, return_terms=True, **kw)
    loss.sum().backward()
    assert isinstance(terms, fastkd.KDTerms) and terms.soft.dtype == torch.float32
    assert terms.soft.shape == loss.shape and terms.hard.shape == loss.shape and not terms.soft.requires_grad
    ref_soft = reference.kd_loss(s.double(), t.double(), labels, soft_weight=1.0, hard_weight=0.0, **kw)
    torch.testing.assert_close(terms.soft.double(), ref_soft, rtol=2e-5, atol=1e-6)
    if with_labels:
        ref_hard = reference.kd_loss(s.double(), t.double(), labels, soft_weight=0.0, hard_weight=1.0, **kw)
        torch.testing.assert_close(terms.hard.double(), ref_hard, rtol=2e-5, atol=1e-6)
    else:
        assert torch.equal(terms.hard, torch.zeros_like(terms.hard))
    y = s.clone().requires_grad_(True)
    plain = fastkd.kd_loss(y, t, labels, hard_weight=hard_weight, soft_weight=0.6, **kw)
    plain.sum().backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)


def test_return_terms_float64_module_and_errors():
    s, t = make_logits(None, 50, lead=(3, 4), seed=32)
    labels = random_labels((3, 4), 50, seed=33)
    _, terms = fastkd.KDLoss(temperature=2.0, hard_weight=0.5)(s.double(), t.double(), labels, return_terms=True)
    ref = reference.kd_loss(s.double(), t.double(), labels, temperature=2.0, soft_weight=1.0, hard_weight=0.0)
    torch.testing.assert_close(terms.soft.double(), ref, rtol=1e-6, atol=1e-7)  # the reference maths' own terms
    ref = reference.kd_loss(s.double(), t.double(), labels, temperature=2.0, soft_weight=0.0, hard_weight=1.0)
    torch.testing.assert_close(terms.hard.double(), ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="return_terms must be True or False"):
        fastkd.kd_loss(s, t, return_terms=1)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_return_terms_under_torch_compile(reduction):
    s, t = make_logits(None, 301, lead=(2, 5), seed=34)
    labels = random_labels((2, 5), 301)
    kw = dict(temperature=2.0, divergence="jsd", hard_weight=0.3, reduction=reduction)

    def step(x, y, lab):
        loss, terms = fastkd.kd_loss(x, y, lab, return_terms=True, **kw)
        return loss.sum(), terms.soft, terms.hard

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, dynamic=False)(s.clone().requires_grad_(True), t, labels)
    want = step(s.clone().requires_grad_(True), t, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- the op --------------------------------------------------------------------------------------------
def _op_args(reduction, with_grad, dtype=torch.float32):
    s, t = make_logits(6, 97, dtype=dtype, seed=27)
    labels = random_labels((6,), 97)
    return (s.requires_grad_(with_grad), t, labels, loss_options(2.0, 0.4, 1.0, 0.5), None, "jsd", -100, reduction, with_grad)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_opcheck(reduction):
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd, _op_args(reduction, False))
    # With with_grad=True the op's second output is the fused gradient, which the registered backward
    # scales in place; AOT tests that hand that buffer back to the caller as a graph output do not
    # apply (fastkd.kd_loss never returns it; its torch.compile path is tested below).
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd, _op_args(reduction, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastkd.kd_loss_terms_fwd, _op_args(reduction, False))
    torch.library.opcheck(torch.ops.fastkd.kd_loss_terms_fwd, _op_args(reduction, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    g = torch.randn(6, 97)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_scale_, (g, torch.tensor(2.0)))
    torch.library.opcheck(torch.ops.fastkd.kd_loss_scale_, (g, torch.randn(6)))


def test_scale_skips_factor_one_exactly():
    g = torch.randn(4, 33).bfloat16()
    before = g.clone()
    torch.ops.fastkd.kd_loss_scale_(g, torch.tensor([1.0, 2.0, 1.0, -0.5]))
    assert torch.equal(g[0], before[0]) and torch.equal(g[2], before[2])
    torch.testing.assert_close(g[1], (before[1].float() * 2).bfloat16())
    torch.testing.assert_close(g[3], (before[3].float() * -0.5).bfloat16())


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(reduction):
    s, t = make_logits(None, 301, lead=(2, 5), seed=28)
    labels = random_labels((2, 5), 301)
    kw = dict(temperature=2.0, divergence="reverse_kl", hard_weight=0.3, reduction=reduction)

    def step(x, y, lab):
        loss = fastkd.kd_loss(x, y, lab, **kw)
        return (loss * 1.5).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x = s.clone().requires_grad_(True)
    out = compiled(x, t, labels)
    out.backward()
    xr = s.double().requires_grad_(True)
    ref = (reference.kd_loss(xr, t.double(), labels, **kw) * 1.5).sum()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


def test_torch_compile_changing_temperature_compiles_once():
    """A temperature (and weight) schedule changes the options every step: fullgraph keeps working and the
    graph is compiled once for the changing values (the first call's static graph aside)."""
    s, t = make_logits(6, 97, seed=31)
    labels = random_labels((6,), 97)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, y, lab, T, hw):
        return fastkd.kd_loss(x, y, lab, temperature=T, divergence="jsd", beta=0.3, hard_weight=hw)

    schedule = [(1.0, 0.5), (1.5, 0.4), (2.0, 0.3), (2.5, 0.2), (3.0, 0.1), (4.0, 0.05)]
    for backend in (counting, "inductor"):
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        with torch._dynamo.config.patch(recompile_limit=2):  # a recompile per value would fail here
            for T, hw in schedule:
                x = s.clone().requires_grad_(True)
                loss = compiled(x, t, labels, T, hw)
                loss.backward()
                ref_loss, ref_grad = run(reference.kd_loss, s.double(), t.double(), labels, temperature=T,
                                         divergence="jsd", beta=0.3, hard_weight=hw)
                torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
        if backend is counting:
            assert len(graphs) <= 2, len(graphs)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_torch_func_transforms(divergence, beta):
    """torch.func.grad, vmap(grad) and jacrev run the reference maths and agree with the fused gradient."""
    s, t = make_logits(5, 40, seed=32)
    labels = random_labels((5,), 40)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.3)
    _, fused = run(fastkd.kd_loss, s, t, labels, **kw)
    g = torch.func.grad(lambda x: fastkd.kd_loss(x, t, labels, **kw))(s)
    torch.testing.assert_close(g, fused, rtol=1e-4, atol=1e-7)
    per_row = torch.func.vmap(torch.func.grad(lambda x, y, lab: fastkd.kd_loss(x, y, lab, reduction="sum", **kw)))(
        s.unsqueeze(1), t.unsqueeze(1), labels.unsqueeze(1))
    _, summed = run(fastkd.kd_loss, s, t, labels, reduction="sum", **kw)
    torch.testing.assert_close(per_row.squeeze(1), summed, rtol=1e-4, atol=1e-7)
    jac = torch.func.jacrev(lambda x: fastkd.kd_loss(x, t, labels, reduction="none", **kw))(s)
    assert jac.shape == (5, 5, 40)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_gradcheck_float64(divergence, beta):
    """float64 logits run the reference maths in float64: gradcheck and gradgradcheck hold on fastkd.kd_loss."""
    s, t = make_logits(3, 11, dtype=torch.float64, seed=33)
    labels = random_labels((3,), 11, ignore_frac=0.0)
    x = s.clone().requires_grad_(True)

    def f(v):
        return fastkd.kd_loss(v, t, labels, temperature=1.5, divergence=divergence, beta=beta, hard_weight=0.2)

    assert f(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_backend_reports_what_serves_cpu():
    expect = "reference" if os.environ.get("FASTKD_DISABLE_EXTENSION") == "1" else "extension"
    assert fastkd.backend("cpu") == expect
    assert fastkd.backend(torch.device("cpu")) == expect
    assert fastkd.backend("meta") == "reference"


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTKD_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


BREAK_EXTENSION = "import sys; sys.modules['fastkd._C'] = None\n"


def test_missing_extension_warns_once_and_falls_back():
    r = _python(BREAK_EXTENSION + "import warnings; warnings.simplefilter('always')\n"
                "import fastkd, torch; import fastkd.ops.kd\n"
                "print(fastkd.backend('cpu'))\n"
                "print(float(fastkd.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "0.0"]
    assert r.stderr.count("compiled extension unavailable") == 1


def test_require_extension_turns_missing_into_import_error():
    r = _python(BREAK_EXTENSION + "import fastkd", FASTKD_REQUIRE_EXTENSION="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "FASTKD_REQUIRE_EXTENSION=1" in r.stderr


def test_disable_extension_forces_reference_silently():
    r = _python("import fastkd; print(fastkd.backend('cpu'))", FASTKD_DISABLE_EXTENSION="1")
    assert r.returncode == 0 and r.stdout.strip() == "reference"
    assert "unavailable" not in r.stderr


# ---- bad input -------------------------------------------------------------------------------------------
BAD = [
    (lambda s, t, l: fastkd.kd_loss(s, t[:, :40]), ValueError, r"vocabulary sizes differ.*50.*40"),
    (lambda s, t, l: fastkd.kd_loss(s, t[:3]), ValueError, r"rows differ"),
    (lambda s, t, l: fastkd.kd_loss(s, t.to("meta")), ValueError, r"teacher_logits is on meta"),
    (lambda s, t, l: fastkd.kd_loss(s.long(), t), TypeError, r"student_logits must be float"),
    (lambda s, t, l: fastkd.kd_loss(s, t.int()), TypeError, r"teacher_logits must be float"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=0.0), ValueError, r"temperature must be in \[0.05, 100\]"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=1e30), ValueError, r"temperature must be in .*overflows"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=1e-40), ValueError, r"temperature must be in"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature="2"), TypeError, r"temperature must be a number, got str"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=None), TypeError, r"temperature must be a number"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=True), TypeError, r"temperature must be a number, got bool"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=torch.tensor(2.0)), TypeError,
     r"temperature must be a Python number, got a tensor.*device sync"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l, ignore_index=None), TypeError, r"ignore_index must be an int.*NoneType"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l, ignore_index=1.5), TypeError, r"ignore_index must be an int.*float 1.5"),
    (lambda s, t, l: fastkd.kd_loss(s, t, divergence="jsd", beta=None), TypeError, r"beta must be a number"),
    (lambda s, t, l: fastkd.kd_loss(s, t, soft_weight="0.5"), TypeError, r"soft_weight must be a number, got str"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l, hard_weight=float("nan")), ValueError, r"hard_weight must be finite"),
    (lambda s, t, l: fastkd.kd_loss(s.to_sparse(), t), TypeError,
     r"student_logits must be a dense \(strided\) tensor, got layout torch.sparse_coo.*to_dense\(\)"),
    (lambda s, t, l: fastkd.kd_loss(s, t.to_sparse()), TypeError, r"teacher_logits must be a dense.*sparse_coo"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l.to_sparse()), TypeError, r"labels must be a dense"),
    (lambda s, t, l: fastkd.kd_loss(s, t, divergence=None), ValueError, r"unknown divergence None"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=-1.0), ValueError, r"temperature"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=float("inf")), ValueError, r"temperature"),
    (lambda s, t, l: fastkd.kd_loss(s, t, temperature=float("nan")), ValueError, r"temperature"),
    (lambda s, t, l: fastkd.kd_loss(s, t, divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (lambda s, t, l: fastkd.kd_loss(s, t, divergence="js"), ValueError, r"unknown divergence 'js'"),
    (lambda s, t, l: fastkd.kd_loss(s, t, reduction="mean"), ValueError, r"unknown reduction 'mean'.*batchmean"),
    (lambda s, t, l: fastkd.kd_loss(s, t, hard_weight=0.5), ValueError, r"labels are required"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l[:3]), ValueError, r"labels must have the logits' leading shape"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l.float()), TypeError, r"labels must be an integer tensor"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l + 100), ValueError, r"labels hold .* outside \[0, 50\)"),
    (lambda s, t, l: fastkd.kd_loss(s, t, l - 100, ignore_index=-1), ValueError, r"outside \[0, 50\)"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD)
def test_bad_input(call, exc, pattern):
    s, t = make_logits(6, 50, seed=29)
    labels = random_labels((6,), 50, ignore_frac=0.0)
    with pytest.raises(exc, match=pattern):
        call(s, t, labels)


def test_op_checks_its_own_arguments():
    """Direct callers of torch.ops.fastkd.kd_loss_fwd get errors that name the argument too."""
    s, t = make_logits(4, 30, seed=30)
    with pytest.raises((ValueError, RuntimeError), match="beta|must be in"):
        torch.ops.fastkd.kd_loss_fwd(s, t, None, loss_options(1.0, 2.0, 1.0, 0.0), None, "jsd", -100, "sum", False)
    with pytest.raises((ValueError, RuntimeError), match="divergence|reduction"):
        torch.ops.fastkd.kd_loss_fwd(s, t, None, loss_options(1.0, 0.5, 1.0, 0.0), None, "kl", -100, "avg", False)
    with pytest.raises((ValueError, RuntimeError), match="options"):
        torch.ops.fastkd.kd_loss_fwd(s, t, None, torch.tensor([1.0, 0.5, 1.0, 0.0]), None, "kl", -100, "sum", False)


@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 32000), (torch.bfloat16, 56000)])
def test_large_gradient_equals_row_blocks(cpu_kernel, dtype, vocab):
    """Gradients of 64 MiB and more are written with non-temporal stores by the C++ CPU kernel: the values
    must be the same, bit for bit, as for the same rows computed in small blocks. (The pure-PyTorch
    fallback has no such path: the test is for the compiled copies.)"""
    if cpu_kernel == "reference":
        pytest.skip("the non-temporal store path is the compiled CPU kernel's")
    s, t = make_logits(600, vocab, dtype=dtype, seed=31)
    labels = random_labels((600,), vocab)
    kw = dict(temperature=2.0, hard_weight=0.3, reduction="sum")
    loss, grad = run(fastkd.kd_loss, s, t, labels, **kw)
    parts = [run(fastkd.kd_loss, s[i:i + 100], t[i:i + 100], labels[i:i + 100], **kw) for i in range(0, 600, 100)]
    assert torch.equal(grad, torch.cat([g for _, g in parts]))
    torch.testing.assert_close(loss, sum(p for p, _ in parts), rtol=1e-6, atol=0)


# ---- the CPU gradient-buffer cache ----------------------------------------------------------------------
needs_extension = pytest.mark.skipif(fastkd.kernel_info()["cpu"] == "reference", reason="the extension is disabled or not built")


@needs_extension
def test_freed_gradient_buffers_are_reused_and_fully_rewritten():
    """A freed gradient of >= 1 MiB goes back to fastkd's cache and the next gradient of that size reuses
    it: every entry is written again (ignored rows included), nothing of the old values survives."""
    fastkd.empty_cache()
    s, t = make_logits(40, 8000, seed=40)  # 1.2 MiB of fp32 gradient
    all_valid = random_labels((40,), 8000, ignore_frac=0.0)
    _, g1 = run(fastkd.kd_loss, s, t, all_valid, temperature=2.0, hard_weight=0.5)
    ptr = g1.data_ptr()
    del g1
    assert _extension.cpu_grad_cache_bytes() >= 40 * 8000 * 4
    labels = all_valid.clone()
    labels[::3] = -100
    _, g2 = run(fastkd.kd_loss, s, t, labels, temperature=2.0, hard_weight=0.5)
    assert g2.data_ptr() == ptr  # the same buffer, reused
    assert (g2[::3] == 0).all()
    check(s, t, labels, temperature=2.0, hard_weight=0.5)
    del g2
    freed = fastkd.empty_cache()
    assert freed >= 40 * 8000 * 4 and _extension.cpu_grad_cache_bytes() == 0


@needs_extension
@pytest.mark.parametrize("off", ["false"])  # every spelling of off: tests/test_env.py
def test_gradient_cache_keeps_two_buffers_and_can_be_turned_off(off):
    fastkd.empty_cache()
    grads = [run(fastkd.kd_loss, *make_logits(8, 40000 + 10000 * k, seed=k), None)[1] for k in range(3)]
    sizes = [g.nbytes for g in grads]
    del grads  # three buffers freed: the cache keeps the last two
    assert _extension.cpu_grad_cache_bytes() == sum(-(-n // (2 << 20)) * (2 << 20) for n in sizes[1:])
    fastkd.empty_cache()
    code = ("import fastkd, torch; s = torch.randn(8, 40000, requires_grad=True); "
            "fastkd.kd_loss(s, torch.randn(8, 40000)).backward(); s.grad = None; "
            "print(fastkd._extension.cpu_grad_cache_bytes())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTKD_CPU_GRAD_CACHE": off},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"


# ---- normalizer: "batchmean" over a divisor the caller gives (e.g. an accumulated batch's valid targets) -------
@pytest.mark.parametrize("kind", ["number", "tensor", "int_tensor"])
def test_normalizer_divides_the_sum_and_its_gradient(cpu_kernel, kind):
    """kd_loss(..., normalizer=n) = kd_loss(..., reduction="sum") / n, loss and gradient (float64 oracle), with
    the division in the fused gradient: backward with grad_output 1 needs no scaling pass."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, 33, generator=g).requires_grad_()
    t = torch.randn(6, 5, 33, generator=g)
    labels = random_labels((6, 5), 33)
    n = {"number": 41.5, "tensor": torch.tensor(41.5), "int_tensor": torch.tensor(41)}[kind]
    loss = fastkd.kd_loss(s, t, labels, temperature=2.0, hard_weight=0.5, normalizer=n)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    want = fastkd.reference.kd_loss(s64, t.double(), labels, 2.0, "kl", 0.5, 1.0, 0.5, -100, "sum") / float(n)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_normalizer_saves_the_scaling_pass(scale_factors):
    """The gradient comes out of the forward already divided: loss.backward() calls kd_loss_scale_ with a
    grad_output of 1 (free), where sum / n calls it with 1 / n (a pass over the gradient)."""
    s, t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    fastkd.kd_loss(s, t, normalizer=8.0).backward()
    (fastkd.kd_loss(s, t, reduction="sum") / 8.0).backward()
    assert scale_factors == [1.0, 0.125]


def test_normalizer_errors():
    s, t = torch.randn(4, 16), torch.randn(4, 16)
    for bad, match in ((0.0, "finite number > 0"), (float("nan"), "finite number > 0"), ("8", "finite number > 0"),
                       (torch.ones(2), "one real number"), (torch.tensor(True), "one real number"),
                       (torch.tensor(2.0, requires_grad=True), "normalizer.detach")):
        with pytest.raises(ValueError, match=match):
            fastkd.kd_loss(s, t, normalizer=bad)
    with pytest.raises(ValueError, match="it needs reduction='batchmean'"):
        fastkd.kd_loss(s, t, reduction="sum", normalizer=4.0)


@pytest.mark.parametrize("n", [41.5, torch.tensor(41.5), torch.tensor(41), torch.tensor([41.5])])
def test_float64_normalizer_divides_the_sum(n):
    """float64 logits run the reference maths: a tensor normalizer divides the sum there too (the oracle once
    dropped tensors and divided by the valid rows), for kd_loss and topk_kd_loss."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 5, 33, generator=g, dtype=torch.float64)
    t = torch.randn(6, 5, 33, generator=g, dtype=torch.float64)
    labels = random_labels((6, 5), 33)
    want = fastkd.kd_loss(s, t, labels, temperature=2.0, hard_weight=0.5, reduction="sum") / float(n)
    torch.testing.assert_close(fastkd.kd_loss(s, t, labels, temperature=2.0, hard_weight=0.5, normalizer=n), want)
    top = t.topk(7)
    want = fastkd.topk_kd_loss(s, top.values, top.indices, labels, reduction="sum") / float(n)
    torch.testing.assert_close(fastkd.topk_kd_loss(s, top.values, top.indices, labels, normalizer=n), want)
