"""A teacher's top-k logits on disk, for offline distillation: built once, read memory-mapped.

    cache_dir/manifest.json              what the cache is (format, identity, shards, checksums)
    cache_dir/shard-00000.safetensors    values [P, K] (float16 or bfloat16), indices [P, K] int32,
    cache_dir/shard-00001.safetensors    offsets [n + 1] int64 (example j's positions are
    ...                                  offsets[j]:offsets[j + 1]), P = the shard's positions

A *position* is one row of the teacher's logits: an example's logits ``[..., V]`` (the batch
dimension removed) are flattened to ``[n_i, V]``, and the cache keeps, per position, the K largest
logits (raw, sorted in descending order) and their vocabulary indices. ``cache[i]`` is example i's
``(values [n_i, K], indices [n_i, K])``.

Why it is laid out so:

- **Per-example offsets live in the shards**, the manifest keeps one record per shard (its examples,
  positions, byte size and SHA-256). A manifest with an entry per example would be megabytes for a
  corpus of millions of examples and would be rewritten after every shard.
- **Writes are atomic per shard.** A shard is serialised in memory, written to a temporary file in
  the folder, fsynced and renamed (``os.replace``); only then is it added to the manifest, which is
  itself replaced atomically. A kill at any moment loses at most the shard being written; the next
  ``build`` removes the temporary files and any shard file the manifest does not list, checks that
  the finished shards were made from the same data, and runs the teacher on the rest only.
- **Identity is checked, never assumed.** The manifest holds the teacher's fingerprint (a SHA-256
  over its ``state_dict``: names, dtypes, shapes, bytes), top_k, the vocabulary size, the dtypes, the
  autocast dtype, the number of examples, and per shard a SHA-256 of the dataset items it was built
  from. ``build`` on a folder holding another cache refuses with what differs, and writes nothing.
  The manifest carries a SHA-256 of its own content and every shard repeats the identity in its
  header, so an edited manifest (vocabulary, top_k, length) is an error, not a misread.
- **Reading verifies.** Opening checks the manifest and every shard's byte size (a ``stat`` each);
  by default (``verify="lazy"``) a shard's SHA-256 is checked the first time this process reads from
  it: one sequential read and hash of each shard per process, spread over the first epoch
  (bench/bench_cache.py measures its throughput, ``verify_gbps``, and its share of a batch's read).
  ``verify="open"`` checks every shard when the cache is opened (do it in the main process before
  DataLoader workers start: they inherit what was verified), ``verify="size"`` skips the checksum
  (a flipped byte then goes unnoticed). A truncated, corrupt or mismatched shard is a
  :class:`TeacherCacheError`, never wrong numbers.
- **float16 values by default.** Logits are sums of many terms with magnitudes in the tens: float16
  keeps 11 significant bits over that range where bfloat16 keeps 8, so its rounding error is 8x
  smaller (bench/bench_cache.py measures both), and its range (65504) is far above any logit. A
  logit float16 cannot hold is an error that names ``dtype=torch.bfloat16``. Under bfloat16 autocast
  the logits arrive in bfloat16 and float16 holds them exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import operator
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .._suggest import did_you_mean
from .._version import version as _fastkd_version
from ..train.batches import CachedExample, logits_of, split_batch, to_device

__all__ = ["TeacherCache", "TeacherCacheError", "CachedTeacherDataset", "CachedExample", "with_teacher_cache",
           "teacher_fingerprint"]

log = logging.getLogger("fastkd.data")

FORMAT = "fastkd.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
VERIFY = ("lazy", "open", "size")
DEFAULT_SHARD_BYTES = 256 * 2**20
_SHARD = re.compile(r"^shard-(\d{5,})\.safetensors$")
_TEMP = re.compile(r"^\.(manifest\.json|shard-\d{5,}\.safetensors)\..*\.tmp$")
_ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16"}
_INT32_MAX = 2**31 - 1


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete, corrupt, or not the one asked for."""


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path``: a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX); not available everywhere
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _hash_item(h, obj) -> None:
    """Feed a dataset item's content (tensors, arrays, numbers, strings, through dicts and sequences) to h."""
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        _hash_tensor(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(f"K{k!r}".encode())
            _hash_item(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        h.update(f"S{len(obj)}".encode())
        for v in obj:
            _hash_item(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())
    else:
        raise TypeError(f"fastkd.TeacherCache.build: cannot fingerprint a dataset item holding "
                        f"{type(obj).__name__}; items must be made of tensors, numpy arrays, numbers and strings "
                        "(through dicts, tuples and lists)")


def _signature(obj):
    """What must match for items to be stacked by ``default_collate``: the structure and every tensor's
    shape and dtype."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return ("T", str(obj.dtype), tuple(obj.shape))
    if isinstance(obj, Mapping):
        return ("M", tuple((k, _signature(obj[k])) for k in sorted(obj, key=str)))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_signature(v) for v in obj))
    return (type(obj).__name__,)


def teacher_fingerprint(teacher: torch.nn.Module) -> dict:
    """The teacher's identity: its class and a SHA-256 over its ``state_dict`` (names, dtypes, shapes and
    bytes, in name order). Costs one read of the weights (a copy to the host, tensor by tensor)."""
    h = hashlib.sha256()
    n_tensors = n_bytes = 0
    for name, value in sorted(teacher.state_dict().items()):
        h.update(f"N{name}".encode())
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, value)
            n_tensors += 1
            n_bytes += value.numel() * value.element_size()
        else:  # extra state
            _hash_item(h, value)
    return {"class": type(teacher).__qualname__, "sha256": h.hexdigest(), "tensors": n_tensors, "bytes": n_bytes}


def _check_map_style(dataset, who: str) -> int:
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"{who}: dataset must be map-style (len(dataset) and dataset[i]), got "
                        f"{type(dataset).__name__}; the cache pairs entries with examples by index, so materialise "
                        "an iterable dataset into a list or a map-style torch.utils.data.Dataset first")
    return len(dataset)


def _positive_int(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fastkd.TeacherCache.build: {name} must be a positive integer ({what}), got {value!r}")
    return value


class TeacherCache:
    """A finished teacher cache, opened memory-mapped: ``len(cache)`` examples, ``cache[i]`` ->
    ``(values [n_i, K], indices [n_i, K] int32)``.

    ``verify``: ``"lazy"`` (each shard's SHA-256 checked on this process's first read from it),
    ``"open"`` (every shard's now) or ``"size"`` (byte sizes and headers only). ``expect_examples``,
    ``expect_vocab``, ``expect_top_k``: what the caller needs (:meth:`check`), a
    :class:`TeacherCacheError` otherwise. Build one with :meth:`build`.
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "lazy", expect_examples: int | None = None,
                 expect_vocab: int | None = None, expect_top_k: int | None = None):
        if verify not in VERIFY:
            raise ValueError(f"fastkd.TeacherCache: verify must be one of {', '.join(VERIFY)}, got {verify!r}"
                             f"{did_you_mean(verify, VERIFY)}")
        self.path = Path(path)
        self.verify_mode = verify
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise TeacherCacheError(f"{self.path} holds no teacher cache (no {MANIFEST}); build one with "
                                    "fastkd.TeacherCache.build(path, teacher, dataset, top_k=...)")
        if not manifest["complete"]:
            done = sum(s["num_examples"] for s in manifest["shards"])
            raise TeacherCacheError(f"the teacher cache in {self.path} is incomplete: its build stopped after {done} "
                                    f"of {manifest['identity']['num_examples']} examples; run "
                                    "fastkd.TeacherCache.build again with the same teacher and dataset to finish it")
        self._manifest = manifest
        ident = manifest["identity"]
        self._dtype = DTYPES[ident["values_dtype"]]
        shards = manifest["shards"]
        self._firsts = [s["first_example"] for s in shards]
        for s, rec in enumerate(shards):
            _check_size(self.path, s, rec)
        self._verified: set[int] = set()
        self._open: dict[int, tuple] = {}
        self.check(examples=expect_examples, vocab_size=expect_vocab, top_k=expect_top_k)
        if verify == "open":
            self.verify()

    # -- what the cache is --------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self._manifest["identity"]["top_k"]

    @property
    def vocab_size(self) -> int:
        return self._manifest["identity"]["vocab_size"]

    @property
    def dtype(self) -> torch.dtype:
        """The values' dtype (the indices are int32)."""
        return self._dtype

    @property
    def num_tokens(self) -> int:
        """Positions (rows of teacher logits) over all examples."""
        return self._manifest["num_positions"]

    @property
    def nbytes(self) -> int:
        """The shards' size on disk (the manifest aside)."""
        return sum(s["bytes"] for s in self._manifest["shards"])

    @property
    def bytes_per_token(self) -> float:
        """Bytes on disk per position: K x (value + 4-byte index), plus offsets and headers."""
        return self.nbytes / max(self.num_tokens, 1)

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    def __len__(self) -> int:
        return self._manifest["identity"]["num_examples"]

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}: {len(self)} examples, {self.num_tokens} positions, top_k={self.top_k}, "
                f"vocab_size={self.vocab_size}, {str(self.dtype).removeprefix('torch.')}, "
                f"{self.bytes_per_token:.1f} bytes/position)")

    def check(self, *, examples: int | None = None, vocab_size: int | None = None, top_k: int | None = None) -> None:
        """A :class:`TeacherCacheError` unless the cache was built for this many examples, this
        vocabulary and this top_k (None: not checked)."""
        wrong = [f"{what} {have} (expected {want})" for what, have, want in
                 (("examples", len(self), examples), ("vocab_size", self.vocab_size, vocab_size),
                  ("top_k", self.top_k, top_k)) if want is not None and have != want]
        if wrong:
            raise TeacherCacheError(f"the teacher cache in {self.path} was built for another dataset or teacher: it has "
                                    f"{', '.join(wrong)}; build a cache for this one in another folder")

    def verify(self) -> None:
        """Check every shard's SHA-256 now (one read of the whole cache)."""
        for s in range(len(self._firsts)):
            self._verify(s)

    def check_dataset(self, dataset) -> None:
        """A :class:`TeacherCacheError` unless ``dataset`` is the one the cache was built from: the same
        length and, shard by shard, the same items (their SHA-256; one read of the whole dataset)."""
        self.check(examples=_check_map_style(dataset, "fastkd.TeacherCache.check_dataset"))
        _check_items(self.path, self._manifest, dataset)

    # -- reading ------------------------------------------------------------------------------------
    def __getitem__(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"fastkd.TeacherCache: an example index must be an integer, got {type(i).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"fastkd.TeacherCache: example {i} out of range for a cache of {n} examples")
        i %= n
        s = bisect.bisect_right(self._firsts, i) - 1
        values, indices, offsets = self._shard(s)
        j = i - self._firsts[s]
        a, b = offsets[j], offsets[j + 1]
        return values[a:b], indices[a:b]

    def _verify(self, s: int) -> None:
        if s in self._verified:
            return
        rec = self._manifest["shards"][s]
        _check_size(self.path, s, rec)
        if _file_sha256(self.path / rec["file"]) != rec["sha256"]:
            raise TeacherCacheError(f"{self.path / rec['file']} is corrupt (its SHA-256 is not the one the manifest "
                                    f"recorded); delete {self.path} and build the cache again")
        self._verified.add(s)

    def _shard(self, s: int):
        """Shard s's (values slice, indices slice, offsets list), opened and checked on first use."""
        opened = self._open.get(s)
        if opened is not None:
            return opened
        if self.verify_mode != "size":
            self._verify(s)
        rec, ident = self._manifest["shards"][s], self._manifest["identity"]
        file = self.path / rec["file"]

        def bad(why):
            return TeacherCacheError(f"{file} does not match {self.path / MANIFEST}: {why}; delete {self.path} and "
                                     "build the cache again")

        try:
            handle = safe_open(str(file), framework="pt")
            meta = json.loads((handle.metadata() or {}).get("fastkd", "null"))
            values, indices = handle.get_slice("values"), handle.get_slice("indices")
            offsets = handle.get_tensor("offsets")
        except Exception as exc:  # safetensors raises its own error types for a malformed file
            raise bad(f"unreadable ({exc})") from exc
        want = _shard_meta(ident, s, rec)
        if meta != want:
            diff = sorted(k for k in set(want) | set(meta or {}) if (meta or {}).get(k) != want.get(k))
            raise bad(f"its header says otherwise about {', '.join(diff)}")
        P, K = rec["num_positions"], ident["top_k"]
        for name, sl, dt in (("values", values, _ST_DTYPE[self._dtype]), ("indices", indices, "I32")):
            if list(sl.get_shape()) != [P, K] or sl.get_dtype() != dt:
                raise bad(f"{name} is {sl.get_dtype()} {sl.get_shape()}, expected {dt} [{P}, {K}]")
        offs = offsets.tolist()
        if (offsets.dtype != torch.int64 or len(offs) != rec["num_examples"] + 1 or offs[0] != 0 or offs[-1] != P
                or any(a > b for a, b in zip(offs, offs[1:]))):
            raise bad("its example offsets are inconsistent")
        self._open[s] = (values, indices, offs)
        return self._open[s]

    def __getstate__(self):  # DataLoader workers under spawn: the handles are reopened there
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | os.PathLike, teacher: torch.nn.Module, dataset, *, top_k: int, batch_size: int = 8,
              dtype: torch.dtype | str = torch.float16, device: torch.device | str | None = None,
              autocast: torch.dtype | str | None = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
              progress: bool = True) -> TeacherCache:
        """Run ``teacher`` once over the map-style ``dataset`` and store every position's top-``top_k``
        logits (``dtype``: float16 or bfloat16) and indices (int32) in ``path``; returns the opened cache.

        Items are what the trainer takes (``(inputs, labels)``, ``(inputs,)``, a dict with ``labels``,
        bare inputs; the labels are not given to the teacher). Runs of ``batch_size`` consecutive
        examples are grouped by shape: the items of a group are stacked (``default_collate``) and run in
        one call, so equal-length data runs in full batches and variable-length data in smaller ones
        (pad and sort it by length beforehand for speed; padded positions are then cached like any
        other). The teacher runs in eval mode (restored after), under ``torch.no_grad`` and, with
        ``autocast="auto"``, bfloat16 autocast on CUDA and none elsewhere (or a dtype, or None: off), on
        ``device`` (default: the teacher's; its inputs are moved there).

        A shard is closed once it holds ``shard_bytes`` or more (default 256 MiB; buffered in host
        memory until then). A folder holding this cache, finished or not, is reused: a finished one is
        returned as it is (the dataset is read once to check it is the same, the teacher is not run), an
        unfinished one is completed. A folder holding another cache, or other files, is a ValueError
        (:class:`TeacherCacheError`) and is left as it was. One process writes a cache at a time.
        """
        top_k = _positive_int("top_k", top_k, "the number of teacher logits kept per position")
        batch_size = _positive_int("batch_size", batch_size, "examples per teacher call")
        shard_bytes = _positive_int("shard_bytes", shard_bytes, "the size at which a shard is closed")
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in _ST_DTYPE:
            raise ValueError(f"fastkd.TeacherCache.build: dtype must be torch.float16 or torch.bfloat16 (the stored "
                             f"logits), got {dtype}")
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"fastkd.TeacherCache.build: teacher must be a torch.nn.Module (its weights are "
                            f"fingerprinted), got {type(teacher).__name__}")
        n = _check_map_style(dataset, "fastkd.TeacherCache.build")
        if n == 0:
            raise ValueError("fastkd.TeacherCache.build: the dataset is empty")
        device = _teacher_device(teacher, device)
        amp = _autocast_dtype(autocast, device)
        identity = {"top_k": top_k, "values_dtype": str(dtype).removeprefix("torch."), "indices_dtype": "int32",
                    "autocast": None if amp is None else str(amp).removeprefix("torch."), "num_examples": n,
                    "teacher": teacher_fingerprint(teacher)}
        path = Path(path)
        manifest = _prepare_folder(path, identity, dataset)
        if manifest is not None and manifest["complete"]:
            log.info("fastkd: %s already holds this teacher cache; reusing it", path)
            return cls(path)
        writer = _Writer(path, identity, manifest, shard_bytes)
        was_training = teacher.training
        teacher.eval()
        bar = _progress_bar(progress, n, writer.next_example)
        try:
            for b0 in range(writer.next_example, n, batch_size):
                items = [dataset[i] for i in range(b0, min(b0 + batch_size, n))]
                for item in items:
                    _hash_item(writer.hasher, item)
                results, vocab = _run_teacher(teacher, items, top_k, dtype, device, amp, b0, writer.vocab)
                writer.set_vocab(vocab)
                writer.add(results)
                if bar is not None:
                    bar.update(len(items))
            writer.finish()
        finally:
            teacher.train(was_training)
            if bar is not None:
                bar.close()
        cache = cls(path, verify="size")
        cache.verify_mode = "lazy"
        cache._verified = set(range(len(cache._firsts)))  # written and hashed by this process just now
        return cache


