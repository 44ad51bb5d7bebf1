"""Checkpoint I/O for the trainer: atomic, verified writes; checked reads; RNG state capture.

A checkpoint file is a fixed header followed by the ``torch.save`` payload::

    MAGIC (8 bytes) | SHA-256 of the payload (32 bytes) | payload length (8 bytes, little-endian) | payload

It is written to a temporary file in the destination's folder, flushed to disk and moved over the
destination with ``os.replace`` (atomic on POSIX and Windows): a crash or a kill at any moment leaves
either the old checkpoint or the new one, never a truncated file. Temporary files that a killed
writer left behind (``.last.pt.*.tmp``) are removed by the next save and by a resume.

On load the length and the digest are checked before anything is unpickled, so a flipped byte or a
truncation anywhere in the file is a :class:`CheckpointError`, never a silently different student.
Checkpoints written before the header existed (a bare ``torch.save`` zip file) still load, without
verification and with a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "save_atomic", "load_checkpoint", "read_verified", "remove_stale_temp_files",
           "rng_state", "set_rng_state", "FORMAT", "VERSION", "MAGIC"]

log = logging.getLogger("fastkd.train")

FORMAT = "fastkd.checkpoint"
VERSION = 1
# The file's first bytes. None of them equals the zip signature's ("PK\x03\x04") at the same place, so no
# single flipped byte turns a verified checkpoint into what reads as an old, unverified one.
MAGIC = b"FKDCKPT1"
_HEADER = struct.Struct("<8s32sQ")  # magic, sha256(payload), len(payload)
_ZIP = b"PK\x03\x04"  # torch.save's format: checkpoints written before the header


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt or not a fastkd checkpoint."""


def _temp_prefix(name: str) -> str:
    return f".{name}."


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files (``.<name>.*.tmp``; every checkpoint's when ``name`` is None) that a
    writer killed mid-write left in ``folder``. Only one process writes a run's checkpoints (rank 0),
    so any such file found before a write is a leftover. Returns the files removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"{_temp_prefix(name)}*.tmp" if name is not None else ".*.pt.*.tmp"
    removed = []
    for tmp in folder.glob(pattern):
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
    if removed:
        log.info("fastkd: removed %d temporary file(s) left by an interrupted checkpoint write in %s",
                 len(removed), folder)
    return removed


class _HashingWriter:
    """A write-only file that hashes what passes through it (torch.save writes its zip sequentially)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
    # No seek or tell: a writer that needed them would get an AttributeError, never a file whose digest is wrong.


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, behind a header with the payload's SHA-256: temp file in
    the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _HEADER.size)  # filled in below, once the payload's digest is known
            writer = _HashingWriter(f)
            torch.save(obj, writer)  # streamed: the payload is never held in memory whole
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, writer.sha256.digest(), writer.size))
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


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is unreadable or corrupt: {why}")


def read_verified(path: str | os.PathLike) -> tuple[bytes, bool]:
    """The ``torch.save`` payload of a checkpoint file and whether it was verified (False: a checkpoint
    written before checksums, loaded as is). CheckpointError for a missing, truncated or altered file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _corrupt(path, f"cannot read it ({exc})") from exc
    if data[:len(_ZIP)] == _ZIP:
        return data, False
    if len(data) < _HEADER.size:
        raise _corrupt(path, f"{len(data)} bytes, shorter than a checkpoint's header (truncated?)")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _corrupt(path, "not a fastkd checkpoint file (its first bytes are neither a fastkd checkpoint "
                       "header nor a torch.save file)")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise _corrupt(path, f"its payload is {len(payload)} bytes, the header says {length} (truncated or "
                       "altered)")
    if hashlib.sha256(payload).digest() != digest:
        raise _corrupt(path, "its SHA-256 checksum does not match its content (altered on disk)")
    return payload, True


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and verify a checkpoint written by :func:`save_atomic` from the trainer; CheckpointError if it
    is missing, corrupt (checksum or length), of another format or from a newer fastkd."""
    path = Path(path)
    payload, verified = read_verified(path)
    try:
        # weights_only=False: the checkpoint holds Python RNG state and optimizer hyper-parameters.
        # Only load checkpoints you trust (as with any pickle).
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # whatever a damaged unverified file makes the unpickler raise: one error
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastkd trainer checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer fastkd (checkpoint version {ckpt['version']} > "
                              f"{VERSION}); upgrade fastkd to resume it")
    if not verified:
        warnings.warn(f"fastkd: {path} was written before checkpoints carried a checksum; loading it without "
                      "verification (the next save writes a verified one)", stacklevel=2)
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
