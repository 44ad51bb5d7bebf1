"""fastkd.fused_linear_kd_loss against a float64 oracle (fastkd.reference.fused_linear_kd_loss run in float64 on
the same inputs: materialised logits, autograd) and against fastkd.kd_loss on materialised logits.

Tolerance (DESIGN.md): in fp32 the fused op's error may be at most 2x the error of the unfused fp32 path (fp32
GEMMs, then fastkd.kd_loss, autograd through the GEMMs) plus a small floor. In bf16 the unfused path rounds the
logits to bf16 (errors of several percent); the fused op computes the logits in fp32, and its gradients must be
within 1% of float64 (relative to the largest entry), the loss within 0.1%.

The same tests run with the compiled kernels and, in CI, again with FASTKD_DISABLE_EXTENSION=1.
"""

import pytest
import torch

import fastkd
from fastkd import reference
from fastkd.ops.fused_linear import _options, default_chunk_size

DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def make_problem(rows=37, hs=16, ht=24, vocab=300, dtype=torch.float32, bias=False, lead=None, seed=0,
                 ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    shape = (rows,) if lead is None else lead

    def rnd(*size, scale=1.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(dtype)

    p = dict(student_hidden=rnd(*shape, hs), student_weight=rnd(vocab, hs, scale=0.6),
             teacher_hidden=rnd(*shape, ht), teacher_weight=rnd(vocab, ht, scale=0.5))
    if bias:
        p["student_bias"], p["teacher_bias"] = rnd(vocab, scale=0.5), rnd(vocab, scale=0.5)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return p, labels


STUDENT = ("student_hidden", "student_weight", "student_bias")


def loss_and_grads(fn, p, labels, grad_out=None, dtype=None, **kw):
    q = {k: (v if dtype is None else v.to(dtype)).detach().clone() for k, v in p.items()}
    for k in STUDENT:
        if k in q:
            q[k].requires_grad_(True)
    args = [q[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    extra = {k: q[k] for k in ("student_bias", "teacher_bias") if k in q}
    loss = fn(*args, labels, **extra, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach(), [q[k].grad if k in q else None for k in STUDENT]


def oracle(s_h, s_w, t_h, t_w, labels=None, student_bias=None, teacher_bias=None, **kw):
    kw.pop("chunk_size", None)
    return reference.fused_linear_kd_loss(s_h, s_w, t_h, t_w, labels, student_bias, teacher_bias, **kw)


def unfused(s_h, s_w, t_h, t_w, labels=None, student_bias=None, teacher_bias=None, logit_scale=1.0, softcap=None,
            chunk_size=None, **kw):
    """The textbook path: materialised logits (torch GEMMs in the inputs' dtype), then fastkd.kd_loss."""
    def head(h, w, b):
        z = torch.nn.functional.linear(h, w, b) * logit_scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    with torch.no_grad():
        t = head(t_h, t_w, teacher_bias)
    return fastkd.kd_loss(head(s_h, s_w, student_bias), t, labels, **kw)


def check(p, labels=None, grad_out=None, dtype=torch.float32, floor=1e-6, **kw):
    p = {k: v.to(dtype) for k, v in p.items()}  # the oracle sees the same (rounded) inputs
    ref_loss, ref_grads = loss_and_grads(oracle, p, labels, grad_out, torch.float64, **kw)
    loss, grads = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, grad_out, dtype, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all()
    for g, r, name in zip(grads, ref_grads, STUDENT, strict=True):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == dtype and g.shape == r.shape, name

    def err(x, ref):
        return (x.double() - ref).abs().max().item()

    scale_loss = max(1.0, ref_loss.abs().max().item())
    if dtype == torch.float32:
        base_loss, base_grads = loss_and_grads(unfused, p, labels, grad_out, torch.float32, **kw)
        assert err(loss, ref_loss) <= 2 * err(base_loss, ref_loss) + floor * scale_loss
        for g, b, r, name in zip(grads, base_grads, ref_grads, STUDENT, strict=True):
            if r is not None:
                scale = max(1e-3, r.abs().max().item())
                assert err(g, r) <= 2 * err(b, r) + floor * scale, (name, err(g, r), err(b, r))
    else:
        assert err(loss, ref_loss) <= 1e-3 * scale_loss, err(loss, ref_loss)
        for g, r, name in zip(grads, ref_grads, STUDENT, strict=True):
            if r is not None:
                rel = err(g, r) / max(1e-6, r.abs().max().item())
                assert rel <= 1e-2, (name, rel)
    return loss, grads


# ---- maths ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergences_and_dtypes(divergence, beta, dtype):
    p, labels = make_problem(seed=1)
    check(p, labels, dtype=dtype, temperature=2.0, divergence=divergence, beta=beta, chunk_size=8)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_term_biases_and_reductions(reduction, dtype):
    p, labels = make_problem(bias=True, seed=2)
    check(p, labels, dtype=dtype, temperature=1.5, divergence="jsd", beta=0.4, soft_weight=0.7, hard_weight=0.3,
          reduction=reduction, chunk_size=10)


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 64, None])
def test_chunk_sizes(chunk_size):
    """Chunks that do not divide the rows, one row per chunk, one chunk for everything; all give the same."""
    p, labels = make_problem(seed=3)
    check(p, labels, temperature=2.0, hard_weight=0.2, chunk_size=chunk_size)


@pytest.mark.parametrize("labelled", [False, True])
def test_one_row(labelled):
    p, labels = make_problem(rows=1, seed=4, ignore_frac=0.0)
    check(p, labels if labelled else None, temperature=3.0, hard_weight=0.5 if labelled else 0.0)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_3d_hidden_states(reduction):
    p, labels = make_problem(lead=(3, 7), bias=True, seed=5)
    loss, grads = check(p, labels, temperature=2.0, hard_weight=0.1, reduction=reduction, chunk_size=4)
    assert loss.shape == ((3, 7) if reduction == "none" else ())
    assert grads[0].shape == (3, 7, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale,softcap", [(0.25, None), (1.0, 2.5), (1.7, 4.0)])
def test_logit_scale_and_softcap(dtype, logit_scale, softcap):
    p, labels = make_problem(bias=True, seed=6)
    check(p, labels, dtype=dtype, temperature=1.5, divergence="reverse_kl", hard_weight=0.2, logit_scale=logit_scale,
          softcap=softcap, chunk_size=9)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_grad_output_not_one(reduction):
    p, labels = make_problem(bias=True, seed=7)
    g = torch.randn(37, dtype=torch.float64) if reduction == "none" else torch.tensor(-2.5, dtype=torch.float64)
    check(p, labels, grad_out=g, temperature=2.0, hard_weight=0.3, reduction=reduction, softcap=3.0, chunk_size=6)


def test_ignored_rows_cost_nothing_and_count_nowhere():
    p, labels = make_problem(seed=8, ignore_frac=0.5)
    keep = labels != -100
    loss, grads = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, temperature=2.0, hard_weight=0.4,
                                 chunk_size=4)
    kept = dict(p, student_hidden=p["student_hidden"][keep], teacher_hidden=p["teacher_hidden"][keep])
    loss_k, grads_k = loss_and_grads(fastkd.fused_linear_kd_loss, kept, labels[keep], temperature=2.0,
                                     hard_weight=0.4, chunk_size=4)
    torch.testing.assert_close(loss, loss_k)
    assert (grads[0][~keep] == 0).all()
    torch.testing.assert_close(grads[0][keep], grads_k[0])
    torch.testing.assert_close(grads[1], grads_k[1])


def test_all_rows_ignored_gives_zero():
    p, labels = make_problem(rows=5, seed=9)
    labels = torch.full_like(labels, -100)
    loss, grads = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, hard_weight=1.0)
    assert loss.item() == 0.0 and (grads[0] == 0).all() and (grads[1] == 0).all()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_zero_rows(reduction):
    p, labels = make_problem(rows=0, seed=22)
    loss, grads = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, hard_weight=0.5, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and float(loss.sum()) == 0.0
    assert grads[0].shape == (0, 16) and (grads[1] == 0).all()


def test_non_contiguous_inputs():
    """Hidden states with a stride along H, weights stored transposed (views): the results of contiguous inputs."""
    p, labels = make_problem(seed=23)
    a, ga = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, temperature=2.0, chunk_size=8)
    wide = torch.stack([p["student_hidden"]] * 2, -1).requires_grad_(True)  # (37, 16, 2)
    w_t = p["student_weight"].T.contiguous().requires_grad_(True)  # (16, 300): the weight is its transpose
    hs, ws = wide[..., 0], w_t.T
    assert not hs.is_contiguous() and not ws.is_contiguous()
    b = fastkd.fused_linear_kd_loss(hs, ws, p["teacher_hidden"].T.contiguous().T, p["teacher_weight"], labels,
                                    temperature=2.0, chunk_size=8)
    b.backward()
    torch.testing.assert_close(a, b.detach())
    torch.testing.assert_close(ga[0], wide.grad[..., 0])
    torch.testing.assert_close(ga[1], w_t.grad.T)


@pytest.mark.usefixtures("cpu_kernel")
def test_non_finite_hidden_states_give_non_finite_rows():
    """A NaN student hidden state or an +inf teacher one makes its row's loss non-finite (kd_loss's rule, through
    the GEMM); the other rows are untouched."""
    p, _ = make_problem(rows=9, seed=24)
    p["student_hidden"][3, 5] = float("nan")
    p["teacher_hidden"][6, 2] = float("inf")
    loss = fastkd.fused_linear_kd_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                       p["teacher_weight"], temperature=2.0, reduction="none", chunk_size=4)
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[3, 6]] = True
    assert not torch.isfinite(loss[bad]).any() and torch.isfinite(loss[~bad]).all()


