"""``torchrun --nproc_per_node=2 -m gpt2lora.app.cli train --distributed fsdp|ddp``: a run killed (SIGKILL)
right after a step checkpoint, resumed with ``--resume auto``, gives the uninterrupted run's losses
(each rank gets its own dropout RNG back), and the trained model loads in transformers with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CRASH_WORKER, DATA, REPO, VOCAB, require_shared

STEPS = 5


def command(out: Path, name: str, strategy: str, method: str, *extra: str,
            killed_after: int | None = None) -> list[str]:
    entry = (["-m", "gpt2lora.app.cli"] if killed_after is None
             else [str(CRASH_WORKER), "cli", "--kill-after-checkpoint", str(killed_after), "--"])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, "train",
            "--task", "sst2", "--smoke", "--method", method, "--distributed", strategy,
            "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)), "--out", str(out),
            "--run-name", name, "--quiet", "--max-steps", str(STEPS), "--save-every", "1", "--no-plots",
            "--batch-size", "8", "--grad-accum", "2", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def step_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "step"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", [("fsdp", "full"), ("ddp", "lora")])
def test_distributed_run_killed_and_resumed_equals_the_uninterrupted_run_and_loads_in_transformers(
        tmp_path, strategy, method):
    out = tmp_path / "runs"
    whole = subprocess.run(command(out, "whole", strategy, method), capture_output=True, text=True, env=env(),
                           cwd=REPO, timeout=600, check=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = step_losses(out / "whole")
    assert len(expected) == STEPS

    # the same run, rank 0 SIGKILLed right after its step-2 checkpoint is on disk (torchrun then stops rank 1)
    killed = subprocess.run(command(out, "killed", strategy, method, killed_after=2), capture_output=True, text=True,
                            env=env(), cwd=REPO, timeout=600, check=False)
    assert killed.returncode != 0, "the run was not killed"
    checkpoints = out / "killed" / "checkpoints"
    done = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-"))
    assert done and done[-1] == "checkpoint-0000002", done
    assert len(step_losses(out / "killed")) == 2

    resumed = subprocess.run(command(out, "killed", strategy, method, "--resume", "auto"), capture_output=True, text=True, env=env(),
                             cwd=REPO, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(out / "killed") == pytest.approx(expected, abs=1e-5)
    config = json.loads((out / "killed" / "config.json").read_text())
    assert config["train"]["distributed"] == strategy and config["method"] == method

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
