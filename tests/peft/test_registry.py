"""The adapter registry is a model's only adapter state; layers declare their adapter tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import (
    GPT2,
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    PromptConfig,
    add_adapter,
    apply_lora,
    apply_prompt,
    disable_adapters,
    prepare_model,
    set_adapter,
)
from gpt2lora.model.hooks import AdapterRouter
from gpt2lora.peft.layers import lora_modules
from gpt2lora.peft.lora import adapter_parameters
from gpt2lora.peft.registry import AdapterRegistry, adapter_registry

#: What the adapter layer used to set on the user's module; none of it may be state of its own there.
OLD_ATTRIBUTES = ("lora_config", "lora_configs", "active_adapter", "adapter_heads", "adapters_disabled",
                  "lora_routing", "training_method", "training_last_n", "prompt_config")
CONFIG = GPT2Config(**TINY, **NO_DROPOUT)


def lm() -> GPT2:
    return GPT2(CONFIG)


def clf() -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification(CONFIG, num_labels=3)


def two_adapters(model):
    apply_lora(model, LoRAConfig(rank=2, dropout=0.0, targets=("attn.c_attn", "mlp.c_fc")), seed=0)
    add_adapter(model, "b", LoRAConfig(rank=3, dropout=0.0, targets=("attn.c_proj",), last_n_blocks=1), seed=1)
    return model


SETUPS = {
    "apply_lora": lambda: apply_lora(lm(), LoRAConfig(rank=2), seed=0),
    "add_adapter clf": lambda: two_adapters(clf()),
    "add_adapter lm": lambda: two_adapters(lm()),
    "apply_prompt": lambda: apply_prompt(clf(), PromptConfig(num_virtual_tokens=3), seed=0),
    "prepare lora": lambda: prepare_model(lm(), "lora", lora=LoRAConfig(rank=2), seed=0),
    "prepare last_n_full": lambda: prepare_model(clf(), "last_n_full", last_n=1),
    "prepare head": lambda: prepare_model(clf(), "head"),
    "prepare prompt": lambda: prepare_model(lm(), "prompt", prompt=PromptConfig(num_virtual_tokens=2), seed=0),
}


def own_state(model) -> tuple[set[str], set[str], set[str]]:
    return set(vars(model)), set(model._modules), set(model._buffers)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_registry_is_the_only_adapter_state(setup):
    kind = clf if "clf" in setup or setup in ("apply_prompt", "prepare last_n_full", "prepare head") else lm
    before = own_state(kind())
    model = SETUPS[setup]()
    after = own_state(model)
    # One attribute of state (the registry); the heads' and base head's tensors must live in the module tree.
    assert after[0] - before[0] == {"adapter_router"}
    assert after[1] - before[1] <= {"adapter_heads"}
    assert after[2] - before[2] <= {"base_score_weight"}
    assert not set(OLD_ATTRIBUTES) & (after[0] - before[0])
    registry = adapter_registry(model)
    assert isinstance(registry, AdapterRegistry) and model.adapter_router is registry
    protocol = {n for n in vars(AdapterRouter) if not n.startswith("_")} | set(AdapterRouter.__annotations__)
    assert all(hasattr(registry, n) for n in protocol)  # it is the model layer's AdapterRouter
    if "adapter_heads" in model._modules:
        assert model.adapter_heads is registry.heads
    # The model's views are the registry's state, and read-only.
    assert model.lora_config == registry.lora_config and model.lora_configs == registry.configs
    assert model.active_adapter == registry.active_adapter
    assert model.training_method == registry.method and model.training_last_n == registry.last_n
    assert model.prompt_config is registry.prompt_config
    with pytest.raises(AttributeError):
        model.lora_config = LoRAConfig()


def test_views_follow_the_registry():
    model = two_adapters(clf())
    assert model.active_adapter == "default" and set(model.lora_configs) == {"default", "b"}
    set_adapter(model, "b")
    assert model.active_adapter == "b" and model.lora_config == model.lora_configs["b"]
    assert adapter_registry(model).active == "b"
    plain = lm()
    assert plain.lora_config is None and plain.active_adapter is None and plain.lora_configs == {}
    assert plain.training_method is None and "adapter_router" not in vars(plain)
    prepared = prepare_model(lm(), "embeddings")
    assert prepared.training_method == "embeddings" and prepared.lora_config is None


def test_disable_and_mixed_batches_keep_state_in_the_registry():
    model = two_adapters(clf()).eval()
    registry = adapter_registry(model)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    before = own_state(model)
    with disable_adapters(model):
        assert registry.disabled and own_state(model) == before
        base = model(ids)
    assert not registry.disabled
    seen = []
    real_head_logits = registry.head_logits

    def spy(m, pooled):
        seen.append(registry.routing.names if registry.routing is not None else None)
        return real_head_logits(m, pooled)

    registry.head_logits = spy
    mixed = model(ids, adapter_names=["default", "__base__", "b"])
    del registry.head_logits
    assert seen == [["default", "__base__", "b"]] and registry.routing is None and own_state(model) == before
    assert torch.allclose(mixed[1], base[1], atol=1e-6)
    set_adapter(model, "b")
    assert torch.allclose(mixed[2], model(ids)[2], atol=1e-6)


def test_trainable_set_is_what_the_layers_declare():
    model = two_adapters(clf())
    for active in ("default", "b"):
        set_adapter(model, active)
        declared = {f"{layer}.{p}" for layer, m in lora_modules(model) for p in m.adapter_params(active)}
        head = {"score.weight"} if active == "default" else {"adapter_heads.b.weight"}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert declared and trainable == declared | head
        own = {id(p) for p in adapter_parameters(model, active).values()}
        assert own == {id(model.get_parameter(n)) for n in declared | head}
    layer = model.get_submodule("transformer.h.1.attn.c_proj")
    assert layer.adapter_params("b") == ("lora_extra.b.lora_A", "lora_extra.b.lora_B")
    assert layer.adapter_params("default") == () and layer.adapter_params("nope") == ()


def test_a_copy_gets_its_own_registry():
    model = two_adapters(clf())
    twin = copy.deepcopy(model)
    assert adapter_registry(twin) is not adapter_registry(model)
    assert twin.adapter_heads is adapter_registry(twin).heads
    set_adapter(twin, "b")
    assert model.active_adapter == "default" and twin.active_adapter == "b"


@pytest.mark.parametrize("add", [
    lambda m: apply_lora(m, LoRAConfig(rank=80, init="pissa")),
    lambda m: add_adapter(m, "x", LoRAConfig(rank=80, init="pissa")),
    lambda m: prepare_model(m, "last_n_full", last_n=9),
])
def test_a_refused_call_attaches_nothing(add):
    from gpt2lora import ConfigError

    model = lm()
    before = own_state(model)
    with pytest.raises(ConfigError):
        add(model)
    assert own_state(model) == before and adapter_registry(model) is None and not list(lora_modules(model))
