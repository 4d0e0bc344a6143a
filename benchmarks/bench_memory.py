"""Peak CPU memory (RSS) of training: gpt2lora LoRA, gpt2lora full fine-tuning, transformers + peft LoRA.

    python benchmarks/bench_memory.py                    # 124M shape, B=8, T=128, 3 steps each
    python benchmarks/bench_memory.py --shape tiny --steps 1 --no-write

Each configuration runs in its own process (a peak cannot be taken back inside one). The process builds
its model (random weights, no checkpoint I/O), the AdamW optimizer and the batch, notes its resident
set (the baseline), resets the kernel's high-water mark (``/proc/self/clear_refs``), trains ``--steps``
steps and reads the new high-water mark (``VmHWM``). Reported: that peak minus the baseline, i.e. what
training adds on top of the loaded model, and the absolute peak. Where the mark cannot be reset, the
absolute figure is ``ru_maxrss`` (which then includes loading) and the note says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine_line, write_section
from pairs import SHAPES, TARGETS, Side, adamw, hf_config, ours_loss, random_batch, reference_loss

CONFIGS = {
    "gpt2lora-lora": "gpt2lora, LoRA r=8",
    "gpt2lora-full": "gpt2lora, full fine-tuning",
    "peft-lora": "transformers + peft, LoRA r=8",
}


def status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Set the high-water mark to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(config: str, shape: str) -> Side:
    """The model and optimizer of one configuration, built from a config (no checkpoint on disk)."""
    import gpt2lora as gl

    torch.manual_seed(0)
    hf = hf_config(shape)
    if config.startswith("gpt2lora"):
        model = gl.GPT2ForSequenceClassification(gl.GPT2Config.from_hf_config(hf.to_dict()),
                                                 num_labels=2, pad_token_id=hf.pad_token_id)
        if config == "gpt2lora-lora":
            gl.apply_lora(model, gl.LoRAConfig(rank=8, alpha=16, targets=TARGETS), seed=0)
        model.train()
        return Side(config, model, adamw(model), ours_loss(model))
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    model = peft.get_peft_model(transformers.GPT2ForSequenceClassification(hf), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=list(TARGETS), fan_in_fan_out=True, task_type="SEQ_CLS"))
    model.train()
    return Side(config, model, adamw(model), reference_loss(model))


def measure(config: str, shape: str, batch: int, length: int, steps: int) -> dict:
    """Run inside the worker process: baseline RSS, training peak and the losses, as a dict (KiB)."""
    side = build(config, shape)
    data = random_batch(shape, batch, length)
    baseline = status_kib("VmRSS")
    resettable = reset_peak()
    losses = [side.step(data) for _ in range(steps)]
    peak = status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in side.model.parameters() if p.requires_grad)
    return {"config": config, "baseline_kib": baseline, "peak_kib": peak, "reset": resettable,
            "losses": losses, "trainable": trainable}


def run_worker(config: str, shape: str, batch: int, length: int, steps: int, threads: int | None) -> dict:
    """Measure one configuration in a fresh Python process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--shape", shape,
           "--batch", str(batch), "--length", str(length), "--steps", str(steps)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"memory worker {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(shape: str = "gpt2", batch: int = 8, length: int = 128, steps: int = 3,
                 threads: int | None = None, configs: tuple[str, ...] = tuple(CONFIGS)) -> dict[str, dict]:
    return {config: run_worker(config, shape, batch, length, steps, threads) for config in configs}


def section(results: dict[str, dict], command: str, shape: str, batch: int, length: int, steps: int) -> str:
    reset = all(r["reset"] for r in results.values())
    how = ("peak = VmHWM after resetting it at the baseline (/proc/self/clear_refs)" if reset else
           "peak = ru_maxrss (the high-water mark could not be reset, so it includes loading)")
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}  ",
        (f"{shape} shape, sequence classification, batch {batch} × {length} tokens, {steps} AdamW steps, fp32 CPU; "
         f"one process per configuration. Baseline = RSS after building model, optimizer and batch; {how}. "
         "\"Training adds\" = peak − baseline: activations, gradients, optimizer state, workspace."),
        "",
        "| configuration | trainable parameters | baseline RSS | peak RSS | training adds |",
        "|---|---|---|---|---|",
    ]
    for config, r in results.items():
        lines.append(f"| {CONFIGS[config]} | {r['trainable']:,} | {r['baseline_kib'] / 1024:,.0f} MiB "
                     f"| {r['peak_kib'] / 1024:,.0f} MiB | {(r['peak_kib'] - r['baseline_kib']) / 1024:,.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[str, dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.shape, args.batch, args.length, args.steps)))
        return "", {}
    results = bench_memory(args.shape, args.batch, args.length, args.steps, args.threads)
    command = "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = section(results, command.strip(), args.shape, args.batch, args.length, args.steps)
    if not args.no_write:
        write_section("Memory", body)
    print(body)
    return body, results


if __name__ == "__main__":
    main()
