import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd import _extension

ROOT = Path(__file__).resolve().parents[1]


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


def spawn_ranks(fn, *args, world: int = 2, init: bool = True) -> None:
    """Runs ``fn(rank, *args)`` in ``world`` spawned CPU processes joined by one gloo process group, and
    raises what any of them raised. ``fn`` must be importable (a module-level function of a test module).

    Each rank gets the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT, a free loopback port). With ``init=False`` the group is left to ``fn`` (a trainer that
    initialises it from those variables); it must exist when ``fn`` returns.
    """
    with socket.socket() as s:  # a loopback port free now, for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(fn, args, world, port, init), nprocs=world, join=True)


def _rank_main(rank, fn, args, world, port, init):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, *args)
    if not dist.is_initialized():
        raise RuntimeError(f"{fn.__name__} returned without a process group (init=False: fn must create it)")
    # Every rank done before any tears the group down; the group destroyed while the interpreter is whole;
    # then out without the interpreter's finalisation, where groups still referenced (device meshes,
    # DTensors, DDP reducers) would be freed in no set order. CI has seen a rank aborted now and then by
    # gloo ("terminate called without an active exception", SIGABRT, no Python error) with teardown left
    # to the interpreter. A rank whose fn raised never gets here: torch's spawn wrapper reports it.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def lora_config():
    """The LoRA students' adapters (peft): rank 4 on the attention's q and v, both factors random (peft's
    default B = 0 would leave A without a gradient on the first step)."""
    import peft  # noqa: PLC0415 (the integrations' test extra; imported by the tests that use it)

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)


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


@pytest.fixture
def scale_factors(monkeypatch):
    """The grad_output of every fastkd::kd_loss_scale_ call during the test (a list, filled as the calls come):
    1 costs nothing, anything else is a pass over a fused gradient."""
    seen = []
    real = torch.ops.fastkd.kd_loss_scale_

    def spy(grad, grad_output):
        seen.append(float(grad_output))
        return real(grad, grad_output)

    monkeypatch.setattr(torch.ops.fastkd, "kd_loss_scale_", spy)
    return seen


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
    teacher: (logits,) or (values, indices)). s keeps its strides (a clone would compact a sliced view), so the
    layout under test is the one the op gets."""
    s = s.detach().requires_grad_(True)
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


# Logits layouts an LM loss meets (views of a contiguous base): name -> (the base's leading shape, padding of
# its vocabulary, the view, whether the kernels read it in place: csrc/kd_loss/kd_loss.h's row_view).
LAYOUTS = {
    "causal": ((3, 9), 0, lambda x: x[:, :-1], True),  # logits[:, :-1]
    "transposed": ((9, 3), 0, lambda x: x.transpose(0, 1), True),  # [S, B, V] models
    "padded_causal": ((3, 9), 5, lambda x: x[:, 1:], True),  # a padded vocabulary, shifted
    "four_d": ((2, 3, 4), 0, lambda x: x[:, :, 1:], True),  # two leading dims merge
    "three_levels": ((2, 3, 4), 0, lambda x: x[:, 1:, 1:], False),  # no two of them merge: copied
    "expanded": ((1, 9), 0, lambda x: x.expand(3, 9, -1), False),  # stride 0: copied
}


def layout_view(name, make, vocab):
    """The LAYOUTS[name] view of make(shape)'s contiguous tensor, the vocabulary (last) dim of size vocab."""
    lead, pad, view, _ = LAYOUTS[name]
    return view(make((*lead, vocab + pad))[..., :vocab])


def bytes_allocated_in(fn):
    """fn()'s result and the host memory torch allocated while it ran (bytes: each op's own allocations, as the
    profiler records them; frees not subtracted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


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


# ---- the launch-configuration tests' check against the CUDA toolkit's occupancy calculator ---------------
OCCUPANCY_PROGRAM = r"""
#include <cstdio>
#include <cuda_occupancy.h>
#include "@HEADER@"
using namespace fastkd;
static long n = 0, bad = 0;

