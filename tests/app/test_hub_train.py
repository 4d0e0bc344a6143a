"""The path a new user takes first, end to end in a subprocess: ``gpt2lora train --task sst2 --model gpt2`` with
``HF_ENDPOINT`` on the local hub server (a tiny GPT-2 served as ``gpt2``, SST-2 in the real ``stanfordnlp/sst2``
layout with a two-shard train split), then the same command again with ``HF_HUB_OFFLINE=1`` from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, go_offline, gpt2_stand_in, sst2_hub_files


def gpt2lora_command() -> list[str]:
    """The console script the README's ``pip install -e .`` puts next to the interpreter, else the module."""
    script = Path(sys.executable).parent / "gpt2lora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gpt2lora.app.cli"]


def train(out: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GPT2LORA_DATA", None)
    return subprocess.run([*gpt2lora_command(), "train", "--task", "sst2", "--model", "gpt2", "--source", "hub",
                           "--max-steps", "3", "--train-rows", "40", "--eval-rows", "16", "--batch-size", "8",
                           "--out", str(out), "--run-name", name, "--quiet"],
                          check=False, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


@pytest.mark.slow
def test_train_sst2_on_gpt2_through_the_hub_then_offline(hub, tmp_path, monkeypatch):
    # not tmp_path/"gpt2": the command runs in tmp_path, and a local folder named like the model wins over the hub
    hub.put("openai-community/gpt2", gpt2_stand_in(tmp_path / "stand-in"))
    hub.put("stanfordnlp/sst2", sst2_hub_files({"train": 40, "validation": 16, "test": 4}, shards={"train": 2}),
            repo_type="dataset")

    online = train(tmp_path / "runs", "online")

    assert online.returncode == 0, online.stderr[-3000:]
    run = tmp_path / "runs" / "online"
    result = json.loads((run / "metrics.json").read_text())["result"]
    assert result["train_rows"] == 40 and result["eval_rows"] == 16 and result["optimizer_steps"] == 3
    assert (run / "loss.png").is_file() and (run / "lr.png").is_file()  # matplotlib comes with the set-up
    fetched = sorted(p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in hub.requests
                     if m == "GET" and "/resolve/" in p)
    assert fetched == sorted(["README.md", "config.json", "data/train-00000-of-00002.parquet",
                              "data/train-00001-of-00002.parquet", "data/validation-00000-of-00001.parquet",
                              "merges.txt", "model.safetensors", "vocab.json"])
    assert not any("test-0000" in p for _, p in hub.requests)

    hub.requests.clear()
    go_offline(monkeypatch)
    offline = train(tmp_path / "runs", "offline")

    assert offline.returncode == 0, offline.stderr[-3000:]
    assert hub.requests == []
    steps = [[json.loads(line)["loss"] for line in (tmp_path / "runs" / name / "history.jsonl").read_text()
              .splitlines() if json.loads(line)["type"] == "step"] for name in ("online", "offline")]
    assert len(steps[0]) == 3 and steps[0] == steps[1]
