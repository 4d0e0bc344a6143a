"""What the ``eval``, ``generate`` and ``merge`` commands do with a base model or a run folder.

Each takes typed values (a :class:`~gpt2lora.app.runconfig.RunConfig` for the model and data settings);
training itself is :func:`gpt2lora.app.run.run`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tasks import alpaca_prompt
from ..devices import PRECISION_DTYPES, resolve_device, resolve_precision
from ..errors import ConfigError
from ..model.gpt2 import GPT2
from ..model.hub import save_pretrained
from ..model.tokenizer import load_tokenizer
from ..peft.lora import count_parameters, lora_modules, merge_lora
from ..training.evaluation import DETAIL_KEYS, generate_texts, task_metrics
from ..training.precision import hold_frozen_weights
from . import report
from .folders import make_folder
from .run import SMOKE, base_checkpoint, load_base, load_data, load_run_model, read_run, row_limits, run_base
from .runconfig import RunConfig

__all__ = ["evaluate_command", "generate_command", "load_run_model", "merge_command", "merged_run_model"]


def _with_run_data(config: RunConfig, run: dict[str, Any], given: set[str]) -> RunConfig:
    """The data settings a command left out, taken from the run's own config."""
    changes: dict[str, Any] = {}
    if "task" not in given and "data" not in given:
        changes["data"] = run.get("data")
        changes["task"] = None if run.get("data") else run["task"]
    for key, field in (("data_root", "data_root"), ("data_source", "source"), ("smoke", "smoke")):
        if key not in given and run.get(field) is not None:
            changes[field] = run[field]
    if "columns" not in given:
        changes["columns"] = tuple(run.get("columns", {}).items())
    if "max_length" not in given:
        changes["max_length"] = run["max_length"]
    return dataclasses.replace(config, **changes)


def hold_for_inference(model: nn.Module, precision: str) -> nn.Module:
    """With a half ``precision``, hold every matrix of the base in that dtype, as a Trainer holds its frozen base.

    Nothing trains here, so all the base's matrices are frozen; LoRA factors are not layers' weights and stay
    fp32. Autocast rounds the same weights the same way, so losses move only within bf16's rounding (LoRA's
    product runs fused in bf16 on a bf16 base; a tied head's token embeddings are read rounded), as in a bf16
    Trainer's own evaluations; decoding reads half the bytes per token.
    """
    if precision != "fp32":
        hold_frozen_weights(model.requires_grad_(False), PRECISION_DTYPES[precision])
    return model


def evaluate_command(config: RunConfig, run_dir: str | os.PathLike | None = None, split: str | None = None,
                     given: set[str] | None = None) -> dict[str, Any]:
    """Evaluate a run folder, or the base model (the "foundation" row) with an untrained head.

    The table is printed; with a run folder (or ``run_name``) the row is written to
    ``eval-<task>-<split>.json`` there. ``given``: the settings the user set (the rest come from the run).
    With a half precision the base is held in it (:func:`hold_for_inference`), as a bf16 Trainer evaluates.
    """
    device = resolve_device(config.train.device, "--device")
    precision = resolve_precision(config.train.precision, device, "--precision")  # refused before any loading
    if run_dir is not None:
        model, saved = load_run_model(run_dir)
        config = _with_run_data(config, saved, given or set())
        checkpoint, label = saved["base_model"], Path(run_dir).name
    else:
        checkpoint, label, model = base_checkpoint(config), "Foundation (no fine-tuning)", None
    limits = row_limits(config, None)
    eval_set = load_data(config, split or config.eval_split, limits["eval"])
    if model is None:
        model = load_base(checkpoint, eval_set.kind, eval_set.num_labels, seed=config.train.seed)
    limits = row_limits(config, eval_set.kind)
    tok = load_tokenizer(checkpoint)
    max_length = min(limits["max_length"], model.config.n_positions)
    hold_for_inference(model.to(device), precision)
    metrics = task_metrics(model, tok, eval_set, max_length, config.eval_batch_size or 32, device,
                           config.train.precision, gen_rows=limits["gen"], max_new_tokens=limits["new_tokens"])
    row = {"method": label, "task": eval_set.name, "split": eval_set.split,
           **{k: v for k, v in metrics.items() if k not in DETAIL_KEYS},
           "total_params": count_parameters(model).total}
    print(report.markdown_table([row]))
    if config.run_name or run_dir:
        folder = Path(run_dir) if run_dir and not config.run_name else Path(config.out) / config.run_name
        make_folder(folder, "--out")
        path = folder / f"eval-{eval_set.name}-{eval_set.split}.json"
        report.write_json({"result": row, "samples": metrics.get("samples", [])}, path)
        row["eval_file"] = str(path)
    return row


