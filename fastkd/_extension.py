"""The compiled extension: loading it, and what it tells about the kernels in use.

``fastkd._C`` registers ``CPU`` and ``CUDA`` kernels of the ops whose schemas ``fastkd/ops/`` defines
(TORCH_LIBRARY_IMPL in csrc/), which the dispatcher then prefers over the pure-PyTorch fallbacks.
Callers never branch on whether the extension is there.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _env
from . import ops as _ops  # noqa: F401  (the schemas exist before the compiled kernels attach to them)

__all__ = ["backend", "extension_error", "empty_cache", "kernel_info"]


def _load_extension():
    """Import fastkd._C (which registers the compiled kernels). Returns (module or None, reason)."""
    if _env.flag("FASTKD_DISABLE_EXTENSION"):
        return None, "disabled by FASTKD_DISABLE_EXTENSION=1"
    try:
        from . import _C  # noqa: PLC0415  (registers the CPU/CUDA kernels as a side effect)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch version mismatch
        return None, f"{type(exc).__name__}: {exc}"
    _C.set_cpu_grad_cache(_env.flag("FASTKD_CPU_GRAD_CACHE"))
    _install_avx512(_C)
    return _C, None


def _avx512_module():
    """fastkd._C_avx512 where this CPU runs AVX-512 and the module was built, else None."""
    if not torch.cpu._is_avx512_supported():
        return None
    try:
        from . import _C_avx512  # noqa: PLC0415
    except ImportError:
        return None  # built without it (FASTKD_CPU_ISA=default, or not x86-64)
    return _C_avx512


def _install_avx512(ext) -> None:
    """Use the AVX-512 copy of the CPU KD-loss kernel (module fastkd._C_avx512) where torch itself runs
    AVX-512 kernels: fastkd follows torch's choice, so ATEN_CPU_CAPABILITY=avx2 selects the AVX2 copy."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    mod = _avx512_module()
    if mod is not None:  # else the AVX2/portable copy serves
        ext.install_cpu_kernels(mod.kernel_table())


EXT, _EXT_ERROR = _load_extension()
if EXT is None and not _env.flag("FASTKD_DISABLE_EXTENSION"):
    if _env.flag("FASTKD_REQUIRE_EXTENSION"):
        raise ImportError(
            f"fastkd: FASTKD_REQUIRE_EXTENSION=1 but the compiled extension fastkd._C is unusable ({_EXT_ERROR}). "
            "Rebuild it against the installed torch: pip install --no-build-isolation -e ."
        )
    warnings.warn(
        f"fastkd: compiled extension unavailable ({_EXT_ERROR}); using the pure-PyTorch kernels. "
        "Build it with `pip install --no-build-isolation -e .` (or set FASTKD_DISABLE_EXTENSION=1 to silence this).",
        RuntimeWarning,
        stacklevel=2,
    )
if EXT is None and _env.flag("FASTKD_DISABLE_EXTENSION") and _env.flag("FASTKD_REQUIRE_EXTENSION"):
    raise ImportError("fastkd: FASTKD_REQUIRE_EXTENSION=1 and FASTKD_DISABLE_EXTENSION=1 contradict each other")

_COMPILED = frozenset(EXT.compiled_backends()) if EXT is not None else frozenset()


def backend(device="cpu") -> str:
    """``"extension"`` when a compiled fastkd kernel serves ``device``'s type, else ``"reference"``."""
    return "extension" if torch.device(device).type in _COMPILED else "reference"


def kernel_info() -> dict:
    """Which kernel serves each device type, and why.

    ``{"cpu": ..., "cuda": ..., "cpu_build_isa": ..., "extension_error": ...}``: ``"cpu"`` is the
    instruction set of the CPU KD-loss kernel in use (``"avx512"``, ``"avx2"``, ``"default"``) or
    ``"reference"`` (the pure-PyTorch fallback); ``"cuda"`` is ``"cuda"`` where the CUDA kernels are
    compiled in, else ``"reference"``; ``"cpu_build_isa"`` the instruction set ``fastkd._C`` itself was
    compiled for (None without the extension); ``"extension_error"`` as :func:`extension_error`.
    """
    return {
        "cpu": EXT.cpu_kernel_isa() if "cpu" in _COMPILED else "reference",
        "cuda": "cuda" if "cuda" in _COMPILED else "reference",
        "cpu_build_isa": EXT.cpu_isa if EXT is not None else None,
        "extension_error": _EXT_ERROR,
    }


