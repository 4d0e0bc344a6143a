"""Several adapters on one model: each equals a model with only it, disable gives the base, delete, load by
name, combine; mixed batches equal rows run alone and peft's ``adapter_names`` output; mixed generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import TINY, ours
from helpers import hf_twin as hf_model
from torch import nn

import gpt2lora.peft.mixed
from gpt2lora import (
    GPT2,
    ConfigError,
    GPT2ForSequenceClassification,
    LoRAConfig,
    add_adapter,
    apply_lora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_lora,
    save_adapter,
    set_adapter,
    unmerge_lora,
)
from gpt2lora.peft.lora import adapter_head, lora_modules

P = "base_model.model."
#: Adapters of different rank, alpha, targets, blocks; "b" is a DoRA. All expressible in peft.
PEFT_ADAPTERS = {
    "default": LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("attn.c_attn", "attn.c_proj")),
    "b": LoRAConfig(rank=2, alpha=3, dropout=0.0, targets=("attn.c_attn", "mlp.c_fc"), last_n_blocks=1, use_dora=True),
    "d": LoRAConfig(rank=3, alpha=6, dropout=0.0, targets=("mlp.c_proj",), use_rslora=True),
}
#: One more that peft cannot hold: separate q and v pairs on c_attn, beside "default"'s fused pair.
SPLIT = LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=("attn.q", "attn.v", "mlp.c_fc"))


def padded(rows: int = 8, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of lengths 7, 6, 5, ...; ids from 1 (the checkpoints pad with 0)."""
    ids = torch.randint(1, TINY["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, :row % length] = 0
    return ids.masked_fill(mask == 0, 0), mask


def run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, (GPT2, GPT2ForSequenceClassification)):
            return model(ids, mask, **kwargs)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits


def perturb_adapter(model: nn.Module, name: str, seed: int) -> None:
    """Stand-in for training adapter ``name``: its B, magnitudes and head move off their start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            slot = module.slots.get(name)
            for pname, p in (slot.tensors().items() if slot else ()):
                if pname.endswith("_B"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.08)
                elif pname == "lora_magnitude_vector":
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        head = adapter_head(model, name)
        if head is not None:
            head.weight.add_(torch.randn(head.weight.shape, generator=g) * 0.1)


def multi(kind: str, checkpoint: Path, adapters: dict[str, LoRAConfig]) -> nn.Module:
    model = ours(kind, checkpoint)
    for seed, (name, config) in enumerate(adapters.items()):
        if name == "default":
            apply_lora(model, config, seed=seed)
        else:
            add_adapter(model, name, config, seed=seed)
        perturb_adapter(model, name, seed + 10)
    return model


def alone(kind: str, checkpoint: Path, source: nn.Module, name: str) -> nn.Module:
    """A fresh model with only adapter ``name`` of ``source``, its tensors copied by hand."""
    config = source.lora_configs[name]
    model = apply_lora(ours(kind, checkpoint), config)
    with torch.no_grad():
        for layer, module in lora_modules(source):
            if name in module.slots:
                target = model.get_submodule(layer)
                for pname, tensor in module.slots[name].tensors().items():
                    getattr(target, pname).copy_(tensor)
        head = adapter_head(source, name)
        if head is not None:
            model.score.weight.copy_(head.weight)
    return model


def peft_multi(kind: str, checkpoint: Path, model: nn.Module) -> nn.Module:
    """The same adapters (same tensors) in peft, on transformers' GPT-2."""
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    twin = None
    for name, c in model.lora_configs.items():
        cfg = peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=list(c.targets),
                              fan_in_fan_out=True, use_rslora=c.use_rslora, use_dora=c.use_dora, task_type=task,
                              layers_to_transform=c.blocks(2) if c.last_n_blocks else None,
                              layers_pattern="h" if c.last_n_blocks else None)
        if twin is None:
            twin = peft.get_peft_model(hf_model(kind, checkpoint), cfg, adapter_name=name)
        else:
            twin.add_adapter(name, cfg)
    params = dict(twin.named_parameters())
    names = {"lora_A": "lora_A.{}.weight", "lora_B": "lora_B.{}.weight",
             "lora_magnitude_vector": "lora_magnitude_vector.{}.weight"}
    with torch.no_grad():
        for layer, module in lora_modules(model):
            for name, slot in module.slots.items():
                for pname, tensor in slot.tensors().items():
                    params[f"{P}{layer}.{names[pname].format(name)}"].copy_(tensor)
        if kind == "clf":
            for name in model.lora_configs:
                params[f"{P}score.modules_to_save.{name}.weight"].copy_(adapter_head(model, name).weight)
    return twin.eval()


