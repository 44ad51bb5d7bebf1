"""``fastkd.Distiller``: distil any teacher ``nn.Module`` into any student with the fused ops.

The loop in one paragraph: each optimizer step takes a *window* of ``accumulation_steps`` micro-batches
(fewer at the end of an epoch). For each micro-batch the teacher runs frozen (eval mode, ``no_grad``,
autocast) and the student's loss is ``fastkd.kd_loss(..., reduction="sum")`` -- or, distilling offline
from a ``TeacherCache``, the batch carries the teacher's cached top-k and the loss is
``fastkd.topk_kd_loss`` (teacher.py) -- back-propagated as is (gradient of a sum: the fused backward
needs no rescaling pass). At the end of the window the
gradients are multiplied by ``world_size / N``, N being the number of valid (non-ignored) rows of the
whole window summed over all ranks (one ``all_reduce``; DDP itself averages over ranks, hence the
``world_size``). So K micro-batches on R ranks give the update of one batch K*R times the size,
whatever the padding. Then ``fastkd.clip_grad_norm_`` (its norm is logged), an optional
``fastkd.clip_grad_value_``, and the optimizer and scheduler step -- unless the norm is not finite,
in which case the step is skipped, counted and logged.

Host synchronisation: one per optimizer step (is the gradient norm finite?), plus the log values on
logging steps. Everything else stays on the device.

This module is the loop; its parts live beside it: the options (config.py), the run folder and its
fingerprint (run_dir.py), the logs (metrics.py), checkpoint files and RNG state (checkpoint.py), the
hyper-parameter schedules (schedules.py), batches and model outputs (batches.py), the teacher side
(teacher.py), the named device sums (stats.py) and the collectives (distributed.py).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ops.clip import clip_grad_norm_, clip_grad_value_
from ..ops.kd import kd_loss
from ..ops.labels import shift_labels
from .batches import CachedExample, logits_of, split_batch, to_device, valid_rows, windows
from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    read_verified,
    remove_stale_temp_files,
    rng_state,
    save_atomic,
    set_rng_state,
)
from .config import (
    OPTION_NAMES,
    PRECISIONS,
    DistillerConfig,
    OptionError,
    check_schedule_values,
    options_doc,
    resolve_options,
)
from .distributed import broadcast_object, gather_object, rank_and_world_size
from .metrics import MetricsLog, progress_bar
from .run_dir import RunDirError, RunFolder, fingerprint, writing
from .schedules import Schedule, as_schedule
from .stats import DeviceSums, EvalSums, WindowSums
from .teacher import CachedTeacher, OnlineTeacher

__all__ = ["Distiller", "DistillerConfig", "Callback", "RunDirError", "TrainState", "PRECISIONS"]

log = logging.getLogger("fastkd.train")

_CHECKPOINT_KEYS = ("student", "optimizer", "scheduler", "scaler", "state", "rng", "epoch_rng")


class Callback:
    """Hooks called on every rank; override what you need. Set ``distiller.should_stop = True`` to stop."""

    def on_step_end(self, distiller: Distiller, logs: dict) -> None:
        """After every optimizer step (``logs``: step, epoch, skipped, and the log values on log steps)."""

    def on_eval_end(self, distiller: Distiller, metrics: dict) -> None:
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


class Distiller:
    """Distil ``teacher`` into ``student`` with ``fastkd.kd_loss`` (or, offline, from a teacher cache with
    ``fastkd.topk_kd_loss``).

    Args:
        teacher: any ``nn.Module`` (frozen here: eval mode, ``requires_grad_(False)``, run under
            ``no_grad``; never wrapped in DDP). ``None`` with no ``teacher_cache`` trains the student on
            the labels alone through the same loop (the no-distillation baseline): the loss is then the
            cross-entropy.
        student: the ``nn.Module`` to train (wrapped in DDP when ``torch.distributed`` is initialised).
        optimizer: a ``torch.optim.Optimizer`` over the student's parameters, or a factory
            ``f(params) -> Optimizer``.
        scheduler: an LR scheduler stepped once per optimizer step, or a factory ``f(optimizer)``.
        teacher_cache: a :class:`fastkd.TeacherCache` (with ``teacher=None``): offline distillation. The
            batches must then carry each position's cached top-k (a loader over
            ``fastkd.CachedTeacherDataset(dataset, cache)``); the loss is ``fastkd.topk_kd_loss`` and no
            teacher runs. ``divergence`` must be "kl" or "jsd" with ``beta < 1``.
        callbacks: ``Callback`` objects.
        options: a :class:`DistillerConfig`; the keyword options below override its fields.
        **options: the fields of :class:`DistillerConfig`, listed below. They read back as attributes
            (``distiller.log_every``; ``distiller.options`` is the whole config).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, optimizer, *, scheduler=None,
                 teacher_cache=None, callbacks: Iterable[Callback] = (), options: DistillerConfig | None = None,
                 **kwargs):
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        from ..data.teacher_cache import TeacherCache  # noqa: PLC0415  (fastkd.data imports this package)

        if not isinstance(student, nn.Module):
            raise TypeError(f"fastkd.Distiller: student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"fastkd.Distiller: teacher must be an nn.Module or None, got {type(teacher).__name__}")
        if teacher_cache is not None and not isinstance(teacher_cache, TeacherCache):
            raise TypeError("fastkd.Distiller: teacher_cache must be a fastkd.TeacherCache (open one with "
                            f"fastkd.TeacherCache(path)), got {type(teacher_cache).__name__}")
        if teacher is not None and teacher_cache is not None:
            raise ValueError("fastkd.Distiller: give a teacher (online distillation) or a teacher_cache (offline), "
                             "not both: pass teacher=None with teacher_cache")
        if isinstance(teacher, DDP) or isinstance(student, DDP):
            raise ValueError("fastkd.Distiller: pass the models unwrapped: the student is wrapped in DDP here when "
                             "torch.distributed is initialised, and the teacher never is (it has no gradients)")
        self.options = opts = resolve_options(options, kwargs)

        self.device = torch.device(opts.device) if opts.device is not None else next(student.parameters()).device
        if opts.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fastkd.Distiller: precision='fp16' needs CUDA (GradScaler); use precision='bf16' on "
                             f"{self.device.type}")
        self.student = student.to(self.device)
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        # The teacher side: what each micro-batch is distilled from (None: the labels-only baseline).
        self._teacher: OnlineTeacher | CachedTeacher | None = (
            OnlineTeacher(teacher, self.device, self._autocast) if teacher is not None
            else CachedTeacher(teacher_cache, opts.divergence, opts.beta) if teacher_cache is not None else None)

        self.rank, self.world_size = rank_and_world_size()
        self.is_main = self.rank == 0
        if self.world_size > 1:
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

        self.schedules: dict[str, Schedule] = opts.schedules()
        if self._teacher is None:  # the labels-only baseline
            self.schedules["soft_weight"] = as_schedule(0.0)
            self.schedules["hard_weight"] = as_schedule(1.0)
        # As given (before the trainer fills in open schedule lengths): part of the run's identity.
        self._schedule_spec = {k: s.describe() for k, s in self.schedules.items()}
        self.best_mode = opts.effective_best_mode
        self.scaler = torch.amp.GradScaler("cuda") if opts.precision == "fp16" else None
        self.folder = RunFolder(opts.run_dir) if opts.run_dir is not None else None
        self.metrics = MetricsLog(self.folder.path if self.folder is not None and self.is_main else None,
                                  opts.tensorboard)
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.should_stop = False
        self._epoch_rng: list | None = None
        self._resume_rng: list | None = None

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: the options read as attributes (distiller.log_every).
        options = self.__dict__.get("options")
        if options is not None and name in OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- the run's identity and folder -------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What must match for a run folder to hold *this* run (compared on resume and on reuse)."""
        teacher = self._teacher.identity() if self._teacher is not None else {"teacher": None}
        return fingerprint(teacher=teacher, student=self.student, optimizer=self.optimizer,
                           scheduler=self.scheduler, schedules=self._schedule_spec, options=self.options,
                           world_size=self.world_size)

    def _check_run_dir(self, resume) -> None:
        """Rank 0 checks the folder; every rank raises the same error (no rank left waiting in a collective)."""
        error = None
        if self.is_main:
            try:
                if self.folder is not None:
                    self.folder.check(self.fingerprint(), resume)
                elif resume is True:
                    raise RunDirError("fastkd.Distiller: resume=True needs a run_dir (or pass the checkpoint's path)")
            except RunDirError as exc:
                error = str(exc)
        error = broadcast_object(error, self.world_size)
        if error is not None:
            raise RunDirError(error)

    # ---- schedules ---------------------------------------------------------------------------------------
    def hparams(self, step: int | None = None) -> dict[str, float]:
        """temperature, soft_weight and hard_weight at ``step`` (default: the current step)."""
        step = self.state.step if step is None else step
        return {k: s(step) for k, s in self.schedules.items()}

    def _bind_schedules(self, total: int) -> None:
        self.schedules = {k: s.with_total_steps(total) for k, s in self.schedules.items()}

    # ---- checkpoints -------------------------------------------------------------------------------------
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
            "rng": gather_object(rng_state(), self.world_size),
            "epoch_rng": gather_object(self._epoch_rng, self.world_size),
        }

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        """Write ``run_dir/checkpoints/<name>`` atomically (collective under DDP; rank 0 writes)."""
        sd = self.state_dict()  # every rank: it gathers the RNG states
        if self.folder is None or not self.is_main:
            return None
        with writing(self.folder.path):
            return save_atomic(sd, self.folder.checkpoint(name))

    def load_checkpoint(self, path: str | os.PathLike, *, weights_only: bool = False) -> dict:
        """Restore from a checkpoint: everything (default), or the student's weights alone."""
        try:
            ckpt = load_checkpoint(path, map_location=self.device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{self._other_checkpoint_advice(path)}") from exc
        missing = [k for k in (("student",) if weights_only else _CHECKPOINT_KEYS) if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a complete trainer checkpoint (no {', '.join(missing)})")
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

    def _other_checkpoint_advice(self, bad: str | os.PathLike) -> str:
        """What to do when ``bad`` cannot be used: the run's other checkpoint if it is intact."""
        if self.folder is None:
            return ""
        for other in (self.folder.last, self.folder.checkpoint("best.pt")):
            if other.resolve() == Path(bad).resolve() or not other.is_file():
                continue
            try:
                read_verified(other)
            except CheckpointError:
                continue
            return (f". {other} is intact: resume from it (Distiller.fit(resume=\"{other}\"); from the command "
                    f"line `fastkd resume {self.folder.path} --checkpoint {other.stem}`)")
        return (f". No other intact checkpoint is in {self.folder.path}: start the run again in a new run folder")

    # ---- forward pieces ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.options.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.options.amp_dtype)

    def _inputs(self, batch):
        """A batch on the device -> the model's (args, kwargs), the labels, and the cached teacher top-k
        ``(values, indices)`` it carries (None for a batch without)."""
        batch = to_device(batch, self.device)
        cached = None
        if isinstance(batch, CachedExample):
            batch, cached = batch.example, (batch.values, batch.indices)
        args, kwargs, labels = split_batch(batch)
        if labels is not None and self.options.shift_labels:
            labels = shift_labels(labels, self.options.ignore_index)
        return args, kwargs, labels, cached

    def _target(self, args, kwargs, cached, like: torch.Tensor, training: bool = True):
        """What the student's logits ``like`` are distilled towards (None: no teacher)."""
        return None if self._teacher is None else self._teacher.target(args, kwargs, cached, like, training=training)

    def _loss_options(self, hp, soft, hard) -> dict:
        opts = self.options
        return {"temperature": hp["temperature"], "divergence": opts.divergence, "beta": opts.beta,
                "soft_weight": hp["soft_weight"] if soft is None else soft,
                "hard_weight": hp["hard_weight"] if hard is None else hard, "ignore_index": opts.ignore_index,
                "reduction": "sum"}

    def _loss(self, s, t, labels, hp, *, soft=None, hard=None):
        kw = self._loss_options(hp, soft, hard)
        if t is None:  # the labels-only baseline: the hard term alone (the soft one is 0 against itself)
            return kd_loss(s, s.detach(), labels, **kw)
        return self._teacher.loss(s, t, labels, **kw)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _train_window(self, batches: list) -> tuple[dict, DeviceSums[WindowSums]]:
        """One optimizer step over ``batches``; returns the step's logs and its (device) sums."""
        opts = self.options
        hp = self.hparams()
        step = self.state.step
        log_now = (step + 1) % opts.log_every == 0
        sums = DeviceSums(WindowSums, self.device)
        ddp = self.model is not self.student
        has_labels = True
        for i, batch in enumerate(batches):
            args, kwargs, labels, cached = self._inputs(batch)
            has_labels = has_labels and labels is not None
            sync = not ddp or i == len(batches) - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    s = logits_of(self.model(*args, **kwargs))
                t = self._target(args, kwargs, cached, like=s)
                loss = self._loss(s, t, labels, hp)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            sums.add(rows=valid_rows(s, labels, opts.ignore_index).sum(), loss=loss.detach(), samples=s.shape[0])
            if log_now:
                with torch.no_grad():
                    sd = s.detach()
                    if t is not None:
                        sums.add(kd=self._loss(sd, t, labels, hp, soft=1.0, hard=0.0))
                    if labels is not None:
                        sums.add(ce=self._loss(sd, t, labels, hp, soft=0.0, hard=1.0))
        sums.all_reduce(self.world_size)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.student.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            # DDP averaged over ranks; make it the sum over all ranks' valid rows / their count.
            torch._foreach_mul_(grads, self.world_size / sums["rows"])
        norm = clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm else math.inf)
        finite = bool(torch.isfinite(norm) & (sums["rows"] > 0))  # the step's one host sync
        if finite:
            if opts.clip_value is not None:
                clip_grad_value_(params, opts.clip_value)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.state.skipped += 1
            if float(sums["rows"]) == 0:  # (read on skipped steps only) no loss to learn from, not a bad gradient
                log.warning("fastkd.Distiller: step %d skipped: no valid rows in its window (every label is "
                            "ignore_index=%d) (%d skipped so far)", step, opts.ignore_index, self.state.skipped)
            else:
                log.warning("fastkd.Distiller: step %d skipped: gradient norm %s (%d skipped so far)", step,
                            float(norm), self.state.skipped)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch, "skipped": self.state.skipped,
                                "finite": finite}
        if log_now or not finite:
            v = sums.read()
            rows = max(v.rows, 1.0)
            logs.update(loss=v.loss / rows, kd_loss=v.kd / rows if self._teacher is not None else math.nan,
                        ce=v.ce / rows if has_labels else math.nan, grad_norm=float(norm),
                        lr=self.optimizer.param_groups[0]["lr"], **hp)
        return logs, sums

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict:
        """Metrics over ``loader`` (summed over ranks under DDP): student_acc, teacher_acc, agreement (top-1
        teacher-student), kd_loss (the T^2-scaled divergence at the current temperature, per valid row), ce
        and teacher_ce (per valid row), rows. Accuracies count valid rows (labels != ignore_index).
        With a teacher cache the teacher's top-1 is its cached first index, kd_loss is the top-k loss's soft
        term, and teacher_ce is NaN (the cache holds the top-k alone); an eval loader without the cache
        gives NaN for every teacher metric."""
        was_training = self.student.training
        self.student.eval()
        hp = self.hparams()
        sums = DeviceSums(EvalSums, self.device, dtype=torch.float64)
        has_labels = True
        has_teacher = self._teacher is not None
        has_teacher_ce = has_teacher
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for batch in loader:
                args, kwargs, labels, cached = self._inputs(batch)
                with self._autocast():
                    s = logits_of(self.student(*args, **kwargs))
                # An offline run may evaluate on data without its cache: the teacher metrics are then NaN.
                t = None if isinstance(self._teacher, CachedTeacher) and cached is None else \
                    self._target(args, kwargs, cached, like=s, training=False)
                has_teacher = has_teacher and t is not None
                has_labels = has_labels and labels is not None
                valid = valid_rows(s, labels, self.options.ignore_index)
                sp = s.argmax(-1)
                sums.add(rows=valid.sum())
                if labels is not None:
                    sums.add(student_correct=((sp == labels) & valid).sum(),
                             ce=self._loss(s, t, labels, hp, soft=0.0, hard=1.0))
                if t is not None:
                    tp = self._teacher.top1(t)
                    sums.add(agree=((sp == tp) & valid).sum(), kd=self._loss(s, t, labels, hp, soft=1.0, hard=0.0))
                    if labels is not None:
                        sums.add(teacher_correct=((tp == labels) & valid).sum())
                        tce = self._teacher.teacher_ce(t, labels, **self._loss_options(hp, 0.0, 1.0))
                        has_teacher_ce = has_teacher_ce and tce is not None
                        if tce is not None:
                            sums.add(teacher_ce=tce)
        sums.all_reduce(self.world_size)
        self.student.train(was_training)
        v = sums.read()
        n = max(v.rows, 1.0)
        nan = math.nan
        has_t = has_teacher  # every batch had a teacher target
        return {
            "student_acc": v.student_correct / n if has_labels else nan,
            "teacher_acc": v.teacher_correct / n if has_labels and has_t else nan,
            "agreement": v.agree / n if has_t else nan,
            "kd_loss": v.kd / n if has_t else nan,
            "ce": v.ce / n if has_labels else nan,
            "teacher_ce": v.teacher_ce / n if has_labels and has_t and has_teacher_ce else nan,
            "rows": int(v.rows),
        }

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, epochs: int = 1, eval_loader: Iterable | None = None,
            resume: bool | str | os.PathLike = False) -> list[dict]:
        """Train for ``epochs`` (in total, counting those of a resumed run); returns the evaluation history.

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``; a path continues from that file.
        The run folder must be new, or hold this very run when resuming (``RunDirError`` otherwise).
        Resuming restores everything (weights, optimizer, scheduler, scaler, step, RNG, position in the data),
        so an interrupted and resumed run ends with the same weights as an uninterrupted one, provided the
        loader is deterministic given the RNG (shuffling from torch's RNG is; see docs/trainer.md, Checkpoints).
        """
        opts = self.options
        # Everything that can be checked is checked before anything is written or trained.
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise OptionError("epochs", f"fastkd.Distiller.fit: epochs must be an integer >= 1, got {epochs!r}")
        for what, loader in (("train_loader", train_loader), ("eval_loader", eval_loader)):
            if loader is not None and not isinstance(loader, Iterable) and not hasattr(loader, "__getitem__"):
                raise TypeError(f"fastkd.Distiller.fit: {what} must be an iterable of batches (a DataLoader, a "
                                f"list, a generator), got {type(loader).__name__}")
        try:
            n_batches = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        # A run that would train nothing is an error, never a silent success: an empty loader or a one-pass
        # iterator for several epochs here, an epoch that draws no batch in the loop below.
        if n_batches == 0:
            raise OptionError("train_loader", "fastkd.Distiller.fit: train_loader is empty (len 0): there is nothing "
                              "to train on")
        if isinstance(train_loader, Iterator) and epochs > 1:
            raise OptionError("train_loader", f"fastkd.Distiller.fit: train_loader is an iterator "
                              f"({type(train_loader).__name__}), used up by the first epoch: epochs 2 to {epochs} "
                              "would train nothing. Pass a loader that can be iterated once per epoch (a DataLoader, "
                              "a list of batches), or epochs=1")
        self._check_run_dir(resume)
        total = math.ceil(n_batches / opts.accumulation_steps) * epochs if n_batches is not None else None
        if self.folder is not None and self.is_main:
            with writing(self.folder.path):  # what a writer killed mid-write (kill -9) left behind
                remove_stale_temp_files(self.folder.last.parent)
        if resume:
            self.load_checkpoint(resume if not isinstance(resume, bool) else self.folder.last)
            self._check_resumed_data(n_batches, total, epochs)
        else:
            self.state = TrainState(total_steps=total)
        if self.state.total_steps is not None:
            self._bind_schedules(self.state.total_steps)
        check_schedule_values(self.schedules, self.state.total_steps)
        if self.folder is not None and self.is_main:
            self.folder.write_meta(self.fingerprint())  # the run's first write: an unwritable folder stops here
        self.metrics.open(bool(resume), self.state.step)
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
                if self.state.batch_in_epoch == 0:
                    raise OptionError("train_loader", f"fastkd.Distiller.fit: train_loader gave no batch in epoch "
                                      f"{self.state.epoch + 1} (empty, or an iterator already used up), so the epoch "
                                      "trained nothing. Pass a loader that yields batches every epoch (a DataLoader, "
                                      "a list of batches)")
                if self.should_stop and self.state.batch_in_epoch:
                    self.save_checkpoint()  # stopped mid-epoch by a callback: resumable from here
                    break
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if eval_loader is not None and self.state.epoch % opts.eval_every == 0:
                    self._evaluate_and_keep_best(eval_loader)
                last_epoch = self.state.epoch == epochs
                if self.state.epoch % opts.checkpoint_epochs == 0 or last_epoch or self.should_stop:
                    self.save_checkpoint()
        finally:
            self.metrics.flush()
        return self.state.history

    def _check_resumed_data(self, n_batches: int | None, total: int | None, epochs: int) -> None:
        """The loader and epochs of a resumed run against the checkpoint's: a loader that cannot reach the
        checkpoint's position is an error; another run length keeps the run's schedules, with a warning."""
        st = self.state
        if n_batches is not None and st.batch_in_epoch > n_batches:
            raise self._shorter_loader_error(n_batches)
        if total is not None and st.total_steps is not None and total != st.total_steps:
            # The schedules (and an LR scheduler built for the run) are part of the run being continued:
            # re-laid over another length they would jump mid-run. They keep the checkpoint's length.
            log.warning("fastkd.Distiller: resuming with %d epoch(s) of this train_loader (%d optimizer steps), but "
                        "the run's schedules were laid out over %d steps when it started: they keep that length "
                        "(held at their end values after step %d). For schedules over the new length start a new "
                        "run, e.g. from this run's weights", epochs, total, st.total_steps, st.total_steps)

    def _shorter_loader_error(self, n_batches) -> OptionError:
        st = self.state
        return OptionError("train_loader", f"fastkd.Distiller.fit: the checkpoint is at micro-batch {st.batch_in_epoch} "
                           f"of epoch {st.epoch + 1}, but train_loader now ends after {n_batches} batches: it is "
                           "not the loader of the interrupted run. Resume with that run's data and batch size, or "
                           "start a new run")

    def _run_epoch(self, loader, n_batches) -> None:
        opts = self.options
        it = iter(loader)
        for i in range(self.state.batch_in_epoch):  # fast-forward to the checkpoint's position
            try:
                next(it)
            except StopIteration:
                raise self._shorter_loader_error(i) from None
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        bar = progress_bar(opts.progress and self.is_main, n_batches, self.state.batch_in_epoch, self.state.epoch)
        t0 = time.perf_counter()
        since_log: list[DeviceSums[WindowSums]] = []  # the steps since the last log row: for the throughput
        try:
            for batches in windows(it, opts.accumulation_steps):
                logs, sums = self._train_window(batches)
                self.state.batch_in_epoch += len(batches)
                since_log.append(sums)
                if "loss" in logs:
                    # Throughput over the rows since the last log row (read here: this is a sync point anyway).
                    dt = time.perf_counter() - t0
                    rows = sum(float(s["rows"]) for s in since_log)
                    samples = sum(float(s["samples"]) for s in since_log)
                    logs.update(rows_per_s=rows / dt, samples_per_s=samples / dt, time=time.time())
                    self.metrics.write("train", logs)
                    if bar is not None:
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", rows_s=f"{logs['rows_per_s']:.0f}")
                    t0, since_log = time.perf_counter(), []
                if bar is not None:
                    bar.update(len(batches))
                if opts.checkpoint_every and self.state.step % opts.checkpoint_every == 0:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, logs)
                if self.should_stop:  # before drawing the next window from the loader
                    break
        finally:
            if bar is not None:
                bar.close()

    def _evaluate_and_keep_best(self, loader) -> dict:
        metrics = self.evaluate(loader)
        metrics = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.history.append(metrics)
        self.metrics.write("eval", metrics)
        best_metric = self.options.best_metric
        value = metrics.get(best_metric)
        if value is None:
            raise KeyError(f"fastkd.Distiller: best_metric {best_metric!r} is not an evaluation metric; "
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


def _signature() -> inspect.Signature:
    """Distiller's signature with the options spelt out (for help(), IDEs and inspect)."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("teacher", P.POSITIONAL_OR_KEYWORD),
              P("student", P.POSITIONAL_OR_KEYWORD), P("optimizer", P.POSITIONAL_OR_KEYWORD),
              P("scheduler", P.KEYWORD_ONLY, default=None), P("teacher_cache", P.KEYWORD_ONLY, default=None),
              P("callbacks", P.KEYWORD_ONLY, default=()),
              P("options", P.KEYWORD_ONLY, default=None)]
    params += [P(f.name, P.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields(DistillerConfig)]
    return inspect.Signature(params)


Distiller.__init__.__signature__ = _signature()
Distiller.__doc__ = inspect.cleandoc(Distiller.__doc__) + "\n\nOptions:\n" + options_doc()
