"""Scaled dot-product attention; with attention dropout on the CPU, one that keeps no probabilities.

On the CPU, ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` falls back to its math path,
which keeps three float (B, heads, T, S) tensors per layer for backward (the softmax, the dropout
mask and their product) plus copies of q, k and v. :class:`DropoutAttention` keeps q, k, v (views of
the projection's output) and a bool keep mask, and recomputes the probabilities from q and k in
backward: a quarter of one float (B, heads, T, S) tensor per layer, for one extra (T, S) matmul and
softmax per layer in backward. Work is done a few batch rows at a time, so the float
(T, S) blocks alive at once stay near :data:`BLOCK_ELEMENTS`; causal attention over longer sequences is
also cut into blocks of queries (:func:`query_blocks`), each reading only the keys its queries may see.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

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

MIN_QUERY_ROWS = 128
"""Fewest queries in one block of causal attention (:func:`query_blocks`). Every block costs about 20 more
small operations, and in backward adds its key and value gradients to the earlier blocks'. Whole LoRA training
steps of GPT-2 124M on the 2-core Xeon, this attention against the one-block one in one process: on 1024-token
rows 1.32x faster in bf16 (1.47x on one thread), on 512-token rows 1.03x in bf16 and 1.08x in fp32; blocks of
at least 96 or 192 queries were up to 5% slower than 128 (``benchmarks/RESULTS.md``)."""


def query_blocks(heads: int, queries: int, keys: int, causal: bool) -> list[tuple[int, int, int]]:
    """``(first query, end query, end key)`` of each block of queries that causal attention works on at once.

    The last ``queries`` of ``keys`` positions attend causally, so the queries before ``end query`` see only
    the keys before ``end query + keys - queries``: a block skips the later keys' scores (for long sequences
    close to half of them). Blocks hold about :data:`BLOCK_ELEMENTS` scores and at least
    :data:`MIN_QUERY_ROWS` queries; short sequences and non-causal masks are one block of every query and key.
    """
    if not causal or heads * queries * keys <= BLOCK_ELEMENTS or queries < 2 * MIN_QUERY_ROWS:
        return [(0, queries, keys)]
    rows = max(MIN_QUERY_ROWS, BLOCK_ELEMENTS // (heads * keys))
    count = queries // rows
    edges = [i * queries // count for i in range(count + 1)]
    return [(start, stop, stop + keys - queries) for start, stop in itertools.pairwise(edges)]


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
              dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)`` for (B, heads, T, hs) inputs.

    ``attn_mask`` is a bool mask (True = may attend) broadcastable to (B, heads, T, S), or None.
    CPU attention with dropout that needs gradients runs :class:`DropoutAttention`; everything else SDPA.
    """
    if not _runs_dropout_kernels(dropout_p, q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    H, T, S = q.size(1), q.size(2), k.size(2)
    causal = is_causal if attn_mask is None else (len(query_blocks(H, T, S, True)) > 1
                                                  and within_causal(attn_mask, T, S))
    keep = blocked_keep_mask(q.shape, S, dropout_p, causal, q.device)
    # Contiguous copies replace the strided views of the projection (which they free): the matmuls of
    # forward and backward would otherwise copy each head's slices again every time.
    return DropoutAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask, keep, dropout_p, causal)


def _runs_dropout_kernels(dropout_p: float, like: Tensor) -> bool:
    """Whether attention runs this module's dropout kernels (CPU training with dropout) rather than SDPA."""
    return dropout_p != 0.0 and like.device.type == "cpu" and torch.is_grad_enabled()


def within_causal(visible: Tensor, queries: int, keys: int) -> bool:
    """Whether the bool mask ``visible`` (True = may attend; (..., T, S)) lets no query see a key after its own
    position (the last T of S positions being the queries), as every mask GPT-2 builds does."""
    later = torch.ones(queries, keys, dtype=torch.bool, device=visible.device).triu_(keys - queries + 1)
    return visible.dtype == torch.bool and not bool((visible & later).any())


