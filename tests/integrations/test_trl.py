"""fastkd.integrations.trl against TRL's own losses: GKDTrainer's (trl.experimental.gkd) on random inputs, and
trl.DistillationTrainer's (on-policy) on tiny Llama / Gemma 2 models built from configs, with a tokenizer built
in memory (no hub access)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # (trl.experimental says it is experimental)
pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
from conftest import lora_config, spawn_ranks  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations import trl as fkd_trl  # noqa: E402

B, S, V = 3, 6, 37


def inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, V, generator=g) * scale).requires_grad_()
    t = torch.randn(B, S, V, generator=g) * scale
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 4:] = -100
    labels[2, 1:] = -100  # skewed padding
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_loss_and_gradient_equal_trls(beta, temperature, reduction, with_labels):
    s, t, labels = inputs()
    labels = labels if with_labels else None
    s2 = s.detach().clone().requires_grad_()
    ours = fkd_trl.generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    theirs = GKDTrainer.generalized_jsd_loss(s2, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # Gradients: both fp32 computations against TRL's formula in float64 (fp32 rounding differs between
    # them by a few 1e-7: the oracle decides).
    s64 = s.detach().double().requires_grad_()
    ref = GKDTrainer.generalized_jsd_loss(s64, t.double(), labels, beta=beta, temperature=temperature,
                                          reduction=reduction)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    for loss in (ours, theirs, ref):
        (loss * weights.to(loss.dtype)).sum().backward()
    scale = float(s64.grad.abs().max())
    err_ours = float((s.grad.double() - s64.grad).abs().max()) / scale
    err_theirs = float((s2.grad.double() - s64.grad).abs().max()) / scale
    assert err_ours <= max(2 * err_theirs, 1e-6), (err_ours, err_theirs)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch_normalises_as_trl(beta):
    s, t, labels = inputs(seed=3)
    n = torch.tensor(11)
    ours = fkd_trl.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=n)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_mixin_computes_gkd_trainers_loss_without_slicing(monkeypatch):
    """GKDLossMixin.compute_loss = GKDTrainer.compute_loss (same models, batch, beta), and the kernel gets
    the whole logits (contiguous: nothing copied) with the shifted labels."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)
    student, teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), \
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    ids = torch.randint(0, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = []
    real = fkd_trl.kd_loss

    def spy(s, t, lab, **kw):
        seen.append((s.is_contiguous(), t.is_contiguous(), tuple(s.shape)))
        return real(s, t, lab, **kw)

    monkeypatch.setattr(fkd_trl, "kd_loss", spy)
    for beta in (0.0, 0.5, 1.0):
        fake = SimpleNamespace(teacher_model=teacher, beta=beta, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
        theirs = GKDTrainer.compute_loss(fake, student, batch, num_items_in_batch=torch.tensor(7))
        ours = fkd_trl.GKDLossMixin.compute_loss(fake, student, batch, num_items_in_batch=torch.tensor(7))
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        theirs = GKDTrainer.compute_loss(fake, student, batch)
        ours = fkd_trl.GKDLossMixin.compute_loss(fake, student, batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert seen and all(c == (True, True, (B, S, V)) for c in seen)
    assert issubclass(type("FastGKD", (fkd_trl.GKDLossMixin, GKDTrainer), {}), GKDTrainer)


def test_bad_arguments():
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        fkd_trl.generalized_jsd_loss(s, t, labels, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        fkd_trl.generalized_jsd_loss(s, t, labels, beta=1.5)
    assert fastkd.shift_labels is fkd_trl.shift_labels


# ---- trl.DistillationTrainer (on-policy) and DistillationLossMixin ------------------------------------------
DV = 97  # the vocabulary of the models and of the tokenizer below: <pad> <eos> <unk> w0 .. w93
PAD, EOS = 0, 1


class FastDistill(fkd_trl.DistillationLossMixin, DistillationTrainer):
    pass


def tokenizer():
    """A whitespace word-level tokenizer built in memory (TRL's trainer tokenizes the prompts itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415 (transformers' dependency)

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i}": i + 3 for i in range(DV - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def lm(kind, seed, layers=1, sharpen=20.0):
    """A tiny causal LM; its head scaled up (random heads give near-uniform distributions: a vanishing loss)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=DV, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                  bos_token_id=None)
    if kind == "gemma2":  # final_logit_softcapping: TRL applies it to the projections, the model to its logits
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None, sliding_window=64,
            layer_types=["full_attention"] * layers))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


def distill_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                seed=0, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
                max_completion_length=6, beta=0.5, temperature=1.0, activation_checkpointing=False)
    return DistillationConfig(**{**base, **kw})


