"""Training kernels that keep less for backward: bool-mask dropout, attention that recomputes its
probabilities, the fused LoRA product and recomputed LayerNorm/GELU outputs. Each is checked against
the plain computation (same masks, same inputs) for values and gradients, and for what autograd saves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, tiny_lora_lm

import gpt2lora.ops.attention as attention_module
from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
from gpt2lora.model.gpt2 import attention_bias, packed_segments
from gpt2lora.ops.attention import DropoutAttention, attention
from gpt2lora.ops.dropout import Dropout, MaskedScale, drop_threshold, dropout, keep_mask
from gpt2lora.ops.lora_product import LoRAProduct
from gpt2lora.ops.recompute import count_saved_tensors, recompute_cheap_outputs
from gpt2lora.training.precision import hold_frozen_weights


def reference_attention(q, k, v, visible, keep, p):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) * keep / (1 - p)) @ v


def assert_same_values_and_gradients(out, expected, inputs):
    """``out`` equals ``expected`` (float64), and so do their gradients with respect to ``inputs``."""
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def full_keep_mask(keep, shape, keys, causal):
    """The (B, heads, T, keys) mask of a :func:`blocked_keep_mask` (flat for query blocks): entries no block has
    are False (the reference's causal softmax zeroes them anyway)."""
    if keep.dim() == 4:
        return keep
    B, H, T = shape[0], shape[1], shape[2]
    step, blocks, _ = attention_module.block_plan(H, T, keys, causal)
    parts = attention_module._keep_parts(keep, B, H, step, blocks)
    assert sum(part.numel() for part in parts) == keep.numel()
    full = torch.zeros(B, H, T, keys, dtype=torch.bool)
    regions = [(start, first, end, stop) for start in range(0, B, step) for first, end, stop in blocks]
    for (start, first, end, stop), part in zip(regions, parts, strict=True):
        full[start:start + part.size(0), :, first:end, :stop] = part
    return full


def qkv(B=3, H=2, T=7, D=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def masks(B=3, T=7):
    """Causal, causal with padding on either side (each query sees itself), and packed segments."""
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    lengths = torch.tensor([T, T - 3, T - 5])[:B]
    right = torch.arange(T) < lengths.view(B, 1)
    left = right.flip(-1)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1]] * B)[:, :T]
    packed = attention_bias(torch.ones(B, T, dtype=torch.bool), T, packed_segments(positions))
    return {"causal": causal, "right-padded": attention_bias(right, T), "left-padded": attention_bias(left, T),
            "packed": packed, "none": None}


@pytest.mark.parametrize("block", [1 << 22, 40])  # one block for the batch, or one batch row per block
@pytest.mark.parametrize("name", ["causal", "right-padded", "left-padded", "packed", "none"])
def test_dropout_attention_equals_softmax_dropout_attention_with_the_same_mask(monkeypatch, block, name):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", block)
    q, k, v = qkv()
    visible = masks()[name]
    keep = keep_mask((3, 2, 7, 7), 0.3)
    assert 0 < keep.sum() < keep.numel()
    out = DropoutAttention.apply(q, k, v, visible, keep, 0.3)
    expected = reference_attention(q, k, v, visible, keep, 0.3)
    assert_same_values_and_gradients(out, expected, (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: DropoutAttention.apply(a, b, c, visible, keep, 0.3), (q, k, v))


def test_without_dropout_or_gradients_attention_is_sdpa():
    q, k, v = qkv(dtype=torch.float32)
    visible = masks()["left-padded"]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    torch.testing.assert_close(attention(q, k, v, visible, False, 0.0), expected)
    with torch.no_grad():  # dropout without autograd: SDPA's own dropout (no mask kept anyway)
        torch.manual_seed(0)
        a = attention(q, k, v, None, True, 0.5)
        torch.manual_seed(0)
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5)
    torch.testing.assert_close(a, b)


