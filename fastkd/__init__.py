"""fastkd: fused knowledge-distillation loss and gradient clipping for PyTorch."""

from ._ops import backend, empty_cache, extension_error
from .kd_loss import KDLoss, kd_loss
from .clip import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    nonfinite_flag,
    patch_torch_clip_grad,
    step_if_finite,
)
from . import reference

__version__ = "0.1.0"

__all__ = [
    "kd_loss", "KDLoss", "backend", "empty_cache", "extension_error", "reference", "__version__",
    "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm", "nonfinite_flag",
    "step_if_finite", "patch_torch_clip_grad", "Distiller",
]


def __getattr__(name):
    # The trainer is imported lazily: `import fastkd` for the ops stays light.
    if name in ("Distiller", "trainer", "schedules", "checkpoint"):
        import importlib  # noqa: PLC0415

        mod = importlib.import_module(".trainer" if name == "Distiller" else f".{name}", __name__)
        return mod.Distiller if name == "Distiller" else mod
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
