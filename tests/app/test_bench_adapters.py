"""Smoke test of benchmarks/bench_adapters.py on the tiny shape: both sides agree and the section renders."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_adapters


def test_dora_and_mixed_benchmarks_agree_with_peft_and_render() -> None:
    dora = bench_adapters.bench_dora("tiny", batch=2, length=16, repeats=1)
    losses = dora["losses"]
    assert losses["gpt2lora DoRA"] == pytest.approx(losses["peft DoRA"], abs=1e-4)
    assert losses["gpt2lora LoRA"] == pytest.approx(losses["peft LoRA"], abs=1e-4)
    assert set(dora["timings"]) == {"gpt2lora LoRA", "peft LoRA", "gpt2lora DoRA", "peft DoRA"}
    mixed = bench_adapters.bench_mixed("tiny", length=16, new_tokens=3, repeats=1)
    assert mixed["forward_gap"] < 1e-4 and mixed["generate_same"] is True
    text = bench_adapters.report("tiny", 2, 16, 3, 1, dora, mixed, (1.0, 1.5))
    assert "### DoRA training step" in text and "### Mixed batch: 8 rows over 4 adapters" in text
    assert "load average 1.00 before, 1.50 after" in text
    assert text.count("| gpt2lora adapter_names |") == 2
