"""The bad-input battery: one table of wrong inputs to every public entry point.

Each case builds its own bad input, calls one entry point, and expects a gpt2lora error (a ``ValueError`` /
``FileNotFoundError`` / ``RuntimeError`` subclass) whose message matches a pattern naming the file, key, field,
line or argument and what was expected. CLI cases expect the exit status and the line on stderr instead.
``test_battery_inventory`` prints how many cases there are and which families they cover.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from battery import Battery
from helpers import DATA, TINY
from safetensors.torch import load_file, save_file

from gpt2lora import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    GPT2LoRAError,
    TrainingError,
    UnsafeCheckpointError,
)
from gpt2lora.app.cli import main as cli_main
from gpt2lora.app.publish import push_run
from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.data.batching import BucketedBatches, collate, lm_example
from gpt2lora.data.tasks import encode, load_split
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.generate import generate
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.model.tokenizer import load_tokenizer
from gpt2lora.peft.files import load_adapter, save_adapter
from gpt2lora.peft.lora import apply_lora, merge_lora
from gpt2lora.training.tracking import make_trackers
from gpt2lora.training.trainer import Trainer


@dataclass
class Ctx:
    """What a case may use: a private temp folder, the tiny checkpoint, a saved adapter, the vocabulary."""

    tmp: Path
    checkpoint: Path
    adapter_dir: Path
    vocab: Path
    smoke_runs: Callable[[], Path] | None = None
    """Trains one small smoke run (sms_spam) the first time it is called; the folder holding it."""

    def ckpt(self) -> Path:
        """A private copy of the tiny checkpoint to break."""
        return Path(shutil.copytree(self.checkpoint, self.tmp / "ckpt"))

    def adapter(self) -> Path:
        return Path(shutil.copytree(self.adapter_dir, self.tmp / "adapter"))

    def model(self) -> GPT2:
        return GPT2.from_pretrained(self.checkpoint)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def rows(self, name: str, *rows: Any) -> Path:
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def run(self) -> Path:
        """A private copy of the smoke run folder (its base checkpoint stays where the cached run has it)."""
        assert self.smoke_runs is not None
        return Path(shutil.copytree(self.smoke_runs() / "r", self.tmp / "runs" / "r"))

    def edit_config(self, folder: Path, **changes: Any) -> Path:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder / "config.json"

    def edit_tensors(self, path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})


BATTERY = Battery()
CASES = BATTERY.cases
case = BATTERY.case


def cls_ckpt_model(ctx: Ctx, num_labels: int = 2) -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification.from_pretrained(ctx.checkpoint, num_labels=num_labels)


# --- checkpoints ----------------------------------------------------------------------------------------

@case("ckpt-missing-folder", "checkpoint", CheckpointNotFoundError, r"{path} does not exist")
def _(ctx):
    path = ctx.tmp / "nowhere"
    return lambda: GPT2.from_pretrained(path), {"path": path}


@case("ckpt-file-not-folder", "checkpoint", CheckpointNotFoundError, r"{path} is a file; expected a checkpoint folder")
def _(ctx):
    path = ctx.file("weights.safetensors", b"x")
    return lambda: GPT2.from_pretrained(path), {"path": path}


@case("ckpt-no-config", "checkpoint", CheckpointNotFoundError, r"{path} not found")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "config.json").unlink()
    return lambda: GPT2.from_pretrained(folder), {"path": folder / "config.json"}


@case("ckpt-config-not-json", "checkpoint", CheckpointError, r"{path} is not valid JSON")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "config.json").write_text('{"n_layer": 2,')
    return lambda: GPT2.from_pretrained(folder), {"path": folder / "config.json"}


@case("ckpt-config-not-object", "checkpoint", CheckpointError, r"{path}: expected a JSON object, got list")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "config.json").write_text("[1, 2]")
    return lambda: GPT2.from_pretrained(folder), {"path": folder / "config.json"}


@case("ckpt-config-n_head", "checkpoint", CheckpointError, r"config\.json.*n_head: expected a divisor of n_embd=64, got 5")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_config(folder, n_head=5)
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-config-model-type", "checkpoint", CheckpointError, r"config\.json.*model_type is 'bert'")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_config(folder, model_type="bert")
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-config-vocab-type", "checkpoint", CheckpointError, r"config\.json.*vocab_size: expected a positive integer, got '512'")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_config(folder, vocab_size="512")
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-config-activation", "checkpoint", CheckpointError, r"config\.json.*activation_function: expected one of")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_config(folder, activation_function="swish2")
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-no-weights", "checkpoint", CheckpointNotFoundError, r"{path} has no model\.safetensors")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "model.safetensors").unlink()
    return lambda: GPT2.from_pretrained(folder), {"path": folder}


@case("ckpt-pickle-only", "checkpoint", UnsafeCheckpointError, r"pytorch_model\.bin.*safetensors only")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-truncated", "checkpoint", CheckpointError, r"{path} is not a readable safetensors file")
def _(ctx):
    folder = ctx.ckpt()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    return lambda: GPT2.from_pretrained(folder), {"path": path}


@case("ckpt-garbage", "checkpoint", CheckpointError, r"{path} is not a readable safetensors file")
def _(ctx):
    folder = ctx.ckpt()
    path = folder / "model.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    return lambda: GPT2.from_pretrained(folder), {"path": path}


@case("ckpt-misshaped-tensor", "checkpoint", CheckpointError, r"does not fit the model.*shape mismatches: transformer\.h\.0\.mlp\.c_fc\.weight: checkpoint \(128, 64\), model \(256, 64\)")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_tensors(folder / "model.safetensors",
                     lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 128)}))
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-missing-tensor", "checkpoint", CheckpointError, r"checkpoint {path} does not fit the model.*missing tensors: transformer\.h\.1\.ln_2\.bias")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_tensors(folder / "model.safetensors", lambda t: t.pop("transformer.h.1.ln_2.bias"))
    return lambda: GPT2.from_pretrained(folder), {"path": folder}


@case("ckpt-unexpected-tensor", "checkpoint", CheckpointError, r"does not fit the model.*unexpected tensors: transformer\.h\.7\.attn\.c_attn\.weight")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_tensors(folder / "model.safetensors",
                     lambda t: t.update({"transformer.h.7.attn.c_attn.weight": torch.zeros(64, 192)}))
    return lambda: GPT2.from_pretrained(folder), {}


@case("ckpt-duplicate-name", "checkpoint", CheckpointError,
      r"checkpoint {path}: tensors 'transformer\.wte\.weight' and 'wte\.weight' are the same weight")
def _(ctx):
    folder = ctx.ckpt()
    ctx.edit_tensors(folder / "model.safetensors", lambda t: t.update({"wte.weight": torch.zeros(512, 64)}))
    return lambda: GPT2.from_pretrained(folder), {"path": folder}


@case("ckpt-shard-missing", "checkpoint", CheckpointNotFoundError, r"{path} names shards that are missing: part-2")
def _(ctx):
    folder = ctx.ckpt()
    (folder / "model.safetensors").rename(folder / "part-1")
    names = list(load_file(str(folder / "part-1")))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: ("part-1" if i else "part-2") for i, n in enumerate(names)}}))
    return lambda: GPT2.from_pretrained(folder), {"path": index}


@case("ckpt-num-labels", "checkpoint", ConfigError, r"num_labels: expected a positive integer, got 0")
def _(ctx):
    return lambda: GPT2ForSequenceClassification.from_pretrained(ctx.checkpoint, num_labels=0), {}


# --- configurations -------------------------------------------------------------------------------------

def config_case(name: str, cls: type, kwargs: dict[str, Any], pattern: str) -> None:
    case(name, "config", ConfigError, pattern)(lambda ctx: ((lambda: cls(**kwargs)), {}))


config_case("lora-rank-0", LoRAConfig, {"rank": 0}, r"LoRAConfig\.rank: expected a positive integer, got 0")
config_case("lora-target-typo", LoRAConfig, {"targets": ("attn.c_atn",)}, r"LoRAConfig\.targets: expected names among")
config_case("lora-dropout-1", LoRAConfig, {"dropout": 1.0}, r"LoRAConfig\.dropout: expected a number in \[0, 1\)")
config_case("lora-style", LoRAConfig, {"style": "qlora"}, r"LoRAConfig\.style: expected one of")
config_case("lora-alpha-bool", LoRAConfig, {"alpha": True}, r"LoRAConfig\.alpha: expected a finite number in \(0, 1e\+06\]")
config_case("lora-alpha-inf", LoRAConfig, {"alpha": float("inf")},
            r"LoRAConfig\.alpha: expected a finite number in \(0, 1e\+06\], got inf")
config_case("lora-alpha-huge", LoRAConfig, {"alpha": 1e300}, r"LoRAConfig\.alpha: expected a finite number")
config_case("lora-rank-huge", LoRAConfig, {"rank": 10**12}, r"LoRAConfig\.rank: expected at most 65536")
config_case("lora-pissa-niter-huge", LoRAConfig, {"init": "pissa_niter_100000"},
            r"LoRAConfig\.init: expected pissa_niter_N with N at most 64, got 'pissa_niter_100000'")
config_case("lora-dora-split", LoRAConfig, {"use_dora": True, "targets": ("attn.v",)},
            r"LoRAConfig\.use_dora: expected targets DoRA can wrap.*\['attn\.v'\]")
config_case("lora-init-unknown", LoRAConfig, {"init": "svd"}, r"LoRAConfig\.init: expected one of .*, got 'svd'")
config_case("train-loraplus-0", TrainConfig, {"loraplus_lr_ratio": 0},
            r"TrainConfig\.loraplus_lr_ratio: expected a finite number > 0 or None, got 0")
config_case("train-lr-0", TrainConfig, {"lr": 0}, r"TrainConfig\.lr: expected a finite number > 0, got 0")
config_case("train-lr-inf", TrainConfig, {"lr": float("inf")}, r"TrainConfig\.lr: expected a finite number > 0, got inf")
config_case("train-lr-nan", TrainConfig, {"lr": float("nan")}, r"TrainConfig\.lr: expected a .*number > 0, got nan")
config_case("train-warmup", TrainConfig, {"warmup_ratio": 1.5}, r"TrainConfig\.warmup_ratio: expected a number in \[0, 1\)")
config_case("train-min-lr", TrainConfig, {"lr": 1e-4, "min_lr": 1e-3}, r"TrainConfig\.min_lr: expected a number in \[0, lr=0\.0001\]")
config_case("train-optimizer", TrainConfig, {"optimizer": "adam"}, r"TrainConfig\.optimizer: expected one of adamw, sgd, sgd_momentum")
config_case("train-grad-clip", TrainConfig, {"grad_clip": -1.0}, r"TrainConfig\.grad_clip: expected a number > 0 or None")
config_case("train-epochs-float", TrainConfig, {"epochs": 1.5}, r"TrainConfig\.epochs: expected a positive integer, got 1\.5")
config_case("train-precision", TrainConfig, {"precision": "fp8"}, r"TrainConfig\.precision: expected one of")
config_case("gpt2-n-head", GPT2Config, {"n_embd": 64, "n_head": 5}, r"GPT2Config\.n_head: expected a divisor of n_embd=64")


@case("lora-last-n-too-many", "config", ConfigError, r"LoRAConfig\.last_n_blocks=5 but the model has only 2 blocks")
def _(ctx):
    return lambda: apply_lora(ctx.model(), LoRAConfig(last_n_blocks=5)), {}


@case("train-device", "config", ConfigError, r"TrainConfig\.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu0'")
def _(ctx):
    return lambda: Trainer(ctx.model(), TrainConfig(device="tpu0", progress=False)), {}


@case("merge-without-lora", "config", ConfigError, r"merge_lora: the model has no LoRA layers")
def _(ctx):
    return lambda: merge_lora(ctx.model()), {}


# --- adapters -------------------------------------------------------------------------------------------

@case("adapter-missing-folder", "adapter", CheckpointNotFoundError, r"adapter folder {path} does not exist")
def _(ctx):
    path = ctx.tmp / "no-adapter"
    return lambda: load_adapter(ctx.model(), path), {"path": path}


@case("adapter-no-config", "adapter", CheckpointNotFoundError, r"{path} not found: an adapter folder needs")
def _(ctx):
    folder = ctx.adapter()
    (folder / "adapter_config.json").unlink()
    return lambda: load_adapter(ctx.model(), folder), {"path": folder / "adapter_config.json"}


@case("adapter-config-not-json", "adapter", CheckpointError, r"{path} is not valid JSON")
def _(ctx):
    folder = ctx.adapter()
    (folder / "adapter_config.json").write_text("{'r': 8}")
    return lambda: load_adapter(ctx.model(), folder), {"path": folder / "adapter_config.json"}


@case("adapter-rank-type", "adapter", CheckpointError, r"{path}: field 'r' is 'eight', expected")
def _(ctx):
    folder = ctx.adapter()
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": "eight"}))
    return lambda: load_adapter(ctx.model(), folder), {"path": folder / "adapter_config.json"}


@case("adapter-unknown-target", "adapter", CheckpointError, r"{path}: target_modules entry 'q_proj' names no layer")
def _(ctx):
    folder = ctx.adapter()
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["q_proj"]}))
    return lambda: load_adapter(ctx.model(), folder), {"path": path}


@case("adapter-pickle-only", "adapter", UnsafeCheckpointError, r"adapter_model\.bin")
def _(ctx):
    folder = ctx.adapter()
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return lambda: load_adapter(ctx.model(), folder), {}


@case("adapter-truncated", "adapter", CheckpointError, r"{path} is not a readable safetensors file")
def _(ctx):
    folder = ctx.adapter()
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return lambda: load_adapter(ctx.model(), folder), {"path": path}


@case("adapter-other-base", "adapter", CheckpointError,
      r"adapter {path} does not fit the model:.*h\.0\.attn\.c_attn\.lora_A\.weight: checkpoint \(2, 64\), model \(2, 32\)")
def _(ctx):
    other = GPT2(GPT2Config(**{**TINY, "n_embd": 32}))
    folder = ctx.adapter()
    return lambda: load_adapter(other, folder), {"path": folder / "adapter_model.safetensors"}


@case("adapter-task-mismatch", "adapter", CheckpointError, r"task_type is 'CAUSAL_LM' but the model is")
def _(ctx):
    return lambda: load_adapter(cls_ckpt_model(ctx), ctx.adapter()), {}


# --- datasets -------------------------------------------------------------------------------------------

@case("data-missing-field", "data", DataError, r"{path} line 2: field 'label' is missing")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": "fine", "label": 1}, {"text": "no label here"})
    return lambda: load_split(path), {"path": path}


@case("data-missing-text", "data", DataError, r"{path} line 1: field 'text' is missing")
def _(ctx):
    path = ctx.rows("d.jsonl", {"label": 1, "sentence": "wrong column"})
    return lambda: load_split(path, kind="classification"), {"path": path}


@case("data-label-string", "data", DataError, r"{path} line 1: field 'label' \(column 'label'\) must be a class index")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": "a", "label": "positive"})
    return lambda: load_split(path), {"path": path}


@case("data-label-negative", "data", DataError, r"{path} line 2: field 'label' .* labels must be >= 0")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": "a", "label": 0}, {"text": "b", "label": -1})
    return lambda: load_split(path), {"path": path}


@case("data-label-out-of-set", "data", DataError, r"{path} line 1: field 'label' .* outside the label set")
def _(ctx):
    folder = ctx.tmp / "task"
    ctx.rows("task/train.jsonl", {"text": "a", "label": 3})
    ctx.file("task/label_names.json", '["neg", "pos"]')
    return lambda: load_split(folder, "train"), {"path": folder / "train.jsonl"}


@case("data-invalid-json", "data", DataError, r"{path} line 3: invalid JSON")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": "a", "label": 0}, {"text": "b", "label": 1}, '{"text": "c", "label": ')
    return lambda: load_split(path), {"path": path}


@case("data-not-object", "data", DataError, r"{path} line 1: expected a JSON object, got list")
def _(ctx):
    path = ctx.rows("d.jsonl", '["text", 0]')
    return lambda: load_split(path), {"path": path}


@case("data-non-utf8", "data", DataError, r"{path} line 2: not valid UTF-8 \(byte 0xff")
def _(ctx):
    path = ctx.file("d.jsonl", b'{"text": "a", "label": 0}\n{"text": "\xff\xfe", "label": 1}\n')
    return lambda: load_split(path), {"path": path}


@case("data-empty-split", "data", DataError, r"{path} is empty")
def _(ctx):
    folder = ctx.tmp / "task"
    ctx.rows("task/train.jsonl", {"text": "a", "label": 0})
    ctx.file("task/validation.jsonl", "\n\n")
    return lambda: load_split(folder, "validation"), {"path": folder / "validation.jsonl"}


@case("data-missing-split", "data", DataError, r"{path} has no test split")
def _(ctx):
    folder = ctx.tmp / "task"
    ctx.rows("task/train.jsonl", {"text": "a", "label": 0})
    return lambda: load_split(folder, "test"), {"path": folder}


@case("data-text-not-string", "data", DataError, r"{path} line 1: field 'text' \(column 'text'\) must be a string, got int")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": 42, "label": 0})
    return lambda: load_split(path), {"path": path}


@case("data-answers-not-list", "data", DataError, r"{path} line 1: field 'answers' .* non-empty list of strings")
def _(ctx):
    path = ctx.rows("d.jsonl", {"context": "c", "question": "q", "answers": [1, 2]})
    return lambda: load_split(path), {"path": path}


@case("data-csv-extra-values", "data", DataError, r"{path} line 3: more values than")
def _(ctx):
    path = ctx.file("d.csv", "text,label\ngood,1\nbad,0,extra\n")
    return lambda: load_split(path), {"path": path}


@case("data-unknown-suffix", "data", DataError, r"{path}: unknown file type '\.txt'")
def _(ctx):
    path = ctx.file("d.txt", "hello\n")
    return lambda: load_split(path), {"path": path}


@case("data-unknown-task", "data", ConfigError, r"unknown task 'sst3'")
def _(ctx):
    return lambda: load_split("sst3"), {}


def _cached_dataset(ctx: Ctx, card_text: str, files: dict[str, bytes]) -> Path:
    """A hub cache holding one snapshot of stanfordnlp/sst2 at main (read with HF_HUB_OFFLINE: no server)."""
    repo = ctx.tmp / "hf-cache" / "datasets--stanfordnlp--sst2"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    for name, content in {"README.md": card_text.encode(), **files}.items():
        path = repo / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return ctx.tmp / "hf-cache"


@case("data-card-matches-nothing", "data", DataError,
      r"dataset stanfordnlp/sst2 \(revision main, split 'train'\): the card's data_files for 'train' "
      r"\(data/training-\*\) match none of the files cached for that revision \(README\.md, "
      r"data/train-00000-of-00001\.parquet; HF_HUB_OFFLINE is set\)")
def _(ctx):
    from unittest import mock

    from huggingface_hub import constants

    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/training-*\n---\n"
    cache = _cached_dataset(ctx, card, {"data/train-00000-of-00001.parquet": b"PAR1"})

    def call():
        # offline, and pointed at a closed local port should anything still try the network
        with mock.patch.object(constants, "HF_HUB_OFFLINE", True), \
                mock.patch.object(constants, "ENDPOINT", "http://127.0.0.1:9"):
            load_split("sst2", "train", source="hub", cache_dir=cache)
    return call, {}


# --- experiment tracking and publishing -----------------------------------------------------------------

@case("report-to-unknown", "tracking", ConfigError,
      r"report_to: unknown backend 'mlflow'; choose from tensorboard, wandb or none")
def _(ctx):
    return lambda: make_trackers("tensorboard,mlflow", ctx.tmp / "run", "run"), {}


@case("report-to-not-installed", "tracking", ConfigError,
      r"report_to wandb: the wandb package is not installed; pip install 'gpt2lora\[wandb\]'")
def _(ctx):
    from unittest import mock

    def call():
        with mock.patch.dict(sys.modules, {"wandb": None}):
            make_trackers(["wandb"], ctx.tmp / "run", "run")
    return call, {}


@case("push-repo-id", "publish", ConfigError, r"repo_id 'gpt2-sst2-lora': expected owner/name")
def _(ctx):
    return lambda: push_run(ctx.tmp, "gpt2-sst2-lora"), {}


@case("push-no-adapter", "publish", CheckpointNotFoundError,
      r"run {run} has no adapter to push \({run}/adapter needs adapter_config\.json and adapter_model\.safetensors\)")
def _(ctx):
    run = ctx.tmp / "run"
    ctx.file("run/config.json", json.dumps({"task": "sst2", "method": "lora", "base_model": "gpt2"}))
    return lambda: push_run(run, "alice/gpt2-sst2-lora"), {"run": run}


# --- batches --------------------------------------------------------------------------------------------

@case("collate-empty", "batch", DataError, r"collate: got no examples")
def _(ctx):
    return lambda: collate([]), {}


@case("collate-no-input-ids", "batch", DataError, r"example 1: missing key 'input_ids'")
def _(ctx):
    return lambda: collate([{"input_ids": [1, 2], "label": 0}, {"ids": [3], "label": 1}]), {}


@case("collate-mixed-kinds", "batch", DataError, r"example 0 is classification but example 1 is lm")
def _(ctx):
    return lambda: collate([{"input_ids": [1], "label": 0}, {"input_ids": [2], "labels": [2]}]), {}


@case("collate-labels-length", "batch", DataError, r"example 0: labels must be a list as long as input_ids \(3\)")
def _(ctx):
    return lambda: collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}]), {}


@case("collate-negative-id", "batch", DataError, r"input_ids.*non-negative integer token ids")
def _(ctx):
    return lambda: collate([{"input_ids": [1, -4, 3], "label": 0}]), {}


@case("lm-example-empty", "batch", DataError, r"lm_example: prompt_ids and response_ids are both empty")
def _(ctx):
    return lambda: lm_example([], []), {}


@case("buckets-batch-size", "batch", ConfigError, r"BucketedBatches batch_size: expected a positive integer, got 0")
def _(ctx):
    return lambda: BucketedBatches([{"input_ids": [1], "label": 0}], batch_size=0), {}


@case("pack-classification", "batch", ConfigError,
      r"BucketedBatches packing=True: packing is for language-model examples \('labels'\)")
def _(ctx):
    return lambda: BucketedBatches([{"input_ids": [1, 2], "label": 0}], 1, packing=True, max_length=8), {}


@case("pack-example-too-long", "batch", DataError, r"example 1 has 9 tokens, more than max_length=8")
def _(ctx):
    rows = [lm_example([1], [2, 3]), lm_example([1, 2, 3], [4, 5, 6, 7, 8])]
    return lambda: BucketedBatches(rows, 2, packing=True, max_length=8), {}


@case("loss-chunk-size", "training", ConfigError, r"TrainConfig\.loss_chunk_size: expected a positive integer, got 0")
def _(ctx):
    return lambda: TrainConfig(loss_chunk_size=0), {}


@case("forward-loss-chunk-size", "model", ConfigError, r"loss_chunk_size: expected a positive integer .*got -1")
def _(ctx):
    model = ctx.model()
    ids = torch.ones(1, 4, dtype=torch.long)
    return lambda: model(ids, labels=ids, loss_chunk_size=-1), {}


# --- model, tokenizer, generation -----------------------------------------------------------------------

@case("forward-too-long", "model", ConfigError, r"n_positions=64")
def _(ctx):
    model = ctx.model()
    return lambda: model(torch.ones(1, 65, dtype=torch.long)), {}


@case("forward-out-of-vocab", "model", ConfigError, r"input_ids contains token id 512, outside the vocabulary")
def _(ctx):
    model = ctx.model()
    return lambda: model(torch.tensor([[1, 512]])), {}


@case("forward-float-ids", "model", ConfigError, r"input_ids must hold integer token ids, got dtype torch\.float32")
def _(ctx):
    model = ctx.model()
    return lambda: model(torch.ones(1, 3)), {}


@case("forward-mask-shape", "model", ConfigError, r"attention_mask has shape \(1, 2\), expected \(1, 3\)")
def _(ctx):
    model = ctx.model()
    return lambda: model(torch.tensor([[1, 2, 3]]), torch.ones(1, 2, dtype=torch.long)), {}


@case("classifier-too-long", "model", ConfigError, r"n_positions=64")
def _(ctx):
    model = cls_ckpt_model(ctx)
    return lambda: model(torch.ones(2, 80, dtype=torch.long)), {}


@case("tokenizer-no-vocab", "model", CheckpointNotFoundError, r"{path} not found: the GPT-2 tokenizer needs vocab\.json")
def _(ctx):
    folder = ctx.tmp / "tok"
    folder.mkdir()
    shutil.copy(ctx.vocab / "merges.txt", folder / "merges.txt")
    return lambda: load_tokenizer(folder), {"path": folder / "vocab.json"}


@case("tokenizer-vocab-not-json", "model", CheckpointError, r"{path} is not valid JSON")
def _(ctx):
    folder = ctx.tmp / "tok"
    folder.mkdir()
    shutil.copy(ctx.vocab / "merges.txt", folder / "merges.txt")
    (folder / "vocab.json").write_text("{broken")
    return lambda: load_tokenizer(folder), {"path": folder / "vocab.json"}


@case("generate-too-long", "model", ConfigError, r"max_new_tokens=60 exceeds the .*64")
def _(ctx):
    model = ctx.model()
    return lambda: generate(model, torch.ones(1, 10, dtype=torch.long), max_new_tokens=60), {}


@case("generate-top-p", "model", ConfigError, r"top_p: expected a number in \(0, 1\] or None, got 0")
def _(ctx):
    model = ctx.model()
    return lambda: generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, top_p=0), {}


# --- training -------------------------------------------------------------------------------------------

def quiet_trainer(model, **overrides) -> Trainer:
    return Trainer(model, TrainConfig(device="cpu", progress=False, **overrides))


@case("train-empty-data", "training", DataError, r"train_data: no batches to train on")
def _(ctx):
    return lambda: quiet_trainer(cls_ckpt_model(ctx)).fit([]), {}


@case("train-label-out-of-range", "training", DataError, r"batch 1 of epoch 0: labels contains class id 2, outside \[0, 1\]")
def _(ctx):
    good = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)
    bad = collate([{"input_ids": [1, 2], "label": 2}], pad_token_id=0)
    return lambda: quiet_trainer(cls_ckpt_model(ctx)).fit([good, bad]), {}


@case("train-merged-lora", "training", ConfigError, r"Trainer\.fit: the model's LoRA is merged \(transformer\.h\.0\.attn\.c_attn \.\.\.\); call unmerge_lora\(model\) first")
def _(ctx):
    model = apply_lora(ctx.model(), LoRAConfig(rank=2, targets=("attn.c_attn",)))
    merge_lora(model)
    ids = torch.tensor([[1, 2, 3]])
    return lambda: quiet_trainer(model).fit([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]), {}


@case("train-batch-missing-key", "training", DataError, r"batch 0 of epoch 0: missing key 'labels'")
def _(ctx):
    return lambda: quiet_trainer(ctx.model()).fit([{"input_ids": torch.ones(1, 3, dtype=torch.long)}]), {}


@case("train-lm-label-out-of-vocab", "training", DataError, r"batch 0 of epoch 0: labels contains 900, expected a token id in \[0, 512\)")
def _(ctx):
    ids = torch.tensor([[1, 2, 3]])
    return lambda: quiet_trainer(ctx.model()).fit([{"input_ids": ids, "labels": torch.tensor([[1, 900, 3]])}]), {}


@case("train-too-long", "training", DataError, r"batch 0 of epoch 0: rows of 70 tokens, longer than the model's n_positions=64")
def _(ctx):
    ids = torch.ones(2, 70, dtype=torch.long)
    return lambda: quiet_trainer(ctx.model()).fit([{"input_ids": ids, "labels": ids}]), {}


@case("train-nothing-trainable", "training", ConfigError, r"Trainer\.fit: the model has no trainable parameters")
def _(ctx):
    model = ctx.model().requires_grad_(False)
    return lambda: quiet_trainer(model).fit([{"input_ids": torch.ones(1, 2, dtype=torch.long)}]), {}


@case("resume-missing", "training", CheckpointNotFoundError, r"TrainConfig\.resume_from: {path} does not exist")
def _(ctx):
    path = ctx.tmp / "no-run"
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)
    return lambda: quiet_trainer(cls_ckpt_model(ctx), resume_from=str(path)).fit([batch]), {"path": path}


def broken_training_checkpoint(ctx: Ctx, damage: Callable[[Path], None]) -> tuple[Callable[[], Any], Path]:
    out = ctx.tmp / "run"
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)
    quiet_trainer(cls_ckpt_model(ctx), out_dir=str(out)).fit([batch])
    folder = out / "checkpoint-0000001"
    damage(folder)
    return (lambda: quiet_trainer(cls_ckpt_model(ctx), out_dir=str(out), resume_from=str(out)).fit([batch]),
            folder)


@case("resume-truncated-weights", "training", CheckpointError, r"checkpoint {path} is unreadable")
def _(ctx):
    def damage(folder):
        path = folder / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:64])
    call, folder = broken_training_checkpoint(ctx, damage)
    return call, {"path": folder}


@case("resume-state-not-json", "training", CheckpointError, r"checkpoint {path} is unreadable")
def _(ctx):
    call, folder = broken_training_checkpoint(ctx, lambda f: (f / "trainer_state.json").write_text("{"))
    return call, {"path": folder}


@case("resume-other-run", "training", ConfigError, r"TrainConfig\.resume_from: {path} has total_steps=1 but this run has 2")
def _(ctx):
    out = ctx.tmp / "run"
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)
    quiet_trainer(cls_ckpt_model(ctx), out_dir=str(out)).fit([batch])
    resume = quiet_trainer(cls_ckpt_model(ctx), resume_from=str(out))
    return lambda: resume.fit([batch, batch]), {"path": out / "checkpoint-0000001"}


@case("train-nan-loss", "training", TrainingError, r"non-finite loss \(nan\) at step 1")
def _(ctx):
    model = cls_ckpt_model(ctx)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    batch = collate([{"input_ids": [1, 2], "label": 0}], pad_token_id=0)
    return lambda: quiet_trainer(model).fit([batch]), {}


# --- the command line -----------------------------------------------------------------------------------

class CliExit(Exception):
    """A CLI call's exit status and stderr, raised by :func:`cli` so cases look like the others."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(stderr)
        self.code = code


