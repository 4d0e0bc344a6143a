"""Tasks end to end: build the model and data of a run, train, evaluate, write the run folder.

These functions back the ``gpt2lora`` subcommands and the ``examples/`` scripts; they take the
``argparse.Namespace`` that :mod:`gpt2lora.cli` builds, so the knobs are defined in one place.

A run folder holds ``config.json`` (everything needed to rebuild the model), ``history.jsonl``
(one line per optimizer step and per evaluation), ``adapter/`` (the trained tensors),
``metrics.json``, ``summary.md`` and, with matplotlib, ``loss.png`` and ``lr.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, distributed, report
from .adapters import load_adapter, save_adapter
from .batching import BucketedBatches
from .config import GPT2Config, LoRAConfig, TrainConfig
from .data import TASKS, Dataset, Tokenizer, alpaca_prompt, data_root, encode, load_split
from .devices import resolve_device
from .errors import CheckpointNotFoundError, ConfigError, DataError
from .evaluation import DETAIL_KEYS, generate_texts, instruction_samples, task_metrics
from .heads import GPT2ForSequenceClassification
from .hub import save_pretrained
from .lora import count_parameters, lora_modules, merge_lora, unmerge_lora
from .methods import prepare_model
from .model import GPT2
from .prompt import PromptConfig
from .tokenizer import load_tokenizer
from .train import Trainer

CLASSIFICATION_KINDS = ("classification", "nli")
#: Shape of the ``--smoke`` model: tiny, but with the real 50,257-token vocabulary.
SMOKE_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 512}
#: Rows (train / eval / answered by generation), new tokens and max_length of ``--smoke`` runs, by kind.
SMOKE = {"classification": {"train": 300, "eval": 100, "gen": 8, "new_tokens": 8, "max_length": 128},
         "lm": {"train": 64, "eval": 16, "gen": 4, "new_tokens": 8, "max_length": 64}}
VOCAB_ENV = "GPT2LORA_VOCAB"
#: File of a run folder with every generated instruction response (what ``gpt2lora judge`` scores).
RESPONSES_NAME = "responses.jsonl"
#: Sub-folder of a run folder where training checkpoints go (what ``--resume`` continues from).
CHECKPOINTS_DIR = "checkpoints"


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


def base_checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint a run starts from: ``--model``, or the tiny ``--smoke`` model."""
    if getattr(args, "smoke", False):
        return str(smoke_checkpoint(getattr(args, "out", "runs"), args.vocab, 0, args.data_root))
    return args.model


def load_base(checkpoint: str, kind: str, num_labels: int | None, seed: int = 0) -> nn.Module:
    """GPT2ForSequenceClassification (fresh seeded head) for classification kinds, else GPT2."""
    if kind in CLASSIFICATION_KINDS:
        return GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=num_labels, seed=seed)
    return GPT2.from_pretrained(checkpoint)


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    if args.method != "lora":
        return None
    # style / train_bias have no flags; recipes (gpt2lora.recipes) set them on the namespace
    return LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets),
                      last_n_blocks=args.last_n_blocks, use_rslora=args.rslora,
                      style=getattr(args, "lora_style", "peft"), train_bias=getattr(args, "lora_train_bias", "none"))


def prompt_config(args: argparse.Namespace) -> PromptConfig | None:
    """The soft prompt of ``--method prompt`` (``--num-virtual-tokens``), else None."""
    if args.method != "prompt":
        return None
    n = getattr(args, "num_virtual_tokens", None)
    return PromptConfig(num_virtual_tokens=n) if n is not None else PromptConfig()


def apply_method(model: nn.Module, method: str, lora: LoRAConfig | None, last_n: int | None,
                 seed: int, prompt: PromptConfig | None = None) -> nn.Module:
    return prepare_model(model, method, lora=lora, last_n=last_n if method == "last_n_full" else None, seed=seed,
                         prompt=prompt if method == "prompt" else None)


# ---------------------------------------------------------------------------------------------- data

def task_name(args: argparse.Namespace) -> str:
    if args.task is None and args.data is None:
        raise ConfigError("name a task (--task sst2, ...) or a data path (--data FILE_OR_FOLDER)")
    return args.task if args.task is not None else args.data


