"""The ``gpt2lora`` command: ``train``, ``eval``, ``generate``, ``merge``, ``sweep``, ``reproduce``, ``judge``,
``quickstart``.

The argument groups defined here are shared with ``examples/*.py``, so every script accepts the
same knobs with the same names and checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import BLOCK_TARGETS, LORA_TARGETS, OPTIMIZERS
from .data import TASKS
from .errors import GPT2LoRAError
from .methods import METHODS

# ---------------------------------------------------------------------------------------------- value types

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def column_mapping(text: str) -> tuple[str, str]:
    field, sep, column = text.partition("=")
    if not sep or not field or not column:
        raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN (e.g. text=sentence), got {text!r}")
    return field, column


# ---------------------------------------------------------------------------------------------- argument groups

def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="gpt2",
                       help="hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name) or a local "
                            "checkpoint folder (default: gpt2)")
    group.add_argument("--smoke", action="store_true",
                       help="tiny random GPT-2 (2 blocks, width 32) with the real vocabulary and a few hundred "
                            "rows: runs in seconds on a CPU, for checking the pipeline")
    group.add_argument("--vocab", default=None,
                       help="folder with vocab.json + merges.txt for --smoke (default: $GPT2LORA_VOCAB, or "
                            "gpt2-tokenizer next to the data root)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models on "
                            "a busy machine)")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--method", default="lora", choices=METHODS, help="what trains (default: lora)")
    group.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r (default: 8)")
    group.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (default: 16)")
    group.add_argument("--dropout", type=probability, default=0.05, help="LoRA dropout (default: 0.05)")
    group.add_argument("--targets", nargs="+", choices=LORA_TARGETS, default=list(BLOCK_TARGETS),
                       help="layers LoRA wraps (default: the four block layers; attn.q/k/v split c_attn, "
                            "lm_head adds the output head)")
    group.add_argument("--last-n-blocks", type=positive_int, default=None,
                       help="lora: only the last N blocks get LoRA; last_n_full: train the last N blocks")
    group.add_argument("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(r)")
    group.add_argument("--num-virtual-tokens", type=positive_int, default=None,
                       help="prompt: trainable vectors prepended to every sequence (default: 20; the SST-2 "
                            "report's 46K 'PreLayer' row is 60)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="peak learning rate (default: 2e-4 for lora/head/embeddings, 5e-5 otherwise)")
    group.add_argument("--min-lr", type=non_negative_float, default=0.0, help="final learning rate")
    group.add_argument("--warmup-ratio", type=probability, default=0.05, help="share of steps warming up")
    group.add_argument("--epochs", type=positive_int, default=1)
    group.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps")
    group.add_argument("--batch-size", type=positive_int, default=16,
                       help="rows per batch (under torchrun: the global batch, split across the processes)")
    group.add_argument("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    group.add_argument("--max-length", type=positive_int, default=128, help="tokens per row after truncation")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    group.add_argument("--grad-clip", type=positive_float, default=1.0)
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--eval-every", type=positive_int, default=None,
                       help="evaluate every N optimizer steps (always at the end of each epoch)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each block's activations in backward: less memory, ~1 more forward per step")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the training forward (off by default: it rarely pays back its compile "
                            "time on a CPU)")


def add_data_args(parser: argparse.ArgumentParser, default_task: str | None = None,
                  tasks: Sequence[str] | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--task", default=default_task, choices=list(tasks) if tasks else None,
                       help=f"task preset ({', '.join(tasks or TASKS)}) or a data path")
    group.add_argument("--data", default=None,
                       help="local data: a file, or a folder with train/validation/test .jsonl/.csv/.tsv/.parquet")
    group.add_argument("--data-root", default=None,
                       help="folder holding the benchmark folders (sst2/, sms_spam/, ...); default $GPT2LORA_DATA")
    group.add_argument("--source", choices=("auto", "local", "hub"), default="auto",
                       help="read a preset from the local data root or the hub (default: local when present)")
    group.add_argument("--revision", default=None, help="hub revision of the dataset")
    group.add_argument("--column", dest="columns", action="append", type=column_mapping, default=[],
                       metavar="FIELD=COLUMN", help="map a record field to a column name (repeatable)")
    group.add_argument("--train-rows", type=positive_int, default=None, help="use only the first N train rows")
    group.add_argument("--eval-rows", type=positive_int, default=None, help="use only the first N eval rows")
    group.add_argument("--eval-split", default="validation", help="split to evaluate on (falls back to test)")
    group.add_argument("--gen-rows", type=positive_int, default=None,
                       help="qa/instruction: rows answered by generation for EM/F1 and samples (default 200)")
    group.add_argument("--max-new-tokens", type=positive_int, default=None,
                       help="qa/instruction: generated tokens per answer (default: 32 qa, 128 instruction)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    group.add_argument("--run-name", default=None, help="run folder name (default: task-method-time)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


RESUME_HINT = "continue with the same command plus --resume auto (with --run-name) or --resume RUN_FOLDER"


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--save-every`` and ``--resume``: what keeps a long run when it is killed or interrupted."""
    parser.add_argument("--save-every", type=positive_int, default=None, metavar="N",
                        help="also write a checkpoint every N optimizer steps into RUN/checkpoints (one is always "
                             "written at each epoch end)")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue a killed or interrupted run: 'auto' = the latest checkpoint of "
                             "--out/--run-name, or a run folder, or one RUN/checkpoints/checkpoint-N folder")