class CachedTeacherDataset(Dataset):
    """``dataset`` with each example paired with its cache entry: item i is
    ``CachedExample(dataset[i], values [n_i, K], indices [n_i, K])``. It is map-style, so shuffling and
    DistributedSampler work as on ``dataset``; the cache must hold as many examples as ``dataset``.
    ``check_data=True`` also checks that the items are those the cache was built from
    (:meth:`TeacherCache.check_dataset`: one read of the dataset); by default only the count is checked."""

    def __init__(self, dataset, cache: TeacherCache | str | os.PathLike, *, check_data: bool = False):
        n = _check_map_style(dataset, "fastkd.CachedTeacherDataset")
        self.dataset = dataset
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.cache.check(examples=n)
        if check_data:
            self.cache.check_dataset(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i) -> CachedExample:
        values, indices = self.cache[i]
        return CachedExample(self.dataset[i], values, indices)


def with_teacher_cache(loader: DataLoader, cache: TeacherCache | str | os.PathLike, *,
                       check_data: bool = False) -> DataLoader:
    """``loader``'s batches with the cached teacher top-k of their examples: a DataLoader over
    ``CachedTeacherDataset(loader.dataset, cache)`` with the same batches in the same order (it keeps
    ``loader``'s batch sampler, workers and settings) and ``loader``'s collate applied to the examples;
    each batch is a ``CachedExample(batch, values [B, n, K], indices [B, n, K])``. The examples of a batch
    must have as many positions each (the same shape of logits)."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"fastkd.with_teacher_cache: loader must be a torch.utils.data.DataLoader over a map-style "
                        f"dataset, got {type(loader).__name__}")
    if loader.batch_sampler is None:
        raise ValueError("fastkd.with_teacher_cache: the loader has batch_size=None (it yields what its dataset "
                         "gives, unbatched): give it a batch_size so that its examples are indexed one by one")
    data = CachedTeacherDataset(loader.dataset, cache, check_data=check_data)
    return DataLoader(data, batch_sampler=loader.batch_sampler, num_workers=loader.num_workers,
                      collate_fn=_CachedCollate(loader.collate_fn), pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)


class _CachedCollate:
    """A collate over CachedExample items: ``collate_fn`` on the examples, the top-k stacked."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> CachedExample:
        shapes = {tuple(it.values.shape) for it in items}
        if len(shapes) > 1:
            raise ValueError(f"fastkd.with_teacher_cache: a batch mixes examples with {sorted(s[0] for s in shapes)} "
                             "cached positions: the top-k of a batch is stacked, so its examples need the same "
                             "number of positions (pad them to one length in the dataset, as the student sees them)")
        return CachedExample(self.collate_fn([it.example for it in items]), torch.stack([it.values for it in items]),
                             torch.stack([it.indices for it in items]))


