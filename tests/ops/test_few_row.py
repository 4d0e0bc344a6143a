"""The few-row linear path generate uses on CPU: same products as F.linear, taken only where it should be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import left_padded, make_hf_checkpoint

from gpt2lora import GPT2, LoRAConfig, apply_lora, generate, merge_lora
from gpt2lora.ops import few_row
from gpt2lora.ops.few_row import Linear, few_row_products, linear_by_halves

transformers = pytest.importorskip("transformers")

# Big enough that every block weight and the head pass MIN_WEIGHT_SIZE; an odd vocabulary like GPT-2's.
WIDE = {"n_embd": 256, "n_head": 4, "n_layer": 2, "vocab_size": 1001, "n_positions": 48}


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("out_features", [512, 513])
@pytest.mark.parametrize("rows_shape", [(1, 256), (3, 256), (2, 1, 256)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_by_halves_equals_linear(layout, out_features, rows_shape, with_bias):
    g = torch.Generator().manual_seed(out_features)
    if layout == "out_in":  # contiguous (out, in), like the tied LM head
        weight = torch.randn(out_features, 256, generator=g)
    else:  # a view of (in, out) storage, like the Conv1D matrices as loaded
        weight = torch.randn(256, out_features, generator=g).t()
    bias = torch.randn(out_features, generator=g) if with_bias else None
    x = torch.randn(*rows_shape, generator=g)
    with torch.no_grad():
        assert few_row.takes_few_row_path(x, weight) is True
    got = linear_by_halves(x, weight, bias)
    assert got.shape == (*rows_shape[:-1], out_features)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_path_is_not_taken_for_layouts_it_cannot_split():
    x = torch.randn(1, 257)
    assert few_row.takes_few_row_path(x, torch.randn(257, 512).t()) is False  # odd input width
    assert few_row.takes_few_row_path(x, torch.randn(512, 514)[:, :257]) is False  # strided rows
    assert few_row.takes_few_row_path(x, torch.randn(512, 257)) is True
    assert few_row.takes_few_row_path(x.double(), torch.randn(512, 257)) is False  # dtypes differ
    with torch.enable_grad():
        assert few_row.takes_few_row_path(x, torch.randn(512, 257)) is False


class Always(few_row.KernelChoice):
    """A choice that always runs one named candidate: forces a path in the tests below."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def pick(self, key, candidates, warm_up=None):
        return candidates[self.name]()


def counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = few_row.linear_by_halves

    def counted(x, weight, bias=None):
        if weight.size(0) > few_row.WARM_UP_FEATURES:  # not a trial's warm-up on the first rows
            calls.append(weight.size(0))
        return original(x, weight, bias)

    monkeypatch.setattr(few_row, "linear_by_halves", counted)
    return calls


def test_path_is_taken_only_inside_the_context_for_few_rows_without_gradients(monkeypatch):
    calls = counting(monkeypatch)
    layer = Linear(256, 512)
    few, many = torch.randn(4, 256), torch.randn(few_row.MAX_ROWS + 1, 256)
    with torch.no_grad():
        expected = F.linear(few, layer.weight, layer.bias)
        assert torch.equal(layer(few), expected)  # outside the context: F.linear itself
    assert calls == []
    with torch.no_grad(), few_row_products(Always("by_halves")):
        torch.testing.assert_close(layer(few), expected, atol=1e-4, rtol=1e-5)
        layer(many)
        Linear(16, 16)(torch.randn(1, 16))  # a small weight stays on F.linear
    assert calls == [512]
    with few_row_products(Always("by_halves")):
        out = layer(few)  # gradients wanted: untouched
        out.sum().backward()
    assert calls == [512] and layer.weight.grad is not None
    assert torch.equal(out.detach(), expected)
    with torch.no_grad():
        assert torch.equal(layer(few), expected)  # the context left nothing behind


