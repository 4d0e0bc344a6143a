"""Kernel choices kept on disk, one file per machine, so that every process on it computes with the same kernels.

:meth:`gpt2lora.ops.few_row.KernelChoice.decide` picks between exact forms of a training product by timing them.
The forms agree only up to float rounding, and where two are within the timing noise two processes could pick
differently, so the same seed would no longer give the same weights in two runs. Its choices are therefore
written here the first time they are made on a machine and read back by every later process: the first process
to need a shape times it (holding the file's lock, so that a second process waiting for the same shape reads the
first's choice instead of timing its own), the rest reuse it.

Decoding's one-row products (:meth:`~gpt2lora.ops.few_row.KernelChoice.pick`) are timed across a generation's
first steps, without holding the lock; a choice made there is stored too (the first process's stays), so a later
process's first ``generate`` skips those trials (about 0.4 s for GPT-2 124M on two cores) and decodes with the
same kernels. A kept product on a packed weight is stored with its plan (after how many unpacked products of a
weight its pack pays: :class:`~gpt2lora.ops.few_row.PackPlan`), so a later process does not pack every weight at
its first product either.

The file lives in ``$XDG_CACHE_HOME/gpt2lora/kernel-choices/`` (``~/.cache`` by default), named after a hash of
what the kernels' speed depends on: the CPU (vendor, family, model, name, flags), the core count and torch's
version and CPU capability, and the revision of the candidate kernels (``CANDIDATES``). A new torch, another
CPU or a new candidate kernel gets a new file. ``GPT2LORA_KERNEL_CHOICES`` names
another file, or ``off`` keeps the choices in memory only (each process times its own). Deleting the file makes
the next process measure again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Hashable, Iterator
from pathlib import Path

import torch

from ..devices import cpu_info

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two processes deciding one shape at once may time it both
    fcntl = None

ENVIRONMENT = "GPT2LORA_KERNEL_CHOICES"
"""Names the choices file to use instead of this machine's default, or ``off`` for none."""
FORMAT = 1
CANDIDATES = 5
"""Raised whenever a kernel is added to a choice's candidates, one changes or the way they are timed changes (2:
fbgemm's fp16 pack for half weights; 3: each timed call after a warm-up run of its kernel; 4: a kept packed
product stored with its plan, :class:`gpt2lora.ops.few_row.PackPlan`; 5: the plan's pack cost timed also where
the trial's weight held a pack already, which had stored plans that pack at once): a stored choice was made
among the old ones, so a new set gets a new file and is measured again."""


@functools.cache
def machine_identity() -> str:
    """What kernel speeds depend on, as one line: CPU vendor, family, model, name and flags, cores, torch."""
    fields = cpu_info() or {"processor": platform.processor() or platform.machine()}
    capability = torch.backends.cpu.get_cpu_capability()
    return "; ".join([*(f"{k}: {v}" for k, v in fields.items()), f"cores: {os.cpu_count()}",
                      f"torch: {torch.__version__} ({capability})", f"candidates: {CANDIDATES}"])


def default_path() -> Path | None:
    """The choices file this process uses: ``GPT2LORA_KERNEL_CHOICES``, or this machine's file in the user's
    cache; ``None`` when the variable is ``off``."""
    named = os.environ.get(ENVIRONMENT, "").strip()
    if named.lower() == "off":
        return None
    if named:
        return Path(named).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(machine_identity().encode()).hexdigest()[:16]
    return cache / "gpt2lora" / "kernel-choices" / f"{digest}.json"


def key_text(key: Hashable) -> str:
    """A key as the file stores it: its ``repr`` (ints, strings, bools, tuples and torch dtypes print stably)."""
    return repr(key)


class ChoiceFile:
    """One JSON file of kernel choices: {key text: kernel name}, read and written under an exclusive lock.

    ``path=None`` (the default) follows :func:`default_path` at each use, so a test or a user can point
    ``GPT2LORA_KERNEL_CHOICES`` elsewhere after import.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.fixed_path = None if path is None else Path(path)

    @property
    def path(self) -> Path | None:
        return self.fixed_path if self.fixed_path is not None else default_path()

    @contextlib.contextmanager
    def open(self) -> Iterator[dict[str, str] | None]:
        """The stored choices as a dict, locked against other processes while the block runs; what the block
        adds to the dict is written back. ``None`` when no file is used or it cannot be created (then nothing is
        stored: each process decides for itself, as without a file)."""
        path = self.path
        if path is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = stack.enter_context(open(path.with_name(path.name + ".lock"), "a+"))
            except OSError as error:
                warnings.warn(f"kernel choices are not stored: cannot create {path} ({error}); set {ENVIRONMENT} "
                              "to a writable file or to 'off'", RuntimeWarning, stacklevel=4)
                yield None
                return
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            choices = self._read(path)
            before = dict(choices)
            yield choices
            if choices != before:
                try:
                    self._write(path, choices)
                except OSError as error:  # a full or read-only disk costs the next process a measurement, no more
                    warnings.warn(f"kernel choices not stored in {path} ({error})", RuntimeWarning, stacklevel=4)

    def _read(self, path: Path) -> dict[str, str]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            stored = json.loads(text)
            if stored.get("format") != FORMAT or not isinstance(stored.get("choices"), dict):
                raise ValueError(f"expected format {FORMAT} with a 'choices' object")
            return {str(k): str(v) for k, v in stored["choices"].items()}
        except (ValueError, AttributeError) as error:
            # A cache, never anyone's only copy of anything: kept aside for a look, then measured again.
            aside = path.with_name(path.name + ".unreadable")
            path.replace(aside)
            warnings.warn(f"{path}: unreadable kernel choices ({error}); moved to {aside.name}, measuring again",
                          RuntimeWarning, stacklevel=5)
            return {}

    def _write(self, path: Path, choices: dict[str, str]) -> None:
        text = json.dumps({"format": FORMAT, "machine": machine_identity(), "choices": choices}, indent=1,
                          sort_keys=True)
        partial = path.with_name(path.name + f".{os.getpid()}.tmp")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(path)  # readers without the lock (none here) never see half a file