# -- build helpers ------------------------------------------------------------------------------------
def _teacher_device(teacher: torch.nn.Module, device) -> torch.device:
    """Where the inputs go: ``device``, which must hold (some of) the teacher's weights, or by default
    the device of its first weight (a model split over devices takes its inputs on the first)."""
    tensors = [*teacher.parameters(), *teacher.buffers()]
    if device is None:
        return tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    where = {t.device for t in tensors}
    if where and device not in where:
        raise ValueError(f"fastkd.TeacherCache.build: device={device} but the teacher's weights are on "
                         f"{', '.join(sorted(map(str, where)))}; move it first (teacher.to({str(device)!r}))")
    return device


def _autocast_dtype(autocast, device: torch.device) -> torch.dtype | None:
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if autocast is None or autocast is False:
        return None
    if isinstance(autocast, torch.dtype):
        return autocast
    raise ValueError(f"fastkd.TeacherCache.build: autocast must be 'auto', None or a torch.dtype, got {autocast!r}")


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 -- optional: a bar when tqdm is installed
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="teacher cache", unit="example", dynamic_ncols=True)


@torch.no_grad()
def _run_teacher(teacher, items: list, top_k: int, dtype: torch.dtype, device: torch.device, amp, first: int,
                 vocab: int | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Per item, its (values [n_i, K], indices [n_i, K] int32) on the host, and the vocabulary size; items
    of equal shapes in one call."""
    groups: dict = {}
    for j, item in enumerate(items):
        groups.setdefault(_signature(item), []).append(j)
    out: list = [None] * len(items)
    for js in groups.values():
        batch = to_device(default_collate([items[j] for j in js]), device)
        args, kwargs, _ = split_batch(batch)
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            logits = logits_of(teacher(*args, **kwargs))
        where = f"examples {first + js[0]}..{first + js[-1]}"
        if logits.dim() < 2 or logits.shape[0] != len(js):
            raise ValueError(f"fastkd.TeacherCache.build: for a batch of {len(js)} examples ({where}) the teacher "
                             f"returned logits of shape {tuple(logits.shape)}; expected [{len(js)}, ..., vocab]")
        V = logits.shape[-1]
        if vocab is not None and V != vocab:
            raise ValueError(f"fastkd.TeacherCache.build: the teacher's vocabulary changed: {V} logits per position "
                             f"for {where}, {vocab} before")
        if top_k > V:
            raise ValueError(f"fastkd.TeacherCache.build: top_k={top_k} is more than the teacher's vocabulary "
                             f"({V} logits per position); choose top_k <= {V}")
        if V > _INT32_MAX:
            raise ValueError(f"fastkd.TeacherCache.build: a vocabulary of {V} does not fit int32 indices")
        vocab = V
        top = logits.reshape(len(js), -1, V).topk(top_k, dim=-1)
        values = top.values.to(dtype)
        if bool(top.values.isnan().any()):
            raise ValueError(f"fastkd.TeacherCache.build: the teacher's logits hold NaN ({where})")
        if bool((values.isinf() & top.values.isfinite()).any()):
            raise ValueError(f"fastkd.TeacherCache.build: the teacher's logits ({where}) exceed {dtype}'s range; "
                             "store them as torch.bfloat16 (dtype=torch.bfloat16)")
        values, indices = values.cpu(), top.indices.to(torch.int32).cpu()
        for a, j in enumerate(js):
            out[j] = (values[a], indices[a])
    return out, vocab


def _shard_meta(identity: dict, s: int, rec: dict) -> dict:
    """What every shard's header repeats from the manifest (cross-checked on read)."""
    return {"format": FORMAT, "version": VERSION, "shard": s, "first_example": rec["first_example"],
            "num_examples": rec["num_examples"], "num_positions": rec["num_positions"],
            "dataset_examples": identity["num_examples"], "top_k": identity["top_k"],
            "vocab_size": identity["vocab_size"], "values_dtype": identity["values_dtype"],
            "teacher_sha256": identity["teacher"]["sha256"]}


def _check_size(path: Path, s: int, rec: dict) -> None:
    file = path / rec["file"]
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise TeacherCacheError(f"{file} is missing (shard {s} of the cache in {path}); delete {path} and build the "
                                "cache again") from None
    if size != rec["bytes"]:
        raise TeacherCacheError(f"{file} is {size} bytes, the manifest recorded {rec['bytes']} (truncated or "
                                f"overwritten); delete {path} and build the cache again")


def _read_manifest(path: Path) -> dict | None:
    """The manifest, checked (format, version, its own digest, the shards' coverage); None if there is none."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise TeacherCacheError(f"{file} is unreadable ({exc}); delete {path} and build the cache again") from exc
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{file} is not a fastkd teacher cache manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise TeacherCacheError(f"{file} is format version {manifest.get('version')}; this fastkd reads version "
                                f"{VERSION}: build the cache again with this version, in another folder")
    if manifest.get("sha256") != _digest(manifest):
        raise TeacherCacheError(f"{file} was modified after it was written (its SHA-256 does not match its content); "
                                f"delete {path} and build the cache again")
    first = 0
    for s, rec in enumerate(manifest["shards"]):
        if rec["file"] != _shard_name(s) or rec["first_example"] != first:
            raise TeacherCacheError(f"{file}: shard {s} is out of order; delete {path} and build the cache again")
        first += rec["num_examples"]
    if manifest["complete"] and first != manifest["identity"]["num_examples"]:
        raise TeacherCacheError(f"{file}: its shards hold {first} examples, not "
                                f"{manifest['identity']['num_examples']}; delete {path} and build the cache again")
    return manifest


def _remove_leftovers(path: Path, n_shards: int) -> None:
    """Temporary files of a killed writer, and shard files written after the manifest's last one (renamed
    before the kill could record them): both are rebuilt."""
    for f in path.iterdir():
        m = _SHARD.match(f.name)
        if _TEMP.match(f.name) or (m and int(m.group(1)) >= n_shards):
            log.info("fastkd: removing %s, left by an interrupted teacher cache build", f)
            f.unlink()


def _prepare_folder(path: Path, identity: dict, dataset) -> dict | None:
    """The folder's manifest after checking it holds this cache (None: a new cache), with a killed
    build's leftovers removed; a TeacherCacheError, touching nothing, if it holds anything else."""
    if path.exists() and not path.is_dir():
        raise TeacherCacheError(f"{path} is not a folder; choose a folder for the teacher cache")
    path.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(path)
    if manifest is None:
        others = [f.name for f in path.iterdir() if not _TEMP.match(f.name)]
        if others:
            raise TeacherCacheError(f"{path} holds files that are not a fastkd teacher cache ({', '.join(sorted(others)[:3])}"
                                    f"{', ...' if len(others) > 3 else ''}); nothing was overwritten: choose a new or "
                                    "empty folder")
        _remove_leftovers(path, 0)
        return None
    theirs = manifest["identity"]
    diff = [f"{k}: {_show(theirs.get(k))} in the cache, {_show(v)} asked" for k, v in identity.items()
            if theirs.get(k) != v]
    if diff:
        raise TeacherCacheError(f"{path} holds a teacher cache for another teacher, dataset or settings ("
                                f"{'; '.join(diff)}); nothing was overwritten: build into another folder, or delete "
                                f"{path} to rebuild it")
    for s, rec in enumerate(manifest["shards"]):
        _check_size(path, s, rec)
    _check_items(path, manifest, dataset, "; nothing was overwritten: build into another folder, or delete "
                 f"{path} to rebuild it")
    _remove_leftovers(path, len(manifest["shards"]))
    return manifest


