"""Which layers get an adapter: the one resolver from (targets, blocks, head) to module names.

Every place that needs "which modules does this adapter wrap" asks here: :func:`gpt2lora.apply_lora` and
``add_adapter`` (:func:`lora_layers`), the adapter files in both of peft's spellings (``target_modules`` +
``layers_to_transform``: :func:`peft_selection` / :func:`selection_from_peft`; full module names:
:func:`selection_from_modules`), diagnostics (:func:`candidate_layers`) and ``combine_adapters``
(:func:`covering_selection`).

A selection is the same targets in the last N blocks (``LoRAConfig.targets`` + ``last_n_blocks``) and, with
target ``lm_head``, the output head: ``lm_head`` of a language model, ``score`` of a classifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import BLOCK_TARGETS, HEAD_TARGET, LORA_TARGETS, QKV_TARGETS, LoRAConfig
from ..errors import CheckpointError, ConfigError
from .slots import HEAD_NAME, QKV_PARTS

#: peft's name of the block list of GPT-2 (``layers_pattern``).
LAYERS_PATTERN = "h"
BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def block_count(model: nn.Module, verb: str = "apply_lora") -> int:
    """Number of transformer blocks of a gpt2lora model (``transformer.h``)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{verb} expects a gpt2lora model with transformer.h blocks, got {type(model).__name__}")
    return len(blocks)


