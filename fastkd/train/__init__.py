"""``fastkd.Distiller`` and its parts, one job each:

    distiller.py    the training loop (Distiller, Callback, TrainState)
    config.py       DistillerConfig: the options (names, types, defaults, checks, docs), in one place
    run_dir.py      the run folder: run.json, the run's fingerprint, the "holds another run" check
    metrics.py      metrics.csv, eval.csv, TensorBoard, the progress bar
    checkpoint.py   checkpoint files (atomic writes with a SHA-256 header, verified reads) and RNG state
    schedules.py    schedules of the temperature and the loss weights
    batches.py      batches and model outputs: splitting, moving to the device, windows
    stats.py        named sums on the device (one all_reduce, one host read)
    distributed.py  rank, world size and the object collectives
    optimizers.py   optimizers by name

The trainer is built on the public ops (``fastkd.ops``), not on the ``fastkd`` package namespace."""

from .checkpoint import CheckpointError
from .config import DistillerConfig, OptionError
from .distiller import Callback, Distiller, TrainState
from .run_dir import RunDirError

__all__ = ["Distiller", "DistillerConfig", "Callback", "CheckpointError", "OptionError", "RunDirError", "TrainState"]
