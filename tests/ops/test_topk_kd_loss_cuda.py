"""CUDA kernel of fastkd::topk_kd_loss_fwd against the float64 reference (fastkd.reference.topk).

Skipped without a GPU. Every op call runs under torch.cuda.set_sync_debug_mode("error"): the op must never
synchronise with the host. The float64 oracle runs on the same GPU. The launch configuration itself is
tested without a GPU in test_topk_launch_config.py; the paths it chooses are covered here by size: a warp
per row (vocab <= 2048) or a block, and the duplicate-index check by bitmap (k (k - 1) / 2 > vocab / 32)
or pairwise (e.g. K = 64 at 262144). Device asserts (bad indices or labels) run in subprocesses: an assert
leaves the process's CUDA context unusable.
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

ROOT = Path(__file__).resolve().parents[2]
VOCABS = [1, 7, 769, 2048, 2049, 32000, 50257, 128256, 262144]
KS = [1, 64, 256]
REDUCTIONS = ["batchmean", "sum", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_topk(rows, vocab, k, seed, values_dtype=torch.float32, index_dtype=torch.int64, scale=3.0):
    """A teacher's top-k: values [rows, k] and distinct indices [rows, k] (in a random order, not sorted)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=g) * scale
    values, indices = teacher.topk(k, dim=-1)
    order = torch.argsort(torch.rand(rows, k, generator=g), dim=-1)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    return values.to(values_dtype).cuda(), indices.to(index_dtype).cuda()


def run_op(s, v, i, labels, T, div, beta, sw, hw, ii, red, with_grad=True):
    with no_sync():
        return torch.ops.fastkd.topk_kd_loss_fwd(s, v, i, labels, loss_options(T, beta, sw, hw), None, div, ii, red,
                                                 with_grad)


def run_ref(s, v, i, labels, T, div, beta, sw, hw, ii, red):
    return reference.topk_kd_loss_and_grad(s.double(), v.double(), i, labels, T, div, beta, sw, hw, ii, red, True)


def compare(s, v, i, labels, *args):
    loss, grad = run_op(s, v, i, labels, *args)
    ref_loss, ref_grad = run_ref(s, v, i, labels, *args)
    check_cuda_op(loss, grad, ref_loss, ref_grad, s.dtype, fp16_subnormal_floor=True)
    return loss, grad


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(vocab, k, dtype):
    k = min(k, vocab)
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, dtype, 1)
    v, i = make_topk(rows, vocab, k, 2)
    for div in ("kl", "jsd"):
        for red in REDUCTIONS:
            compare(s, v, i, None, 2.0, div, 0.3, 0.7, 0.0, -100, red)


@pytest.mark.parametrize("vocab", [769, 50257, 262144])
@pytest.mark.parametrize("values_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_value_and_index_dtypes(vocab, values_dtype, index_dtype):
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, torch.bfloat16, 3)
    for k in (64, 256):
        v, i = make_topk(rows, vocab, k, 4, values_dtype, index_dtype)
        for div in ("kl", "jsd"):
            compare(s, v, i, None, 1.5, div, 0.5, 1.0, 0.0, -100, "batchmean")


@pytest.mark.parametrize("vocab", [7, 1271, 50257, 128256])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_and_strided_rows(vocab, offset):
    # Student rows at every phase of their packs; values and indices as column slices of wider buffers.
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, torch.bfloat16, 5, offset=offset)
    k = min(64, vocab)
    v, i = make_topk(rows, vocab, k, 6, torch.float16, torch.int32)
    v_wide = torch.full((rows, k + 5), float("nan"), dtype=v.dtype, device="cuda")
    i_wide = torch.full((rows, k + 5), -1, dtype=i.dtype, device="cuda")
    v_wide[:, 2:2 + k], i_wide[:, 2:2 + k] = v, i
    labels = cuda_labels(rows, vocab, 7, i)
    for div in ("kl", "jsd"):
        compare(s, v_wide[:, 2:2 + k], i_wide[:, 2:2 + k], labels, 2.0, div, 0.5, 1.0, 0.5, -100, "batchmean")


