"""A LoRA layer's training forward and backward as one autograd function.

Written with autograd's ops, a LoRA layer's backward forms the input gradient of the low-rank path
as its own (tokens, in) product ``(g B) A`` and then adds it to the base layer's ``g W``: a full-size
temporary and an add per layer, and for a (rank, in) ``A`` stored row-major a product BLAS runs
several times slower than the same product accumulated into an existing output. :class:`LoRAProduct`
accumulates it into the base input gradient in place (``addmm_``, beta=1) and forms the factor
gradients from the saved (tokens, rank) product, so the layer saves what autograd would (its input
and that small product) and nothing more.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .products import product


class LoRAProduct(torch.autograd.Function):
    """``x Wᵀ + b + scaling · (h Aᵀ) Bᵀ`` for 2-D ``x`` (tokens, in); ``h`` is ``x`` or its dropped copy.

    ``weight`` (out, in), ``bias`` (out,) or None, ``lora_a`` (rank, in), ``lora_b`` (out, rank). Every
    tensor may or may not need a gradient; the frozen base of LoRA training gets none computed.

    Mixed precision (bf16 training with the base held in bf16): ``x``, ``h`` and ``weight`` in the compute
    dtype, ``bias``/``lora_a``/``lora_b`` in fp32. The products run in the compute dtype, as autocast would
    run them, and each fp32 tensor's gradient comes back in fp32.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                lora_b: Tensor, scaling: float) -> Tensor:
        ctx.dtypes = (None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        if lora_a.dtype != x.dtype:
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out = product(x, weight.t(), bias)  # the base product: see gpt2lora.ops.products
        down = (h @ lora_a.t()).mul_(scaling)
        out.addmm_(down, lora_b.t())
        ctx.same_input = h is x
        ctx.scaling = scaling
        ctx.save_for_backward(x if weight.requires_grad else None, h, weight, lora_a, lora_b, down)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, h, weight, lora_a, lora_b, down = ctx.saved_tensors
        need_x, need_h, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_up = grad @ lora_b  # (tokens, rank): the gradient reaching the down product
        grad_x = grad_h = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = product(grad, weight)
        if ctx.same_input and need_x:  # one tensor passed twice: its whole gradient goes to x
            grad_x.addmm_(grad_up, lora_a, alpha=ctx.scaling)
        elif need_h:
            grad_h = torch.mm(grad_up, lora_a).mul_(ctx.scaling)
        if need_a:
            grad_a = (grad_up.t() @ h).mul_(ctx.scaling)
        if need_b:
            grad_b = grad.t() @ down
        if need_w:
            grad_w = grad.t() @ x
        if need_bias:  # False for a None bias
            grad_bias = grad.sum(0)
        bias_dtype, a_dtype, b_dtype = ctx.dtypes
        if grad_a is not None and grad_a.dtype != a_dtype:
            grad_a = grad_a.to(a_dtype)
        if grad_b is not None and grad_b.dtype != b_dtype:
            grad_b = grad_b.to(b_dtype)
        if grad_bias is not None and grad_bias.dtype != bias_dtype:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_x, grad_h, grad_w, grad_bias, grad_a, grad_b, None
