"""LoRA layers: :class:`LoRALinear` around an ``nn.Linear``, its tied-head and fused q/k/v variants, and the
per-adapter :class:`Slot` that says where an adapter's tensors live on a layer and what they compute.

A wrapped layer keeps its base tensors under the keys of a plain linear layer (``<name>.weight``,
``<name>.bias``) and adds ``<name>.lora_A`` and ``<name>.lora_B`` (and ``<name>.lora_magnitude_vector``
with DoRA). :class:`QKVLoRALinear` puts a pair on each chosen slice of the fused ``c_attn`` (``lora_q_A``,
``lora_q_B``, ...), and :class:`TiedLoRALinear` wraps an LM head that shares ``wte``.

One wrapper can hold several adapters: the ``"default"`` adapter's tensors sit on the wrapper itself under
the names above, every other adapter's under ``<name>.lora_extra.<adapter>.``. A layer declares its adapter
tensors itself (:meth:`LoRALinear.adapter_params`, as torchtune's adapter protocol does); the trainable set,
saving, merging and counting are derived from that. The forward applies the layer's active adapter, none
while disabled, or a different adapter per batch row when a :class:`~gpt2lora.peft.mixed.RowRouting` is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig, is_residual_init
from ..errors import ConfigError
from ..ops.few_row import linear
from ..ops.lora_product import LoRAProduct
from .init import check_rank_fits, initial_factors
from .slots import DEFAULT_ADAPTER, PARTS, AdapterFactors, Slot, adapter_parameter

if TYPE_CHECKING:
    from .mixed import RowRouting


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
        """Per-row adapters of a mixed batch (set by :meth:`gpt2lora.peft.registry.AdapterRegistry.route_rows`)."""
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
            setattr(owner, prefix + "A", adapter_parameter((config.rank, self.in_features), self.weight))
            setattr(owner, prefix + "B", adapter_parameter((stop - start, config.rank), self.weight))
        if config.use_dora:
            owner.lora_magnitude_vector = adapter_parameter((self.out_features,), self.weight)
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

    def adapter_params(self, adapter: str = DEFAULT_ADAPTER) -> tuple[str, ...]:
        """Names (relative to this layer) of adapter ``adapter``'s tensors here, empty when it is not here.

        The layer's declaration of what is adapter state (torchtune's adapter protocol): the trainable set,
        the adapter files, merging, counting and diagnostics are derived from it.
        """
        slot = self.slots.get(adapter)
        if slot is None:
            return ()
        prefix = "" if adapter == DEFAULT_ADAPTER else f"lora_extra.{adapter}."
        return tuple(prefix + name for name in slot.param_names())

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
            return self.routing.apply(self, x, linear(x, self.weight, self.bias))
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

    def _store_in_held_dtype(self, merged: Tensor) -> bool:
        """A frozen base bf16 training held in bf16 goes back to its checkpoint's dtype; whether it was one."""
        held_from = getattr(self, "weight_held_from", None)
        if held_from is None or held_from == self.weight.dtype:
            return False
        self.weight.data = merged.to(held_from)
        del self.weight_held_from
        return True

    def _store_merged(self, merged: Tensor) -> None:
        if not self._store_in_held_dtype(merged):
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
        if self._store_in_held_dtype(merged):
            return
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


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRA layer (:class:`LoRALinear` and its subclasses) of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module
