"""``fastkd.Distiller`` and its parts: the training loop (distiller.py), checkpoints (checkpoint.py)
and the hyper-parameter schedules (schedules.py). The trainer is built on the public ops
(``fastkd.ops``), not on the ``fastkd`` package namespace."""

from .distiller import Callback, Distiller, RunDirError, TrainState

__all__ = ["Distiller", "Callback", "RunDirError", "TrainState"]