# --- one adapter at a time -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_each_adapter_equals_a_model_with_only_it(tiny_checkpoint, clf_checkpoint, kind) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    model = multi(kind, checkpoint, {**PEFT_ADAPTERS, "split": SPLIT})
    ids, mask = padded()
    outputs = {}
    for name in model.lora_configs:
        set_adapter(model, name)
        assert model.active_adapter == name and model.lora_config == model.lora_configs[name]
        outputs[name] = run(model, ids, mask)
        torch.testing.assert_close(outputs[name], run(alone(kind, checkpoint, model, name), ids, mask),
                                   rtol=0, atol=1e-5)
    names = list(outputs)
    for i, a in enumerate(names):  # the adapters really differ
        for b in names[i + 1:]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_disable_adapters_gives_the_base_model(tiny_checkpoint, clf_checkpoint, kind) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    model = multi(kind, checkpoint, PEFT_ADAPTERS)
    ids, mask = padded()
    active = run(model, ids, mask)
    with disable_adapters(model):
        torch.testing.assert_close(run(model, ids, mask), run(ours(kind, checkpoint), ids, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, ids, mask), active, rtol=0, atol=0)


def test_only_the_active_adapter_trains(clf_checkpoint) -> None:
    model = multi("clf", clf_checkpoint, PEFT_ADAPTERS)
    set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.1.{t}.lora_extra.b.{p}" for t in ("attn.c_attn", "mlp.c_fc")
                         for p in ("lora_A", "lora_B", "lora_magnitude_vector")} | {"adapter_heads.b.weight"}
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = padded(4)
    nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_delete_adapter_drops_its_tensors_and_unwraps_empty_layers(tiny_checkpoint) -> None:
    model = multi("lm", tiny_checkpoint, PEFT_ADAPTERS)
    ids, mask = padded()
    expected = run(model, ids, mask)
    with pytest.raises(ConfigError, match=r"delete_adapter: 'default' is the active adapter; "
                                          r"set_adapter\(model, 'b'\) first"):
        delete_adapter(model, "default")
    delete_adapter(model, "d")
    assert not any(".d." in k for k in model.state_dict()) and set(model.lora_configs) == {"default", "b"}
    assert type(model.transformer.h[0].mlp.c_proj) is not type(model.transformer.h[0].attn.c_proj)  # unwrapped
    torch.testing.assert_close(run(model, ids, mask), expected, rtol=0, atol=0)
    set_adapter(model, "b")
    delete_adapter(model, "default")
    assert [n for n, _ in lora_modules(model)] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert set(model.state_dict()) == set(ours("lm", tiny_checkpoint).state_dict()) | {
        f"transformer.h.1.{t}.lora_extra.b.{p}" for t in ("attn.c_attn", "mlp.c_fc")
        for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    with pytest.raises(ConfigError, match=r"set_adapter: the model has no adapter 'default'; it has \['b'\]"):
        set_adapter(model, "default")


@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_save_and_load_by_name_in_gpt2lora_and_peft(tiny_checkpoint, clf_checkpoint, tmp_path, kind) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    model = multi(kind, checkpoint, PEFT_ADAPTERS)
    ids, mask = padded()
    fresh = ours(kind, checkpoint)
    for name in PEFT_ADAPTERS:
        save_adapter(model, tmp_path / name, adapter_name=name)
        load_adapter(fresh, tmp_path / name, adapter_name=name)
    assert fresh.active_adapter == "default" and set(fresh.lora_configs) == set(PEFT_ADAPTERS)
    twin = peft.PeftModel.from_pretrained(hf_model(kind, checkpoint), tmp_path / "default")
    for name in PEFT_ADAPTERS:
        if name != "default":
            twin.load_adapter(tmp_path / name, adapter_name=name)
    twin.eval()
    for name in PEFT_ADAPTERS:
        set_adapter(model, name)
        set_adapter(fresh, name)
        twin.set_adapter(name)
        expected = run(model, ids, mask)
        torch.testing.assert_close(run(fresh, ids, mask), expected, rtol=0, atol=1e-5)
        theirs = run(twin, ids, mask)
        if kind == "lm":
            expected, theirs = expected[mask.bool()], theirs[mask.bool()]
        torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4)
    load_adapter(fresh, tmp_path / "b", adapter_name="b")  # again: same layout, values replaced
    with pytest.raises(Exception, match=r"LoRA rank is 2 but the model already has LoRA with rank 3"):
        load_adapter(fresh, tmp_path / "b", adapter_name="d")


