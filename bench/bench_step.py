"""One distillation training step of a small language model with a 32k vocabulary: the textbook way
against fastkd, side by side in one process.

    python -m bench.bench_step [--device cpu|cuda] [--quick] [--out bench/results/step_cpu.csv]

A step: teacher forward (no grad), student forward and backward through the distillation loss (forward
KL at temperature T mixed with the hard-label cross-entropy), gradient clipping to norm 1, an AdamW
step. The two styles differ in the loss and the clipping only:

    reference  F.kl_div(F.log_softmax(s/T), F.softmax(t/T), "batchmean") * T^2 + w * F.cross_entropy
               (fastkd.reference.textbook_kd_loss), torch.nn.utils.clip_grad_norm_
    fastkd     fastkd.kd_loss(s, t, labels, temperature=T, hard_weight=w), fastkd.clip_grad_norm_

Both use the same teacher, the same initial student weights (one copy each, since steps update them)
and the same batch. Before timing, one step of each style from the same weights must give the same
loss and gradient norm: otherwise the run stops, since it would compare different maths.

A fastkd row with the heads fused (``head`` = ``fused``): ``fastkd.fused_linear_kd_loss`` on both models'
last hidden states and output heads (weights and biases), so that neither model's (tokens x vocabulary)
logits exist; the same maths as the fastkd row (checked with the others before timing).

A row for the offline teacher: the teacher's top-64 logits of the batch were cached beforehand
(``fastkd.TeacherCache``, float16 values, int32 indices, in a temporary folder), and the step reads them
from the memory-mapped cache, stacks them, moves them to the device and trains on
``fastkd.topk_kd_loss`` with the same temperature and hard weight: no teacher forward. Its loss is other
maths (the renormalised top-k teacher), so it is checked against the float64 oracle
(``fastkd.reference.topk_kd_loss``) on the same logits instead.

Size (CPU): batch 4 x 128 tokens, vocabulary 32000 (a Llama-2-sized tokenizer), student d_model 256 x
2 layers, teacher d_model 256 x 4 layers, fp32. The vocabulary makes the logits ([512, 32000], 66 MB)
the largest tensors of the step, as in LM distillation; the transformer bodies are small, so that a
step takes under a second on two cores and the loss is a visible share of it rather than hidden behind
a large model.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

import fastkd
from fastkd import reference
from fastkd.data import TeacherCache
from fastkd.demos.byte_lm import ByteLM

from . import common

TEMPERATURE = 2.0
HARD_WEIGHT = 0.5
MAX_NORM = 1.0
TOP_K = 64  # the offline row's cache
ONLINE = "online"
OFFLINE = f"offline top-{TOP_K} cache"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    batch: int
    seq: int
    vocab: int
    d_model: int
    student_layers: int
    teacher_layers: int
    repeats: int
    warmup: int = 1  # untimed steps first


CONFIGS = {
    "cpu": StepConfig(batch=4, seq=128, vocab=32000, d_model=256, student_layers=2, teacher_layers=4,
                      repeats=10),
    # The same vocabulary, 32x the tokens and a wider model: a step that is more than launch overhead.
    "cuda": StepConfig(batch=32, seq=512, vocab=32000, d_model=512, student_layers=4, teacher_layers=8,
                       repeats=20),
    "quick": StepConfig(batch=2, seq=16, vocab=1000, d_model=32, student_layers=1, teacher_layers=1,
                        repeats=3),
}


def _reference_loss(s, t, labels):
    return reference.textbook_kd_loss(s, t, labels, temperature=TEMPERATURE, hard_weight=HARD_WEIGHT)


def _fastkd_loss(s, t, labels):
    return fastkd.kd_loss(s, t, labels, temperature=TEMPERATURE, hard_weight=HARD_WEIGHT)


STYLES = {
    "reference": (_reference_loss, torch.nn.utils.clip_grad_norm_),
    "fastkd": (_fastkd_loss, fastkd.clip_grad_norm_),
}
FUSED = "fastkd_fused"  # the fastkd style with both heads fused into the loss


def _optimizer_step(student, loss_fn, clip=fastkd.clip_grad_norm_):
    """A training step as a closure: zero the gradients, loss_fn() forward, backward, clip to MAX_NORM, an
    AdamW step; returns the loss and the pre-clip gradient norm (0-d tensors, never read inside the step)."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        norm = clip(student.parameters(), MAX_NORM)
        opt.step()
        return loss.detach(), norm

    return step


def make_step(teacher, student, ids, labels, style):
    """The training step of one style (STYLES)."""
    loss_fn, clip = STYLES[style]
    vocab = student.head.out_features

    def loss():
        with torch.no_grad():
            t_logits = teacher(ids)
        s_logits = student(ids)
        # (tokens, vocab): "batchmean" of F.kl_div divides by the first dimension, so the textbook loss
        # is per token only on 2-D logits; fastkd's batchmean is per token for any leading shape.
        return loss_fn(s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab), labels.reshape(-1))

    return _optimizer_step(student, loss, clip)


def make_fused_step(teacher, student, ids, labels):
    """The fastkd step with the heads fused: the loss from the last hidden states and the heads' weights."""
    dim = student.head.in_features

    def loss():
        with torch.no_grad():
            ht = teacher.hidden(ids)
        hs = student.hidden(ids)
        return fastkd.fused_linear_kd_loss(hs.reshape(-1, dim), student.head.weight, ht.reshape(-1, ht.shape[-1]),
                                           teacher.head.weight, labels.reshape(-1), student_bias=student.head.bias,
                                           teacher_bias=teacher.head.bias, temperature=TEMPERATURE,
                                           hard_weight=HARD_WEIGHT)

    return _optimizer_step(student, loss)


