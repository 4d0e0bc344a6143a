"""Where a model runs and in which precision: the one resolver of ``device`` and ``precision`` settings."""

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