def example_parser(description: str, tasks: Sequence[str], default_task: str) -> argparse.ArgumentParser:
    """The argument parser of an ``examples/*.py`` script: the ``train`` knobs, limited to ``tasks``."""
    parser = argparse.ArgumentParser(description=description)
    add_data_args(parser, default_task, tasks)
    add_model_args(parser)
    add_method_args(parser)
    add_train_args(parser)
    add_output_args(parser)
    add_checkpoint_args(parser)
    return parser


def example_main(description: str, tasks: Sequence[str], default_task: str,
                 argv: Sequence[str] | None = None) -> int:
    """Body of an ``examples/*.py`` script: parse the shared flags, train, print the table and samples."""
    args = example_parser(description, tasks, default_task).parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from . import report
    from . import tasks as run_tasks

    try:
        row = run_tasks.train_run(args)
    except GPT2LoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the Trainer has already logged which checkpoint it saved
        print(f"interrupted; {RESUME_HINT}", file=sys.stderr)
        return 130
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun rank 0 prints and owns the run folder
        return 0
    print(report.markdown_table([row]))
    details = json.loads((Path(row["run_dir"]) / "metrics.json").read_text(encoding="utf-8"))
    for sample in details.get("samples", []):
        print(f"Q: {sample['question']}\n   predicted: {sample['prediction']!r}   gold: {sample['answers'][0]!r}")
    for g in details.get("generations", []):
        print(f"### {g['instruction']}\n--- before: {g['before']!r}\n--- after:  {g['after']!r}")
    print(f"run folder: {row['run_dir']}")
    return 0


