"""Loading checks on what files hold: header against config.json first, dtypes, finite values, opt-outs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import TINY
from safetensors.torch import load_file, save_file

import gpt2lora.model.gpt2 as model_module
from gpt2lora import CheckpointError
from gpt2lora.config import LoRAConfig, TrainConfig
from gpt2lora.data.batching import collate
from gpt2lora.model import hub
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.model.tensorcheck import check_finite, nonfinite, nonfinite_report
from gpt2lora.peft.files import load_adapter, save_adapter
from gpt2lora.peft.lora import apply_lora
from gpt2lora.training.trainer import History, Trainer


def copy_with(tiny_checkpoint: Path, folder: Path, change=None, **config) -> Path:
    """A copy of the tiny checkpoint with its tensors changed by ``change`` and config.json fields replaced."""
    folder = Path(shutil.copytree(tiny_checkpoint, folder))
    if change is not None:
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def ids(n: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, length), generator=torch.Generator().manual_seed(3))


# --- counting -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_counts_nan_and_inf_in_every_float_dtype(dtype):
    t = torch.zeros(1000, dtype=dtype)
    t[[3, 500]] = float("nan")
    t[7] = float("inf")
    t[8] = float("-inf")  # inf - inf: the sum alone would call it a NaN; the count tells them apart
    assert nonfinite(t) == (2, 2)
    assert nonfinite(torch.ones(10, dtype=dtype)) == (0, 0)


def test_an_overflowing_sum_of_finite_values_is_not_a_false_alarm():
    huge = torch.full((4,), 3e38)  # finite, but their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    assert nonfinite(huge) == (0, 0)
    check_finite([("f", {"huge": huge, "ints": torch.tensor([1, 2])})])


def test_report_names_every_offending_tensor_in_order_and_the_opt_out_skips():
    tensors = {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(3), "c": torch.full((2, 2), float("inf"))}
    assert nonfinite_report(tensors) == ["a (1 of 2: 1 NaN, 0 inf)", "c (4 of 4: 0 NaN, 4 inf)"]
    with pytest.raises(CheckpointError, match=r"in 2 tensors of x\.safetensors: a \(1 of 2: 1 NaN, 0 inf\), c "):
        check_finite([("x.safetensors", tensors)])
    check_finite([("x.safetensors", tensors)], allow_nonfinite=True)


# --- the header comes first ------------------------------------------------------------------------------

def test_a_10000_block_config_fails_before_any_module_is_built_or_data_read(tiny_checkpoint, tmp_path, monkeypatch):
    folder = copy_with(tiny_checkpoint, tmp_path / "ckpt", n_layer=10000)
    built = []
    original_init = model_module.Block.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    def no_data(path, device="cpu"):
        raise AssertionError(f"{path}: tensor data read before the header check")

    monkeypatch.setattr(model_module.Block, "__init__", counting_init)
    GPT2.from_pretrained(tiny_checkpoint)
    assert len(built) == 2  # the counter sees the blocks of a normal load
    built.clear()
    monkeypatch.setattr(hub, "read_safetensors", no_data)
    with pytest.raises(CheckpointError, match=r"config\.json does not describe the weights beside it: n_layer=10000 "
                                              r"but the weights \(model\.safetensors\) hold 2 blocks"):
        GPT2.from_pretrained(folder)
    assert built == []


def test_names_and_shapes_are_checked_on_the_header_before_the_data(tiny_checkpoint, tmp_path, monkeypatch):
    def shrink(tensors):
        tensors["transformer.h.1.attn.c_proj.bias"] = tensors["transformer.h.1.attn.c_proj.bias"][:10].clone()
    folder = copy_with(tiny_checkpoint, tmp_path / "ckpt", shrink)
    monkeypatch.setattr(hub, "read_safetensors", lambda path, device="cpu": pytest.fail("data read"))
    with pytest.raises(CheckpointError, match=r"shape mismatches: transformer\.h\.1\.attn\.c_proj\.bias: checkpoint "
                                              r"\(10,\), model \(64,\)"):
        GPT2.from_pretrained(folder)


def test_one_odd_tensor_is_listed_by_the_full_check_not_blamed_on_the_config(tiny_checkpoint, tmp_path):
    def odd(tensors):  # block 0's MLP is narrower; block 1 agrees with config.json
        tensors["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(64, 128)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit the model:.*transformer\.h\.0\.mlp\.c_fc\.weight: "
                                              r"checkpoint \(128, 64\), model \(256, 64\)") as info:
        GPT2.from_pretrained(copy_with(tiny_checkpoint, tmp_path / "ckpt", odd))
    assert "n_inner" not in str(info.value)


# --- dtypes ---------------------------------------------------------------------------------------------

def half_checkpoint(tiny_checkpoint: Path, folder: Path, config_dtype: str | None) -> Path:
    """The tiny checkpoint in fp16, with config.json's dtype field set (or removed, for None)."""
    folder = copy_with(tiny_checkpoint, folder, lambda t: t.update({k: v.half() for k, v in t.items()}))
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("dtype", None)
    path.write_text(json.dumps(config if config_dtype is None else {**config, "dtype": config_dtype}))
    return folder