def load_data(args: argparse.Namespace, split: str, limit: int | None) -> Dataset:
    """One split of the run's task, from ``--task`` / ``--data`` / ``--data-root`` / ``--source``."""
    task = task_name(args)
    path = args.data if args.task is not None else None
    try:
        return load_split(task, split, path=path, root=args.data_root, source=args.source,
                          columns=dict(args.columns), limit=limit, revision=args.revision)
    except DataError as err:
        if split != "validation" or "no validation split" not in str(err) and "no 'validation' split" not in str(err):
            raise
    # Some tasks (imdb, enron_spam) publish no validation split: evaluate on test, and say so.
    print(f"note: {task} has no validation split; evaluating on test")
    return load_split(task, "test", path=path, root=args.data_root, source=args.source,
                      columns=dict(args.columns), limit=limit, revision=args.revision)


def row_limits(args: argparse.Namespace, kind: str | None = None) -> dict[str, Any]:
    """Row counts and lengths of a run: the flags, or the ``--smoke`` defaults of the task kind."""
    smoke = SMOKE["classification" if kind in (None, *CLASSIFICATION_KINDS) else "lm"] \
        if getattr(args, "smoke", False) else {}
    return {"train": args.train_rows or smoke.get("train"), "eval": args.eval_rows or smoke.get("eval"),
            "gen": args.gen_rows or smoke.get("gen", 200),
            "new_tokens": args.max_new_tokens or smoke.get("new_tokens"),
            "max_length": min(args.max_length, smoke.get("max_length", args.max_length))}


def batches(examples: list[dict[str, Any]], batch_size: int, shuffle: bool, seed: int,
            pad_token_id: int) -> BucketedBatches:
    return BucketedBatches(examples, batch_size, shuffle=shuffle, seed=seed, pad_token_id=pad_token_id)


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate(model: nn.Module, kind: str, tok: Tokenizer, eval_set: Dataset, limits: dict[str, Any],
             max_length: int, batch_size: int, device: torch.device, precision: str = "auto") -> dict[str, Any]:
    """:func:`gpt2lora.evaluation.task_metrics` with a run's row limits."""
    return task_metrics(model, tok, eval_set, max_length, batch_size, device, precision,
                        gen_rows=limits["gen"], max_new_tokens=limits["new_tokens"])


# ---------------------------------------------------------------------------------------------- training

def train_config(args: argparse.Namespace) -> TrainConfig:
    lr = args.lr if args.lr is not None else (5e-5 if args.method in ("full", "last_n_full") else 2e-4)
    if args.min_lr > lr:
        raise ConfigError(f"--min-lr {args.min_lr} is above the peak --lr {lr}")
    return TrainConfig(lr=lr, min_lr=args.min_lr, warmup_ratio=args.warmup_ratio, epochs=args.epochs,
                       max_steps=args.max_steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
                       grad_clip=args.grad_clip, optimizer=args.optimizer, weight_decay=args.weight_decay,
                       precision=args.precision, device=args.device, eval_every_steps=args.eval_every,
                       seed=args.seed, progress=not args.quiet,
                       gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
                       compile=getattr(args, "compile", False), schedule=getattr(args, "schedule", "cosine"))


def resume_target(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """``(run folder, checkpoint or checkpoints folder)`` of ``--resume auto|PATH``; None without it.

    ``auto`` continues ``--out/--run-name`` from its latest checkpoint; PATH is a run folder (its latest
    checkpoint) or one ``RUN/checkpoints/checkpoint-N`` folder.
    """
    resume = getattr(args, "resume", None)
    if resume is None:
        return None
    if resume == "auto":
        if not args.run_name:
            raise ConfigError("--resume auto needs --run-name: the run folder (under --out) to continue")
        folder, checkpoint = Path(args.out) / args.run_name, Path(args.out) / args.run_name / CHECKPOINTS_DIR
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


def run_folder(args: argparse.Namespace, task: str, method: str) -> Path:
    name = args.run_name or f"{Path(task).name}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    distributed.setup(resolve_device(args.device).type)
    name = distributed.broadcast_text(name)  # under torchrun: rank 0's time stamp, one folder for all ranks
    folder = Path(args.out) / name
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"run folder {folder} exists and is not empty; choose another --run-name or --out")
    if distributed.is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def method_label(method: str, lora: LoRAConfig | None, last_n: int | None) -> str:
    if method == "lora" and lora is not None:
        where = f", last {lora.last_n_blocks}" if lora.last_n_blocks else ""
        return f"LoRA (r={lora.rank}, α={lora.alpha:g}{where})"
    if method == "last_n_full":
        return f"Last {last_n} blocks"
    return {"full": "Full fine-tuning", "head": "Head only", "embeddings": "Embeddings",
            "prompt": "Prompt tuning"}.get(method, method)


