"""``fastkd.fused_linear_kd_loss`` / ``fastkd.FusedLinearKDLoss`` and ``fastkd.fused_linear_topk_kd_loss`` /
``fastkd.FusedLinearTopKKDLoss``: the output heads fused with the KD losses (a dense or a top-k teacher).

The ops' one home: their schemas, the fallback registration (``fastkd.reference.fused_linear``), the fake
kernels, the autograd and the public wrappers. The compiled kernels are in ``csrc/fused_linear/`` (ATen GEMMs +
the row kernels of ``csrc/kd_loss/kd_rows.h`` and ``csrc/topk_kd/topk_rows.h``, CPU and CUDA).
docs/fused_linear_kd_loss.md has the algorithm.
"""

from __future__ import annotations

import torch

from ..reference import fused_linear as reference
from ..reference import topk as topk_reference
from ._args import (
    as_int,
    check_flag,
    check_labels,
    check_loss_options,
    check_topk_teacher,
    is_real,
    loss_options,
    normalizer_arg,
    use_reference_maths,
    values_on_host,
)
from ._autograd import define_terms_twin
from .kd import KDLossOptions, KDTerms, terms_fake  # (kd defines kd_loss_scale_, the backward calls it)

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "fused_linear_topk_kd_loss", "FusedLinearTopKKDLoss",
           "default_chunk_size"]

_LIB = torch.library.Library("fastkd", "FRAGMENT")
_OP = "fastkd.fused_linear_kd_loss"
_TOPK_OP = "fastkd.fused_linear_topk_kd_loss"

# ---- schemas ------------------------------------------------------------------------------------------
_LIB.define(
    "fused_linear_kd_loss_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
    "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? labels, Tensor? row_scale, "
    "Tensor options, Tensor? normalizer, str divergence, int ignore_index, str reduction, int chunk_size, "
    "bool grad_hidden, bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor)"
)  # options: float64 CPU [temperature, beta, soft_weight, hard_weight, logit_scale, softcap (0 = none)];
#   normalizer: as fastkd::kd_loss_fwd's (None, or "batchmean"'s divisor: one number on the device or the CPU)
# Returns (loss, d loss/d student_hidden, d/d student_weight, d/d student_bias) for grad_output = 1, each
# gradient an empty [0] tensor unless its flag is set; row_scale ([rows] fp32 or None) multiplies the gradient
# of every row (the backward of reduction="none" passes its grad_output there).

_LIB.define(
    "fused_linear_topk_kd_loss_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
    "Tensor teacher_values, Tensor teacher_indices, Tensor? labels, Tensor? row_scale, Tensor options, "
    "Tensor? normalizer, str divergence, int ignore_index, str reduction, int chunk_size, bool grad_hidden, "
    "bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor)"
)  # the same with a sparse teacher: its top-k values and indices (..., K), as fastkd::topk_kd_loss_fwd takes them

# Their twins with the soft and hard terms (return_terms=True), from the same chunk pass: a fifth output.
define_terms_twin(_LIB, "fused_linear_kd_loss")
define_terms_twin(_LIB, "fused_linear_topk_kd_loss")

# ---- fallback (reference) kernels --------------------------------------------------------------------
_LIB.impl("fused_linear_kd_loss_fwd", reference.fused_linear_kd_loss_fwd, "CompositeExplicitAutograd")
_LIB.impl("fused_linear_topk_kd_loss_fwd", reference.fused_linear_topk_kd_loss_fwd, "CompositeExplicitAutograd")
_LIB.impl("fused_linear_kd_loss_terms_fwd", reference.fused_linear_kd_loss_terms_fwd, "CompositeExplicitAutograd")
_LIB.impl("fused_linear_topk_kd_loss_terms_fwd", reference.fused_linear_topk_kd_loss_terms_fwd,
          "CompositeExplicitAutograd")


