"""The training and evaluation loss: one function for single-process, accumulated and distributed steps.

:func:`summed_loss` returns the loss *summed* over a batch's targets and their count (rows for a
classifier, target tokens for a language model), so any caller can weight several pieces — the
micro-batches of an accumulated step, the row slices of DDP ranks, the batches of an evaluation — by
what they hold and divide once.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .batching import IGNORE_INDEX


def summed_loss(logits: Tensor, labels: Tensor, classification: bool) -> tuple[Tensor, int]:
    """``(sum of the per-target cross-entropies, number of targets)`` of one batch.

    Classification: logits (B, C) against class ids (B,). Language model: logits (B, T, V) against
    token targets (B, T); the logit at position t predicts token t+1, so labels are shifted left by one
    here and ``-100`` positions are skipped.
    """
    if classification:
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.size(0)
    targets = labels[:, 1:].reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum"), count


def lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy over the batch's target tokens, and their number (0 targets: loss 0)."""
    total, count = summed_loss(logits, labels, classification=False)
    return total / max(count, 1), count


def target_count(labels: Tensor, classification: bool) -> int:
    """Rows (classification) or target tokens after the shift (language model) of a batch's labels."""
    return labels.size(0) if classification else int((labels[:, 1:] != IGNORE_INDEX).sum())
