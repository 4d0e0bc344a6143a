"""load_tokenizer against the `tokenizers` byte-level BPE built from the same real GPT-2 files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import read_jsonl

from gpt2lora import CheckpointError, CheckpointNotFoundError, load_tokenizer
from gpt2lora.model.tokenizer import byte_decoder

tokenizers = pytest.importorskip("tokenizers")

CRAFTED = [
    "",
    "Hello world",
    " leading space and trailing space ",
    "Crème brûlée, naïve café, Ångström, São Paulo, Zürich, Dvořák, İstanbul",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी, 中文字符, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽🇫🇷 ❤️ 👨‍👩‍👧‍👦 and ZWJ\u200dsequences",
    "whitespace   runs\t\ttabs\n\nnewlines \n \r\n\u00a0nbsp\u3000ideographic   ",
    "    \n    indented code:\n\tif x:\n\t\treturn 1\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-05-01 ٣٤٥ ²³",
    "contractions: I'm you're he's we've they'll I'd don't can't O'Neill 'quoted' ''",
    "UPPER lower MiXeD snake_case camelCase kebab-case",
    "punctuation!!! ??? ... --- ((( ))) [x] {y} <z> @user #tag $5 %20 ^_^ ~ ` | \\ /",
    "control \x00 \x01 \x1f \x7f chars",
    "<|endoftext|> appears as plain text here",
    "\n",
    " ",
    "a" * 300,
]


def dataset_texts(data: Path) -> list[str]:
    texts: list[str] = []
    for name in ("tweet_emoji", "imdb", "sms_spam"):
        texts += [r["text"] for r in read_jsonl(data / name / "train.jsonl", limit=300)]
    texts += [r["context"] for r in read_jsonl(data / "squad_v1" / "train.jsonl", limit=200)]
    for name in ("alpaca_2k", "alpaca_gpt4_demo"):
        for r in read_jsonl(data / name / "train.jsonl", limit=200):
            texts += [r["instruction"], r["input"], r["output"]]
    return texts


def test_crafted_text_matches_reference_and_round_trips(tok, hf_tokenizer):
    for text in CRAFTED:
        ids = tok.encode_ordinary(text)
        assert ids == hf_tokenizer.encode(text).ids, text
        assert tok.decode(ids) == text
        assert hf_tokenizer.decode(ids) == text


def test_real_dataset_text_matches_reference_and_round_trips(tok, hf_tokenizer, shared_data):
    texts = dataset_texts(shared_data)
    assert len(texts) > 1500
    assert any(ord(ch) > 0xFFFF for t in texts for ch in t)  # real emoji outside the BMP are covered
    mismatched = [t for t in texts if tok.encode_ordinary(t) != hf_tokenizer.encode(t).ids]
    assert not mismatched, mismatched[:3]
    assert all(tok.decode(tok.encode_ordinary(t)) == t for t in texts)
    joined = "\n\n".join(texts[:400])  # long documents as well as short rows
    assert tok.encode_ordinary(joined) == hf_tokenizer.encode(joined).ids


def test_end_of_text_token(tok, gpt2_vocab):
    assert tok.eot_token == 50256 == tok.n_vocab - 1
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(ValueError):  # special text is not silently turned into the special id
        tok.encode("<|endoftext|>")
    assert tok.encode_ordinary("<|endoftext|>") != [50256]
    vocab = json.loads((gpt2_vocab / "vocab.json").read_text(encoding="utf-8"))
    assert tok.n_vocab == len(vocab) == 50257


def test_known_ids(tok):
    assert tok.encode_ordinary("Hello world") == [15496, 995]
    assert tok.encode_ordinary(" the") == [262]


def test_byte_alphabet_is_a_bijection():
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["!"] == ord("!") and table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n")


def test_hub_path_fetches_only_vocab_and_merges_at_the_revision(hub, tmp_path, gpt2_vocab):
    files = {"vocab.json": gpt2_vocab / "vocab.json", "merges.txt": gpt2_vocab / "merges.txt",
             "tokenizer.json": "{}", "pytorch_model.bin": b"never fetched"}
    hub.put("openai-community/gpt2", files, branch="r1")
    cache = tmp_path / "cache"

    tok = load_tokenizer("gpt2", revision="r1", cache_dir=cache)

    fetched = sorted(path.rsplit("/", 1)[1] for method, path in hub.requests if method == "GET" and "/resolve/" in path)
    assert fetched == ["merges.txt", "vocab.json"]
    assert ("GET", "/api/models/openai-community/gpt2/revision/r1") in hub.requests
    assert sorted(p.name for p in cache.rglob("*") if p.is_file() and "snapshots" in p.parts) == ["merges.txt",
                                                                                                   "vocab.json"]
    assert tok.encode_ordinary("Hello world") == [15496, 995]


def test_missing_files_are_named(tmp_path, gpt2_vocab):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(gpt2_vocab / "vocab.json", folder / "vocab.json")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(folder / "merges.txt"))):
        load_tokenizer(folder)


def test_vocab_that_is_not_json(tmp_path, gpt2_vocab):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(gpt2_vocab / "merges.txt", folder / "merges.txt")
    (folder / "vocab.json").write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "vocab.json")) + ".*not valid JSON"):
        load_tokenizer(folder)
    (folder / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(CheckpointError, match=r"vocab\.json.*<\|endoftext\|>"):
        load_tokenizer(folder)


def test_merges_out_of_order_are_refused(tmp_path, gpt2_vocab):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(gpt2_vocab / "vocab.json", folder / "vocab.json")
    lines = (gpt2_vocab / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # line 1 is the "#version" header
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"merges\.txt line 2: merge .* does not produce token id 256"):
        load_tokenizer(folder)


def test_token_outside_byte_alphabet_is_refused(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({"a": 0, " b": 1, "<|endoftext|>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match=r"vocab\.json: token ' b' has a character outside"):
        load_tokenizer(folder)


def test_edited_files_are_read_again(tmp_path, gpt2_vocab):
    folder = tmp_path / "tok"
    shutil.copytree(gpt2_vocab, folder)
    assert load_tokenizer(folder).encode_ordinary("Hello") == [15496]
    (folder / "vocab.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"vocab\.json: expected a JSON object"):
        load_tokenizer(folder)
