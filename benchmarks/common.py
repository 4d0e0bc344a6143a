"""Shared benchmark helpers: interleaved A/B timing with warm-up and medians, machine description, RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2lora.devices import cpu_info

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Timing:
    """Seconds per repeat of one contender."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.3f}–{max(self.seconds):.3f} s"


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 3,
                warmup: int = 1) -> dict[str, Timing]:
    """Time each contender ``repeats`` times, alternating A, B, A, B ... after ``warmup`` untimed rounds.

    Alternating spreads slow phases of a shared machine over every contender instead of one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for run in contenders.values():
            run()
    timings = {name: Timing(name) for name in contenders}
    for i in range(repeats):
        order = list(contenders.items())
        if i % 2:  # also alternate who goes first
            order.reverse()
        for name, run in order:
            start = time.perf_counter()
            run()
            timings[name].seconds.append(time.perf_counter() - start)
    return timings


def cpu_model() -> str:
    """The CPU's name: ``/proc/cpuinfo``'s model name, else ``lscpu``'s (ARM), else the platform's."""
    name = cpu_info().get("model name")
    if name:
        return name
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU flags that decide which kernels are fast (AVX2 / AVX-512 fp32, AVX512-BF16 and AMX bf16 products)."""


def cpu_flags() -> str:
    """Which of :data:`FLAGS` the CPU has, as ``flags avx2 avx512f -avx512_bf16 ...`` (``-`` = absent)."""
    if "flags" not in cpu_info():
        return "flags unknown"
    present = set(cpu_info()["flags"].split())
    return "flags " + " ".join(flag if flag in present else f"-{flag}" for flag in FLAGS)


def cores_line() -> str:
    """``N cores visible``, or ``K of N cores usable`` where the process is pinned to fewer (``taskset``)."""
    total = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    return f"{total} cores visible" if usable == total else f"{usable} of {total} cores usable (CPU affinity)"


def machine_line() -> str:
    """One line naming the CPU and its flags, core count, torch version and threads the figures were taken with."""
    return (f"{cpu_model()} ({cpu_flags()}), {cores_line()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}")


HEADER = """# Benchmark results

Figures written by the scripts in `benchmarks/`; each section names the command that produced it.
Machine of the first figures: {machine}.
"""


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md, leaving other sections alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER.format(machine=machine_line())
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")
