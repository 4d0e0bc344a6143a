"""No process-wide switches: a model generating in one thread and others training in their own threads leave
each other's results as they are when each runs alone (issue 22 item 4)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora, generate
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.ops import few_row
from gpt2lora.ops.recompute import count_saved_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

# Block weights and head big enough for the few-row path (MIN_WEIGHT_SIZE), so decoding takes it.
WIDE = {**TINY, "n_embd": 256, "n_head": 4, "vocab_size": 1001}
STEPS = 6


class Always(few_row.KernelChoice):
    """Decoding always on the split product, the path a process-wide switch used to leak into other threads."""

    def pick(self, key, candidates, warm_up=None):
        return candidates["by_halves"]()


def generating_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(**WIDE)).eval()


def training_model(seed: int) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(**WIDE, **NO_DROPOUT))
    return apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=seed)


def generate_tokens(model: GPT2, start: threading.Barrier | None = None) -> list[torch.Tensor]:
    ids = torch.randint(1, WIDE["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(7))
    if start is not None:
        start.wait()
    return [generate(model, ids, max_new_tokens=24, eos_token_id=None) for _ in range(3)]


def train(model: GPT2, seed: int, start: threading.Barrier | None = None) -> dict:
    """LoRA steps (recompute hooks on, saved tensors counted) with a few-row no-grad probe between steps."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, WIDE["vocab_size"], (2, 12), generator=g) for _ in range(STEPS)]
    probe = batches[0][:1, :4]  # 4 rows, no grad: what the split path would take if it leaked in
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, probes, saved = [], [], []
    if start is not None:
        start.wait()
    for ids in batches:
        model.train()
        with count_saved_tensors(model.parameters()) as counter:
            loss = model(ids, labels=ids) / ids.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        saved.append((counter.bytes, counter.recomputed))
        model.eval()
        with torch.no_grad():
            probes.append(model(probe))
    return {"losses": losses, "probes": probes, "saved": saved}


def test_generating_and_training_threads_do_not_change_each_other(monkeypatch):
    monkeypatch.setattr(few_row, "KERNELS", Always())
    alone_tokens = generate_tokens(generating_model())
    alone_a = train(training_model(1), 1)
    alone_b = train(training_model(2), 2)
    assert alone_a["saved"][0][1] > 0  # the recompute hooks were on and counted

    start = threading.Barrier(3, timeout=60)
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(name, fn, *args):
        try:
            results[name] = fn(*args, start)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread below
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=run, args=("gen", generate_tokens, generating_model())),
               threading.Thread(target=run, args=("a", train, training_model(1), 1)),
               threading.Thread(target=run, args=("b", train, training_model(2), 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for got, expected in zip(results["gen"], alone_tokens, strict=True):
        assert torch.equal(got, expected)
    for name, alone in (("a", alone_a), ("b", alone_b)):
        together = results[name]
        assert together["losses"] == alone["losses"]
        assert together["saved"] == alone["saved"]  # each counter saw its own thread's tensors only
        for got, expected in zip(together["probes"], alone["probes"], strict=True):
            assert torch.equal(got, expected)  # F.linear in the training thread while the other decodes
