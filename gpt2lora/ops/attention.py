"""Scaled dot-product attention; with attention dropout on the CPU, one that keeps no probabilities.

On the CPU, ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` falls back to its math path,
which keeps three float (B, heads, T, S) tensors per layer for backward (the softmax, the dropout
mask and their product) plus copies of q, k and v. :class:`DropoutAttention` keeps q, k, v (views of
the projection's output) and a bool keep mask, and recomputes the probabilities from q and k in
backward: a quarter of one float (B, heads, T, S) tensor per layer, for one extra (T, S) matmul and
softmax per layer in backward. Work is done a few batch rows at a time, so the float
(T, S) blocks alive at once stay near :data:`BLOCK_ELEMENTS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dropout import fill_keep_mask

BLOCK_ELEMENTS = 1 << 19
"""Score elements (rows × heads × T × S) worked on at a time: 512K scores are 1 MB in bf16, 2 MB in fp32.

Each block goes through several elementwise passes (mask, softmax, dropout; in backward also the softmax
gradient), which stay in a core's L2 cache at this size: on the 2-core Xeon a (8, 12, 204, 204) attention
forward + backward took 54 ms in bf16 and 102 ms in fp32 as one 4M-element block, 37 ms and 58 ms a batch
row at a time (CPU time, 1 thread)."""


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
              dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)`` for (B, heads, T, hs) inputs.

    ``attn_mask`` is a bool mask (True = may attend) broadcastable to (B, heads, T, S), or None.
    CPU attention with dropout that needs gradients runs :class:`DropoutAttention`; everything else SDPA.
    """
    if dropout_p == 0.0 or q.device.type != "cpu" or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    B, H, T, _ = q.shape
    S = k.size(2)
    visible = attn_mask
    if visible is None and is_causal:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    rows = batch_rows(H, T, S)
    keep = fill_keep_mask(torch.empty(B, H, T, S, dtype=torch.bool, device=q.device), dropout_p, rows)
    # Contiguous copies replace the strided views of the projection (which they free): the matmuls of
    # forward and backward would otherwise copy each head's slices again every time.
    return DropoutAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), visible, keep, dropout_p)


def batch_rows(heads: int, queries: int, keys: int) -> int:
    """Batch rows per block, so that a block holds about :data:`BLOCK_ELEMENTS` scores (at least one row)."""
    return max(1, BLOCK_ELEMENTS // (heads * queries * keys))


def _rows_of(mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of a mask broadcast over the batch (a mask of batch size 1 or no batch is kept)."""
    if mask is None or mask.dim() < 4 or mask.size(0) == 1:
        return mask
    return mask[start:stop]


def _masking_bias(hidden: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``hidden`` (True = may not attend) as an additive bias: 0 where visible, the dtype's lowest finite value
    where hidden.

    Adding a (batch, 1, T, S) bias broadcast over the heads is several times faster on the CPU than a
    broadcast ``masked_fill_``; the lowest finite value rather than -inf keeps the CPU exp fast, and its
    softmax is the same (every query sees a key, so each hidden score's exp is exactly 0).
    """
    if hidden is None:
        return None
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, torch.finfo(dtype).min)


def _as_values(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The bool ``keep`` as 0/1 ``dtype`` values: converting its bytes and multiplying is several times faster
    on the CPU than ``masked_fill_`` with a full-size mask."""
    return keep.view(torch.uint8).to(dtype)


def _probabilities(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``softmax(q @ k.T * scale + bias)`` over keys, in q's dtype.

    The scale is the product's own factor (no pass over the scores). For bf16 scores the CPU softmax
    kernel normalises in fp32 and rounds once, which is what SDPA's math path computes
    (``softmax(float(x)).to(bf16)``) without writing and converting an fp32 copy.
    """
    B, H, T, D = q.shape
    S = k.size(2)
    scores = q.new_empty(B, H, T, S)
    torch.baddbmm(scores.view(B * H, T, S), q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2),
                  beta=0.0, alpha=scale, out=scores.view(B * H, T, S))
    if bias is not None:
        scores.add_(bias)
    return torch.softmax(scores, dim=-1)


def _product(a: Tensor, b: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """``alpha * a @ b`` for (B, H, m, k) and (B, H, k, n) tensors, the scale applied by the product itself."""
    B, H, m, _ = a.shape
    n = b.size(-1)
    if out is None:
        out = a.new_empty(B, H, m, n)
    flat = out.view(B * H, m, n)
    torch.baddbmm(flat, a.reshape(B * H, m, -1), b.reshape(B * H, -1, n), beta=0.0, alpha=alpha, out=flat)
    return out


class DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q kᵀ / √hs + mask)) v`` with the dropout given as a bool ``keep`` mask (B, heads, T, S).

    Saves q, k, v and the bool mask; backward recomputes the softmax from q and k (the same product, so
    the same probabilities). Dropped probabilities are zeroed in place, and the ``1 / (1 - p)`` of the kept
    ones is applied by the (T, head size) products instead of to the (T, S) blocks; backward uses torch's
    fused softmax backward. Every query must see at least one key (GPT-2's masks let each position see
    itself).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, keep: Tensor,
                dropout_p: float) -> Tensor:
        B, H, T, D = q.shape
        scale, kept_scale = 1.0 / math.sqrt(D), 1.0 / (1.0 - dropout_p)
        hidden = None if visible is None else ~visible
        out = q.new_empty(B, H, T, D)
        step = batch_rows(H, T, k.size(2))
        for start in range(0, B, step):
            stop = min(start + step, B)
            bias = _masking_bias(_rows_of(hidden, start, stop), q.dtype)
            probs = _probabilities(q[start:stop], k[start:stop], bias, scale)
            probs.mul_(_as_values(keep[start:stop], probs.dtype))
            _product(probs, v[start:stop], kept_scale, out=out[start:stop])
        ctx.save_for_backward(q, k, v, hidden, keep)
        ctx.scales = scale, kept_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, hidden, keep = ctx.saved_tensors
        scale, kept_scale = ctx.scales
        grad_out = grad_out.contiguous()
        step = batch_rows(q.size(1), q.size(2), k.size(2))
        if step >= q.size(0):  # one block: its products are the gradients, nothing to copy into place
            return (*_block_grads(q, k, v, grad_out, keep, hidden, scale, kept_scale), None, None, None)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for start in range(0, q.size(0), step):
            rows = slice(start, min(start + step, q.size(0)))
            grad_q[rows], grad_k[rows], grad_v[rows] = _block_grads(
                q[rows], k[rows], v[rows], grad_out[rows], keep[rows], _rows_of(hidden, rows.start, rows.stop),
                scale, kept_scale)
        return grad_q, grad_k, grad_v, None, None, None


def _block_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, keep: Tensor, hidden: Tensor | None,
                 scale: float, kept_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v for one block of batch rows, the probabilities recomputed."""
    probs = _probabilities(q, k, _masking_bias(hidden, q.dtype), scale)
    kept = _as_values(keep, probs.dtype)
    work = probs * kept  # the dropped probabilities the forward used (without 1 / (1 - p))
    grad_v = _product(work.transpose(-1, -2), grad_out, kept_scale)
    grad_probs = _product(grad_out, v.transpose(-1, -2), 1.0, out=work).mul_(kept)
    # softmax backward is linear in its incoming gradient: the kept scale joins the score scale below
    grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    both = scale * kept_scale
    return (_product(grad_scores, k, both), _product(grad_scores.transpose(-1, -2), q, both), grad_v)
