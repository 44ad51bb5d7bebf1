"""fastkd: fused knowledge-distillation loss and gradient clipping for PyTorch."""

from ._ops import backend, extension_error
from .kd_loss import KDLoss, kd_loss
from . import reference

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "backend", "extension_error", "reference", "__version__"]
