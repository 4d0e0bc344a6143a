"""``gpt2lora train ... --plan``: the memory plan of a run (or of every row of a recipe or sweep) before anything
is downloaded or trained (:mod:`gpt2lora.training.memory_plan` holds the estimate)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..data.tasks import CLASSIFICATION_KINDS, TASKS
from ..errors import ConfigError
from ..training.memory_plan import (
    MemoryPlan,
    ModelShape,
    PlanSetting,
    default_device_memory,
    model_shape,
    parse_size,
    plan_memory,
)
from .runconfig import EVAL_ONLY, RunConfig


def plan_setting(config: RunConfig) -> PlanSetting:
    """What the plan needs of a run: the model's shape (its name or local config.json), the task's objective (LM or classification), the batch."""
    from .run import SMOKE_SHAPE  # the smoke model's shape

    config = config.resolved()
    if config.smoke:
        shape = ModelShape(SMOKE_SHAPE["n_layer"], SMOKE_SHAPE["n_embd"], SMOKE_SHAPE["n_head"],
                           n_positions=SMOKE_SHAPE["n_positions"])
    else:
        shape = model_shape(config.model)
    preset = TASKS.get(config.task) if config.data is None else None
    # own data: its kind is in its columns, which the plan does not read; a classifier is the cheaper guess
    classifies = preset is None or preset.kind in CLASSIFICATION_KINDS
    objective = "classification" if classifies else "lm"
    # the device a run would use; named but absent (planning a GPU run on a laptop) is fine here
    text = config.train.device
    device = "cuda" if text.startswith("cuda") or (text == "auto" and torch.cuda.is_available()) else "cpu"
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    elif precision == "fp16" and device != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device (--device {text})")
    world = config.plan_devices or int(os.environ.get("WORLD_SIZE", "1") or 1)
    return PlanSetting(
        shape, method=config.method if config.method != EVAL_ONLY else "head", objective=objective,
        num_labels=(preset.num_labels if preset else None) or 2, batch_size=config.train.batch_size,
        max_length=min(config.max_length, shape.n_positions), grad_accum_steps=config.train.grad_accum_steps,
        gradient_checkpointing=config.train.gradient_checkpointing, precision=precision,
        optimizer=config.train.optimizer, world_size=world, strategy=config.train.distributed, device=device,
        lora=config.lora_config, last_n=config.last_n_blocks if config.method == "last_n_full" else None,
        loss_chunk_size=config.train.loss_chunk_size)


def plan_for(config: RunConfig) -> MemoryPlan:
    """The memory plan of ``config`` against ``--device-memory`` (default: the device's own memory)."""
    setting = plan_setting(config)
    budget = parse_size(config.device_memory) if config.device_memory else default_device_memory(setting.device)
    return plan_memory(setting, budget)


def plan_text(rows: Sequence[tuple[str, RunConfig]]) -> str:
    """The plans of named configs (one run, a recipe's rows, a sweep's grid), one block each."""
    blocks = []
    for name, config in rows:
        blocks.append((f"[{name}]\n" if len(rows) > 1 else "") + plan_for(config).text())
    return "\n\n".join(blocks)


__all__ = ["plan_for", "plan_setting", "plan_text"]
