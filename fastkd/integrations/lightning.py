"""``fastkd.integrations.lightning``: distillation as a ``lightning.LightningModule``.

``DistillationModule(student, teacher, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4), temperature=2.0,
hard_weight=0.5)`` trains ``student`` on ``fastkd.kd_loss`` against ``teacher`` with a plain
``lightning.Trainer`` (``accumulate_grad_batches``, ``gradient_clip_val``, DDP, precision plugins as usual):

- **The teacher stays out of the module**: it is not a submodule, so it is in no ``state_dict``, no
  checkpoint, no optimizer and no DDP wrapper; it is moved to the module's device when fitting starts,
  frozen (eval mode, no gradients) and run under ``no_grad``.
- **Token-weighted gradient accumulation**: a micro-batch's loss is ``kd_loss(..., reduction="sum")``;
  Lightning divides it by ``accumulate_grad_batches``, and before the optimizer step the gradients are
  multiplied by ``accumulate_grad_batches * world_size / N``, N the valid targets of the whole window
  summed over the ranks (one ``all_reduce``). The update is that of one batch of the window's size,
  however the padding falls (the last, shorter window of an epoch included).
- **Clipping** through ``fastkd.clip_grad_norm_`` (``gradient_clip_val``, the "norm" algorithm; without
  it the norm is measured only), the norm logged as ``grad_norm`` on every step.
- ``causal=True`` shifts the labels (``fastkd.shift_labels``: position i predicts label i + 1) without
  slicing the logits.

Batches are those of ``fastkd.Distiller``: ``(inputs, labels)``, a dict with ``labels`` and the model's
keyword inputs, ...; a model's output is its logits, an object with ``.logits`` or a tuple starting with them.
"""

from __future__ import annotations

import math

import lightning
import torch
import torch.distributed as dist

from ..ops._args import check_loss_options
from ..ops.clip import clip_grad_norm_
from ..ops.kd import kd_loss
from ..ops.labels import shift_labels
from ..train.batches import logits_of, split_batch

__all__ = ["DistillationModule"]


class DistillationModule(lightning.LightningModule):
    """Distil ``teacher`` into ``student`` under a ``lightning.Trainer`` (see the module's docstring).

    Args:
        student, teacher: ``nn.Module``s with the same output shape (the teacher is kept outside the module).
        optimizer: ``f(parameters) -> torch.optim.Optimizer`` (or override ``configure_optimizers``).
        temperature, divergence, beta, soft_weight, hard_weight, ignore_index: as in ``fastkd.kd_loss``.
        causal: shift the labels for a causal LM.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, *, optimizer=None, temperature: float = 1.0,
                 divergence: str = "kl", beta: float = 0.5, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 ignore_index: int = -100, causal: bool = False):
        for name, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"DistillationModule: {name} must be an nn.Module, got {type(m).__name__}")
        check_loss_options("DistillationModule", temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                           "sum")
        super().__init__()
        self.student = student
        # Not a submodule: out of state_dict, checkpoints, optimizers and the DDP wrapper.
        object.__setattr__(self, "_teacher", teacher.eval().requires_grad_(False))
        self.optimizer_factory = optimizer
        self.kd_options = {"temperature": temperature, "divergence": divergence, "beta": beta,
                           "soft_weight": soft_weight, "hard_weight": hard_weight, "ignore_index": ignore_index}
        self.causal = causal
        self._window_targets: torch.Tensor | None = None  # valid targets of the micro-batches since the last step

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher

    # ---- set-up ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("DistillationModule: give optimizer=lambda params: torch.optim.AdamW(params, lr=...) or "
                             "override configure_optimizers")
        return self.optimizer_factory(self.student.parameters())

    def on_fit_start(self) -> None:
        self._teacher.to(self.device).eval()

    def on_validation_start(self) -> None:
        self._teacher.to(self.device).eval()

    # ---- the loss --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)

    def _sum_and_targets(self, batch):
        args, kwargs, labels = split_batch(batch)
        s = logits_of(self.student(*args, **kwargs))
        with torch.no_grad():
            t = logits_of(self._teacher(*args, **kwargs))
        if t.shape != s.shape:
            raise ValueError(f"DistillationModule: teacher output {tuple(t.shape)} and student output {tuple(s.shape)} "
                             "differ; both must be (N, classes) or (batch, seq, vocab) with the same vocabulary")
        if labels is not None and self.causal:
            labels = shift_labels(labels, self.kd_options["ignore_index"])
        loss = kd_loss(s, t, labels, reduction="sum", **self.kd_options)
        n = (labels != self.kd_options["ignore_index"]).sum() if labels is not None else \
            torch.tensor(s.shape[:-1].numel(), device=s.device)
        return loss, n

    def training_step(self, batch, batch_idx):
        loss, n = self._sum_and_targets(batch)
        self._window_targets = n if self._window_targets is None else self._window_targets + n
        self.log("train_loss", loss.detach() / n.clamp_min(1), prog_bar=True)
        return loss  # a sum: on_before_optimizer_step turns the window's gradients into a per-target mean

    def validation_step(self, batch, batch_idx):
        loss, n = self._sum_and_targets(batch)
        count = int(n)  # (host sync: per validation batch only) the weight of this batch in the epoch's mean
        self.log("val_loss", loss / max(count, 1), batch_size=max(count, 1), sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """The window's gradients (Lightning divided each micro-batch's sum by accumulate_grad_batches; DDP
        averaged over the ranks) -> the sum over the window's valid targets on all ranks divided by their count."""
        n = self._window_targets.to(torch.float64) if self._window_targets is not None else None
        self._window_targets = None
        if n is None:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(n)
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            factor = (self.trainer.accumulate_grad_batches * world / n.clamp_min(1)).to(grads[0].dtype)
            torch._foreach_mul_(grads, factor)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"DistillationModule: gradient_clip_algorithm={gradient_clip_algorithm!r}: fastkd clips by "
                             "the global norm; use gradient_clip_algorithm='norm' (or override configure_gradient_clipping)")
        norm = clip_grad_norm_(self.student.parameters(), gradient_clip_val if gradient_clip_val else math.inf)
        self.log("grad_norm", norm)
