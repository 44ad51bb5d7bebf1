"""``fastkd lm-demo``: token-level distillation of a byte-level transformer LM, on the CPU in minutes.

Text that is on every machine: the Python standard library's own ``*.py`` sources (top-level folder,
sorted; every 10th file is held out for validation). Each file is a document cut into windows of
``seq_len`` bytes; the last window of a file is padded, and the padding's labels are ``ignore_index``
so it counts in no loss, no gradient and no row count. Vocabulary: 256 bytes + 1 padding id.

A teacher transformer is trained first on the labels; then a smaller student is trained twice with
the same budget (same data, steps, optimizer, learning rate, initialisation): from the labels alone
("scratch") and distilled from the teacher ("distilled", forward KL at ``temperature`` mixed with the
hard cross-entropy). With ``--top-k K1,K2,...`` the student is also distilled *offline* once per K:
the trained teacher is run once over the training windows into a teacher cache of its top-K logits
(``fastkd.TeacherCache``), and a student with the same init, data order and steps learns from the cache
with ``fastkd.topk_kd_loss`` (no teacher runs). Reported: validation perplexity (exp of the per-byte
cross-entropy) and bits per byte, each phase's training time, and per K the cache's build time and
bytes per token. Results go to the run folder (report.json, table.txt, one Distiller run folder each,
the caches in cache-k<K>/).
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data.teacher_cache import TeacherCache, with_teacher_cache
from ..train.distiller import Distiller
from ..train.run_dir import refuse_non_empty
from .common import tensor_batches, write_report

__all__ = ["LMDemoConfig", "ByteLM", "load_stdlib_text", "run_lm_demo", "PAD", "VOCAB"]

PAD = 256
VOCAB = 257
IGNORE = -100
MAX_SEQ_LEN = 4096  # the causal mask is seq_len^2 floats: 64 MiB at 4096


@dataclass
class LMDemoConfig:
    out: str = ""
    seq_len: int = 64
    train_bytes: int = 150_000  # of the stdlib's sources, for training (validation: held-out files)
    val_bytes: int = 30_000
    batch_size: int = 16
    teacher_dim: int = 96
    teacher_layers: int = 2
    teacher_epochs: int = 4
    student_dim: int = 48
    student_layers: int = 1
    student_epochs: int = 3
    lr: float = 2e-3
    temperature: float = 1.0
    hard_weight: float = 0.5
    soft_weight: float = 1.0
    seed: int = 0
    threads: int = 1  # torch threads: one is fastest for these small matrices on a busy machine (0: default)
    top_k: str = ""  # comma-separated K: a student distilled offline from a top-K teacher cache per K ("": none)

    def __post_init__(self):
        # Checked before anything is read, built or written: a value that cannot run fails here, with its flag.
        for name in ("seq_len", "train_bytes", "val_bytes", "batch_size", "teacher_dim", "teacher_layers",
                     "teacher_epochs", "student_dim", "student_layers", "student_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"lm-demo: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"lm-demo: --seq-len must be in [2, {MAX_SEQ_LEN}], got {self.seq_len} (the models hold "
                             "a seq_len x seq_len causal mask and a position table of seq_len rows)")
        if self.seq_len > self.train_bytes:
            raise ValueError(f"lm-demo: --seq-len {self.seq_len} is longer than the training text (--train-bytes "
                             f"{self.train_bytes}); give a shorter --seq-len or more --train-bytes")
        if self.threads < 0:
            raise ValueError(f"lm-demo: --threads must be >= 0 (0: torch's default), got {self.threads}")
        self.top_ks  # noqa: B018 -- parsed (and checked) now

    @property
    def top_ks(self) -> tuple[int, ...]:
        """``top_k`` as integers, each in [1, VOCAB]."""
        try:
            ks = tuple(int(k) for k in self.top_k.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"lm-demo: --top-k must be comma-separated integers, e.g. 8,32, got {self.top_k!r}") from None
        bad = [k for k in ks if not 1 <= k <= VOCAB]
        if bad or len(set(ks)) != len(ks):
            raise ValueError(f"lm-demo: --top-k values must be distinct and in [1, {VOCAB}] (the vocabulary: 256 bytes "
                             f"and the padding id), got {self.top_k!r}")
        return ks


class ByteLM(nn.Module):
    """A small causal transformer LM: (B, S) ids -> (B, S, vocab) logits; by default over the 256 bytes
    and the padding id (vocab 257). bench/bench_step.py uses it with a 32k vocabulary."""

    def __init__(self, dim: int, layers: int, heads: int | None = None, seq_len: int = 128, dropout: float = 0.0,
                 vocab: int = VOCAB):
        super().__init__()
        heads = heads or max(1, dim // 32)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, S, dim), the output head's input."""
        s = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(s, device=ids.device))
        h = self.blocks(h, mask=self.causal[:s, :s], is_causal=True)
        return self.norm(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))


