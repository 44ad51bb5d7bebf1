"""``fastkd.integrations.trl``: TRL's generalised JSD distillation loss on fastkd's kernels.

- :func:`generalized_jsd_loss` takes the arguments of TRL's ``GKDTrainer.generalized_jsd_loss`` and
  returns the same values with TRL's conventions: no T² factor (the logits are divided by the temperature
  and that is all), ``beta`` 0 forward KL and 1 reverse KL, positions with label -100 masked, and its
  reductions: ``"batchmean"`` the sum over the kept positions divided by their count (by the first
  dimension of the logits without labels), ``"sum"``, ``"mean"`` (over every kept *element*, positions x
  vocabulary), ``"none"`` (the element-wise divergence of the kept positions, ``[kept, V]``), and
  ``num_items_in_batch`` (the sum divided by it, for gradient accumulation) before any of them.
  Everything but ``"none"`` is one call of ``fastkd.kd_loss`` (fused, no (tokens x V) temporaries);
  ``"none"`` is element-wise by definition and computed in plain PyTorch.
- :class:`GKDLossMixin` put before ``GKDTrainer`` in a subclass (``class MyGKD(GKDLossMixin, GKDTrainer)``)
  computes GKDTrainer's training loss with it, and without slicing the logits: fastkd reads a
  ``logits[:, :-1]`` view in place, but the slice's backward allocates a zero-filled (B, S, V) gradient; the
  mixin passes the whole logits with the labels shifted instead (``fastkd.shift_labels``), the same loss.
"""

from __future__ import annotations

import torch

from ..ops._args import check_loss_options
from ..ops.kd import kd_loss
from ..ops.labels import shift_labels

__all__ = ["generalized_jsd_loss", "GKDLossMixin"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE = -100  # TRL's padding label


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
    reduction, num_items_in_batch)``, on ``fastkd.kd_loss`` (see the module's docstring)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastkd.integrations.trl.generalized_jsd_loss: reduction must be one of {_REDUCTIONS}, got "
                         f"{reduction!r}")
    check_loss_options("fastkd.integrations.trl.generalized_jsd_loss", temperature, "jsd", beta, 1.0, 0.0, IGNORE, "sum")
    if reduction == "none" and num_items_in_batch is None:
        return _elementwise(student_logits, teacher_logits, labels, beta, temperature)
    # fastkd's soft term is T^2 * D: a soft weight of 1 / T^2 gives TRL's D, exactly scaled.
    total = kd_loss(student_logits, teacher_logits, labels, temperature=temperature, divergence="jsd", beta=beta,
                    soft_weight=1.0 / (temperature * temperature), ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    kept = (labels != IGNORE).sum() if labels is not None else None
    if reduction == "batchmean":
        return total / (kept.clamp_min(1) if kept is not None else max(student_logits.shape[0], 1))
    vocab = student_logits.shape[-1]  # "mean": over the kept elements, positions x vocabulary
    return total / (kept * vocab if kept is not None else student_logits.numel())


def _elementwise(s: torch.Tensor, t: torch.Tensor, labels, beta: float, temperature: float) -> torch.Tensor:
    """The divergence's terms per element (TRL's reduction="none"): [kept positions, V], or the logits' shape
    without labels."""
    ls = torch.log_softmax(s.float() / temperature, dim=-1)
    lt = torch.log_softmax(t.float() / temperature, dim=-1)

    def kl_terms(lp, lq):  # p log(p / q) per element, 0 where p == 0
        return torch.where(lp == -torch.inf, 0.0, lp.exp() * (lp - lq))

    if beta == 0.0:
        out = kl_terms(lt, ls)
    elif beta == 1.0:
        out = kl_terms(ls, lt)
    else:
        b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
        lm = torch.logaddexp(lt + torch.log(b), ls + torch.log1p(-b))
        out = beta * kl_terms(lt, lm) + (1.0 - beta) * kl_terms(ls, lm)
    out = out.to(s.dtype)
    return out[labels != IGNORE] if labels is not None else out


class GKDLossMixin:
    """Before ``trl.experimental.gkd.GKDTrainer`` in a subclass: its loss on fastkd's kernels, logits unsliced
    (``class FastGKD(GKDLossMixin, GKDTrainer): pass``; everything else is GKDTrainer's)."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # Position i predicts token i + 1: the labels shifted, the logits whole (no strided copies).
        loss = generalized_jsd_loss(student_outputs.logits, teacher_outputs.logits, shift_labels(inputs["labels"], IGNORE),
                                    beta=self.beta, num_items_in_batch=num_items_in_batch)
        return (loss, student_outputs) if return_outputs else loss