def cli(capsys, *argv: str) -> None:
    capsys.readouterr()
    try:
        code = cli_main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    raise CliExit(code, err)


CLI_CASES = {
    "cli-unknown-option": (["train", "--smoke", "--bogus", "3"], 2, r"unrecognized arguments: --bogus 3"),
    "cli-unknown-command": (["fly"], 2, r"invalid choice: 'fly'"),
    "cli-rank-zero": (["train", "--rank", "0"], 2, r"argument --rank: expected a positive integer, got '0'"),
    "cli-bad-dropout": (["train", "--dropout", "1.5"], 2, r"argument --dropout: expected a number in \[0, 1\)"),
    "cli-bad-column": (["train", "--column", "text"], 2, r"argument --column: expected FIELD=COLUMN"),
    "cli-resume-auto-no-name": (["train", "--smoke", "--resume", "auto"], 1,
                                r"gpt2lora train: error: --resume auto needs --run-name"),
    "cli-resume-missing": (["train", "--smoke", "--resume", "{tmp}/gone"], 1,
                           r"gpt2lora train: error: --resume {tmp}/gone: {tmp}/gone/checkpoints not found"),
    "cli-run-missing": (["eval", "--run", "{tmp}/no-run"], 1, r"--run {tmp}/no-run: no config\.json"),
    "cli-inspect-rows": (["inspect", "{tmp}", "--rows", "2000"], 2, r"argument --rows: expected an integer in 1\.\.1024"),
    "cli-rank-huge": (["train", "--smoke", "--rank", "1000000000000", "--out", "{tmp}/o"], 1,
                      r"LoRAConfig\.rank: expected at most 65536, got 1000000000000"),
    "cli-run-name-escape": (["train", "--smoke", "--run-name", "../../escaped", "--out", "{tmp}/o"], 1,
                            r"--run-name\): expected a single folder name .*got '\.\./\.\./escaped'"),
    "cli-run-name-absolute": (["train", "--smoke", "--run-name", "{tmp}/abs", "--out", "{tmp}/o"], 1,
                              r"--run-name\): expected a single folder name"),
    "cli-run-name-too-long": (["train", "--smoke", "--run-name", "x" * 300, "--out", "{tmp}/o"], 1,
                              r"--run-name\): expected a name of at most 200 bytes, got one of 300"),
}

