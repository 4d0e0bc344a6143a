"""bf16 training steps on the CPU: gpt2lora bf16 against transformers + peft under bf16 autocast (what the
Trainer's ``bf16=True`` does) and against gpt2lora's own fp32 step, all three interleaved in one process.

    python benchmarks/bench_bf16.py                               # 124M: classification B=8 T=128, LM step
    python benchmarks/bench_bf16.py --shape tiny --repeats 1 --no-write   # smoke

gpt2lora bf16 is what ``precision="bf16"`` runs: the frozen base held in bf16, autocast for the rest, LoRA
factors, optimizer state and the loss in fp32. The reference keeps fp32 weights under autocast. Before timing,
the bf16 sides' eval losses agree with the fp32 side's within 5e-2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timing, machine_line, write_section
from pairs import TARGETS, check_same_loss, lm_pair, lora_pair, pad_id, random_batch

from gpt2lora.devices import cpu_bf16_units

OURS, REF, OURS_FP32 = "gpt2lora bf16", "transformers+peft bf16", "gpt2lora fp32"
GOAL_REF, GOAL_FP32 = 1.5, 2.5


def three_sides(kind: str, shape: str) -> dict:
    """gpt2lora bf16, transformers + peft bf16 and gpt2lora fp32 on one random checkpoint (same seed)."""
    pair = lora_pair if kind == "classification" else lm_pair
    bf16 = pair(shape, autocast=torch.bfloat16)
    fp32 = pair(shape, autocast=None)
    return {OURS: bf16["gpt2lora"], REF: bf16["transformers+peft"], OURS_FP32: fp32["gpt2lora"]}


def lm_batch(shape: str, batch: int, max_length: int) -> dict[str, torch.Tensor]:
    from bench_lm import step_batch, task_examples, vocab_limit

    examples = task_examples("alpaca_2k", 400, max_length, vocab_limit(shape))
    return step_batch(examples, batch, seed=0, pad=pad_id(shape))


def long_rows_batch(shape: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` rows of exactly ``length`` tokens of real text: alpaca_2k's examples one after another, cut into
    rows (every token a target, no padding): the long sequences a language model is fine-tuned on."""
    from bench_lm import task_examples, vocab_limit

    stream: list[int] = []
    for example in task_examples("alpaca_2k", 2000, 1024, vocab_limit(shape)):
        stream += example["input_ids"]
        if len(stream) >= batch * length:
            break
    if len(stream) < batch * length:
        raise SystemExit(f"alpaca_2k holds {len(stream)} tokens, fewer than {batch} rows of {length}")
    ids = torch.tensor(stream[:batch * length]).view(batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def interleaved_clocks(contenders: dict[str, Callable[[], object]], repeats: int,
                       warmup: int = 1) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Wall-clock and CPU-time seconds of each contender, alternating A, B, C, C, B, A ... after ``warmup`` rounds.

    On a shared CPU the wall clock also counts the time other processes hold the core; the process's CPU
    time (one intra-op thread) counts only this step's work, so its ratios move less with the load.
    """
    for _ in range(warmup):
        for run in contenders.values():
            run()
    wall = {name: Timing(name) for name in contenders}
    cpu = {name: Timing(name) for name in contenders}
    for i in range(repeats):
        order = list(contenders.items())
        if i % 2:
            order.reverse()
        for name, run in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].seconds.append(time.perf_counter() - start_wall)
            cpu[name].seconds.append(time.process_time() - start_cpu)
    return wall, cpu


def bench(kind: str, shape: str, batch: int, length: int,
          repeats: int) -> tuple[dict[str, Timing], dict[str, Timing], int]:
    sides = three_sides(kind, shape)
    data = random_batch(shape, batch, length) if kind == "classification" else lm_batch(shape, batch, length)
    check_same_loss(sides, data, tol=5e-2)
    for side in sides.values():
        side.model.train()

    def runner(name: str):
        return lambda: sides[name].step(data)

    wall, cpu = interleaved_clocks({name: runner(name) for name in sides}, repeats=repeats)
    tokens = int(data["attention_mask"].sum())
    return wall, cpu, tokens


def rows(kind: str, timings: dict[str, Timing], cpu: dict[str, Timing], tokens: int) -> tuple[str, float, float]:
    tps = {name: tokens / t.median for name, t in timings.items()}
    vs_ref, vs_fp32 = tps[OURS] / tps[REF], tps[OURS] / tps[OURS_FP32]
    cpu_ref, cpu_fp32 = cpu[REF].median / cpu[OURS].median, cpu[OURS_FP32].median / cpu[OURS].median
    row = (f"| {kind} | {tps[OURS]:,.0f} tok/s ({timings[OURS].median:.2f} s) | {tps[REF]:,.0f} tok/s "
           f"({timings[REF].median:.2f} s) | {tps[OURS_FP32]:,.0f} tok/s ({timings[OURS_FP32].median:.2f} s) "
           f"| {vs_ref:.2f}× | {vs_fp32:.2f}× | {cpu[OURS].median:.2f} / {cpu[REF].median:.2f} / "
           f"{cpu[OURS_FP32].median:.2f} s | {cpu_ref:.2f}× | {cpu_fp32:.2f}× |")
    return row, vs_ref, vs_fp32


def verdict(value: float, goal: float, amx: bool = True) -> str:
    """The goal's verdict; the goals are set for CPUs with AMX, so elsewhere the ratio is only reported."""
    if not amx:
        return f"{value:.2f}× (reported: the {goal:g}× goal is for CPUs with AMX, this one has none)"
    return f"**met** ({value:.2f}× ≥ {goal:g}×)" if value >= goal else f"**not met** ({value:.2f}× < {goal:g}×)"


def product_rates(repeats: int, tokens: int = 1024) -> str:
    """The training step's largest products as B=8, T=128 (``tokens``) makes them, in fp32 and in bf16 on this
    CPU's threads, interleaved: the forward's (1024x768)(768x3072) in ``F.linear``'s layout and the backward's
    input gradient (1024x3072)(3072x768). Where torch emulates bf16 products the ratios say what a bf16 step
    would cost."""
    x, w, g = torch.randn(tokens, 768), torch.randn(3072, 768) / 30, torch.randn(tokens, 3072)
    products = {"forward": lambda a, b, d: a @ b.t(), "input gradient": lambda a, b, d: d @ b}
    operands = {"fp32": (x, w, g), "bf16": (x.bfloat16(), w.bfloat16(), g.bfloat16())}
    contenders = {f"{name} {dtype}": functools.partial(f, *operands[dtype])
                  for name, f in products.items() for dtype in operands}
    wall, _ = interleaved_clocks(contenders, repeats=max(repeats, 3))
    rate = {name: 2 * tokens * 768 * 3072 / timing.median / 1e9 for name, timing in wall.items()}
    parts = [f"{name} {rate[name + ' bf16']:,.1f} GFLOP/s in bf16 against {rate[name + ' fp32']:,.1f} in fp32 "
             f"({rate[name + ' fp32'] / rate[name + ' bf16']:,.0f}× as long)" for name in products]
    return (f"the step's largest products ran at: {'; '.join(parts)} ({torch.get_num_threads()} threads, median of "
            f"{max(repeats, 3)} interleaved).")


def main(argv: list[str] | None = None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="classification sequence length")
    parser.add_argument("--lm-max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-classification", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_bf16.py " + " ".join(argv if argv is not None else sys.argv[1:])
    units = cpu_bf16_units()
    if not units:
        body = (f"Command: `{command.strip()}`  \nMachine: {machine_line()}  \n\nThe steps are not timed: this CPU "
                f"has no bf16 matrix units, where gpt2lora refuses precision='bf16' for training. Why: "
                f"{product_rates(args.repeats)}")
        print(body)  # not written: the section keeps the figures of a CPU that has the units
        return body, []
    load_before = os.getloadavg()[0]
    table, goals = [], []
    runs = (([] if args.skip_classification else [("classification", args.length)])
            + ([] if args.skip_lm else [("LM (alpaca_2k)", args.lm_max_length)]))
    for kind, length in runs:
        timings, cpu, tokens = bench("classification" if kind == "classification" else "lm", args.shape,
                                     args.batch, length, args.repeats)
        row, vs_ref, vs_fp32 = rows(kind, timings, cpu, tokens)
        table.append(row)
        print(row, flush=True)
        amx = "amx_bf16" in units
        goals.append(f"bf16 {kind} step vs transformers + peft bf16: {verdict(vs_ref, GOAL_REF, amx)}; vs "
                     f"gpt2lora's own fp32 step: {verdict(vs_fp32, GOAL_FP32, amx)}.")
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine_line()}; torch sees bf16 units: {', '.join(units)}  ",
        (f"Shape {args.shape}, B={args.batch}; classification T={args.length} (random tokens), LM: alpaca_2k rows "
         f"(max_length {args.lm_max_length}, padded to the longest row), LoRA r=8 alpha=16 on {', '.join(TARGETS)}, "
         f"AdamW, dropout 0.1. Median of {args.repeats} interleaved steps after one warm-up; tok/s counts real "
         f"tokens. 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the CPU is "
         "shared with other work: read the ratios). The goals are read on the wall clock; the CPU-time columns "
         "(the process's CPU seconds per step: ours bf16 / reference bf16 / ours fp32) leave out the time other "
         "processes held the core."),
        "",
        ("| step | gpt2lora bf16 | transformers + peft bf16 | gpt2lora fp32 | vs ref bf16 | vs own fp32 "
         "| CPU time per step | CPU vs ref | CPU vs own fp32 |"),
        "|---|---|---|---|---|---|---|---|---|",
        *table,
        "",
        *[f"- {g}" for g in goals],
    ])
    if not args.no_write:
        write_section("bf16 training on the CPU", body)
    print(body)
    return body, goals


if __name__ == "__main__":
    main()
