"""Data layer: readers, presets (local, and the hub through a local hub server), validation errors, formatting and
tokenisation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import (
    card,
    go_offline,
    parquet_bytes,
    point_hub_client_at,
    read_jsonl,
    sst2_hub_files,
    sst2_rows,
)
from hub_server import closed_port_url

from gpt2lora.data import tasks
from gpt2lora.data.tasks import (
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
    monkeypatch.delenv(tasks.DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match="local folder 'sms_spam' not found.*GPT2LORA_DATA"):
        load_split("sms_spam", source="local")
    with pytest.raises(DataError, match="task 'sick' has no hub source"):
        load_split("sick", source="hub")


# ------------------------------------------------------------------- hub datasets, through a local hub server


def downloaded(hub) -> list[str]:
    return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests
            if method == "GET" and "/resolve/" in path]


def as_records(rows: list[dict]) -> list[dict]:
    return [{"text": r["sentence"], "label": r["label"]} for r in rows]


@pytest.fixture
def no_local_data(monkeypatch):
    monkeypatch.delenv(tasks.DATA_ROOT_ENV, raising=False)


def test_sst2_in_its_real_hub_layout(hub, no_local_data):
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 40, "validation": 12, "test": 6}), repo_type="dataset")

    train = load_split("sst2", "train")
    validation = load_split("sst2", "validation", source="hub")

    assert train.records == as_records(sst2_rows("train", 40))
    assert validation.records == as_records(sst2_rows("validation", 12))
    # the card once (then cached), and each split's file: nothing guessed, nothing else
    assert downloaded(hub) == ["README.md", "data/train-00000-of-00001.parquet",
                               "data/validation-00000-of-00001.parquet"]
    assert train.source.startswith("hub dataset stanfordnlp/sst2@") and "(card)" in train.source
    with pytest.raises(DataError, match=r"have no usable rows|has no usable rows"):
        load_split("sst2", "test")  # GLUE hides the test labels (-1): every row is dropped


def test_every_shard_of_a_split_is_read_and_revision_pins_the_layout(hub, no_local_data):
    """The issue's case: the train split in two shards at one revision, one file on main."""
    one = hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 30, "validation": 8}), repo_type="dataset")
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 50, "validation": 8}, shards={"train": 2}),
            repo_type="dataset", branch="two-shards")

    sharded = load_split("sst2", "train", revision="two-shards")
    assert sharded.records == as_records(sst2_rows("train", 50))
    assert downloaded(hub)[-2:] == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert load_split("sst2", "train", revision=one).records == as_records(sst2_rows("train", 30))
    assert len(load_split("sst2", "train", limit=7, revision="two-shards")) == 7
    with pytest.raises(DataError) as info:
        load_split("sst2", "train", revision="no-such-branch")
    assert "\n" not in str(info.value)
    assert re.search(r"dataset stanfordnlp/sst2 has no revision 'no-such-branch'.*RevisionNotFound", str(info.value))


def test_config_subfolder_from_the_card_and_by_convention(hub, no_local_data):
    squad = [{"id": "a", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
              "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}]
    hub.put("rajpurkar/squad", {"README.md": card([{"config_name": "plain_text", "data_files": [
        {"split": "train", "path": "plain_text/train-*"},
        {"split": "validation", "path": "plain_text/validation-*"}]}]),
        "plain_text/validation-00000-of-00001.parquet": parquet_bytes(squad)}, repo_type="dataset")
    qa = load_split("squad", "validation")
    assert qa.records == [{"context": "Paris is in France.", "question": "Where is Paris?",
                           "answers": ["France", "in France"]}]
    # no card configs: the hub's conventions find {config}/{split}-* (tweet_eval keeps one folder per config)
    emoji = [{"text": f"tweet {i}", "label": i % 20} for i in range(25)]
    hub.put("cardiffnlp/tweet_eval", {"README.md": "# TweetEval\n",
                                      "emoji/train-00000-of-00001.parquet": parquet_bytes(emoji[:20]),
                                      "emoji/test-00000-of-00001.parquet": parquet_bytes(emoji[20:]),
                                      "irony/train-00000-of-00001.parquet": parquet_bytes([{"text": "x", "label": 1}])},
            repo_type="dataset")
    ds = load_split("tweet_emoji", "train")
    assert ds.records == emoji[:20] and "(conventions)" in ds.source
    with pytest.raises(DataError, match=r"no 'validation' split \(it has: train, test"):
        load_split("tweet_emoji", "validation")


def test_jsonl_and_csv_datasets_by_convention(hub, no_local_data):
    rows = [{"message_id": 1, "text": "cheap meds", "label": 1, "label_text": "spam"},
            {"message_id": 2, "text": "meeting at 3", "label": 0, "label_text": "ham"}]
    hub.put("SetFit/enron_spam", {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                                  "test.jsonl": json.dumps(rows[0]) + "\n"}, repo_type="dataset")
    assert load_split("enron_spam", "train").records == [{"text": "cheap meds", "label": 1},
                                                         {"text": "meeting at 3", "label": 0}]
    with pytest.raises(DataError, match=r"enron_spam.*no 'validation' split \(it has: train, test"):
        load_split("enron_spam", "validation")
    hub.put("presencesw/all_nli_med", {"data/train.csv": "premise,hypothesis,label\nA man.,A person.,0\n"},
            repo_type="dataset")
    assert load_split("medical_nli", "train").records == [{"premise": "A man.", "hypothesis": "A person.", "label": 0}]


def test_falls_back_to_the_parquet_conversion(hub, no_local_data):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(9)]
    script_only = hub.put("stanfordnlp/snli", {"README.md": "# SNLI\n", "snli.py": "# a loading script"},
                          repo_type="dataset")
    hub.put("stanfordnlp/snli", {"plain_text/train/0000.parquet": parquet_bytes(rows[:5]),
                                 "plain_text/train/0001.parquet": parquet_bytes(rows[5:])},
            repo_type="dataset", branch="refs/convert/parquet")
    ds = load_split("snli", "train")
    assert ds.records == rows and "(parquet conversion)" in ds.source
    with pytest.raises(DataError) as info:  # a pinned revision is not swapped for the conversion
        load_split("snli", "train", revision=script_only)
    assert "snli.py" in str(info.value) and "\n" not in str(info.value)


def test_offline_reads_the_cached_split(hub, no_local_data, monkeypatch):
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 20, "validation": 8}, shards={"train": 2}),
            repo_type="dataset")
    online = load_split("sst2", "train")
    hub.requests.clear()
    go_offline(monkeypatch)
    assert load_split("sst2", "train").records == online.records
    assert hub.requests == []
    with pytest.raises(DataError) as info:  # never downloaded
        load_split("sst2", "validation")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"stanfordnlp/sst2 \(revision main, split 'validation'\).*data/validation-\*.* files cached for "
                     r"that revision \(README\.md, data/train-00000-of-00002\.parquet.*HF_HUB_OFFLINE", message), message


