"""CUDA kernels of fastkd::kd_loss_fwd / kd_loss_scale_ against the float64 reference.

Skipped without a GPU. Every case runs under torch.cuda.set_sync_debug_mode("error"): the op must
never synchronise with the host. The float64 oracle runs on the same GPU (the reference is plain
PyTorch, exact enough in float64 anywhere; on the CPU it took most of the GPU check's time).
The launch configuration itself is tested without a GPU in test_kd_launch_config.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    LAYOUTS,
    check_cuda_op,
    cuda_labels,
    cuda_logits,
    layout_view,
    no_sync,
    random_labels,
    rows_for,
)

import fastkd
from fastkd import _extension, reference
from fastkd.ops._args import loss_options

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCABS = [1, 7, 769, 1271, 2048, 2049, 32000, 50257, 128256, 262144]
DIVERGENCES = ["kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_op(s, t, labels, T, div, beta, sw, hw, ii, red, with_grad=True):
    with no_sync():
        loss, grad = torch.ops.fastkd.kd_loss_fwd(s, t, labels, loss_options(T, beta, sw, hw), None, div, ii, red, with_grad)
    return loss, grad


def run_ref(s, t, labels, T, div, beta, sw, hw, ii, red):
    return reference.kd_loss_and_grad(s.double(), t.double(), labels, T, div, beta, sw, hw, ii, red, True)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(vocab, divergence, dtype):
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, dtype, 1)
    t = cuda_logits(rows, vocab, dtype, 2)
    for red in REDUCTIONS:
        loss, grad = run_op(s, t, None, 2.0, divergence, 0.3, 0.7, 0.0, -100, red)
        ref_loss, ref_grad = run_ref(s, t, None, 2.0, divergence, 0.3, 0.7, 0.0, -100, red)
        check_cuda_op(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("vocab", [7, 1271, 2049, 32000, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_labels_ignore_and_hard_term(vocab, divergence, temperature):
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, torch.bfloat16, 3)
    t = cuda_logits(rows, vocab, torch.bfloat16, 4)
    labels = cuda_labels(rows, vocab, 5)
    for red in REDUCTIONS:
        args = (labels, temperature, divergence, 0.5, 0.6, 0.4, -100, red)
        loss, grad = run_op(s, t, *args)
        ref_loss, ref_grad = run_ref(s, t, *args)
        check_cuda_op(loss, grad, ref_loss, ref_grad, torch.bfloat16)
        ignored = labels == -100
        assert torch.all(grad[ignored] == 0)
        if red == "none":
            assert torch.all(loss[ignored] == 0)


@pytest.mark.parametrize("vocab", [7, 1271, 50257, 128256])
@pytest.mark.parametrize("offsets", [(1, 1), (1, 3), (0, 2), (3, 0)])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16)], ids=str)
def test_misaligned_and_mixed_dtypes(vocab, offsets, dtypes):
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, dtypes[0], 6, offset=offsets[0])
    t = cuda_logits(rows, vocab, dtypes[1], 7, offset=offsets[1])
    labels = cuda_labels(rows, vocab, 8)
    for div in DIVERGENCES:
        args = (labels, 1.5, div, 0.5, 1.0, 0.5, -100, "batchmean")
        loss, grad = run_op(s, t, *args)
        ref_loss, ref_grad = run_ref(s, t, *args)
        check_cuda_op(loss, grad, ref_loss, ref_grad, dtypes[0])


def test_float64_inputs():
    s = cuda_logits(5, 1000, torch.float64, 9)
    t = cuda_logits(5, 1000, torch.float64, 10)
    loss, grad = run_op(s, t, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    ref_loss, ref_grad = run_ref(s, t, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    assert grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6 * ref_grad.abs().max().item())


def test_masked_logits():
    # -inf entries (masked vocabulary) in the student and the teacher: 0 * log 0 = 0, no NaN.
    s = cuda_logits(4, 3000, torch.float32, 11)
    t = cuda_logits(4, 3000, torch.float32, 12)
    s[:, 150:200] = float("-inf")  # inside the teacher's mask: KL(p_t || p_s) stays finite
    t[:, 100:400] = float("-inf")
    for div in ["kl", "jsd"]:
        loss, grad = run_op(s, t, None, 1.0, div, 0.5, 1.0, 0.0, -100, "none")
        ref_loss, ref_grad = run_ref(s, t, None, 1.0, div, 0.5, 1.0, 0.0, -100, "none")
        assert torch.isfinite(grad).all()
        check_cuda_op(loss, grad, ref_loss, ref_grad, torch.float32)


@pytest.mark.parametrize("vocab", [769, 32000])  # a warp per row, a block per row
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_inputs_give_non_finite_rows(vocab, divergence):
    """NaN / +inf in the student or the teacher: that row's loss and gradient are non-finite, as the
    textbook formula's; -inf masks; other rows finite (docs/reliability.md)."""
    s = cuda_logits(6, vocab, torch.float32, 13)
    t = cuda_logits(6, vocab, torch.float32, 14)
    s[1, vocab - 5], s[2, 3] = float("nan"), float("inf")
    t[3, vocab - 5], t[4, 3] = float("nan"), float("inf")
    s[5, 0] = t[5, 0] = float("-inf")
    loss, grad = run_op(s, t, None, 2.0, divergence, 0.3, 1.0, 0.0, -100, "none")
    expect = [False, True, True, True, True, False]
    assert (~torch.isfinite(loss)).tolist() == expect
    assert (~torch.isfinite(grad).all(-1)).tolist() == expect


