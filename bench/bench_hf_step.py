"""A distillation training step inside Hugging Face's ``transformers.Trainer``: a loss written the textbook
way in a ``compute_loss`` override against fastkd's ``DistillationTrainer``, side by side in one process.

    python -m bench.bench_hf_step [--device cpu|cuda] [--quick] [--out bench/results/hf_step_cpu.csv]

Both train a student ``LlamaForCausalLM`` from a frozen teacher ``LlamaForCausalLM`` with a 32000-token
vocabulary (student 256 x 2 layers, teacher 256 x 4, batch 4 x 128 tokens, fp32 on the CPU) through
``Trainer.train()``: the teacher's forward, the student's forward and backward, clipping to norm 1 and
an AdamW step, with gradient accumulation off (so that the textbook loss is right: see
docs/integrations.md). The loss: forward KL at T = 2 times T^2 plus 0.5 x the cross-entropy, per token.

    textbook   Trainer.compute_loss: F.kl_div(F.log_softmax(s[:, :-1] / T), F.softmax(t[:, :-1] / T),
               "batchmean") * T^2 + 0.5 * F.cross_entropy(s[:, :-1], labels[:, 1:]) on the flattened
               logits (fastkd.reference.textbook_kd_loss), torch's clipping
    fastkd     fastkd.integrations.transformers.DistillationTrainer (kd_loss on the unsliced logits with
               shifted labels, fastkd.clip_grad_norm_)

Per style: the median, p20 and p80 of the optimizer steps' wall times after warm-up steps (a
TrainerCallback times each step), and peak memory: the most any timed step added to the memory in use
when it started (CUDA: max_memory_allocated; CPU: the resident high-water mark). Before timing, the
first step's losses of the two styles from the same weights must agree.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastkd import reference

from . import common
from .bench_step import HARD_WEIGHT, TEMPERATURE, StepConfig

CONFIGS = {
    "cpu": StepConfig(batch=4, seq=128, vocab=32000, d_model=256, student_layers=2, teacher_layers=4, repeats=8,
                      warmup=2),
    "cuda": StepConfig(batch=16, seq=512, vocab=32000, d_model=512, student_layers=4, teacher_layers=8, repeats=20,
                       warmup=2),
    "quick": StepConfig(batch=2, seq=16, vocab=500, d_model=32, student_layers=1, teacher_layers=1, repeats=2),
}


def _llama(cfg: StepConfig, layers: int, seed: int):
    import transformers  # noqa: PLC0415  (the hf extra)

    torch.manual_seed(seed)
    conf = transformers.LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
                                    num_hidden_layers=layers, num_attention_heads=max(1, cfg.d_model // 64),
                                    num_key_value_heads=max(1, cfg.d_model // 128), max_position_embeddings=cfg.seq,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(conf)


def _trainers():
    import transformers  # noqa: PLC0415

    from fastkd.integrations.transformers import DistillationTrainer  # noqa: PLC0415

    class TextbookTrainer(transformers.Trainer):
        """What a hand-written compute_loss does: slice, flatten, the textbook KD loss."""

        def __init__(self, *args, teacher_model, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            kwargs = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**kwargs)
            with torch.no_grad():
                t = self.teacher_model(**kwargs).logits
            s = out.logits
            vocab = s.shape[-1]
            loss = reference.textbook_kd_loss(s[:, :-1].reshape(-1, vocab), t[:, :-1].reshape(-1, vocab),
                                              labels[:, 1:].reshape(-1), temperature=TEMPERATURE,
                                              hard_weight=HARD_WEIGHT)
            return (loss, out) if return_outputs else loss

    return {"textbook": TextbookTrainer, "fastkd": DistillationTrainer}


class _StepClock:
    """A TrainerCallback's hooks: each optimizer step's wall time and the memory it added."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.peaks = device, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        common.sync(self.device)
        self._base = common.memory_now(self.device, reset_peak=True)
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        common.sync(self.device)
        self.times.append((time.perf_counter() - self._t0) * 1e3)
        self.peaks.append(common.memory_peak_since(self.device, self._base))


def run(cfg: StepConfig, device: torch.device, repeats: int, on_row=None) -> list[dict]:
    import transformers  # noqa: PLC0415

    teacher = _llama(cfg, cfg.teacher_layers, seed=0)
    student0 = _llama(cfg, cfg.student_layers, seed=1)
    g = torch.Generator().manual_seed(2)
    steps = cfg.warmup + repeats
    data = [{"input_ids": ids, "attention_mask": torch.ones(cfg.seq, dtype=torch.long), "labels": ids.clone()}
            for ids in torch.randint(0, cfg.vocab, (steps * cfg.batch, cfg.seq), generator=g)]
    rows, first = [], {}
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-hf-") as out:
        for name, cls in _trainers().items():
            clock = _StepClock(device)
            callback = type("Clock", (transformers.TrainerCallback,), {
                "on_step_begin": lambda self, *a, **k: clock.on_step_begin(*a, **k),
                "on_step_end": lambda self, *a, **k: clock.on_step_end(*a, **k)})()
            args = transformers.TrainingArguments(
                output_dir=str(Path(out) / name), report_to="none", use_cpu=device.type == "cpu", save_strategy="no",
                disable_tqdm=True, per_device_train_batch_size=cfg.batch, max_steps=steps, learning_rate=1e-4,
                max_grad_norm=1.0, logging_steps=1, seed=0, dataloader_drop_last=True)
            kw = {"temperature": TEMPERATURE, "hard_weight": HARD_WEIGHT} if name == "fastkd" else {}
            trainer = cls(model=copy.deepcopy(student0), teacher_model=teacher, args=args, train_dataset=data,
                          callbacks=[callback], **kw)
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
            trainer.train()
            first[name] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
            timed, peaks = clock.times[cfg.warmup:], clock.peaks[cfg.warmup:]
            q = statistics.quantiles(timed, n=5) if len(timed) > 1 else [timed[0]] * 4
            rows.append({"op": "hf_train_step", "provider": name, **dataclasses.asdict(cfg), "repeats": repeats,
                         "tokens": cfg.batch * cfg.seq, "dtype": "float32", "median_ms": statistics.median(timed),
                         "p20_ms": q[0], "p80_ms": q[3],
                         "tokens_per_s": cfg.batch * cfg.seq / (statistics.median(timed) * 1e-3),
                         "peak_mem_mib": max(p for p in peaks) if None not in peaks else None,
                         "first_loss": first[name]})
            if on_row is not None:
                on_row(rows)
    a, b = first["textbook"], first["fastkd"]
    if abs(a - b) > 1e-3 * abs(a) + 1e-5:  # (the Trainer logs losses rounded to 4 significant digits)
        raise RuntimeError(f"bench_hf_step: the styles' first losses differ: textbook {a}, fastkd {b}; timing them "
                           "would compare different maths")
    base = next(r["median_ms"] for r in rows if r["provider"] == "fastkd")
    for r in rows:
        r["fastkd_speedup"] = r["median_ms"] / base
    return rows


def main(argv=None) -> int:
    return common.scenario_main(argv, __doc__.split("\n\n")[0], CONFIGS, "hf_step", run,
                                ["provider", "tokens", "vocab", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
                                 "peak_mem_mib", "first_loss", "fastkd_speedup"])


if __name__ == "__main__":
    sys.exit(main())
