"""Mixed batches with stacked factors kept across forwards (:class:`gpt2lora.peft.mixed.FactorCache`): the same
outputs as stacking them every forward, rebuilt when an adapter changes, and holding no adapter tensor alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import GPT2, GPT2Config, LoRAConfig, add_adapter, delete_adapter, merge_lora, set_adapter
from gpt2lora.errors import ConfigError
from gpt2lora.peft.layers import lora_modules
from gpt2lora.peft.mixed import FactorCache

CONFIG = GPT2Config(**TINY, **NO_DROPOUT)
NAMES = ("a", "b", "c")


def model_with_adapters(dora: bool = False) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(CONFIG).eval()
    for i, name in enumerate(NAMES):
        add_adapter(model, name, LoRAConfig(rank=2 + i, alpha=8, use_dora=dora and i == 1,
                                            targets=("attn.c_attn", "mlp.c_fc", "mlp.c_proj")[: 1 + i]), seed=i)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def mixed(model: GPT2, rows: list[str], factors: FactorCache | None) -> torch.Tensor:
    ids = torch.arange(len(rows) * 5).view(len(rows), 5) % CONFIG.vocab_size
    with torch.inference_mode(), model.adapter_router.route_rows(model, rows, len(rows), factors=factors):
        return model(ids)


def test_kept_factors_give_the_outputs_of_stacking_them_every_forward():
    for dora in (False, True):
        model = model_with_adapters(dora)
        factors = FactorCache()
        for rows in (["a", "b", "c", "__base__"], ["c", "c", "a"], ["a", "b", "c", "__base__"]):
            assert torch.equal(mixed(model, rows, factors), mixed(model, rows, None))
        # 3 layer kinds x 2 blocks; each layer stacks once per adapter set it saw
        builds = factors.builds
        mixed(model, ["b", "a", "c", "__base__"], factors)
        assert factors.builds == builds  # the same set again: nothing rebuilt
        assert factors.nbytes() > 0


def test_changed_or_replaced_adapter_tensors_are_restacked():
    model = model_with_adapters()
    factors = FactorCache()
    rows = ["a", "b", "__base__"]
    before = mixed(model, rows, factors)
    layer = next(m for _, m in lora_modules(model) if "b" in m.slots)
    with torch.no_grad():
        layer.slots["b"].pair()[1].mul_(2.0)  # in place: a new version of lora_B
    after = mixed(model, rows, factors)
    assert not torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert torch.equal(after, mixed(model, rows, None))
    with torch.no_grad():  # a new tensor object (as loading an adapter again gives)
        owner = layer.slots["b"].owner
        owner.lora_B = torch.nn.Parameter(owner.lora_B.detach() * 0.5)
    assert torch.equal(mixed(model, rows, factors), mixed(model, rows, None))


def test_the_cache_holds_no_deleted_adapter_alive():
    model = model_with_adapters()
    factors = FactorCache()
    mixed(model, ["a", "b", "c"], factors)
    refs = [weakref.ref(p) for n, p in model.named_parameters() if "lora_extra.c." in n]
    assert len(refs) >= 6  # A and B (per q/k/v part on c_attn) on three layers of each of the 2 blocks
    delete_adapter(model, "c")
    gc.collect()
    assert all(r() is None for r in refs)  # the cache checks them by weak reference only
    assert factors.nbytes() > 0
    factors.clear()  # what a caller does after deleting adapters: the stacked copies go too
    assert factors.nbytes() == 0
    assert torch.equal(mixed(model, ["a", "b"], factors), mixed(model, ["a", "b"], None))


def test_a_merged_model_is_refused_with_kept_factors_too():
    model = model_with_adapters()
    factors = FactorCache()
    mixed(model, ["a", "b"], factors)  # the cache knows the LoRA layers now
    set_adapter(model, "a")
    merge_lora(model)
    with pytest.raises(ConfigError, match="merged"):
        mixed(model, ["a", "b"], factors)
