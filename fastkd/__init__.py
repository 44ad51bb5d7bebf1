"""fastkd: fused knowledge-distillation loss and gradient clipping for PyTorch."""

from . import reference
from ._extension import backend, empty_cache, extension_error, kernel_info
from ._version import version as _version
from .ops.clip import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    nonfinite_flag,
    patch_torch_clip_grad,
    step_if_finite,
)
from .ops.fused_linear import (
    FusedLinearKDLoss,
    FusedLinearTopKKDLoss,
    fused_linear_kd_loss,
    fused_linear_topk_kd_loss,
)
from .ops.kd import KDLoss, KDTerms, kd_loss
from .ops.labels import shift_labels
from .ops.topk import TopKKDLoss, topk_kd_loss

__version__ = _version()

__all__ = [
    "kd_loss", "KDLoss", "KDTerms", "topk_kd_loss", "TopKKDLoss", "shift_labels", "backend", "kernel_info", "empty_cache", "extension_error", "reference", "__version__",
    "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm", "nonfinite_flag",
    "step_if_finite", "patch_torch_clip_grad", "Distiller", "DistillerConfig", "schedules", "TeacherCache",
    "CachedTeacherDataset", "with_teacher_cache", "fused_linear_kd_loss", "FusedLinearKDLoss",
    "fused_linear_topk_kd_loss", "FusedLinearTopKKDLoss",
]

# The trainer and the teacher cache are imported lazily: `import fastkd` for the ops stays light.
_LAZY = {"Distiller": ("fastkd.train", "Distiller"), "DistillerConfig": ("fastkd.train", "DistillerConfig"),
         "schedules": ("fastkd.train.schedules", None), "TeacherCache": ("fastkd.data", "TeacherCache"),
         "CachedTeacherDataset": ("fastkd.data", "CachedTeacherDataset"),
         "with_teacher_cache": ("fastkd.data", "with_teacher_cache")}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
