"""The argument checks of the KD losses' public wrappers (``fastkd.kd_loss``, ``fastkd.topk_kd_loss``, ...).

The rules, written once (docs/reliability.md lists them with their tests):

- Every check of a Python argument (type, range, option name) lives here, runs before the op is called
  and raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) whose message
  starts with the op's public name and names the argument and the fix.
- Checks of tensor *values* (labels or indices out of range) cost a device sync on CUDA: they run here
  only for CPU tensors outside ``torch.compile``; the kernels check them again (a ``ValueError`` from the
  C++ CPU kernel, a device-side assert from the CUDA kernel).
- The checks hold for symbolic numbers too: under ``torch.compile`` a temperature that changes between
  calls becomes a ``SymFloat``; comparisons on it add guards (``T > 0``) that keep holding, so a schedule
  that changes T every step compiles once. Nothing here converts a symbolic number to a Python one.
- Non-finite *tensor values* are not errors: they propagate as in the textbook formulas (docs/reliability.md).
"""

from __future__ import annotations

import math
import numbers

import torch

from ..reference._common import DIVERGENCES, REDUCTIONS

__all__ = ["TEMPERATURE_RANGE", "FLOAT_DTYPES", "check_logits", "check_labels", "check_loss_options", "is_real",
           "loss_options", "as_int", "use_reference_maths", "values_on_host"]

# The temperatures whose fp32 maths holds (tests/ops/test_kd_loss.py checks both ends against the
# float64 oracle). Measured with (64, 32000) logits of scale 3 against float64: below 0.05 the JSD
# gradient in fp32 has no correct digit -- torch's own fp32 maths no more than the kernels (relative
# error 3e-2 at T = 0.05, 4e2 at 0.03, 2e7 at 0.02); above 100 every probability is 1/V to within
# fp32 rounding and T^2 * D multiplies that rounding by T^2 (loss error 2e-5 at T = 100, 1e-2 at 1000).
TEMPERATURE_RANGE = (0.05, 100.0)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_real(x) -> bool:
    """A real number the op can take: int, float (numpy's too) or their symbolic forms; not bool."""
    if isinstance(x, bool) or isinstance(x, torch.Tensor):
        return False
    return isinstance(x, (numbers.Real, torch.SymInt, torch.SymFloat))


def _is_int(x) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, (numbers.Integral, torch.SymInt))


def _finite(x) -> bool:
    # math.isfinite does not take a SymFloat; these comparisons do (and add guards that keep holding).
    return x == x and -float("inf") < x < float("inf")


def _real(op: str, name: str, x, hint: str = "") -> None:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Python number, got a tensor (reading its value would force a "
                        f"device sync); pass {name}=float(t) where t is known on the host{hint}")
    if not is_real(x):
        raise TypeError(f"{op}: {name} must be a number, got {type(x).__name__} {x!r}{hint}")
    if not _finite(x):
        raise ValueError(f"{op}: {name} must be finite, got {x}{hint}")


def check_logits(op: str, name: str, x) -> None:
    """``x``: a dense float tensor of shape (..., vocab)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {x.layout}; convert it with "
                        f"{name}.to_dense()")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 logits, got {x.dtype}; "
                        f"convert with {name}.float()")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have shape (..., vocab), got a 0-d tensor")


def check_loss_options(op: str, temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                       reduction) -> None:
    """The scalar options every KD loss takes (docs/kd_loss.md)."""
    lo, hi = TEMPERATURE_RANGE
    _real(op, "temperature", temperature)
    if not lo <= temperature <= hi:
        raise ValueError(f"{op}: temperature must be in [{lo:g}, {hi:g}], got {temperature:g}: outside it the fp32 "
                         "softmax of logits / temperature overflows or rounds every probability to the same value")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"{op}: unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    _real(op, "beta", beta, " (0 = forward KL, 1 = reverse KL)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{op}: beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    _real(op, "soft_weight", soft_weight)
    _real(op, "hard_weight", hard_weight)
    if not _is_int(ignore_index):
        raise TypeError(f"{op}: ignore_index must be an int (the label value of rows to skip, e.g. -100), got "
                        f"{type(ignore_index).__name__} {ignore_index!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        hint = (" ('mean' would average over vocabulary entries too; 'batchmean' averages per row, which is the KL "
                "divergence's mathematical definition)" if reduction == "mean" else "")
        raise ValueError(f"{op}: unknown reduction {reduction!r}; use one of {REDUCTIONS}{hint}")


def check_labels(op: str, labels, student: torch.Tensor, ignore_index, hard_weight) -> None:
    """``labels``: None (only when hard_weight == 0) or integer class indices with the logits' leading shape."""
    if labels is None:
        if hard_weight != 0:
            raise ValueError(f"{op}: labels are required when hard_weight != 0 (the cross-entropy term)")
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.is_complex():
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{op}: labels must be an integer tensor (class indices), got {what}")
    if labels.layout != torch.strided:
        raise TypeError(f"{op}: labels must be a dense (strided) tensor, got layout {labels.layout}; convert it "
                        "with labels.to_dense()")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"{op}: labels must have the logits' leading shape {tuple(student.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"{op}: labels is on {labels.device} but student_logits on {student.device}")
    # Value check where it costs no device sync (CUDA kernels assert on the device instead), and where the
    # values are concrete (not under torch.compile or a torch.func transform: the reference's gather then
    # raises on an index out of range).
    if labels.numel() and values_on_host(labels):
        vocab = student.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"{op}: labels hold {first}, outside [0, {vocab}) and not ignore_index "
                             f"({ignore_index}); mark padding with ignore_index")