def fake_clock(monkeypatch, halves_cost: float) -> tuple[few_row.KernelChoice, list[int]]:
    """A KernelChoice on a fake clock: a timed F.linear reads 1 tick, ``linear_by_halves`` 1 + ``halves_cost``."""
    clock = [0.0]
    calls = counting(monkeypatch)
    counted = few_row.linear_by_halves

    def halves(x, weight, bias=None):
        clock[0] += halves_cost
        return counted(x, weight, bias)

    def timer() -> float:
        clock[0] += 0.5  # start and end each add half a tick
        return clock[0]

    monkeypatch.setattr(few_row, "linear_by_halves", halves)
    two_candidates(monkeypatch)
    return few_row.KernelChoice(timer=timer), calls


def two_candidates(monkeypatch) -> None:
    """Leave out the packed candidates (tested in tests/ops/test_packed.py)."""
    for name in few_row.PACKED_OFFERS:
        monkeypatch.setitem(few_row.PACKED_OFFERS, name, lambda x, weight, bias: False)


@pytest.mark.parametrize("halves_cost", [3.0, -0.5])
def test_the_slower_kernel_is_never_chosen_and_the_choice_is_cached(monkeypatch, halves_cost):
    kernels, calls = fake_clock(monkeypatch, halves_cost)
    layer = Linear(256, 512)
    x = torch.randn(1, 256)
    trial_calls = 2 * (kernels.samples + 1)  # each candidate: one warm-up + `samples` timed calls, in turn
    with torch.no_grad(), few_row_products(kernels):
        expected = F.linear(x, layer.weight, layer.bias)
        for _ in range(trial_calls):
            assert kernels.chosen == {}
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
        assert len(calls) == kernels.samples + 1  # the split kernel took every other call
        for _ in range(5):
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
    (key, name), = kernels.chosen.items()
    assert name == ("F.linear" if halves_cost > 0 else "by_halves")
    assert key[-1] == torch.get_num_threads()  # cached per thread count (and shape)
    assert len(calls) == kernels.samples + 1 + (5 if name == "by_halves" else 0)  # never measured again


def test_choice_is_measured_again_for_another_shape_or_thread_count(monkeypatch):
    kernels, calls = fake_clock(monkeypatch, 3.0)
    layer = Linear(256, 512)
    threads = torch.get_num_threads()
    trial_calls = 2 * (kernels.samples + 1)
    with torch.no_grad(), few_row_products(kernels):
        for rows in (1, 2):  # two rows of fp32 may have a third candidate, the packed product (a tie: not kept)
            for _ in range(trial_calls + kernels.samples + 4):
                layer(torch.randn(rows, 256))
        torch.set_num_threads(threads + 1)
        try:
            for _ in range(trial_calls):
                layer(torch.randn(1, 256))
        finally:
            torch.set_num_threads(threads)
        layer(torch.randn(1, 256))
    assert len(kernels.chosen) == 3 and set(kernels.chosen.values()) == {"F.linear"}
    assert len(calls) == 3 * (kernels.samples + 1)


def test_pick_takes_the_median_after_a_warm_up_and_prefers_the_plain_kernel_on_a_tie():
    clock = [0.0]
    # "b" has a slow first run (warm-up, not counted) and one outlier, and is still faster than "a"
    costs = {"a": iter([2, 2, 2, 2, 2, 2]), "b": iter([90, 1, 50, 1, 1, 1])}

    def run(name):
        def go():
            clock[0] += next(costs[name])
            return torch.zeros(1)
        return go

    kernels = few_row.KernelChoice(timer=lambda: clock[0], samples=5)
    for _ in range(12):
        kernels.pick("k", {"a": run("a"), "b": run("b")})
    assert kernels.chosen == {"k": "b"}
    tie = few_row.KernelChoice(timer=lambda: clock[0], samples=2, margin=0.1)
    costs.update(a=iter([1.0] * 3), b=iter([0.95] * 3))  # 5% faster is within the margin: the plain one stays
    for _ in range(6):
        tie.pick("k", {"a": run("a"), "b": run("b")})
    assert tie.chosen == {"k": "a"}