for _name, (_argv, _code, _pattern) in CLI_CASES.items():
    case(_name, "cli", CliExit, _pattern)(
        lambda ctx, argv=_argv: ((lambda capsys: cli(capsys, *[a.replace("{tmp}", str(ctx.tmp)) for a in argv])),
                                 {"tmp": ctx.tmp}))


# --- numbers and rows where they enter -----------------------------------------------------------------

def _edit_adapter(ctx: Ctx, **changes: Any) -> Path:
    folder = ctx.adapter()
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))  # inf is written as Infinity
    return folder


@case("adapter-alpha-inf", "adapter", CheckpointError,
      r"{path}: LoRAConfig\.alpha: expected a finite number in \(0, 1e\+06\], got inf")
def _(ctx):
    folder = _edit_adapter(ctx, lora_alpha=float("inf"))
    return lambda: load_adapter(ctx.model(), folder), {"path": folder / "adapter_config.json"}


@case("adapter-pissa-niter-huge", "adapter", CheckpointError,
      r"{path}: LoRAConfig\.init: expected pissa_niter_N with N at most 64, got 'pissa_niter_999999999'")
def _(ctx):
    folder = _edit_adapter(ctx, init_lora_weights="pissa_niter_999999999")
    return lambda: load_adapter(ctx.model(), folder), {"path": folder / "adapter_config.json"}


