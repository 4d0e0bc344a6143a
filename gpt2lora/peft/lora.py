"""LoRA: a wrapper around ``nn.Linear``, injection by module name, merge / unmerge, parameter counts.

``apply_lora(model, config)`` replaces the chosen layers of the chosen blocks with :class:`LoRALinear`
after the weights are loaded, freezes the base model and leaves the classification head trainable.
A wrapped layer keeps its base tensors under the keys of a plain linear layer (``<name>.weight``,
``<name>.bias``) and adds ``<name>.lora_A`` and ``<name>.lora_B`` (and ``<name>.lora_magnitude_vector``
with DoRA). Targets ``attn.q`` / ``attn.k`` / ``attn.v`` wrap the fused ``c_attn`` in a
:class:`QKVLoRALinear` (``lora_q_A``, ``lora_q_B``, ...), and ``lm_head`` wraps the output head (a
:class:`TiedLoRALinear` when it shares ``wte``).

One wrapper can hold several adapters (see :mod:`gpt2lora.peft.named`): the ``"default"`` adapter's tensors sit
on the wrapper itself under the names above, every other adapter's under ``<name>.lora_extra.<adapter>.``.
Each is a :class:`Slot`: its config, its q/k/v parts (none for a pair over the whole layer) and the math
of its update. The forward applies the model's active adapter, none inside ``disable_adapters``, or a
different adapter per batch row inside a mixed batch (:meth:`LoRALinear.forward`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BLOCK_TARGETS, HEAD_TARGET, QKV_TARGETS, LoRAConfig, is_residual_init
from ..errors import ConfigError
from ..ops.few_row import linear
from ..ops.lora_product import LoRAProduct
from .init import check_rank_fits, initial_factors

#: Name of the classification head; LoRA never wraps or freezes it.
HEAD_NAME = "score"
#: The adapter that single-adapter calls create, save and load (peft's name for it too).
DEFAULT_ADAPTER = "default"
#: In ``adapter_names`` of a mixed batch: the base model for that row.
BASE_ADAPTER = "__base__"
#: Parts of the fused ``c_attn`` output, in order, and the config target that names each.
QKV_PARTS = {"attn.q": "q", "attn.k": "k", "attn.v": "v"}
PARTS = ("q", "k", "v")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_adapter_name(name: Any, argument: str = "adapter_name") -> str:
    """An adapter name usable as a module key (letters, digits, ``_``, ``-``; not ``__base__``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"{argument}: expected a name of letters, digits, '_' or '-' starting with a letter "
                          f"(and not a ModuleDict attribute such as 'keys'), got {name!r}")
    return name


