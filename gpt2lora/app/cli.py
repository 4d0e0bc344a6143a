"""The ``gpt2lora`` command: ``train``, ``eval``, ``generate``, ``merge``, ``export``, ``push``, ``inspect``, ``sweep``,
``reproduce``, ``judge``, ``quickstart``.

This is the only module that parses arguments. Run settings become flags straight from
:data:`gpt2lora.app.runconfig.SETTINGS` with no defaults of their own (``argparse.SUPPRESS``): a flag left out
keeps the :class:`~gpt2lora.app.runconfig.RunConfig` default, so a command line and a recipe row that say the
same thing resolve to the same configuration. ``train --print-config`` shows it as a recipe file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..devices import set_threads
from ..errors import ConfigError, GPT2LoRAError
from .runconfig import PLACEMENT_KEYS, SETTINGS, RunConfig, Setting, from_settings

# ---------------------------------------------------------------------------------------------- value types


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


#: Most rows ``inspect --rows`` measures the output change on.
MAX_INSPECT_ROWS = 1024


def inspect_rows(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= MAX_INSPECT_ROWS, f"an integer in 1..{MAX_INSPECT_ROWS}")


def any_int(text: str) -> int:
    return _number(text, int, lambda v: True, "an integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0 and v != float("inf"), "a number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def probability(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def clip_value(text: str) -> float | bool:
    value = _number(text, float, lambda v: 0 <= v < float("inf"), "a number > 0, or 0 for no clipping")
    return False if value == 0 else value


def trackers(text: str) -> tuple[str, ...]:
    from ..training.tracking import parse_report_to

    try:
        return parse_report_to(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("report_to: ")) from None


def column_mapping(text: str) -> tuple[str, str]:
    field, sep, column = text.partition("=")
    if not sep or not field or not column:
        raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN (e.g. text=sentence), got {text!r}")
    return field, column


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "int": positive_int, "int0": any_int, "float": positive_float, "float0": non_negative_float,
    "prob": probability, "str": str, "clip": clip_value, "pair": probability, "list": str, "map": column_mapping,
    "backends": trackers,
}
_GROUP_TITLES = {"model": "model", "data": "data", "method": "method", "training": "training",
                 "eval": "evaluation and generation", "output": "output"}

# ---------------------------------------------------------------------------------------------- settings as flags

#: Settings each subcommand takes (by key); ``train`` and ``sweep`` take every one.
TRAIN_KEYS = tuple(s.key for s in SETTINGS)
EVAL_KEYS = ("model", "model_revision", "smoke", "vocab", "device", "precision", "threads", "task", "data",
             "data_root", "data_source", "revision", "columns", "eval_rows", "eval_split", "max_length", "seed",
             "eval_batch_size", "gen_rows", "max_new_tokens", "out", "run_name", "quiet")
GENERATE_KEYS = ("model", "model_revision", "smoke", "vocab", "device", "precision", "threads", "data_root",
                 "max_new_tokens", "seed", "out")


def add_settings(parser: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    """One flag per setting in ``keys``, grouped as in :data:`SETTINGS`, each without a default of its own."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        if setting.key not in keys:
            continue
        group = groups.get(setting.group)
        if group is None:
            group = groups[setting.group] = parser.add_argument_group(_GROUP_TITLES[setting.group])
        _add_flag(group, setting)


def _default_text(setting: Setting) -> str:
    """`` (default: X)`` from the RunConfig defaults, for the help; empty where the help already says it."""
    from .runconfig import RunConfig, to_settings

    defaults = to_settings(RunConfig())
    value = defaults["lora"].get(setting.field) if setting.section == "lora" else defaults.get(setting.key)
    if value is None or value == {} or setting.type == "bool" or "default" in setting.help:
        return ""
    if setting.type == "clip":
        value = value if value is not False else 0
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value)) if value else "none"
    return f" (default: {value})"


