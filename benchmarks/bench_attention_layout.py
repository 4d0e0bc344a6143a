"""Padded LM training's attention: row by row over each row's real tokens, or once over the padded batch.

    python benchmarks/bench_attention_layout.py --device cuda          # what set the default on CUDA
    python benchmarks/bench_attention_layout.py --shape tiny --repeats 2   # CPU smoke run

gpt2lora's LoRA LM step (the ``bench_lm`` pair: r=8 on the four block layers, AdamW, GPT-2's dropout) on the
instruction and SQuAD batches of ``bench_lm``, with ``Transformer.attention_by_rows`` True and False and
``recompute_cheap_outputs`` at its default and off, interleaved with transformers + peft; first a check that
both layouts compute the same loss (no dropout). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_lm
from bench_lm import PRECISIONS, REF
from common import interleaved, machine_line
from pairs import lm_pair, pad_id

#: variant -> (attention_by_rows, recompute_cheap_outputs)
VARIANTS: dict[str, tuple[bool, bool | None]] = {
    "rows": (True, None), "padded": (False, None), "rows, no recompute": (True, False),
    "padded, no recompute": (False, False),
}


def use(model: torch.nn.Module, variant: str) -> None:
    model.transformer.attention_by_rows, model.transformer.recompute_cheap_outputs = VARIANTS[variant]


def same_loss(shape: str, device: str, autocast: torch.dtype | None, batch: dict) -> dict[str, float]:
    """The LM loss without dropout, each layout and transformers + peft (untrained sides)."""
    sides = lm_pair(shape, device=device, autocast=autocast, dropout=0.0)
    ours = sides["gpt2lora"]
    losses = {}
    with torch.no_grad():
        for variant in ("rows", "padded"):
            use(ours.model, variant)
            losses[variant] = float(ours.loss(batch))
        losses[REF] = float(sides[REF].loss(batch))
    return losses


def timed_steps(shape: str, device: str, autocast: torch.dtype | None, batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds of a training step per variant and for transformers + peft, interleaved after 3 warm-ups."""
    sides = lm_pair(shape, device=device, autocast=autocast)
    ours, ref = sides["gpt2lora"], sides[REF]

    def runner(name: str) -> Callable[[], None]:
        def run() -> None:
            if name in VARIANTS:
                use(ours.model, name)
                ours.step(batch)
            else:
                ref.step(batch)
            bench_lm.sync(device)
        return run

    timings = interleaved({name: runner(name) for name in [*VARIANTS, REF]}, repeats=repeats, warmup=3)
    return {name: t.median for name, t in timings.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    pad, limit = pad_id(args.shape), bench_lm.vocab_limit(args.shape)
    examples = {"instruction": bench_lm.task_examples("alpaca_2k", 2000, 512, limit),
                "squad": bench_lm.task_examples("squad_v1", 400, 512, limit)}
    batches = {task: bench_lm.to_device(bench_lm.step_batch(rows, 8, seed=0, pad=pad), args.device)
               for task, rows in examples.items()}
    head = ("| precision | task | B × T | same loss (rows / padded / ref) | " + " | ".join(VARIANTS)
            + f" | {REF} | ref / padded | ref / rows |")
    lines = [(f"Machine: {machine_line()}; device {args.device}, {args.shape} shape, median of {args.repeats} "
              "interleaved steps"), "", head, "|---" * head.count(" | ") + "|---|"]
    for precision in args.precisions:
        autocast = PRECISIONS[precision]
        for task, batch in batches.items():
            loss = same_loss(args.shape, args.device, autocast, batch)
            t = timed_steps(args.shape, args.device, autocast, batch, args.repeats)
            lines.append(f"| {precision} | {task} | {' × '.join(map(str, batch['input_ids'].shape))} | "
                         f"{loss['rows']:.6f} / {loss['padded']:.6f} / {loss[REF]:.6f} | "
                         + " | ".join(bench_lm.seconds(t[v]) for v in VARIANTS) + f" | {bench_lm.seconds(t[REF])} | "
                         f"{t[REF] / t['padded']:.2f}× | {t[REF] / t['rows']:.2f}× |")
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    return body


if __name__ == "__main__":
    main()
