"""Half-precision inference on a CPU without bf16 units: torch emulates bf16 products there (many times slower
than fp32), so products that need no gradient run on fbgemm's fp16 pack instead (``takes_fp16_pack_route``),
decoding's few rows stay with the measured kernel choice, and ``precision="bf16"`` is allowed for inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, Recording

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora, devices, generate
from gpt2lora.devices import resolve_precision
from gpt2lora.errors import ConfigError
from gpt2lora.ops import few_row, packed
from gpt2lora.ops.few_row import Linear, few_row_products
from gpt2lora.ops.packed import packed_bytes

pytestmark = pytest.mark.skipif(not packed.fp16_packed_available(),
                                reason="torch has no fbgemm fp16 linear here (an ARM build)")
CPU = torch.device("cpu")


@pytest.fixture
def emulated(monkeypatch):
    """A CPU without bf16 units, as far as the route is concerned."""
    monkeypatch.setattr(packed, "half_products_emulated", lambda: True)


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)


def packs_of(layer: torch.nn.Module) -> dict:
    return dict(layer.weight.__dict__.get(packed.PACKED_ATTR) or {})


def test_a_cpu_emulates_half_products_where_it_has_no_bf16_units(monkeypatch, the_real_cpus_half_products):
    emulates = packed.half_products_emulated
    for amx, avx512_bf16, emulated in ((False, False, True), (False, True, False), (True, True, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        emulates.cache_clear()
        try:
            assert emulates() is emulated
        finally:
            emulates.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [33, 80])
@torch.no_grad()  # not inference_mode: its tensors have no version counter, so they are never packed
def test_half_products_without_gradients_take_the_fp16_pack_and_keep_it(emulated, dtype, rows):
    """More rows than decoding's: the weight's first such product widened to fp32 for the call, the second on
    the pack, made then and kept; a few rows (a short prompt, the head's last position) stay on F.linear outside
    decoding, where a pack would cost hundreds of such products."""
    layer = Linear(256, 512).to(dtype).requires_grad_(False)
    for few in (1, few_row.MAX_ROWS):
        x = torch.randn(few, 256).to(dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and packed_bytes(layer) == 0
    x = torch.randn(rows, 256).to(dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    widened = layer(x)
    assert packed_bytes(layer) == 0
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)  # one rounding, at the end
    assert torch.equal(widened, exact)
    got = layer(x)
    for out in (widened, got):
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=2**-10)
    assert set(packs_of(layer)) == {packed.FP16} and packs_of(layer)[packed.FP16].kept
    assert packed_bytes(layer) == layer.weight.numel() * layer.weight.element_size()
    first = packs_of(layer)[packed.FP16].packed
    layer(x.view(1, rows, 256))
    assert packs_of(layer)[packed.FP16].packed is first  # made once, reused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_made_under_inference_mode_are_widened_for_every_product(emulated, dtype):
    """Such a weight keeps no pack (no version counter): each product of more rows than decoding's runs on fp32
    copies, rounded once, rather than on torch's emulated half product; nothing is packed or marked on it."""
    with torch.inference_mode():
        layer = Linear(256, 512).to(dtype)
        x = torch.randn(80, 256).to(dtype)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
        for _ in range(3):
            assert torch.equal(layer(x), exact)
    assert layer.weight.is_inference() and packed_bytes(layer) == 0 and not layer.weight.__dict__


@torch.no_grad()
def test_a_half_weight_whose_storage_keeps_moving_is_widened_instead_of_packed_again(emulated):
    """FSDP gathers a sharded weight into new memory for every forward: after ``MOVES_TO_STOP_PACKING`` remade packs
    its products run on fp32 copies (not on torch's emulated half product) and nothing is packed any more."""
    layer = Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(40, 256).bfloat16()
    layer(x), layer(x)  # widened, then packed
    for _ in range(packed.MOVES_TO_STOP_PACKING):
        layer.weight.data = layer.weight.data.clone()  # same values, new memory
        layer(x)
        assert packed.FP16 in packs_of(layer)
    layer.weight.data = layer.weight.data.clone()
    for _ in range(2):
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
        assert torch.equal(layer(x), exact) and packs_of(layer) == {}


def test_the_route_leaves_gradients_fp32_and_other_cpus_to_f_linear(emulated, monkeypatch):
    layer = Linear(256, 512).to(torch.bfloat16)  # trainable weight: its product needs a gradient
    x = torch.randn(40, 256).bfloat16()
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias)) and packed_bytes(layer) == 0
    out.float().sum().backward()
    assert layer.weight.grad is not None
    frozen = Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    wanted = x.clone().requires_grad_(True)  # an input that needs a gradient (a frozen base in training)
    assert torch.equal(frozen(wanted), F.linear(wanted, frozen.weight, frozen.bias)) and packed_bytes(frozen) == 0
    with torch.no_grad():
        single = Linear(256, 512).requires_grad_(False)
        xs = torch.randn(40, 256)
        assert torch.equal(single(xs), F.linear(xs, single.weight, single.bias)) and packed_bytes(single) == 0
        monkeypatch.setattr(packed, "half_products_emulated", lambda: False)  # a CPU with bf16 units
        assert torch.equal(frozen(x), F.linear(x, frozen.weight, frozen.bias)) and packed_bytes(frozen) == 0


