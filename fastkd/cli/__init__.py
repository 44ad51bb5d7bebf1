"""The ``fastkd`` command line (also ``python -m fastkd``).

    fastkd demo [--out DIR] [--seeds N] ...      digits: teacher, scratch student, distilled student
    fastkd lm-demo [--out DIR] ...               byte-level LM distillation on the stdlib's sources
    fastkd distill --config FILE.toml [--out DIR]   your teacher, student and data (import paths)
    fastkd resume RUN_DIR [--checkpoint best]    continue an interrupted `distill` run

Errors in what the user gave (unknown options or config keys, import paths that do not resolve,
teacher/student outputs of different shapes, unusable checkpoints, a run folder holding another run)
end the command with one clear message and exit status 2, before anything is overwritten.

    config.py   the distill config: TOML schema, reading and checking, import paths
    distill.py  building a run from a config; distill and resume
    main.py     the commands: argument parsing, errors, exit status
"""

from .config import CONFIG_SCHEMA, ConfigError, load_config, resolve
from .main import main

__all__ = ["main", "ConfigError", "load_config", "resolve", "CONFIG_SCHEMA"]
