"""The benchmarks: one module per op (or scenario), one ``Bench`` line here each.

``python -m bench --only NAME`` runs the benchmark registered as NAME, and ``bench.report`` renders
its CSVs with the entry's columns and headline cases. A new op's benchmark is a module
``bench/bench_<op>.py`` with ``main(argv)`` accepting ``--device``, ``--out`` and ``--quick`` and
writing a CSV (``common.write_csv``, machine columns from ``common.machine_info``), plus a line in
``BENCHES``, e.g. ``Bench("foo", "foo", "bench.bench_foo")`` (its table then shows every CSV column);
a plot, optional, is a function in ``bench.report.PLOTS`` under the entry's stem.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Headline:
    """One row of the README's headline table: the first CSV case matching ``where`` (column -> value,
    as written in the CSV), fastkd against the fastest other provider of that case."""

    label: str  # what is measured, e.g. "KD loss, fwd+bwd"
    where: dict
    case: str  # the case in words, formatted from the CSV row, e.g. "{rows} x {vocab}, {dtype}"


@dataclass(frozen=True)
class Bench:
    name: str  # for --only
    stem: str  # CSV stem: {stem}_{device}[_quick].csv
    module: str  # python -m <module> runs it alone
    columns: tuple[str, ...] = ()  # the columns its tables show (the CSV keeps every column); () = all
    headline: tuple[Headline, ...] = ()  # its rows in the README's headline table; () = none
    args: tuple[str, ...] = ()  # more arguments for its module (one module, several benchmarks)

    def load(self):
        return importlib.import_module(self.module)


_TIMES = ("median_ms", "p20_ms", "p80_ms")
_CLIP_CASE = "{case} mix: {tensors} tensors, {elements} elements, {dtype}"
_TRANSFORMER = {"case": "transformer", "dtype": "float32"}

BENCHES: tuple[Bench, ...] = (
    Bench("kd", "kd_loss", "bench.bench_kd_loss",
          columns=("loss", "provider", "rows", "vocab", "dtype", "mode", *_TIMES, "gbps", "pct_copy_ceiling",
                   "peak_mem_mib", "fastkd_speedup"),
          headline=(Headline("KD loss, fwd+bwd", {"loss": "kl", "mode": "fwd+bwd", "dtype": "float32"},
                             "{rows} x {vocab}, {dtype}"),)),
    Bench("kd_causal", "kd_loss_causal", "bench.bench_kd_loss", args=("--causal", "512"),
          columns=("loss", "layout", "provider", "rows", "vocab", "dtype", "mode", *_TIMES, "gbps",
                   "pct_copy_ceiling", "peak_mem_mib", "fastkd_speedup")),
    Bench("topk", "topk_kd_loss", "bench.bench_topk",
          columns=("provider", "rows", "vocab", "k", "dtype", "mode", *_TIMES, "gbps", "pct_copy_ceiling",
                   "peak_mem_mib", "fastkd_speedup")),
    Bench("fused_linear", "fused_linear", "bench.bench_fused_linear",
          columns=("provider", "rows", "hidden_student", "hidden_teacher", "vocab", "dtype", *_TIMES, "gemm_gflops",
                   "peak_mem_mib", "vs_gemms")),
    Bench("clip", "clip", "bench.bench_clip",
          columns=("case", "provider", "tensors", "elements", "dtype", "clipped", *_TIMES, "gbps",
                   "fastkd_speedup"),
          headline=(Headline("clip_grad_norm_, not clipped", {**_TRANSFORMER, "clipped": "False"},
                             _CLIP_CASE),
                    Headline("clip_grad_norm_, clipped", {**_TRANSFORMER, "clipped": "True"}, _CLIP_CASE))),
    Bench("step", "step", "bench.bench_step",
          columns=("provider", "teacher", "head", "batch", "seq", "vocab", "d_model", "student_layers", "teacher_layers",
                   *_TIMES, "tokens_per_s", "peak_mem_mib", "loss", "grad_norm", "fastkd_speedup"),
          headline=(Headline("distillation training step", {"dtype": "float32", "teacher": "online", "head": "logits"},
                             "batch {batch} x {seq} tokens, vocabulary {vocab}, {dtype}"),)),
    Bench("hf_step", "hf_step", "bench.bench_hf_step",
          columns=("provider", "batch", "seq", "vocab", "d_model", "student_layers", "teacher_layers", *_TIMES,
                   "tokens_per_s", "peak_mem_mib", "first_loss", "fastkd_speedup"),
          headline=(Headline("HF Trainer distillation step", {"dtype": "float32"},
                             "batch {batch} x {seq} tokens, vocabulary {vocab}, {dtype}"),)),
    Bench("trl_loss", "trl_loss", "bench.bench_trl_loss",
          columns=("provider", "batch", "prompt", "completion", "vocab", "d_model", "student_layers", "teacher_layers",
                   *_TIMES, "peak_mem_mib", "loss", "fastkd_speedup")),
    Bench("cache", "cache", "bench.bench_cache",
          columns=("part", "provider", "top_k", "dtype", "batch", "seq", "positions", "bytes_per_token",
                   "payload_bytes_per_token", *_TIMES, "overhead_ms", "verify_gbps", "logit_std", "max_abs_err",
                   "kl_t1")),
)
BY_NAME = {b.name: b for b in BENCHES}


def of_csv(stem: str) -> Bench | None:
    """The benchmark whose CSV has this stem (e.g. kd_loss_cpu_quick; the longest matching stem), or None."""
    found = [b for b in BENCHES if stem == b.stem or stem.startswith(b.stem + "_")]
    return max(found, key=lambda b: len(b.stem), default=None)
