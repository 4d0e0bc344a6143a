"""Products on few rows against weights repacked once into a BLAS library's blocked layout.

torch's plain bf16 ``F.linear`` of one or a few rows reads a weight at about half the bandwidth of the fp32
product on an AMX/AVX512-BF16 Xeon, so bf16 weights decoded slower than fp32 ones. oneDNN's linear on a
weight reordered ahead of time (``torch.ops.mkldnn._reorder_linear_weight``, the layout torch's own
compiler uses for linears on CPU) reads it about twice as fast: same products, same fp32 accumulation,
same result as ``F.linear`` (equal in the tests, and within bf16 rounding by contract).

fp32 weights are packed by oneDNN for products of 2 to 32 rows (batched decoding, a serving engine's steps):
there ``F.linear`` repacks the weight on every call, and the packed product was 1.2-1.6x faster on the Xeon
(benchmarks/RESULTS.md). For one fp32 row, MKL's own packed layout for exactly one row
(``torch.ops.mkl._mkl_reorder_linear_weight``) is the candidate: it read GPT-2's LM head about 10% faster
than ``F.linear`` on the Xeon (and its block matrices slower, so those stay unpacked).

Half-precision weights (bf16 or fp16) have a third pack: fbgemm's fp16 layout (``quantized::linear_prepack_fp16``,
in every x86 build of torch), whose product widens the weight to fp32 in registers and accumulates in fp32
(:func:`fp16_packed_linear`). On a 2-core Zen 4 EPYC it read GPT-2 124M's weights at 23-27 GB/s, oneDNN's bf16
pack 17-23 and the fp32 split product 21-30 (one row, five runs): the first kernel there that makes half the
bytes take about half the time. An fp16 copy holds every bf16 value of a model's weights exactly but those below 2**-14 (about 6e-5),
which it rounds to the nearest multiple of 2**-24 (an error far below the product's own bf16 rounding); a weight
with a value beyond fp16's range (65,504) is not packed and stays on ``F.linear``.

Whether a packed product is used is measured (:class:`gpt2lora.ops.few_row.KernelChoice`); only one weight of
each product shape is packed while that is timed, and its pack is dropped if another kernel wins.

The packed copy of a weight is made on its first packed product and kept **on that weight** (an attribute
of the parameter, so it lives and dies with the model that owns it; nothing is cached process-wide). It
records the weight's ``_version``, storage address, shape and strides, and is made again when any of them
changed (an in-place update, a load, ``.data =``). Weights made under ``torch.inference_mode`` have no
version counter and are never packed: the kernel choice decides their shapes apart, among the kernels without a
pack, and a half weight's many-row products on a CPU without bf16 units are widened to fp32 for each call.
Cost: one more copy of every packed weight, as many bytes as the weight itself (250 MB for GPT-2 124M in bf16),
per kind of pack kept: an fp32 weight decoded both one row and several rows at a time may keep MKL's and
oneDNN's (a serving engine's LM head on a Zen 4 EPYC did); :func:`release_packed` frees them. Copying or
pickling a parameter never carries its pack.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import cpu_bf16_units, fp16_packed_available

PACKED_ATTR = "_gpt2lora_packed"
PACK_ROWS = {torch.bfloat16: 1, torch.float32: 16}
"""The dtypes packed, each with the row count its layout is made for (oneDNN's batch-size hint): bf16 packed
for one row reads fastest at one row; an fp32 pack made for 16 rows was as fast as one made for the exact count
at every count from 2 to 32 (1 row: 10-25 % slower, whatever the hint)."""
MIN_ROWS = {torch.bfloat16: 1, torch.float32: 2}
"""Fewest rows oneDNN's packed product is offered for: one fp32 row has MKL's one-row pack instead."""


@functools.cache
def mkl_packed_available() -> bool:
    """Whether torch was built with MKL's packed fp32 linear (``torch.ops.mkl._mkl_linear``)."""
    ops = torch.ops.mkl
    return (torch.backends.mkl.is_available() and hasattr(ops, "_mkl_reorder_linear_weight")
            and hasattr(ops, "_mkl_linear"))


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

    def __init__(self, stamp: tuple, packed: Any, kept: bool = False) -> None:
        self.stamp = stamp
        self.packed = packed
        self.kept = kept
        """Whether a kernel choice kept the packed product for some shape (else the pack is only on trial)."""


class _Packs(dict):
    """A weight's packs by kind. A copied or unpickled parameter holds None in its place and packs its own data
    again."""

    moves = 0
    """How many times a pack was remade because the weight's storage had moved (see :func:`storage_keeps_moving`)."""

    def __init__(self) -> None:
        super().__init__()
        self.unpacked_calls: dict[str, int] = {}
        """Products run without the pack of each kind while a plan put off making it (:func:`count_unpacked_call`)."""

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (type(None), ())


def _stamp(weight: Tensor) -> tuple:
    return (weight._version, weight.data_ptr(), weight.shape, weight.stride())


ONEDNN, MKL, FP16 = "onednn", "mkl", "fbgemm_fp16"
"""The kinds of pack: oneDNN's (bf16, and fp32 for several rows), MKL's (fp32, one row) and fbgemm's fp16 (bf16 and
fp16 weights)."""
FP16_MAX = float(torch.finfo(torch.float16).max)
HALF = (torch.bfloat16, torch.float16)
"""The half-precision dtypes."""


def _reorder(weight: Tensor, kind: str, bias: Tensor | None) -> Any:
    if kind == MKL:
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
    if kind == FP16:
        if not weight.abs().amax() <= FP16_MAX:  # fbgemm would saturate it (an inf or a NaN lands here too)
            return None
        return torch.ops.quantized.linear_prepack_fp16(weight.float(), None if bias is None else bias.float())
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS[weight.dtype])


