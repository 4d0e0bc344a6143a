"""LoRALinear, apply_lora, merge / unmerge and parameter counts, checked against transformers + peft."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import CLF_LABELS, TINY
from safetensors import safe_open
from torch import nn

from gpt2lora import GPT2, CheckpointError, ConfigError, GPT2Config, save_pretrained
from gpt2lora.config import LoRAConfig
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.peft.lora import (
    LoRALinear,
    ParameterCount,
    QKVLoRALinear,
    TiedLoRALinear,
    apply_lora,
    count_parameters,
    lora_modules,
    merge_lora,
    unmerge_lora,
)

NUM_LABELS = CLF_LABELS  # the shared clf_checkpoint's


def tokens(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    # ids start at 1: the test checkpoints use 0 as padding, which transformers' pooling looks for
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every lora_B non-zero values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)


def peft_twin(hf_model: nn.Module, model: nn.Module, config: LoRAConfig, task_type: str) -> nn.Module:
    """peft's LoRA on the transformers model with the same config and adapter values as ``model``."""
    blocks = config.blocks(hf_model.config.n_layer)
    lcfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=list(config.targets), fan_in_fan_out=True,
                           use_rslora=config.use_rslora, bias=config.train_bias, task_type=task_type,
                           layers_to_transform=blocks if config.last_n_blocks else None,
                           layers_pattern="h" if config.last_n_blocks else None)
    twin = peft.get_peft_model(hf_model, lcfg)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, module in lora_modules(model):
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(module.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(module.lora_B)
    return twin.eval()


# --- LoRALinear -------------------------------------------------------------------------------------

def test_lora_linear_keeps_base_keys_and_tensors() -> None:
    base = nn.Linear(32, 48)
    layer = LoRALinear(base, rank=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (48, 32), "bias": (48,), "lora_A": (4, 32), "lora_B": (48, 4)}
    assert layer.adapter_params() == ("lora_A", "lora_B")
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_dropout is None  # dropout 0: no module, no call


@pytest.mark.parametrize("style, rank, in_features, alpha, rslora, scaling, bound", [
    ("peft", 4, 256, 8.0, False, 2.0, 1 / 16),
    ("peft", 4, 256, 8.0, True, 4.0, 1 / 16),
    ("from_scratch", 4, 256, 8.0, False, 8.0, 1 / 2),
    ("from_scratch", 16, 64, 2.0, True, 2.0, 1 / 4),  # rsLoRA does not change from_scratch's alpha
])
def test_init_and_scaling_by_style(style, rank, in_features, alpha, rslora, scaling, bound) -> None:
    layer = LoRALinear(nn.Linear(in_features, 8), rank=rank, alpha=alpha, use_rslora=rslora, style=style,
                       generator=torch.Generator().manual_seed(0))
    assert layer.scaling == pytest.approx(scaling)
    assert layer.scaling == pytest.approx(LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora,
                                                     style=style).scaling)
    a = layer.lora_A.abs().max().item()
    # uniform in ±bound: the largest of rank*in draws sits just below the bound
    assert 0.9 * bound < a <= bound


def test_seeded_init_is_reproducible_and_b_starts_at_zero() -> None:
    make = lambda: LoRALinear(nn.Linear(16, 16), 4, 4, generator=torch.Generator().manual_seed(3))
    first, second = make(), make()
    assert torch.equal(first.lora_A, second.lora_A)
    assert torch.count_nonzero(first.lora_B) == 0


def test_dropout_applies_to_lora_input_only() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, alpha=4, dropout=0.5).train()
    x = torch.randn(64, 16)
    # B = 0: the LoRA branch adds nothing, so training-mode dropout must leave the base path untouched
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    outs = [layer(x) for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1])  # dropout active in the branch
    layer.eval()
    expected = base(x) + (x @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_is_explicit_idempotent_and_reversible() -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)  # merge twice == merge once
    torch.testing.assert_close(once, original + layer.lora_B @ layer.lora_A * layer.scaling)
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    layer.train()
    layer.eval()
    assert layer.merged  # train()/eval() never merge or unmerge
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_merges_in_fp32(dtype) -> None:
    """Adapters stay fp32 beside a half base; merged and unmerged outputs agree to the half's precision.

    Measured on this layer (64 -> 192, rank 8, max |s B A| ≈ 0.1, outputs up to ≈ 2.5) over seeds
    0-19: max |merged - unmerged| = 0.0156 in bf16 and 0.00195 in fp16, i.e. one or two units in the
    last place of the output; the tolerances below leave about 3x headroom.
    """
    torch.manual_seed(0)
    base = nn.Linear(64, 192).to(dtype)
    layer = LoRALinear(base, rank=8, alpha=16).eval()
    assert layer.weight.dtype == dtype and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(4, 64, dtype=dtype)
    unmerged = layer(x)
    assert unmerged.dtype == dtype
    exact = (x.double() @ (base.weight.double() + layer.delta_weight().double()).t() + base.bias.double())
    layer.merge()
    merged = layer(x)
    assert layer.weight.dtype == dtype
    tol = {torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    assert (merged.double() - unmerged.double()).abs().max() < tol
    assert (merged.double() - exact).abs().max() < tol and (unmerged.double() - exact).abs().max() < tol


def test_forward_under_autocast() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), rank=4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 32)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# --- apply_lora on models ---------------------------------------------------------------------------

