"""What a resumed run must keep: every setting that changes what is trained, checked against ``config.json``.

A run folder's ``config.json`` is written before training starts, so a killed run has one. Resuming with a
command that trains something else (another task or data, method, LoRA setting or init, targets, head,
base model, tokenizer, learning-rate schedule ...) is refused naming each differing setting; the settings in
:data:`RESUMABLE` say where and how long a run goes on and may change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..constants import RUN_CONFIG_FILE
from ..errors import ConfigError
from .runconfig import RunConfig, to_settings

#: Settings that may differ when a run is resumed: early stopping, how often it saves and evaluates, evaluation
#: and output details, and where things are (device, threads, folders). Everything else must match (epochs and
#: max_steps too: the learning-rate schedule spans the run's total steps).
RESUMABLE = ("early_stopping", "save_every", "keep_checkpoints", "eval_every",
             "eval_batch_size", "gen_rows", "max_new_tokens", "device", "threads", "gradient_checkpointing",
             "compile", "data_root", "data_source", "vocab", "out", "run_name", "resume", "quiet", "plots",
             "report_to")


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in settings.items() if k != "lora"}
    lora = settings.get("lora")
    if isinstance(lora, dict):
        flat.update({f"lora.{k}": v for k, v in lora.items()})
    return flat


def differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """``key: run X, now Y`` for every setting outside :data:`RESUMABLE` where ``config`` differs from ``saved``
    (a run's ``settings``)."""
    old, new = _flat(saved), _flat(to_settings(config))
    out = []
    for key in dict.fromkeys([*old, *new]):
        if key in RESUMABLE or old.get(key) == new.get(key):
            continue
        shown = key.removeprefix("lora.") if key.startswith("lora.") else key
        out.append(f"{shown}: run {old.get(key)!r}, now {new.get(key)!r}")
    return out


def check_resume(folder: Path, config: RunConfig) -> None:
    """Refuse to resume the run in ``folder`` with settings that train something else (one line, each
    differing setting named). A folder without ``config.json`` (runs older than this check) is not checked."""
    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"--resume {config.resume}: {path} is not readable ({err}); cannot tell what the run "
                          "trains") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {config.resume}: {path} has no 'settings' table; cannot tell what the run "
                          "trains")
    diffs = differences(saved, config)
    if diffs:
        raise ConfigError(f"--resume {config.resume}: the run in {folder} trains with other settings; resume it "
                          f"with the same ones ({'; '.join(diffs)}); only {', '.join(RESUMABLE)} may change")


__all__ = ["RESUMABLE", "check_resume", "differences"]
