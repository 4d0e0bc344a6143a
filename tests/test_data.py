"""Data layer: readers, presets (local and a fake hub), validation errors, formatting and tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_jsonl

from gpt2lora import data
from gpt2lora.data import (
    TASKS,
    DataError,
    alpaca_prompt,
    encode,
    load_split,
    nli_ids,
    read_records,
    read_rows,
)
from gpt2lora.errors import ConfigError


@pytest.fixture(scope="module")
def tok(gpt2_vocab):
    from gpt2lora import load_tokenizer

    return load_tokenizer(gpt2_vocab)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- readers

def test_local_presets_read_the_shared_rows_exactly(shared_data):
    for name, folder in [("sst2", "sst2"), ("sms_spam", "sms_spam"), ("snli", "snli"),
                         ("tweet_emoji", "tweet_emoji"), ("alpaca_2k", "alpaca_2k"), ("squad", "squad_v1"),
                         ("rotten_tomatoes", "rt_polarity")]:
        ds = load_split(name, "validation", root=shared_data, limit=50)
        expected = read_jsonl(shared_data / folder / "validation.jsonl", limit=50)
        assert ds.kind == TASKS[name].kind
        for got, row in zip(ds.records, expected):
            assert got == {**row, **({"input": row["input"]} if "input" in row else {})}
        assert len(ds) == 50
    emoji = load_split("tweet_emoji", "train", root=shared_data, limit=5)
    assert emoji.num_labels == 20 and emoji.label_names[2] == "😂"


def test_local_path_infers_kind_and_label_names(shared_data):
    ds = load_split(shared_data / "snli", "test", limit=10)
    assert ds.kind == "nli" and ds.label_names == ("entailment", "neutral", "contradiction")
    assert ds.num_labels == 3
    qa = load_split(shared_data / "squad_v1" / "train.jsonl", limit=3)
    assert qa.kind == "qa" and isinstance(qa.records[0]["answers"], list)


def test_csv_and_tsv_with_column_mapping_and_string_labels(tmp_path):
    csv_path = write(tmp_path / "d" / "train.csv", 'sentence,y\n"good, fine film",positive\nbad film,0\n')
    ds = load_split("sst2", "train", path=csv_path, columns={"text": "sentence", "label": "y"})
    assert ds.records == [{"text": "good, fine film", "label": 1}, {"text": "bad film", "label": 0}]
    tsv_path = write(tmp_path / "t" / "validation.tsv", "text\tlabel\nham msg\tham\nwin now\tspam\n")
    ds = load_split("sms_spam", "validation", path=tsv_path.parent)
    assert [r["label"] for r in ds.records] == [0, 1]


def test_alpaca_row_without_input_gets_empty_input(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    kind, records = read_records(path)
    assert kind == "instruction" and records == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content, expected", [
    (b"", r"empty"),
    (b'{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', r"line 2: invalid JSON"),
    (b'{"text": "a", "label": 0}\n[1, 2]\n', r"line 2: expected a JSON object"),
    (b'{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n', (r"line 2: field 'label'.*7, outside the label "
                                                                r"set 0\.\.1")),
    (b'{"text": "a", "label": 0}\n{"label": 1}\n', r"line 2: field 'text' is missing"),
    (b'{"text": "a", "label": 0}\n{"text": 5, "label": 1}\n', r"line 2: field 'text'.*must be a string"),
    (b'{"text": "a", "label": 0}\n{"text": "caf\xe9", "label": 1}\n', r"line 2: not valid UTF-8 \(byte 0xe9"),
    (b'{"text": "a", "label": "maybe"}\n', r"line 1: field 'label'.*negative, positive.*'maybe'"),
])
def test_bad_rows_raise_data_error_naming_file_line_and_field(tmp_path, content, expected):
    path = write(tmp_path / "bad" / "train.jsonl", content)
    with pytest.raises(DataError, match=expected) as err:
        load_split("sst2", "train", path=path)
    assert str(path) in str(err.value)


def test_unknown_column_in_mapping_and_unknown_task(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"line 1: field 'text' \(column 'sentence'\) is missing.*text, label"):
        load_split("sst2", "train", path=path, columns={"text": "sentence"})
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_split("nope")
    unknown = write(tmp_path / "odd.jsonl", '{"foo": "a"}\n')
    with pytest.raises(DataError, match=r"odd.jsonl line 1: cannot tell the task from the columns foo"):
        load_split(unknown)


def test_missing_split_folder_and_bad_csv(tmp_path):
    folder = tmp_path / "f"
    write(folder / "train.jsonl", '{"text": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"has no test split.*found: train.jsonl"):
        load_split(folder, "test")
    bad = write(tmp_path / "c" / "train.csv", "text,label\na,0,extra\n")
    with pytest.raises(DataError, match=r"train.csv line 2: more values than the 2 header columns"):
        load_split(bad)
    with pytest.raises(DataError, match=r"unknown file type '.txt'"):
        list(read_rows(write(tmp_path / "x.txt", "hi")))


def test_local_source_without_root_is_explained(monkeypatch):
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match="local folder 'sms_spam' not found.*GPT2LORA_DATA"):
        load_split("sms_spam", source="local")
    with pytest.raises(DataError, match="task 'sick' has no hub source"):
        load_split("sick", source="hub")


# ---------------------------------------------------------------------------------------------- fake hub

@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Serve dataset files from a temp folder through a monkeypatched ``hf_hub_download``."""
    import huggingface_hub

    store = tmp_path / "hub"
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None, cache_dir=None, **kwargs):
        calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type, "revision": revision})
        path = store / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    return store, calls


