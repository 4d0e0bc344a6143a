"""LoRA+ (``TrainConfig.loraplus_lr_ratio``): peft's ``create_loraplus_optimizer`` groups, the ratio at every
step of the schedule, and checkpoints that resume with the same groups."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import TINY, make_hf_checkpoint
from peft.optimizers import create_loraplus_optimizer

from gpt2lora import ConfigError, GPT2ForSequenceClassification, LoRAConfig, TrainConfig, Trainer, apply_lora
from gpt2lora.data.batching import collate
from gpt2lora.training.trainer import lr_at_step

RATIO = 16.0
P = "base_model.model."


@pytest.fixture(scope="module")
def no_dropout_clf_checkpoint(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("clf") / "ckpt", seed=3, cls="GPT2ForSequenceClassification",
                              num_labels=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def lora_model(checkpoint: Path, use_dora: bool = True) -> GPT2ForSequenceClassification:
    model = GPT2ForSequenceClassification.from_pretrained(checkpoint)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, use_dora=use_dora, train_bias="lora_only",
                                        targets=("attn.c_attn", "mlp.c_proj")), seed=0)


def batches(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, TINY["vocab_size"], (int(torch.randint(3, 9, (1,), generator=g)),),
                                        generator=g).tolist(), "label": i % 2} for i in range(4 * n)]
    return [collate(rows[i:i + 4], pad_token_id=0) for i in range(0, len(rows), 4)]


def config(**overrides) -> TrainConfig:
    base = {"lr": 1e-3, "min_lr": 1e-4, "warmup_ratio": 0.25, "epochs": 2, "weight_decay": 0.1,
            "loraplus_lr_ratio": RATIO, "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def peft_name(name: str) -> str:
    """gpt2lora's parameter name -> peft's (on the transformers model)."""
    for suffix in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if name.endswith("." + suffix):
            return f"{P}{name}.default.weight"
    if name == "score.weight":
        return f"{P}score.modules_to_save.default.weight"
    return f"{P}{name.removesuffix('.bias')}.base_layer.bias"


def test_groups_equal_peft_create_loraplus_optimizer(no_dropout_clf_checkpoint) -> None:
    model = lora_model(no_dropout_clf_checkpoint)
    optimizer = Trainer(model, config()).optimizer
    ours = {name: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for name in group["names"]}
    twin = peft.get_peft_model(transformers.GPT2ForSequenceClassification.from_pretrained(no_dropout_clf_checkpoint),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_attn", "mlp.c_proj"],
                                               fan_in_fan_out=True, use_dora=True, bias="lora_only",
                                               task_type="SEQ_CLS"))
    reference = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=RATIO,
                                          loraplus_weight_decay=0.1)
    names = {id(p): n for n, p in twin.named_parameters()}
    theirs = {names[id(p)]: (group["lr"], group["weight_decay"]) for group in reference.param_groups
              for p in group["params"]}
    assert {peft_name(n) for n in ours} == set(theirs)  # the same tensors train
    kinds = set()
    for name, (lr, decay) in ours.items():
        their_lr, their_decay = theirs[peft_name(name)]
        assert lr == pytest.approx(their_lr), name
        kinds.add((name.rsplit(".", 1)[-1], lr))
        # the one difference: peft decays DoRA magnitudes, gpt2lora decays only tensors with >= 2 dims
        assert decay == (0.0 if name.endswith("lora_magnitude_vector") else their_decay), name
    assert kinds == {("lora_A", 1e-3), ("weight", 1e-3), ("lora_B", 1e-3 * RATIO),
                     ("lora_magnitude_vector", 1e-3 * RATIO), ("bias", 1e-3 * RATIO)}


def test_b_group_runs_at_ratio_times_the_schedule_every_step(no_dropout_clf_checkpoint) -> None:
    trainer = Trainer(lora_model(no_dropout_clf_checkpoint, use_dora=False), config())
    seen: list[dict[str, float]] = []
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.append({n: g["lr"] for g in trainer.optimizer.param_groups for n in g["names"]})
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    history = trainer.fit(batches())
    assert len(seen) == history.total_steps == 8
    for s, lrs in enumerate(seen):
        base = lr_at_step(s, 8, trainer.config)
        assert history.steps[s]["lr"] == pytest.approx(base)
        for name, lr in lrs.items():
            expected = base * RATIO if name.endswith(("lora_B", ".bias")) else base
            assert lr == pytest.approx(expected, rel=1e-12), (s, name)
    assert len({lr for lrs in seen for lr in lrs.values()}) > 4  # warmup and cosine really moved it


def test_without_ratio_every_group_follows_the_schedule(no_dropout_clf_checkpoint) -> None:
    optimizer = Trainer(lora_model(no_dropout_clf_checkpoint), config(loraplus_lr_ratio=None)).optimizer
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 1.0]


def test_resume_keeps_the_groups_and_continues_exactly(no_dropout_clf_checkpoint, tmp_path) -> None:
    data = batches()
    out = tmp_path / "run"
    full = Trainer(lora_model(no_dropout_clf_checkpoint), config(out_dir=str(out), save_every_steps=3, keep_checkpoints=9))
    history_full = full.fit(data)
    step3 = str(out / "checkpoint-0000003")
    resumed = Trainer(lora_model(no_dropout_clf_checkpoint), config(resume_from=step3))
    history = resumed.fit(data)
    assert history.losses == pytest.approx(history_full.losses, abs=1e-6)
    assert [g["lr_scale"] for g in resumed.optimizer.param_groups] == [1.0, RATIO, RATIO]
    for (name, p), (_, q) in zip(resumed.model.named_parameters(), full.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio=16\.0 there, 4\.0 here"):
        Trainer(lora_model(no_dropout_clf_checkpoint), config(loraplus_lr_ratio=4.0, resume_from=step3)).fit(data)
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio=16\.0 there, None here"):
        Trainer(lora_model(no_dropout_clf_checkpoint), config(loraplus_lr_ratio=None, resume_from=step3)).fit(data)


@pytest.mark.parametrize("value", [0, -2.0, float("nan"), float("inf"), True, "16"])
def test_bad_ratio_names_the_value(value) -> None:
    with pytest.raises(ConfigError, match=rf"TrainConfig\.loraplus_lr_ratio: expected a finite number > 0 or None, "
                                          rf"got {value!r}"):
        TrainConfig(loraplus_lr_ratio=value)
