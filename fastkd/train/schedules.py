"""Schedules for the distillation hyper-parameters (temperature, soft and hard weights).

A schedule maps the optimizer step (0, 1, ...) to a Python float. The trainer accepts, for each of
``temperature``, ``soft_weight`` and ``hard_weight``:

- a number: constant;
- a :class:`Schedule` (``Constant``, ``Linear``, ``Cosine``);
- a dict, as written in a TOML config: ``{schedule = "cosine", start = 4.0, end = 1.0, steps = 1000}``
  (``steps`` may be left out: the trainer fills in the run's total number of optimizer steps);
- any callable ``f(step) -> float``.

Values are Python floats by design: ``kd_loss`` takes the temperature as a number, so no device
tensor (and no host synchronisation) is involved.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .._suggest import did_you_mean

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Lambda", "as_schedule", "SCHEDULES"]


class Schedule:
    """Base class: ``schedule(step) -> float``. ``steps`` None means "the whole run" (set by the trainer)."""

    steps: int | None = None

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def with_total_steps(self, total: int) -> Schedule:
        """Return the schedule with ``steps`` filled in where it was left open."""
        return self

    def describe(self) -> dict:
        """A JSON-able description (stored in run.json and checkpoints)."""
        return {"schedule": type(self).__name__.lower(), **asdict(self)}  # type: ignore[call-overload]


def _check_number(schedule: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{schedule}: {key} must be a finite number, got {type(value).__name__} {value!r}")


def _check_int(schedule: str, key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{schedule}: {key} must be an integer >= {low}, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __post_init__(self):
        _check_number("Constant", "value", self.value)

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class _Ramp(Schedule):
    start: float
    end: float
    steps: int | None = None  # steps from start to end; held at ``end`` afterwards
    warmup: int = 0  # steps held at ``start`` before the ramp begins

    def __post_init__(self):
        kind = type(self).__name__
        _check_number(kind, "start", self.start)
        _check_number(kind, "end", self.end)
        if self.steps is not None:
            _check_int(kind, "steps", self.steps, 1)
        _check_int(kind, "warmup", self.warmup, 0)

    def with_total_steps(self, total: int) -> Schedule:
        if self.steps is not None:
            return self
        return type(self)(self.start, self.end, max(1, total - self.warmup), self.warmup)

    def _progress(self, step: int) -> float:
        if self.steps is None:
            raise RuntimeError(f"{type(self).__name__} schedule has no length: give steps=..., or let the trainer "
                               "set it from the run's total number of optimizer steps")
        return min(max(step - self.warmup, 0) / self.steps, 1.0)


class Linear(_Ramp):
    """From ``start`` to ``end`` linearly over ``steps`` optimizer steps (after ``warmup`` steps at ``start``)."""

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        return float(self.start + (self.end - self.start) * p)


class Cosine(_Ramp):
    """From ``start`` to ``end`` along a half cosine over ``steps`` optimizer steps."""

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        return float(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p)))


class Lambda(Schedule):
    """Wraps a user callable ``f(step) -> float`` (not serialisable: its state is the step alone)."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn

    def __call__(self, step: int) -> float:
        return float(self.fn(step))

    def describe(self) -> dict:
        return {"schedule": "callable", "fn": getattr(self.fn, "__qualname__", repr(self.fn))}

    def __eq__(self, other):
        return isinstance(other, Lambda) and other.fn is self.fn

    def __hash__(self):
        return hash(self.fn)


SCHEDULES = {"constant": Constant, "linear": Linear, "cosine": Cosine}


def as_schedule(spec, name: str = "value") -> Schedule:
    """Turn a number, dict, Schedule or callable into a :class:`Schedule` (see the module docstring)."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"{name}: expected a number, a schedule or a callable, got a bool")
    if isinstance(spec, (int, float)):
        return Constant(float(spec))
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("schedule", None)
        if kind not in SCHEDULES:
            raise ValueError(f"{name}: unknown schedule {kind!r}{did_you_mean(str(kind), SCHEDULES)}; use one of "
                             f"{sorted(SCHEDULES)}")
        cls = SCHEDULES[kind]
        fields = ("value",) if cls is Constant else ("start", "end", "steps", "warmup")
        unknown = sorted(set(spec) - set(fields))
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown} for a {kind} schedule; valid: {list(fields)}")
        try:
            return cls(**spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: bad {kind} schedule {spec}: {exc}") from None
    if callable(spec):
        return Lambda(spec)
    raise TypeError(f"{name}: expected a number, a schedule dict, a fastkd.schedules.Schedule or a callable of the "
                    f"step, got {type(spec).__name__}")