def _add_flag(group: argparse._ArgumentGroup, setting: Setting) -> None:
    kwargs: dict[str, Any] = {"dest": setting.key, "default": argparse.SUPPRESS,
                              "help": setting.help + _default_text(setting)}
    if setting.type == "bool":
        kwargs["action"] = "store_false" if setting.option.startswith("--no-") else "store_true"
    else:
        kwargs["type"] = _CONVERTERS[setting.type]
        if setting.type == "list":
            kwargs.update(nargs="+", metavar="LAYER")
        elif setting.type == "pair":
            kwargs.update(nargs=2, metavar=("BETA1", "BETA2"))
        elif setting.type == "map":
            kwargs.update(action="append", metavar="FIELD=COLUMN")
        elif setting.type == "backends":
            kwargs["metavar"] = "tensorboard,wandb,none"
        if setting.choices and setting.type != "backends":
            kwargs["choices"] = setting.choices
            if setting.type == "list":
                kwargs["help"] += f"; choose among {', '.join(setting.choices)}"
    group.add_argument(setting.option, **kwargs)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line gave, as recipe-row values (LoRA ones in a ``lora`` table)."""
    values: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key not in vars(args):
            continue
        value = getattr(args, setting.key)
        if setting.type == "map":
            value = dict(value)
        elif setting.type in ("list", "pair", "backends"):
            value = list(value)
        if setting.section == "lora":
            lora[setting.field] = value
        else:
            values[setting.key] = value
    if lora:
        values["lora"] = lora
    return values


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a command line: the given flags over the defaults."""
    # paths given on the command line are relative to where it runs; a recipe's, to the recipe's folder
    return from_settings(given_settings(args), where="", relative_to=os.getcwd())


# ---------------------------------------------------------------------------------------------- parser

class OneLineParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line on stderr (exit status 2), like the library's errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gpt2lora", description="Fine-tune GPT-2 with LoRA (or fully) and "
                                     "compare honestly: accuracy/F1, trainable parameters, time, memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune on a task and write a run folder")
    add_settings(train, TRAIN_KEYS)
    recipe = train.add_argument_group("recipe")
    recipe.add_argument("--config", default=None, metavar="FILE.toml",
                        help="run the rows of a recipe file (the format --print-config writes); only "
                             f"{', '.join('--' + k.replace('_', '-') for k in PLACEMENT_KEYS)} may be given besides")
    recipe.add_argument("--print-config", action="store_true",
                        help="print the fully resolved settings as a recipe file (TOML) and exit")

    evaluate = sub.add_parser("eval", help="evaluate a base model (foundation row) or a run folder")
    evaluate.add_argument("--run", default=None, help="run folder written by train (default: the base model)")
    evaluate.add_argument("--split", default=None, help="split to evaluate (default: the eval split)")
    evaluate.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="run folder (same as --run)")
    harness = evaluate.add_argument_group("lm-evaluation-harness (pip install gpt2lora[eval])")
    harness.add_argument("--harness", nargs="+", default=None, metavar="TASK",
                         help="score lm-eval tasks (lambada_openai, hellaswag, ...) instead of the run's task")
    harness.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per task")
    harness.add_argument("--limit", type=positive_float, default=None, metavar="N",
                         help="first N documents per task (a fraction below 1)")
    harness.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra task YAML files")
    add_settings(evaluate, EVAL_KEYS)

    generate = sub.add_parser("generate", help="continue a prompt with a base model or a run's adapter")
    generate.add_argument("prompt", nargs="+", help="prompt text (several prompts are generated as a batch)")
    generate.add_argument("--run", default=None, help="run folder whose adapter to use")
    generate.add_argument("--alpaca", action="store_true", help="wrap each prompt in the Alpaca template")
    generate.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=positive_int, default=None)
    generate.add_argument("--top-p", type=positive_float, default=None)
    add_settings(generate, GENERATE_KEYS)

    merge = sub.add_parser("merge", help="merge a run's LoRA adapter into a Hugging Face checkpoint")
    merge.add_argument("--run", required=True, help="run folder written by train")
    merge.add_argument("--out", required=True, help="folder for the merged checkpoint")

    export = sub.add_parser("export", help="write a run (merged, or its adapter) or a checkpoint as GGUF for "
                            "llama.cpp / Ollama")
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or hub id")
    export.add_argument("--format", default="gguf", choices=["gguf"], help="file format")
    export.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                        help="type of the 2-D weights (norms and biases stay f32)")
    export.add_argument("--out", default=None, metavar="FILE", help="output file (default: beside the source)")
    export.add_argument("--adapter-only", action="store_true",
                        help="write the run's LoRA adapter as a llama.cpp adapter GGUF instead of a merged model")

    push = sub.add_parser("push", help="upload a run's adapter (or merged checkpoint) and a model card to the hub")
    push.add_argument("run", metavar="RUN_DIR", help="run folder written by train")
    push.add_argument("repo_id", metavar="OWNER/NAME", help="hub model repository (created if missing)")
    push.add_argument("--merged", action="store_true", help="upload the merged checkpoint (transformers loads it) "
                      "instead of the adapter (peft loads it)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, metavar="BRANCH", help="branch to push to (created if missing)")

    inspect = sub.add_parser("inspect", help="did the adapter learn? matched layers, update norms, effective rank")
    inspect.add_argument("path", metavar="RUN|ADAPTER_DIR", help="a run folder or an adapter folder")
    inspect.add_argument("--model", default=None, help="base checkpoint to load it onto (default: the run's / the "
                         "adapter's base_model_name_or_path)")
    inspect.add_argument("--rows", type=inspect_rows, default=4, help="rows the output change is measured on "
                         f"(at most {MAX_INSPECT_ROWS}; run through the model a few at a time)")
    inspect.add_argument("--max-layers", type=positive_int, default=None, help="show at most N layers")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    sweep = sub.add_parser("sweep", help="train a grid of methods/ranks/lrs into one comparison table")
    add_settings(sweep, TRAIN_KEYS)
    grid = sweep.add_argument_group("grid")
    grid.add_argument("--methods", nargs="+", default=None, help="methods to compare",
                      choices=[m for m in SETTINGS_CHOICES("method") if m != "none"])
    grid.add_argument("--ranks", nargs="+", type=positive_int, default=None, help="LoRA ranks")
    grid.add_argument("--alphas", nargs="+", type=positive_float, default=None, help="LoRA alphas")
    grid.add_argument("--lrs", nargs="+", type=positive_float, default=None, help="learning rates")
    grid.add_argument("--last-n-blocks-grid", nargs="+", type=positive_int, default=None,
                      help="values of --last-n-blocks")
    grid.add_argument("--foundation", action="store_true", help="add the untrained base model as a row")

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

    serve = sub.add_parser("serve", help="OpenAI-compatible server: a base model and many adapters, batched together")
    serve.add_argument("base", metavar="BASE", help="hub id or local checkpoint folder of the base model")
    serve.add_argument("--adapter", action="append", default=None, metavar="NAME=RUN_OR_ADAPTER_DIR",
                       help="serve a LoRA adapter (run folder or adapter folder) as model NAME; repeatable")
    serve.add_argument("--name", default=None, help="the base model's name in the API (default: BASE)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $GPT2LORA_SERVE_API_KEY, else open)")
    serve.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default: 16)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those (default: 256)")
    serve.add_argument("--max-tokens", type=int, default=None,
                       help="most new tokens one request may ask for (default: the context length)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                       help="weights' precision: bf16 on CUDA and on x86 CPUs (without bf16 units through "
                            "fbgemm's fp16 product), fp16 on CUDA (default: fp32)")
    serve.add_argument("--adapter-root", default=None, metavar="DIR",
                       help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter, loading only from "
                            "folders under DIR")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    serve.add_argument("--huge-pages", action="store_true",
                       help="put the base's CPU weights on 2 MB pages where Linux allows it: fp32 decoding about "
                            "1.1x faster, the first load seconds slower")

    quick = sub.add_parser("quickstart", help="offline demo: tiny GPT-2, synthetic task, lora vs full vs head")
    quick.add_argument("--out", default="runs/quickstart", help="folder for the run folders")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--quiet", action="store_true")
    return parser


