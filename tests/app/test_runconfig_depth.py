"""RunConfig has one rule for LoRA's depth: RunConfig.last_n_blocks, mirrored into lora.last_n_blocks."""

from __future__ import annotations

import pytest

from gpt2lora import ConfigError, LoRAConfig, RunConfig


def test_lora_depth_given_only_in_the_lora_config_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"RunConfig\.lora\.last_n_blocks=2 but RunConfig\.last_n_blocks is None"):
        RunConfig(method="lora", lora=LoRAConfig(last_n_blocks=2))


def test_run_depth_is_mirrored_into_the_lora_config():
    assert RunConfig(method="lora", last_n_blocks=3).lora.last_n_blocks == 3
    assert RunConfig(method="lora", last_n_blocks=3, lora=LoRAConfig(last_n_blocks=3)).lora_config.last_n_blocks == 3
    assert RunConfig(method="full", lora=LoRAConfig(last_n_blocks=2)).lora.last_n_blocks is None  # LoRA unused
