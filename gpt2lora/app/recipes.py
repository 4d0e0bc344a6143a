"""Recipes: experiments kept as TOML files (read with the standard library's ``tomllib``).

A recipe holds one experiment or a table of them, plus the figures a report published for each
row and where they come from. The shipped recipes (``gpt2lora/app/recipes/*.toml``) are the tables of
the five reports in ``shared/references``; ``gpt2lora reproduce NAME`` runs one and writes
``report.md`` with the published figures and this run's side by side. Users write their own and
run them with ``gpt2lora train --config FILE.toml``.

Layout::

    title = "..."                     # one line, shown by `gpt2lora reproduce --list`
    description = "..."               # optional
    notes = ["...", ...]              # optional, copied into the report
    source = { report = "file.md", table = "Table 3" }   # where the published figures come from

    [defaults]                        # run settings shared by every row (RUN_FIELDS)
    task = "sst2"
    lora = { rank = 8, alpha = 16 }

    [[rows]]
    name = "LoRA r=8"                 # required
    method = "lora"                   # any run setting overrides [defaults]; lora tables merge key by key
    source = { ... }                  # optional: overrides the recipe's source for this row
    note = "..."                      # optional
    published = { accuracy = 0.87, trainable_params = 148000 }   # FIGURES

Settings a report leaves open are left out (the library default applies) and said in a comment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import LoRAConfig
from ..constants import HISTORY_FILE, RECIPE_REPORT_FILE, RESPONSES_FILE, RESULTS_FILE
from ..data.tasks import TASKS
from ..devices import set_threads
from ..errors import ConfigError
from .folders import check_run_name, claimed
from .runconfig import RUN_METHODS, RUNNER_KEYS, SETTINGS, RunConfig, from_settings, to_toml

_NUMBER = (int, float)
#: What a recipe value of each setting type must be: accepted Python types, and the words of the error.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "a positive integer"), "int0": ((int,), "an integer"), "float": (_NUMBER, "a number > 0"),
    "float0": (_NUMBER, "a number >= 0"), "prob": (_NUMBER, "a number in [0, 1)"), "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"), "list": ((list,), "a list of layer names"),
    "map": ((dict,), "a table of FIELD = COLUMN strings"),
    "clip": ((int, float, bool), "a number > 0, or false for no clipping"), "pair": ((list,), "two numbers"),
    "backends": ((list,), "a list of tracker names (tensorboard, wandb)"),
}
#: Run settings a recipe's ``[defaults]`` or a row may hold (every :data:`~gpt2lora.app.runconfig.SETTINGS` key
#: outside the ``lora`` table, ``seeds``, ``lora`` and the older ``last_n``): name -> (types, expected).
RUN_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    **{s.key: _TYPES[s.type] for s in SETTINGS if s.section != "lora"},
    "last_n": ((int,), "a positive integer (blocks trained by last_n_full; same as last_n_blocks)"),
    "lora": ((dict,), "a table of LoRA settings"),
    "seeds": ((list,), "a list of integers"),
}
#: Keys of a ``lora`` table: the fields of :class:`~gpt2lora.config.LoRAConfig`.
LORA_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    **{s.field: _TYPES[s.type] for s in SETTINGS if s.section == "lora"},
    "last_n_blocks": ((int,), "a positive integer"),
}


@dataclass(frozen=True)
class Figure:
    """A figure a report can publish: its label, unit, and how this run's value is read from a result row."""

    label: str
    key: str
    factor: float = 1.0
    unit: str = ""


