"""The LM head and its cross-entropy at target positions only, in chunks of rows.

A language model's loss needs the logit row of position t only where token t+1 is a target (label not
``-100``): prompts and padding are often most of a batch. :func:`lm_head_loss` gathers the hidden
states of those positions and runs the head + cross-entropy over them ``chunk_size`` rows at a time
(:class:`ChunkedHeadCrossEntropy`), so no (positions, vocab) tensor exists beyond one
(chunk_size, vocab) block, in forward or backward: the gradients of the head's input (and weight) are
formed block by block during the forward pass and kept instead of the logits. The result equals the
full-logits loss and its gradients up to float rounding, for the hidden states and for the head
weight (tied to ``wte`` in GPT-2: the weight's gradient from the head adds to the embedding's, as
autograd does for a shared tensor).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import DEFAULT_LOSS_CHUNK_SIZE, IGNORE_INDEX
from ..errors import ConfigError
from .products import frozen_weight_product, product

SOFTMAX_ROWS = 16
"""Rows of half-precision logits a CPU turns into fp32 log-probabilities and gradients at a time: (16, 50257) fp32 is
3.2 MB, which stays in a core's cache between the passes, and the gradient goes back over the logits in their own
dtype; the whole 128-row block widened to fp32 (26 MB) and cast back took 1.3-2x as long (bf16 head forward and
backward of 501 rows: 272 → 256 ms on one thread of the AMX Xeon, 176 → 123 ms on two). fp32 logits (no widening,
no cast) gained nothing and take the whole block."""


def check_chunk_size(chunk_size: Any, owner: str = "chunk_size") -> int:
    """``chunk_size`` if it is a positive integer; a :class:`ConfigError` naming ``owner`` otherwise."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"{owner}: expected a positive integer (rows of the logits block the LM loss "
                          f"computes at a time), got {chunk_size!r}")
    return chunk_size