def train_run(args: argparse.Namespace, folder: Path | None = None) -> dict[str, Any]:
    """Train one configuration and write its run folder; returns the result row (with ``run_dir``)."""
    distributed.setup(resolve_device(args.device).type)  # joins torchrun's group; no-op in a single process
    torch.manual_seed(args.seed)
    resume = resume_target(args) if folder is None else None  # checked first: a bad path fails before any download
    task = task_name(args)
    kind = TASKS[args.task].kind if args.task in TASKS else None
    limits = row_limits(args, kind)
    train_set = load_data(args, "train", limits["train"])
    if kind is None and train_set.kind != "classification":  # a path: smoke limits follow the rows read
        limits = row_limits(args, train_set.kind)
        train_set.records = train_set.records[:limits["train"]] if limits["train"] else train_set.records
    eval_set = load_data(args, args.eval_split, limits["eval"])
    kind = train_set.kind
    num_labels = train_set.num_labels
    if num_labels is not None and eval_set.num_labels and eval_set.num_labels > num_labels:
        num_labels = eval_set.num_labels
    with distributed.main_first():  # the --smoke checkpoint is written once, by rank 0
        checkpoint = base_checkpoint(args)
    tok = load_tokenizer(checkpoint)
    model = load_base(checkpoint, kind, num_labels, seed=args.seed)
    max_length = min(limits["max_length"], model.config.n_positions)
    device = resolve_device(args.device)
    lora = lora_config(args)
    last_n = args.last_n_blocks if args.method == "last_n_full" else None
    folder = folder or (resume[0] if resume else run_folder(args, task, args.method))

    samples_before = None
    if kind == "instruction":
        fixed = eval_set.records[:3]
        model.to(device)
        samples_before = instruction_samples(model, tok, fixed, limits["new_tokens"] or 128, max_length, device)
    prompt = prompt_config(args)
    apply_method(model, args.method, lora, last_n, args.seed, prompt)
    params = count_parameters(model)
    # checkpoints go into the run folder (each epoch end, and every --save-every steps) so a killed run resumes
    config = dataclasses.replace(train_config(args), out_dir=str(folder / CHECKPOINTS_DIR),
                                 save_every_steps=getattr(args, "save_every", None),
                                 resume_from=str(resume[1]) if resume else None)
    train_examples = encode(train_set, tok, max_length)
    train_data = batches(train_examples, args.batch_size, True, args.seed, tok.eot_token)
    eval_data = batches(encode(eval_set, tok, max_length), args.batch_size, False, 0, tok.eot_token)

    history = Trainer(model, config).fit(train_data, eval_data)
    model.to(device)
    metrics = evaluate(model, kind, tok, eval_set, limits, max_length, args.batch_size, device, args.precision)
    steps = history.steps
    row: dict[str, Any] = {
        "method": method_label(args.method, lora, last_n), "task": train_set.name, "kind": kind,
        **{k: v for k, v in metrics.items() if k not in DETAIL_KEYS},
        "trainable_params": params.trainable, "total_params": params.total, "trainable_pct": params.share,
        "train_time_s": history.runtime_s, "train_rows": len(train_set), "optimizer_steps": len(steps),
        "samples_per_s": history.samples_per_s, "steps_per_s": history.steps_per_s,
        "tokens_per_s": history.tokens_per_s, "peak_memory_mb": history.peak_memory_mb,
        "lr": config.lr, "rank": lora.rank if lora else None, "alpha": lora.alpha if lora else None,
        "last_n_blocks": args.last_n_blocks, "run_dir": str(folder),
    }

    if not distributed.is_main_process():
        return row  # under torchrun only rank 0 writes the run folder
    save_adapter(model, folder / "adapter")
    write_history(folder / "history.jsonl", history)
    if "responses" in metrics:
        write_responses(folder / RESPONSES_NAME, metrics["responses"])
    run_config = {
        "gpt2lora_version": __version__, "task": task, "data": args.data, "data_root": args.data_root,
        "source": args.source, "columns": dict(args.columns), "kind": kind, "num_labels": num_labels,
        "label_names": list(train_set.label_names), "base_model": checkpoint, "smoke": bool(args.smoke),
        "method": args.method, "lora": dataclasses.asdict(lora) if lora else None, "last_n": last_n,
        "prompt": dataclasses.asdict(prompt) if prompt else None,
        "max_length": max_length, "train": dataclasses.asdict(config), "train_rows": len(train_set),
        "eval_split": eval_set.split, "eval_rows": len(eval_set),
    }
    report.write_json(run_config, folder / "config.json")
    extra: dict[str, Any] = {}
    if "samples" in metrics:
        extra["samples"] = metrics["samples"]
    if samples_before is not None:
        after = instruction_samples(model, tok, eval_set.records[:3], limits["new_tokens"] or 128, max_length,
                                    device)
        extra["generations"] = [{**b, "after": a["generated"], "before": b["generated"]}
                                for b, a in zip(samples_before, after)]
        write_generations(folder / "generations.md", extra["generations"])
    report.write_json({"result": row, **extra}, folder / "metrics.json")
    plots = [p for p in (report.plot_losses(steps, history.evals, folder / "loss.png",
                                            f"{train_set.name}: {row['method']}"),
                         report.plot_lr(steps, folder / "lr.png")) if p is not None] \
        if getattr(args, "plots", True) else []  # recipe smoke runs skip them (half a second per row)
    notes = [(f"task {train_set.name} ({kind}), {len(train_set)} train rows, evaluated on {len(eval_set)} "
             f"{eval_set.split} rows; base model {checkpoint}; max_length {max_length}"),
             f"{params}"]
    report.write_summary(folder, [row], f"{train_set.name}: {row['method']}", notes, plots=plots)
    return row


