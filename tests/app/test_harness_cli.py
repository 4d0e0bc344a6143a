"""``gpt2lora eval RUN --harness TASKS``: lm-eval tasks on a run folder, results written into the run, the same
numbers lm-eval's transformers backend gives for ``gpt2lora merge`` of that run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DATA, VOCAB, require_shared

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install gpt2lora[eval])")

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from gpt2lora.app.cli import main
from tests.app.test_harness import _write_tasks


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness-cli")
    assert main(["train", "--task", "alpaca_2k", "--smoke", "--data-root", str(require_shared(DATA)), "--vocab",
                 str(require_shared(VOCAB)), "--out", str(out), "--run-name", "alp", "--max-steps", "2",
                 "--quiet", "--threads", "1"]) in (0, None)
    return out / "alp"


@pytest.mark.slow  # two lm-eval runs (dataset building, the hf backend): minutes on a shared 2-core machine
def test_eval_harness_writes_the_scores_into_the_run_and_matches_hf_on_the_merged_run(run, tmp_path) -> None:
    tasks = tmp_path / "tasks"
    _write_tasks(tasks, require_shared(DATA))
    assert main(["eval", str(run), "--harness", "t_last", "t_roll", "--include-path", str(tasks),
                 "--limit", "4", "--threads", "1"]) in (0, None)
    saved = json.loads((run / "harness.json").read_text())
    assert set(saved["results"]) == {"t_last", "t_roll"}
    assert saved["config"]["limit"] == 4
    summary = (run / "summary.md").read_text()
    assert "## Harness" in summary and "t_roll" in summary and "word_perplexity" in summary
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "merged")]) in (0, None)
    reference = simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "merged"), "dtype": "float32"},
                                tasks=["t_last", "t_roll"], limit=4, batch_size=4, device="cpu",
                                task_manager=TaskManager(include_path=str(tasks)))
    for task in ("t_last", "t_roll"):
        for metric, value in reference["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert saved["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_eval_harness_refuses_a_run_and_a_different_run_flag(run, capsys) -> None:
    assert main(["eval", str(run), "--run", str(run.parent), "--harness", "t_last"]) == 1
    assert "disagree" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing lm-eval and torch, and one lm-eval run
def test_lm_evals_own_cli_finds_the_model_through_gpt2lora_harness(run, tmp_path) -> None:
    import os
    import subprocess
    import sys

    tasks = tmp_path / "tasks"
    _write_tasks(tasks, require_shared(DATA))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "gpt2lora.app.harness", "run", "--model", "gpt2lora",
                           "--model_args", f"run={run}", "--tasks", "t_last", "--include_path", str(tasks),
                           "--limit", "3", "--output_path", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "t_last" in done.stdout and "perplexity" in done.stdout
