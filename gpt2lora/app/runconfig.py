"""The run configuration: every setting of one training run, typed, validated, with the one set of defaults.

:class:`RunConfig` holds what a run needs — the model, the task and its data, the method with its
:class:`~gpt2lora.config.LoRAConfig` / :class:`~gpt2lora.peft.prompt.PromptConfig`, the
:class:`~gpt2lora.config.TrainConfig`, evaluation and output settings. The ``gpt2lora`` command parses
its flags into one, a recipe row (TOML) parses into one, and :func:`gpt2lora.app.run.run` runs it. Defaults
live only in the dataclasses (this one and the three it nests), so a bare command line and a recipe row
that leaves a setting out train the same way.

:data:`SETTINGS` lists every setting once: its key in a recipe row, where it lands in the config, its
type and its help text. The command line builds one flag per setting from it (``--key-with-dashes``);
:func:`to_toml` writes a config as a one-row recipe and :func:`from_settings` reads one back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    DISTRIBUTED,
    LORA_BIAS,
    LORA_STYLES,
    LORA_TARGETS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    LoRAConfig,
    TrainConfig,
)
from ..data.tasks import TASKS
from ..errors import ConfigError
from ..peft.methods import METHODS
from ..peft.prompt import PROMPT_INITS, PromptConfig

#: Method of a run that only evaluates the base model (the "foundation" / "no fine-tuning" rows).
EVAL_ONLY = "none"
RUN_METHODS = (*METHODS, EVAL_ONLY)
SOURCES = ("auto", "local", "hub")
#: Task a run trains when it names neither a task nor data.
DEFAULT_TASK = "sst2"


@dataclass(frozen=True)
class Setting:
    """One setting: ``key`` in a recipe row (inside ``lora = {...}`` for section ``lora``), the field it
    sets, its value type, and the ``gpt2lora`` flag that sets it (``--`` + key with dashes unless given).

    ``type``: ``int`` (positive), ``int0`` (any integer), ``float`` (> 0), ``float0`` (>= 0), ``prob``
    ([0, 1)), ``str``, ``bool``, ``list`` (of strings), ``map`` (FIELD=COLUMN pairs), ``clip`` (a number
    > 0 or false), ``pair`` (two numbers in [0, 1)), ``backends`` (tracker names; comma-separated on the
    command line).
    """

    key: str
    section: str
    """``run`` (a RunConfig field), ``train`` (TrainConfig), ``lora`` (LoRAConfig), ``prompt`` (PromptConfig)."""
    field: str
    type: str
    help: str
    group: str
    """Help section and which subcommands take it: model, data, method, training, eval, output."""
    choices: tuple[str, ...] = ()
    flag: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


def _s(key: str, section: str, type_: str, help_: str, group: str, choices: Sequence[str] = (),
       field_: str | None = None, flag: str | None = None) -> Setting:
    return Setting(key, section, field_ or key, type_, help_, group, tuple(choices), flag)


#: Every setting of a run, in the order ``--print-config`` writes them.
SETTINGS: tuple[Setting, ...] = (
    # model
    _s("model", "run", "str", "hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name) or a local "
       "checkpoint folder", "model"),
    _s("model_revision", "run", "str", "hub revision (branch, tag or commit) of the model", "model"),
    _s("smoke", "run", "bool", "tiny random GPT-2 (2 blocks, width 32) with the real vocabulary and a few hundred "
       "rows: runs in seconds on a CPU, for checking the pipeline", "model"),
    _s("vocab", "run", "str", "folder with vocab.json + merges.txt for smoke runs (default: $GPT2LORA_VOCAB, or "
       "gpt2-tokenizer next to the data root)", "model"),
    _s("device", "train", "str", "auto, cpu, cuda, cuda:1 ...", "model"),
    _s("precision", "train", "str", "auto (bf16 on CUDA if supported, else fp32), fp32, bf16 (CUDA, or a CPU with bf16 "
       "units: AMX / AVX512-BF16; generate on any x86 CPU) or fp16 (CUDA)",
       "model", PRECISIONS),
    _s("threads", "run", "int", "CPU threads for torch (default: torch's choice; 1 is fastest for tiny models on a "
       "busy machine)", "model"),
    # data
    _s("task", "run", "str", f"task preset ({', '.join(TASKS)}); default {DEFAULT_TASK} unless data is given",
       "data"),
    _s("data", "run", "str", "local data: a file, or a folder with train/validation/test .jsonl/.csv/.tsv/.parquet "
       "(the task kind is read from its columns)", "data"),
    _s("data_root", "run", "str", "folder holding the benchmark folders (sst2/, sms_spam/, ...); default "
       "$GPT2LORA_DATA", "data"),
    _s("data_source", "run", "str", "read a preset from the local data root or the hub (auto: local when present)",
       "data", SOURCES, field_="source", flag="--source"),
    _s("revision", "run", "str", "hub revision of the dataset", "data"),
    _s("columns", "run", "map", "map a record field to a column name (repeatable FIELD=COLUMN)", "data",
       flag="--column"),
    _s("train_rows", "run", "int", "use only the first N train rows", "data"),
    _s("eval_rows", "run", "int", "use only the first N eval rows", "data"),
    _s("eval_split", "run", "str", "split to evaluate on (falls back to test when there is no validation split)",
       "data"),
    _s("max_length", "run", "int", "tokens per row after truncation", "data"),
    _s("pack", "run", "bool", "language-model tasks: pack examples into rows of max_length (attention and "
       "positions stay inside each example, so each example's loss is its unpacked loss)", "data"),
    # method
    _s("method", "run", "str", "what trains (none: evaluate the base model only)", "method", RUN_METHODS),
    _s("rank", "lora", "int", "LoRA rank r", "method"),
    _s("alpha", "lora", "float", "LoRA alpha (default: = rank)", "method"),
    _s("dropout", "lora", "prob", "LoRA dropout on the adapter's input", "method"),
    _s("targets", "lora", "list", "layers LoRA wraps (attn.q/k/v split c_attn; lm_head adds the output head)",
       "method", LORA_TARGETS),
    _s("rslora", "lora", "bool", "scale LoRA by alpha/sqrt(r) (rank-stabilised LoRA)", "method",
       field_="use_rslora"),
    _s("lora_style", "lora", "str", "peft (alpha/r, Kaiming-uniform A) or from_scratch (alpha, A within "
       "±1/sqrt(r))", "method", LORA_STYLES, field_="style"),
    _s("lora_train_bias", "lora", "str", "biases that train with LoRA", "method", LORA_BIAS, field_="train_bias"),
    _s("dora", "lora", "bool", "DoRA: a learned magnitude per output feature times the direction of W + dW",
       "method", field_="use_dora"),
    _s("lora_init", "lora", "str", "how A and B start: kaiming (B = 0), gaussian, pissa, pissa_niter_N (fast "
       "randomized SVD), olora (PiSSA/OLoRA keep the residual in the base weight)", "method", field_="init"),
    _s("last_n_blocks", "run", "int", "lora: only the last N blocks get LoRA; last_n_full: the last N blocks train",
       "method"),
    _s("num_virtual_tokens", "prompt", "int", "prompt: trainable vectors prepended to every sequence (the SST-2 "
       "report's 46K 'PreLayer' row is 60)", "method"),
    _s("prompt_init", "prompt", "str", "prompt: start from copies of token embeddings (vocab) or N(0, 1)", "method",
       PROMPT_INITS, field_="init"),
    # training
    _s("lr", "train", "float", "peak learning rate (default: 2e-4 for lora/head/embeddings/prompt, 5e-5 for "
       "full/last_n_full)", "training"),
    _s("min_lr", "train", "float0", "learning rate at the start of warmup and the end of the decay", "training"),
    _s("warmup_ratio", "train", "prob", "share of optimizer steps warming up linearly", "training"),
    _s("schedule", "train", "str", "after warmup: cosine decay to min_lr, or constant", "training", SCHEDULES),
    _s("epochs", "train", "int", "passes over the training rows", "training"),
    _s("max_steps", "train", "int", "stop after N optimizer steps (instead of counting epochs)", "training"),
    _s("batch_size", "train", "int", "rows per batch (under torchrun: the global batch, split across the "
       "processes)", "training"),
    _s("grad_accum", "train", "int", "batches per optimizer step", "training", field_="grad_accum_steps"),
    _s("grad_clip", "train", "clip", "clip the global gradient norm (0 on the command line, false in a recipe: "
       "no clipping)", "training"),
    _s("optimizer", "train", "str", "AdamW, SGD or SGD with momentum", "training", OPTIMIZERS),
    _s("weight_decay", "train", "float0", "decoupled weight decay of tensors with >= 2 dims", "training"),
    _s("momentum", "train", "prob", "momentum of sgd_momentum", "training"),
    _s("betas", "train", "pair", "AdamW betas", "training"),
    _s("eps", "train", "float", "AdamW epsilon", "training"),
    _s("loraplus_lr_ratio", "train", "float", "LoRA+: B matrices (and 1-D tensors) train at this ratio x lr",
       "training"),
    _s("seed", "train", "int0", "seed of the head, LoRA initialisation, data order and dropout", "training"),
    _s("eval_every", "train", "int", "also evaluate every N optimizer steps (always at each epoch end)",
       "training", field_="eval_every_steps"),
    _s("best_metric", "train", "str", "eval metric that picks the best checkpoint (loss, accuracy, f1_macro, ...)",
       "training"),
    _s("early_stopping", "train", "int", "stop after N evaluations without improving best_metric", "training",
       field_="early_stopping_patience"),
    _s("loss_chunk_size", "train", "int", "language models: rows of the LM head computed at a time, at target "
       "positions only", "training"),
    _s("gradient_checkpointing", "train", "bool", "recompute each block's activations in backward: less memory, "
       "~1 more forward per step", "training"),
    _s("compile", "train", "bool", "torch.compile the training forward (rarely pays back its compile time on a "
       "CPU)", "training"),
    _s("distributed", "train", "str", "under torchrun: ddp (every process holds all weights, gradients and "
       "optimizer state) or fsdp (FSDP2: each of N processes holds 1/N of them; torch >= 2.9)", "training",
       DISTRIBUTED),
    # evaluation and generation
    _s("eval_batch_size", "run", "int", "rows per evaluation batch (default: batch_size)", "eval"),
    _s("gen_rows", "run", "int", "qa/instruction: rows answered by generation for EM/F1 and samples (default 200)",
       "eval"),
    _s("max_new_tokens", "run", "int", "qa/instruction: generated tokens per answer (default: 32 qa, 128 "
       "instruction)", "eval"),
    # output
    _s("out", "run", "str", "folder for run folders", "output"),
    _s("run_name", "run", "str", "run folder name (default: data-method-time)", "output"),
    _s("save_every", "train", "int", "also write a checkpoint every N optimizer steps into RUN/checkpoints (one is "
       "always written at each epoch end)", "output", field_="save_every_steps"),
    _s("keep_checkpoints", "train", "int", "most recent step checkpoints kept", "output"),
    _s("resume", "run", "str", "continue a killed or interrupted run: 'auto' = the latest checkpoint of "
       "out/run_name, or a run folder, or one RUN/checkpoints/checkpoint-N folder", "output"),
    _s("report_to", "run", "backends", "experiment trackers, comma-separated: tensorboard, wandb or none (the "
       "tensorboard / wandb extras)", "output", ("tensorboard", "wandb")),
    _s("quiet", "run", "bool", "no progress bar", "output"),
    _s("plots", "run", "bool", "draw loss / lr plots into the run folder (--no-plots: skip them)", "output",
       flag="--no-plots"),
    _s("plan", "run", "bool", "print the memory plan (peak per device: weights, gradients, optimizer state, "
       "activations; whether it fits) and exit, before anything is downloaded or trained", "output"),
    _s("device_memory", "run", "str", "memory per device the plan checks (e.g. 16GB, 15GiB; default: the device's "
       "own)", "output"),
    _s("plan_devices", "run", "int", "devices the plan spreads the run over (default: WORLD_SIZE under torchrun, "
       "else 1)", "output"),
)
SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
#: Recipe keys of the ``lora = {...}`` table (LoRAConfig field names, as in earlier recipes).
LORA_KEYS: dict[str, Setting] = {s.field: s for s in SETTINGS if s.section == "lora"}
#: Older recipe spellings still read: key -> the setting's key.
ALIASES = {"last_n": "last_n_blocks"}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run (see :data:`SETTINGS` for what each means and its flag).

    ``lora`` applies when ``method`` is ``lora``, ``prompt`` when it is ``prompt``; ``last_n_blocks`` is the
    LoRA depth (method ``lora``) or the trained depth (``last_n_full``). ``lora.last_n_blocks`` is always set
    from ``last_n_blocks`` (None for other methods); a depth given only there is refused. ``train`` holds the optimiser,
    schedule and loop settings; its ``out_dir`` / ``resume_from`` / ``history_path`` are set by
    :func:`gpt2lora.app.run.run` inside the run folder.
    """

    model: str = "gpt2"
    model_revision: str | None = None
    smoke: bool = False
    vocab: str | None = None
    threads: int | None = None
    task: str | None = None
    data: str | None = None
    data_root: str | None = None
    source: str = "auto"
    revision: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    train_rows: int | None = None
    eval_rows: int | None = None
    eval_split: str = "validation"
    max_length: int = 128
    pack: bool = False
    method: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    last_n_blocks: int | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int | None = None
    gen_rows: int | None = None
    max_new_tokens: int | None = None
    out: str = "runs"
    run_name: str | None = None
    resume: str | None = None
    report_to: tuple[str, ...] = ()
    quiet: bool = False
    plots: bool = True
    plan: bool = False
    device_memory: str | None = None
    plan_devices: int | None = None

    def __post_init__(self) -> None:
        from ..training.tracking import parse_report_to

        object.__setattr__(self, "columns", tuple((str(k), str(v)) for k, v in dict(self.columns).items()))
        try:
            object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        except ConfigError as err:
            raise ConfigError(f"RunConfig.{err}") from None
        for name in ("threads", "train_rows", "eval_rows", "max_length", "last_n_blocks", "eval_batch_size",
                     "gen_rows", "max_new_tokens", "plan_devices"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"RunConfig.{name}: expected a positive integer, got {value!r}")
        if self.device_memory is not None:
            from ..training.memory_plan import parse_size

            parse_size(self.device_memory, "RunConfig.device_memory")
        if self.method not in RUN_METHODS:
            raise ConfigError(f"RunConfig.method: expected one of {', '.join(RUN_METHODS)}, got {self.method!r}")
        if self.source not in SOURCES:
            raise ConfigError(f"RunConfig.source: expected one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"RunConfig.task: expected a task preset ({', '.join(TASKS)}), got {self.task!r}; "
                              "use data = PATH for your own files")
        if self.method == "last_n_full" and self.last_n_blocks is None:
            raise ConfigError("RunConfig.last_n_blocks: method last_n_full needs the number of blocks it trains "
                              "(--last-n-blocks N)")
        for name, kind in (("lora", LoRAConfig), ("prompt", PromptConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"RunConfig.{name}: expected a {kind.__name__}, got "
                                  f"{type(getattr(self, name)).__name__}")
        if self.run_name is not None:
            from .folders import check_run_name

            check_run_name(self.run_name, "RunConfig.run_name (--run-name)")
        # The one rule: RunConfig.last_n_blocks is LoRA's depth and lora.last_n_blocks mirrors it (None for
        # other methods, which do not use LoRA). A depth given only in lora.last_n_blocks is refused, not erased.
        depth = self.last_n_blocks if self.method == "lora" else None
        if self.method == "lora" and depth is None and self.lora.last_n_blocks is not None:
            raise ConfigError(f"RunConfig.lora.last_n_blocks={self.lora.last_n_blocks} but RunConfig.last_n_blocks "
                              "is None: a run's LoRA depth is RunConfig.last_n_blocks (--last-n-blocks); set it "
                              "there")
        if self.lora.last_n_blocks != depth:
            object.__setattr__(self, "lora", dataclasses.replace(self.lora, last_n_blocks=depth))

    # --- derived settings ---

    @property
    def task_or_data(self) -> str:
        """What the run reads: the data path when given, else the task preset."""
        if self.data is not None:
            return self.data
        return self.task or DEFAULT_TASK

    @property
    def label(self) -> str:
        """Short name of what the run trains on: the preset, or the data file / folder name."""
        if self.data is not None:
            return Path(self.data).stem or Path(self.data).name
        return self.task or DEFAULT_TASK

    @property
    def lora_config(self) -> LoRAConfig | None:
        return self.lora if self.method == "lora" else None

    @property
    def prompt_config(self) -> PromptConfig | None:
        return self.prompt if self.method == "prompt" else None

    def resolved(self) -> RunConfig:
        """The same run with every default made explicit: the task when none is named, and the method's
        learning rate. Two configs that train the same way resolve to equal objects."""
        task = self.task if self.task is not None or self.data is not None else DEFAULT_TASK
        train = self.train.with_default_lr(self.method if self.method != EVAL_ONLY else "head")
        # local paths absolute: a run folder's config.json must mean the same files from any directory
        paths = {name: _absolute(getattr(self, name)) for name in ("data", "data_root", "vocab")}
        model = _absolute(self.model) if Path(self.model).exists() else self.model
        return dataclasses.replace(self, task=task, train=train, model=model, **paths)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


# ---------------------------------------------------------------------------------------------- values

def _describe(setting: Setting) -> str:
    return {"int": "a positive integer", "int0": "an integer", "float": "a number > 0", "float0": "a number >= 0",
            "prob": "a number in [0, 1)", "str": "a string", "bool": "true or false",
            "list": "a list of strings", "map": "a table of FIELD = COLUMN strings",
            "clip": "a number > 0, or false for no clipping", "pair": "two numbers in [0, 1)",
            "backends": "a list of tracker names"}[setting.type]


def check_value(setting: Setting, value: Any, where: str) -> Any:
    """``value`` checked against the setting's type and choices (TOML and command-line values alike)."""
    kind = setting.type
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          "int0": isinstance(value, int) and not isinstance(value, bool),
          "float": number and math.isfinite(value) and value > 0,
          "float0": number and math.isfinite(value) and value >= 0,
          "prob": number and 0 <= value < 1,
          "str": isinstance(value, str),
          "bool": isinstance(value, bool),
          "list": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and len(value) > 0,
          "map": isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in value.items()),
          "clip": value is False or (number and value > 0),
          "backends": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
          "pair": isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value)}[kind]
    if not ok:
        raise ConfigError(f"{where}{setting.key}: expected {_describe(setting)}, got {value!r}")
    values = value if kind in ("list", "backends") else [value]
    if setting.choices and any(v not in setting.choices for v in values):
        raise ConfigError(f"{where}{setting.key}: expected one of {', '.join(setting.choices)}, got {value!r}")
    return value


