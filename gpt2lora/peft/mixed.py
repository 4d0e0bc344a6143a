"""Mixed batches: a different adapter for every batch row in one forward (``adapter_names=[...]``).

A :class:`RowRouting` is set on every LoRA layer for the duration of a mixed forward (see
:meth:`gpt2lora.peft.registry.AdapterRegistry.route_rows`, which checks the names first). Per layer it stacks
the ``(A', B')`` of the adapters present in the batch once and computes each row's update with two matmuls
(masking the other adapters' columns), or with many adapters gathers each row's factors for batched matmuls.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .layers import lora_modules

if TYPE_CHECKING:
    from .layers import LoRALinear

#: Mixed batches compute every present adapter's LoRA product for every row and mask the other adapters'
#: columns out while the adapters' ranks add up to at most this (a few adapters: two plain matmuls, no
#: per-row copies); beyond it each row's factors are gathered and multiplied with batched matmuls.
DENSE_WIDTH = 256


@dataclass(eq=False)
class Stack:
    """One layer's factors of a set of adapters, stacked once: what a mixed forward multiplies every row with."""

    a_t: Tensor
    """(in, K R): the A' of the K adapters, each zero-padded to R rows, transposed (contiguous: the products
    of a few rows with it run at about twice the speed of the transposed view's)."""
    b_t: Tensor
    """(K R, out): their B' (scaling, and DoRA's m/||W + dW||, folded in), in the same blocks, transposed."""
    gains: Tensor | None
    """(K + 1, out): DoRA's m/||W + dW|| - 1 per adapter (row 0, no adapter: zeros); None without DoRA."""
    rank: int
    """R, the largest of the adapters' ranks."""
    names: tuple[str, ...]
    _padded: tuple[Tensor, Tensor] | None = None

    @property
    def flat_a(self) -> Tensor:
        """(K R, in): the stacked A'."""
        return self.a_t.t()

    @property
    def flat_b(self) -> Tensor:
        """(out, K R): the stacked B'."""
        return self.b_t.t()

    def padded(self) -> tuple[Tensor, Tensor]:
        """The factors as (K + 1, R, in) and (K + 1, out, R), slot 0 zeros (for gathering rows' factors)."""
        if self._padded is None:
            k = len(self.names)
            a = self.flat_a.reshape(k, self.rank, -1)
            b = self.flat_b.reshape(self.flat_b.shape[0], k, self.rank).permute(1, 0, 2)
            self._padded = (torch.cat([a.new_zeros(1, *a.shape[1:]), a]),
                            torch.cat([b.new_zeros(1, *b.shape[1:]), b]))
        return self._padded


def stack_factors(layer: LoRALinear, names: tuple[str, ...], device: torch.device) -> Stack:
    """The ``(A', B')`` of adapters ``names`` (all on ``layer``) stacked, ranks zero-padded to the largest."""
    factors = [layer.effective_factors(n) for n in names]
    dtype = factors[0][0].dtype
    width = max(a.shape[0] for a, _ in factors)
    k = len(names)
    flat_a = torch.zeros(k * width, layer.in_features, dtype=dtype, device=device)
    flat_b = torch.zeros(layer.out_features, k * width, dtype=dtype, device=device)
    gains = torch.zeros(k + 1, layer.out_features, dtype=dtype, device=device)
    dora = False
    for i, (name, (a, b)) in enumerate(zip(names, factors, strict=True)):
        cols = slice(i * width, i * width + a.shape[0])
        flat_a[cols] = a
        flat_b[:, cols] = b
        if layer.slots[name].use_dora:
            factor = layer.dora_factor(name).to(dtype)
            flat_b[:, cols] *= factor.unsqueeze(1)
            gains[i + 1] = factor - 1
            dora = True
    return Stack(flat_a.t().contiguous(), flat_b.t().contiguous(), gains if dora else None, width, names)


