"""Generation: greedy parity with transformers.generate, KV cache, sampling filters by definition, limits."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ODD, REPO, TINY, left_padded

from gpt2lora import GPT2, ConfigError, generate
from gpt2lora.model.generate import filter_logits, next_token
from gpt2lora.model.hooks import KVCache, cache_dtype
from gpt2lora.ops import packed

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def odd_models(odd_checkpoint):
    return (GPT2.from_pretrained(odd_checkpoint).eval(),
            transformers.GPT2LMHeadModel.from_pretrained(odd_checkpoint).eval())


def hf_greedy(ref, ids, mask, new: int, eos: int) -> torch.Tensor:
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos)


def naive_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_matches_transformers_on_left_padded_batch(odd_models):
    ours, ref = odd_models
    ids, mask = left_padded([7, 3, 11, 1], ODD["vocab_size"], pad=299)
    new = ODD["n_positions"] - ids.size(1)  # runs right up to n_positions
    expected = hf_greedy(ref, ids, mask, new, eos=299)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=299)
    assert got.shape == (4, ODD["n_positions"])
    assert torch.equal(got, expected)


def test_eos_stops_rows_like_transformers(odd_models):
    ours, ref = odd_models
    ids, mask = left_padded([5, 9, 2], ODD["vocab_size"], pad=0, seed=1)
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None)
    eos = int(free[1, ids.size(1) + 3])  # row 1 meets this token within 4 steps
    expected = hf_greedy(ref, ids, mask, 20, eos=eos)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(got, expected)
    row = got[1, ids.size(1):]
    first = int((row == eos).nonzero()[0])
    assert first <= 3 and (row[first:] == eos).all()


def test_generation_stops_when_every_row_has_finished(odd_models):
    ours, ref = odd_models
    ids, mask = left_padded([4], ODD["vocab_size"], pad=0, seed=2)
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, ids.size(1) + 2])
    first = int((free[0, ids.size(1):] == eos).nonzero()[0])
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert got.size(1) == ids.size(1) + first + 1 < free.size(1)
    assert torch.equal(got, hf_greedy(ref, ids, mask, 10, eos=eos))


@pytest.mark.parametrize("batch", [1, 2])
def test_long_greedy_runs_at_small_batch_match_transformers(batch, tiny_checkpoint):
    # batch <= 2 with >= 32 new tokens takes the transposed-head decoding path
    ours = GPT2.from_pretrained(tiny_checkpoint).eval()
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    ref.generation_config.eos_token_id = None  # run the full length on both sides
    ids, mask = left_padded([9, 4][:batch], TINY["vocab_size"], pad=0, seed=6)
    new = TINY["n_positions"] - ids.size(1)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert got.shape == (batch, TINY["n_positions"])
    assert torch.equal(got, expected)


def test_right_padding_is_left_aligned(odd_models):
    ours, _ = odd_models
    ids, mask = left_padded([6, 2, 4], ODD["vocab_size"], pad=0, seed=3)
    order = torch.argsort(1 - mask, dim=1, stable=True)  # real tokens first: right padding
    right_ids, right_mask = ids.gather(1, order), mask.gather(1, order)
    left = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    right = generate(ours, right_ids, attention_mask=right_mask, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(left, right)


def test_kv_cache_greedy_equals_recomputing_everything(tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint).eval()
    ids = torch.randint(0, TINY["vocab_size"], (3, 5), generator=torch.Generator().manual_seed(4))
    got = model.generate(ids, max_new_tokens=30, eos_token_id=None)
    assert torch.equal(got, naive_greedy(model, ids, 30))
    assert torch.equal(generate(model, ids[0], max_new_tokens=30, eos_token_id=None), got[:1])  # 1-D prompt


def test_cache_dtype_widens_half_models_on_the_cpu_only():
    assert cache_dtype(torch.bfloat16, "cpu") == cache_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert cache_dtype(torch.float32, "cpu") == torch.float32
    assert cache_dtype(torch.bfloat16, "cuda") == torch.bfloat16 and cache_dtype(torch.float16, "cuda:0") == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_decodes_on_fp32_keys_as_recomputing_in_its_dtype(tiny_checkpoint, dtype):
    """A bf16 / fp16 model on the CPU caches keys and values in fp32 (exact widening; attention of one query
    over them is several times faster): each cached step's logits equal recomputing the whole sequence in the
    model's dtype within that dtype's rounding, and come out in the model's dtype."""
    model = GPT2.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model.config, 2, 9, dtype, "cpu")
    assert cache.keys.dtype == cache.values.dtype == torch.float32
    with torch.no_grad():
        full = model(ids)
        steps = [model.lm_head(model.transformer(ids[:, :5], kv_cache=cache))]
        steps += [model.lm_head(model.transformer(ids[:, t:t + 1], kv_cache=cache)) for t in range(5, 9)]
    cached = torch.cat(steps, dim=1)
    assert cached.dtype == full.dtype == dtype
    step = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(cached.float(), full.float(), rtol=4 * step, atol=4 * step * full.abs().max().item())
    assert torch.equal(cache.keys[:, :, :, :9].to(dtype).float(), cache.keys[:, :, :, :9])  # widened, not rounded


