"""Memory of one training run, measured per run even when one process runs several.

A process's lifetime peak (``ru_maxrss``) says nothing about the second fit of a sweep, a notebook or
the quickstart: it stays at the first fit's peak. :class:`MemoryMeter` resets the peak when a fit
begins — CUDA's allocator statistics, or on Linux the kernel's resident-set high-water mark
(``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs``) — and reads it when the fit ends.
Where neither is possible a background thread samples the resident set instead.

* ``peak_mb``: the peak during the fit — CUDA: ``max_memory_allocated`` (tensors: weights, activations,
  gradients, optimizer state; what the reference reports call "GPU memory allocated"); CPU: the
  process's peak resident set, which also holds the Python interpreter, libraries and data.
* ``added_mb``: that peak minus the same measure when the fit began: what training added on top of
  what was already there (activations, gradients, optimizer state, and on the CPU allocator caches).
* ``reserved_mb`` (CUDA only): the peak the caching allocator held from the driver, ≥ allocated.
"""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A ``kB`` line of /proc/self/status (``VmRSS``, ``VmHWM``), None where there is no such file."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mb() -> float | None:
    """Current resident set of this process in MiB (Linux), else None."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def lifetime_peak_rss_mb() -> float:
    """The process's peak resident set since it started (``ru_maxrss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's ``VmHWM`` to the current resident set; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


@dataclass(frozen=True)
class MemoryReading:
    """Memory of one fit, in MiB (see the module docstring for what each figure means)."""

    peak_mb: float
    added_mb: float
    reserved_mb: float | None
    method: str
    """How the peak was taken: ``cuda``, ``vmhwm`` (Linux kernel), ``sampled`` or ``process`` (lifetime)."""


class MemoryMeter:
    """``start()`` when a fit begins, ``stop()`` when it ends -> :class:`MemoryReading` of that span."""

    def __init__(self, device: torch.device | str = "cpu", sample_every_s: float = 0.05) -> None:
        self.device = torch.device(device)
        self.sample_every_s = sample_every_s
        self._start_mb = 0.0
        self._method = "process"
        self._sampled_peak = 0.0
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self._method = "cuda"
            return self
        current = rss_mb()
        if current is not None and reset_peak_rss():
            self._start_mb, self._method = current, "vmhwm"
        elif current is not None:
            self._start_mb, self._method, self._sampled_peak = current, "sampled", current
            self._stop_sampling.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True, name="gpt2lora-memory")
            self._sampler.start()
        else:  # no /proc (macOS, Windows): only the process's lifetime peak is known
            self._start_mb, self._method = lifetime_peak_rss_mb(), "process"
        return self

    def _sample(self) -> None:
        while not self._stop_sampling.wait(self.sample_every_s):
            current = rss_mb()
            if current is not None:
                self._sampled_peak = max(self._sampled_peak, current)

    def stop(self) -> MemoryReading:
        if self._method == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            reserved = torch.cuda.max_memory_reserved(self.device) / 2**20
            return MemoryReading(peak, peak - self._start_mb, reserved, "cuda")
        if self._method == "vmhwm":
            peak = (_status_kib("VmHWM") or 0) / 1024
        elif self._method == "sampled":
            self._stop_sampling.set()
            if self._sampler is not None:
                self._sampler.join()
            peak = max(self._sampled_peak, rss_mb() or 0.0)
        else:
            peak = lifetime_peak_rss_mb()
        return MemoryReading(peak, max(peak - self._start_mb, 0.0), None, self._method)
