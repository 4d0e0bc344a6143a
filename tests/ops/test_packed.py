"""Few-row products through oneDNN-packed weights (bf16, and fp32 for several rows): equal to F.linear, packed
once per weight and kept on it while the kernel choice keeps the packed product."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, Recording

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora, generate
from gpt2lora.ops import few_row, packed, stored_choices
from gpt2lora.ops.few_row import Linear, few_row_products
from gpt2lora.ops.packed import packed_bytes, packed_linear, packed_weight, release_packed
from gpt2lora.ops.stored_choices import key_text
from gpt2lora.training.precision import hold_frozen_weights

needs_packing = pytest.mark.skipif(not packed.packed_linear_available(),
                                   reason="no oneDNN packed linear or no bf16 units on this CPU")

# GPT-2 124M's four block matrices (the checkpoint's (in, out) layout, read transposed) and a head with an odd
# vocabulary, stored (out, in) like the tied LM head.
SHAPES = [(2304, 768, "in_out"), (768, 768, "in_out"), (3072, 768, "in_out"), (768, 3072, "in_out"),
          (1001, 768, "out_in")]
each_shape = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")


def weight_of(out_features: int, in_features: int, layout: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "out_in":
        return (torch.randn(out_features, in_features, generator=g) / 16).bfloat16()
    return (torch.randn(in_features, out_features, generator=g) / 16).bfloat16().t()


def assert_bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """At most one bf16 step apart (2**-7 relative at worst), and almost all equal: same fp32 accumulation."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-12)
    assert (got != expected).float().mean() < 0.01


@needs_packing
@each_shape
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 32])
def test_packed_linear_equals_f_linear_for_decoding_shapes(shape, rows):
    out_features, in_features, layout = shape
    weight = weight_of(out_features, in_features, layout, seed=rows)
    with torch.inference_mode():
        check_shape(weight, rows)


def check_shape(weight: torch.Tensor, rows: int) -> None:
    out_features, in_features = weight.shape
    g = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    for b in (bias, None):
        assert_bf16_close(packed_linear(x, weight, b), F.linear(x, weight, b))
    # a (batch, 1, features) step input, and a non-contiguous one (a column slice of a wider tensor)
    batched = x.view(rows, 1, in_features)
    assert_bf16_close(packed_linear(batched, weight, bias), F.linear(batched, weight, bias))
    strided = torch.randn(rows, 2 * in_features, generator=g).bfloat16()[:, ::2]
    assert_bf16_close(packed_linear(strided, weight, bias), F.linear(strided, weight, bias))