def test_attention_dropout_keeps_no_float_probabilities():
    q, k, v = qkv(B=4, H=2, T=32, D=8, dtype=torch.float32)
    shapes = {}
    for name, fn in {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1),
                     "gpt2lora": lambda: attention(q, k, v, None, True, 0.1)}.items():
        with count_saved_tensors() as saved:
            fn().sum()
        shapes[name] = saved
    square = 4 * 2 * 32 * 32
    assert any(dt.is_floating_point and n >= square for n, dt in shapes["sdpa"].tensors)  # the math path's
    assert not any(dt.is_floating_point and n >= square for n, dt in shapes["gpt2lora"].tensors)
    assert shapes["gpt2lora"].bytes < shapes["sdpa"].bytes / 2


def test_bf16_attention_dropout_tracks_fp32():
    q, k, v = qkv(B=2, H=2, T=16, D=8, dtype=torch.float32)
    keep = keep_mask((2, 2, 16, 16), 0.1)
    causal = torch.ones(16, 16, dtype=torch.bool).tril_()
    exact = DropoutAttention.apply(q, k, v, causal, keep, 0.1)
    half = DropoutAttention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, keep, 0.1)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), exact, rtol=0, atol=5e-2)
    (grad,) = torch.autograd.grad(half.float().sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["causal", "right-padded", "packed"])
def test_bf16_attention_dropout_gradients_track_fp32(name):
    q, k, v = qkv(B=3, H=2, T=7, D=8, dtype=torch.float32)
    visible, keep = masks()[name], keep_mask((3, 2, 7, 7), 0.2)
    grad = torch.randn(3, 2, 7, 8, generator=torch.Generator().manual_seed(2))
    exact = torch.autograd.grad(DropoutAttention.apply(q, k, v, visible, keep, 0.2), (q, k, v), grad)
    halves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    half = torch.autograd.grad(DropoutAttention.apply(*halves, visible, keep, 0.2), halves, grad.bfloat16())
    for mine, theirs in zip(half, exact, strict=True):
        assert mine.dtype == torch.bfloat16
        scale = theirs.abs().max().item()
        torch.testing.assert_close(mine.float(), theirs, rtol=0, atol=3e-2 * scale)


def test_causal_attention_dropout_matches_its_reference_under_the_same_seed():
    q, k, v = qkv(dtype=torch.float32)
    torch.manual_seed(3)
    out = attention(q, k, v, None, True, 0.25)
    torch.manual_seed(3)
    keep = keep_mask((3, 2, 7, 7), 0.25)  # attention draws its mask the same way, first thing
    expected = reference_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril_(), keep, 0.25)
    torch.testing.assert_close(out, expected)


def test_query_blocks_cover_every_query_and_skip_only_keys_no_query_of_the_block_sees():
    assert attention_module.query_blocks(12, 500, 500, causal=False) == [(0, 500, 500)]
    assert attention_module.query_blocks(12, 100, 100, causal=True) == [(0, 100, 100)]  # short: one block
    for queries, keys in ((500, 500), (300, 320), (1024, 1024)):
        blocks = attention_module.query_blocks(12, queries, keys, causal=True)
        assert len(blocks) > 1
        assert blocks[0][0] == 0 and blocks[-1][1:] == (queries, keys)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))  # contiguous, in order
        for first, end, stop in blocks:
            assert end - first >= attention_module.MIN_QUERY_ROWS
            assert stop == end + keys - queries  # the block's last query sees exactly the keys before stop
        assert sum((end - first) * stop for first, end, stop in blocks) < 0.8 * queries * keys


