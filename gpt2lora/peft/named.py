"""Several LoRA adapters on one base model: add, switch, disable, delete, combine, and mixed batches.

The unnamed adapter of :func:`gpt2lora.apply_lora` / :func:`gpt2lora.load_adapter` is ``"default"``, as in
peft, and single-adapter code never needs a name. More adapters may differ in rank, alpha, targets, blocks
and DoRA; each wrapped layer holds one :class:`~gpt2lora.peft.slots.Slot` per adapter that targets it. Exactly one
adapter is active (it is what the forward applies and the only one that trains); ``disable_adapters`` gives
the base model; a mixed batch (``forward(..., adapter_names=[...])``) applies a different adapter per row in
one pass, each layer gathering its rows' factors (see :class:`~gpt2lora.peft.mixed.RowRouting`). The
names, configs, the active adapter and the heads are kept by the model's
:class:`~gpt2lora.peft.registry.AdapterRegistry`.

On a classifier every adapter trains its own copy of the head (peft's ``modules_to_save``), started from the
base model's head; the copies of adapters other than ``default`` are the registry's ``heads`` (keys
``adapter_heads.<name>.``), and the
row's adapter picks the head in a mixed batch too. PiSSA / OLoRA adapters rewrite the base weights, so they
cannot share a model with other adapters (save one, which converts it, and load it onto a fresh model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..config import HEAD_TARGET, QKV_TARGETS, LoRAConfig, is_residual_init
from ..errors import ConfigError
from ..model.classifier import is_classifier
from .layers import lora_modules
from .lora import adapter_configs, add_to_layers, apply_lora, keep_base_head, set_lora_trainable
from .prompt import get_prompt
from .registry import adapter_registry, attach_registry, require_adapters, require_unmerged, score_has_lora
from .slots import DEFAULT_ADAPTER, HEAD_NAME, check_adapter_name
from .targets import covering_selection

COMBINE_METHODS = ("cat", "linear")


def _known(model: nn.Module, name: str, verb: str) -> LoRAConfig:
    return require_adapters(model, verb).known(name, verb)


def add_adapter(model: nn.Module, name: str, config: LoRAConfig, seed: int | None = None) -> nn.Module:
    """Add adapter ``name`` (not active unless it is the model's first adapter) and return ``model``.

    It wraps the layers ``config`` names (layers already wrapped get one more slot). On a classifier it gets
    its own head, a copy of the base model's head. The trainable set stays the active adapter's.
    """
    check_adapter_name(name, "add_adapter name")
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"add_adapter: config must be a LoRAConfig, got {type(config).__name__}")
    configs = adapter_configs(model)
    if not configs:
        if name == DEFAULT_ADAPTER:
            return apply_lora(model, config, seed=seed)
        if get_prompt(model) is not None:
            raise ConfigError("add_adapter: the model has a soft prompt (transformer.prompt); LoRA adapters need "
                              "a model without one")
    if name in configs:
        raise ConfigError(f"add_adapter: the model already has an adapter {name!r}; delete_adapter it first or "
                          "choose another name")
    require_unmerged(model, "add_adapter")
    residual = next((n for n, c in configs.items() if is_residual_init(c.init)), None)
    if configs and (residual is not None or is_residual_init(config.init)):
        who = f"adapter {residual!r} has" if residual is not None else f"init={config.init!r} gives"
        raise ConfigError(f"add_adapter {name!r}: {who} a residual in the base weights (PiSSA / OLoRA), which "
                          "other adapters would see as their base; save_adapter converts such an adapter to "
                          "plain LoRA, so load it onto a fresh model instead")
    if is_classifier(model) and configs:
        theirs = HEAD_TARGET in next(iter(configs.values())).targets
        if (HEAD_TARGET in config.targets) != theirs:
            raise ConfigError(f"add_adapter {name!r}: on a classifier every adapter must {'' if theirs else 'not '}"
                              "target lm_head like the others (LoRA on score versus a trained copy of it)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    add_to_layers(model, name, config, generator)  # checks everything before changing anything
    keep_base_head(model)
    registry = attach_registry(model)
    if is_classifier(model) and not score_has_lora(model):
        head = copy.deepcopy(model.get_submodule(HEAD_NAME))
        with torch.no_grad():
            head.weight.copy_(model.base_score_weight)
        registry.add_head(model, name, head)
    registry.configs[name] = config
    if not configs:
        _activate(model, name)
    else:
        set_lora_trainable(model, registry.lora_config.train_bias)
    return model


def _activate(model: nn.Module, name: str) -> None:
    registry = attach_registry(model)
    registry.activate(model, name)
    set_lora_trainable(model, registry.configs[name].train_bias)


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one: the forward applies it and only its tensors (and head) train."""
    _known(model, name, "set_adapter")
    require_unmerged(model, "set_adapter")
    _activate(model, name)
    return model


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None without LoRA)."""
    registry = adapter_registry(model)
    return registry.active_adapter if registry is not None else None


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (not the active one) and its tensors; layers left without adapters are unwrapped."""
    _known(model, name, "delete_adapter")
    registry = attach_registry(model)
    if name == registry.active:
        others = sorted(n for n in adapter_configs(model) if n != name)
        hint = f"set_adapter(model, {others[0]!r}) first" if others else "load a fresh model to drop LoRA entirely"
        raise ConfigError(f"delete_adapter: {name!r} is the active adapter; {hint}")
    require_unmerged(model, "delete_adapter")
    for layer, module in list(lora_modules(model)):
        if name not in module.slots:
            continue
        module.remove_slot(name)
        if not module.slots:  # nothing left on this layer: put the plain layer back
            parent_name, _, child = layer.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    registry.remove_head(name)
    if name == DEFAULT_ADAPTER and is_classifier(model) and not score_has_lora(model):
        with torch.no_grad():  # the default adapter's trained head goes; score is the base head again
            model.get_submodule(HEAD_NAME).weight.copy_(model.base_score_weight)
    del registry.configs[name]
    set_lora_trainable(model, registry.lora_config.train_bias)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context the model computes the base model's outputs (every adapter off, base heads)."""
    registry = require_adapters(model, "disable_adapters")
    require_unmerged(model, "disable_adapters")
    residual = registry.residual_adapter()
    if residual is not None:
        raise ConfigError(f"disable_adapters: adapter {residual!r} (init "
                          f"{registry.configs[residual].init!r}) left a residual in the base weights, so "
                          "turning it off would not give the base model; load the base model for that")
    modules = [m for _, m in lora_modules(model)]
    previous = [m.disabled for m in modules], registry.disabled
    for module in modules:
        module.disabled = True
    registry.disabled = True
    try:
        yield model
    finally:
        for module, state in zip(modules, previous[0], strict=True):
            module.disabled = state
        registry.disabled = previous[1]