@case("data-label-huge", "data", DataError,
      r"{path} line 2: field 'label' \(column 'label'\) is 1000000000; class indices must be below 10,000")
def _(ctx):
    path = ctx.rows("d.jsonl", {"text": "a", "label": 0}, {"text": "b", "label": 1000000000})
    return lambda: load_split(path), {"path": path}


@case("data-label-stray", "data", DataError,
      r"{path} line 4: field 'label' is 5000, but the other rows use \[0, 1\]; .*classes are 0\.\.5000")
def _(ctx):
    path = ctx.rows("d.jsonl", *({"text": t, "label": v} for t, v in (("a", 0), ("b", 1), ("c", 0), ("d", 5000))))
    return lambda: load_split(path), {"path": path}


@case("data-empty-text", "data", DataError, r"{path}: record 5 of the train split has no tokens \(its text is ''\)")
def _(ctx):
    path = ctx.rows("d.jsonl", *({"text": t, "label": i % 2} for i, t in enumerate(["a", "b", "c", "d", ""])))
    return lambda: encode(load_split(path), load_tokenizer(ctx.vocab), 16), {"path": path}


@case("data-split-is-folder", "data", DataError, r"{path} is a folder; expected the train split's data file")
def _(ctx):
    (ctx.tmp / "task" / "train.jsonl").mkdir(parents=True)
    return lambda: load_split(ctx.tmp / "task", "train"), {"path": ctx.tmp / "task" / "train.jsonl"}


