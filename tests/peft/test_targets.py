"""One resolver: apply_lora, both of peft's spellings and peft itself wrap the same modules."""

from __future__ import annotations

import warnings

import peft
import pytest
from helpers import hf_twin as theirs
from helpers import ours

from gpt2lora import CheckpointError, LoRAConfig, apply_lora
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.peft.layers import lora_modules
from gpt2lora.peft.named import combine_adapters
from gpt2lora.peft.targets import (
    candidate_layers,
    covering_selection,
    peft_selection,
    selection_from_modules,
    selection_from_peft,
    target_names,
)

PREFIX = "base_model.model."
#: Configs peft can express on GPT-2 (TINY has 2 blocks).
CONFIGS = {
    "all blocks": LoRAConfig(rank=2, targets=BLOCK_TARGETS),
    "attention last 1": LoRAConfig(rank=2, targets=("attn.c_attn", "attn.c_proj"), last_n_blocks=1),
    "mlp": LoRAConfig(rank=2, targets=("mlp.c_fc",)),
    "head and proj": LoRAConfig(rank=2, targets=("mlp.c_proj", "lm_head")),
    "head only": LoRAConfig(rank=2, targets=("lm_head",)),
}


def peft_wrapped(checkpoint, fields: dict) -> list[str]:
    """The module names peft itself wraps on transformers' GPT-2 for these fields (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(theirs("lm", checkpoint), peft.LoraConfig(r=2, fan_in_fan_out=True, **fields))
    return sorted(name.removeprefix(PREFIX) for name, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_peft_fields_full_names_and_peft_agree(name, tiny_checkpoint):
    config = CONFIGS[name]
    model = ours("lm", tiny_checkpoint)
    names = target_names(model, config)
    n_layer = len(model.transformer.h)
    fields = {k: v for k, v in peft_selection(config, n_layer).items() if v is not None}
    assert sorted(names) == peft_wrapped(tiny_checkpoint, fields)
    # peft's target_modules + layers_to_transform, read back
    targets, last_n = selection_from_peft(fields["target_modules"], fields.get("layers_to_transform"),
                                          fields.get("layers_pattern"), n_layer)
    assert target_names(model, LoRAConfig(rank=2, targets=targets, last_n_blocks=last_n)) == names
    # the full module names (tensor keys, or target_modules written out in full)
    targets2, last_n2 = selection_from_modules(names, n_layer)
    assert target_names(model, LoRAConfig(rank=2, targets=targets2, last_n_blocks=last_n2)) == names
    if "lm_head" not in names:  # peft's layers_to_transform drops lm_head, so full names of blocks only
        full = selection_from_peft(list(names), None, None, n_layer)
        assert full == (targets2, last_n2)
        assert sorted(names) == peft_wrapped(tiny_checkpoint, {"target_modules": list(names)})
    # and apply_lora wraps exactly those
    apply_lora(model, config)
    assert [layer for layer, _ in lora_modules(model)] == names


def test_what_peft_can_hold_and_what_it_cannot(tiny_checkpoint):
    assert selection_from_peft("all-linear", None, None, 2) == (BLOCK_TARGETS, None)
    assert selection_from_peft(r".*\.h\.1\.mlp\.c_fc", None, None, 2) == (("mlp.c_fc",), 1)
    with pytest.raises(CheckpointError, match=r"blocks \[0\] .* gpt2lora cannot express"):
        selection_from_modules(["transformer.h.0.attn.c_attn"], 2, source="adapter_config.json")
    with pytest.raises(CheckpointError, match="adapter_config.json: module 'transformer.h.7.attn.c_attn'"):
        selection_from_modules(["transformer.h.7.attn.c_attn"], 2, source="adapter_config.json")
    with pytest.raises(CheckpointError, match="layers_to_transform names blocks \\[5\\]"):
        selection_from_peft(["c_attn"], [5], "h", 2)
    model = ours("lm", tiny_checkpoint)
    assert candidate_layers(model)[-1] == "lm_head" and len(candidate_layers(model)) == 2 * 4 + 1


def test_combine_covers_every_layer_of_its_sources(tiny_checkpoint):
    from gpt2lora import add_adapter

    a = LoRAConfig(rank=2, dropout=0.0, targets=("attn.c_attn",), last_n_blocks=1)
    b = LoRAConfig(rank=3, dropout=0.0, targets=("mlp.c_fc",))
    assert covering_selection([a, b]) == (("attn.c_attn", "mlp.c_fc"), None)
    assert covering_selection([a, LoRAConfig(targets=("mlp.c_fc",), last_n_blocks=2)]) == \
        (("attn.c_attn", "mlp.c_fc"), 2)
    model = ours("lm", tiny_checkpoint)
    apply_lora(model, a)
    add_adapter(model, "b", b)
    combine_adapters(model, {"default": 1.0, "b": 0.5}, "both")
    on = {layer for layer, m in lora_modules(model) if "both" in m.slots}
    targets, last_n = covering_selection([a, b])
    assert on == set(target_names(model, LoRAConfig(targets=targets, last_n_blocks=last_n)))
    assert on > set(target_names(model, a)) | set(target_names(model, b))  # zeros where a source lacks a layer
    assert "transformer.h.0.attn.c_attn" in on


def test_peft_adapter_with_full_module_names_loads(tiny_checkpoint, tmp_path):
    import torch
    from helpers import logits_of

    from gpt2lora import load_adapter

    full = ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(theirs("lm", tiny_checkpoint),
                                   peft.LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=full))
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    twin.save_pretrained(tmp_path)
    model = load_adapter(ours("lm", tiny_checkpoint), tmp_path)
    assert [layer for layer, _ in lora_modules(model)] == full
    assert model.lora_config.targets == ("attn.c_attn", "mlp.c_fc") and model.lora_config.last_n_blocks == 1
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(model, ids), logits_of(twin.eval(), ids), atol=1e-5, rtol=1e-5)
