"""Results tables (markdown / CSV / JSON) and plots (PNG, drawn with ``matplotlib``).

A result is a flat dict; the columns below are shown when at least one row has them, in the shape
of the published reports: method, eval loss, accuracy, F1, precision, recall (or EM / F1, or
perplexity), trainable parameters and share, training time, throughput and peak memory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..constants import SUMMARY_FILE
from ..training.metrics import current_metric_names

Row = Mapping[str, Any]


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}"


def _count(v: Any) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if v >= size:
            return f"{v / size:.3g}{unit}"
    return str(int(v))


def _share(v: Any) -> str:
    return f"{v:.3g}%" if v < 1 else f"{v:.2f}%"


def _memory(v: Any) -> str:
    return f"{v / 1024:.2f} GB" if v >= 1024 else f"{v:.0f} MB"


#: (key, header, formatter) of every column a table can show, in order.
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("method", "Method", str),
    ("loss", "Eval loss", _num(4)),
    ("accuracy", "Accuracy (%)", _pct),
    ("f1_macro", "F1 (macro)", _num(4)),
    ("precision_macro", "Precision (macro)", _num(4)),
    ("recall_macro", "Recall (macro)", _num(4)),
    ("exact_match", "EM (%)", _pct),
    ("squad_f1", "F1 (%)", _pct),
    ("perplexity", "Perplexity", _num(2)),
    ("trainable_params", "Trainable params", _count),
    ("trainable_pct", "% of total", _share),
    ("train_time_s", "Training time (s)", _num(1)),
    ("eval_time_s", "Eval runtime (s)", _num(2)),
    ("samples_per_s", "Samples/s", _num(1)),
    ("steps_per_s", "Steps/s", _num(2)),
    ("peak_memory_mb", "Peak memory", _memory),
    ("memory_added_mb", "Memory added", _memory),
]
#: The headline metric of a results table, by preference: what a task kind is judged by.
MAIN_METRICS = ("accuracy", "squad_f1", "rouge_l_f1", "loss")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    if not _present(value):
        return "–"
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


def table_columns(rows: Sequence[Row], extra: Sequence[str] = ()) -> list[tuple[str, str, Callable]]:
    """The known columns that some row fills, then ``extra`` keys (e.g. sweep parameters) after method."""
    known = [c for c in COLUMNS if any(_present(r.get(c[0])) for r in rows)]
    added = [(k, k, str) for k in extra if k not in {c[0] for c in COLUMNS}]
    return known[:1] + added + known[1:]


def markdown_table(rows: Sequence[Row], extra: Sequence[str] = ()) -> str:
    """A GitHub markdown table of ``rows``; empty cells show "–"."""
    rows = [current_metric_names(r) for r in rows]  # rows of older run folders too
    columns = table_columns(rows, extra)
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """Every key of every row as CSV columns (raw numbers, not formatted)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    return path


