"""The ``fastkd distill`` config: its TOML schema, reading and checking a file, and import paths.

Errors name the file and the key, with the closest valid key or attribute (``did you mean``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .._suggest import did_you_mean
from ..train.config import toml_section

__all__ = ["ConfigError", "CONFIG_SCHEMA", "load_config", "resolve"]


class ConfigError(ValueError):
    """A bad option, config key or import path."""


# ---- the distill config --------------------------------------------------------------------------------
# section -> {key: type(s)}; "*" accepts anything JSON-able. Tables for teacher/student/data may also be
# given as a bare import-path string: teacher = "pkg.module:factory".
CONFIG_SCHEMA: dict[str, dict] = {
    "": {"out": str, "seed": int},
    # teacher.cache: the folder `fastkd cache-teacher` wrote; `fastkd distill` then distils offline from it
    # (the teacher is not built), and teacher.factory is needed by `fastkd cache-teacher` alone.
    "teacher": {"factory": str, "kwargs": dict, "checkpoint": str, "cache": str},
    "student": {"factory": str, "kwargs": dict, "checkpoint": str},
    "data": {"train": str, "eval": str, "kwargs": dict},
    "optimizer": {"name": str, "factory": str, "lr": (int, float), "weight_decay": (int, float),
                  "momentum": (int, float), "betas": list, "kwargs": dict},
    "scheduler": {"name": str, "factory": str, "warmup_steps": int, "kwargs": dict},
    # The Distiller's options (fastkd.train.config.DistillerConfig), and the number of epochs for fit().
    "loss": toml_section("loss"),
    "train": {"epochs": int, **toml_section("train")},
}
_REQUIRED = {"student": ("factory",), "data": ("train",)}


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
    if not {"factory", "cache"} & set(cfg.get("teacher", {})):
        raise ConfigError(f"{path}: missing teacher.factory (an import path 'package.module:factory'), or "
                          "teacher.cache (the folder of `fastkd cache-teacher`) to distil offline")
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