# ---- fake kernels (torch.compile, meta tensors) -------------------------------------------------------
@torch.library.register_fake("fastkd::fused_linear_kd_loss_fwd")
def _fused_fwd_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                    labels, row_scale, options, normalizer, divergence, ignore_index, reduction, chunk_size,
                    grad_hidden, grad_weight, grad_bias):
    loss = student_hidden.new_empty(student_hidden.shape[:-1] if reduction == "none" else (), dtype=torch.float32)
    gh = student_hidden.new_empty(student_hidden.shape if grad_hidden else (0,))
    gw = student_weight.new_empty(student_weight.shape if grad_weight else (0,))
    gb = student_weight.new_empty(student_bias.shape if grad_bias else (0,))
    return loss, gh, gw, gb


@torch.library.register_fake("fastkd::fused_linear_topk_kd_loss_fwd")
def _fused_topk_fwd_fake(student_hidden, student_weight, student_bias, teacher_values, teacher_indices, labels,
                         row_scale, options, normalizer, divergence, ignore_index, reduction, chunk_size,
                         grad_hidden, grad_weight, grad_bias):
    return _fused_fwd_fake(student_hidden, student_weight, student_bias, None, None, None, labels, row_scale, options,
                           normalizer, divergence, ignore_index, reduction, chunk_size, grad_hidden, grad_weight,
                           grad_bias)


@torch.library.register_fake("fastkd::fused_linear_kd_loss_terms_fwd")
def _fused_terms_fwd_fake(*args):
    return (*_fused_fwd_fake(*args), terms_fake(args[0], args[12]))


@torch.library.register_fake("fastkd::fused_linear_topk_kd_loss_terms_fwd")
def _fused_topk_terms_fwd_fake(*args):
    return (*_fused_topk_fwd_fake(*args), terms_fake(args[0], args[11]))


# ---- autograd ----------------------------------------------------------------------------------------
# Both ops' inputs: the tensors (student_hidden, student_weight, student_bias first; row_scale, options and
# normalizer last), then divergence, ignore_index, reduction, chunk_size, then the three gradient flags.
_GRAD_INPUTS = (0, 1, 2)
_ROW_SCALE = -3  # row_scale's place among the tensors


def _register_autograd(op: str, public: str, oracle: str, n_tensors: int) -> None:
    """The autograd of ``fastkd::<op>``: the gradients computed in the forward and scaled in place by grad_output,
    or, for reduction="none" (a per-row grad_output weighs every row's share of the weight gradient), computed in
    the backward with row_scale = grad_output (the forward ran without them) by the op itself, or by the op a
    *_terms_fwd twin extends. The outputs after the gradients (a twin's terms) are not differentiable."""
    reduction_at = n_tensors + 2
    recompute = op.replace("_terms_fwd", "_fwd")  # (the twin's terms are not needed for the gradients)

    def setup_context(ctx, inputs, output):
        gh, gw, gb = output[1:4]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.flags = tuple(inputs[-3:])
        ctx.n_inputs = len(inputs)
        ctx.none = inputs[reduction_at] == "none"
        ctx.consumed = False
        if ctx.none:
            ctx.save_for_backward(*inputs[:n_tensors])
            ctx.args = inputs[n_tensors:n_tensors + 4]
        else:
            ctx.save_for_backward(gh, gw, gb)

    def backward(ctx, grad_loss, *_):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{public} does not support double backward (create_graph=True): its gradient is "
                               f"computed by a fused kernel. Use {oracle} (or float64 inputs, which run it) for "
                               "higher-order derivatives.")
        if ctx.consumed:
            raise RuntimeError(f"{public}: backward through the same loss twice (retain_graph=True) is not supported: "
                               "the fused gradients are scaled in place by the first backward. Recompute the loss "
                               "instead.")
        ctx.consumed = True
        grads = [None] * ctx.n_inputs
        if grad_loss is None:
            return tuple(grads)
        if ctx.none:
            tensors = list(ctx.saved_tensors)
            tensors[_ROW_SCALE] = grad_loss.reshape(-1).float()
            flags = tuple(ctx.needs_input_grad[i] for i in _GRAD_INPUTS)
            _, gh, gw, gb = getattr(torch.ops.fastkd, recompute)(*tensors, *ctx.args, *flags)
        else:
            flags = ctx.flags
            if any(ctx.needs_input_grad[i] and not f for i, f in zip(_GRAD_INPUTS, flags, strict=True)):
                raise RuntimeError(f"{public}: a gradient was not computed in the forward; call the op through "
                                   f"{public}, which asks for the gradient of every student tensor that requires grad")
            gh, gw, gb = ctx.saved_tensors
            for g, wanted in zip((gh, gw, gb), flags, strict=True):
                if wanted:  # in place: free when grad_loss == 1 (loss.backward())
                    torch.ops.fastkd.kd_loss_scale_(g, grad_loss)
        for i, g, wanted in zip(_GRAD_INPUTS, (gh, gw, gb), flags, strict=True):
            grads[i] = g if wanted else None
        return tuple(grads)

    torch.library.register_autograd(f"fastkd::{op}", backward, setup_context=setup_context)


