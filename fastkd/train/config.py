"""The Distiller's options: one dataclass, the single home of their names, types, defaults, checks and docs.

Everything else derives from the fields of :class:`DistillerConfig`:

- ``Distiller(teacher, student, optimizer, **options)`` takes them as keyword arguments (or
  ``options=DistillerConfig(...)``), and its signature and docstring are generated from them;
- the CLI's TOML sections ``[loss]`` and ``[train]`` are the fields whose ``section`` is "loss" or
  "train", with the types a TOML file can give for each field's annotation;
- the run's fingerprint (run.json, checkpoints) holds the fields marked ``identity`` and the
  descriptions of the ``schedule`` fields: what must match for a run folder to hold this very run.

To add an option, add a field here (with its doc, section and whether it is part of the run's identity)
and read it in the trainer as ``self.options.<name>``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import torch

from .._suggest import did_you_mean
from ..ops._args import TEMPERATURE_RANGE
from ..ops.kd import DIVERGENCES
from .run_dir import jsonable
from .schedules import Schedule, as_schedule

__all__ = ["DistillerConfig", "OptionError", "PRECISIONS", "EVAL_METRICS", "OPTION_NAMES", "toml_section",
           "options_doc", "resolve_options", "check_schedule_values"]

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(_AMP_DTYPES)
# best_mode's default: metrics whose name contains one of these are minimised.
_LOWER_IS_BETTER = ("loss", "ce", "ppl", "perplexity")

# What Distiller.evaluate returns (best_metric is one of them).
EVAL_METRICS = ("student_acc", "teacher_acc", "agreement", "kd_loss", "ce", "teacher_ce", "rows")


class OptionError(ValueError):
    """A bad value of one option; ``option`` names it (the CLI maps it to its TOML key)."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message if message.startswith("fastkd.") else f"fastkd.Distiller: {message}")