def load_stdlib_text(train_bytes: int, val_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """Documents (file contents) from the stdlib's top-level *.py files: (train, validation)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no *.py files under {root}: the standard library's sources are not installed")
    train, val, nt, nv = [], [], 0, 0
    for i, f in enumerate(files):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if i % 10 == 9:
            if nv < val_bytes:
                data = data[: val_bytes - nv]
                val.append(data)
                nv += len(data)
        elif nt < train_bytes:
            data = data[: train_bytes - nt]
            train.append(data)
            nt += len(data)
        if nt >= train_bytes and nv >= val_bytes:
            break
    return train, val


def windows(docs: list[bytes], seq_len: int) -> TensorDataset:
    """Cut each document into (input, label) windows; a document's last window is padded and masked."""
    xs, ys = [], []
    for doc in docs:
        ids = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long()
        for start in range(0, max(len(ids) - 1, 1), seq_len):
            chunk = ids[start: start + seq_len + 1]
            x = torch.full((seq_len,), PAD, dtype=torch.long)
            y = torch.full((seq_len,), IGNORE, dtype=torch.long)
            n = len(chunk) - 1
            if n < 1:
                continue
            x[:n] = chunk[:-1]
            y[:n] = chunk[1:]
            xs.append(x)
            ys.append(y)
    return TensorDataset(torch.stack(xs), torch.stack(ys))


def _fit(name, out, teacher, student, train, val, epochs, cfg, cache=None, **loss):
    torch.manual_seed(cfg.seed)
    if cache is None:
        loader = tensor_batches(train, cfg.batch_size, shuffle=True)
    else:  # the same batches in the same order (the same sampler and random stream), with their cached top-k
        loader = with_teacher_cache(DataLoader(train, batch_size=cfg.batch_size, shuffle=True), cache)
    steps = epochs * len(loader)
    d = Distiller(teacher, student, lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=0.01),
                  teacher_cache=cache,
                  scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, cfg.lr, total_steps=steps,
                                                                          pct_start=0.1),
                  max_grad_norm=1.0, run_dir=out / name, log_every=20, best_metric="ce", tensorboard=False,
                  config={"lm_demo": name, **{k: v for k, v in asdict(cfg).items() if k != "out"}}, **loss)
    t0 = time.perf_counter()
    history = d.fit(loader, epochs=epochs, eval_loader=tensor_batches(val, 64))
    return history[-1], time.perf_counter() - t0, steps