def write_history(path: Path, history: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"type": "step", **step}) + "\n" for step in history.steps)
        f.writelines(json.dumps({"type": "eval", **ev}, default=float) + "\n" for ev in history.evals)


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


# ---------------------------------------------------------------------------------------------- commands

def train_command(args: argparse.Namespace) -> dict[str, Any]:
    row = train_run(args)
    if distributed.is_main_process():
        print(report.markdown_table([row]))
        print(f"run folder: {row['run_dir']}")
    return row


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--run {run}: no config.json; expected a run folder written by 'gpt2lora train'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def load_run_model(run: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The base model of a run folder with its method applied and its trained tensors loaded."""
    config = read_run(run)
    model = load_base(config["base_model"], config["kind"], config["num_labels"], seed=config["train"]["seed"])
    lora = LoRAConfig(**{**config["lora"], "targets": tuple(config["lora"]["targets"])}) if config["lora"] else None
    prompt = PromptConfig(**config["prompt"]) if config.get("prompt") else None
    apply_method(model, config["method"], lora, config["last_n"], config["train"]["seed"], prompt)
    load_adapter(model, Path(run) / "adapter")
    return model, config


def _run_args(args: argparse.Namespace, config: dict[str, Any]) -> argparse.Namespace:
    """Fill the data arguments a command left out from the run's own config."""
    merged = argparse.Namespace(**vars(args))
    if args.task is None and args.data is None:
        merged.task, merged.data = config["task"], config["data"]
        if merged.task == merged.data:
            merged.task = None
    merged.data_root = args.data_root or config.get("data_root")
    merged.columns = args.columns or list(config.get("columns", {}).items())
    merged.max_length = args.max_length or config["max_length"]
    merged.smoke = args.smoke or config.get("smoke", False)
    return merged


def eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a run folder, or the base model (the "foundation" row) with an untrained head."""
    device = resolve_device(args.device)
    if args.run:
        model, config = load_run_model(args.run)
        args = _run_args(args, config)
        checkpoint, label = config["base_model"], f"{Path(args.run).name}"
    else:
        checkpoint, label, config = base_checkpoint(args), "Foundation (no fine-tuning)", None
        model = None
    args.max_length = args.max_length or 128
    limits = row_limits(args, TASKS[args.task].kind if args.task in TASKS else None)
    eval_set = load_data(args, args.split or args.eval_split, limits["eval"])
    if model is None:
        model = load_base(checkpoint, eval_set.kind, eval_set.num_labels, seed=args.seed)
    tok = load_tokenizer(checkpoint)
    max_length = min(limits["max_length"], model.config.n_positions)
    model.to(device)
    metrics = evaluate(model, eval_set.kind, tok, eval_set, limits, max_length, args.batch_size, device,
                       args.precision)
    params = count_parameters(model)
    row = {"method": label, "task": eval_set.name, "split": eval_set.split,
           **{k: v for k, v in metrics.items() if k not in DETAIL_KEYS}, "total_params": params.total}
    print(report.markdown_table([row]))
    if args.run_name or args.run:
        folder = Path(args.run) if args.run and not args.run_name else Path(args.out) / args.run_name
        folder.mkdir(parents=True, exist_ok=True)
        report.write_json({"result": row, "samples": metrics.get("samples", [])},
                          folder / f"eval-{eval_set.name}-{eval_set.split}.json")
        row["eval_file"] = str(folder / f"eval-{eval_set.name}-{eval_set.split}.json")
    return row


def generate_command(args: argparse.Namespace) -> list[str]:
    device = resolve_device(args.device)
    if args.run:
        model, config = load_run_model(args.run)
        checkpoint = config["base_model"]
    else:
        checkpoint = base_checkpoint(args)
        model = GPT2.from_pretrained(checkpoint)
    if not isinstance(model, GPT2):
        raise ConfigError(f"--run {args.run} is a classification run; generate needs a language-model run "
                          "(an instruction or QA task) or a base model")
    tok = load_tokenizer(checkpoint)
    texts = [alpaca_prompt(p) if args.alpaca else p for p in args.prompt]
    new_tokens = args.max_new_tokens or (SMOKE["lm"]["new_tokens"] if args.smoke else 64)
    model.to(device)
    outputs = generate_texts(model, tok, [tok.encode_ordinary(t) for t in texts], new_tokens, device,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, output in zip(args.prompt, outputs):
        print(f"### prompt\n{prompt}\n### generated\n{output}\n")
    return outputs


def merge_command(args: argparse.Namespace) -> Path:
    """Merge a run's LoRA into its base weights, check merged == unmerged, write an HF checkpoint."""
    model, config = load_run_model(args.run)
    model.eval()
    probe = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe)
        if any(True for _ in lora_modules(model)):
            merge_lora(model)
        after = model(probe)
    if not torch.allclose(before, after, atol=1e-4, rtol=1e-4):
        unmerge_lora(model)
        raise ConfigError(f"merging the adapter of {args.run} changed the outputs by "
                          f"{(before - after).abs().max():.2e}; the checkpoint was not written")
    out = save_pretrained(model, args.out)
    print(f"merged {config['method']} run {args.run} into {out} (max |merged - unmerged| = "
          f"{(before - after).abs().max():.2e})")
    return out