@torch.no_grad()
def test_a_weight_fp16_cannot_hold_gets_f_linears_product(emulated):
    layer = Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    layer.weight[3, 5] = 1e6  # beyond fp16's 65,504: fbgemm would saturate it
    x = torch.randn(40, 256).bfloat16()
    layer(x)  # the first is widened to fp32: exact for any value
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # then no pack: F.linear's own
    assert packed_bytes(layer) == 0


@torch.no_grad()
def test_decodings_few_rows_are_left_to_the_kernel_choice_which_keeps_the_routes_pack(emulated):
    layer = Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    one = torch.randn(1, 1, 256).bfloat16()
    kernels = Recording("F.linear")
    with few_row_products(kernels):
        assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
        assert kernels.offered == [("F.linear", "by_halves", "fp16_packed")]
        assert packed_bytes(layer) == 0  # the pack made on trial went with the losing candidate
        prompt = torch.randn(1, 40, 256).bfloat16()  # more rows than decoding's: the route
        layer(prompt)
        layer(prompt)  # the second packs
        assert packs_of(layer)[packed.FP16].kept
        assert len(kernels.offered) == 1
    kernels = Recording("F.linear")
    with few_row_products(kernels):
        layer(torch.randn(2, 1, 256).bfloat16())  # a new few-row shape decided against the pack...
    assert packs_of(layer)[packed.FP16].kept  # ...keeps the one the route holds


def tiny_half(dtype: torch.dtype) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**{**TINY, "n_embd": 256, "n_head": 4, "vocab_size": 1001})).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_reads_its_prompt_through_the_pack_as_on_a_cpu_with_bf16_units(monkeypatch, dtype):
    """A LoRA-wrapped half model: the prompt's logits within the dtype's rounding of F.linear's, widened at the
    first forward, then every block matrix and the head packed once, and greedy decoding (on F.linear for both)
    gives the same tokens."""
    model = tiny_half(dtype)
    ids = torch.randint(1, 1001, (2, 24), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(few_row, "KERNELS", Recording("F.linear"))  # generate's own context uses KERNELS
    with torch.no_grad():
        plain_logits = model(ids).float()
    plain = generate(model, ids, max_new_tokens=10, eos_token_id=None)
    assert packed_bytes(model) == 0
    monkeypatch.setattr(packed, "half_products_emulated", lambda: True)
    with torch.no_grad():
        widened = model(ids).float()
        assert packed_bytes(model) == 0
        logits = model(ids).float()
    for got in (widened, logits):
        torch.testing.assert_close(got, plain_logits, rtol=2e-2, atol=2e-2)
        assert (got.argmax(-1) == plain_logits.argmax(-1)).float().mean() > 0.95
    matrices = {n: p for n, p in model.named_parameters() if p.dim() == 2 and "lora_" not in n and "wpe" not in n}
    assert len(matrices) == 4 * TINY["n_layer"] + 1  # the block matrices and the (tied) head
    assert all(packed.FP16 in p.__dict__.get(packed.PACKED_ATTR, {}) for p in matrices.values())
    assert torch.equal(generate(model, ids, max_new_tokens=10, eos_token_id=None), plain)


def test_bf16_is_allowed_for_inference_on_a_cpu_without_bf16_units_and_refused_for_training(no_bf16_units,
                                                                                              monkeypatch):
    assert resolve_precision("bf16", CPU, "--precision", inference=True) == "bf16"
    with pytest.raises(ConfigError, match=r"^--precision='bf16' on cpu: this CPU has no bf16 matrix units .*"
                                          r"generate and serve run bf16 here"):
        resolve_precision("bf16", CPU, "--precision")
    monkeypatch.setattr(devices, "fp16_packed_available", lambda: False)  # an ARM build: no fbgemm
    with pytest.raises(ConfigError, match=r"no bf16 matrix units .*no fbgemm fp16 product"):
        resolve_precision("bf16", CPU, "--precision", inference=True)
    assert resolve_precision("auto", CPU, inference=True) == "fp32"
