"""Packing LM examples into rows: best-fit rows, restarting positions, block-diagonal attention, same losses."""

from __future__ import annotations

import pytest
import torch
from helpers import DATA, TINY, read_jsonl, require_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lora import ConfigError, DataError
from gpt2lora.config import GPT2Config
from gpt2lora.data.batching import (
    IGNORE_INDEX,
    BucketedBatches,
    collate,
    collate_packed,
    lm_example,
    pack_rows,
)
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2, packed_segments


def lm_rows(lengths: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """LM examples of (prompt, response) token counts; ids avoid 0 (the tiny checkpoints' padding id)."""
    g = torch.Generator().manual_seed(seed)
    return [lm_example(torch.randint(1, TINY["vocab_size"], (p,), generator=g).tolist(),
                       torch.randint(1, TINY["vocab_size"], (r,), generator=g).tolist(), eos_token_id=7)
            for p, r in lengths]


@pytest.fixture(scope="module")
def models(no_dropout_checkpoint):
    import transformers

    return (GPT2.from_pretrained(no_dropout_checkpoint).eval(),
            transformers.GPT2LMHeadModel.from_pretrained(no_dropout_checkpoint).eval())


# --- rows ---

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(40, 90))
def test_pack_rows_places_every_example_once_within_max_length(lengths, max_length):
    rows = pack_rows(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    assert pack_rows(lengths, max_length) == rows  # deterministic
    # best fit: no two rows could be merged, so at most one row is half empty or less
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > max_length


def test_collate_packed_restarts_positions_and_masks_boundaries():
    a, b, c = lm_rows([(2, 2), (1, 3), (3, 1)])  # 5, 5 and 5 tokens with their EOS
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [a["input_ids"] + b["input_ids"], c["input_ids"] + [0] * 5]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 5 + [0] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    # the first token of every example is never a target: the previous example's last token would predict it
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + a["labels"][1:] + [IGNORE_INDEX] + b["labels"][1:]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] + c["labels"][1:] + [IGNORE_INDEX] * 5
    assert packed_segments(batch["position_ids"]).tolist() == [[0] * 5 + [1] * 5] * 2
    assert collate_packed([[a]], pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


# --- the model on packed rows ---

def test_packed_logits_equal_each_example_alone_and_transformers(models):
    ours, theirs = models
    examples = lm_rows([(3, 4), (2, 7), (4, 1), (3, 9)], seed=1)
    batch = collate_packed([examples[:3], examples[3:]], pad_token_id=0)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        packed = ours(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        # transformers reads packed rows from position_ids given without a mask (and without a cache)
        reference = theirs(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.testing.assert_close(packed[real], reference[real], atol=1e-4, rtol=0)
        at = 0
        for example in examples[:3]:
            n = len(example["input_ids"])
            alone = ours(torch.tensor([example["input_ids"]]))[0]
            torch.testing.assert_close(packed[0, at:at + n], alone, atol=1e-5, rtol=0)
            at += n


def test_no_attention_crosses_a_boundary(models):
    ours, _ = models
    examples = lm_rows([(3, 3), (2, 5), (4, 2)], seed=2)
    batch = collate_packed([examples], pad_token_id=0)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    start, stop = len(examples[0]["input_ids"]), len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])
    changed["input_ids"][0, start:stop] = torch.randint(1, TINY["vocab_size"], (stop - start,))
    with torch.no_grad():
        before = ours(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        after = ours(changed["input_ids"], changed["attention_mask"], changed["position_ids"])
    torch.testing.assert_close(after[0, :start], before[0, :start], atol=0, rtol=0)
    torch.testing.assert_close(after[0, stop:], before[0, stop:], atol=0, rtol=0)
    assert not torch.allclose(after[0, start:stop], before[0, start:stop])


def test_packed_example_losses_equal_unpacked_ones(models):
    ours, theirs = models
    examples = lm_rows([(3, 4), (2, 7), (4, 1), (1, 9), (5, 5)], seed=3)
    packed = collate_packed([examples[:2], examples[2:]], pad_token_id=0)
    unpacked = collate(examples, pad_token_id=0)
    with torch.no_grad():
        per_example = [float(ours(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])))
                       for e in examples]
        packed_sum = float(ours(packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                                labels=packed["labels"]))
        unpacked_sum = float(ours(unpacked["input_ids"], unpacked["attention_mask"], labels=unpacked["labels"]))
        reference = theirs(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                           labels=packed["labels"], use_cache=False).loss
    count = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert count == int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert packed_sum == pytest.approx(sum(per_example), abs=1e-4)
    assert packed_sum == pytest.approx(unpacked_sum, abs=1e-4)
    assert packed_sum / count == pytest.approx(float(reference), abs=1e-5)


