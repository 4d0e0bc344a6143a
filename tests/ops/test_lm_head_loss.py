"""The LM loss at target positions only, in chunks: same loss and gradients as full logits and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import NO_DROPOUT, TINY

from gpt2lora import ConfigError
from gpt2lora.config import GPT2Config, LoRAConfig
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.ops.lm_head_loss import (
    SOFTMAX_ROWS,
    ChunkedHeadCrossEntropy,
    count_targets,
    lm_head_loss,
    target_rows,
)
from gpt2lora.ops.recompute import count_saved_tensors
from gpt2lora.peft.lora import apply_lora

V = TINY["vocab_size"]


def lm_batch(side: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 4-12 tokens padded on ``side``, the first 3 real tokens of each a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths, width = [12, 7, 4], 12
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span] = torch.randint(1, V, (n,), generator=g)
        mask[row, span] = 1
        labels[row, span] = ids[row, span]
        labels[row, span.start:span.start + 3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def full_logits_sum(model: GPT2, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["full", "lora", "lora_head"])
def test_chunked_loss_and_gradients_equal_full_logits_and_transformers(no_dropout_checkpoint, side, method):
    import peft
    import transformers

    model = GPT2.from_pretrained(no_dropout_checkpoint)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(no_dropout_checkpoint)
    if method != "full":
        targets = ("attn.c_attn", "mlp.c_fc") + (("lm_head",) if method == "lora_head" else ())
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=targets), seed=0)
        with torch.no_grad():  # B = 0 would hide the adapter's share of the loss and gradients
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM",
            target_modules=["c_attn", "c_fc"] + (["lm_head"] if method == "lora_head" else [])))
        params = dict(theirs.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    params[f"base_model.model.{name}.default.weight"].copy_(p)
    else:
        assert model.lm_head.weight is model.transformer.wte.weight  # tied: head and embedding share a gradient
    batch = lm_batch(side)
    count = count_targets(batch["labels"])
    assert count == 23 - 9
    expected = grads_of(model, full_logits_sum(model, batch))
    chunked = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], loss_chunk_size=5)
    got = grads_of(model, chunked)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # transformers counts left padding otherwise
    reference = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                       labels=batch["labels"]).loss.detach()
    chunked = chunked.detach()
    assert float(chunked) / count == pytest.approx(float(reference), abs=1e-5)
    assert float(chunked) == pytest.approx(float(full_logits_sum(model, batch)), abs=1e-4)
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    if method == "full":
        assert "transformer.wte.weight" in got
    if method == "lora_head":
        assert {"lm_head.lora_A", "lm_head.lora_B"} <= set(got)


def test_every_chunk_size_gives_the_same_result():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = -100
    logits = hidden @ weight.t()
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")
    gh, gw = torch.autograd.grad(full * 3.0, (hidden, weight))  # an outer factor scales the gradients too
    for chunk in (1, 2, 7, 13, 100):
        total, count = lm_head_loss(hidden, weight, labels, chunk_size=chunk)
        assert count == 13
        torch.testing.assert_close(total, full, atol=0, rtol=1e-6)
        h, w = torch.autograd.grad(total * 3.0, (hidden, weight))
        torch.testing.assert_close(h, gh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w, gw, atol=1e-5, rtol=1e-5)
    index, targets = target_rows(labels)
    assert index.tolist() == [3, 4, 5, 6, 7] + list(range(9, 17))  # the last position of a row predicts nothing
    assert targets.tolist() == labels[0, 4:].tolist() + labels[1, 1:].tolist()


def test_a_batch_without_targets_contributes_an_exact_zero_that_reaches_every_parameter():
    model = GPT2(GPT2Config(**TINY, **NO_DROPOUT))
    apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.0), seed=0)
    ids = torch.randint(1, V, (2, 6))
    loss = model(ids, labels=torch.full_like(ids, -100))
    assert float(loss) == 0.0
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in trainable)


def test_evaluation_without_gradients_gives_the_same_loss(no_dropout_checkpoint):
    model = GPT2.from_pretrained(no_dropout_checkpoint).eval()
    batch = lm_batch("right", seed=4)
    with torch.no_grad():
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        assert float(loss) == pytest.approx(float(full_logits_sum(model, batch)), abs=1e-4)
    assert not loss.requires_grad


def test_bf16_autocast_tracks_fp32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 40, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g) * 0.1
    labels = torch.randint(0, 300, (1, 40), generator=g)
    exact, _ = lm_head_loss(hidden, weight, labels, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = lm_head_loss(hidden, weight, labels, chunk_size=16)
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(exact), rel=2e-2)
    (grad,) = torch.autograd.grad(half, hidden)
    assert grad.dtype == hidden.dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("chunk", [37, 128])
def test_bf16_logits_turned_into_gradients_a_few_rows_at_a_time_equal_the_whole_block(chunk):
    """bf16 logits on the CPU go through the fp32 log-softmax SOFTMAX_ROWS rows at a time: the loss and the
    gradients equal the whole block's (widened to fp32 at once, cast back once)."""
    g = torch.Generator().manual_seed(5)
    rows = 3 * SOFTMAX_ROWS + 5  # several groups of rows and a short last one
    hidden = torch.randn(rows, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32, generator=g) * 0.3).bfloat16()
    targets = torch.randint(0, 300, (rows,), generator=g)
    total = ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk, torch.bfloat16, True)
    (grad,) = torch.autograd.grad(total * 2.0, hidden)
    log_probs = torch.log_softmax((hidden.detach() @ weight.t()).float(), dim=-1)
    picked = torch.arange(rows), targets
    expected_total = -log_probs[picked].sum()
    softmax = log_probs.exp()
    softmax[picked] -= 1.0
    expected_grad = (softmax.bfloat16() @ weight) * 2.0
    torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def saved_bytes(fn) -> tuple[int, int]:
    """Bytes autograd keeps for backward while ``fn`` runs forward, and the largest saved tensor's size."""
    with count_saved_tensors() as saved:
        fn()
    return saved.bytes, max(numel for numel, _ in saved.tensors)


