"""One run, start to finish: :func:`run` takes a :class:`~gpt2lora.app.runconfig.RunConfig` and writes one run folder.

``gpt2lora train``, ``sweep``, ``reproduce``, ``train --config``, the quickstart and anyone calling the
library go through :func:`run`; it alone writes run folders. A run folder holds:

* ``config.json`` — everything needed to rebuild the model (see :func:`load_run_model`) and, under
  ``settings``, the run's settings as a recipe row holds them;
* ``history.jsonl`` — one line per optimizer step and per evaluation, appended while training;
* ``adapter/`` — the trained tensors (peft layout for LoRA), ``checkpoints/`` — resumable states;
* ``metrics.json``, ``summary.md`` and, with matplotlib, ``loss.png`` and ``lr.png``;
* instruction runs: ``responses.jsonl`` (what ``gpt2lora judge`` scores) and ``generations.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import GPT2Config, LoRAConfig, is_residual_init
from ..constants import HISTORY_FILE, RESPONSES_FILE
from ..data.batching import BucketedBatches
from ..data.tasks import CLASSIFICATION_KINDS, TASKS, Dataset, Tokenizer, data_root, encode, load_split
from ..devices import describe_precision, resolve_device, set_threads
from ..errors import CheckpointNotFoundError, ConfigError, DataError
from ..model.classifier import GPT2ForSequenceClassification
from ..model.gpt2 import GPT2
from ..model.hub import save_pretrained
from ..model.tokenizer import load_tokenizer
from ..peft.files import load_adapter, save_adapter
from ..peft.lora import ParameterCount, count_parameters
from ..peft.methods import prepare_model
from ..peft.prompt import PromptConfig
from ..training import distributed
from ..training.evaluation import DETAIL_KEYS, instruction_samples, task_metrics
from ..training.history import History
from ..training.tracking import make_trackers
from ..training.trainer import Trainer
from . import report
from .runconfig import EVAL_ONLY, RunConfig, to_settings

#: Shape of the smoke model: tiny, but with the real 50,257-token vocabulary.
SMOKE_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 512}
#: Rows (train / eval / answered by generation), new tokens and max_length of smoke runs, by kind.
SMOKE = {"classification": {"train": 300, "eval": 100, "gen": 8, "new_tokens": 8, "max_length": 128},
         "lm": {"train": 64, "eval": 16, "gen": 4, "new_tokens": 8, "max_length": 64}}
VOCAB_ENV = "GPT2LORA_VOCAB"
#: Sub-folder of a run folder where training checkpoints go (what ``resume`` continues from).
CHECKPOINTS_DIR = "checkpoints"
#: What a killed or interrupted run prints: how to continue it.
RESUME_HINT = "continue with the same command plus --resume auto (with --run-name) or --resume RUN_FOLDER"


# ---------------------------------------------------------------------------------------------- model

def smoke_checkpoint(out: str | os.PathLike, vocab: str | os.PathLike | None, seed: int = 0,
                     root: str | os.PathLike | None = None) -> Path:
    """A tiny random GPT-2 checkpoint with the real GPT-2 tokenizer files, made once under ``out``."""
    folder = Path(out) / f".smoke-base-{seed}"
    if (folder / "model.safetensors").is_file():
        return folder
    if vocab is not None and not (Path(vocab) / "vocab.json").is_file():
        raise ConfigError(f"--vocab {vocab}: no vocab.json there; --smoke needs the GPT-2 vocabulary "
                          "(a folder with vocab.json and merges.txt)")
    candidates = [vocab, os.environ.get(VOCAB_ENV)]
    if data_root(root) is not None:
        candidates.append(data_root(root).parent / "gpt2-tokenizer")
    found = next((Path(c) for c in candidates if c and (Path(c) / "vocab.json").is_file()), None)
    if found is None:
        raise ConfigError("--smoke needs the GPT-2 vocabulary: pass --vocab DIR (a folder with vocab.json and "
                          f"merges.txt) or set ${VOCAB_ENV}")
    model = GPT2.from_config(GPT2Config(**SMOKE_SHAPE), seed=seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_pretrained(model, tmp)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(found / name, tmp / name)
    tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def base_checkpoint(config: RunConfig) -> str:
    """The checkpoint a run starts from: ``model``, or the tiny smoke model."""
    if config.smoke:
        return str(smoke_checkpoint(config.out, config.vocab, 0, config.data_root))
    return config.model


def load_base(checkpoint: str, kind: str, num_labels: int | None, seed: int = 0,
              revision: str | None = None) -> nn.Module:
    """GPT2ForSequenceClassification (fresh seeded head) for classification kinds, else GPT2."""
    if kind in CLASSIFICATION_KINDS:
        return GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=num_labels, seed=seed,
                                                             revision=revision)
    return GPT2.from_pretrained(checkpoint, revision=revision)


def method_label(method: str, lora: LoRAConfig | None, last_n: int | None) -> str:
    """How tables name a method: ``LoRA (r=8, α=8)``, ``Full fine-tuning``, ``Last 2 blocks`` ..."""
    if method == "lora" and lora is not None:
        where = f", last {lora.last_n_blocks}" if lora.last_n_blocks else ""
        return f"LoRA (r={lora.rank}, α={lora.alpha:g}{where})"
    if method == "last_n_full":
        return f"Last {last_n} blocks"
    return {"full": "Full fine-tuning", "head": "Head only", "embeddings": "Embeddings",
            "prompt": "Prompt tuning", EVAL_ONLY: "Foundation (no fine-tuning)"}.get(method, method)


# ---------------------------------------------------------------------------------------------- data

def row_limits(config: RunConfig, kind: str | None) -> dict[str, Any]:
    """Row counts and lengths of a run: its settings, or the smoke defaults of the task kind."""
    smoke = SMOKE["classification" if kind in (None, *CLASSIFICATION_KINDS) else "lm"] if config.smoke else {}
    return {"train": config.train_rows or smoke.get("train"), "eval": config.eval_rows or smoke.get("eval"),
            "gen": config.gen_rows or smoke.get("gen", 200),
            "new_tokens": config.max_new_tokens or smoke.get("new_tokens"),
            "max_length": min(config.max_length, smoke.get("max_length", config.max_length))}


def load_data(config: RunConfig, split: str, limit: int | None, announce: bool = True) -> Dataset:
    """One split of the run's task or data; a missing validation split falls back to test (said once)."""
    task = config.task_or_data
    path = config.data if config.task is not None else None
    kwargs = {"path": path, "root": config.data_root, "source": config.source, "columns": dict(config.columns),
              "limit": limit, "revision": config.revision}
    try:
        return load_split(task, split, **kwargs)
    except DataError as err:
        if split != "validation" or "no validation split" not in str(err) and "no 'validation' split" not in str(err):
            raise
    # Some tasks (imdb, enron_spam) publish no validation split: evaluate on test, and say so.
    if announce:
        print(f"note: {config.label} has no validation split; evaluating on test")
    return load_split(task, "test", **kwargs)


