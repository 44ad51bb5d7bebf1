"""fastkd.integrations.transformers.DistillationTrainer with real transformers models built from tiny
configs (Llama, GPT-2; no hub access): the silent-wrong-gradient cases of hand-written integrations are
right here, against a direct computation with fastkd.kd_loss."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import lora_config, spawn_ranks  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations.transformers import DistillationTrainer  # noqa: E402

V, SEQ, N = 97, 12, 8


def llama(seed, layers=1, dim=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(seed, layers=1, dim=32):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=dim, n_layer=layers, n_head=4,
                                                                n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                attn_pdrop=0.0))


MODELS = {"llama": llama, "gpt2": gpt2}


def examples(n=N, seed=0):
    """Right-padded sequences of skewed lengths (2 .. SEQ): labels = input_ids, -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (SEQ,), generator=g)
        length = 2 + (i * 7) % (SEQ - 1)
        mask = (torch.arange(SEQ) < length).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, learning_rate=0.5, lr_scheduler_type="constant", optim="sgd",
                weight_decay=0.0, max_grad_norm=0.0, seed=0, per_device_train_batch_size=N, num_train_epochs=1,
                logging_steps=1, dataloader_drop_last=False)
    return transformers.TrainingArguments(**{**base, **kw})


KD = dict(temperature=2.0, hard_weight=0.5, soft_weight=1.0)


def reference_step(student, teacher, data, lr=0.5):
    """One SGD step on the loss of the whole batch: kd_loss batchmean over the shifted targets, i.e. the
    sum over every valid target divided by their count."""
    student = copy.deepcopy(student)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = fastkd.kd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], **KD)  # the textbook slicing
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return student, loss.item()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_accumulated_step_equals_one_big_batch(tmp_path, kind):
    """4 micro-batches of 2 with skewed padding = one batch of 8 = the direct computation (1e-6): the
    loss is normalised by the accumulated batch's valid targets, whatever the model's loss kwargs."""
    make = MODELS[kind]
    teacher, student0 = make(1, layers=2), make(2)
    data = examples()
    ref, ref_loss = reference_step(student0, teacher, data)
    for batch, accum in ((N, 1), (2, 4)):
        student = copy.deepcopy(student0)
        tr = DistillationTrainer(model=student, teacher_model=teacher,
                                 args=args(tmp_path, per_device_train_batch_size=batch,
                                           gradient_accumulation_steps=accum, max_steps=1),
                                 train_dataset=data, **KD)
        tr.train()
        assert tr.state.global_step == 1
        for (name, a), b in zip(student.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{kind} {batch}x{accum}: {name}")
        logged = next(h for h in tr.state.log_history if "loss" in h)
        assert logged["loss"] == pytest.approx(ref_loss, rel=1e-5)
        # The logged terms add up to the loss: soft + 0.5 * hard per valid target.
        assert logged["kd_soft"] + 0.5 * logged["kd_hard"] == pytest.approx(ref_loss, rel=1e-5)
        assert logged["kd_skipped_steps"] == 0


def test_the_batchmean_drop_in_would_be_wrong_here(tmp_path):
    """Why the trainer normalises itself: kd_loss(..., batchmean) per micro-batch, as a hand-written
    compute_loss would, gives another update than the big batch under accumulation with skewed padding
    (this test fails if the two ever agree, i.e. if it stops showing the pitfall)."""
    teacher, student0 = llama(1, layers=2), llama(2)
    data = examples()
    ref, _ = reference_step(student0, teacher, data)

    class Naive(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            s = model(**inputs).logits
            with torch.no_grad():
                t = teacher(**inputs).logits
            return fastkd.kd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], **KD)

    student = copy.deepcopy(student0)
    Naive(model=student, args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                   max_steps=1), train_dataset=data).train()
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(student.parameters(), ref.parameters()))
    assert diff > 1e-4


def test_evaluation_loss_is_the_kd_loss_per_target(tmp_path):
    teacher, student = llama(1, layers=2), llama(2)
    data = examples()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, per_device_eval_batch_size=3),
                             eval_dataset=data, **KD)
    metrics = tr.evaluate()
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = float(fastkd.kd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], **KD))
    # The Trainer averages the per-batch losses (3 + 3 + 2 examples): per-batch normalised by their own targets.
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] == pytest.approx(want, rel=0.2)
    assert teacher.training is False and all(not p.requires_grad for p in teacher.parameters())