def test_card_data_files_that_match_nothing_is_one_line(hub, no_local_data):
    hub.put("stanfordnlp/sst2", {"README.md": card([{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/training-*.parquet"}]}]),
        "data/train-00000-of-00001.parquet": parquet_bytes(sst2_rows("train", 3))}, repo_type="dataset")
    with pytest.raises(DataError) as info:
        load_split("sst2", "train")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"task 'sst2': dataset stanfordnlp/sst2 \(revision main, split 'train'\): the card's "
                     r"data_files for 'train' \(data/training-\*\.parquet\) match none of the repository's files "
                     r"\(.*data/train-00000-of-00001\.parquet", message), message
    with pytest.raises(DataError, match=r"no 'validation' split in config 'default' \(its card lists: train\)"):
        load_split("sst2", "validation")


def test_hub_errors_are_one_line_naming_repo_and_file(hub, no_local_data, monkeypatch, tmp_path):
    with pytest.raises(DataError) as info:
        load_split("sst2", "train")
    assert "\n" not in str(info.value)
    assert re.search(r"no dataset repository stanfordnlp/sst2 on the hub.*HTTP 404 RepoNotFound", str(info.value))
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 10}), repo_type="dataset")
    for status in (404, 500):
        hub.fail(r"/resolve/.*train-00000-of-00001\.parquet$", status)
        with pytest.raises(DataError) as info:
            load_split("sst2", "train")
        message = str(info.value)
        assert "\n" not in message
        assert re.search(rf"could not download data/train-00000-of-00001\.parquet of the dataset stanfordnlp/sst2 "
                         rf"\(revision main\): file data/train-00000-of-00001\.parquet: HTTP {status}", message), message
        hub.failures.clear()
    point_hub_client_at(monkeypatch, closed_port_url(), tmp_path / "empty-home")
    with pytest.raises(DataError) as info:
        load_split("sst2", "train")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"could not list the files of the dataset stanfordnlp/sst2 \(revision main\).*cannot connect",
                     message), message


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = write(tmp_path / "train.parquet", b"PAR1")
    with pytest.raises(DataError, match=r"train.parquet needs pyarrow, a dependency of gpt2lora"):
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
    from gpt2lora.data.batching import BucketedBatches

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

    from gpt2lora.config import GPT2Config
    from gpt2lora.data.batching import BucketedBatches
    from gpt2lora.model.classifier import GPT2ForSequenceClassification

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


def test_hub_glob_patterns():
    from gpt2lora.data.hub_datasets import convention_patterns, match_files

    files = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/train/extra.jsonl",
             "train1.csv", "training.jsonl", "trainer.py", "plain_text/train-0.parquet", "a/b/c/test.csv",
             "README.md", ".gitattributes"]
    assert match_files(["data/train-*"], files) == files[:2]  # * stays inside its folder
    assert match_files(["data/**"], files) == files[:3]
    assert match_files(["**/test.csv"], files) == ["a/b/c/test.csv"]
    assert match_files(["train[0-9].csv"], files) == ["train1.csv"]
    assert match_files(["train[!0-9].csv"], files) == []
    root = convention_patterns("train")[-1]
    assert match_files(root, files) == ["train1.csv", "training.jsonl"]  # not trainer.py
    assert match_files(convention_patterns("train", "plain_text")[0], files) == ["plain_text/train-0.parquet"]
    assert match_files(convention_patterns("validation")[-1], ["dev.csv", "val-0.parquet", "valid.jsonl",
                                                               "validation_extra.csv", "devices.txt"]) == [
        "dev.csv", "val-0.parquet", "valid.jsonl", "validation_extra.csv"]