class AdapterFactors(nn.Module):
    """Holder of one non-default adapter's tensors on one layer (``<layer>.lora_extra.<adapter>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_dropout: nn.Module | None = None


class Slot:
    """One adapter on one wrapped layer: where its tensors live and what they compute.

    ``parts`` is empty for one pair over the whole layer (``lora_A`` (rank, in), ``lora_B`` (out, rank),
    with DoRA ``lora_magnitude_vector`` (out,)), or names q/k/v slices of a fused layer with a pair each
    (``lora_q_A`` (rank, in), ``lora_q_B`` (out/3, rank), ...). ``A0`` / ``B0`` keep the initial factors of
    a PiSSA / OLoRA init, whose product the base weight lacks (see :func:`gpt2lora.peft.init.initial_factors`).
    """

    def __init__(self, name: str, owner: nn.Module, config: LoRAConfig, parts: tuple[str, ...],
                 out_features: int) -> None:
        self.name, self.owner, self.config = name, owner, config
        self.parts = tuple(p for p in PARTS if p in parts)
        self.width = out_features // 3 if self.parts else out_features
        self.rank, self.scaling, self.use_dora = config.rank, config.scaling, config.use_dora
        self.plain = not self.parts and not self.use_dora
        """One pair over the whole layer, no DoRA: the forward's fused fast path applies."""

    def param_names(self) -> tuple[str, ...]:
        """Names of this adapter's tensors on ``owner``."""
        if self.parts:
            return tuple(f"lora_{p}_{m}" for p in self.parts for m in "AB")
        return ("lora_A", "lora_B", "lora_magnitude_vector") if self.use_dora else ("lora_A", "lora_B")

    def tensors(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.owner, n) for n in self.param_names()}

    @property
    def dropout(self) -> nn.Module | None:
        return self.owner.lora_dropout

    @property
    def magnitude(self) -> nn.Parameter:
        return self.owner.lora_magnitude_vector

    def pair(self, part: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)`` of the whole-layer pair (``part=None``) or of slice ``part``."""
        if part is None:
            return self.owner.lora_A, self.owner.lora_B
        return getattr(self.owner, f"lora_{part}_A"), getattr(self.owner, f"lora_{part}_B")

    def pieces(self) -> list[tuple[int, int, nn.Parameter, nn.Parameter]]:
        """``(first output row, end row, A, B)`` of every pair."""
        if not self.parts:
            a, b = self.pair()
            return [(0, b.shape[0], a, b)]
        return [(PARTS.index(p) * self.width, (PARTS.index(p) + 1) * self.width, *self.pair(p)) for p in self.parts]

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces()[0][2].dtype

    def initial(self) -> list[tuple[Tensor, Tensor]]:
        """``(A0, B0)`` of every pair after a PiSSA / OLoRA init (empty for other inits)."""
        return list(getattr(self.owner, "_initial", {}).get(self.name, []))


def _param(shape: tuple[int, ...], like: Tensor, values: Tensor | None = None) -> nn.Parameter:
    # Adapters stay fp32 beside a half-precision base (as peft does) so small updates are not rounded away.
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    tensor = torch.zeros(shape, dtype=dtype, device=like.device) if values is None else \
        values.to(device=like.device, dtype=dtype).clone()
    return nn.Parameter(tensor)


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * B A dropout(x)`` around an already-loaded ``nn.Linear``.

    ``weight`` and ``bias`` are the base layer's own Parameters (same objects, same keys), so a
    state dict of a wrapped model still holds ``<name>.weight`` / ``<name>.bias``. ``lora_A`` is
    (rank, in_features), ``lora_B`` (out_features, rank) and starts at zero, so a fresh wrapper
    computes exactly what the base layer computes.

    ``style="peft"``: A is Kaiming-uniform (a=√5) over (rank, in), i.e. within ±1/√in, and
    ``scaling = alpha / rank`` (``alpha / √rank`` with rsLoRA). ``style="from_scratch"``: A is
    Kaiming-uniform over an (in, rank) matrix, i.e. within ±1/√rank, and ``scaling = alpha``.

    ``use_dora=True`` (peft's DoRA): ``y = m / ‖W + s B A‖ ⊙ (x (W + s B A)^T) + b`` with the trained
    magnitude ``m`` (out,) initialised to the row norms ``‖W‖`` over input features (the norm is treated
    as a constant in the backward pass, as the DoRA paper and peft do). With dropout in training, the
    base part of the DoRA correction reads the dropped input, as in peft.

    When the base weight is fp16/bf16 the adapter tensors are kept in fp32 (as peft does by default)
    so that small optimizer updates are not rounded away; the forward casts between the two.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, style: str = "peft",
                 generator: torch.Generator | None = None, *, use_dora: bool = False,
                 init: str = "kaiming") -> None:
        super().__init__()
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, style=style,
                            use_dora=use_dora, init=init)
        self._setup(base)
        self.add_slot(DEFAULT_ADAPTER, config, (), generator)

    def _setup(self, base: nn.Linear) -> None:
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._base = (base,)  # a tuple, so the plain layer (same weight and bias) is not registered twice
        self.lora_dropout: nn.Module | None = None
        self.slots: dict[str, Slot] = {}
        """Every adapter on this layer by name (insertion order)."""
        self.active_adapter: str | None = DEFAULT_ADAPTER
        """The adapter the forward applies (set on every layer by ``set_adapter``)."""
        self.disabled = False
        """True inside ``disable_adapters``: the forward is the base layer's."""
        self.routing: RowRouting | None = None
        """Per-row adapters of a mixed batch (set by ``gpt2lora.peft.named.route_rows``)."""
        self.merged = False
        """Whether an adapter's update (``merged_adapter``) is currently in ``weight``."""
        self.merged_adapter: str | None = None
        self._merge_factor: Tensor | None = None  # DoRA's m / ||W + dW|| at merge time, for the unmerge

    @property
    def base_layer(self) -> nn.Linear:
        """The plain layer this wrapper was built around (it shares ``weight`` and ``bias``)."""
        return self._base[0]

    # --- adapters on this layer ---

    @classmethod
    def empty(cls, base: nn.Linear) -> LoRALinear:
        """A wrapper with no adapter yet (for a layer only a named adapter targets)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(base)
        return layer

    def owner(self, name: str) -> nn.Module:
        """The module that holds adapter ``name``'s tensors: this layer for ``default``, else ``lora_extra``."""
        if name == DEFAULT_ADAPTER:
            return self
        return self.lora_extra[name]

    def add_slot(self, name: str, config: LoRAConfig, parts: tuple[str, ...] = (),
                 generator: torch.Generator | None = None, where: str | None = None) -> Slot:
        """Create adapter ``name`` on this layer and initialise it as ``config.init`` says."""
        where = where or type(self).__name__
        if name in self.slots:
            raise ConfigError(f"{where} already has an adapter named {name!r}")
        if self.merged:
            raise ConfigError(f"{where} has adapter {self.merged_adapter!r} merged; call unmerge_lora first")
        if parts and self.out_features % 3:
            raise ConfigError(f"{where}: attn.q/attn.k/attn.v need a fused query/key/value layer, whose "
                              f"out_features is divisible by 3; got {self.out_features}")
        if parts and config.use_dora:
            raise ConfigError(f"{where}: LoRAConfig.use_dora cannot wrap the q/k/v slices {list(parts)}")
        if is_residual_init(config.init) and isinstance(self, TiedLoRALinear):
            raise ConfigError(f"LoRAConfig.init={config.init!r} on {where}: the LM head shares its weight with "
                              "transformer.wte, and writing the residual into it would change the input "
                              "embeddings; use init='kaiming' or 'gaussian' for lm_head")
        width = self.out_features // 3 if parts else self.out_features
        for _ in parts or (None,):
            check_rank_fits(config.init, config.rank, (width, self.in_features), where)
        if name == DEFAULT_ADAPTER:
            owner: nn.Module = self
        else:
            if "lora_extra" not in self._modules:
                self.lora_extra = nn.ModuleDict()
            owner = AdapterFactors()
            self.lora_extra[name] = owner
        # torch's own dropout, not gpt2lora.ops.dropout: the same masks as peft's under the same seed
        owner.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if owner.lora_dropout is not None:
            owner.lora_dropout.train(self.training)
        slot = Slot(name, owner, config, parts, self.out_features)
        for start, stop, part in self._part_rows(slot):
            prefix = f"lora_{part}_" if part else "lora_"
            setattr(owner, prefix + "A", _param((config.rank, self.in_features), self.weight))
            setattr(owner, prefix + "B", _param((stop - start, config.rank), self.weight))
        if config.use_dora:
            owner.lora_magnitude_vector = _param((self.out_features,), self.weight)
        self.slots[name] = slot
        self._initialise(slot, generator)
        return slot

    def _part_rows(self, slot: Slot) -> list[tuple[int, int, str | None]]:
        if not slot.parts:
            return [(0, self.out_features, None)]
        return [(PARTS.index(p) * slot.width, (PARTS.index(p) + 1) * slot.width, p) for p in slot.parts]

    @torch.no_grad()
    def _initialise(self, slot: Slot, generator: torch.Generator | None) -> None:
        config = slot.config
        initial = []
        for start, stop, a, b in slot.pieces():
            weight = self.weight[start:stop]
            a0, b0, residual = initial_factors(config.init, weight, config.rank, config.scaling, config.style,
                                               generator)
            a.copy_(a0)
            b.copy_(b0)
            if residual is not None:  # PiSSA / OLoRA: the base keeps what the adapter does not hold
                weight.copy_(residual.to(device=weight.device, dtype=weight.dtype))
                initial.append((a.detach().clone(), b.detach().clone()))
        if initial:
            if not hasattr(slot.owner, "_initial"):
                slot.owner._initial = {}
            slot.owner._initial[slot.name] = initial
        if slot.use_dora:
            slot.magnitude.copy_(self.dora_norm(slot).to(slot.magnitude.dtype))

    def remove_slot(self, name: str) -> None:
        """Delete adapter ``name`` from this layer (its tensors go with it)."""
        if self.merged and self.merged_adapter == name:
            raise ConfigError(f"adapter {name!r} is merged into {type(self).__name__}; call unmerge_lora first")
        slot = self.slots.pop(name)
        if name == DEFAULT_ADAPTER:
            for pname in slot.param_names():
                delattr(self, pname)
            self.lora_dropout = None
            getattr(self, "_initial", {}).pop(name, None)
        else:
            del self.lora_extra[name]

    def slot(self, name: str | None = None) -> Slot:
        """Adapter ``name`` (default: the active one) on this layer."""
        name = self.active_adapter if name is None else name
        if name not in self.slots:
            raise ConfigError(f"{type(self).__name__} has no adapter {name!r}; it has {list(self.slots)}")
        return self.slots[name]

    def adapter_params(self) -> tuple[str, ...]:
        """Names of the default adapter's tensors on this module: they drive the trainable set, the file and merge."""
        slot = self.slots.get(DEFAULT_ADAPTER)
        return slot.param_names() if slot is not None else ()

    def _default(self) -> Slot:
        return self.slot(DEFAULT_ADAPTER)

    @property
    def rank(self) -> int:
        return self._default().rank

    @property
    def scaling(self) -> float:
        return self._default().scaling

    @property
    def alpha(self) -> float:
        return float(self._default().config.alpha)

    @property
    def style(self) -> str:
        return self._default().config.style

    @property
    def use_rslora(self) -> bool:
        return self._default().config.use_rslora

    @property
    def use_dora(self) -> bool:
        return self._default().use_dora

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise the default adapter again: A as the style says, B = 0 (Kaiming / Gaussian inits only)."""
        if self.merged:
            raise ConfigError(f"reset_lora_parameters on a merged {type(self).__name__}; call unmerge() first")
        slot = self._default()
        if is_residual_init(slot.config.init):
            raise ConfigError(f"reset_lora_parameters: init {slot.config.init!r} already moved part of the base "
                              "weight into the adapter; load a fresh model to start again")
        self._initialise(slot, generator)

    # --- the forward ---

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None and not self.merged:
            return self._mixed(x, linear(x, self.weight, self.bias), self.routing)
        slot = None if self.merged or self.disabled else self.slots.get(self.active_adapter)
        if slot is None:
            return linear(x, self.weight, self.bias)
        owner = slot.owner
        device = x.device.type
        if (slot.plain and torch.is_autocast_enabled(device) and self.weight.dtype != owner.lora_A.dtype
                and self.weight.dtype == torch.get_autocast_dtype(device)):
            # Mixed precision with the base held in the autocast dtype (gpt2lora.training.precision): the
            # fused product below in that dtype, fp32 adapter tensors cast inside, their gradients fp32.
            rows = x.reshape(-1, self.in_features).to(self.weight.dtype)
            drop = owner.lora_dropout
            h = drop(rows) if drop is not None else rows
            with torch.autocast(device, enabled=False):
                out = LoRAProduct.apply(rows, h, self.weight, self.bias, owner.lora_A, owner.lora_B, slot.scaling)
            return out.view(*x.shape[:-1], self.out_features)
        if (slot.plain and x.dtype == self.weight.dtype == owner.lora_A.dtype
                and not torch.is_autocast_enabled(device)):
            # Scale the small (tokens, rank) product, then let BLAS accumulate B's product straight into
            # the base output (beta=1): no full-size update tensor, multiply or add. In-place is safe:
            # the base linear's backward keeps its inputs, not its output.
            lora_a, lora_b = owner.lora_A, owner.lora_B
            drop = owner.lora_dropout
            rows = x.reshape(-1, self.in_features)
            h = drop(rows) if drop is not None else rows
            if torch.is_grad_enabled():  # the input gradient of both paths in one product (see lora_product)
                out = LoRAProduct.apply(rows, h, self.weight, self.bias, lora_a, lora_b, slot.scaling)
            else:
                out = linear(rows, self.weight, self.bias).addmm_(F.linear(h, lora_a) * slot.scaling, lora_b.t())
            return out.view(*x.shape[:-1], self.out_features)
        if slot.use_dora:
            fused = ((owner.lora_dropout is None or not owner.lora_dropout.training)
                     and x.dtype == self.weight.dtype == owner.lora_A.dtype
                     and not torch.is_autocast_enabled(x.device.type))
            return self._dora_forward(slot, x, None if fused else linear(x, self.weight, self.bias))
        out = linear(x, self.weight, self.bias)
        updates = []
        for start, stop, lora_a, lora_b in slot.pieces():
            h = slot.dropout(x) if slot.dropout is not None else x  # each pair its own mask, as separate layers
            if h.dtype != lora_a.dtype:
                h = h.to(lora_a.dtype)  # under autocast F.linear casts again to the autocast dtype
            updates.append((start, stop, F.linear(F.linear(h, lora_a), lora_b) * slot.scaling))
        if len(updates) == 1 and updates[0][1] - updates[0][0] == self.out_features:
            return out + updates[0][2].to(out.dtype)
        full = []
        for part in PARTS:
            hit = [u for s, _, u in updates if s == PARTS.index(part) * slot.width]
            full.append(hit[0] if hit else x.new_zeros((*x.shape[:-1], slot.width), dtype=updates[0][2].dtype))
        return out + torch.cat(full, dim=-1).to(out.dtype)

    def dora_norm(self, slot: Slot) -> Tensor:
        """``‖W + s B A‖`` over input features, one value per output feature, without gradient.

        Computed as ``sqrt(‖W_j‖² + 2s B_j·(W A^T)_j + s² B_j (A A^T) B_j^T)``: two reads of W and r x r work
        instead of forming W + s B A (an (out, in) temporary) every step.
        """
        with torch.no_grad():
            lora_a, lora_b = slot.pair()
            weight = self.weight.to(lora_a.dtype)
            s = slot.scaling
            rows = torch.linalg.vector_norm(weight, dim=1).square()
            cross = (lora_b * F.linear(weight, lora_a)).sum(dim=1)
            quad = ((lora_b @ (lora_a @ lora_a.t())) * lora_b).sum(dim=1)
            return (rows + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def _dora_forward(self, slot: Slot, x: Tensor, out: Tensor | None) -> Tensor:
        lora_a, lora_b = slot.pair()
        drop = slot.dropout
        dropped = drop is not None and drop.training
        scale = slot.magnitude / self.dora_norm(slot)  # gradient reaches the magnitude only
        if out is None:
            # No dropout in play: y = m/||W + sBA|| * (x W^T + s x A^T B^T) + b, the B product accumulated into
            # the base product in place and the rescale + bias one fused op (peft's formula rearranged).
            rows = x.reshape(-1, self.in_features)
            y = linear(rows, self.weight)
            y = y.addmm_(F.linear(rows, lora_a) * slot.scaling, lora_b.t())
            y = torch.addcmul(self.bias, y, scale) if self.bias is not None else y * scale
            return y.view(*x.shape[:-1], self.out_features)
        h = drop(x) if dropped else x
        hh = h.to(lora_a.dtype) if h.dtype != lora_a.dtype else h
        lora = F.linear(F.linear(hh, lora_a), lora_b)
        if dropped:
            base = F.linear(h, self.weight)  # peft: the base part of the correction sees the dropped input
        else:
            base = out - self.bias if self.bias is not None else out
        update = (scale - 1) * base.to(scale.dtype) + scale * lora * slot.scaling
        return out + update.to(out.dtype)

    def _mixed(self, x: Tensor, out: Tensor, routing: RowRouting) -> Tensor:
        """Each row with its own adapter in one pass (see :class:`RowRouting`)."""
        plan = routing.plan(self, x)
        if plan is None:
            return out
        xr = x.reshape(x.size(0), -1, self.in_features).to(plan.flat_a.dtype)  # (B, T, in)
        if plan.mask is not None:
            up = F.linear(F.linear(xr, plan.flat_a) * plan.mask.unsqueeze(1), plan.flat_b)  # (B, T, out)
        else:
            a_rows, b_rows = plan.gathered()
            up = torch.bmm(torch.bmm(xr, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        if plan.g_rows is not None:  # DoRA rows: (m/||W + dW|| - 1) times the base output without bias
            base = out - self.bias if self.bias is not None else out
            up = up + plan.g_rows.unsqueeze(1) * base.reshape(up.shape).to(up.dtype)
        return out + up.view(out.shape).to(out.dtype)

    # --- weights ---

    def delta_weight(self, name: str | None = None) -> Tensor:
        """``scaling * B @ A`` of adapter ``name`` (default: the active one) in fp32, shaped like ``weight``."""
        slot = self.slot(name)
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for start, stop, lora_a, lora_b in slot.pieces():
            delta[start:stop] = (lora_b.detach().float() @ lora_a.detach().float()) * slot.scaling
        return delta

    def effective_factors(self, name: str | None = None) -> tuple[Tensor, Tensor]:
        """``(A', B')`` with ``B' A' = scaling * B A`` over the whole layer (q/k/v pairs as a block matrix)."""
        slot = self.slot(name)
        pieces = slot.pieces()
        a = torch.cat([p[2].detach() for p in pieces], dim=0)
        b = torch.zeros(self.out_features, a.shape[0], dtype=a.dtype, device=a.device)
        col = 0
        for start, stop, _, lora_b in pieces:
            b[start:stop, col:col + lora_b.shape[1]] = lora_b.detach() * slot.scaling
            col += lora_b.shape[1]
        return a, b

    def dora_factor(self, name: str | None = None) -> Tensor:
        """DoRA's ``m / ‖W + s B A‖`` (out,) of adapter ``name`` (unmerged layers only)."""
        slot = self.slot(name)
        return slot.magnitude.detach() / self.dora_norm(slot)

    def merged_weight(self, name: str | None = None) -> Tensor:
        """The weight (fp32) that merging adapter ``name`` into the current (unmerged) weight gives."""
        slot = self.slot(name)
        weight = self.weight.detach().float() + self.delta_weight(slot.name).to(self.weight.device)
        if not slot.use_dora:
            return weight
        return (slot.magnitude.detach().float() / torch.linalg.norm(weight, dim=1)).unsqueeze(1) * weight

    def _merge_target(self) -> Slot | None:
        if self.routing is not None:
            raise ConfigError("merge inside a mixed-batch forward is not possible")
        return self.slots.get(self.active_adapter) if self.active_adapter is not None else None

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapter's update into ``weight`` (in fp32, cast back); a no-op when already merged.

        While merged the forward is the base linear alone, so the adapter gets no gradients: unmerge before
        training on. A layer without the active adapter counts as merged too (nothing to add).
        """
        if self.merged:
            return
        slot = self._merge_target()
        if slot is not None:
            merged = self.merged_weight(slot.name)
            if slot.use_dora:
                self._merge_factor = slot.magnitude.detach().float() / torch.linalg.norm(
                    self.weight.float() + self.delta_weight(slot.name), dim=1)
            self._store_merged(merged)
        self.merged, self.merged_adapter = True, self.active_adapter

    def _store_merged(self, merged: Tensor) -> None:
        held_from = getattr(self.weight, "held_from", None)  # a frozen base bf16 training held: back to its dtype
        if held_from is not None and held_from != self.weight.dtype:
            self.weight.data = merged.to(held_from)
            del self.weight.held_from
            return
        self.weight.copy_(merged.to(self.weight.dtype))

    def _restored_weight(self) -> Tensor:
        slot = self.slots[self.merged_adapter]
        delta = self.delta_weight(slot.name)
        if slot.use_dora:
            return self.weight.float() / self._merge_factor.unsqueeze(1) - delta
        return self.weight.float() - delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out of ``weight`` again; a no-op when not merged.

        In fp32 this restores the base weight to rounding (~1e-7 relative); with bf16/fp16 base
        weights merge + unmerge rounds twice, so keep an unmerged copy if you need bit-exact weights.
        """
        if not self.merged:
            return
        if self.merged_adapter in self.slots:
            self._restore()
        self.merged, self.merged_adapter, self._merge_factor = False, None, None

    def _restore(self) -> None:
        self.weight.copy_(self._restored_weight().to(self.weight.dtype))

    def extra_repr(self) -> str:
        names = ", ".join(f"{n}(rank={s.rank}, scaling={s.scaling:g}{', dora' if s.use_dora else ''}"
                          f"{', parts=' + ''.join(s.parts) if s.parts else ''})" for n, s in self.slots.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{names}], "
                f"active={self.active_adapter}, merged={self.merged}")


