"""TrainConfig.batch_size: the Trainer batches a list of examples itself; ready-made batches pass as they are."""

from __future__ import annotations

import math

import pytest
import torch

import gpt2lora as gl
from gpt2lora.data.batching import is_example_list
from gpt2lora.errors import DataError

CONFIG = gl.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=64, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0)


def classifier() -> gl.GPT2ForSequenceClassification:
    torch.manual_seed(0)
    model = gl.GPT2ForSequenceClassification(CONFIG, num_labels=3, pad_token_id=63)
    return gl.apply_lora(model, gl.LoRAConfig(rank=2, dropout=0.0), seed=0)


def examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 63, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist(),
             "label": i % 3} for i in range(n)]


def settings(**overrides) -> gl.TrainConfig:
    return gl.TrainConfig(**{"lr": 1e-3, "epochs": 2, "progress": False, "seed": 3, **overrides})


def test_a_list_of_examples_is_batched_at_batch_size():
    rows, held_out = examples(10), examples(7, seed=1)
    history = gl.Trainer(classifier(), settings(batch_size=4)).fit(rows, held_out)
    assert len(history.steps) == 2 * math.ceil(10 / 4)
    # the same as giving the Trainer the bucketed batches it says it builds
    by_hand = gl.Trainer(classifier(), settings(batch_size=4)).fit(
        gl.BucketedBatches(rows, 4, shuffle=True, seed=3, pad_token_id=63),
        gl.BucketedBatches(held_out, 4, shuffle=False, pad_token_id=63))
    assert [s["loss"] for s in history.steps] == [s["loss"] for s in by_hand.steps]
    assert history.evals[-1]["loss"] == by_hand.evals[-1]["loss"]
    trainer = gl.Trainer(classifier(), settings(batch_size=16))
    assert len(trainer.fit(rows).steps) == 2  # one batch of all 10 rows per epoch


def test_evaluate_takes_examples_and_the_pad_id_is_in_the_vocabulary():
    model = gl.GPT2ForSequenceClassification(CONFIG, num_labels=3)  # pad_token_id=50256, outside vocab 64
    rows = examples(9)
    metrics = gl.Trainer(model, settings(batch_size=2)).evaluate(rows)
    reference = gl.evaluate(model, gl.BucketedBatches(rows, 2, shuffle=False, pad_token_id=0))
    assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-6)
    assert metrics["accuracy"] == reference["accuracy"]


def test_ready_made_batches_are_used_as_they_come():
    batches = gl.BucketedBatches(examples(12), 6, shuffle=True, seed=0, pad_token_id=63)
    history = gl.Trainer(classifier(), settings(batch_size=2, epochs=1)).fit(batches)
    assert len(history.steps) == len(batches) == 2


def test_which_data_counts_as_examples():
    assert is_example_list(examples(2))
    assert is_example_list([{"input_ids": torch.tensor([1, 2]), "label": 0}])
    assert not is_example_list([gl.collate(examples(2))])
    assert not is_example_list(gl.BucketedBatches(examples(2), 2))
    assert not is_example_list([])


def test_bad_examples_name_the_row():
    rows = examples(3) + [{"input_ids": [1, 2], "labels": [1, 2]}]
    with pytest.raises(DataError, match="mix 'label' \\(classification\\) and 'labels' \\(LM\\)"):
        gl.Trainer(classifier(), settings()).fit(rows)
    with pytest.raises(DataError, match="example 1: missing key 'input_ids'"):
        gl.Trainer(classifier(), settings()).fit([{"input_ids": [1], "label": 0}, {"label": 1}])
