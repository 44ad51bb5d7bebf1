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
- :class:`DistillationLossMixin` put before TRL's on-policy ``trl.DistillationTrainer`` in a subclass
  (``class FastDistill(DistillationLossMixin, DistillationTrainer)``) computes that trainer's loss with one
  ``fastkd.kd_loss`` call. TRL's conventions, kept exactly: ``args.beta`` 0 is the forward KL(teacher ||
  student), 1 the reverse KL(student || teacher), between them the generalised JSD with the mixture
  ``beta * p_teacher + (1 - beta) * p_student``; ``args.temperature`` divides both models' logits and there
  is no T² factor; the positions are the completion's (``completion_mask``, times ``tool_mask`` in
  multi-turn tool use); the sum is divided by ``num_items_in_batch`` (TRL's count over the generated
  completions of the accumulated batch, over all ranks, divided by the number of processes) in training, by
  the micro-batch's own valid positions (at least 1) in evaluation: ``kd_loss``'s ``normalizer``, the
  division inside the fused gradient. The student's mean entropy (TRL's ``entropy`` metric, at the
  temperature) is logged as TRL logs it.
  TRL's own loss projects hidden states through both heads chunk by chunk; the mixin takes each model's
  logits over the completion (and the prompt's last position), ``logits_to_keep`` positions as TRL asks of
  the models, and reads them in place with the labels shifted (no slices, no (tokens x V) temporaries in the
  loss). The logits are the models' own, so a head's post-processing (Gemma's softcapping, Cohere's and
  Granite's logit scales) is the model's. Options fastkd cannot compute exactly are errors at the first
  loss, never a different objective: a temperature outside ``[0.05, 100]``, logits of different shapes.
  With ``fastkd_fused_linear = True`` the loss is ``fastkd.fused_linear_kd_loss`` on TRL's own hidden
  states and both heads instead: no logits at all, as in TRL (see the class's docstring).
"""

from __future__ import annotations

import torch

from ..ops._args import check_loss_options
from ..ops.clip import _is_dtensor  # (never imports torch.distributed.tensor itself)
from ..ops.fused_linear import fused_linear_kd_loss
from ..ops.kd import kd_loss
from ..ops.labels import shift_labels

__all__ = ["generalized_jsd_loss", "GKDLossMixin", "DistillationLossMixin"]

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


# The extra model inputs of vision-language batches that trl.DistillationTrainer passes on to both models.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


class DistillationLossMixin:
    """Before ``trl.DistillationTrainer`` in a subclass: its distillation loss on ``fastkd.kd_loss`` (see the
    module's docstring); generation, batching, ``num_items_in_batch``, metrics and everything else stay TRL's
    (``class FastDistill(DistillationLossMixin, DistillationTrainer): pass``).

    It replaces ``DistillationTrainer._compute_loss(unwrapped_student, inputs, num_items_in_batch)``, which
    TRL's ``compute_loss`` calls through the student's DDP/FSDP wrapper and which returns the loss, the
    student's entropy summed over the valid positions and their count.

    ``fastkd_fused_linear = True`` (a class attribute of the subclass) computes the loss with
    ``fastkd.fused_linear_kd_loss`` on the hidden states TRL's own ``_get_last_hidden_state`` returns and both
    models' output heads, as TRL's loss does: neither model's logits exist. The heads' post-processing is
    the one TRL reads from the configs (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
    ``logits_scaling``, ``final_logit_softcapping``); fastkd applies one to both models, so a student and a
    teacher whose post-processing differs, and a scale fastkd refuses (not > 0), are errors; FSDP2-sharded
    (DTensor) heads too. There are no logits to take the entropy of: the entropy returned is NaN, which
    TRL's metrics leave out (``entropy`` is logged as None)."""

    fastkd_fused_linear = False

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        name = f"{type(self).__name__} (fastkd.integrations.trl.DistillationLossMixin)"
        temperature, beta = self.temperature, self.beta
        check_loss_options(name, temperature, "jsd", beta, 1.0, 0.0, IGNORE, "batchmean")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn tool use: the tools' tokens are not the student's to learn
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = completion_ids.size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        if self.fastkd_fused_linear:
            return self._fastkd_fused_loss(name, unwrapped_student, input_ids, attention_mask, completion_ids,
                                           loss_mask, multimodal, num_items_in_batch)

        student = self._fastkd_logits(unwrapped_student, input_ids, attention_mask, keep, **multimodal)
        _, teacher = self._fastkd_teacher(self._fastkd_logits, input_ids, attention_mask, keep, **multimodal)
        teacher = teacher.to(student.device)
        if teacher.shape != student.shape:
            raise ValueError(f"{name}: the teacher's logits {tuple(teacher.shape)} and the student's "
                             f"{tuple(student.shape)} differ; the models must share the vocabulary")

        # HF-convention labels over the logits' positions (label i is token i; the prompt's and the masked
        # completion tokens are ignored), shifted: position i is distilled where it predicts a kept token.
        tokens = torch.cat([torch.full_like(prompt_ids, IGNORE), completion_ids.masked_fill(loss_mask == 0, IGNORE)],
                           dim=1)
        labels = shift_labels(tokens[:, -student.size(1):].to(student.device), IGNORE)
        valid = labels != IGNORE
        n_valid = valid.sum()
        # fastkd's soft term is T^2 * D: a soft weight of 1 / T^2 gives TRL's D, exactly scaled.
        loss = kd_loss(student, teacher, labels, temperature=temperature, divergence="jsd", beta=beta,
                       soft_weight=1.0 / (temperature * temperature), ignore_index=IGNORE, reduction="batchmean",
                       normalizer=_normalizer(num_items_in_batch, n_valid))
        return loss, _entropy_sum(student.detach(), valid, temperature), n_valid

    def _fastkd_fused_loss(self, name, unwrapped_student, input_ids, attention_mask, completion_ids, loss_mask,
                           multimodal, num_items_in_batch):
        """fastkd_fused_linear: the loss from both models' hidden states (TRL's own _get_last_hidden_state:
        (B, K, H), aligned with the completion tokens) and heads, no logits."""
        keep = completion_ids.size(1)
        hs = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **multimodal)
        unwrapped_teacher, ht = self._fastkd_teacher(self._get_last_hidden_state, input_ids, attention_mask, keep,
                                                     **multimodal)
        s_head, t_head = unwrapped_student.get_output_embeddings(), unwrapped_teacher.get_output_embeddings()
        for who, head in (("student", s_head), ("teacher", t_head)):
            if not isinstance(head, torch.nn.Linear):
                raise ValueError(f"{name}: fastkd_fused_linear needs nn.Linear output heads, the {who}'s is "
                                 f"{type(head).__name__}; use fastkd_fused_linear = False")
            if _is_dtensor(head.weight):
                raise ValueError(f"{name}: fastkd_fused_linear does not take sharded (FSDP2 DTensor) heads; use "
                                 "fastkd_fused_linear = False")
        transform = _trl_head_transform(unwrapped_student)
        if _trl_head_transform(unwrapped_teacher) != transform:
            raise ValueError(f"{name}: the student's head post-processing {transform} and the teacher's "
                             f"{_trl_head_transform(unwrapped_teacher)} differ, and fastkd_fused_linear applies one "
                             "to both models; use fastkd_fused_linear = False")
        device = s_head.weight.device
        labels = completion_ids.to(device).masked_fill(loss_mask.to(device) == 0, IGNORE)  # aligned: no shift
        n_valid = (labels != IGNORE).sum()
        temperature = self.temperature
        loss = fused_linear_kd_loss(hs.to(device), s_head.weight, ht.to(device), t_head.weight, labels,
                                    student_bias=s_head.bias, teacher_bias=t_head.bias, temperature=temperature,
                                    divergence="jsd", beta=self.beta, soft_weight=1.0 / (temperature * temperature),
                                    ignore_index=IGNORE, reduction="batchmean",
                                    normalizer=_normalizer(num_items_in_batch, n_valid), **transform)
        return loss, torch.full((), float("nan"), device=device), n_valid

    def _fastkd_teacher(self, fn, *args, **kwargs):
        """(the unwrapped teacher, ``fn(unwrapped_teacher, *args, **kwargs)``): in eval mode, under no_grad,
        through the teacher's own wrapper as TRL runs it (FSDP/DeepSpeed gather its shards in forward)."""
        self.teacher_model.eval()
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            return unwrapped, self._forward_redirection(self.teacher_model, unwrapped, fn, unwrapped, *args, **kwargs)

    def _fastkd_logits(self, model, input_ids, attention_mask, keep: int, **multimodal) -> torch.Tensor:
        """A model's own logits for the positions that predict the ``keep`` completion tokens, and the last
        one (which predicts nothing): ``logits_to_keep = keep + 1`` where the model takes it (as TRL asks),
        else the whole sequence (the labels then ignore the prompt: nothing is sliced or copied)."""
        from accelerate.utils import is_peft_model  # noqa: PLC0415 (trl's dependency: imported with the trainer)

        if is_peft_model(model):  # the adapted transformers model, as TRL takes it
            model = model.base_model.model
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **multimodal}
        if "logits_to_keep" in self.model_kwarg_keys:
            kwargs["logits_to_keep"] = keep + 1
        # The model's forward itself, as TRL runs its backbone: this runs inside the model's (redirected)
        # wrapper call, and under mixed precision accelerate's prepare wraps ``forward`` in autocast, which
        # TRL's loss path never enters (its models run in their own dtype): the unwrapped forward is kept in
        # ``_original_forward``.
        out = getattr(model, "_original_forward", model.forward)(**kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


def _normalizer(num_items_in_batch, n_valid: torch.Tensor):
    """TRL's divisor: num_items_in_batch as its compute_loss passes it (training), else the micro-batch's valid
    positions, at least one (evaluation)."""
    if num_items_in_batch is None:
        return n_valid.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.detach().to(n_valid.device)
    return num_items_in_batch


def _trl_head_transform(model) -> dict:
    """The head post-processing trl.DistillationTrainer._compute_loss reads from a model's config, as
    fused_linear_kd_loss's logit_scale and softcap (the same attributes, in the same order of precedence)."""
    cfg = model.config.get_text_config()
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X multiplies by it.
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": None if softcap is None else float(softcap)}


def _entropy_sum(logits: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """The entropy of softmax(logits / T) summed over the valid positions (TRL's ``entropy`` metric before its
    mean), without gradients, in row chunks whose fp32 temporaries are ~16 MiB each (never (tokens x V))."""
    vocab = logits.size(-1)
    rows = logits.reshape(-1, vocab)  # a view of the models' contiguous logits
    keep = valid.reshape(-1)
    step = max(1, (1 << 22) // vocab)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(0, rows.size(0), step):
            lp = torch.log_softmax(rows[i:i + step].float() / temperature, dim=-1)
            p = lp.exp()
            h = -torch.where(p > 0, p * lp, 0.0).sum(-1)
            total += h.masked_fill(~keep[i:i + step], 0.0).sum()
    return total