def head_module_name(model: nn.Module) -> str:
    """The output head the ``lm_head`` target wraps: ``score`` on a classifier, else ``lm_head``."""
    for name in (HEAD_NAME, "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"LoRA target 'lm_head': {type(model).__name__} has neither a score nor an lm_head module")


def block_layer(block: int, target: str) -> str:
    """Qualified name of block layer ``target`` (one of ``BLOCK_TARGETS``) in block ``block``."""
    return f"transformer.h.{block}.{target}"


def lora_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(qualified name, q/k/v parts)`` of every module ``config`` wraps; parts are empty but for c_attn
    split into ``attn.q`` / ``attn.k`` / ``attn.v``."""
    n_layer = block_count(model)
    split = [t for t in config.targets if t in QKV_TARGETS]
    parts = tuple(QKV_PARTS[t] for t in split)
    layers: list[tuple[str, tuple[str, ...]]] = []
    for i in config.blocks(n_layer):
        for target in config.targets:
            if target in BLOCK_TARGETS:
                layers.append((block_layer(i, target), ()))
            elif split and target == split[0]:  # one wrapper on c_attn, where the first of q/k/v is listed
                layers.append((block_layer(i, "attn.c_attn"), parts))
    if HEAD_TARGET in config.targets:
        layers.append((head_module_name(model), ()))
    return layers


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules ``config`` wraps (``transformer.h.{i}.<target>``, ``lm_head``/``score``)."""
    return [name for name, _ in lora_layers(model, config)]


def target_of(layer: str, parts: tuple[str, ...] = ()) -> tuple[str, int | None]:
    """``(target, block)`` of a wrapped module name: the inverse of :func:`lora_layers` (q/k/v pairs on
    ``c_attn`` read ``attn.q+attn.v``; the output head is ``lm_head`` with no block)."""
    match = BLOCK.fullmatch(layer)
    if match is None:
        return HEAD_TARGET, None
    target = "+".join(f"attn.{p}" for p in parts) if parts else match.group(2)
    return target, int(match.group(1))


def candidate_layers(model: nn.Module) -> list[str]:
    """Every module an adapter could wrap: each block's linear layers, then the output head."""
    n_layer = block_count(model, "diagnose")
    return [block_layer(i, t) for i in range(n_layer) for t in BLOCK_TARGETS] + [head_module_name(model)]


# --- peft's spellings ------------------------------------------------------------------------------------

def peft_selection(config: LoRAConfig, n_layer: int) -> dict[str, Any]:
    """``target_modules`` / ``layers_to_transform`` / ``layers_pattern`` of ``config`` as peft writes them."""
    last_n = config.last_n_blocks is not None
    return {"target_modules": list(config.targets),
            "layers_to_transform": config.blocks(n_layer) if last_n else None,
            "layers_pattern": LAYERS_PATTERN if last_n else None}


def _fail(source: Path | str | None, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}" if source is not None else message)


def modules_from_peft(target_modules: str | Sequence[str], layers_to_transform: int | Sequence[int] | None,
                      layers_pattern: Any, n_layer: int, source: Path | str | None = None
                      ) -> tuple[set[tuple[int, str]], bool]:
    """The ``(block, target)`` layers and whether the head, as peft matches its fields on GPT-2.

    ``target_modules``: ``"all-linear"``, a regex matched against full module names, or a list of suffixes
    (``"c_attn"``, ``"attn.c_attn"``, full names such as ``"transformer.h.3.attn.c_attn"``) and ``lm_head``.
    ``layers_to_transform`` keeps those blocks (peft matches it against block indices, so it drops ``lm_head``).
    """
    every = [(i, t) for i in range(n_layer) for t in BLOCK_TARGETS]
    if target_modules == "all-linear":
        target_modules = list(BLOCK_TARGETS)
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise _fail(source, f"target_modules {target_modules!r} is not a valid regex: {err}") from None
        chosen = {(i, t) for i, t in every if pattern.fullmatch(block_layer(i, t))}
        head = bool(pattern.fullmatch(HEAD_TARGET))
    else:
        chosen, head = set(), HEAD_TARGET in target_modules
        for entry in target_modules:
            if entry == HEAD_TARGET:
                continue
            # peft's rule: the module's full name equals the entry or ends with "." + entry
            hits = {(i, t) for i, t in every
                    if block_layer(i, t) == entry or block_layer(i, t).endswith("." + str(entry))}
            if not hits:
                raise _fail(source, f"target_modules entry {entry!r} names no layer gpt2lora can wrap (it wraps "
                                    f"{', '.join(BLOCK_TARGETS)} inside transformer.h blocks, and {HEAD_TARGET})")
            chosen |= hits
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        bad = sorted(i for i in wanted if not isinstance(i, int) or not 0 <= i < n_layer)
        if bad:
            raise _fail(source, f"layers_to_transform names blocks {bad}, but the model has {n_layer} blocks "
                                f"(0..{n_layer - 1})")
        if layers_pattern not in (None, LAYERS_PATTERN, [LAYERS_PATTERN]):
            raise _fail(source, f"layers_pattern {layers_pattern!r} is not GPT-2's; expected {LAYERS_PATTERN!r}")
        chosen = {(i, t) for i, t in chosen if i in wanted}
        head = False
    return chosen, head


def selection_from_layers(chosen: set[tuple[int, str]], head: bool, n_layer: int,
                          source: Path | str | None = None) -> tuple[tuple[str, ...], int | None]:
    """``(targets, last_n_blocks)`` of a LoRAConfig that wraps exactly ``chosen`` (and the head), or an error."""
    if not chosen and not head:
        raise _fail(source, "target_modules / layers_to_transform select no layer of this model")
    if not chosen:
        return (HEAD_TARGET,), None
    blocks = sorted({i for i, _ in chosen})
    targets = tuple(t for t in BLOCK_TARGETS if any(c == t for _, c in chosen))
    if chosen != {(i, t) for i in blocks for t in targets} or blocks != list(range(n_layer - len(blocks), n_layer)):
        raise _fail(source, f"the adapter wraps blocks {blocks} with targets {list(targets)} in a pattern "
                            "gpt2lora cannot express; it applies the same targets to the last N blocks")
    if head and len(blocks) < n_layer:
        raise _fail(source, f"the adapter wraps lm_head and only blocks {blocks}; gpt2lora's last_n_blocks "
                            "cannot hold a head LoRA in peft's layout")
    return targets + ((HEAD_TARGET,) if head else ()), (len(blocks) if len(blocks) < n_layer else None)


def selection_from_peft(target_modules: str | Sequence[str], layers_to_transform: int | Sequence[int] | None,
                        layers_pattern: Any, n_layer: int, source: Path | str | None = None
                        ) -> tuple[tuple[str, ...], int | None]:
    """``(targets, last_n_blocks)`` from peft's ``target_modules`` / ``layers_to_transform`` / ``layers_pattern``."""
    chosen, head = modules_from_peft(target_modules, layers_to_transform, layers_pattern, n_layer, source)
    return selection_from_layers(chosen, head, n_layer, source)


def selection_from_modules(names: Iterable[str], n_layer: int, source: Path | str | None = None
                           ) -> tuple[tuple[str, ...], int | None]:
    """``(targets, last_n_blocks)`` from the full module names an adapter wraps (peft's tensor keys without
    ``base_model.model.``, or ``target_modules`` written as full names)."""
    chosen, head = set(), False
    for name in names:
        if name in (HEAD_TARGET, HEAD_NAME):
            head = True
            continue
        match = BLOCK.fullmatch(name)
        if match is None or match.group(2) not in BLOCK_TARGETS or not 0 <= int(match.group(1)) < n_layer:
            raise _fail(source, f"module {name!r} is no layer gpt2lora can wrap (it wraps "
                                f"{', '.join(BLOCK_TARGETS)} in transformer.h.0..{n_layer - 1}, and {HEAD_TARGET})")
        chosen.add((int(match.group(1)), match.group(2)))
    return selection_from_layers(chosen, head, n_layer, source)


def covering_selection(configs: Iterable[LoRAConfig]) -> tuple[tuple[str, ...], int | None]:
    """``(targets, last_n_blocks)`` that cover every layer of every config (``combine_adapters``' new adapter)."""
    configs = list(configs)
    targets = tuple(t for t in LORA_TARGETS if any(t in c.targets for c in configs))
    depths = [c.last_n_blocks for c in configs]
    return targets, (None if any(d is None for d in depths) else max(depths))
