"""DistillerConfig is the one home of the Distiller's options: the constructor, the CLI's TOML sections
and the run's fingerprint all follow its fields."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from fastkd.cli import CONFIG_SCHEMA
from fastkd.train.config import (
    EVAL_METRICS,
    OPTION_NAMES,
    DistillerConfig,
    OptionError,
    resolve_options,
    toml_section,
)
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
    identity = {f.name for f in dataclasses.fields(DistillerConfig) if f.metadata["identity"] is True}
    assert identity <= set(fp) and fp["beta"] == 0.25 and fp["config"] == {"seed": [1, 2]}
    # Options added after runs existed join the fingerprint only when set (those runs stay resumable).
    later = {f.name for f in dataclasses.fields(DistillerConfig) if f.metadata["identity"] == "unless default"}
    assert later and not later & set(fp)
    assert set(fp["schedules"]) == {f.name for f in dataclasses.fields(DistillerConfig) if f.metadata["schedule"]}
    assert "log_every" not in fp  # how often to log is no part of what the run computes


# ---- values the loop could not run with: a ValueError naming the option, at construction ---------------------
BAD_OPTIONS = [
    (dict(accumulation_steps=0), "accumulation_steps", "accumulation_steps must be >= 1, got 0"),
    (dict(log_every=0), "log_every", "log_every must be >= 1, got 0"),
    (dict(eval_every=0), "eval_every", "eval_every must be >= 1, got 0"),
    (dict(checkpoint_epochs=0), "checkpoint_epochs", "checkpoint_epochs must be >= 1, got 0"),
    (dict(checkpoint_every=-1), "checkpoint_every", "checkpoint_every must be >= 1, got -1"),
    (dict(log_every=2.5), "log_every", "log_every must be an integer, got float 2.5"),
    (dict(best_metric="acc"), "best_metric", "best_metric 'acc' is not an evaluation metric"),
    (dict(best_metric="student_ac"), "best_metric", "did you mean 'student_acc'"),
    (dict(device="banana"), "device", "device 'banana' is not a device"),
    (dict(beta=1.5), "beta", "beta must be in \\[0, 1\\]"),
    (dict(ignore_index=1.5), "ignore_index", "ignore_index must be an integer"),
    (dict(temperature={"schedule": "linear", "start": "4", "end": 1.0}), "temperature",
     "start must be a finite number, got str '4'"),
    (dict(temperature={"schedule": "linear", "start": 4.0, "end": 0.0}), "temperature",
     "the temperature schedule gives 0.0 at the end of its ramp; a temperature must be in \\[0.05, 100\\]"),
    (dict(temperature=0.0), "temperature", "gives 0.0 at step 0"),
    (dict(soft_weight=float("nan")), "soft_weight", "value must be a finite number"),
    (dict(hard_weight=-1.0), "hard_weight", "a hard_weight must be finite and >= 0"),
    (dict(temperature=lambda step: "hot"), "temperature", "the temperature schedule fails at step 0"),
]


@pytest.mark.parametrize(("kwargs", "option", "match"), BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_bad_values_name_the_option(kwargs, option, match):
    with pytest.raises(OptionError, match=match) as exc:
        DistillerConfig(**kwargs)
    assert exc.value.option == option and isinstance(exc.value, ValueError)
    teacher, student = _models()
    with pytest.raises(ValueError, match=match):  # the constructor's keywords go through the same checks
        Distiller(teacher, student, _sgd, **kwargs)


def test_cuda_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="no CUDA GPU is available here"):
        DistillerConfig(device="cuda")
    DistillerConfig(device="cpu")


def test_best_metric_names_are_what_evaluate_returns():
    teacher, student = _models()
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))]
    assert tuple(Distiller(teacher, student, _sgd, progress=False).evaluate(data)) == EVAL_METRICS


def test_fit_checks_epochs_loaders_and_schedules_before_writing(tmp_path):
    teacher, student = _models()
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))] * 3
    run = tmp_path / "run"
    d = Distiller(teacher, student, _sgd, run_dir=run, progress=False, tensorboard=False,
                  temperature=lambda step: 2.0 - step)  # 2 at step 0, 0 at the last step (2 of 3)
    for epochs in (0, -1, 1.5):
        with pytest.raises(OptionError, match="epochs must be an integer >= 1"):
            d.fit(data, epochs=epochs)
    with pytest.raises(TypeError, match="train_loader must be an iterable of batches"):
        d.fit(42)
    with pytest.raises(OptionError, match="the temperature schedule gives 0.0 at step 2 \\(the run's last\\)"):
        d.fit(data, epochs=1)
    assert not run.exists()  # nothing written
    d = Distiller(teacher, student, _sgd, run_dir=run, progress=False, tensorboard=False,
                  temperature=lambda step: 2.0 - step / 4)
    d.fit(data, epochs=1)
    assert d.state.step == 3
