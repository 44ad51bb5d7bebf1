"""Distil a tiny Llama into a smaller one with Hugging Face's Trainer and fastkd's DistillationTrainer.

    python examples/hf_distill.py [--out runs/hf-distill]

Text that ships with Python (the standard library's *.py sources, as `fastkd lm-demo` uses them),
byte-level: 256 bytes + a padding id, windows of 64 bytes, labels = input_ids with -100 on padding (the
Hugging Face convention: the loss shifts them). Three runs with transformers.Trainer on the CPU:

    teacher    LlamaForCausalLM, 2 layers x 96, trained on the labels (the model's own loss)
    scratch    LlamaForCausalLM, 1 layer x 48, trained on the labels the same way
    distilled  the same student, same init, data and steps, trained by fastkd's DistillationTrainer
               (forward KL at --temperature 1 plus --hard-weight 0.5 x the cross-entropy, normalised over
               the accumulated batch)

and prints each model's validation perplexity (the model's own cross-entropy, exponentiated). Needs the
`hf` extra (transformers, accelerate).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import transformers

from fastkd.demos.byte_lm import load_stdlib_text
from fastkd.integrations.transformers import DistillationTrainer

VOCAB, PAD, SEQ = 257, 256, 64


def windows(docs: list[bytes]) -> list[dict]:
    """Each document cut into windows of SEQ bytes; the last one right-padded (-100 labels on the padding)."""
    out = []
    for doc in docs:
        ids = list(doc)
        for start in range(0, len(ids) - 1, SEQ):
            chunk = ids[start:start + SEQ]
            if len(chunk) < 2:
                continue
            n = len(chunk)
            x = torch.full((SEQ,), PAD)
            x[:n] = torch.tensor(chunk)
            mask = (torch.arange(SEQ) < n).long()
            out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def llama(dim: int, layers: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=4 * dim,
                                   num_hidden_layers=layers, num_attention_heads=max(1, dim // 16),
                                   num_key_value_heads=max(1, dim // 32), max_position_embeddings=SEQ,
                                   pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def training_args(out: Path, name: str, epochs: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out / name), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, per_device_eval_batch_size=64,
        num_train_epochs=epochs, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=10,
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=50, seed=0)


def quiet(trainer: transformers.Trainer) -> transformers.Trainer:
    """The trainer without its per-log-step prints (the logs stay in trainer.state.log_history)."""
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def val_perplexity(model, val, out: Path) -> float:
    """exp of the model's own cross-entropy per target over the validation windows."""
    ev = quiet(transformers.Trainer(model=model, args=training_args(out, "eval", 1), eval_dataset=val))
    return math.exp(ev.evaluate()["eval_loss"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/hf-distill")
    ap.add_argument("--train-bytes", type=int, default=150_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for models this small)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    train_docs, val_docs = load_stdlib_text(args.train_bytes, 15_000)
    train, val = windows(train_docs), windows(val_docs)
    print(f"{len(train)} train / {len(val)} validation windows of {SEQ} bytes (Python's standard library sources)")

    rows = []
    teacher = llama(96, 2, seed=0)
    t0 = time.perf_counter()
    quiet(transformers.Trainer(model=teacher, args=training_args(out, "teacher", 4), train_dataset=train)).train()
    rows.append(("teacher", teacher, time.perf_counter() - t0))

    scratch = llama(48, 1, seed=1)
    distilled = llama(48, 1, seed=1)  # the same init
    t0 = time.perf_counter()
    quiet(transformers.Trainer(model=scratch, args=training_args(out, "scratch", 3), train_dataset=train)).train()
    rows.append(("scratch", scratch, time.perf_counter() - t0))
    t0 = time.perf_counter()
    kd = quiet(DistillationTrainer(model=distilled, teacher_model=teacher, args=training_args(out, "distilled", 3),
                                   train_dataset=train, temperature=args.temperature, soft_weight=1.0,
                                   hard_weight=args.hard_weight))
    kd.train()
    rows.append(("distilled", distilled, time.perf_counter() - t0))
    logged = [h for h in kd.state.log_history if "kd_soft" in h]  # every 50 steps

    print(f"{'model':<10} {'params':>8} {'val ppl':>8} {'train s':>8}")
    ppl = {}
    for name, model, secs in rows:
        ppl[name] = val_perplexity(model, val, out)
        print(f"{name:<10} {sum(p.numel() for p in model.parameters()):>8} {ppl[name]:>8.3f} {secs:>8.1f}")
    terms = (f"; last logged terms: kd_soft {logged[-1]['kd_soft']:.4f}, kd_hard {logged[-1]['kd_hard']:.4f}"
             if logged else "")
    print(f"distilled - scratch: {ppl['distilled'] - ppl['scratch']:+.3f} validation perplexity (same init, data, "
          f"steps){terms}; skipped steps {kd.skipped_steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