@needs_packing
@torch.no_grad()  # not inference_mode: its tensors have no version counter, so they are never packed
def test_pack_is_made_once_kept_on_the_weight_and_remade_when_the_weight_changes():
    layer = Linear(768, 512).to(torch.bfloat16)
    x = torch.randn(1, 768).bfloat16()
    first = packed_weight(layer.weight)
    assert packed_weight(layer.weight) is first  # reused while the weight is unchanged
    assert packed_bytes(layer) == layer.weight.numel() * 2
    with torch.no_grad():
        layer.weight.mul_(-1)  # in place: a new _version
    second = packed_weight(layer.weight)
    assert second is not first
    assert_bf16_close(packed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    layer.weight.data = torch.randn(512, 768).bfloat16()  # new storage (e.g. a load): packed again
    assert packed_weight(layer.weight) is not second
    assert_bf16_close(packed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    assert release_packed(layer) == layer.weight.numel() * 2
    assert packed_bytes(layer) == 0 and release_packed(layer) == 0


@needs_packing
@torch.no_grad()  # not inference_mode: its tensors have no version counter, so they are never packed
def test_copies_and_saved_modules_do_not_carry_the_pack():
    layer = Linear(768, 512).to(torch.bfloat16)
    packed_weight(layer.weight)
    twin = copy.deepcopy(layer)
    assert packed_bytes(twin) == 0 and packed_bytes(layer) > 0
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert packed_bytes(loaded) == 0
    assert torch.equal(loaded.weight, layer.weight)
    assert packed_bytes(pickle.loads(pickle.dumps(layer))) == 0
    x = torch.randn(2, 768).bfloat16()
    assert_bf16_close(packed_linear(x, twin.weight, twin.bias), F.linear(x, layer.weight, layer.bias))
    assert packed_bytes(twin) == packed_bytes(layer)  # the copy packed its own data


@torch.no_grad()  # not inference_mode: its tensors have no version counter, so they are never packed
def test_packed_is_a_candidate_for_bf16_weights_and_for_several_fp32_rows_where_it_is_available(monkeypatch):
    kernels = Recording()
    x32, layer32 = torch.randn(1, 768), Linear(768, 512)
    layer16 = Linear(768, 512).to(torch.bfloat16)
    with few_row_products(kernels):
        layer32(x32)
        layer16(x32.bfloat16())
        layer32(torch.randn(4, 768))
    one_row = ("F.linear", "by_halves") + (("mkl_packed",) if packed.mkl_packed_available() else ())
    assert kernels.offered[0] == one_row  # one fp32 row: MKL's pack for exactly one row
    assert ("packed" in kernels.offered[1]) == packed.packed_linear_available(torch.bfloat16)
    assert ("fp16_packed" in kernels.offered[1]) == packed.fp16_packed_available()  # half weights only
    assert ("packed" in kernels.offered[2]) == packed.packed_linear_available(torch.float32)
    assert "mkl_packed" not in kernels.offered[1] + kernels.offered[2]
    assert "fp16_packed" not in kernels.offered[0] + kernels.offered[2]
    monkeypatch.setattr(packed, "packed_linear_available", lambda dtype: False)  # an old torch, or no bf16 units
    monkeypatch.setattr(packed, "fp16_packed_available", lambda: False)  # an ARM build: no fbgemm
    monkeypatch.setitem(few_row.PACKED_OFFERS, "mkl_packed", lambda x, weight, bias: False)
    kernels = Recording()
    with few_row_products(kernels):
        out = layer16(x32.bfloat16())
        layer32(torch.randn(4, 768))
        layer32(x32)
    assert kernels.offered == [("F.linear", "by_halves")] * 3
    assert torch.equal(out, F.linear(x32.bfloat16(), layer16.weight, layer16.bias))
    assert packed_bytes(layer16) == 0


needs_fp32_packing = pytest.mark.skipif(not packed.packed_linear_available(torch.float32),
                                        reason="torch has no oneDNN packed linear here")


@needs_fp32_packing
@each_shape
@pytest.mark.parametrize("rows", [2, 5, 16, 32])
def test_fp32_packed_linear_equals_f_linear(shape, rows):
    out_features, in_features, layout = shape
    weight = weight_of(out_features, in_features, layout, seed=rows).float()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    with torch.no_grad():
        for b in (bias, None):
            # the same sums in another order: fp32 rounding of values up to ~5 in size
            torch.testing.assert_close(packed_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


class FakeClock(few_row.KernelChoice):
    """The real choice on a fake clock where the ``winner`` kernel takes 1 tick and every other 3."""

    def __init__(self, winner: str) -> None:
        self.clock = 0.0
        self.winner = winner
        super().__init__(timer=lambda: self.clock)

    def pick(self, key, candidates, warm_up=None):
        def costing(name, run):
            def go():
                self.clock += 1.0 if name == self.winner else 3.0
                return run()
            return go
        return super().pick(key, {name: costing(name, run) for name, run in candidates.items()}, warm_up)


@needs_fp32_packing
@pytest.mark.parametrize("winner", ["packed", "F.linear"])
@torch.no_grad()
def test_packs_made_to_time_a_losing_product_are_dropped_and_a_winning_one_kept(winner):
    """Two layers of one shape share a choice; only the first is packed while the packed product is timed; it
    keeps its pack only if the packed product won, and then the other is packed too (a pack is as large as its
    weight)."""
    layers = [Linear(256, 512), Linear(256, 512)]
    x = torch.randn(4, 1, 256)
    kernels = FakeClock(winner)
    with few_row_products(kernels):
        for _ in range(4 * (kernels.samples + 1)):
            for layer in layers:
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
            if not kernels.chosen:  # on trial: only the first weight of the shape is ever packed
                assert packed_bytes(layers[1]) == 0
    assert set(kernels.chosen.values()) == {winner}
    assert kernels.packed_on_trial == {}
    kept = sum(packed_bytes(layer) for layer in layers)
    assert kept == (2 * 512 * 256 * 4 if winner == "packed" else 0)


def tiny_bf16(lora: bool) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**{**TINY, "n_embd": 256, "n_head": 4, "vocab_size": 1001})).eval()
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def counting_packed(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = few_row._KERNEL_FUNCTIONS["packed"]

    def counted(x, weight, bias=None):
        calls.append(weight.size(0))
        return original(x, weight, bias)

    monkeypatch.setitem(few_row._KERNEL_FUNCTIONS, "packed", counted)
    monkeypatch.setattr(few_row, "packed_linear", counted)
    return calls


@needs_packing
@pytest.mark.parametrize("lora", [False, True])
def test_bf16_generation_on_packed_weights_equals_plain_bf16(monkeypatch, lora):
    """A bf16 model (LoRA-wrapped or not): every decoding product packed gives plain bf16 F.linear's tokens."""
    model = tiny_bf16(lora).to(torch.bfloat16)
    ids = torch.randint(1, 1001, (3, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(few_row, "KERNELS", Recording("F.linear"))  # generate's own context uses KERNELS
    plain = generate(model, ids, max_new_tokens=12, eos_token_id=None)
    assert packed_bytes(model) == 0
    calls = counting_packed(monkeypatch)
    monkeypatch.setattr(few_row, "KERNELS", Recording("packed"))
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=None), plain)
    assert calls.count(1001) == 12 and calls.count(3 * 256) == 11 * TINY["n_layer"]  # every step, not the prompt
    assert packed_bytes(model) > 0
    with torch.inference_mode():
        logits = model(ids)
        with few_row_products(Recording("packed")):
            assert_bf16_close(model(ids[:1, :4]), logits[:1, :4])


@needs_packing
def test_frozen_base_held_in_bf16_decodes_through_the_pack(monkeypatch):
    """precision="bf16"'s held base: fp32 activations, bf16 matrices; the packed product equals the plain one."""
    model = tiny_bf16(lora=True)
    assert hold_frozen_weights(model) > 0
    ids = torch.randint(1, 1001, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with few_row_products(Recording("F.linear")):
            expected = model(ids[:, :1])
        calls = counting_packed(monkeypatch)
        with few_row_products(Recording("packed")):
            got = model(ids[:, :1])
    assert got.dtype == torch.float32 and len(calls) >= 4 * TINY["n_layer"]
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-3)


@needs_packing
def test_weights_made_under_inference_mode_are_not_packed_or_kept():
    with torch.inference_mode():
        layer = Linear(768, 512).to(torch.bfloat16)
        x = torch.randn(1, 768).bfloat16()
        kernels = Recording()
        with few_row_products(kernels):
            layer(x)
        assert kernels.offered == [("F.linear", "by_halves")]
        assert_bf16_close(packed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    assert packed_bytes(layer) == 0


def assert_one_bf16_step(got: torch.Tensor, expected: torch.Tensor) -> None:
    """At most one bf16 step apart: F.linear with a bias rounds its product and then the sum to bf16, the fp16
    pack only the sum, so more results differ in the last place than between two single-rounding products."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-12)


needs_fp16_packing = pytest.mark.skipif(not packed.fp16_packed_available(),
                                        reason="torch has no fbgemm fp16 linear here (an ARM build)")


@needs_fp16_packing
@each_shape
@pytest.mark.parametrize("rows", [1, 2, 17, 32])
def test_fp16_packed_linear_equals_f_linear_for_bf16_decoding_shapes(shape, rows):
    """fbgemm's fp16 copy of a bf16 weight: the same products in fp32, one rounding to bf16 at the end."""
    out_features, in_features, layout = shape
    weight = weight_of(out_features, in_features, layout, seed=rows)
    g = torch.Generator().manual_seed(200 + rows)
    bias = torch.randn(out_features, generator=g).bfloat16()
    with torch.no_grad():
        for x in (torch.randn(rows, in_features, generator=g).bfloat16(),
                  torch.randn(rows, 1, in_features, generator=g).bfloat16(),  # a (batch, 1, features) step
                  torch.randn(rows, 2 * in_features, generator=g).bfloat16()[:, ::2]):  # a strided view
            for b in (bias, None):
                assert_one_bf16_step(packed.fp16_packed_linear(x, weight, b), F.linear(x, weight, b))


@needs_fp16_packing
@torch.no_grad()
def test_fp16_packed_linear_of_fp16_weights_and_of_bf16_values_fp16_cannot_hold():
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(512, 768, generator=g) / 16).half()
    x = torch.randn(4, 768, generator=g).half()
    bias = torch.randn(512, generator=g).half()
    # fp16 weights are packed exactly: only the order of the fp32 sums differs from fp16 F.linear's
    torch.testing.assert_close(packed.fp16_packed_linear(x, weight, bias), F.linear(x, weight, bias),
                               rtol=2**-10, atol=2**-10)
    # bf16 values below fp16's normal range are rounded to multiples of 2**-24: far below the result's rounding
    tiny = (torch.randn(512, 768, generator=g) * 1e-5).bfloat16()
    xb = torch.randn(4, 768, generator=g).bfloat16()
    torch.testing.assert_close(packed.fp16_packed_linear(xb, tiny).float(), F.linear(xb, tiny).float(),
                               rtol=2**-7, atol=1e-6)
    # a value beyond fp16's range would saturate: that weight is not packed and keeps F.linear's result
    huge = weight_of(512, 768, "out_in", seed=4)
    huge[7, 9] = 1e5
    expected = F.linear(xb, huge)
    assert torch.equal(packed.fp16_packed_linear(xb, huge), expected)
    layer = Linear(768, 512).to(torch.bfloat16)
    layer.weight.copy_(huge)
    assert torch.equal(packed.fp16_packed_linear(xb, layer.weight), expected)
    assert packed_bytes(layer) == 0 and release_packed(layer) == 0


@needs_fp16_packing
@torch.no_grad()  # not inference_mode: its tensors have no version counter, so they are never packed
def test_fp16_pack_is_kept_on_the_weight_and_remade_when_the_weight_changes():
    layer = Linear(768, 512).to(torch.bfloat16)
    x = torch.randn(1, 768).bfloat16()
    first = packed_weight(layer.weight, packed.FP16)
    assert packed_weight(layer.weight, packed.FP16) is first
    assert packed_bytes(layer) == layer.weight.numel() * 2
    layer.weight.mul_(-1)
    assert packed_weight(layer.weight, packed.FP16) is not first
    assert_one_bf16_step(packed.fp16_packed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    with_bias = packed_weight(layer.weight, packed.FP16, layer.bias)  # fbgemm adds the bias: packed with it
    assert packed_weight(layer.weight, packed.FP16, layer.bias) is with_bias
    layer.bias.add_(1)  # the bias changed in place: packed again
    assert packed_weight(layer.weight, packed.FP16, layer.bias) is not with_bias
    assert_one_bf16_step(packed.fp16_packed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    assert packed_bytes(copy.deepcopy(layer)) == 0
    assert release_packed(layer) == layer.weight.numel() * 2


@needs_fp16_packing
@pytest.mark.parametrize("winner", ["fp16_packed", "by_halves"])
@torch.no_grad()
def test_half_weights_keep_the_fp16_pack_only_when_it_wins(winner):
    """bf16 layers of one shape: every packed kind offered is made on the first weight while it is timed; only
    the winner's pack is kept, and then on every weight of the shape."""
    layers = [Linear(256, 512).to(torch.bfloat16), Linear(256, 512).to(torch.bfloat16)]
    x = torch.randn(1, 1, 256).bfloat16()
    kernels = FakeClock(winner)
    with few_row_products(kernels):
        for _ in range(4 * (kernels.samples + 1)):
            for layer in layers:
                assert_one_bf16_step(layer(x), F.linear(x, layer.weight, layer.bias))
            if not kernels.chosen:
                assert packed_bytes(layers[1]) == 0
    assert set(kernels.chosen.values()) == {winner}
    packs = [set(layer.weight.__dict__.get(packed.PACKED_ATTR) or ()) for layer in layers]
    assert packs == ([{packed.FP16}] * 2 if winner == "fp16_packed" else [set(), set()])


@needs_fp16_packing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_generation_on_fp16_packed_weights_equals_plain(monkeypatch, dtype):
    model = tiny_bf16(lora=True).to(dtype)
    ids = torch.randint(1, 1001, (3, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(few_row, "KERNELS", Recording("F.linear"))
    plain = generate(model, ids, max_new_tokens=12, eos_token_id=None)
    assert packed_bytes(model) == 0
    monkeypatch.setattr(few_row, "KERNELS", Recording("fp16_packed"))
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=None), plain)
    kinds = {kind for p in model.parameters() for kind in (p.__dict__.get(packed.PACKED_ATTR) or {})}
    assert kinds == {packed.FP16}
    head = model.transformer.wte.weight  # tied: the LM head's weight
    assert packed_bytes(model) >= head.numel() * 2 and packed.FP16 in head.__dict__[packed.PACKED_ATTR]


@needs_fp16_packing
@torch.no_grad()
def test_a_candidate_offered_on_one_weight_is_timed_alongside_the_others():
    """Three bf16 layers of one shape: the packed candidates run on the first only, yet no candidate is timed more
    than once ahead of another (the plain ones would otherwise finish within a token, the packed ones tokens
    later, on a host whose speed moves); the calls that wait run the best so far, untimed."""
    layers = [Linear(256, 512).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, 1, 256).bfloat16()
    kernels = FakeClock("fp16_packed")
    spreads = []
    with few_row_products(kernels):
        for _ in range(40):
            for layer in layers:
                assert_one_bf16_step(layer(x), F.linear(x, layer.weight, layer.bias))
                trials = kernels._trials.get(next(iter(kernels._trials), None), {})
                if trials:
                    counts = [len(times) for times in trials.values()]
                    spreads.append(max(counts) - min(counts))
    assert set(kernels.chosen.values()) == {"fp16_packed"}
    assert spreads and max(spreads) <= 1


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
@torch.no_grad()
def test_the_warm_up_runs_every_offered_kernel_on_a_slice_and_packs_nothing_on_the_weight(layout, dtype, rows):
    """A trial's warm-up (few_row._warm_up) runs each candidate the weight is offered on its first rows; the packs
    it makes belong to that slice, never to the weight (a pack is as large as its weight)."""
    weight = weight_of(512, 256, layout, seed=rows).to(dtype)
    assert weight.is_contiguous() == (layout == "out_in")
    bias = torch.randn(512).to(dtype)
    x = torch.randn(rows, 256).to(dtype)
    offered = ["F.linear", "by_halves", *(name for name, offer in few_row.PACKED_OFFERS.items()
                                          if offer(x, weight, bias))]
    for name in offered:
        few_row._warm_up(x, weight, bias, name)
    assert packed.PACKED_ATTR not in weight.__dict__
    assert len(offered) >= 2 + (dtype == torch.float32 and packed.mkl_packed_available() and rows == 1)


class PackingClock(few_row.KernelChoice):
    """The real choice on a fake clock: the fp16 pack's product takes 1 tick, every other kernel 3, and the first
    timed call of the pack's product 201 (making the pack): it saves 2 ticks a call and costs 200 to make."""

    def __init__(self, store=None) -> None:
        self.clock = 0.0
        self.packs_timed = 0
        super().__init__(timer=lambda: self.clock, store=store)

    def pick(self, key, candidates, warm_up=None):
        def costing(name, run):
            def go():
                if name == "fp16_packed":
                    self.clock += 201.0 if self.packs_timed == 0 else 1.0
                    self.packs_timed += 1
                else:
                    self.clock += 3.0
                return run()
            return go
        return super().pick(key, {name: costing(name, run) for name, run in candidates.items()}, warm_up)


def counting_kernels(monkeypatch) -> list[tuple[str, int]]:
    """Each decided call's (kernel, weight id), warm-ups on a slice left out."""
    calls: list[tuple[str, int]] = []
    for name in ("F.linear", "fp16_packed"):
        original = few_row._KERNEL_FUNCTIONS[name]

        def counted(x, weight, bias=None, _name=name, _original=original):
            if weight.size(0) > few_row.WARM_UP_FEATURES:
                calls.append((_name, id(weight)))
            return _original(x, weight, bias)
        monkeypatch.setitem(few_row._KERNEL_FUNCTIONS, name, counted)
    return calls


def has_fp16_pack(layer: Linear) -> bool:
    return packed.FP16 in (layer.weight.__dict__.get(packed.PACKED_ATTR) or {})


@needs_fp16_packing
def test_pack_plan_from_trials_puts_the_pack_off_until_the_products_would_have_paid_for_it():
    timings = {"F.linear": [5.0, 3.0, 3.0, 3.0], "by_halves": [6.0, 4.0, 4.0, 4.0],
               "fp16_packed": [201.5, 1.0, 1.0, 1.0]}
    # 200.5 s to make the pack, 2 s saved a call against the fastest unpacked kernel: 101 calls
    assert few_row.PackPlan.from_trials(timings, "fp16_packed") == few_row.PackPlan("F.linear", 101)
    cheap = {**timings, "fp16_packed": [0.5, 1.0, 1.0, 1.0]}  # its first run made no pack (or a free one)
    assert few_row.PackPlan.from_trials(cheap, "fp16_packed") == few_row.PackPlan("F.linear", 0)
    assert few_row.PackPlan.from_trials({"fp16_packed": [3.0, 1.0]}, "fp16_packed") is None
    plan = few_row.PackPlan("by_halves", 101)
    assert few_row.PackPlan.parse(plan.text()) == plan
    for text in (None, "", "by_halves", "fp16_packed 3", "nothing 3", "by_halves -3", "by_halves x"):
        assert few_row.PackPlan.parse(text) is None


@needs_fp16_packing
@torch.no_grad()
def test_a_kept_pack_is_made_once_a_weights_unpacked_products_would_have_paid_for_it(monkeypatch, tmp_path):
    """bf16 layers of one shape, the pack's product kept (saving 2 ticks a call, 200 to make): the trial's weight
    keeps its pack; every other weight runs the fastest unpacked kernel for its first 100 products and is packed
    at its 101st; results stay within a bf16 step of F.linear. A later chooser on the same file (another
    process) reads the plan with the choice: it times nothing and packs no weight at its first products."""
    layers = [Linear(256, 512).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, 1, 256).bfloat16()
    store = stored_choices.ChoiceFile(tmp_path / "choices.json")
    kernels = PackingClock(store)
    with few_row_products(kernels):
        while not kernels.chosen:
            for layer in layers:
                layer(x)
    assert set(kernels.chosen.values()) == {"fp16_packed"}
    assert [has_fp16_pack(layer) for layer in layers] == [True, False, False]
    calls = counting_kernels(monkeypatch)
    with few_row_products(kernels):
        for step in range(1, 103):
            for layer in layers:
                assert_one_bf16_step(layer(x), F.linear(x, layer.weight, layer.bias))
            assert [has_fp16_pack(layer) for layer in layers] == [True] + [step > 100] * 2
    for layer in layers[1:]:
        mine = [name for name, weight in calls if weight == id(layer.weight)]
        assert mine == ["F.linear"] * 100 + ["fp16_packed"] * 2
    assert [name for name, weight in calls if weight == id(layers[0].weight)] == ["fp16_packed"] * 102
    # a pack made by a plan is kept: another chooser whose trial of that weight loses does not drop it
    with few_row_products(FakeClock("F.linear")) as other:
        while not other.chosen:
            layers[2](x)
    assert other.chosen and has_fp16_pack(layers[2])

    def no_timing() -> float:
        raise AssertionError("a stored choice is not timed again")

    later = [Linear(256, 512).to(torch.bfloat16) for _ in range(2)]
    calls.clear()
    with few_row_products(few_row.KernelChoice(timer=no_timing, store=store)):
        for _ in range(100):
            for layer in later:
                layer(x)
        assert not any(has_fp16_pack(layer) for layer in later)
        for layer in later:
            layer(x)
    assert all(has_fp16_pack(layer) for layer in later)
    assert [name for name, _ in calls] == ["F.linear"] * 200 + ["fp16_packed"] * 2


@needs_fp16_packing
@torch.no_grad()
def test_a_stored_pack_choice_without_a_plan_packs_at_the_first_product(tmp_path):
    """A choices file that holds the choice but no plan for it (written before plans, or edited): the pack is
    made at once, as the choice says."""
    layer = Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(1, 1, 256).bfloat16()
    key = ("linear", 1, 512, 256, True, torch.bfloat16, True, torch.get_num_threads())
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"format": 1, "choices": {key_text(key): "fp16_packed"}}))
    with few_row_products(few_row.KernelChoice(store=stored_choices.ChoiceFile(path))) as kernels:
        assert_one_bf16_step(layer(x), F.linear(x, layer.weight, layer.bias))
    assert kernels.chosen == {key: "fp16_packed"} and has_fp16_pack(layer)


@needs_fp16_packing
@torch.no_grad()
def test_a_weight_made_under_inference_mode_never_takes_a_packed_kernel_kept_for_its_shape(monkeypatch):
    """Such a weight has no version counter, so no pack is kept on it: a packed kernel kept for its shape (by
    another model in the process) would pack it again on every call once the plan is due. Its shape is decided
    apart, among the kernels that need no pack, and nothing is ever packed for it."""
    layers = [Linear(256, 512).to(torch.bfloat16) for _ in range(2)]
    x = torch.randn(1, 1, 256).bfloat16()
    kernels = PackingClock()
    with few_row_products(kernels):
        while not kernels.chosen:
            for layer in layers:
                layer(x)
    assert set(kernels.chosen.values()) == {"fp16_packed"}
    with torch.inference_mode():
        frozen = Linear(256, 512).to(torch.bfloat16)
        frozen.load_state_dict(layers[1].state_dict())
        reorders: list[int] = []
        original = packed._reorder

        def counted(weight, kind, bias):
            reorders.append(weight.size(0))
            return original(weight, kind, bias)

        monkeypatch.setattr(packed, "_reorder", counted)
        with few_row_products(kernels):
            for _ in range(150):  # past the plan's 100 unpacked calls
                assert_one_bf16_step(frozen(x), F.linear(x, frozen.weight, frozen.bias))
    assert frozen.weight.is_inference() and reorders == []
    inference_keys = [key for key in kernels.chosen if key[-1] == "no packs"]
    assert len(inference_keys) == 1 and kernels.chosen[inference_keys[0]] in ("F.linear", "by_halves")


class ReorderClock(few_row.KernelChoice):
    """The real choice on a fake clock: the fp16 pack's product takes 1 tick, every other kernel 3, and making a
    pack 200 whenever one is made (``packed._reorder``)."""

    def __init__(self, monkeypatch) -> None:
        self.clock = 0.0
        super().__init__(timer=lambda: self.clock)
        original = packed._reorder

        def costing_reorder(weight, kind, bias):
            self.clock += 200.0
            return original(weight, kind, bias)

        monkeypatch.setattr(packed, "_reorder", costing_reorder)

    def pick(self, key, candidates, warm_up=None):
        def costing(name, run):
            def go():
                self.clock += 1.0 if name == "fp16_packed" else 3.0
                return run()
            return go
        return super().pick(key, {name: costing(name, run) for name, run in candidates.items()}, warm_up)


@needs_fp16_packing
@torch.no_grad()
def test_a_plan_counts_making_the_pack_where_the_trials_weight_held_one_already(monkeypatch):
    """The weight on trial was packed already (a bf16 model's head after a prompt's forward on a CPU without bf16
    units): its first timed packed product still makes the pack, so the plan weighs the pack's cost (it read 0
    and stored "pack at once" for every later process) and the pack stays kept for the prompts."""
    layers = [Linear(256, 512).to(torch.bfloat16) for _ in range(3)]
    packed.packed_weight(layers[0].weight, packed.FP16, layers[0].bias, keep=True)  # as a prompt's forward leaves it
    x = torch.randn(1, 1, 256).bfloat16()
    kernels = ReorderClock(monkeypatch)
    with few_row_products(kernels):
        while not kernels.chosen:
            for layer in layers:
                assert_one_bf16_step(layer(x), F.linear(x, layer.weight, layer.bias))
    assert set(kernels.chosen.values()) == {"fp16_packed"}
    # 200 ticks to make a pack, 2 saved a call against F.linear: 100 unpacked calls first
    assert set(kernels.pack_plans.values()) == {few_row.PackPlan("F.linear", 100)}
    assert has_fp16_pack(layers[0]) and packed.PACKED_ATTR in layers[0].weight.__dict__
    assert layers[0].weight.__dict__[packed.PACKED_ATTR][packed.FP16].kept