@pytest.mark.parametrize("vocab", [7, 2048, 5000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_support_is_kd_loss(vocab, dtype):
    # K = V with the indices a permutation of the vocabulary: the top-k loss is fastkd.kd_loss's.
    rows = 6
    s = cuda_logits(rows, vocab, dtype, 8)
    g = torch.Generator().manual_seed(9)
    teacher = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).cuda()
    perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)]).cuda()
    values = teacher.gather(-1, perm)
    labels = cuda_labels(rows, vocab, 10)
    for div in ("kl", "jsd"):
        args = (loss_options(2.0, 0.4, 0.8, 0.3), None, div, -100, "none", True)
        with no_sync():
            loss, grad = torch.ops.fastkd.topk_kd_loss_fwd(s, values, perm, labels, *args)
            kd_loss, kd_grad = torch.ops.fastkd.kd_loss_fwd(s, teacher, labels, *args)
        torch.testing.assert_close(loss, kd_loss, rtol=1e-4, atol=1e-5)
        scale = kd_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), kd_grad.double(), rtol=1e-2 if dtype != torch.float32 else 1e-4,
                                   atol=(1e-3 if dtype != torch.float32 else 1e-6) * scale)


@pytest.mark.parametrize("vocab", [7, 1271, 2049, 128256])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_labels_ignore_and_hard_term(vocab, temperature):
    rows = rows_for(vocab)
    s = cuda_logits(rows, vocab, torch.bfloat16, 11)
    v, i = make_topk(rows, vocab, min(64, vocab), 12, torch.bfloat16)
    labels = cuda_labels(rows, vocab, 13, i)  # labels inside the support and outside it
    for div in ("kl", "jsd"):
        for red in REDUCTIONS:
            loss, grad = compare(s, v, i, labels, temperature, div, 0.5, 0.6, 0.4, -100, red)
            ignored = labels == -100
            assert torch.all(grad[ignored] == 0)
            if red == "none":
                assert torch.all(loss[ignored] == 0)


def test_hard_term_only_and_soft_only():
    # soft_weight = 0 (the cross-entropy alone) and hard_weight = 0 with labels (ignore rows only).
    s = cuda_logits(9, 3001, torch.float32, 14)
    v, i = make_topk(9, 3001, 64, 15)
    labels = cuda_labels(9, 3001, 16, i)
    compare(s, v, i, labels, 2.0, "kl", 0.5, 0.0, 1.0, -100, "batchmean")
    compare(s, v, i, labels, 2.0, "jsd", 0.5, 1.0, 0.0, -100, "sum")


@pytest.mark.parametrize("vocab", [769, 32000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_with_grad_output(vocab, reduction):
    rows = 12
    s0 = cuda_logits(rows, vocab, torch.float32, 17)
    v, i = make_topk(rows, vocab, 64, 18)
    labels = cuda_labels(rows, vocab, 19, i)
    kw = dict(temperature=2.0, divergence="jsd", hard_weight=0.3, reduction=reduction)
    s = s0.clone().requires_grad_()
    with no_sync():
        loss = fastkd.topk_kd_loss(s, v, i, labels, **kw)
        go = torch.linspace(0.5, 2.0, loss.numel(), device="cuda").reshape(loss.shape)
        loss.backward(go)
    sr = s0.detach().double().requires_grad_()
    ref = reference.topk_kd_loss(sr, v.double(), i, labels, **kw)
    ref.backward(go.double())
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), sr.grad, rtol=1e-3, atol=1e-6 * sr.grad.abs().max().item())