def test_an_lm_step_saves_no_logits_for_backward():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=4000, **NO_DROPOUT)
    model = GPT2(config)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.0), seed=0)
    ids = torch.randint(1, 4000, (4, 48))
    labels = ids.clone()
    labels[:, :30] = -100  # a long masked prompt, as in instruction data
    full, full_largest = saved_bytes(lambda: full_logits_sum(model, {"input_ids": ids, "attention_mask": None,
                                                                       "labels": labels}))
    chunked, chunked_largest = saved_bytes(lambda: model(ids, labels=labels, loss_chunk_size=16))
    logits = 4 * 47 * 4000  # every position that predicts a next token, times the vocabulary
    assert full >= 4 * logits and full_largest == logits
    assert chunked < full - 4 * logits  # at least the fp32 logits less (their log-softmax too)
    assert chunked_largest < logits / 10  # nothing saved anywhere near a (positions, vocab) tensor


def test_chunk_size_must_be_a_positive_integer():
    hidden, weight, labels = torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long)
    for bad in (0, -3, 1.5, True, None):
        with pytest.raises(ConfigError, match=r"chunk_size: expected a positive integer"):
            lm_head_loss(hidden, weight, labels, chunk_size=bad)
    model = GPT2(GPT2Config(**TINY))
    with pytest.raises(ConfigError, match=r"chunk_size: expected a positive integer .* got 0"):
        model(torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long), loss_chunk_size=0)
    with pytest.raises(ConfigError, match=r"lm_head_loss: hidden states \(1, 3, 4\) and labels \(3,\)"):
        lm_head_loss(hidden, weight, torch.zeros(3, dtype=torch.long))
    assert ChunkedHeadCrossEntropy.apply(hidden[0], weight, labels[0], 2, torch.float32, False).dim() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on CUDA only")
def test_chunked_loss_on_cuda_matches_cpu_and_bf16_autocast_tracks_it(no_dropout_checkpoint):
    model = GPT2.from_pretrained(no_dropout_checkpoint)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    batch = lm_batch("right", seed=6)
    cpu = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], loss_chunk_size=5)
    cpu_grads = grads_of(model, cpu)
    model.cuda()
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    cuda = model(on_gpu["input_ids"], on_gpu["attention_mask"], labels=on_gpu["labels"], loss_chunk_size=5)
    cuda_grads = grads_of(model, cuda)
    assert float(cuda) == pytest.approx(float(cpu), rel=1e-5)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name].cpu(), grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(on_gpu["input_ids"], on_gpu["attention_mask"], labels=on_gpu["labels"], loss_chunk_size=5)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(cpu), rel=3e-2)
    half_grads = grads_of(model, half)
    assert all(torch.isfinite(g).all() for g in half_grads.values())
