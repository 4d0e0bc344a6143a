"""Many-row half-precision products: whole or in row blocks, the faster measured before any result is used."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.ops import few_row, products
from gpt2lora.ops.products import BLOCK_ROWS, product
from gpt2lora.training.precision import hold_frozen_weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [BLOCK_ROWS + 1, 900, 2 * BLOCK_ROWS])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_blocks_equal_the_whole_product(dtype, rows, transposed, with_bias):
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 96, generator=g).to(dtype)
    b = torch.randn(80, 96, generator=g).to(dtype).t() if transposed else torch.randn(96, 80, generator=g).to(dtype)
    bias = torch.randn(80, generator=g).to(dtype) if with_bias else None
    whole, blocks = products._whole(a, b, bias), products._row_blocks(a, b, bias)
    assert blocks.shape == (rows, 80) and blocks.is_contiguous() and blocks.dtype == dtype
    # the same dot products; bf16 results may differ by the rounding of one kernel against another
    tolerance = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(blocks, whole, **tolerance)
    expected = a.float() @ b.float() + (bias.float() if with_bias else 0)
    torch.testing.assert_close(blocks.float(), expected, **tolerance)


def fake_clock(monkeypatch, blocks_cost: float) -> tuple[few_row.KernelChoice, dict[str, int]]:
    """A KernelChoice on a fake clock: the whole product reads 1 tick, the row blocks 1 + ``blocks_cost``."""
    clock = [0.0]
    calls = {"whole": 0, "row blocks": 0}
    whole, blocks = products._whole, products._row_blocks

    def timed_whole(a, b, bias):
        calls["whole"] += 1
        return whole(a, b, bias)

    def timed_blocks(a, b, bias):
        calls["row blocks"] += 1
        clock[0] += blocks_cost
        return blocks(a, b, bias)

    def timer() -> float:
        clock[0] += 0.5
        return clock[0]

    monkeypatch.setattr(products, "_whole", timed_whole)
    monkeypatch.setattr(products, "_row_blocks", timed_blocks)
    return few_row.KernelChoice(timer=timer), calls


@pytest.mark.parametrize("blocks_cost", [2.0, -0.5])
def test_the_slower_form_is_never_kept_and_the_choice_is_made_before_a_result_is_used(monkeypatch, blocks_cost):
    kernels, calls = fake_clock(monkeypatch, blocks_cost)
    a, b = torch.randn(700, 64).bfloat16(), torch.randn(64, 48).bfloat16()
    out = product(a, b, kernels=kernels)
    (key, name), = kernels.chosen.items()
    faster = "whole" if blocks_cost > 0 else "row blocks"
    assert name == faster
    assert key[-1] == torch.get_num_threads()  # kept per thread count (and shape, layout, dtype)
    trials = kernels.samples + 1  # each form: one warm-up and `samples` timed runs, all before the result
    assert calls == {"whole": trials + (faster == "whole"), "row blocks": trials + (faster == "row blocks")}
    torch.testing.assert_close(out.float(), a.float() @ b.float(), atol=0.05, rtol=0.02)
    before = dict(calls)
    for _ in range(3):  # decided: the kept form alone, no timing
        product(a, b, kernels=kernels)
    slower = "row blocks" if faster == "whole" else "whole"
    assert calls == {faster: before[faster] + 3, slower: before[slower]}
    product(torch.randn(1100, 64).bfloat16(), b, kernels=kernels)  # another row step: measured again
    assert len(kernels.chosen) == 2


@pytest.mark.parametrize("case", ["fp32", "few rows"])
def test_other_products_are_whole_and_never_measured(case):
    kernels = few_row.KernelChoice(timer=lambda: pytest.fail("timed a product that has one form"))
    a, b = torch.randn(900, 64).bfloat16(), torch.randn(64, 48).bfloat16()
    if case == "fp32":
        a, b = a.float(), b.float()
    else:
        a = a[:BLOCK_ROWS]
    assert torch.equal(product(a, b, kernels=kernels), a @ b)
    assert kernels.chosen == {}


class Always:
    """Stands in for the process's KernelChoice: always the named form."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, key, candidates) -> str:
        return self.name


def test_a_bf16_lora_step_trains_alike_with_either_form(monkeypatch):
    """Forward and backward of a bf16-held LoRA model over more than BLOCK_ROWS tokens, each form forced."""
    config = GPT2Config(**{**TINY, "n_positions": 128}, **NO_DROPOUT)
    ids = torch.randint(0, TINY["vocab_size"], (6, 110), generator=torch.Generator().manual_seed(3))
    results = {}
    blocked = products._row_blocks
    used = []
    monkeypatch.setattr(products, "_row_blocks", lambda a, b, bias: used.append(a.size(0)) or blocked(a, b, bias))
    for name in ("whole", "row blocks"):
        monkeypatch.setattr(products, "KERNELS", Always(name))
        torch.manual_seed(0)
        net = GPT2(config)
        apply_lora(net, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
        with torch.no_grad():
            for param_name, p in net.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        hold_frozen_weights(net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.train()(ids, labels=ids) / ids.numel()
        loss.backward()
        results[name] = loss.item(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert used and set(used) == {ids.numel()}  # the forced blocks ran, on every token of the batch
    (loss_whole, grads_whole), (loss_blocks, grads_blocks) = results.values()
    assert abs(loss_whole - loss_blocks) < 1e-2
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_blocks[name], grad, atol=2e-3, rtol=0.1)
