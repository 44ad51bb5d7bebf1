"""The ``fastkd`` command line (also ``python -m fastkd``).

    fastkd demo [--out DIR] [--seeds N] ...      digits: teacher, scratch student, distilled student
    fastkd lm-demo [--out DIR] ...               byte-level LM distillation on the stdlib's sources
    fastkd distill --config FILE.toml [--out DIR]   your teacher, student and data (import paths)
    fastkd resume RUN_DIR                        continue an interrupted `distill` run

Errors in what the user gave (unknown options or config keys, import paths that do not resolve,
teacher/student outputs of different shapes, unusable checkpoints, a run folder holding another run)
end the command with one clear message and exit status 2, before anything is overwritten.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import sys
import time
from pathlib import Path

from .._suggest import did_you_mean
from ..train.config import toml_section

__all__ = ["main", "ConfigError", "load_config", "resolve", "CONFIG_SCHEMA"]


class ConfigError(ValueError):
    """A bad option, config key or import path."""


# ---- the distill config --------------------------------------------------------------------------------
# section -> {key: type(s)}; "*" accepts anything JSON-able. Tables for teacher/student/data may also be
# given as a bare import-path string: teacher = "pkg.module:factory".
CONFIG_SCHEMA: dict[str, dict] = {
    "": {"out": str, "seed": int},
    "teacher": {"factory": str, "kwargs": dict, "checkpoint": str},
    "student": {"factory": str, "kwargs": dict, "checkpoint": str},
    "data": {"train": str, "eval": str, "kwargs": dict},
    "optimizer": {"name": str, "factory": str, "lr": (int, float), "weight_decay": (int, float),
                  "momentum": (int, float), "betas": list, "kwargs": dict},
    "scheduler": {"name": str, "factory": str, "warmup_steps": int, "kwargs": dict},
    # The Distiller's options (fastkd.train.config.DistillerConfig), and the number of epochs for fit().
    "loss": toml_section("loss"),
    "train": {"epochs": int, **toml_section("train")},
}
_REQUIRED = {"teacher": ("factory",), "student": ("factory",), "data": ("train",)}


def load_config(path: str | Path) -> dict:
    """Read and validate a distill config (TOML). Raises ConfigError with the closest valid key."""
    try:
        import tomllib  # noqa: PLC0415  (Python 3.11+)
    except ModuleNotFoundError:  # Python 3.10: the same reader, packaged (a dependency there)
        import tomli as tomllib  # noqa: PLC0415

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is unreadable: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    cfg: dict = {}
    top_level_keys = set(CONFIG_SCHEMA[""]) | (set(CONFIG_SCHEMA) - {""})
    for key, value in raw.items():
        if key not in top_level_keys:
            raise ConfigError(f"{path}: unknown key or section {key!r}{did_you_mean(key, top_level_keys)}")
        if key in CONFIG_SCHEMA[""]:
            _check_type(path, key, value, CONFIG_SCHEMA[""][key])
            cfg[key] = value
            continue
        if isinstance(value, str) and key in ("teacher", "student"):
            value = {"factory": value}
        elif isinstance(value, str) and key == "data":
            value = {"train": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: [{key}] must be a table")
        schema = CONFIG_SCHEMA[key]
        for k, v in value.items():
            if k not in schema:
                raise ConfigError(f"{path}: unknown key {k!r} in [{key}]{did_you_mean(k, schema)}; valid keys: "
                                  f"{', '.join(sorted(schema))}")
            _check_type(path, f"{key}.{k}", v, schema[k])
        cfg[key] = dict(value)
    for section, keys in _REQUIRED.items():
        for k in keys:
            if k not in cfg.get(section, {}):
                raise ConfigError(f"{path}: missing {section}.{k} (an import path 'package.module:factory')")
    cfg["_base_dir"] = str(path.resolve().parent)
    return cfg


def _check_type(path, key, value, types) -> None:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{path}: {key} must be {' or '.join(t.__name__ for t in types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(f"{path}: {key} must be {' or '.join(t.__name__ for t in types)}, got "
                          f"{type(value).__name__} {value!r}")


def resolve(spec: str, what: str):
    """Import ``package.module:attr.sub`` and return the object; ConfigError with a hint if it fails."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{what} = {spec!r}: expected an import path 'package.module:factory'")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} = {spec!r}: cannot import module {mod_name!r} ({exc}); is its folder on the "
                          "path? (the config file's folder and the current folder are)") from None
    except Exception as exc:  # an error inside the user's module
        raise ConfigError(f"{what} = {spec!r}: importing {mod_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{what} = {spec!r}: {getattr(obj, '__name__', mod_name)!r} has no attribute "
                              f"{part!r}{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


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


# ---- argument parsing -----------------------------------------------------------------------------------
def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from ..demos.digits import DemoConfig  # noqa: PLC0415  (dataclass only; no sklearn import)
    from ..demos.byte_lm import LMDemoConfig  # noqa: PLC0415

    # allow_abbrev=False: a mistyped option is an error with a suggestion, never silently another option.
    p = argparse.ArgumentParser(prog="fastkd", description="Knowledge distillation with fused PyTorch ops.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs = {}

    def from_dataclass(sp, cls, help_):
        for name, f in cls.__dataclass_fields__.items():
            flag = "--" + name.replace("_", "-")
            if name == "out":
                sp.add_argument(flag, default=None, help="run folder (default: runs/<command>-<time>)")
            else:
                sp.add_argument(flag, type=type(f.default), default=f.default, help=f"{help_.get(name, '')} "
                                f"(default: {f.default})".strip())

    demo = sub.add_parser("demo", allow_abbrev=False,
                          help="digits: teacher vs student from scratch vs distilled student")
    from_dataclass(demo, DemoConfig, {"seeds": "seeds (teacher, scratch and distilled student each)",
                                      "threads": "torch threads; 0 = torch's default"})
    subs["demo"] = demo
    lm = sub.add_parser("lm-demo", allow_abbrev=False,
                        help="token-level: distil a byte-level transformer LM (stdlib sources)")
    from_dataclass(lm, LMDemoConfig, {})
    subs["lm-demo"] = lm
    dist = sub.add_parser("distill", allow_abbrev=False,
                          help="distil your own teacher into your student (TOML config)")
    dist.add_argument("--config", required=True, help="TOML file (see the README, section fastkd distill)")
    dist.add_argument("--out", default=None, help="run folder (overrides `out` in the config)")
    subs["distill"] = dist
    res = sub.add_parser("resume", allow_abbrev=False,
                         help="continue a `fastkd distill` run from its last checkpoint")
    res.add_argument("run_dir", help="the run folder")
    subs["resume"] = res
    return p, subs


def _unknown_option_error(parser, subs, argv, unknown) -> str:
    command = next((a for a in argv if a in subs), None)
    options = [o for a in (subs[command] if command else parser)._actions for o in a.option_strings]
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if flags:
        msgs = [f"unknown option {f!r}{did_you_mean(f, options)}" for f in flags]
    else:
        msgs = [f"unexpected argument {u!r}" for u in unknown]
    return "; ".join(msgs) + f". See `fastkd {command or ''} --help`.".replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in subs:
        print(f"fastkd: error: unknown command {argv[0]!r}{did_you_mean(argv[0], subs)}; commands: "
              f"{', '.join(subs)}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"fastkd: error: {_unknown_option_error(parser, subs, argv, unknown)}", file=sys.stderr)
        return 2

    from ..train.checkpoint import CheckpointError  # noqa: PLC0415
    from ..train.run_dir import RunDirError  # noqa: PLC0415

    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.command in ("demo", "lm-demo"):
            from dataclasses import fields  # noqa: PLC0415

            if args.command == "demo":
                from ..demos.digits import DemoConfig as C, run_demo as run  # noqa: PLC0415
            else:
                from ..demos.byte_lm import LMDemoConfig as C, run_lm_demo as run  # noqa: PLC0415
            values = {f.name: getattr(args, f.name) for f in fields(C)}
            values["out"] = values["out"] or f"runs/{args.command}-{stamp}"
            run(C(**values))
        elif args.command == "distill":
            run_distill(load_config(args.config), args.out)
        elif args.command == "resume":
            run_resume(args.run_dir)
    except (ConfigError, RunDirError, CheckpointError, ValueError) as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastkd: interrupted; the last checkpoint is intact (continue with `fastkd resume RUN_DIR`)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
