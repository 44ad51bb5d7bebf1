"""The one home of fastkd's operator schemas, fake kernels, autograd and fallback registration.

Every op is defined here once (``torch.library``, namespace ``fastkd``). The pure-PyTorch
implementation in ``fastkd.reference`` is registered as the op's default kernel
(CompositeExplicitAutograd); the compiled extension ``fastkd._C``, when it loads, registers ``CPU``
and ``CUDA`` kernels of the same ops (TORCH_LIBRARY_IMPL in csrc/), which the dispatcher then
prefers. Callers never branch on whether the extension is there.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference

__all__ = ["backend", "extension_error"]

_LIB = torch.library.Library("fastkd", "DEF")

# ---- schemas ---------------------------------------------------------------------------------------
_LIB.define(
    "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, float temperature, str divergence, "
    "float beta, float soft_weight, float hard_weight, int ignore_index, str reduction, bool with_grad) "
    "-> (Tensor, Tensor)"
)
_LIB.define("kd_loss_scale_(Tensor(a!) grad, Tensor grad_output) -> ()")

# ---- fallback (reference) kernels --------------------------------------------------------------------
_LIB.impl("kd_loss_fwd", reference.kd_loss_fwd, "CompositeExplicitAutograd")
_LIB.impl("kd_loss_scale_", reference.kd_loss_scale_, "CompositeExplicitAutograd")


# ---- fake kernels (torch.compile, meta tensors) ------------------------------------------------------
@torch.library.register_fake("fastkd::kd_loss_fwd")
def _kd_loss_fwd_fake(student, teacher, labels, temperature, divergence, beta, soft_weight, hard_weight,
                      ignore_index, reduction, with_grad):
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if with_grad else (0,))
    return loss, grad


@torch.library.register_fake("fastkd::kd_loss_scale_")
def _kd_loss_scale_fake(grad, grad_output):
    return None


# ---- autograd ----------------------------------------------------------------------------------------
def _kd_loss_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The second output never gets a gradient; materialising one would allocate and zero a tensor
    # as large as the logits on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.with_grad = inputs[-1]
    ctx.consumed = False


def _kd_loss_backward(ctx, grad_loss, _grad_of_grad):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd.kd_loss does not support double backward (create_graph=True): its gradient is "
            "computed by a fused kernel. Use fastkd.reference.kd_loss for higher-order derivatives."
        )
    if not ctx.with_grad:
        raise RuntimeError(
            "fastkd.kd_loss: the gradient was not computed in the forward (with_grad=False); call the op "
            "through fastkd.kd_loss, which sets it when student_logits requires grad."
        )
    if ctx.consumed:
        raise RuntimeError(
            "fastkd.kd_loss: backward through the same loss twice (retain_graph=True) is not supported: "
            "the fused gradient is scaled in place by the first backward. Recompute the loss instead."
        )
    ctx.consumed = True
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # the loss did not reach the differentiated output
        return (None,) * 11
    # In place: free when grad_loss == 1 (loss.backward()), one pass over the gradient otherwise.
    torch.ops.fastkd.kd_loss_scale_(grad, grad_loss)
    return grad, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastkd::kd_loss_fwd", _kd_loss_backward, setup_context=_kd_loss_setup_context)


# ==== gradient clipping (fastkd.clip) =================================================================
# One call per device/dtype group of gradients (fastkd/clip.py groups them): the CPU kernels are
# csrc/clip_cpu.cpp, the CUDA ones csrc/clip_cuda.cu (multi-tensor launches, csrc/multi_tensor.cuh).
#   grad_norm:    the group's norm (fp32; fp64 for fp64 grads) as a 0-d tensor on the group's device.
#   scale_grads_: grads *= min(max_norm / (total_norm + 1e-6), 1), the coefficient computed on the
#                 device from the 0-d total_norm; the kernels do nothing when it is >= 1.
#   clamp_grads_: grads clamped to [-clip_value, clip_value].
#   clip_grad_norm_: grad_norm then scale_grads_ in one call, for the common case of one group on one
#                 process (one list conversion and, on CUDA, one table upload instead of two).
_LIB.define("grad_norm(Tensor[] grads, float norm_type) -> Tensor")
_LIB.define("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor")
_LIB.define("scale_grads_(Tensor(a!)[] grads, Tensor total_norm, float max_norm) -> ()")
_LIB.define("clamp_grads_(Tensor(a!)[] grads, float clip_value) -> ()")

_LIB.impl("grad_norm", reference.grad_norm, "CompositeExplicitAutograd")
_LIB.impl("scale_grads_", reference.scale_grads_, "CompositeExplicitAutograd")
_LIB.impl("clamp_grads_", reference.clamp_grads_, "CompositeExplicitAutograd")
_LIB.impl("clip_grad_norm_", reference.clip_grad_norm_, "CompositeExplicitAutograd")


@torch.library.register_fake("fastkd::grad_norm")
def _grad_norm_fake(grads, norm_type):
    torch._check(len(grads) > 0, lambda: "fastkd::grad_norm: empty gradient list")
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((), dtype=dtype)


@torch.library.register_fake("fastkd::clip_grad_norm_")
def _clip_grad_norm_fake(grads, max_norm, norm_type):
    return _grad_norm_fake(grads, norm_type)


@torch.library.register_fake("fastkd::scale_grads_")
def _scale_grads_fake(grads, total_norm, max_norm):
    return None


@torch.library.register_fake("fastkd::clamp_grads_")
def _clamp_grads_fake(grads, clip_value):
    return None
# ==== end of gradient clipping ==========================================================================


# ---- the compiled extension --------------------------------------------------------------------------
def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_extension():
    """Import fastkd._C (which registers the compiled kernels). Returns (module or None, reason)."""
    if _flag("FASTKD_DISABLE_EXTENSION"):
        return None, "disabled by FASTKD_DISABLE_EXTENSION=1"
    try:
        from . import _C  # noqa: PLC0415  (registers the CPU/CUDA kernels as a side effect)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch version mismatch
        return None, f"{type(exc).__name__}: {exc}"
    _install_avx512(_C)
    return _C, None


def _install_avx512(ext) -> None:
    """Use the AVX-512 copy of the CPU KD-loss kernel (module fastkd._C_avx512) where torch itself runs
    AVX-512 kernels: fastkd follows torch's choice, so ATEN_CPU_CAPABILITY=avx2 selects the AVX2 copy."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    try:
        from . import _C_avx512  # noqa: PLC0415
    except ImportError:
        return  # built without it (FASTKD_CPU_ISA=default, or not x86-64): the AVX2/portable copy serves
    ext.install_cpu_kernels(_C_avx512.kernel_table())


_EXT, _EXT_ERROR = _load_extension()
if _EXT is None and not _flag("FASTKD_DISABLE_EXTENSION"):
    if _flag("FASTKD_REQUIRE_EXTENSION"):
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
if _EXT is None and _flag("FASTKD_DISABLE_EXTENSION") and _flag("FASTKD_REQUIRE_EXTENSION"):
    raise ImportError("fastkd: FASTKD_REQUIRE_EXTENSION=1 and FASTKD_DISABLE_EXTENSION=1 contradict each other")

_COMPILED = frozenset(_EXT.compiled_backends()) if _EXT is not None else frozenset()


def backend(device="cpu") -> str:
    """``"extension"`` when a compiled fastkd kernel serves ``device``'s type, else ``"reference"``."""
    return "extension" if torch.device(device).type in _COMPILED else "reference"


def empty_cache() -> int:
    """Free the CPU gradient buffers fastkd keeps for reuse (the last two freed, of 1 MiB or more; see the
    README's KD-loss kernels). Returns the bytes freed; 0 without the extension."""
    return _EXT.empty_cpu_grad_cache() if _EXT is not None else 0


def extension_error() -> str | None:
    """Why the compiled extension is not in use (None when it is)."""
    return _EXT_ERROR
