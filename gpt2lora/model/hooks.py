"""What other layers attach to a model: the KV cache generation fills, and the adapter router.

The adapter layer (:mod:`gpt2lora.peft`) sets ``model.adapter_router`` (its
:class:`~gpt2lora.peft.registry.AdapterRegistry`, the one owner of a model's adapter state) when it adds
adapters; the model calls it for mixed-adapter batches and adapter-specific heads, and exposes its state
read-only (:class:`AdapterView`), so nothing in :mod:`gpt2lora.model` imports the adapter layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import GPT2Config
from ..errors import ConfigError
from ..ops.packed import HALF


class AdapterRouter(Protocol):
    """What the adapter layer attaches to a model as ``adapter_router`` (see :mod:`gpt2lora.peft.registry`): the
    model calls it for mixed-adapter batches and adapter-specific classification heads, so the model layer
    never imports the adapter layer."""

    lora_config: Any
    """The active LoRA adapter's config (None without LoRA)."""
    lora_configs: dict[str, Any]
    active_adapter: str | None
    training_method: str | None
    training_last_n: int | None
    prompt_config: Any

    def route_rows(self, model: nn.Module, adapter_names: Sequence[str], batch: int) -> AbstractContextManager:
        """A context within which row i of every forward uses adapter ``adapter_names[i]``."""

    def head_logits(self, model: nn.Module, pooled: Tensor) -> Tensor | None:
        """A classifier's logits from its pooled states when adapters carry their own heads, else None."""


class AdapterView:
    """Read-only views of the adapter state a model's ``adapter_router`` owns (None / empty without one).

    ``lora_config``, ``lora_configs``, ``active_adapter``, ``training_method``, ``training_last_n`` and
    ``prompt_config`` are not separate state on the model: they are read from the router every time.
    """

    def _adapter_router(self) -> AdapterRouter | None:
        return self.__dict__.get("adapter_router")

    @property
    def lora_config(self) -> Any:
        """The active LoRA adapter's ``LoRAConfig`` (None without LoRA)."""
        router = self._adapter_router()
        return router.lora_config if router is not None else None

    @property
    def lora_configs(self) -> dict[str, Any]:
        """Every LoRA adapter's config by name."""
        router = self._adapter_router()
        return router.lora_configs if router is not None else {}

    @property
    def active_adapter(self) -> str | None:
        """The active LoRA adapter's name (None without LoRA)."""
        router = self._adapter_router()
        return router.active_adapter if router is not None else None

    @property
    def training_method(self) -> str | None:
        """The training method ``prepare_model`` recorded (None when it was not called)."""
        router = self._adapter_router()
        return router.training_method if router is not None else None

    @property
    def training_last_n(self) -> int | None:
        router = self._adapter_router()
        return router.training_last_n if router is not None else None

    @property
    def prompt_config(self) -> Any:
        """The soft prompt's ``PromptConfig`` (None without one)."""
        router = self._adapter_router()
        return router.prompt_config if router is not None else None


def row_adapters(model: nn.Module, adapter_names: Sequence[str], batch: int) -> AbstractContextManager:
    """The adapter router's per-row context for ``adapter_names``; refused on a model without adapters."""
    router = getattr(model, "adapter_router", None)
    if router is None:
        raise ConfigError("adapter_names: the model has no LoRA adapters; call apply_lora, add_adapter or "
                          "load_adapter first")
    return router.route_rows(model, adapter_names, batch)


def cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype keys and values are cached in for a model computing in ``dtype``: fp32 for bf16 or fp16 on the
    CPU, the model's own dtype elsewhere.

    torch's CPU attention of one query over bf16 keys took 45-158 us a layer for 20-140 cached positions (GPT-2
    124M's shape, 2 cores), over fp32 ones 9-24 us; inside bf16 decoding 109 against 60-76 us, and with 8-16
    masked rows (the serve engine) 4.8 times as long. Widening is exact and the attention of half inputs
    computes in fp32 anyway, so only the rounding of its output changes (it is rounded to the model's dtype
    once, after). The cache takes twice the memory of a half one."""
    is_cpu = torch.device(device).type == "cpu"
    return torch.float32 if is_cpu and dtype in HALF else dtype


class KVCache:
    """Keys and values of every layer, allocated once for the longest sequence a generation needs (in
    :func:`cache_dtype` of the model's ``dtype``)."""

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.n_layer, batch_size, config.n_head, max_length, config.head_dim)
        self.keys = torch.empty(shape, dtype=cache_dtype(dtype, device), device=device)
        self.values = torch.empty_like(self.keys)
        self.max_length = max_length
        self.length = 0
        """Number of positions already stored."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's ``k``/``v`` (B, nh, T, hs) and return every position so far."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
