import contextlib
import socket

import pytest
import torch

import fastkd
from fastkd import _extension


def pytest_collection_modifyitems(config, items):
    # CUDA tests are selected by marker and skipped where no GPU is visible (collection itself never
    # touches a device).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'cuda')")
    for item in items:
        # The marker itself: item.keywords also holds every folder name on the path (a checkout in a
        # folder named "cuda" would skip the whole suite).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def free_port() -> int:
    """A TCP port on the loopback interface that is free now (for gloo process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=sorted(_extension.cpu_kernel_tables()) or ["reference"])
def cpu_kernel(request):
    """Runs a test with each copy of the CPU kernels (AVX2 and AVX-512 here), then restores the one in use;
    "reference" where the extension is disabled or not built."""
    if request.param == "reference":
        yield request.param
        return
    with _extension.use_cpu_kernel(request.param):
        assert fastkd.kernel_info()["cpu"] == request.param
        yield request.param


# ---- helpers of the op tests (imported by them: `from conftest import ...`) ------------------------------
@contextlib.contextmanager
def no_sync():
    """Any host<->device synchronisation inside the block raises (torch.cuda.set_sync_debug_mode("error"));
    the work queued before it is waited for first, outside the check, and the mode before it comes back."""
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def random_labels(shape, vocab, ignore_frac=0.2, seed=1, ignore_index=-100):
    """CPU int64 labels in [0, vocab), about ignore_frac of them ignore_index."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_frac
    return torch.where(drop, torch.full_like(labels, ignore_index), labels)


def loss_and_grad(fn, s, teacher, labels, grad_out=None, **kw):
    """Loss and student gradient of the KD loss fn(s, *teacher, labels, **kw) (fastkd's or the reference's;
    teacher: (logits,) or (values, indices))."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, *teacher, labels, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), s.grad


def check_against_float64(fastkd_fn, reference_fn, s, teacher, labels=None, grad_out=None, floor=1e-6, **kw):
    """fastkd_fn's loss and student gradient against the float64 oracle (reference_fn run in float64) under
    the 2x-plain-PyTorch rule (tests/ops/test_kd_loss.py's docstring: plain PyTorch is reference_fn in fp32);
    teacher as loss_and_grad's, its floating tensors cast like the student."""

    def cast(dtype):
        return tuple(x.to(dtype) if x.is_floating_point() else x for x in teacher)

    ref_loss, ref_grad = loss_and_grad(reference_fn, s.double(), cast(torch.float64), labels,
                                       None if grad_out is None else grad_out.double(), **kw)
    fp32_loss, fp32_grad = loss_and_grad(reference_fn, s.float(), cast(torch.float32), labels,
                                         None if grad_out is None else grad_out.float(), **kw)
    loss, grad = loss_and_grad(fastkd_fn, s, teacher, labels, grad_out, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()

    def err(x, ref):
        return (x.double() - ref).abs().max().item()

    base_loss = err(fp32_loss, ref_loss)
    base_grad = err(fp32_grad.to(s.dtype), ref_grad)  # includes rounding to the student's dtype
    scale_loss = max(1.0, ref_loss.abs().max().item())
    scale_grad = max(1e-3, ref_grad.abs().max().item())
    assert err(loss, ref_loss) <= 2 * base_loss + floor * scale_loss, (err(loss, ref_loss), base_loss)
    assert err(grad, ref_grad) <= 2 * base_grad + floor * scale_grad, (err(grad, ref_grad), base_grad)
    return loss, grad


# The CUDA op tests' inputs (on the GPU) and their check against the float64 oracle.
def rows_for(vocab: int) -> int:
    return max(3, min(40, (1 << 20) // vocab))


def cuda_logits(rows, vocab, dtype, seed, offset=0, scale=3.0):
    """[rows, vocab] logits on the GPU; offset > 0 gives a view whose rows start `offset` elements
    into a wider buffer (misaligned rows, row stride vocab + offset)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, vocab + offset, generator=g, dtype=torch.float32) * scale
    return base.to(dtype).cuda()[:, offset:]


def cuda_labels(rows, vocab, seed, indices=None, ignore_index=-100, ignore_every=3):
    """Labels on the GPU with every `ignore_every`-th row ignored; with `indices` (a top-k teacher's), every
    other row's label is one of its teacher indices (the label inside the support) and the rest random."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0] = vocab - 1
    if indices is not None:
        labels[2::2] = indices[2::2, 0].long().cpu()
    labels[1::ignore_every] = ignore_index
    return labels.cuda()


def check_cuda_op(loss, grad, ref_loss, ref_grad, dtype, fp16_subnormal_floor=False):
    """A CUDA op's loss and gradient against the float64 oracle's: the loss in fp32 maths, the gradient in
    fp32 maths rounded to the student's dtype. fp16_subnormal_floor: fp16 gradients below 2^-14 are
    subnormal, spaced 2^-24 apart, so one rounding is off by up to 2^-25; allow 2^-24 more there."""
    loss_tol, grad_tol = ((2e-4, 1e-5), (1e-3, 1e-6)) if dtype == torch.float32 else ((2e-4, 1e-5), (1e-2, 1e-4))
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=loss_tol[0], atol=loss_tol[1])
    assert grad.dtype == dtype
    ref_grad = ref_grad.double()
    scale = max(ref_grad.abs().max().item(), 1e-30)
    floor = 2.0**-24 if fp16_subnormal_floor and dtype == torch.float16 else 0.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_tol[0], atol=grad_tol[1] * scale + floor)