// cuda_occupancy.h's resident blocks per SM (-1: an error) of a launch of `threads` threads and `dyn_smem`
// bytes of dynamic shared memory on d, of a kernel with these attributes.
static int occ_blocks(const KdDeviceLimits& d, int max_threads_per_block, int regs, long static_smem, bool opt_in,
                      long max_dyn_smem, int threads, long dyn_smem) {
  cudaOccDeviceProp p;
  p.computeMajor = d.major; p.computeMinor = 0; p.maxThreadsPerBlock = 1024;
  p.maxThreadsPerMultiprocessor = d.max_threads_per_sm; p.regsPerBlock = 65536;
  p.regsPerMultiprocessor = d.regs_per_sm; p.warpSize = 32; p.sharedMemPerBlock = d.smem_per_block;
  p.sharedMemPerMultiprocessor = d.smem_per_sm; p.numSms = d.sm_count;
  p.sharedMemPerBlockOptin = d.smem_per_block_optin; p.reservedSharedMemPerBlock = d.reserved_smem_per_block;
  cudaOccFuncAttributes a;
  a.maxThreadsPerBlock = max_threads_per_block; a.numRegs = regs; a.sharedSizeBytes = static_smem;
  a.partitionedGCConfig = PARTITIONED_GC_OFF;
  a.shmemLimitConfig = opt_in ? FUNC_SHMEM_LIMIT_OPTIN : FUNC_SHMEM_LIMIT_DEFAULT;
  a.maxDynamicSharedSizeBytes = max_dyn_smem;
  cudaOccDeviceState st;
  cudaOccResult r;
  if (cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &st, threads, dyn_smem) != CUDA_OCC_SUCCESS) return -1;
  return r.activeBlocksPerMultiprocessor;
}

// Counts one configuration (k < 0: none) and prints the first five whose counts differ.
static void tally(const KdDeviceLimits& d, int regs, long vocab, long k, int fastkd_blocks, int occ) {
  ++n;
  if (occ == fastkd_blocks || ++bad > 5) return;
  printf("mismatch: major %ld regs %d vocab %ld", (long)d.major, regs, vocab);
  if (k >= 0) printf(" k %ld", k);
  printf(": fastkd %d, cuda_occupancy.h %d\n", fastkd_blocks, occ);
}

int main() {
  const KdDeviceLimits devs[] = {@DEVICES@};
  for (const KdDeviceLimits& d : devs) {
@BODY@
  }
  printf("%ld configurations, %ld mismatches\n", n, bad);
  return bad != 0;
}
"""


def _cuda_include():
    """The CUDA toolkit's include folder, where it holds cuda_occupancy.h (no GPU needed); else None."""
    nvcc = shutil.which("nvcc")
    cands = [Path("/usr/local/cuda/include")]
    if nvcc:
        cands.insert(0, Path(nvcc).resolve().parent.parent / "include")
    return next((c for c in cands if (c / "cuda_occupancy.h").exists()), None)


def check_occupancy(tmp_path, header, devices, body):
    """fastkd's count of resident blocks per SM against the toolkit's occupancy calculator (the header behind
    cudaOccupancyMaxActiveBlocksPerMultiprocessor's rules): compiles and runs OCCUPANCY_PROGRAM, whose C++
    `body` runs once per device d of `devices` (KdDeviceLimits as dicts, bench/launch_configs.py's) and calls
    tally(d, regs, vocab, k, fastkd's count, occ_blocks(...)) per configuration; asserts none differs.
    Skips without g++ or the toolkit's cuda_occupancy.h."""
    include = _cuda_include()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit's cuda_occupancy.h")
    devs = ", ".join("{" + ", ".join(f".{k} = {v}" for k, v in d.items()) + "}" for d in devices)
    src = tmp_path / "occ.cpp"
    src.write_text(OCCUPANCY_PROGRAM.replace("@HEADER@", header).replace("@DEVICES@", devs).replace("@BODY@", body))
    exe = tmp_path / "occ"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{include}", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 mismatches" in out.stdout, out.stdout
