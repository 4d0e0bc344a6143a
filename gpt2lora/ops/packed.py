"""Products on few rows against weights repacked once into oneDNN's blocked layout.

torch's plain bf16 ``F.linear`` of one or a few rows reads a weight at about half the bandwidth of the fp32
product on an AMX/AVX512-BF16 Xeon, so bf16 weights decoded slower than fp32 ones. oneDNN's linear on a
weight reordered ahead of time (``torch.ops.mkldnn._reorder_linear_weight``, the layout torch's own
compiler uses for linears on CPU) reads it about twice as fast: same products, same fp32 accumulation,
same result as ``F.linear`` (equal in the tests, and within bf16 rounding by contract).

fp32 weights are packed for products of 2 to 32 rows (batched decoding, a serving engine's steps): there
``F.linear`` repacks the weight on every call, and the packed product was 1.2-1.6x faster on the Xeon
(benchmarks/RESULTS.md). One fp32 row is never packed: MKL's matrix-vector product already reads the weight
at the machine's read bandwidth, so a pack would double the weights' memory for nothing.

The packed copy of a weight is made on its first packed product and kept **on that weight** (an attribute
of the parameter, so it lives and dies with the model that owns it; nothing is cached process-wide). It
records the weight's ``_version``, storage address, shape and strides, and is made again when any of them
changed (an in-place update, a load, ``.data =``). Weights made under ``torch.inference_mode`` have no
version counter and are left to ``F.linear``. Cost: one more copy of every packed weight, as many bytes
as the weight itself (250 MB for GPT-2 124M in bf16); a pack made only to time it is dropped when the kernel
choice keeps another kernel (:func:`settle_pack`), and :func:`release_packed` frees the rest. Copying or pickling
a parameter never carries its pack.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..devices import cpu_bf16_units

PACKED_ATTR = "_gpt2lora_packed"
PACK_ROWS = {torch.bfloat16: 1, torch.float32: 16}
"""The dtypes packed, each with the row count its layout is made for (oneDNN's batch-size hint): bf16 packed
for one row reads fastest at one row; an fp32 pack made for 16 rows was as fast as one made for the exact count
at every count from 2 to 32 (1 row: 10-25 % slower, whatever the hint)."""
MIN_ROWS = {torch.bfloat16: 1, torch.float32: 2}
"""Fewest rows a packed product is offered for: one fp32 row stays with MKL's matrix-vector product."""


@functools.cache
def packed_linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch has oneDNN's packed linear, and for bf16 whether the CPU has bf16 units to run it (a fact
    of the build and the CPU)."""
    ops = torch.ops.mkldnn
    return (dtype in PACK_ROWS and torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise") and (dtype != torch.bfloat16 or bool(cpu_bf16_units())))


class _Pack:
    """A weight's packed copy and the state of the weight it was made from."""

    __slots__ = ("kept", "packed", "stamp")

    def __init__(self, stamp: tuple, packed: Tensor) -> None:
        self.stamp = stamp
        self.packed = packed
        self.kept = False
        """Whether a kernel choice kept the packed product for some shape (else the pack is only on trial)."""

    # A copied or unpickled parameter holds None in its place and packs its own data again.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (type(None), ())


def _stamp(weight: Tensor) -> tuple:
    return (weight._version, weight.data_ptr(), weight.shape, weight.stride())


def packed_weight(weight: Tensor) -> Tensor:
    """``weight``'s packed copy, made now if it has none or if the weight changed since it was made."""
    rows = PACK_ROWS[weight.dtype]
    if weight.is_inference():  # no version counter to notice an in-place change: packed for this call only
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    stamp = _stamp(weight)
    pack = weight.__dict__.get(PACKED_ATTR)
    if pack is None or pack.stamp != stamp:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        kept = pack is not None and pack.kept
        pack = _Pack(stamp, packed)
        pack.kept = kept
        weight.__dict__[PACKED_ATTR] = pack
    return pack.packed


def settle_pack(weight: Tensor, chosen: bool) -> None:
    """A kernel choice that timed ``weight``'s packed product decided: keep the pack when ``chosen``; drop it
    when not, unless another shape's choice kept it (a pack is as large as its weight)."""
    pack = weight.__dict__.get(PACKED_ATTR)
    if pack is None:
        return
    if chosen:
        pack.kept = True
    elif not pack.kept:
        del weight.__dict__[PACKED_ATTR]


def can_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`packed_linear` is offered for ``F.linear(x, weight, bias)`` here: bf16 on a CPU with bf16
    units, or fp32 for 2 rows or more, where torch has oneDNN's packed linear."""
    return (weight.dtype in PACK_ROWS and x.dtype == weight.dtype and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and not weight.is_inference()
            and x.numel() >= MIN_ROWS[weight.dtype] * weight.size(1)
            and (bias is None or bias.dtype == weight.dtype) and packed_linear_available(weight.dtype))


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``weight``'s packed copy (no gradients: decoding only)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")


def release_packed(model: nn.Module) -> int:
    """Free the packed copies held by ``model``'s parameters; returns the bytes their weights hold."""
    freed = 0
    for param in model.parameters():
        if param.__dict__.pop(PACKED_ATTR, None) is not None:
            freed += param.numel() * param.element_size()
    return freed


def packed_bytes(model: nn.Module) -> int:
    """Bytes of weights that currently hold a packed copy (the copies take as many again)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.__dict__.get(PACKED_ATTR) is not None)
