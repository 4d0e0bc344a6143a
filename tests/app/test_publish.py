"""Publishing a run: the local hub server receives one commit; downloaded back with the real client, peft loads
the adapter and transformers the merged model with the run's logits; the card's YAML names the base model; bad
input fails in one line before anything is sent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import VOCAB, gpt2_stand_in, require_shared, sst2_hub_files

from gpt2lora import load_tokenizer
from gpt2lora.app.publish import check_repo_id, push_run
from gpt2lora.errors import CheckpointNotFoundError, ConfigError, HubError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOKEN = "hf_local_test_token"
SENTENCES = ["a gripping, funny and moving film", "dull , lifeless and far too long"]


@pytest.fixture
def trained(hub, tmp_path, monkeypatch, shared_data):
    """A LoRA run on SST-2 whose base model "gpt2" and data came from the local hub; the hub then wants TOKEN."""
    from gpt2lora.app.cli import main

    base = gpt2_stand_in(tmp_path / "stand-in")
    hub.put("openai-community/gpt2", base)
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 48, "validation": 16}), repo_type="dataset")
    monkeypatch.delenv("GPT2LORA_DATA", raising=False)
    assert main(["train", "--task", "sst2", "--model", "gpt2", "--source", "hub", "--max-steps", "3",
                 "--train-rows", "48", "--eval-rows", "16", "--batch-size", "16", "--out", str(tmp_path / "runs"),
                 "--run-name", "sst2-lora", "--quiet"]) == 0
    hub.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return tmp_path / "runs" / "sst2-lora", base


def run_logits(run: Path) -> torch.Tensor:
    from gpt2lora.app.commands import load_run_model

    model, _ = load_run_model(run)
    tok = load_tokenizer(require_shared(VOCAB))
    with torch.no_grad():
        return torch.cat([model.eval()(torch.tensor([tok.encode_ordinary(s)])) for s in SENTENCES])


def hf_logits(model, folder: Path) -> torch.Tensor:
    tok = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    with torch.no_grad():
        return torch.cat([model.eval()(**tok(s, return_tensors="pt")).logits for s in SENTENCES])


def download(repo_id: str, folder: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, cache_dir=folder))


def card_meta(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card has no YAML header"
    return yaml.safe_load(match.group(1))


def commits(hub, repo_id: str) -> int:
    return len(hub.repos[("model", repo_id)].commits)


def test_push_the_adapter_then_the_merged_model_then_the_adapter_again(hub, trained, tmp_path):
    run, base = trained
    expected = run_logits(run)
    repo = "alice/gpt2-sst2-lora"

    pushed = push_run(run, repo)

    files = hub.files(repo)
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                             "merges.txt", "vocab.json"]
    assert commits(hub, repo) == 2 and pushed.commit == hub.repos[("model", repo)].branches["main"]
    assert files["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [p for m, p in hub.requests if m == "POST" and "/commit/" in p] == [f"/api/models/{repo}/commit/main"]
    folder = download(repo, tmp_path / "dl-1")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "openai-community/gpt2"
    reference = transformers.GPT2ForSequenceClassification.from_pretrained(base, num_labels=2)
    adapted = peft.PeftModel.from_pretrained(reference, folder)
    torch.testing.assert_close(hf_logits(adapted, folder), expected, atol=1e-4, rtol=1e-4)
    card = (folder / "README.md").read_text(encoding="utf-8")
    meta = card_meta(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "openai-community/gpt2"
    assert meta["datasets"] == ["stanfordnlp/sst2"] and meta["pipeline_tag"] == "text-classification"
    assert {"accuracy", "f1", "precision", "recall"} <= set(meta["metrics"])
    assert "## Results" in card and "| Method | Eval loss | Accuracy (%)" in card and "## Training settings" in card
    assert "| lr | 0.0002 |" in card and "| LoRA rank | 8 |" in card and "![" not in card

    merged = push_run(run, repo, merged=True)

    files = hub.files(repo)
    assert sorted(files) == [".gitattributes", "README.md", "config.json", "merges.txt", "model.safetensors",
                             "vocab.json"]
    assert merged.deleted == ("adapter_config.json", "adapter_model.safetensors") and commits(hub, repo) == 3
    folder = download(repo, tmp_path / "dl-2")
    model = transformers.GPT2ForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(hf_logits(model, folder), expected, atol=1e-4, rtol=1e-4)
    assert card_meta((folder / "README.md").read_text())["library_name"] == "transformers"

    again = push_run(run, repo)  # back to the adapter, in place
    assert sorted(hub.files(repo)) == sorted(pushed.uploaded + (".gitattributes",))
    assert hub.files(repo)["README.md"] == files_readme(pushed, hub, repo)
    assert again.deleted == ("config.json", "model.safetensors") and commits(hub, repo) == 4


def files_readme(pushed, hub, repo: str) -> bytes:
    """The card of the first push (its commit), to check a re-push writes the same one."""
    return hub.repos[("model", repo)].commits[pushed.commit]["README.md"]


def test_push_to_a_private_branch(hub, trained):
    run, _ = trained
    push_run(run, "alice/private-lora", private=True, revision="experiment")
    repo = hub.repos[("model", "alice/private-lora")]
    assert repo.private
    assert "adapter_model.safetensors" in hub.files("alice/private-lora", revision="experiment")
    assert sorted(hub.files("alice/private-lora")) == [".gitattributes"]


def test_a_failed_commit_leaves_nothing_half_uploaded(hub, trained):
    run, _ = trained
    hub.fail(r"/commit/", 500, times=1)
    with pytest.raises(HubError) as info:
        push_run(run, "alice/flaky")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"push .*sst2-lora to alice/flaky \(revision main\) failed while committing 5 files: the hub API: HTTP 500 "
                     r"\(POST http://127\.0\.0\.1:\d+/api/models/alice/flaky/commit/main\); nothing was committed",
                     message), message
    assert sorted(hub.files("alice/flaky")) == [".gitattributes"]  # the repository exists, empty: no file landed
    push_run(run, "alice/flaky")
    assert "adapter_model.safetensors" in hub.files("alice/flaky")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("repo_id", ["gpt2-sst2", "alice/", "/lora", "a/b/c", "alice/bad name", "alice/x..y",
                                     "alice/-x", "alice/x.git", "alice/" + "x" * 97])
def test_repo_id_must_be_owner_slash_name(repo_id, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as info:
        push_run(tmp_path, repo_id)
    assert str(info.value) == (f"repo_id {repo_id!r}: expected owner/name (letters, digits, '-', '_', '.'; at most 96 "
                               "characters each), e.g. alice/gpt2-sst2-lora")
    assert hub.requests == []
    assert check_repo_id("alice/gpt2-sst2_lora.v2") == "alice/gpt2-sst2_lora.v2"


def write_run(folder: Path, adapter: dict | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"task": "sst2", "method": "full", "base_model": "gpt2",
                                                    "kind": "classification"}))
    if adapter is not None:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"not read")
    return folder


def test_a_run_without_an_adapter_or_without_a_peft_adapter(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bare = write_run(tmp_path / "bare", None)
    with pytest.raises(CheckpointNotFoundError) as info:
        push_run(bare, "alice/x")
    assert str(info.value) == (f"run {bare} has no adapter to push ({bare / 'adapter'} needs adapter_config.json and "
                               "adapter_model.safetensors); finish training it first")
    own = write_run(tmp_path / "full", {"format": "gpt2lora", "method": "full"})
    with pytest.raises(ConfigError, match=r"method 'full'\) is in gpt2lora's own format, which peft cannot load; "
                                          r"push the merged model instead \(merged=True, --merged\)"):
        push_run(own, "alice/x")
    with pytest.raises(CheckpointNotFoundError, match=r"config.json not found: expected a run folder"):
        push_run(tmp_path / "nowhere", "alice/x")
    assert hub.requests == []


def test_the_token_never_comes_from_the_run_folder(hub, tmp_path):
    run = write_run(tmp_path / "run", {"peft_type": "LORA"})
    (run / "token").write_text(TOKEN)
    (run / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    with pytest.raises(ConfigError, match=r"^push: no Hugging Face token; log in with 'hf auth login' or set HF_TOKEN"):
        push_run(run, "alice/x")
    assert hub.requests == []


def test_push_command_uploads_the_run(hub, trained, tmp_path, capsys):
    """`gpt2lora push RUN OWNER/NAME`: the command line reaches push_run; peft loads what the hub received."""
    from gpt2lora.app.cli import main

    run, base = trained
    assert main(["push", str(run), "me/sst2-cli"]) == 0
    assert "pushed" in capsys.readouterr().out and commits(hub, "me/sst2-cli") == 2  # the initial one + ours
    folder = download("me/sst2-cli", tmp_path / "dl")
    assert card_meta((folder / "README.md").read_text())["library_name"] == "peft"
    model = peft.PeftModel.from_pretrained(transformers.GPT2ForSequenceClassification.from_pretrained(base), folder)
    torch.testing.assert_close(hf_logits(model, folder), run_logits(run), atol=1e-4, rtol=1e-4)
    capsys.readouterr()  # the download's progress bars
    assert main(["push", str(run), "not-a-repo-id"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not-a-repo-id" in err
