"""GPT2ForSequenceClassification against transformers: pooling at the last real token, loading, export."""

from __future__ import annotations

import pytest
import torch
from helpers import CLF_LABELS, TINY

from gpt2lora import ConfigError
from gpt2lora.model.classifier import GPT2ForSequenceClassification, last_token_index

NUM_LABELS = CLF_LABELS  # the shared clf_checkpoint's
PAD = 0  # make_hf_checkpoint sets pad_token_id=0; transformers pools on the last token != pad id


def hf_classifier(folder):
    import transformers

    return transformers.GPT2ForSequenceClassification.from_pretrained(folder).eval()


def padded_batch(lengths: list[int], side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows of real tokens (never the pad id) padded with PAD on ``side``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def test_last_token_index_reads_the_mask_on_either_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right, 3, 5, torch.device("cpu")).tolist() == [2, 4, 0]
    assert last_token_index(left, 3, 5, torch.device("cpu")).tolist() == [4, 4, 4]
    assert last_token_index(None, 2, 5, torch.device("cpu")).tolist() == [4, 4]


def test_right_padded_logits_match_transformers(clf_checkpoint):
    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval()
    assert ours.num_labels == NUM_LABELS  # read from the checkpoint's id2label
    ids, mask = padded_batch([7, 3, 12, 1], "right")
    with torch.no_grad():
        expected = hf_classifier(clf_checkpoint)(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert got.shape == (4, NUM_LABELS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_left_padded_logits_match_transformers(clf_checkpoint):
    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval()
    ids, mask = padded_batch([7, 3, 12, 1], "left", seed=1)
    # transformers counts positions from the first column; give it positions over real tokens.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_classifier(clf_checkpoint)(input_ids=ids, attention_mask=mask,
                                                  position_ids=position_ids).logits
        got = ours(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_right_and_left_padding_give_the_same_logits(clf_checkpoint):
    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval()
    lengths = [5, 11, 2, 8]
    right_ids, right_mask = padded_batch(lengths, "right", seed=2)
    left_ids, left_mask = padded_batch(lengths, "left", seed=2)
    singles = []
    with torch.no_grad():
        right, left = ours(right_ids, right_mask), ours(left_ids, left_mask)
        for row, n in enumerate(lengths):
            singles.append(ours(right_ids[row:row + 1, :n])[0])
    torch.testing.assert_close(right, left, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, torch.stack(singles), atol=1e-5, rtol=0)


def test_pooling_ignores_the_padding_tokens(clf_checkpoint):
    """Changing what sits in padded positions must not change a row's logits."""
    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval()
    ids, mask = padded_batch([4, 9], "right", seed=4)
    other = ids.clone()
    other[mask == 0] = 17
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), ours(other, mask), atol=1e-6, rtol=0)
        # without the mask the last position is pooled, which is padding for row 0: logits change
        assert not torch.allclose(ours(ids)[0], ours(ids, mask)[0], atol=1e-4)


def test_plain_lm_checkpoint_gets_a_new_seeded_head(tiny_checkpoint):
    a = GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=4, seed=5)
    b = GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=4, seed=5)
    c = GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=4, seed=6)
    assert a.score.weight.shape == (4, TINY["n_embd"])
    assert a.score.weight.device.type == "cpu"
    torch.testing.assert_close(a.score.weight, b.score.weight, atol=0, rtol=0)
    assert not torch.equal(a.score.weight, c.score.weight)
    assert 0.01 < float(a.score.weight.detach().std()) < 0.03  # N(0, 0.02)
    # the body is the checkpoint's: the same hidden states as transformers' GPT2Model
    import transformers

    body = transformers.GPT2Model.from_pretrained(tiny_checkpoint).eval()
    ids, mask = padded_batch([6, 3], "right", seed=5)
    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = a.eval()(ids, mask)
    pooled = hidden[torch.arange(2), torch.tensor([5, 2])]
    torch.testing.assert_close(ours, pooled @ a.score.weight.t(), atol=1e-4, rtol=0)


def test_classification_checkpoint_head_is_loaded_exactly(clf_checkpoint):
    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint)
    theirs = hf_classifier(clf_checkpoint)
    torch.testing.assert_close(ours.score.weight, theirs.score.weight, atol=0, rtol=0)


def test_saved_classifier_loads_in_transformers(clf_checkpoint, tmp_path):
    from gpt2lora import save_pretrained

    ours = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint, pad_token_id=PAD).eval()
    save_pretrained(ours, tmp_path / "out")
    theirs = hf_classifier(tmp_path / "out")
    assert theirs.config.num_labels == NUM_LABELS and theirs.config.pad_token_id == PAD
    ids, mask = padded_batch([5, 2, 9], "right", seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_labels_is_refused(bad, tiny_checkpoint):
    with pytest.raises(ConfigError, match="num_labels"):
        GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=bad)