def test_causal_attention_in_query_blocks_keeps_only_the_blocks_masks():
    """Backward keeps a mask entry only for the scores a query block computes: 44% fewer for 1024-token rows."""
    assert attention_module.kept_scores(12, 200, 200, causal=True) == 12 * 200 * 200  # one block: every score
    assert attention_module.kept_scores(12, 1024, 1024, causal=False) == 12 * 1024 * 1024
    blocked = attention_module.kept_scores(12, 1024, 1024, causal=True)
    assert blocked == 12 * sum((end - first) * stop
                               for first, end, stop in attention_module.query_blocks(12, 1024, 1024, True))
    assert blocked < 0.6 * 12 * 1024 * 1024
    q, k, v = qkv(B=2, H=4, T=512, D=4, dtype=torch.float32)
    assert len(attention_module.query_blocks(4, 512, 512, True)) > 1
    with count_saved_tensors() as saved:
        attention(q, k, v, None, True, 0.1)
    masks = [n for n, dtype in saved.tensors if dtype == torch.bool]
    assert masks == [2 * attention_module.kept_scores(4, 512, 512, True)]
    assert masks[0] == 0.75 * 2 * 4 * 512 * 512  # two blocks of 256 queries: 256 and 512 keys


@pytest.mark.parametrize("batch, queries, keys", [(3, 13, 13), (2, 11, 16), (1, 40, 40)])
def test_causal_attention_in_query_blocks_equals_the_reference(monkeypatch, batch, queries, keys):
    """Blocks of 4-6 queries (several per row, some rows per block), each reading only the keys it may see:
    values and gradients equal plain attention with the same mask, in float64."""
    monkeypatch.setattr(attention_module, "MIN_QUERY_ROWS", 4)
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2 * 5 * keys)
    assert len(attention_module.query_blocks(2, queries, keys, causal=True)) > 1
    g = torch.Generator().manual_seed(5)
    q = torch.randn(batch, 2, queries, 4, dtype=torch.float64, generator=g).requires_grad_()
    k, v = (torch.randn(batch, 2, keys, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    torch.manual_seed(7)
    out = attention(q, k, v, None, True, 0.3)
    torch.manual_seed(7)
    keep = attention_module.blocked_keep_mask(q.shape, keys, 0.3, causal=True)  # the same draws, in order
    assert keep.dim() == 1 and keep.numel() == batch * attention_module.kept_scores(2, queries, keys, True)
    causal = torch.ones(queries, keys, dtype=torch.bool).tril_(keys - queries)
    full = full_keep_mask(keep, q.shape, keys, True) & causal
    assert 0 < full.sum() < causal.sum() * batch * 2
    expected = reference_attention(q, k, v, causal, full, 0.3)
    assert_same_values_and_gradients(out, expected, (q, k, v))
    for mask in (keep, full):  # the flat mask of the blocks, or a whole one
        assert torch.autograd.gradcheck(
            lambda a, b, c, mask=mask: DropoutAttention.apply(a, b, c, None, mask, 0.3, True), (q, k, v))


@pytest.mark.parametrize("name", ["causal", "right-padded", "left-padded", "packed", "none"])
def test_attention_with_a_mask_in_query_blocks_equals_the_reference(monkeypatch, name):
    """Masks that let no query see a later key (all of GPT-2's) are worked on in query blocks too."""
    monkeypatch.setattr(attention_module, "MIN_QUERY_ROWS", 2)
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2 * 3 * 7)
    q, k, v = qkv()
    visible = masks()[name]
    blocked = visible is not None and attention_module.within_causal(visible, 7, 7)
    assert blocked == (name != "none")
    assert not attention_module.within_causal(torch.ones(7, 7, dtype=torch.bool), 7, 7)
    torch.manual_seed(4)
    out = attention(q, k, v, visible, False, 0.3)
    torch.manual_seed(4)
    keep = full_keep_mask(attention_module.blocked_keep_mask(q.shape, 7, 0.3, causal=blocked), q.shape, 7, blocked)
    expected = reference_attention(q, k, v, visible, keep, 0.3)
    assert_same_values_and_gradients(out, expected, (q, k, v))


def rows_reference(qkv, lengths, heads, p):
    """Attention of each row by itself through :func:`attention` (one autograd node per row), concatenated."""
    width = qkv.size(1) // 3
    outputs = []
    for rows in qkv.split(lengths):
        L = rows.size(0)
        if L:
            q, k, v = rows.view(1, L, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            outputs.append(attention(q, k, v, None, L > 1, p).transpose(1, 2).reshape(L, width))
    return torch.cat(outputs)


@pytest.mark.parametrize("lengths", [[5, 1, 0, 9, 3], [40, 17]])
def test_attention_by_rows_equals_each_row_through_attention(monkeypatch, lengths):
    """One autograd node for every row (RowsAttention) draws the same masks in the same order and computes the
    same values and projection gradients as each row's own attention, in float64; the 40-token row goes in
    query blocks."""
    monkeypatch.setattr(attention_module, "MIN_QUERY_ROWS", 8)
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2 * 12 * 40)
    assert len(attention_module.query_blocks(2, 40, 40, causal=True)) > 1
    g = torch.Generator().manual_seed(11)
    qkv_rows = torch.randn(sum(lengths), 3 * 8, dtype=torch.float64, generator=g).requires_grad_()
    torch.manual_seed(5)
    out = attention_module.attention_by_rows(qkv_rows, lengths, 2, 0.3)
    assert out.grad_fn.name().startswith("RowsAttention")
    torch.manual_seed(5)
    expected = rows_reference(qkv_rows, lengths, 2, 0.3)
    assert_same_values_and_gradients(out, expected, (qkv_rows,))
    with count_saved_tensors() as mine:
        attention_module.attention_by_rows(qkv_rows, lengths, 2, 0.3)
    with count_saved_tensors() as theirs:
        rows_reference(qkv_rows, lengths, 2, 0.3)
    assert sorted(mine.tensors) == sorted(theirs.tensors)  # the same q, k, v copies and masks


def test_attention_by_rows_without_dropout_or_gradients_runs_each_row_as_before():
    qkv_rows = torch.randn(12, 3 * 8, dtype=torch.float64, requires_grad=True)
    expected = rows_reference(qkv_rows, [7, 5], 2, 0.0)
    torch.testing.assert_close(attention_module.attention_by_rows(qkv_rows, [7, 5], 2, 0.0), expected)
    with torch.no_grad():  # dropout without gradients: SDPA's own, row by row
        torch.manual_seed(2)
        dropped = attention_module.attention_by_rows(qkv_rows, [7, 5], 2, 0.2)
        torch.manual_seed(2)
        torch.testing.assert_close(dropped, rows_reference(qkv_rows, [7, 5], 2, 0.2))
        assert not torch.allclose(dropped, expected)
    empty = torch.randn(0, 3 * 8, requires_grad=True)
    assert attention_module.attention_by_rows(empty, [0, 0], 2, 0.1).shape == (0, 8)


def test_bf16_causal_attention_in_query_blocks_tracks_fp32(monkeypatch):
    monkeypatch.setattr(attention_module, "MIN_QUERY_ROWS", 8)
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2 * 16 * 48)
    q, k, v = qkv(B=2, H=2, T=48, D=8, dtype=torch.float32)
    keep = attention_module.blocked_keep_mask(q.shape, 48, 0.1, causal=True)
    grad = torch.randn(2, 2, 48, 8, generator=torch.Generator().manual_seed(2))
    exact = DropoutAttention.apply(q, k, v, None, keep, 0.1, True)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad)
    halves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    half = DropoutAttention.apply(*halves, None, keep, 0.1, True)
    torch.testing.assert_close(half.float(), exact, rtol=0, atol=5e-2)
    for mine, theirs in zip(torch.autograd.grad(half, halves, grad.bfloat16()), exact_grads, strict=True):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), theirs, rtol=0, atol=3e-2 * theirs.abs().max().item())


