"""LoRA injection and the adapter-derived operations: apply, trainable set, merge / unmerge, parameter counts.

``apply_lora(model, config)`` replaces the layers :func:`gpt2lora.peft.targets.lora_layers` resolves for
``config`` with LoRA layers (:mod:`gpt2lora.peft.layers`) after the weights are loaded, freezes the base
model and leaves the classification head trainable. The adapters' configs, the active adapter and the
heads live in the model's :class:`~gpt2lora.peft.registry.AdapterRegistry`; the tensors each adapter trains,
saves and merges are the ones its layers declare (:meth:`~gpt2lora.peft.layers.LoRALinear.adapter_params`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoRAConfig, is_residual_init
from ..errors import ConfigError
from .init import check_rank_fits
from .layers import LORA_LAYERS, LoRALinear, QKVLoRALinear, TiedLoRALinear, lora_modules
from .registry import HEADS_ATTRIBUTE, AdapterRegistry, adapter_configs, adapter_registry, attach_registry
from .slots import DEFAULT_ADAPTER, HEAD_NAME
from .targets import lora_layers

__all__ = [
    "LoRALinear",
    "ParameterCount",
    "QKVLoRALinear",
    "TiedLoRALinear",
    "adapter_configs",
    "adapter_head",
    "adapter_parameters",
    "add_to_layers",
    "apply_lora",
    "count_parameters",
    "is_lora_b",
    "keep_base_head",
    "lora_modules",
    "merge_lora",
    "set_lora_trainable",
    "trained_biases",
    "unmerge_lora",
]


def _wrapper_class(model: nn.Module, name: str, base: nn.Linear, parts: tuple[str, ...]) -> type[LoRALinear]:
    if parts:
        return QKVLoRALinear
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    if name == "lm_head" and wte is not None and base.weight is wte.weight:
        return TiedLoRALinear
    return LoRALinear


def add_to_layers(model: nn.Module, adapter: str, config: LoRAConfig, generator: torch.Generator | None) -> None:
    """Put adapter ``adapter`` on every layer ``config`` names, wrapping the layers not wrapped yet.

    Everything is checked before anything changes (layer types, ranks that PiSSA / OLoRA can take).
    """
    layers = lora_layers(model, config)
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    registry = adapter_registry(model)
    active = registry.active if registry is not None and registry.active is not None else adapter
    for name, parts in layers:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) and not isinstance(module, LORA_LAYERS):
            raise ConfigError(f"apply_lora: {name} is a {type(module).__name__}, expected nn.Linear")
        weight = module.weight
        tied = name == "lm_head" and wte is not None and weight is wte.weight
        if is_residual_init(config.init) and tied:
            raise ConfigError(f"LoRAConfig.init={config.init!r} on {name}: the LM head shares its weight with "
                              "transformer.wte, and writing the residual into it would change the input "
                              "embeddings; use init='kaiming' or 'gaussian' for lm_head")
        if isinstance(module, LORA_LAYERS):
            if adapter in module.slots:
                raise ConfigError(f"{name} already has an adapter named {adapter!r}")
            if module.merged:
                raise ConfigError(f"{name} has adapter {module.merged_adapter!r} merged; call unmerge_lora first")
        width = weight.shape[0] // 3 if parts else weight.shape[0]
        check_rank_fits(config.init, config.rank, (width, weight.shape[1]), name)
    for name, parts in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, LORA_LAYERS):
            wrapped = _wrapper_class(model, name, module, parts if adapter == DEFAULT_ADAPTER else ()).empty(module)
            wrapped.train(module.training)  # a new module starts in training mode; keep the model's mode
            wrapped.active_adapter = active
            setattr(parent, child, wrapped)
            module = wrapped
        module.add_slot(adapter, config, parts, generator, where=name)


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int | None = None) -> nn.Module:
    """Wrap the layers ``config`` names with LoRA layers, freeze the rest, return ``model``.

    Block targets get a :class:`LoRALinear`; ``attn.q`` / ``attn.k`` / ``attn.v`` one
    :class:`QKVLoRALinear` on ``c_attn``; ``lm_head`` a :class:`TiedLoRALinear` on a tied LM head (which
    never changes ``wte``), a :class:`LoRALinear` on an untied head or on a classifier's ``score``.
    Trainable afterwards: every adapter tensor, the classification head ``score`` unless LoRA wraps it
    (target ``lm_head``: then its base is frozen) and the biases ``config.train_bias`` names (``all``:
    every parameter named ``*.bias`` as in peft, ``lora_only``: biases of wrapped layers). ``seed`` makes
    the initialisation reproducible. The config is kept in the model's adapter registry (read it as
    ``model.lora_config``); this adapter is ``"default"`` (add more with :func:`gpt2lora.peft.named.add_adapter`).
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    existing = [name for name, _ in lora_modules(model)]
    if existing or adapter_configs(model):
        where = existing[0] if existing else "model.lora_config"
        raise ConfigError(f"apply_lora: LoRA is already applied to this model ({where}); applying it twice "
                          "would wrap LoRA layers again. Load a fresh model, use load_adapter to replace the "
                          "adapter weights, or add_adapter for a second, named adapter.")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    add_to_layers(model, DEFAULT_ADAPTER, config, generator)  # checks everything before changing anything
    keep_base_head(model)
    registry = attach_registry(model)
    registry.configs = {DEFAULT_ADAPTER: config}
    registry.activate(model, DEFAULT_ADAPTER)
    set_lora_trainable(model, config.train_bias)
    return model