def run_lm_demo(cfg: LMDemoConfig) -> dict:
    out = Path(cfg.out)
    refuse_non_empty(out, ": choose another --out (nothing was overwritten)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_docs, val_docs = load_stdlib_text(cfg.train_bytes, cfg.val_bytes)
    train, val = windows(train_docs, cfg.seq_len), windows(val_docs, cfg.seq_len)
    pad_frac = float((train.tensors[1] == IGNORE).float().mean())
    print(f"stdlib sources: {len(train_docs)} train files ({sum(map(len, train_docs))} bytes, {len(train)} windows "
          f"of {cfg.seq_len}, {100 * pad_frac:.1f}% padding), {len(val_docs)} validation files "
          f"({sum(map(len, val_docs))} bytes)", flush=True)
    torch.manual_seed(cfg.seed)
    teacher = ByteLM(cfg.teacher_dim, cfg.teacher_layers, seq_len=cfg.seq_len)
    torch.manual_seed(cfg.seed + 1)
    scratch = ByteLM(cfg.student_dim, cfg.student_layers, seq_len=cfg.seq_len)
    distilled = ByteLM(cfg.student_dim, cfg.student_layers, seq_len=cfg.seq_len)
    distilled.load_state_dict(scratch.state_dict())
    init = {k: v.clone() for k, v in scratch.state_dict().items()}  # every student starts here
    report: dict = {}
    kd = {"temperature": cfg.temperature, "hard_weight": cfg.hard_weight, "soft_weight": cfg.soft_weight}
    runs = [("teacher", None, teacher, cfg.teacher_epochs, None),
            ("scratch", None, scratch, cfg.student_epochs, None),
            ("distilled", teacher, distilled, cfg.student_epochs, None)]
    runs += [(f"offline_k{k}", None, None, cfg.student_epochs, k) for k in cfg.top_ks]
    for name, t, s, epochs, k in runs:
        extra = {}
        cache = None
        if k is not None:  # offline: the trained teacher's top-k cached once, then a student from the same init
            t0 = time.perf_counter()
            cache = TeacherCache.build(out / f"cache-k{k}", teacher, train, top_k=k, batch_size=64, progress=False)
            extra = {"top_k": k, "cache_seconds": time.perf_counter() - t0,
                     "cache_bytes_per_token": cache.bytes_per_token, "cache_bytes": cache.nbytes}
            s = ByteLM(cfg.student_dim, cfg.student_layers, seq_len=cfg.seq_len)
            s.load_state_dict(init)
        m, secs, steps = _fit(name, out, t, s, train, val, epochs, cfg, cache=cache,
                              **({} if name in ("teacher", "scratch") else kd))
        report[name] = {"val_ce": m["ce"], "val_perplexity": math.exp(m["ce"]),
                        "val_bits_per_byte": m["ce"] / math.log(2),
                        "val_accuracy": m["student_acc"], "steps": steps, "seconds": secs,
                        "parameters": sum(p.numel() for p in s.parameters()), **extra}
        cached = (f"; cache {extra['cache_bytes_per_token']:.0f} bytes/token, built in {extra['cache_seconds']:.1f} s"
                  if extra else "")
        print(f"{name}: val perplexity {math.exp(m['ce']):.3f} ({steps} steps, {secs:.0f} s{cached})", flush=True)
    report["config"] = asdict(cfg)
    table = format_table(report)
    write_report(out, report, table)
    print(f"\nrun folder: {out}")
    return report


def format_table(report: dict) -> str:
    """One row per model (offline students: their cache's bytes per token too), then the gains."""
    head = (f"{'model':<14} {'params':>8} {'steps':>6} {'val ppl':>8} {'bits/byte':>9} {'val acc':>8} {'s':>6} "
            f"{'cache B/token':>13}")
    lines = [head, "-" * len(head)]
    offline = [k for k in report if k.startswith("offline_k")]
    for name in ("teacher", "scratch", "distilled", *offline):
        r = report[name]
        cache = f"{r['cache_bytes_per_token']:>13.0f}" if "top_k" in r else f"{'-':>13}"
        label = "distilled" if name == "distilled" else name.replace("offline_k", "offline k=")
        lines.append(f"{label:<14} {r['parameters']:>8} {r['steps']:>6} {r['val_perplexity']:>8.3f} "
                     f"{r['val_bits_per_byte']:>9.3f} {100 * r['val_accuracy']:>7.2f}% {r['seconds']:>6.1f} {cache}")
    gain = report["scratch"]["val_perplexity"] - report["distilled"]["val_perplexity"]
    lines.append(f"distillation lowers the student's validation perplexity by {gain:+.3f} (same data, steps, init)")
    for name in offline:
        r = report[name]
        g = report["scratch"]["val_perplexity"] - r["val_perplexity"]
        lines.append(f"offline from the top-{r['top_k']} cache: val perplexity {abs(g):.3f} "
                     f"{'lower' if g > 0 else 'higher'} than scratch, in "
                     f"{r['seconds'] / report['distilled']['seconds']:.2f}x the online distilled phase's time")
    return "\n".join(lines)