def batches(examples: list[dict[str, Any]], batch_size: int, shuffle: bool, seed: int, pad_token_id: int,
            pack_to: int | None = None) -> BucketedBatches:
    """Length-bucketed batches; with ``pack_to``, language-model examples packed into rows of that length."""
    return BucketedBatches(examples, batch_size, shuffle=shuffle, seed=seed, pad_token_id=pad_token_id,
                           packing=pack_to is not None, max_length=pack_to)


# ---------------------------------------------------------------------------------------------- folders

def resume_target(config: RunConfig) -> tuple[Path, Path] | None:
    """``(run folder, checkpoint or checkpoints folder)`` of ``resume = auto | PATH``; None without it.

    ``auto`` continues ``out/run_name`` from its latest checkpoint; PATH is a run folder (its latest
    checkpoint) or one ``RUN/checkpoints/checkpoint-N`` folder.
    """
    resume = config.resume
    if resume is None:
        return None
    if resume == "auto":
        if not config.run_name:
            raise ConfigError("--resume auto needs --run-name: the run folder (under --out) to continue")
        folder = Path(config.out) / config.run_name
        checkpoint = folder / CHECKPOINTS_DIR
    else:
        checkpoint = Path(resume)
        if checkpoint.parent.name == CHECKPOINTS_DIR:
            folder = checkpoint.parent.parent
        else:
            folder, checkpoint = checkpoint, checkpoint / CHECKPOINTS_DIR
    if not checkpoint.is_dir():
        raise CheckpointNotFoundError(f"--resume {resume}: {checkpoint} not found; expected a run folder written "
                                      f"by 'gpt2lora train' (with {CHECKPOINTS_DIR}/) or one of its checkpoints")
    return folder, checkpoint


