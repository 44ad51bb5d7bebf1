"""Checkpoint I/O for the trainer: atomic writes, checked reads, RNG state capture.

A checkpoint is written to a temporary file in the destination's folder, flushed to disk and moved
over the destination with ``os.replace`` (atomic on POSIX and Windows): a crash or a kill at any
moment leaves either the old checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "save_atomic", "load_checkpoint", "rng_state", "set_rng_state", "FORMAT", "VERSION"]

FORMAT = "fastkd.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt or not a fastkd checkpoint."""


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not available everywhere
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic` from the trainer; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the checkpoint holds Python RNG state and optimizer hyper-parameters.
        # Only load checkpoints you trust (as with any pickle).
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                              "use another checkpoint (the run folder keeps last.pt and best.pt)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastkd trainer checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer fastkd (checkpoint version {ckpt['version']} > "
                              f"{VERSION}); upgrade fastkd to resume it")
    return ckpt


def rng_state() -> dict:
    """Every RNG the training loop may draw from: torch (CPU and CUDA), numpy, Python."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