def sweep_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (method, rank, alpha, lr, last_n_blocks) combination; LoRA knobs only vary LoRA runs."""
    methods = args.methods or [args.method]
    ranks, alphas = args.ranks or [args.rank], args.alphas or [args.alpha]
    lrs, depths = args.lrs or [args.lr], args.last_n_blocks_grid or [args.last_n_blocks]
    grid: list[dict[str, Any]] = []
    for method in methods:
        if method == "lora":
            combos = itertools.product(ranks, alphas, lrs, depths)
        elif method == "last_n_full":
            combos = itertools.product([args.rank], [args.alpha], lrs, [d for d in depths if d] or [1])
        else:
            combos = itertools.product([args.rank], [args.alpha], lrs, [None])
        for rank, alpha, lr, depth in combos:
            point = {"method": method, "rank": rank, "alpha": alpha, "lr": lr, "last_n_blocks": depth}
            if point not in grid:
                grid.append(point)
    return grid


def sweep_command(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train every grid point into ``<out>/<name>/`` and write one comparison table and plots."""
    task = task_name(args)
    folder = run_folder(args, task, "sweep")
    rows: list[dict[str, Any]] = []
    if args.foundation:
        eval_args = argparse.Namespace(**{**vars(args), "run": None, "split": None, "run_name": None})
        rows.append(eval_command(eval_args))
    for i, point in enumerate(sweep_grid(args)):
        point_args = argparse.Namespace(**{**vars(args), **point, "out": str(folder), "run_name": None})
        name = f"{i:02d}-{point['method']}" + (f"-r{point['rank']}" if point["method"] == "lora" else "") \
            + (f"-n{point['last_n_blocks']}" if point["last_n_blocks"] else "") \
            + (f"-lr{point['lr']:g}" if point["lr"] else "")
        row = train_run(point_args, folder / name)
        rows.append({**row, "method_name": point["method"]})
        print(report.markdown_table(rows[-1:]))
    varied = [k for k in ("rank", "lr", "last_n_blocks") if len({r.get(k) for r in rows if "run_dir" in r}) > 1]
    metric = "accuracy" if any("accuracy" in r for r in rows) else "eval_loss"
    trained = [{**r, "method": r.get("method_name", r["method"])} for r in rows if "run_dir" in r]
    plots = [p for x in ("rank", "last_n_blocks", "lr") if x in varied
             for p in [report.plot_sweep(trained, x, metric, folder / f"{metric}_vs_{x}.png")] if p is not None]
    report.write_csv(rows, folder / "results.csv")
    report.write_json(rows, folder / "results.json")
    report.write_summary(folder, rows, f"Sweep on {Path(task).name}", [(f"{len(trained)} runs; varied: "
                         f"{', '.join(varied) or 'method only'}")], extra=varied, plots=plots)
    print(report.markdown_table(rows, varied))
    print(f"sweep folder: {folder}")
    return rows