def test_keep_masks_have_the_asked_rate_and_repeat_with_the_seed():
    assert drop_threshold(0.1) == round(0.1 * 2 ** 15)
    torch.manual_seed(0)
    first = keep_mask((1000, 1000), 0.1)
    torch.manual_seed(0)
    again = keep_mask((1000, 1000), 0.1)
    assert first.dtype == torch.bool and torch.equal(first, again)
    assert abs(first.float().mean().item() - 0.9) < 0.002  # 1M draws: the standard deviation is 0.0003
    assert abs(keep_mask((1000, 1000), 0.5).float().mean().item() - 0.5) < 0.002
    assert not torch.equal(first, keep_mask((1000, 1000), 0.1))


def test_every_16_bit_lane_of_a_draw_keeps_at_the_asked_rate():
    torch.manual_seed(1)
    keep = keep_mask((250_000, 4), 0.1)  # column j holds lane j of each 64-bit draw
    rates = keep.float().mean(0)
    assert torch.all((rates - 0.9).abs() < 0.003), rates  # 250k draws a lane: the standard deviation is 0.0006
    odd = keep_mask((7, 3), 0.5)  # a count that is not a multiple of four lanes
    assert odd.shape == (7, 3) and 0 < odd.sum() < 21


def test_dropout_scales_kept_elements_and_saves_a_one_byte_mask():
    x = torch.randn(64, 48, requires_grad=True)
    layer = Dropout(0.2)
    assert isinstance(layer, torch.nn.Dropout) and repr(layer) == repr(torch.nn.Dropout(0.2))
    layer.eval()
    assert layer(x) is x
    layer.train()
    with count_saved_tensors() as saved:
        out = layer(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    assert 0.7 < kept.float().mean() < 0.9
    assert saved.bytes == x.numel() and saved.tensors == [(x.numel(), torch.bool)]  # one bool per element
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, kept.float() / 0.8)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x)) and dropout(x, 0.0) is x
    assert torch.autograd.gradcheck(lambda t: MaskedScale.apply(t, kept, 1.25), (x.double().detach().requires_grad_(),))