#: Published figures a row may list, by the name the published report gives (HF Trainer's words: ``f1``,
#: ``eval_loss``), and the key of a gpt2lora result row that holds the figure (``f1_macro``, ``loss``).
#: Fractions stay fractions (0.8693, not 86.93).
FIGURES: dict[str, Figure] = {f: Figure(*spec) for f, spec in {
    "accuracy": ("Accuracy", "accuracy", 1.0, "fraction"),
    "f1": ("F1 (macro)", "f1_macro", 1.0, "fraction"),
    "precision": ("Precision (macro)", "precision_macro", 1.0, "fraction"),
    "recall": ("Recall (macro)", "recall_macro", 1.0, "fraction"),
    "eval_loss": ("Eval loss", "loss", 1.0, ""),
    "train_loss": ("Training loss (mean over the run)", "train_loss", 1.0, ""),
    "exact_match": ("Exact match", "exact_match", 1.0, "fraction"),
    "squad_f1": ("SQuAD F1", "squad_f1", 1.0, "fraction"),
    "rouge_l_f1": ("ROUGE-L F1", "rouge_l_f1", 1.0, "fraction"),
    "judge_score": ("LLM-judge score (0-100)", "judge_score", 1.0, ""),
    "perplexity": ("Perplexity", "perplexity", 1.0, ""),
    "trainable_params": ("Trainable parameters", "trainable_params", 1.0, "count"),
    "trainable_pct": ("Trainable share (%)", "trainable_pct", 1.0, "%"),
    "train_time_s": ("Training time (s)", "train_time_s", 1.0, "s"),
    "train_time_min": ("Training time (min)", "train_time_s", 1 / 60, "min"),
    "eval_time_s": ("Eval runtime (s)", "eval_time_s", 1.0, "s"),
    "samples_per_s": ("Training samples/s", "samples_per_s", 1.0, "/s"),
    "eval_samples_per_s": ("Eval samples/s", "eval_samples_per_s", 1.0, "/s"),
    "eval_steps_per_s": ("Eval steps/s", "eval_steps_per_s", 1.0, "/s"),
    "peak_memory_gb": ("Peak memory (GB)", "peak_memory_mb", 1 / 1024, "GB"),
    "memory_added_gb": ("Memory added by training (GB)", "memory_added_mb", 1 / 1024, "GB"),
}.items()}

_TOP_KEYS = {"name", "title", "description", "notes", "source", "defaults", "rows"}
_ROW_KEYS = {"name", "published", "source", "note"}
_SOURCE_KEYS = {"report", "table", "url"}