def test_saved_model_holds_the_student_alone(tmp_path):
    teacher, student = llama(1, layers=2), llama(2)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, max_steps=1),
                             train_dataset=examples(), **KD)
    tr.train()
    tr.save_model(str(tmp_path / "saved"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert loaded.config.num_hidden_layers == 1  # the student's, not the 2-layer teacher's
    for (name, a), b in zip(loaded.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name


class NaNAt:
    """A teacher wrapper whose logits are NaN on the calls in `bad` (0-based)."""

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0


def test_a_nonfinite_gradient_norm_skips_the_step_and_the_scheduler(tmp_path):
    teacher, student = llama(1, layers=2), llama(2)
    state = NaNAt({1})
    real_forward = teacher.forward

    def forward(*a, **kw):
        out = real_forward(*a, **kw)
        if student.training and state.calls in state.bad:
            out.logits = torch.full_like(out.logits, float("nan"))
        if student.training:
            state.calls += 1
        return out

    teacher.forward = forward
    seen = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, st, control, **kwargs):
            seen.append(([p.detach().clone() for p in student.parameters()], kwargs["lr_scheduler"].last_epoch))

    tr = DistillationTrainer(model=student, teacher_model=teacher,
                             args=args(tmp_path, per_device_train_batch_size=4, max_steps=3, max_grad_norm=1.0,
                                       lr_scheduler_type="linear", warmup_steps=0),
                             train_dataset=examples(), callbacks=[Record()], **KD)
    tr.train()
    assert tr.skipped_steps == 1 and tr.state.global_step == 3
    (w1, e1), (w2, e2), (w3, e3) = seen
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))  # step 2 skipped: weights untouched
    assert e2 == e1 and e3 == e1 + 1  # and the LR schedule did not advance
    assert not all(torch.equal(a, b) for a, b in zip(w2, w3))  # step 3 trained again
    assert [h["kd_skipped_steps"] for h in tr.state.log_history if "loss" in h] == [0, 1, 1]


def test_clipping_goes_through_fastkd(tmp_path, monkeypatch):
    calls = []
    real = fastkd.integrations.transformers.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        calls.append(max_norm)
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(fastkd.integrations.transformers, "clip_grad_norm_", spy)
    teacher, student = llama(1, layers=2), llama(2)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, max_steps=2, max_grad_norm=0.5),
                             train_dataset=examples(), **KD)
    tr.train()
    assert calls == [0.5, 0.5]
    assert all("grad_norm" in h for h in tr.state.log_history if "loss" in h)


def test_bf16_mixed_precision_runs(tmp_path):
    teacher, student = llama(1, layers=2), llama(2)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, max_steps=2, bf16=True,
                                                                             learning_rate=0.05),
                             train_dataset=examples(), **KD)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_bad_input_is_a_clear_error(tmp_path):
    teacher, student = llama(1), llama(2)
    with pytest.raises(TypeError, match="teacher_model must be an nn.Module"):
        DistillationTrainer(model=student, teacher_model="teacher", args=args(tmp_path))
    with pytest.raises(ValueError, match="unknown divergence 'kll'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), divergence="kll")
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), temperature=0.0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V + 3, hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=1, num_attention_heads=4,
                                                                  num_key_value_heads=2))
    tr = DistillationTrainer(model=student, teacher_model=wide, args=args(tmp_path, max_steps=1),
                             train_dataset=examples(), **KD)
    with pytest.raises(ValueError, match="share the vocabulary"):
        tr.train()
    nolabels = [{k: v for k, v in d.items() if k != "labels"} for d in examples()]
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, max_steps=1),
                             train_dataset=nolabels, **KD)
    with pytest.raises(ValueError, match="the batch has no labels"):
        tr.train()


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert fastkd.shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    s, t = torch.randn(2, 4, 9, requires_grad=True), torch.randn(2, 4, 9)
    a = fastkd.kd_loss(s, t, fastkd.shift_labels(labels), hard_weight=0.5, reduction="sum")
    b = fastkd.kd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], hard_weight=0.5, reduction="sum")
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="integer tensor"):
        fastkd.shift_labels(torch.zeros(3))


def _ddp_worker(rank, out_dir, result):
    teacher, student = llama(1, layers=2), llama(2)
    tr = DistillationTrainer(model=student, teacher_model=teacher,
                             args=args(Path(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                       max_steps=1, ddp_backend="gloo", average_tokens_across_devices=True),
                             train_dataset=examples(), **KD)
    tr.train()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, result)