class TiedLoRALinear(LoRALinear):
    """LoRA on an LM head that shares its weight with ``transformer.wte``.

    Unmerged, the forward reads the shared weight and adds the LoRA update, so the input embeddings never
    change. Merging unties the head: it gets a weight of its own (shared + update) and ``wte`` stays as it
    was; unmerging ties it to the very same shared tensor again (exactly, no subtraction).
    """

    def _setup(self, base: nn.Linear) -> None:
        super()._setup(base)
        self._shared: tuple[nn.Parameter, ...] = ()  # a tuple, so the tied tensor is not registered twice

    def _store_merged(self, merged: Tensor) -> None:
        shared = self.weight
        self._shared = (shared,)
        self.weight = nn.Parameter(merged.to(device=shared.device, dtype=shared.dtype), requires_grad=False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self._merge_target() is None:  # nothing to add: stay tied
            self.merged, self.merged_adapter = True, self.active_adapter
            return
        super().merge()

    def _restore(self) -> None:
        if self._shared:
            self.weight = self._shared[0]
            self._shared = ()


class QKVLoRALinear(LoRALinear):
    """The fused query/key/value layer ``c_attn`` with a separate LoRA pair on each chosen slice.

    ``y = x W^T + b`` plus, on output slice ``q`` (``k``, ``v``), ``scaling * B_q A_q dropout(x)`` — exactly
    the parametrisation of code with separate query, key and value layers, while the base keeps the fused
    keys ``weight`` / ``bias``. Adapter tensors are ``lora_q_A`` (rank, in) and ``lora_q_B`` (out/3, rank),
    likewise for k and v; scaling and initialisation follow ``style`` as in :class:`LoRALinear`.
    """

    PARTS = PARTS

    def __init__(self, base: nn.Linear, parts: tuple[str, ...], rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, style: str = "peft",
                 generator: torch.Generator | None = None, *, init: str = "kaiming") -> None:
        nn.Module.__init__(self)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"QKVLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if base.out_features % 3:
            raise ConfigError(f"QKVLoRALinear wraps a fused query/key/value layer, whose out_features is "
                              f"divisible by 3; got {base.out_features}")
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise ConfigError(f"QKVLoRALinear parts: expected a non-empty subset of q, k, v, got {list(parts)}")
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, style=style, init=init)
        self._setup(base)
        self.add_slot(DEFAULT_ADAPTER, config, tuple(parts), generator)

    @property
    def parts(self) -> tuple[str, ...]:
        return self._default().parts

    @property
    def width(self) -> int:
        return self.out_features // 3

    def pair(self, part: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)`` of slice ``part`` of the default adapter."""
        return self._default().pair(part)


#: Module types that carry LoRA tensors.
LoRALayer = LoRALinear
LORA_LAYERS = (LoRALinear,)


#: Mixed batches compute every present adapter's LoRA product for every row and mask the other adapters'
#: columns out while the adapters' ranks add up to at most this (a few adapters: two plain matmuls, no
#: per-row copies); beyond it each row's factors are gathered and multiplied with batched matmuls.
DENSE_WIDTH = 256


@dataclass(eq=False)
class MixedPlan:
    """One layer's factors for the rows of a mixed batch (see :class:`RowRouting`)."""

    flat_a: Tensor
    """(K R, in): the A' of the K adapters present in the batch, each zero-padded to R rows."""
    flat_b: Tensor
    """(out, K R): their B' (scaling, and DoRA's m/||W + dW||, folded in), in the same column blocks."""
    mask: Tensor | None
    """(B, K R): ones on the columns of each row's adapter (dense path), None on the gather path."""
    rows: Tensor
    """(B,): each row's adapter as 1..K, 0 for none on this layer (gather path)."""
    g_rows: Tensor | None
    """(B, out): DoRA's m/||W + dW|| - 1 for each row's adapter (0 for the others); None without DoRA."""
    rank: int

    def gathered(self) -> tuple[Tensor, Tensor]:
        """Each row's (A', B') as (B, R, in) and (B, out, R): slot 0 is zeros."""
        k = self.flat_a.shape[0] // self.rank
        a = self.flat_a.view(k, self.rank, -1)
        b = self.flat_b.view(self.flat_b.shape[0], k, self.rank).permute(1, 0, 2)
        a = torch.cat([a.new_zeros(1, *a.shape[1:]), a])
        b = torch.cat([b.new_zeros(1, *b.shape[1:]), b])
        return a[self.rows], b[self.rows]