@dataclass(frozen=True)
class RecipeRow:
    """One experiment of a recipe: its settings (defaults merged in), published figures and their source."""

    name: str
    settings: dict[str, Any]
    published: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] | None = None
    note: str = ""

    @property
    def method(self) -> str:
        return self.settings.get("method", "lora")

    @property
    def seeds(self) -> list[int]:
        return list(self.settings.get("seeds") or [self.settings.get("seed", 0)])

    def config(self, seed: int | None = None, relative_to: str | os.PathLike | None = None) -> RunConfig:
        """The row's RunConfig (with ``seed`` when given; ``data`` paths relative to ``relative_to``)."""
        values = {k: v for k, v in self.settings.items() if k != "seeds"}
        if seed is not None:
            values["seed"] = seed
        return from_settings(values, relative_to=relative_to)

    def lora_config(self) -> LoRAConfig | None:
        """The row's LoRAConfig (None unless the method is lora)."""
        return self.config().lora_config


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe file."""

    name: str
    title: str
    path: Path
    rows: list[RecipeRow]
    description: str = ""
    notes: list[str] = field(default_factory=list)
    source: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------- parsing

def _fail(where: str, key: str, expected: str, value: Any = dataclasses.MISSING) -> ConfigError:
    got = "" if value is dataclasses.MISSING else f", got {value!r}"
    return ConfigError(f"{where}: {key}: expected {expected}{got}")


def _check_type(where: str, key: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    # TOML booleans are ints to isinstance; only grad_clip / use_rslora accept them
    if isinstance(value, bool) and bool not in types:
        raise _fail(where, key, expected, value)
    if not isinstance(value, types):
        raise _fail(where, key, expected, value)


def _check_table(where: str, prefix: str, table: Any, allowed: Mapping[str, tuple[tuple[type, ...], str]]) -> None:
    if not isinstance(table, dict):
        raise _fail(where, prefix, "a table", table)
    for key, value in table.items():
        if key not in allowed:
            raise _fail(where, f"{prefix}.{key}", f"a known key (unknown key; known: {', '.join(allowed)})")
        _check_type(where, f"{prefix}.{key}", value, *allowed[key])


def _check_source(where: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail(where, key, 'a table like { report = "file.md", table = "Table 3" }', value)
    unknown = set(value) - _SOURCE_KEYS
    if unknown:
        raise _fail(where, f"{key}.{min(unknown)}", f"one of the keys {', '.join(sorted(_SOURCE_KEYS))}")
    for name in ("report", "table"):
        if not isinstance(value.get(name), str) or not value[name].strip():
            raise _fail(where, f"{key}.{name}", "a non-empty string naming where the figures were published",
                        value.get(name))
    return {k: str(v) for k, v in value.items()}


def _check_settings(where: str, key: str, settings: dict[str, Any]) -> None:
    """Validate merged run settings by building the RunConfig they describe."""
    method = settings.get("method", "lora")
    if method not in RUN_METHODS:
        raise _fail(where, f"{key}.method", f"one of {', '.join(RUN_METHODS)}", method)
    if "task" not in settings and "data" not in settings:
        raise _fail(where, f"{key}.task", 'a task: task = "<preset>" (in [defaults] or the row) or '
                    'data = "<file or folder>"')
    task = settings.get("task")
    if task is not None and task not in TASKS:
        raise _fail(where, f"{key}.task", f"a task preset ({', '.join(TASKS)}); use data = \"path\" for "
                    "your own files", task)
    seeds = settings.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(where, f"{key}.seeds", "a non-empty list of integers", seeds)
    if len(set(seeds)) != len(seeds):
        raise _fail(where, f"{key}.seeds", "different seeds (each trains its own run; a repeated one would "
                    "count the same run twice in the mean)", seeds)
    for ignored in RUNNER_KEYS:
        if ignored in settings:
            raise _fail(where, f"{key}.{ignored}", f"no {ignored} in a recipe: the command sets it "
                        f"(--{ignored.replace('_', '-')}) for the whole recipe", settings[ignored])
    if method == "last_n_full" and "last_n" not in settings and "last_n_blocks" not in settings:
        raise _fail(where, f"{key}.last_n_blocks", "the number of blocks last_n_full trains")
    try:
        RecipeRow("", settings).config()
    except ConfigError as err:
        raise ConfigError(f"{where}: {key}: {err}") from None


def parse_recipe(data: Mapping[str, Any], path: str | os.PathLike, name: str | None = None) -> Recipe:
    """Validate a recipe read from ``path`` (the TOML text already parsed into ``data``)."""
    where = str(path)
    for key in data:
        if key not in _TOP_KEYS:
            raise _fail(where, key, f"a known top-level key (unknown key; known: {', '.join(sorted(_TOP_KEYS))})")
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _fail(where, "title", "a one-line string describing the experiment", title)
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _fail(where, key, "a string", data[key])
    if "name" in data:
        check_run_name(data["name"], f"{where}: name")  # report folders are named after it
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _fail(where, "notes", "a list of strings", notes)
    source = _check_source(where, "source", data["source"]) if "source" in data else None
    defaults = data.get("defaults", {})
    _check_table(where, "defaults", defaults, RUN_FIELDS)
    if "lora" in defaults:
        _check_table(where, "defaults.lora", defaults["lora"], LORA_FIELDS)
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise _fail(where, "rows", "one or more [[rows]] tables", raw_rows)
    rows, seen = [], set()
    for i, raw in enumerate(raw_rows):
        key = f"rows[{i}]"
        if not isinstance(raw, dict):
            raise _fail(where, key, "a table", raw)
        run = {k: v for k, v in raw.items() if k not in _ROW_KEYS}
        _check_table(where, key, run, RUN_FIELDS)
        if "lora" in run:
            _check_table(where, f"{key}.lora", run["lora"], LORA_FIELDS)
        row_name = raw.get("name")
        if not isinstance(row_name, str) or not row_name.strip():
            raise _fail(where, f"{key}.name", "a non-empty string naming the row", row_name)
        if row_name in seen:
            raise _fail(where, f"{key}.name", "a name no other row has", row_name)
        seen.add(row_name)
        key = f"rows[{i}] ({row_name})"
        settings = {**defaults, **run}
        if "lora" in defaults or "lora" in run:
            settings["lora"] = {**defaults.get("lora", {}), **run.get("lora", {})}
        _check_settings(where, key, settings)
        row_source = _check_source(where, f"{key}.source", raw["source"]) if "source" in raw else None
        published = raw.get("published", {})
        if not isinstance(published, dict):
            raise _fail(where, f"{key}.published", "a table of figures", published)
        for figure, value in published.items():
            if figure not in FIGURES:
                raise _fail(where, f"{key}.published.{figure}", f"a known figure ({', '.join(FIGURES)})")
            if isinstance(value, bool) or not isinstance(value, _NUMBER):
                raise _fail(where, f"{key}.published.{figure}", "a number", value)
        if published and row_source is None and source is None:
            raise _fail(where, f"{key}.published", "a source for the published figures: source = { report = "
                        '"file.md", table = "..." } at the top of the recipe or in the row')
        note = raw.get("note", "")
        if not isinstance(note, str):
            raise _fail(where, f"{key}.note", "a string", note)
        rows.append(RecipeRow(row_name, settings, {k: float(v) for k, v in published.items()},
                              row_source or source, note))
    recipe_name = data.get("name") or name or Path(path).stem
    return Recipe(recipe_name, title.strip(), Path(path), rows, data.get("description", ""), notes, source)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
    return parse_recipe(data, path)


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with gpt2lora, by name (file stem)."""
    folder = resources.files("gpt2lora.app") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml")}


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    shipped = shipped_recipes()
    if str(name_or_path) in shipped:
        return read_recipe(shipped[str(name_or_path)])
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return read_recipe(path)
    raise ConfigError(f"recipe {str(name_or_path)!r}: not a shipped recipe ({', '.join(shipped)}) and not a "
                      ".toml file")


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line title)`` of every shipped recipe."""
    return [(name, read_recipe(path).title) for name, path in shipped_recipes().items()]


# ---------------------------------------------------------------------------------------------- running

#: ``--smoke`` runs tasks with no local copy on the nearest local benchmark folder.
SMOKE_TASKS = {"enron_spam": "sms_spam", "medical_nli": "snli"}
#: Caps of a ``--smoke`` row: a few dozen rows, a few steps, short sequences (seconds per row on a CPU).
SMOKE_CAPS = {"train_rows": 24, "eval_rows": 16, "gen_rows": 2, "max_new_tokens": 4, "max_length": 32,
              "batch_size": 8, "max_steps": 3}
#: Result keys shown for a row that published nothing (the warmup and batch-size comparisons).
MEASURED_ONLY = ("accuracy", "f1", "eval_loss", "exact_match", "squad_f1", "rouge_l_f1", "judge_score",
                 "trainable_params", "train_time_s", "peak_memory_gb", "memory_added_gb")


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in keep.split("-") if part)[:40] or "row"


@dataclass(frozen=True)
class RecipeOptions:
    """Where and how a recipe runs: the report folder, and the placement settings the command gave
    (``smoke``, ``vocab``, ``device``, ``data_root``, ``source``, ``threads``). One given here holds for every
    row; one left None keeps what each row (or ``[defaults]``) says, else the RunConfig default."""

    out: str = "runs"
    run_name: str | None = None
    smoke: bool = False
    device: str | None = None
    data_root: str | None = None
    source: str | None = None
    vocab: str | None = None
    threads: int | None = None

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any]) -> RecipeOptions:
        """From the placement flags given to ``train --config``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        renamed = {("source" if k == "data_source" else k): v for k, v in overrides.items()}
        return cls(**{k: v for k, v in renamed.items() if k in fields})