def test_packed_rows_are_refused_where_they_cannot_work():
    config = GPT2Config(**TINY)
    batch = collate_packed([lm_rows([(2, 2), (2, 2)])], pad_token_id=0)
    classifier = GPT2ForSequenceClassification(config, num_labels=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="position_ids restart inside a row .*classifier"):
        classifier(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    from gpt2lora.peft.prompt import PromptConfig, apply_prompt

    lm = apply_prompt(GPT2(config), PromptConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="position_ids restart inside a row .*soft prompt"):
        lm(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


# --- BucketedBatches(packing=True) ---

def test_packed_buckets_cover_every_example_once_per_epoch_and_resume():
    examples = lm_rows([(int(p), int(r)) for p, r in torch.randint(1, 12, (60, 2), generator=torch.Generator()
                                                                   .manual_seed(4))], seed=4)
    data = BucketedBatches(examples, batch_size=3, seed=5, mega_batch_factor=2, pad_token_id=0, packing=True,
                           max_length=32)
    assert data.packed_rows is not None and len(data) == -(-len(data.packed_rows) // 3)
    epochs = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        batches = list(data)
        assert len(batches) == len(data)  # the packing is fixed, so len() holds in every epoch
        seen = sorted(i for rows in data.batch_indices() for r in rows for i in data.packed_rows[r])
        assert seen == list(range(60))
        for batch in batches:
            assert batch["input_ids"].size(1) <= 32 and set(batch) == {"input_ids", "attention_mask", "labels",
                                                                        "position_ids"}
        tail = list(data.iter_from(2))
        assert [b["input_ids"].tolist() for b in tail] == [b["input_ids"].tolist() for b in batches[2:]]
        epochs.append(data.batch_indices())
    assert epochs[0] != epochs[1]
    stats = data.padding_stats()
    assert stats.real_tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.rows == len(data.packed_rows) and stats.fixed_tokens == 60 * 32
    unpacked = BucketedBatches(examples, batch_size=3, seed=5, pad_token_id=0).padding_stats(32)
    assert stats.batch_tokens < unpacked.fixed_tokens and stats.padding_share < 0.2


def test_packing_leaves_little_padding_on_alpaca(gpt2_vocab):
    from gpt2lora import load_tokenizer
    from gpt2lora.data.tasks import alpaca_prompt

    tok = load_tokenizer(gpt2_vocab)
    records = read_jsonl(require_shared(DATA / "alpaca_2k" / "train.jsonl"), limit=300)
    examples = [lm_example(tok.encode_ordinary(alpaca_prompt(r["instruction"], r["input"])),
                           tok.encode_ordinary(r["output"]), tok.eot_token, max_length=256) for r in records]
    packed = BucketedBatches(examples, 8, seed=0, packing=True, max_length=256).padding_stats()
    bucketed = BucketedBatches(examples, 8, seed=0).padding_stats(256)
    assert packed.real_tokens == bucketed.real_tokens
    assert packed.padding_share < min(0.02, bucketed.padding_share)  # only the last rows of a batch are short
    assert packed.rows < len(examples) / 2  # several examples share a row


def test_packing_bad_input_names_the_setting():
    classification = [{"input_ids": [1, 2], "label": 0}, {"input_ids": [3], "label": 1}]
    with pytest.raises(ConfigError, match=r"BucketedBatches packing=True: packing is for language-model examples"):
        BucketedBatches(classification, 2, packing=True, max_length=8)
    lm = lm_rows([(2, 3), (10, 10)])
    with pytest.raises(DataError, match=r"example 1 has 21 tokens, more than max_length=16"):
        BucketedBatches(lm, 2, packing=True, max_length=16)
    with pytest.raises(ConfigError, match="packing=True needs max_length"):
        BucketedBatches(lm, 2, packing=True)
    with pytest.raises(ConfigError, match="BucketedBatches max_length: expected a positive integer"):
        BucketedBatches(lm, 2, packing=True, max_length=0)
    with pytest.raises(ConfigError, match="BucketedBatches packing: expected True or False"):
        BucketedBatches(lm, 2, packing="yes", max_length=32)
    with pytest.raises(ConfigError, match="padding_side='left' with packing=True"):
        BucketedBatches(lm, 2, packing=True, max_length=32, padding_side="left")
    with pytest.raises(ConfigError, match="pack_rows max_length"):
        pack_rows([1, 2], 0)
    with pytest.raises(ConfigError, match="collate_packed: row 0 example 0 is a classification example"):
        collate_packed([classification])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on CUDA only")
def test_packed_rows_on_cuda_match_the_cpu(models):
    ours, _ = models
    examples = lm_rows([(3, 4), (2, 7), (4, 1), (3, 9)], seed=5)
    batch = collate_packed([examples[:3], examples[3:]], pad_token_id=0)
    with torch.no_grad():
        cpu = ours(batch["input_ids"], batch["attention_mask"], batch["position_ids"], labels=batch["labels"])
        gpu = ours.cuda()(*(batch[k].cuda() for k in ("input_ids", "attention_mask", "position_ids")),
                          labels=batch["labels"].cuda())
    ours.cpu()
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-5)
