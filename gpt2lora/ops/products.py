"""Many-row products in half precision on the CPU: whole, or in blocks of rows, whichever this machine runs faster.

oneDNN's bf16 product splits its work over the threads by its own rules, which leave a core idle for some
shapes: on the 2-core AMX Xeon with two threads, 900 rows of GPT-2's (3072 → 768) projection ran at about 1,060
GFLOP/s while 600 or 1,800 rows ran at 1,970-2,230, and the same 900 rows as two products of 450 rows into
one output at about 1,800 (on one thread the blocks were 10% slower). Which is faster depends on the CPU, its
BLAS, the shapes and the thread count, so :func:`product` measures both on first use of each (row count in
steps of ``ROW_STEP``, shapes, layouts, dtype, thread count) and keeps the faster
(:meth:`gpt2lora.ops.few_row.KernelChoice.decide`: decided before any result is used, so a run never mixes
the two once a shape is decided; both compute the same dot products and agree up to float rounding).
fp32 (MKL's products scaled with the threads in every shape measured) and other devices take ``a @ b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .few_row import HALF, KERNELS, KernelChoice

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


def product(a: Tensor, b: Tensor, bias: Tensor | None = None, kernels: KernelChoice | None = None) -> Tensor:
    """``a @ b`` (``+ bias``) for 2-D ``a`` (rows, k) and ``b`` (k, n): a new contiguous (rows, n) tensor.

    For more than ``BLOCK_ROWS`` rows of bf16/fp16 on the CPU, the whole product or the same product in blocks
    of ``BLOCK_ROWS`` rows, the faster as measured on first use (``kernels``: whose measurements, default the
    process's); elsewhere the whole product. Callers are the autograd functions of :mod:`gpt2lora.ops`.
    """
    if (a.device.type != "cpu" or a.dtype not in HALF or a.dim() != 2 or b.dim() != 2 or a.size(0) <= BLOCK_ROWS
            or torch.compiler.is_compiling()):
        return _whole(a, b, bias)
    key = ("product", -(-a.size(0) // ROW_STEP), *b.shape, a.stride(), b.stride(), a.dtype, bias is not None,
           torch.get_num_threads())
    candidates = {"whole": lambda: _whole(a, b, bias), "row blocks": lambda: _row_blocks(a, b, bias)}
    return candidates[(kernels or KERNELS).decide(key, candidates)]()
