"""``fastkd.integrations.transformers``: distillation inside a Hugging Face ``transformers.Trainer``.

``DistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=..., temperature=2.0,
hard_weight=0.5)`` is a ``Trainer`` whose loss is ``fastkd.kd_loss`` of the student's and the teacher's
logits, with what the obvious hand-written versions get wrong done right:

- **Normalisation.** The loss of a micro-batch is ``kd_loss(..., normalizer=num_items_in_batch)``
  (``fused_linear_kd_loss``'s with ``fused_linear=True``; the sum divided by it, the division inside the fused
  gradients: no extra pass in the backward):
  the valid targets of the whole accumulated batch (all micro-batches of the optimizer step; summed over
  the ranks with ``average_tokens_across_devices``, and then multiplied by the number of processes, since
  DDP averages the gradients). The Trainer counts them only for models that take loss kwargs; this
  trainer always does, so K micro-batches give the update of one batch K times the size whatever the
  padding, for every model. The loss is marked as already scaled for gradient accumulation.
- **Causal shift.** For a causal LM (a class of ``AutoModelForCausalLM``) the targets are
  ``fastkd.shift_labels(labels)``: the logits are read whole (no ``logits[:, :-1]`` slice), and the
  last position counts nowhere. A batch with ``shift_labels`` (padding-free collators) uses them as given.
- **The teacher** is moved to the Trainer's device, frozen (eval mode, no gradients), run under
  ``no_grad`` and the accelerator's autocast, never wrapped for DDP and never saved: it is not the
  Trainer's model. The student runs through the Trainer's (possibly DDP-wrapped) model.
- **Clipping** goes through ``fastkd.clip_grad_norm_`` (no host sync in the clip itself), unscaled first
  under fp16, for single-process and DDP runs (FSDP, DeepSpeed and mixed device meshes keep the Trainer's
  own). A step whose gradient norm is not finite is skipped (no optimizer or LR-scheduler step) and counted
  (``kd_skipped_steps`` in the logs); under fp16 the GradScaler does that already.
- **Logs**: on logging steps, the soft (T²-scaled divergence) and hard (cross-entropy) terms per valid
  target (``kd_soft``, ``kd_hard``), from the loss's own kernel pass (``return_terms=True``).
- **Fused heads** (``fused_linear=True``): the loss is ``fastkd.fused_linear_kd_loss`` of both models'
  last hidden states and output heads, so neither model's (tokens x vocabulary) logits exist; the models
  run with ``output_hidden_states=True`` and an empty ``logits_to_keep`` (through the DDP wrapper, so that
  the gradients are all-reduced). A head's known post-processing is applied as the model does it
  (``final_logit_softcapping``: Gemma 2/3; ``logit_scale``: Cohere; ``logits_scaling``: Granite); the
  first batch checks that the fused head reproduces each model's own logits, and a model whose head does
  something else is an error there, never a silently different objective.
- **Offline**: ``teacher_cache=fastkd.TeacherCache(...)`` (built over the same train dataset) instead of
  ``teacher_model``: each example gets its cached top-k (two extra keys, kept through the Trainer's column
  removal), the loss is ``fastkd.topk_kd_loss`` and no teacher runs; ``eval_teacher_cache`` does the same
  for the evaluation set.

The logits path distils a model with its real objective whatever its head does (softcapping, logit
scales): the logits are the model's own.
"""

from __future__ import annotations

import math

import torch
import transformers

from ..ops._args import check_loss_options
from ..ops.clip import clip_grad_norm_
from ..ops.fused_linear import fused_linear_kd_loss
from ..ops.kd import kd_loss
from ..ops.labels import shift_labels
from ..ops.topk import topk_kd_loss
from ..reference.topk import check_topk_divergence

__all__ = ["DistillationTrainer"]

# Distributed set-ups whose gradients fastkd.clip_grad_norm_ clips as the Trainer would (whole local grads).
_FASTKD_CLIPPED = ("NO", "MULTI_CPU", "MULTI_GPU")
# The keys under which an example carries its cached teacher top-k (teacher_cache).
CACHE_KEYS = ("teacher_topk_values", "teacher_topk_indices")


class _WithCache(torch.utils.data.Dataset):
    """A dataset of dict examples, each with its cache entry under CACHE_KEYS."""

    def __init__(self, dataset, cache, what: str):
        if len(dataset) != len(cache):
            raise ValueError(f"DistillationTrainer: {what} has {len(dataset)} examples but its teacher cache "
                             f"{cache.path} holds {len(cache)}: build the cache from this dataset")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise TypeError(f"DistillationTrainer: with a teacher cache the examples must be dicts (input_ids, labels, "
                            f"...), got {type(item).__name__}")
        values, indices = self.cache[i]
        return {**item, CACHE_KEYS[0]: values, CACHE_KEYS[1]: indices}