@pytest.mark.parametrize("trained_base, bias, dropped, input_grad",
                         [(False, True, False, True), (True, True, False, True), (False, False, True, True),
                          (True, False, True, False), (False, True, False, False)])
def test_lora_product_equals_the_autograd_formulation(trained_base, bias, dropped, input_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, dtype=torch.float64, generator=g).requires_grad_(input_grad)
    w = torch.randn(5, 6, dtype=torch.float64, generator=g).requires_grad_(trained_base)
    b = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(trained_base) if bias else None
    a = torch.randn(3, 6, dtype=torch.float64, generator=g).requires_grad_()
    up = torch.randn(5, 3, dtype=torch.float64, generator=g).requires_grad_()
    keep = torch.rand(10, 6, generator=g) > 0.3
    h = x * keep / 0.7 if dropped else x
    out = LoRAProduct.apply(x, h, w, b, a, up, 1.5)
    expected = F.linear(x, w, b) + 1.5 * F.linear(F.linear(h, a), up)
    torch.testing.assert_close(out, expected)
    inputs = [t for t in (x, w, b, a, up) if t is not None and t.requires_grad]
    grad = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, inputs, grad, retain_graph=True),
                            torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(mine, theirs)


def lm_batch(B=4, T=40):
    ids = torch.randint(1, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :12] = -100  # a masked prompt
    return ids, mask, labels


def step_grads(model: GPT2, recompute: bool | None, seed: int = 5) -> tuple[float, dict[str, torch.Tensor], object]:
    model.transformer.recompute_cheap_outputs = recompute
    ids, mask, labels = lm_batch()
    torch.manual_seed(seed)
    with count_saved_tensors(model.parameters()) as saved:
        loss = model(ids, mask, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, saved


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recomputing_layernorm_and_gelu_outputs_changes_no_gradient_and_saves_less(method):
    model = tiny_lora_lm(dropout=0.1).train()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    loss_off, grads_off, saved_off = step_grads(model, False)
    loss_on, grads_on, saved_on = step_grads(model, True)
    assert loss_on == loss_off  # the same dropout masks: the forward is unchanged
    assert grads_on.keys() == grads_off.keys() and any("lora_A" in n for n in grads_on)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=0, atol=1e-6)
    layers = TINY["n_layer"]
    assert saved_on.recomputed >= 3 * layers  # ln_1, ln_2 and the activation of every block
    tokens, width = int(lm_batch()[1].sum()), TINY["n_embd"]  # training runs the layers on real tokens
    outputs = layers * tokens * (2 * width + 4 * width) * 4  # two LayerNorm outputs + one GELU output, fp32
    assert saved_off.bytes - saved_on.bytes >= outputs


