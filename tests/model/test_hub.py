"""Checkpoint I/O: export to transformers, round trips, the hub path (the real huggingface_hub client against
the local hub server of tests/hub_server.py) and bad input."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ODD, REPO, TINY, go_offline, gpt2_stand_in, make_hf_checkpoint, point_hub_client_at
from hub_server import closed_port_url
from safetensors.torch import load_file, save_file

from gpt2lora import (
    GPT2,
    CheckpointError,
    CheckpointNotFoundError,
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    UnsafeCheckpointError,
    apply_lora,
    load_tokenizer,
    save_pretrained,
)
from gpt2lora.model.hub import MODEL_FILES

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def ids(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------- export and round trips


def test_save_pretrained_loads_in_transformers_with_identical_logits(odd_checkpoint, tmp_path):
    ours = GPT2.from_pretrained(odd_checkpoint).eval()
    out = save_pretrained(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # The exact key set transformers itself writes (bare Conv1D weights, no tied lm_head).
    assert set(load_file(out / "model.safetensors")) == set(load_file(odd_checkpoint / "model.safetensors"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert ref.config.n_head == 3 and ref.config.layer_norm_epsilon == 1e-6
    x = ids(ODD["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), atol=ATOL, rtol=0)


def test_round_trip_gpt2lora_transformers_gpt2lora(tmp_path):
    config = GPT2Config(**TINY, eos_token_id=0)
    ours = GPT2.from_config(config, seed=11).eval()
    save_pretrained(ours, tmp_path / "a")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "a").eval()
    x = ids(TINY["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), atol=ATOL, rtol=0)
    ref.save_pretrained(tmp_path / "b")
    back = GPT2.from_pretrained(tmp_path / "b").eval()
    assert back.config == config
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


def test_save_pretrained_copies_tokenizer_files(tmp_path, gpt2_vocab):
    source = make_hf_checkpoint(tmp_path / "src", with_tokenizer=True)
    out = save_pretrained(GPT2.from_pretrained(source), tmp_path / "out")
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (gpt2_vocab / name).read_bytes()


def test_load_with_dtype_and_device(tiny_checkpoint):
    full = GPT2.from_pretrained(tiny_checkpoint).eval()
    half = GPT2.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cpu").eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    assert half.lm_head.weight is half.transformer.wte.weight
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    x = ids(TINY["vocab_size"])
    logits = half(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), full(x), atol=0.1, rtol=0.05)


def test_a_model_loaded_inside_inference_mode_holds_ordinary_tensors_and_trains(tiny_checkpoint):
    """Inference tensors could never be trained (torch refuses to save them for backward) nor keep a pack."""
    with torch.inference_mode():
        model = GPT2.from_pretrained(tiny_checkpoint)
        classifier = GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=3)
    for loaded in (model, classifier):
        assert not any(t.is_inference() for t in [*loaded.parameters(), *loaded.buffers()])
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    x = ids(TINY["vocab_size"])
    model(x, labels=x).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loaded_conv1d_weights_take_the_linear_layout_of_a_model_built_from_a_config(tiny_checkpoint, dtype):
    stored = load_file(tiny_checkpoint / "model.safetensors")
    loaded = GPT2.from_pretrained(tiny_checkpoint, dtype=dtype)
    built = GPT2.from_config(loaded.config)
    for (name, weight), twin in zip(loaded.named_parameters(), built.parameters(), strict=True):
        assert weight.shape == twin.shape and weight.stride() == twin.stride(), name
    conv1d = stored["transformer.h.0.mlp.c_fc.weight"]  # (in, out) in the file
    weight = loaded.transformer.h[0].mlp.c_fc.weight
    assert conv1d.shape == weight.shape[::-1] and weight.is_contiguous()
    assert torch.equal(weight, conv1d.t().to(weight.dtype))


def test_a_loaded_model_keeps_nothing_of_its_file(tiny_checkpoint, tmp_path):
    """Every tensor is copied out of the file while loading (each read through a mapping of its own, dropped once
    copied): overwriting the file in place afterwards changes nothing in the model."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    model = GPT2.from_pretrained(folder)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as f:  # same file, same inode: a mapping of it would see these bytes
        f.seek(header)
        f.write(bytes(size - header))
    assert GPT2.from_pretrained(folder).transformer.wte.weight.abs().max() == 0  # the file did change
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_loading_allocates_no_random_init(tiny_checkpoint, monkeypatch):
    import gpt2lora.model.gpt2 as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained should not run the random initialisation")

    monkeypatch.setattr(model_module, "init_weights", refuse)
    assert GPT2.from_pretrained(tiny_checkpoint).name_or_path == str(tiny_checkpoint)