def _field_value(setting: Setting, value: Any) -> Any:
    """A checked setting value as its dataclass field holds it."""
    if setting.type == "float" or setting.type == "float0":
        return float(value)
    if setting.type == "clip":
        return None if value is False else float(value)
    if setting.type in ("list", "pair", "backends"):
        return tuple(value)
    if setting.type == "map":
        return tuple(dict(value).items())
    if setting.type == "bool":
        return bool(value)
    return value


def from_settings(values: Mapping[str, Any], base: RunConfig | None = None, where: str = "",
                  relative_to: str | os.PathLike | None = None) -> RunConfig:
    """A RunConfig from recipe-row settings (keys of :data:`SETTINGS`; LoRA keys inside ``lora``).

    Settings left out keep ``base``'s values (default: ``RunConfig()``). ``where`` prefixes errors
    (e.g. ``"recipe.toml: rows[2] (LoRA r=8): "``). ``data`` / ``data_root`` / ``vocab`` paths that are
    relative are read relative to ``relative_to`` (a recipe's folder).
    """
    base = base or RunConfig()
    sections: dict[str, dict[str, Any]] = {"run": {}, "train": {}, "lora": {}, "prompt": {}}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key == "lora":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}lora: expected a table of LoRA settings, got {value!r}")
            for lora_key, lora_value in value.items():
                if lora_key == "last_n_blocks":  # older recipes put the LoRA depth here
                    setting = SETTINGS_BY_KEY["last_n_blocks"]
                    sections["run"]["last_n_blocks"] = check_value(setting, lora_value, f"{where}lora.")
                    continue
                setting = LORA_KEYS.get(lora_key)
                if setting is None:
                    raise ConfigError(f"{where}lora.{lora_key}: expected a known key (unknown key; known: "
                                      f"{', '.join(LORA_KEYS)})")
                sections["lora"][setting.field] = _field_value(
                    setting, check_value(dataclasses.replace(setting, key=lora_key), lora_value, f"{where}lora."))
            continue
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None or setting.section == "lora":
            raise ConfigError(f"{where}{raw_key}: expected a known key (unknown key; known: "
                              f"{', '.join(s.key for s in SETTINGS if s.section != 'lora')}, lora)")
        check_value(setting, value, where)
        if setting.key in ("data", "data_root", "vocab") and relative_to is not None:
            value = str((Path(relative_to) / value).resolve()) if not Path(value).is_absolute() else value
        elif setting.key == "model" and relative_to is not None and (Path(relative_to) / value).exists():
            value = str((Path(relative_to) / value).resolve())  # a local checkpoint folder, not a hub id
        sections[setting.section][setting.field] = _field_value(setting, value)
    if "rank" in sections["lora"] and "alpha" not in sections["lora"] and base.lora.alpha == base.lora.rank:
        sections["lora"]["alpha"] = None  # alpha follows the rank unless it was set
    try:
        lora = dataclasses.replace(base.lora, **sections["lora"])
        prompt = dataclasses.replace(base.prompt, **sections["prompt"])
        train = dataclasses.replace(base.train, **sections["train"])
        return dataclasses.replace(base, **sections["run"], lora=lora, prompt=prompt, train=train)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def to_settings(config: RunConfig) -> dict[str, Any]:
    """The settings of a config as a recipe row holds them (None values left out; LoRA in ``lora``)."""
    sections = {"run": config, "train": config.train, "lora": config.lora, "prompt": config.prompt}
    row: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(sections[setting.section], setting.field)
        if setting.type == "clip" and value is None:
            value = False
        if value is None:
            continue
        if setting.type in ("list", "pair", "backends"):
            value = list(value)
        elif setting.type == "map":
            value = dict(value)
        if setting.section == "lora":
            lora[setting.field] = value
        else:
            row[setting.key] = value
    row["lora"] = lora
    return row