def test_matches_kd_loss_on_materialised_logits():
    p, labels = make_problem(bias=True, seed=10)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.2)
    a, ga = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, chunk_size=7, **kw)
    b, gb = loss_and_grads(unfused, p, labels, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_tied_embeddings_gradients_add():
    """The student's head weight is also its input embedding: the embedding's gradient adds to the head's."""
    p, labels = make_problem(seed=11)
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(0))

    def step(loss_fn):
        w = p["student_weight"].clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(ids, w))  # a one-layer "model" on the tied embedding
        loss = loss_fn(hidden, w, p["teacher_hidden"], p["teacher_weight"], labels, temperature=2.0, hard_weight=0.3)
        loss.backward()
        return loss.detach(), w.grad

    (a, ga), (b, gb) = step(fastkd.fused_linear_kd_loss), step(unfused)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_teacher_dtype_and_hidden_size_may_differ():
    p, labels = make_problem(seed=12)
    p = dict(p, teacher_hidden=p["teacher_hidden"].bfloat16(), teacher_weight=p["teacher_weight"].bfloat16())
    a, ga = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, temperature=2.0, chunk_size=5)
    b, gb = loss_and_grads(oracle, p, labels, temperature=2.0)  # fp32 student, bf16 teacher in fp32 maths
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga[1], gb[1], rtol=1e-4, atol=1e-6)