def test_float64_inputs():
    s = cuda_logits(5, 1000, torch.float64, 20)
    v, i = make_topk(5, 1000, 64, 21, torch.float64)
    loss, grad = run_op(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    ref_loss, ref_grad = run_ref(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    assert grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.parametrize("case", [(1271, 64), (128256, 256), (262144, 64), (262144, 256)], ids=str)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_deterministic(case, divergence):
    vocab, k = case
    rows = 64
    s = cuda_logits(rows, vocab, torch.bfloat16, 22)
    v, i = make_topk(rows, vocab, k, 23, torch.bfloat16)
    labels = cuda_labels(rows, vocab, 24, i)
    args = (labels, 2.0, divergence, 0.5, 1.0, 0.5, -100, "batchmean")
    l1, g1 = run_op(s, v, i, *args)
    l2, g2 = run_op(s, v, i, *args)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("vocab", [769, 32000])  # a warp per row, a block per row
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows(vocab, divergence, dtype):
    """NaN / +inf in the student or the teacher values: that row's loss and gradient are non-finite; -inf
    masks (a value at -inf is an entry with no teacher mass, a student -inf off the support a masked entry);
    a row whose K values are all -inf has no soft term (but NaN among -inf values is a NaN row); other rows
    finite and exact (docs/reliability.md)."""
    rows, k = 10, 64
    s = cuda_logits(rows, vocab, torch.float32, 25)
    v, i = make_topk(rows, vocab, k, 26)
    support = torch.zeros(rows, vocab, dtype=torch.bool, device="cuda").scatter_(1, i, True)
    off = (~support).float().argmax(-1)  # an entry off each row's support
    s[1, vocab - 5] = float("nan")
    s[2, off[2]] = float("inf")       # off the support: still the whole row's normaliser
    v[3, k - 1] = float("nan")
    v[4, 0] = float("inf")
    s[5, off[5]] = float("-inf")      # masked student entry
    v[6, :k // 2] = float("-inf")     # half the support carries no teacher mass
    v[7] = float("-inf")              # no soft term
    s[8, i[8, 0]] = float("nan")      # NaN inside the support
    v[9] = float("-inf")
    v[9, k // 2] = float("nan")       # NaN among -inf values: a NaN row, not one without a soft term
    s, v = s.to(dtype), v.to(dtype)
    loss, grad = run_op(s, v, i, None, 2.0, divergence, 0.3, 1.0, 0.0, -100, "none")
    bad = [False, True, True, True, True, False, False, False, True, True]
    assert (~torch.isfinite(loss)).tolist() == bad
    assert (~torch.isfinite(grad).all(-1)).tolist() == bad
    assert loss[7].item() == 0.0 and torch.all(grad[7] == 0)
    good = torch.tensor([not b for b in bad], device="cuda")
    ref_loss, ref_grad = run_ref(s[good], v[good], i[good], None, 2.0, divergence, 0.3, 1.0, 0.0, -100, "none")
    check_cuda_op(loss[good], grad[good], ref_loss, ref_grad, dtype, fp16_subnormal_floor=True)
    assert grad[5, off[5]].item() == 0.0


def test_many_rows_reuse_the_bitmap():
    # More rows than the persistent grid holds: each row group takes several rows, clearing its bitmap
    # between them (a bit left set would trip the duplicate assert on a later row, a missed clear too).
    for vocab, k in ((1000, 200), (4096, 256)):  # warp kernel, block kernel; both with the bitmap
        info = _extension.topk_cuda_launch_info("bfloat16", vocab, k)
        assert info["bitmap"]
        rows = 3 * info["max_blocks"] * (8 if info["warp_kernel"] else 1)
        s = cuda_logits(rows, vocab, torch.bfloat16, 27)
        v, i = make_topk(rows, vocab, k, 28, torch.bfloat16)
        compare(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "batchmean")
        torch.cuda.synchronize()


def test_many_rows_and_no_grad():
    s = cuda_logits(70000, 7, torch.bfloat16, 29)
    v, i = make_topk(70000, 7, 3, 30, torch.bfloat16, torch.int32)
    loss, grad = run_op(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "none", with_grad=False)
    assert grad.numel() == 0
    ref_loss, _ = run_ref(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "none")
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=2e-4, atol=1e-5)


def test_empty_rows():
    s = torch.empty(0, 100, device="cuda")
    v = torch.empty(0, 5, device="cuda")
    i = torch.empty(0, 5, dtype=torch.long, device="cuda")
    loss, grad = run_op(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")
    assert loss.item() == 0.0 and grad.shape == (0, 100)


@pytest.mark.parametrize("vocab,width", [(50257, 50304), (4099, 4104)])
def test_padded_row_stride(vocab, width):
    # student[..., :vocab] of a wider buffer: the contiguous gradient's rows start at every phase.
    rows = 16
    s = cuda_logits(rows, width, torch.bfloat16, 31)[:, :vocab]
    v, i = make_topk(rows, vocab, 64, 32)
    labels = cuda_labels(rows, vocab, 33, i)
    loss, grad = compare(s, v, i, labels, 2.0, "kl", 0.5, 0.8, 0.2, -100, "batchmean")
    assert grad.is_contiguous() and grad.shape == (rows, vocab)


@pytest.mark.parametrize("case", [("bfloat16", 1000, 4), ("bfloat16", 1000, 200), ("float32", 2049, 64),
                                  ("bfloat16", 128256, 64), ("bfloat16", 128256, 256), ("float16", 262144, 256),
                                  ("float32", 262144, 262144), ("bfloat16", 400000, 4096)], ids=str)
def test_launch_configuration_on_this_gpu(case):
    info = _extension.topk_cuda_launch_info(*case)
    assert info["occupancy"] == info["blocks_per_sm"], info  # fastkd's count (topk_kd_launch.h) is the runtime's
    if info["opt_in"]:
        assert info["max_dyn_smem_attr"] >= info["dyn_smem"], info
    # What test_topk_launch_config.py assumes of the compiled kernels.
    assert info["regs"] <= (80 if info["warp_kernel"] else 64), info
    assert info["static_smem"] == (0 if info["warp_kernel"] else 1200), info
    assert info["occupancy"] >= (3 if info["warp_kernel"] else 2) or info["dyn_smem"] > 100_000, info
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[case[0]]
    s = cuda_logits(3, case[1], dtype, 34)
    v, i = make_topk(3, case[1], case[2], 35)
    compare(s, v, i, None, 1.0, "kl", 0.5, 1.0, 0.0, -100, "sum")


# ---- device asserts: bad indices and labels ------------------------------------------------------------
ASSERT_SCRIPT = textwrap.dedent("""
    import sys, torch, fastkd
    from fastkd.ops._args import loss_options
    vocab, k, case, index_dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, vocab, generator=g).cuda()
    i = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(4)]).to(index_dtype)
    labels = torch.zeros(4, dtype=torch.long)
    if case == "duplicate":
        i[2, k - 1] = i[2, 0]
    elif case == "too_large":
        i[1, k // 2] = vocab
    elif case == "negative":
        i[3, 0] = -1
    elif case == "label":
        labels[2] = vocab
    v = torch.randn(4, k, generator=g).cuda()
    torch.cuda.set_sync_debug_mode("error")
    torch.ops.fastkd.topk_kd_loss_fwd(s, v, i.cuda(), labels.cuda(), loss_options(1.0, 0.5, 1.0, 0.5), None, "kl", -100,
                                      "sum", True)
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print("no assert")
""")


# (vocab, k): a warp per row with the pairwise check (1000, 4) or the bitmap (1000, 200); a block per row
# with the pairwise check (262144, 64) or the bitmap (262144, 256). One subprocess each: ~5 s.
ASSERT_CASES = [(1000, 4, "duplicate"), (1000, 200, "duplicate"), (262144, 64, "duplicate"),
                (262144, 256, "duplicate"), (1000, 200, "too_large"), (262144, 64, "negative"), (1000, 4, "label"),
                (1000, 4, "valid"), (262144, 256, "valid")]


@pytest.mark.parametrize("vocab,k,case", ASSERT_CASES, ids=[f"{v}-{k}-{c}" for v, k, c in ASSERT_CASES])
def test_device_asserts(vocab, k, case):
    index_dtype = "int32" if k == 64 else "int64"
    env = dict(os.environ, FASTKD_REQUIRE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", ASSERT_SCRIPT, str(vocab), str(k), case, index_dtype],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    text = out.stdout + out.stderr  # the device's assert message comes through the printf buffer (stdout)
    if case == "valid":
        assert out.returncode == 0 and "no assert" in out.stdout, text
        return
    assert out.returncode != 0 and "no assert" not in out.stdout, text
    assert "device-side assert" in text, text
    expect = {"duplicate": "holds an index twice", "too_large": "teacher_indices entry is outside",
              "negative": "teacher_indices entry is outside", "label": "a label is outside"}[case]
    assert expect in text, text


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("vocab,k", [(769, 16), (50257, 64)])
def test_strided_layouts(layout, vocab, k):
    # Sliced, transposed, padded and 4-D student views (conftest's LAYOUTS), read in place.
    g = torch.Generator().manual_seed(vocab)

    def make(shape):
        return (torch.randn(shape, generator=g) * 3).to(torch.bfloat16).cuda()

    s = layout_view(layout, make, vocab)
    rows = s[..., 0].numel()
    v, i = make_topk(rows, vocab, k, 36)
    v, i = v.view(*s.shape[:-1], k), i.view(*s.shape[:-1], k)
    labels = random_labels(s.shape[:-1], vocab, seed=6).cuda()
    for div in ("kl", "jsd"):
        loss, grad = compare(s, v, i, labels, 2.0, div, 0.3, 0.8, 0.2, -100, "batchmean")
        assert grad.is_contiguous() and grad.shape == s.shape
