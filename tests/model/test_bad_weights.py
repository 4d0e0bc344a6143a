"""The bad-weights battery: well-formed files that lie (test_bad_input.py's pattern, for what they hold).

A ``config.json`` that describes another model than its weights, tensors of the wrong dtype, NaN and inf in
base checkpoints, adapters, soft prompts and training checkpoints. Each case builds its own bad input and
expects a gpt2lora error whose message matches a pattern naming the file and the tensor or field; every case
also checks that the refused load changed nothing on disk. ``test_battery_inventory`` prints the count.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from battery import Battery
from helpers import TINY
from safetensors.torch import load_file, save_file

from gpt2lora import CheckpointError, ConfigError, GPT2LoRAError
from gpt2lora.config import LoRAConfig, TrainConfig
from gpt2lora.data.batching import collate
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.peft.files import load_adapter, save_adapter
from gpt2lora.peft.lora import apply_lora
from gpt2lora.peft.methods import prepare_model
from gpt2lora.peft.prompt import PromptConfig
from gpt2lora.training.trainer import Trainer


@dataclass
class Ctx:
    """A private temp folder and the tiny checkpoint to break copies of."""

    tmp: Path
    checkpoint: Path

    def ckpt(self) -> Path:
        return Path(shutil.copytree(self.checkpoint, self.tmp / "ckpt"))

    def model(self) -> GPT2:
        return GPT2.from_pretrained(self.checkpoint)

    def edit_config(self, folder: Path, **changes: Any) -> Path:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return path

    def edit_tensors(self, path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path

    def weights(self, change: Callable[[dict[str, torch.Tensor]], None]) -> tuple[Path, Path]:
        """A copy of the checkpoint with its tensors changed: (folder, weights file)."""
        folder = self.ckpt()
        return folder, self.edit_tensors(folder / "model.safetensors", change)

    def adapter(self, model, name: str = "adapter") -> Path:
        return save_adapter(model, self.tmp / name)


BATTERY = Battery()
CASES = BATTERY.cases
case = BATTERY.case


def poke(name: str, value: float, count: int = 1) -> Callable[[dict[str, torch.Tensor]], None]:
    """Set the first ``count`` entries of tensor ``name`` to ``value``."""
    def change(tensors):
        tensors[name].view(-1)[:count] = value
    return change


def retype(name: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors):
        tensors[name] = (tensors[name] * 100).to(dtype)
    return change


# --- config.json against the weights (before any module is built) -------------------------------------------

@case("config-n_layer-10000", "config vs weights", CheckpointError,
      r"{path} does not describe the weights beside it: n_layer=10000 but the weights \(model\.safetensors\) hold 2 "
      r"blocks \(transformer\.h\.0 \.\. transformer\.h\.1\)")
def _(ctx):
    folder = ctx.ckpt()
    return lambda: GPT2.from_pretrained(folder), {"path": ctx.edit_config(folder, n_layer=10000)}


@case("config-n_embd", "config vs weights", CheckpointError,
      r"{path} does not describe the weights beside it: n_embd=128 but the weights say 64 \(model\.safetensors: "
      r"transformer\.wte\.weight has shape \(512, 64\)\); n_inner=None \(4 \* n_embd = 512\) but the weights say 256")
def _(ctx):
    folder = ctx.ckpt()
    return lambda: GPT2.from_pretrained(folder), {"path": ctx.edit_config(folder, n_embd=128)}


@case("config-vocab_size", "config vs weights", CheckpointError,
      r"{path} does not describe the weights beside it: vocab_size=50257 but the weights say 512 "
      r"\(model\.safetensors: transformer\.wte\.weight has shape \(512, 64\)\)")
def _(ctx):
    folder = ctx.ckpt()
    return lambda: GPT2.from_pretrained(folder), {"path": ctx.edit_config(folder, vocab_size=50257)}


@case("config-n_positions", "config vs weights", CheckpointError,
      r"{path} .*n_positions=2048 but the weights say 64 \(model\.safetensors: transformer\.wpe\.weight has shape "
      r"\(64, 64\)\)")
def _(ctx):
    folder = ctx.ckpt()
    return lambda: GPT2.from_pretrained(folder), {"path": ctx.edit_config(folder, n_positions=2048)}


@case("config-n_inner", "config vs weights", CheckpointError,
      r"{path} .*n_inner=100 but the weights say 256 \(model\.safetensors: transformer\.h\.0\.mlp\.c_fc\.weight has "
      r"shape \(64, 256\)\)")
def _(ctx):
    folder = ctx.ckpt()
    return lambda: GPT2.from_pretrained(folder), {"path": ctx.edit_config(folder, n_inner=100)}


@case("config-classifier-n_layer", "config vs weights", CheckpointError,
      r"{path} .*n_layer=12 but the weights \(model\.safetensors\) hold 2 blocks")
def _(ctx):
    folder = ctx.ckpt()
    path = ctx.edit_config(folder, n_layer=12)
    return lambda: GPT2ForSequenceClassification.from_pretrained(folder, num_labels=2), {"path": path}


# --- dtypes ---------------------------------------------------------------------------------------------

@case("weights-int32", "dtype", CheckpointError,
      r"{path}: tensor transformer\.h\.0\.attn\.c_attn\.weight is int32; expected floating-point values")
def _(ctx):
    folder, path = ctx.weights(retype("transformer.h.0.attn.c_attn.weight", torch.int32))
    return lambda: GPT2.from_pretrained(folder), {"path": path}


@case("weights-bool-and-int64", "dtype", CheckpointError,
      r"{path}: tensor transformer\.h\.0\.ln_1\.weight is bool, tensor transformer\.wpe\.weight is int64; "
      r"expected floating-point")
def _(ctx):
    def change(tensors):
        retype("transformer.h.0.ln_1.weight", torch.bool)(tensors)
        retype("transformer.wpe.weight", torch.int64)(tensors)
    folder, path = ctx.weights(change)
    return lambda: GPT2.from_pretrained(folder), {"path": path}


@case("weights-int-even-with-dtype", "dtype", CheckpointError,
      r"{path}: tensor transformer\.ln_f\.bias is uint8; expected floating-point")
def _(ctx):
    folder, path = ctx.weights(retype("transformer.ln_f.bias", torch.uint8))
    return lambda: GPT2.from_pretrained(folder, dtype=torch.float32), {"path": path}


@case("weights-float8-mix", "dtype", CheckpointError,
      r"checkpoint {path}: tensor transformer\.wpe\.weight is float8_e4m3fn, the others float32, which a model "
      r"cannot hold as they are; pass dtype=torch\.float32")
def _(ctx):
    folder, _ = ctx.weights(lambda t: t.update({"transformer.wpe.weight": t["transformer.wpe.weight"].to(
        torch.float8_e4m3fn)}))
    ctx.edit_config(folder, dtype=None)  # no dtype in config.json either
    return lambda: GPT2.from_pretrained(folder), {"path": folder}


@case("dtype-argument-int", "dtype", ConfigError,
      r"GPT2\.from_pretrained dtype: expected one of torch\.float32, torch\.float16, torch\.bfloat16, "
      r"torch\.float64 or None, got torch\.int8")
def _(ctx):
    return lambda: GPT2.from_pretrained(ctx.checkpoint, dtype=torch.int8), {}


@case("adapter-int32", "dtype", CheckpointError,
      r"{path}: tensor base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight is int32; expected "
      r"floating-point")
def _(ctx):
    folder = ctx.adapter(apply_lora(ctx.model(), LoRAConfig(rank=2, alpha=4), seed=0))
    path = ctx.edit_tensors(folder / "adapter_model.safetensors",
                            retype("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", torch.int32))
    return lambda: load_adapter(ctx.model(), folder), {"path": path}


# --- non-finite values ----------------------------------------------------------------------------------

@case("weights-nan-and-inf", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 2 tensors of {path}: transformer\.h\.1\.mlp\.c_fc\.weight \(3 of 16384: 3 "
      r"NaN, 0 inf\), transformer\.wte\.weight \(2 of 32768: 0 NaN, 2 inf\); pass allow_nonfinite=True")
def _(ctx):
    def change(tensors):
        poke("transformer.h.1.mlp.c_fc.weight", float("nan"), 3)(tensors)
        poke("transformer.wte.weight", float("-inf"), 2)(tensors)
    folder, path = ctx.weights(change)
    return lambda: GPT2.from_pretrained(folder), {"path": path}


@case("weights-nan-in-a-shard", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: (transformer\.)?h\.1\.ln_2\.bias \(1 of 64: 1 NaN, 0 inf\)")
def _(ctx):
    folder = ctx.tmp / "sharded"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index["transformer.h.1.ln_2.bias"]
    ctx.edit_tensors(shard, poke("transformer.h.1.ln_2.bias", float("nan")))
    return lambda: GPT2.from_pretrained(folder), {"path": shard}


@case("classifier-weights-inf", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: transformer\.h\.0\.attn\.c_proj\.bias \(1 of 64: 0 NaN, "
      r"1 inf\)")
def _(ctx):
    folder, path = ctx.weights(poke("transformer.h.0.attn.c_proj.bias", float("inf")))
    return lambda: GPT2ForSequenceClassification.from_pretrained(folder, num_labels=3), {"path": path}


@case("adapter-inf", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: base_model\.model\.transformer\.h\.1\.mlp\.c_fc\."
      r"lora_B\.weight \(1 of 512: 0 NaN, 1 inf\); pass allow_nonfinite=True")
def _(ctx):
    folder = ctx.adapter(apply_lora(ctx.model(), LoRAConfig(rank=2, alpha=4), seed=0))
    path = ctx.edit_tensors(folder / "adapter_model.safetensors",
                            poke("base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight", float("inf")))
    return lambda: load_adapter(ctx.model(), folder), {"path": path}


@case("prompt-nan", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: prompt_embeddings \(5 of 256: 5 NaN, 0 inf\)")
def _(ctx):
    folder = ctx.adapter(prepare_model(ctx.model(), "prompt", prompt=PromptConfig(num_virtual_tokens=4), seed=0))
    path = ctx.edit_tensors(folder / "adapter_model.safetensors", poke("prompt_embeddings", float("nan"), 5))
    return lambda: load_adapter(ctx.model(), folder), {"path": path}


@case("trained-tensors-nan", "non-finite", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: score\.weight \(1 of 128: 1 NaN, 0 inf\)")
def _(ctx):
    model = prepare_model(GPT2ForSequenceClassification.from_pretrained(ctx.checkpoint, num_labels=2), "head")
    folder = ctx.adapter(model)
    path = ctx.edit_tensors(folder / "adapter_model.safetensors", poke("score.weight", float("nan")))
    fresh = GPT2ForSequenceClassification.from_pretrained(ctx.checkpoint, num_labels=2)
    return lambda: load_adapter(fresh, folder), {"path": path}


# --- training checkpoints -------------------------------------------------------------------------------

def training_run(ctx: Ctx) -> tuple[Path, Callable[[], Any]]:
    """A finished one-step run; returns its checkpoint folder and a call that resumes from it."""
    out = ctx.tmp / "run"
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)

    def trainer(**overrides):
        model = GPT2ForSequenceClassification.from_pretrained(ctx.checkpoint, num_labels=2)
        return Trainer(model, TrainConfig(device="cpu", progress=False, out_dir=str(out), **overrides))

    trainer().fit([batch])
    return out / "checkpoint-0000001", lambda: trainer(resume_from=str(out)).fit([batch])


@case("resume-weights-nan", "training", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: score\.weight \(4 of 128: 4 NaN, 0 inf\); "
      r"pass allow_nonfinite=True")
def _(ctx):
    folder, resume = training_run(ctx)
    path = ctx.edit_tensors(folder / "trainable.safetensors", poke("score.weight", float("nan"), 4))
    return resume, {"path": path}


@case("resume-optimizer-inf", "training", CheckpointError,
      r"non-finite values \(NaN/inf\) in 1 tensor of {path}: state\.0\.exp_avg_sq \(1 of \d+: 0 NaN, 1 inf\)")
def _(ctx):
    folder, resume = training_run(ctx)
    path = ctx.edit_tensors(folder / "optimizer.safetensors", poke("state.0.exp_avg_sq", float("inf")))
    return resume, {"path": path}


@case("resume-weights-int", "training", CheckpointError,
      r"{path}: tensor transformer\.wte\.weight is int64; expected floating-point")
def _(ctx):
    folder, resume = training_run(ctx)
    path = ctx.edit_tensors(folder / "trainable.safetensors", retype("transformer.wte.weight", torch.int64))
    return resume, {"path": path}


# --- the battery ----------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes (folders as '')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_weights(name, tmp_path, tiny_checkpoint):
    spec = CASES[name]
    call, values = spec.make(Ctx(tmp_path, tiny_checkpoint))
    pattern = spec.pattern.format(**{k: re.escape(str(v)) for k, v in values.items()})
    before = snapshot(tmp_path)
    with pytest.raises(spec.error) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, GPT2LoRAError)
    assert isinstance(info.value, (ValueError, FileNotFoundError, RuntimeError))
    assert re.search(pattern, message, re.DOTALL), f"{name}: {message!r} does not match {pattern!r}"
    assert snapshot(tmp_path) == before, f"{name}: the refused load changed files on disk"


def test_battery_inventory(capsys):
    families = Counter(c.family for c in CASES.values())
    with capsys.disabled():
        print(f"\nbad-weights battery: {len(CASES)} cases ("
              + ", ".join(f"{family} {n}" for family, n in sorted(families.items())) + ")")
    assert len(CASES) >= 20
    assert set(families) == {"config vs weights", "dtype", "non-finite", "training"}