class RowRouting:
    """The adapter of every batch row in a mixed batch, and each layer's factors for them.

    Built once per mixed forward / generation (inference only, so the factors cannot change meanwhile). Per
    layer :meth:`plan` stacks the ``(A', B')`` of the adapters present (scaling folded in, ranks zero-padded
    to the largest) once; the layer then computes ``((x A'^T) ⊙ mask) B'^T`` for the whole batch, which for
    each row is its own adapter's update (two matmuls whatever the number of adapters), or with many
    adapters gathers each row's factors for two batched matmuls.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._plans: dict[int, MixedPlan | None] = {}

    def plan(self, layer: LoRALinear, x: Tensor) -> MixedPlan | None:
        key = id(layer)
        if key in self._plans:
            return self._plans[key]
        if x.size(0) != len(self.names):
            raise ConfigError(f"adapter_names has {len(self.names)} entries but a layer got a batch of "
                              f"{x.size(0)} rows; give one name per row")
        present = [n for n in dict.fromkeys(self.names) if n in layer.slots]
        if not present:
            self._plans[key] = None
            return None
        factors = [layer.effective_factors(n) for n in present]
        dtype = factors[0][0].dtype
        width = max(a.shape[0] for a, _ in factors)
        k = len(present)
        flat_a = torch.zeros(k * width, layer.in_features, dtype=dtype, device=x.device)
        flat_b = torch.zeros(layer.out_features, k * width, dtype=dtype, device=x.device)
        gains = torch.zeros(k + 1, layer.out_features, dtype=dtype, device=x.device)
        dora = False
        for i, (name, (a, b)) in enumerate(zip(present, factors, strict=True)):
            cols = slice(i * width, i * width + a.shape[0])
            flat_a[cols] = a
            flat_b[:, cols] = b
            if layer.slots[name].use_dora:
                factor = layer.dora_factor(name).to(dtype)
                flat_b[:, cols] *= factor.unsqueeze(1)
                gains[i + 1] = factor - 1
                dora = True
        index = {n: i for i, n in enumerate(present, start=1)}
        rows = torch.tensor([index.get(n, 0) for n in self.names], device=x.device)
        mask = None
        if k * width <= DENSE_WIDTH:
            blocks = torch.arange(k * width, device=x.device) // width + 1  # column -> adapter 1..k
            mask = (blocks.unsqueeze(0) == rows.unsqueeze(1)).to(dtype)
        plan = MixedPlan(flat_a, flat_b, mask, rows, gains[rows] if dora else None, width)
        self._plans[key] = plan
        return plan


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRA layer (:class:`LoRALinear` and its subclasses) of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def head_module_name(model: nn.Module) -> str:
    """The output head the ``lm_head`` target wraps: ``score`` on a classifier, else ``lm_head``."""
    for name in (HEAD_NAME, "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"LoRA target 'lm_head': {type(model).__name__} has neither a score nor an lm_head module")


def lora_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(qualified name, q/k/v parts)`` of every module ``config`` wraps; parts are empty but for c_attn
    split into ``attn.q`` / ``attn.k`` / ``attn.v``."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"apply_lora expects a gpt2lora model with transformer.h blocks, got "
                          f"{type(model).__name__}")
    split = [t for t in config.targets if t in QKV_TARGETS]
    parts = tuple(QKV_PARTS[t] for t in split)
    layers: list[tuple[str, tuple[str, ...]]] = []
    for i in config.blocks(len(blocks)):
        for target in config.targets:
            if target in BLOCK_TARGETS:
                layers.append((f"transformer.h.{i}.{target}", ()))
            elif split and target == split[0]:  # one wrapper on c_attn, where the first of q/k/v is listed
                layers.append((f"transformer.h.{i}.attn.c_attn", parts))
    if HEAD_TARGET in config.targets:
        layers.append((head_module_name(model), ()))
    return layers


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules ``config`` wraps (``transformer.h.{i}.<target>``, ``lm_head``/``score``)."""
    return [name for name, _ in lora_layers(model, config)]


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
            wrapped.active_adapter = getattr(model, "active_adapter", None) or adapter
            setattr(parent, child, wrapped)
            module = wrapped
        module.add_slot(adapter, config, parts, generator, where=name)
    model.adapter_router = ADAPTER_ROUTER  # the model layer asks it for mixed batches and per-adapter heads


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int | None = None) -> nn.Module:
    """Wrap the layers ``config`` names with LoRA layers, freeze the rest, return ``model``.

    Block targets get a :class:`LoRALinear`; ``attn.q`` / ``attn.k`` / ``attn.v`` one
    :class:`QKVLoRALinear` on ``c_attn``; ``lm_head`` a :class:`TiedLoRALinear` on a tied LM head (which
    never changes ``wte``), a :class:`LoRALinear` on an untied head or on a classifier's ``score``.
    Trainable afterwards: every adapter tensor, the classification head ``score`` unless LoRA wraps it
    (target ``lm_head``: then its base is frozen) and the biases ``config.train_bias`` names (``all``:
    every parameter named ``*.bias`` as in peft, ``lora_only``: biases of wrapped layers). ``seed`` makes
    the initialisation reproducible. The config is kept as ``model.lora_config``; this adapter is
    ``"default"`` (add more with :func:`gpt2lora.peft.named.add_adapter`).
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    existing = [name for name, _ in lora_modules(model)]
    if existing or getattr(model, "lora_config", None) is not None:
        where = existing[0] if existing else "model.lora_config"
        raise ConfigError(f"apply_lora: LoRA is already applied to this model ({where}); applying it twice "
                          "would wrap LoRA layers again. Load a fresh model, use load_adapter to replace the "
                          "adapter weights, or add_adapter for a second, named adapter.")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    add_to_layers(model, DEFAULT_ADAPTER, config, generator)  # checks everything before changing anything
    keep_base_head(model)
    model.active_adapter = DEFAULT_ADAPTER
    model.lora_configs = {DEFAULT_ADAPTER: config}
    model.lora_config = config
    model.adapter_router = ADAPTER_ROUTER
    set_lora_trainable(model, config.train_bias)
    return model


def keep_base_head(model: nn.Module) -> None:
    """Keep a frozen copy of a classifier's original head (``base_score_weight``, not saved): the base
    model's head for ``disable_adapters``, ``__base__`` rows and new adapters' own heads."""
    head = getattr(model, HEAD_NAME, None)
    if (isinstance(head, nn.Linear) and not isinstance(head, LORA_LAYERS)
            and "base_score_weight" not in model._buffers):
        model.register_buffer("base_score_weight", head.weight.detach().clone(), persistent=False)


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """Every adapter's :class:`LoRAConfig` by name (``{"default": model.lora_config}`` for one adapter)."""
    configs = getattr(model, "lora_configs", None)
    if configs:
        return configs
    config = getattr(model, "lora_config", None)
    return {DEFAULT_ADAPTER: config} if config is not None else {}