def block_plan(heads: int, queries: int, keys: int, causal: bool) -> tuple[int, list[tuple[int, int, int]], int]:
    """Batch rows per block (so that a block holds about :data:`BLOCK_ELEMENTS` scores, at least one row), the
    :func:`query_blocks` each such group of rows is worked on in, and the scores of the largest block of one row."""
    blocks = query_blocks(heads, queries, keys, causal)
    largest = heads * max((end - first) * stop for first, end, stop in blocks)
    return max(1, BLOCK_ELEMENTS // largest), blocks, largest


def block_scores(batch: int, heads: int, queries: int, keys: int, causal: bool) -> int:
    """Scores in the largest block :class:`DropoutAttention` works on at once (its float temporaries' size)."""
    step, _, largest = block_plan(heads, queries, keys, causal)
    return min(batch, step) * largest


def kept_scores(heads: int, queries: int, keys: int, causal: bool) -> int:
    """Entries of one batch row's attention dropout mask that :func:`blocked_keep_mask` stores: every score of
    a single block, only the blocks' own scores when causal attention is cut into query blocks."""
    return heads * sum((end - first) * stop for first, end, stop in query_blocks(heads, queries, keys, causal))


def blocked_keep_mask(shape: torch.Size | tuple[int, ...], keys: int, p: float, causal: bool,
                      device: torch.device | str = "cpu") -> Tensor:
    """The bool keep mask of attention dropout over (B, heads, T, hs) queries of ``shape``, drawn block by block
    in :class:`DropoutAttention`'s order (:func:`block_plan`).

    One block of every query and key (short or non-causal attention): a (B, heads, T, ``keys``) tensor. Causal
    attention in query blocks: the blocks' masks one after another in a flat tensor of B × :func:`kept_scores`
    entries (keys a block skips have none: for 1024-token rows 44% fewer bytes kept for backward).
    """
    B, H, T = shape[0], shape[1], shape[2]
    step, blocks, _ = block_plan(H, T, keys, causal)
    if len(blocks) == 1:
        return fill_keep_mask(torch.empty(B, H, T, keys, dtype=torch.bool, device=device), p)
    keep = torch.empty(B * kept_scores(H, T, keys, causal), dtype=torch.bool, device=device)
    for part in _keep_parts(keep, B, H, step, blocks):
        fill_keep_mask(part, p)
    return keep


def _keep_parts(keep: Tensor, batch: int, heads: int, step: int, blocks: list[tuple[int, int, int]]) -> list[Tensor]:
    """The (rows, heads, queries, keys) mask of every block of a flat :func:`blocked_keep_mask`, in its order
    (row groups of ``step``, the query blocks of each)."""
    parts, offset = [], 0
    for start in range(0, batch, step):
        rows = min(step, batch - start)
        for first, end, stop in blocks:
            size = rows * heads * (end - first) * stop
            parts.append(keep[offset:offset + size].view(rows, heads, end - first, stop))
            offset += size
    return parts


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


def _causal_square(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The masking bias of a causal block's last ``size`` keys: its queries see the keys up to themselves."""
    return _masking_bias(torch.ones(size, size, dtype=torch.bool, device=device).triu_(1), dtype)


def _as_values(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The bool ``keep`` as 0/1 ``dtype`` values: converting its bytes and multiplying is several times faster
    on the CPU than ``masked_fill_`` with a full-size mask."""
    return keep.view(torch.uint8).to(dtype)


def _probabilities(q: Tensor, k: Tensor, bias: Tensor | None, scale: float, square: Tensor | None = None) -> Tensor:
    """``softmax(q @ k.T * scale + bias)`` over keys, in q's dtype; ``square`` (n, n) is added to the last n keys.

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
    if square is not None:
        scores[..., S - square.size(-1):].add_(square)
    return torch.softmax(scores, dim=-1)


def _product(a: Tensor, b: Tensor, alpha: float, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """``alpha * a @ b`` for (B, H, m, k) and (B, H, k, n) tensors, the scale applied by the product itself;
    written to ``out`` (a view of a larger tensor is written through), or added to it with ``accumulate``."""
    B, H, m, _ = a.shape
    n = b.size(-1)
    if out is None:
        out = a.new_empty(B, H, m, n)
    flat = out.view(B * H, m, n)
    if accumulate:
        flat.baddbmm_(a.reshape(B * H, m, -1), b.reshape(B * H, -1, n), alpha=alpha)
    else:
        torch.baddbmm(flat, a.reshape(B * H, m, -1), b.reshape(B * H, -1, n), beta=0.0, alpha=alpha, out=flat)
    return out


class DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q kᵀ / √hs + mask)) v`` with the dropout given as a bool ``keep`` mask (B, heads, T, S),
    or as the flat mask of the query blocks' parts :func:`blocked_keep_mask` draws for causal attention.

    The mask is ``visible`` (True = may attend, broadcastable to (B, heads, T, S)), or None: every key, or with
    ``causal`` the causal mask of the last T of S positions. ``causal`` (with a ``visible`` that lets no query
    see a later key, :func:`within_causal`) lets the work go in :func:`query_blocks` that skip such keys.
    Saves q, k, v and the bool mask; backward recomputes the softmax from q and k (the same product, so
    the same probabilities). Dropped probabilities are zeroed in place, and the ``1 / (1 - p)`` of the kept
    ones is applied by the (T, head size) products instead of to the (T, S) blocks; backward uses torch's
    fused softmax backward. Every query must see at least one key (GPT-2's masks let each position see
    itself).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, keep: Tensor,
                dropout_p: float, causal: bool = False) -> Tensor:
        hidden = None if visible is None else ~visible
        ctx.save_for_backward(q, k, v, hidden, keep)
        ctx.dropout_p, ctx.causal = dropout_p, causal
        return _attend(q, k, v, hidden, keep, dropout_p, causal)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, hidden, keep = ctx.saved_tensors
        grads = _attend_grads(q, k, v, hidden, keep, ctx.dropout_p, ctx.causal, grad_out.contiguous())
        return *grads, None, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, hidden: Tensor | None, keep: Tensor, dropout_p: float,
            causal: bool) -> Tensor:
    """:class:`DropoutAttention`'s output; ``hidden`` is the mask of keys a query may not see (or None)."""
    B, H, T, D = q.shape
    scale, kept_scale = 1.0 / math.sqrt(D), 1.0 / (1.0 - dropout_p)
    out = q.new_empty(B, H, T, D)
    for block in _blocks(q, k, hidden, causal, keep):
        probs = _probabilities(block.queries(q), block.keys(k), block.bias, scale, block.square)
        probs.mul_(_as_values(block.keep, probs.dtype))
        _product(probs, block.keys(v), kept_scale, out=block.queries(out))
    return out


