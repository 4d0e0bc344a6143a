"""Validation and presets of the configuration dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from gpt2lora import ConfigError, GPT2Config
from gpt2lora.config import PRESETS, LoRAConfig, TrainConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_transformers_shapes(name: str) -> None:
    """Each preset has the block count and width transformers' released configs use."""
    shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600), "distilgpt2": (6, 12, 768)}
    config = GPT2Config.from_preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == shapes[name]
    assert config.vocab_size == 50257 and config.n_positions == 1024 and config.inner_dim == 4 * config.n_embd


def test_from_hf_config_reads_transformers_config() -> None:
    hf = transformers.GPT2Config(n_layer=3, n_head=3, n_embd=96, n_positions=40, vocab_size=300,
                                 layer_norm_epsilon=1e-6, n_inner=200, resid_pdrop=0.0).to_dict()
    config = GPT2Config.from_hf_config(hf)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (3, 3, 96, 40)
    assert config.layer_norm_epsilon == 1e-6 and config.inner_dim == 200 and config.resid_pdrop == 0.0
    assert GPT2Config.from_hf_config(config.to_hf_config()) == config


def test_n_inner_null_means_four_times_width() -> None:
    config = GPT2Config.from_hf_config({"n_embd": 64, "n_head": 2, "n_layer": 1, "n_inner": None})
    assert config.inner_dim == 256


@pytest.mark.parametrize("field, value, fragment", [
    ("n_head", 5, "n_head"),
    ("n_layer", 0, "n_layer"),
    ("vocab_size", -3, "vocab_size"),
    ("activation_function", "swish_glu", "activation_function"),
    ("attn_pdrop", 1.0, "attn_pdrop"),
    ("layer_norm_epsilon", 0, "layer_norm_epsilon"),
])
def test_gpt2_config_rejects_bad_fields(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(GPT2Config(), **{field: value})


def test_from_hf_config_names_the_source_and_rejects_unsupported_options() -> None:
    with pytest.raises(ConfigError, match=r"my/config.json: model_type is 'llama'"):
        GPT2Config.from_hf_config({"model_type": "llama"}, source="my/config.json")
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf_config({"scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ConfigError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.from_preset("gpt3")


def test_lora_config_scaling_per_style() -> None:
    assert LoRAConfig(rank=16, alpha=32).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=32, use_rslora=True).scaling == 8.0
    assert LoRAConfig(rank=16, alpha=16, style="from_scratch").scaling == 16.0
    assert LoRAConfig(targets="attn.c_attn").targets == ("attn.c_attn",)
    assert LoRAConfig(last_n_blocks=2).blocks(12) == [10, 11]
    assert LoRAConfig().blocks(3) == [0, 1, 2]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rank": 0}, "rank"),
    ({"alpha": -1}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"targets": ("attn.c_attn", "mlp.gate")}, r"targets: expected names among attn.c_attn"),
    ({"targets": ()}, "targets"),
    ({"last_n_blocks": 0}, "last_n_blocks"),
    ({"train_bias": "some"}, "train_bias"),
    ({"style": "dora"}, "style"),
])
def test_lora_config_rejects_bad_fields(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        LoRAConfig(**kwargs)


def test_last_n_blocks_beyond_the_model_names_its_layer_count() -> None:
    with pytest.raises(ConfigError, match="only 12 blocks"):
        LoRAConfig(last_n_blocks=13).blocks(12)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr": 0}, "lr"),
    ({"lr": 1e-5, "min_lr": 1e-4}, "min_lr"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_ratio": -0.1}, "warmup_ratio"),
    ({"optimizer": "adam8bit"}, "optimizer"),
    ({"schedule": "linear"}, "schedule"),
    ({"grad_clip": 0}, "grad_clip"),
    ({"epochs": 0}, "epochs"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"betas": (0.9,)}, "betas"),
    ({"precision": "fp8"}, "precision"),
])
def test_train_config_rejects_bad_fields(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**kwargs)