def SETTINGS_CHOICES(key: str) -> tuple[str, ...]:
    return next(s.choices for s in SETTINGS if s.key == key)


# ---------------------------------------------------------------------------------------------- commands

def _train(args: argparse.Namespace) -> None:
    from ..training.distributed import is_main_process
    from . import recipes, report
    from .run import run

    if args.config:
        given = given_settings(args)
        refused = sorted(s.option for s in SETTINGS if s.key in vars(args) and s.key not in PLACEMENT_KEYS)
        if refused:
            flags = ", ".join(refused)
            raise ConfigError(f"--config {args.config}: {flags} given on the command line; with --config the run "
                              "settings come from the file (put them in its [defaults] or a row)")
        recipe = recipes.read_recipe(args.config)
        overrides = {k: v for k, v in given.items() if k in PLACEMENT_KEYS}
        if given.get("plan"):
            from .plan import plan_text
            from .runconfig import from_settings

            rows = [(row.name, from_settings(overrides, base=row.config(row.seeds[0], relative_to=recipe.path.parent)))
                    for row in recipe.rows]
            print(plan_text(rows))
            return
        if args.print_config:
            print(recipes.recipe_toml(recipe, overrides), end="")
            return
        command = f"gpt2lora train --config {args.config}" + (" --smoke" if given.get("smoke") else "")
        recipes.run_recipe(recipe, recipes.RecipeOptions.from_overrides(overrides), command)
        return
    config = run_config(args)
    if config.plan:
        from .plan import plan_text

        print(plan_text([(config.run_name or config.label, config)]))
        return
    if args.print_config:
        from .runconfig import to_toml

        resolved = config.resolved()
        print(to_toml([(resolved.run_name or f"{resolved.label}-{resolved.method}", resolved)], "gpt2lora train"),
              end="")
        return
    row = run(config)
    if is_main_process():
        print(report.markdown_table([row]))
        print(f"run folder: {row['run_dir']}")


