"""Where a model runs, in which precision and on how many CPU threads: the one resolver of ``device``,
``precision`` and ``threads`` settings."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA must be present.

    ``setting`` names the option in the error (``--device``, ``TrainConfig.device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{setting}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def set_threads(threads: int | None, setting: str = "threads") -> None:
    """Run torch's CPU ops on ``threads`` threads (None: leave torch's choice). The only place gpt2lora sets it.

    torch's thread count belongs to the process, so only entry points call this (the ``gpt2lora`` command,
    ``run``, ``run_recipe``), never a model or the Trainer.
    """
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"{setting}: expected a positive integer, got {threads!r}")
    torch.set_num_threads(threads)


def resolve_precision(precision: str, device: torch.device, setting: str = "precision") -> str:
    """``fp32``, ``bf16`` or ``fp16``; half precision only on CUDA (CPU trains in fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"{setting}={precision!r} needs a CUDA device; on {device} use 'fp32' or 'auto'")
    return precision


def autocast(precision: str, device: torch.device) -> Any:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
