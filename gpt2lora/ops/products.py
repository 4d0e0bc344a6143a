"""Many-row products on the CPU in the form this machine runs faster: half precision whole or in blocks of rows,
fp32 by MKL or by oneDNN.

oneDNN's bf16 product splits its work over the threads by its own rules, which leave a core idle for some
shapes: on the 2-core AMX Xeon with two threads, 900 rows of GPT-2's (3072 → 768) projection ran at about 1,060
GFLOP/s while 600 or 1,800 rows ran at 1,970-2,230, and the same 900 rows as two products of 450 rows into
one output at about 1,800 (on one thread the blocks were 10% slower). Which is faster depends on the CPU, its
BLAS, the shapes and the thread count, so :func:`product` measures both on first use of each (row count in
steps of ``ROW_STEP``, shapes, layouts, dtype, thread count) and keeps the faster
(:meth:`gpt2lora.ops.few_row.KernelChoice.decide`: decided before any result is used, so a run never mixes
the two once a shape is decided; both compute the same dot products and agree up to float rounding).
fp32 products of more than ``BLOCK_ROWS`` rows on the CPU have another exact form: oneDNN's product (the library
torch's bf16 products run on) in place of MKL's. On a 2-core AVX512-BF16 EPYC (Zen 4) oneDNN ran GPT-2's
training products 5-35% faster than MKL (about 100 against 70-97 GFLOP/s on one thread); MKL's products scaled
with the threads in every shape measured on the AMX Xeon. So fp32 measures the two too, per power-of-two row
count (fewer decisions: fp32 speeds change smoothly with the rows). Other devices take ``a @ b``.

The two forms agree only up to float rounding, and where they run within the timing noise of each other two
processes timing them could keep different ones, so the choices are stored per machine
(:mod:`gpt2lora.ops.stored_choices`): the first process on a machine to meet a shape decides it, every later
one reuses the decision, and runs of the same seed stay identical bit for bit across processes.

:func:`frozen_weight_product` offers one more exact form for a frozen bf16 weight: oneDNN's product on the
weight's packed copy (:mod:`gpt2lora.ops.packed`), which a product against the plain weight re-lays out on every
call. For the LM head (128 rows against the (50257, 768) embedding, the chunked loss's logits) the packed product
took 16-18 ms against 27 ms on one thread of the AMX Xeon (8 against 14 ms on two); GPT-2's block matrices
gained nothing (within 10% either way), so only the head's logits use it. The pack is as large as the weight (77
MB for GPT-2's head in bf16) and is kept only where it was measured faster.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .few_row import HALF, KERNELS, KernelChoice, row_bucket
from .packed import ONEDNN, can_pack, packed_linear, settle_pack, storage_keeps_moving

BLOCK_ROWS = 512
"""Rows of one block of the blocked product; products of at most this many rows are never split."""
ROW_STEP = 256
"""Row counts that share one measured choice: the plain product's speed jumps between counts (600 and 900
rows above), and every decision costs both products timed ``samples`` + 1 times."""


def _whole(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _row_blocks(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    out = a.new_empty(a.size(0), b.size(1))
    for rows, part in zip(a.split(BLOCK_ROWS), out.split(BLOCK_ROWS)):
        if bias is None:
            torch.mm(rows, b, out=part)
        else:
            torch.addmm(bias, rows, b, out=part)
    return out


def _onednn(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


@functools.cache
def onednn_fp32_available() -> bool:
    """Whether torch has oneDNN's linear for fp32 products on the CPU (a fact of the build)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def product(a: Tensor, b: Tensor, bias: Tensor | None = None, kernels: KernelChoice | None = None) -> Tensor:
    """``a @ b`` (``+ bias``) for 2-D ``a`` (rows, k) and ``b`` (k, n): a new contiguous (rows, n) tensor.

    For more than ``BLOCK_ROWS`` rows on the CPU, the faster of two exact forms as measured on first use
    (``kernels``: whose measurements, default the process's): bf16/fp16 whole or in blocks of ``BLOCK_ROWS``
    rows, fp32 by MKL or by oneDNN; elsewhere the whole product. Callers are the autograd functions of
    :mod:`gpt2lora.ops`.
    """
    if (a.device.type != "cpu" or a.dim() != 2 or b.dim() != 2 or a.size(0) <= BLOCK_ROWS
            or torch.compiler.is_compiling()):
        return _whole(a, b, bias)
    if a.dtype in HALF:
        rows = -(-a.size(0) // ROW_STEP)
        candidates = {"whole": lambda: _whole(a, b, bias), "row blocks": lambda: _row_blocks(a, b, bias)}
    elif (a.dtype == torch.float32 and b.dtype == a.dtype and (bias is None or bias.dtype == a.dtype)
          and onednn_fp32_available()):
        rows = row_bucket(a.size(0))
        candidates = {"whole": lambda: _whole(a, b, bias), "onednn": lambda: _onednn(a, b, bias)}
    else:
        return _whole(a, b, bias)
    key = ("product", rows, *b.shape, a.stride(), b.stride(), a.dtype, bias is not None, torch.get_num_threads())
    return candidates[(kernels or KERNELS).decide(key, candidates)]()


PACKED_ROW_STEP = 128
"""Row counts that share one measured choice of :func:`frozen_weight_product` (the chunked loss's blocks)."""


def frozen_weight_product(x: Tensor, weight: Tensor, kernels: KernelChoice | None = None) -> Tensor:
    """``x @ weight.T`` for 2-D ``x`` (rows, k) and ``weight`` (n, k): a new contiguous (rows, n) tensor.

    For a frozen bf16 parameter on a CPU with bf16 units, the product through the weight's packed copy or the
    plain product, the faster as measured on first use of each (rows in steps of ``PACKED_ROW_STEP``, shape,
    dtype, thread count; ``kernels``: whose measurements, default the process's); the pack is dropped when the
    plain product is kept. A trainable weight would be packed again after every update, and a weight whose
    storage keeps moving (FSDP's gathered head) on every step, so both take :func:`product`, as does everything
    else.
    """
    if (not isinstance(weight, torch.nn.Parameter) or weight.requires_grad or x.dim() != 2 or x.dtype not in HALF
            or not can_pack(x, weight, None) or torch.compiler.is_compiling() or storage_keeps_moving(weight)):
        return product(x, weight.t(), kernels=kernels)
    key = ("frozen weight product", -(-x.size(0) // PACKED_ROW_STEP), *weight.shape, x.dtype,
           torch.get_num_threads())
    candidates = {"plain": lambda: product(x, weight.t(), kernels=kernels), "packed": lambda: packed_linear(x, weight)}
    name = (kernels or KERNELS).decide(key, candidates)
    settle_pack(weight, ONEDNN, name == "packed")
    return candidates[name]()
