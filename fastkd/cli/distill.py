"""``fastkd distill`` and ``fastkd resume``: build the teacher, student, data, optimizer, scheduler and
the Distiller from a checked config, and run (or continue) the run."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from .._suggest import did_you_mean
from .config import ConfigError, resolve

__all__ = ["run_distill", "run_resume"]


def _build(section: dict, what: str, key: str = "factory"):
    obj = resolve(section[key], f"{what}.{key}")
    kwargs = section.get("kwargs", {})
    import torch  # noqa: PLC0415

    if isinstance(obj, torch.nn.Module) and not kwargs:
        return obj
    if not callable(obj):
        raise ConfigError(f"{what}.{key} = {section[key]!r} is a {type(obj).__name__}, not a factory")
    try:
        return obj(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}.{key} = {section[key]!r} failed with kwargs {kwargs}: {exc}") from exc


def _optimizer_factory(cfg: dict):
    from ..train.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS, default_optimizer  # noqa: PLC0415

    opt = dict(cfg.get("optimizer", {}))
    if "factory" in opt:
        fn = resolve(opt["factory"], "optimizer.factory")
        kwargs = opt.get("kwargs", {})
        return lambda params: fn(params, **kwargs)
    name = opt.pop("name", DEFAULT_OPTIMIZER)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name = {name!r}: unknown{did_you_mean(name, OPTIMIZERS)}; use one of "
                          f"{sorted(OPTIMIZERS)} or optimizer.factory")
    kwargs = {**opt.pop("kwargs", {}), **opt}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs.setdefault("lr", 1e-3)
    return default_optimizer(name, **kwargs)


def _scheduler_factory(cfg: dict, total_steps: int | None):
    import torch  # noqa: PLC0415

    from ..train.schedules import SCHEDULES, Constant  # noqa: PLC0415

    sch = cfg.get("scheduler")
    if not sch:
        return None
    if "factory" in sch:
        fn = resolve(sch["factory"], "scheduler.factory")
        kwargs = sch.get("kwargs", {})
        return lambda opt: fn(opt, **kwargs)
    name, warmup = sch.get("name", "constant"), int(sch.get("warmup_steps", 0))
    if name not in SCHEDULES:
        raise ConfigError(f"scheduler.name = {name!r}: unknown{did_you_mean(name, SCHEDULES)}; use one of "
                          f"{sorted(SCHEDULES)}")
    if name != "constant" and total_steps is None:
        raise ConfigError(f"scheduler.name = {name!r} needs the number of steps: the train loader has no len()")
    total = max(1, (total_steps or 1) - warmup)
    # After a linear warm-up, the LR factor follows the schedule of that name (fastkd.schedules) from 1 to 0.
    shape = Constant(1.0) if name == "constant" else SCHEDULES[name](1.0, 0.0, steps=total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return shape(step - warmup)

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def run_distill(cfg: dict, out: str | None, resume: bool = False) -> list:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ..train.config import DistillerConfig  # noqa: PLC0415
    from ..train.distiller import Distiller  # noqa: PLC0415

    out = out or cfg.get("out")
    if not out:
        raise ConfigError("no run folder: give --out DIR or `out = \"DIR\"` in the config")
    for p in (cfg["_base_dir"], str(Path.cwd())):
        if p not in sys.path:
            sys.path.insert(0, p)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    teacher = _build(cfg["teacher"], "teacher")
    student = _build(cfg["student"], "student")
    for what, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{what}.factory returned a {type(model).__name__}, not a torch.nn.Module")
        if "checkpoint" in cfg[what]:
            _load_weights(model, cfg[what]["checkpoint"], what)
    data_kwargs = cfg["data"].get("kwargs", {})
    train = resolve(cfg["data"]["train"], "data.train")
    train = train(**data_kwargs) if callable(train) else train
    evald = None
    if "eval" in cfg["data"]:
        evald = resolve(cfg["data"]["eval"], "data.eval")
        evald = evald(**data_kwargs) if callable(evald) else evald
    tr = dict(cfg.get("train", {}))
    epochs = int(tr.pop("epochs", 1))
    options = DistillerConfig(**cfg.get("loss", {}), **tr, run_dir=out,
                              config={k: v for k, v in cfg.items() if k != "out"})  # the run's identity
    try:
        per_epoch = math.ceil(len(train) / options.accumulation_steps)
    except TypeError:
        per_epoch = None
    total = per_epoch * epochs if per_epoch is not None else None
    d = Distiller(teacher, student, _optimizer_factory(cfg), scheduler=_scheduler_factory(cfg, total),
                  options=options)
    history = d.fit(train, epochs=epochs, eval_loader=evald, resume=resume)
    print(f"run folder: {out} (step {d.state.step}, {d.state.skipped} skipped step(s))")
    if history:
        print("last evaluation: " + json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                                 for k, v in history[-1].items()}))
    return history


def _load_weights(model, path, what):
    import torch  # noqa: PLC0415

    from ..train.checkpoint import FORMAT, CheckpointError  # noqa: PLC0415

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what}.checkpoint {path} does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"{what}.checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: "
                              f"{exc})") from exc
    if isinstance(sd, dict) and sd.get("format") == FORMAT:
        sd = sd["student"]
    try:
        model.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{what}.checkpoint {path} does not fit the {what}: {exc}") from exc


def run_resume(run_dir: str) -> list:
    from ..train.run_dir import RunFolder  # noqa: PLC0415

    meta = RunFolder(run_dir).read_meta()
    if meta is None:
        raise ConfigError(f"{run_dir} is not a fastkd run folder (no run.json)")
    cfg = (meta.get("fingerprint") or {}).get("config") or {}
    if "teacher" not in cfg or "_base_dir" not in cfg:
        raise ConfigError(f"{run_dir} was not started by `fastkd distill`; resume it from Python "
                          "(Distiller.fit(..., resume=True))")
    return run_distill(cfg, out=run_dir, resume=True)
