"""Hot-path speed-ups keep their results: pooled-rows last block and the fused LoRA forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_hf_checkpoint

from gpt2lora import ConfigError, GPT2ForSequenceClassification, LoRAConfig, LoRALinear, apply_lora
from gpt2lora.model.gpt2 import KVCache, last_token_index
from gpt2lora.peft.prompt import PromptConfig, apply_prompt


def padded(side: str, batch: int = 4, length: int = 9, vocab: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with rows of lengths length, length-2, ..., padded on ``side``."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = 2 * row
        if pad:
            if side == "right":
                mask[row, length - pad:] = 0
            else:
                mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def three_block_clf_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("cls") / "ckpt", seed=4, cls="GPT2ForSequenceClassification",
                              num_labels=3, n_layer=3)


def full_path_pooled(model, ids, mask):
    """The pooled hidden state computed the long way: every position through every block, then gathered."""
    hidden = model.transformer(ids, mask)  # (B, T, C)
    index = last_token_index(mask, ids.size(0), ids.size(1), ids.device)
    return hidden[torch.arange(ids.size(0)), index]


@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_last_token_only_equals_full_path_values_and_grads(three_block_clf_checkpoint, side):
    model = GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint)
    apply_lora(model, LoRAConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():  # B != 0 so the LoRA branch contributes
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids, mask = padded(side)
    if side == "none":
        mask = None
    fast = model.transformer(ids, mask, last_token_only=True)
    slow = full_path_pooled(model, ids, mask)
    assert fast.shape == slow.shape == (4, model.config.n_embd)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)

    params = [p for p in model.parameters() if p.requires_grad and p is not model.score.weight]
    grads_fast = torch.autograd.grad(model.score(fast).square().sum(), params)
    grads_slow = torch.autograd.grad(model.score(slow).square().sum(), params)
    assert any(g.abs().sum() > 0 for g in grads_slow)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_classifier_logits_match_transformers_when_padded(three_block_clf_checkpoint, side):
    import transformers

    ours = GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint).eval()
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint).eval()
    ids, mask = padded(side)
    # transformers counts positions from the first column; give it positions over real tokens.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, mask)
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_last_token_only_with_dropout_trains_and_matches_in_eval(three_block_clf_checkpoint):
    model = GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint)
    ids, mask = padded("right")
    model.train()  # checkpoint dropout is 0.1: the pooled path must run (and differ from eval) in training
    torch.manual_seed(0)
    train_out = model(ids, mask)
    model.eval()
    eval_out = model(ids, mask)
    assert not torch.allclose(train_out, eval_out)
    torch.testing.assert_close(model.score(full_path_pooled(model, ids, mask)), eval_out, atol=1e-5, rtol=1e-5)


def test_last_token_only_with_soft_prompt_equals_full_path(three_block_clf_checkpoint):
    model = GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint).eval()
    apply_prompt(model, PromptConfig(num_virtual_tokens=3), seed=0)
    for side in ("right", "left"):
        ids, mask = padded(side)
        torch.testing.assert_close(model.transformer(ids, mask, last_token_only=True),
                                   full_path_pooled(model, ids, mask), atol=1e-5, rtol=1e-5)


def test_last_token_only_rejects_a_kv_cache(three_block_clf_checkpoint):
    model = GPT2ForSequenceClassification.from_pretrained(three_block_clf_checkpoint)
    cache = KVCache(model.config, 1, 8, torch.float32, "cpu")
    with pytest.raises(ConfigError, match="last_token_only.*kv_cache"):
        model.transformer(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache, last_token_only=True)


def lora_reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + scaling * (x A^T) B^T``, written out."""
    return F.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_lora_forward_matches_formula_values_and_grads(bias, shape):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 7, bias=bias), rank=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*shape, requires_grad=True)
    got = layer(x)
    expected = lora_reference(layer, x)
    assert got.shape == (*shape[:-1], 7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    wrt = [x, layer.lora_A, layer.lora_B]
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(expected, wrt, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_forward_same_on_fused_and_autocast_paths():
    """The fused fp32 path and the cast path used under autocast compute the same thing (bf16 tolerance)."""
    torch.manual_seed(1)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    fused = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layer(x)
    assert cast.dtype == torch.bfloat16
    torch.testing.assert_close(cast.float(), fused, atol=5e-2, rtol=5e-2)


def test_lora_forward_frozen_input_still_trains_adapter():
    """With an input that needs no grad (the first block's), the in-place accumulate still gives A/B grads."""
    torch.manual_seed(2)
    layer = LoRALinear(torch.nn.Linear(6, 4), rank=2, alpha=2)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    expected_b = layer.scaling * (x @ layer.lora_A.t()).sum(0).expand(4, 2)
    torch.testing.assert_close(layer.lora_B.grad, expected_b.detach(), atol=1e-5, rtol=1e-5)
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def _padded_lm_batch(side: str, lengths: list[int], width: int, vocab: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(len(lengths))
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _lora_lm_without_dropout() -> torch.nn.Module:
    """A small LoRA language model in training mode, no dropout, non-zero B (every LoRA factor gets a gradient)."""
    from gpt2lora import GPT2, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2(config).train()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def _record_row_lengths(monkeypatch) -> list:
    """Each training forward's ``Unpadded.lengths`` from now on: a list when attention runs row by row, else None."""
    from gpt2lora.model import gpt2

    seen = []
    original = gpt2.Unpadded.of.__func__

    def of(cls, attention_mask, runs=True):
        found = original(cls, attention_mask, runs)
        seen.append(found.lengths)
        return found
    monkeypatch.setattr(gpt2.Unpadded, "of", classmethod(of))
    return seen


def _loss_and_grads(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], device: str = "cpu"
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids, mask, labels = (t.to(device) for t in batch)
    model.to(device).zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels)
    loss.backward()
    return loss.detach().cpu(), [p.grad.cpu().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("side", ["left", "right"])
def test_training_attention_row_by_row_equals_the_padded_path(side, monkeypatch):
    """Rows whose real tokens are one run attend row by row without the padding's scores: loss and every gradient
    equal the padded path's (``attention_by_rows=False``), and the CPU's default is row by row."""
    model = _lora_lm_without_dropout()
    batch = _padded_lm_batch(side, [20, 7, 13, 1], 20, 300)
    runs_seen = _record_row_lengths(monkeypatch)

    def results(by_rows: bool | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.transformer.attention_by_rows = by_rows
        return _loss_and_grads(model, batch)

    by_rows, padded, default = results(True), results(False), results(None)
    assert runs_seen == [[20, 7, 13, 1], None, [20, 7, 13, 1]]  # the CPU's default: row by row
    torch.testing.assert_close(default[0], by_rows[0], rtol=0, atol=0)
    torch.testing.assert_close(by_rows[0], padded[0], rtol=1e-6, atol=1e-5)
    assert len(by_rows[1]) == len(padded[1]) > 0
    for a, b in zip(by_rows[1], padded[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_padded_training_on_cuda_attends_the_padded_batch_and_matches_the_cpu_rows(monkeypatch):
    """On CUDA padded training attends once over the padded batch (the default there): loss and gradients equal
    the CPU's row-by-row path on the same model."""
    model = _lora_lm_without_dropout()
    batch = _padded_lm_batch("right", [20, 7, 13, 1], 20, 300)
    runs_seen = _record_row_lengths(monkeypatch)
    on_cpu, on_cuda = _loss_and_grads(model, batch, "cpu"), _loss_and_grads(model, batch, "cuda")
    assert runs_seen == [[20, 7, 13, 1], None]
    torch.testing.assert_close(on_cuda[0], on_cpu[0], rtol=1e-4, atol=1e-4)
    assert len(on_cuda[1]) == len(on_cpu[1]) > 0
    for a, b in zip(on_cuda[1], on_cpu[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_attention_by_rows_is_the_cpu_default_and_a_setting_overrides_it():
    from gpt2lora.model.gpt2 import attends_by_rows

    assert attends_by_rows(torch.device("cpu"), None) is True
    assert attends_by_rows(torch.device("cuda", 0), None) is False  # measured on an H200: the loop's launches
    assert attends_by_rows(torch.device("mps"), None) is False
    assert attends_by_rows(torch.device("cpu"), False) is False
    assert attends_by_rows(torch.device("cuda"), True) is True


def test_rows_that_are_not_one_run_keep_the_padded_path():
    from gpt2lora.model.gpt2 import Unpadded

    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert Unpadded.of(mask).lengths == [2, 3, 0]
    assert Unpadded.of(mask, runs=False).lengths is None
    assert Unpadded.of(torch.tensor([[1, 0, 1, 1]])).lengths is None  # a hole inside the row