def _stamp(layer: LoRALinear, names: tuple[str, ...]) -> list:
    """What a layer's stacked factors for ``names`` depend on: its base weight and the adapters' tensors (each
    with its in-place version) and their scalings."""
    stamp: list = [layer.weight, layer.weight._version]
    for name in names:
        slot = layer.slots[name]
        stamp += [slot.scaling, slot.use_dora]
        for tensor in slot.tensors().values():
            stamp += [tensor, tensor._version]
    return stamp


def _same(kept: list, stamp: list) -> bool:
    """Whether ``kept`` (tensors held by weak reference) still describes ``stamp``."""
    if len(kept) != len(stamp):
        return False
    for old, new in zip(kept, stamp, strict=True):
        if isinstance(old, weakref.ref):
            if old() is not new:
                return False
        elif old != new:
            return False
    return True


class FactorCache:
    """Stacked factors kept across mixed forwards, for a caller that runs many of them with the same adapters
    (a serving engine's decoding steps): per LoRA layer and adapter set, rebuilt when the layer's weight or an
    adapter's tensors were replaced or changed in place, or their scaling changed. Holds the tensors it
    checks by weak reference only (deleting an adapter frees them); :meth:`clear` drops the stacked copies.

    One object per caller and model (never shared process-wide); the LoRA layers' list is cached too, so call
    :meth:`clear` after adding or deleting adapters.
    """

    def __init__(self, sets_per_layer: int = 4) -> None:
        self.sets_per_layer = sets_per_layer
        self._stacks: dict[int, OrderedDict[tuple[str, ...], tuple[list, Stack]]] = {}
        self._modules: list[LoRALinear] | None = None
        self.builds = 0
        """How many stacks were built (a count for tests and benchmarks)."""

    def modules(self, model: nn.Module) -> list[LoRALinear]:
        if self._modules is None:
            self._modules = [m for _, m in lora_modules(model)]
        return self._modules

    def stack(self, layer: LoRALinear, names: tuple[str, ...], device: torch.device) -> Stack:
        stamp = _stamp(layer, names)
        entries = self._stacks.setdefault(id(layer), OrderedDict())
        hit = entries.get(names)
        if hit is not None and _same(hit[0], stamp) and hit[1].a_t.device == device:
            entries.move_to_end(names)
            return hit[1]
        stack = stack_factors(layer, names, device)
        self.builds += 1
        entries[names] = ([weakref.ref(x) if isinstance(x, Tensor) else x for x in stamp], stack)
        entries.move_to_end(names)
        while len(entries) > self.sets_per_layer:
            entries.popitem(last=False)
        return stack

    def clear(self) -> None:
        self._stacks.clear()
        self._modules = None

    def nbytes(self) -> int:
        """Bytes of the stacked copies held."""
        total = 0
        for entries in self._stacks.values():
            for _, stack in entries.values():
                tensors = [stack.a_t, stack.b_t, stack.gains, *(stack._padded or ())]
                total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total


@dataclass(eq=False)
class MixedPlan:
    """One layer's factors for the rows of a mixed batch (see :class:`RowRouting`)."""

    stack: Stack
    mask: Tensor | None
    """(B, K R): ones on the columns of each row's adapter (dense path), None on the gather path."""
    rows: Tensor
    """(B,): each row's adapter as 1..K, 0 for none on this layer (gather path)."""
    g_rows: Tensor | None
    """(B, out): DoRA's m/||W + dW|| - 1 for each row's adapter (0 for the others); None without DoRA."""

    @property
    def flat_a(self) -> Tensor:
        return self.stack.flat_a

    @property
    def flat_b(self) -> Tensor:
        return self.stack.flat_b

    @property
    def rank(self) -> int:
        return self.stack.rank

    def gathered(self) -> tuple[Tensor, Tensor]:
        """Each row's (A', B') as (B, R, in) and (B, out, R): slot 0 is zeros."""
        a, b = self.stack.padded()
        return a[self.rows], b[self.rows]