@case("data-csv-long-field", "data", DataError,
      r"{path} line 2: a value longer than 131,072 characters, .* save such rows as JSONL")
def _(ctx):
    path = ctx.file("d.csv", "text,label\n" + "x" * 140_000 + ",1\n")
    return lambda: load_split(path), {"path": path}


# --- runs, run folders and the commands around them -----------------------------------------------------

def runs_case(name: str, pattern: str, code: int = 1) -> Callable:
    """A command-line case built from a context: ``make(ctx)`` returns ``(argv, values)``."""
    def register(make: Callable) -> Callable:
        def build(ctx):
            argv, values = make(ctx)
            return (lambda capsys: cli(capsys, *map(str, argv))), values
        CLI_CODES[name] = code
        return case(name, "runs", CliExit, pattern)(build)
    return register


CLI_CODES: dict[str, int] = {}


def smoke_train(ctx: Ctx, *extra: Any) -> list[Any]:
    return ["train", "--task", "sms_spam", "--smoke", "--data-root", DATA, "--vocab", ctx.vocab, "--quiet",
            "--no-plots", "--train-rows", "40", "--eval-rows", "8", "--batch-size", "8", "--max-length", "32",
            "--epochs", "1", *extra]


@runs_case("train-out-is-file", r"train: error: --out: a part of {path} is a file")
def _(ctx):
    file = ctx.file("f", "x")
    return ["train", "--smoke", "--out", file, "--run-name", "r"], {"path": file / "r"}