def keep_base_head(model: nn.Module) -> None:
    """Keep a frozen copy of a classifier's original head (``base_score_weight``, not saved): the base
    model's head for ``disable_adapters``, ``__base__`` rows and new adapters' own heads."""
    head = getattr(model, HEAD_NAME, None)
    if (isinstance(head, nn.Linear) and not isinstance(head, LORA_LAYERS)
            and "base_score_weight" not in model._buffers):
        model.register_buffer("base_score_weight", head.weight.detach().clone(), persistent=False)


def adapter_head(model: nn.Module, name: str) -> nn.Module | None:
    """The classification head adapter ``name`` trains (``score`` for default, its own copy otherwise), or
    None when it has none (a language model, or LoRA on ``score`` itself)."""
    registry = adapter_registry(model)
    if registry is None:
        return AdapterRegistry().head(model, name)
    return registry.head(model, name)


def adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Adapter ``adapter``'s own tensors under the names a single-adapter model gives them.

    What its layers declare (:meth:`~gpt2lora.peft.layers.LoRALinear.adapter_params`: ``<layer>.lora_A``
    for ``<layer>.lora_extra.<adapter>.lora_A``, ...) and its classification head (``score.weight`` for
    its own copy of the head). Biases are the base model's, shared by every adapter, and not included.
    """
    tensors: dict[str, nn.Parameter] = {}
    for layer, module in lora_modules(model):
        if adapter in module.slots:
            for canonical, own in zip(module.slots[adapter].param_names(), module.adapter_params(adapter),
                                      strict=True):
                tensors[f"{layer}.{canonical}"] = module.get_parameter(own)
    head = adapter_head(model, adapter)
    if head is not None:
        for name, param in head.named_parameters():
            tensors[f"{HEAD_NAME}.{name}"] = param
    return tensors


def trained_biases(model: nn.Module, adapter: str, train_bias: str) -> dict[str, nn.Parameter]:
    """The base biases adapter ``adapter`` trains for peft's ``bias`` option (``all``: every ``*.bias``
    outside the adapter heads; ``lora_only``: those of the layers it is on)."""
    if train_bias == "all":
        return {name: p for name, p in model.named_parameters()
                if name.endswith(".bias") and not name.startswith(f"{HEADS_ATTRIBUTE}.")}
    if train_bias == "lora_only":
        return {f"{layer}.bias": module.bias for layer, module in lora_modules(model)
                if adapter in module.slots and module.bias is not None}
    return {}


def set_lora_trainable(model: nn.Module, train_bias: str = "none") -> None:
    """Freeze everything, then unfreeze the active adapter's tensors (as its layers declare them), its
    classification head (unless LoRA wraps ``score``) and the chosen biases."""
    registry = adapter_registry(model)
    active = registry.active if registry is not None and registry.active is not None else DEFAULT_ADAPTER
    for param in model.parameters():
        param.requires_grad_(False)
    for param in (*adapter_parameters(model, active).values(), *trained_biases(model, active, train_bias).values()):
        param.requires_grad_(True)


def is_lora_b(name: str) -> bool:
    """Whether a parameter name is a LoRA B matrix (``lora_B``, ``lora_q_B``, ...): LoRA+'s faster group."""
    return re.search(r"(?:^|\.)lora_(?:[qkv]_)?B$", name) is not None


def _require_lora(model: nn.Module, verb: str) -> list[LoRALinear]:
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ConfigError(f"{verb}: the model has no LoRA layers; call apply_lora (or load_adapter) first")
    return modules


def merge_lora(model: nn.Module) -> nn.Module:
    """Add the active adapter's update into every base weight (idempotent); the forward becomes the plain
    model's. A LoRA on a tied LM head unties it: the head gets its own merged weight and ``wte`` is unchanged.
    """
    for module in _require_lora(model, "merge_lora"):
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged update out of its base weight again (idempotent); a tied head is tied again."""
    for module in _require_lora(model, "unmerge_lora"):
        module.unmerge()
    return model


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of a model (tied tensors counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable share of the total in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        share = f"{self.share:.2g}" if self.share < 1 else f"{self.share:.3g}"
        return f"{_human(self.trainable)} trainable of {_human(self.total)} ({share}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total parameter counts; ``str()`` reads like ``148K trainable of 124M (0.12%)``."""
    trainable = total = 0
    for param in model.parameters():  # parameters() yields a tied tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable=trainable, total=total)