def bf16_step(model: GPT2, recompute: bool | None) -> tuple[float, dict[str, torch.Tensor], object]:
    model.transformer.recompute_cheap_outputs = recompute
    ids, mask, labels = lm_batch()
    torch.manual_seed(5)
    with count_saved_tensors(model.parameters()) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, mask, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, saved


def test_the_default_keeps_half_precision_outputs_on_the_cpu_and_recomputes_fp32_ones():
    model = tiny_lora_lm(dropout=0.1).train()
    hold_frozen_weights(model)  # what precision="bf16" trains: the GELU outputs are bf16
    loss_default, grads_default, saved_default = bf16_step(model, None)
    loss_all, grads_all, saved_all = bf16_step(model, True)
    layers = TINY["n_layer"]
    assert saved_all.recomputed >= layers  # True recomputes the bf16 activation outputs as well
    assert saved_default.recomputed == 0  # the default keeps them (the LayerNorms' fp32 outputs are not saved)
    tokens, width = int(lm_batch()[1].sum()), TINY["n_embd"]
    assert saved_default.bytes - saved_all.bytes >= layers * tokens * 4 * width * 2  # one bf16 GELU output each
    assert loss_default == loss_all
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_default[name], grad, rtol=0, atol=0)  # the same values either way
    _, _, saved_fp32 = step_grads(tiny_lora_lm(dropout=0.1).train(), None)
    assert saved_fp32.recomputed >= 3 * layers  # in fp32 the default recomputes all three per block


def test_recompute_refuses_an_input_modified_in_place():
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(3, 8, requires_grad=True)
    h = x * 2
    with recompute_cheap_outputs([norm]):
        y = (norm(h) ** 2).sum()  # pow saves the LayerNorm output: stored as a recipe
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="LayerNorm was modified in place"):
        y.backward()


class AutocastProbe(torch.nn.Module):
    """A layer whose output depends on whether CPU autocast is on (as CUDA LayerNorm's dtype does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if torch.is_autocast_enabled("cpu") else 3.0)


def test_recompute_replays_the_forward_autocast_state():
    probe = AutocastProbe()
    x = torch.randn(5, 8, requires_grad=True)
    with count_saved_tensors() as saved, recompute_cheap_outputs([probe]), torch.autocast("cpu", dtype=torch.bfloat16):
        y = (probe(x * 1.0) ** 2).sum()  # pow saves the probe's output: stored as a recipe
    assert saved.recomputed == 1
    (grad,) = torch.autograd.grad(y, x)  # backward runs outside autocast
    torch.testing.assert_close(grad, 2 * (2.0 * x.detach()) * 2.0)


def test_an_lm_lora_step_saves_under_a_third_of_what_transformers_and_peft_save():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 128, "vocab_size": 2000}
    hf = transformers.GPT2Config(**shape, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    hf._attn_implementation = "sdpa"
    targets = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel(hf), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM"))
    mine = GPT2(GPT2Config(**shape, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    apply_lora(mine, LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=tuple(targets)), seed=0)
    B, T = 8, 96
    ids = torch.randint(1, 2000, (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :60] = -100  # a masked prompt: 38% of positions are targets
    saved = {}
    for name, model, fn in (("peft", theirs, lambda m: m(input_ids=ids, labels=labels).loss),
                            ("gpt2lora", mine, lambda m: m(ids, labels=labels))):
        model.train()
        with count_saved_tensors(model.parameters()) as counter:
            fn(model)
        saved[name] = counter.bytes
    assert saved["gpt2lora"] < saved["peft"] / 3, saved