def generate_command(config: RunConfig, prompts: list[str], run_dir: str | os.PathLike | None = None,
                     alpaca: bool = False, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None) -> list[str]:
    """Continue ``prompts`` (a batch) with a base model or a run's language model; prints and returns them.

    With ``--precision bf16`` (or fp16 on CUDA) the base's matrices are held in that dtype
    (:func:`hold_for_inference`): half the bytes to read per token; on a CPU without bf16 units too, where
    fbgemm's fp16 product computes them (:func:`gpt2lora.devices.resolve_precision`).
    """
    device = resolve_device(config.train.device, "--device")
    precision = resolve_precision(config.train.precision, device, "--precision", inference=True)
    if run_dir is not None:
        model, saved = load_run_model(run_dir)
        checkpoint = saved["base_model"]
    else:
        checkpoint = base_checkpoint(config)
        model = GPT2.from_pretrained(checkpoint, revision=config.model_revision)
    if not isinstance(model, GPT2):
        raise ConfigError(f"--run {run_dir} is a classification run; generate needs a language-model run "
                          "(an instruction or QA task) or a base model")
    tok = load_tokenizer(checkpoint)
    texts = [alpaca_prompt(p) if alpaca else p for p in prompts]
    new_tokens = config.max_new_tokens or (SMOKE["lm"]["new_tokens"] if config.smoke else 64)
    hold_for_inference(model.to(device), precision)
    outputs = generate_texts(model, tok, [tok.encode_ordinary(t) for t in texts], new_tokens, device,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=config.train.seed)
    for prompt, output in zip(prompts, outputs):
        print(f"### prompt\n{prompt}\n### generated\n{output}\n")
    return outputs


def merged_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], float]:
    """A run's model with its LoRA merged into the base weights, checked against the unmerged outputs on a
    fixed probe: ``(model, run config, max |merged - unmerged|)``; a larger gap than 1e-4 is an error."""
    model, config = load_run_model(run_dir)
    model.eval()
    probe = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe)
        if any(True for _ in lora_modules(model)):
            merge_lora(model)
        after = model(probe)
    gap = float((before - after).abs().max())
    if not torch.allclose(before, after, atol=1e-4, rtol=1e-4):
        raise ConfigError(f"merging the adapter of {run_dir} changed the outputs by {gap:.2e}; nothing was written")
    return model, config, gap


def check_merge_target(run_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse an ``--out`` that would overwrite something: the run folder itself, the base checkpoint the run
    depends on, a folder holding them, a file, or any folder that is not empty."""
    target = Path(out).resolve()
    run = Path(run_dir).resolve()
    saved = read_run(run_dir)
    base = Path(run_base(run_dir, saved))
    protected = [("the run folder", run)] + ([("the run's base checkpoint", base.resolve())] if base.exists() else [])
    for what, path in protected:
        if target == path or target in path.parents:
            raise ConfigError(f"--out {out}: that is {what} ({path}) or a folder holding it; merging there would "
                              "overwrite what the run needs; choose a new folder")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out}: a file is there; expected a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError(f"--out {out}: the folder is not empty; choose a new or empty folder")


def merge_command(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Merge a run's LoRA into its base weights, check merged == unmerged, write an HF checkpoint into a new
    or empty folder (never the run's own folder or its base checkpoint)."""
    check_merge_target(run_dir, out)
    model, config, gap = merged_run_model(run_dir)
    path = save_pretrained(model, out)
    print(f"merged {config['method']} run {run_dir} into {path} (max |merged - unmerged| = {gap:.2e})")
    return path
