"""benchmarks/bench_serve.py on a tiny shape: every server answers every request, with the engine's tokens."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

pytest.importorskip("peft")
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_serve


def test_workload_is_reproducible_and_spans_the_ranges():
    jobs = bench_serve.workload(3, 4, ["a", "b"], 1000, (2, 9), (1, 5))
    assert jobs == bench_serve.workload(3, 4, ["a", "b"], 1000, (2, 9), (1, 5))
    flat = [job for client in jobs for job in client]
    assert len(flat) == 12 and {a for _, a, _ in flat} == {"a", "b"}
    assert all(2 <= len(ids) <= 9 and 1 <= n <= 5 for ids, _, n in flat)


def test_every_server_answers_every_request_with_the_engines_tokens():
    out = bench_serve.run("tiny", clients=4, requests=2, n_adapters=3, max_batch=3, prompt=(3, 12), output=(2, 9),
                          rank=4, repeats=2)
    assert out["requests"] == 8
    for label, result in out["results"].items():
        assert len(result["outputs"]) == 8, label
        assert result["same"] == 1.0, label  # greedy, same weights: the same tokens, whoever batches them
        assert result["p50"] <= result["p95"] and result["tokens_per_s"] > 0 and len(result["repeats"]) == 2
    assert set(out["steps"]) == {4, 16}
    lengths = {k: len(v) for k, v in out["results"]["gpt2lora engine"]["outputs"].items()}
    assert sum(lengths.values()) == out["tokens"]


def test_http_option_runs_the_requests_through_the_real_server():
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    out = bench_serve.run("tiny", clients=3, requests=1, n_adapters=2, max_batch=3, prompt=(3, 8), output=(2, 6),
                          rank=4, http=True)
    http = out["results"][bench_serve.HTTP]
    assert len(http["outputs"]) == 3 and http["same"] == 1.0  # the server's text is the engine's tokens decoded
    assert http["tokens_per_s"] > 0 and http["p50"] <= http["p95"]
    assert len(out["rss"]) == 1 and len(out["rss"][0]) == 2 and all(x > 0 for x in out["rss"][0])