def test_same_seed_same_sample(odd_models):
    ours, _ = odd_models
    ids, mask = left_padded([5, 3], ODD["vocab_size"], pad=0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 25, "temperature": 1.5, "top_k": 50, "top_p": 0.95,
              "eos_token_id": None}
    a = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(ours, ids, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(ours, ids, attention_mask=mask, max_new_tokens=25, eos_token_id=None))


def draws(logits: torch.Tensor, n: int = 3000, seed: int = 0, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([next_token(logits, generator=g, **kwargs) for _ in range(n)])


def test_top_k_only_ever_draws_the_k_best():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.9, 0.0, 1.8, 0.5, -3.0]])
    seen = set(draws(logits, temperature=5.0, top_k=3, top_p=None).flatten().tolist())
    assert seen == {1, 3, 5}
    unfiltered = set(draws(logits, temperature=5.0, top_k=None, top_p=None).flatten().tolist())
    assert unfiltered == set(range(8))  # without the filter every token does come up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_over_half_logits_picks_their_own_argmax(dtype):
    """Greedy widens half logits before argmax (faster on the CPU): the same index, ties included."""
    logits = (torch.randn(6, 50257, generator=torch.Generator().manual_seed(6)) * 4).round().to(dtype)
    assert (logits == logits.max(dim=-1, keepdim=True).values).sum() > 6  # ties at the top
    assert torch.equal(next_token(logits, 0.0, None, None, None), logits.argmax(dim=-1))


def test_top_k_one_is_greedy():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 3.0):
        got = next_token(logits, temperature, 1, None, torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()
    for top_p, kept in [(0.4, {1}), (0.7, {1, 3}), (0.9, {1, 3, 0}), (0.99, {0, 1, 2, 3})]:
        seen = set(draws(logits, n=2000, temperature=1.0, top_k=None, top_p=top_p).flatten().tolist())
        assert seen == kept, top_p
    # The kept tokens keep their relative odds: 0.5 : 0.3 renormalised is 0.625 : 0.375.
    counts = torch.bincount(draws(logits, n=4000, temperature=1.0, top_k=None, top_p=0.7).flatten(),
                            minlength=4)
    assert abs(counts[1].item() / 4000 - 0.625) < 0.03


def test_filters_agree_with_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)) * 3
    for k in (1, 5, 40, 299):
        ours = filter_logits(logits, k, None)
        assert torch.equal(torch.isinf(ours), torch.isinf(TopKLogitsWarper(k)(None, logits.clone())))
    for p in (0.1, 0.5, 0.9, 0.999):
        ours = filter_logits(logits, None, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(TopPLogitsWarper(p)(None, logits.clone())))


def test_temperature_sampling_follows_softmax_of_scaled_logits():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    for temperature in (0.5, 2.0):
        counts = torch.bincount(draws(logits, n=6000, temperature=temperature, top_k=None, top_p=None)
                                .flatten(), minlength=3)
        expected = (logits[0] / temperature).softmax(-1)
        torch.testing.assert_close(counts / 6000, expected, atol=0.02, rtol=0)
    assert torch.equal(next_token(logits, 0.0, None, None, None), torch.tensor([0]))


def test_max_new_tokens_zero_returns_the_prompt(tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_generation_past_n_positions_is_refused(odd_models):
    ours, _ = odd_models
    ids = torch.zeros(2, 30, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"30 tokens \+ max_new_tokens=11 exceeds .*n_positions=40"):
        generate(ours, ids, max_new_tokens=11)
    assert generate(ours, ids, max_new_tokens=10, eos_token_id=None).shape == (2, 40)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens: expected a non-negative integer, got -1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens: expected a non-negative integer, got 2.5"),
    ({"temperature": -0.1}, r"temperature: expected a number >= 0 \(0 = greedy\), got -0.1"),
    ({"temperature": float("nan")}, "temperature: expected a number >= 0"),
    ({"temperature": "hot"}, "temperature: expected a number >= 0"),
    ({"top_k": 0}, "top_k: expected a positive integer or None, got 0"),
    ({"top_k": True}, "top_k: expected a positive integer or None, got True"),
    ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\] or None, got 0.0"),
    ({"top_p": 1.5}, r"top_p: expected a number in \(0, 1\] or None, got 1.5"),
    ({"eos_token_id": -1}, "eos_token_id: expected None or a non-negative token id, got -1"),
    ({"eos_token_id": "50256"}, "eos_token_id: expected None or a non-negative token id, got '50256'"),
    ({"attention_mask": torch.ones(1, 2)}, r"attention_mask has shape \(1, 2\), expected \(1, 3\)"),
    ({"attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]]),
      "input_ids": torch.ones(2, 3, dtype=torch.long)},
     r"attention_mask rows \[1\] have no real token"),
    ({"input_ids": torch.ones(1, 0, dtype=torch.long)}, r"input_ids: expected a \(batch, tokens\) tensor"),
    ({"input_ids": torch.tensor([[1, 600]])}, r"token id 600, outside the vocabulary \[0, 511\]"),
])
def test_bad_generate_arguments(kwargs, message, tiny_checkpoint):
    model = GPT2.from_pretrained(tiny_checkpoint)
    kwargs = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(model, **kwargs)