@pytest.mark.parametrize("config_dtype", ["float32", None])
def test_fp16_checkpoint_gets_the_dtype_transformers_gives_it(tiny_checkpoint, tmp_path, config_dtype):
    folder = half_checkpoint(tiny_checkpoint, tmp_path / "half", config_dtype)
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()  # dtype="auto": config, else weights
    model = GPT2.from_pretrained(folder).eval()
    expected = torch.float32 if config_dtype else torch.float16
    assert {p.dtype for p in reference.parameters()} == {p.dtype for p in model.parameters()} == {expected}
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4 if config_dtype else 1e-2, rtol=1e-3)


def test_a_config_dtype_converts_fp32_weights_like_transformers(tiny_checkpoint, tmp_path):
    folder = copy_with(tiny_checkpoint, tmp_path / "ckpt", dtype="bfloat16")
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder)
    model = GPT2.from_pretrained(folder)
    assert {p.dtype for p in reference.parameters()} == {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.transformer.wte.weight, reference.transformer.wte.weight)


def test_fp16_checkpoint_converts_when_dtype_asks(tiny_checkpoint, tmp_path):
    folder = half_checkpoint(tiny_checkpoint, tmp_path / "half", None)
    stored = load_file(str(folder / "model.safetensors"))
    full = GPT2.from_pretrained(folder, dtype=torch.float32).eval()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert torch.equal(full.transformer.wpe.weight, stored["transformer.wpe.weight"].float())
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(full(x), reference(x).logits, atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint_converts_to_the_dtype_asked(tiny_checkpoint, tmp_path):
    folder = copy_with(tiny_checkpoint, tmp_path / "bf16",
                       lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    stored = load_file(str(folder / "model.safetensors"))
    model = GPT2.from_pretrained(folder, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.equal(model.transformer.h[1].ln_2.weight, stored["transformer.h.1.ln_2.weight"].half())


def test_a_mix_of_float_dtypes_loads_in_their_lossless_common_dtype(tiny_checkpoint, tmp_path):
    def mix(tensors):  # float16 and bfloat16: neither holds the other, float32 holds both
        for i, name in enumerate(tensors):
            tensors[name] = tensors[name].half() if i % 2 else tensors[name].bfloat16()
    folder = copy_with(tiny_checkpoint, tmp_path / "mix", mix, dtype=None)  # config.json names no dtype
    stored = load_file(str(folder / "model.safetensors"))
    model = GPT2.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = model.state_dict()
    for name, tensor in stored.items():
        if name in state and ".c_" not in name:  # Conv1D weights are transposed on load
            assert torch.equal(state[name], tensor.float()), name


def test_a_new_classifier_head_gets_the_checkpoints_dtype(tiny_checkpoint, tmp_path):
    folder = half_checkpoint(tiny_checkpoint, tmp_path / "half", None)
    model = GPT2ForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


# --- opting out -----------------------------------------------------------------------------------------

def test_allow_nonfinite_loads_a_base_checkpoint_with_nan(tiny_checkpoint, tmp_path):
    def nan(tensors):
        tensors["transformer.h.0.ln_1.bias"][0] = float("nan")
    folder = copy_with(tiny_checkpoint, tmp_path / "nan", nan)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.ln_1\.bias \(1 of 64: 1 NaN, 0 inf\)"):
        GPT2.from_pretrained(folder)
    model = GPT2.from_pretrained(folder, allow_nonfinite=True)
    assert torch.isnan(model.transformer.h[0].ln_1.bias[0])
    clf = GPT2ForSequenceClassification.from_pretrained(folder, num_labels=2, allow_nonfinite=True)
    assert torch.isnan(clf.transformer.h[0].ln_1.bias[0])


def test_allow_nonfinite_loads_an_adapter_with_inf(tiny_checkpoint, tmp_path):
    folder = save_adapter(apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, alpha=4), seed=0),
                          tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"][1, 1] = float("inf")
    save_file(tensors, str(path))
    model = GPT2.from_pretrained(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"lora_B\.weight \(1 of 384: 0 NaN, 1 inf\)"):
        load_adapter(model, folder)
    assert model.lora_config is None and "adapter_router" not in vars(model)  # refused before anything changed
    load_adapter(model, folder, allow_nonfinite=True)
    assert torch.isinf(model.transformer.h[0].attn.c_attn.lora_B[1, 1])


def test_allow_nonfinite_loads_a_training_checkpoint_with_nan(tiny_checkpoint, tmp_path):
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)

    def trainer():
        model = GPT2ForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
        return Trainer(model, TrainConfig(device="cpu", progress=False, out_dir=str(tmp_path / "run")))

    trainer().fit([batch])
    folder = tmp_path / "run" / "checkpoint-0000001"
    tensors = load_file(str(folder / "trainable.safetensors"))
    tensors["score.weight"][0, :3] = float("nan")
    save_file(tensors, str(folder / "trainable.safetensors"))
    resumed = trainer()
    resumed.history, resumed._n_batches = History(total_steps=1), 1  # what fit() sets before it loads
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors: score\.weight \(3 of 128: 3 NaN, 0 inf\)"):
        resumed.load_checkpoint(folder)
    resumed.load_checkpoint(folder, allow_nonfinite=True)
    assert int(torch.isnan(resumed.model.score.weight).sum()) == 3