def adapter_head(model: nn.Module, name: str) -> nn.Module | None:
    """The classification head adapter ``name`` trains (``score`` for default, ``adapter_heads.<name>``
    otherwise), or None when it has none (a language model, or LoRA on ``score`` itself)."""
    head = getattr(model, HEAD_NAME, None)
    if not isinstance(head, nn.Module) or isinstance(head, LORA_LAYERS):
        return None
    if name == DEFAULT_ADAPTER:
        return head
    heads = getattr(model, "adapter_heads", None)
    return heads[name] if heads is not None and name in heads else None


def adapter_param_name(canonical: str, adapter: str) -> str:
    """Where adapter ``adapter`` keeps the tensor a single-adapter model names ``canonical``.

    ``<layer>.lora_A`` -> ``<layer>.lora_extra.<adapter>.lora_A``, ``score.weight`` ->
    ``adapter_heads.<adapter>.weight``; biases are the base model's, shared by every adapter.
    """
    if adapter == DEFAULT_ADAPTER:
        return canonical
    layer, _, pname = canonical.rpartition(".")
    if pname.startswith("lora_"):
        return f"{layer}.lora_extra.{adapter}.{pname}"
    if canonical.startswith(f"{HEAD_NAME}."):
        return f"adapter_heads.{adapter}.{canonical[len(HEAD_NAME) + 1:]}"
    return canonical


