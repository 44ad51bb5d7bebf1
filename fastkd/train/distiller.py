"""``fastkd.Distiller``: distil any teacher ``nn.Module`` into any student with the fused ops.

The loop in one paragraph: each optimizer step takes a *window* of ``accumulation_steps`` micro-batches
(fewer at the end of an epoch). For each micro-batch the teacher runs frozen (eval mode, ``no_grad``,
autocast) and the student's loss is ``fastkd.kd_loss(..., reduction="sum")``, back-propagated as is
(gradient of a sum: the fused backward needs no rescaling pass). At the end of the window the
gradients are multiplied by ``world_size / N``, N being the number of valid (non-ignored) rows of the
whole window summed over all ranks (one ``all_reduce``; DDP itself averages over ranks, hence the
``world_size``). So K micro-batches on R ranks give the update of one batch K*R times the size,
whatever the padding. Then ``fastkd.clip_grad_norm_`` (its norm is logged), an optional
``fastkd.clip_grad_value_``, and the optimizer and scheduler step -- unless the norm is not finite,
in which case the step is skipped, counted and logged.

Host synchronisation: one per optimizer step (is the gradient norm finite?), plus the log values on
logging steps. Everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .._version import version as _fastkd_version
from ..ops.clip import clip_grad_norm_, clip_grad_value_
from ..ops.kd import DIVERGENCES, kd_loss
from .checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, rng_state, save_atomic, set_rng_state
from .schedules import Schedule, as_schedule

__all__ = ["Distiller", "Callback", "RunDirError", "TrainState", "PRECISIONS"]

log = logging.getLogger("fastkd.train")

PRECISIONS = ("fp32", "bf16", "fp16")
_LOWER_IS_BETTER = ("loss", "ce", "ppl", "perplexity")
TRAIN_FIELDS = ["step", "epoch", "loss", "kd_loss", "ce", "grad_norm", "lr", "temperature", "soft_weight",
                "hard_weight", "rows_per_s", "samples_per_s", "skipped", "time"]
EVAL_FIELDS = ["step", "epoch", "student_acc", "teacher_acc", "agreement", "kd_loss", "ce", "teacher_ce", "rows"]


class RunDirError(RuntimeError):
    """The run folder holds another run (or this run, which should be resumed rather than overwritten)."""


class Callback:
    """Hooks called on every rank; override what you need. Set ``distiller.should_stop = True`` to stop."""

    def on_step_end(self, distiller: "Distiller", logs: dict) -> None:
        """After every optimizer step (``logs``: step, epoch, skipped, and the log values on log steps)."""

    def on_eval_end(self, distiller: "Distiller", metrics: dict) -> None:
        """After every evaluation in ``fit`` (``metrics``: what ``evaluate`` returned, plus step/epoch)."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped ones included: the schedules' clock)
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    skipped: int = 0  # steps skipped for a non-finite gradient norm
    total_steps: int | None = None  # the schedules' length, fixed at the start of the run
    best: float | None = None  # best value of best_metric so far
    best_step: int | None = None
    history: list = field(default_factory=list)  # evaluation metrics per evaluation


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"fastkd.Distiller: the model returned {type(out).__name__}; expected a logits tensor, an "
                    "object with .logits, or a tuple whose first element is the logits")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _split_batch(batch):
    """``(inputs, labels)``, ``{"labels": ..., **inputs}`` or bare inputs -> (args, kwargs, labels)."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            inputs, labels = batch
        elif len(batch) == 1:
            inputs, labels = batch[0], None
        else:
            raise ValueError(f"fastkd.Distiller: a batch tuple must be (inputs, labels) or (inputs,), got {len(batch)} "
                             "elements; pack several inputs as a tuple or dict: ((x1, x2), labels)")
        if isinstance(inputs, dict):
            return (), inputs, labels
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}, labels
        return (inputs,), {}, labels
    return (batch,), {}, None


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


class Distiller:
    """Distil ``teacher`` into ``student`` with ``fastkd.kd_loss``.

    Args:
        teacher: any ``nn.Module`` (frozen here: eval mode, ``requires_grad_(False)``, run under
            ``no_grad``; never wrapped in DDP). ``None`` trains the student on the labels alone through
            the same loop (the no-distillation baseline): the loss is then the cross-entropy.
        student: the ``nn.Module`` to train (wrapped in DDP when ``torch.distributed`` is initialised).
        optimizer: a ``torch.optim.Optimizer`` over the student's parameters, or a factory
            ``f(params) -> Optimizer``.
        scheduler: an LR scheduler stepped once per optimizer step, or a factory ``f(optimizer)``.
        temperature, soft_weight, hard_weight: numbers or schedules (see ``fastkd.schedules``);
        divergence, beta, ignore_index: as in ``fastkd.kd_loss``.
        accumulation_steps: micro-batches per optimizer step (normalised by the window's valid rows).
        max_grad_norm: global-norm clipping (None: measure only); clip_value: value clipping.
        precision: "fp32", "bf16" (autocast on CPU and CUDA) or "fp16" (autocast + GradScaler, CUDA).
        device: where to train (default: the student's device).
        run_dir: folder for metrics.csv, eval.csv, run.json, checkpoints/ (rank 0 writes). None: no files.
        log_every: optimizer steps between log rows. checkpoint_every: optimizer steps between
            checkpoints (None: none mid-epoch). checkpoint_epochs: epochs between end-of-epoch checkpoints
            (the last epoch and a stop always save). eval_every: epochs between evaluations.
        best_metric / best_mode: which evaluation metric selects ``checkpoints/best.pt`` ("max"/"min";
            default from the name: losses and perplexities are minimised).
        callbacks: ``Callback`` objects. progress: tqdm bar (when tqdm is installed).
        tensorboard: also log to TensorBoard when it is installed. config: extra JSON-able facts that
            identify the run (the CLI passes its config); stored in run.json.
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, optimizer, *, scheduler=None,
                 temperature=1.0, divergence: str = "kl", beta: float = 0.5, soft_weight=1.0, hard_weight=0.0,
                 ignore_index: int = -100, accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 clip_value: float | None = None, precision: str = "fp32", device=None,
                 run_dir: str | os.PathLike | None = None, log_every: int = 10, checkpoint_every: int | None = None,
                 eval_every: int = 1, checkpoint_epochs: int = 1, best_metric: str = "student_acc",
                 best_mode: str | None = None,
                 callbacks: Iterable[Callback] = (), progress: bool = True, tensorboard: bool = True,
                 config: dict | None = None):
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        if not isinstance(student, nn.Module):
            raise TypeError(f"fastkd.Distiller: student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"fastkd.Distiller: teacher must be an nn.Module or None, got {type(teacher).__name__}")
        if isinstance(teacher, DDP) or isinstance(student, DDP):
            raise ValueError("fastkd.Distiller: pass the models unwrapped: the student is wrapped in DDP here when "
                             "torch.distributed is initialised, and the teacher never is (it has no gradients)")
        if precision not in PRECISIONS:
            raise ValueError(f"fastkd.Distiller: precision must be one of {PRECISIONS}, got {precision!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"fastkd.Distiller: unknown divergence {divergence!r}; use one of {DIVERGENCES}")
        if int(accumulation_steps) < 1:
            raise ValueError(f"fastkd.Distiller: accumulation_steps must be >= 1, got {accumulation_steps}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"fastkd.Distiller: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"fastkd.Distiller: clip_value must be > 0 or None, got {clip_value}")

        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fastkd.Distiller: precision='fp16' needs CUDA (GradScaler); use precision='bf16' on "
                             f"{self.device.type}")
        self.student = student.to(self.device)
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)

        self.rank = dist.get_rank() if _is_dist() else 0
        self.world_size = dist.get_world_size() if _is_dist() else 1
        self.is_main = self.rank == 0
        if _is_dist() and self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DDP(self.student, device_ids=ids)
        else:
            self.model = self.student

        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        elif callable(optimizer):
            self.optimizer = optimizer(self.student.parameters())
        else:
            raise TypeError("fastkd.Distiller: optimizer must be a torch.optim.Optimizer or a factory f(params)")
        if scheduler is None or hasattr(scheduler, "state_dict") and hasattr(scheduler, "step"):
            self.scheduler = scheduler
        elif callable(scheduler):
            self.scheduler = scheduler(self.optimizer)
        else:
            raise TypeError("fastkd.Distiller: scheduler must be an LR scheduler or a factory f(optimizer)")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("fastkd.Distiller: ReduceLROnPlateau needs a metric; step it from a Callback.on_eval_end")

        self.schedules: dict[str, Schedule] = {
            "temperature": as_schedule(temperature, "temperature"),
            "soft_weight": as_schedule(soft_weight, "soft_weight"),
            "hard_weight": as_schedule(hard_weight, "hard_weight"),
        }
        if teacher is None:  # the labels-only baseline
            self.schedules["soft_weight"] = as_schedule(0.0)
            self.schedules["hard_weight"] = as_schedule(1.0)
        # As given (before the trainer fills in open schedule lengths): part of the run's identity.
        self._schedule_spec = {k: s.describe() for k, s in self.schedules.items()}
        self.divergence, self.beta, self.ignore_index = divergence, float(beta), int(ignore_index)
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm, self.clip_value = max_grad_norm, clip_value
        self.precision = precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_every, self.checkpoint_every, self.eval_every = int(log_every), checkpoint_every, int(eval_every)
        self.checkpoint_epochs = int(checkpoint_epochs)
        self.best_metric = best_metric
        self.best_mode = best_mode or ("min" if any(k in best_metric for k in _LOWER_IS_BETTER) else "max")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"fastkd.Distiller: best_mode must be 'min' or 'max', got {best_mode!r}")
        self.callbacks = list(callbacks)
        self.progress, self.tensorboard = progress, tensorboard
        self.config = _jsonable(config or {})
        self.state = TrainState()
        self.should_stop = False
        self._tb = None
        self._epoch_rng: list | None = None
        self._resume_rng: list | None = None

    # ---- the run's identity ------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What must match for a run folder to hold *this* run (compared on resume and on reuse)."""
        opt = self.optimizer
        return _jsonable({
            "teacher": None if self.teacher is None else type(self.teacher).__qualname__,
            "student": type(self.student).__qualname__,
            "student_parameters": sum(p.numel() for p in self.student.parameters()),
            "optimizer": type(opt).__name__,
            "optimizer_defaults": {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, str, bool))},
            "scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
            "schedules": self._schedule_spec,
            "divergence": self.divergence, "beta": self.beta, "ignore_index": self.ignore_index,
            "accumulation_steps": self.accumulation_steps, "max_grad_norm": self.max_grad_norm,
            "clip_value": self.clip_value, "precision": self.precision, "world_size": self.world_size,
            "config": self.config,
        })

    def _check_run_dir(self, resume) -> None:
        """Rank 0 checks the folder; every rank raises the same error (no rank left waiting in a collective)."""
        error = None
        if self.is_main:
            try:
                self._check_run_dir_local(resume)
            except RunDirError as exc:
                error = str(exc)
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RunDirError(error)

    def _check_run_dir_local(self, resume) -> None:
        if self.run_dir is None:
            if resume is True:
                raise RunDirError("fastkd.Distiller: resume=True needs a run_dir (or pass the checkpoint's path)")
            return
        meta = self.run_dir / "run.json"
        last = self.run_dir / "checkpoints" / "last.pt"
        mine = self.fingerprint()
        if meta.is_file():
            try:
                theirs = json.loads(meta.read_text()).get("fingerprint")
            except (OSError, ValueError) as exc:
                raise RunDirError(f"{meta} is unreadable ({exc}); not touching {self.run_dir}") from exc
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs or {}) if (theirs or {}).get(k) != mine.get(k))
                raise RunDirError(
                    f"run folder {self.run_dir} already holds a different run (differs in: {', '.join(diff)}); "
                    "nothing was overwritten. Choose another run folder, or resume with the run's own settings.")
            if not resume and not last.exists():
                log.warning("fastkd.Distiller: %s holds a run that never saved a checkpoint; starting it afresh",
                            self.run_dir)
                return
            if not resume:
                raise RunDirError(f"run folder {self.run_dir} already holds this run (checkpoint {last}); resume it "
                                  "(Distiller.fit(resume=True), `fastkd resume DIR`) or choose another folder")
        elif resume:
            raise RunDirError(f"{self.run_dir} holds no run to resume (no run.json)")
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise RunDirError(f"run folder {self.run_dir} exists and is not empty (and holds no fastkd run); "
                              "choose a new or empty folder")
        if resume is True and not last.exists():
            raise RunDirError(f"{self.run_dir} holds no checkpoint to resume (no {last})")

    def _write_run_meta(self) -> None:
        if self.run_dir is None or not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta = {"fastkd_version": _fastkd_version(), "torch_version": torch.__version__,
                "fingerprint": self.fingerprint()}
        tmp = self.run_dir / ".run.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "run.json")

    # ---- schedules ---------------------------------------------------------------------------------------
    def hparams(self, step: int | None = None) -> dict[str, float]:
        """temperature, soft_weight and hard_weight at ``step`` (default: the current step)."""
        step = self.state.step if step is None else step
        return {k: s(step) for k, s in self.schedules.items()}

    def _bind_schedules(self, total: int) -> None:
        self.schedules = {k: s.with_total_steps(total) for k, s in self.schedules.items()}

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "state": asdict(self.state),
            "schedules": {k: s.describe() for k, s in self.schedules.items()},
            "fingerprint": self.fingerprint(),
            # Per rank: the RNG at the start of the epoch (it fixes the data order) and now.
            "rng": self._gather(rng_state()),
            "epoch_rng": self._gather(self._epoch_rng),
        }

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        """Write ``run_dir/checkpoints/<name>`` atomically (collective under DDP; rank 0 writes)."""
        sd = self.state_dict()  # every rank: it gathers the RNG states
        if self.run_dir is None or not self.is_main:
            return None
        return save_atomic(sd, self.run_dir / "checkpoints" / name)

    def load_checkpoint(self, path: str | os.PathLike, *, weights_only: bool = False) -> dict:
        """Restore from a checkpoint: everything (default), or the student's weights alone."""
        ckpt = load_checkpoint(path, map_location=self.device)
        try:
            self.student.load_state_dict(ckpt["student"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the student's weights do not fit this student: {exc}") from exc
        if weights_only:
            return ckpt
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        rngs, epoch_rngs = ckpt["rng"], ckpt["epoch_rng"]
        if len(rngs) != self.world_size:
            raise CheckpointError(f"{path} was written by {len(rngs)} process(es), this run has {self.world_size}; "
                                  "resume with the same number of processes")
        self._resume_rng = rngs[self.rank]
        self._epoch_rng = epoch_rngs[self.rank]
        return ckpt

    # ---- logging -----------------------------------------------------------------------------------------
    def _open_logs(self, resume: bool) -> None:
        if self.run_dir is None or not self.is_main:
            return
        for name, fields in (("metrics.csv", TRAIN_FIELDS), ("eval.csv", EVAL_FIELDS)):
            path = self.run_dir / name
            if resume and path.exists():
                # Drop the rows written after the checkpoint we resume from (they will be written again).
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.state.step]
            else:
                rows = []
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
        if self.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.debug("tensorboard not installed: CSV logs only")
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _write_row(self, name: str, fields: list, row: dict, prefix: str) -> None:
        if self.run_dir is None or not self.is_main:
            return
        with open(self.run_dir / name, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    # ---- forward pieces ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _teacher_logits(self, args, kwargs, like: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad(), self._autocast():
            t = _logits(self.teacher(*args, **kwargs))
        if like is not None and t.shape != like.shape:
            raise ValueError(
                f"fastkd.Distiller: teacher and student outputs differ in shape: teacher {tuple(t.shape)}, student "
                f"{tuple(like.shape)}. Both must be (N, classes) or (batch, seq, vocab) with the same classes/vocabulary "
                "(slice a padded teacher vocabulary to the student's).")
        return t

    def _count(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            return torch.tensor(float(logits.shape[:-1].numel()), device=logits.device)
        return (labels != self.ignore_index).sum().float()

    def _loss(self, s, t, labels, hp, reduction="sum", *, soft=None, hard=None):
        return kd_loss(
            s, s.detach() if t is None else t, labels, temperature=hp["temperature"], divergence=self.divergence,
            beta=self.beta, soft_weight=hp["soft_weight"] if soft is None else soft,
            hard_weight=hp["hard_weight"] if hard is None else hard, ignore_index=self.ignore_index,
            reduction=reduction)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _train_window(self, batches: list) -> dict:
        hp = self.hparams()
        step = self.state.step
        log_now = (step + 1) % self.log_every == 0
        # [valid rows, loss sum, soft-term sum, CE sum, samples]: summed over the window and the ranks.
        stats = torch.zeros(5, device=self.device)
        ddp = self.model is not self.student
        has_labels = True
        for i, batch in enumerate(batches):
            args, kwargs, labels = _split_batch(_to(batch, self.device))
            has_labels = has_labels and labels is not None
            sync = not ddp or i == len(batches) - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    s = _logits(self.model(*args, **kwargs))
                t = self._teacher_logits(args, kwargs, like=s)
                loss = self._loss(s, t, labels, hp)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            stats[0] += self._count(s, labels)
            stats[1] += loss.detach()
            stats[4] += s.shape[0]
            if log_now:
                with torch.no_grad():
                    sd = s.detach()
                    if t is not None:
                        stats[2] += self._loss(sd, t, labels, hp, soft=1.0, hard=0.0)
                    if labels is not None:
                        stats[3] += self._loss(sd, t, labels, hp, soft=0.0, hard=1.0)
        if self.world_size > 1:
            dist.all_reduce(stats)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.student.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            # DDP averaged over ranks; make it the sum over all ranks' valid rows / their count.
            torch._foreach_mul_(grads, self.world_size / stats[0])
        norm = clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm else math.inf)
        finite = bool(torch.isfinite(norm) & (stats[0] > 0))  # the step's one host sync
        if finite:
            if self.clip_value is not None:
                clip_grad_value_(params, self.clip_value)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.state.skipped += 1
            log.warning("fastkd.Distiller: step %d skipped: gradient norm %s (%d skipped so far)", step,
                        float(norm), self.state.skipped)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch, "skipped": self.state.skipped,
                                "finite": finite}
        if log_now or not finite:
            v = stats.tolist()
            rows = max(v[0], 1.0)
            logs.update(loss=v[1] / rows, kd_loss=v[2] / rows if self.teacher is not None else math.nan,
                        ce=v[3] / rows if has_labels else math.nan, grad_norm=float(norm),
                        lr=self.optimizer.param_groups[0]["lr"], **hp)
        logs["_rows"], logs["_samples"] = stats[0], stats[4]
        return logs

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict:
        """Metrics over ``loader`` (summed over ranks under DDP): student_acc, teacher_acc, agreement (top-1
        teacher-student), kd_loss (the T^2-scaled divergence at the current temperature, per valid row), ce
        and teacher_ce (per valid row), rows. Accuracies count valid rows (labels != ignore_index)."""
        was_training = self.student.training
        self.student.eval()
        hp = self.hparams()
        # [rows, student correct, teacher correct, agree, kd sum, ce sum, teacher ce sum]
        acc = torch.zeros(7, dtype=torch.float64, device=self.device)
        has_labels = True
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for batch in loader:
                args, kwargs, labels = _split_batch(_to(batch, self.device))
                with self._autocast():
                    s = _logits(self.student(*args, **kwargs))
                t = self._teacher_logits(args, kwargs, like=s)
                has_labels = has_labels and labels is not None
                valid = (torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device) if labels is None
                         else labels != self.ignore_index)
                sp = s.argmax(-1)
                acc[0] += valid.sum()
                if labels is not None:
                    acc[1] += ((sp == labels) & valid).sum()
                    acc[5] += self._loss(s, t, labels, hp, soft=0.0, hard=1.0)
                if t is not None:
                    tp = t.argmax(-1)
                    acc[3] += ((sp == tp) & valid).sum()
                    acc[4] += self._loss(s, t, labels, hp, soft=1.0, hard=0.0)
                    if labels is not None:
                        acc[2] += ((tp == labels) & valid).sum()
                        acc[6] += self._loss(t, t, labels, hp, soft=0.0, hard=1.0)
        if self.world_size > 1:
            dist.all_reduce(acc)
        self.student.train(was_training)
        v = acc.tolist()
        n = max(v[0], 1.0)
        nan = math.nan
        has_t = self.teacher is not None
        return {
            "student_acc": v[1] / n if has_labels else nan,
            "teacher_acc": v[2] / n if has_labels and has_t else nan,
            "agreement": v[3] / n if has_t else nan,
            "kd_loss": v[4] / n if has_t else nan,
            "ce": v[5] / n if has_labels else nan,
            "teacher_ce": v[6] / n if has_labels and has_t else nan,
            "rows": int(v[0]),
        }

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, epochs: int = 1, eval_loader: Iterable | None = None,
            resume: bool | str | os.PathLike = False) -> list[dict]:
        """Train for ``epochs`` (in total, counting those of a resumed run); returns the evaluation history.

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``; a path continues from that file.
        The run folder must be new, or hold this very run when resuming (``RunDirError`` otherwise).
        Resuming restores everything (weights, optimizer, scheduler, scaler, step, RNG, position in the data),
        so an interrupted and resumed run ends with the same weights as an uninterrupted one, provided the
        loader is deterministic given the RNG (shuffling from torch's RNG is; see the README, fastkd.Distiller).
        """
        self._check_run_dir(resume)
        try:
            n_batches = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        if resume:
            path = resume if not isinstance(resume, bool) else self.run_dir / "checkpoints" / "last.pt"
            self.load_checkpoint(path)
        else:
            windows = math.ceil(n_batches / self.accumulation_steps) if n_batches is not None else None
            self.state = TrainState(total_steps=None if windows is None else windows * epochs)
        if self.state.total_steps is not None:
            self._bind_schedules(self.state.total_steps)
        self._write_run_meta()
        self._open_logs(bool(resume))
        self.should_stop = False
        self.model.train()
        sampler = getattr(train_loader, "sampler", None)
        try:
            while self.state.epoch < epochs and not self.should_stop:
                if self.state.batch_in_epoch == 0:
                    if self._resume_rng is not None:  # resuming at an epoch boundary
                        set_rng_state(self._resume_rng)
                        self._resume_rng = None
                    self._epoch_rng = rng_state()  # it fixes the epoch's data order (sampler seeds)
                else:  # resuming mid-epoch: replay the epoch's data order; _run_epoch then restores the RNG
                    set_rng_state(self._epoch_rng)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.state.epoch)
                self._run_epoch(train_loader, n_batches)
                if self.should_stop and self.state.batch_in_epoch:
                    self.save_checkpoint()  # stopped mid-epoch by a callback: resumable from here
                    break
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if eval_loader is not None and self.state.epoch % self.eval_every == 0:
                    self._evaluate_and_keep_best(eval_loader)
                last_epoch = self.state.epoch == epochs
                if self.state.epoch % self.checkpoint_epochs == 0 or last_epoch or self.should_stop:
                    self.save_checkpoint()
        finally:
            if self._tb is not None:
                self._tb.flush()
        return self.state.history

    def _run_epoch(self, loader, n_batches) -> None:
        it = iter(loader)
        for _ in range(self.state.batch_in_epoch):  # fast-forward to the checkpoint's position
            next(it)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        bar = self._bar(n_batches)
        t0, rows, samples = time.perf_counter(), 0.0, 0.0
        pending_rows: list = []
        try:
            while not self.should_stop:
                batches = []
                for _ in range(self.accumulation_steps):
                    try:
                        batches.append(next(it))
                    except StopIteration:
                        break
                if not batches:
                    return
                logs = self._train_window(batches)
                self.state.batch_in_epoch += len(batches)
                pending_rows.append((logs.pop("_rows"), logs.pop("_samples")))
                if "loss" in logs:
                    # Throughput over the rows since the last log row (read here: this is a sync point anyway).
                    dt = time.perf_counter() - t0
                    rows = sum(float(r) for r, _ in pending_rows)
                    samples = sum(float(s) for _, s in pending_rows)
                    logs.update(rows_per_s=rows / dt, samples_per_s=samples / dt, time=time.time())
                    self._write_row("metrics.csv", TRAIN_FIELDS, logs, "train")
                    if bar is not None:
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", rows_s=f"{logs['rows_per_s']:.0f}")
                    t0, pending_rows = time.perf_counter(), []
                if bar is not None:
                    bar.update(len(batches))
                if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, logs)
        finally:
            if bar is not None:
                bar.close()

    def _bar(self, total):
        if not (self.progress and self.is_main):
            return None
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415
        except ImportError:
            return None
        return tqdm(total=total, initial=self.state.batch_in_epoch, desc=f"epoch {self.state.epoch + 1}",
                    unit="batch", leave=False, dynamic_ncols=True)

    def _evaluate_and_keep_best(self, loader) -> dict:
        metrics = self.evaluate(loader)
        metrics = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.history.append(metrics)
        self._write_row("eval.csv", EVAL_FIELDS, metrics, "eval")
        value = metrics.get(self.best_metric)
        if value is None:
            raise KeyError(f"fastkd.Distiller: best_metric {self.best_metric!r} is not an evaluation metric; "
                           f"choose one of {sorted(k for k in metrics if k not in ('step', 'epoch'))}")
        if isinstance(value, float) and math.isfinite(value):
            better = (self.state.best is None or (value > self.state.best if self.best_mode == "max"
                                                  else value < self.state.best))
            if better:
                self.state.best, self.state.best_step = value, self.state.step
                self.save_checkpoint("best.pt")
        for cb in self.callbacks:
            if hasattr(cb, "on_eval_end"):
                cb.on_eval_end(self, metrics)
        return metrics

