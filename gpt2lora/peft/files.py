"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, peft's layout.

A LoRA model is saved exactly as peft saves LoRA on transformers' GPT-2, so
``peft.PeftModel.from_pretrained`` loads it, and :func:`load_adapter` loads adapters peft wrote:

* ``base_model.model.transformer.h.{i}.<target>.lora_A.weight`` (rank, in) and ``.lora_B.weight``
  (out, rank): the same orientation as gpt2lora's ``lora_A`` / ``lora_B`` (peft keeps it for
  GPT-2's fan-in-fan-out Conv1D layers too and transposes only when merging);
* trained biases: ``<wrapped layer>.base_layer.bias`` and ``<other>.bias`` (peft's ``bias`` option);
* the classification head (``modules_to_save: ["score"]``) as ``base_model.model.score.weight``
  (older peft wrote ``...score.modules_to_save.weight``; both are read).

LoRA on the output head (target ``lm_head``) of a language model is saved as peft's ``lm_head`` target.
What peft cannot express on GPT-2 — split ``attn.q`` / ``attn.k`` / ``attn.v`` pairs on the fused
``c_attn``, LoRA on a classifier's ``score`` (peft saves that head in full), a head LoRA with
``last_n_blocks`` — is written in gpt2lora's own format (``{"format": "gpt2lora", "method": "lora",
"lora": {...LoRAConfig fields}}``, tensors under gpt2lora's names), with a one-line warning saying so.

A soft prompt (method ``prompt``) is saved in peft's ``PROMPT_TUNING`` layout: ``prompt_embeddings``
(num_virtual_tokens, n_embd) and, for a classifier, ``base_model.score.weight``.

``style="from_scratch"`` (scaling = alpha, not alpha / rank) has no peft field, so it is written as
``lora_alpha = alpha * rank`` — peft then computes the same scaling — and the style itself goes into
the safetensors metadata (``gpt2lora_style``, ``gpt2lora_alpha``), which peft ignores and gpt2lora
reads back. The JSON keeps only classic peft keys.

A model trained without LoRA (methods ``full``, ``last_n_full``, ``embeddings``, ``head``) saves its
trainable tensors under gpt2lora's own names, with ``{"format": "gpt2lora", "method": ...}`` and no
``peft_type`` in the JSON. Only safetensors are read or written; pickle files are refused. Reading and
checking a folder and its ``adapter_config.json`` is :mod:`gpt2lora.peft.adapter_json`; which layers a config
names is :mod:`gpt2lora.peft.targets`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import HEAD_TARGET, QKV_TARGETS, LoRAConfig, is_residual_init
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from ..errors import CheckpointError, ConfigError
from ..model.classifier import is_classifier
from ..model.hub import check_state
from .adapter_json import checked_field, lora_config_from_peft, read_folder
from .layers import LORA_LAYERS, lora_modules
from .lora import adapter_parameters, set_lora_trainable
from .methods import METHODS, prepare_model, trainable_names
from .prompt import PromptConfig, get_prompt
from .registry import HEADS_ATTRIBUTE, adapter_configs, adapter_registry, attach_registry
from .slots import DEFAULT_ADAPTER, HEAD_NAME, check_adapter_name
from .targets import lora_layers, peft_selection, target_names

PREFIX = "base_model.model."
#: peft adds "classifier" to modules_to_save of every SEQ_CLS model; GPT-2 has none, so it is harmless.
HEAD_MODULES = (HEAD_NAME, "classifier")

# --- names -------------------------------------------------------------------------------------------

def _task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"


def _bias_owners(model: nn.Module, layers: list[str], train_bias: str) -> list[str]:
    """Modules whose bias the adapter holds for peft's ``bias`` option."""
    if train_bias == "lora_only":
        return layers
    if train_bias == "all":
        return [name.removesuffix(".bias") for name, _ in model.named_parameters() if name.endswith(".bias")]
    return []


