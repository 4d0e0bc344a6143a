"""Property tests (hypothesis): data readers, tokenizer round trip on arbitrary Unicode, dynamic-padding collate."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gpt2lora import DataError, GPT2LoRAError
from gpt2lora.data.batching import IGNORE_INDEX, BucketedBatches, collate, lm_example
from gpt2lora.data.tasks import load_split, read_rows

tokenizers = pytest.importorskip("tokenizers")

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any Unicode text except lone surrogates (which no UTF-8 file or str.encode can hold).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
LABELED = st.lists(st.tuples(TEXT, st.integers(0, 4)), min_size=1, max_size=8)


def scratch(suffix: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / f"rows{suffix}"
    path.write_bytes(data)
    return path


# --- data readers ---------------------------------------------------------------------------------------

# Pinned regressions: str.splitlines() once split rows inside values at U+2028 / U+0085 / form feed.
SPLITLINES_TRAP = [("a\u2028b", 0), ("c\x85d\x0ce\u2029f", 2), ("g\x1ch\x1di\x1ej", 4)]


@FUZZ
@given(LABELED)
@example(SPLITLINES_TRAP)
def test_jsonl_rows_read_back_exactly(rows):
    text = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=bool(y % 2)) + "\n" for t, y in rows)
    dataset = load_split(scratch(".jsonl", text.encode("utf-8")))
    assert [(r["text"], r["label"]) for r in dataset.records] == rows
    assert dataset.kind == "classification" and dataset.num_labels == max(y for _, y in rows) + 1


@FUZZ
@given(LABELED, st.sampled_from([",", "\t"]))
@example(SPLITLINES_TRAP, ",")
@example(SPLITLINES_TRAP, "\t")
def test_csv_and_tsv_rows_read_back_exactly(rows, delimiter):
    # csv can store any text except NUL, and a lone "\r" is turned into a line break by universal newlines
    assume(all("\x00" not in t and "\r" not in t for t, _ in rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    suffix = ".csv" if delimiter == "," else ".tsv"
    dataset = load_split(scratch(suffix, buffer.getvalue().encode("utf-8")))
    assert [(r["text"], r["label"]) for r in dataset.records] == rows


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".csv", ".tsv"]))
@example(b"\xc2\x80\r\x00", ".csv")  # once a raw _csv.Error ("new-line character seen in unquoted field")
def test_arbitrary_bytes_either_read_or_raise_a_data_error(data, suffix):
    """Whatever the bytes, the reader returns dict rows or raises a DataError naming the file."""
    path = scratch(suffix, data)
    try:
        rows = list(read_rows(path))
    except DataError as err:
        assert str(path) in str(err)
        return
    assert all(isinstance(row, dict) and where.startswith("line ") for where, row in rows)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["text", "label", "sentence", "premise"]),
                                st.one_of(TEXT, st.integers(-3, 5), st.none(), st.floats(allow_nan=True),
                                          st.lists(st.integers(), max_size=2)), max_size=3),
                min_size=1, max_size=5))
def test_arbitrary_json_rows_load_or_fail_with_the_line(rows):
    path = scratch(".jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        dataset = load_split(path, kind="classification")
    except GPT2LoRAError as err:
        assert str(path) in str(err) and ("line " in str(err) or "no usable rows" in str(err))
        return
    for record, row in zip(dataset.records, rows):  # accepted rows are kept as they were
        assert record["text"] == row["text"] and isinstance(record["label"], int) and record["label"] >= 0


# --- tokenizer ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_tokenizer_round_trips_arbitrary_unicode_and_matches_byte_level_bpe(tok, hf_tokenizer, text):
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert ids == hf_tokenizer.encode(text).ids


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TEXT, min_size=2, max_size=4))
def test_decoding_concatenated_ids_is_the_concatenated_text(tok, texts):
    ids = [i for t in texts for i in tok.encode_ordinary(t)]
    assert tok.decode(ids) == "".join(texts)


# --- collate --------------------------------------------------------------------------------------------

IDS = st.lists(st.integers(1, 1000), min_size=1, max_size=12)
PAD = 0


@FUZZ
@given(st.lists(st.tuples(IDS, st.integers(0, 3)), min_size=1, max_size=6), st.sampled_from(["right", "left"]),
       st.one_of(st.none(), st.integers(1, 8)))
def test_collate_classification_shapes_masks_and_labels(rows, side, multiple):
    batch = collate([{"input_ids": ids, "label": y} for ids, y in rows], pad_token_id=PAD, padding_side=side,
                    pad_to_multiple_of=multiple)
    longest = max(len(ids) for ids, _ in rows)
    width = longest if multiple is None else -(-longest // multiple) * multiple
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(rows), width)
    assert batch["labels"].tolist() == [y for _, y in rows]
    for row, (ids, _) in enumerate(rows):
        mask = batch["attention_mask"][row]
        assert int(mask.sum()) == len(ids)
        assert batch["input_ids"][row][mask.bool()].tolist() == ids  # real tokens, in order, unchanged
        assert (batch["input_ids"][row][~mask.bool()] == PAD).all()
        real = mask.nonzero().flatten()
        assert real.tolist() == list(range(real[0], real[0] + len(ids)))  # contiguous
        assert (real[0] == 0) if side == "right" else (real[-1] == width - 1)


@FUZZ
@given(st.lists(st.tuples(st.lists(st.integers(1, 1000), max_size=8), IDS), min_size=1, max_size=5),
       st.sampled_from(["right", "left"]), st.integers(4, 24))
def test_collate_lm_labels_stay_aligned_with_their_tokens(pairs, side, max_length):
    examples = [lm_example(p, r, eos_token_id=7, max_length=max_length) for p, r in pairs]
    batch = collate(examples, pad_token_id=PAD, padding_side=side)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    assert (labels[mask == 0] == IGNORE_INDEX).all()  # padding never has a target
    for row, ex in enumerate(examples):
        real = mask[row].bool()
        assert ids[row][real].tolist() == ex["input_ids"]
        assert labels[row][real].tolist() == ex["labels"]
        targets = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][targets], ids[row][targets])  # a target is the token at its position


@FUZZ
@given(st.lists(IDS, min_size=1, max_size=30), st.integers(1, 7), st.integers(0, 3), st.booleans())
def test_bucketed_batches_cover_every_row_once_with_its_own_label(rows, batch_size, epoch, shuffle):
    examples = [{"input_ids": ids, "label": i} for i, ids in enumerate(rows)]
    batches = BucketedBatches(examples, batch_size=batch_size, shuffle=shuffle, seed=epoch, pad_token_id=PAD)
    batches.set_epoch(epoch)
    seen = []
    for batch in batches:
        assert batch["input_ids"].size(0) <= batch_size
        for row, label in enumerate(batch["labels"].tolist()):
            real = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][real].tolist() == rows[label]  # label i travels with row i
            seen.append(label)
    assert sorted(seen) == list(range(len(rows)))
