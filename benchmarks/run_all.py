"""Run every benchmark and rewrite benchmarks/RESULTS.md with a goals summary.

    python benchmarks/run_all.py              # full run (about 10-15 minutes on 2 cores), writes RESULTS.md
    python benchmarks/run_all.py --quick      # a few minutes, fewer shapes/repeats; prints, writes only with --output
    python benchmarks/run_all.py --tiny --quick --output /tmp/r.md   # seconds-scale smoke on tiny shapes

Sections: training step (bench_train), epoch on SST-2 (bench_epoch), generation (bench_generate), memory
(bench_memory, one process per configuration), LM fine-tuning (bench_lm: instruction / SQuAD steps, an
alpaca_2k epoch, LM memory), bf16 training on the CPU (bench_bf16, where torch sees bf16 units) and GPU (bench_train on CUDA in bf16 when a GPU is present; the full GPU run
is benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_bf16
import bench_epoch
import bench_generate
import bench_lm
import bench_memory
import bench_train
from common import HEADER, RESULTS, machine_line

from gpt2lora.devices import cpu_bf16_units

GOALS = {
    "train": 1.2,        # training step vs transformers + peft
    "epoch_ref": 5.0,    # epoch vs the reference recipe (padded to 128)
    "epoch_dyn": 1.1,    # epoch vs transformers + peft with dynamic padding
    "generate": 2.0,     # greedy batch 1 vs transformers
    "lm_step": 1.5,      # LM LoRA step on identical batches vs transformers + peft labels=
    "lm_memory": 0.3,    # LM step training-added peak memory vs transformers + peft (at most)
    "lm_epoch": 2.5,     # epoch over 2,000 alpaca_2k rows vs transformers + peft with dynamic padding
}


TRAIN_NOTES = """\
Where the time goes (torch.profiler, one 124M step, B=8, T=128, both sides): the block matmuls and their
input-gradient matmuls are 70-80 % of the step on either side. The rest, per gpt2lora step: dropout masks
(bernoulli + scale, about 5-10 %), attention on SDPA's math path (attention dropout rules out the fused CPU
kernel; bmm + softmax about 5 %), LayerNorm and GELU a few percent. Most of transformers' extra time is
GPT-2's `gelu_new` written as Python tensor arithmetic: in one profiled step its elementwise mul/pow/tanh
(forward and backward) took about 6 s against 1-2 s of elementwise work in gpt2lora's (26 s vs 16-20 s
profiled, on the busy machine). gpt2lora uses torch's fused tanh GELU, the same function.

Speed-ups in gpt2lora (each kept every parity test green, tests in `tests/ops/test_speedups.py`):
* classification runs the last block's attention projection, MLP and `ln_f` on the pooled row of each
  sequence only (`Transformer(..., last_token_only=True)`); keys and values still come from every position,
  so logits and gradients equal the full pass (checked to 1e-5, padded on either side, with a soft prompt);
* `LoRALinear.forward` scales the (tokens, rank) product and accumulates the B product into the base output
  in place (`addmm_`, BLAS beta=1): no full-size update tensor, multiply, add or copy per wrapped layer;
  about 10-20 % off a wrapped c_fc's forward + backward in isolation;
* already in place: no dropout module when LoRA dropout is 0, the padding mask built once per forward
  (and none at all when nothing is padded), no fp32 upcasts.\