def test_op_matches_its_fallback_kernel():
    """The dispatcher's kernel (C++ where built) against the fallback kernel called directly."""
    p, labels = make_problem(bias=True, seed=13)
    args = (p["student_hidden"], p["student_weight"], p["student_bias"], p["teacher_hidden"], p["teacher_weight"],
            p["teacher_bias"], labels, torch.rand(37), _options(2.0, 0.3, 0.8, 0.2, 0.5, 3.0), None, "jsd", -100, "sum",
            6, True, True, True)
    got = torch.ops.fastkd.fused_linear_kd_loss_fwd(*args)
    want = reference.fused_linear_kd_loss_fwd(*args)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


# ---- autograd behaviour --------------------------------------------------------------------------------
def test_only_requested_gradients():
    p, labels = make_problem(bias=True, seed=14)
    hs = p["student_hidden"].clone().requires_grad_(True)
    w = p["student_weight"]  # frozen head
    loss = fastkd.fused_linear_kd_loss(hs, w, p["teacher_hidden"], p["teacher_weight"], labels,
                                       student_bias=p["student_bias"], teacher_bias=p["teacher_bias"])
    loss.backward()
    assert hs.grad is not None and w.grad is None
    with torch.no_grad():
        again = fastkd.fused_linear_kd_loss(hs, w, p["teacher_hidden"], p["teacher_weight"], labels,
                                            student_bias=p["student_bias"], teacher_bias=p["teacher_bias"])
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


def test_double_backward_and_second_backward_are_errors():
    p, labels = make_problem(seed=15)
    hs = p["student_hidden"].clone().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(hs, p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hs, create_graph=True)
    loss = fastkd.fused_linear_kd_loss(hs, p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_module_matches_function():
    p, labels = make_problem(bias=True, seed=16)
    kw = dict(temperature=2.0, divergence="reverse_kl", hard_weight=0.2, logit_scale=0.5, softcap=5.0, chunk_size=8)
    mod = fastkd.FusedLinearKDLoss(**kw)
    assert "softcap=5.0" in repr(mod)
    a = mod(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels,
            student_bias=p["student_bias"], teacher_bias=p["teacher_bias"])
    b = fastkd.fused_linear_kd_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                    p["teacher_weight"], labels, student_bias=p["student_bias"],
                                    teacher_bias=p["teacher_bias"], **kw)
    torch.testing.assert_close(a, b)


def test_float64_runs_the_oracle_and_gradchecks(divergence="jsd", beta=0.3):
    p, labels = make_problem(rows=5, hs=3, ht=4, vocab=7, dtype=torch.float64, bias=True, seed=17)
    hs, w, b = (p[k].clone().requires_grad_(True) for k in STUDENT)

    def f(hs, w, b):
        return fastkd.fused_linear_kd_loss(hs, w, p["teacher_hidden"], p["teacher_weight"], labels, student_bias=b,
                                           teacher_bias=p["teacher_bias"], temperature=1.5, divergence=divergence,
                                           beta=beta, hard_weight=0.3, softcap=2.0, logit_scale=0.8)

    assert torch.autograd.gradcheck(f, (hs, w, b))


def test_default_chunk_size():
    assert default_chunk_size(32000, 512, torch.device("cpu")) == 144  # 64 MiB / (14 B x 32000), to 16s
    assert default_chunk_size(128256, 4096, torch.device("cuda")) == 592
    assert default_chunk_size(7, 16, torch.device("cpu")) == 4096
    assert default_chunk_size(10**8, 16, torch.device("cpu")) == 16