def count_targets(labels: Tensor) -> int:
    """Target tokens of a (B, T) label batch: labels after the first position that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def target_rows(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(index, targets)``: flat positions ``b * T + t`` whose next label ``labels[b, t + 1]`` is a target."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    index = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    return index, shifted.index_select(0, index)


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the head's matmul in here (the input's own dtype outside autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _loss_and_gradient(logits: Tensor, targets: Tensor, rows: Tensor, grads: bool) -> tuple[Tensor, Tensor | None]:
    """``(sum of the targets' log-probabilities, softmax - one_hot in the logits' dtype or None)`` of a logits block.

    The log-softmax runs in fp32 (bf16 logits widen exactly): one fused kernel for the max, the sum of exponentials
    and the normalised row, instead of logsumexp's separate passes. fp32 logits (and any block on a GPU) are taken
    whole, the gradient formed in the log-probabilities' memory; half-precision logits on the CPU
    ``SOFTMAX_ROWS`` rows at a time, each group's gradient written back over its own logits.
    """
    count = logits.size(0)
    step = count if logits.device.type != "cpu" or logits.dtype == torch.float32 else SOFTMAX_ROWS
    part = logits.new_zeros((), dtype=torch.float32)
    grad = None
    for first in range(0, count, step):
        last = min(first + step, count)
        log_probs = torch.log_softmax(logits[first:last], dim=-1, dtype=torch.float32)
        picked = rows[:last - first], targets[first:last]
        part += log_probs[picked].sum()
        if not grads:
            continue
        rows_grad = log_probs.exp_()  # softmax, in the log-probabilities' memory
        rows_grad[picked] -= 1.0
        if step == count:
            grad = rows_grad.to(logits.dtype)
        else:
            logits[first:last] = rows_grad
            grad = logits
    return part, grad


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk_size`` rows at a time.

    ``hidden`` (N, C), ``weight`` (V, C), ``targets`` (N,) → 0-dim fp32 sum. Logits are formed in
    ``dtype`` and reduced in fp32, as under autocast. When gradients are wanted (``grads``), forward
    already turns each block of logits into its gradient ``softmax - one_hot`` in place and multiplies
    it into the gradients of ``hidden`` (N, C) and ``weight`` (V, C), which it keeps instead of the
    logits; backward only scales them by the incoming gradient. So the head costs the two (three with a
    trained weight) matmuls of the plain computation, and its memory is one block plus those gradients.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                dtype: torch.dtype, grads: bool) -> Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)
        need_h, need_w = grads and hidden.requires_grad, grads and weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk_size, h.size(0)), device=h.device)
        for start in range(0, h.size(0), chunk_size):
            stop = min(start + chunk_size, h.size(0))
            block = h[start:stop]
            logits = frozen_weight_product(block, w)
            part, grad = _loss_and_gradient(logits, targets[start:stop], rows[:stop - start], need_h or need_w)
            total -= part
            if grad is None:
                continue
            if need_h:
                grad_h[start:stop] = product(grad, w)
            if need_w:
                grad_w.addmm_(grad.t(), block) if dtype == torch.float32 else grad_w.add_(grad.t() @ block)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_total.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def head_operands(head: nn.Module | Tensor, rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(rows', weight')`` with ``head(rows) == rows' @ weight'.T``, or None for a head of another kind.

    A weight tensor or linear layer is itself; a bias becomes a column of ones. An unmerged LoRA head
    (``lora_A``, ``lora_B``, ``scaling``) appends ``scaling * dropout(rows) @ A.T`` to the rows and ``B`` to
    the weight, so its update goes through the same chunked product and A and B get their gradients.
    """
    if isinstance(head, Tensor):
        return rows, head
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    parts, columns = [rows], [weight]
    if hasattr(head, "lora_A") and not getattr(head, "merged", False):
        dropped = head.lora_dropout(rows) if getattr(head, "lora_dropout", None) is not None else rows
        parts.append(F.linear(dropped.to(head.lora_A.dtype), head.lora_A).to(rows.dtype) * head.scaling)
        columns.append(head.lora_B.to(weight.dtype))
    elif not isinstance(head, nn.Linear):
        return None
    if bias is not None:
        parts.append(rows.new_ones(rows.size(0), 1))
        columns.append(bias.unsqueeze(1))
    if len(parts) == 1:
        return rows, weight
    return torch.cat(parts, dim=1), torch.cat(columns, dim=1)


def lm_head_loss(hidden: Tensor, head: nn.Module | Tensor, labels: Tensor,
                 chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy of the LM ``head`` (a module or its (V, C) weight) over ``labels``' targets.

    ``hidden`` (B, T, C) are the states after ``ln_f``; ``labels`` (B, T) are aligned with the input as in
    Hugging Face (the state at t predicts ``labels[:, t + 1]``; ``-100`` is skipped). Returns the fp32 sum
    and the number of targets; divide by the count (of the whole optimizer step) for a mean. A batch
    without targets contributes an exact zero that still reaches every parameter through one row, so
    distributed ranks still all-reduce the same tensors. A head module of an unknown kind is applied
    as it is to the target rows (no chunking, still no logits at other positions).
    """
    check_chunk_size(chunk_size)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ConfigError(f"lm_head_loss: hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                          "must be (batch, tokens, n_embd) and (batch, tokens)")
    index, targets = target_rows(labels)
    flat = hidden.reshape(-1, hidden.size(-1))
    scale, count = 1.0, int(index.numel())
    if count == 0:
        index = targets = torch.zeros(1, dtype=torch.long, device=hidden.device)
        scale = 0.0
    rows = flat.index_select(0, index)
    operands = head_operands(head, rows)
    if operands is None:
        total = F.cross_entropy(head(rows).float(), targets, reduction="sum")
    else:
        rows, weight = operands
        dtype = _compute_dtype(hidden.device, rows.dtype)
        grads = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
        total = ChunkedHeadCrossEntropy.apply(rows, weight, targets, chunk_size, dtype, grads)
    return (total * scale if scale != 1.0 else total), count
