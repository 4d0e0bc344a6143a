"""``gpt2lora serve`` as a command: it serves a base model and an adapter, refuses bad flags in one line, and a
SIGTERM lets the request in flight finish before the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, free_port, make_hf_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import gpt2lora as gl


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2lora.app.cli", *args]


@pytest.fixture(scope="module")
def base(tmp_path_factory, gpt2_vocab):
    return make_hf_checkpoint(tmp_path_factory.mktemp("serve-cli") / "base", with_tokenizer=True, vocab_size=50257,
                              n_positions=256, n_layer=4)


def test_bad_flags_fail_in_one_line(base, tmp_path):
    for args, words in ((["--adapter", "nameonly"], "--adapter 'nameonly': expected NAME=RUN_OR_ADAPTER_DIR"),
                        (["--adapter", f"x={tmp_path}"], "neither an adapter folder"),
                        (["--precision", "fp16", "--device", "cpu"], "needs a CUDA device")):
        proc = subprocess.run(cli("serve", str(base), "--port", str(free_port()), *args), capture_output=True,
                              text=True, cwd=REPO, timeout=120, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr


def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(base, tmp_path):
    model = gl.GPT2.from_pretrained(base)
    gl.apply_lora(model, gl.LoRAConfig(rank=2), seed=0)
    gl.save_adapter(model, tmp_path / "adapter")
    port = free_port()
    proc = subprocess.Popen(cli("serve", str(base), "--adapter", f"mine={tmp_path / 'adapter'}", "--port", str(port),
                                "--api-key", "secret", "--max-batch", "4"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer secret"}).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(str(base), None), ("mine", str(base))]
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer secret"},
                          json={"model": "mine", "prompt": "Go", "max_tokens": 200, "temperature": 0,
                                "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        events = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn re-raises the captured signal once it has shut down, as a process killed by it would end
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stdout.read()
    assert "Traceback" not in log, log
    assert "Waiting for application shutdown" in log and "Application shutdown complete" in log, log