def test_hub_jsonl_preset_downloads_the_named_file(fake_hub):
    store, calls = fake_hub
    rows = [{"message_id": 1, "text": "cheap meds", "label": 1, "label_text": "spam"},
            {"message_id": 2, "text": "meeting at 3", "label": 0, "label_text": "ham"}]
    write(store / "SetFit/enron_spam/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ds = load_split("enron_spam", "train")
    assert calls == [{"repo_id": "SetFit/enron_spam", "filename": "train.jsonl", "repo_type": "dataset",
                          "revision": "main"}]
    assert ds.records == [{"text": "cheap meds", "label": 1}, {"text": "meeting at 3", "label": 0}]
    with pytest.raises(DataError, match=r"enron_spam.*no 'validation' split \(it has train, test\)"):
        load_split("enron_spam", "validation")
    with pytest.raises(DataError, match=r"could not download test.jsonl from the dataset SetFit/enron_spam"):
        load_split("enron_spam", "test", revision="v1")
    assert calls[-1]["revision"] == "v1"


def test_hub_parquet_presets_map_columns_and_drop_unlabelled_rows(fake_hub):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    store, calls = fake_hub
    sst2 = store / "stanfordnlp/sst2/data/test-00000-of-00001.parquet"
    sst2.parent.mkdir(parents=True)
    pq.write_table(pa.table({"idx": [0, 1, 2], "sentence": ["fine", "awful", "hidden"], "label": [1, 0, -1]}),
                   sst2)
    ds = load_split("sst2", "test", source="hub")
    assert ds.records == [{"text": "fine", "label": 1}, {"text": "awful", "label": 0}]
    squad = store / "rajpurkar/squad/plain_text/validation-00000-of-00001.parquet"
    squad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "title": ["T"], "context": ["Paris is in France."],
                             "question": ["Where is Paris?"],
                             "answers": [{"text": ["France", "in France"], "answer_start": [12, 9]}]}), squad)
    qa = load_split("squad", "validation")
    assert qa.records == [{"context": "Paris is in France.", "question": "Where is Paris?",
                           "answers": ["France", "in France"]}]
    assert calls[-1]["filename"] == "plain_text/validation-00000-of-00001.parquet"


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = write(tmp_path / "train.parquet", b"PAR1")
    with pytest.raises(DataError, match=r"train.parquet needs pyarrow.*gpt2lora\[hub\]"):
        load_split("sst2", "train", path=path)


# ---------------------------------------------------------------------------------------------- formatting

def test_alpaca_prompt_variants():
    with_input = alpaca_prompt("Translate.", "chat")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
    without = alpaca_prompt("Say hi.", "  ")
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_nli_truncation_keeps_the_hypothesis(tok):
    ids = nli_ids(tok, "word " * 200, "The cat sleeps.", max_length=32)
    assert len(ids) == 32
    assert tok.decode(ids).endswith("\nHypothesis: The cat sleeps.")


