"""``torchrun --nproc_per_node=2 -m gpt2lora.app.cli train --distributed fsdp``: full fine-tuning killed mid-run
and resumed with ``--resume auto`` gives the uninterrupted run's losses, and the trained model loads in
transformers with the same logits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO, VOCAB, require_shared

STEPS = 5


def command(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "gpt2lora.app.cli", "train", "--task", "sst2", "--smoke", "--method", "full", "--distributed", "fsdp",
            "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)), "--out", str(out),
            "--run-name", name, "--quiet", "--max-steps", str(STEPS), "--save-every", "1", "--no-plots",
            "--batch-size", "8", "--grad-accum", "2", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def step_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "step"]


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_equals_the_uninterrupted_run_and_loads_in_transformers(tmp_path):
    out = tmp_path / "runs"
    whole = subprocess.run(command(out, "whole"), capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
                           check=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = step_losses(out / "whole")
    assert len(expected) == STEPS

    # the same run, killed (SIGKILL to torchrun and both workers) once its step-2 checkpoint is on disk
    proc = subprocess.Popen(command(out, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(),
                            cwd=REPO, start_new_session=True)
    checkpoints = out / "killed" / "checkpoints"
    try:
        for _ in range(1200):  # at most 600 s
            if (checkpoints / "checkpoint-0000002").is_dir() or proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    done = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-"))
    assert done and done[-1] < f"checkpoint-{STEPS:07d}"

    resumed = subprocess.run(command(out, "killed", "--resume", "auto"), capture_output=True, text=True, env=env(),
                             cwd=REPO, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(out / "killed") == pytest.approx(expected, abs=1e-5)
    config = json.loads((out / "killed" / "config.json").read_text())
    assert config["train"]["distributed"] == "fsdp" and config["method"] == "full"

    # the trained model: gpt2lora's logits, and transformers' on the merged checkpoint `gpt2lora merge` writes
    from transformers import GPT2ForSequenceClassification

    from gpt2lora.app.commands import merge_command
    from gpt2lora.app.run import load_run_model

    model, _ = load_run_model(out / "killed")
    merged = merge_command(out / "killed", tmp_path / "merged")
    reference = GPT2ForSequenceClassification.from_pretrained(merged).eval()
    ids = torch.randint(1, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # and it is the trained model, not the base one
    whole_model, _ = load_run_model(out / "whole")
    with torch.no_grad():
        torch.testing.assert_close(whole_model.eval()(ids, mask), ours, atol=1e-5, rtol=0)
