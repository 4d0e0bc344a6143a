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
from ..constants import (
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_WEIGHTS_FILE,
    RESPONSES_FILE,
    RUN_CONFIG_FILE,
    TOKENIZER_FILES,
)
from ..data.batching import BucketedBatches
from ..data.tasks import CLASSIFICATION_KINDS, KINDS, TASKS, Dataset, Tokenizer, data_root, encode, load_split
from ..devices import describe_precision, resolve_device, set_threads
from ..errors import CheckpointNotFoundError, ConfigError, DataError, SplitNotFoundError
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
from .folders import check_run_name, claimed
from .resume import check_resume
from .runconfig import EVAL_ONLY, RUN_METHODS, RunConfig, to_settings

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
    if (folder / MODEL_WEIGHTS_FILE).is_file():
        return folder
    if vocab is not None and not (Path(vocab) / TOKENIZER_FILES[0]).is_file():
        raise ConfigError(f"--vocab {vocab}: no vocab.json there; --smoke needs the GPT-2 vocabulary "
                          "(a folder with vocab.json and merges.txt)")
    candidates = [vocab, os.environ.get(VOCAB_ENV)]
    if data_root(root) is not None:
        candidates.append(data_root(root).parent / "gpt2-tokenizer")
    found = next((Path(c) for c in candidates if c and (Path(c) / TOKENIZER_FILES[0]).is_file()), None)
    if found is None:
        raise ConfigError("--smoke needs the GPT-2 vocabulary: pass --vocab DIR (a folder with vocab.json and "
                          f"merges.txt) or set ${VOCAB_ENV}")
    model = GPT2.from_config(GPT2Config(**SMOKE_SHAPE), seed=seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_pretrained(model, tmp)
    for name in TOKENIZER_FILES:
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
    except SplitNotFoundError:
        if split != "validation":
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
        if config.run_name is not None and folder.name != config.run_name:
            raise ConfigError(f"--run-name {config.run_name} and --resume {resume} name different run folders "
                              f"({folder.name}); leave --run-name out or give the resumed run's name")
    if not checkpoint.is_dir():
        raise CheckpointNotFoundError(f"--resume {resume}: {checkpoint} not found; expected a run folder written "
                                      f"by 'gpt2lora train' (with {CHECKPOINTS_DIR}/) or one of its checkpoints")
    return folder, checkpoint


def new_run_folder(out: str | os.PathLike, name: str | None, default: str, device: str = "auto") -> Path:
    """``out/name`` (default ``out/<default>-<time>``): the path of a new run folder, the same on all ranks.

    Nothing is made here; :func:`gpt2lora.app.folders.claimed` makes and claims it.
    """
    name = check_run_name(name) if name is not None else f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
    distributed.setup(resolve_device(device, "--device").type)
    return Path(out) / distributed.broadcast_text(name)  # under torchrun: rank 0's time stamp for all ranks


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run writes and what it continues: its folder and, when resumed, the checkpoint."""

    folder: Path
    checkpoint: Path | None


def place_run(config: RunConfig, folder: str | os.PathLike | None) -> Placement:
    """The run's folder (given, resumed, or new under ``out``) and the checkpoint it continues from."""
    resume = resume_target(config)
    if folder is not None:
        if resume is not None and resume[0].resolve() != Path(folder).resolve():
            raise ConfigError(f"--resume {config.resume}: run {resume[0]} is not this run's folder {folder}")
        return Placement(Path(folder), resume[1] if resume else None)
    if resume is not None:
        return Placement(*resume)
    return Placement(new_run_folder(config.out, config.run_name, f"{config.label}-{config.method}",
                                    config.train.device), None)


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
class _Data:
    """The rows a run reads: its kind, train and eval sets, number of classes and row limits."""

    kind: str
    train_set: Dataset | None
    eval_set: Dataset
    num_labels: int | None
    limits: dict[str, Any]


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


def _data(config: RunConfig) -> _Data:
    """The run's train and eval rows (smoke limits by kind), checked for what training needs."""
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
    if config.pack and kind in CLASSIFICATION_KINDS:
        raise ConfigError(f"--pack (pack = true): packing is for language-model tasks (instruction, qa); "
                          f"{config.label} is a {kind} task")
    if train_set is not None and kind in CLASSIFICATION_KINDS:
        classes = sorted({r["label"] for r in train_set.records})
        if len(classes) < 2:
            raise DataError(f"{train_set.source}: every training row has label {classes[0]}; a classifier needs "
                            "rows of at least two classes")
    num_labels = (train_set or eval_set).num_labels
    if num_labels is not None and eval_set.num_labels and eval_set.num_labels > num_labels:
        num_labels = eval_set.num_labels
    return _Data(kind, train_set, eval_set, num_labels, limits)


def _prepare(config: RunConfig, data: _Data) -> _Parts:
    """The base model (a fresh seeded head for classification), its tokenizer and the device."""
    with distributed.main_first():  # the smoke checkpoint is written once, by rank 0
        checkpoint = base_checkpoint(config)
    tok = load_tokenizer(checkpoint, revision=config.model_revision)
    model = load_base(checkpoint, data.kind, data.num_labels, seed=config.train.seed, revision=config.model_revision)
    max_length = min(data.limits["max_length"], model.config.n_positions)
    device = resolve_device(config.train.device, "--device")
    return _Parts(config, data.kind, data.train_set, data.eval_set, data.num_labels, checkpoint, tok, model,
                  max_length, data.limits, device)


def lora_training_bytes(model_config: GPT2Config, lora: LoRAConfig, head_outputs: int) -> int:
    """Bytes the LoRA tensors of ``lora`` take while training in fp32: weights, gradients and AdamW's two
    moments (16 bytes per parameter)."""
    n, inner = model_config.n_embd, model_config.n_inner or 4 * model_config.n_embd
    shapes = {"attn.c_attn": (n, 3 * n), "attn.c_proj": (n, n), "mlp.c_fc": (n, inner), "mlp.c_proj": (inner, n),
              "attn.q": (n, n), "attn.k": (n, n), "attn.v": (n, n)}
    blocks = lora.last_n_blocks or model_config.n_layer
    params = sum(lora.rank * sum(shapes[t]) * blocks for t in lora.targets if t in shapes)
    if "lm_head" in lora.targets:
        params += lora.rank * (n + head_outputs)
    return 16 * params


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(parts: _Parts) -> None:
    """Refuse a LoRA rank whose tensors cannot fit the device before anything is allocated."""
    lora = parts.config.lora_config
    if lora is None:
        return
    need = lora_training_bytes(parts.model.config, lora, parts.num_labels or parts.model.config.vocab_size)
    free = available_bytes(parts.device)
    if free is not None and need > free:
        raise ConfigError(f"--rank {lora.rank}: the LoRA tensors would need {need / 2**30:,.1f} GiB for weights, "
                          f"gradients and optimizer state, more than the {free / 2**30:,.1f} GiB free on "
                          f"{parts.device}; choose a smaller rank")


def _metrics(parts: _Parts) -> dict[str, Any]:
    config = parts.config
    return task_metrics(parts.model, parts.tok, parts.eval_set, parts.max_length,
                        config.eval_batch_size or config.train.batch_size, parts.device, config.train.precision,
                        gen_rows=parts.limits["gen"], max_new_tokens=parts.limits["new_tokens"])


def _local(path: str | None) -> str | None:
    """A local path made absolute (a hub id, or None, as it is)."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def _run_config_json(parts: _Parts, train: Any, folder: Path) -> dict[str, Any]:
    from .. import __version__

    config = parts.config
    lora, prompt = config.lora_config, config.prompt_config
    base = _local(parts.checkpoint)
    # the smoke base lives beside the run folders: found again through this path when they move together
    from_run = os.path.relpath(base, folder.resolve()) if config.smoke else None
    return {
        "gpt2lora_version": __version__, "task": config.task_or_data, "data": _local(config.data),
        "data_root": _local(config.data_root), "source": config.source, "columns": dict(config.columns),
        "kind": parts.kind, "num_labels": parts.num_labels,
        "label_names": list((parts.train_set or parts.eval_set).label_names),
        "base_model": base, "base_model_from_run": from_run, "model_revision": config.model_revision,
        "smoke": config.smoke, "method": config.method, "lora": dataclasses.asdict(lora) if lora else None,
        "last_n": config.last_n_blocks if config.method == "last_n_full" else None,
        "prompt": dataclasses.asdict(prompt) if prompt else None, "max_length": parts.max_length,
        "train": dataclasses.asdict(train), "train_rows": len(parts.train_set) if parts.train_set else 0,
        "eval_split": parts.eval_set.split, "eval_rows": len(parts.eval_set), "settings": to_settings(config),
    }


def _start(config: RunConfig) -> RunConfig:
    """The resolved config; threads, the torchrun group and the seed set up."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"run: expected a RunConfig, got {type(config).__name__}")
    config = config.resolved()
    set_threads(config.threads)
    distributed.setup(resolve_device(config.train.device, "--device").type)  # joins torchrun's group, if any
    torch.manual_seed(config.train.seed)
    return config


def _samples_before(parts: _Parts) -> list[dict[str, str]] | None:
    """Instruction runs: greedy answers of the untrained model to three eval prompts (for generations.md)."""
    if parts.kind != "instruction":
        return None
    parts.model.to(parts.device)
    return instruction_samples(parts.model, parts.tok, parts.eval_set.records[:3], parts.limits["new_tokens"] or 128,
                               parts.max_length, parts.device)


def _apply_method(parts: _Parts) -> ParameterCount:
    config = parts.config
    last_n = config.last_n_blocks if config.method == "last_n_full" else None
    prepare_model(parts.model, config.method, lora=config.lora_config, last_n=last_n, seed=config.train.seed,
                  prompt=config.prompt_config)
    return count_parameters(parts.model)


def _train_config(config: RunConfig, place: Placement) -> Any:
    """The TrainConfig of the fit: checkpoints and history inside the run folder (so a killed run resumes)."""
    return dataclasses.replace(config.train, out_dir=str(place.folder / CHECKPOINTS_DIR),
                               history_path=str(place.folder / HISTORY_FILE), progress=not config.quiet,
                               resume_from=str(place.checkpoint) if place.checkpoint else None)


def _batches(parts: _Parts, train: Any) -> tuple[BucketedBatches, BucketedBatches]:
    tok, max_length = parts.tok, parts.max_length
    train_data = batches(encode(parts.train_set, tok, max_length), train.batch_size, True, train.seed, tok.eot_token,
                         pack_to=max_length if parts.config.pack else None)
    eval_data = batches(encode(parts.eval_set, tok, max_length), parts.config.eval_batch_size or train.batch_size,
                        False, 0, tok.eot_token)
    return train_data, eval_data


def _fit(parts: _Parts, train: Any, data: tuple[BucketedBatches, BucketedBatches], folder: Path) -> History:
    config = parts.config
    with make_trackers(config.report_to, folder, folder.name, hparams=to_settings(config)) as tracker:
        return Trainer(parts.model, train, tracker=tracker or None).fit(*data)


def _save(parts: _Parts, folder: Path, train: Any, metrics: dict[str, Any], row: dict[str, Any],
          samples_before: list[dict[str, str]] | None) -> None:
    """The adapter, config.json, responses, generations and metrics.json."""
    save_adapter(parts.model, folder / "adapter")
    report.write_json(_run_config_json(parts, train, folder), folder / RUN_CONFIG_FILE)
    extra: dict[str, Any] = {}
    if "samples" in metrics:
        extra["samples"] = metrics["samples"]
    if "responses" in metrics:
        write_responses(folder / RESPONSES_FILE, metrics["responses"])
    if samples_before is not None:
        after = instruction_samples(parts.model, parts.tok, parts.eval_set.records[:3],
                                    parts.limits["new_tokens"] or 128, parts.max_length, parts.device)
        extra["generations"] = [{**b, "after": a["generated"], "before": b["generated"]}
                                for b, a in zip(samples_before, after)]
        write_generations(folder / "generations.md", extra["generations"])
    report.write_json({"result": row, **extra}, folder / METRICS_FILE)


def _plots(parts: _Parts, history: History, folder: Path, label: str) -> list[Path]:
    if not parts.config.plots:
        return []
    return [p for p in (report.plot_losses(history.steps, history.evals, folder / "loss.png",
                                           f"{parts.eval_set.name}: {label}"),
                        report.plot_lr(history.steps, folder / "lr.png")) if p is not None]


def _summary(parts: _Parts, folder: Path, row: dict[str, Any], label: str, params: ParameterCount,
             history: History, plots: list[Path]) -> None:
    packed = " (examples packed into rows)" if parts.config.pack else ""
    padding = f"padding: {100 * row['padding_share']:.1f}% of the training batches' token slots{packed}"
    notes = _notes(parts, params, history) + [padding]
    report.write_summary(folder, [row], f"{parts.eval_set.name}: {label}", notes, plots=plots)


def run(config: RunConfig, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or, with method ``none``, only evaluate) one configuration and write its run folder.

    ``folder``: where (default ``config.out / config.run_name``, a new time-stamped name without one, or
    the resumed run's folder). The folder is claimed for this process while the run lasts: a second run
    asking for it is refused. Returns the result row: metrics, trainable parameters, time, throughput,
    per-run memory and ``run_dir``. Under torchrun every rank trains and rank 0 writes the folder.
    """
    config = _start(config)
    place = place_run(config, folder)  # a bad --resume path fails before downloads
    with claimed(place.folder, resume=place.checkpoint is not None, owner=distributed.is_main_process()):
        if place.checkpoint is not None:
            check_resume(place.folder, config)
        parts = _prepare(config, _data(config))
        label = method_label(config.method, config.lora_config, config.last_n_blocks)
        if config.method == EVAL_ONLY:
            return _write_eval_only(parts, place.folder, label)
        _check_fits(parts)
        samples_before = _samples_before(parts)
        params = _apply_method(parts)
        train = _train_config(config, place)
        if distributed.is_main_process():  # before training: what a resumed run is checked against
            report.write_json(_run_config_json(parts, train, place.folder), place.folder / RUN_CONFIG_FILE)
        data = _batches(parts, train)
        history = _fit(parts, train, data, place.folder)
        metrics = _metrics(parts)
        row = _result_row(parts, label, metrics, params, history, place.folder)
        row["padding_share"] = data[0].padding_stats().padding_share  # of the training batches' token slots
        row["train_batches"] = len(data[0])  # per epoch; packing puts several examples in a row
        if not distributed.is_main_process():
            return row  # under torchrun only rank 0 writes the run folder
        _save(parts, place.folder, train, metrics, row, samples_before)
        _summary(parts, place.folder, row, label, params, history, _plots(parts, history, place.folder, label))
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
    report.write_json(_run_config_json(parts, parts.config.train, folder), folder / RUN_CONFIG_FILE)
    report.write_json({"result": row, **({"samples": metrics["samples"]} if "samples" in metrics else {})},
                      folder / METRICS_FILE)
    report.write_summary(folder, [row], f"{parts.eval_set.name}: {label}", _notes(parts, params, None))
    return row


# ---------------------------------------------------------------------------------------------- reading runs

def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run folder, its fields checked (a damaged one is refused naming the field)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--run {run_dir}: no config.json; expected a run folder written by 'gpt2lora train'")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason}); expected a run's config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _check_run_json(config, path)
    return config


def _check_run_json(config: dict[str, Any], path: Path) -> None:
    def need(key: str, ok: bool, expected: str) -> None:
        if not ok:
            shown = repr(config[key]) if key in config else "missing"
            raise ConfigError(f"{path}: field {key!r} is {shown}; expected {expected}")

    def get(key: str) -> Any:
        return config.get(key)

    need("base_model", isinstance(get("base_model"), str) and bool(get("base_model")),
         "the base checkpoint (a hub id or folder)")
    need("kind", get("kind") in KINDS, f"one of {', '.join(KINDS)}")
    need("method", get("method") in RUN_METHODS, f"one of {', '.join(RUN_METHODS)}")
    need("train", isinstance(get("train"), dict) and isinstance(get("train").get("seed"), int),
         "a table with the run's TrainConfig (an integer seed at least)")
    classification = get("kind") in CLASSIFICATION_KINDS
    need("num_labels", (isinstance(get("num_labels"), int) and get("num_labels") > 0) if classification
         else get("num_labels") is None, "the number of classes" if classification else "null")
    need("max_length", isinstance(get("max_length"), int) and get("max_length") > 0, "a positive integer")
    need("lora", isinstance(get("lora"), dict) if get("method") == "lora" else get("lora") is None,
         "the run's LoRA settings (a table)" if get("method") == "lora" else "null for method "
         f"{get('method')}")
    need("last_n", get("last_n") is None or isinstance(get("last_n"), int), "null or a number of blocks")
    need("prompt", get("prompt") is None or isinstance(get("prompt"), dict), "null or a table")
    for key in ("data", "data_root", "model_revision", "base_model_from_run"):
        need(key, get(key) is None or isinstance(get(key), str), "null or a string")
    need("columns", isinstance(get("columns") or {}, dict), "a table of FIELD: COLUMN")


def _section(config: dict[str, Any], key: str, cls: type, path: Path) -> Any:
    """``cls(**config[key])`` (a LoRAConfig or PromptConfig), refused naming the field when damaged."""
    values = dict(config[key])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{path}: field {key!r} has unknown keys {unknown}; expected {sorted(fields)}")
    if "targets" in values and isinstance(values["targets"], list):
        values["targets"] = tuple(values["targets"])
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{path}: field {key!r}: {err}") from None


def run_base(run_dir: str | os.PathLike, config: dict[str, Any]) -> str:
    """The base checkpoint of a run: its recorded path, or, for a run folder moved together with the smoke
    base beside it, that base found from the run folder."""
    base = config["base_model"]
    from_run = config.get("base_model_from_run")
    if not Path(base).exists() and from_run and (Path(run_dir) / from_run).is_dir():
        return str((Path(run_dir) / from_run).resolve())
    return base


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The base model of a run folder with its method applied and its trained tensors loaded."""
    config = read_run(run_dir)
    path = Path(run_dir) / RUN_CONFIG_FILE
    config["base_model"] = run_base(run_dir, config)
    model = load_base(config["base_model"], config["kind"], config["num_labels"], seed=config["train"]["seed"],
                      revision=config.get("model_revision"))
    if config["method"] == EVAL_ONLY:
        return model, config
    lora = _section(config, "lora", LoRAConfig, path) if config["lora"] else None
    if lora is not None and is_residual_init(lora.init):
        # a PiSSA / OLoRA adapter is saved converted for the unmodified base (plain LoRA of rank 2r):
        # load_adapter applies the file's own configuration
        load_adapter(model, Path(run_dir) / "adapter")
        return model, config
    prompt = _section(config, "prompt", PromptConfig, path) if config.get("prompt") else None
    prepare_model(model, config["method"], lora=lora, last_n=config["last_n"], seed=config["train"]["seed"],
                  prompt=prompt)
    load_adapter(model, Path(run_dir) / "adapter")
    return model, config