def test_injection_leaves_outputs_exactly_unchanged(tiny_checkpoint) -> None:
    model = GPT2.from_pretrained(tiny_checkpoint).eval()
    ids = tokens()
    before = model(ids)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    assert torch.equal(model(ids), before)


def test_wrapped_names_and_state_dict_keys(tiny_checkpoint) -> None:
    model = GPT2.from_pretrained(tiny_checkpoint)
    plain_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=2, targets=("attn.c_attn", "mlp.c_fc"), last_n_blocks=1))
    assert [name for name, _ in lora_modules(model)] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    keys = set(model.state_dict())
    lora_keys = {f"transformer.h.1.{t}.lora_{m}" for t in ("attn.c_attn", "mlp.c_fc") for m in "AB"}
    assert keys == plain_keys | lora_keys  # base keys unchanged, only lora_A/lora_B added
    assert model.lora_config.last_n_blocks == 1
    assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight  # tie survives


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_set_lm_and_classifier(tiny_checkpoint, clf_checkpoint) -> None:
    lm = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(targets=("attn.c_proj",)))
    assert trainable(lm) == {f"transformer.h.{i}.attn.c_proj.lora_{m}" for i in range(2) for m in "AB"}
    clf = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint),
                     LoRAConfig(targets=("mlp.c_proj",), last_n_blocks=1))
    assert trainable(clf) == {"transformer.h.1.mlp.c_proj.lora_A", "transformer.h.1.mlp.c_proj.lora_B",
                              "score.weight"}
    assert isinstance(clf.score, nn.Linear) and not isinstance(clf.score, LoRALinear)


def test_train_bias_modes(tiny_checkpoint) -> None:
    lora_only = apply_lora(GPT2.from_pretrained(tiny_checkpoint),
                           LoRAConfig(targets=("attn.c_attn",), train_bias="lora_only"))
    biases = {n for n in trainable(lora_only) if n.endswith("bias")}
    assert biases == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
    every = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(targets=("attn.c_attn",), train_bias="all"))
    all_biases = {n for n, _ in every.named_parameters() if n.endswith(".bias")}
    assert {n for n in trainable(every) if not n.endswith(("lora_A", "lora_B"))} == all_biases
    assert "transformer.ln_f.bias" in all_biases