_register_autograd("fused_linear_kd_loss_fwd", _OP, "fastkd.reference.fused_linear_kd_loss", 10)
_register_autograd("fused_linear_topk_kd_loss_fwd", _TOPK_OP, "fastkd.reference.fused_linear_topk_kd_loss", 9)
_register_autograd("fused_linear_kd_loss_terms_fwd", _OP, "fastkd.reference.fused_linear_kd_loss", 10)
_register_autograd("fused_linear_topk_kd_loss_terms_fwd", _TOPK_OP, "fastkd.reference.fused_linear_topk_kd_loss", 9)


# ---- the public wrapper ----------------------------------------------------------------------------

# The bytes of fp32 chunk buffers [chunk, V] the compiled kernels keep per row of a chunk: student and teacher
# logits and the logits' gradient (+ its bf16/fp16 copy for the CUDA GEMMs), i.e. 12 to 14 bytes per entry.
_CHUNK_BUDGET = {"cpu": 64 << 20, "cuda": 1 << 30}


def default_chunk_size(vocab: int, hidden: int, device: torch.device) -> int:
    """The rows per chunk when chunk_size is None: as many as keep the chunk's fp32 buffers (about 14 bytes per
    logit) within 64 MiB on the CPU or 1 GiB on a GPU, a multiple of 16 in [16, 4096], and at least H / 32 (a
    chunk's GEMMs reread the whole weight, so a chunk should be a few rows per hidden unit's worth of work). A
    heuristic, not a tuned table: bench/bench_fused_linear.py measures the default against the GEMMs alone."""
    budget = _CHUNK_BUDGET.get(device.type, _CHUNK_BUDGET["cuda"])
    rows = budget // (14 * max(1, vocab))
    rows = max(rows, hidden // 32, 16)
    return min(4096, rows // 16 * 16)


def _check_tensor(op, name, x, dims=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if type(x).__name__ == "DTensor":
        raise TypeError(f"{op}: {name} is a DTensor (sharded), which the fused op does not support yet; pass the "
                        f"full tensor ({name}.full_tensor()) or use the loss on materialised logits")
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{op}: {name} must have {dims} dimension(s), got shape {tuple(x.shape)}")
    if dims is None and x.dim() < 1:
        raise ValueError(f"{op}: {name} must have shape (..., hidden), got a 0-d tensor")


def _check_head(op, who, hidden, weight, bias, device):
    h, w, b = f"{who}_hidden", f"{who}_weight", f"{who}_bias"
    _check_tensor(op, h, hidden)
    _check_tensor(op, w, weight, 2)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: {h} has hidden size {hidden.shape[-1]} but {w} is {tuple(weight.shape)}; the "
                         f"weight is (vocab, hidden) as nn.Linear stores it (pass lm_head.weight, not its transpose)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: {w} is {weight.dtype} but {h} {hidden.dtype}; use one dtype per model "
                        f"(as nn.Linear does)")
    if bias is not None:
        _check_tensor(op, b, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: {b} has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) (one entry "
                             f"per row of {w})")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{op}: {b} is {bias.dtype} but {w} {weight.dtype}; use one dtype per model")
    for name, x in ((h, hidden), (w, weight), (b, bias)):
        if x is not None and x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but student_hidden on {device}; move them to one device")


def _check_common(op, hs, ws, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                  reduction, logit_scale, softcap, chunk_size):
    check_loss_options(op, temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction)
    if not is_real(logit_scale) or not (0 < logit_scale < float("inf")):
        raise ValueError(f"{op}: logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (not is_real(softcap) or not (0 < softcap < float("inf"))):
        raise ValueError(f"{op}: softcap must be None or a finite number > 0 (logits z -> softcap * tanh(z / "
                         f"softcap)), got {softcap!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, torch.SymInt))
                                   or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be None (chosen from the vocabulary and the device) or an int > 0 "
                         f"(rows per chunk), got {chunk_size!r}")
    # The labels' checks read only the logits' shape and device: a zero-stride stand-in of shape (..., V).
    stand_in = torch.empty((), dtype=hs.dtype, device=hs.device).expand(*hs.shape[:-1], ws.shape[0])
    check_labels(op, labels, stand_in, ignore_index, hard_weight)


def _check_args(hs, ws, ht, wt, labels, bs, bt, temperature, divergence, beta, soft_weight, hard_weight,
                ignore_index, reduction, logit_scale, softcap, chunk_size):
    _check_tensor(_OP, "student_hidden", hs)
    _check_head(_OP, "student", hs, ws, bs, hs.device)
    _check_head(_OP, "teacher", ht, wt, bt, hs.device)
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"{_OP}: vocabulary sizes differ: student_weight has {ws.shape[0]} rows, teacher_weight {wt.shape[0]}. "
            f"Teachers often pad their vocabulary: pass teacher_weight[:{ws.shape[0]}] (and "
            f"teacher_bias[:{ws.shape[0]}]) if the extra rows are padding.")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"{_OP}: rows differ: student_hidden has leading shape {tuple(hs.shape[:-1])}, "
                         f"teacher_hidden {tuple(ht.shape[:-1])}; both must hold the same positions")
    _check_common(_OP, hs, ws, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                  reduction, logit_scale, softcap, chunk_size)


def _check_topk_args(hs, ws, values, indices, labels, bs, temperature, divergence, beta, soft_weight, hard_weight,
                     ignore_index, reduction, logit_scale, softcap, chunk_size):
    op = _TOPK_OP
    _check_head(op, "student", hs, ws, bs, hs.device)
    _check_tensor(op, "teacher_values", values)
    check_topk_teacher(op, values, indices, hs, "student_hidden", ws.shape[0])
    topk_reference.check_topk_divergence(op, divergence, beta)
    _check_common(op, hs, ws, labels, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                  reduction, logit_scale, softcap, chunk_size)


def _options(temperature, beta, soft_weight, hard_weight, logit_scale, softcap) -> torch.Tensor:
    # loss_options' tensor and the head's two options, built the same way (symbolic under torch.compile).
    cap = 0.0 if softcap is None else softcap
    head = (torch.stack([torch.ones((), dtype=torch.float64) * logit_scale, torch.ones((), dtype=torch.float64) * cap])
            if torch.compiler.is_compiling() else torch.tensor([float(logit_scale), float(cap)], dtype=torch.float64))
    return torch.cat([loss_options(temperature, beta, soft_weight, hard_weight), head])


def _call_plan(student_hidden, student_weight, student_bias, reduction: str, chunk_size):
    """The op's chunk size (default_chunk_size when None) and its three gradient flags (hidden, weight, bias:
    which the forward computes). reduction="none" gets its gradients in the backward (a per-row grad_output
    weighs the weight gradient), so its forward computes none."""
    if chunk_size is None:
        chunk_size = default_chunk_size(student_weight.shape[0], student_hidden.shape[-1], student_hidden.device)
    grad = torch.is_grad_enabled() and reduction != "none"
    return chunk_size, (grad and student_hidden.requires_grad, grad and student_weight.requires_grad,
                        grad and student_bias is not None and student_bias.requires_grad)


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                         student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                         temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5, soft_weight: float = 1.0,
                         hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "batchmean",
                         logit_scale: float = 1.0, softcap: float | None = None, chunk_size: int | None = None,
                         normalizer: float | torch.Tensor | None = None,
                         return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
    """:func:`fastkd.kd_loss` of the two models' output heads, without materialising their logits.

    The loss of ``kd_loss(head_s(student_hidden), head_t(teacher_hidden), labels, ...)`` with
    ``head(h) = cap(logit_scale * (h @ weight.T + bias))``, ``cap(z) = softcap * tanh(z / softcap)`` (Gemma 2/3's
    final-logit softcapping; none when softcap is None), the same for both models. Hidden states (..., H) with
    any leading shape (student and teacher H may differ), weights (V, H) as ``nn.Linear`` stores them, biases
    (V,). Gradients for student_hidden, student_weight and student_bias (the teacher is constant), each only
    when it requires grad.

    Rows are processed ``chunk_size`` at a time (default: :func:`default_chunk_size`); a chunk's logits are
    fp32 (bf16/fp16 inputs are multiplied with fp32 output, never rounded to their dtype). Every other keyword
    is :func:`fastkd.kd_loss`'s. float64 inputs and torch.func transforms run the reference
    (``fastkd.reference.fused_linear_kd_loss``, which materialises the logits).

    ``normalizer`` (with "batchmean"), as :func:`fastkd.kd_loss`'s: the sum divided by it instead of the number
    of valid rows (e.g. Hugging Face's ``num_items_in_batch``), a number or a one-number tensor on the hidden
    states' device (never read on the host); the chunks' gradients are computed already divided, so
    ``loss.backward()`` costs no pass over them, where ``fused_linear_kd_loss(..., reduction="sum") / n`` costs
    one per student gradient. ``return_terms=True``: ``(loss, KDTerms(soft, hard))`` as :func:`fastkd.kd_loss`'s,
    from the same chunk pass.
    """
    _check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
                temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction, logit_scale, softcap,
                chunk_size)
    norm = normalizer_arg(_OP, normalizer, reduction, student_hidden, "student_hidden")
    check_flag(_OP, "return_terms", return_terms)
    if use_reference_maths(student_hidden, teacher_hidden):
        loss = reference.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
            temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction, logit_scale, softcap,
            norm)
        if not return_terms:
            return loss
        return loss, KDTerms.of(reference.fused_linear_kd_loss_terms(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
            temperature, divergence, beta, ignore_index, reduction, logit_scale, softcap, norm))
    chunk_size, forward_flags = _call_plan(student_hidden, student_weight, student_bias, reduction, chunk_size)
    op = torch.ops.fastkd.fused_linear_kd_loss_terms_fwd if return_terms else torch.ops.fastkd.fused_linear_kd_loss_fwd
    out = op(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, None,
        _options(temperature, beta, soft_weight, hard_weight, logit_scale, softcap), norm, divergence,
        as_int(ignore_index), reduction, as_int(chunk_size), *forward_flags)
    return (out[0], KDTerms.of(out[4])) if return_terms else out[0]


