"""Publish a run to the Hugging Face hub: its adapter (peft layout) or merged checkpoint, the tokenizer files
and a model card, in one commit.

:func:`push_run` stages every file in a temporary folder first, so bad input fails before anything is sent,
then creates the repository (``exist_ok``), the branch when one is named, and a single commit that adds the
files and deletes the ones a previous push of the other kind left (``adapter_*`` after ``--merged``, or the
reverse). One commit is all or nothing on the hub: a failed push leaves the repository as it was, and
pushing again updates it in place. The token comes from ``huggingface_hub`` (``HF_TOKEN``, ``hf auth login``),
never from a file in the run folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import HUB_IDS
from ..constants import (
    ADAPTER_FILES,
    CARD_FILE,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    MODEL_WEIGHTS_FILE,
    MODEL_WEIGHTS_INDEX_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TOKENIZER_FILES,
)
from ..data.tasks import CLASSIFICATION_KINDS
from ..errors import CheckpointNotFoundError, ConfigError, GPT2LoRAError, HubError
from ..model.hub import hub_error_reason, resolve_checkpoint
from ..training.metrics import current_metric_names

#: Files a push owns on the hub: a later push may replace or delete them; anything else is left alone.
MANAGED = (*ADAPTER_FILES, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE,
           "model-*.safetensors", *TOKENIZER_FILES, CARD_FILE)
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
#: result-row keys -> metric ids of the hub's card metadata.
CARD_METRICS = {"accuracy": "accuracy", "f1_macro": "f1", "precision_macro": "precision", "recall_macro": "recall",
                "perplexity": "perplexity", "exact_match": "exact_match", "rouge_l": "rouge", "judge_score": "judge"}
#: The training settings the card lists, from the run's config.json ``train`` section.
TRAIN_SETTINGS = ("optimizer", "lr", "min_lr", "warmup_ratio", "schedule", "epochs", "max_steps", "batch_size",
                  "grad_accum_steps", "grad_clip", "weight_decay", "precision", "seed")


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_run` committed."""

    repo_id: str
    revision: str
    commit: str
    url: str
    uploaded: tuple[str, ...]
    deleted: tuple[str, ...]


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is ``owner/name`` as the hub allows it."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith(".git"):
        raise ConfigError(f"repo_id {repo_id!r}: expected owner/name (letters, digits, '-', '_', '.'; at most 96 "
                          "characters each), e.g. alice/gpt2-sst2-lora")
    return repo_id


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found: {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def hub_base_model(name: str | None) -> str | None:
    """The hub id of a run's base model (``gpt2`` -> ``openai-community/gpt2``); None for a local folder."""
    if not name:
        return None
    name = HUB_IDS.get(name, name)
    return name if REPO_ID.fullmatch(name) and not Path(name).expanduser().exists() else None


def _dataset_id(config: Mapping[str, Any]) -> str | None:
    from ..data.tasks import TASKS

    preset = TASKS.get(str(config.get("task")))
    return preset.hub.repo if preset is not None and preset.hub is not None and not config.get("data") else None


# --------------------------------------------------------------------------------------------------
# The model card


def _summary_body(run: Path, result: Mapping[str, Any]) -> str:
    """The run's summary.md without its title and plot links (the plots are not uploaded)."""
    path = run / SUMMARY_FILE
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines[1:] if not line.startswith("![")]
        return "\n".join(kept).strip() + "\n"
    from .report import markdown_table

    return markdown_table([dict(result)]) if result else "(no results recorded)\n"


def _settings(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("task", config.get("task")), ("method", config.get("method")),
                                   ("base model", config.get("base_model")), ("max length", config.get("max_length")),
                                   ("train rows", config.get("train_rows")),
                                   ("eval rows", f"{config.get('eval_rows')} ({config.get('eval_split')})")]
    lora = config.get("lora") or {}
    for key in ("rank", "alpha", "dropout", "targets", "style", "use_rslora", "last_n_blocks"):
        if key in lora:
            value = lora[key]
            rows.append((f"LoRA {key}", ", ".join(value) if isinstance(value, list) else value))
    train = config.get("train") or {}
    rows.extend((key.replace("_", " "), train[key]) for key in TRAIN_SETTINGS if key in train)
    return [(k, v) for k, v in rows if v is not None]


def model_card(run: str | os.PathLike, repo_id: str, merged: bool) -> str:
    """``README.md`` for the hub: a YAML header the hub reads, the run's results table and settings."""
    import yaml  # a dependency of huggingface_hub

    run = Path(run)
    config = _read_json(run / RUN_CONFIG_FILE, f"a run folder written by 'gpt2lora train' has {RUN_CONFIG_FILE}")
    metrics_path = run / METRICS_FILE
    result = current_metric_names(_read_json(metrics_path, "").get("result", {})) if metrics_path.is_file() else {}
    kind = config.get("kind")
    classifier = kind in CLASSIFICATION_KINDS
    base = hub_base_model(config.get("base_model"))
    dataset = _dataset_id(config)
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft"}
    if base:
        meta["base_model"] = base
    if dataset:
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    meta["tags"] = ["gpt2lora", str(config.get("method"))] + ([] if merged else ["peft"])
    metrics = [hub for key, hub in CARD_METRICS.items() if isinstance(result.get(key), (int, float))]
    if metrics:
        meta["metrics"] = metrics
    what = "merged checkpoint" if merged else "adapter (peft layout)"
    method = result.get("method") or config.get("method")
    title = (f"# {repo_id.split('/')[1]}\n\n{method} {what} of {base or config.get('base_model')} on "
             f"{config.get('task')} ({kind}), trained with gpt2lora {config.get('gpt2lora_version', '')}").rstrip() + "."
    settings = "\n".join(f"| {k} | {v} |" for k, v in _settings(config))
    head = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    if merged:
        usage = (f"from transformers import {head}, AutoTokenizer\n\nmodel = {head}.from_pretrained({repo_id!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})")
    else:
        labels_arg = f", num_labels={config.get('num_labels')}" if classifier else ""
        usage = (f"from peft import PeftModel\nfrom transformers import {head}\n\n"
                 f"base = {head}.from_pretrained({base or 'BASE_MODEL'!r}{labels_arg})\n"
                 f"model = PeftModel.from_pretrained(base, {repo_id!r})")
    labels = config.get("label_names") or []
    label_line = f"\nLabels: {', '.join(f'{i} = {n}' for i, n in enumerate(labels))}.\n" if labels else ""
    return ("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + title + "\n"
            + label_line + "\n## Results\n\n" + _summary_body(run, result) + "\n## Training settings\n\n"
            + "| setting | value |\n|---|---|\n" + settings + "\n\n## Usage\n\n```python\n" + usage + "\n```\n")


