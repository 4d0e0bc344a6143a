"""One LoRA epoch on real SST-2 rows: gpt2lora's length-bucketed batches against transformers + peft recipes.

    python benchmarks/bench_epoch.py                          # 2,000 rows, 124M shape, batch 16, 12 sampled batches
    python benchmarks/bench_epoch.py --rows 64 --shape tiny --samples 2 --no-write   # smoke

Contenders, each over the same 2,000 training rows (tokenised with the real GPT-2 vocabulary, cut at
max_length 128):

* gpt2lora: ``BucketedBatches`` (rows of similar length share a batch, batches shuffled), padded per batch;
* transformers + peft, reference recipe: shuffled rows, every row padded to max_length;
* transformers + peft, dynamic padding: shuffled rows, each batch padded to its longest row
  (``DataCollatorWithPadding``);
* transformers + peft, the very batches gpt2lora uses (as ``group_by_length`` would give): isolates the
  implementation from the batching.

An epoch is estimated from a sample of its batches: the epoch's batches are sorted by width and
``--samples`` of them are taken at evenly spaced ranks, timed once each (all contenders interleaved,
after one untimed warm-up batch each), and the mean time per sampled batch is multiplied by the number
of batches. ``--samples 0`` times every batch. Token counts are exact over the whole epoch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_line, write_section
from pairs import SHAPES, check_same_loss, lora_pair, pad_id

import gpt2lora as gl
from gpt2lora.data.tasks import encode

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2LORA_SHARED", REPO.parent / "shared"))


def sst2_examples(rows: int, max_length: int, vocab_limit: int | None = None) -> list[dict]:
    """The first ``rows`` SST-2 training rows as ``{"input_ids", "label"}`` (real GPT-2 tokens).

    ``vocab_limit`` folds ids into a smaller vocabulary (for tiny test shapes); lengths stay real.
    """
    data = SHARED / "data" / "sst2"
    if not data.exists():
        raise SystemExit(f"{data} not found: put ../shared beside the repository or set GPT2LORA_SHARED")
    tok = gl.load_tokenizer(SHARED / "gpt2-tokenizer")
    examples = encode(gl.load_split(data, "train", limit=rows), tok, max_length)
    if vocab_limit is not None:
        for ex in examples:
            ex["input_ids"] = [i % vocab_limit for i in ex["input_ids"]]
    return examples


def collate_to(examples: list[dict], width: int | None, pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch, to ``width`` or (None) to its longest row."""
    width = width or max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ex["label"] for ex in examples])}


@dataclass
class Plan:
    """One contender's epoch: its batches (row indices), padding width rule and the side that trains."""

    name: str
    side: str
    batches: list[list[int]]
    width: int | None  # None: pad each batch to its longest row

    def widths(self, lengths: list[int]) -> list[int]:
        return [self.width or max(lengths[i] for i in rows) for rows in self.batches]


@dataclass
class EpochResult:
    name: str
    batches: int
    real_tokens: int
    slots: int
    """Token positions computed, padding included."""
    seconds: float
    """Estimated seconds per epoch."""
    sampled: int
    first_loss: float


def plans(examples: list[dict], batch: int, max_length: int, seed: int) -> list[Plan]:
    bucketed = gl.BucketedBatches(examples, batch, shuffle=True, seed=seed)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [order[i:i + batch] for i in range(0, len(order), batch)]
    ours = bucketed.batch_indices()
    return [
        Plan("gpt2lora, length-bucketed (BucketedBatches)", "gpt2lora", ours, None),
        Plan(f"transformers + peft, every row padded to {max_length} (reference recipe)", "transformers+peft",
             shuffled, max_length),
        Plan("transformers + peft, dynamic padding per batch", "transformers+peft", shuffled, None),
        Plan("transformers + peft, gpt2lora's bucketed batches", "transformers+peft", ours, None),
    ]