def _head_transform(model) -> dict:
    """The logits' post-processing of a transformers model's head, as fused_linear_kd_loss's logit_scale and
    softcap: the config attributes transformers' models apply after the LM head."""
    cfg = getattr(model, "config", None)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: softcap * tanh(logits / softcap)
    return {"logit_scale": scale, "softcap": float(softcap) if softcap else None}


def _is_causal_lm(model) -> bool:
    """A causal LM (its loss predicts token i + 1 at position i): a model of transformers' causal-LM
    classes or whose loss type shifts labels, and not an encoder-decoder (its labels are already aligned)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    model = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return (type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            or LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss)


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` with ``fastkd.kd_loss``.

    Args (besides the Trainer's own):
        teacher_model: the teacher (any module returning logits, ``.logits`` or a tuple starting with them),
            with the student's vocabulary.
        fused_linear: the heads fused into the loss (``fastkd.fused_linear_kd_loss``; online teachers only).
        teacher_cache, eval_teacher_cache: instead of teacher_model, ``fastkd.TeacherCache``s built over
            train_dataset and eval_dataset (offline: ``fastkd.topk_kd_loss``, no teacher runs; divergence
            "kl", or "jsd" with beta < 1).
        temperature, divergence, beta, soft_weight, hard_weight: as in ``fastkd.kd_loss``.
        causal: shift the labels (``fastkd.shift_labels``); None: for transformers' causal LMs (the classes
            of ``AutoModelForCausalLM``, or a loss type that shifts), not for encoder-decoders.
        ignore_index: the label of positions that count nowhere (the Trainer's -100 by default).
    """

    loss_is_scaled_for_ga = True  # normalised by the accumulated batch's valid targets (num_items_in_batch)

    def __init__(self, *args, teacher_model: torch.nn.Module | None = None, teacher_cache=None, eval_teacher_cache=None,
                 temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, causal: bool | None = None, ignore_index: int = -100,
                 fused_linear: bool = False, **kwargs):
        if (teacher_model is None) == (teacher_cache is None):
            raise ValueError("DistillationTrainer: give teacher_model (online) or teacher_cache (offline), not both "
                             "and not neither")
        if teacher_model is not None and not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"DistillationTrainer: teacher_model must be an nn.Module, got {type(teacher_model).__name__}")
        check_loss_options("DistillationTrainer", temperature, divergence, beta, soft_weight, hard_weight, ignore_index,
                           "sum")  # bad options fail here, not at the first step
        if fused_linear and teacher_cache is not None:
            raise ValueError("DistillationTrainer: fused_linear=True fuses the teacher's head too: it needs teacher_model "
                             "(online), not a teacher_cache")
        if teacher_cache is not None:
            check_topk_divergence("DistillationTrainer", divergence, beta)
            for what in ("train_dataset", "eval_dataset"):
                cache = teacher_cache if what == "train_dataset" else eval_teacher_cache
                if kwargs.get(what) is not None:
                    if cache is None:
                        raise ValueError("DistillationTrainer: with teacher_cache, an eval_dataset needs its own "
                                         "eval_teacher_cache (built over it)")
                    kwargs[what] = _WithCache(kwargs[what], cache, what)
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("DistillationTrainer: torch.nn.DataParallel (n_gpu > 1 in one process) is not supported: "
                             "launch one process per GPU (torchrun / accelerate launch) for DDP")
        self.teacher_model = (teacher_model.to(self.args.device).eval().requires_grad_(False)
                              if teacher_model is not None else None)
        self.teacher_cache = teacher_cache
        self.fused_linear = bool(fused_linear)
        self._heads_checked = False
        self.kd_options = {"temperature": temperature, "divergence": divergence, "beta": beta,
                           "soft_weight": soft_weight, "hard_weight": hard_weight, "ignore_index": ignore_index}
        self.causal = _is_causal_lm(self.model) if causal is None else bool(causal)
        self.skipped_steps = 0
        self._terms = None  # device sums [soft, hard, targets] since the last log

    # ---- the loss ------------------------------------------------------------------------------------------
    def _targets(self, inputs: dict) -> torch.Tensor:
        if "shift_labels" in inputs:
            return inputs["shift_labels"]
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer: the batch has no labels; give labels (for a causal LM, labels = "
                             "input_ids with -100 on padding: DataCollatorForLanguageModeling(tokenizer, mlm=False) "
                             "makes them)")
        return shift_labels(labels, self.kd_options["ignore_index"]) if self.causal else labels

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The valid targets of the accumulated batch (summed over the ranks with
        average_tokens_across_devices), for every model (the Trainer counts them only for some)."""
        counts = [self._targets(b).ne(self.kd_options["ignore_index"]).sum() for b in batch_samples
                  if "labels" in b or "shift_labels" in b]
        if not counts:
            return None
        n = torch.stack(counts).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [k for k in CACHE_KEYS if k not in self._signature_columns]  # kept for the loss

    def _teacher_target(self, inputs: dict, model_inputs: dict, student: torch.Tensor):
        """The teacher's logits (online), or the batch's cached (values, indices) shaped like the logits."""
        if self.teacher_model is None:
            if CACHE_KEYS[0] not in inputs:
                raise ValueError("DistillationTrainer: a batch without its cached teacher top-k; with teacher_cache the "
                                 "datasets are given to the Trainer at construction (train_dataset, and eval_dataset "
                                 "with eval_teacher_cache)")
            values, indices = inputs[CACHE_KEYS[0]], inputs[CACHE_KEYS[1]]
            if values.numel() != student.shape[:-1].numel() * values.shape[-1]:
                raise ValueError(f"DistillationTrainer: the cached top-k covers {values.numel() // values.shape[-1]} "
                                 f"positions but the student's logits {tuple(student.shape)} have "
                                 f"{student.shape[:-1].numel()}: the cache was built from other examples")
            return values.reshape(*student.shape[:-1], -1), indices.reshape(*student.shape[:-1], -1)
        with torch.no_grad(), self.accelerator.autocast():
            out = self.teacher_model(**model_inputs)
        teacher = out.logits if hasattr(out, "logits") else out[0]
        if teacher.shape != student.shape:
            raise ValueError(f"DistillationTrainer: teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student.shape)} differ; the models must share the vocabulary (slice a padded "
                             "teacher head to the student's: teacher.lm_head.weight[:V])")
        return teacher

    def _loss(self, student, teacher, targets, **overrides) -> torch.Tensor:
        opts = {**self.kd_options, "reduction": "sum", **overrides}
        if isinstance(teacher, tuple):
            return topk_kd_loss(student, teacher[0], teacher[1], targets, **opts)
        return kd_loss(student, teacher, targets, **opts)

    def _heads(self, model, model_inputs: dict):
        """The fused path's inputs: each model's last hidden states, output head and head transform."""
        student = self.accelerator.unwrap_model(model)
        keep = {"output_hidden_states": True, "logits_to_keep": torch.zeros(0, dtype=torch.long, device=self.args.device)}
        try:
            out = model(**model_inputs, **keep)  # through the (DDP-wrapped) model: its gradients are reduced
            with torch.no_grad(), self.accelerator.autocast():
                t_out = self.teacher_model(**model_inputs, **keep)
        except TypeError as exc:
            raise ValueError(f"DistillationTrainer(fused_linear=True): the models must take output_hidden_states and "
                             f"logits_to_keep (transformers' causal LMs do): {exc}; use fused_linear=False") from exc
        sides = []
        for m, o in ((student, out), (self.teacher_model, t_out)):
            head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
            if not isinstance(head, torch.nn.Linear):
                kind = f"{type(head).__module__}.{type(head).__qualname__}"
                raise ValueError(f"DistillationTrainer(fused_linear=True): {type(m).__name__}'s output head "
                                 f"(get_output_embeddings) is {kind}, not an nn.Linear (an adapter on the head, e.g. "
                                 "LoRA on lm_head, makes it another layer); use fused_linear=False")
            if not getattr(o, "hidden_states", None):
                raise ValueError(f"DistillationTrainer(fused_linear=True): {type(m).__name__} returns no hidden "
                                 "states; use fused_linear=False")
            sides.append((o.hidden_states[-1], head, _head_transform(m)))
        if sides[0][2] != sides[1][2]:
            raise ValueError(f"DistillationTrainer(fused_linear=True): the student's head transform {sides[0][2]} and the "
                             f"teacher's {sides[1][2]} differ, and the fused loss applies one to both; use "
                             "fused_linear=False")
        if not self._heads_checked:
            self._check_heads(((student, *sides[0][1:]), (self.teacher_model, *sides[1][1:])), model_inputs)
        return out, sides

    def _check_heads(self, sides, model_inputs: dict) -> None:
        """Once: on the first example, each model's own logits against its fused head's, so that a head the
        fused loss would compute differently is an error, not another objective."""
        one = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in model_inputs.items()}
        with torch.no_grad(), self.accelerator.autocast():
            for m, head, transform in sides:
                o = m(**one, output_hidden_states=True)
                z = head(o.hidden_states[-1]).float() * transform["logit_scale"]
                if transform["softcap"]:
                    z = transform["softcap"] * torch.tanh(z / transform["softcap"])
                ref = o.logits.float()
                if not torch.allclose(z, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max().clamp_min(1.0))):
                    raise ValueError(f"DistillationTrainer(fused_linear=True): {type(m).__name__}'s logits are not its "
                                     f"output head's with {transform} (its head post-processes them in a way fastkd "
                                     "does not know); use fused_linear=False")
        self._heads_checked = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = self._targets(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", *CACHE_KEYS)}
        if num_items_in_batch is None:  # (no labels in the batch: refused above) the micro-batch's own targets
            num_items_in_batch = targets.ne(self.kd_options["ignore_index"]).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # The count is over all ranks and DDP averages the gradients: the per-rank divisor is count / ranks.
            num_items_in_batch = num_items_in_batch / self.accelerator.num_processes
        # On both paths the division is part of the fused gradients (no scaling pass in the backward), and a
        # logging step's soft and hard terms come from the loss's own pass.
        log_terms = model.training and self._logging_step()
        if self.fused_linear:
            outputs, ((hs, head, transform), (ht, t_head, _)) = self._heads(model, model_inputs)
            loss = fused_linear_kd_loss(hs, head.weight, ht, t_head.weight, targets, student_bias=head.bias,
                                        teacher_bias=t_head.bias, reduction="batchmean", normalizer=num_items_in_batch,
                                        return_terms=log_terms, **transform, **self.kd_options)
        else:
            outputs = model(**model_inputs)  # the student through the Trainer's (DDP-wrapped) model
            student = outputs.logits if hasattr(outputs, "logits") else outputs[0]
            teacher = self._teacher_target(inputs, model_inputs, student)
            loss = self._loss(student, teacher, targets, reduction="batchmean", normalizer=num_items_in_batch,
                              return_terms=log_terms)
        if log_terms:
            loss, terms = loss
            self._add_terms(terms, num_items_in_batch, targets)
        return (loss, outputs) if return_outputs else loss

    def _logging_step(self) -> bool:
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        steps = self.args.logging_steps
        return self.args.logging_strategy == "steps" and (step % max(int(steps), 1) == 0 or
                                                         (step == 1 and self.args.logging_first_step))

    def _add_terms(self, terms, normalizer, targets) -> None:
        # The loss's terms are sums / normalizer: back to sums, beside this micro-batch's valid targets.
        sums = torch.stack([terms.soft, terms.hard]).double() * normalizer
        n = targets.ne(self.kd_options["ignore_index"]).sum().double().reshape(1)
        terms = torch.cat([sums, n.to(sums.device)])
        self._terms = terms if self._terms is None else self._terms + terms

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log row
            logs["kd_skipped_steps"] = self.skipped_steps
            if self._terms is not None:
                soft, hard, n = self._terms.tolist()
                logs["kd_soft"], logs["kd_hard"] = soft / max(n, 1.0), hard / max(n, 1.0)
                self._terms = None
        super().log(logs, *args, **kwargs)

    # ---- clipping and non-finite steps -------------------------------------------------------------------
    def _fastkd_clips(self, model) -> bool:
        return (self.accelerator.distributed_type.name in _FASTKD_CLIPPED and not self._has_mixed_mesh_grads(model))

    def _clip_grad_norm(self, model):
        if not self._fastkd_clips(model):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self._fastkd_clips(model):
            self.accelerator.unscale_gradients()
            grad_norm = clip_grad_norm_(model.parameters(), math.inf)  # measure only
        if self._fastkd_clips(model):
            self._skip_step_if_nonfinite(grad_norm)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _skip_step_if_nonfinite(self, norm) -> None:
        """A non-finite norm (the step's one host sync): the optimizer's next step does nothing, and accelerate
        is told it was skipped so that the LR scheduler does not step either. Under fp16 the GradScaler
        already skips such steps."""
        opt = self.optimizer
        if self.accelerator.scaler is not None or not isinstance(norm, torch.Tensor):
            return
        if hasattr(opt, "_is_overflow"):
            opt._is_overflow = False  # (accelerate never resets it without a scaler)
        if bool(torch.isfinite(norm)):
            return
        self.skipped_steps += 1

        def skipped(*args, **kwargs):
            del opt.step  # back to the class's step
            if hasattr(opt, "_is_overflow"):
                opt._is_overflow = True

        opt.step = skipped
