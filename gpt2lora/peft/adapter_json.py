"""Reading an adapter folder: the safetensors and ``adapter_config.json`` checked, and the
:class:`~gpt2lora.config.LoRAConfig` a peft ``LORA`` config describes (which layers via
:mod:`gpt2lora.peft.targets`). :mod:`gpt2lora.peft.files` loads and saves adapters with these."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from ..config import LoRAConfig, init_niter
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsafeCheckpointError
from ..model.hub import PICKLE_SUFFIXES, read_safetensors
from ..model.tensorcheck import check_finite, check_floating
from .targets import selection_from_peft

#: peft features gpt2lora does not implement: a config that turns one on is refused, not misread.
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
               "exclude_modules", "trainable_token_indices", "target_parameters", "use_qalora")
#: peft's ``init_lora_weights`` values gpt2lora reproduces (the others rewrite the base in ways it cannot).
PEFT_INITS = {True: "kaiming", False: "kaiming", "true": "kaiming", "gaussian": "gaussian", "eva": "kaiming",
              "orthogonal": "kaiming", "pissa": "pissa", "olora": "olora"}



def read_folder(folder: Path, allow_nonfinite: bool = False
                ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """``(adapter_config.json, tensors, safetensors metadata)`` of an adapter folder, checked: safetensors
    only, floating and (unless ``allow_nonfinite``) finite tensors, a JSON object."""
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"adapter folder {folder} does not exist")
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpointError(
                f"{folder} holds only pickle adapter weights ({', '.join(pickles)}); gpt2lora reads "
                f"{ADAPTER_WEIGHTS_FILE} only because unpickling can run code. Re-save the adapter with "
                "safe_serialization (peft's default) or convert it with a tool you trust.")
        raise CheckpointNotFoundError(f"{weights_path} not found: an adapter folder needs {ADAPTER_WEIGHTS_FILE}")
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"{config_path} not found: an adapter folder needs {ADAPTER_CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    tensors = read_safetensors(weights_path)
    check_floating({name: t.dtype for name, t in tensors.items()}, weights_path)
    check_finite([(weights_path, tensors)], allow_nonfinite)
    with safe_open(str(weights_path), framework="pt") as f:
        metadata = f.metadata() or {}
    return config, tensors, metadata


def checked_field(config: dict[str, Any], key: str, source: Path, kinds: tuple[type, ...], default: Any = None,
                  required: bool = False) -> Any:
    """``config[key]`` checked against ``kinds`` (a bool is accepted only where bool is listed)."""
    if key not in config or config[key] is None:
        if required:
            raise CheckpointError(f"{source}: field {key!r} is missing")
        return default
    value = config[key]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{source}: field {key!r} is {value!r}, expected {expected}")
    return value


def peft_selection_of(config: dict[str, Any], source: Path, n_layer: int) -> tuple[tuple[str, ...], int | None]:
    """Targets and last_n_blocks from peft's target_modules / layers_to_transform / layers_pattern."""
    targets_field = checked_field(config, "target_modules", source, (list, str), required=True)
    layers_field = checked_field(config, "layers_to_transform", source, (list, int))
    return selection_from_peft(targets_field, layers_field, config.get("layers_pattern"), n_layer, source)


def peft_init(config: dict[str, Any], source: Path) -> str:
    """gpt2lora's ``LoRAConfig.init`` for peft's ``init_lora_weights``.

    The tensors in the file replace A and B anyway; what matters is whether the base must first hold the
    residual of a PiSSA / OLoRA init (peft re-runs that init when it loads such an adapter, and so does
    gpt2lora).
    """
    value = config.get("init_lora_weights", True)
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, str) and init_niter(key) is not None:
        return key
    if isinstance(key, (bool, str)) and key in PEFT_INITS:
        return PEFT_INITS[key]
    raise CheckpointError(f"{source}: field 'init_lora_weights' = {value!r} is an initialisation gpt2lora "
                          f"cannot reproduce on the base; expected true, false, 'gaussian', 'pissa', "
                          "'pissa_niter_N' or 'olora'")


def lora_config_from_peft(config: dict[str, Any], metadata: dict[str, str], source: Path,
                          n_layer: int) -> LoRAConfig:
    """The :class:`LoRAConfig` an ``adapter_config.json`` (written by peft or gpt2lora) describes."""
    for key in UNSUPPORTED:
        if config.get(key):
            raise CheckpointError(f"{source}: field {key!r} = {config[key]!r} is a peft feature gpt2lora does "
                                  "not implement; only plain LoRA adapters can be loaded")
    rank = checked_field(config, "r", source, (int,), required=True)
    lora_alpha = checked_field(config, "lora_alpha", source, (int, float), default=8)
    targets, last_n = peft_selection_of(config, source, n_layer)
    style = metadata.get("gpt2lora_style", "peft")
    use_rslora = bool(checked_field(config, "use_rslora", source, (bool,), default=False))
    alpha = lora_alpha
    if style == "from_scratch":
        try:
            alpha = float(metadata["gpt2lora_alpha"])
        except (KeyError, ValueError):
            raise CheckpointError(f"{source}: metadata gpt2lora_style='from_scratch' needs a numeric "
                                  "gpt2lora_alpha") from None
        if use_rslora or not math.isclose(alpha * rank, lora_alpha, rel_tol=1e-6):
            raise CheckpointError(f"{source}: from_scratch adapter must have lora_alpha = alpha * r = "
                                  f"{alpha * rank:g} and use_rslora false, got lora_alpha={lora_alpha!r}, "
                                  f"use_rslora={use_rslora}")
        use_rslora = metadata.get("gpt2lora_use_rslora") == "true"
    use_dora = bool(checked_field(config, "use_dora", source, (bool,), default=False))
    try:
        return LoRAConfig(rank=rank, alpha=alpha, dropout=checked_field(config, "lora_dropout", source, (int, float),
                                                                  default=0.0),
                          targets=targets, last_n_blocks=last_n, use_rslora=use_rslora,
                          train_bias=checked_field(config, "bias", source, (str,), default="none"), style=style,
                          use_dora=use_dora, init=peft_init(config, source))
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


