"""What a fit did — :class:`History` — and its ``history.jsonl`` file (one JSON line per step / eval)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class History:
    """What a :meth:`Trainer.fit` run did: per-step records, evaluations, best result, speed and memory.

    ``steps``: dicts with ``step`` (1-based count of optimizer steps), ``epoch``, ``loss`` (mean over
    every target row / token of the step's batches), ``lr`` (= ``lr_at_step(step - 1)``), ``grad_norm`` (before clipping) and
    ``skipped`` (true when a non-finite gradient norm skipped the update). ``evals``: dicts with
    ``step``, ``epoch`` and the metrics of :func:`gpt2lora.training.evaluation.evaluate`.
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    """``{"step", "metric", "value", "path"}`` of the best evaluation (None without eval data)."""
    stopped_early: bool = False
    total_steps: int = 0
    runtime_s: float = 0.0
    samples_per_s: float = 0.0
    steps_per_s: float = 0.0
    tokens_per_s: float = 0.0
    """Real (non-padding) tokens per second."""
    peak_memory_mb: float = 0.0
    """Peak memory during this fit (see :mod:`gpt2lora.training.memory`): CUDA max allocated after a reset on a
    GPU; on the CPU the process's peak resident set since the fit began."""
    memory_added_mb: float = 0.0
    """``peak_memory_mb`` minus the same measure when the fit began: what training added (activations,
    gradients, optimizer state)."""
    peak_reserved_mb: float | None = None
    """CUDA only: the peak the caching allocator reserved (≥ allocated)."""
    memory_method: str = ""
    """How the peak was measured: ``cuda``, ``vmhwm``, ``sampled`` or ``process`` (lifetime peak)."""

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    @property
    def lrs(self) -> list[float]:
        return [s["lr"] for s in self.steps]

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step and per-eval lists."""
        skip = {"steps", "evals"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN / inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (``{"type": "step" | "eval" | "summary", ...}``) to a history file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


def rewrite(path: str | os.PathLike, history: History) -> None:
    """Replace a history file with ``history``'s steps and evals in step order (evals after their step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = sorted([("step", s) for s in history.steps] + [("eval", e) for e in history.evals],
                    key=lambda item: (item[1]["step"], item[0] == "eval"))
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while rewriting
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(json_safe({"type": kind, **record})) + "\n" for kind, record in merged)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON line of a history file (a torn last line, left by a kill, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