# --------------------------------------------------------------------------------------------------
# Staging


def check_run(run: str | os.PathLike, merged: bool = False) -> dict[str, Any]:
    """The run's config.json, once the run is known to hold what a push needs (a peft adapter unless ``merged``)."""
    run = Path(run)
    config = _read_json(run / RUN_CONFIG_FILE, "expected a run folder written by 'gpt2lora train'")
    adapter = run / "adapter"
    if not all((adapter / name).is_file() for name in ADAPTER_FILES):
        raise CheckpointNotFoundError(f"run {run} has no adapter to push ({adapter} needs "
                                      f"{' and '.join(ADAPTER_FILES)}); finish training it first")
    raw = _read_json(adapter / ADAPTER_FILES[0], "")
    if not merged and "peft_type" not in raw:
        raise ConfigError(f"run {run}: its adapter (method {config.get('method')!r}) is in gpt2lora's own format, "
                          "which peft cannot load; push the merged model instead (merged=True, --merged)")
    return config


def _stage_adapter(run: Path, stage: Path) -> None:
    adapter = run / "adapter"
    raw = _read_json(adapter / ADAPTER_FILES[0], "")
    base = hub_base_model(raw.get("base_model_name_or_path"))
    if base:  # peft's AutoPeftModel finds the base model by this name
        raw["base_model_name_or_path"] = base
    (stage / ADAPTER_FILES[0]).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(adapter / ADAPTER_FILES[1], stage / ADAPTER_FILES[1])


def _stage_merged(run: Path, stage: Path) -> None:
    from ..model.hub import save_pretrained
    from .commands import merged_run_model

    model, _, _ = merged_run_model(run)
    save_pretrained(model, stage)


def _stage_tokenizer(config: Mapping[str, Any], stage: Path) -> None:
    folder = resolve_checkpoint(config["base_model"], patterns=TOKENIZER_FILES)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"base model {config['base_model']}: no {', '.join(missing)} in {folder}; "
                                      "the tokenizer files are pushed with the model")
    for name in TOKENIZER_FILES:
        shutil.copyfile(folder / name, stage / name)


def stage_run(run: str | os.PathLike, stage: str | os.PathLike, repo_id: str, merged: bool = False) -> list[str]:
    """Write everything :func:`push_run` uploads into ``stage``; returns the file names."""
    run, stage = Path(run), Path(stage)
    config = check_run(run, merged)
    if merged:
        _stage_merged(run, stage)
    else:
        _stage_adapter(run, stage)
    _stage_tokenizer(config, stage)
    (stage / CARD_FILE).write_text(model_card(run, repo_id, merged), encoding="utf-8")
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# Pushing


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise ConfigError("push: no Hugging Face token; log in with 'hf auth login' or set HF_TOKEN (a token is "
                          "never read from the run folder)")
    return HfApi(token=token)


def push_run(run_dir: str | os.PathLike, repo_id: str, merged: bool = False, private: bool = False,
             revision: str | None = None, token: str | None = None, commit_message: str | None = None) -> PushResult:
    """Upload a run's adapter (or, with ``merged``, its merged checkpoint), tokenizer files and model card to
    the hub model repository ``repo_id`` in one commit; ``revision`` names a branch (created from main)."""
    check_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ConfigError(f"revision {revision!r}: expected a branch name")
    run = Path(run_dir)
    check_run(run, merged)  # bad input is reported before credentials are looked at
    api = _api(token)
    with tempfile.TemporaryDirectory(prefix="gpt2lora-push-") as tmp:
        files = stage_run(run, tmp, repo_id, merged)
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        branch = revision or "main"
        step = "creating the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                step = f"creating the branch {branch}"
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            step = "listing its files"
            existing = api.list_repo_files(repo_id, revision=branch)
            stale = sorted(f for f in existing if f not in files and any(fnmatch.fnmatch(f, p) for p in MANAGED))
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(tmp) / f)) for f in files]
            operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
            step = f"committing {len(files)} files"
            message = commit_message or f"Upload {run.name} ({'merged model' if merged else 'adapter'}) with gpt2lora"
            info = api.create_commit(repo_id, operations, commit_message=message, revision=branch)
        except GPT2LoRAError:
            raise
        except Exception as err:  # the hub raises many types; all mean the push did not happen
            raise HubError(f"push {run} to {repo_id} (revision {branch}) failed while {step}: "
                           f"{hub_error_reason(err)}; nothing was committed") from err
    return PushResult(repo_id, branch, info.oid, info.commit_url, tuple(files), tuple(stale))
