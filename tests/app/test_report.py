"""Result tables and plots."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO

from gpt2lora.app import report

ROWS = [
    {"method": "Foundation", "loss": 1.8753, "accuracy": 0.5, "f1_macro": 0.3333, "precision_macro": 0.25,
     "recall_macro": 0.5},
    {"method": "LoRA (r=8)", "loss": 0.6314, "accuracy": 0.6951, "f1_macro": 0.6943, "precision_macro": 0.6972,
     "recall_macro": 0.6951, "trainable_params": 148_000, "trainable_pct": 0.12, "train_time_s": 2464.95,
     "samples_per_s": 272.685, "steps_per_s": 4.349, "peak_memory_mb": 502.0, "rank": 8},
]


def test_markdown_table_has_the_report_columns_and_formats():
    table = report.markdown_table(ROWS).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["Method", "Eval loss", "Accuracy (%)", "F1 (macro)", "Precision (macro)", "Recall (macro)",
                      "Trainable params", "% of total", "Training time (s)", "Samples/s", "Steps/s", "Peak memory"]
    assert len(table) == 4 and table[1].count("---") == len(header)
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[:6] == ["Foundation", "1.8753", "50.00", "0.3333", "0.2500", "0.5000"]
    assert first[6:] == ["–"] * 6
    second = [c.strip() for c in table[3].strip("|").split("|")]
    assert second[2] == "69.51" and second[6] == "148K" and second[7] == "0.12%" and second[-1] == "502 MB"


def test_rows_of_older_run_folders_read_as_todays_names():
    renames = {"loss": "eval_loss", "f1_macro": "f1", "precision_macro": "precision", "recall_macro": "recall"}
    old = [{renames.get(k, k): v for k, v in row.items()} for row in ROWS]
    assert "eval_loss" in old[0] and "loss" not in old[0]
    assert report.markdown_table(old) == report.markdown_table(ROWS)
    assert report.main_metric([{"method": "lm", "loss": 2.0}]) == "loss"


def test_table_shows_only_filled_columns_and_extra_keys():
    rows = [{"method": "a", "exact_match": 0.5, "squad_f1": 0.625, "perplexity": float("nan"), "rank": 4}]
    header = report.markdown_table(rows, extra=["rank"]).splitlines()[0]
    assert header == "| Method | rank | EM (%) | F1 (%) |"
    assert "| a | 4 | 50.00 | 62.50 |" in report.markdown_table(rows, extra=["rank"])


def test_csv_and_summary(tmp_path):
    path = report.write_csv(ROWS, tmp_path / "r.csv")
    with open(path, newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert float(read[1]["accuracy"]) == pytest.approx(0.6951) and read[0]["rank"] == ""
    summary = report.write_summary(tmp_path, ROWS, "SST-2", notes=["two rows", ""]).read_text(encoding="utf-8")
    assert summary.startswith("# SST-2\n") and "- two rows" in summary and "| LoRA (r=8) |" in summary


def test_plots_are_pngs_of_the_history(tmp_path):
    pytest.importorskip("matplotlib")
    steps = [{"step": i, "loss": 2.0 * math.exp(-i / 30) + 0.1, "lr": 1e-3 * min(1, i / 10)}
             for i in range(1, 101)]
    evals = [{"step": 50, "loss": 0.9}, {"step": 100, "loss": 0.5}]
    for path in (report.plot_losses(steps, evals, tmp_path / "loss.png"), report.plot_lr(steps, tmp_path / "lr.png")):
        assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    sweep = [{"method": "lora", "rank": r, "accuracy": 0.6 + r / 100} for r in (2, 4, 8)]
    assert report.plot_sweep(sweep, "rank", "accuracy", tmp_path / "s.png").is_file()
    assert report.plot_sweep(sweep[:1], "rank", "accuracy", tmp_path / "one.png") is None  # one x value: no plot


def test_without_matplotlib_tables_still_written_and_said(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    steps = [{"step": 1, "loss": 1.0, "lr": 1e-3}]
    with pytest.warns(UserWarning, match="matplotlib is not installed, so no plots are drawn"):
        assert report.plot_losses(steps, [], tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    assert report.write_summary(tmp_path, ROWS, "t").is_file()


def test_plots_leave_the_process_matplotlib_backend_alone(tmp_path):
    """A notebook's backend stays as it was: plotting neither switches it nor imports pyplot."""
    pytest.importorskip("matplotlib")
    steps = [{"step": 1, "lr": 1.0}, {"step": 2, "lr": 0.5}]
    script = ("import sys, matplotlib; matplotlib.use('pdf'); from gpt2lora.app import report; "
              f"path = report.plot_lr({steps!r}, {str(tmp_path / 'lr.png')!r}); "
              "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, path.stat().st_size > 0)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.split() == ["pdf", "False", "True"], done.stderr[-2000:]