@pytest.mark.parametrize("vocab", [769, 32000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_with_grad_output(vocab, reduction):
    rows = 12
    s0 = cuda_logits(rows, vocab, torch.float32, 13)
    t = cuda_logits(rows, vocab, torch.float32, 14)
    labels = cuda_labels(rows, vocab, 15)
    kw = dict(temperature=2.0, divergence="jsd", hard_weight=0.3, reduction=reduction)
    s = s0.clone().requires_grad_()
    with no_sync():
        loss = fastkd.kd_loss(s, t, labels, **kw)
        go = torch.linspace(0.5, 2.0, loss.numel(), device="cuda").reshape(loss.shape)
        loss.backward(go)
    sr = s0.detach().cpu().double().requires_grad_()
    ref = reference.kd_loss(sr, t.cpu().double(), labels.cpu(), **kw)
    ref.backward(go.cpu().double())
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(s.grad.cpu().double(), sr.grad, rtol=1e-3, atol=1e-6 * sr.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [7, 3001, 128256])
def test_scale(dtype, vocab):
    grad = cuda_logits(6, vocab, dtype, 16).contiguous()
    expect = grad.cpu().clone()
    f = torch.tensor([1.0, 2.0, 0.5, 1.0, -3.0, 0.25], device="cuda")
    with no_sync():
        torch.ops.fastkd.kd_loss_scale_(grad, f)
    reference.kd_loss_scale_(expect, f.cpu())
    torch.testing.assert_close(grad.cpu(), expect, rtol=0, atol=0)
    before = grad.clone()
    with no_sync():
        torch.ops.fastkd.kd_loss_scale_(grad, torch.ones((), device="cuda"))  # a no-op
    assert torch.equal(grad, before)


@pytest.mark.parametrize("vocab", [1271, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_deterministic(vocab, divergence):
    rows = 64
    s = cuda_logits(rows, vocab, torch.bfloat16, 17)
    t = cuda_logits(rows, vocab, torch.bfloat16, 18)
    labels = cuda_labels(rows, vocab, 19)
    args = (labels, 2.0, divergence, 0.5, 1.0, 0.5, -100, "batchmean")
    l1, g1 = run_op(s, t, *args)
    l2, g2 = run_op(s, t, *args)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_many_rows_and_no_grad():
    # More rows than a grid dimension of 65535 would allow, one warp per row.
    s = cuda_logits(70000, 7, torch.bfloat16, 20)
    t = cuda_logits(70000, 7, torch.bfloat16, 21)
    loss, grad = run_op(s, t, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "none", with_grad=False)
    assert grad.numel() == 0
    ref_loss, _ = run_ref(s, t, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-4, atol=1e-5)


def test_empty_rows():
    s = torch.empty(0, 100, device="cuda")
    loss, grad = run_op(s, s, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    assert loss.item() == 0.0 and grad.shape == (0, 100)


# ---- launch configurations: shared memory, occupancy, threads (issue 10) ------------------------------
# Vocabularies whose row cache lies in (48 KiB - static, 48 KiB] on every GPU (the opt-in window of
# the block kernel with its 1056 bytes of static shared memory): fp32/fp32 V 6012-6143, 16/16-bit
# 12024-12287, 16/32-bit 8016-8191. And sizes that must run two 256-thread blocks per SM on an
# H100/H200 (bf16 32000 and 32768, fp32 16384).
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
OPT_IN_WINDOW = [((F32, F32), 6012), ((F32, F32), 6100), ((F32, F32), 6143),
                 ((BF16, BF16), 12024), ((BF16, BF16), 12200), ((F16, BF16), 12287),
                 ((BF16, F32), 8016), ((F32, F16), 8100), ((F16, F32), 8191)]
TWO_PER_SM = [((BF16, BF16), 32000), ((BF16, BF16), 32768), ((F32, F32), 16384)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _case_id(case):
    (sd, td), vocab = case
    return f"{_name(sd)}-{_name(td)}-{vocab}"


@pytest.mark.parametrize("case", OPT_IN_WINDOW + TWO_PER_SM, ids=_case_id)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_shared_memory_windows(case, divergence):
    (sd, td), vocab = case
    rows = 12
    s = cuda_logits(rows, vocab, sd, 30)
    t = cuda_logits(rows, vocab, td, 31)
    labels = cuda_labels(rows, vocab, 32)
    args = (labels, 2.0, divergence, 0.5, 0.7, 0.3, -100, "batchmean")
    loss, grad = run_op(s, t, *args)  # the opt-in window failed with "invalid argument"
    ref_loss, ref_grad = run_ref(s, t, *args)
    check_cuda_op(loss, grad, ref_loss, ref_grad, sd)


@pytest.mark.parametrize("case", OPT_IN_WINDOW + TWO_PER_SM + [((BF16, BF16), 128256), ((F32, F32), 1271),
                                                               ((BF16, BF16), 50257), ((F32, F32), 262144)],
                         ids=_case_id)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_launch_configuration_on_this_gpu(case, divergence):
    (sd, td), vocab = case
    info = _extension.kd_cuda_launch_info(_name(sd), _name(td), divergence, vocab)
    assert info["static_smem"] + info["dyn_smem"] <= info["static_smem"] + info["max_dyn_smem"]
    if info["opt_in"]:
        assert info["max_dyn_smem_attr"] >= info["dyn_smem"], info
    assert info["occupancy"] >= info["target_blocks_per_sm"], info  # two blocks per SM where budgeted for
    assert info["occupancy"] == info["blocks_per_sm"], info  # fastkd's count (kd_loss/kd_loss_launch.h) is the runtime's


def test_threads_launching_different_sizes():
    # The max-dynamic-shared-memory attribute belongs to the kernel (per device): set per call to that
    # call's size, one thread's launch could meet another thread's smaller value ("invalid argument").
    # A fresh process, so that no earlier test has raised the attribute already.
    script = textwrap.dedent("""
        import threading, torch, fastkd
        from fastkd.ops._args import loss_options
        sizes = [6100, 12000, 30000, 60000, 100000]  # fp32: one kernel, each size its own shared memory
        data = {v: (torch.randn(4, v, device="cuda"), torch.randn(4, v, device="cuda")) for v in sizes}
        # labels, options [temperature, beta, soft_weight, hard_weight], normalizer, divergence, ...
        args = (None, loss_options(1.0, 0.5, 1.0, 0.0), None, "kl", -100, "sum", True)
        got, errors = {}, []
        def work(k):
            try:
                for i in range(40):
                    v = sizes[(k + i) % len(sizes)]
                    got[(k, i)] = (v, torch.ops.fastkd.kd_loss_fwd(*data[v], *args))
                torch.cuda.synchronize()
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for th in threads: th.start()
        for th in threads: th.join()
        assert not errors, errors
        for v, (loss, grad) in got.values():
            l1, g1 = torch.ops.fastkd.kd_loss_fwd(*data[v], *args)
            assert torch.equal(loss, l1) and torch.equal(grad, g1), v
        print("ok", len(got))
    """)
    env = dict(os.environ, FASTKD_REQUIRE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and "ok 160" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("vocab", [64, 1000, 2048, 4099, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_thread_normalises_with_the_same_statistics(vocab, dtype, divergence):
    # Every 8th entry holds the same (student, teacher) pair, so every lane and thread has some of them:
    # their gradients must be bit-identical. Different bits mean that two threads normalised with
    # different log-sum-exps (a multiply-add contracted differently on the two lanes of an exchange).
    rows = 4
    s = cuda_logits(rows, vocab, dtype, 40)
    t = cuda_logits(rows, vocab, dtype, 41)
    s[:, ::8] = s[:, :1]
    t[:, ::8] = t[:, :1]
    labels = torch.full((rows,), 1, dtype=torch.long, device="cuda")  # not a probe entry
    for temperature in (1.0, 2.0):  # 2.0 with the hard term: the separate T = 1 statistics too
        _, grad = run_op(s, t, labels, temperature, divergence, 0.4, 1.0, 0.5, -100, "none")
        probes = grad[:, ::8]
        assert torch.equal(probes, probes[:, :1].expand_as(probes))


@pytest.mark.parametrize("vocab,width", [(50257, 50304), (4099, 4104), (1001, 1008)])
@pytest.mark.parametrize("dtypes", [(BF16, BF16), (F16, F16), (F32, F32), (BF16, F32)], ids=str)
def test_padded_row_stride(vocab, width, dtypes):
    # logits[..., :vocab] of a wider buffer: the inputs' rows all start at one phase, the contiguous
    # gradient's rows at every phase (16 rows: all 8 of them), stored in pieces of their alignment.
    rows = 16
    s = cuda_logits(rows, width, dtypes[0], 50)[:, :vocab]
    t = cuda_logits(rows, width, dtypes[1], 51)[:, :vocab]
    labels = cuda_labels(rows, vocab, 52)
    for div in DIVERGENCES:
        args = (labels, 2.0, div, 0.5, 0.8, 0.2, -100, "batchmean")
        loss, grad = run_op(s, t, *args)
        ref_loss, ref_grad = run_ref(s, t, *args)
        assert grad.is_contiguous() and grad.shape == (rows, vocab)
        check_cuda_op(loss, grad, ref_loss, ref_grad, dtypes[0])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("vocab", [769, 50257])  # the one-warp-per-row kernel and the block kernel
def test_strided_layouts(layout, vocab):
    # Sliced, transposed, padded and 4-D views (conftest's LAYOUTS): rows in blocks, read in place.
    g = torch.Generator().manual_seed(vocab)

    def make(shape):
        return (torch.randn(shape, generator=g) * 3).to(torch.bfloat16).cuda()

    s, t = layout_view(layout, make, vocab), layout_view(layout, make, vocab)
    labels = random_labels(s.shape[:-1], vocab, seed=5).cuda()
    for div in DIVERGENCES:
        args = (labels, 2.0, div, 0.5, 0.8, 0.2, -100, "batchmean")
        loss, grad = run_op(s, t, *args)
        ref_loss, ref_grad = run_ref(s, t, *args)
        assert grad.is_contiguous() and grad.shape == s.shape
        check_cuda_op(loss, grad, ref_loss, ref_grad, s.dtype)
