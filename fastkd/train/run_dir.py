"""The run folder: which run it holds (``run.json``: versions and the run's fingerprint), where its
checkpoints go, and the rule that a run never writes into a folder holding anything else.

    run_dir/run.json            {"fastkd_version", "torch_version", "fingerprint"}
    run_dir/checkpoints/        last.pt, best.pt (checkpoint.py)
    run_dir/metrics.csv, eval.csv, tensorboard/   (metrics.py)

The fingerprint is what must match for a folder to hold *this* run: the models' classes and size, the
optimizer and its hyper-parameters, the scheduler, the schedules as given, the options marked
``identity`` in :class:`~fastkd.train.config.DistillerConfig`, and the world size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import version as _fastkd_version

if TYPE_CHECKING:
    from .config import DistillerConfig

__all__ = ["RunDirError", "RunFolder", "fingerprint", "refuse_non_empty", "jsonable", "writing"]

log = logging.getLogger("fastkd.train")


class RunDirError(RuntimeError):
    """The run folder holds another run (or this run, which should be resumed rather than overwritten), or
    cannot be written (full, read-only, not a folder)."""


@contextlib.contextmanager
def writing(folder: Path):
    """Writes into the run folder ``folder``: an OSError (no space left, a read-only or unwritable folder, a
    file where the folder should be) becomes one RunDirError naming the folder and what to do. Only the
    run folder's own writes go through here, so an OSError of the user's data or models is never renamed."""
    try:
        yield
    except OSError as exc:
        what = {errno.ENOSPC: "no space is left on its device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "it is on a read-only file system", errno.EACCES: "it is not writable (permission denied)",
                errno.EPERM: "it is not writable (operation not permitted)"}.get(exc.errno, exc.strerror or str(exc))
        where = f" (writing {exc.filename})" if exc.filename else ""
        fix = "Free space on it" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "Make it writable"
        raise RunDirError(f"cannot write to the run folder {folder}: {what}{where}. {fix} or choose another run "
                          "folder (run_dir, `--out`); the checkpoints already written are intact (written "
                          "atomically)") from exc


def jsonable(x):
    """``x`` as it reads back from JSON (tuples become lists, unknown objects their ``str``)."""
    return json.loads(json.dumps(x, default=str))


def fingerprint(*, teacher: dict, student, optimizer, scheduler, schedules: dict, options: DistillerConfig,
                world_size: int) -> dict:
    """The run's identity (compared on resume and on reuse of a folder). ``teacher``: what identifies the
    teacher side (``{"teacher": class name or None}``, and ``"teacher_cache"``: the cache's identity, when
    the run distils from one); ``schedules``: their descriptions as given, before the trainer fills in open
    lengths."""
    return jsonable({
        **teacher,
        "student": type(student).__qualname__,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "optimizer": type(optimizer).__name__,
        "optimizer_defaults": {k: v for k, v in optimizer.defaults.items()
                               if isinstance(v, (int, float, str, bool))},
        "scheduler": None if scheduler is None else type(scheduler).__name__,
        "schedules": schedules,
        **options.identity(),
        "world_size": world_size,
    })


def refuse_non_empty(folder: Path, advice: str) -> None:
    """RunDirError unless ``folder`` is missing or empty: a run never writes among files it does not know."""
    if folder.exists() and any(folder.iterdir()):
        raise RunDirError(f"run folder {folder} exists and is not empty{advice}")


class RunFolder:
    """The paths of a run folder, its run.json, and the check that it may hold a given run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = self.path / "run.json"
        self.last = self.checkpoint("last.pt")

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    def read_meta(self) -> dict | None:
        """run.json's content; None when there is none; RunDirError when it is unreadable."""
        if not self.meta.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{self.meta} is unreadable ({exc}); not touching {self.path}") from exc
        return meta

    def write_meta(self, fingerprint: dict) -> None:
        """run.json, atomically (temporary file, then ``os.replace``)."""
        meta = {"fastkd_version": _fastkd_version(), "torch_version": torch.__version__, "fingerprint": fingerprint}
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / ".run.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, self.meta)

    def check(self, fingerprint: dict, resume: Any) -> None:
        """RunDirError unless this folder may take the run: a new or empty folder for a new run, or a
        folder holding this very run (same fingerprint) to resume it. ``resume``: False, True (from
        checkpoints/last.pt) or a checkpoint path."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run folder {self.path} is a file, not a folder; choose a new or empty folder")
        meta = self.read_meta()
        if meta is not None and not self.has_checkpoint():
            # A run that stopped before its first checkpoint (a failure at the first step, say): nothing in
            # the folder can be resumed, so it is reused for whichever run comes next; its logs are rewritten.
            if resume is True:
                raise RunDirError(f"{self.path} holds no checkpoint to resume: its run stopped before its first "
                                  "checkpoint. Start the run again in this folder (Distiller.fit(resume=False), "
                                  f"`fastkd distill --config FILE --out {self.path}`): a run folder without a "
                                  "checkpoint is reused")
            if not resume:
                log.warning("fastkd.Distiller: %s holds a run that never saved a checkpoint; reusing the folder "
                            "for this run", self.path)
                return
        if meta is not None:
            theirs = meta.get("fingerprint")
            if theirs != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(theirs or {})
                              if (theirs or {}).get(k) != fingerprint.get(k))
                raise RunDirError(
                    f"run folder {self.path} already holds a different run (differs in: {', '.join(diff)}); "
                    "nothing was overwritten. Choose another run folder, or resume with the run's own settings.")
            if not resume:
                raise RunDirError(f"run folder {self.path} already holds this run (checkpoint {self.last}); resume "
                                  "it (Distiller.fit(resume=True), `fastkd resume DIR`) or choose another folder")
        elif resume:
            raise RunDirError(f"{self.path} holds no run to resume (no run.json)")
        else:
            refuse_non_empty(self.path, " (and holds no fastkd run); choose a new or empty folder")
        if resume is True and not self.last.exists():
            raise RunDirError(f"{self.path} holds no checkpoint to resume (no {self.last}); resume from its "
                              f"best checkpoint (Distiller.fit(resume=\"{self.checkpoint('best.pt')}\"), "
                              f"`fastkd resume {self.path} --checkpoint best`)")

    def has_checkpoint(self) -> bool:
        """Whether the folder holds a checkpoint (last.pt or best.pt) that a run could be resumed from."""
        return any(self.checkpoint(name).is_file() for name in ("last.pt", "best.pt"))