def test_encode_classification_truncates_and_keeps_labels(tok, shared_data):
    ds = load_split("sst2", "validation", root=shared_data, limit=40)
    examples = encode(ds, tok, max_length=8)
    assert [e["label"] for e in examples] == [r["label"] for r in ds.records]
    for example, record in zip(examples, ds.records):
        assert example["input_ids"] == tok.encode_ordinary(record["text"])[:8]
    with pytest.raises(ConfigError, match="max_length"):
        encode(ds, tok, max_length=1)


def test_encode_instruction_masks_the_alpaca_prompt(tok, shared_data):
    ds = load_split("alpaca_2k", "train", root=shared_data, limit=30)
    examples = encode(ds, tok, max_length=512)
    for example, record in zip(examples, ds.records):
        prompt = tok.encode_ordinary(alpaca_prompt(record["instruction"], record["input"]))
        response = tok.encode_ordinary(record["output"]) + [tok.eot_token]
        if len(prompt) + len(response) > 512:
            continue
        assert example["input_ids"] == prompt + response
        assert example["labels"] == [-100] * len(prompt) + response


def test_encode_qa_cuts_the_context_but_keeps_question_and_answer(tok, shared_data):
    ds = load_split("squad", "validation", root=shared_data, limit=20)
    examples = encode(ds, tok, max_length=64)
    for example, record in zip(examples, ds.records):
        assert len(example["input_ids"]) <= 64
        targets = [t for t in example["labels"] if t != -100]
        answer = tok.encode_ordinary(" " + record["answers"][0])
        assert targets == answer + [tok.eot_token]
        prompt = tok.decode(example["input_ids"][:len(example["input_ids"]) - len(targets)])
        assert prompt.startswith("Context: ") and prompt.endswith(f"\nQuestion: {record['question']}\nAnswer:")


def test_dynamic_padding_on_sst2_is_far_below_fixed_length(tok, shared_data):
    from gpt2lora.batching import BucketedBatches

    ds = load_split("sst2", "train", root=shared_data, limit=2000)
    examples = encode(ds, tok, max_length=128)
    batches = BucketedBatches(examples, batch_size=16, shuffle=True, seed=0, pad_token_id=tok.eot_token)
    stats = batches.padding_stats(max_length=128)
    padded_dynamic = stats.batch_tokens - stats.real_tokens
    padded_fixed = stats.fixed_tokens - stats.real_tokens
    # Measured (2,000 rows, batch 16, seed 0): 1,178 padded slots vs 233,418 with fixed length (0.5%);
    # the batches hold 9.3% of the fixed-length slots.
    assert padded_dynamic < 0.05 * padded_fixed
    assert stats.batch_tokens < 0.3 * stats.fixed_tokens
    counted = sum(int((1 - b["attention_mask"]).sum()) for b in batches)
    assert counted == padded_dynamic


def test_eval_logits_do_not_depend_on_batch_composition(tok, shared_data):
    import torch

    from gpt2lora.batching import BucketedBatches
    from gpt2lora.config import GPT2Config
    from gpt2lora.heads import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128),
                                          num_labels=2).eval()
    examples = encode(load_split("sst2", "validation", root=shared_data, limit=60), tok, max_length=64)

    def logits_by_row(batch_size: int, shuffle: bool, seed: int) -> torch.Tensor:
        batches = BucketedBatches(examples, batch_size, shuffle=shuffle, seed=seed, pad_token_id=tok.eot_token)
        out = torch.empty(len(examples), 2)
        with torch.no_grad():
            for rows, batch in zip(batches.batch_indices(), batches):
                out[rows] = model(batch["input_ids"], batch["attention_mask"])
        return out

    reference = logits_by_row(1, False, 0)
    for batch_size, shuffle, seed in [(7, True, 1), (32, True, 2), (60, False, 0)]:
        torch.testing.assert_close(logits_by_row(batch_size, shuffle, seed), reference, atol=1e-5, rtol=1e-5)
