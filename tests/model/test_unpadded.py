"""Training runs the block layers on real tokens only: the same losses and gradients as the padded pass."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_DROPOUT, TINY, tiny_lora_lm

from gpt2lora import GPT2, GPT2Config, GPT2ForSequenceClassification, LoRAConfig, apply_lora
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.model.gpt2 import Unpadded
from gpt2lora.ops.recompute import count_saved_tensors
from gpt2lora.peft.prompt import PromptConfig, apply_prompt


def padded_batch(side: str, B: int = 4, T: int = 20, vocab: int = TINY["vocab_size"]):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, T - 7, T - 12, T - 3])[:B]
    mask = (torch.arange(T) < lengths.view(B, 1)).long()
    if side == "left":
        mask = mask.flip(-1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    # A row's first token is predicted from nothing: left of it is padding, whose state training leaves at zero.
    first = torch.arange(T) == (mask.argmax(dim=1, keepdim=True))
    return ids, mask, labels.masked_fill(first, -100)


def loss_and_grads(model: torch.nn.Module, train: bool, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fn(model)``'s loss in train mode (layers on real tokens) or eval mode (the padded pass), and its grads."""
    model.train(train)
    loss = fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lm_training_on_real_tokens_equals_the_padded_pass(side):
    model = tiny_lora_lm()
    ids, mask, labels = padded_batch(side)
    step = lambda m: m(ids, mask, labels=labels)
    assert_same(loss_and_grads(model, True, step), loss_and_grads(model, False, step))
    for p in model.parameters():  # full fine-tuning: embeddings and LayerNorms get gradients too
        p.requires_grad_(True)
    assert_same(loss_and_grads(model, True, step), loss_and_grads(model, False, step))


def test_hidden_states_at_padding_are_zeros_in_training_and_real_ones_unchanged():
    model = tiny_lora_lm()
    ids, mask, _ = padded_batch("right")
    trained = model.train().transformer(ids, mask)
    plain = model.eval().transformer(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(trained[real], plain[real], rtol=0, atol=1e-5)
    assert torch.equal(trained[~real], torch.zeros_like(trained[~real]))


def test_classifier_with_a_soft_prompt_and_packed_rows_match_the_padded_pass():
    clf = GPT2ForSequenceClassification(GPT2Config(**TINY, **NO_DROPOUT), num_labels=3)
    apply_lora(clf, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
    ids, mask, _ = padded_batch("left")
    target = torch.tensor([0, 2, 1, 1])
    step = lambda m: torch.nn.functional.cross_entropy(m(ids, mask), target)
    assert_same(loss_and_grads(clf, True, step), loss_and_grads(clf, False, step))

    lm = apply_prompt(GPT2(GPT2Config(**TINY, **NO_DROPOUT)), PromptConfig(num_virtual_tokens=3), seed=0)
    labels = padded_batch("left")[2]
    step = lambda m: m(ids, mask, labels=labels)
    assert_same(loss_and_grads(lm, True, step), loss_and_grads(lm, False, step))

    packed = tiny_lora_lm()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0]] * 2)
    row_mask = torch.ones(2, 10, dtype=torch.long)
    row_mask[1, 8:] = 0  # the second packed row ends in padding
    rows = ids[:2, :10]
    step = lambda m: m(rows, row_mask, position_ids=positions, labels=rows.masked_fill(row_mask == 0, -100))
    assert_same(loss_and_grads(packed, True, step), loss_and_grads(packed, False, step))


def test_training_on_real_tokens_saves_less_for_backward():
    model = tiny_lora_lm()
    ids, mask, labels = padded_batch("right")
    saved = {}
    for train in (True, False):
        model.train(train)
        with count_saved_tensors(model.parameters()) as counter:
            model(ids, mask, labels=labels)
        saved[train] = counter.bytes
    real, slots = int(mask.sum()), mask.numel()
    assert saved[True] < saved[False] * (real / slots + 0.15), (saved, real / slots)


def test_unpadded_gather_and_scatter_invert_each_other():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    layout = Unpadded.of(mask)
    assert layout.tokens.tolist() == [1, 2, 3, 4]
    padded = torch.arange(12.0).view(2, 3, 2)
    rows = layout.gather(padded)
    assert rows.tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    back = layout.scatter(rows)
    assert torch.equal(back[mask.bool()], padded[mask.bool()]) and not back[~mask.bool()].any()