# ---------------------------------------------------------------- the hub path, through a local hub server


def resolved(hub) -> list[str]:
    """Files the client fetched (GET) through /resolve/."""
    return sorted({path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests
                   if method == "GET" and "/resolve/" in path})


def test_short_name_maps_to_openai_community_and_fetches_only_safe_files(hub, tiny_checkpoint, tmp_path):
    marker = tmp_path / "unpickled"
    hub.put("openai-community/gpt2", {**{p.name: p for p in tiny_checkpoint.iterdir()},
                                      "pytorch_model.bin": pickle.dumps(MarkerOnUnpickle(marker)),
                                      "tf_model.h5": b"not fetched", "onnx/decoder_model.onnx": b"not fetched",
                                      "README.md": "model card"})

    model = GPT2.from_pretrained("gpt2").eval()

    assert resolved(hub) == ["config.json", "model.safetensors"]
    assert all("openai-community/gpt2" in path for _, path in hub.requests if "agent-harnesses" not in path)
    fetched = sorted(p.name for p in model.checkpoint_dir.rglob("*"))
    assert fetched == ["config.json", "model.safetensors"]
    assert model.checkpoint_dir.is_relative_to(Path(os.environ["HF_HOME"]))
    assert not marker.exists()
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    x = ids(TINY["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)
    assert model.name_or_path == "gpt2"


def test_distilgpt2_and_full_ids_are_passed_as_is(hub, tiny_checkpoint):
    hub.put("distilbert/distilgpt2", tiny_checkpoint)
    hub.put("someone/my-gpt2", tiny_checkpoint)
    GPT2.from_pretrained("distilgpt2")
    GPT2.from_pretrained("someone/my-gpt2")
    infos = [path for method, path in hub.requests if path.startswith("/api/models/")]
    assert [p.split("/")[3] + "/" + p.split("/")[4] for p in infos if "/revision/" in p] == [
        "distilbert/distilgpt2", "someone/my-gpt2"]


def test_model_revisions_stay_pinnable_and_cache_dir_is_honoured(hub, tmp_path):
    old = hub.put("openai-community/gpt2-medium", make_hf_checkpoint(tmp_path / "old", seed=1))
    hub.put("openai-community/gpt2-medium", make_hf_checkpoint(tmp_path / "new", seed=2))
    hub.put("openai-community/gpt2-medium", make_hf_checkpoint(tmp_path / "tagged", seed=3), branch="v1")
    cache = tmp_path / "my-cache"
    x = ids(TINY["vocab_size"])
    outputs = {}
    for revision in (old, None, "v1"):
        model = GPT2.from_pretrained("gpt2-medium", revision=revision, cache_dir=cache).eval()
        assert model.checkpoint_dir.is_relative_to(cache)
        with torch.no_grad():
            outputs[revision] = model(x)
    for revision, seed in ((old, 1), (None, 2), ("v1", 3)):
        ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / ["old", "new", "tagged"][seed - 1]).eval()
        with torch.no_grad():
            torch.testing.assert_close(outputs[revision], ref(x).logits, atol=ATOL, rtol=0)
    assert not torch.allclose(outputs[old], outputs[None])


def test_sharded_checkpoint_loads_from_the_hub(hub, tmp_path):
    torch.manual_seed(2)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    hub.put("someone/sharded", tmp_path / "sharded")

    model = GPT2.from_pretrained("someone/sharded").eval()

    assert resolved(hub) == sorted(["config.json", "model.safetensors.index.json", *shards])
    x = ids(TINY["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)


def test_tokenizer_fetches_only_vocab_and_merges(hub, gpt2_vocab, tmp_path):
    hub.put("openai-community/gpt2", {"vocab.json": gpt2_vocab / "vocab.json", "merges.txt": gpt2_vocab / "merges.txt",
                                      "tokenizer.json": "{}", "pytorch_model.bin": b"never fetched"})
    tok = load_tokenizer("gpt2", cache_dir=tmp_path / "cache")
    assert resolved(hub) == ["merges.txt", "vocab.json"]
    assert tok.encode_ordinary("Hello world") == [15496, 995]


def test_offline_loads_from_the_cache_without_a_request(hub, monkeypatch, tmp_path):
    checkpoint = gpt2_stand_in(tmp_path / "gpt2")
    hub.put("openai-community/gpt2", checkpoint)
    online = GPT2.from_pretrained("gpt2").eval()
    load_tokenizer("gpt2")
    hub.requests.clear()
    go_offline(monkeypatch)

    offline = GPT2.from_pretrained("gpt2").eval()
    tok = load_tokenizer("gpt2")

    assert hub.requests == []
    x = torch.tensor([tok.encode_ordinary("Hello world, offline")])
    with torch.no_grad():
        torch.testing.assert_close(offline(x), online(x), atol=0, rtol=0)
    with pytest.raises(CheckpointNotFoundError) as info:
        GPT2.from_pretrained("someone/never-downloaded")
    message = str(info.value)
    assert "\n" not in message and "someone/never-downloaded" in message and "HF_HUB_OFFLINE" in message


def test_unknown_hub_id_is_one_line_naming_it(hub):
    with pytest.raises(CheckpointNotFoundError) as info:
        GPT2.from_pretrained("someone/missing")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"'someone/missing' is not a local folder.* hub model someone/missing \(revision main\).*"
                     r"HTTP 404 RepoNotFound", message), message


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_on_a_file_is_one_line_naming_repo_and_file(status, hub, tiny_checkpoint):
    hub.put("openai-community/gpt2", tiny_checkpoint)
    hub.fail(r"/resolve/.*/model\.safetensors$", status)
    with pytest.raises(CheckpointNotFoundError) as info:
        GPT2.from_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(rf"hub model openai-community/gpt2 \(revision main\).*file model\.safetensors: HTTP {status}",
                     message), message
    if status == 500:
        assert hub.sleeps, "the client retries a 500 before giving up"


def test_refused_connection_is_one_line_naming_the_repo(hub, monkeypatch, tmp_path):
    point_hub_client_at(monkeypatch, closed_port_url(), tmp_path / "empty-home")
    with pytest.raises(CheckpointNotFoundError) as info:
        GPT2.from_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"config\.json.* of the hub model openai-community/gpt2 .*cannot connect to "
                     r"http://127\.0\.0\.1:\d+ \(.*refused.*\)", message, flags=re.IGNORECASE), message
    with pytest.raises(CheckpointNotFoundError, match=r"vocab\.json, merges\.txt of the hub model openai-community"):
        load_tokenizer("gpt2")


def test_model_files_patterns_cover_only_safe_files():
    unsafe = ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index",
              "rust_model.ot", "onnx/decoder_model.onnx", "64-8bits.tflite", "training_args.bin"]
    for name in unsafe:
        assert not any(fnmatch.fnmatch(name, p) for p in MODEL_FILES), name
    wanted = ["config.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", "vocab.json", "merges.txt"]
    for name in wanted:
        assert any(fnmatch.fnmatch(name, p) for p in MODEL_FILES), name