def _eval(args: argparse.Namespace) -> None:
    from .commands import evaluate_command

    if args.run_dir is not None:
        if args.run is not None and args.run != args.run_dir:
            raise ConfigError(f"eval: RUN {args.run_dir} and --run {args.run} disagree; give one")
        args.run = args.run_dir
    if args.harness is not None:
        from .harness import harness_command

        config = run_config(args)
        from .run import base_checkpoint

        harness_command(args.harness, run_dir=args.run, model=None if args.run else base_checkpoint(config),
                        num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                        batch_size=config.eval_batch_size or 16, device=config.train.device)
        return
    evaluate_command(run_config(args), run_dir=args.run, split=args.split,
                     given=set(given_settings(args)))


def _generate(args: argparse.Namespace) -> None:
    from .commands import generate_command

    generate_command(run_config(args), args.prompt, run_dir=args.run, alpaca=args.alpaca,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _merge(args: argparse.Namespace) -> None:
    from .commands import merge_command

    merge_command(args.run, args.out)


def _export(args: argparse.Namespace) -> None:
    from .gguf_export import export_command

    export_command(args.source, fmt=args.format, dtype=args.dtype, out=args.out, adapter_only=args.adapter_only)


def _push(args: argparse.Namespace) -> None:
    from .publish import push_run

    result = push_run(args.run, args.repo_id, merged=args.merged, private=args.private, revision=args.revision)
    print(f"pushed {len(result.uploaded)} files to {args.repo_id}@{result.revision}: {result.url}")


def _inspect(args: argparse.Namespace) -> None:
    from ..peft.diagnostics import format_diagnostics, inspect_adapter

    report = inspect_adapter(args.path, model=args.model, rows=args.rows)
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_diagnostics(report, args.max_layers))


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import Grid, sweep

    grid = Grid(methods=args.methods, ranks=args.ranks, alphas=args.alphas, lrs=args.lrs,
                last_n_blocks=args.last_n_blocks_grid, foundation=args.foundation)
    base = run_config(args)
    if base.plan:  # one plan per grid point, nothing trained
        from .plan import plan_text
        from .sweep import grid_points, point_config

        points = grid_points(base, grid)
        print(plan_text([(f"{p['method']}" + (f" r={p['rank']}" if p["rank"] else "")
                          + (f" last {p['last_n_blocks']}" if p["last_n_blocks"] else ""), point_config(base, p))
                         for p in points]))
        return
    sweep(base, grid)


def _reproduce(args: argparse.Namespace) -> None:
    from . import recipes

    recipes.reproduce(args.name, list_only=args.list, data=args.data, smoke=args.smoke, vocab=args.vocab,
                      device=args.device, out=args.out, run_name=args.run_name, judge_endpoint=args.judge_endpoint,
                      judge_model=args.judge_model)


def _judge(args: argparse.Namespace) -> None:
    from .judge import judge_command

    judge_command(run=args.run, endpoint=args.endpoint, model=args.model, prompt_file=args.prompt_file,
                  low=args.low, high=args.high, retries=args.retries, timeout=args.timeout, api_key=args.api_key)


def _serve(args: argparse.Namespace) -> None:
    from .serve import parse_adapters, serve

    serve(args.base, parse_adapters(args.adapter), host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("GPT2LORA_SERVE_API_KEY") or None, adapter_root=args.adapter_root,
          name=args.name, device=args.device, precision=args.precision, max_batch=args.max_batch,
          max_queue=args.max_queue, max_tokens=args.max_tokens, huge_pages=args.huge_pages)


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart

    run_quickstart(args.out, seed=args.seed, progress=not args.quiet)


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": _train, "eval": _eval, "generate": _generate, "merge": _merge, "export": _export, "push": _push, "inspect": _inspect,
    "sweep": _sweep,
    "reproduce": _reproduce, "judge": _judge, "quickstart": _quickstart, "serve": _serve}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpt2lora`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    set_threads(getattr(args, "threads", None), "--threads")
    try:
        HANDLERS[args.command](args)
    except GPT2LoRAError as err:
        print(f"gpt2lora {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused (a file where a folder goes, a name too long, ...)
        where = f"{err.filename}: " if err.filename else ""
        print(f"gpt2lora {args.command}: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the Trainer has already logged which checkpoint it saved
        from .run import RESUME_HINT

        hint = f"; {RESUME_HINT}" if args.command == "train" else ""
        print(f"gpt2lora {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n"))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "given_settings", "main", "run_config"]