def prompts(n=8, seed=0):
    import datasets  # noqa: PLC0415 (trl's dependency)

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict({"prompt": [" ".join(f"w{int(i)}" for i in torch.randint(0, DV - 3, (k,),
                                                                                               generator=g))
                                                  for k in lengths]})


def generated_batch(seed=0, tool_mask=False):
    """A micro-batch as TRL's generation step hands it to the loss: left-padded prompts, right-padded
    completions of skewed lengths (one fully masked)."""
    g = torch.Generator().manual_seed(seed)
    b, p, k = 3, 5, 7
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :4] = 0
    prompt_ids = torch.randint(3, DV, (b, p), generator=g).masked_fill(prompt_mask == 0, PAD)
    completion_mask = torch.zeros(b, k, dtype=torch.long)
    for row, n in enumerate((7, 3, 0)):
        completion_mask[row, :n] = 1
    completion_ids = torch.randint(3, DV, (b, k), generator=g).masked_fill(completion_mask == 0, PAD)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    if tool_mask:
        batch["tool_mask"] = torch.ones(b, k, dtype=torch.long)
        batch["tool_mask"][0, 2:4] = 0
    return batch


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def distiller(request, tmp_path_factory):
    """A FastDistill trainer (TRL's own _compute_loss is DistillationTrainer._compute_loss on it)."""
    kind = request.param
    return FastDistill(model=lm(kind, 2), teacher_model=lm(kind, 1, layers=2), args=distill_config(
        tmp_path_factory.mktemp("distill")), train_dataset=prompts(), processing_class=tokenizer())


def losses_and_grads(trainer, fn, batch, num_items):
    student = trainer.model
    student.zero_grad(set_to_none=True)
    loss, entropy, n_valid = fn(trainer, student, batch, num_items)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), entropy, n_valid, grads