def _packs_of(weight: Tensor) -> _Packs:
    """The pack store kept on ``weight``, made empty if it has none yet (or holds a copy's None)."""
    packs = weight.__dict__.get(PACKED_ATTR)
    if packs is None:
        packs = weight.__dict__[PACKED_ATTR] = _Packs()
    return packs


def packed_weight(weight: Tensor, kind: str = ONEDNN, bias: Tensor | None = None, keep: bool = False) -> Any:
    """``weight``'s packed copy of ``kind``, made now if it has none or if the weight changed since it was made
    (``None`` for an fp16 pack of a weight beyond fp16's range). An fp16 pack holds ``bias`` too (fbgemm adds it
    inside the product: one pass less a call) and is made again when the bias changes. ``keep``: held for good,
    not only while a kernel choice times it (see :func:`settle_pack`)."""
    if not can_hold_pack(weight, bias):
        return _reorder(weight, kind, bias)  # no version counter to notice an in-place change: for this call only
    stamp = _stamp(weight) + (_stamp(bias) if bias is not None else ())
    packs = _packs_of(weight)
    pack = packs.get(kind)
    if pack is not None and pack.stamp[1] != stamp[1]:
        packs.moves += 1
    if pack is None or pack.stamp != stamp:
        with torch.no_grad():
            packed = _reorder(weight.detach(), kind, None if bias is None else bias.detach())
        pack = packs[kind] = _Pack(stamp, packed, kept=pack is not None and pack.kept)
    pack.kept = pack.kept or keep
    return pack.packed


def remake_pack(weight: Tensor, kind: str) -> None:
    """Have ``weight``'s pack of ``kind``, if it holds one, made again at its next packed product (kept if it was):
    a kernel choice timing that product's first run then times making the pack, which a plan weighs
    (:class:`gpt2lora.ops.few_row.PackPlan`), also for a weight a prompt's forward packed already."""
    packs = weight.__dict__.get(PACKED_ATTR)
    pack = packs.get(kind) if packs is not None else None
    if pack is not None:
        pack.stamp = (None, *pack.stamp[1:])  # stale, not moved


