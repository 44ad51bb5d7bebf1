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
    return _C, None


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


def extension_error() -> str | None:
    """Why the compiled extension is not in use (None when it is)."""
    return _EXT_ERROR