# --- combining ---------------------------------------------------------------------------------------------

def _qkv_kind(config: LoRAConfig) -> str | None:
    if any(t in QKV_TARGETS for t in config.targets):
        return "split"
    return "fused" if "attn.c_attn" in config.targets else None


def combine_adapters(model: nn.Module, weights: Mapping[str, float], new_name: str,
                     method: str = "cat") -> nn.Module:
    """Add adapter ``new_name`` from a weighted combination of existing adapters (peft's ``add_weighted_adapter``).

    ``cat`` (exact): the factors are stacked, ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1 | B_2 | ...]``
    with scaling 1, so ``B A = Σ w_i s_i B_i A_i`` on every layer (layers an adapter lacks get zeros there);
    the rank is the sum of the ranks. ``linear`` (same ranks only, not exact): ``A = Σ √(w_i s_i) A_i``,
    ``B = Σ √(w_i s_i) B_i``. The new adapter is not activated; on a classifier its head is a copy of the
    first adapter's head (heads do not add up like low-rank updates).
    """
    check_adapter_name(new_name, "combine_adapters new_name")
    if method not in COMBINE_METHODS:
        raise ConfigError(f"combine_adapters method: expected one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"combine_adapters weights: expected a non-empty mapping of adapter name to weight, "
                          f"got {weights!r}")
    configs = {name: _known(model, name, "combine_adapters") for name in weights}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"combine_adapters weights[{name!r}]: expected a finite number, got {weight!r}")
    if new_name in adapter_configs(model):
        raise ConfigError(f"combine_adapters: the model already has an adapter {new_name!r}")
    for name, config in configs.items():
        if config.use_dora or is_residual_init(config.init):
            what = "DoRA (its magnitudes rescale W + ΔW)" if config.use_dora else f"init {config.init!r}"
            raise ConfigError(f"combine_adapters: adapter {name!r} uses {what}, which is not a low-rank update "
                              "that adds up; combine plain LoRA adapters")
    kinds = {name: _qkv_kind(c) for name, c in configs.items() if _qkv_kind(c) is not None}
    if len(set(kinds.values())) > 1:
        raise ConfigError(f"combine_adapters method={method!r}: adapters {sorted(kinds)} adapt attn.c_attn both "
                          f"as one fused pair and as attn.q/k/v slices ({kinds}); one adapter cannot hold both")
    ranks = {name: c.rank for name, c in configs.items()}
    if method == "linear":
        if len(set(ranks.values())) > 1:
            raise ConfigError(f"combine_adapters method='linear' needs adapters of one rank, got ranks {ranks}; "
                              "use method='cat'")
        negative = {n: w for n, w in weights.items() if w * configs[n].scaling < 0}
        if negative:
            raise ConfigError(f"combine_adapters method='linear' takes square roots of weight x scaling, which "
                              f"are negative for {negative}; use method='cat'")
    first = next(iter(configs.values()))
    targets, last_n = covering_selection(configs.values())
    rank = sum(ranks.values()) if method == "cat" else first.rank
    new = LoRAConfig(rank=rank, alpha=float(rank), dropout=first.dropout, targets=targets, last_n_blocks=last_n)
    add_adapter(model, new_name, new)
    offsets, start = {}, 0
    for name in configs:
        offsets[name] = start
        start += ranks[name]
    with torch.no_grad():
        for _, module in lora_modules(model):
            if new_name not in module.slots:
                continue
            slot = module.slots[new_name]
            for part in slot.parts or (None,):
                a_new, b_new = slot.pair(part)
                a_new.zero_()
                b_new.zero_()
                for name, weight in weights.items():
                    theirs = module.slots.get(name)
                    if theirs is None or (part is not None and part not in theirs.parts):
                        continue
                    a, b = theirs.pair(part if theirs.parts else None)
                    if method == "cat":
                        rows = slice(offsets[name], offsets[name] + theirs.rank)
                        a_new[rows] = a * (weight * theirs.scaling)
                        b_new[:, rows] = b
                    else:
                        root = math.sqrt(weight * theirs.scaling)
                        a_new += root * a
                        b_new += root * b
        heads = attach_registry(model).heads
        source = next(iter(configs))
        if heads is not None and new_name in heads:
            own = heads[source].weight if source in heads else model.get_submodule(HEAD_NAME).weight
            heads[new_name].weight.copy_(own)
    return model


def adapter_layers(model: nn.Module, name: str) -> list[str]:
    """Qualified names of the layers adapter ``name`` is on."""
    return [layer for layer, module in lora_modules(model) if name in module.slots]
