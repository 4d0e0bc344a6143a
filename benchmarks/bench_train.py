"""LoRA training-step throughput: gpt2lora against transformers + peft, in the same process.

    python benchmarks/bench_train.py                        # 124M, B=8, T=128 and 256/512, 355M at T=128
    python benchmarks/bench_train.py --shape tiny --lengths 32 --repeats 1 --no-write   # smoke
    python benchmarks/bench_train.py --device cuda --precision bf16                     # on a GPU

Sequence classification, LoRA r=8 (alpha 16) on attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, the
``score`` head trained too (peft's modules_to_save), torch AdamW, random weights (speed does not depend on
their values). Both sides start from the same checkpoint with the same A matrices, and the script stops if
they compute different losses on the timed batch. Steps alternate between the two sides after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timing, interleaved, machine_line, write_section
from pairs import SHAPES, TARGETS, check_same_loss, hf_config, lora_pair, random_batch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """One shape and length: timings, losses and (on CUDA) memory of both sides."""

    shape: str
    batch: int
    length: int
    device: str
    precision: str
    check: dict[str, float]
    """Eval-mode loss of each side on the timed batch before training (equal within 1e-4)."""
    timings: dict[str, Timing]
    losses: dict[str, list[float]] = field(default_factory=dict)
    """Training loss of every step each side took (warm-up included), in order."""
    cuda_peak: dict[str, int] = field(default_factory=dict)
    """Peak CUDA memory allocated during one step, bytes (CUDA only)."""

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    def tokens_per_s(self, name: str) -> float:
        return self.tokens / self.timings[name].median

    def tflops(self, name: str) -> float:
        return step_flops(self.shape, self.batch, self.length) / self.timings[name].median / 1e12


def step_flops(shape: str, batch: int, length: int) -> float:
    """Nominal FLOPs of one LoRA step, the same count for both sides.

    Forward: 2 FLOPs per weight of the block linears per token, plus attention's 4·B·T²·C per layer.
    Backward with frozen weights computes input gradients only: as much again for the linears, twice the
    forward for attention. LoRA's own products (rank 8) and the head are left out.
    """
    cfg = hf_config(shape)
    linear = 12 * cfg.n_embd ** 2 * cfg.n_layer
    tokens = batch * length
    attention = 4 * batch * length ** 2 * cfg.n_embd * cfg.n_layer
    return 2 * (2 * linear * tokens) + 3 * attention


def bench_step(shape: str = "gpt2", batch: int = 8, length: int = 128, repeats: int = 3, warmup: int = 1,
               device: str = "cpu", precision: str = "fp32", dropout: float | None = None,
               rank: int = 8) -> StepResult:
    """Time training steps of both sides on one random batch; check they compute the same loss first."""
    autocast = PRECISIONS[precision]
    sides = lora_pair(shape, rank=rank, alpha=2 * rank, dropout=dropout, device=device, autocast=autocast)
    data = random_batch(shape, batch, length, device=device)
    check = check_same_loss(sides, data, tol=1e-4 if autocast is None else 5e-2)
    losses: dict[str, list[float]] = {name: [] for name in sides}

    def runner(name: str):
        def run() -> None:
            losses[name].append(sides[name].step(data))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    timings = interleaved({name: runner(name) for name in sides}, repeats=repeats, warmup=warmup)
    result = StepResult(shape, batch, length, device, precision, check, timings, losses)
    if device.startswith("cuda"):
        for name, side in sides.items():
            result.cuda_peak[name] = side.cuda_peak(data)
    return result


def table(results: list[StepResult]) -> list[str]:
    """Markdown rows: shape, tokens/s of each side, speed-up (and CUDA memory/TFLOP/s when measured)."""
    cuda = any(r.cuda_peak for r in results)
    head = "| shape | B × T | gpt2lora | transformers + peft | speed-up |"
    rule = "|---|---|---|---|---|"
    if cuda:
        head += " peak CUDA MiB, side alone (ours / ref) | TFLOP/s (ours / ref) |"
        rule += "---|---|"
    rows = [head, rule]
    for r in results:
        ours, ref = r.tokens_per_s("gpt2lora"), r.tokens_per_s("transformers+peft")
        row = (f"| {r.shape} | {r.batch} × {r.length} | {ours:,.0f} tok/s ({r.timings['gpt2lora'].median:.2f} s) "
               f"| {ref:,.0f} tok/s ({r.timings['transformers+peft'].median:.2f} s) | {ours / ref:.2f}× |")
        if cuda:
            peak = " / ".join(f"{r.cuda_peak[n] / 2**20:,.0f}" for n in ("gpt2lora", "transformers+peft"))
            flops = " / ".join(f"{r.tflops(n):.1f}" for n in ("gpt2lora", "transformers+peft"))
            row += f" {peak} | {flops} |"
        rows.append(row)
    return rows


def section(results: list[StepResult], command: str, repeats: int, scale_repeats: int) -> str:
    r0 = results[0]
    device = (f"{r0.device}, {r0.precision}"
              + (" (autocast; gpt2lora holds its frozen base in bf16, the reference fp32 weights)" if r0.precision != "fp32" else ""))
    return "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}  ",
        (f"Sequence classification, LoRA r=8 alpha=16 on {', '.join(TARGETS)} "
         f"+ trained head, torch AdamW, random weights, {device}, dropout as in GPT-2's config (0.1). "
         "transformers + peft: GPT2ForSequenceClassification + LoraConfig(same targets, fan_in_fan_out=True, "
         "task_type=SEQ_CLS). Both sides computed the same loss on the timed batch (eval mode, within 1e-4) "
         f"before timing; median of {repeats} interleaved steps after one warm-up step (first row; the other "
         f"rows, which show how cost grows: {scale_repeats})."),
        "",
        *table(results),
    ])


def main(argv: list[str] | None = None) -> tuple[str, list[StepResult]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--large-shape", default="gpt2-medium",
                        help="second shape, timed at the first length only ('none' to skip)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side for the first row (median)")
    parser.add_argument("--scale-repeats", type=int, default=1,
                        help="timed steps per side for the other rows (longer T, larger shape)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = [(args.shape, n) for n in args.lengths]
    if args.large_shape != "none":
        runs.append((args.large_shape, args.lengths[0]))
    results = []
    for i, (shape, length) in enumerate(runs):
        results.append(bench_step(shape, args.batch, length, repeats=args.repeats if i == 0 else args.scale_repeats,
                                  device=args.device, precision=args.precision))
        print(table(results[-1:])[-1], flush=True)
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = section(results, command.strip(), args.repeats, args.scale_repeats)
    if not args.no_write:
        write_section("Training step", body)
    print(body)
    return body, results


if __name__ == "__main__":
    main()