def new_run_folder(out: str | os.PathLike, name: str | None, default: str, device: str = "auto") -> Path:
    """``out/name`` (default ``out/<default>-<time>``), which must be new or empty; one folder for all ranks."""
    name = name or f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
    distributed.setup(resolve_device(device, "--device").type)
    name = distributed.broadcast_text(name)  # under torchrun: rank 0's time stamp, one folder for all ranks
    folder = Path(out) / name
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"run folder {folder} exists and is not empty; choose another --run-name or --out")
    if distributed.is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_responses(path: Path, responses: list[dict[str, str]]) -> None:
    """One JSON line per generated instruction response: instruction, input, reference, response."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in responses)


def write_generations(path: Path, generations: list[dict[str, str]]) -> None:
    parts = ["# Generations before and after fine-tuning (greedy)\n"]
    for i, g in enumerate(generations, start=1):
        prompt = g["instruction"] + (f"\n\nInput: {g['input']}" if g["input"] else "")
        parts.append(f"## Prompt {i}\n\n{prompt}\n\n**Before:**\n\n{g['before'] or '(empty)'}\n\n"
                     f"**After:**\n\n{g['after'] or '(empty)'}\n\n**Reference:**\n\n{g['reference']}\n")
    path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class _Parts:
    """What a run has built before it trains."""

    config: RunConfig
    kind: str
    train_set: Dataset | None
    eval_set: Dataset
    num_labels: int | None
    checkpoint: str
    tok: Tokenizer
    model: nn.Module
    max_length: int
    limits: dict[str, Any]
    device: torch.device


def _prepare(config: RunConfig) -> _Parts:
    preset_kind = TASKS[config.task].kind if config.data is None and config.task in TASKS else None
    limits = row_limits(config, preset_kind)
    train_set = None
    if config.method != EVAL_ONLY:
        train_set = load_data(config, "train", limits["train"])
        if preset_kind is None and train_set.kind not in CLASSIFICATION_KINDS:  # a path: smoke limits by kind
            limits = row_limits(config, train_set.kind)
            train_set.records = train_set.records[:limits["train"]] if limits["train"] else train_set.records
    eval_set = load_data(config, config.eval_split, limits["eval"])
    if preset_kind is None and train_set is None and eval_set.kind not in CLASSIFICATION_KINDS:
        limits = row_limits(config, eval_set.kind)
        eval_set.records = eval_set.records[:limits["eval"]] if limits["eval"] else eval_set.records
    kind = (train_set or eval_set).kind
    num_labels = (train_set or eval_set).num_labels
    if num_labels is not None and eval_set.num_labels and eval_set.num_labels > num_labels:
        num_labels = eval_set.num_labels
    with distributed.main_first():  # the smoke checkpoint is written once, by rank 0
        checkpoint = base_checkpoint(config)
    tok = load_tokenizer(checkpoint, revision=config.model_revision)
    model = load_base(checkpoint, kind, num_labels, seed=config.train.seed, revision=config.model_revision)
    max_length = min(limits["max_length"], model.config.n_positions)
    device = resolve_device(config.train.device, "--device")
    return _Parts(config, kind, train_set, eval_set, num_labels, checkpoint, tok, model, max_length, limits, device)


def _metrics(parts: _Parts) -> dict[str, Any]:
    config = parts.config
    return task_metrics(parts.model, parts.tok, parts.eval_set, parts.max_length,
                        config.eval_batch_size or config.train.batch_size, parts.device, config.train.precision,
                        gen_rows=parts.limits["gen"], max_new_tokens=parts.limits["new_tokens"])


def _run_config_json(parts: _Parts, train: Any) -> dict[str, Any]:
    from .. import __version__

    config = parts.config
    lora, prompt = config.lora_config, config.prompt_config
    return {
        "gpt2lora_version": __version__, "task": config.task_or_data, "data": config.data,
        "data_root": config.data_root, "source": config.source, "columns": dict(config.columns), "kind": parts.kind,
        "num_labels": parts.num_labels, "label_names": list((parts.train_set or parts.eval_set).label_names),
        "base_model": parts.checkpoint, "model_revision": config.model_revision, "smoke": config.smoke,
        "method": config.method, "lora": dataclasses.asdict(lora) if lora else None,
        "last_n": config.last_n_blocks if config.method == "last_n_full" else None,
        "prompt": dataclasses.asdict(prompt) if prompt else None, "max_length": parts.max_length,
        "train": dataclasses.asdict(train), "train_rows": len(parts.train_set) if parts.train_set else 0,
        "eval_split": parts.eval_set.split, "eval_rows": len(parts.eval_set), "settings": to_settings(config),
    }


def run(config: RunConfig, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or, with method ``none``, only evaluate) one configuration and write its run folder.

    ``folder``: where (default ``config.out / config.run_name``, a new time-stamped name without one, or
    the resumed run's folder). Returns the result row: metrics, trainable parameters, time, throughput,
    per-run memory and ``run_dir``. Under torchrun every rank trains and rank 0 writes the folder.
    """
    if not isinstance(config, RunConfig):
        raise ConfigError(f"run: expected a RunConfig, got {type(config).__name__}")
    config = config.resolved()
    set_threads(config.threads)
    distributed.setup(resolve_device(config.train.device, "--device").type)  # joins torchrun's group, if any
    torch.manual_seed(config.train.seed)
    resume = resume_target(config) if folder is None else None  # checked first: a bad path fails before downloads
    parts = _prepare(config)
    if config.pack and parts.kind in CLASSIFICATION_KINDS:
        raise ConfigError(f"--pack (pack = true): packing is for language-model tasks (instruction, qa); "
                          f"{config.label} is a {parts.kind} task")
    lora = config.lora_config
    label = method_label(config.method, lora, config.last_n_blocks)
    if folder is not None:
        folder = Path(folder)
        if distributed.is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
    elif resume is not None:
        folder = resume[0]
    else:
        folder = new_run_folder(config.out, config.run_name, f"{config.label}-{config.method}", config.train.device)
    if config.method == EVAL_ONLY:
        return _write_eval_only(parts, folder, label)

    model, device = parts.model, parts.device
    samples_before = None
    if parts.kind == "instruction":
        model.to(device)
        samples_before = instruction_samples(model, parts.tok, parts.eval_set.records[:3],
                                             parts.limits["new_tokens"] or 128, parts.max_length, device)
    last_n = config.last_n_blocks if config.method == "last_n_full" else None
    prepare_model(model, config.method, lora=lora, last_n=last_n, seed=config.train.seed,
                  prompt=config.prompt_config)
    params = count_parameters(model)
    # checkpoints go into the run folder (each epoch end, and every save_every steps) so a killed run resumes
    train = dataclasses.replace(config.train, out_dir=str(folder / CHECKPOINTS_DIR),
                                history_path=str(folder / HISTORY_FILE), progress=not config.quiet,
                                resume_from=str(resume[1]) if resume else None)
    tok, max_length = parts.tok, parts.max_length
    train_data = batches(encode(parts.train_set, tok, max_length), train.batch_size, True, train.seed, tok.eot_token,
                         pack_to=max_length if config.pack else None)
    eval_data = batches(encode(parts.eval_set, tok, max_length), config.eval_batch_size or train.batch_size, False,
                        0, tok.eot_token)
    with make_trackers(config.report_to, folder, folder.name, hparams=to_settings(config)) as tracker:
        history = Trainer(model, train, tracker=tracker or None).fit(train_data, eval_data)
    metrics = _metrics(parts)
    row = _result_row(parts, label, metrics, params, history, folder)
    row["padding_share"] = train_data.padding_stats().padding_share  # of the training batches' token slots
    row["train_batches"] = len(train_data)  # per epoch; packing puts several examples in a row
    if not distributed.is_main_process():
        return row  # under torchrun only rank 0 writes the run folder
    save_adapter(model, folder / "adapter")
    report.write_json(_run_config_json(parts, train), folder / "config.json")
    extra: dict[str, Any] = {}
    if "samples" in metrics:
        extra["samples"] = metrics["samples"]
    if "responses" in metrics:
        write_responses(folder / RESPONSES_FILE, metrics["responses"])
    if samples_before is not None:
        after = instruction_samples(model, tok, parts.eval_set.records[:3], parts.limits["new_tokens"] or 128,
                                    max_length, device)
        extra["generations"] = [{**b, "after": a["generated"], "before": b["generated"]}
                                for b, a in zip(samples_before, after)]
        write_generations(folder / "generations.md", extra["generations"])
    report.write_json({"result": row, **extra}, folder / "metrics.json")
    plots = [p for p in (report.plot_losses(history.steps, history.evals, folder / "loss.png", f"{parts.eval_set.name}: "
                                            f"{label}"),
                         report.plot_lr(history.steps, folder / "lr.png")) if p is not None] if config.plots else []
    notes = _notes(parts, params, history) + [(f"padding: {100 * row['padding_share']:.1f}% of the training batches' "
                                              f"token slots{' (examples packed into rows)' if config.pack else ''}")]
    report.write_summary(folder, [row], f"{parts.eval_set.name}: {label}", notes, plots=plots)
    return row


