"""The training and evaluation loss: one function for single-process, accumulated and distributed steps.

:func:`forward_loss` runs a batch through the model and returns its loss *summed* over the batch's
targets and their count (rows for a classifier, target tokens for a language model), so any caller can
weight several pieces — the micro-batches of an accumulated step, the row slices of DDP ranks, the
batches of an evaluation — by what they hold and divide once by the total (:func:`step_targets`). A
language model's loss is computed at target positions only, in chunks, without full logits
(:mod:`gpt2lora.ops.lm_head_loss`); :func:`summed_loss` is the same loss from logits one already has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import DEFAULT_LOSS_CHUNK_SIZE, IGNORE_INDEX
from ..ops.lm_head_loss import check_chunk_size


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


def step_targets(batches: Iterable[Mapping[str, Tensor]], classification: bool) -> int:
    """Targets of a whole optimizer step: every micro-batch's rows or target tokens.

    The loss of a step is the sum over all of them divided by this count, so ``grad_accum_steps=k`` gives
    the update one batch of the same rows gives, whatever each micro-batch holds. Under DDP every rank
    sees the same global batches, so every rank computes the same count without communicating.
    """
    return sum(target_count(batch["labels"], classification) for batch in batches)


def forward_loss(module: nn.Module, batch: Mapping[str, Tensor], classification: bool,
                 chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE) -> tuple[Tensor, int, Tensor | None]:
    """``(summed loss, targets, logits)`` of one prepared batch through ``module``.

    ``module`` is a gpt2lora model or its DDP / compiled wrapper. A classifier returns its (B, C) logits
    too; a language model is called with ``labels=`` (``position_ids`` too for packed rows), so the head
    runs at target positions only, ``chunk_size`` rows at a time, and ``logits`` is None. A batch without
    targets gives an exact zero that still reaches every parameter.
    """
    if classification:
        logits = module(batch["input_ids"], batch["attention_mask"])
        summed, count = summed_loss(logits, batch["labels"], classification=True)
        return summed, count, logits
    check_chunk_size(chunk_size, "loss chunk_size")
    summed = module(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                    labels=batch["labels"], loss_chunk_size=chunk_size)
    return summed, target_count(batch["labels"], classification=False), None
