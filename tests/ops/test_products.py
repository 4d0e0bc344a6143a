"""Many-row products: bf16 whole or in row blocks, fp32 by MKL or oneDNN, the faster measured before any result is used."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.ops import few_row, packed, products
from gpt2lora.ops.products import BLOCK_ROWS, frozen_weight_product, product
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


def clocked(monkeypatch, costs: dict[str, tuple[str, float]]) -> tuple[few_row.KernelChoice, dict[str, int]]:
    """A KernelChoice on a fake clock, each ``products`` function named in ``costs`` ({attribute: (label, extra
    ticks)}) counted under its label and reading 1 + its extra ticks; returns the choice and the counts."""
    clock = [0.0]
    calls = {label: 0 for label, _ in costs.values()}

    def counted(function, label, cost):
        def run(*args, **kwargs):
            calls[label] += 1
            clock[0] += cost
            return function(*args, **kwargs)
        return run

    for attribute, (label, cost) in costs.items():
        monkeypatch.setattr(products, attribute, counted(getattr(products, attribute), label, cost))

    def timer() -> float:
        clock[0] += 0.5
        return clock[0]

    return few_row.KernelChoice(timer=timer), calls


def fake_clock(monkeypatch, blocks_cost: float) -> tuple[few_row.KernelChoice, dict[str, int]]:
    """The whole product reads 1 tick, the row blocks 1 + ``blocks_cost``."""
    return clocked(monkeypatch, {"_whole": ("whole", 0.0), "_row_blocks": ("row blocks", blocks_cost)})


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


@pytest.mark.parametrize("case", ["bf16", "fp32", "fp64"])
def test_products_of_few_rows_or_other_dtypes_are_whole_and_never_measured(case):
    kernels = few_row.KernelChoice(timer=lambda: pytest.fail("timed a product that has one form"))
    a, b = torch.randn(900, 64).bfloat16(), torch.randn(64, 48).bfloat16()
    if case == "fp64":
        a, b = a.double(), b.double()
    else:
        a = a[:BLOCK_ROWS].to(torch.float32 if case == "fp32" else a.dtype)
        b = b.to(a.dtype)
    assert torch.equal(product(a, b, kernels=kernels), a @ b)
    assert kernels.chosen == {}


needs_onednn = pytest.mark.skipif(not products.onednn_fp32_available(), reason="torch has no oneDNN fp32 linear")


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_fp32_product_equals_mkls(transposed, with_bias):
    g = torch.Generator().manual_seed(7)
    rows = BLOCK_ROWS + 77
    a = torch.randn(rows, 96, generator=g)
    b = torch.randn(80, 96, generator=g).t() if transposed else torch.randn(96, 80, generator=g)
    bias = torch.randn(80, generator=g) if with_bias else None
    out = products._onednn(a, b, bias)
    assert out.shape == (rows, 80) and out.is_contiguous() and out.dtype == torch.float32
    expected = a.double() @ b.double() + (bias.double() if with_bias else 0)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, products._whole(a, b, bias), atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("onednn_cost", [2.0, -0.5])
def test_fp32_keeps_the_faster_library_per_power_of_two_rows(monkeypatch, onednn_cost):
    kernels, calls = clocked(monkeypatch, {"_whole": ("mkl", 0.0), "_onednn": ("onednn", onednn_cost)})
    a, b, bias = torch.randn(700, 64), torch.randn(64, 48), torch.randn(48)
    out = product(a, b, bias, kernels=kernels)
    (key, name), = kernels.chosen.items()
    faster = "whole" if onednn_cost > 0 else "onednn"
    assert name == faster and key[1] == 1024 and key[-1] == torch.get_num_threads()
    trials = kernels.samples + 1  # both timed before the first result is used
    assert calls == {"mkl": trials + (faster == "whole"), "onednn": trials + (faster == "onednn")}
    torch.testing.assert_close(out, torch.addmm(bias, a, b), atol=1e-4, rtol=1e-5)
    before = sum(calls.values())
    product(torch.randn(1000, 64), b, bias, kernels=kernels)  # 513-1024 rows share the choice
    assert sum(calls.values()) == before + 1 and len(kernels.chosen) == 1
    product(torch.randn(1100, 64), b, bias, kernels=kernels)  # the next power of two: measured again
    assert len(kernels.chosen) == 2


class Always:
    """Stands in for the process's KernelChoice: always the named form."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, key, candidates) -> str:
        return self.name if self.name in candidates else next(iter(candidates))


