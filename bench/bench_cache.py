"""The teacher cache (fastkd.TeacherCache): its size on disk, the cost of reading it in training, and
what float16 and bfloat16 storage do to the cached logits.

    python -m bench.bench_cache [--device cpu|cuda] [--quick] [--out bench/results/cache_cpu.csv]

Three parts, one CSV (column ``part``):

    size       a cache of `examples` x `seq` positions for K = 16, 64, 256 (float16 values, int32
               indices): bytes on disk per position, against the payload alone, K x (2 + 4)
    read       one training batch (`batch` examples x `seq` positions, K = 64) from the memory-mapped
               cache through CachedTeacherDataset and a shuffling DataLoader (num_workers=0), against
               the same batches of tokens alone; per batch = an epoch's time / its batches. `cache,
               first read` opens the cache afresh before each epoch, so each shard's SHA-256 check
               (verify="lazy") is in the time; verify_gbps is TeacherCache.verify()'s throughput
    precision  logits ~ N(0, logit_std^2) over a 32000 vocabulary: the error of the top-64 values
               stored as float16 and as bfloat16 (max_abs_err) and the mean KL divergence, per row,
               from the softmax of the exact top-64 to that of the stored ones (kl_t1, temperature 1)

The teacher is an embedding table read as logits (token -> a row of the vocabulary's logits): building
the cache is not what is measured, and reading it does not depend on the vocabulary (the read part's
cache uses a vocabulary of 1000 to build quickly). The data loading runs on the host whatever
--device says; --device only places the teacher while the caches are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastkd.data import CachedTeacherDataset, TeacherCache

from . import common


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    size_examples: int
    size_vocab: int
    batch: int
    seq: int
    read_batches: int
    precision_rows: int
    precision_vocab: int
    repeats: int


CONFIGS = {
    "full": CacheConfig(size_examples=16, size_vocab=32000, batch=16, seq=512, read_batches=16,
                        precision_rows=4096, precision_vocab=32000, repeats=10),
    "quick": CacheConfig(size_examples=4, size_vocab=1000, batch=4, seq=64, read_batches=4,
                         precision_rows=256, precision_vocab=1000, repeats=3),
}
SIZE_KS = (16, 64, 256)
READ_K = 64
READ_VOCAB = 1000
PRECISION_K = 64
LOGIT_STDS = (2.0, 4.0, 8.0)


class TableTeacher(torch.nn.Module):
    """Logits [batch, seq, vocab] = table[ids]: a teacher whose forward costs next to nothing."""

    def __init__(self, vocab: int, tokens: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(tokens, vocab, generator=g) * 4)

    def forward(self, ids):
        return self.table[ids]


def token_data(n: int, seq: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, seq + 1), generator=g)
    return [(row[:-1].clone(), row[1:].clone()) for row in ids]


def size_rows(cfg: CacheConfig, device: torch.device, folder: Path) -> list[dict]:
    teacher = TableTeacher(cfg.size_vocab).to(device)
    data = token_data(cfg.size_examples, cfg.seq)
    rows = []
    for k in SIZE_KS:
        cache = TeacherCache.build(folder / f"size_k{k}", teacher, data, top_k=k, batch_size=2, progress=False)
        rows.append({"part": "size", "provider": "fastkd", "top_k": k, "dtype": "float16",
                     "examples": len(cache), "positions": cache.num_tokens, "vocab": cache.vocab_size,
                     "bytes": cache.nbytes, "bytes_per_token": cache.bytes_per_token,
                     "payload_bytes_per_token": k * (2 + 4)})
    return rows


def _epoch(loader) -> None:
    for _ in loader:
        pass


def read_rows(cfg: CacheConfig, device: torch.device, folder: Path, repeats: int) -> list[dict]:
    data = token_data(cfg.batch * cfg.read_batches, cfg.seq, seed=2)
    cache = TeacherCache.build(folder / "read", TableTeacher(READ_VOCAB).to(device), data, top_k=READ_K,
                               batch_size=cfg.batch, progress=False)
    cpu = torch.device("cpu")

    def loader(ds):
        return DataLoader(ds, batch_size=cfg.batch, shuffle=True, num_workers=0,
                          generator=torch.Generator().manual_seed(0))

    tokens_loader = loader(data)
    cached_loader = loader(CachedTeacherDataset(data, TeacherCache(cache.path, verify="open")))
    fresh = {}

    def reopen():  # untimed: a cache opened anew, none of its shards verified yet
        fresh["loader"] = loader(CachedTeacherDataset(data, TeacherCache(cache.path)))

    cases = {
        "tokens": (lambda: _epoch(tokens_loader), None),
        "tokens+cache": (lambda: _epoch(cached_loader), None),
        "tokens+cache, first read": (lambda: _epoch(fresh["loader"]), reopen),
    }
    rows = []
    for provider, (fn, setup) in cases.items():
        med, p20, p80 = common.time_call(fn, cpu, repeats=repeats, warmup=1, setup=setup)
        n = cfg.read_batches
        rows.append({"part": "read", "provider": provider, "top_k": READ_K, "dtype": "float16",
                     "batch": cfg.batch, "seq": cfg.seq, "examples": len(data), "positions": cache.num_tokens,
                     "vocab": READ_VOCAB, "bytes": cache.nbytes, "median_ms": med / n, "p20_ms": p20 / n,
                     "p80_ms": p80 / n})
    base = rows[0]["median_ms"]
    for r in rows[1:]:
        r["overhead_ms"] = r["median_ms"] - base

    def verify():
        TeacherCache(cache.path, verify="open")

    med, _, _ = common.time_call(verify, cpu, repeats=repeats, warmup=1)
    for r in rows:
        r["verify_gbps"] = cache.nbytes / (med * 1e-3) / 1e9
    return rows


def precision_rows(cfg: CacheConfig) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for std in LOGIT_STDS:
        logits = torch.randn(cfg.precision_rows, cfg.precision_vocab, generator=g) * std
        exact = logits.topk(PRECISION_K).values.double()
        log_p = exact.log_softmax(-1)
        for dtype in (torch.float16, torch.bfloat16):
            stored = exact.float().to(dtype).double()
            kl = (log_p.exp() * (log_p - stored.log_softmax(-1))).sum(-1).mean()
            rows.append({"part": "precision", "provider": "fastkd", "top_k": PRECISION_K,
                         "dtype": str(dtype).removeprefix("torch."), "vocab": cfg.precision_vocab,
                         "logit_std": std, "mean_max_logit": float(exact[:, 0].mean()),
                         "max_abs_err": float((stored - exact).abs().max()), "kl_t1": float(kl)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny caches (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = common.device(args.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = CONFIGS["quick" if args.quick else "full"]
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else common.RESULTS / f"cache_{device.type}{suffix}.csv"
    info = common.machine_info(device)
    print(f"# {info['cpu']} x{info['cores']} ({info['threads']} threads) {info['gpu']} torch {info['torch']} "
          f"git {info['git']}; {cfg}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        for part in (lambda: size_rows(cfg, device, Path(tmp)),
                     lambda: read_rows(cfg, device, Path(tmp), args.repeats or cfg.repeats),
                     lambda: precision_rows(cfg)):
            rows += [{**r, **info} for r in part()]
            common.write_csv(out, rows)  # a run cut short keeps the parts measured so far
    common.print_table(rows, ["part", "provider", "top_k", "dtype", "positions", "bytes_per_token",
                              "payload_bytes_per_token", "median_ms", "overhead_ms", "verify_gbps", "logit_std",
                              "max_abs_err", "kl_t1"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
