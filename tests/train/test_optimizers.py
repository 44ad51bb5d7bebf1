"""Optimizers by name."""

from __future__ import annotations

import pytest
import torch

from fastkd.train.optimizers import OPTIMIZERS, default_optimizer


def test_optimizers_by_name():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in OPTIMIZERS.items():
        assert type(default_optimizer(name, lr=0.1)(params)) is cls
    assert default_optimizer(lr=0.1)(params).defaults["lr"] == 0.1
    with pytest.raises(ValueError, match="unknown optimizer 'adamww' \\(did you mean 'adamw'\\?\\)"):
        default_optimizer("adamww")
