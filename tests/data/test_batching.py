"""Prompt masking, dynamic padding and length-bucketed batches."""

from __future__ import annotations

import pytest
import torch
from helpers import DATA, read_jsonl, require_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lora import ConfigError, DataError
from gpt2lora.data.batching import IGNORE_INDEX, BucketedBatches, collate, lm_example

EOS = 50256


def test_lm_example_masks_the_prompt_and_appends_eos():
    ex = lm_example([10, 11, 12], [20, 21], eos_token_id=EOS)
    assert ex["input_ids"] == [10, 11, 12, 20, 21, EOS]
    assert ex["labels"] == [IGNORE_INDEX] * 3 + [20, 21, EOS]


def test_lm_example_labels_match_transformers_loss(tiny_checkpoint):
    """With aligned labels, transformers' shifted loss covers exactly response + EOS."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    ex = lm_example([5, 6, 7, 8], [9, 10, 11], eos_token_id=3)
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=labels).loss
        logits = model(input_ids=ids).logits[0]
    # by hand: positions 3..5 predict tokens 9, 10, 11 and position 6 predicts EOS
    targets = torch.tensor([9, 10, 11, 3])
    by_hand = torch.nn.functional.cross_entropy(logits[3:7], targets)
    torch.testing.assert_close(hf_loss, by_hand, atol=1e-6, rtol=0)


def test_truncation_cuts_the_prompt_start_first():
    ex = lm_example([1, 2, 3, 4, 5], [6, 7], eos_token_id=EOS, max_length=5)
    assert ex["input_ids"] == [4, 5, 6, 7, EOS]
    assert ex["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 6, 7, EOS]


def test_truncation_cuts_the_response_end_and_drops_eos_when_it_must():
    ex = lm_example([1, 2, 3], [6, 7, 8, 9, 10], eos_token_id=EOS, max_length=4)
    assert ex["input_ids"] == [3, 6, 7, 8]  # one prompt token kept, response cut, no EOS
    assert ex["labels"] == [IGNORE_INDEX, 6, 7, 8]
    ex = lm_example([1, 2, 3], [6, 7, 8, 9], eos_token_id=EOS, max_length=5, min_prompt_tokens=2)
    assert ex["input_ids"] == [2, 3, 6, 7, 8]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=30), st.lists(st.integers(0, 1000), max_size=30),
       st.integers(2, 40))
def test_truncation_invariants(prompt, response, max_length):
    if not prompt and not response:
        return
    ex = lm_example(prompt, response, eos_token_id=EOS, max_length=max_length)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) <= max_length
    n_prompt = labels.count(IGNORE_INDEX)
    assert ids[:n_prompt] == prompt[len(prompt) - n_prompt:]  # a suffix of the prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    kept = ids[n_prompt:]
    full = response + [EOS]
    assert kept == full[:len(kept)]  # a prefix of response + EOS
    if len(prompt) + len(full) <= max_length:
        assert ids == prompt + full
    if kept != full:
        assert n_prompt == min(len(prompt), 1)  # the prompt was cut to the minimum first


def test_collate_pads_to_longest_row_on_either_side():
    examples = [lm_example([1], [2, 3]), lm_example([1, 2, 3], [4])]  # lengths 4 and 5
    right = collate(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3, EOS, 0], [1, 2, 3, 4, EOS]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert right["labels"].tolist() == [[-100, 2, 3, EOS, -100], [-100, -100, -100, 4, EOS]]
    left = collate(examples, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].shape == (2, 8)
    assert left["input_ids"][0].tolist() == [0, 0, 0, 0, 1, 2, 3, EOS]
    assert left["attention_mask"].sum(1).tolist() == [4, 5]
    assert left["labels"][1].tolist() == [-100] * 6 + [4, EOS]


def test_collate_classification():
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_token_id=9)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]


@pytest.mark.parametrize("examples, match", [
    ([], "no examples"),
    ([{"label": 1}], "input_ids"),
    ([{"input_ids": [1, 2]}], "'label'"),
    ([{"input_ids": [], "label": 0}], "empty"),
    ([{"input_ids": [1, -2], "label": 0}], "input_ids"),
    ([{"input_ids": [1, 2], "label": -1}], "label"),
    ([{"input_ids": [1, 2], "labels": [1]}], "as long as input_ids"),
    ([{"input_ids": [1], "label": 0}, {"input_ids": [1], "labels": [1]}], "mixes"),
])
def test_collate_bad_examples(examples, match):
    with pytest.raises(DataError, match=match):
        collate(examples)


def test_collate_bad_arguments():
    with pytest.raises(ConfigError, match="padding_side"):
        collate([{"input_ids": [1], "label": 0}], padding_side="middle")
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        collate([{"input_ids": [1], "label": 0}], pad_to_multiple_of=0)
    with pytest.raises(ConfigError, match="max_length"):
        lm_example([1], [2], max_length=1)
    with pytest.raises(DataError, match="prompt_ids"):
        lm_example("abc", [2])


def rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": list(range(1, 2 + int(torch.randint(0, 40, (1,), generator=g)))), "label": i % 2}
            for i in range(n)]


def test_bucketed_batches_cover_every_row_once_and_are_deterministic():
    examples = rows(103)
    data = BucketedBatches(examples, batch_size=8, seed=3, mega_batch_factor=4)
    assert len(data) == 13
    epoch0 = data.batch_indices()
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    assert data.batch_indices() == BucketedBatches(examples, 8, seed=3, mega_batch_factor=4).batch_indices()
    data.set_epoch(1)
    assert data.batch_indices() != epoch0
    data.set_epoch(0)
    assert data.batch_indices() == epoch0
    batches = list(data)
    assert len(batches) == 13
    for rows_, batch in zip(epoch0, batches):
        assert batch["input_ids"].shape[1] == max(len(examples[i]["input_ids"]) for i in rows_)
        assert batch["labels"].tolist() == [examples[i]["label"] for i in rows_]
    assert list(data) and len(list(data)) == 13  # re-iterable
    tail = list(data.iter_from(10))
    assert [b["labels"].tolist() for b in tail] == [b["labels"].tolist() for b in batches[10:]]


def test_bucketing_groups_similar_lengths_within_mega_batches():
    examples = rows(400, seed=1)
    data = BucketedBatches(examples, batch_size=10, mega_batch_factor=40)  # one mega-batch = all rows
    for b in data.batch_indices():
        lengths = [len(examples[i]["input_ids"]) for i in b]
        assert max(lengths) - min(lengths) <= 2
    stats = data.padding_stats(max_length=64)
    random_order = BucketedBatches(examples, batch_size=10, sort_by_length=False).padding_stats(64)
    assert stats.real_tokens == random_order.real_tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.batch_tokens < random_order.batch_tokens < random_order.fixed_tokens
    assert stats.fixed_tokens == 400 * 64
    assert stats.saving == pytest.approx(1 - stats.batch_tokens / (400 * 64))
    assert 0 <= stats.padding_share < 0.1


def test_unshuffled_batches_keep_row_order_without_sorting():
    examples = rows(25)
    data = BucketedBatches(examples, 10, shuffle=False, sort_by_length=False)
    assert data.batch_indices() == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


def test_drop_last_drops_only_the_short_batch():
    data = BucketedBatches(rows(25), 10, drop_last=True, seed=2)
    assert len(data) == 2
    assert all(len(b) == 10 for b in data.batch_indices())
    with pytest.raises(DataError, match="drop_last"):
        BucketedBatches(rows(5), 10, drop_last=True)


def test_bucketed_batches_bad_arguments():
    with pytest.raises(DataError, match="no examples"):
        BucketedBatches([], 4)
    with pytest.raises(ConfigError, match="batch_size"):
        BucketedBatches(rows(4), 0)
    with pytest.raises(ConfigError, match="mega_batch_factor"):
        BucketedBatches(rows(4), 2, mega_batch_factor=-1)
    with pytest.raises(DataError, match="example 1: missing key 'input_ids'"):
        BucketedBatches([{"input_ids": [1], "label": 0}, {"label": 0}], 2)


def test_dynamic_padding_saves_tokens_on_real_data(gpt2_vocab):
    from gpt2lora import load_tokenizer

    tok = load_tokenizer(gpt2_vocab)
    lines = read_jsonl(require_shared(DATA / "sms_spam" / "train.jsonl"), limit=512)
    examples = [{"input_ids": tok.encode(r["text"])[:128], "label": r["label"]} for r in lines]
    stats = BucketedBatches(examples, batch_size=16).padding_stats(max_length=128)
    assert stats.rows == 512
    assert stats.saving > 0.5  # SMS messages are short: most of a 128-token pad is waste
    assert stats.padding_share < 0.1
