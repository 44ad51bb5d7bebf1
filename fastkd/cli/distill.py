"""``fastkd distill``, ``fastkd resume`` and ``fastkd cache-teacher``: build the teacher, student, data,
optimizer, scheduler and the Distiller from a checked config, and run (or continue) the run; or run the
config's teacher once over its data into a teacher cache, for offline distillation (``[teacher] cache``)."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import fields
from pathlib import Path

from .._suggest import did_you_mean
from .config import ConfigError, resolve

__all__ = ["run_distill", "run_resume", "run_cache_teacher"]

# The folders of a `fastkd cache-teacher` output: one cache per data split.
CACHE_SPLITS = {"train": "data.train", "eval": "data.eval"}


def _call(fn, args: tuple, kwargs: dict, what: str, fix: str):
    """``fn(*args, **kwargs)`` for the config key ``what``: whatever it raises becomes one ConfigError,
    with ``fix``, what to change."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # the user's factory, or a torch class given arguments it does not take
        given = f" (kwargs {kwargs})" if kwargs else ""
        raise ConfigError(f"{what} failed{given}: {type(exc).__name__}: {exc}; {fix}") from exc


def _build(section: dict, what: str, key: str = "factory"):
    obj = resolve(section[key], f"{what}.{key}")
    kwargs = section.get("kwargs", {})
    import torch  # noqa: PLC0415

    if isinstance(obj, torch.nn.Module) and not kwargs:
        return obj
    if not callable(obj):
        raise ConfigError(f"{what}.{key} = {section[key]!r} is a {type(obj).__name__}, not a factory")
    return _call(obj, (), kwargs, f"{what}.{key} = {section[key]!r}", f"fix the factory or [{what}] kwargs")


def _data(spec: str, kwargs: dict, what: str):
    """The loader of ``data.train`` / ``data.eval``: the object, or what its factory returns; an iterable."""
    obj = resolve(spec, what)
    if callable(obj) and not hasattr(obj, "__iter__"):
        obj = _call(obj, (), kwargs, f"{what} = {spec!r}", "fix the factory or [data] kwargs")
    if not hasattr(obj, "__iter__") and not hasattr(obj, "__getitem__"):
        raise ConfigError(f"{what} = {spec!r} gave a {type(obj).__name__}, not an iterable of batches: return a "
                          "DataLoader, a list of batches or a generator")
    return obj


def _no_ignored_keys(section: dict, name: str, used: set[str], why: str) -> None:
    ignored = sorted(set(section) - used)
    if ignored:
        raise ConfigError(f"[{name}] {', '.join(ignored)}: not read {why}; remove it or move it into [{name}] kwargs")


