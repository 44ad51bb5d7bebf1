"""Optimizers by name (the CLI's ``[optimizer] name``): the one table of them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._suggest import did_you_mean

__all__ = ["OPTIMIZERS", "DEFAULT_OPTIMIZER", "default_optimizer"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
DEFAULT_OPTIMIZER = "adamw"


def default_optimizer(name: str = DEFAULT_OPTIMIZER, **kwargs) -> Callable:
    """An optimizer factory ``f(params)`` by name (see ``OPTIMIZERS``), with the optimizer's keyword arguments."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}{did_you_mean(name, OPTIMIZERS)}; use one of "
                         f"{sorted(OPTIMIZERS)} or a factory import path")
    cls = OPTIMIZERS[name]
    return lambda params: cls(params, **kwargs)
