"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (stdlib http.server in a thread)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import DATA, REPO, VOCAB, require_shared

from gpt2lora.app.cli import main
from gpt2lora.app.judge import JudgeConfig, judge_run, parse_score, read_responses
from gpt2lora.errors import ConfigError, DataError


class FakeJudge:
    """Answers ``POST /v1/chat/completions`` by markers in the prompt: ``SCORE=N`` -> "N", ``NONINT`` -> "eighty",
    ``ERR500`` -> HTTP 500 always, ``FLAKY`` -> HTTP 500 once then "70", ``NOTFOUND`` -> 404, ``HTML`` -> a web page;
    anything else -> "50"."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, **payload})
                    text = payload["messages"][-1]["content"]
                    seen = sum("FLAKY" in r["messages"][-1]["content"] for r in judge.requests)
                if self.path != "/v1/chat/completions" or "NOTFOUND" in text:
                    return self._send(404, b'{"error": "not found"}')
                if "ERR500" in text or ("FLAKY" in text and seen == 1):
                    return self._send(500, b'{"error": "overloaded"}')
                if "HTML" in text:
                    return self._send(200, b"<html><body>It works!</body></html>", "text/html")
                answer = ("eighty" if "NONINT" in text else "70" if "FLAKY" in text
                          else text.split("SCORE=")[1].split()[0] if "SCORE=" in text else "50")
                body = {"id": "c1", "object": "chat.completion", "created": 0, "model": payload["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": answer}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
                return self._send(200, json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    server = FakeJudge()
    yield server
    server.close()


def write_run(folder: Path, responses: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Task {i}", "input": "", "reference": f"reference {i}", "response": r}
            for i, r in enumerate(responses)]
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def config(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(url, "judge-model", backoff_s=0.0, **kw)


def test_scores_parsed_unparseable_and_500_reported_mean_correct(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["SCORE=80", "SCORE=95", "NONINT", "ERR500", "SCORE=40"])
    summary = judge_run(run, config(fake_judge.url, retries=2), log=lambda _: None)
    assert summary["mean"] == pytest.approx((80 + 95 + 40) / 3)
    assert (summary["responses"], summary["scored"]) == (5, 3)
    assert summary["distribution"]["80-89"] == 1 and summary["distribution"]["90-100"] == 1
    assert summary["distribution"]["40-49"] == 1 and sum(summary["distribution"].values()) == 3
    assert next(iter(summary["distribution"])) == "0-9" and len(summary["distribution"]) == 10
    # the non-integer answer is reported with every attempt's text, not dropped
    assert summary["unparseable"] == [{"index": 2, "answers": ["eighty"] * 3}]
    # the 500 was retried (1 + 2 attempts), then reported
    assert summary["failed"] == [{"index": 3, "errors": ["HTTP 500"] * 3}]
    assert sum("ERR500" in r["messages"][-1]["content"] for r in fake_judge.requests) == 3
    # files: one line per response, and the summary
    lines = [json.loads(x) for x in (run / "judge.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines] == [80, 95, None, None, 40]
    assert json.loads((run / "judge.json").read_text())["mean"] == pytest.approx(summary["mean"])


def test_request_is_an_openai_chat_completion_with_our_prompt(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["SCORE=55"])
    judge_run(run, config(fake_judge.url), log=lambda _: None)
    (request,) = fake_judge.requests
    assert request["path"] == "/v1/chat/completions" and request["model"] == "judge-model"
    prompt = request["messages"][0]["content"]
    for text in ("Task 0", "reference 0", "SCORE=55", "between 0 and 100"):
        assert text in prompt
    assert request["temperature"] == 0.0


def test_a_500_then_an_answer_is_retried_and_scored(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["FLAKY"])
    summary = judge_run(run, config(fake_judge.url, retries=1), log=lambda _: None)
    assert summary["mean"] == 70 and summary["failed"] == []
    record = json.loads((run / "judge.jsonl").read_text())
    assert (record["attempts"], record["errors"]) == (2, ["HTTP 500"])


def test_no_retries_means_one_attempt(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["ERR500"])
    summary = judge_run(run, config(fake_judge.url, retries=0), log=lambda _: None)
    assert summary["mean"] is None and summary["failed"] == [{"index": 0, "errors": ["HTTP 500"]}]
    assert len(fake_judge.requests) == 1


@pytest.mark.parametrize(("answer", "expected"), [
    ("85", 85), (" 85\n", 85), ("0", 0), ("100", 100), ("+7", 7),
    ("85.", None), ("85.0", None), ("85/100", None), ("Score: 85", None), ("101", None), ("-5", None),
    ("", None), ("eighty", None), ("8 5", None),
])
def test_parse_score_is_strict(answer, expected):
    assert parse_score(answer) == expected


def test_parse_score_custom_scale():
    assert parse_score("7", 1, 10) == 7
    assert parse_score("0", 1, 10) is None
    assert parse_score("11", 1, 10) is None


def test_custom_scale_and_prompt(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["SCORE=9", "SCORE=3"])
    prompt = "Rate {response} for {instruction} / {input} / {reference} from {low} to {high}."
    summary = judge_run(run, config(fake_judge.url, prompt=prompt, low=1, high=10), log=lambda _: None)
    assert summary["mean"] == 6 and summary["scale"] == [1, 10]
    assert fake_judge.requests[0]["messages"][0]["content"] == "Rate SCORE=9 for Task 0 /  / reference 0 from 1 to 10."


def test_hf_hub_offline_still_reaches_a_local_judge(tmp_path, fake_judge, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = write_run(tmp_path / "run", ["SCORE=60"])
    assert judge_run(run, config(fake_judge.url), log=lambda _: None)["mean"] == 60
    assert constants.HF_HUB_OFFLINE is True  # lifted only while judging


def test_hf_hub_offline_refuses_a_remote_judge_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = write_run(tmp_path / "run", ["SCORE=60"])

    def never(_messages):
        raise AssertionError("no request may be sent")

    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 is set"):
        judge_run(run, config("https://judge.example.com/v1"), ask=never, log=lambda _: None)
    assert main(["judge", str(run), "--endpoint", "https://judge.example.com/v1", "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE=1" in err and "judge.example.com" in err


def test_hf_hub_offline_environment_in_a_fresh_process(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["SCORE=42", "SCORE=44"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", "judge", str(run), "--endpoint", fake_judge.url,
                           "--model", "m"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "mean 43.00 over 2 of 2 responses" in done.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_one_line_and_responses_kept(tmp_path, capsys):
    run = write_run(tmp_path / "run", ["SCORE=1", "SCORE=2"])
    before = (run / "responses.jsonl").read_bytes()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert main(["judge", str(run), "--endpoint", url, "--model", "m", "--retries", "1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert url in err and "cannot connect" in err and "is the judge server running" in err
    assert (run / "responses.jsonl").read_bytes() == before


def test_non_openai_endpoint_stops_with_one_line_and_keeps_what_was_judged(tmp_path, fake_judge, capsys):
    run = write_run(tmp_path / "run", ["SCORE=77", "NOTFOUND", "SCORE=1"])
    assert main(["judge", str(run), "--endpoint", fake_judge.url, "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 404" in err and "judged 1 of 3 responses" in err
    assert [json.loads(x)["score"] for x in (run / "judge.jsonl").read_text().splitlines()] == [77]
    assert (run / "responses.jsonl").is_file()


def test_endpoint_that_is_a_web_page(tmp_path, fake_judge):
    run = write_run(tmp_path / "run", ["HTML"])
    with pytest.raises(ConfigError, match="did not answer like an OpenAI-compatible chat endpoint"):
        judge_run(run, config(fake_judge.url), log=lambda _: None)
    wrong_path = fake_judge.url.replace("/v1", "/api")
    with pytest.raises(ConfigError, match="HTTP 404"):
        judge_run(write_run(tmp_path / "run2", ["SCORE=1"]), config(wrong_path), log=lambda _: None)


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"no responses\.jsonl; expected a run folder of an instruction task"):
        read_responses(tmp_path)
    (tmp_path / "responses.jsonl").write_text('{"instruction": "a", "input": "", "reference": "b"}\n')
    with pytest.raises(DataError, match=r"responses\.jsonl line 1: .*missing or not text: response"):
        read_responses(tmp_path)
    (tmp_path / "responses.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"responses\.jsonl line 1: invalid JSON"):
        read_responses(tmp_path)
    with pytest.raises(ConfigError, match="--endpoint: expected an http"):
        JudgeConfig("localhost:11434", "m")
    with pytest.raises(ConfigError, match="--model: expected the judge model's name"):
        JudgeConfig("http://127.0.0.1:1/v1", " ")
    with pytest.raises(ConfigError, match=r"judge prompt: expected the placeholders \{reference\}"):
        JudgeConfig("http://127.0.0.1:1/v1", "m", prompt="{instruction} {input} {response}")
    with pytest.raises(ConfigError, match="judge scale"):
        JudgeConfig("http://127.0.0.1:1/v1", "m", low=10, high=10)
    with pytest.raises(ConfigError, match="--retries"):
        JudgeConfig("http://127.0.0.1:1/v1", "m", retries=-1)


def test_instruction_run_writes_responses_and_offline_metrics_then_judged(tmp_path, fake_judge, capsys):
    """A --smoke instruction run keeps its responses with EM / ROUGE-L; the judge scores that folder."""
    require_shared(DATA)
    args = ["train", "--task", "alpaca_2k", "--smoke", "--data-root", str(DATA), "--vocab", str(VOCAB),
            "--device", "cpu", "--out", str(tmp_path), "--run-name", "ift", "--max-steps", "2", "--gen-rows", "3",
            "--train-rows", "8", "--eval-rows", "4", "--max-length", "48",
            "--max-new-tokens", "4", "--quiet"]
    assert main(args) == 0
    run = tmp_path / "ift"
    responses = read_responses(run)
    result = json.loads((run / "metrics.json").read_text())["result"]
    assert len(responses) == result["generated_rows"] == 3
    assert 0.0 <= result["rouge_l_f1"] <= 1.0 and 0.0 <= result["exact_match"] <= 1.0
    from gpt2lora.training.metrics import instruction_metrics

    expected = instruction_metrics([r["response"] for r in responses], [r["reference"] for r in responses])
    assert result["rouge_l_f1"] == pytest.approx(expected["rouge_l_f1"])
    # the judge reads the same file; every prompt carries a response of the run
    summary = judge_run(run, config(fake_judge.url, retries=0), log=lambda _: None)
    assert summary["responses"] == 3 and len(fake_judge.requests) == 3 and summary["mean"] == 50
    sent = [r["messages"][0]["content"] for r in fake_judge.requests]
    assert all(r["response"] in prompt for r, prompt in zip(responses, sent))


def test_reproduce_fills_the_judge_column_from_the_endpoint(tmp_path, fake_judge):
    require_shared(DATA)
    recipe = tmp_path / "ift.toml"
    recipe.write_text('''title = "instruction row judged"
source = { report = "cs7643_lora_finetuning_gpt2.txt", table = "Table 6" }
[[rows]]
name = "LoRA"
task = "alpaca"
method = "lora"
gen_rows = 2
published = { judge_score = 49.98 }
''')
    args = ["reproduce", str(recipe), "--smoke", "--data", str(DATA), "--vocab", str(VOCAB), "--device", "cpu",
            "--out", str(tmp_path / "out"), "--run-name", "r", "--judge-endpoint", fake_judge.url,
            "--judge-model", "m"]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "r" / "results.json").read_text())
    (line,) = [x for x in results["comparison"] if x["figure"] == "judge_score"]
    assert (line["published"], line["this_run"], line["difference"]) == (49.98, 50.0, "+0.02 (+0.0%)")
    assert len(fake_judge.requests) == 2  # gen_rows responses, each judged once
    report = (tmp_path / "out" / "r" / "report.md").read_text()
    assert "| LoRA | LLM-judge score (0-100) | 49.98 | 50 | +0.02 (+0.0%) |" in report
    assert "ROUGE-L F1" in report  # the offline reference metrics are reported besides
