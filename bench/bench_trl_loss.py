"""The loss of TRL's on-policy ``trl.DistillationTrainer``: its own (chunked projections of the hidden
states) against fastkd's ``DistillationLossMixin`` (``fastkd.kd_loss`` on the models' logits), side by side
in one process.

    python -m bench.bench_trl_loss [--device cpu|cuda] [--quick] [--out bench/results/trl_loss_cpu.csv]

One real trainer of ``class FastDistill(DistillationLossMixin, DistillationTrainer)`` (a student and a
teacher ``LlamaForCausalLM``, 32000-token vocabulary, fp32); each provider's ``_compute_loss`` on the same
generated batch (random prompts and completions, every completion position valid), timed with its
backward: both models' forwards, the loss, the student's backward. Generation is left out (it is the same
for both and is not the loss). The divergence: TRL's default beta = 1 (reverse KL), temperature 1.

    trl           trl.DistillationTrainer._compute_loss (Triton tiles on CUDA, PyTorch tiles elsewhere)
    fastkd        fastkd.integrations.trl.DistillationLossMixin._compute_loss (kd_loss on the logits)
    fastkd_fused  the same with fastkd_fused_linear = True (fused_linear_kd_loss on the hidden states: no logits)

Per provider: the median, p20 and p80 of the timed calls after one warm-up call, and peak memory: the most
any timed call added to the memory in use when it started (CUDA: max_memory_allocated; CPU: the resident
high-water mark). Before timing, the losses on the first batch must agree (1e-5, 1e-6 absolute).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time

import torch

from . import common


@dataclasses.dataclass(frozen=True)
class LossConfig:
    batch: int
    prompt: int
    completion: int
    vocab: int
    d_model: int
    student_layers: int
    teacher_layers: int
    repeats: int
    warmup: int = 1


CONFIGS = {
    "cpu": LossConfig(batch=4, prompt=16, completion=256, vocab=32000, d_model=256, student_layers=2, teacher_layers=4,
                      repeats=5),
    "cuda": LossConfig(batch=8, prompt=64, completion=1024, vocab=32000, d_model=512, student_layers=4, teacher_layers=8,
                       repeats=10),
    "quick": LossConfig(batch=2, prompt=4, completion=8, vocab=500, d_model=32, student_layers=1, teacher_layers=1,
                        repeats=2),
}


def _trainer(cfg: LossConfig, device: torch.device, out: str):
    """A FastDistill trainer over random models (a whitespace tokenizer built in memory: TRL needs one)."""
    import datasets  # noqa: PLC0415  (the trl extra, as the next three)
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from trl import DistillationConfig, DistillationTrainer  # noqa: PLC0415

    from fastkd.integrations.trl import DistillationLossMixin  # noqa: PLC0415

    def llama(layers, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model, num_hidden_layers=layers,
            num_attention_heads=max(1, cfg.d_model // 64), num_key_value_heads=max(1, cfg.d_model // 128),
            max_position_embeddings=cfg.prompt + cfg.completion, pad_token_id=0, eos_token_id=1, bos_token_id=None))

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", padding_side="left")
    args = DistillationConfig(output_dir=out, report_to="none", use_cpu=device.type == "cpu", save_strategy="no",
                              disable_tqdm=True, per_device_train_batch_size=cfg.batch, seed=0,
                              activation_checkpointing=False)
    cls = type("FastDistill", (DistillationLossMixin, DistillationTrainer), {})
    trainer = cls(model=llama(cfg.student_layers, 1), teacher_model=llama(cfg.teacher_layers, 0), args=args,
                  processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"prompt": ["<unk>"]}))
    # provider: (the _compute_loss to call, fastkd_fused_linear)
    return trainer, {"trl": (DistillationTrainer._compute_loss, False),
                     "fastkd": (DistillationLossMixin._compute_loss, False),
                     "fastkd_fused": (DistillationLossMixin._compute_loss, True)}


def run(cfg: LossConfig, device: torch.device, repeats: int, on_row=None) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, cfg.vocab, (cfg.batch, cfg.prompt + cfg.completion), generator=g).to(device)
    batch = {"prompt_ids": ids[:, :cfg.prompt], "completion_ids": ids[:, cfg.prompt:],
             "prompt_mask": torch.ones_like(ids[:, :cfg.prompt]), "completion_mask": torch.ones_like(ids[:, cfg.prompt:])}
    count = torch.tensor(float(cfg.batch * cfg.completion), device=device)
    rows, first = [], {}
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-trl-") as out:
        trainer, providers = _trainer(cfg, device, out)
        student = trainer.model

        def call(provider):
            fn, trainer.fastkd_fused_linear = provider
            student.zero_grad(set_to_none=True)
            loss = fn(trainer, student, batch, count)[0]
            loss.backward()
            return loss.detach()

        for name, provider in providers.items():
            first[name] = float(call(provider))
        a = first["trl"]
        for name, b in first.items():
            # (Random models' distributions are near-uniform: the loss is a small difference of fp32 terms of
            # size log V, and fp32 rounds each at ~1e-7 of them: the computations differ at ~1e-6.)
            if abs(a - b) > 1e-5 * abs(a) + 1e-6:
                raise RuntimeError(f"bench_trl_loss: the providers' losses differ: trl {a}, {name} {b}; timing "
                                   "them would compare different maths")
        for name, provider in providers.items():
            times, peaks = [], []
            for i in range(cfg.warmup + repeats):
                base = common.memory_now(device, reset_peak=True)
                t0 = time.perf_counter()
                call(provider)
                common.sync(device)
                if i >= cfg.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
                    peaks.append(common.memory_peak_since(device, base))
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            rows.append({"op": "trl_distill_loss", "provider": name, **dataclasses.asdict(cfg), "repeats": repeats,
                         "tokens": cfg.batch * cfg.completion, "dtype": "float32", "median_ms": statistics.median(times),
                         "p20_ms": q[0], "p80_ms": q[3],
                         "peak_mem_mib": max(peaks) if None not in peaks else None, "loss": first[name]})
            if on_row is not None:
                on_row(rows)
    base = next(r["median_ms"] for r in rows if r["provider"] == "fastkd")
    for r in rows:
        r["fastkd_speedup"] = r["median_ms"] / base
    return rows


def main(argv=None) -> int:
    return common.scenario_main(argv, __doc__.split("\n\n")[0], CONFIGS, "trl_loss", run,
                                ["provider", "tokens", "vocab", "d_model", "median_ms", "p20_ms", "p80_ms",
                                 "peak_mem_mib", "loss", "fastkd_speedup"])


if __name__ == "__main__":
    sys.exit(main())