def loss_options(temperature, beta, soft_weight, hard_weight) -> torch.Tensor:
    """The KD ops' real-valued options as one float64 CPU tensor [temperature, beta, soft_weight, hard_weight].

    A tensor, not ``float`` arguments: torch.compile turns a Python float that changes between calls into a
    graph input, but a custom op's ``float`` argument specialises it again (a recompile per value, and
    fullgraph fails at the recompile limit). Built from ``ones * x`` under compile, the form the compiler
    keeps symbolic. The kernels read it on the host (a CPU tensor: no device sync)."""
    if torch.compiler.is_compiling():
        one = torch.ones((), dtype=torch.float64)
        return torch.stack([one * temperature, one * beta, one * soft_weight, one * hard_weight])
    return torch.tensor([float(temperature), float(beta), float(soft_weight), float(hard_weight)], dtype=torch.float64)


def check_topk_teacher(op: str, values: torch.Tensor, indices, student: torch.Tensor, student_name: str,
                       vocab: int) -> None:
    """A top-k teacher's ``teacher_indices`` (an integer dense tensor), its shape against ``teacher_values``'s
    and the student's rows (``student``'s leading shape; ``student_name`` in the messages), 1 <= K <= vocab, and
    both on the student's device. The values' dtype is the caller's check."""
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool \
            or indices.is_complex():
        what = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"{op}: teacher_indices must be an integer tensor (int32 or int64 vocabulary indices), "
                        f"got {what}")
    if indices.layout != torch.strided:
        raise TypeError(f"{op}: teacher_indices must be a dense (strided) tensor, got layout {indices.layout}; "
                        "convert it with teacher_indices.to_dense()")
    if values.shape != indices.shape:
        raise ValueError(f"{op}: teacher_values {tuple(values.shape)} and teacher_indices {tuple(indices.shape)} "
                         "must have the same shape (..., K): entry k of a row is the teacher's value at index k")
    if values.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{op}: rows differ: {student_name} has leading shape {tuple(student.shape[:-1])}, "
                         f"teacher_values {tuple(values.shape[:-1])}; both must hold the same positions")
    k = values.shape[-1]
    if k == 0:
        raise ValueError(f"{op}: teacher_values has K = 0 entries per row; K must be in [1, {vocab}]: the teacher "
                         "needs at least one")
    if k > vocab:
        raise ValueError(f"{op}: K = {k} teacher entries per row but the student's vocabulary has {vocab}; K must be "
                         f"in [1, {vocab}] (the indices are distinct entries of it)")
    for name, x in (("teacher_values", values), ("teacher_indices", indices)):
        if x.device != student.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {student_name} on {student.device}; move them to "
                             "one device")


def normalizer_arg(op: str, normalizer, reduction: str, student: torch.Tensor,
                   student_name: str = "student_logits") -> torch.Tensor | None:
    """The op's ``normalizer`` argument: None, or a one-number tensor (on ``student``'s device, or a CPU one)
    that "batchmean" divides the loss's sum by instead of the valid rows: a positive finite number (kept in a
    float64 CPU tensor, built as ``ones * x`` under compile, so a changing value compiles once), or a tensor
    of one real number (e.g. Hugging Face's ``num_items_in_batch``: its value is not read, no sync)."""
    if normalizer is None:
        return None
    if reduction != "batchmean":
        raise ValueError(f"{op}: normalizer divides the loss's sum in place of the number of valid rows: it needs "
                         f"reduction='batchmean', got reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"{op}: normalizer must hold one real number (e.g. the accumulated batch's count of "
                             f"valid targets), got a {normalizer.dtype} tensor of shape {tuple(normalizer.shape)}")
        if normalizer.requires_grad:
            raise ValueError(f"{op}: normalizer requires grad, but the loss is not differentiated with respect to it; "
                             "pass normalizer.detach()")
        if normalizer.device != student.device and normalizer.device.type != "cpu":
            raise ValueError(f"{op}: normalizer is on {normalizer.device} but {student_name} on {student.device}; "
                             "move it there (or pass a number)")
        return normalizer.reshape(())
    symbolic = isinstance(normalizer, (torch.SymInt, torch.SymFloat))  # (its value is checked when it is known)
    if not is_real(normalizer) or not (symbolic or (normalizer > 0 and math.isfinite(normalizer))):
        raise ValueError(f"{op}: normalizer must be a finite number > 0 or a one-number tensor, got {normalizer!r}")
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64) * normalizer
    return torch.tensor(float(normalizer), dtype=torch.float64)


def check_flag(op: str, name: str, x) -> None:
    """A switch argument (e.g. ``return_terms``): True or False, not a truthy stand-in."""
    if not isinstance(x, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {x!r}")


def as_int(x):
    """A checked integer as the op's ``int`` argument; a symbolic one stays symbolic."""
    return x if isinstance(x, torch.SymInt) else int(x)


def values_on_host(x: torch.Tensor) -> bool:
    """Whether a check of ``x``'s values is free of device syncs and possible: a CPU tensor, with concrete values
    (not under torch.compile or a torch.func transform)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not _functorch_active()


def _functorch_active() -> bool:
    # torch.func transforms (grad, vmap, jacrev, ...) wrap their inputs; the fused ops' saved gradient and
    # in-place scaling are invisible to them.
    try:
        return torch._C._are_functorch_transforms_active()
    except AttributeError:  # a torch without functorch's C hooks has no transforms either
        return False


def use_reference_maths(*logits: torch.Tensor) -> bool:
    """Whether a KD loss runs its reference maths (autograd through torch ops) instead of the fused op:
    for float64 logits (the checking dtype: gradcheck, any-order derivatives, no rounding to fp32) and
    under torch.func transforms, which a fused op's precomputed gradient cannot serve."""
    return any(x.dtype == torch.float64 for x in logits) or _functorch_active()
