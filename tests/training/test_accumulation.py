"""Token-exact steps: accumulation weights every target alike; the Trainer on packed rows; TrainConfig.loss_chunk_size."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import ConfigError, DataError
from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.data.batching import BucketedBatches, collate, collate_packed, example_count, lm_example
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.peft.lora import apply_lora
from gpt2lora.training.trainer import Trainer

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def sgd(**overrides) -> TrainConfig:
    """Plain SGD without clipping, warmup or decay: the update is the gradient times a constant lr."""
    base = {"lr": 0.5, "optimizer": "sgd", "grad_clip": None, "weight_decay": 0.0, "schedule": "constant",
            "warmup_ratio": 0.0, "epochs": 1, "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def lm_model(method: str = "lora") -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**TINY, **NO_DROPOUT))
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    return model


def examples(spec: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """LM examples of (prompt, response) token counts: the response (+ EOS) is what holds targets."""
    g = torch.Generator().manual_seed(seed)
    return [lm_example(torch.randint(1, TINY["vocab_size"], (p,), generator=g).tolist(),
                       torch.randint(1, TINY["vocab_size"], (r,), generator=g).tolist(), eos_token_id=7)
            for p, r in spec]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulating_uneven_lm_batches_equals_one_batch_of_their_rows(method):
    many = examples([(2, 30), (3, 25)], seed=1)  # 57 targets
    few = examples([(20, 1), (25, 0)], seed=2)   # 3 targets: weighted by micro-batch, these would count as much
    micro = [collate(many, PAD), collate(few, PAD)]
    assert [int((b["labels"][:, 1:] != -100).sum()) for b in micro] == [57, 3]
    one = [collate(many + few, PAD)]
    accumulated, single = lm_model(method), lm_model(method)
    ha = Trainer(accumulated, sgd(grad_accum_steps=2, epochs=2)).fit(micro)
    hb = Trainer(single, sgd(epochs=2)).fit(one)
    assert len(ha.steps) == len(hb.steps) == 2
    assert ha.losses == pytest.approx(hb.losses, abs=1e-6)
    assert [s["grad_norm"] for s in ha.steps] == pytest.approx([s["grad_norm"] for s in hb.steps], rel=1e-5)
    assert_same_weights(single, accumulated)


def test_accumulating_uneven_classification_batches_weights_by_rows():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, TINY["vocab_size"], (4, 7), generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    micro = [{"input_ids": ids[:3], "labels": labels[:3]}, {"input_ids": ids[3:], "labels": labels[3:]}]
    config = GPT2Config(**TINY, **NO_DROPOUT)
    a = GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0)
    b = GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0)
    ha = Trainer(a, sgd(grad_accum_steps=2)).fit(micro)
    hb = Trainer(b, sgd()).fit([{"input_ids": ids, "labels": labels}])
    assert ha.losses == pytest.approx(hb.losses, abs=1e-6)
    assert_same_weights(a, b)


def test_a_micro_batch_without_targets_adds_nothing_to_its_step():
    with_targets = collate(examples([(2, 6), (3, 4)], seed=4), PAD)
    prompt_only = collate(examples([(5, 0)], seed=5), PAD)
    prompt_only["labels"][:] = -100  # not even the EOS is a target
    a, b = lm_model(), lm_model()
    ha = Trainer(a, sgd(grad_accum_steps=2)).fit([with_targets, prompt_only])
    hb = Trainer(b, sgd()).fit([with_targets])
    assert ha.losses == pytest.approx(hb.losses, abs=1e-7)
    assert_same_weights(a, b, atol=1e-7)
    with pytest.raises(DataError, match=r"batches 0-1 of epoch 0: no target tokens"):
        Trainer(lm_model(), sgd(grad_accum_steps=2)).fit([prompt_only, prompt_only])


def test_the_trainer_on_packed_rows_equals_the_same_examples_unpacked():
    rows = examples([(3, 5), (2, 9), (4, 2), (1, 7), (6, 3), (2, 2)], seed=6)
    packed = [collate_packed([rows[:2], rows[2:3]], PAD), collate_packed([rows[3:5], rows[5:]], PAD)]
    unpacked = [collate(rows[:3], PAD), collate(rows[3:], PAD)]
    assert example_count(packed[0]) == 3 and example_count(unpacked[0]) == 3
    a, b = lm_model(), lm_model()
    ha = Trainer(a, sgd(epochs=2)).fit(packed, packed)
    hb = Trainer(b, sgd(epochs=2)).fit(unpacked, unpacked)
    assert ha.losses == pytest.approx(hb.losses, abs=1e-6)
    assert ha.evals[-1]["loss"] == pytest.approx(hb.evals[-1]["loss"], abs=1e-6)
    assert ha.evals[-1]["tokens"] == hb.evals[-1]["tokens"]
    assert_same_weights(a, b)
    # throughput counts examples and real tokens, not packed rows
    assert ha.samples_per_s * ha.runtime_s == pytest.approx(2 * 6)
    assert ha.tokens_per_s * ha.runtime_s == pytest.approx(2 * sum(len(r["input_ids"]) for r in rows))


def test_packed_training_resumes_exactly(tmp_path):
    rows = examples([(int(p), int(r)) for p, r in torch.randint(1, 9, (24, 2), generator=torch.Generator()
                                                                .manual_seed(7))], seed=7)
    data = BucketedBatches(rows, batch_size=2, seed=3, mega_batch_factor=2, pad_token_id=PAD, packing=True,
                           max_length=40)
    config = sgd(lr=0.1, epochs=2, save_every_steps=1, out_dir=str(tmp_path / "full"))
    full = Trainer(lm_model(), config).fit(data)
    steps = len(full.steps)
    assert steps == 2 * len(data) >= 4

    class Dies:
        def __init__(self, n: int) -> None:
            self.left = n

        def __len__(self) -> int:
            return len(data)

        def set_epoch(self, epoch: int) -> None:
            data.set_epoch(epoch)

        def iter_from(self, start: int):
            for batch in data.iter_from(start):
                if self.left == 0:
                    raise KeyboardInterrupt
                self.left -= 1
                yield batch

    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        Trainer(lm_model(), sgd(lr=0.1, epochs=2, save_every_steps=1, out_dir=out)).fit(Dies(steps // 2 + 1))
    from gpt2lora.training.checkpoint import find_checkpoint

    assert find_checkpoint(out).name == f"checkpoint-{steps // 2 + 1:07d}"  # died inside the second epoch
    resumed = Trainer(lm_model(), sgd(lr=0.1, epochs=2, save_every_steps=1, out_dir=out, resume_from=out)).fit(data)
    assert [s["step"] for s in resumed.steps] == list(range(1, steps + 1))
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)


def test_loss_chunk_size_is_validated_and_changes_nothing_else():
    with pytest.raises(ConfigError, match=r"TrainConfig\.loss_chunk_size: expected a positive integer, got 0"):
        TrainConfig(loss_chunk_size=0)
    with pytest.raises(ConfigError, match=r"TrainConfig\.loss_chunk_size: expected a positive integer, got -4"):
        TrainConfig(loss_chunk_size=-4)
    batch = [collate(examples([(2, 9), (3, 5)], seed=8), PAD)]
    a, b = lm_model(), lm_model()
    ha = Trainer(a, sgd(loss_chunk_size=1)).fit(batch, batch)
    hb = Trainer(b, sgd(loss_chunk_size=512)).fit(batch, batch)
    assert ha.losses == pytest.approx(hb.losses, abs=1e-6)
    assert ha.evals[-1]["loss"] == pytest.approx(hb.evals[-1]["loss"], abs=1e-6)
    assert_same_weights(a, b)


def test_bad_position_ids_are_named():
    batch = collate_packed([examples([(2, 2), (2, 2)])], PAD)
    trainer = Trainer(lm_model(), sgd())
    with pytest.raises(DataError, match=r"batch 0 of epoch 0: position_ids must be an integer tensor of shape"):
        trainer.fit([{**batch, "position_ids": batch["position_ids"][:, :3]}])
    with pytest.raises(DataError, match=r"position_ids must lie in \[0, 64\)"):
        trainer.fit([{**batch, "position_ids": batch["position_ids"] + 60}])