def row_config(recipe: Recipe, row: RecipeRow, seed: int, options: RecipeOptions) -> tuple[RunConfig, list[str]]:
    """The RunConfig of one row and seed, and notes on what smoke mode changed.

    Settings the row leaves out take the RunConfig defaults — the same ones a bare command line gets.
    """
    config = row.config(seed, relative_to=recipe.path.parent)
    notes: list[str] = []

    def given(value: Any, row_value: Any) -> Any:
        return row_value if value is None else value

    source = "local" if options.smoke else given(options.source, config.source)
    config = dataclasses.replace(config, out=options.out, data_root=given(options.data_root, config.data_root),
                                 source=source, smoke=options.smoke, vocab=given(options.vocab, config.vocab),
                                 threads=given(options.threads, config.threads), quiet=True,
                                 plots=not options.smoke,
                                 train=dataclasses.replace(config.train,
                                                           device=given(options.device, config.train.device)))
    if not options.smoke:
        return config, notes
    if config.task in SMOKE_TASKS:
        notes.append(f"{config.task} has no local copy; --smoke ran it on {SMOKE_TASKS[config.task]}")
        config = dataclasses.replace(config, task=SMOKE_TASKS[config.task])
    capped = {name: cap if getattr(config, name) is None else min(getattr(config, name), cap)
              for name, cap in SMOKE_CAPS.items() if name not in ("batch_size", "max_steps")}
    train = config.train
    train = dataclasses.replace(train, epochs=1, batch_size=min(train.batch_size, SMOKE_CAPS["batch_size"]),
                                max_steps=min(train.max_steps or SMOKE_CAPS["max_steps"], SMOKE_CAPS["max_steps"]))
    eval_batch = min(config.eval_batch_size or train.batch_size, SMOKE_CAPS["batch_size"])
    from .run import SMOKE_SHAPE

    depth = SMOKE_SHAPE["n_layer"]
    last_n = config.last_n_blocks
    if last_n is not None and last_n > depth:
        notes.append(f"last {last_n} blocks -> last {depth} (the smoke model has {depth})")
        last_n = depth
    return dataclasses.replace(config, **capped, train=train, eval_batch_size=eval_batch, last_n_blocks=last_n), notes