def test_benchmark_smoke_run_checks_parity_and_keeps_other_sections(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_generate
    import common

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Training\n\nkeep me\n\n## Generation\n\nold figures\n")
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(bench_generate, "write_section",
                        lambda title, body: common.write_section(title, body, results))
    body = bench_generate.main(["--shape", "tiny", "--batches", "1", "3", "--new", "6", "--repeats", "1"])
    text = results.read_text()
    assert "keep me" in text and "old figures" not in text
    assert text.count("## Generation") == 1 and body.strip() in text
    assert "| greedy, batch 3 |" in body and "| load checkpoint |" in body
    # the ceiling divides by the fastest of the read rates: two beside the batch-1 runs, one from the kernel passes
    found = re.search(r"read bandwidth ([\d.]+) GB/s \(the fastest of: a `sum` over 1 GB ([\d.]+), the model's "
                      r"one-row products \(decoding's kernel choice\) beside the runs ([\d.]+), the fastest fp32 "
                      r"one-row kernel in the kernels-alone passes ([\d.]+) GB/s\)", body)
    assert found, body
    assert float(found[1]) == max(float(found[2]), float(found[3]), float(found[4]))
    kernels_alone = re.search(r"Few-row kernels alone .*?: (.*)\.", body)[1]
    fp32_rates = [float(rate) for name, rate in re.findall(r"(fp32 \S+) ([\d.]+)", kernels_alone)]
    assert len(fp32_rates) >= 2 and float(found[4]) == max(fp32_rates)  # the fastest fp32 kernel's own figure
    # each batch-1 run against the read passes of its own round; the bf16 line's fp32 runs get a line of their own
    assert re.search(r"Memory bound, fp32 batch 1: .*% of it \(paired per round, each run against the read passes "
                     r"of its own round: \d+%, \d+-\d+%\) \(goal ≥ 85%", body), body
    # the load on 2 MB pages: same tokens (checked inside), its own ceiling line with its own read pass, a load row
    assert "Weights on 2 MB pages (`GPT2.from_pretrained(..., huge_pages=True)`" in body
    assert re.search(r"fp32 batch 1 on 2 MB pages: .*the one-row products over the weights on 2 MB pages beside "
                     r"those runs", body)
    if "bf16 weights (" in body:  # a CPU with bf16 units: the fp32 runs beside the bf16 ones get their own ceiling
        assert re.search(r"fp32 in these runs: .*% of it \(paired per round", body), body
        # a long prompt's first token in bf16 against fp32, and its products alone (the fp16 pack where torch has it)
        prompt = re.search(r"A (\d+)-token prompt \(batch 1, .*\): bf16 weights ([\d.]+) s against fp32 ([\d.]+) s "
                           r"\(([\d.]+)× as fast, .*; a fresh bf16 model's first prompt [\d.]+ s, .*GFLOP/s: fp32 F.linear [\d,]+, "
                           r"bf16 F.linear [\d,]+(.*)\.", body)
        assert prompt, body
        assert float(prompt[4]) == pytest.approx(float(prompt[3]) / float(prompt[2]), rel=0.25)  # times to 1 ms
        assert int(prompt[1]) < 512 and ("bf16 fp16_packed" in prompt[5]) == packed.fp16_packed_available()
    # run_all reads its goal lines out of this very text: one per note that ran
    import run_all
    goals = run_all.decoding_goals(body)
    assert [g.split(":")[0] for g in goals] == [
        "fp32 batch-1 decoding at ≥ 85% of the read-bandwidth ceiling",
        *(["bf16 weights vs fp32 decoding"] if "bf16 weights (" in body else []),
        "generation with the measured kernel choice vs plain F.linear decoding",
        "a fresh model's first generate with the kernel choice vs plain F.linear (the lowest of 2 dtypes)"]
    # a one-off generate on fresh models, fp32 and bf16, each its ratio of the two medians
    first = re.findall(r"(fp32|bf16) ([\d.]+) tok/s against ([\d.]+) \(([\d.]+)×, paired [\d.]+×; packed after it: ",
                       re.search(r"A fresh model's first generate \(batch 1, 6 tokens, .*", body)[0])
    assert [f[0] for f in first] == ["fp32", "bf16"], body
    for _, choice, plain, ratio in first:
        assert float(ratio) == pytest.approx(float(choice) / float(plain), rel=0.1, abs=0.02)
    assert "| load checkpoint, `huge_pages=True` |" in body