@runs_case("sweep-out-is-file", r"sweep: error: --out: a part of {path} is a file")
def _(ctx):
    file = ctx.file("f", "x")
    return ["sweep", "--smoke", "--out", file, "--run-name", "s"], {"path": file / "s"}


@runs_case("reproduce-out-is-file", r"reproduce: error: --out: a part of {path} is a file")
def _(ctx):
    file = ctx.file("f", "x")
    return ["reproduce", "sst2_methods", "--smoke", "--data", DATA, "--out", file, "--run-name", "x"], \
        {"path": file / "x"}


@runs_case("quickstart-out-is-file", r"quickstart: error: --out: {path} \(or a folder above it\) is a file")
def _(ctx):
    file = ctx.file("f", "x")
    return ["quickstart", "--out", file], {"path": file}


@runs_case("quickstart-out-not-empty", r"quickstart: error: quickstart --out {path}: the folder is not empty "
           r"\(lora\)")
def _(ctx):
    ctx.file("q/lora/config.json", "{}")
    return ["quickstart", "--out", ctx.tmp / "q"], {"path": ctx.tmp / "q"}


@runs_case("eval-out-is-file", r"eval: error: --out: a part of {path} is a file")
def _(ctx):
    file, run = ctx.file("f", "x"), ctx.run()
    return ["eval", "--run", run, "--run-name", "e", "--out", file], {"path": file / "e"}