def _attend_grads(q: Tensor, k: Tensor, v: Tensor, hidden: Tensor | None, keep: Tensor, dropout_p: float,
                  causal: bool, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of q, k and v of :func:`_attend` for a contiguous ``grad_out``."""
    scale, kept_scale = 1.0 / math.sqrt(q.size(-1)), 1.0 / (1.0 - dropout_p)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Each row group's last block reads every key: it writes the key and value gradients, the earlier
    # blocks add to them.
    for block in _blocks(q, k, hidden, causal, keep, last_first=True):
        _block_grads(block.queries(q), block.keys(k), block.keys(v), block.queries(grad_out), block.keep,
                     block.bias, block.square, scale, kept_scale,
                     (block.queries(grad_q), block.keys(grad_k), block.keys(grad_v)),
                     accumulate=block.end < q.size(2))
    return grad_q, grad_k, grad_v


def attention_by_rows(qkv: Tensor, lengths: list[int], heads: int, dropout_p: float) -> Tensor:
    """Causal attention of each sequence over its own tokens: ``qkv`` (tokens, 3 C) holds the rows' projections
    one after another (``lengths`` tokens each); returns (tokens, C). The same as attention over padded rows (a
    query sees exactly its row's keys up to itself), without the padding's scores.

    CPU training with attention dropout runs :class:`RowsAttention`, one autograd node for every row; otherwise
    each row goes through :func:`attention`.
    """
    width = qkv.size(1) // 3
    if sum(lengths) == 0:
        return qkv[:, :width]  # no token (an empty rank): still on the graph
    if _runs_dropout_kernels(dropout_p, qkv):
        return RowsAttention.apply(qkv, lengths, heads, dropout_p)
    outputs = []
    for rows in qkv.split(lengths):
        L = rows.size(0)
        if L == 0:
            continue
        q, k, v = rows.view(1, L, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (1, nh, L, hs) each
        y = attention(q, k, v, None, L > 1, dropout_p)
        outputs.append(y.transpose(1, 2).reshape(L, width))
    return torch.cat(outputs)


class RowsAttention(torch.autograd.Function):
    """:class:`DropoutAttention` of each row of :func:`attention_by_rows`, as one autograd function.

    Per row it draws the keep mask and runs the same blocks as :func:`attention` would (same draws, same
    result), but writes the output straight into the (tokens, C) result and, in backward, the query, key and
    value gradients straight into the (tokens, 3 C) projection's gradient: per-row views, autograd nodes and the
    concatenation would copy those gradients three more times. Saves what :class:`DropoutAttention` saves.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, lengths: list[int], heads: int, dropout_p: float) -> Tensor:
        width = qkv.size(1) // 3
        out = qkv.new_empty(qkv.size(0), width)
        saved = []
        for rows, target in zip(qkv.split(lengths), out.split(lengths), strict=True):
            L = rows.size(0)
            if L == 0:
                continue
            parts = rows.view(L, 3, heads, width // heads)
            q, k, v = (parts[:, i].transpose(0, 1).unsqueeze(0).contiguous() for i in range(3))  # (1, nh, L, hs)
            keep = blocked_keep_mask(q.shape, L, dropout_p, L > 1, q.device)
            y = _attend(q, k, v, None, keep, dropout_p, L > 1)
            target.view(L, heads, -1).copy_(y[0].transpose(0, 1))
            saved += [q, k, v, keep]
        ctx.save_for_backward(*saved)
        ctx.lengths, ctx.dropout_p = lengths, dropout_p
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grad_qkv = grad.new_empty(grad.size(0), 3 * grad.size(1))
        for rows_grad, target in zip(grad.split(ctx.lengths), grad_qkv.split(ctx.lengths), strict=True):
            L = rows_grad.size(0)
            if L == 0:
                continue
            q, k, v, keep = (next(saved) for _ in range(4))
            heads = q.size(1)
            grad_out = rows_grad.view(L, heads, -1).transpose(0, 1).unsqueeze(0).contiguous()
            grads = _attend_grads(q, k, v, None, keep, ctx.dropout_p, L > 1, grad_out)
            parts = target.view(L, 3, heads, -1)
            for i, part in enumerate(grads):
                parts[:, i].copy_(part[0].transpose(0, 1))
        return grad_qkv, None, None, None


class _Block(NamedTuple):
    """One block of :class:`DropoutAttention`'s work: batch ``rows``, queries ``first:end``, keys ``:stop``."""

    rows: slice
    first: int
    end: int
    stop: int
    whole: bool
    """The block is every row, query and key (short sequences): its tensors are the whole ones, not views."""
    bias: Tensor | None
    """The block's part of the masking bias of ``visible``."""
    square: Tensor | None
    """The causal mask's bias of the block's last ``end - first`` keys."""
    keep: Tensor
    """The block's part of the keep mask: (rows, heads, end - first, stop)."""

    def queries(self, t: Tensor) -> Tensor:
        """The block's part of a (B, heads, T, ...) tensor."""
        return t if self.whole else t[self.rows, :, self.first:self.end]

    def keys(self, t: Tensor) -> Tensor:
        """The block's part of a (B, heads, S, ...) tensor."""
        return t if self.whole else t[self.rows, :, :self.stop]


def _blocks(q: Tensor, k: Tensor, hidden: Tensor | None, causal: bool, keep: Tensor, last_first: bool = False
            ) -> Iterator[_Block]:
    """The blocks of :func:`block_plan`, each with its masking bias (``hidden``'s) or causal square and its part
    of ``keep`` (a (B, heads, T, S) mask, or the flat one of :func:`blocked_keep_mask`)."""
    B, H, T, _ = q.shape
    step, blocks, _ = block_plan(H, T, k.size(2), causal)
    whole = step >= B and len(blocks) == 1
    parts = _keep_parts(keep, B, H, step, blocks) if keep.dim() == 1 else None
    squares: dict[int, Tensor] = {}
    for group, start in enumerate(range(0, B, step)):
        rows = slice(start, min(start + step, B))
        bias = _masking_bias(_rows_of(hidden, rows.start, rows.stop), q.dtype)
        order = range(len(blocks) - 1, -1, -1) if last_first else range(len(blocks))
        for index in order:
            first, end, stop = blocks[index]
            square = None
            if causal and hidden is None:  # blocks of one call come in at most two sizes
                square = squares.get(end - first)
                if square is None:
                    square = squares[end - first] = _causal_square(end - first, q.dtype, q.device)
            if parts is not None:
                part = parts[group * len(blocks) + index]
            else:
                part = keep if whole else keep[rows, :, first:end, :stop]
            yield _Block(rows, first, end, stop, whole, bias if bias is None or whole else bias[..., first:end, :stop],
                         square, part)


def _block_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, keep: Tensor, bias: Tensor | None,
                 square: Tensor | None, scale: float, kept_scale: float, grads: tuple[Tensor, Tensor, Tensor],
                 accumulate: bool) -> None:
    """Gradients of q, k and v for one block, the probabilities recomputed, written into ``grads`` (q's, k's,
    v's); with ``accumulate`` k's and v's are added to what ``grads`` hold."""
    grad_q, grad_k, grad_v = grads
    probs = _probabilities(q, k, bias, scale, square)
    kept = _as_values(keep, probs.dtype)
    work = probs * kept  # the dropped probabilities the forward used (without 1 / (1 - p))
    _product(work.transpose(-1, -2), grad_out, kept_scale, out=grad_v, accumulate=accumulate)
    grad_probs = _product(grad_out, v.transpose(-1, -2), 1.0, out=work).mul_(kept)
    # softmax backward is linear in its incoming gradient: the kept scale joins the score scale below
    grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    both = scale * kept_scale
    _product(grad_scores, k, both, out=grad_q)
    _product(grad_scores.transpose(-1, -2), q, both, out=grad_k, accumulate=accumulate)
