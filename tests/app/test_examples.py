"""Every ``examples/*.py`` script in its ``--smoke`` mode: tiny random GPT-2, real rows of ../shared/data."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
from helpers import DATA, REPO, VOCAB, require_shared

# script -> lines its output must hold (they carry the measured figures)
CASES = {
    "sentiment.py": [r"trainable of", r"validation accuracy \d+\.\d\d%, F1 0\.\d{4}", r"MB added by training",
                     r"adapter: .*adapter"],
    "spam.py": [r"accuracy \d+\.\d\d%", r"ham: precision", r"spam: precision", (r"confusion matrix .*\[\[\d+, \d+\], "
                r"\[\d+, \d+\]\]")],
    "nli.py": [r"labels entailment, neutral, contradiction", r"step +10: loss \d\.\d{4}", r"merged checkpoint: "],
    "emoji.py": [r"\| lora \| \d", r"\| full \| \d", r"Trainable params"],
    "instruction.py": [r"% of their tokens are loss targets", r"--- before: ", r"--- after:  ", r"loss \d+\.\d+ -> \d+\.\d+ in "],
    "qa.py": [r"validation perplexity \d", r"exact match \d+\.\d\d%, F1 \d+\.\d\d% over 4 questions", r"Q: "],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_smoke_run(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "examples" / script), "--smoke", "--data-root", str(require_shared(DATA)),
            "--vocab", str(require_shared(VOCAB)), "--out", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pattern in CASES[script]:
        assert re.search(pattern, proc.stdout), (pattern, proc.stdout[-2000:])
    saved = list(tmp_path.rglob("adapter_config.json")) + list(tmp_path.rglob("config.json"))
    assert saved, "the example saved nothing"


@pytest.mark.parametrize("script", sorted(CASES))
def test_examples_teach_the_api(script):
    """Each script reads top to bottom as library calls: no training loop, no CLI plumbing, 40-80 lines."""
    source = (REPO / "examples" / script).read_text(encoding="utf-8")
    assert 35 <= len(source.splitlines()) <= 80, len(source.splitlines())
    tree = ast.parse(source)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id == "gl"}
    assert {"load_split", "load_tokenizer", "Trainer", "TrainConfig", "BucketedBatches", "encode"} <= names
    assert "backward" not in source and "gpt2lora.app.cli" not in source and "tasks" not in names
