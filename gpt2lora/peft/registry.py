"""The adapter state of one model, owned by one object: :class:`AdapterRegistry`.

It holds the LoRA adapters with their configs, the active one, whether adapters are disabled, the mixed
batch in flight, the per-adapter classification heads, and the training method / last-N / prompt config
that :func:`gpt2lora.prepare_model` and :func:`gpt2lora.apply_prompt` chose. :func:`attach_registry` is the one
place that puts it on a model, as ``model.adapter_router``: it implements the model layer's
:class:`gpt2lora.model.hooks.AdapterRouter`, which the model calls for mixed batches and per-adapter heads.

The model's ``lora_config``, ``lora_configs``, ``active_adapter``, ``training_method``, ``training_last_n``
and ``prompt_config`` are read-only views of this object (:class:`gpt2lora.model.hooks.AdapterView`). The
heads' tensors must move and save with the model, so the registry registers its ``heads`` on the model as
``adapter_heads`` (keys ``adapter_heads.<adapter>.weight``), and a classifier's base head is the buffer
``base_score_weight``; the registry is the only code that adds or removes heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig, is_residual_init
from ..errors import ConfigError
from .layers import LORA_LAYERS, lora_modules
from .mixed import FactorCache, RowRouting, routed
from .slots import BASE_ADAPTER, DEFAULT_ADAPTER, HEAD_NAME

if TYPE_CHECKING:
    from .prompt import PromptConfig

#: The attribute the model layer reads (see :mod:`gpt2lora.model.hooks`).
ATTRIBUTE = "adapter_router"
#: Where the registry registers the per-adapter heads on the model (their tensors' key prefix).
HEADS_ATTRIBUTE = "adapter_heads"


class AdapterRegistry:
    """Every piece of adapter state of one model (see the module docstring)."""

    def __init__(self) -> None:
        self.configs: dict[str, LoRAConfig] = {}
        """Every LoRA adapter's config by name, in the order they were added."""
        self.active: str | None = None
        """The adapter the forward applies and the only one that trains."""
        self.disabled = False
        """True inside ``disable_adapters``: base model outputs and the base head."""
        self.routing: RowRouting | None = None
        """The per-row adapters of the mixed batch in flight."""
        self.heads: nn.ModuleDict | None = None
        """Classification heads of adapters other than ``default`` (registered on the model as ``adapter_heads``)."""
        self.method: str | None = None
        """The training method :func:`gpt2lora.prepare_model` (or loading trained tensors) recorded."""
        self.last_n: int | None = None
        """The block count of method ``last_n_full``."""
        self.prompt_config: PromptConfig | None = None
        """The soft prompt's config (method ``prompt``)."""

    # --- the views the model exposes ---

    @property
    def lora_config(self) -> LoRAConfig | None:
        """The active adapter's config (None without LoRA)."""
        return self.configs.get(self.active) if self.active is not None else None

    @property
    def active_adapter(self) -> str | None:
        return self.active if self.configs else None

    @property
    def lora_configs(self) -> dict[str, LoRAConfig]:
        return dict(self.configs)

    @property
    def training_method(self) -> str | None:
        return self.method

    @property
    def training_last_n(self) -> int | None:
        return self.last_n

    # --- adapters ---

    def require(self, verb: str) -> dict[str, LoRAConfig]:
        """The adapters' configs, refused when there are none."""
        if not self.configs:
            raise ConfigError(f"{verb}: the model has no LoRA adapters; call apply_lora, add_adapter or "
                              "load_adapter first")
        return self.configs

    def known(self, name: str, verb: str) -> LoRAConfig:
        """Adapter ``name``'s config, refused when the model has no such adapter."""
        configs = self.require(verb)
        if name not in configs:
            raise ConfigError(f"{verb}: the model has no adapter {name!r}; it has {sorted(configs)}")
        return configs[name]

    def residual_adapter(self) -> str | None:
        """The adapter whose PiSSA / OLoRA init left a residual in the base weights, if any."""
        return next((n for n, c in self.configs.items() if is_residual_init(c.init)), None)

    def activate(self, model: nn.Module, name: str) -> None:
        """Make ``name`` the active adapter on the registry and on every layer."""
        self.active = name
        for _, module in lora_modules(model):
            module.active_adapter = name

    # --- heads ---

    def add_head(self, model: nn.Module, name: str, head: nn.Module) -> None:
        """Give adapter ``name`` its own classification head (registered on ``model`` as ``adapter_heads``)."""
        if self.heads is None:
            self.heads = nn.ModuleDict()
            setattr(model, HEADS_ATTRIBUTE, self.heads)
        self.heads[name] = head

    def remove_head(self, name: str) -> None:
        if self.heads is not None and name in self.heads:
            del self.heads[name]

    def head(self, model: nn.Module, name: str) -> nn.Module | None:
        """The classification head adapter ``name`` trains (``score`` for default, its own copy otherwise),
        or None when it has none (a language model, or LoRA on ``score`` itself)."""
        score = getattr(model, HEAD_NAME, None)
        if not isinstance(score, nn.Module) or isinstance(score, LORA_LAYERS):
            return None
        if name == DEFAULT_ADAPTER:
            return score
        return self.heads[name] if self.heads is not None and name in self.heads else None

    # --- what the model calls (gpt2lora.model.hooks.AdapterRouter) ---

    def check_adapter_names(self, model: nn.Module, adapter_names: object, batch: int,
                            layers: Sequence[nn.Module] | None = None) -> list[str]:
        """``adapter_names`` as a list, checked: one known adapter (or ``"__base__"``) per row, inference only.
        ``layers``: the model's LoRA layers when the caller knows them (no walk over every module)."""
        configs = self.require("adapter_names")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
                isinstance(n, str) for n in adapter_names):
            raise ConfigError(f"adapter_names: expected a list of adapter names, one per row, got {adapter_names!r}")
        names = list(adapter_names)
        if len(names) != batch:
            raise ConfigError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; give one "
                              "adapter name (or '__base__') per row")
        unknown = sorted({n for n in names if n not in configs and n != BASE_ADAPTER})
        if unknown:
            raise ConfigError(f"adapter_names: unknown adapter(s) {unknown}; the model has {sorted(configs)} "
                              f"(and {BASE_ADAPTER!r} for the base model)")
        if model.training:
            raise ConfigError("adapter_names: mixed-adapter batches are for inference; call model.eval() first "
                              "(training uses the active adapter, see set_adapter)")
        if layers is None or any(layer.merged for layer in layers):
            require_unmerged(model, "adapter_names")
        residual = self.residual_adapter()
        if residual is not None:
            raise ConfigError(f"adapter_names: adapter {residual!r} left a residual (PiSSA / OLoRA) in the base "
                              "weights, so no other row could see the base model; save it and load the converted "
                              "adapter onto a fresh model to mix it with others")
        return names

    @contextmanager
    def route_rows(self, model: nn.Module, adapter_names: Sequence[str], batch: int,
                   factors: FactorCache | None = None) -> Iterator[None]:
        """Within this context row i of every forward uses adapter ``adapter_names[i]``; ``factors`` keeps the
        stacked factors across calls (see :class:`~gpt2lora.peft.mixed.FactorCache`)."""
        layers = factors.modules(model) if factors is not None else None
        names = self.check_adapter_names(model, adapter_names, batch, layers)
        with routed(model, names, factors) as routing:
            self.routing = routing
            try:
                yield
            finally:
                self.routing = None

    def head_logits(self, model: nn.Module, pooled: Tensor) -> Tensor | None:
        """A classifier's logits with each row through its adapter's head; None when ``score``'s own output
        is right for every row."""
        if self.heads is None and not self.disabled and self.routing is None:
            return None
        if self.routing is not None:
            names = self.routing.names
        elif self.disabled:
            names = [BASE_ADAPTER] * pooled.size(0)
        else:
            names = [self.active] * pooled.size(0)
        out = model.get_submodule(HEAD_NAME)(pooled)
        for name in dict.fromkeys(names):
            weight = self._own_head_weight(model, name)
            if weight is None:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=pooled.device)
            out = out.index_put((rows,), F.linear(pooled[rows].to(weight.dtype), weight).to(out.dtype))
        return out

    def _own_head_weight(self, model: nn.Module, name: str) -> Tensor | None:
        """The head weight rows of adapter ``name`` use, or None when ``score``'s own output is right for them."""
        if score_has_lora(model):
            return None  # LoRA on score: the wrapper routes its rows (or is disabled) itself
        if name == BASE_ADAPTER:
            return model.base_score_weight
        if self.heads is not None and name in self.heads:
            return self.heads[name].weight
        return None


