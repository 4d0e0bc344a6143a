"""Experiment tracking: a run's hyperparameters and metrics in TensorBoard or Weights & Biases.

``make_trackers(["tensorboard", "wandb"], run_folder, run_name, hparams)`` returns one :class:`Trackers`
that the :class:`~gpt2lora.training.trainer.Trainer` calls after every optimizer step (``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_s``) and every evaluation (``eval/<metric>`` for each metric).
A backend is a short class with the three methods of :class:`Tracker`, registered in :data:`BACKENDS`
with the package it needs and the extra that installs it. A backend's package is imported only when
the backend is chosen; only rank 0 of a distributed run tracks anything.

* ``tensorboard`` (``pip install 'gpt2lora[tensorboard]'``): event files in ``RUN/tensorboard/``
  (``tensorboard --logdir runs``), hyperparameters in the HParams tab;
* ``wandb`` (``pip install 'gpt2lora[wandb]'``): a W&B run named after the run, its files under
  ``RUN/wandb/``; project ``$WANDB_PROJECT`` (default ``gpt2lora``); ``WANDB_MODE=offline`` works without
  an account (``wandb sync`` uploads later).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from ..errors import ConfigError
from . import distributed

NONE = "none"


class Tracker(Protocol):
    """What the Trainer needs of a tracking backend."""

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's configuration (flat ``section.key`` -> bool / int / float / str)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and finish the run."""


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as ``a.b`` -> scalar; lists and None become their JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Scalars in a TensorBoard event file under ``folder`` (written by ``torch.utils.tensorboard``)."""

    def __init__(self, folder: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        flat = flatten(hparams)
        for summary in hparams_summary(flat, {}):  # the HParams tab, in this run's own event file
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in flat.items()))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in _finite(metrics).items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run: ``wandb.init(project=$WANDB_PROJECT or "gpt2lora", name=run_name, dir=folder)``."""

    def __init__(self, folder: Path, run_name: str) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "gpt2lora", name=run_name, dir=str(folder))

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(flatten(hparams), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(_finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


@dataclass(frozen=True)
class Backend:
    """A tracking backend: the module it imports, the extra that installs it, where it writes, its class."""

    module: str
    extra: str
    subfolder: str
    factory: Callable[[Path, str], Tracker]


#: ``--report-to`` names -> backends. Another backend is one class and one entry here.
BACKENDS: dict[str, Backend] = {
    "tensorboard": Backend("tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
    "wandb": Backend("wandb", "wandb", ".", WandbTracker),
}


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` / ``["tensorboard"]`` / ``"none"`` / None -> the backend names, checked."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    if NONE in names:
        if len(names) > 1:
            raise ConfigError(f"report_to: 'none' cannot be combined with other backends, got {','.join(names)}")
        return ()
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"report_to: unknown backend {name!r}; choose from {', '.join(BACKENDS)} or none")
    return tuple(dict.fromkeys(names))


class Trackers:
    """Several trackers as one (none at all is a no-op); also a context manager that closes them."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_hparams(hparams)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def make_trackers(report_to: str | Sequence[str] | None, folder: str | os.PathLike, run_name: str,
                  hparams: Mapping[str, Any] | None = None) -> Trackers:
    """The trackers ``report_to`` names, writing under the run ``folder``; the run's configuration
    ``hparams`` is recorded at once. Empty (a no-op) for ``none`` and on every rank but 0."""
    names = parse_report_to(report_to)
    for name in names:  # every package is checked before any backend starts
        backend = BACKENDS[name]
        if importlib.util.find_spec(backend.module) is None:
            raise ConfigError(f"report_to {name}: the {backend.module} package is not installed; "
                              f"pip install 'gpt2lora[{backend.extra}]'")
    if not names or not distributed.is_main_process():
        return Trackers()
    trackers = Trackers()
    try:
        for name in names:
            backend = BACKENDS[name]
            where = Path(folder) / backend.subfolder
            where.mkdir(parents=True, exist_ok=True)
            trackers.trackers.append(backend.factory(where, run_name))
        if hparams:
            trackers.log_hparams(hparams)
    except BaseException:
        trackers.close()
        raise
    return trackers