# ---------------------------------------------------------------- bad input


class MarkerOnUnpickle:
    """A pickle payload whose unpickling creates a file: proof of whether anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_missing_folder_is_not_found_without_a_hub_call(hub, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(missing))):
        GPT2.from_pretrained(missing)
    with pytest.raises(CheckpointNotFoundError, match=r"nowhere"):
        GPT2.from_pretrained("./nowhere")
    assert hub.requests == []


def test_file_instead_of_folder(hub, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(path)) + ".*is a file"):
        GPT2.from_pretrained(path)
    assert hub.requests == []


def test_missing_config_and_missing_weights(tiny_checkpoint, tmp_path):
    no_config = copy_checkpoint(tiny_checkpoint, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(no_config / "config.json"))):
        GPT2.from_pretrained(no_config)
    no_weights = copy_checkpoint(tiny_checkpoint, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(no_weights)) + ".*no model.safetensors"):
        GPT2.from_pretrained(no_weights)


def test_pickle_only_folder_is_refused_and_never_unpickled(tiny_checkpoint, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(MarkerOnUnpickle(marker))
    pickle.loads(payload)  # the payload really does create the marker when unpickled ...
    assert marker.exists()
    marker.unlink()
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        GPT2.from_pretrained(folder)
    assert not marker.exists()  # ... and gpt2lora never did


def test_package_never_unpickles_or_imports_transformers():
    source = "\n".join(p.read_text() for p in (REPO / "gpt2lora").rglob("*.py"))
    assert "torch.load(" not in source and "pickle.load" not in source
    assert not re.search(r"^\s*(import|from)\s+(transformers|peft)\b", source, re.MULTILINE)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(how, tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[how])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not a readable safetensors"):
        GPT2.from_pretrained(folder)


def test_config_that_is_not_json(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"n_embd": 64,')
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.json")) + ".*not valid JSON"):
        GPT2.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        GPT2.from_pretrained(folder)


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True),
                                        ("reorder_and_upcast_attn", True),
                                        ("add_cross_attention", True),
                                        ("scale_attn_weights", False),
                                        ("model_type", "gpt_neo")])
def test_unsupported_config_options(key, value, tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json.*{key}"):
        GPT2.from_pretrained(folder)


def test_invalid_config_value_names_the_field(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["n_head"] = 5  # does not divide n_embd=64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*n_head.*divisor of n_embd=64"):
        GPT2.from_pretrained(folder)


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_mismatched_shapes_are_listed(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")

    def shrink(state):
        state["transformer.h.1.mlp.c_fc.bias"] = state["transformer.h.1.mlp.c_fc.bias"][:10]
    rewrite_weights(folder, shrink)
    with pytest.raises(CheckpointError, match=r"shape mismatches: transformer\.h\.1\.mlp\.c_fc\.bias: "
                                              r"checkpoint \(10,\), model \(256,\)"):
        GPT2.from_pretrained(folder)


def test_config_that_disagrees_with_weights(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 600
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json does not describe the weights beside it: vocab_size=600 "
                                              r"but the weights say 512 \(model\.safetensors: transformer\.wte\.weight "
                                              r"has shape \(512, 64\)\)"):
        GPT2.from_pretrained(folder)


def test_missing_and_unexpected_tensors_are_listed(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")

    def edit(state):
        del state["transformer.h.1.ln_2.bias"]
        del state["transformer.wpe.weight"]
        state["transformer.h.0.attn.q_norm.weight"] = torch.ones(64)
    rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError) as info:
        GPT2.from_pretrained(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "missing tensors: transformer.h.1.ln_2.bias, transformer.wpe.weight" in message
    assert "unexpected tensors: transformer.h.0.attn.q_norm.weight" in message


def test_sharded_index_problems(tiny_checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).save_pretrained(folder, max_shard_size="200KB")
    index = folder / "model.safetensors.index.json"
    shard = max(folder.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(index)) + ".*missing: " + shard.name):
        GPT2.from_pretrained(folder)
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=re.escape(str(index)) + ".*'weight_map'"):
        GPT2.from_pretrained(folder)


@pytest.mark.parametrize("limit", [None, 40_000, 1])
def test_loading_reads_each_file_in_groups_of_bounded_size_through_one_mapping_each(tmp_path, monkeypatch, limit):
    """Every weight is read once, through one mapping per group of one file's tensors: a whole small shard at the
    default limit, groups of at most ``limit`` bytes (a larger tensor alone) below it; the model is the same."""
    from gpt2lora.model import hub as hub_module

    torch.manual_seed(4)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = sorted((tmp_path / "sharded").glob("*.safetensors"))
    header = hub_module.read_header(files)
    if limit is not None:
        monkeypatch.setattr(hub_module, "LOAD_GROUP_BYTES", limit)
    reads: list[tuple[Path, list[str]]] = []
    real_read = hub_module.read_safetensors
    monkeypatch.setattr(hub_module, "read_safetensors",
                        lambda path, device="cpu", keys=None: reads.append((path, list(keys))) or real_read(
                            path, device, keys))
    model = GPT2.from_pretrained(tmp_path / "sharded").eval()

    weights = [key for key in header if hub_module._is_weight(key)]
    assert sorted(key for _, keys in reads for key in keys) == sorted(weights)  # each read once
    for path, keys in reads:
        assert {header[key].file for key in keys} == {path}
        size = sum(4 * int(torch.tensor(header[key].shape).prod()) for key in keys)
        assert len(keys) == 1 or size <= (limit or hub_module.LOAD_GROUP_BYTES)
    if limit is None:
        assert len(reads) == len(files)
    elif limit == 1:
        assert len(reads) == len(weights)
    else:
        assert len(files) < len(reads) < len(weights)
    x = ids(TINY["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)