def set_lora_trainable(model: nn.Module, train_bias: str = "none") -> None:
    """Freeze everything, then unfreeze the active adapter's tensors, its classification head (unless LoRA
    wraps ``score``) and the chosen biases."""
    active = getattr(model, "active_adapter", None) or DEFAULT_ADAPTER
    for param in model.parameters():
        param.requires_grad_(False)
    head = adapter_head(model, active)
    if head is not None:
        for param in head.parameters():
            param.requires_grad_(True)
    for _, module in lora_modules(model):
        if train_bias == "lora_only" and active in module.slots and module.bias is not None:
            module.bias.requires_grad_(True)
    if train_bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias") and not name.startswith("adapter_heads."):
                param.requires_grad_(True)
    for _, module in lora_modules(model):
        if active in module.slots:
            for param in module.slots[active].tensors().values():
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


# --- mixed batches -----------------------------------------------------------------------------------------

def _configs(model: nn.Module, verb: str) -> dict[str, LoRAConfig]:
    configs = adapter_configs(model)
    if not configs:
        raise ConfigError(f"{verb}: the model has no LoRA adapters; call apply_lora, add_adapter or load_adapter first")
    return configs


def _require_unmerged(model: nn.Module, verb: str) -> None:
    merged = [name for name, m in lora_modules(model) if m.merged]
    if merged:
        raise ConfigError(f"{verb}: the model's LoRA is merged ({merged[0]} ...); call unmerge_lora(model) first")


