"""Answer generation for evaluation: length-sorted left-padded batches, the same texts at any batch size."""

from __future__ import annotations

import pytest
import torch
from helpers import DATA, NO_DROPOUT, read_jsonl, require_shared

from gpt2lora import ConfigError
from gpt2lora.config import GPT2Config
from gpt2lora.data.tasks import qa_prompt_ids
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.training.evaluation import generate_texts, newline_token_ids
from gpt2lora.training.metrics import squad_metrics


@pytest.fixture(scope="module")
def model():
    """The real vocabulary (so EOS pads and decoding works) on a tiny body."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=160, vocab_size=50257, **NO_DROPOUT)
    return GPT2(config).eval()


def squad_rows(n: int) -> list[dict]:
    return read_jsonl(require_shared(DATA / "squad_v1" / "validation.jsonl"), limit=n)


def test_answers_and_squad_scores_do_not_depend_on_the_batch_size(model, tok):
    rows = squad_rows(11)
    prompts = [qa_prompt_ids(tok, r["context"], r["question"], 20 + 11 * i) for i, r in enumerate(rows)]
    assert len({len(p) for p in prompts}) > 5  # lengths differ, so batches hold padding
    by_size = {size: generate_texts(model, tok, prompts, 10, torch.device("cpu"), batch_size=size,
                                    stop_at_newline=True) for size in (1, 4, 16)}
    assert by_size[4] == by_size[1] == by_size[16]
    assert any(by_size[1])  # something was generated
    golds = [r["answers"] for r in rows]
    scores = {size: squad_metrics(texts, golds) for size, texts in by_size.items()}
    assert scores[1] == scores[4] == scores[16]
    # in the prompts' order: each answer is the one its prompt gets alone
    alone = generate_texts(model, tok, [prompts[7]], 10, torch.device("cpu"), stop_at_newline=True)
    assert alone == [by_size[4][7]]


def test_a_stop_token_ends_its_row_early(model, tok):
    from gpt2lora.data.batching import collate

    batch = collate([{"input_ids": tok.encode_ordinary(text), "label": 0}
                     for text in ("The capital of France is", "Numbers: 1 2 3 4")], tok.eot_token, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = model.generate(ids, mask, max_new_tokens=8, eos_token_id=tok.eot_token)
    T = ids.size(1)
    stop = int(plain[0, T])  # row 0's first new token
    assert stop not in plain[1, T:].tolist()
    stopped = model.generate(ids, mask, max_new_tokens=8, eos_token_id=tok.eot_token, stop_token_ids=[stop])
    assert stopped[0, :T + 1].tolist() == plain[0, :T + 1].tolist()  # the stop token itself is kept
    assert set(stopped[0, T + 1:].tolist()) == {tok.eot_token}  # then the row is finished
    assert stopped[1].tolist() == plain[1].tolist()  # the other row goes on as before
    with pytest.raises(ConfigError, match="stop_token_ids: expected a list of non-negative token ids"):
        model.generate(ids, max_new_tokens=2, stop_token_ids=[-1])
    with pytest.raises(ConfigError, match="generate_texts batch_size: expected a positive integer"):
        generate_texts(model, tok, [[1, 2]], 2, torch.device("cpu"), batch_size=0)


def test_newline_tokens_are_exactly_those_holding_a_newline(tok):
    ids = newline_token_ids(tok)
    assert tok.encode_ordinary("\n")[0] in ids and tok.encode_ordinary("\n\n")[0] in ids
    assert all(b"\n" in tok.decode_single_token_bytes(i) for i in ids)
    assert tok.encode_ordinary(" the")[0] not in ids
    assert newline_token_ids(tok, vocab_size=199) == [198]