def adapter_registry(model: nn.Module) -> AdapterRegistry | None:
    """The model's adapter registry, or None when nothing adapter-related was done to it."""
    registry = model.__dict__.get(ATTRIBUTE)
    return registry if isinstance(registry, AdapterRegistry) else None


def attach_registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapter registry, created and attached (as ``model.adapter_router``) on first use."""
    registry = adapter_registry(model)
    if registry is None:
        registry = AdapterRegistry()
        setattr(model, ATTRIBUTE, registry)
    return registry


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """Every LoRA adapter's config by name (empty without LoRA)."""
    registry = adapter_registry(model)
    return dict(registry.configs) if registry is not None else {}


def require_adapters(model: nn.Module, verb: str) -> AdapterRegistry:
    """The registry of a model with LoRA adapters; refused (naming ``verb``) without."""
    registry = adapter_registry(model) or AdapterRegistry()  # an empty one refuses with the same message
    registry.require(verb)
    return registry


def require_unmerged(model: nn.Module, verb: str) -> None:
    """Refuse ``verb`` while any LoRA layer of ``model`` has an adapter merged into its weight."""
    merged = [name for name, m in lora_modules(model) if m.merged]
    if merged:
        raise ConfigError(f"{verb}: the model's LoRA is merged ({merged[0]} ...); call unmerge_lora(model) first")


def score_has_lora(model: nn.Module) -> bool:
    """Whether a classifier's ``score`` head itself carries LoRA (target ``lm_head``)."""
    return isinstance(getattr(model, HEAD_NAME, None), LORA_LAYERS)
