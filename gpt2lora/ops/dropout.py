"""Dropout that saves a 1-byte keep mask and, on the CPU, draws 16 random bits per element.

torch's CPU dropout draws a uniform double per element (``bernoulli_``, two 32-bit draws) and keeps
the scaled float mask for backward: 4 bytes per activation element. :func:`dropout` keeps
``draw >= round(p · 2¹⁵)`` for a 15-bit uniform draw as a bool mask and saves only that, so its
backward holds a quarter of the memory. The draws are made as 64-bit integers, each cut into four
16-bit lanes whose top bit is cleared: torch's CPU generator makes 64-bit draws several times faster
per bit than 32-bit ones, and a quarter of the draws of one 32-bit number per element is what makes
the masks of a bf16 training step cheap beside its matrix products. The keep probability is
``1 - round(p · 2¹⁵) / 2¹⁵`` (within 1.6e-5 of ``1 - p``; a ``p`` below 1.6e-5 drops nothing), and the
draws come from torch's default generator: ``torch.manual_seed`` makes masks repeat and gradient
checkpointing replays them. On other devices :func:`dropout` is ``F.dropout`` (their fused kernels
already save a bool mask).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

DRAW_RANGE = 2 ** 15
"""Each element's draw is uniform on [0, 2¹⁵): one 16-bit lane of a 64-bit draw, its top bit cleared."""

LANES_PER_DRAW = 4
LANE_BITS = 0x7FFF_7FFF_7FFF_7FFF
"""Clears the top bit of each 16-bit lane of an int64 draw: the lanes read as int16 values in [0, 2¹⁵)."""


def drop_threshold(p: float) -> int:
    """Draws below this are dropped: ``round(p · 2¹⁵)``."""
    return round(p * DRAW_RANGE)


def fill_keep_mask(keep: Tensor, p: float, rows: int | None = None) -> Tensor:
    """Fill the bool tensor ``keep`` with True where an element is kept (probability ``1 - p``).

    On the CPU the draws are made ``rows`` leading-dimension rows at a time (all at once when None), so
    the transient draws stay small beside a large mask.
    """
    if keep.device.type != "cpu":
        return keep.bernoulli_(1.0 - p)
    threshold = drop_threshold(p)
    for part in keep.split(rows) if rows is not None and keep.dim() > 0 else (keep,):
        count = part.numel()
        draws = torch.empty(-(-count // LANES_PER_DRAW), dtype=torch.int64).random_().bitwise_and_(LANE_BITS)
        torch.ge(draws.view(torch.int16)[:count].view(part.shape), threshold, out=part)
    return keep


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A new bool mask of ``shape``: True with probability ``1 - p``."""
    return fill_keep_mask(torch.empty(shape, dtype=torch.bool, device=device), p)


def scaled_mask(keep: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``keep * scale`` as a ``dtype`` tensor (the bool read as bytes: torch converts those vectorised)."""
    return keep.view(torch.uint8).to(dtype).mul_(scale)


class MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` whose backward saves only the bool ``keep``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * scaled_mask(keep, scale, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad * scaled_mask(keep, ctx.scale, grad.dtype), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout (zero with probability ``p``, scale the rest by ``1 / (1 - p)``), as ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, state and repr) running :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