def _train_loss(run_dir: Path) -> float | None:
    """Mean training loss over the run's optimizer steps (what transformers' Trainer reports)."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return None
    losses = [r["loss"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())
              if r.get("type") == "step" and isinstance(r.get("loss"), (int, float))]
    return sum(losses) / len(losses) if losses else None


def _mean_rows(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(results[0])
    for key in results[0]:
        values = [r.get(key) for r in results]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(values) > 1:
            merged[key] = sum(values) / len(values)
    return merged


def run_row(recipe: Recipe, index: int, row: RecipeRow, folder: Path, options: RecipeOptions,
            judge: Callable[[Path], float | None] | None = None) -> dict[str, Any]:
    """Train (or evaluate) one row once per seed under ``folder``; numeric results are averaged over seeds."""
    from .run import run

    results, notes = [], []
    for seed in row.seeds:
        config, notes = row_config(recipe, row, seed, options)
        run_dir = folder / f"{index:02d}-{_slug(row.name)}-s{seed}"
        result = run(config, run_dir)
        result["train_loss"] = _train_loss(run_dir)
        if result.get("eval_time_s") and result.get("eval_rows"):
            steps = math.ceil(result["eval_rows"] / (config.eval_batch_size or config.train.batch_size))
            result["eval_steps_per_s"] = steps / result["eval_time_s"]
        if judge is not None and (run_dir / RESPONSES_FILE).is_file():
            result["judge_score"] = judge(run_dir)
        results.append(result)
    merged = _mean_rows(results)
    merged.update(row=row.name, seeds=row.seeds, smoke_notes=notes, run_dirs=[r["run_dir"] for r in results])
    if merged.get("peak_memory_mb") is not None:
        merged["peak_memory_gb"] = merged["peak_memory_mb"] / 1024
    if merged.get("memory_added_mb") is not None:
        merged["memory_added_gb"] = merged["memory_added_mb"] / 1024
    return merged


def machine() -> dict[str, str]:
    """What ran this: platform, Python, torch, CPU threads and the accelerator, if any."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(figure: Figure, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if figure.unit == "fraction":
        return f"{100 * value:.2f}%"
    if figure.unit == "count":
        return f"{round(value):,}"
    return f"{value:.4g}"


def _difference(figure: Figure, published: float, measured: float | None) -> str:
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "–"
    delta = measured - published
    if figure.unit == "fraction":
        return f"{100 * delta:+.2f} pp"
    relative = f" ({100 * delta / published:+.1f}%)" if published else ""
    if figure.unit == "count":
        return f"{round(delta):+,}{relative}"
    return f"{delta:+.4g}{relative}"