def test_a_kernel_slow_only_after_others_ran_is_timed_warm():
    """"cold" costs 3 ticks on a call that does not follow one of its own and 1 right after one, "steady" 2 ticks
    always: kept, "cold" would run back to back and win, but timed in turn it never follows itself. The warm-up
    run before each timed call (untimed) lets the choice see that."""
    clock, last = [0.0], [None]

    def run(name):
        def go():
            clock[0] += 2.0 if name == "steady" else (1.0 if last[0] == name else 3.0)
            last[0] = name
            return torch.zeros(1)
        return go

    def warm_up(name):
        clock[0] += 100.0  # not counted
        run(name)()

    candidates = {"steady": run("steady"), "cold": run("cold")}
    chosen = {}
    for label, warm in (("without", None), ("with", warm_up)):
        kernels = few_row.KernelChoice(timer=lambda: clock[0], samples=4)
        while not kernels.chosen:
            kernels.pick("k", candidates, warm)
        chosen[label] = kernels.chosen["k"]
    assert chosen == {"without": "steady", "with": "cold"}


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@torch.no_grad()
def test_each_timed_trial_follows_a_warm_up_of_its_kernel_on_a_slice_of_the_weight(monkeypatch, layout):
    two_candidates(monkeypatch)
    seen = []
    for name, kernel in list(few_row._KERNEL_FUNCTIONS.items()):
        def spied(x, weight, bias, name=name, kernel=kernel):
            seen.append((name, tuple(weight.shape), tuple(x.shape)))
            return kernel(x, weight, bias)
        monkeypatch.setitem(few_row._KERNEL_FUNCTIONS, name, spied)
    weight = torch.randn(512, 256) if layout == "out_in" else torch.randn(256, 512).t()
    bias, x = torch.randn(512), torch.randn(1, 256)
    kernels = few_row.KernelChoice(samples=3)
    with few_row_products(kernels):
        while not kernels.chosen:
            torch.testing.assert_close(few_row.linear(x, weight, bias), F.linear(x, weight, bias),
                                       atol=1e-4, rtol=1e-5)
    warm = (8, 256) if layout == "out_in" else (512, 8)
    warm_x = (1, 256) if layout == "out_in" else (1, 8)
    ups = [(name, shape, xs) for name, shape, xs in seen if shape == warm]
    # the candidates run through _KERNEL_FUNCTIONS only to warm up (the timed calls are F.linear and the split
    # themselves): one warm-up before each of the 2 x (samples + 1) timed calls, each on its kernel
    assert len(ups) == len(seen) == 2 * (kernels.samples + 1)
    assert {name for name, _, _ in ups} == {"F.linear", "by_halves"} and {xs for _, _, xs in ups} == {warm_x}