def has_pack(weight: Tensor, kind: str) -> bool:
    """Whether ``weight`` holds a pack of ``kind`` (made for its current data or not: its product remakes a stale one)."""
    packs = weight.__dict__.get(PACKED_ATTR)
    return packs is not None and kind in packs


def count_unpacked_call(weight: Tensor, kind: str) -> int:
    """Count one more product of ``weight`` run without its pack of ``kind``; the count so far, this one included.
    Kept with the weight's packs: a copied or pickled parameter starts again from 0."""
    packs = _packs_of(weight)
    calls = packs.unpacked_calls[kind] = packs.unpacked_calls.get(kind, 0) + 1
    return calls


def settle_pack(weight: Tensor, kind: str, chosen: bool) -> None:
    """A kernel choice that timed ``weight``'s packed product of ``kind`` decided: keep the pack when ``chosen``;
    drop it when not, unless another shape's choice kept it (a pack is as large as its weight)."""
    packs = weight.__dict__.get(PACKED_ATTR)
    pack = packs.get(kind) if packs is not None else None
    if pack is None:
        return
    if chosen:
        pack.kept = True
    elif not pack.kept:
        del packs[kind]
        if not packs and not packs.unpacked_calls:
            del weight.__dict__[PACKED_ATTR]


MOVES_TO_STOP_PACKING = 2
"""Storage moves after which a weight is not packed again: FSDP gathers a sharded weight into new memory for
every forward, so its pack (51 ms for GPT-2's bf16 head on one thread) would be remade on every step."""


def storage_keeps_moving(weight: Tensor) -> bool:
    """Whether ``weight``'s packs were remade for a moved storage ``MOVES_TO_STOP_PACKING`` times; its packs are
    dropped then, and the caller should take the plain product."""
    packs = weight.__dict__.get(PACKED_ATTR)
    if packs is None or packs.moves < MOVES_TO_STOP_PACKING:
        return False
    packs.clear()
    return True