def empty_cache() -> int:
    """Free the CPU gradient buffers fastkd keeps for reuse (the last two freed, of 1 MiB or more; see
    docs/kernels.md). Returns the bytes freed; 0 without the extension."""
    return EXT.empty_cpu_grad_cache() if EXT is not None else 0


def extension_error() -> str | None:
    """Why the compiled extension is not in use (None when it is)."""
    return _EXT_ERROR


# ---- for the tests of the CPU kernels (not public) ------------------------------------------------------
def cpu_grad_cache_bytes() -> int:
    """Bytes of freed CPU gradient buffers kept for reuse (0 without the extension)."""
    return EXT.cpu_grad_cache_bytes() if EXT is not None else 0


def cpu_kernel_tables() -> dict:
    """The copies of the CPU KD-loss kernel this build has and this CPU runs, by instruction set."""
    if EXT is None:
        return {}
    tables = {EXT.cpu_isa: EXT.kernel_table()}
    mod = _avx512_module()
    if mod is not None:
        tables["avx512"] = mod.kernel_table()
    return tables


@contextlib.contextmanager
def use_cpu_kernel(isa: str):
    """Serve the CPU KD loss with the copy of the kernel for ``isa`` inside the block."""
    tables = cpu_kernel_tables()
    before = EXT.cpu_kernel_isa()
    EXT.install_cpu_kernels(tables[isa])
    try:
        yield
    finally:
        EXT.install_cpu_kernels(tables[before])


# ---- for the tests and the GPU check of the CUDA launch configuration (not public) ---------------------
def kd_cuda_launch_config(limits: dict, vocab: int, student_bytes: int, teacher_bytes: int, static_smem: int,
                          regs: int) -> dict:
    """The CUDA KD-loss launch configuration (csrc/kd_loss/kd_loss_launch.h) for the device properties in
    ``limits`` (the fields of KdDeviceLimits): arithmetic only, no GPU needed."""
    return EXT.kd_cuda_launch_config(limits, vocab, student_bytes, teacher_bytes, static_smem, regs)


def kd_cuda_row_layout(s_addr: int, s_size: int, t_addr: int, t_size: int, g_addr: int, vocab: int,
                       pack_elems: int) -> tuple:
    """(head, body, tail, gradient store width in bytes) of a row at these addresses (0: absent)."""
    return EXT.kd_cuda_row_layout(s_addr, s_size, t_addr, t_size, g_addr, vocab, pack_elems)


def kd_cuda_launch_info(student_dtype: str, teacher_dtype: str, divergence: str, vocab: int) -> dict:
    """The configuration a CUDA KD-loss forward gets on the current GPU and the runtime's occupancy of it
    (a CUDA build on a machine with a GPU)."""
    return EXT.kd_cuda_launch_info(student_dtype, teacher_dtype, divergence, vocab)


def topk_cuda_launch_config(limits: dict, vocab: int, k: int, student_bytes: int, static_smem: int,
                            regs: int) -> dict:
    """The CUDA top-k KD-loss launch configuration (csrc/topk_kd/topk_kd_launch.h) for the device properties
    in ``limits`` (the fields of KdDeviceLimits) and rows of ``k`` indices: arithmetic only, no GPU needed."""
    return EXT.topk_cuda_launch_config(limits, vocab, k, student_bytes, static_smem, regs)


def topk_cuda_launch_info(student_dtype: str, vocab: int, k: int) -> dict:
    """The configuration a CUDA top-k KD-loss forward gets on the current GPU and the runtime's occupancy of it
    (a CUDA build on a machine with a GPU)."""
    return EXT.topk_cuda_launch_info(student_dtype, vocab, k)