@pytest.mark.backend_independent
def test_two_process_ddp_equals_the_single_process_batch(tmp_path):
    """2 ranks x 2 micro-batches of 2 (gloo, DistributedSampler) = one batch of 8 in one process: the count
    of valid targets is summed over the ranks and the loss multiplied by the world size (DDP averages)."""
    result = tmp_path / "ddp.pt"
    spawn_ranks(_ddp_worker, str(tmp_path), str(result), init=False)  # (the trainer makes the group)
    ref, _ = reference_step(llama(2), llama(1, layers=2), examples())
    got = torch.load(result)
    for name, b in ref.state_dict().items():
        torch.testing.assert_close(got[name], b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.backend_independent
def test_the_example_script_runs(tmp_path, capsys):
    """examples/hf_distill.py on a sliver of its text: three models trained, their perplexities printed."""
    import importlib.util  # noqa: PLC0415

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_distill.py"
    spec = importlib.util.spec_from_file_location("hf_distill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "run"), "--train-bytes", "6000"]) == 0
    printed = capsys.readouterr().out
    for name in ("teacher", "scratch", "distilled"):
        line = next(ln for ln in printed.splitlines() if ln.startswith(name + " "))
        assert math.isfinite(float(line.split()[2]))
    assert "distilled - scratch:" in printed and "skipped steps 0" in printed


class Fp16Logits(torch.nn.Module):
    """A teacher whose logits are float16 numbers (in fp32): a float16 teacher cache holds them exactly."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits.half().float()
        return out


def test_offline_from_a_teacher_cache_equals_online(tmp_path):
    """teacher_cache with K = V (a float16-exact teacher): the same update as the online teacher, in 4
    micro-batches of 2 (topk_kd_loss on the batch's cached entries; no teacher runs); eval too."""
    teacher, student0 = Fp16Logits(llama(1, layers=2)), llama(2)
    data = examples()
    cache = fastkd.TeacherCache.build(tmp_path / "cache", teacher, data, top_k=V, progress=False)
    online = copy.deepcopy(student0)
    DistillationTrainer(model=online, teacher_model=teacher, train_dataset=data, **KD,
                        args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                  max_steps=1)).train()
    offline = copy.deepcopy(student0)
    tr = DistillationTrainer(model=offline, teacher_cache=cache, eval_teacher_cache=cache, train_dataset=data,
                             eval_dataset=data, **KD,
                             args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                       max_steps=1))
    tr.train()
    for (name, a), b in zip(offline.named_parameters(), online.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ev = DistillationTrainer(model=offline, teacher_model=teacher, eval_dataset=data, **KD, args=args(tmp_path))
    assert tr.evaluate()["eval_loss"] == pytest.approx(ev.evaluate()["eval_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(model=offline, teacher_model=teacher, teacher_cache=cache, args=args(tmp_path))
    with pytest.raises(ValueError, match="eval_dataset needs its own eval_teacher_cache"):
        DistillationTrainer(model=offline, teacher_cache=cache, train_dataset=data, eval_dataset=data,
                            args=args(tmp_path))
    with pytest.raises(ValueError, match="not supported with a top-k teacher"):
        DistillationTrainer(model=offline, teacher_cache=cache, train_dataset=data, divergence="reverse_kl",
                            args=args(tmp_path))
    with pytest.raises(ValueError, match="has 7 examples but its teacher cache"):
        DistillationTrainer(model=offline, teacher_cache=cache, train_dataset=data[:7], args=args(tmp_path))


def gemma2(seed, layers=1, dim=32):
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                    final_logit_softcapping=5.0, attn_logit_softcapping=None, sliding_window=64,
                                    layer_types=["full_attention"] * layers)
    return transformers.Gemma2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_fused_heads_equal_the_logits_path(tmp_path, kind):
    """fused_linear=True (fused_linear_kd_loss on the hidden states and heads; GPT-2's head tied to its
    embedding, Gemma 2's logits softcapped) gives the logits path's update, 4 accumulated micro-batches, and logs
    the same soft and hard terms."""
    make = {**MODELS, "gemma2": gemma2}[kind]
    teacher, student0 = make(1, layers=2), make(2)
    results = []
    for fused in (False, True):
        student = copy.deepcopy(student0)
        tr = DistillationTrainer(model=student, teacher_model=teacher, fused_linear=fused, train_dataset=examples(),
                                 args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                           max_steps=1), **KD)
        tr.train()
        results.append((student, next(h for h in tr.state.log_history if "loss" in h)))
    (a, la), (b, lb) = results
    for key in ("loss", "kd_soft", "kd_hard"):
        assert la[key] == pytest.approx(lb[key], rel=1e-5), key
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}")


@pytest.mark.parametrize("fused", [False, True])
def test_normalisation_costs_no_scaling_pass(tmp_path, scale_factors, fused):
    """The division by num_items_in_batch is inside the fused gradients on both paths (the normalizer argument):
    every backward scales them by a grad_output of 1 (free), never by 1 / num_items_in_batch (a pass each)."""
    tr = DistillationTrainer(model=llama(2), teacher_model=llama(1), fused_linear=fused, train_dataset=examples(),
                             args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                       max_steps=1), **KD)
    tr.train()
    assert scale_factors and all(x == 1.0 for x in scale_factors), scale_factors