def _integer(name: str, value, *, low: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(name, f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise OptionError(name, f"{name} must be >= {low}, got {value}{hint}")


def _number(name: str, value, *, low: float | None = None, high: float | None = None, open_low: bool = False,
            what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(name, f"{name} must be a number, got {type(value).__name__} {value!r}")
    bad = not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) or \
        (high is not None and value > high)
    if bad:
        raise OptionError(name, f"{name} must be {what}, got {value}")


def _check_device(device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError("device", f"device {device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' (or leave it "
                          "out: the student's device)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError("device", f"device {device!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                              "is False); use device = 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise OptionError("device", f"device {device!r}: this machine has {count} CUDA device(s) (0..{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", f"device {device!r}: MPS is not available here; use device = 'cpu'")


# The range of each schedule's values (low, high, what): the temperature is the losses' own range
# (fastkd/ops/_args.py), the weights scale the terms.
_SCHEDULE_RANGES = {"temperature": (*TEMPERATURE_RANGE, "in [{:g}, {:g}]".format(*TEMPERATURE_RANGE)),
                    "soft_weight": (0.0, math.inf, "finite and >= 0"),
                    "hard_weight": (0.0, math.inf, "finite and >= 0")}


def check_schedule_values(schedules: dict[str, Schedule], total_steps: int | None = None) -> None:
    """OptionError unless every schedule gives a number in its range at step 0 and at the run's last step
    (``total_steps - 1``; a ramp's end when the run's length is not known yet). Ramps are monotone, so
    their two ends bound every value; a callable is checked at those two steps."""
    for name, sched in schedules.items():
        low, high, what = _SCHEDULE_RANGES.get(name, (-math.inf, math.inf, "finite"))
        bound = sched.with_total_steps(total_steps or 1)
        last = total_steps - 1 if total_steps else (getattr(bound, "steps", 0) or 0) + getattr(bound, "warmup", 0)
        for step in dict.fromkeys((0, max(last, 0))):
            try:
                value = bound(step)
            except Exception as exc:
                raise OptionError(name, f"the {name} schedule fails at step {step}: {type(exc).__name__}: "
                                  f"{exc}") from exc
            ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
            if not ok:
                where = ("step 0" if step == 0 else f"step {step} (the run's last)" if total_steps
                         else "the end of its ramp")
                raise OptionError(name, f"the {name} schedule gives {value!r} at {where}; a {name} must be {what}")


# A number, a {schedule = ...} table, a fastkd.schedules.Schedule or f(step) -> float.
ScheduleSpec = float | dict | Schedule | Callable[[int], float]


def _option(default, doc: str, *, section: str | None = None, identity: bool | str = False, schedule: bool = False):
    """A field of DistillerConfig. ``section``: the TOML section that sets it (None: Python only);
    ``identity``: part of the run's fingerprint (True), or ``"unless default"``: part of it when not at its
    default (for options added after runs were made: their run folders, whose fingerprints lack it, stay
    resumable); ``schedule``: a number or schedule, turned into a :class:`Schedule` by the trainer (its
    description is part of the fingerprint)."""
    return field(default=default, metadata={"doc": doc, "section": section, "identity": identity,
                                            "schedule": schedule})


@dataclass(frozen=True, kw_only=True)
class DistillerConfig:
    # ---- the loss ([loss] in a TOML config) ----
    temperature: ScheduleSpec = _option(1.0, "softmax temperature (a number or a schedule, see fastkd.schedules)",
                                        section="loss", schedule=True)
    divergence: str = _option("kl", f"one of {', '.join(DIVERGENCES)} (as in fastkd.kd_loss)",
                              section="loss", identity=True)
    beta: float = _option(0.5, "the JSD's mixing weight (as in fastkd.kd_loss)", section="loss", identity=True)
    soft_weight: ScheduleSpec = _option(1.0, "weight of the distillation term (a number or a schedule)",
                                        section="loss", schedule=True)
    hard_weight: ScheduleSpec = _option(0.0, "weight of the cross-entropy on the labels (a number or a schedule)",
                                        section="loss", schedule=True)
    ignore_index: int = _option(-100, "label of the rows that count nowhere (padding)", section="loss",
                                identity=True)
    shift_labels: bool = _option(False, "the labels are a causal LM's, as Hugging Face gives them (labels = "
                                 "input_ids): position i is trained towards label i + 1 (fastkd.shift_labels; the "
                                 "last position counts nowhere)", section="loss", identity="unless default")
    # ---- the optimizer step ([train]) ----
    accumulation_steps: int = _option(1, "micro-batches per optimizer step (normalised by the window's valid "
                                      "rows)", section="train", identity=True)
    max_grad_norm: float | None = _option(None, "global-norm gradient clipping (None: measure the norm only)",
                                          section="train", identity=True)
    clip_value: float | None = _option(None, "value clipping after the norm clipping (None: none)",
                                       section="train", identity=True)
    precision: str = _option("fp32", "fp32, bf16 (autocast on CPU and CUDA) or fp16 (autocast + GradScaler, "
                             "CUDA)", section="train", identity=True)
    device: str | torch.device | None = _option(None, "where to train (None: the student's device)",
                                                section="train")
    # ---- files, logs, evaluation ([train], but run_dir is the config's `out`) ----
    run_dir: str | os.PathLike | None = _option(None, "folder for run.json, metrics.csv, eval.csv and "
                                                "checkpoints/ (rank 0 writes); None: no files")
    log_every: int = _option(10, "optimizer steps between log rows (a skipped step is always logged)",
                             section="train")
    checkpoint_every: int | None = _option(None, "optimizer steps between checkpoints (None: none mid-epoch)",
                                           section="train")
    eval_every: int = _option(1, "epochs between evaluations", section="train")
    checkpoint_epochs: int = _option(1, "epochs between end-of-epoch checkpoints (the last epoch and a stop "
                                     "always save)", section="train")
    best_metric: str = _option("student_acc", "the evaluation metric that selects checkpoints/best.pt",
                               section="train")
    best_mode: str | None = _option(None, "max or min (None: from the metric's name; losses and perplexities "
                                    "are minimised)", section="train")
    progress: bool = _option(True, "a tqdm progress bar (when tqdm is installed)", section="train")
    tensorboard: bool = _option(True, "also log to TensorBoard (when it is installed)", section="train")
    config: dict | None = _option(None, "extra JSON-able facts that identify the run (the CLI passes its "
                                  "config); stored in run.json", identity=True)

    def __post_init__(self):
        self.check()
        # Normalised once here (frozen dataclass: hence object.__setattr__).
        normalised = {
            "beta": float(self.beta), "ignore_index": int(self.ignore_index),
            "accumulation_steps": int(self.accumulation_steps), "log_every": int(self.log_every),
            "eval_every": int(self.eval_every), "checkpoint_epochs": int(self.checkpoint_epochs),
            "run_dir": None if self.run_dir is None else Path(self.run_dir),
            "config": jsonable(self.config or {}),  # a snapshot: later changes to the caller's dict don't count
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def check(self) -> None:
        """OptionError (a ValueError naming the option) for any value the loop could not run with: every
        check that needs no model or data, so that a bad value fails here and not after an epoch."""
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.divergence not in DIVERGENCES:
            raise OptionError("divergence", f"unknown divergence {self.divergence!r}"
                              f"{did_you_mean(str(self.divergence), DIVERGENCES)}; use one of {DIVERGENCES}")
        _number("beta", self.beta, low=0.0, high=1.0, what="in [0, 1] (0 = forward KL, 1 = reverse KL)")
        _integer("ignore_index", self.ignore_index)
        if not isinstance(self.shift_labels, bool):
            raise OptionError("shift_labels", f"shift_labels must be true or false, got {self.shift_labels!r}")
        for name in ("accumulation_steps", "log_every", "eval_every", "checkpoint_epochs"):
            _integer(name, getattr(self, name), low=1)
        if self.checkpoint_every is not None:
            _integer("checkpoint_every", self.checkpoint_every, low=1,
                     hint="; leave it out (None) for no checkpoints mid-epoch")
        for name in ("max_grad_norm", "clip_value"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), low=0.0, open_low=True, what="> 0 or None")
        if self.best_metric not in EVAL_METRICS:
            raise OptionError("best_metric", f"best_metric {self.best_metric!r} is not an evaluation metric"
                              f"{did_you_mean(str(self.best_metric), EVAL_METRICS)}; use one of {EVAL_METRICS}")
        if self.effective_best_mode not in ("min", "max"):
            raise OptionError("best_mode", f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.device is not None:
            _check_device(self.device)
        schedules = {}
        for f in fields(self):
            if f.metadata["schedule"]:
                try:
                    schedules[f.name] = as_schedule(getattr(self, f.name), f.name)
                except (TypeError, ValueError) as exc:
                    msg = str(exc)
                    raise OptionError(f.name, msg if msg.startswith(f.name) else f"{f.name}: {msg}") from None
        check_schedule_values(schedules)  # a bad schedule is an error now, not at the first step

    def schedules(self) -> dict[str, Schedule]:
        """The ``schedule`` fields as :class:`Schedule` objects (their lengths still open where not given)."""
        return {f.name: as_schedule(getattr(self, f.name), f.name) for f in fields(self) if f.metadata["schedule"]}

    def identity(self) -> dict[str, Any]:
        """The ``identity`` fields: with the schedules, the options that a resumed run must share."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"] is True
                or (f.metadata["identity"] == "unless default" and getattr(self, f.name) != f.default)}

    @property
    def effective_best_mode(self) -> str:
        """``best_mode``, or when None "min" for losses and perplexities and "max" for other metrics."""
        return self.best_mode or ("min" if any(k in self.best_metric for k in _LOWER_IS_BETTER) else "max")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``precision`` (None: no autocast)."""
        return _AMP_DTYPES[self.precision]


OPTION_NAMES = tuple(f.name for f in fields(DistillerConfig))

# What a TOML value can be for each Python type in a field's annotation (others: not settable from TOML).
_TOML_TYPES = {float: (int, float), int: (int,), str: (str,), bool: (bool,), dict: (dict,)}


def _toml_types(hint) -> tuple[type, ...]:
    members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    out: list[type] = []
    for member in members:
        out += [t for t in _TOML_TYPES.get(member, ()) if t not in out]
    return tuple(out)


def toml_section(section: str) -> dict[str, tuple[type, ...]]:
    """``{option: TOML types}`` for the options set in the TOML section ``section`` ("loss" or "train")."""
    hints = typing.get_type_hints(DistillerConfig)
    return {f.name: _toml_types(hints[f.name]) for f in fields(DistillerConfig) if f.metadata["section"] == section}


def options_doc(indent: str = "    ") -> str:
    """One line per option: ``name (default): what it does`` (for docstrings and help)."""
    return "\n".join(f"{indent}{f.name} (default {f.default!r}): {f.metadata['doc']}" for f in fields(DistillerConfig))


def resolve_options(options: DistillerConfig | None, overrides: dict[str, Any]) -> DistillerConfig:
    """``options`` (default: all defaults) with the keyword ``overrides``; TypeError naming an unknown one."""
    for name in overrides:
        if name not in OPTION_NAMES:
            raise TypeError(f"fastkd.Distiller: unknown option {name!r}{did_you_mean(name, OPTION_NAMES)}")
    if options is None:
        return DistillerConfig(**overrides)
    if not isinstance(options, DistillerConfig):
        raise TypeError(f"fastkd.Distiller: options must be a DistillerConfig, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


DistillerConfig.__doc__ = (
    "The options of :class:`fastkd.Distiller` (keyword arguments of the constructor, or "
    "``options=DistillerConfig(...)``); frozen: derive a variant with ``dataclasses.replace``.\n\n"
    "Options:\n" + options_doc())