# ---- torch.library / torch.compile ---------------------------------------------------------------------
def _op_inputs(p, labels):
    """The dense op's tensors up to row_scale (make_problem's, with biases) and an options tensor, for opcheck."""
    base = (p["student_hidden"], p["student_weight"], p["student_bias"], p["teacher_hidden"], p["teacher_weight"],
            p["teacher_bias"], labels)
    return base, _options(2.0, 0.5, 1.0, 0.2, 1.0, 0.0)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_opcheck(reduction):
    p, labels = make_problem(rows=9, vocab=40, bias=True, seed=18)
    base, opts = _op_inputs(p, labels)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_loss_fwd,
                          (*base, None, opts, None, "kl", -100, reduction, 4, False, False, False))
    # The gradient outputs are marked non-differentiable (autograd never differentiates them): opcheck's
    # autograd test does not apply when they are asked for.
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_loss_fwd,
                          (*base, torch.rand(9), opts, None, "jsd", -100, reduction, 4, True, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(reduction):
    p, labels = make_problem(rows=12, vocab=50, bias=True, seed=19)

    def step(hs, w, b, ht, wt, bt, labels, temperature):
        loss = fastkd.fused_linear_kd_loss(hs, w, ht, wt, labels, student_bias=b, teacher_bias=bt,
                                           temperature=temperature, hard_weight=0.2, softcap=3.0, chunk_size=5,
                                           reduction=reduction)
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        hs, w, b = (p[k].clone().requires_grad_(True) for k in STUDENT)
        out = fn(hs, w, b, p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], labels, 2.0)
        out.backward()
        results.append((out.detach(), hs.grad, w.grad, b.grad))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y)


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(student_weight=torch.randn(300, 17)), "student_hidden has hidden size 16"),
    (dict(teacher_weight=torch.randn(301, 24)), r"teacher_weight\[:300\]"),
    (dict(student_bias=torch.randn(299)), "student_bias has shape"),
    (dict(teacher_hidden=torch.randn(36, 24)), "rows differ"),
    (dict(student_weight=torch.randn(300, 16, dtype=torch.float64)), "student_weight is torch.float64"),
    (dict(chunk_size=0), "chunk_size must be None"),
    (dict(softcap=0.0), "softcap must be None or a finite number > 0"),
    (dict(logit_scale=-1.0), "logit_scale must be"),
    (dict(labels=torch.full((37,), 300)), "outside \\[0, 300\\)"),
])
def test_bad_input_names_the_argument(change, match):
    p, labels = make_problem(seed=20)
    kw = dict(p, labels=labels)
    kw.update(change)
    args = [kw.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")]
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.fused_linear_kd_loss(*args, **kw)


def test_torch_compile_changing_temperature_and_softcap_compile_once():
    """A schedule that changes temperature, hard_weight and softcap every step compiles once (aot_eager:
    the first call's static graph aside)."""
    p, labels = make_problem(rows=8, vocab=40, seed=21)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(hs, w, ht, wt, labels, T, hw, cap):
        return fastkd.fused_linear_kd_loss(hs, w, ht, wt, labels, temperature=T, hard_weight=hw, softcap=cap,
                                           chunk_size=3)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counting)
    with torch._dynamo.config.patch(recompile_limit=2):  # a recompile per value would fail here
        for T, hw, cap in [(1.0, 0.5, 3.0), (1.5, 0.4, 3.5), (2.0, 0.3, 4.0), (2.5, 0.2, 5.0)]:
            hs = p["student_hidden"].clone().requires_grad_(True)
            loss = compiled(hs, p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels, T, hw, cap)
            loss.backward()
            ref, ref_grads = loss_and_grads(oracle, p, labels, dtype=torch.float64, temperature=T, hard_weight=hw,
                                            softcap=cap)
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hs.grad.double(), ref_grads[0], rtol=1e-4, atol=1e-7)
    assert len(graphs) <= 2, len(graphs)


# ---- the sparse (top-k) teacher: fastkd.fused_linear_topk_kd_loss ---------------------------------------------
def make_topk_problem(k=16, dtype=torch.float32, bias=False, lead=None, seed=30, index_dtype=torch.int64):
    """The student's head and a top-k teacher (the top-k of a dense teacher's logits)."""
    p, labels = make_problem(bias=bias, lead=lead, seed=seed)
    t = p["teacher_hidden"].double() @ p["teacher_weight"].double().T
    values, indices = t.topk(k, dim=-1)
    q = {key: p[key].to(dtype) for key in STUDENT if key in p}
    return q, values.to(dtype), indices.to(index_dtype), labels