def can_hold_pack(weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether a pack made for ``weight`` (and ``bias``) can be kept on it: not for tensors made under
    ``torch.inference_mode``, which have no version counter to tell that they changed since."""
    return not weight.is_inference() and (bias is None or not bias.is_inference())


def can_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`packed_linear` is offered for ``F.linear(x, weight, bias)`` here: bf16 on a CPU with bf16
    units, or fp32 for 2 rows or more, where torch has oneDNN's packed linear."""
    return (weight.dtype in PACK_ROWS and x.dtype == weight.dtype and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and can_hold_pack(weight, bias)
            and x.numel() >= MIN_ROWS[weight.dtype] * weight.size(1)
            and (bias is None or bias.dtype == weight.dtype) and packed_linear_available(weight.dtype))


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``weight``'s oneDNN-packed copy (no gradients: decoding only)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")


def can_mkl_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`mkl_packed_linear` is offered for ``F.linear(x, weight, bias)``: one fp32 row on the CPU,
    where torch has MKL's packed linear."""
    return (weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.dim() == 2
            and x.numel() == weight.size(1) and x.device.type == "cpu" and weight.device.type == "cpu"
            and can_hold_pack(weight, bias) and (bias is None or bias.dtype == torch.float32)
            and mkl_packed_available())


def mkl_packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` of one row through ``weight``'s MKL-packed copy (decoding only)."""
    out = torch.ops.mkl._mkl_linear(x.reshape(1, -1).contiguous(), packed_weight(weight, MKL), weight, bias, 1)
    return out.view(*x.shape[:-1], weight.size(0))


def _fp16_product_runs(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether fbgemm's fp16 product can compute ``F.linear(x, weight, bias)``: a bf16 or fp16 weight and input on
    the CPU, where torch has fbgemm's fp16 linear and the quantized engine packs with fbgemm."""
    return (weight.dtype in HALF and x.dtype == weight.dtype and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and (bias is None or bias.dtype == weight.dtype) and fp16_packed_available()
            and torch.backends.quantized.engine in ("fbgemm", "x86"))


def can_fp16_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`fp16_packed_linear` is offered for ``F.linear(x, weight, bias)``: fbgemm's fp16 product runs
    it, and the pack can be kept on the weight."""
    return _fp16_product_runs(x, weight, bias) and can_hold_pack(weight, bias)


@functools.cache
def half_products_emulated() -> bool:
    """Whether torch computes bf16 products on this CPU by widening to fp32 in software: no bf16 units
    (:func:`gpt2lora.devices.cpu_bf16_units`). On a 2-core Zen 3 EPYC (AVX2) bf16 ``F.linear`` of a 3072x768
    weight took 3.6x fp32's time at 16 rows and 8x at 512 (other layouts of the same product up to 100x), while
    fbgemm's fp16 product took 0.5-0.9x fp32's (a CPU fact: cached)."""
    return not cpu_bf16_units()


def takes_fp16_pack_route(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` is a half-precision product that needs no gradient on a CPU whose
    half products are emulated (:func:`half_products_emulated`), which fbgemm's fp16 pack computes instead (or
    fp32 copies, for a weight that keeps no pack: :func:`half_inference_linear`): the way a bf16 model runs
    inference (a prompt's forward, any forward without gradients) on such a CPU at fp32's speed or better."""
    return (weight.dtype in HALF and half_products_emulated()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and _fp16_product_runs(x, weight, bias))


WIDENED_ATTR = "_gpt2lora_widened"
"""Set on a half weight whose many-row product ran once widened to fp32 (see :func:`half_inference_linear`)."""


def half_inference_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A product :func:`takes_fp16_pack_route` sends here: the weight's first one widened to fp32 for the call,
    later ones on its fp16 pack, made at the second and kept. fbgemm packs about 70M weights a second on a Zen 3
    EPYC (1.2 s for GPT-2's block matrices, where their 300-token prompt takes 0.5 s in fp32), so a single
    prompt (``gpt2lora generate``) does not pay for a pack it would not use again, while a server's prompts
    do after their first.

    A weight that cannot keep a pack (made under ``torch.inference_mode``, or one whose storage keeps moving) is
    widened for every such product: a 256-token bf16 forward of GPT-2 124M took 6x as long on torch's emulated
    bf16 ``F.linear`` there."""
    if not can_hold_pack(weight, bias) or storage_keeps_moving(weight):
        return _widened_linear(x, weight, bias)
    packs = weight.__dict__.get(PACKED_ATTR)
    if (packs is not None and FP16 in packs) or weight.__dict__.get(WIDENED_ATTR):
        return fp16_packed_linear(x, weight, bias, keep=True)
    weight.__dict__[WIDENED_ATTR] = True
    return _widened_linear(x, weight, bias)


def _widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` on fp32 copies of the operands, rounded once to ``x``'s dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def fp16_packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, keep: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` for a half-precision weight through its fbgemm fp16 copy: the input widened
    to fp32, fp32 accumulation, the bias added in fp32 (packed with the weight) and the result rounded once to
    the input's dtype (no gradients). ``keep``: as :func:`packed_weight`'s."""
    packed = packed_weight(weight, FP16, bias, keep)
    if packed is None:
        return F.linear(x, weight, bias)
    out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, weight.size(1)).float(), packed)
    return out.to(x.dtype).view(*x.shape[:-1], weight.size(0))


def release_packed(model: nn.Module) -> int:
    """Free the packed copies held by ``model``'s parameters; returns their bytes."""
    freed = 0
    for param in model.parameters():
        freed += _held(param.__dict__.pop(PACKED_ATTR, None)) * param.numel() * param.element_size()
    return freed


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed copies ``model``'s weights hold (each as large as its weight)."""
    return sum(_held(p.__dict__.get(PACKED_ATTR)) * p.numel() * p.element_size() for p in model.parameters())


def _held(packs: _Packs | None) -> int:
    """How many packed copies ``packs`` holds (an fp16 pack refused for its range holds none)."""
    return sum(pack.packed is not None for pack in (packs or {}).values())