def test_model_layers_are_plain_linears_with_the_same_state_dict(wide_checkpoint):
    model = GPT2.from_pretrained(wide_checkpoint)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert isinstance(model.lm_head, Linear)
    ref = transformers.GPT2LMHeadModel.from_pretrained(wide_checkpoint)
    ours = {k.removeprefix("transformer."): v.shape for k, v in model.state_dict().items()}
    theirs = {k.removeprefix("transformer."): v.shape for k, v in ref.state_dict().items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(ours) == set(theirs)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", **WIDE)


@pytest.mark.parametrize("lengths", [[7], [7, 3, 5]])
def test_generation_on_the_path_matches_transformers(wide_checkpoint, monkeypatch, lengths):
    calls = counting(monkeypatch)
    monkeypatch.setattr(few_row, "KERNELS", Always("by_halves"))
    ours = GPT2.from_pretrained(wide_checkpoint).eval()
    ref = transformers.GPT2LMHeadModel.from_pretrained(wide_checkpoint).eval()
    ids, mask = left_padded(lengths, WIDE["vocab_size"], pad=0, seed=len(lengths))
    width = ids.size(1)
    new = WIDE["n_positions"] - width
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    # every decoding step ran the four block layers of each block and the (odd-sized) head on the path; the
    # prompt's rows did not (each prompt length would be a new shape to time)
    assert calls.count(WIDE["vocab_size"]) == new
    assert calls.count(3 * WIDE["n_embd"]) == (new - 1) * WIDE["n_layer"]


def test_lora_generation_on_the_path_equals_merged(wide_checkpoint):
    model = apply_lora(GPT2.from_pretrained(wide_checkpoint), LoRAConfig(rank=4, alpha=8)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(1, WIDE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_logits = model(ids)
    unmerged = generate(model, ids, max_new_tokens=20, eos_token_id=None)
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), full_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(model, ids, max_new_tokens=20, eos_token_id=None), unmerged)


class CountingPicks(few_row.KernelChoice):
    """The real choice on a fake clock where ``linear_by_halves`` is always faster; counts calls to ``pick``."""

    def __init__(self) -> None:
        self.clock = 0.0
        super().__init__(timer=lambda: self.clock)
        self.picks = 0

    def pick(self, key, candidates, warm_up=None):
        self.picks += 1
        timed = {name: self._costing(run, 1.0 if name == "F.linear" else 0.5) for name, run in candidates.items()}
        return super().pick(key, timed, warm_up)

    def _costing(self, run, cost):
        def go():
            self.clock += cost
            return run()
        return go


def test_a_decided_shape_takes_one_lookup_and_never_times_again(monkeypatch):
    two_candidates(monkeypatch)
    kernels = CountingPicks()
    layer = Linear(256, 512)
    x = torch.randn(1, 256)
    trial_calls = 2 * (kernels.samples + 1)
    with torch.no_grad(), few_row_products(kernels):
        expected = F.linear(x, layer.weight, layer.bias)
        for _ in range(trial_calls):
            layer(x)
        assert kernels.picks == trial_calls and set(kernels.chosen.values()) == {"by_halves"}
        assert list(kernels.routes.values()) == ["by_halves"]
        for _ in range(10):
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
        assert kernels.picks == trial_calls  # decided: no pick, no timer
        # the same weight with gradients wanted, or with many rows, is F.linear itself whatever was chosen
        with torch.enable_grad():
            assert torch.equal(layer(x), expected)
        many = torch.randn(few_row.MAX_ROWS + 1, 256)
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
        layer(x.view(1, 1, 256))  # another call shape is a new route: of a decided key, so routed without a pick
    assert kernels.picks == trial_calls
    routes = {(tuple(key[0]), key[9]): name for key, name in kernels.routes.items()}  # (shape, grad) -> kernel
    assert routes == {((1, 256), False): "by_halves", ((1, 256), True): "F.linear",
                      ((1, 1, 256), False): "by_halves"}  # the same product, decided already; many rows: not kept


def test_default_choice_keeps_the_plain_kernel_when_the_other_is_only_slightly_faster():
    clock = [0.0]

    def run(cost):
        def go():
            clock[0] += cost
            return torch.zeros(1)
        return go

    kernels = few_row.KernelChoice(timer=lambda: clock[0])
    assert kernels.margin >= 0.05 and kernels.samples >= 8
    for _ in range(2 * (kernels.samples + 1)):
        kernels.pick("k", {"F.linear": run(1.0), "by_halves": run(0.96)})  # 4% faster: within the noise
    assert kernels.chosen == {"k": "F.linear"}


def test_nearby_row_counts_share_one_choice():
    """3 and 4 rows are one key (1, 2, then up to the next power of two): deciding 3 rows decides 4; 5 is new."""
    assert [few_row.row_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    kernels = CountingPicks()
    layer = Linear(256, 512)
    with torch.no_grad(), few_row_products(kernels):
        while not kernels.chosen:
            layer(torch.randn(3, 256))
        picks = kernels.picks
        x = torch.randn(4, 256)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
        assert kernels.picks == picks  # the key is decided: routed without a pick, no trial
        assert len(kernels.chosen) == 1
        layer(torch.randn(5, 256))
        assert len(kernels._trials) == 1  # a new key on trial