def topk_loss_and_grads(fn, q, values, indices, labels, grad_out=None, dtype=None, **kw):
    x = {k: (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_(True) for k, v in q.items()}
    extra = {"student_bias": x["student_bias"]} if "student_bias" in x else {}
    loss = fn(x["student_hidden"], x["student_weight"], values if dtype is None else values.to(dtype), indices,
              labels, **extra, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach(), [x[k].grad if k in x else None for k in STUDENT]


def topk_oracle(hs, ws, values, indices, labels=None, student_bias=None, chunk_size=None, **kw):
    return reference.fused_linear_topk_kd_loss(hs, ws, values, indices, labels, student_bias, **kw)


def topk_unfused(hs, ws, values, indices, labels=None, student_bias=None, logit_scale=1.0, softcap=None,
                 chunk_size=None, **kw):
    z = torch.nn.functional.linear(hs, ws, student_bias) * logit_scale
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    return fastkd.topk_kd_loss(z, values, indices, labels, **kw)


def check_topk(q, values, indices, labels, grad_out=None, dtype=torch.float32, floor=1e-6, **kw):
    ref_loss, ref_grads = topk_loss_and_grads(topk_oracle, q, values, indices, labels, grad_out, torch.float64, **kw)
    loss, grads = topk_loss_and_grads(fastkd.fused_linear_topk_kd_loss, q, values, indices, labels, grad_out, dtype,
                                      **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape

    def err(x, ref):
        return (x.double() - ref).abs().max().item()

    scale_loss = max(1.0, ref_loss.abs().max().item())
    if dtype == torch.float32:
        base_loss, base_grads = topk_loss_and_grads(topk_unfused, q, values, indices, labels, grad_out, dtype, **kw)
        assert err(loss, ref_loss) <= 2 * err(base_loss, ref_loss) + floor * scale_loss
        for g, b, r, name in zip(grads, base_grads, ref_grads, STUDENT, strict=True):
            if r is not None:
                assert err(g, r) <= 2 * err(b, r) + floor * max(1e-3, r.abs().max().item()), name
    else:
        assert err(loss, ref_loss) <= 1e-3 * scale_loss
        for g, r, name in zip(grads, ref_grads, STUDENT, strict=True):
            if r is not None:
                assert err(g, r) / max(1e-6, r.abs().max().item()) <= 1e-2, name
    return loss, grads


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_divergences_and_dtypes(divergence, beta, dtype):
    q, v, i, labels = make_topk_problem(dtype=dtype)
    check_topk(q, v, i, labels, dtype=dtype, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.3,
               chunk_size=8)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_topk_reductions_bias_softcap_grad_output(reduction):
    q, v, i, labels = make_topk_problem(bias=True, index_dtype=torch.int32)
    g = torch.randn(37, dtype=torch.float64) if reduction == "none" else torch.tensor(1.5, dtype=torch.float64)
    check_topk(q, v, i, labels, grad_out=g, temperature=1.5, divergence="jsd", beta=0.4, hard_weight=0.2,
               reduction=reduction, logit_scale=0.7, softcap=3.0, chunk_size=5)


def test_topk_3d_and_one_row():
    q, v, i, labels = make_topk_problem(lead=(3, 5), k=7)
    loss, grads = check_topk(q, v, i, labels, temperature=2.0, reduction="none", chunk_size=4)
    assert loss.shape == (3, 5) and grads[0].shape == (3, 5, 16)
    q, v, i, labels = make_topk_problem(k=300)  # K = V: the dense loss
    one = {k: x[:1] if k == "student_hidden" else x for k, x in q.items()}
    check_topk(one, v[:1], i[:1], None, temperature=3.0)


def test_topk_matches_the_dense_op_when_k_is_v():
    """With every entry kept, the top-k teacher is the dense teacher: the two fused ops agree."""
    p, labels = make_problem(seed=31)
    t = p["teacher_hidden"] @ p["teacher_weight"].T
    values, indices = t.topk(300, dim=-1)
    kw = dict(temperature=2.0, hard_weight=0.2, chunk_size=6)
    a, ga = loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, **kw)
    q = {k: p[k] for k in ("student_hidden", "student_weight")}
    b, gb = topk_loss_and_grads(fastkd.fused_linear_topk_kd_loss, q, values, indices, labels, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga[:2], gb[:2], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_topk_module_opcheck_and_compile():
    q, v, i, labels = make_topk_problem(bias=True)
    mod = fastkd.FusedLinearTopKKDLoss(temperature=2.0, hard_weight=0.2, softcap=4.0, chunk_size=8)
    a = mod(q["student_hidden"], q["student_weight"], v, i, labels, student_bias=q["student_bias"])
    b = fastkd.fused_linear_topk_kd_loss(q["student_hidden"], q["student_weight"], v, i, labels,
                                         student_bias=q["student_bias"], temperature=2.0, hard_weight=0.2,
                                         softcap=4.0, chunk_size=8)
    torch.testing.assert_close(a, b)
    opts = _options(2.0, 0.3, 1.0, 0.2, 0.8, 3.0)
    base = (q["student_hidden"], q["student_weight"], q["student_bias"], v, i, labels)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_topk_kd_loss_fwd,
                          (*base, None, opts, None, "jsd", -100, "sum", 6, False, False, False))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_topk_kd_loss_fwd,
                          (*base, torch.rand(37), opts, None, "kl", -100, "none", 6, True, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def step(hs, w, b, v, i, labels, T):
        return fastkd.fused_linear_topk_kd_loss(hs, w, v, i, labels, student_bias=b, temperature=T, chunk_size=5)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        hs, w, bias = (q[k].clone().requires_grad_(True) for k in STUDENT)
        out = fn(hs, w, bias, v, i, labels, 2.0)
        out.backward()
        results.append((out.detach(), hs.grad, w.grad, bias.grad))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("change,match", [
    (dict(k=301), r"K must be in \[1, 300\]"),
    (dict(divergence="reverse_kl"), "reverse_kl"),
    (dict(indices=torch.full((37, 16), 300)), "teacher_indices"),
    (dict(values=torch.randn(37, 15)), "must have the same shape"),
    (dict(student_weight=torch.randn(300, 17)), "student_hidden has hidden size 16"),
])
def test_topk_bad_input_names_the_argument(change, match):
    q, v, i, labels = make_topk_problem()
    if "k" in change:
        v, i = torch.randn(37, change.pop("k")), torch.zeros(37, 301, dtype=torch.long)
    v, i = change.pop("values", v), change.pop("indices", i)
    w = change.pop("student_weight", q["student_weight"])
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.fused_linear_topk_kd_loss(q["student_hidden"], w, v, i, labels, **change)


# ---- normalizer: "batchmean" over a divisor the caller gives (e.g. Hugging Face's num_items_in_batch) ----------
NORMALIZERS = {"number": 41.5, "tensor": torch.tensor(41.5), "int_tensor": torch.tensor(41),
               "one_element": torch.tensor([41.5], dtype=torch.float64)}


def sum_over(fn, n):
    """The loss fn(..., reduction="sum") / n: what normalizer=n must equal, loss and gradients."""
    def divided(*args, **kw):
        return fn(*args, **dict(kw, reduction="sum")) / n
    return divided


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("kind", sorted(NORMALIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalizer_divides_the_sum_and_its_gradients(kind, dtype):
    """normalizer=n is the float64 oracle's sum / n, loss and the three gradients, under the tolerance rule; 41
    or 41.5 is neither the valid rows (about 30) nor the rows (37), so a divisor left out or counted shows."""
    n = NORMALIZERS[kind]
    p, labels = make_problem(bias=True, seed=40)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.4, softcap=3.0, chunk_size=7)
    loss, grads = check(p, labels, dtype=dtype, normalizer=n, **kw)
    p = {k: v.to(dtype) for k, v in p.items()}
    want, want_grads = loss_and_grads(sum_over(oracle, float(n)), p, labels, dtype=torch.float64, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=1e-6)
    for g, r in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())


@pytest.mark.usefixtures("cpu_kernel")
def test_normalizer_with_grad_output_and_no_labels():
    """grad_output != 1 still scales the already-divided gradients; without labels every row counts."""
    p, _ = make_problem(seed=41)
    check(p, None, grad_out=torch.tensor(-2.5, dtype=torch.float64), temperature=1.5, normalizer=torch.tensor(9.0),
          chunk_size=5)


def test_normalizer_saves_the_scaling_passes(scale_factors):
    """The gradients come out of the forward already divided: loss.backward() scales each of them by a grad_output
    of 1 (free), where sum / n scales each by 1 / n (a pass over the hidden, weight and bias gradients)."""
    p, labels = make_problem(bias=True, seed=42)
    loss_and_grads(fastkd.fused_linear_kd_loss, p, labels, normalizer=8.0)
    loss_and_grads(sum_over(fastkd.fused_linear_kd_loss, 8.0), p, labels)
    assert scale_factors == [1.0] * 3 + [0.125] * 3


def test_op_with_normalizer_matches_its_fallback_kernel():
    """The compiled kernel (where built) and the fallback kernel with a CPU normalizer, row_scale and every
    gradient, called directly."""
    p, labels = make_problem(bias=True, seed=43)
    args = (p["student_hidden"], p["student_weight"], p["student_bias"], p["teacher_hidden"], p["teacher_weight"],
            p["teacher_bias"], labels, torch.rand(37), _options(2.0, 0.3, 0.8, 0.2, 0.5, 3.0), torch.tensor(19),
            "jsd", -100, "batchmean", 6, True, True, True)
    got = torch.ops.fastkd.fused_linear_kd_loss_fwd(*args)
    want = reference.fused_linear_kd_loss_fwd(*args)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["dense", "topk"])
def test_normalizer_errors(op):
    """The wrappers' normalizer checks are kd_loss's (fastkd.ops._args.normalizer_arg), naming student_hidden."""
    p, labels = make_problem(seed=44)
    if op == "dense":
        fn, name = fastkd.fused_linear_kd_loss, "fastkd.fused_linear_kd_loss"
        args = (p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels)
    else:
        fn, name = fastkd.fused_linear_topk_kd_loss, "fastkd.fused_linear_topk_kd_loss"
        values, indices = torch.randn(37, 5).topk(5)
        args = (p["student_hidden"], p["student_weight"], values, indices, labels)
    for bad, match in ((0.0, "finite number > 0"), (-3, "finite number > 0"), (float("nan"), "finite number > 0"),
                       ("8", "finite number > 0"), (torch.ones(2), "one real number"),
                       (torch.tensor(True), "one real number"), (torch.tensor(2.0, requires_grad=True),
                                                                  "normalizer.detach"),
                       (torch.tensor(2.0, device="meta"), "normalizer is on meta but student_hidden on cpu")):
        with pytest.raises(ValueError, match=f"^{name}: .*{match}"):
            fn(*args, normalizer=bad)
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="it needs reduction='batchmean'"):
            fn(*args, reduction=reduction, normalizer=4.0)


@pytest.mark.parametrize("op", ["fused_linear_kd_loss_fwd", "fused_linear_topk_kd_loss_fwd"])
def test_op_refuses_a_normalizer_without_batchmean(op):
    """The op's own contract (compiled and fallback kernels alike), for callers of torch.ops.fastkd directly."""
    p, labels = make_problem(seed=45)
    values, indices = torch.randn(37, 5).topk(5)
    teacher = ((p["teacher_hidden"], p["teacher_weight"], None) if op == "fused_linear_kd_loss_fwd"
               else (values, indices))
    head = (p["student_hidden"], p["student_weight"], None, *teacher, labels, None, _options(1.0, 0.5, 1.0, 0.0, 1.0,
                                                                                            0.0))
    for norm, reduction, match in ((torch.tensor(3.0), "sum", "batchmean"), (torch.ones(2), "batchmean", "one")):
        with pytest.raises(ValueError, match=f"normalizer.*{match}"):
            getattr(torch.ops.fastkd, op)(*head, norm, "kl", -100, reduction, 8, True, True, False)


def test_normalizer_module_opcheck_and_compile():
    """FusedLinearKDLoss takes normalizer at call time; the op with a normalizer passes opcheck; under
    torch.compile(fullgraph=True) a tensor normalizer (as the Trainer passes it) gives eager's results."""
    p, labels = make_problem(rows=12, vocab=50, bias=True, seed=46)
    n = torch.tensor(7)
    mod = fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.2, chunk_size=5)
    a = mod(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels,
            student_bias=p["student_bias"], teacher_bias=p["teacher_bias"], normalizer=n)
    b = fastkd.fused_linear_kd_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                    p["teacher_weight"], labels, student_bias=p["student_bias"],
                                    teacher_bias=p["teacher_bias"], temperature=2.0, hard_weight=0.2, chunk_size=5,
                                    normalizer=n)
    torch.testing.assert_close(a, b)
    base, opts = _op_inputs(p, labels)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_loss_fwd,
                          (*base, None, opts, torch.tensor(7.0), "kl", -100, "batchmean", 4, False, False, False))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_loss_fwd,
                          (*base, None, opts, n, "jsd", -100, "batchmean", 4, True, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def step(hs, w, b, ht, wt, bt, labels, n):
        return fastkd.fused_linear_kd_loss(hs, w, ht, wt, labels, student_bias=b, teacher_bias=bt, temperature=2.0,
                                           hard_weight=0.2, chunk_size=5, normalizer=n)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        hs, w, bias = (p[k].clone().requires_grad_(True) for k in STUDENT)
        out = fn(hs, w, bias, p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], labels, n)
        out.backward()
        results.append((out.detach(), hs.grad, w.grad, bias.grad))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("kind", ["number", "tensor", "int_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_normalizer_divides_the_sum_and_its_gradients(kind, dtype):
    n = NORMALIZERS[kind]
    q, v, i, labels = make_topk_problem(dtype=dtype, bias=True, seed=47)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.4, softcap=3.0, chunk_size=7)
    loss, grads = check_topk(q, v, i, labels, dtype=dtype, normalizer=n, **kw)
    want, want_grads = topk_loss_and_grads(sum_over(topk_oracle, float(n)), q, v, i, labels, dtype=torch.float64,
                                           **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=1e-6)
    for g, r in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())


