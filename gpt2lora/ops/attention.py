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

from .dropout import fill_keep_mask, scaled_mask

BLOCK_ELEMENTS = 1 << 22
"""Score elements (rows × heads × T × S) worked on at a time: 4M fp32 scores are 16 MB."""


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


def _probabilities(q: Tensor, k: Tensor, hidden: Tensor | None, scale: float) -> Tensor:
    """``softmax(q @ k.T * scale)`` over keys, hidden keys excluded.

    Hidden scores are set to the dtype's lowest finite value rather than -inf: the softmax is the same
    (every query sees a key) and the CPU exp runs several times faster without infinities.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if hidden is not None:
        scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    if scores.dtype in (torch.float16, torch.bfloat16):  # normalise in fp32, as SDPA's math path does
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


class DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q kᵀ / √hs + mask)) v`` with the dropout given as a bool ``keep`` mask (B, heads, T, S).

    Saves q, k, v and the bool mask; backward recomputes the softmax from q and k (the same matmul, so
    the same probabilities).
    Every query must see at least one key (GPT-2's masks let each position see itself).
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
            probs = _probabilities(q[start:stop], k[start:stop], _rows_of(hidden, start, stop), scale)
            probs.mul_(scaled_mask(keep[start:stop], kept_scale, probs.dtype))
            torch.matmul(probs, v[start:stop], out=out[start:stop])
        ctx.save_for_backward(q, k, v, hidden, keep)
        ctx.scales = scale, kept_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, hidden, keep = ctx.saved_tensors
        scale, kept_scale = ctx.scales
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
    probs = _probabilities(q, k, hidden, scale)
    mask = scaled_mask(keep, kept_scale, probs.dtype)
    work = probs * mask  # the dropped probabilities the forward used
    grad_v = torch.matmul(work.transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).mul_(mask)
    row_dot = torch.mul(grad_probs, probs, out=work).sum(dim=-1, keepdim=True)
    grad_scores = grad_probs.sub_(row_dot).mul_(probs).mul_(scale)
    return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v