@pytest.fixture(params=["logits", "fused"])
def path(request, distiller):
    """The mixin's two paths: kd_loss on the models' logits, fused_linear_kd_loss on their hidden states."""
    distiller.fastkd_fused_linear = request.param == "fused"
    yield request.param
    del distiller.fastkd_fused_linear  # back to the class's


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("num_items", [None, 13.0])
def test_distillation_loss_equals_trls(distiller, path, beta, temperature, num_items):
    """DistillationLossMixin._compute_loss = trl.DistillationTrainer._compute_loss: the loss (float32, 1e-6),
    the student's gradients, the entropy sum (NaN on the fused path: no logits) and the valid count;
    num_items_in_batch as TRL's compute_loss passes it (a tensor; None in evaluation)."""
    distiller.beta, distiller.temperature = beta, temperature
    batch = generated_batch()
    n = None if num_items is None else torch.tensor(num_items)
    theirs = losses_and_grads(distiller, DistillationTrainer._compute_loss, batch, n)
    ours = losses_and_grads(distiller, FastDistill._compute_loss, batch, n)
    assert ours[0].dtype == torch.float32 and theirs[0] > 1e-3  # (a loss that is not vanishingly small)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
    if path == "fused":
        assert torch.isnan(ours[1])
    else:
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert int(ours[2]) == int(theirs[2]) == 10
    assert ours[3].keys() == theirs[3].keys()
    scale = max(float(g.abs().max()) for g in theirs[3].values())
    for name, g in theirs[3].items():
        torch.testing.assert_close(ours[3][name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_distillation_loss_tool_mask_and_whole_logits(distiller, path):
    """The tool mask counts as TRL counts it; a model that takes no logits_to_keep gives its whole logits,
    read in place (the labels then ignore the prompt), or its whole hidden states on the fused path."""
    distiller.beta, distiller.temperature = 0.5, 1.0
    batch = generated_batch(seed=1, tool_mask=True)
    theirs = losses_and_grads(distiller, DistillationTrainer._compute_loss, batch, None)
    keys = distiller.model_kwarg_keys
    for model_keys in (keys, [k for k in keys if k != "logits_to_keep"]):
        distiller.model_kwarg_keys = model_keys
        try:
            ours = losses_and_grads(distiller, FastDistill._compute_loss, batch, None)
        finally:
            distiller.model_kwarg_keys = keys
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
        assert int(ours[2]) == int(theirs[2]) == 8
        for name, g in theirs[3].items():
            torch.testing.assert_close(ours[3][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_distillation_loss_reads_the_logits_in_place(distiller, monkeypatch):
    seen = []
    real = fkd_trl.kd_loss

    def spy(s, t, labels, **kw):
        seen.append((s.is_contiguous(), t.is_contiguous(), tuple(s.shape), tuple(labels.shape), kw["normalizer"]))
        return real(s, t, labels, **kw)

    monkeypatch.setattr(fkd_trl, "kd_loss", spy)
    distiller.beta, distiller.temperature = 0.5, 1.0
    n = torch.tensor(13.0)
    FastDistill._compute_loss(distiller, distiller.model, generated_batch(), n)
    (s_contig, t_contig, shape, label_shape, normalizer), = seen
    assert s_contig and t_contig and shape == (3, 8, DV) and label_shape == (3, 8)  # completion 7 + 1
    assert isinstance(normalizer, torch.Tensor) and normalizer.data_ptr() == n.data_ptr()  # TRL's count, as given


def test_distillation_loss_refuses_what_it_cannot_compute(distiller, monkeypatch):
    distiller.beta, distiller.temperature = 0.5, 0.01
    with pytest.raises(ValueError, match="temperature must be in"):
        FastDistill._compute_loss(distiller, distiller.model, generated_batch(), None)
    distiller.temperature = 1.0
    teacher = distiller.teacher_model
    attr = "_original_forward" if hasattr(teacher, "_original_forward") else "forward"  # (see _fastkd_logits)
    real = getattr(teacher, attr)

    def padded(**kw):  # a teacher head with extra (padding) rows
        out = real(**kw)
        out.logits = torch.nn.functional.pad(out.logits, (0, 3))
        return out

    monkeypatch.setattr(teacher, attr, padded)
    with pytest.raises(ValueError, match="must share the vocabulary"):
        FastDistill._compute_loss(distiller, distiller.model, generated_batch(), None)


def test_fused_path_refuses_heads_it_would_compute_differently(distiller, monkeypatch):
    """fused_linear_kd_loss applies one head post-processing to both models: a teacher whose config
    announces another one (TRL would apply each model's own), or a scale fastkd cannot take, is an error."""
    monkeypatch.setattr(distiller, "fastkd_fused_linear", True, raising=False)
    distiller.beta, distiller.temperature = 0.5, 1.0
    monkeypatch.setattr(distiller.teacher_model.config, "logit_scale", 2.0, raising=False)
    with pytest.raises(ValueError, match="head post-processing .* differ"):
        FastDistill._compute_loss(distiller, distiller.model, generated_batch(), None)
    monkeypatch.setattr(distiller.model.config, "logit_scale", 2.0, raising=False)
    torch.testing.assert_close(FastDistill._compute_loss(distiller, distiller.model, generated_batch(), None)[0],
                               DistillationTrainer._compute_loss(distiller, distiller.model, generated_batch(), None)[0],
                               rtol=1e-6, atol=1e-7)  # the same scale on both: TRL's loss
    monkeypatch.setattr(distiller.teacher_model.config, "logit_scale", 0.0)
    monkeypatch.setattr(distiller.model.config, "logit_scale", 0.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        FastDistill._compute_loss(distiller, distiller.model, generated_batch(), None)


def test_bf16_models(tmp_path):
    """bfloat16 weights: the fused path projects in fp32 as TRL does (its loss to 1e-6); the logits path takes
    the models' bf16 logits, the same objective from logits rounded to bf16 (measured: ~3e-4 relative)."""
    tr = FastDistill(model=lm("llama", 2).to(torch.bfloat16), teacher_model=lm("llama", 1, layers=2).to(torch.bfloat16),
                     args=distill_config(tmp_path), train_dataset=prompts(), processing_class=tokenizer())
    batch = generated_batch()
    for beta in (0.0, 0.5, 1.0):
        tr.beta = beta
        theirs = DistillationTrainer._compute_loss(tr, tr.model, batch, None)[0]
        tr.fastkd_fused_linear = True
        fused = FastDistill._compute_loss(tr, tr.model, batch, None)[0]
        tr.fastkd_fused_linear = False
        logits = FastDistill._compute_loss(tr, tr.model, batch, None)[0]
        torch.testing.assert_close(fused, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logits, theirs, rtol=2e-3, atol=0.0)


class FusedDistill(fkd_trl.DistillationLossMixin, DistillationTrainer):
    fastkd_fused_linear = True


@pytest.mark.parametrize("beta, fast, lora", [(0.0, FastDistill, False), (0.5, FastDistill, False),
                                              (1.0, FastDistill, False), (0.5, FusedDistill, False),
                                              (0.5, FastDistill, True), (0.5, FusedDistill, True)])
def test_distillation_training_equals_trls_trainer(tmp_path, beta, fast, lora):
    """Two optimizer steps (2 accumulated micro-batches each, on-policy generation) of FastDistill (and of
    FusedDistill) and of TRL's stock trainer from the same student: the same completions, logged losses and
    entropies (None on the fused path), and parameters; evaluation too. Also a LoRA student (TRL's
    peft_config, conftest's lora_config; TRL seeds before wrapping: both trainers start from the same
    adapters): the same adapters trained, the base frozen."""
    student0, teacher = lm("llama", 2), lm("llama", 1, layers=2)
    runs = []
    for cls in (DistillationTrainer, fast):
        tr = cls(model=copy.deepcopy(student0), teacher_model=teacher, train_dataset=prompts(),
                 eval_dataset=prompts(4, seed=1), peft_config=lora_config() if lora else None,
                 args=distill_config(tmp_path, beta=beta, temperature=1.5, per_device_eval_batch_size=2),
                 processing_class=tokenizer())
        start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        logs = [h for h in tr.state.log_history if "loss" in h]
        moved = {n for n, p in tr.model.named_parameters() if float((p - start[n]).abs().max()) > 1e-4}
        runs.append((tr.model, logs, tr.evaluate(), moved))
    (ref, ref_logs, ref_eval, ref_moved), (ours, our_logs, our_eval, our_moved) = runs
    assert len(ref_logs) == len(our_logs) == 2
    for a, b in zip(our_logs, ref_logs):
        assert a["num_tokens"] == b["num_tokens"]  # the same generated completions
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and b["loss"] > 1e-3
        assert a["entropy"] is None if fast is FusedDistill else a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    assert our_eval["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=1e-5)
    assert ref_moved and our_moved == ref_moved
    if lora:
        assert all("lora_" in n for n in ref_moved)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _ddp_worker(rank, out_dir, fused, result):
    cls = DistillationTrainer if fused is None else (FusedDistill if fused else FastDistill)
    student = lm("llama", 2)
    tr = cls(model=student, teacher_model=lm("llama", 1, layers=2), train_dataset=prompts(),
             args=distill_config(Path(out_dir), ddp_backend="gloo", max_steps=1, temperature=1.5),
             processing_class=tokenizer())
    tr.train()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, result)


@pytest.mark.slow  # (three 2-process runs: ~35 s on 2 cores)
@pytest.mark.backend_independent  # (process plumbing: the single-process tests cover both kernels' maths)
def test_two_process_ddp_equals_trls_trainer(tmp_path):
    """2 ranks (gloo) x 2 accumulated micro-batches: FastDistill and FusedDistill make the update of TRL's
    stock trainer (the student through the DDP wrapper, TRL's count over the ranks)."""
    results = {}
    for i, fused in enumerate((None, False, True)):
        results[fused] = tmp_path / f"ddp{i}.pt"
        spawn_ranks(_ddp_worker, str(tmp_path / str(i)), fused, str(results[fused]), init=False)
    ref = torch.load(results[None])
    start = lm("llama", 2).state_dict()
    assert max(float((ref[k] - start[k]).abs().max()) for k in ref) > 1e-4  # (the step moved the weights)
    for fused in (False, True):
        got = torch.load(results[fused])
        for name, b in ref.items():
            torch.testing.assert_close(got[name], b, rtol=1e-5, atol=1e-6, msg=f"fused={fused}: {name}")