def _optimizer_factory(cfg: dict):
    from ..train.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS  # noqa: PLC0415

    opt = dict(cfg.get("optimizer", {}))
    if "factory" in opt:
        _no_ignored_keys(opt, "optimizer", {"factory", "kwargs"}, "with optimizer.factory (it gets kwargs alone)")
        fn = resolve(opt["factory"], "optimizer.factory")
        kwargs = opt.get("kwargs", {})
        what = f"[optimizer] factory = {opt['factory']!r}"
        fix = "it is called as factory(student.parameters(), **kwargs): fix it or [optimizer] kwargs"
        return lambda params: _call(fn, (params,), kwargs, what, fix)
    name = opt.pop("name", DEFAULT_OPTIMIZER)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name = {name!r}: unknown{did_you_mean(name, OPTIMIZERS)}; use one of "
                          f"{sorted(OPTIMIZERS)} or optimizer.factory")
    kwargs = {**opt.pop("kwargs", {}), **opt}
    if "betas" in kwargs:
        betas = kwargs["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
            raise ConfigError(f"[optimizer] betas = {betas!r}: give two numbers, e.g. betas = [0.9, 0.999]")
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs.setdefault("lr", 1e-3)
    cls = OPTIMIZERS[name]
    what = f"[optimizer] name = {name!r} ({cls.__name__})"
    fix = f"give [optimizer] only arguments that torch.optim.{cls.__name__} takes"
    return lambda params: _call(cls, (params,), kwargs, what, fix)


def _scheduler_factory(cfg: dict, total_steps: int | None):
    import torch  # noqa: PLC0415

    from ..train.schedules import SCHEDULES, Constant  # noqa: PLC0415

    sch = cfg.get("scheduler")
    if not sch:
        return None
    if "factory" in sch:
        _no_ignored_keys(sch, "scheduler", {"factory", "kwargs"}, "with scheduler.factory (it gets kwargs alone)")
        fn = resolve(sch["factory"], "scheduler.factory")
        kwargs = sch.get("kwargs", {})
        what = f"[scheduler] factory = {sch['factory']!r}"
        fix = "it is called as factory(optimizer, **kwargs): give its other arguments in [scheduler] kwargs"
        return lambda opt: _call(fn, (opt,), kwargs, what, fix)
    _no_ignored_keys(sch, "scheduler", {"name", "warmup_steps"},
                     "with scheduler.name (the built-in shapes take warmup_steps alone; use scheduler.factory to "
                     "pass arguments)")
    name, warmup = sch.get("name", "constant"), sch.get("warmup_steps", 0)
    if name not in SCHEDULES:
        raise ConfigError(f"scheduler.name = {name!r}: unknown{did_you_mean(name, SCHEDULES)}; use one of "
                          f"{sorted(SCHEDULES)}")
    if warmup < 0:
        raise ConfigError(f"[scheduler] warmup_steps = {warmup}: must be >= 0")
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


def _option_error(exc) -> ConfigError:
    """An OptionError of DistillerConfig (or fit's epochs) as the config key that sets it."""
    from ..train.config import DistillerConfig  # noqa: PLC0415

    sections = {f.name: f.metadata["section"] for f in fields(DistillerConfig)}
    section = "train" if exc.option == "epochs" else sections.get(exc.option)
    key = f"[{section}] {exc.option}" if section else {"train_loader": "data.train"}.get(exc.option, exc.option)
    msg = str(exc)
    for prefix in ("fastkd.Distiller.fit: ", "fastkd.Distiller: "):
        msg = msg.removeprefix(prefix)
    if msg.startswith(exc.option):  # "log_every must be >= 1" -> "[train] log_every must be >= 1"
        return ConfigError(f"{key}{msg[len(exc.option):]}")
    return ConfigError(f"{key}: {msg}")


def run_distill(cfg: dict, out: str | None, resume: bool | str = False) -> list:
    """Check the whole config (options, optimizer, scheduler, schedules over the run, data), then run it.
    Every check that can fail runs before the run folder is touched."""
    from ..train.config import DistillerConfig, OptionError  # noqa: PLC0415
    from ..train.distiller import Distiller  # noqa: PLC0415

    out = out or cfg.get("out")
    if not out:
        raise ConfigError("no run folder: give --out DIR or `out = \"DIR\"` in the config")
    tr = dict(cfg.get("train", {}))
    epochs = tr.pop("epochs", 1)
    if epochs < 1:
        raise ConfigError(f"[train] epochs = {epochs}: must be >= 1")
    try:
        options = DistillerConfig(**cfg.get("loss", {}), **tr, run_dir=out,
                                  config={k: v for k, v in cfg.items() if k != "out"})  # the run's identity
    except OptionError as exc:
        raise _option_error(exc) from None
    optimizer = _optimizer_factory(cfg)
    _prepare_imports_and_seed(cfg)
    offline = "cache" in cfg["teacher"]
    teacher = None if offline else _model(cfg, "teacher")  # offline: the cache stands for the teacher
    student = _model(cfg, "student")
    train, evald = _loaders(cfg)
    cache = None
    if offline:  # the loaders' batches carry their examples' cached top-k
        caches = _open_caches(cfg["teacher"]["cache"], train, evald)
        cache, train = caches["train"]
        evald = caches["eval"][1] if "eval" in caches else evald
    try:
        per_epoch = math.ceil(len(train) / options.accumulation_steps)
    except TypeError:
        per_epoch = None
    total = per_epoch * epochs if per_epoch is not None else None
    # The Distiller builds the optimizer on the student's parameters and the scheduler on it: the factories'
    # trial, before anything is written; fit() checks the schedules at step 0 and at the run's last step.
    d = Distiller(teacher, student, optimizer, scheduler=_scheduler_factory(cfg, total), options=options,
                  teacher_cache=cache)
    try:
        history = d.fit(train, epochs=epochs, eval_loader=evald, resume=resume)
    except OptionError as exc:
        raise _option_error(exc) from None
    print(f"run folder: {out} (step {d.state.step}, {d.state.skipped} skipped step(s))")
    if history:
        print("last evaluation: " + json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                                 for k, v in history[-1].items()}))
    return history