def test_fused_heads_refuse_a_head_they_would_compute_differently(tmp_path):
    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
            out.logits = out.logits * 2.0  # a post-processing no config attribute announces
            return out

    torch.manual_seed(2)
    student = Scaled(transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=2))
    tr = DistillationTrainer(model=student, teacher_model=llama(1), fused_linear=True, train_dataset=examples(),
                             args=args(tmp_path, max_steps=1), **KD)
    with pytest.raises(ValueError, match="Scaled's logits are not its output head's"):
        tr.train()
    with pytest.raises(ValueError, match="fused_linear=True fuses the teacher's head too"):
        DistillationTrainer(model=llama(2), teacher_cache=object(), fused_linear=True, args=args(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_trains_as_eager(tmp_path, monkeypatch, fused):
    """TrainingArguments(torch_compile=True) (the student compiled with inductor by accelerate; the loss is
    compute_loss's fastkd.kd_loss on the compiled model's logits, or fused_linear_kd_loss on its hidden states
    with fused_linear=True): two accumulated steps give the eager run's losses and parameters to fp32
    tolerance (inductor fuses and reorders the model's fp32 maths: rtol 1e-5, atol 1e-6), with no graph
    breaks but transformers' own on the hidden-state path, and every micro-batch's loss went through fastkd's
    op, eagerly."""
    calls = []
    op = "fused_linear_kd_loss" if fused else "kd_loss"
    real = getattr(fastkd.integrations.transformers, op)

    def spy(*a, **kw):
        calls.append(torch.compiler.is_compiling())
        return real(*a, **kw)

    monkeypatch.setattr(fastkd.integrations.transformers, op, spy)
    teacher, student0 = llama(1, layers=2), llama(2)
    counters = torch._dynamo.utils.counters
    counters.clear()  # (they are process-wide: other tests' compiles count there too)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        student = copy.deepcopy(student0)
        tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=examples(), fused_linear=fused,
                                 args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                           max_steps=2, torch_compile=compiled), **KD)
        tr.train()
        runs.append((student, [h["loss"] for h in tr.state.log_history if "loss" in h], tr))
    (eager, eager_losses, _), (comp, comp_losses, tr) = runs
    assert isinstance(tr.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # the student really compiled
    assert len(comp_losses) == 2 and comp_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, a), b in zip(comp.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # 2 runs x 2 steps x 2 micro-batches, one loss each (the logged terms come from the same call), all eager
    # fastkd calls on the compiled model's outputs.
    assert calls == [False] * (2 * 2 * 2)
    assert counters["stats"]["unique_graphs"] >= 1
    breaks = dict(counters["graph_break"])
    if fused:
        # transformers 5.24 collects hidden states (output_hidden_states=True) by installing hooks under a
        # threading lock (and counting their handles on a class attribute), which dynamo does not trace: the
        # model compiles in pieces. Those breaks, in transformers' output capturing, and no other.
        hooks = ("`lock` context manager", "torch.utils.hooks.RemovableHandle")
        assert breaks and all(any(h in reason for h in hooks) for reason in breaks), breaks
    else:
        assert not breaks, breaks


def lora(model):
    """A LoRA student (peft; conftest's lora_config), the base frozen."""
    import peft  # noqa: PLC0415

    return peft.get_peft_model(model, lora_config())


@pytest.mark.parametrize("fused", [False, True])
def test_a_lora_student_trains_its_adapters_as_the_direct_computation(tmp_path, fused):
    """A peft LoRA student on both paths, 4 accumulated micro-batches: the adapters take the update of the
    batch's direct computation (1e-6), the base stays put, and the saved model is the adapter alone."""
    teacher, student = llama(1, layers=2), lora(llama(2))
    ref, ref_loss = reference_step(student, teacher, examples())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    tr = DistillationTrainer(model=student, teacher_model=teacher, fused_linear=fused, train_dataset=examples(),
                             args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                       max_steps=1), **KD)
    tr.train()
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for (name, a), b in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, start[k])}
    assert moved == {k for k, v in student.state_dict().items() if "lora_" in k}, sorted(moved)  # every adapter, only
    logged = next(h for h in tr.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(ref_loss, rel=1e-5)

    from safetensors.torch import load_file  # noqa: PLC0415

    tr.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)
    assert len(saved) == len(trained)  # (each adapter factor, nothing of the base or the teacher)


def test_fused_heads_refuse_an_adapter_on_the_head(tmp_path):
    """LoRA on lm_head makes the head a peft layer (base weight plus the adapter's product): the fused loss,
    which takes one weight, refuses it rather than distil through the base weight alone."""
    import peft  # noqa: PLC0415

    student = peft.get_peft_model(llama(2), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    tr = DistillationTrainer(model=student, teacher_model=llama(1), fused_linear=True, train_dataset=examples(),
                             args=args(tmp_path, max_steps=1), **KD)
    with pytest.raises(ValueError, match=r"output head \(get_output_embeddings\) is peft\.tuners\.lora\..*, not an nn.Linear"):
        tr.train()
