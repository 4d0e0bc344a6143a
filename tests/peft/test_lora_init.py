"""``LoRAConfig(init=...)``: Gaussian, PiSSA (exact and randomized SVD) and OLoRA on GPT-2's Conv1D-loaded weights,
checked against a direct SVD / QR of the (out, in) matrix, peft's PiSSA, and the rank-2r conversion for the
unmodified base in peft and gpt2lora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import TINY, ours
from helpers import hf_twin as hf_model
from helpers import logits_of as logits
from torch import nn

from gpt2lora import (
    ConfigError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    save_pretrained,
)
from gpt2lora.peft.init import initial_factors
from gpt2lora.peft.lora import lora_modules

FUSED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
P = "base_model.model."


def ids(rows: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(2))


def checkpoint_for(kind: str, tiny: Path, clf: Path) -> Path:
    return tiny if kind == "lm" else clf


def train_a_little(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * max(1.0, float(p.abs().mean())))


def conv_weight(hf: nn.Module, name: str) -> torch.Tensor:
    """The (out, in) matrix of a transformers Conv1D layer, which stores it as (in, out)."""
    return hf.get_submodule(name).weight.detach().t()


# --- the definitions --------------------------------------------------------------------------------------

def test_default_init_is_kaiming_and_unknown_names_are_refused() -> None:
    assert LoRAConfig().init == "kaiming"
    for bad in ("svd", "pissa_niter_0", "pissa_niter_x", "PiSSA"):
        with pytest.raises(ConfigError, match=rf"LoRAConfig\.init: expected one of kaiming, gaussian, pissa, "
                                              rf"pissa_niter_N, olora, got '{bad}'"):
            LoRAConfig(init=bad)


def test_gaussian_a_has_std_one_over_rank_and_b_is_zero() -> None:
    layer = LoRALinear(nn.Linear(512, 256), rank=4, alpha=8, init="gaussian",
                       generator=torch.Generator().manual_seed(0))
    assert layer.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_outputs_unchanged_at_initialisation(tiny_checkpoint, clf_checkpoint, kind, init) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    model = ours(kind, checkpoint)
    before = logits(model, ids())
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, init=init, targets=FUSED), seed=0)
    torch.testing.assert_close(logits(model, ids()), before, rtol=0, atol=2e-5)
    for name, module in lora_modules(model):
        assert not torch.allclose(module.weight, weights[name])  # the base holds the residual now
        torch.testing.assert_close(module.weight + module.delta_weight(), weights[name], rtol=0, atol=1e-6)


def test_pissa_factors_are_the_svd_of_the_out_in_matrix_and_equal_peft(tiny_checkpoint) -> None:
    config = LoRAConfig(rank=4, alpha=8, init="pissa", targets=FUSED)
    model = apply_lora(ours("lm", tiny_checkpoint), config)
    hf = hf_model("lm", tiny_checkpoint)
    twin = peft.get_peft_model(hf_model("lm", tiny_checkpoint), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(FUSED), fan_in_fan_out=True, init_lora_weights="pissa",
        task_type="CAUSAL_LM"))
    for name, module in lora_modules(model):
        w = conv_weight(hf, name)  # (out, in), computed here from the transformers Conv1D weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:4] / config.scaling).sqrt()
        torch.testing.assert_close(module.lora_A, root[:, None] * vh[:4], rtol=0, atol=1e-5)
        torch.testing.assert_close(module.lora_B, u[:, :4] * root, rtol=0, atol=1e-5)
        best = (u[:, :4] * s[:4]) @ vh[:4]  # W's best rank-4 approximation
        torch.testing.assert_close(module.delta_weight(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close(module.weight, w - best, rtol=0, atol=1e-5)
        theirs = twin.get_submodule(name)
        torch.testing.assert_close(module.lora_A, theirs.lora_A["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(module.lora_B, theirs.lora_B["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(module.weight, theirs.base_layer.weight.t(), rtol=0, atol=1e-5)


def test_olora_factors_are_the_qr_of_the_out_in_matrix(tiny_checkpoint) -> None:
    """peft's OLoRA factors the stored (in, out) Conv1D matrix instead, so its A does not fit GPT-2's layers."""
    config = LoRAConfig(rank=3, alpha=6, init="olora", targets=FUSED)
    model = apply_lora(ours("lm", tiny_checkpoint), config)
    hf = hf_model("lm", tiny_checkpoint)
    for name, module in lora_modules(model):
        w = conv_weight(hf, name)
        q, r = torch.linalg.qr(w)
        torch.testing.assert_close(module.lora_B, q[:, :3], rtol=0, atol=1e-5)
        torch.testing.assert_close(module.lora_A, r[:3], rtol=0, atol=1e-5)
        assert module.lora_A.shape == (3, w.shape[1])
        torch.testing.assert_close(module.weight, w - config.scaling * q[:, :3] @ r[:3], rtol=0, atol=1e-5)


def test_randomized_pissa_is_seeded_and_close_to_the_exact_one(tiny_checkpoint) -> None:
    first = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, init="pissa_niter_4"), seed=3)
    again = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, init="pissa_niter_4"), seed=3)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # on a layer with a decaying spectrum the randomized SVD finds the exact top-r factors
    g = torch.Generator().manual_seed(0)
    low = torch.randn(96, 6, generator=g) @ torch.diag(torch.tensor([9.0, 7, 5, 3, 1, 0.5])) @ torch.randn(6, 48, generator=g)
    w = low + 1e-3 * torch.randn(96, 48, generator=g)
    exact_a, exact_b, _ = initial_factors("pissa", w, 4, 2.0, "peft")
    fast_a, fast_b, residual = initial_factors("pissa_niter_4", w, 4, 2.0, "peft", torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast_b @ fast_a, exact_b @ exact_a, rtol=0, atol=1e-3)
    torch.testing.assert_close(residual + 2.0 * fast_b @ fast_a, w, rtol=0, atol=1e-5)


def test_qkv_slices_take_their_own_factors(tiny_checkpoint) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=2, init="pissa", targets=("attn.q", "attn.v")))
    hf = hf_model("lm", tiny_checkpoint)
    layer = model.transformer.h[0].attn.c_attn
    w = conv_weight(hf, "transformer.h.0.attn.c_attn")
    for i, part in ((0, "q"), (2, "v")):
        piece = w[64 * i:64 * (i + 1)]
        u, s, vh = torch.linalg.svd(piece, full_matrices=False)
        a, b = layer.pair(part)
        torch.testing.assert_close(layer.scaling * b @ a, (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight[64:128], w[64:128], rtol=0, atol=0)  # the key slice is untouched


# --- saving for the unmodified base --------------------------------------------------------------------------

@pytest.mark.parametrize("name, config", [
    ("pissa", LoRAConfig(rank=4, alpha=8, init="pissa", targets=FUSED)),
    ("olora-rslora", LoRAConfig(rank=2, alpha=3, init="olora", use_rslora=True, targets=("attn.c_attn", "mlp.c_fc"))),
    ("niter-dora", LoRAConfig(rank=3, alpha=6, init="pissa_niter_2", use_dora=True, last_n_blocks=1)),
    ("pissa-scratch", LoRAConfig(rank=2, alpha=0.5, init="pissa", style="from_scratch", targets=("attn.c_proj",))),
])
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_converted_adapter_on_the_original_base(tiny_checkpoint, clf_checkpoint, tmp_path, kind, name, config) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    model = apply_lora(ours(kind, checkpoint), config, seed=0)
    train_a_little(model, 1)
    x = ids()
    trained = logits(model, x)
    assert (trained - logits(ours(kind, checkpoint), x)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["r"] == 2 * config.rank and raw["init_lora_weights"] is True
    expected_alpha = {"pissa": 16, "olora-rslora": 3 * math.sqrt(2), "niter-dora": 12, "pissa-scratch": 0.5 * 4}[name]
    assert raw["lora_alpha"] == pytest.approx(expected_alpha)
    twin = peft.PeftModel.from_pretrained(hf_model(kind, checkpoint), tmp_path / "a").eval()
    torch.testing.assert_close(logits(twin, x), trained, rtol=0, atol=1e-4)
    loaded = load_adapter(ours(kind, checkpoint), tmp_path / "a")
    assert loaded.lora_config.rank == 2 * config.rank and loaded.lora_config.init == "kaiming"
    torch.testing.assert_close(logits(loaded, x), trained, rtol=0, atol=1e-4)


def test_merged_residual_model_exports_the_trained_weights(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, alpha=8, init="pissa", targets=FUSED))
    train_a_little(model, 2)
    x = ids()
    trained = logits(model, x)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(hf, x), trained, rtol=0, atol=1e-4)


def test_peft_pissa_adapter_saved_for_the_residual_base_loads_in_gpt2lora(tiny_checkpoint, tmp_path) -> None:
    """peft writes ``init_lora_weights: "pissa"`` when not converting; loading re-runs the init, as peft does."""
    twin = peft.get_peft_model(hf_model("lm", tiny_checkpoint), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights="pissa",
        task_type="CAUSAL_LM"))
    train_a_little(twin, 3)
    twin.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    loaded = load_adapter(ours("lm", tiny_checkpoint), tmp_path / "peft")
    assert loaded.lora_config.init == "pissa"
    torch.testing.assert_close(logits(loaded, ids()), logits(twin.eval(), ids()), rtol=0, atol=1e-4)


def test_gaussian_adapter_round_trips_through_peft(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(ours("lm", tiny_checkpoint), LoRAConfig(rank=4, init="gaussian"), seed=0)
    train_a_little(model)
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"
    twin = peft.PeftModel.from_pretrained(hf_model("lm", tiny_checkpoint), tmp_path / "a").eval()
    torch.testing.assert_close(logits(twin, ids()), logits(model, ids()), rtol=0, atol=1e-4)
    assert load_adapter(ours("lm", tiny_checkpoint), tmp_path / "a").lora_config.init == "gaussian"


# --- bad input --------------------------------------------------------------------------------------------

def test_rank_above_min_in_out_names_the_layer_and_changes_nothing(tiny_checkpoint) -> None:
    model = ours("lm", tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"LoRAConfig\.init='pissa' needs rank <= min\(out_features, in_features\) "
                                          r"= 64 for transformer\.h\.0\.attn\.c_attn \(192 x 64\), got rank=65"):
        apply_lora(model, LoRAConfig(rank=65, init="pissa"))
    assert not list(lora_modules(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"init='olora' needs rank <= .* = 16 for LoRALinear \(16 x 32\), got rank=17"):
        LoRALinear(nn.Linear(32, 16), rank=17, init="olora")


def test_residual_init_on_the_tied_lm_head_is_refused(tiny_checkpoint) -> None:
    model = ours("lm", tiny_checkpoint)
    with pytest.raises(ConfigError, match=r"LoRAConfig\.init='pissa' on lm_head: the LM head shares its weight"):
        apply_lora(model, LoRAConfig(rank=2, init="pissa", targets=("attn.c_attn", "lm_head")))
    assert not list(lora_modules(model))