# ---------------------------------------------------------------------------------------------- TOML

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"cannot write {value!r} to TOML")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    raise ConfigError(f"cannot write a {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _toml_value(key)


#: Settings a recipe row cannot hold: where runs go is the command's (a recipe's rows run into one folder).
RUNNER_KEYS = ("out", "run_name", "resume")


def to_toml(rows: Sequence[tuple[str, RunConfig]], title: str, seeds: Sequence[Sequence[int] | None] = ()) -> str:
    """A recipe file holding ``rows`` (``(name, config)`` pairs), every setting written out except
    :data:`RUNNER_KEYS` (where runs go is the command's, not a row's).

    Reading it back with :func:`gpt2lora.app.recipes.parse_recipe` gives the same configs, so a command line
    becomes a recipe file: ``gpt2lora train ... --print-config > my.toml``. ``seeds``: per row, a list of
    seeds written as ``seeds = [...]`` instead of the config's single ``seed``.
    """
    lines = [f"title = {_toml_value(title)}"]
    for i, (name, config) in enumerate(rows):
        settings = {k: v for k, v in to_settings(config).items() if k not in RUNNER_KEYS}
        row_seeds = seeds[i] if i < len(seeds) else None
        if row_seeds is not None and len(row_seeds) > 1:
            settings.pop("seed")
            settings["seeds"] = list(row_seeds)
        lines += ["", "[[rows]]", f"name = {_toml_value(name)}"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


#: Settings that say where and how a run happens, not what it trains; ``train --config`` accepts them as flags.
PLACEMENT_KEYS = ("smoke", "vocab", "device", "threads", "data_root", "data_source", "out", "run_name", "quiet",
                  "resume", "plots", "report_to", "distributed", "plan", "device_memory", "plan_devices")

__all__ = ["ALIASES", "DEFAULT_TASK", "EVAL_ONLY", "PLACEMENT_KEYS", "RUNNER_KEYS", "RUN_METHODS", "SETTINGS", "SETTINGS_BY_KEY",
           "RunConfig", "Setting", "check_value", "from_settings", "to_settings", "to_toml"]