"""


LM_NOTES = """\
What changed for language models (tests in `tests/ops/test_lm_head_loss.py`, `tests/data/test_packing.py`): the LM
head and its cross-entropy run only at positions whose next token is a target (prompt and padding
positions never reach the 50,257-wide head), 128 rows at a time, and each block's logits are turned into
the head's input gradient (and weight gradient, when the head trains) during the forward pass, so
neither forward nor backward holds a (positions, vocab) tensor and the head costs the two matmuls of the
plain computation. Losses are summed and divided by the target tokens of the whole optimizer step
(accumulation and DDP included). Packing lays examples end to end in rows of max_length with
positions restarting per example and attention kept inside each example (block-diagonal causal mask).
Training also keeps little for backward and computes nothing at padding (tests in
`tests/ops/test_attention_dropout.py`, `tests/model/test_unpadded.py`): the block layers run on real tokens only
(attention sees them in their padded rows); attention with dropout on the CPU recomputes its
probabilities in backward instead of keeping three float (B, heads, T, T) tensors per layer; dropout
keeps a 1-byte mask drawn with one 31-bit number per element; a LoRA layer accumulates its low-rank
input gradient into the base one in place; and the outputs of ln_1, ln_2 and the GELU are recomputed
from their inputs, which their own backward keeps anyway.\
"""

GPU_NOT_MEASURED = """\
Not measured: no GPU has been available to this project's sessions yet. `bash benchmarks/gpu.sh` (under
8 minutes on one GPU) runs the CUDA-only tests, the training-step and LM benchmarks with `--device cuda
--precision bf16` against transformers + peft in bf16, and the SST-2 report's memory configuration
(gpt2 classifier, B=16, T=128, LoRA r=4 on attn.c_attn vs full fine-tuning, peak CUDA memory beside the
published 0.49 GB / 1.89 GB), and writes this section. Until then there are no GPU figures: no bf16 step
times or TFLOP/s, no CUDA peak memory, no check that the CUDA-only tests pass.\
"""


def verdict(value: float, goal: float) -> str:
    return f"**met** ({value:.2f}× ≥ {goal:g}×)" if value >= goal else f"**not met** ({value:.2f}× < {goal:g}×)"


def retitle(body: str, command: str) -> str:
    """Name run_all's command in a section's first line, and the script command that gives it alone."""
    first, rest = body.split("\n", 1)
    match = re.match(r"Command: `(.*)`", first)
    alone = match.group(1).replace(" --no-write", "") if match else "?"
    return f"Command: `{command}` (this section alone: `{alone}`)  \n{rest}"


def kept_sections(path: Path, replaced: set[str]) -> str:
    """The ``## `` sections of an existing results file that this run does not produce (other scripts' figures)."""
    if not path.exists():
        return ""
    parts = re.split(r"^(?=## )", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    kept = [part.strip() for part in parts
            if part.startswith("## ") and part[3:].splitlines()[0].strip() not in replaced]
    return "".join(f"\n{part}\n" for part in kept)


def generation_speedup(body: str, batch: int = 1) -> float | None:
    match = re.search(rf"^\| greedy, batch {batch} \|.*\| ([\d.]+)× \|$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


def decoding_goals(body: str) -> list[str]:
    """Goal lines of bench_generate's notes: share of the memory ceiling, bf16 weights, the kernel choice."""
    out = []
    ceiling = re.search(r"Memory bound, fp32 batch 1: .*?= (\d+)% of it( \(paired per round[^:]*: (\d+)%)?", body)
    if ceiling:
        share = int(ceiling.group(1))
        paired = f"; paired per round {ceiling.group(3)}%" if ceiling.group(3) else ""
        judged = min(share, int(ceiling.group(3) or share))  # the lower of the two readings
        verdict_word = "met" if judged >= 85 else "not met"
        out.append(f"fp32 batch-1 decoding at ≥ 85% of the read-bandwidth ceiling: **{verdict_word}** ({share}%{paired}).")
    bf16 = re.search(r"bf16 weights \(batch 1[^)]*\): [\d.]+ tok/s vs fp32 [\d.]+ tok/s \(([\d.]+)×", body)
    if bf16:
        out.append(f"bf16 weights vs fp32 decoding: {verdict(float(bf16.group(1)), 1.6)}.")
    ablation = re.search(r"with plain F\.linear \(([\d.]+)×", body)
    if ablation:
        out.append(f"generation with the measured kernel choice vs plain F.linear decoding: "
                   f"{verdict(float(ablation.group(1)), 1.0)}.")
    first = re.search(r"A fresh model's first generate .*", body)
    if first:
        ratios = [float(r) for r in re.findall(r"tok/s against [\d.]+ \(([\d.]+)×", first.group(0))]
        out.append(f"a fresh model's first generate with the kernel choice vs plain F.linear (the lowest of "
                   f"{len(ratios)} dtypes): {verdict(min(ratios), 1.0)}.")
    return out


def lm_goals(results: dict, first: int) -> list[str]:
    """Numbered goal lines of bench_lm's results: LM step, LM memory, alpaca epoch."""
    out = []
    if "step" in results:
        r = results["step"][0]
        out.append(f"LM LoRA step on identical batches ({r.task}, B={r.batch}, T={r.width}, fp32 CPU) vs "
                   f"transformers + peft: {verdict(r.speedup(), GOALS['lm_step'])}.")
    memory = results.get("memory", {})
    if "gpt2lora" in memory.get("step", {}) and "peft" in memory.get("step", {}):
        ratios = {kind: bench_lm.added_mib(m["gpt2lora"]) / bench_lm.added_mib(m["peft"]) for kind, m in memory.items()}
        met = ratios["step"] <= GOALS["lm_memory"]
        widest = f"; on the widest batch {ratios['widest']:.2f}×" if "widest" in ratios else ""
        out.append(f"LM step training-added peak memory vs transformers + peft: **{'met' if met else 'not met'}** "
                   f"({ratios['step']:.2f}× {'≤' if met else '>'} {GOALS['lm_memory']:g}× on the step's batch{widest}).")
    if "epoch" in results:
        ours = min(results["epoch"][:2], key=lambda r: r.seconds)
        dynamic = results["epoch"][2]
        out.append(f"Epoch over 2,000 alpaca_2k rows vs transformers + peft with dynamic padding: "
                   f"{verdict(dynamic.seconds / ours.seconds, GOALS['lm_epoch'])} (faster gpt2lora contender: "
                   f"{ours.name}).")
    return [f"{first + i}. {line}" for i, line in enumerate(out)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, repeats and sampled batches")
    parser.add_argument("--tiny", action="store_true", help="tiny model shapes everywhere (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"file to write (default {RESULTS.name} for a full run, nothing for --quick)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["train", "epoch", "generate", "memory", "lm", "bf16", "gpu"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = args.output if args.output is not None else (None if args.quick else RESULTS)
    command = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.strip()
    small = "tiny" if args.tiny else "gpt2"
    threads = ["--threads", str(args.threads)]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    sections: dict[str, str] = {}
    goals: list[str] = []

    if "train" not in args.skip:
        train_args = ["--shape", small, "--no-write", *threads]
        if args.quick:
            train_args += ["--lengths", "128", "--large-shape", "none", "--repeats", "1"]
        else:
            train_args += ["--lengths", "128", "256", "512", "--repeats", "3"]
        if args.tiny and "--large-shape" not in train_args:
            train_args += ["--large-shape", "none"]
        body, results = bench_train.main(train_args)
        sections["Training step"] = retitle(body, command) + "\n\n" + TRAIN_NOTES
        r = results[0]
        ratio = r.tokens_per_s("gpt2lora") / r.tokens_per_s("transformers+peft")
        goals.append(f"1. Training step ({r.shape}, B={r.batch}, T={r.length}, fp32 CPU) vs transformers + peft: "
                     f"{verdict(ratio, GOALS['train'])}.")

    if "epoch" not in args.skip:
        epoch_args = ["--shape", small, "--no-write", *threads, "--samples", "3" if args.quick else "8"]
        body, results = bench_epoch.main(epoch_args)
        sections["Epoch on SST-2"] = retitle(body, command)
        ours, ref, dyn, same = results
        goals.append(f"2. Epoch on 2,000 SST-2 rows vs the reference recipe (padded to 128): "
                     f"{verdict(ref.seconds / ours.seconds, GOALS['epoch_ref'])}; vs transformers + peft with "
                     f"dynamic padding: {verdict(dyn.seconds / ours.seconds, GOALS['epoch_dyn'])} "
                     f"(on gpt2lora's own bucketed batches: {same.seconds / ours.seconds:.2f}×).")

    if "generate" not in args.skip:
        gen_args = ["--shape", small, "--no-write", *threads]
        if args.quick:
            gen_args += ["--new", "32", "--batches", "1", "--repeats", "1", "--no-ablation"]
        body = bench_generate.main(gen_args)
        sections["Generation"] = retitle(body, command)
        speedup = generation_speedup(body)
        if speedup is not None:
            goals.append(f"3. Greedy generation, batch 1, vs transformers: {verdict(speedup, GOALS['generate'])}.")
        goals += [f"   - {line}" for line in decoding_goals(body)]

    if "memory" not in args.skip:
        mem_args = ["--shape", small, "--no-write", *threads, "--steps", "1" if args.quick else "3"]
        body, results = bench_memory.main(mem_args)
        sections["Memory"] = retitle(body, command)
        ours, ref = results["gpt2lora-lora"], results["peft-lora"]
        adds = [(r["peak_kib"] - r["baseline_kib"]) / 1024 for r in (ours, ref)]
        met = ours["peak_kib"] <= ref["peak_kib"] and adds[0] <= adds[1]
        goals.append(f"4. LoRA peak memory ≤ transformers + peft: **{'met' if met else 'not met'}** "
                     f"(peak {ours['peak_kib'] / 1024:,.0f} vs {ref['peak_kib'] / 1024:,.0f} MiB; training adds "
                     f"{adds[0]:,.0f} vs {adds[1]:,.0f} MiB).")

    if "lm" not in args.skip:
        lm_args = ["--shape", small, "--no-write", *threads]
        if args.quick:
            lm_args += ["--repeats", "1", "--samples", "1", "--skip", "squad", "profile", "generate", "--no-ablation",
                        "--memory-batches", "step", "--memory-configs", "gpt2lora", "peft"]
        if args.tiny:
            lm_args += ["--epoch-rows", "64"]
        body, results = bench_lm.main(lm_args)
        sections["LM fine-tuning"] = retitle(body, command) + "\n\n" + LM_NOTES
        goals += lm_goals(results, 5)

    if "bf16" not in args.skip and cpu_bf16_units():
        bf16_args = ["--shape", small, "--no-write", *threads, "--repeats", "1" if args.quick else "3"]
        if args.quick:
            bf16_args.append("--skip-lm")
        body, bf16_goals = bench_bf16.main(bf16_args)
        sections["bf16 training on the CPU"] = retitle(body, command)
        goals += [f"{8 + i}. {line}" for i, line in enumerate(bf16_goals)]

    if "gpu" not in args.skip:
        if torch.cuda.is_available():
            body, _ = bench_train.main(["--shape", small, "--device", "cuda", "--precision", "bf16", "--no-write",
                                        "--lengths", "128", "512", "--repeats", "1" if args.quick else "5"])
            sections["GPU"] = body
        else:
            sections["GPU"] = GPU_NOT_MEASURED

    minutes = (time.perf_counter() - started) / 60
    summary = "\n".join([
        (f"Command: `{command}` ({minutes:.1f} min; 1-minute load average {load_before:.1f} before, "
         f"{os.getloadavg()[0]:.1f} after)  "),
        f"Machine: {machine_line()}  ",
        ("The CPU is shared with other work while these figures are taken, so absolute numbers move from run "
         "to run; every comparison is interleaved within one process (or, for memory, one process per "
         "configuration) and the ratios are the figures to read."),
        "",
        *goals,
    ])
    text = HEADER.format(machine=machine_line()).rstrip() + "\n\n## Goals\n\n" + summary + "\n"
    for title, body in sections.items():
        text += f"\n## {title}\n\n{body.strip()}\n"
    if output is not None:
        text += kept_sections(output, {"Goals", *sections})
        output.write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
