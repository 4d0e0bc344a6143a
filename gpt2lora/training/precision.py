"""Frozen base weights held in half precision for mixed-precision training of adapters."""

from __future__ import annotations

import torch
from torch import nn


def hold_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen fp32 matrices of ``model``'s linear layers in ``dtype``; returns how many were cast.

    Under autocast every product casts an fp32 weight to the autocast dtype again on each step (autocast
    caches casts of trainable leaves only), and the frozen base of an adapter method is most of the model:
    holding it in ``dtype`` drops those casts and halves its memory. The products compute exactly what
    autocast computed (the same rounding of the same weights). Trainable tensors, LayerNorms, biases and
    embeddings used only as embeddings stay fp32. A tied LM head shares its matrix with the token embedding,
    which then is read in ``dtype`` too (its sum with the fp32 position embedding stays fp32).
    Outside autocast, :func:`gpt2lora.ops.few_row.linear` computes such a layer in ``dtype`` and returns
    the input's dtype, so evaluation and generation in fp32 still work on the model. Merging LoRA into a held
    matrix and ``save_pretrained`` write fp32 again (the base values keep their bf16 rounding).
    """
    cast = 0
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, nn.Linear) or hasattr(module, "in_features")) or not isinstance(weight, nn.Parameter):
            continue
        if id(weight) not in seen:
            if weight.dim() != 2 or weight.requires_grad or weight.dtype != torch.float32:
                continue
            seen.add(id(weight))
            weight.data = weight.data.to(dtype)
            cast += 1
        # On the module, which outlives its parameter objects (FSDP replaces them when it shards and gathers):
        # merging and exporting write the checkpoint's dtype again.
        module.weight_held_from = torch.float32
    return cast