class RowRouting:
    """The adapter of every batch row in a mixed batch, and each layer's factors for them.

    Built once per mixed forward / generation (inference only, so the factors cannot change meanwhile). Per
    layer :meth:`plan` stacks the ``(A', B')`` of the adapters present (scaling folded in, ranks zero-padded
    to the largest) once, or takes them from a :class:`FactorCache`; the layer then computes
    ``((x A'^T) ⊙ mask) B'^T`` for the whole batch, which for each row is its own adapter's update (two matmuls
    whatever the number of adapters), or with many adapters gathers each row's factors for two batched matmuls.
    Layers with the same adapters and ranks share one row mask.
    """

    def __init__(self, names: list[str], factors: FactorCache | None = None) -> None:
        self.names = list(names)
        self.factors = factors
        self._wanted = set(self.names)
        self._plans: dict[int, MixedPlan | None] = {}
        self._rows: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def plan(self, layer: LoRALinear, x: Tensor) -> MixedPlan | None:
        key = id(layer)
        if key in self._plans:
            return self._plans[key]
        if x.size(0) != len(self.names):
            raise ConfigError(f"adapter_names has {len(self.names)} entries but a layer got a batch of "
                              f"{x.size(0)} rows; give one name per row")
        present = tuple(n for n in layer.slots if n in self._wanted)  # the layer's order: one key per set
        if not present:
            self._plans[key] = None
            return None
        if self.factors is not None:
            stack = self.factors.stack(layer, present, x.device)
        else:
            stack = stack_factors(layer, present, x.device)
        dtype, width, k = stack.a_t.dtype, stack.rank, len(present)
        shared = (present, width, dtype, x.device)
        if shared not in self._rows:
            index = {n: i for i, n in enumerate(present, start=1)}
            rows = torch.tensor([index.get(n, 0) for n in self.names], device=x.device)
            mask = None
            if k * width <= DENSE_WIDTH:
                blocks = torch.arange(k * width, device=x.device) // width + 1  # column -> adapter 1..k
                mask = (blocks.unsqueeze(0) == rows.unsqueeze(1)).to(dtype)
            self._rows[shared] = (rows, mask)
        rows, mask = self._rows[shared]
        plan = MixedPlan(stack, mask, rows, stack.gains[rows] if stack.gains is not None else None)
        self._plans[key] = plan
        return plan

    def apply(self, layer: LoRALinear, x: Tensor, out: Tensor) -> Tensor:
        """``out`` (the base layer's output for ``x``) plus each row's own adapter update on ``layer``."""
        plan = self.plan(layer, x)
        if plan is None:
            return out
        stack = plan.stack
        xr = x.reshape(x.size(0), -1, layer.in_features).to(stack.a_t.dtype)  # (B, T, in)
        if plan.mask is not None:
            up = torch.matmul(torch.matmul(xr, stack.a_t) * plan.mask.unsqueeze(1), stack.b_t)  # (B, T, out)
        else:
            a_rows, b_rows = plan.gathered()
            up = torch.bmm(torch.bmm(xr, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        if plan.g_rows is not None:  # DoRA rows: (m/||W + dW|| - 1) times the base output without bias
            base = out - layer.bias if layer.bias is not None else out
            up = up + plan.g_rows.unsqueeze(1) * base.reshape(up.shape).to(up.dtype)
        return out + up.view(out.shape).to(out.dtype)


@contextmanager
def routed(model: nn.Module, names: list[str], factors: FactorCache | None = None) -> Iterator[RowRouting]:
    """Within this context row i of every forward of ``model`` uses adapter ``names[i]`` (names already checked);
    stacked factors come from ``factors`` when given (kept across calls)."""
    routing = RowRouting(names, factors)
    modules = factors.modules(model) if factors is not None else [m for _, m in lora_modules(model)]
    for module in modules:
        module.routing = routing
    try:
        yield routing
    finally:
        for module in modules:
            module.routing = None