def sample(batches: list[list[int]], widths: list[int], k: int) -> list[int]:
    """Indices of ``k`` batches at evenly spaced ranks of width (all when k is 0 or too large)."""
    ranked = sorted(range(len(batches)), key=lambda i: widths[i])
    if k <= 0 or k >= len(batches):
        return ranked
    return [ranked[round(j * (len(ranked) - 1) / (k - 1))] if k > 1 else ranked[len(ranked) // 2]
            for j in range(k)]


def bench_epoch(shape: str = "gpt2", rows: int = 2000, batch: int = 16, max_length: int = 128, samples: int = 12,
                seed: int = 0, dropout: float | None = None) -> list[EpochResult]:
    vocab = SHAPES[shape].get("vocab_size")
    examples = sst2_examples(rows, max_length, vocab_limit=pad_id(shape) if vocab else None)
    lengths = [len(ex["input_ids"]) for ex in examples]
    sides = lora_pair(shape, dropout=dropout)
    pad = pad_id(shape)
    all_plans = plans(examples, batch, max_length, seed)
    first = collate_to([examples[i] for i in all_plans[0].batches[0]], None, pad)
    check_same_loss(sides, first)
    picks, times, first_loss = {}, {}, {}
    for plan in all_plans:
        widths = plan.widths(lengths)
        picks[plan.name] = sample(plan.batches, widths, samples)
        times[plan.name] = []
        warm = collate_to([examples[i] for i in plan.batches[picks[plan.name][0]]], plan.width, pad)
        first_loss[plan.name] = sides[plan.side].step(warm)
    for j in range(max(len(p) for p in picks.values())):
        order = all_plans if j % 2 == 0 else all_plans[::-1]
        for plan in order:
            if j >= len(picks[plan.name]):
                continue
            data = collate_to([examples[i] for i in plan.batches[picks[plan.name][j]]], plan.width, pad)
            start = time.perf_counter()
            sides[plan.side].step(data)
            times[plan.name].append(time.perf_counter() - start)
    results = []
    for plan in all_plans:
        widths = plan.widths(lengths)
        slots = sum(w * len(b) for w, b in zip(widths, plan.batches, strict=True))
        per_batch = statistics.fmean(times[plan.name])
        results.append(EpochResult(plan.name, len(plan.batches), sum(lengths), slots,
                                   per_batch * len(plan.batches), len(times[plan.name]), first_loss[plan.name]))
    return results


def section(results: list[EpochResult], command: str, shape: str, rows: int, batch: int, max_length: int) -> str:
    ours = results[0]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}  ",
        (f"{rows:,} SST-2 training rows (`shared/data/sst2/train.jsonl`, real GPT-2 tokens, cut at {max_length}), "
         f"{shape} shape with random weights, LoRA r=8 alpha=16 on the four block layers + head, AdamW, "
         f"batch {batch}, fp32. Epoch time is estimated: {ours.sampled} batches per contender chosen at evenly "
         "spaced ranks of width, timed once each (contenders interleaved, one warm-up batch each), mean time "
         "per batch × batches per epoch. Token counts are exact for the whole epoch."),
        "",
        "| contender | batches | real tokens | computed slots (padding share) | est. epoch | gpt2lora speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        share = 1 - r.real_tokens / r.slots
        lines.append(f"| {r.name} | {r.batches} | {r.real_tokens:,} | {r.slots:,} ({share:.0%}) | {r.seconds:.1f} s "
                     f"| {r.seconds / ours.seconds:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[str, list[EpochResult]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--samples", type=int, default=12, help="batches timed per contender (0: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = bench_epoch(args.shape, args.rows, args.batch, args.max_length, args.samples)
    command = "python benchmarks/bench_epoch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = section(results, command.strip(), args.shape, args.rows, args.batch, args.max_length)
    if not args.no_write:
        write_section("Epoch on SST-2", body)
    print(body)
    return body, results


if __name__ == "__main__":
    main()