def _check_items(path: Path, manifest: dict, dataset, fix: str = ": build a cache for this dataset in another "
                 "folder") -> None:
    """A TeacherCacheError unless the items behind each of the manifest's shards hash as they did."""
    for rec in manifest["shards"]:
        h = hashlib.sha256()
        for i in range(rec["first_example"], rec["first_example"] + rec["num_examples"]):
            _hash_item(h, dataset[i])
        if h.hexdigest() != rec["inputs_sha256"]:
            a, b = rec["first_example"], rec["first_example"] + rec["num_examples"] - 1
            raise TeacherCacheError(f"{path} holds a teacher cache built from another dataset of the same length "
                                    f"(examples {a}..{b} differ){fix}")


def _show(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('class')} weights {v['sha256'][:12]}"
    return repr(v)


class _Writer:
    """Buffers per-example results and writes them out a shard at a time, recording each in the manifest."""

    def __init__(self, path: Path, identity: dict, manifest: dict | None, shard_bytes: int):
        self.path, self.shard_bytes = path, shard_bytes
        self.manifest = manifest  # None until the first batch has told the vocabulary
        self.identity = identity if manifest is None else manifest["identity"]
        shards = [] if manifest is None else manifest["shards"]
        self.next_example = shards[-1]["first_example"] + shards[-1]["num_examples"] if shards else 0
        self._reset()

    @property
    def vocab(self) -> int | None:
        return self.identity.get("vocab_size")

    def _reset(self) -> None:
        self.values, self.indices, self.lengths = [], [], []
        self.hasher = hashlib.sha256()  # over the dataset items of the shard being filled
        self.first = self.next_example

    def add(self, results: list) -> None:
        for values, indices in results:
            self.values.append(values)
            self.indices.append(indices)
            self.lengths.append(values.shape[0])
        self.next_example += len(results)
        K = self.identity["top_k"]
        if sum(self.lengths) * K * (self.values[0].element_size() + 4) >= self.shard_bytes:
            self._write_shard()

    def set_vocab(self, vocab: int) -> None:
        """The first batch of a new cache tells the vocabulary: the manifest is written then, before any shard."""
        if self.manifest is None:
            self.identity = {**self.identity, "vocab_size": vocab}
            self.manifest = {"format": FORMAT, "version": VERSION, "fastkd_version": _fastkd_version(),
                             "torch_version": torch.__version__, "identity": self.identity, "complete": False,
                             "num_positions": 0, "shards": []}
            self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["sha256"] = _digest(self.manifest)
        _write_atomic(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def _write_shard(self) -> None:
        if not self.lengths:
            return
        s = len(self.manifest["shards"])
        offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        rec = {"file": _shard_name(s), "first_example": self.first, "num_examples": len(self.lengths),
               "first_position": self.manifest["num_positions"], "num_positions": int(offsets[-1])}
        # One metadata entry holding sorted JSON: safetensors writes a metadata map in arbitrary order, and
        # the same shard must come out as the same bytes in every run.
        meta = json.dumps(_shard_meta(self.identity, s, rec), sort_keys=True)
        data = _st_save({"values": torch.cat(self.values), "indices": torch.cat(self.indices), "offsets": offsets},
                    metadata={"fastkd": meta})
        _write_atomic(self.path / rec["file"], data)
        rec.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), inputs_sha256=self.hasher.hexdigest())
        self.manifest["shards"].append(rec)
        self.manifest["num_positions"] += rec["num_positions"]
        self._write_manifest()
        self._reset()

    def finish(self) -> None:
        self._write_shard()
        shard_digests = "".join(s["inputs_sha256"] for s in self.manifest["shards"])
        self.manifest["dataset"] = {"num_examples": self.identity["num_examples"],
                                    "sha256": hashlib.sha256(shard_digests.encode()).hexdigest()}
        self.manifest["complete"] = True
        self._write_manifest()