def make_offline_step(student, cache: TeacherCache, ids, labels):
    """The offline style's step: the batch's cached top-k read from ``cache`` (one example per sequence),
    then the student's forward and backward through topk_kd_loss, fastkd's clipping and the AdamW step."""
    vocab = student.head.out_features

    def loss():
        entries = [cache[i] for i in range(ids.shape[0])]
        values = torch.stack([v for v, _ in entries]).to(ids.device, non_blocking=True)
        indices = torch.stack([i for _, i in entries]).to(ids.device, non_blocking=True)
        s_logits = student(ids)
        return fastkd.topk_kd_loss(s_logits.reshape(-1, vocab), values.reshape(-1, TOP_K), indices.reshape(-1, TOP_K),
                                   labels.reshape(-1), temperature=TEMPERATURE, hard_weight=HARD_WEIGHT)

    return _optimizer_step(student, loss)


def check_offline_maths(student, cache: TeacherCache, ids, labels, loss: float) -> None:
    """The offline step's first loss against the float64 oracle on the same student and cached entries."""
    with torch.no_grad():
        s = student(ids).double()
    values = torch.stack([cache[i][0] for i in range(ids.shape[0])]).to(ids.device).double()
    indices = torch.stack([cache[i][1] for i in range(ids.shape[0])]).to(ids.device)
    want = float(reference.topk_kd_loss(s, values, indices, labels, temperature=TEMPERATURE,
                                        hard_weight=HARD_WEIGHT))
    if abs(loss - want) > 1e-4 * abs(want) + 1e-6:
        raise RuntimeError(f"bench_step: the offline step's loss {loss:.7g} is not the float64 top-k oracle's "
                           f"{want:.7g}; timing it would be meaningless")


def check_same_maths(steps: dict) -> dict:
    """One step of each style from the same weights; the losses and gradient norms must agree."""
    got = {name: tuple(float(x) for x in step()) for name, step in steps.items()}
    (ra, (la, na)), *others = got.items()
    for rb, (lb, nb) in others:
        if abs(la - lb) > 1e-4 * abs(la) + 1e-6 or abs(na - nb) > 1e-3 * abs(na) + 1e-6:
            raise RuntimeError(f"bench_step: the styles compute different things: {ra} loss {la:.7g} grad "
                               f"norm {na:.7g}, {rb} loss {lb:.7g} grad norm {nb:.7g}; timing them would be "
                               "meaningless")
    return got


def run(cfg: StepConfig, device: torch.device, repeats: int, on_row=None) -> list[dict]:
    """Both styles' rows; on_row(rows) after each one (a run cut short keeps what it measured)."""
    torch.manual_seed(0)
    teacher = ByteLM(cfg.d_model, cfg.teacher_layers, seq_len=cfg.seq, vocab=cfg.vocab).to(device).eval()
    student0 = ByteLM(cfg.d_model, cfg.student_layers, seq_len=cfg.seq, vocab=cfg.vocab).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device, generator=g)
    labels = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device, generator=g)
    students = {name: copy.deepcopy(student0) for name in (*STYLES, FUSED, OFFLINE)}
    steps = {(name, ONLINE): make_step(teacher, students[name], ids, labels, name) for name in STYLES}
    steps[FUSED, ONLINE] = make_fused_step(teacher, students[FUSED], ids, labels)
    first = {(name, ONLINE): got for name, got in check_same_maths({n: steps[n, ONLINE] for n in (*STYLES, FUSED)}).items()}
    tokens = cfg.batch * cfg.seq
    n_params = sum(p.numel() for p in students["fastkd"].parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-step-") as folder:
        # The offline teacher: the batch's top-k cached once (the teacher in fp32, as in the online rows).
        cache = TeacherCache.build(Path(folder) / "cache", teacher, [(ids[b], labels[b]) for b in range(cfg.batch)],
                                   top_k=TOP_K, batch_size=cfg.batch, autocast=None, progress=False)
        steps["fastkd", OFFLINE] = make_offline_step(students[OFFLINE], cache, ids, labels)
        first["fastkd", OFFLINE] = tuple(float(x) for x in steps["fastkd", OFFLINE]())
        check_offline_maths(student0, cache, ids, labels, first["fastkd", OFFLINE][0])
        del student0
        for (name, teacher_kind), step in steps.items():
            med, p20, p80 = common.time_call(step, device, repeats=repeats, warmup=cfg.warmup)
            mem = common.peak_memory_mb(step, device)  # above the models, optimizer state and batch
            loss, norm = first[name, teacher_kind]
            rows.append({"op": "kd_train_step", "provider": "fastkd" if name == FUSED else name, "teacher": teacher_kind,
                         "head": "fused" if name == FUSED else "logits", **dataclasses.asdict(cfg),
                         "repeats": repeats, "tokens": tokens, "student_params": n_params, "dtype": "float32",
                         "median_ms": med, "p20_ms": p20, "p80_ms": p80, "tokens_per_s": tokens / (med * 1e-3),
                         "peak_mem_mib": mem, "loss": loss, "grad_norm": norm})
            if on_row is not None:
                on_row(rows)
    base = next(r["median_ms"] for r in rows if r["provider"] == "fastkd" and r["teacher"] == ONLINE
                and r["head"] == "logits")
    for r in rows:
        r["fastkd_speedup"] = r["median_ms"] / base
    return rows


def main(argv=None) -> int:
    return common.scenario_main(argv, __doc__.split("\n\n")[0], CONFIGS, "step", run,
                                ["provider", "teacher", "head", "tokens", "vocab", "median_ms", "p20_ms", "p80_ms",
                                 "tokens_per_s", "peak_mem_mib", "loss", "grad_norm", "fastkd_speedup"])


if __name__ == "__main__":
    sys.exit(main())
