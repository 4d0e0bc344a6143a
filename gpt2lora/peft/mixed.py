"""Mixed batches: a different adapter for every batch row in one forward (``adapter_names=[...]``).

A :class:`RowRouting` is set on every LoRA layer for the duration of a mixed forward (see
:meth:`gpt2lora.peft.registry.AdapterRegistry.route_rows`, which checks the names first). Per layer it stacks
the ``(A', B')`` of the adapters present in the batch once and computes each row's update with two matmuls
(masking the other adapters' columns), or with many adapters gathers each row's factors for batched matmuls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
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


    def apply(self, layer: LoRALinear, x: Tensor, out: Tensor) -> Tensor:
        """``out`` (the base layer's output for ``x``) plus each row's own adapter update on ``layer``."""
        plan = self.plan(layer, x)
        if plan is None:
            return out
        xr = x.reshape(x.size(0), -1, layer.in_features).to(plan.flat_a.dtype)  # (B, T, in)
        if plan.mask is not None:
            up = F.linear(F.linear(xr, plan.flat_a) * plan.mask.unsqueeze(1), plan.flat_b)  # (B, T, out)
        else:
            a_rows, b_rows = plan.gathered()
            up = torch.bmm(torch.bmm(xr, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        if plan.g_rows is not None:  # DoRA rows: (m/||W + dW|| - 1) times the base output without bias
            base = out - layer.bias if layer.bias is not None else out
            up = up + plan.g_rows.unsqueeze(1) * base.reshape(up.shape).to(up.dtype)
        return out + up.view(out.shape).to(out.dtype)


@contextmanager
def routed(model: nn.Module, names: list[str]) -> Iterator[RowRouting]:
    """Within this context row i of every forward of ``model`` uses adapter ``names[i]`` (names already checked)."""
    routing = RowRouting(names)
    modules = [m for _, m in lora_modules(model)]
    for module in modules:
        module.routing = routing
    try:
        yield routing
    finally:
        for module in modules:
            module.routing = None