def add_recipe_parsers(sub: argparse._SubParsersAction, train: argparse.ArgumentParser) -> None:
    """``train --config``, ``reproduce`` (the published experiments) and ``judge`` (LLM-judge scores)."""
    train.add_argument("--config", default=None, metavar="FILE.toml",
                       help="run the experiments of a recipe file (the format of 'gpt2lora reproduce'); the run "
                            "settings come from the file, --smoke/--device/--data-root/--source/--out/--run-name apply")

    reproduce = sub.add_parser("reproduce", help="run a published experiment's recipe and compare with its figures")
    reproduce.add_argument("name", nargs="?", help="recipe name (see --list) or a recipe .toml file")
    reproduce.add_argument("--list", action="store_true", help="list the shipped recipes, one line each")
    reproduce.add_argument("--data", default=None, metavar="DIR",
                           help="read the tasks from local folders under DIR (sst2/, imdb/, ...; default: the hub)")
    reproduce.add_argument("--smoke", action="store_true",
                           help="tiny random GPT-2 on a few dozen local rows per row of the recipe: checks the "
                                "pipeline in seconds (needs --data or $GPT2LORA_DATA)")
    reproduce.add_argument("--vocab", default=None, help="folder with vocab.json + merges.txt for --smoke")
    reproduce.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    reproduce.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    reproduce.add_argument("--out", default="runs", help="folder for the report folder (default: runs)")
    reproduce.add_argument("--run-name", default=None, help="report folder name (default: recipe-time)")
    reproduce.add_argument("--judge-endpoint", default=None, metavar="URL",
                           help="score instruction rows with an LLM judge at this OpenAI-compatible endpoint")
    reproduce.add_argument("--judge-model", default=None, metavar="NAME", help="the judge's model name")

    judge = sub.add_parser("judge", help="score a run's instruction responses with an LLM judge (0-100)")
    judge.add_argument("run", metavar="RUN_DIR", help="run folder holding responses.jsonl")
    judge.add_argument("--endpoint", required=True, metavar="URL",
                       help="OpenAI-compatible base URL: http://127.0.0.1:11434/v1 (Ollama), "
                            "http://127.0.0.1:8000/v1 (vLLM) or a hosted one")
    judge.add_argument("--model", required=True, metavar="NAME", help="the judge's model name on that server")
    judge.add_argument("--prompt-file", default=None,
                       help="judging prompt template with {instruction} {input} {reference} {response} {low} {high}")
    judge.add_argument("--low", type=int, default=0, help="lowest score (default: 0)")
    judge.add_argument("--high", type=int, default=100, help="highest score (default: 100)")
    judge.add_argument("--retries", type=int, default=2, help="extra attempts per response (default: 2)")
    judge.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per answer (default: 60)")
    judge.add_argument("--api-key", default=None, help="bearer token (default: $GPT2LORA_JUDGE_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lora", description="Fine-tune GPT-2 with LoRA (or fully) and "
                                     "compare honestly: accuracy/F1, trainable parameters, time, memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune on a task and write a run folder")
    add_data_args(train, "sst2")
    add_model_args(train)
    add_method_args(train)
    add_train_args(train)
    add_output_args(train)
    add_checkpoint_args(train)

    evaluate = sub.add_parser("eval", help="evaluate a base model (foundation row) or a run folder")
    evaluate.add_argument("--run", default=None, help="run folder written by train (default: the base model)")
    add_data_args(evaluate, None)
    add_model_args(evaluate)
    evaluate.add_argument("--split", default=None, help="split to evaluate (default: the eval split)")
    evaluate.add_argument("--batch-size", type=positive_int, default=32)
    evaluate.add_argument("--max-length", type=positive_int, default=None,
                          help="tokens per row (default: the run's, else 128)")
    evaluate.add_argument("--seed", type=int, default=0)
    add_output_args(evaluate)

    generate = sub.add_parser("generate", help="continue a prompt with a base model or a run's adapter")
    generate.add_argument("prompt", nargs="+", help="prompt text (several prompts are generated as a batch)")
    generate.add_argument("--run", default=None, help="run folder whose adapter to use")
    add_model_args(generate)
    add_data_args(generate, None)
    generate.add_argument("--alpaca", action="store_true", help="wrap each prompt in the Alpaca template")
    generate.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=positive_int, default=None)
    generate.add_argument("--top-p", type=positive_float, default=None)
    generate.add_argument("--seed", type=int, default=0)

    merge = sub.add_parser("merge", help="merge a run's LoRA adapter into a Hugging Face checkpoint")
    merge.add_argument("--run", required=True, help="run folder written by train")
    merge.add_argument("--out", required=True, help="folder for the merged checkpoint")
    add_model_args(merge)
    add_data_args(merge, None)

    sweep = sub.add_parser("sweep", help="train a grid of methods/ranks/lrs into one comparison table")
    add_data_args(sweep, "sst2")
    add_model_args(sweep)
    add_method_args(sweep)
    add_train_args(sweep)
    add_output_args(sweep)
    sweep.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods to compare")
    sweep.add_argument("--ranks", nargs="+", type=positive_int, default=None, help="LoRA ranks")
    sweep.add_argument("--alphas", nargs="+", type=positive_float, default=None, help="LoRA alphas")
    sweep.add_argument("--lrs", nargs="+", type=positive_float, default=None, help="learning rates")
    sweep.add_argument("--last-n-blocks-grid", nargs="+", type=positive_int, default=None,
                       help="values of --last-n-blocks")
    sweep.add_argument("--foundation", action="store_true", help="add the untrained base model as a row")

    add_recipe_parsers(sub, train)

    quick = sub.add_parser("quickstart", help="offline demo: tiny GPT-2, synthetic task, lora vs full vs head")
    quick.add_argument("--out", default="runs/quickstart", help="folder for the run folders")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpt2lora`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import tasks

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)

    handlers = {"train": tasks.train_command, "eval": tasks.eval_command, "generate": tasks.generate_command,
                "merge": tasks.merge_command, "sweep": tasks.sweep_command}
    from . import judge, recipes

    handlers.update(reproduce=recipes.reproduce_command, judge=judge.judge_command)
    if getattr(args, "config", None):
        handlers["train"] = recipes.train_config_command
    try:
        if args.command == "quickstart":
            from .quickstart import run_quickstart

            run_quickstart(args.out, seed=args.seed, progress=not args.quiet)
        else:
            handlers[args.command](args)
    except GPT2LoRAError as err:
        print(f"gpt2lora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the Trainer has already logged which checkpoint it saved
        hint = f"; {RESUME_HINT}" if args.command == "train" else ""
        print(f"gpt2lora {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