def test_optimizer_step_changes_only_the_trainable_set(clf_checkpoint) -> None:
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint),
                       LoRAConfig(rank=4, alpha=8, dropout=0.1), seed=0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    for _ in range(2):  # two steps: after the first, B != 0 so A gets gradients too
        loss = nn.functional.cross_entropy(model(tokens(4, 6)), torch.tensor([0, 1, 2, 1]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
            assert p.grad is None


def lm_pair(checkpoint: Path, config: LoRAConfig, seed: int = 0):
    model = apply_lora(GPT2.from_pretrained(checkpoint).eval(), config, seed=seed)
    randomize_lora(model, seed)
    hf = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    return model, peft_twin(hf, model, config, "CAUSAL_LM")


@pytest.mark.parametrize("config", [
    LoRAConfig(rank=4, alpha=8),
    LoRAConfig(rank=4, alpha=8, use_rslora=True, targets=("attn.c_attn", "mlp.c_fc")),
    LoRAConfig(rank=2, alpha=3, last_n_blocks=1, targets=("attn.c_proj", "mlp.c_proj")),
], ids=["all-targets", "rslora", "last-block"])
def test_forward_matches_peft(tiny_checkpoint, config) -> None:
    model, twin = lm_pair(tiny_checkpoint, config)
    ids = tokens()
    with torch.no_grad():
        ours, theirs = model(ids), twin(input_ids=ids).logits
        base = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # peft wrapped exactly the layers we wrapped (layers_to_transform == last_n_blocks)
    peft_layers = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                   for n, _ in twin.named_parameters() if n.endswith("lora_A.default.weight")}
    assert peft_layers == {n for n, _ in lora_modules(model)}


def test_classifier_forward_matches_peft(clf_checkpoint) -> None:
    config = LoRAConfig(rank=4, alpha=16, last_n_blocks=1)
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval(), config)
    randomize_lora(model, 1)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval()
    twin = peft_twin(hf, model, config, "SEQ_CLS")
    ids = tokens(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), twin(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_parameter_counts_match_peft(tiny_checkpoint, clf_checkpoint, kind, bias) -> None:
    config = LoRAConfig(rank=4, alpha=8, targets=("attn.c_attn", "mlp.c_proj"), last_n_blocks=1, train_bias=bias)
    if kind == "lm":
        model = GPT2.from_pretrained(tiny_checkpoint)
        hf, task = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint), "CAUSAL_LM"
    else:
        model = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint)
        hf, task = transformers.GPT2ForSequenceClassification.from_pretrained(clf_checkpoint), "SEQ_CLS"
    base_total = count_parameters(model).total
    counts = count_parameters(apply_lora(model, config))
    peft_trainable, peft_total = peft_twin(hf, model, config, task).get_nb_trainable_parameters()
    assert counts.trainable == peft_trainable
    # peft keeps the original head beside its trainable copy (modules_to_save), so it counts it twice
    extra = model.score.weight.numel() if kind == "clf" else 0
    assert counts.total == peft_total - extra
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_modules(model))
    assert counts.total == base_total + lora


def test_count_parameters_counts_tied_head_once_and_formats() -> None:
    model = GPT2.from_config(GPT2Config(**TINY))
    counts = count_parameters(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts.total == sum(unique.values())
    assert counts.total < sum(t.numel() for t in model.state_dict().values())  # lm_head.weight not re-counted
    assert counts.trainable == counts.total and counts.share == 100.0
    assert str(ParameterCount(trainable=147_456, total=124_587_264)) == "147K trainable of 125M (0.12%)"
    assert str(ParameterCount(trainable=46_080, total=124_441_344)) == "46.1K trainable of 124M (0.037%)"


# --- merge / unmerge on models and merged export -----------------------------------------------------

def test_merge_unmerge_model(tiny_checkpoint) -> None:
    model, _ = lm_pair(tiny_checkpoint, LoRAConfig(rank=4, alpha=8))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    ids = tokens()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        merge_lora(model)
        twice = model(ids)
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert torch.equal(twice, merged)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        if name in base:
            torch.testing.assert_close(p.detach(), base[name], rtol=0, atol=1e-6)


def test_merged_export_loads_in_transformers(clf_checkpoint, tmp_path) -> None:
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval(),
                       LoRAConfig(rank=4, alpha=8))
    randomize_lora(model, 5)
    with torch.no_grad():
        model.score.weight.add_(0.1)  # a "trained" head
    ids = tokens(2, 6)
    with torch.no_grad():
        expected = model(ids)
    with pytest.raises(CheckpointError, match="merge_lora"):
        save_pretrained(model, tmp_path / "unmerged")
    save_pretrained(merge_lora(model), tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 192]  # Conv1D layout
    assert not any("lora" in k for k in keys) and "score.weight" in keys
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_merged_lm_export_matches_transformers(tiny_checkpoint, tmp_path) -> None:
    model, _ = lm_pair(tiny_checkpoint, LoRAConfig(rank=4, alpha=8, last_n_blocks=1))
    ids = tokens()
    with torch.no_grad():
        expected = model(ids)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


# --- errors ------------------------------------------------------------------------------------------

def test_applying_twice_is_an_error(tiny_checkpoint) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig())
    with pytest.raises(ConfigError, match=r"already applied.*transformer\.h\.0\.attn\.c_attn"):
        apply_lora(model, LoRAConfig())
    assert len(list(lora_modules(model))) == 8  # 2 blocks x 4 targets, nothing wrapped twice


def test_last_n_blocks_beyond_model_names_the_count(tiny_checkpoint) -> None:
    model = GPT2.from_pretrained(tiny_checkpoint)
    with pytest.raises(ConfigError, match=r"last_n_blocks=5 but the model has only 2 blocks"):
        apply_lora(model, LoRAConfig(last_n_blocks=5))
    assert not list(lora_modules(model))  # nothing half-applied


