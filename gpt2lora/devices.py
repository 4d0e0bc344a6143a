"""Where a model runs, in which precision and on how many CPU threads: the one resolver of ``device``,
``precision`` and ``threads`` settings."""

from __future__ import annotations

import functools
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


CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags")
"""The fields of ``/proc/cpuinfo`` that name a CPU and its instruction sets."""


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's :data:`CPU_FIELDS` as ``/proc/cpuinfo`` gives them (those present; empty where the
    file is missing). Kernel speeds depend on them: the kernel-choices file is named after them
    (:mod:`gpt2lora.ops.stored_choices`) and the benchmarks print them."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip()
                if not name:  # the first processor's block has ended
                    break
                if name in CPU_FIELDS and name not in fields:
                    fields[name] = value.strip()
    except OSError:
        pass
    return fields


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix units torch can use on this CPU: ``amx_bf16`` and/or ``avx512_bf16`` (empty when none).

    Without them torch computes bf16 products by converting to fp32 and back: slower than fp32 itself.
    """
    units = []
    for name, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            units.append(name)
    return units


@functools.cache
def fp16_packed_available() -> bool:
    """Whether this torch build has fbgemm's fp16 linear (x86 builds; not on ARM) and it packs a weight."""
    ops = torch.ops.quantized
    if "fbgemm" not in torch.backends.quantized.supported_engines or not (
            hasattr(ops, "linear_prepack_fp16") and hasattr(ops, "linear_dynamic_fp16")):
        return False
    try:
        ops.linear_dynamic_fp16(torch.ones(1, 8), ops.linear_prepack_fp16(torch.ones(4, 8), None))
    except RuntimeError:  # another quantized engine was set (qnnpack packs no fp16 weights)
        return False
    return True


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each precision name."""


def resolve_precision(precision: str, device: torch.device, setting: str = "precision",
                      inference: bool = False) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``.

    CUDA: all three; ``auto`` is bf16 where the GPU supports it, else fp32. CPU: fp32, and bf16 where the CPU
    has bf16 matrix units (:func:`cpu_bf16_units`); fp16 is refused. On a CPU without those units torch emulates
    bf16 products through fp32 (on a Zen 3 EPYC 7-9x fp32's time in ``F.linear``'s layout and over 100x for a
    backward's input gradient), so bf16 is refused for training and evaluation (which runs under autocast);
    with ``inference`` (generate, serve: no gradients, no autocast) it is allowed where torch has fbgemm's fp16
    product, which computes a bf16 model's products there at fp32's speed or better (decoding 1.6x fp32's
    tok/s; :func:`gpt2lora.ops.packed.takes_fp16_pack_route`). ``auto`` on the CPU is fp32: bf16
    changes every loss and metric in the second or third digit, and on the CPU (unlike CUDA) a run's figures are
    expected to match fp32 references, so bf16 is asked for by name (LoRA steps about 2x faster than fp32 on an
    AVX512-BF16 EPYC without AMX, 2.4-2.9x on an AMX Xeon; see benchmarks/RESULTS.md).
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32" or device.type == "cuda":
        return precision
    if precision == "bf16":
        if cpu_bf16_units():
            return precision
        if inference and fp16_packed_available():
            return precision
        where = ("torch has no fbgemm fp16 product here to run its inference either" if inference else
                 "bf16 trains and evaluates only on CPUs with them; generate and serve run bf16 here through "
                 "fbgemm's fp16 product")
        raise ConfigError(f"{setting}='bf16' on {device}: this CPU has no bf16 matrix units (avx512_bf16 or "
                          f"amx_bf16), where torch's bf16 products run many times slower than fp32 ({where}); "
                          "use 'fp32' or 'auto'")
    raise ConfigError(f"{setting}={precision!r} needs a CUDA device; on {device} use 'fp32', 'bf16' (CPUs with "
                      "bf16 units) or 'auto'")


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for a run's summary: the precision ``precision`` resolves to on ``device`` and why."""
    resolved = resolve_precision(precision, device)
    picked = f"{resolved} (picked by 'auto')" if precision == "auto" else resolved
    if device.type == "cuda":
        return f"precision: {picked} on {device}"
    units = ", ".join(cpu_bf16_units()) or "none"
    why = ("; auto is fp32 on the CPU so that figures match fp32 references (ask for bf16 by name)"
           if precision == "auto" else "")
    held = "; frozen base matrices held in bf16, trainable tensors and optimizer state in fp32" \
        if resolved == "bf16" else ""
    return f"precision: {picked} on the CPU (bf16 matrix units: {units}){held}{why}"


def autocast(precision: str, device: torch.device) -> Any:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
