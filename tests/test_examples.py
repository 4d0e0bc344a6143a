"""Every ``examples/*.py`` script in its ``--smoke`` mode: tiny random GPT-2, real rows of ../shared/data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import DATA, REPO, VOCAB, require_shared

CASES = [
    ("sentiment.py", "sst2", "classification"),
    ("spam.py", "sms_spam", "classification"),
    ("nli.py", "snli", "nli"),
    ("emoji.py", "tweet_emoji", "classification"),
    ("instruction.py", "alpaca_2k", "instruction"),
    ("qa.py", "squad", "qa"),
]


@pytest.mark.parametrize("script, task, kind", CASES, ids=[c[0] for c in CASES])
def test_example_smoke_run(script, task, kind, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "examples" / script), "--smoke", "--task", task,
            "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)),
            "--out", str(tmp_path), "--run-name", "run", "--quiet", "--rank", "4", "--alpha", "8"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    result = json.loads((run / "metrics.json").read_text())
    row = result["result"]
    assert config["kind"] == kind and config["lora"]["rank"] == 4 and config["lora"]["alpha"] == 8
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.md").is_file()
    assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0 and row["trainable_params"] > 0
    assert "LoRA (r=4, α=8)" in proc.stdout and f"run folder: {run}" in proc.stdout
    if kind in ("classification", "nli"):
        labels = {"sst2": 2, "sms_spam": 2, "snli": 3, "tweet_emoji": 20}[task]
        assert config["num_labels"] == labels and config["train_rows"] == 300
        for key in ("accuracy", "f1", "precision", "recall"):
            assert 0.0 <= row[key] <= 1.0
    else:
        assert config["train_rows"] == 64 and row["perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    if kind == "qa":
        assert 0.0 <= row["exact_match"] <= row["squad_f1"] <= 1.0 and row["generated_rows"] == 4
        assert len(result["samples"]) == 4 and "predicted:" in proc.stdout
    if kind == "instruction":
        generations = result["generations"]
        assert len(generations) == 3 and all({"before", "after", "reference"} <= set(g) for g in generations)
        assert "--- before:" in proc.stdout and (run / "generations.md").is_file()


def test_examples_share_the_cli_flags():
    """Each script is a thin call into the library: no training loop of its own."""
    for script, _, _ in CASES:
        source = (REPO / "examples" / script).read_text(encoding="utf-8")
        assert "example_main" in source and "backward" not in source and len(source.splitlines()) < 25