@runs_case("merge-into-run", r"merge: error: --out {path}: that is the run folder \({path}\)")
def _(ctx):
    run = ctx.run()
    return ["merge", "--run", run, "--out", run], {"path": run}


@runs_case("merge-into-base", r"merge: error: --out {path}: that is the run's base checkpoint")
def _(ctx):
    run = ctx.run()
    base = json.loads((run / "config.json").read_text())["base_model"]
    return ["merge", "--run", run, "--out", base], {"path": base}


@runs_case("merge-out-not-empty", r"merge: error: --out {path}: the folder is not empty")
def _(ctx):
    run = ctx.run()
    ctx.file("full/model.safetensors", "earlier")
    return ["merge", "--run", run, "--out", ctx.tmp / "full"], {"path": ctx.tmp / "full"}


@runs_case("merge-out-is-file", r"merge: error: --out {path}: a file is there")
def _(ctx):
    run, file = ctx.run(), ctx.file("f", "x")
    return ["merge", "--run", run, "--out", file], {"path": file}


def damaged_run(ctx: Ctx, change: Callable[[dict[str, Any]], Any]) -> tuple[Path, Path]:
    run = ctx.run()
    path = run / "config.json"
    config = json.loads(path.read_text())
    result = change(config)
    path.write_bytes(result if isinstance(result, bytes) else json.dumps(config if result is None else result)
                     .encode())
    return run, path


@runs_case("eval-config-no-base", r"eval: error: {path}: field 'base_model' is missing; expected the base")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: c.pop("base_model") and None)
    return ["eval", "--run", run], {"path": path}


@runs_case("eval-config-train-list", r"eval: error: {path}: field 'train' is \[\]; expected a table")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: c.update(train=[]))
    return ["eval", "--run", run], {"path": path}


@runs_case("eval-config-list", r"eval: error: {path}: expected a JSON object, got list")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: [c])
    return ["eval", "--run", run], {"path": path}


@runs_case("eval-config-not-utf8", r"eval: error: {path} is not UTF-8 text")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: b'{"base_model": "\xff"}')
    return ["eval", "--run", run], {"path": path}


@runs_case("eval-config-lora-null", r"eval: error: {path}: field 'lora' is None; expected the run's LoRA settings")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: c.update(lora=None))
    return ["eval", "--run", run], {"path": path}


@runs_case("eval-config-lora-alpha-inf", r"eval: error: {path}: field 'lora': LoRAConfig\.alpha: expected a finite")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: c["lora"].update(alpha=float("inf")))
    return ["eval", "--run", run], {"path": path}


@runs_case("merge-config-damaged", r"merge: error: {path}: field 'kind' is 'poem'; expected one of")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: c.update(kind="poem"))
    return ["merge", "--run", run, "--out", ctx.tmp / "merged"], {"path": path}


@runs_case("inspect-config-list", r"inspect: error: {path}: expected a run's config")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: [c])
    return ["inspect", run], {"path": path}


@runs_case("inspect-config-not-utf8", r"inspect: error: {path} is not UTF-8 text")
def _(ctx):
    run, path = damaged_run(ctx, lambda c: b'{"base_model": "\xff"}')
    return ["inspect", run], {"path": path}


