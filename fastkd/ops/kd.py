"""``fastkd.kd_loss`` and ``fastkd.KDLoss``: the fused knowledge-distillation loss.

The op's one home: its schemas, the fallback registration (``fastkd.reference.kd``), the fake kernels,
the autograd formula and the public wrapper. The compiled kernels of the same ops are in
``csrc/kd_loss/`` (CPU per instruction set, CUDA); the dispatcher prefers them where they are built.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..reference import kd as reference
from ..reference._common import DIVERGENCES, REDUCTIONS

__all__ = ["kd_loss", "KDLoss", "DIVERGENCES", "REDUCTIONS"]

_LIB = torch.library.Library("fastkd", "FRAGMENT")

# ---- schemas ----------------------------------------------------------------------------------------
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


# ---- the public wrapper ----------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastkd.kd_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"fastkd.kd_loss: {name} must be float32, float16 or bfloat16 logits, got {x.dtype}; "
                        f"convert with {name}.float()")
    if x.dim() < 1:
        raise ValueError(f"fastkd.kd_loss: {name} must have shape (..., vocab), got a 0-d tensor")


def _check_args(student, teacher, labels, temperature, divergence, beta, hard_weight, ignore_index, reduction):
    _check_logits("student_logits", student)
    _check_logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"fastkd.kd_loss: vocabulary sizes differ: student_logits has {student.shape[-1]}, teacher_logits has "
            f"{teacher.shape[-1]}. Teachers often pad their vocabulary: slice the teacher's logits to the student's "
            f"vocabulary (teacher_logits[..., :{student.shape[-1]}]) if the extra entries are padding."
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"fastkd.kd_loss: rows differ: student_logits has leading shape {tuple(student.shape[:-1])}, "
            f"teacher_logits {tuple(teacher.shape[:-1])}; both must hold the same positions"
        )
    if student.device != teacher.device:
        raise ValueError(f"fastkd.kd_loss: teacher_logits is on {teacher.device} but student_logits on "
                         f"{student.device}; move both to one device")
    if isinstance(temperature, torch.Tensor):
        raise TypeError("fastkd.kd_loss: temperature must be a Python number (a tensor would force a device sync)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fastkd.kd_loss: temperature must be finite and > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"fastkd.kd_loss: unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"fastkd.kd_loss: beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if reduction not in REDUCTIONS:
        hint = (" ('mean' would average over vocabulary entries too; 'batchmean' averages per row, which is the KL "
                "divergence's mathematical definition)" if reduction == "mean" else "")
        raise ValueError(f"fastkd.kd_loss: unknown reduction {reduction!r}; use one of {REDUCTIONS}{hint}")
    if labels is None:
        if hard_weight != 0:
            raise ValueError("fastkd.kd_loss: labels are required when hard_weight != 0 (the cross-entropy term)")
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.is_complex():
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"fastkd.kd_loss: labels must be an integer tensor (class indices), got {what}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"fastkd.kd_loss: labels must have the logits' leading shape {tuple(student.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"fastkd.kd_loss: labels is on {labels.device} but student_logits on {student.device}")
    # Value check where it costs no device sync (CUDA kernels assert on the device instead).
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel():
        vocab = student.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"fastkd.kd_loss: labels hold {first}, outside [0, {vocab}) and not ignore_index "
                             f"({ignore_index}); mark padding with ignore_index")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
            temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5, soft_weight: float = 1.0,
            hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "batchmean") -> torch.Tensor:
    """Fused knowledge-distillation loss from raw logits.

    Row loss = soft_weight * T^2 * D(p_teacher, p_student) + hard_weight * CE(student, labels), with
    p = softmax(logits / T). ``divergence``: ``"kl"`` = KL(p_t || p_s) (Hinton), ``"reverse_kl"`` =
    KL(p_s || p_t), ``"jsd"`` = beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s
    (beta = 0 is forward KL, beta = 1 reverse KL). The cross-entropy uses T = 1. Rows whose label is
    ``ignore_index`` count in neither term nor in the row count.

    Logits: shape (..., V), fp32/fp16/bf16 (student and teacher may differ). Maths in fp32; the loss is
    fp32, the gradient (w.r.t. ``student_logits`` only) has the student's dtype.
    ``reduction``: ``"batchmean"`` (sum over valid rows / number of valid rows, per token for (B, S, V)),
    ``"sum"``, or ``"none"`` (per-row losses with the leading shape, 0 on ignored rows).
    """
    _check_args(student_logits, teacher_logits, labels, temperature, divergence, beta, hard_weight, ignore_index,
                reduction)
    loss, _ = torch.ops.fastkd.kd_loss_fwd(
        student_logits, teacher_logits, labels, float(temperature), divergence, float(beta), float(soft_weight),
        float(hard_weight), int(ignore_index), reduction, torch.is_grad_enabled() and student_logits.requires_grad,
    )
    return loss


class KDLoss(nn.Module):
    """Module form of :func:`fastkd.kd_loss` with the same keywords: ``KDLoss(temperature=2.0)(s, t, labels)``."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean"):
        super().__init__()
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                       divergence=self.divergence, beta=self.beta, soft_weight=self.soft_weight,
                       hard_weight=self.hard_weight, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