def _adapter_layout(model: nn.Module, config: LoRAConfig, layers: list[str], with_head: bool
                    ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """peft key -> (gpt2lora parameter name, shape) of every tensor a LoRA adapter file holds."""
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in layers:
        module = model.get_submodule(name)
        layout[f"{PREFIX}{name}.lora_A.weight"] = (f"{name}.lora_A", (config.rank, module.in_features))
        layout[f"{PREFIX}{name}.lora_B.weight"] = (f"{name}.lora_B", (module.out_features, config.rank))
        if config.use_dora:
            layout[f"{PREFIX}{name}.lora_magnitude_vector"] = (f"{name}.lora_magnitude_vector",
                                                                (module.out_features,))
    params = dict(model.named_parameters())
    for owner in _bias_owners(model, layers, config.train_bias):
        peft_owner = f"{owner}.base_layer" if owner in layers else owner
        bias = params.get(f"{owner}.bias")
        if bias is not None:
            layout[f"{PREFIX}{peft_owner}.bias"] = (f"{owner}.bias", tuple(bias.shape))
    if with_head:
        for name, param in model.get_submodule(HEAD_NAME).named_parameters():
            layout[f"{PREFIX}{HEAD_NAME}.{name}"] = (f"{HEAD_NAME}.{name}", tuple(param.shape))
    return layout


def peft_unsupported(model: nn.Module, config: LoRAConfig) -> str | None:
    """Why peft cannot hold this LoRA on the matching transformers model, or None when it can."""
    split = [t for t in config.targets if t in QKV_TARGETS]
    if split:
        return (f"targets {', '.join(split)} put separate LoRA pairs on slices of the fused c_attn, which peft "
                "cannot express")
    if HEAD_TARGET in config.targets and _task_type(model) == "SEQ_CLS":
        return "target lm_head on a classifier puts LoRA on score, which peft saves in full instead"
    if HEAD_TARGET in config.targets and config.last_n_blocks is not None:
        return "peft's layers_to_transform (last_n_blocks) would drop the LoRA on lm_head"
    return None


def own_lora_layout(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """gpt2lora parameter name -> shape of every tensor a LoRA adapter in gpt2lora's own format holds."""
    layout: dict[str, tuple[int, ...]] = {}
    layers = lora_layers(model, config)
    for name, parts in layers:
        module = model.get_submodule(name)
        for part in parts:
            layout[f"{name}.lora_{part}_A"] = (config.rank, module.in_features)
            layout[f"{name}.lora_{part}_B"] = (module.out_features // 3, config.rank)
        if not parts:
            layout[f"{name}.lora_A"] = (config.rank, module.in_features)
            layout[f"{name}.lora_B"] = (module.out_features, config.rank)
            if config.use_dora:
                layout[f"{name}.lora_magnitude_vector"] = (module.out_features,)
    names = [name for name, _ in layers]
    params = dict(model.named_parameters())
    for owner in _bias_owners(model, names, config.train_bias):
        if f"{owner}.bias" in params:
            layout[f"{owner}.bias"] = tuple(params[f"{owner}.bias"].shape)
    if _task_type(model) == "SEQ_CLS" and HEAD_NAME not in names:
        layout[f"{HEAD_NAME}.weight"] = tuple(model.get_submodule(HEAD_NAME).weight.shape)
    return layout


def own_lora_config(model: nn.Module, config: LoRAConfig, tensors: list[str]) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA in gpt2lora's own format (no ``peft_type``)."""
    return {"format": "gpt2lora", "method": "lora", "task_type": _task_type(model),
            "base_model_name_or_path": getattr(model, "name_or_path", None),
            "lora": {**dataclasses.asdict(config), "targets": list(config.targets)}, "tensors": sorted(tensors)}


def prompt_files(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and ``adapter_config.json`` of a soft prompt in peft's ``PROMPT_TUNING`` layout."""
    prompt = get_prompt(model)
    assert prompt is not None
    task = _task_type(model)
    tensors = {"prompt_embeddings": prompt.weight}
    if task == "SEQ_CLS":
        for name, param in model.get_submodule(HEAD_NAME).named_parameters():
            tensors[f"base_model.{HEAD_NAME}.{name}"] = param
    shape = model.transformer.config
    config = {"peft_type": "PROMPT_TUNING", "task_type": task,
              "base_model_name_or_path": getattr(model, "name_or_path", None), "revision": None,
              "inference_mode": True, "num_virtual_tokens": prompt.num_virtual_tokens,
              "token_dim": shape.n_embd, "num_transformer_submodules": 1,
              "num_attention_heads": shape.n_head, "num_layers": shape.n_layer,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
              "modules_to_save": list(HEAD_MODULES) if task == "SEQ_CLS" else None}
    return tensors, config


# --- saving ------------------------------------------------------------------------------------------

def peft_config(model: nn.Module, config: LoRAConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` peft reads for ``config`` on this model (classic keys only)."""
    n_layer = len(model.transformer.h)
    from_scratch = config.style == "from_scratch"
    task = _task_type(model)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        # peft scales by lora_alpha / r: alpha * r gives from_scratch's "alpha" scaling
        "lora_alpha": config.alpha * config.rank if from_scratch else config.alpha,
        "lora_dropout": config.dropout,
        "fan_in_fan_out": True,  # GPT-2's checkpoints store these layers as Conv1D (in, out)
        **peft_selection(config, n_layer),
        "use_rslora": config.use_rslora and not from_scratch,
        "bias": config.train_bias,
        "modules_to_save": [HEAD_NAME] if task == "SEQ_CLS" else None,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "use_dora": config.use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The plain-LoRA config of a PiSSA / OLoRA adapter converted for the unmodified base: rank 2r, same scaling."""
    if not is_residual_init(config.init):
        return config
    if config.style == "from_scratch":
        alpha = config.alpha  # scaling = alpha whatever the rank
    elif config.use_rslora:
        alpha = config.alpha * math.sqrt(2)  # alpha / sqrt(r) stays the same at rank 2r
    else:
        alpha = config.alpha * 2
    return dataclasses.replace(config, rank=2 * config.rank, alpha=alpha, init="kaiming")


def adapter_state(model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """The config and tensors adapter ``adapter`` is saved with, under the default adapter's names.

    Names are those of a single-adapter model (``<layer>.lora_A``, ``score.weight``, biases), so one layout
    serves every adapter. A PiSSA / OLoRA adapter is converted for the unmodified base, as peft's
    ``path_initial_model_for_weight_conversion`` does: ``ΔW = s B A - s B0 A0 = s [B | -B0] [A ; A0]``, a
    plain LoRA of rank 2r (see :func:`converted_config`); DoRA magnitudes need no change, since
    ``W + ΔW`` is the same matrix.
    """
    configs = adapter_configs(model)
    if adapter not in configs:
        raise ConfigError(f"adapter_name: the model has no adapter {adapter!r}; it has {sorted(configs)}")
    config = configs[adapter]
    state: dict[str, Tensor] = {name: p.detach() for name, p in adapter_parameters(model, adapter).items()}
    for layer, module in lora_modules(model):
        slot = module.slots.get(adapter)
        if slot is None:
            continue
        for (_, _, a, b), (a0, b0), part in zip(slot.pieces(), slot.initial(), slot.parts or (None,)):
            prefix = f"{layer}.lora_{part}_" if part else f"{layer}.lora_"
            state[prefix + "A"] = torch.cat([a.detach(), a0.to(a.device, a.dtype)], dim=0)
            state[prefix + "B"] = torch.cat([b.detach(), -b0.to(b.device, b.dtype)], dim=1)
    for name, param in model.named_parameters():
        if name.endswith(".bias") and not name.startswith(f"{HEADS_ATTRIBUTE}."):
            state[name] = param.detach()
    return converted_config(config), state


def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapter (LoRA or soft prompt, peft layout) or the trained tensors (other methods) to ``folder``.

    ``adapter_name`` picks one of several LoRA adapters (default: the active one). A LoRA peft cannot
    express (see :func:`peft_unsupported`) goes into gpt2lora's own format, with a warning. A PiSSA / OLoRA
    adapter is written as a plain LoRA of rank 2r for the unmodified base (see :func:`adapter_state`).
    What is saved is what the model's adapter registry holds: its LoRA adapters, else its soft prompt, else
    the tensors of the training method it recorded.
    """
    out = Path(folder)
    registry = adapter_registry(model)
    config = None
    if registry is not None and registry.configs:
        adapter = adapter_name if adapter_name is not None else registry.active or DEFAULT_ADAPTER
        config, state = adapter_state(model, adapter)
    elif adapter_name is not None:
        raise ConfigError(f"save_adapter: adapter_name={adapter_name!r} but the model has no LoRA adapters")
    reason = peft_unsupported(model, config) if config is not None else None
    if config is None and registry is not None and registry.prompt_config is not None:
        tensors, json_config = prompt_files(model)
        meta = {"format": "pt"}
    elif config is not None and reason is not None:
        layout = own_lora_layout(model, config)
        tensors = {name: state[name] for name in layout}
        meta = {"format": "pt"}
        json_config = own_lora_config(model, config, list(tensors))
        warnings.warn(f"save_adapter: {reason}; wrote gpt2lora's own adapter format to {out} (load_adapter "
                      "reads it, peft does not)", stacklevel=2)
    elif config is not None:
        layers = target_names(model, config)
        layout = _adapter_layout(model, config, layers, with_head=_task_type(model) == "SEQ_CLS")
        tensors = {key: state[name] for key, (name, _) in layout.items()}
        meta = {"format": "pt", "gpt2lora_style": config.style, "gpt2lora_alpha": repr(float(config.alpha)),
                "gpt2lora_use_rslora": str(config.use_rslora).lower()}
        json_config = peft_config(model, config)
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise ConfigError("save_adapter: the model has no LoRA and no trainable tensors; call apply_lora "
                              "or prepare_model first, or use save_pretrained for the whole model")
        meta = {"format": "pt"}
        method = registry.method if registry is not None else None
        json_config = {"format": "gpt2lora", "method": method or "custom",
                       "last_n": registry.last_n if registry is not None else None, "task_type": _task_type(model),
                       "base_model_name_or_path": getattr(model, "name_or_path", None),
                       "tensors": sorted(tensors)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS_FILE),
              metadata=meta)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(json_config, indent=2) + "\n", encoding="utf-8")
    return out


# --- loading -----------------------------------------------------------------------------------------

def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load an adapter folder onto ``model`` (a fresh model, or one with the same LoRA layout) and return it.

    A peft ``LORA`` adapter (written by gpt2lora or by peft) applies LoRA when the model has none yet,
    then copies the tensors; gpt2lora's own format copies the trained tensors and sets the method's
    trainable set. Keys, shapes, dtypes (floats only), the config and finite values (every tensor, soft
    prompts included; ``allow_nonfinite=True`` skips that) are checked before anything in the model changes.

    ``adapter_name`` loads a LoRA adapter as that named adapter beside the ones the model has (added, not
    activated, unless it is the model's first; an existing adapter of that name gets the file's values).
    Without it the adapter is ``"default"``, as before.
    """
    path = Path(folder)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    config, tensors, metadata = read_folder(path, allow_nonfinite)
    source = path / ADAPTER_CONFIG_FILE
    peft_type = config.get("peft_type")
    adapter = adapter_name or DEFAULT_ADAPTER
    if peft_type == "LORA":
        return _load_lora(model, config, tensors, metadata, path, adapter)
    if peft_type is None and config.get("format") == "gpt2lora" and config.get("method") == "lora":
        return _load_own_lora(model, config, tensors, path, adapter)
    if adapter_name is not None and (peft_type == "PROMPT_TUNING" or config.get("format") == "gpt2lora"):
        raise CheckpointError(f"{source} is not a LoRA adapter; adapter_name={adapter_name!r} applies to LoRA "
                              "adapters only")
    if peft_type == "PROMPT_TUNING":
        return _load_prompt(model, config, tensors, path)
    if peft_type is None and config.get("format") == "gpt2lora":
        return _load_trained(model, config, tensors, path)
    raise CheckpointError(f"{source}: unknown peft_type {peft_type!r}; gpt2lora loads 'LORA' and "
                          "'PROMPT_TUNING' adapters and its own format (no peft_type, \"format\": \"gpt2lora\")")


def _install(model: nn.Module, config: LoRAConfig, adapter: str, current: LoRAConfig | None,
             names: list[str], tensors: dict[str, Tensor], source: Path) -> nn.Module:
    """Create adapter ``adapter`` unless it exists, copy the checked tensors (``names[i]`` <- ``tensors[i]``)."""
    if current is None:
        from .named import add_adapter

        try:
            add_adapter(model, adapter, config)
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None
    params = {**dict(model.named_parameters()), **adapter_parameters(model, adapter)}
    with torch.no_grad():
        for name, tensor in zip(names, tensors.values(), strict=True):
            target = params[name]
            target.copy_(tensor.to(target.dtype))
    set_lora_trainable(model, attach_registry(model).lora_config.train_bias)
    return model


def _check_task(model: nn.Module, task: Any, source: Path) -> None:
    mine = _task_type(model)
    if task is not None and task != mine:
        kind = "a classifier (score head)" if mine == "SEQ_CLS" else "a language model (no score head)"
        raise CheckpointError(f"{source}: task_type is {task!r} but the model is {kind}; load it onto "
                              f"a model of task {task!r}")


def _load_lora(model: nn.Module, raw: dict[str, Any], tensors: dict[str, Tensor], metadata: dict[str, str],
               folder: Path, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    source = folder / ADAPTER_CONFIG_FILE
    n_layer = len(model.transformer.h)
    config = lora_config_from_peft(raw, metadata, source, n_layer)
    _check_task(model, raw.get("task_type"), source)
    head_modules = raw.get("modules_to_save") or []
    if not isinstance(head_modules, list) or any(m not in HEAD_MODULES for m in head_modules):
        raise CheckpointError(f"{source}: modules_to_save {head_modules!r} is not supported; gpt2lora saves "
                              f"only the classification head {HEAD_NAME!r}")
    with_head = HEAD_NAME in head_modules
    if with_head and _task_type(model) != "SEQ_CLS":
        raise CheckpointError(f"{source}: modules_to_save names {HEAD_NAME!r} but the model has no score head")
    current = adapter_configs(model).get(adapter)
    if current is not None:
        _check_same_layout(model, current, config, source)
    if HEAD_TARGET in config.targets and _task_type(model) == "SEQ_CLS":
        raise CheckpointError(f"{source}: target_modules names lm_head, which a classifier does not have")
    _check_no_prompt(model, source)
    layers = target_names(model, config)
    layout = _adapter_layout(model, config, layers, with_head)
    alias = f"{PREFIX}{HEAD_NAME}.modules_to_save.weight"  # how older peft versions named the head
    if alias in tensors and f"{PREFIX}{HEAD_NAME}.weight" not in tensors:
        tensors = dict(tensors)
        tensors[f"{PREFIX}{HEAD_NAME}.weight"] = tensors.pop(alias)
    head_base = f"{PREFIX}lm_head.base_layer.weight"
    if head_base in tensors and HEAD_TARGET in config.targets:
        # peft also saves the frozen base of a LoRA-wrapped lm_head ("embedding layer"); it must be ours
        tensors = dict(tensors)
        saved = tensors.pop(head_base)
        mine = model.lm_head.weight
        if saved.shape != mine.shape or not torch.equal(saved.to(mine.device, mine.dtype), mine.detach()):
            raise CheckpointError(f"{source}: {head_base} (the frozen LM head peft saved with the adapter) "
                                  "differs from this model's lm_head/wte weight; load the adapter onto the "
                                  "base model it was trained on")
    expected = {key: torch.empty(shape, device="meta") for key, (_, shape) in layout.items()}
    check_state(expected, tensors, source=f"adapter {folder / ADAPTER_WEIGHTS_FILE}")
    return _install(model, config, adapter, current, [name for name, _ in layout.values()],
                    {key: tensors[key] for key in layout}, source)


def _check_same_layout(model: nn.Module, current: LoRAConfig, wanted: LoRAConfig, source: Path) -> None:
    merged = [name for name, m in lora_modules(model) if m.merged]
    if merged:
        raise CheckpointError(f"cannot load {source} into a model whose LoRA is merged ({merged[0]} ...); "
                              "call unmerge_lora(model) first")
    n_layer = len(model.transformer.h)
    pairs = {"rank": (wanted.rank, current.rank), "targets": (wanted.targets, current.targets),
             "blocks": (wanted.blocks(n_layer), current.blocks(n_layer)),
             "scaling": (round(wanted.scaling, 9), round(current.scaling, 9)), "style": (wanted.style, current.style),
             "use_dora": (wanted.use_dora, current.use_dora)}
    if is_residual_init(wanted.init) or is_residual_init(current.init):
        pairs["init"] = (wanted.init, current.init)  # the base holds a residual for one of them
    for field, (theirs, ours) in pairs.items():
        if theirs != ours:
            raise CheckpointError(f"{source}: the adapter's LoRA {field} is {theirs!r} but the model already "
                                  f"has LoRA with {field} {ours!r}; load it onto a fresh model instead")


def _load_trained(model: nn.Module, raw: dict[str, Any], tensors: dict[str, Tensor], folder: Path) -> nn.Module:
    source = folder / ADAPTER_CONFIG_FILE
    if any(isinstance(m, LORA_LAYERS) for m in model.modules()):
        raise CheckpointError(f"{source} holds tensors of method {raw.get('method')!r} (no LoRA) but the model "
                              "has LoRA layers; load it onto a model without adapters")
    _check_task(model, raw.get("task_type"), source)
    method = raw.get("method", "custom")
    last_n = raw.get("last_n")
    params = dict(model.named_parameters())
    if method in METHODS and method != "lora":
        try:
            names = trainable_names(model, method, last_n)
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None
    elif method == "custom":
        names = set(tensors)
    else:
        raise CheckpointError(f"{source}: field 'method' is {method!r}; expected one of "
                              f"{', '.join(m for m in METHODS if m != 'lora')} or 'custom'")
    expected = {name: params[name] for name in names if name in params}
    check_state(expected, tensors, source=f"adapter {folder / ADAPTER_WEIGHTS_FILE}")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name].to(params[name].dtype))
    if method == "custom":
        for name, param in params.items():
            param.requires_grad_(name in names)
        registry = attach_registry(model)
        registry.method, registry.last_n = "custom", None
    else:
        prepare_model(model, method, last_n=last_n)
    return model


def _check_no_prompt(model: nn.Module, source: Path) -> None:
    if get_prompt(model) is not None:
        raise CheckpointError(f"cannot load the LoRA adapter {source} into a model with a soft prompt "
                              "(transformer.prompt); load it onto a fresh model")


def _own_lora_config(raw: dict[str, Any], source: Path) -> LoRAConfig:
    fields = raw.get("lora")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: field 'lora' must be an object of LoRAConfig fields, got {fields!r}")
    known = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{source}: field 'lora' has unknown keys {unknown}; expected some of {sorted(known)}")
    values = dict(fields)
    if isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    try:
        return LoRAConfig(**values)
    except ConfigError as err:
        raise CheckpointError(f"{source}: field 'lora': {err}") from None


def _load_own_lora(model: nn.Module, raw: dict[str, Any], tensors: dict[str, Tensor], folder: Path,
                   adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """A LoRA in gpt2lora's own format (split q/k/v, head LoRA peft cannot hold)."""
    source = folder / ADAPTER_CONFIG_FILE
    config = _own_lora_config(raw, source)
    _check_task(model, raw.get("task_type"), source)
    _check_no_prompt(model, source)
    current = adapter_configs(model).get(adapter)
    if current is not None:
        _check_same_layout(model, current, config, source)
    try:
        layout = own_lora_layout(model, config)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    expected = {name: torch.empty(shape, device="meta") for name, shape in layout.items()}
    check_state(expected, tensors, source=f"adapter {folder / ADAPTER_WEIGHTS_FILE}")
    return _install(model, config, adapter, current, list(layout), {name: tensors[name] for name in layout}, source)


def _load_prompt(model: nn.Module, raw: dict[str, Any], tensors: dict[str, Tensor], folder: Path) -> nn.Module:
    """A peft ``PROMPT_TUNING`` adapter (written by peft or gpt2lora)."""
    source = folder / ADAPTER_CONFIG_FILE
    _check_task(model, raw.get("task_type"), source)
    width = model.transformer.config.n_embd
    n = checked_field(raw, "num_virtual_tokens", source, (int,), required=True)
    token_dim = checked_field(raw, "token_dim", source, (int,), default=width)
    if token_dim != width:
        raise CheckpointError(f"{source}: token_dim is {token_dim}, but the model's n_embd is {width}")
    if checked_field(raw, "num_transformer_submodules", source, (int,), default=1) != 1:
        raise CheckpointError(f"{source}: num_transformer_submodules must be 1 for GPT-2 (a decoder only), got "
                              f"{raw['num_transformer_submodules']!r}")
    if any(True for _ in lora_modules(model)):
        raise CheckpointError(f"cannot load the prompt adapter {source} into a model with LoRA layers; load it "
                              "onto a fresh model")
    current = get_prompt(model)
    if current is not None and current.num_virtual_tokens != n:
        raise CheckpointError(f"{source}: the adapter has {n} virtual tokens but the model's soft prompt has "
                              f"{current.num_virtual_tokens}; load it onto a fresh model")
    layout = {"prompt_embeddings": ("transformer.prompt.weight", (n, width))}
    if _task_type(model) == "SEQ_CLS":
        for name, param in model.get_submodule(HEAD_NAME).named_parameters():
            layout[f"base_model.{HEAD_NAME}.{name}"] = (f"{HEAD_NAME}.{name}", tuple(param.shape))
    expected = {key: torch.empty(shape, device="meta") for key, (_, shape) in layout.items()}
    check_state(expected, tensors, source=f"adapter {folder / ADAPTER_WEIGHTS_FILE}")
    try:
        prepare_model(model, "prompt", prompt=PromptConfig(num_virtual_tokens=n) if current is None else None)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, (name, _) in layout.items():
            params[name].copy_(tensors[key].to(params[name].dtype))
    return model