def _result_row(parts: _Parts, label: str, metrics: dict[str, Any], params: ParameterCount, history: History,
                folder: Path) -> dict[str, Any]:
    config = parts.config
    lora = config.lora_config
    return {
        "method": label, "task": parts.eval_set.name, "kind": parts.kind, "data": config.data,
        **{k: v for k, v in metrics.items() if k not in DETAIL_KEYS},
        "trainable_params": params.trainable, "total_params": params.total, "trainable_pct": params.share,
        "train_time_s": history.runtime_s, "train_rows": len(parts.train_set), "optimizer_steps": len(history.steps),
        "samples_per_s": history.samples_per_s, "steps_per_s": history.steps_per_s,
        "tokens_per_s": history.tokens_per_s, "peak_memory_mb": history.peak_memory_mb,
        "memory_added_mb": history.memory_added_mb, "peak_reserved_mb": history.peak_reserved_mb,
        "memory_method": history.memory_method,
        "lr": config.train.lr, "rank": lora.rank if lora else None, "alpha": lora.alpha if lora else None,
        "last_n_blocks": config.last_n_blocks, "run_dir": str(folder),
    }


def _notes(parts: _Parts, params: ParameterCount, history: History | None) -> list[str]:
    where = f"data {parts.config.data}" if parts.config.data else f"task {parts.eval_set.name}"
    rows = f"{len(parts.train_set)} train rows, " if parts.train_set is not None else ""
    notes = [(f"{where} ({parts.kind}), {rows}evaluated on {len(parts.eval_set)} {parts.eval_set.split} rows "
             f"(read from {parts.eval_set.source}); base model {parts.checkpoint}; max_length {parts.max_length}"),
             f"{params}", describe_precision(parts.config.train.precision, parts.device)]
    if history is not None:
        notes.append(memory_note(history))
    return notes