# --- mixed batches -----------------------------------------------------------------------------------------

ROWS = ["default", "b", "__base__", "d", "b", "default", "d", "__base__"]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_mixed_batch_equals_rows_alone_and_peft(tiny_checkpoint, clf_checkpoint, kind, dora) -> None:
    """peft 0.21 refuses ``adapter_names`` with a DoRA adapter; the DoRA case is checked against rows alone."""
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    adapters = PEFT_ADAPTERS if dora else {**PEFT_ADAPTERS, "b": dataclasses.replace(PEFT_ADAPTERS["b"], use_dora=False)}
    model = multi(kind, checkpoint, adapters)
    ids, mask = padded()
    mixed = run(model, ids, mask, adapter_names=ROWS)
    for row, name in enumerate(ROWS):
        if name == "__base__":
            with disable_adapters(model):
                alone_row = run(model, ids[row:row + 1], mask[row:row + 1])
        else:
            set_adapter(model, name)
            alone_row = run(model, ids[row:row + 1], mask[row:row + 1])
        keep = mask[row].bool() if kind == "lm" else slice(None)
        torch.testing.assert_close(mixed[row][keep], alone_row[0][keep], rtol=0, atol=1e-5)
    if dora:
        return
    twin = peft_multi(kind, checkpoint, model)
    theirs = run(twin, ids, mask, adapter_names=ROWS)
    if kind == "lm":
        mixed, theirs = mixed[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(theirs, mixed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_mixed_batch_with_split_pairs_and_a_head_lora(tiny_checkpoint, monkeypatch, path) -> None:
    """Both ways a layer computes a mixed batch: masked products of every adapter, or gathered per-row factors."""
    if path == "gather":
        monkeypatch.setattr(gpt2lora.peft.mixed, "DENSE_WIDTH", 0)
    adapters = {**PEFT_ADAPTERS, "split": SPLIT,
                "head": LoRAConfig(rank=2, alpha=2, dropout=0.0, targets=("lm_head", "attn.c_proj"), use_dora=True)}
    model = multi("lm", tiny_checkpoint, adapters)
    names = ["split", "head", "default", "__base__", "split", "b", "head", "d"]
    ids, mask = padded()
    mixed = run(model, ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            expected = run(ours("lm", tiny_checkpoint), ids[row:row + 1], mask[row:row + 1])
        else:
            expected = run(alone("lm", tiny_checkpoint, model, name), ids[row:row + 1], mask[row:row + 1])
        keep = mask[row].bool()
        torch.testing.assert_close(mixed[row][keep], expected[0][keep], rtol=0, atol=1e-5)


def test_mixed_generation_equals_per_row_generation(tiny_checkpoint) -> None:
    model = multi("lm", tiny_checkpoint, {**PEFT_ADAPTERS, "split": SPLIT})
    names = ["split", "b", "__base__", "default", "d", "split"]
    ids, mask = padded(rows=len(names))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, adapter_names=names)
    for row, name in enumerate(names):
        one = (ids[row:row + 1], mask[row:row + 1])
        if name == "__base__":
            with disable_adapters(model):
                expected = model.generate(*one, max_new_tokens=6, eos_token_id=None)
        else:
            set_adapter(model, name)
            expected = model.generate(*one, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(out[row, -6:], expected[0, -6:]), (row, name)
    assert len({tuple(r[-6:].tolist()) for r in out}) > 3  # the adapters steer differently


# --- combining ---------------------------------------------------------------------------------------------

def test_combine_cat_is_the_weighted_sum_of_updates_and_equals_peft(tiny_checkpoint) -> None:
    adapters = {"default": PEFT_ADAPTERS["default"], "e": LoRAConfig(rank=2, alpha=5, dropout=0.0,
                                                                     targets=("attn.c_attn", "mlp.c_fc"))}
    model = multi("lm", tiny_checkpoint, adapters)
    twin = peft_multi("lm", tiny_checkpoint, model)
    weights = {"default": 0.7, "e": -1.5}
    combine_adapters(model, weights, "both", method="cat")
    config = model.lora_configs["both"]
    assert config.rank == 6 and config.scaling == 1.0 and config.targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
    assert model.active_adapter == "default"  # not activated
    for _, layer in lora_modules(model):
        expected = sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.slots)
        torch.testing.assert_close(layer.delta_weight("both"), expected, rtol=0, atol=1e-6)
    twin.add_weighted_adapter(list(weights), list(weights.values()), "both", combination_type="cat")
    for layer, module in lora_modules(model):
        delta = twin.get_submodule(layer).get_delta_weight("both").t()  # peft's is in Conv1D (in, out) orientation
        torch.testing.assert_close(module.delta_weight("both"), delta, rtol=0, atol=1e-6)
    set_adapter(model, "both")
    twin.set_adapter("both")
    ids, mask = padded()
    keep = mask.bool()
    torch.testing.assert_close(run(twin, ids, mask)[keep], run(model, ids, mask)[keep], rtol=0, atol=1e-4)


def test_combine_linear_equals_peft(tiny_checkpoint) -> None:
    adapters = {"default": PEFT_ADAPTERS["default"], "e": LoRAConfig(rank=4, alpha=2, dropout=0.0,
                                                                     targets=("attn.c_attn",))}
    model = multi("lm", tiny_checkpoint, adapters)
    twin = peft_multi("lm", tiny_checkpoint, model)
    combine_adapters(model, {"default": 0.5, "e": 2.0}, "mix", method="linear")
    twin.add_weighted_adapter(["default", "e"], [0.5, 2.0], "mix", combination_type="linear")
    for layer, module in lora_modules(model):
        theirs = twin.get_submodule(layer)
        torch.testing.assert_close(module.delta_weight("mix"), theirs.get_delta_weight("mix").t(), rtol=0, atol=1e-6)


def test_combine_bad_input_names_the_problem(tiny_checkpoint) -> None:
    model = multi("lm", tiny_checkpoint, {"default": PEFT_ADAPTERS["default"], "split": SPLIT, "b": PEFT_ADAPTERS["b"],
                                          "d": PEFT_ADAPTERS["d"]})
    with pytest.raises(ConfigError, match=r"combine_adapters method='cat': adapters \['default', 'split'\] adapt "
                                          r"attn\.c_attn both as one fused pair and as attn\.q/k/v slices"):
        combine_adapters(model, {"default": 1.0, "split": 1.0}, "x", method="cat")
    with pytest.raises(ConfigError, match=r"adapter 'b' uses DoRA"):
        combine_adapters(model, {"default": 1.0, "b": 1.0}, "x")
    with pytest.raises(ConfigError, match=r"method='linear' needs adapters of one rank, got ranks \{'default': 4, 'd': 3\}"):
        combine_adapters(model, {"default": 1.0, "d": 1.0}, "x", method="linear")
    with pytest.raises(ConfigError, match=r"combine_adapters method: expected one of cat, linear, got 'svd'"):
        combine_adapters(model, {"default": 1.0}, "x", method="svd")
    with pytest.raises(ConfigError, match=r"the model has no adapter 'zz'"):
        combine_adapters(model, {"zz": 1.0}, "x")
    assert "x" not in model.lora_configs


# --- bad input ---------------------------------------------------------------------------------------------

def test_adapter_names_bad_input(tiny_checkpoint) -> None:
    model = multi("lm", tiny_checkpoint, PEFT_ADAPTERS)
    ids, mask = padded(3)
    with pytest.raises(ConfigError, match=r"adapter_names has 2 entries but the batch has 3 rows"):
        model(ids, mask, adapter_names=["default", "b"])
    with pytest.raises(ConfigError, match=r"adapter_names: unknown adapter\(s\) \['nope'\]; the model has "
                                          r"\['b', 'd', 'default'\]"):
        model(ids, mask, adapter_names=["default", "nope", "b"])
    with pytest.raises(ConfigError, match=r"adapter_names: expected a list of adapter names, one per row, got 'b'"):
        model(ids, mask, adapter_names="b")
    with pytest.raises(ConfigError, match=r"adapter_names has 1 entries but the batch has 3 rows"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, adapter_names=["b"])
    model.train()
    with pytest.raises(ConfigError, match=r"mixed-adapter batches are for inference; call model\.eval\(\)"):
        model(ids, mask, adapter_names=["b"] * 3)
    model.eval()
    merge_lora(model)
    with pytest.raises(ConfigError, match=r"adapter_names: the model's LoRA is merged"):
        model(ids, mask, adapter_names=["b"] * 3)
    with pytest.raises(ConfigError, match=r"set_adapter: the model's LoRA is merged"):
        set_adapter(model, "b")
    unmerge_lora(model)
    assert model(ids, mask, adapter_names=["b"] * 3).shape == (3, 7, TINY["vocab_size"])


def test_add_adapter_bad_input(tiny_checkpoint, clf_checkpoint) -> None:
    model = multi("lm", tiny_checkpoint, {"default": PEFT_ADAPTERS["default"]})
    with pytest.raises(ConfigError, match=r"add_adapter: the model already has an adapter 'default'"):
        add_adapter(model, "default", PEFT_ADAPTERS["d"])
    with pytest.raises(ConfigError, match=r"add_adapter name: expected a name of letters.*got 'a\.b'"):
        add_adapter(model, "a.b", PEFT_ADAPTERS["d"])
    with pytest.raises(ConfigError, match=r"add_adapter 'p': init='pissa' gives a residual in the base weights"):
        add_adapter(model, "p", LoRAConfig(rank=2, init="pissa"))
    assert set(model.lora_configs) == {"default"} and not any("lora_extra" in k for k in model.state_dict())
    clf = multi("clf", clf_checkpoint, {"default": PEFT_ADAPTERS["default"]})
    with pytest.raises(ConfigError, match=r"every adapter must not target lm_head"):
        add_adapter(clf, "h", LoRAConfig(rank=2, targets=("lm_head",)))


def test_a_first_named_adapter_is_active_and_apply_lora_still_refuses_twice(tiny_checkpoint) -> None:
    model = add_adapter(ours("lm", tiny_checkpoint), "only", PEFT_ADAPTERS["d"], seed=0)
    assert model.active_adapter == "only" and model.lora_config == PEFT_ADAPTERS["d"]
    assert all(".lora_extra.only." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, PEFT_ADAPTERS["default"])


def test_a_merged_named_adapter_exports_with_its_own_head(clf_checkpoint, tmp_path) -> None:
    from gpt2lora import save_pretrained

    model = multi("clf", clf_checkpoint, PEFT_ADAPTERS)
    set_adapter(model, "d")
    ids, mask = padded()
    expected = run(model, ids, mask)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(run(hf, ids, mask), expected, rtol=0, atol=1e-4)
    unmerge_lora(model)
    set_adapter(model, "b")
    delete_adapter(model, "default")  # its trained head goes: score is the base head again
    assert torch.equal(model.score.weight, ours("clf", clf_checkpoint).score.weight)
    set_adapter(model, "d")
    torch.testing.assert_close(run(model, ids, mask), expected, rtol=0, atol=1e-5)