def test_topk_normalizer_module_op_and_opcheck():
    q, v, i, labels = make_topk_problem(bias=True, seed=48)
    mod = fastkd.FusedLinearTopKKDLoss(temperature=2.0, hard_weight=0.2, chunk_size=8)
    a = mod(q["student_hidden"], q["student_weight"], v, i, labels, student_bias=q["student_bias"], normalizer=11.0)
    b = fastkd.fused_linear_topk_kd_loss(q["student_hidden"], q["student_weight"], v, i, labels,
                                         student_bias=q["student_bias"], temperature=2.0, hard_weight=0.2,
                                         chunk_size=8, reduction="sum") / 11.0
    torch.testing.assert_close(a, b)
    opts = _options(2.0, 0.3, 1.0, 0.2, 0.8, 3.0)
    args = (q["student_hidden"], q["student_weight"], q["student_bias"], v, i, labels, torch.rand(37), opts,
            torch.tensor(23), "jsd", -100, "batchmean", 6, True, True, True)
    got = torch.ops.fastkd.fused_linear_topk_kd_loss_fwd(*args)
    want = reference.fused_linear_topk_kd_loss_fwd(*args)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_topk_kd_loss_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_float64_normalizer_gradchecks():
    """float64 runs the oracle: its normalizer path is differentiable to any order."""
    p, labels = make_problem(rows=5, hs=3, ht=4, vocab=7, dtype=torch.float64, bias=True, seed=49)
    hs, w, b = (p[k].clone().requires_grad_(True) for k in STUDENT)

    def f(hs, w, b):
        return fastkd.fused_linear_kd_loss(hs, w, p["teacher_hidden"], p["teacher_weight"], labels, student_bias=b,
                                           teacher_bias=p["teacher_bias"], temperature=1.5, hard_weight=0.3,
                                           normalizer=torch.tensor(3))

    assert torch.autograd.gradcheck(f, (hs, w, b))


