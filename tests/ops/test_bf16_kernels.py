"""The training kernels with a frozen base held in bf16 under autocast: the fused LoRA product against
autocast's own composition of the same products."""

from __future__ import annotations

import torch
from helpers import TINY

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.ops.lora_product import LoRAProduct
from gpt2lora.training.precision import hold_frozen_weights


def test_lora_product_in_bf16_with_fp32_adapters_matches_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=g)
    weight, bias = torch.randn(96, 64, generator=g) / 8, torch.randn(96, generator=g)
    a = (torch.randn(4, 64, generator=g) / 8).requires_grad_()
    b = (torch.randn(96, 4, generator=g) / 2).requires_grad_()
    bias.requires_grad_()
    grad = torch.randn(24, 96, generator=g)

    x16 = x.bfloat16().requires_grad_()
    out = LoRAProduct.apply(x16, x16, weight.bfloat16(), bias, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    got = [x16.grad.float(), a.grad.clone(), b.grad.clone(), bias.grad.clone()]
    assert a.grad.dtype == b.grad.dtype == bias.grad.dtype == torch.float32
    for p in (a, b, bias):
        p.grad = None

    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(xr, weight, bias) + torch.nn.functional.linear(
            torch.nn.functional.linear(xr, a), b) * 2.0
    ref.float().backward(grad)
    expected = [xr.grad, a.grad, b.grad, bias.grad]
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.02)
    for g_got, g_ref in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_ref, atol=0.1, rtol=0.03)


def test_held_base_under_autocast_trains_like_the_fp32_base_under_autocast():
    def model() -> GPT2:
        torch.manual_seed(0)
        net = GPT2(GPT2Config(**TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        apply_lora(net, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        return net.train()

    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for held in (False, True):
        net = model()
        if held:
            assert hold_frozen_weights(net) > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(ids, labels=ids) / ids.numel()
        loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())
        results.append((loss.item(), grads))
    (loss_plain, grads_plain), (loss_held, grads_held) = results
    assert abs(loss_plain - loss_held) < 2e-2
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_held[name], g, atol=2e-3, rtol=0.1)
