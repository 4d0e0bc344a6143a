"""Memory per fit: a second fit in the same process reports its own peak and what it added, not the first's."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import TINY

from gpt2lora import GPT2, GPT2Config, GPT2ForSequenceClassification, TrainConfig, Trainer, prepare_model
from gpt2lora.data.batching import collate


def batches(vocab: int, rows: int, length: int, n: int, lm: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        examples = [{"input_ids": r.tolist(), **({"labels": r.tolist()} if lm else {"label": int(r[0]) % 2})}
                    for r in ids]
        out.append(collate(examples, pad_token_id=0))
    return out


SPANS = """
import json, torch
from gpt2lora.training.memory import MemoryMeter
first = MemoryMeter("cpu").start()
big = torch.ones(256 * 2**20 // 4)  # 256 MiB touched, then freed
big += 1
del big
before = first.stop()
second = MemoryMeter("cpu").start()
small = torch.ones(16 * 2**20 // 4)
small += 1
after = second.stop()
print(json.dumps([before.__dict__, after.__dict__]))
"""


def test_meter_measures_this_span_not_the_process_lifetime():
    # A fresh process: threads other tests leave behind (trackers, servers) move the resident set meanwhile.
    out = subprocess.run([sys.executable, "-c", SPANS], check=True, capture_output=True, text=True, timeout=120)
    before, after = json.loads(out.stdout.splitlines()[-1])
    assert before["method"] == after["method"] == "vmhwm"  # Linux: the kernel's high-water mark, reset at start
    # the 16 MiB may reuse pages freed earlier, so "added" is at most its size, maybe 0
    assert before["added_mb"] > 200 and after["added_mb"] < 100
    assert after["peak_mb"] < before["peak_mb"] - 100  # ru_maxrss would still say the 256 MiB peak


def test_a_full_fit_then_a_head_only_fit_report_their_own_memory():
    """The issue's case: full fine-tuning of a 124M-shape model, then a head-only fit of a tiny one."""
    torch.set_num_threads(1)
    big = GPT2.from_config(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=64), seed=0)
    prepare_model(big, "full")
    first = Trainer(big, TrainConfig(lr=1e-5, max_steps=1, progress=False, device="cpu")).fit(
        batches(50257, 2, 16, 1, lm=True))
    del big
    tiny = GPT2ForSequenceClassification.from_config(GPT2Config(**TINY), num_labels=2)
    prepare_model(tiny, "head")
    second = Trainer(tiny, TrainConfig(max_steps=2, progress=False, device="cpu")).fit(
        batches(TINY["vocab_size"], 4, 16, 2, lm=False))
    # AdamW state + gradients of 124M parameters: well over 1 GB added by the first fit
    assert first.memory_added_mb > 1000
    assert second.peak_memory_mb < first.peak_memory_mb
    assert second.memory_added_mb < first.memory_added_mb / 20
    assert first.memory_method == second.memory_method == "vmhwm"