def test_bad_arguments(tiny_checkpoint) -> None:
    model = GPT2.from_pretrained(tiny_checkpoint)
    with pytest.raises(ConfigError, match="LoRAConfig"):
        apply_lora(model, {"rank": 4})
    with pytest.raises(ConfigError, match="merge_lora: the model has no LoRA layers"):
        merge_lora(model)
    with pytest.raises(ConfigError, match="unmerge_lora"):
        unmerge_lora(model)
    with pytest.raises(ConfigError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), rank=2, alpha=2)
    with pytest.raises(ConfigError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0, alpha=2)
    with pytest.raises(ConfigError, match="transformer.h"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), LoRAConfig())



# --- both conventions on whole models ----------------------------------------------------------------

SPLIT_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Same A and B in ``dst`` as in ``src`` (both with the same targets)."""
    params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, module in lora_modules(src):
            for pname in module.adapter_params():
                params[f"{name}.{pname}"].copy_(getattr(module, pname))


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Random non-zero B (every pair, q/k/v included) so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            for pname in module.adapter_params():
                if pname.endswith("B"):
                    p = getattr(module, pname)
                    p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("targets", [("attn.c_attn", "mlp.c_proj"), SPLIT_TARGETS], ids=["fused", "split+head"])
@pytest.mark.parametrize("rank, alpha", [(4, 2.0), (2, 16.0)])
def test_from_scratch_alpha_equals_peft_alpha_times_rank(tiny_checkpoint, targets, rank, alpha) -> None:
    scratch = apply_lora(GPT2.from_pretrained(tiny_checkpoint).eval(),
                         LoRAConfig(rank=rank, alpha=alpha, style="from_scratch", targets=targets), seed=0)
    randomize_adapters(scratch, 1)
    peft_style = apply_lora(GPT2.from_pretrained(tiny_checkpoint).eval(),
                            LoRAConfig(rank=rank, alpha=alpha * rank, targets=targets), seed=5)
    assert set(scratch.state_dict()) == set(peft_style.state_dict())  # same names, same layout
    copy_adapters(scratch, peft_style)
    ids = tokens()
    with torch.no_grad():
        ours, theirs = scratch(ids), peft_style(ids)
        base = GPT2.from_pretrained(tiny_checkpoint).eval()(ids)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # and the state dict moves between the styles as it is
    moved = apply_lora(GPT2.from_pretrained(tiny_checkpoint).eval(),
                       LoRAConfig(rank=rank, alpha=alpha * rank, targets=targets))
    moved.load_state_dict(scratch.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(moved(ids), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("style, rank, bound", [("peft", 4, 1 / 8), ("from_scratch", 4, 1 / 2),
                                                ("from_scratch", 16, 1 / 4)])
def test_every_a_starts_within_the_style_bound(style, rank, bound) -> None:
    """A within ±1/sqrt(in_features) (in = 64 here) for peft, ±1/sqrt(rank) for from_scratch, q/k/v included."""
    model = apply_lora(GPT2(GPT2Config(**TINY)), LoRAConfig(rank=rank, style=style, targets=SPLIT_TARGETS), seed=0)
    a_tensors = [getattr(m, p) for _, m in lora_modules(model) for p in m.adapter_params() if p.endswith("A")]
    assert len(a_tensors) == 2 * 6 + 1  # per block q, k, v, attn.c_proj, mlp.c_fc, mlp.c_proj; and the head
    for a in a_tensors:
        in_features = a.shape[1]
        limit = bound if style == "from_scratch" else 1 / in_features ** 0.5
        assert a.abs().max() <= limit
        assert a.abs().max() > 0.8 * limit
    for _, m in lora_modules(model):
        for p in m.adapter_params():
            if p.endswith("B"):
                assert torch.count_nonzero(getattr(m, p)) == 0


# --- split q/k/v and the output head -----------------------------------------------------------------

def test_qkv_lora_equals_separate_query_key_value_layers() -> None:
    """A pair per slice of the fused layer == LoRA on separate q, k, v linear layers (from-scratch code)."""
    torch.manual_seed(0)
    fused = nn.Linear(32, 96)
    layer = QKVLoRALinear(fused, ("q", "k", "v"), rank=4, alpha=3, style="from_scratch").eval()
    separate = []
    for i, part in enumerate("qkv"):
        piece = nn.Linear(32, 32)
        with torch.no_grad():
            piece.weight.copy_(fused.weight[32 * i:32 * (i + 1)])
            piece.bias.copy_(fused.bias[32 * i:32 * (i + 1)])
        lora = LoRALinear(piece, rank=4, alpha=3, style="from_scratch").eval()
        a, b = layer.pair(part)
        with torch.no_grad():
            b.normal_()
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        separate.append(lora)
    x = torch.randn(2, 5, 32)
    expected = torch.cat([m(x) for m in separate], dim=-1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.adapter_params() == ("lora_q_A", "lora_q_B", "lora_k_A", "lora_k_B", "lora_v_A", "lora_v_B")
    assert set(layer.state_dict()) == {"weight", "bias", *layer.adapter_params()}


def test_query_value_only_leaves_the_key_slice_alone(tiny_checkpoint) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint).eval(), LoRAConfig(rank=2, targets=("attn.v", "attn.q")))
    wrapped = model.transformer.h[0].attn.c_attn
    assert isinstance(wrapped, QKVLoRALinear) and wrapped.parts == ("q", "v")
    assert [n for n, _ in lora_modules(model)] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    randomize_adapters(model)
    x = torch.randn(3, 64)
    plain = nn.functional.linear(x, wrapped.weight, wrapped.bias)
    out = wrapped(x)
    assert torch.equal(out[:, 64:128], plain[:, 64:128])  # key slice: no adapter
    assert (out[:, :64] - plain[:, :64]).abs().max() > 1e-4 and (out[:, 128:] - plain[:, 128:]).abs().max() > 1e-4
    delta = wrapped.delta_weight()
    assert torch.count_nonzero(delta[64:128]) == 0 and delta.shape == wrapped.weight.shape


def test_fused_and_split_targets_together_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"LoRAConfig\.targets: expected either attn\.c_attn .* not both"):
        LoRAConfig(targets=("attn.c_attn", "attn.k"))
    with pytest.raises(ConfigError, match=r"names among .*attn\.q, attn\.k, attn\.v, lm_head"):
        LoRAConfig(targets=("attn.query",))
    assert LoRAConfig().targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # default unchanged


def test_split_and_head_lora_train_only_adapters_and_never_touch_wte(tiny_checkpoint) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, targets=SPLIT_TARGETS), seed=0)
    assert isinstance(model.lm_head, TiedLoRALinear) and model.lm_head.weight is model.transformer.wte.weight
    assert trainable(model) == {f"{n}.{p}" for n, m in lora_modules(model) for p in m.adapter_params()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(tokens(2, 6))
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens(2, 6, seed=1).flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_split_and_head_merge_unties_and_exports_to_transformers(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint).eval(), LoRAConfig(rank=4, alpha=8, targets=SPLIT_TARGETS))
    randomize_adapters(model, 3)
    wte = model.transformer.wte.weight.detach().clone()
    ids = tokens()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert torch.equal(model.transformer.wte.weight, wte)  # the head LoRA never reaches the embeddings
    assert model.lm_head.weight is not model.transformer.wte.weight
    save_pretrained(model, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and not any("lora" in k for k in keys)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    reloaded = GPT2.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, unmerged, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(ids), unmerged, rtol=0, atol=1e-4)
        torch.testing.assert_close(hf.transformer.wte.weight, wte, rtol=0, atol=0)
    unmerge_lora(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again, to the very same tensor
    with torch.no_grad():
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-5)


def test_head_target_on_classifier_wraps_score_and_freezes_its_base(clf_checkpoint, tmp_path) -> None:
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval(),
                       LoRAConfig(rank=2, alpha=4, targets=("attn.q", "attn.v", "lm_head"), style="from_scratch"))
    assert isinstance(model.score, LoRALinear) and not model.score.weight.requires_grad
    assert {n for n in trainable(model) if n.startswith("score")} == {"score.lora_A", "score.lora_B"}
    randomize_adapters(model, 4)
    ids = tokens(3, 5)
    with torch.no_grad():
        expected = model(ids)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_head_lora_on_an_untied_lm_merges_in_place(tmp_path) -> None:
    model = GPT2(GPT2Config(**TINY, tie_word_embeddings=False)).eval()
    apply_lora(model, LoRAConfig(rank=2, targets=("lm_head",)), seed=0)
    assert type(model.lm_head) is LoRALinear  # not tied: a plain LoRALinear
    assert [n for n, _ in lora_modules(model)] == ["lm_head"]
    randomize_adapters(model)
    head = model.lm_head.weight
    ids = tokens()
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)
    assert model.lm_head.weight is head
