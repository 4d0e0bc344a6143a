"""Checks on tensors read from disk: floating-point dtypes and finite values, refused by name.

One pass per tensor: a float32-accumulated sum is finite exactly when every element is finite (a NaN or an
inf anywhere makes it non-finite), so only a tensor whose sum is not finite is counted element by element
(an overflowing sum of finite values then counts zero and passes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError

#: safetensors' dtype codes (as in a file's JSON header) -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "C64": torch.complex64,
}
#: dtypes a model can hold its weights in (compute on CPU or GPU); other floats load only converted.
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: The hint every refusal of non-finite values ends with.
OPT_OUT = "pass allow_nonfinite=True to load it anyway"


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.int32`` -> ``int32``; a safetensors code without a torch dtype is returned as is."""
    if isinstance(dtype, str):
        dtype = SAFETENSORS_DTYPES.get(dtype, dtype)
    return str(dtype).removeprefix("torch.")


def is_float(dtype: torch.dtype | str) -> bool:
    """Whether a torch dtype or safetensors code is a real floating-point type."""
    if isinstance(dtype, str):
        dtype = SAFETENSORS_DTYPES.get(dtype)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def check_model_dtype(dtype: object, where: str) -> None:
    """Refuse a ``dtype=`` argument a model cannot hold its weights in."""
    if dtype is not None and dtype not in MODEL_DTYPES:
        allowed = ", ".join(f"torch.{dtype_name(d)}" for d in MODEL_DTYPES)
        raise ConfigError(f"{where} dtype: expected one of {allowed} or None, got {dtype!r}")


def check_floating(dtypes: Mapping[str, torch.dtype | str], source: str | Path) -> None:
    """Raise one error naming every tensor stored as an integer, bool or complex type where floats belong."""
    bad = [f"{name} is {dtype_name(dtype)}" for name, dtype in dtypes.items() if not is_float(dtype)]
    if bad:
        raise CheckpointError(f"{source}: tensor {', tensor '.join(bad)}; expected floating-point values "
                              "(float32, float16 or bfloat16)")


def nonfinite(tensor: Tensor) -> tuple[int, int]:
    """``(NaN count, inf count)`` of a tensor; ``(0, 0)`` for non-float tensors."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0, 0
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def nonfinite_report(tensors: Mapping[str, Tensor]) -> list[str]:
    """``"name (k of n: a NaN, b inf)"`` for every tensor holding a NaN or an inf, in the mapping's order."""
    found = []
    for name, tensor in tensors.items():
        nans, infs = nonfinite(tensor)
        if nans or infs:
            found.append(f"{name} ({nans + infs} of {tensor.numel()}: {nans} NaN, {infs} inf)")
    return found


def check_finite(groups: Iterable[tuple[str | Path, Mapping[str, Tensor]]], allow_nonfinite: bool = False) -> None:
    """Raise one error naming, per file, every tensor with NaN/inf values and their count.

    ``groups`` pairs a file (named in the message) with its tensors; ``allow_nonfinite=True`` skips the check.
    """
    if allow_nonfinite:
        return
    raise_nonfinite([(source, nonfinite_report(tensors)) for source, tensors in groups])


def raise_nonfinite(reports: Iterable[tuple[str | Path, list[str]]]) -> None:
    """Raise :func:`check_finite`'s error for ``reports`` (a file and its :func:`nonfinite_report`), if any."""
    parts, count = [], 0
    for source, found in reports:
        if found:
            count += len(found)
            parts.append(f"{source}: {', '.join(found)}")
    if parts:
        raise CheckpointError(f"non-finite values (NaN/inf) in {count} tensor{'s' if count > 1 else ''} of "
                              f"{'; '.join(parts)}; {OPT_OUT}")


def check_training_checkpoint(folder: Path, weights: Mapping[str, Tensor], optimizer: Mapping[str, Tensor],
                              weights_name: str, optimizer_name: str, allow_nonfinite: bool = False) -> None:
    """A training checkpoint's trainable tensors must be floats; they and the optimizer state must be finite.

    Random-generator states (``rng.*``, bytes) are not values and are not checked.
    """
    check_floating({name: t.dtype for name, t in weights.items()}, folder / weights_name)
    check_floating({name: t.dtype for name, t in optimizer.items() if not name.startswith("rng.")},
                   folder / optimizer_name)
    check_finite([(folder / weights_name, weights), (folder / optimizer_name, optimizer)], allow_nonfinite)