# ---- the soft and hard terms (return_terms) -----------------------------------------------------------------
def _terms_reference(s, t_or_topk, labels, kw):
    """The float64 oracle's loss of each term alone on materialised logits (s: the student's; t_or_topk: the
    teacher's logits, or its (values, indices))."""
    out = []
    for sw, hw in ((1.0, 0.0), (0.0, 1.0)):
        if isinstance(t_or_topk, tuple):
            out.append(reference.topk_kd_loss(s, *t_or_topk, labels, soft_weight=sw, hard_weight=hw, **kw))
        else:
            out.append(reference.kd_loss(s, t_or_topk, labels, soft_weight=sw, hard_weight=hw, **kw))
    return out


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_return_terms(reduction, teacher):
    """The fused ops' terms (chunked: chunk_size 8 of 37 rows, ignored rows dropped before the GEMMs) are the float64
    oracle's terms on materialised logits, softcap included; the loss and gradients are those without them."""
    head = dict(logit_scale=1.3, softcap=20.0)
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, reduction=reduction)
    p, labels = make_problem(bias=True, lead=(37,), seed=40)
    s = reference.head_logits(p["student_hidden"].double(), p["student_weight"].double(), p["student_bias"].double(),
                              **head)
    if teacher == "dense":
        fn, args = fastkd.fused_linear_kd_loss, (p["teacher_hidden"], p["teacher_weight"])
        extra = dict(teacher_bias=p["teacher_bias"])
        ref_teacher = reference.head_logits(p["teacher_hidden"].double(), p["teacher_weight"].double(),
                                            p["teacher_bias"].double(), **head)
    else:
        t = p["teacher_hidden"].double() @ p["teacher_weight"].double().T
        values, indices = t.topk(16, dim=-1)
        fn, args, extra, ref_teacher = fastkd.fused_linear_topk_kd_loss, (values.float(), indices), {}, (values, indices)
    runs = []
    for return_terms in (True, False):
        x = {k: p[k].clone().requires_grad_(True) for k in STUDENT}
        out = fn(x["student_hidden"], x["student_weight"], *args, labels, student_bias=x["student_bias"], **extra,
                 chunk_size=8, hard_weight=0.0, return_terms=return_terms, **head, **kw)
        loss, terms = out if return_terms else (out, None)
        loss.sum().backward()
        runs.append((loss, terms, [x[k].grad for k in STUDENT]))
    (loss, terms, grads), (plain, _, plain_grads) = runs
    assert isinstance(terms, fastkd.KDTerms) and terms.soft.shape == loss.shape
    ref_soft, ref_hard = _terms_reference(s, ref_teacher, labels, kw)
    torch.testing.assert_close(terms.soft.double(), ref_soft, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(terms.hard.double(), ref_hard, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
    for g, h in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_return_terms_opcheck_compile_and_float64(reduction):
    p, labels = make_problem(rows=9, vocab=40, bias=True, seed=41)
    base, opts = _op_inputs(p, labels)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_loss_terms_fwd,
                          (*base, None, opts, None, "kl", -100, reduction, 4, False, False, False))
    values, indices = torch.randn(9, 5), torch.stack([torch.randperm(40)[:5] for _ in range(9)])
    torch.library.opcheck(torch.ops.fastkd.fused_linear_topk_kd_loss_terms_fwd,
                          (p["student_hidden"], p["student_weight"], p["student_bias"], values, indices, labels, None,
                           opts, None, "kl", -100, reduction, 4, False, False, False))

    def step(hs, ws, ht, wt):
        loss, terms = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=2.0, hard_weight=0.2,
                                                  reduction=reduction, chunk_size=4, return_terms=True)
        return loss.sum(), terms.soft, terms.hard

    torch._dynamo.reset()
    heads = (p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"])
    got = torch.compile(step, fullgraph=True, dynamic=False)(*heads)
    want = step(*heads)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # float64: the oracle's own terms (materialised logits), as float32 ones from the op
    soft64 = step(*(x.double() for x in heads))[1]
    torch.testing.assert_close(soft64.double(), want[1].double(), rtol=1e-5, atol=1e-6)