def lora_step_with_each_form(monkeypatch, spied: str, forms: tuple[str, str], bf16: bool) -> dict:
    """A tiny LoRA model's loss and trainable gradients over 660 tokens (more than BLOCK_ROWS) with each of
    ``forms`` forced on every product; checks that the ``products`` function ``spied`` ran on all of them."""
    config = GPT2Config(**{**TINY, "n_positions": 128}, **NO_DROPOUT)
    ids = torch.randint(0, TINY["vocab_size"], (6, 110), generator=torch.Generator().manual_seed(3))
    results = {}
    function = getattr(products, spied)
    used = []
    monkeypatch.setattr(products, spied, lambda a, b, bias: used.append(a.size(0)) or function(a, b, bias))
    for name in forms:
        monkeypatch.setattr(products, "KERNELS", Always(name))
        torch.manual_seed(0)
        net = GPT2(config)
        apply_lora(net, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
        with torch.no_grad():
            for param_name, p in net.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        if bf16:
            hold_frozen_weights(net)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net.train()(ids, labels=ids) / ids.numel()
        loss.backward()
        results[name] = loss.item(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert used and set(used) == {ids.numel()}  # the forced form ran, on every token of the batch
    return results


@needs_onednn
def test_an_fp32_lora_step_is_the_same_with_either_library(monkeypatch):
    results = lora_step_with_each_form(monkeypatch, "_onednn", ("whole", "onednn"), bf16=False)
    (loss_mkl, grads_mkl), (loss_onednn, grads_onednn) = results.values()
    assert loss_onednn == pytest.approx(loss_mkl, abs=1e-6)
    for name, grad in grads_mkl.items():
        torch.testing.assert_close(grads_onednn[name], grad, atol=1e-6, rtol=1e-4)


def test_a_bf16_lora_step_trains_alike_with_either_form(monkeypatch):
    results = lora_step_with_each_form(monkeypatch, "_row_blocks", ("whole", "row blocks"), bf16=True)
    (loss_whole, grads_whole), (loss_blocks, grads_blocks) = results.values()
    assert abs(loss_whole - loss_blocks) < 1e-2
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_blocks[name], grad, atol=2e-3, rtol=0.1)


needs_packing = pytest.mark.skipif(not packed.packed_linear_available(),
                                   reason="torch has no oneDNN packed bf16 linear or this CPU has no bf16 units")


def frozen_head(vocab: int = 300, width: int = 64) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(vocab)
    return torch.nn.Parameter(torch.randn(vocab, width, generator=g).bfloat16(), requires_grad=False)


def packed_clock(monkeypatch, packed_cost: float) -> tuple[few_row.KernelChoice, dict[str, int]]:
    """The plain product reads 1 tick, the packed one 1 + ``packed_cost``."""
    return clocked(monkeypatch, {"_whole": ("plain", 0.0), "packed_linear": ("packed", packed_cost)})


@needs_packing
@pytest.mark.parametrize("packed_cost", [2.0, -0.5])
def test_a_frozen_bf16_weight_is_packed_only_where_that_was_measured_faster(monkeypatch, packed_cost):
    kernels, calls = packed_clock(monkeypatch, packed_cost)
    weight, x = frozen_head(), torch.randn(100, 64).bfloat16()
    out = frozen_weight_product(x, weight, kernels=kernels)
    (key, name), = kernels.chosen.items()
    faster = "plain" if packed_cost > 0 else "packed"
    assert name == faster and key[-1] == torch.get_num_threads()
    trials = kernels.samples + 1  # both timed before the first result
    assert calls == {"plain": trials + (faster == "plain"), "packed": trials + (faster == "packed")}
    assert out.shape == (100, 300) and out.is_contiguous()
    torch.testing.assert_close(out.float(), x.float() @ weight.float().t(), atol=0.05, rtol=0.02)
    # the pack stays on the weight only when it is used
    assert packed.packed_bytes(torch.nn.ParameterList([weight])) == (weight.numel() * 2 if faster == "packed" else 0)
    before = dict(calls)
    frozen_weight_product(torch.randn(77, 64).bfloat16(), weight, kernels=kernels)  # same row step: decided
    assert sum(calls.values()) == sum(before.values()) + 1 and calls[faster] == before[faster] + 1


@needs_packing
def test_a_weight_whose_storage_keeps_moving_is_no_longer_packed(monkeypatch):
    """FSDP gathers a sharded weight into new memory for every forward: its pack would be remade every step."""
    reorders = []
    reorder = packed._reorder
    monkeypatch.setattr(packed, "_reorder", lambda w, kind, bias: reorders.append(w.data_ptr()) or reorder(w, kind, bias))
    weight, x = frozen_head(), torch.randn(100, 64).bfloat16()
    kernels = Always("packed")
    expected = frozen_weight_product(x, weight, kernels=kernels)
    assert len(reorders) == 1
    frozen_weight_product(x, weight, kernels=kernels)  # same storage: the pack is reused
    assert len(reorders) == 1
    for step in range(4):
        with torch.no_grad():
            weight.data = weight.data.clone()  # what a gather into new memory looks like to the weight
        torch.testing.assert_close(frozen_weight_product(x, weight, kernels=kernels), expected, atol=0.05, rtol=0.02)
    # packed again after the first two moves only; then the plain product, and no pack is kept
    assert len(reorders) == 1 + packed.MOVES_TO_STOP_PACKING
    assert packed.packed_bytes(torch.nn.ParameterList([weight])) == 0


def test_other_weights_are_never_packed_or_measured():
    kernels = few_row.KernelChoice(timer=lambda: pytest.fail("timed a product that has one form"))
    x = torch.randn(100, 64).bfloat16()
    trainable = torch.nn.Parameter(frozen_head().detach().clone())  # packing again after every update
    not_a_parameter = frozen_head().detach()  # a per-call copy (a cast or a concatenation)
    fp32 = torch.nn.Parameter(frozen_head().detach().float(), requires_grad=False)
    for weight in (trainable, not_a_parameter, fp32):
        rows = x.to(weight.dtype)
        assert torch.equal(frozen_weight_product(rows, weight, kernels=kernels), rows @ weight.detach().t())
        assert packed.PACKED_ATTR not in weight.__dict__
    assert kernels.chosen == {}


@needs_packing
def test_a_bf16_lm_loss_is_alike_with_the_head_packed_or_plain(monkeypatch):
    """The chunked LM loss and its gradients on a bf16-held LoRA model, the head's logits forced either way."""
    config = GPT2Config(**{**TINY, "n_positions": 128}, **NO_DROPOUT)
    ids = torch.randint(0, TINY["vocab_size"], (4, 60), generator=torch.Generator().manual_seed(4))
    results = {}
    used = []
    packed_product = products.packed_linear
    monkeypatch.setattr(products, "packed_linear", lambda x, w, b=None: used.append(x.size(0)) or packed_product(x, w, b))
    for name in ("plain", "packed"):
        monkeypatch.setattr(products, "KERNELS", Always(name))
        torch.manual_seed(0)
        net = GPT2(config)
        apply_lora(net, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
        hold_frozen_weights(net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.train()(ids, labels=ids) / ids.numel()
        loss.backward()
        results[name] = loss.item(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert used  # the packed head ran
    (loss_plain, grads_plain), (loss_packed, grads_packed) = results.values()
    assert abs(loss_plain - loss_packed) < 1e-3
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=2e-3, rtol=0.05)