def _residual(model: nn.Module) -> str | None:
    return next((n for n, c in adapter_configs(model).items() if is_residual_init(c.init)), None)


def _score_has_lora(model: nn.Module) -> bool:
    return isinstance(getattr(model, HEAD_NAME, None), LORA_LAYERS)


def check_adapter_names(model: nn.Module, adapter_names: object, batch: int) -> list[str]:
    """``adapter_names`` as a list, checked: one known adapter (or ``"__base__"``) per row, inference only."""
    configs = _configs(model, "adapter_names")
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
    _require_unmerged(model, "adapter_names")
    residual = _residual(model)
    if residual is not None:
        raise ConfigError(f"adapter_names: adapter {residual!r} left a residual (PiSSA / OLoRA) in the base "
                          "weights, so no other row could see the base model; save it and load the converted "
                          "adapter onto a fresh model to mix it with others")
    return names


@contextmanager
def route_rows(model: nn.Module, adapter_names: Sequence[str], batch: int) -> Iterator[None]:
    """Within this context row i of every forward uses adapter ``adapter_names[i]``."""
    names = check_adapter_names(model, adapter_names, batch)
    routing = RowRouting(names)
    modules = [m for _, m in lora_modules(model)]
    for module in modules:
        module.routing = routing
    model.lora_routing = routing
    try:
        yield
    finally:
        for module in modules:
            module.routing = None
        model.lora_routing = None


