"""DoRA (``LoRAConfig(use_dora=True)``) against peft 0.21's DoRA on transformers' GPT-2 (Conv1D layers)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from helpers import TINY, ours
from helpers import hf_twin as hf_model
from safetensors.torch import load_file
from torch import nn

from gpt2lora import (
    GPT2,
    ConfigError,
    GPT2ForSequenceClassification,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    save_pretrained,
    unmerge_lora,
)
from gpt2lora.peft.lora import lora_modules

P = "base_model.model."
FUSED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc")


def batch(side: str, rows: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (from 1: the checkpoints pad with 0) and a mask with rows of lengths 7, 5, 3 padded on ``side``."""
    ids = torch.randint(1, TINY["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(1, rows):
        if side == "right":
            mask[row, length - 2 * row:] = 0
        else:
            mask[row, :2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits_of(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a gpt2lora or a transformers/peft model; the latter get positions counted over real tokens,
    as gpt2lora counts them (transformers would count a left-padded row's padding too)."""
    with torch.no_grad():
        if isinstance(model, (GPT2, GPT2ForSequenceClassification)):
            return model(ids, mask)
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: non-zero B, magnitudes off the row norms, a changed head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.1 if "magnitude" in name else 0.05
                p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() if "magnitude" in name else 1))


def peft_dora(hf: nn.Module, model: nn.Module, config: LoRAConfig, task: str) -> nn.Module:
    """peft's DoRA on the transformers model with the same A, B, magnitudes (and head) as ``model``."""
    blocks = config.blocks(hf.config.n_layer)
    alpha = config.alpha * config.rank if config.style == "from_scratch" else config.alpha
    twin = peft.get_peft_model(hf, peft.LoraConfig(
        r=config.rank, lora_alpha=alpha, lora_dropout=config.dropout, target_modules=list(config.targets),
        fan_in_fan_out=True, use_dora=True, task_type=task,
        use_rslora=config.use_rslora and config.style != "from_scratch",
        layers_to_transform=blocks if config.last_n_blocks else None,
        layers_pattern="h" if config.last_n_blocks else None))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, module in lora_modules(model):
            params[f"{P}{name}.lora_A.default.weight"].copy_(module.lora_A)
            params[f"{P}{name}.lora_B.default.weight"].copy_(module.lora_B)
            params[f"{P}{name}.lora_magnitude_vector.default.weight"].copy_(module.lora_magnitude_vector)
        if task == "SEQ_CLS":
            params[f"{P}score.modules_to_save.default.weight"].copy_(model.score.weight)
    return twin.eval()


# --- the layer ------------------------------------------------------------------------------------------

def test_magnitude_starts_at_the_norm_over_input_features_of_each_output(tiny_checkpoint) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, use_dora=True, targets=FUSED))
    hf = hf_model("lm", tiny_checkpoint)
    twin = peft.get_peft_model(hf_model("lm", tiny_checkpoint), peft.LoraConfig(
        r=4, target_modules=list(FUSED), fan_in_fan_out=True, use_dora=True, task_type="CAUSAL_LM"))
    for name, module in lora_modules(model):
        conv = hf.get_submodule(name).weight  # Conv1D: (in, out)
        assert module.lora_magnitude_vector.shape == (conv.shape[1],)
        torch.testing.assert_close(module.lora_magnitude_vector.detach(), conv.norm(dim=0), rtol=1e-6, atol=0)
        theirs = twin.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(module.lora_magnitude_vector.detach(), theirs.detach(), rtol=1e-6, atol=0)
    assert module.adapter_params() == ("lora_A", "lora_B", "lora_magnitude_vector")


def test_fresh_dora_changes_nothing_and_trains_magnitude(tiny_checkpoint) -> None:
    model = ours("lm", tiny_checkpoint)
    ids, mask = batch("right")
    before = logits_of(model, ids, mask)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, use_dora=True, targets=FUSED), seed=0)
    torch.testing.assert_close(logits_of(model, ids, mask), before, rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.{t}.{p}" for i in range(2) for t in FUSED
                         for p in ("lora_A", "lora_B", "lora_magnitude_vector")}