def measured(result: Mapping[str, Any], name: str) -> float | None:
    """This run's value of a published figure, in the figure's unit."""
    figure = FIGURES[name]
    value = result.get(figure.key)
    if name in ("peak_memory_gb", "memory_added_gb"):
        value = result.get(figure.key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return value * figure.factor


def comparison_rows(recipe: Recipe, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (row, figure): published, this run, difference; rows that published nothing show
    what was measured."""
    lines = []
    for row, result in zip(recipe.rows, results):
        names = list(row.published) or [n for n in MEASURED_ONLY if measured(result, n) is not None]
        if "peak_memory_gb" in names and "memory_added_gb" not in names:  # the peak's companion, per run
            names.insert(names.index("peak_memory_gb") + 1, "memory_added_gb")
        for name in names:
            figure, value = FIGURES[name], measured(result, name)
            published = row.published.get(name)
            lines.append({"row": row.name, "figure": name, "label": figure.label, "published": published,
                          "this_run": value,
                          "published_text": _fmt(figure, published) if published is not None else "not published",
                          "this_run_text": _fmt(figure, value) if value is not None else _missing(name),
                          "difference": _difference(figure, published, value) if published is not None else "–"})
    return lines


def _missing(name: str) -> str:
    if name == "judge_score":
        return "– (no judge: gpt2lora judge RUN_DIR --endpoint URL --model NAME)"
    return "– (not measured)"


def write_report(recipe: Recipe, results: list[dict[str, Any]], folder: Path, options: RecipeOptions,
                 command: str) -> Path:
    """``report.md`` (published and this run side by side, the difference, the machine) and ``results.json``."""
    lines = comparison_rows(recipe, results)
    info = machine()
    parts = [f"# {recipe.title}\n", f"Recipe `{recipe.name}` ({recipe.path.name})."]
    if recipe.source:
        parts.append(f"Published figures: {recipe.source['report']}, {recipe.source['table']}.")
    if recipe.description:
        parts.append(recipe.description.strip())
    parts.append(f"\nCommand: `{command}`\n")
    devices = sorted({str(row.settings.get("device", "auto")) for row in recipe.rows})
    device = options.device or ", ".join(devices)
    parts.append("Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + f"; device {device}\n")
    if options.smoke:
        parts.append("**Smoke run**: a tiny random GPT-2 (2 blocks, width 32) on a few dozen local rows for a few "
                     "steps. It checks the pipeline; its figures are not comparable with the published ones.\n")
    parts.append("| Row | Figure | Published | This run | Difference |\n|---|---|---|---|---|")
    for line in lines:
        parts.append(f"| {line['row']} | {line['label']} | {line['published_text']} | {line['this_run_text']} | "
                     f"{line['difference']} |")
    parts.append("\n## Rows\n")
    for row, result in zip(recipe.rows, results):
        settings = ", ".join(f"{k}={v}" for k, v in row.settings.items())
        where = f" — published in {row.source['report']}, {row.source['table']}" if row.source else ""
        extra = [row.note] if row.note else []
        extra += result.get("smoke_notes", [])
        if result.get("rouge_l_f1") is not None:
            extra.append(f"offline reference metrics: exact match {100 * result['exact_match']:.2f}%, ROUGE-L F1 "
                         f"{100 * result['rouge_l_f1']:.2f}% over {result.get('generated_rows')} responses")
        parts.append(f"- **{row.name}**{where}: {settings}; seeds {row.seeds}; run folders: "
                     + ", ".join(f"`{Path(d).name}`" for d in result["run_dirs"])
                     + "".join(f"\n  - {e}" for e in extra))
    if recipe.notes:
        parts.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in recipe.notes))
    path = folder / RECIPE_REPORT_FILE
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    (folder / RESULTS_FILE).write_text(json.dumps({"recipe": recipe.name, "machine": info, "command": command,
                                                     "smoke": bool(options.smoke), "comparison": lines,
                                                     "results": results}, indent=2, default=str) + "\n",
                                         encoding="utf-8")
    return path


def run_recipe(recipe: Recipe, options: RecipeOptions, command: str = "gpt2lora reproduce",
               judge: Callable[[Path], float | None] | None = None) -> Path:
    """Run every row of ``recipe`` into ``<options.out>/<recipe name>-<time>/`` and write its report."""
    smoke_rows = [row.name for row in recipe.rows if row.settings.get("smoke")]
    if smoke_rows and not options.smoke:
        raise ConfigError(f"{recipe.path}: rows {', '.join(smoke_rows)} say smoke = true; smoke mode is the whole "
                          "recipe's (one report): pass --smoke, or remove smoke from the rows")
    set_threads(options.threads, "threads")
    if options.run_name is not None:
        check_run_name(options.run_name)
    name = options.run_name or check_run_name(f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                              f"{recipe.path}: name")
    folder = Path(options.out) / name
    with claimed(folder, resume=False):
        results = []
        for i, row in enumerate(recipe.rows):
            print(f"[{i + 1}/{len(recipe.rows)}] {recipe.name}: {row.name}", flush=True)
            results.append(run_row(recipe, i, row, folder, options, judge))
        path = write_report(recipe, results, folder, options, command)
    print(path.read_text(encoding="utf-8").split("\n## Rows")[0])
    print(f"report: {path}")
    return path


# ---------------------------------------------------------------------------------------------- commands

def _judge_callable(endpoint: str | None, model: str | None) -> Callable[[Path], float | None] | None:
    if endpoint is None and model is None:
        return None
    if not endpoint or not model:
        raise ConfigError("--judge-endpoint and --judge-model go together: give both, or neither")
    from .judge import JudgeConfig, judge_run

    config = JudgeConfig(endpoint, model, api_key=os.environ.get("GPT2LORA_JUDGE_API_KEY"))
    return lambda run_dir: judge_run(run_dir, config)["mean"]


def reproduce(name: str | None, list_only: bool = False, data: str | None = None, smoke: bool = False,
              vocab: str | None = None, device: str = "auto", out: str = "runs", run_name: str | None = None,
              judge_endpoint: str | None = None, judge_model: str | None = None) -> Path | list[tuple[str, str]]:
    """``gpt2lora reproduce``: list the shipped recipes, or run one and write its comparison report."""
    if list_only:
        listing = list_recipes()
        width = max(len(n) for n, _ in listing)
        for recipe_name, title in listing:
            print(f"{recipe_name:<{width}}  {title}")
        return listing
    if not name:
        raise ConfigError("reproduce: name a recipe (gpt2lora reproduce --list shows them) or a .toml file")
    recipe = load_recipe(name)
    data_root = data or (os.environ.get("GPT2LORA_DATA") if smoke else None)
    if smoke and not data_root:
        raise ConfigError("reproduce --smoke reads local rows: pass --data DIR (the folder holding sst2/, imdb/, "
                          "...) or set $GPT2LORA_DATA")
    if data_root and not Path(data_root).is_dir():
        raise ConfigError(f"--data {data_root}: no such folder; expected the folder holding sst2/, imdb/, ...")
    judge = _judge_callable(judge_endpoint, judge_model)
    options = RecipeOptions(out=out, run_name=run_name, smoke=smoke, device=device, data_root=data_root,
                            source="local" if data_root else "hub", vocab=vocab)
    command = " ".join(["gpt2lora reproduce", str(name)] + (["--smoke"] if smoke else [])
                       + ([f"--data {data}"] if data else []) + [f"--device {device}"])
    return run_recipe(recipe, options, command, judge)


def recipe_toml(recipe: Recipe, overrides: Mapping[str, Any] | None = None) -> str:
    """Every row of ``recipe`` fully resolved (``overrides`` applied) as recipe TOML: what
    ``train --config FILE --print-config`` prints. For a file that ``--print-config`` wrote, the same text."""
    rows, seeds = [], []
    for row in recipe.rows:
        config = row.config(row.seeds[0], relative_to=recipe.path.parent)
        if overrides:
            config = from_settings(overrides, base=config)
        rows.append((row.name, config.resolved()))
        seeds.append(row.seeds)
    return to_toml(rows, recipe.title, seeds)
