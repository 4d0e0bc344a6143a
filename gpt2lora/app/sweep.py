"""``gpt2lora sweep``: a grid of methods / ranks / alphas / learning rates / depths, one table and the trade-off plots."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import METRICS_FILE, RESULTS_CSV_FILE, RESULTS_FILE
from ..errors import ConfigError
from . import report
from .folders import claimed
from .resume import check_resume
from .run import CHECKPOINTS_DIR, new_run_folder, run
from .runconfig import EVAL_ONLY, RunConfig


@dataclass(frozen=True)
class Grid:
    """Values to sweep; None keeps the base configuration's value. LoRA knobs only vary LoRA runs."""

    methods: list[str] | None = None
    ranks: list[int] | None = None
    alphas: list[float] | None = None
    lrs: list[float] | None = None
    last_n_blocks: list[int] | None = None
    foundation: bool = False
    """Add the untrained base model (method ``none``) as the first row."""


def grid_points(base: RunConfig, grid: Grid) -> list[dict[str, Any]]:
    """Every (method, rank, alpha, lr, last_n_blocks) combination of ``grid`` over ``base``."""
    methods = grid.methods or [base.method]
    ranks, alphas = grid.ranks or [base.lora.rank], grid.alphas or [None]
    lrs, depths = grid.lrs or [base.train.lr], grid.last_n_blocks or [base.last_n_blocks]
    points: list[dict[str, Any]] = []
    for method in methods:
        if method == "lora":
            combos = itertools.product(ranks, alphas, lrs, depths)
        elif method == "last_n_full":
            combos = itertools.product([None], [None], lrs, [d for d in depths if d] or [1])
        else:
            combos = itertools.product([None], [None], lrs, [None])
        for rank, alpha, lr, depth in combos:
            point = {"method": method, "rank": rank, "alpha": alpha, "lr": lr, "last_n_blocks": depth}
            if point not in points:
                points.append(point)
    return points


def point_config(base: RunConfig, point: dict[str, Any]) -> RunConfig:
    """``base`` with one grid point's values (alpha follows rank unless the grid or base sets it)."""
    lora = base.lora
    if point["rank"] is not None:
        alpha = point["alpha"] if point["alpha"] is not None else (
            None if base.lora.alpha == base.lora.rank else base.lora.alpha)
        lora = dataclasses.replace(lora, rank=point["rank"], alpha=alpha)
    train = dataclasses.replace(base.train, lr=point["lr"])
    return dataclasses.replace(base, method=point["method"], lora=lora, train=train,
                               last_n_blocks=point["last_n_blocks"], run_name=None)


def _point_name(i: int, point: dict[str, Any]) -> str:
    return (f"{i:02d}-{point['method']}" + (f"-r{point['rank']}" if point["method"] == "lora" else "")
            + (f"-n{point['last_n_blocks']}" if point["last_n_blocks"] else "")
            + (f"-lr{point['lr']:g}" if point["lr"] else ""))


def _grid_row(config: RunConfig, folder: Path, resume: bool) -> dict[str, Any]:
    """One grid point run into ``folder``; when the sweep resumes, a finished row is kept (after checking it
    ran these settings), an interrupted one continues from its checkpoints and one never started starts."""
    if not resume:
        return run(dataclasses.replace(config, resume=None), folder)
    started = folder / CHECKPOINTS_DIR
    if (folder / METRICS_FILE).is_file():
        check_resume(folder, dataclasses.replace(config, resume=str(folder)).resolved())
        print(f"{folder.name}: finished before; kept")
        return json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))["result"]
    if started.is_dir() and any(started.glob("checkpoint-*")):
        return run(dataclasses.replace(config, resume=str(folder)), folder)
    if folder.exists():  # stopped before its first checkpoint: nothing to continue, start it again
        shutil.rmtree(folder)
    return run(dataclasses.replace(config, resume=None), folder)


def sweep(base: RunConfig, grid: Grid) -> list[dict[str, Any]]:
    """Run every grid point into ``<out>/<run_name>/NN-.../`` and write one comparison table and plots.

    ``base.resume`` (``auto``, or the sweep folder) continues an interrupted sweep: finished rows are kept,
    the interrupted one resumes from its last checkpoint, the rest run.
    """
    resume = base.resume is not None
    if base.resume not in (None, "auto"):
        folder = Path(base.resume)
        if not folder.is_dir():
            raise ConfigError(f"--resume {base.resume}: no such sweep folder")
    elif resume and not base.run_name:
        raise ConfigError("--resume auto needs --run-name: the sweep folder (under --out) to continue")
    else:
        folder = new_run_folder(base.out, base.run_name, f"{base.label}-sweep", base.train.device)
    with claimed(folder, resume=resume):
        return _sweep_into(folder, base, grid, resume)


def _sweep_into(folder: Path, base: RunConfig, grid: Grid, resume: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if grid.foundation:
        rows.append(_grid_row(dataclasses.replace(base, method=EVAL_ONLY, run_name=None), folder / "foundation",
                              resume))
    for i, point in enumerate(grid_points(base, grid)):
        row = _grid_row(point_config(base, point), folder / _point_name(i, point), resume)
        rows.append({**row, "method_name": point["method"]})
        print(report.markdown_table(rows[-1:]))
    trained = [{**r, "method": r.get("method_name", r["method"])} for r in rows if "method_name" in r]
    varied = [k for k in ("rank", "lr", "last_n_blocks") if len({r.get(k) for r in trained}) > 1]
    metric = report.main_metric(rows)
    plots = [p for x in ("rank", "last_n_blocks", "lr") if x in varied
             for p in [report.plot_sweep(trained, x, metric, folder / f"{metric}_vs_{x}.png")] if p is not None]
    plots += [p for p in report.plot_tradeoffs(trained, metric, folder) if p is not None]
    report.write_csv(rows, folder / RESULTS_CSV_FILE)
    report.write_json(rows, folder / RESULTS_FILE)
    report.write_summary(folder, rows, f"Sweep on {base.label}", [(f"{len(trained)} runs; varied: "
                         f"{', '.join(varied) or 'method only'}"), f"data: {base.data or base.task_or_data}"],
                         extra=varied, plots=plots)
    print(report.markdown_table(rows, varied))
    print(f"sweep folder: {folder}")
    return rows


__all__ = ["Grid", "grid_points", "point_config", "sweep"]