def memory_note(history: History) -> str:
    """What the memory figures of a fit mean, for a summary."""
    if history.memory_method == "cuda":
        return (f"memory: peak {history.peak_memory_mb:.0f} MB CUDA allocated during this fit (tensors: weights, "
                f"activations, gradients, optimizer state; what the reports call 'GPU memory allocated'), "
                f"{history.memory_added_mb:.0f} MB added by training, {history.peak_reserved_mb or 0:.0f} MB "
                "reserved by the allocator")
    scope = "since the fit began" if history.memory_method in ("vmhwm", "sampled") else "of the process's lifetime"
    return (f"memory: peak resident set {history.peak_memory_mb:.0f} MB {scope} (includes Python, torch and the "
            f"data), {history.memory_added_mb:.0f} MB added by training (activations, gradients, optimizer state)")


def _write_eval_only(parts: _Parts, folder: Path, label: str) -> dict[str, Any]:
    """The "foundation" row: the untrained base model (a fresh seeded head for classification) evaluated."""
    metrics = _metrics(parts)
    params = count_parameters(parts.model)
    row = {"method": label, "task": parts.eval_set.name, "kind": parts.kind, "data": parts.config.data,
           **{k: v for k, v in metrics.items() if k not in DETAIL_KEYS},
           "trainable_params": 0, "total_params": params.total, "trainable_pct": 0.0, "run_dir": str(folder)}
    if not distributed.is_main_process():
        return row
    if "responses" in metrics:
        write_responses(folder / RESPONSES_FILE, metrics["responses"])
    report.write_json(_run_config_json(parts, parts.config.train), folder / "config.json")
    report.write_json({"result": row, **({"samples": metrics["samples"]} if "samples" in metrics else {})},
                      folder / "metrics.json")
    report.write_summary(folder, [row], f"{parts.eval_set.name}: {label}", _notes(parts, params, None))
    return row


# ---------------------------------------------------------------------------------------------- reading runs

def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run folder."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--run {run_dir}: no config.json; expected a run folder written by 'gpt2lora train'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The base model of a run folder with its method applied and its trained tensors loaded."""
    config = read_run(run_dir)
    model = load_base(config["base_model"], config["kind"], config["num_labels"], seed=config["train"]["seed"],
                      revision=config.get("model_revision"))
    if config["method"] == EVAL_ONLY:
        return model, config
    lora = LoRAConfig(**{**config["lora"], "targets": tuple(config["lora"]["targets"])}) if config["lora"] else None
    if lora is not None and is_residual_init(lora.init):
        # a PiSSA / OLoRA adapter is saved converted for the unmodified base (plain LoRA of rank 2r):
        # load_adapter applies the file's own configuration
        load_adapter(model, Path(run_dir) / "adapter")
        return model, config
    prompt = PromptConfig(**config["prompt"]) if config.get("prompt") else None
    prepare_model(model, config["method"], lora=lora, last_n=config["last_n"], seed=config["train"]["seed"],
                  prompt=prompt)
    load_adapter(model, Path(run_dir) / "adapter")
    return model, config
