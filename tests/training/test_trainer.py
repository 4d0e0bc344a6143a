"""Trainer: schedule, trajectory parity with transformers + peft, resume, checkpoints, errors, real data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import DATA, NO_DROPOUT, TINY, make_hf_checkpoint, read_jsonl, require_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lora import CheckpointError, CheckpointNotFoundError, ConfigError, DataError, TrainingError
from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.data.batching import BucketedBatches, collate, lm_example
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.peft.lora import apply_lora
from gpt2lora.training.trainer import (
    History,
    Trainer,
    find_checkpoint,
    lm_loss,
    lr_at_step,
    parameter_groups,
    warmup_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


PAD = 0  # make_hf_checkpoint's pad_token_id: real tokens below are drawn from 1..vocab-1


def expected_lr(s: int, total: int, lr: float, min_lr: float, ratio: float, schedule: str = "cosine") -> float:
    """The schedule of the issue, written out independently of gpt2lora.training.trainer."""
    w = math.ceil(ratio * total)
    if s < w:
        return min_lr + (lr - min_lr) * (s + 1) / w
    if schedule == "constant":
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (s - w) / max(1, total - w)))


def cfg(**overrides) -> TrainConfig:
    base = {"lr": 3e-3, "min_lr": 1e-4, "warmup_ratio": 0.2, "epochs": 2, "grad_clip": 0.5, "weight_decay": 0.1,
                "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def random_rows(n: int, kind: str, seed: int = 0, num_labels: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, TINY["vocab_size"], (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "label": i % num_labels} if kind == "cls"
                    else lm_example(ids[:2], ids[2:], eos_token_id=7))
    return rows


def fixed_batches(kind: str, n_rows: int = 12, batch_size: int = 4, seed: int = 0,
                  num_labels: int = 3) -> list[dict]:
    rows = random_rows(n_rows, kind, seed, num_labels)
    return [collate(rows[i:i + batch_size], pad_token_id=PAD) for i in range(0, n_rows, batch_size)]


def tiny_classifier(dropout: float = 0.0, num_labels: int = 3, seed: int = 0) -> GPT2ForSequenceClassification:
    config = GPT2Config(**TINY, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2ForSequenceClassification(config, num_labels=num_labels, pad_token_id=PAD, seed=seed)


# --- schedule and optimizer groups ---

def test_lr_schedule_hand_values():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_ratio=0.25, epochs=1)
    assert warmup_steps(10, 0.25) == 3  # ceil(2.5)
    assert lr_at_step(0, 10, c) == pytest.approx(0.1 + 0.9 / 3)
    assert lr_at_step(2, 10, c) == pytest.approx(1.0)  # last warmup step reaches lr
    assert lr_at_step(3, 10, c) == pytest.approx(1.0)  # cosine starts at lr
    assert lr_at_step(3 + 7 / 2, 10, c) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr
    assert lr_at_step(9, 10, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 6 / 7)))
    no_warmup = TrainConfig(lr=2.0, warmup_ratio=0.0)
    assert lr_at_step(0, 5, no_warmup) == 2.0
    constant = TrainConfig(lr=2.0, min_lr=1.0, warmup_ratio=0.5, schedule="constant")
    assert [lr_at_step(s, 4, constant) for s in range(4)] == [1.5, 2.0, 2.0, 2.0]
    assert lr_at_step(0, 1, TrainConfig(lr=1.0, warmup_ratio=0.0)) == 1.0  # S - W = 1: no division by 0


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.floats(0, 0.99), st.floats(1e-5, 1.0), st.floats(0, 1.0),
       st.sampled_from(["cosine", "constant"]))
def test_lr_schedule_matches_formula_and_stays_in_range(total, ratio, lr, min_share, schedule):
    c = TrainConfig(lr=lr, min_lr=lr * min_share, warmup_ratio=ratio, schedule=schedule)
    lrs = [lr_at_step(s, total, c) for s in range(total)]
    for s, value in enumerate(lrs):
        assert value == pytest.approx(expected_lr(s, total, c.lr, c.min_lr, ratio, schedule), rel=1e-12)
        assert c.min_lr - 1e-12 <= value <= c.lr + 1e-12
    w = warmup_steps(total, ratio)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[w:], lrs[w + 1:]))  # never rises after warmup


def test_weight_decay_only_on_trainable_matrices():
    model = tiny_classifier()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    decay, rest = groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 and p.requires_grad for p in decay["params"])
    assert all(p.dim() < 2 for p in rest["params"])
    assert "transformer.h.0.attn.c_attn.weight" not in decay["names"]
    assert {"score.weight", "transformer.wte.weight"} <= set(decay["names"])
    assert {"transformer.ln_f.weight", "transformer.h.1.mlp.c_fc.bias"} <= set(rest["names"])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(rest["params"]) == n_trainable


# --- trajectory parity with transformers + peft ---

def reference_run(hf_model, batches, config: TrainConfig, epochs: int) -> tuple[list, list, list]:
    """A plain transformers/peft loop: torch AdamW (or SGD) + LambdaLR + clip_grad_norm_."""
    hf_model.train()
    params = [p for p in hf_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    else:
        opt = torch.optim.SGD(groups, lr=config.lr,
                              momentum=config.momentum if config.optimizer == "sgd_momentum" else 0.0)
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: expected_lr(s, total, config.lr, config.min_lr, config.warmup_ratio) / config.lr)
    losses, norms, lrs = [], [], []
    for _ in range(epochs):
        for b in batches:
            loss = hf_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip)))
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    return losses, norms, lrs


def models_for(kind: str, method: str, tmp_path):
    import peft
    import transformers

    if kind == "cls":
        folder = make_hf_checkpoint(tmp_path / "ckpt", seed=1, cls="GPT2ForSequenceClassification",
                                    num_labels=3, **NO_DROPOUT)
        ours = GPT2ForSequenceClassification.from_pretrained(folder)
        theirs = transformers.GPT2ForSequenceClassification.from_pretrained(folder)
    else:
        folder = make_hf_checkpoint(tmp_path / "ckpt", seed=1, **NO_DROPOUT)
        ours = GPT2.from_pretrained(folder)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(folder)
    if method == "lora":
        apply_lora(ours, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True, task_type="SEQ_CLS" if kind == "cls" else "CAUSAL_LM"))
        theirs_params = dict(theirs.named_parameters())
        with torch.no_grad():  # same LoRA start: copy our A (and B) into peft by name
            for name, p in ours.named_parameters():
                if ".lora_" in name:
                    theirs_params[f"base_model.model.{name}.default.weight"].copy_(p)
        ours_trainable = sum(p.requires_grad for p in ours.parameters())
        assert ours_trainable == sum(p.requires_grad for p in theirs.parameters())
    return ours, theirs


@pytest.mark.parametrize("kind, method, optimizer", [
    ("cls", "lora", "adamw"), ("cls", "full", "adamw"), ("lm", "lora", "adamw"), ("lm", "full", "adamw"),
    ("cls", "full", "sgd"), ("cls", "lora", "sgd_momentum"),
])
def test_trajectory_matches_transformers_and_peft(kind, method, optimizer, tmp_path):
    ours, theirs = models_for(kind, method, tmp_path)
    batches = fixed_batches(kind)
    lr = 3e-3 if optimizer == "adamw" else 0.05
    config = cfg(optimizer=optimizer, lr=lr, min_lr=lr / 30)
    history = Trainer(ours, config).fit(batches)
    ref_losses, ref_norms, ref_lrs = reference_run(theirs, batches, config, epochs=2)
    assert len(history.steps) == 6 == history.total_steps
    assert history.losses == pytest.approx(ref_losses, abs=1e-4)
    assert [s["grad_norm"] for s in history.steps] == pytest.approx(ref_norms, rel=1e-4)
    assert any(n > config.grad_clip for n in ref_norms)  # clipping was exercised
    assert history.lrs == pytest.approx(ref_lrs, rel=1e-9)
    assert history.lrs == pytest.approx([expected_lr(s, 6, config.lr, config.min_lr, 0.2) for s in range(6)],
                                        rel=1e-12)
    assert history.losses[0] != pytest.approx(history.losses[-1], abs=1e-3)  # training moved the model


# --- resume ---

class Killed(Exception):
    pass


class DiesAfter:
    """Batches that raise (like a killed process) once ``n`` batches were handed out."""

    def __init__(self, data, n: int) -> None:
        self.data, self.left = data, n

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def __iter__(self):
        for batch in self.data:
            if self.left == 0:
                raise Killed()
            self.left -= 1
            yield batch


def lora_classifier(lora_seed: int = 0) -> GPT2ForSequenceClassification:
    model = tiny_classifier(dropout=0.1, num_labels=2)
    return apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.1), seed=lora_seed)


def test_resume_continues_exactly(tmp_path):
    rows = random_rows(40, "cls", seed=3, num_labels=2)
    data = BucketedBatches(rows, batch_size=4, seed=1, pad_token_id=PAD, mega_batch_factor=3)
    evals = [collate(rows[:8], pad_token_id=PAD)]
    config = cfg(grad_accum_steps=2, eval_every_steps=3, save_every_steps=1, keep_checkpoints=3)
    # dropout is on (model and LoRA), so equal losses also need the RNG restored
    full = Trainer(lora_classifier(), cfg(**{**config.__dict__, "out_dir": str(tmp_path / "full")}))
    uninterrupted = full.fit(data, evals)
    assert len(uninterrupted.steps) == 10  # 10 batches / 2 per step * 2 epochs

    out = tmp_path / "killed"
    killed_cfg = cfg(**{**config.__dict__, "out_dir": str(out)})
    with pytest.raises(Killed):
        Trainer(lora_classifier(), killed_cfg).fit(DiesAfter(data, 13), evals)
    # epoch 0 = 10 batches (5 steps); epoch 1: step 6 took batches 0-1, step 7 died fetching batch 3
    assert find_checkpoint(out).name == "checkpoint-0000006"
    state = json.loads((out / "checkpoint-0000006" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (6, 1, 2)

    resumed_model = lora_classifier(lora_seed=99)  # a different start: the checkpoint must overwrite it
    resumed = Trainer(resumed_model, cfg(**{**killed_cfg.__dict__, "resume_from": str(out)})).fit(data, evals)
    assert resumed.losses == pytest.approx(uninterrupted.losses, abs=1e-6)
    assert [s["step"] for s in resumed.steps] == list(range(1, 11))
    assert [e["loss"] for e in resumed.evals] == pytest.approx([e["loss"] for e in uninterrupted.evals], abs=1e-6)
    assert resumed.best["step"] == uninterrupted.best["step"]
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == list(range(1, 11))  # each step once


def test_checkpoint_files_are_safetensors_and_json_and_pruned(tmp_path):
    out = tmp_path / "run"
    batches = fixed_batches("cls", num_labels=2)
    trainer = Trainer(lora_classifier(), cfg(out_dir=str(out), save_every_steps=1, keep_checkpoints=2,
                                              epochs=3))
    history = trainer.fit(batches, batches[:1])
    step_dirs = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert step_dirs == ["checkpoint-0000008", "checkpoint-0000009"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    for folder in [out / d for d in step_dirs] + [out / "best"]:
        assert sorted(p.name for p in folder.iterdir()) == [
            "optimizer.safetensors", "trainable.safetensors", "trainer_state.json"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-0000009" / "trainable.safetensors"))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(weights) == trainable and any(".lora_A" in n for n in trainable) and "score.weight" in trainable
    optimizer = load_file(str(out / "checkpoint-0000009" / "optimizer.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in optimizer if k.startswith("state.")} == {"step", "exp_avg", "exp_avg_sq"}
    best = json.loads((out / "best" / "trainer_state.json").read_text())
    best_eval = min(history.evals, key=lambda e: e["loss"])
    assert best["step"] == best_eval["step"] == history.best["step"]
    assert history.best["value"] == pytest.approx(best_eval["loss"])
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines].count("step") == 9 and lines[-1]["type"] == "summary"
    assert [r for r in lines if r["type"] == "eval"] == [{"type": "eval", **e} for e in history.evals]


def test_resume_refuses_a_different_model_or_run(tmp_path):
    out = tmp_path / "run"
    batches = fixed_batches("cls", num_labels=2)
    Trainer(lora_classifier(), cfg(out_dir=str(out), epochs=1)).fit(batches)
    full_ft = tiny_classifier()
    with pytest.raises(CheckpointError, match="trained other tensors"):
        Trainer(full_ft, cfg(out_dir=str(out), epochs=1, resume_from=str(out))).fit(batches)
    with pytest.raises(ConfigError, match="total_steps"):
        Trainer(lora_classifier(), cfg(epochs=5, resume_from=str(out))).fit(batches)
    with pytest.raises(CheckpointNotFoundError, match="resume_from"):
        Trainer(lora_classifier(), cfg(resume_from=str(tmp_path / "nowhere"))).fit(batches)
    (out / "checkpoint-0000003" / "trainable.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable"):
        Trainer(lora_classifier(), cfg(epochs=1, resume_from=str(out))).fit(batches)


# --- loop behaviour ---

def test_gradient_accumulation_equals_one_big_batch():
    g = torch.Generator().manual_seed(5)
    small = [{"input_ids": torch.randint(1, 512, (2, 6), generator=g), "labels": torch.tensor([0, 1])}
             for _ in range(4)]
    big = [{"input_ids": torch.cat([small[i]["input_ids"], small[i + 1]["input_ids"]]),
            "labels": torch.cat([small[i]["labels"], small[i + 1]["labels"]])} for i in (0, 2)]
    a, b = tiny_classifier(), tiny_classifier()
    # SGD: the update is linear in the gradient, so rounding differences are not amplified as in Adam
    ha = Trainer(a, cfg(grad_accum_steps=2, optimizer="sgd", lr=0.05)).fit(small)
    hb = Trainer(b, cfg(optimizer="sgd", lr=0.05)).fit(big)
    assert len(ha.steps) == len(hb.steps) == 4
    assert ha.losses == pytest.approx(hb.losses, abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)


def test_partial_accumulation_group_at_epoch_end_is_a_step():
    history = Trainer(tiny_classifier(), cfg(grad_accum_steps=2, epochs=1)).fit(fixed_batches("cls")[:3])
    assert len(history.steps) == history.total_steps == 2
    assert history.steps[-1]["epoch"] == 1.0


def test_max_steps_spans_epochs_and_calls_set_epoch():
    class Recording(list):
        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = Recording(fixed_batches("cls"))
    data.epochs = []
    history = Trainer(tiny_classifier(num_labels=3), cfg(max_steps=7, epochs=1)).fit(data)
    assert len(history.steps) == history.total_steps == 7
    assert data.epochs == [0, 1, 2]
    assert history.lrs == pytest.approx([expected_lr(s, 7, 3e-3, 1e-4, 0.2) for s in range(7)])


def test_infinite_gradient_norm_skips_the_update():
    batches = fixed_batches("cls")[:2]
    constant = {"schedule": "constant", "warmup_ratio": 0.0, "epochs": 1}
    skipped_model = tiny_classifier(num_labels=3)
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 2 else grad

    skipped_model.score.weight.register_hook(poison)
    history = Trainer(skipped_model, cfg(**constant)).fit(batches)
    assert [s["skipped"] for s in history.steps] == [False, True]
    assert history.steps[1]["grad_norm"] == math.inf
    one_step = tiny_classifier(num_labels=3)
    Trainer(one_step, cfg(**constant)).fit(batches[:1])
    for a, b in zip(skipped_model.parameters(), one_step.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the skipped step changed nothing


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    model = tiny_classifier(num_labels=3)

    def batches():
        for i, batch in enumerate(fixed_batches("cls")):
            if i == 2:
                with torch.no_grad():
                    model.score.weight.fill_(math.nan)  # the run diverges
            yield batch

    class Diverging:
        def __len__(self):
            return 3

        def __iter__(self):
            return batches()

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 3 .*checkpoint-0000002"):
        Trainer(model, cfg(out_dir=str(out), save_every_steps=1, epochs=1)).fit(Diverging())
    assert find_checkpoint(out).name == "checkpoint-0000002"
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_early_stopping_and_best_checkpoint(tmp_path):
    ids = torch.tensor([[5, 6, 7, 8]] * 4)
    train = [{"input_ids": ids, "labels": torch.zeros(4, dtype=torch.long)}] * 6
    flipped = [{"input_ids": ids, "labels": torch.ones(4, dtype=torch.long)}]  # gets worse as train improves
    out = tmp_path / "run"
    history = Trainer(tiny_classifier(), cfg(epochs=1, eval_every_steps=1, early_stopping_patience=2,
                                             out_dir=str(out))).fit(train, flipped)
    assert history.stopped_early
    assert len(history.steps) == len(history.evals) == 3 < history.total_steps
    assert history.best["step"] == 1
    assert json.loads((out / "best" / "trainer_state.json").read_text())["step"] == 1


def test_evaluate_classification_metrics_match_predictions():
    model = tiny_classifier(num_labels=3).eval()
    batches = fixed_batches("cls")
    metrics = Trainer(model, cfg()).evaluate(batches)
    logits = torch.cat([model(b["input_ids"], b["attention_mask"]) for b in batches]).detach()
    labels = torch.cat([b["labels"] for b in batches])
    from gpt2lora.training.metrics import classification_metrics

    expected = classification_metrics(logits.argmax(-1), labels)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-6)


def test_evaluate_lm_matches_transformers_token_weighted_loss(tiny_checkpoint):
    import transformers

    batches = fixed_batches("lm")
    ours = GPT2.from_pretrained(tiny_checkpoint)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    metrics = Trainer(ours, cfg()).evaluate(batches)
    total = count = 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  labels=b["labels"]).loss) * n
            count += n
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert ours.training  # evaluate restores the mode it found


def test_lm_loss_ignores_masked_targets():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, 3, -100, 5]])
    loss, count = lm_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([3, 5]))
    assert count == 2
    torch.testing.assert_close(loss, expected)


def test_fit_reports_speed_and_memory():
    batches = fixed_batches("cls")
    history = Trainer(tiny_classifier(num_labels=3), cfg()).fit(batches)
    assert isinstance(history, History)
    rows = 2 * sum(b["input_ids"].size(0) for b in batches)
    tokens = 2 * sum(int(b["attention_mask"].sum()) for b in batches)
    assert history.runtime_s > 0
    assert history.samples_per_s * history.runtime_s == pytest.approx(rows)
    assert history.tokens_per_s * history.runtime_s == pytest.approx(tokens)
    assert history.steps_per_s * history.runtime_s == pytest.approx(6)
    assert history.peak_memory_mb > 10
    assert set(history.summary()) >= {"runtime_s", "samples_per_s", "tokens_per_s", "peak_memory_mb", "best"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_tracks_fp32(precision, tmp_path):
    batches = fixed_batches("cls")
    reference = Trainer(tiny_classifier(), cfg(device="cuda", precision="fp32")).fit(batches)
    out = tmp_path / "run"
    half = Trainer(tiny_classifier(), cfg(device="cuda", precision=precision, out_dir=str(out))).fit(batches)
    assert half.losses[0] == pytest.approx(reference.losses[0], abs=5e-2)  # same forward, lower precision
    if not any(s["skipped"] for s in half.steps):  # fp16 may skip early steps while its scale settles
        assert half.losses == pytest.approx(reference.losses, abs=5e-2)
    assert sum(s["skipped"] for s in half.steps) < len(half.steps)
    state = json.loads((find_checkpoint(out) / "trainer_state.json").read_text())
    assert bool(state["scaler"]) == (precision == "fp16")  # the GradScaler state is checkpointed
    assert half.peak_memory_mb > 0


# --- bad input ---

@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", -1e-3), ("warmup_ratio", 1.0), ("warmup_ratio", -0.1), ("min_lr", 1.0),
    ("optimizer", "adam"), ("grad_accum_steps", 0), ("precision", "fp8"),
])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{"lr": 1e-3, field: value})


def test_bad_training_data_is_named():
    model = tiny_classifier(num_labels=2)
    good = fixed_batches("cls")[0]
    with pytest.raises(DataError, match=r"labels contains class id 2, outside \[0, 1\].*num_labels=2"):
        Trainer(model, cfg()).fit([good])  # fixed_batches uses 3 classes
    with pytest.raises(DataError, match="empty"):
        Trainer(model, cfg()).fit([])
    for key in ("input_ids", "labels"):
        broken = {k: v for k, v in good.items() if k != key}
        with pytest.raises(DataError, match=f"batch 0 of epoch 0: missing key '{key}'"):
            Trainer(model, cfg()).fit([broken])
    with pytest.raises(DataError, match="attention_mask has shape"):
        Trainer(model, cfg()).fit([{**good, "attention_mask": good["attention_mask"][:, :2]}])
    with pytest.raises(DataError, match="eval batch 0: missing key 'labels'"):
        Trainer(model, cfg()).evaluate([{"input_ids": good["input_ids"]}])
    lm = GPT2(GPT2Config(**TINY))
    with pytest.raises(DataError, match="labels must have the shape of input_ids"):
        Trainer(lm, cfg()).fit([{"input_ids": good["input_ids"], "labels": torch.tensor([1, 2, 3, 4])}])
    with pytest.raises(DataError, match="no target tokens"):
        Trainer(lm, cfg()).fit([{"input_ids": good["input_ids"], "labels": torch.full_like(good["input_ids"], -100)}])


def test_bad_trainer_setup_is_named():
    model = tiny_classifier()
    with pytest.raises(ConfigError, match="TrainConfig.precision='fp16' needs a CUDA device"):
        Trainer(model, cfg(precision="fp16"))
    with pytest.raises(ConfigError, match="TrainConfig.best_metric='perplexity'"):
        Trainer(model, cfg(best_metric="perplexity")).fit(fixed_batches("cls"))
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        Trainer(model, cfg(early_stopping_patience=1)).fit(fixed_batches("cls"))
    with pytest.raises(ConfigError, match="len"):
        Trainer(model, cfg()).fit(b for b in fixed_batches("cls"))
    frozen = tiny_classifier()
    for p in frozen.parameters():
        p.requires_grad_(False)
    trainer = Trainer(frozen, cfg())
    assert set(trainer.evaluate(fixed_batches("cls"))) >= {"loss", "accuracy"}  # evaluation needs no optimizer
    with pytest.raises(ConfigError, match="no trainable parameters"):
        trainer.fit(fixed_batches("cls"))


# --- real data ---

def test_loss_goes_down_on_sms_spam(gpt2_vocab):
    from gpt2lora import load_tokenizer

    tok = load_tokenizer(gpt2_vocab)
    folder = require_shared(DATA / "sms_spam")

    def examples(split, n):
        return [{"input_ids": tok.encode(r["text"])[:64] or [tok.eot_token], "label": r["label"]}
                for r in read_jsonl(folder / f"{split}.jsonl", limit=n)]

    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, **NO_DROPOUT)
    model = GPT2ForSequenceClassification(config, num_labels=2, seed=0)
    train = BucketedBatches(examples("train", 256), batch_size=16, seed=0)
    val = BucketedBatches(examples("validation", 128), batch_size=32, shuffle=False)
    trainer = Trainer(model, cfg(lr=3e-3, min_lr=3e-4, warmup_ratio=0.1, epochs=3, grad_clip=1.0))
    before = trainer.evaluate(val)
    history = trainer.fit(train, val)
    after = history.evals[-1]
    first_epoch, last_epoch = history.losses[:16], history.losses[-16:]
    assert sum(last_epoch) / 16 < 0.8 * sum(first_epoch) / 16
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9  # above the 0.86 share of "ham" in these validation rows
    assert len(history.evals) == 3 and [e["epoch"] for e in history.evals] == [1.0, 2.0, 3.0]