def _prepare_imports_and_seed(cfg: dict) -> None:
    """The config's folder and the current folder on the import path; the config's seed everywhere."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    for p in (cfg["_base_dir"], str(Path.cwd())):
        if p not in sys.path:
            sys.path.insert(0, p)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _model(cfg: dict, what: str):
    """The teacher or student of the config: its factory's module, with its checkpoint's weights."""
    import torch  # noqa: PLC0415

    model = _build(cfg[what], what)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{what}.factory returned a {type(model).__name__}, not a torch.nn.Module")
    if "checkpoint" in cfg[what]:
        _load_weights(model, cfg[what]["checkpoint"], what)
    return model


def _loaders(cfg: dict) -> tuple:
    """The loaders of data.train and data.eval (None without one)."""
    data_kwargs = cfg["data"].get("kwargs", {})
    train = _data(cfg["data"]["train"], data_kwargs, "data.train")
    evald = _data(cfg["data"]["eval"], data_kwargs, "data.eval") if "eval" in cfg["data"] else None
    return train, evald


def _dataset_of(loader, key: str, command: str):
    """The map-style dataset behind the DataLoader of ``key``: the teacher cache is per example."""
    from torch.utils.data import DataLoader  # noqa: PLC0415

    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        raise ConfigError(f"{key}: {command} needs a torch.utils.data.DataLoader with a batch_size over a map-style "
                          f"dataset (the teacher cache is stored per example), got {type(loader).__name__}")
    return loader.dataset


def _open_caches(folder: str, train, evald) -> dict:
    """{split: (TeacherCache, the split's loader with the cache)} for the splits of ``folder`` (a
    `fastkd cache-teacher` output): train must be there, eval is used when there (else the evaluation has
    no teacher metrics). Each cache is checked against its data: length and items (one read of them)."""
    from ..data.teacher_cache import TeacherCache, TeacherCacheError, with_teacher_cache  # noqa: PLC0415

    root = Path(folder)
    if not (root / "train").is_dir():
        raise ConfigError(f"[teacher] cache = {folder!r}: no teacher cache there ({root / 'train'} is missing); build "
                          f"it with `fastkd cache-teacher --config FILE --top-k K --out {folder}`")
    out = {}
    for split, loader in (("train", train), ("eval", evald)):
        if loader is None or not (root / split).is_dir():
            if loader is not None:
                print(f"[teacher] cache: no {root / split}: the evaluation has no teacher metrics (build the cache "
                      "again with data.eval in the config to get them)")
            continue
        _dataset_of(loader, CACHE_SPLITS[split], "[teacher] cache")
        try:
            cache = TeacherCache(root / split)
            out[split] = (cache, with_teacher_cache(loader, cache, check_data=True))
        except TeacherCacheError as exc:
            raise ConfigError(f"[teacher] cache = {folder!r} ({CACHE_SPLITS[split]}): {exc}") from None
    return out


def run_cache_teacher(cfg: dict, out: str, top_k: int, *, batch_size: int = 8, dtype: str = "float16",
                      device: str | None = None) -> dict:
    """Run the config's teacher once over data.train (and data.eval) into ``out/train`` (``out/eval``):
    a teacher cache each, for ``[teacher] cache = "OUT"``. Resumable: the same command again finishes an
    interrupted build and reuses a finished one."""
    from ..data.teacher_cache import TeacherCache  # noqa: PLC0415

    if "factory" not in cfg["teacher"]:
        raise ConfigError("fastkd cache-teacher needs teacher.factory (the teacher to run) in the config")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    _prepare_imports_and_seed(cfg)
    teacher = _model(cfg, "teacher")
    if device is not None:
        teacher.to(device)
    train, evald = _loaders(cfg)
    datasets = {"train": _dataset_of(train, "data.train", "fastkd cache-teacher")}
    if evald is not None:
        datasets["eval"] = _dataset_of(evald, "data.eval", "fastkd cache-teacher")
    caches = {}
    for split, dataset in datasets.items():
        caches[split] = TeacherCache.build(Path(out) / split, teacher, dataset, top_k=top_k, batch_size=batch_size,
                                           dtype=dtype, device=device)
        print(f"{split}: {caches[split]}")
    print(f"teacher cache: {out} (use it with `[teacher] cache = \"{out}\"` in the config)")
    return caches


def _load_weights(model, path, what):
    import io  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..train.checkpoint import FORMAT, CheckpointError, read_verified  # noqa: PLC0415

    try:
        payload, verified = read_verified(path)  # a fastkd checkpoint is verified; a plain state_dict read as is
    except CheckpointError as exc:
        raise CheckpointError(f"{what}.checkpoint: {exc}") from None
    try:
        # A fastkd checkpoint also holds RNG states (numpy arrays, Python tuples): read it as `resume` does
        # (trust it as you would the run); a plain state_dict is read with weights_only.
        sd = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=not verified)
    except Exception as exc:
        raise CheckpointError(f"{what}.checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: "
                              f"{exc})") from exc
    if isinstance(sd, dict) and sd.get("format") == FORMAT:
        sd = sd["student"]
    try:
        model.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{what}.checkpoint {path} does not fit the {what}: {exc}") from exc


def run_resume(run_dir: str, checkpoint: str = "last") -> list:
    """Continue a ``fastkd distill`` run from ``checkpoint``: "last", "best" or a checkpoint file's path."""
    from ..train.run_dir import RunDirError, RunFolder  # noqa: PLC0415

    folder = RunFolder(run_dir)
    meta = folder.read_meta()
    if meta is None:
        raise ConfigError(f"{run_dir} is not a fastkd run folder (no run.json)")
    cfg = (meta.get("fingerprint") or {}).get("config") or {}
    if "teacher" not in cfg or "_base_dir" not in cfg:
        raise ConfigError(f"{run_dir} was not started by `fastkd distill`; resume it from Python "
                          "(Distiller.fit(..., resume=True))")
    path = folder.checkpoint(f"{checkpoint}.pt") if checkpoint in ("last", "best") else Path(checkpoint)
    if not path.is_file():
        if not any(folder.checkpoint(n).is_file() for n in ("last.pt", "best.pt")):
            raise RunDirError(f"{run_dir} holds no checkpoint: its run stopped before its first checkpoint. Start "
                              f"it again with `fastkd distill --config FILE --out {run_dir}` (a run folder without a "
                              "checkpoint is reused)")
        raise RunDirError(f"{run_dir}: no checkpoint {path}; use --checkpoint last, best or a checkpoint's path")
    return run_distill(cfg, out=run_dir, resume=True if checkpoint == "last" else str(path))
