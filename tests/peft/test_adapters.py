"""Adapters: peft's file layout both ways (transformers + peft as the reference), own-format round trips, bad folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from helpers import CLF_LABELS, TINY, make_hf_checkpoint, ours
from helpers import hf_twin as theirs
from helpers import logits_of as logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gpt2lora import (
    GPT2,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    LoRAConfig,
    UnsafeCheckpointError,
    apply_lora,
    load_adapter,
    prepare_model,
    save_adapter,
)
from gpt2lora.peft.lora import lora_modules

NUM_LABELS = CLF_LABELS  # the shared clf_checkpoint's
P = "base_model.model."


def tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    # ids start at 1: the test checkpoints use 0 as padding, which transformers' pooling looks for
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))


def train_a_little(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: random non-zero values in every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def checkpoint_for(kind: str, tiny_checkpoint: Path, clf_checkpoint: Path) -> Path:
    return tiny_checkpoint if kind == "lm" else clf_checkpoint


CONFIGS = {
    "plain": LoRAConfig(rank=4, alpha=8),
    "rslora-last1": LoRAConfig(rank=4, alpha=6, use_rslora=True, last_n_blocks=1,
                               targets=("attn.c_attn", "mlp.c_proj")),
    "bias-all": LoRAConfig(rank=2, alpha=4, train_bias="all", targets=("attn.c_proj", "mlp.c_fc")),
    "bias-lora-only": LoRAConfig(rank=2, alpha=4, train_bias="lora_only", targets=("attn.c_attn",)),
    "from-scratch": LoRAConfig(rank=4, alpha=1.5, style="from_scratch", targets=("attn.c_attn", "attn.c_proj")),
}


# --- the file layout --------------------------------------------------------------------------------

def test_saved_files_config_and_exact_key_set(clf_checkpoint, tmp_path) -> None:
    model = apply_lora(ours("clf", clf_checkpoint), LoRAConfig(rank=4, alpha=8, dropout=0.1, last_n_blocks=1,
                                                               targets=("attn.c_attn", "mlp.c_proj")))
    folder = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    shapes = {k: list(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    assert shapes == {
        P + "transformer.h.1.attn.c_attn.lora_A.weight": [4, 64],
        P + "transformer.h.1.attn.c_attn.lora_B.weight": [192, 4],
        P + "transformer.h.1.mlp.c_proj.lora_A.weight": [4, 256],
        P + "transformer.h.1.mlp.c_proj.lora_B.weight": [64, 4],
        P + "score.weight": [NUM_LABELS, 64],
    }
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                                   "target_modules", "layers_to_transform", "layers_pattern", "use_rslora",
                                   "bias", "modules_to_save")} == {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "fan_in_fan_out": True, "target_modules": ["attn.c_attn", "mlp.c_proj"], "layers_to_transform": [1],
        "layers_pattern": "h", "use_rslora": False, "bias": "none", "modules_to_save": ["score"]}
    assert set(config) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}  # only peft's own keys


def test_peft_writes_the_same_layout(clf_checkpoint, tmp_path) -> None:
    """Our key set and shapes equal what peft itself saves for the same configuration."""
    config = CONFIGS["bias-lora-only"]
    save_adapter(apply_lora(ours("clf", clf_checkpoint), config), tmp_path / "ours")
    twin = peft.get_peft_model(theirs("clf", clf_checkpoint), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["attn.c_attn"], fan_in_fan_out=True, bias="lora_only",
        task_type="SEQ_CLS"))
    twin.save_pretrained(tmp_path / "peft")
    shapes = [{k: tuple(v.shape) for k, v in load_file(tmp_path / name / "adapter_model.safetensors").items()}
              for name in ("ours", "peft")]
    assert shapes[0] == shapes[1]


# --- gpt2lora -> peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_gpt2lora_adapter_loads_in_peft(tiny_checkpoint, clf_checkpoint, tmp_path, kind, name) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    model = apply_lora(ours(kind, checkpoint), CONFIGS[name], seed=1)
    train_a_little(model)  # non-zero B, trained head and biases
    save_adapter(model, tmp_path / "adapter")
    base = theirs(kind, checkpoint)
    ids = tokens()
    base_logits = logits(base, ids)
    twin = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    expected = logits(model, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(logits(twin, ids), expected, rtol=0, atol=1e-4)


# --- peft -> gpt2lora -------------------------------------------------------------------------------

PEFT_CONFIGS = {
    "all-linear-names": {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]},
    "layers-rslora-bias": {"r": 2, "lora_alpha": 3, "target_modules": ["attn.c_attn", "mlp.c_fc"],
                           "use_rslora": True, "layers_to_transform": [1], "layers_pattern": "h", "bias": "all"},
    "regex": {"r": 3, "lora_alpha": 6, "target_modules": r".*\.1\.mlp\.c_proj", "bias": "lora_only"},
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_peft_adapter_loads_in_gpt2lora(tiny_checkpoint, clf_checkpoint, tmp_path, kind, name) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    twin = peft.get_peft_model(theirs(kind, checkpoint),
                               peft.LoraConfig(fan_in_fan_out=True, task_type=task, **PEFT_CONFIGS[name]))
    train_a_little(twin)
    twin.save_pretrained(tmp_path / "adapter")
    ids = tokens()
    expected = logits(twin.eval(), ids)
    model = load_adapter(ours(kind, checkpoint), tmp_path / "adapter")
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-4)
    # the same layers wrapped and the same tensors trainable as in peft
    peft_trainable = {n.removeprefix(P).replace(".default", "").replace(".base_layer", "")
                      .replace(".modules_to_save", "").replace("lora_A.weight", "lora_A")
                      .replace("lora_B.weight", "lora_B") for n, p in twin.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_trainable


def test_old_peft_head_key_is_read(clf_checkpoint, tmp_path) -> None:
    model = apply_lora(ours("clf", clf_checkpoint), LoRAConfig(rank=2, alpha=2))
    train_a_little(model)
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    state[P + "score.modules_to_save.weight"] = state.pop(P + "score.weight")
    save_file(state, weights)
    loaded = load_adapter(ours("clf", clf_checkpoint), tmp_path / "a")
    assert torch.equal(loaded.score.weight, model.score.weight)


# --- gpt2lora -> gpt2lora ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lora_round_trip_is_exact(clf_checkpoint, tmp_path, name) -> None:
    model = apply_lora(ours("clf", clf_checkpoint), CONFIGS[name], seed=0)
    train_a_little(model, seed=2)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(ours("clf", clf_checkpoint), tmp_path / "a")
    assert loaded.lora_config == CONFIGS[name]  # from_scratch style and alpha come back too
    assert {k: v for k, v in loaded.state_dict().items()}.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    # loading into a model that already has the same LoRA layout replaces the values
    again = apply_lora(ours("clf", clf_checkpoint), CONFIGS[name], seed=9)
    load_adapter(again, tmp_path / "a")
    ids = tokens()
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_from_scratch_is_written_as_peft_alpha_times_rank(tmp_path, tiny_checkpoint) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), CONFIGS["from-scratch"])
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 1.5 * 4 and config["r"] == 4 and config["use_rslora"] is False
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["gpt2lora_style"] == "from_scratch"


@pytest.mark.parametrize("method, last_n", [("full", None), ("last_n_full", 1), ("embeddings", None),
                                            ("head", None)])
def test_other_methods_round_trip(clf_checkpoint, tmp_path, method, last_n) -> None:
    model = prepare_model(ours("clf", clf_checkpoint), method, last_n=last_n)
    train_a_little(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["method"] == method and config["format"] == "gpt2lora"
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == trained
    loaded = load_adapter(ours("clf", clf_checkpoint), tmp_path / "a")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trained


def test_embeddings_of_tied_lm_round_trip(tiny_checkpoint, tmp_path) -> None:
    model = prepare_model(ours("lm", tiny_checkpoint), "embeddings")
    train_a_little(model)
    save_adapter(model, tmp_path / "a")
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == {"transformer.wte.weight",
                                                                             "transformer.wpe.weight"}
    loaded = load_adapter(ours("lm", tiny_checkpoint), tmp_path / "a")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))


# --- bad input --------------------------------------------------------------------------------------

@pytest.fixture()
def saved(tiny_checkpoint, tmp_path) -> Path:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, alpha=8, targets=("attn.c_attn",)))
    train_a_little(model)
    return save_adapter(model, tmp_path / "saved")


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_untouched(model: nn.Module) -> None:
    assert not list(lora_modules(model)) and getattr(model, "lora_config", None) is None


def test_missing_folder_and_files(tiny_checkpoint, saved, tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_adapter(ours("lm", tiny_checkpoint), tmp_path / "nowhere")
    (saved / "adapter_config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="adapter_config.json not found"):
        load_adapter(ours("lm", tiny_checkpoint), saved)


def test_pickle_only_folder_is_refused(tiny_checkpoint, saved) -> None:
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    model = ours("lm", tiny_checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"adapter_model\.bin"):
        load_adapter(model, saved)
    assert_untouched(model)


@pytest.mark.parametrize("changes, fragment", [
    ({"peft_type": "IA3"}, "unknown peft_type 'IA3'"),
    ({"peft_type": None}, "unknown peft_type None"),
    ({"r": 8}, (r"shape mismatches: base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight: "
               r"checkpoint \(4, 64\), model \(8, 64\)")),
    ({"r": "4"}, "field 'r' is '4', expected int"),
    ({"r": 0}, "LoRAConfig.rank"),
    ({"target_modules": ["wpe"]}, "target_modules entry 'wpe'"),
    ({"target_modules": ["c_attn", "lm_head"]}, r"missing tensors: base_model\.model\.lm_head\.lora_A"),
    ({"target_modules": ["c_fc"]}, r"missing tensors: base_model\.model\.transformer\.h\.0\.mlp\.c_fc\.lora_A"),
    ({"layers_to_transform": [0, 5]}, r"layers_to_transform names blocks \[5\], but the model has 2 blocks"),
    ({"layers_to_transform": [0]}, "cannot express"),
    ({"lora_bias": True}, "'lora_bias'"),
    ({"use_dora": True}, r"missing tensors: base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_magnitude_vector"),
    ({"init_lora_weights": "loftq"}, r"field 'init_lora_weights' = 'loftq' is an initialisation gpt2lora cannot"),
    ({"task_type": "SEQ_CLS"}, "task_type is 'SEQ_CLS' but the model is a language model"),
    ({"modules_to_save": ["wte"]}, "modules_to_save"),
    ({"bias": "some"}, "LoRAConfig.train_bias"),
])
def test_bad_config_fields(tiny_checkpoint, saved, changes, fragment) -> None:
    edit_config(saved, **changes)
    model = ours("lm", tiny_checkpoint)
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_adapter(model, saved)
    assert "adapter_" in str(info.value)  # the file is named
    assert_untouched(model)


def test_invalid_json(tiny_checkpoint, saved) -> None:
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(ours("lm", tiny_checkpoint), saved)


def test_keys_that_match_no_module(tiny_checkpoint, saved) -> None:
    weights = saved / "adapter_model.safetensors"
    state = load_file(weights)
    state[P + "transformer.h.7.attn.c_attn.lora_A.weight"] = torch.zeros(4, 64)
    save_file(state, weights)
    model = ours("lm", tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: base_model\.model\.transformer\.h\.7"):
        load_adapter(model, saved)
    assert_untouched(model)


def test_adapter_for_another_base_shape(tmp_path, tiny_checkpoint) -> None:
    narrow = make_hf_checkpoint(tmp_path / "narrow", n_embd=32)
    model = apply_lora(GPT2.from_pretrained(narrow), LoRAConfig(rank=4, targets=("attn.c_attn",)))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.lora_A\.weight: "
                                              r"checkpoint \(4, 32\), model \(4, 64\)"):
        load_adapter(ours("lm", tiny_checkpoint), tmp_path / "a")
    deeper = make_hf_checkpoint(tmp_path / "deeper", n_layer=3)
    save_adapter(apply_lora(GPT2.from_pretrained(deeper), LoRAConfig(rank=4, last_n_blocks=1)), tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"blocks \[2\], but the model has 2 blocks"):
        load_adapter(ours("lm", tiny_checkpoint), tmp_path / "b")


def test_model_with_other_lora_layout(tiny_checkpoint, saved) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=2, targets=("attn.c_attn",)))
    with pytest.raises(CheckpointError, match="LoRA rank is 4 but the model already has LoRA with rank 2"):
        load_adapter(model, saved)
    same = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, alpha=8, targets=("attn.c_attn",)))
    from gpt2lora import merge_lora

    merge_lora(same)
    with pytest.raises(CheckpointError, match=r"merged.*unmerge_lora"):
        load_adapter(same, saved)


def test_task_mismatch_and_lora_onto_trained_format(clf_checkpoint, tiny_checkpoint, tmp_path) -> None:
    clf = apply_lora(ours("clf", clf_checkpoint), LoRAConfig(rank=2))
    save_adapter(clf, tmp_path / "clf")
    with pytest.raises(CheckpointError, match="task_type is 'SEQ_CLS'"):
        load_adapter(ours("lm", tiny_checkpoint), tmp_path / "clf")
    save_adapter(prepare_model(ours("clf", clf_checkpoint), "head"), tmp_path / "head")
    with pytest.raises(CheckpointError, match="has LoRA layers"):
        load_adapter(apply_lora(ours("clf", clf_checkpoint), LoRAConfig(rank=2)), tmp_path / "head")
    edit_config(tmp_path / "head", method="prefix")
    with pytest.raises(CheckpointError, match="field 'method' is 'prefix'"):
        load_adapter(ours("clf", clf_checkpoint), tmp_path / "head")


def test_nothing_to_save(tiny_checkpoint, tmp_path) -> None:
    model = ours("lm", tiny_checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no LoRA and no trainable tensors"):
        save_adapter(model, tmp_path / "a")


# --- lm_head in peft's layout; split q/k/v and score LoRA in gpt2lora's own format --------------------

def test_lm_head_lora_saves_in_peft_layout_and_loads_in_peft(tiny_checkpoint, tmp_path) -> None:
    config = LoRAConfig(rank=4, alpha=8, targets=("attn.c_attn", "lm_head"))
    model = apply_lora(ours("lm", tiny_checkpoint), config)
    train_a_little(model)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["target_modules"] == ["attn.c_attn", "lm_head"]
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {f"{P}lm_head.lora_A.weight", f"{P}lm_head.lora_B.weight"} <= keys and len(keys) == 2 * 3
    twin = peft.PeftModel.from_pretrained(theirs("lm", tiny_checkpoint), tmp_path / "a").eval()
    ids = tokens()
    expected = logits(model, ids)
    assert (expected - logits(ours("lm", tiny_checkpoint), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(twin, ids), expected, rtol=0, atol=1e-4)


def test_peft_saved_lm_head_lora_loads_in_gpt2lora(tiny_checkpoint, tmp_path) -> None:
    torch.manual_seed(0)
    twin = peft.get_peft_model(theirs("lm", tiny_checkpoint),
                               peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_proj", "lm_head"],
                                               fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    twin.save_pretrained(tmp_path / "peft")
    # peft saves the frozen base of a wrapped lm_head too; gpt2lora checks it is this model's head
    assert f"{P}lm_head.base_layer.weight" in set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    other = ours("lm", tiny_checkpoint)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.01)
    with pytest.raises(CheckpointError, match="lm_head.base_layer.weight .* differs from this model's"):
        load_adapter(other, tmp_path / "peft")
    loaded = load_adapter(ours("lm", tiny_checkpoint), tmp_path / "peft")
    assert loaded.lora_config.targets == ("attn.c_proj", "mlp.c_proj", "lm_head")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = tokens()
    torch.testing.assert_close(logits(loaded, ids), logits(twin.eval(), ids), rtol=0, atol=1e-4)


OWN_FORMAT = {
    "split-lm": ("lm", LoRAConfig(rank=4, alpha=2, targets=("attn.q", "attn.v", "mlp.c_fc", "lm_head"),
                                  style="from_scratch", train_bias="lora_only")),
    "score-clf": ("clf", LoRAConfig(rank=2, alpha=4, targets=("attn.k", "lm_head"))),
    "head-last1": ("lm", LoRAConfig(rank=2, alpha=4, targets=("attn.c_attn", "lm_head"), last_n_blocks=1)),
}


@pytest.mark.parametrize("name", sorted(OWN_FORMAT))
def test_what_peft_cannot_express_round_trips_in_own_format(tiny_checkpoint, clf_checkpoint, tmp_path, name) -> None:
    kind, config = OWN_FORMAT[name]
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    model = apply_lora(ours(kind, checkpoint), config)
    train_a_little(model)
    with pytest.warns(UserWarning, match="wrote gpt2lora's own adapter format"):
        save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "peft_type" not in raw and raw["format"] == "gpt2lora" and raw["method"] == "lora"
    assert tuple(raw["lora"]["targets"]) == config.targets
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trained == set(raw["tensors"])
    fresh = load_adapter(ours(kind, checkpoint), tmp_path / "a")
    assert fresh.lora_config == config
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trained
    ids = tokens()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    load_adapter(fresh, tmp_path / "a")  # onto the same layout again
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_bad_own_format_lora_adapters(tiny_checkpoint, tmp_path) -> None:
    kind, config = OWN_FORMAT["split-lm"]
    model = apply_lora(ours(kind, tiny_checkpoint), config)
    with pytest.warns(UserWarning):
        save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    original = json.loads(path.read_text())

    def load_with(lora=None, onto=None, **changes):
        raw = {**original, **changes}
        if lora is not None:
            raw["lora"] = {**original["lora"], **lora}
        path.write_text(json.dumps(raw))
        return load_adapter(onto if onto is not None else ours(kind, tiny_checkpoint), tmp_path / "a")

    with pytest.raises(CheckpointError, match=r"field 'lora': LoRAConfig\.targets: expected either attn\.c_attn"):
        load_with(lora={"targets": ["attn.c_attn", "attn.q"]})
    with pytest.raises(CheckpointError, match=r"field 'lora' has unknown keys \['ranks'\]"):
        load_with(lora={"ranks": 3})
    path.write_text(json.dumps({**original, "lora": [1]}))
    with pytest.raises(CheckpointError, match="field 'lora' must be an object"):
        load_adapter(ours(kind, tiny_checkpoint), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.h\.0\.attn\.c_attn\.lora_k_A"):
        load_with(lora={"targets": ["attn.q", "attn.k", "attn.v", "mlp.c_fc", "lm_head"]})
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*transformer\.h\.0\.attn\.c_attn\.lora_q_A: "
                                              r"checkpoint \(4, 64\), model \(8, 64\)"):
        load_with(lora={"rank": 8})
    with pytest.raises(CheckpointError, match="task_type is 'SEQ_CLS'"):
        load_with(task_type="SEQ_CLS")
    other = apply_lora(ours(kind, tiny_checkpoint), LoRAConfig(rank=4, alpha=2, targets=("attn.c_attn",)))
    with pytest.raises(CheckpointError, match="already has LoRA with targets"):
        load_with(onto=other)
    fresh = ours(kind, tiny_checkpoint)
    with pytest.raises(CheckpointError):
        load_with(lora={"rank": 8}, onto=fresh)
    assert not list(lora_modules(fresh))  # nothing applied when the check fails