def fused_linear_topk_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                              labels: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
                              temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5,
                              soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                              reduction: str = "batchmean", logit_scale: float = 1.0, softcap: float | None = None,
                              chunk_size: int | None = None, normalizer: float | torch.Tensor | None = None,
                              return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
    """:func:`fastkd.topk_kd_loss` of the student's output head against a sparse (e.g. cached) teacher, without
    materialising the student's logits.

    The loss of ``topk_kd_loss(head(student_hidden), teacher_values, teacher_indices, labels, ...)`` with the
    student's ``head`` as in :func:`fused_linear_kd_loss` (``logit_scale`` and ``softcap`` apply to the student;
    the teacher's values are taken as they are). ``teacher_values`` / ``teacher_indices``: (..., K) with the
    hidden states' leading shape, as :func:`fastkd.topk_kd_loss` takes them ("kl" and "jsd" with beta < 1).
    Gradients, chunks, dtypes, ``normalizer``, ``return_terms`` and the float64 / torch.func path as
    :func:`fused_linear_kd_loss`.
    """
    _check_topk_args(student_hidden, student_weight, teacher_values, teacher_indices, labels, student_bias,
                     temperature, divergence, beta, soft_weight, hard_weight, ignore_index, reduction, logit_scale,
                     softcap, chunk_size)
    norm = normalizer_arg(_TOPK_OP, normalizer, reduction, student_hidden, "student_hidden")
    check_flag(_TOPK_OP, "return_terms", return_terms)
    if use_reference_maths(student_hidden, teacher_values):
        if values_on_host(teacher_indices):  # the op's kernels check them on the other paths
            topk_reference.check_topk_indices(teacher_indices, student_weight.shape[0])
        loss = reference.fused_linear_topk_kd_loss(
            student_hidden, student_weight, teacher_values, teacher_indices, labels, student_bias, temperature,
            divergence, beta, soft_weight, hard_weight, ignore_index, reduction, logit_scale, softcap, norm)
        if not return_terms:
            return loss
        return loss, KDTerms.of(reference.fused_linear_topk_kd_loss_terms(
            student_hidden, student_weight, teacher_values, teacher_indices, labels, student_bias, temperature,
            divergence, beta, ignore_index, reduction, logit_scale, softcap, norm))
    chunk_size, forward_flags = _call_plan(student_hidden, student_weight, student_bias, reduction, chunk_size)
    op = (torch.ops.fastkd.fused_linear_topk_kd_loss_terms_fwd if return_terms
          else torch.ops.fastkd.fused_linear_topk_kd_loss_fwd)
    out = op(
        student_hidden, student_weight, student_bias, teacher_values, teacher_indices, labels, None,
        _options(temperature, beta, soft_weight, hard_weight, logit_scale, softcap), norm, divergence,
        as_int(ignore_index), reduction, as_int(chunk_size), *forward_flags)
    return (out[0], KDTerms.of(out[4])) if return_terms else out[0]


