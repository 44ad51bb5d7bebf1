"""DistillerConfig is the one home of the Distiller's options: the constructor, the CLI's TOML sections
and the run's fingerprint all follow its fields."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from fastkd.cli import CONFIG_SCHEMA
from fastkd.train.config import OPTION_NAMES, DistillerConfig, resolve_options, toml_section
from fastkd.train.distiller import Distiller


def _models():
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.Linear(4, 3)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_toml_sections_are_the_config_fields():
    fields = {f.name: f.metadata["section"] for f in dataclasses.fields(DistillerConfig)}
    assert set(CONFIG_SCHEMA["loss"]) == {n for n, s in fields.items() if s == "loss"}
    assert set(CONFIG_SCHEMA["train"]) == {n for n, s in fields.items() if s == "train"} | {"epochs"}
    assert {n for n, s in fields.items() if s is None} == {"run_dir", "config"}  # `out` and the CLI's own
    # The TOML types follow the annotations: schedules take numbers or tables, clipping thresholds numbers.
    assert toml_section("loss")["temperature"] == (int, float, dict)
    assert toml_section("train")["max_grad_norm"] == (int, float)
    assert toml_section("train")["device"] == (str,)
    assert toml_section("train")["progress"] == (bool,)


def test_constructor_takes_every_option_as_a_keyword():
    params = inspect.signature(Distiller).parameters
    assert [p for p in params if p in OPTION_NAMES] == list(OPTION_NAMES)
    for f in dataclasses.fields(DistillerConfig):
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
        assert f.name in Distiller.__doc__ and f.metadata["doc"]
    teacher, student = _models()
    d = Distiller(teacher, student, _sgd, temperature=2.0, log_every=3, run_dir="somewhere", progress=False)
    assert d.options.temperature == 2.0 and d.log_every == 3 and str(d.run_dir) == "somewhere"


def test_options_object_and_keyword_overrides():
    base = DistillerConfig(temperature=3.0, best_metric="student_acc", progress=False)
    teacher, student = _models()
    d = Distiller(teacher, student, _sgd, options=base, best_metric="ce")
    assert d.options.temperature == 3.0 and d.best_mode == "min"  # the mode follows the overridden metric
    assert resolve_options(base, {}) is base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.temperature = 1.0  # type: ignore[misc]


def test_unknown_or_bad_options_are_clear_errors():
    teacher, student = _models()
    with pytest.raises(TypeError, match="unknown option 'temprature' \\(did you mean 'temperature'\\?\\)"):
        Distiller(teacher, student, _sgd, temprature=2.0)
    with pytest.raises(TypeError, match="options must be a DistillerConfig"):
        Distiller(teacher, student, _sgd, options={"temperature": 2.0})
    for bad, match in ((dict(precision="fp8"), "precision must be one of"),
                       (dict(divergence="kld"), "unknown divergence"),
                       (dict(accumulation_steps=0), "accumulation_steps must be >= 1"),
                       (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
                       (dict(clip_value=-1.0), "clip_value must be > 0"),
                       (dict(best_mode="up"), "best_mode must be 'min' or 'max'"),
                       (dict(temperature={"schedule": "cosin", "start": 1, "end": 0}), "did you mean 'cosine'")):
        with pytest.raises(ValueError, match=match):
            DistillerConfig(**bad)


def test_fingerprint_holds_the_identity_options():
    teacher, student = _models()
    d = Distiller(teacher, student, _sgd, divergence="jsd", beta=0.25, log_every=7, config={"seed": (1, 2)})
    fp = d.fingerprint()
    identity = {f.name for f in dataclasses.fields(DistillerConfig) if f.metadata["identity"]}
    assert identity <= set(fp) and fp["beta"] == 0.25 and fp["config"] == {"seed": [1, 2]}
    assert set(fp["schedules"]) == {f.name for f in dataclasses.fields(DistillerConfig) if f.metadata["schedule"]}
    assert "log_every" not in fp  # how often to log is no part of what the run computes
