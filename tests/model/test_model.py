"""GPT2 forward parity with transformers.GPT2LMHeadModel, padding, KV cache and input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ODD, TINY, make_hf_checkpoint
from safetensors.torch import load_file, save_file

from gpt2lora import GPT2, ConfigError, GPT2Config
from gpt2lora.model.gpt2 import KVCache

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def to_hub_layout(folder: Path, n_layer: int, n_positions: int) -> Path:
    """Rewrite a save_pretrained checkpoint with the hub's bare names, mask buffers and no lm_head."""
    state = load_file(folder / "model.safetensors")
    bare = {key.removeprefix("transformer."): t for key, t in state.items() if key != "lm_head.weight"}
    causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.uint8))
    for i in range(n_layer):
        bare[f"h.{i}.attn.bias"] = causal.view(1, 1, n_positions, n_positions).clone()
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(bare, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def hub_layout_checkpoint(tmp_path_factory) -> Path:
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("hub") / "ckpt", seed=3, **ODD)
    return to_hub_layout(folder, ODD["n_layer"], ODD["n_positions"])


def random_ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_logits_match_transformers(which, tiny_checkpoint, odd_checkpoint):
    folder, shape = (tiny_checkpoint, TINY) if which == "tiny" else (odd_checkpoint, ODD)
    ours, ref = GPT2.from_pretrained(folder).eval(), hf_model(folder)
    ids = random_ids(shape["vocab_size"], (3, shape["n_positions"]))  # the full context length
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids)
    assert got.shape == (3, shape["n_positions"], shape["vocab_size"])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_odd_config_is_read_from_checkpoint(odd_checkpoint):
    config = GPT2.from_pretrained(odd_checkpoint).config
    assert (config.n_head, config.head_dim, config.n_positions) == (3, 32, 40)
    assert config.layer_norm_epsilon == 1e-6
    assert GPT2.from_pretrained(odd_checkpoint).transformer.ln_f.eps == 1e-6


def test_logits_match_transformers_124m_shape(tmp_path):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    ref.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path).eval()
    assert ours.config == GPT2Config.from_preset("gpt2", eos_token_id=ref.config.eos_token_id)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ids = random_ids(50257, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=0)


def test_hub_layout_matches_save_pretrained_layout(hub_layout_checkpoint, tmp_path):
    keys = set(load_file(hub_layout_checkpoint / "model.safetensors"))
    assert "h.0.attn.bias" in keys and "wte.weight" in keys and "lm_head.weight" not in keys
    ours = GPT2.from_pretrained(hub_layout_checkpoint).eval()
    ref = hf_model(hub_layout_checkpoint)  # transformers reads the hub layout too
    ids = random_ids(ODD["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=0)
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_weights_are_transposed_from_conv1d(tiny_checkpoint):
    state = load_file(tiny_checkpoint / "model.safetensors")
    ours = GPT2.from_pretrained(tiny_checkpoint)
    conv = state["transformer.h.1.mlp.c_fc.weight"]  # Conv1D: (in, out)
    assert conv.shape == (TINY["n_embd"], 4 * TINY["n_embd"])
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.weight, conv.t(), atol=0, rtol=0)


def padded_batch(lengths: list[int], total: int, vocab: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(vocab, (len(lengths), total), seed=5)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, total - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(side, odd_checkpoint):
    ours, ref = GPT2.from_pretrained(odd_checkpoint).eval(), hf_model(odd_checkpoint)
    ids, mask = padded_batch([12, 5, 1, 9], 12, ODD["vocab_size"], side)
    # transformers counts positions from column 0; ours counts real tokens, as the mask implies.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=position_ids).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert torch.isfinite(got).all()  # padding rows stay finite too


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_row_equals_unpadded_row(side, tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint).eval()
    ids, mask = padded_batch([10, 4], 10, TINY["vocab_size"], side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        alone = model(ids[1:, mask[1].bool()])
    torch.testing.assert_close(batch[1][mask[1].bool()], alone[0], atol=ATOL, rtol=0)


def test_kv_cache_steps_equal_full_forward(odd_checkpoint):
    model = GPT2.from_pretrained(odd_checkpoint).eval()
    ids = random_ids(ODD["vocab_size"], (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 20, torch.float32, "cpu")
        chunks = [model(ids[:, :7], kv_cache=cache), model(ids[:, 7:12], kv_cache=cache)]
        chunks += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_with_left_padding_matches_transformers(odd_checkpoint):
    model, ref = GPT2.from_pretrained(odd_checkpoint).eval(), hf_model(odd_checkpoint)
    ids, mask = padded_batch([8, 3], 8, ODD["vocab_size"], "left")
    extra = random_ids(ODD["vocab_size"], (2, 1), seed=9)
    full_ids, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 9, torch.float32, "cpu")
        model(ids, attention_mask=mask, kv_cache=cache)
        step = model(extra, attention_mask=full_mask, kv_cache=cache)[:, -1]
        expected = ref(full_ids, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=ATOL, rtol=0)


def test_train_mode_dropout_is_active_and_eval_is_deterministic(tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint)
    ids = random_ids(TINY["vocab_size"], (1, 16))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_from_config_is_seeded_and_tied():
    config = GPT2Config(**TINY)
    a, b = GPT2.from_config(config, seed=4), GPT2.from_config(config, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.lm_head.weight is a.transformer.wte.weight
    c = GPT2.from_config(GPT2Config(**TINY), seed=5)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_sequence_longer_than_n_positions_is_refused(odd_checkpoint):
    model = GPT2.from_pretrained(odd_checkpoint)
    with pytest.raises(ConfigError, match=r"41 tokens .*n_positions=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    cache = KVCache(model.config, 1, 40, torch.float32, "cpu")
    model(torch.zeros(1, 39, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ConfigError, match=r"41 tokens .*n_positions=40"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("bad", [300, 5000, -1])
def test_token_ids_outside_vocabulary_are_refused(bad, odd_checkpoint):
    model = GPT2.from_pretrained(odd_checkpoint)
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ConfigError, match=rf"token id {bad}.*\[0, 299\].*vocab_size=300"):
        model(ids)


def test_bad_input_shapes_and_dtypes_are_refused(tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint)
    with pytest.raises(ConfigError, match=r"input_ids must have shape \(batch, tokens\), got \(5,\)"):
        model(torch.arange(5))
    with pytest.raises(ConfigError, match="input_ids must hold integer token ids.*float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ConfigError, match=r"attention_mask has shape \(1, 4\), expected \(1, 5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