class FusedLinearKDLoss(KDLossOptions):
    """Module form of :func:`fastkd.fused_linear_kd_loss` with the same keywords:
    ``FusedLinearKDLoss(temperature=2.0)(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
    labels)``; ``logit_scale``, ``softcap`` and ``chunk_size`` are attributes too, and ``normalizer`` is a
    keyword of the call (it changes with every batch), as :class:`fastkd.KDLoss`'s."""

    def __init__(self, *, logit_scale: float = 1.0, softcap: float | None = None, chunk_size: int | None = None,
                 **options):
        super().__init__(**options)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, logit_scale=self.logit_scale,
                                    softcap=self.softcap, chunk_size=self.chunk_size, normalizer=normalizer,
                                    return_terms=return_terms, **self.options())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, logit_scale={self.logit_scale}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")


class FusedLinearTopKKDLoss(FusedLinearKDLoss):
    """Module form of :func:`fastkd.fused_linear_topk_kd_loss` with the same keywords:
    ``FusedLinearTopKKDLoss(temperature=2.0)(student_hidden, student_head.weight, values, indices, labels)``."""

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_values: torch.Tensor,
                teacher_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDTerms]:
        return fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_values, teacher_indices, labels,
                                         student_bias=student_bias, logit_scale=self.logit_scale,
                                         softcap=self.softcap, chunk_size=self.chunk_size, normalizer=normalizer,
                                         return_terms=return_terms, **self.options())