@runs_case("resume-other-task", r"train: error: --resume {run}: the run in {run} trains with other settings; "
           r"resume it with the same ones \(task: run 'sms_spam', now 'rt_polarity'\)")
def _(ctx):
    run = ctx.run()
    argv = smoke_train(ctx, "--out", run.parent, "--resume", run)
    return [a if a != "sms_spam" else "rt_polarity" for a in argv], {"run": run}


@runs_case("resume-other-init", r"train: error: --resume auto: .*\(init: run 'kaiming', now 'pissa'\)")
def _(ctx):
    run = ctx.run()
    return smoke_train(ctx, "--out", run.parent, "--run-name", "r", "--resume", "auto", "--lora-init", "pissa"), {}


@runs_case("resume-other-run-name", r"train: error: --run-name other and --resume {run} name different run folders")
def _(ctx):
    run = ctx.run()
    return smoke_train(ctx, "--out", run.parent, "--run-name", "other", "--resume", run), {"run": run}


@runs_case("train-single-class", r"train: error: {path}: every training row has label 0; a classifier needs rows "
           r"of at least two classes")
def _(ctx):
    path = ctx.rows("one/train.jsonl", *({"text": f"row {i}", "label": 0} for i in range(8)))
    ctx.rows("one/validation.jsonl", {"text": "v", "label": 1}, {"text": "w", "label": 0})
    return ["train", "--data", ctx.tmp / "one", "--smoke", "--vocab", ctx.vocab, "--out", ctx.tmp / "o"], \
        {"path": path}


def _judge_argv(ctx: Ctx, prompt: str | bytes) -> list[Any]:
    file = ctx.file("prompt.txt", prompt)
    return ["judge", ctx.tmp, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--prompt-file", file]


JUDGE_FIELDS = "{instruction} {input} {reference} "


@runs_case("judge-prompt-attribute", r"judge: error: judge prompt: placeholder \{{instruction\.nope\}} is not one of")
def _(ctx):
    return _judge_argv(ctx, JUDGE_FIELDS + "{response} {instruction.nope}"), {}


@runs_case("judge-prompt-width", r"judge: error: judge prompt: placeholder \{{response:>300000000\}} is not one of")
def _(ctx):
    return _judge_argv(ctx, JUDGE_FIELDS + "{response:>300000000}"), {}


@runs_case("judge-prompt-not-utf8", r"judge: error: --prompt-file {path}: not UTF-8 text")
def _(ctx):
    return _judge_argv(ctx, b"\xff\xfe {instruction}"), {"path": ctx.tmp / "prompt.txt"}


def _recipe(ctx: Ctx, text: str) -> Path:
    return ctx.file("r.toml", 'title = "t"\n[defaults]\ntask = "sms_spam"\n' + text)


@runs_case("recipe-duplicate-seeds", r"train: error: {path}: rows\[0\] \(a\)\.seeds: expected different seeds")
def _(ctx):
    path = _recipe(ctx, '[[rows]]\nname = "a"\nseeds = [0, 0]\n')
    return ["train", "--config", path], {"path": path}


@runs_case("recipe-row-resume", r"train: error: {path}: rows\[0\] \(a\)\.resume: expected no resume in a recipe")
def _(ctx):
    path = _recipe(ctx, '[[rows]]\nname = "a"\nresume = "auto"\n')
    return ["train", "--config", path], {"path": path}


@runs_case("recipe-row-out", r"train: error: {path}: rows\[0\] \(a\)\.out: expected no out in a recipe")
def _(ctx):
    path = _recipe(ctx, '[[rows]]\nname = "a"\nout = "/tmp"\n')
    return ["train", "--config", path], {"path": path}


@runs_case("recipe-name-escape", r"train: error: {path}: name: expected a single folder name .*'\.\./\.\./x'")
def _(ctx):
    path = ctx.file("r.toml", 'title = "t"\nname = "../../x"\n[defaults]\ntask = "sms_spam"\n[[rows]]\nname = "a"\n')
    return ["train", "--config", path], {"path": path}


# --- the battery ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, alpha=4), seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("battery") / "adapter")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, gpt2_vocab) -> Callable[[], Path]:
    """Trains one small sms_spam smoke run into a cached folder the first time a case asks for it."""
    cache: dict[str, Path] = {}

    def make() -> Path:
        if "out" not in cache:
            out = tmp_path_factory.mktemp("smoke-run") / "runs"
            ctx = Ctx(out, Path(), Path(), gpt2_vocab)
            assert cli_main([str(a) for a in smoke_train(ctx, "--out", out, "--run-name", "r")]) == 0
            cache["out"] = out
        return cache["out"]
    return make


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_checkpoint, adapter_dir, gpt2_vocab, smoke_runs, capsys):
    spec = CASES[name]
    ctx = Ctx(tmp_path, tiny_checkpoint, adapter_dir, gpt2_vocab, smoke_runs)
    call, values = spec.make(ctx)
    pattern = spec.pattern.format(**{k: re.escape(str(v)) for k, v in values.items()})
    with pytest.raises(spec.error) as info:
        if spec.family in ("cli", "runs"):
            call(capsys)
        else:
            call()
    message = str(info.value)
    if spec.family in ("cli", "runs"):
        assert info.value.code == (CLI_CASES[name][1] if name in CLI_CASES else CLI_CODES[name]), message
        assert "Traceback" not in message
    else:
        assert isinstance(info.value, GPT2LoRAError)
        assert isinstance(info.value, (ValueError, FileNotFoundError, RuntimeError))
    assert re.search(pattern, message, re.DOTALL), f"{name}: {message!r} does not match {pattern!r}"


def test_battery_inventory(capsys):
    families = Counter(c.family for c in CASES.values())
    with capsys.disabled():
        print(f"\nbad-input battery: {len(CASES)} cases ("
              + ", ".join(f"{family} {n}" for family, n in sorted(families.items())) + ")")
    assert len(CASES) >= 40
    assert set(families) == {"checkpoint", "config", "adapter", "data", "batch", "model", "training", "cli",
                             "tracking", "publish", "runs"}