def write_json(data: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_summary(folder: str | os.PathLike, rows: Sequence[Row], title: str, notes: Iterable[str] = (),
                  extra: Sequence[str] = (), plots: Sequence[Path] = ()) -> Path:
    """``summary.md``: a title, the comparison table, notes and links to the plots."""
    folder = Path(folder)
    parts = [f"# {title}\n", markdown_table(rows, extra)]
    notes = [n for n in notes if n]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    for plot in plots:
        parts.append(f"![{plot.stem}]({plot.name})\n")
    path = folder / SUMMARY_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Plots

def new_figure(width: float, height: float) -> tuple[Any, Any] | None:
    """A matplotlib figure and its axes drawn off screen, or None (with a warning) without matplotlib.

    ``matplotlib.figure.Figure`` renders through its own Agg canvas, so no backend is chosen for the process
    (a notebook's inline backend stays as it was) and pyplot keeps no reference to close.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so no plots are drawn (it is a dependency of gpt2lora: "
                      "pip install matplotlib); the tables are written as usual.", stacklevel=3)
        return None
    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.add_subplot()


def plot_losses(steps: Sequence[Row], evals: Sequence[Row], path: str | os.PathLike,
                title: str = "Loss") -> Path | None:
    """Training loss per step (and its running mean) with validation loss at each evaluation."""
    if not steps or (drawn := new_figure(7, 4.2)) is None:
        return None
    fig, ax = drawn
    x = [s["step"] for s in steps]
    y = [s["loss"] for s in steps]
    ax.plot(x, y, color="#9ecae1", linewidth=1, label="train loss (per step)")
    window = max(1, len(y) // 20)
    if window > 1:
        smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1])
                  for i in range(len(y))]
        ax.plot(x, smooth, color="#2171b5", linewidth=2, label=f"train loss (mean of {window})")
    points = [(e["step"], e["loss"]) for e in evals if _present(e.get("loss"))]
    if points:
        ax.plot(*zip(*points), marker="o", color="#d94801", linewidth=2, label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_lr(steps: Sequence[Row], path: str | os.PathLike) -> Path | None:
    """The learning rate of every optimizer step (warmup, then decay)."""
    if not steps or (drawn := new_figure(7, 3.2)) is None:
        return None
    fig, ax = drawn
    ax.plot([s["step"] for s in steps], [s["lr"] for s in steps], color="#238b45", linewidth=2)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_sweep(rows: Sequence[Row], x: str, metric: str, path: str | os.PathLike,
               group: str = "method") -> Path | None:
    """``metric`` against the sweep parameter ``x`` (e.g. rank, last_n_blocks), one line per ``group``."""
    usable = [r for r in rows if _present(r.get(x)) and _present(r.get(metric))]
    if len({r[x] for r in usable}) < 2 or (drawn := new_figure(6, 4)) is None:
        return None
    fig, ax = drawn
    for name in dict.fromkeys(r.get(group, "") for r in usable):
        points = sorted((r[x], r[metric]) for r in usable if r.get(group, "") == name)
        ax.plot(*zip(*points), marker="o", linewidth=2, label=str(name))
    ax.set(xlabel=x, ylabel=metric, title=f"{metric} vs {x}")
    if all(isinstance(r[x], int) for r in usable):
        ax.set_xticks(sorted({r[x] for r in usable}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def main_metric(rows: Sequence[Row]) -> str:
    """The first of :data:`MAIN_METRICS` that some row has (accuracy, SQuAD F1, ROUGE-L, else eval loss)."""
    return next((m for m in MAIN_METRICS if any(_present(r.get(m)) for r in rows)), "loss")


def plot_tradeoffs(rows: Sequence[Row], metric: str, folder: str | os.PathLike,
                   group: str = "method") -> list[Path | None]:
    """The trade-off the reports argue about: ``metric`` against trainable parameters (log axis) and
    against training time, one marker per run, one colour per ``group``."""
    return [_scatter(rows, "trainable_params", metric, Path(folder) / f"{metric}_vs_trainable_params.png",
                     group, log_x=True, x_label="trainable parameters (log scale)"),
            _scatter(rows, "train_time_s", metric, Path(folder) / f"{metric}_vs_train_time.png", group,
                     log_x=False, x_label="training time (s)")]


def _scatter(rows: Sequence[Row], x: str, metric: str, path: Path, group: str, log_x: bool,
             x_label: str) -> Path | None:
    usable = [r for r in rows if _present(r.get(x)) and _present(r.get(metric)) and (not log_x or r[x] > 0)]
    if len(usable) < 2 or (drawn := new_figure(6.4, 4.2)) is None:
        return None
    fig, ax = drawn
    for name in dict.fromkeys(r.get(group, "") for r in usable):
        points = sorted((r[x], r[metric]) for r in usable if r.get(group, "") == name)
        ax.plot(*zip(*points), marker="o", linestyle="-" if len(points) > 1 else "", linewidth=1.5, label=str(name))
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=x_label, ylabel=metric, title=f"{metric} vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