def _own_head_weight(model: nn.Module, name: str) -> Tensor | None:
    """The head weight rows of adapter ``name`` use, or None when ``score``'s own output is right for them."""
    if _score_has_lora(model):
        return None  # LoRA on score: the wrapper routes its rows (or is disabled) itself
    if name == BASE_ADAPTER:
        return model.base_score_weight
    heads = getattr(model, "adapter_heads", None)
    if heads is not None and name in heads:
        return heads[name].weight
    return None


def head_logits(model: nn.Module, pooled: Tensor) -> Tensor:
    """The classifier's logits when adapters carry their own heads: each row through its adapter's head."""
    routing = getattr(model, "lora_routing", None)
    if routing is not None:
        names = routing.names
    elif getattr(model, "adapters_disabled", False):
        names = [BASE_ADAPTER] * pooled.size(0)
    else:
        names = [model.active_adapter] * pooled.size(0)
    out = model.get_submodule(HEAD_NAME)(pooled)
    for name in dict.fromkeys(names):
        weight = _own_head_weight(model, name)
        if weight is None:
            continue
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=pooled.device)
        out = out.index_put((rows,), F.linear(pooled[rows].to(weight.dtype), weight).to(out.dtype))
    return out


class AdapterRouter:
    """What :func:`apply_lora` attaches as ``model.adapter_router``: the model layer calls it for mixed batches
    (``adapter_names=``) and for a classifier whose adapters carry their own heads, without importing LoRA."""

    def route_rows(self, model: nn.Module, adapter_names: Sequence[str], batch: int):
        return route_rows(model, adapter_names, batch)

    def head_logits(self, model: nn.Module, pooled: Tensor) -> Tensor | None:
        """Per-row head logits, or None when ``score``'s own output is right for every row."""
        if (getattr(model, "adapter_heads", None) is None and not getattr(model, "adapters_disabled", False)
                and getattr(model, "lora_routing", None) is None):
            return None
        return head_logits(model, pooled)


ADAPTER_ROUTER = AdapterRouter()