def test_dora_layer_formula_and_gradients() -> None:
    """y = m / ||W + sBA|| (x (W + sBA)^T) + b, with no gradient through the norm (DoRA section 4.3)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 9), rank=3, alpha=6, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(9) + 0.5)
    x = torch.randn(2, 4, 12)
    got = layer(x)
    merged = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    norm = merged.norm(dim=1).detach()
    expected = (layer.lora_magnitude_vector / norm) * (x @ merged.t()) + layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    wrt = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(expected, wrt, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- outputs against peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_dora_outputs_equal_peft(tiny_checkpoint, clf_checkpoint, kind, side) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    config = LoRAConfig(rank=4, alpha=8, use_dora=True, targets=FUSED)
    model = apply_lora(ours(kind, checkpoint), config, seed=1)
    perturb(model)
    twin = peft_dora(hf_model(kind, checkpoint), model, config, "CAUSAL_LM" if kind == "lm" else "SEQ_CLS")
    ids, mask = batch(side)
    expected = logits_of(model, ids, mask)
    base = logits_of(hf_model(kind, checkpoint), ids, mask)
    assert (expected - base).abs().max() > 1e-2  # the adapter (and its magnitudes) matter
    got = logits_of(twin, ids, mask)
    if kind == "lm":  # compare real positions only: padded ones are undefined in both
        keep = mask.bool()
        expected, got = expected[keep], got[keep]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [
    LoRAConfig(rank=2, alpha=3, use_dora=True, last_n_blocks=1, targets=("attn.c_attn", "mlp.c_proj")),
    LoRAConfig(rank=4, alpha=1.5, use_dora=True, style="from_scratch", targets=("attn.c_proj", "mlp.c_fc")),
    LoRAConfig(rank=4, alpha=8, use_dora=True, use_rslora=True, targets=("attn.c_attn", "lm_head")),
], ids=["last-block", "from-scratch", "rslora-lm-head"])
def test_dora_variants_equal_peft(tiny_checkpoint, config) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), config, seed=2)
    perturb(model, 3)
    twin = peft_dora(hf_model("lm", tiny_checkpoint), model, config, "CAUSAL_LM")
    ids = batch("right")[0][:1]  # one unpadded row
    torch.testing.assert_close(logits_of(twin, ids), logits_of(model, ids), rtol=0, atol=1e-4)


def test_split_qkv_targets_are_not_dora_targets() -> None:
    with pytest.raises(ConfigError, match=r"LoRAConfig\.use_dora: expected targets DoRA can wrap.*\['attn\.q'\]"):
        LoRAConfig(use_dora=True, targets=("attn.q", "mlp.c_fc"))


# --- files both ways --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_gpt2lora_dora_adapter_loads_in_peft(tiny_checkpoint, clf_checkpoint, tmp_path, kind) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    config = LoRAConfig(rank=4, alpha=8, use_dora=True, targets=FUSED, last_n_blocks=1 if kind == "clf" else None)
    model = apply_lora(ours(kind, checkpoint), config, seed=0)
    perturb(model)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["use_dora"] is True
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert f"{P}transformer.h.1.attn.c_attn.lora_magnitude_vector" in keys
    twin = peft.PeftModel.from_pretrained(hf_model(kind, checkpoint), tmp_path / "a").eval()
    ids, mask = batch("left")
    ours_logits, theirs = logits_of(model, ids, mask), logits_of(twin, ids, mask)
    if kind == "lm":
        ours_logits, theirs = ours_logits[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(theirs, ours_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_peft_dora_adapter_loads_in_gpt2lora(tiny_checkpoint, clf_checkpoint, tmp_path, kind) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    twin = peft.get_peft_model(hf_model(kind, checkpoint), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=True,
        task_type=task))
    perturb(twin, 4)
    twin.save_pretrained(tmp_path / "peft")
    model = load_adapter(ours(kind, checkpoint), tmp_path / "peft")
    assert model.lora_config.use_dora and model.lora_config.rank == 3
    ids, mask = batch("right")
    expected, got = logits_of(twin.eval(), ids, mask), logits_of(model, ids, mask)
    if kind == "lm":
        expected, got = expected[mask.bool()], got[mask.bool()]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # and the round trip through gpt2lora's own writer gives the same tensors back
    save_adapter(model, tmp_path / "again")
    again, first = load_file(tmp_path / "again" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(again) == set(first)
    for key, value in first.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


# --- merge -----------------------------------------------------------------------------------------------

def test_dora_merge_is_exact_idempotent_and_unmerge_restores(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, alpha=8, use_dora=True,
                                                                targets=(*FUSED, "mlp.c_proj", "lm_head")))
    perturb(model, 5)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids, mask = batch("left")
    unmerged = logits_of(model, ids, mask)
    merge_lora(model)
    merged = logits_of(model, ids, mask)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)  # twice == once
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert model.lm_head.weight is not model.transformer.wte.weight  # the head DoRA unties it while merged
    save_pretrained(model, tmp_path / "merged")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(hf, ids, mask)[mask.bool()], unmerged[mask.bool()], rtol=0, atol=1e-4)
    unmerge_lora(model)
    unmerge_lora(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        if name in base:
            torch.testing.assert_close(p.detach(), base[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, ids, mask), unmerged, rtol=0, atol=1e-5)


# --- training ----------------------------------------------------------------------------------------------

def _lora_dropout_only(model: nn.Module, kind: str) -> None:
    """Eval mode everywhere but the LoRA dropouts, so both models draw the same masks in the same order."""
    model.eval()
    for module in model.modules():
        if kind == "ours" and isinstance(module, LoRALinear):
            module.train()
        if kind == "peft" and isinstance(module, peft.tuners.lora.LoraLayer):
            module.train()


def _loss(model: nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(ids, mask) if isinstance(model, (GPT2, GPT2ForSequenceClassification)) else \
        model(input_ids=ids, attention_mask=mask).logits
    if kind == "clf":
        return nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 1]))
    return nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# The classifier runs its last block's MLP on the pooled rows only, so its dropout masks have other shapes
# than transformers' and the dropout case compares the language model (every position in both).
@pytest.mark.parametrize("kind, dropout", [("clf", 0.0), ("lm", 0.2)])
def test_dora_training_trajectory_equals_peft(tiny_checkpoint, clf_checkpoint, kind, dropout) -> None:
    checkpoint = tiny_checkpoint if kind == "lm" else clf_checkpoint
    config = LoRAConfig(rank=4, alpha=8, dropout=dropout, use_dora=True, targets=(*FUSED, "mlp.c_proj"))
    model = apply_lora(ours(kind, checkpoint), config, seed=0)
    with torch.no_grad():  # start from a non-zero B so every tensor gets gradients from the first step
        for _, m in lora_modules(model):
            m.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(7))
    twin = peft_dora(hf_model(kind, checkpoint), model, config, "CAUSAL_LM" if kind == "lm" else "SEQ_CLS")
    _lora_dropout_only(model, "ours")
    _lora_dropout_only(twin, "peft")
    mine = [p for _, p in model.named_parameters() if p.requires_grad]
    theirs = [p for _, p in twin.named_parameters() if p.requires_grad]
    assert len(mine) == len(theirs)
    opt_a = torch.optim.AdamW(mine, lr=1e-2, weight_decay=0.0)
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(1, TINY["vocab_size"], (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    losses = []
    for step in range(4):
        torch.manual_seed(100 + step)
        loss_a = _loss(model, kind, ids, mask)
        torch.manual_seed(100 + step)
        loss_b = _loss(twin, kind, ids, mask)
        torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-5)
        losses.append(float(loss_a))
        for opt, loss in ((opt_a, loss_a), (opt_b, loss_b)):
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert losses[-1] < losses[0]  # it trained
    params = dict(twin.named_parameters())
    for name, module in lora_modules(model):
        for ours_name, peft_name in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                                     ("lora_magnitude_vector", "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(getattr(module, ours_name), params[f"{P}{name}.{peft_name}"],
                                       rtol=0, atol=1e-5)


def test_dora_on_a_classifier_head_round_trips_in_own_format(clf_checkpoint, tmp_path) -> None:
    """LoRA on ``score`` is not expressible in peft; a DoRA there keeps its magnitudes in gpt2lora's format."""
    config = LoRAConfig(rank=2, alpha=4, use_dora=True, targets=("attn.c_attn", "lm_head"))
    model = apply_lora(ours("clf", clf_checkpoint), config)
    perturb(model, 6)
    with pytest.warns(UserWarning, match="own adapter format"):
        save_adapter(model, tmp_path / "a")
    assert "score.lora_magnitude_vector" in set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    loaded = load_adapter(ours("clf", clf_checkpoint), tmp_path / "a")
    assert loaded.lora_config == config
    ids, mask = batch("left")
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(model, ids, mask), rtol=0, atol=0)


def test_dora_with_a_half_precision_base_and_under_autocast() -> None:
    torch.manual_seed(0)
    reference = LoRALinear(nn.Linear(64, 96), rank=4, alpha=8, use_dora=True)
    with torch.no_grad():
        reference.lora_B.normal_(std=0.1)
        reference.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(3, 64)
    expected = reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = reference(x)
    assert cast.dtype == torch.bfloat16
    torch.testing.assert_close(cast.float(), expected, rtol=0.05, atol=0.05)
    half = LoRALinear(nn.Linear(64, 96).to(torch.bfloat16), rank=4, alpha=8, use_dora=True)
    assert half.lora_magnitude_vector.dtype == torch.float32
    with torch.no_grad():
        half.weight.copy_(reference.weight)
        half.bias.copy_(reference.bias)
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(half, name).copy_(getattr(reference, name))
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
