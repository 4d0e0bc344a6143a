"""Scale levers: gradient checkpointing (memory), torch.compile (speed) and DDP (2 processes vs 1).

    python benchmarks/bench_scale.py                 # all three, writes the "Scale levers" section of RESULTS.md
    python benchmarks/bench_scale.py --parts memory  # one part, printed only (add --write to store it)

Every measurement runs in a fresh subprocess (``--worker``), so peak RSS belongs to that measurement
alone. Weights are random (GPT-2 124M shape, no download); speed does not depend on their values.
``scale_section()`` returns the markdown body so ``run_all.py`` can rebuild RESULTS.md with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, write_section

from gpt2lora import GPT2, GPT2Config, LoRAConfig, TrainConfig, Trainer, apply_lora
from gpt2lora.ops.recompute import count_saved_tensors
from gpt2lora.training.trainer import enable_gradient_checkpointing, lm_loss

TITLE = "Scale levers"
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------- workers

def lora_model(preset: str, dropout: float = 0.0) -> GPT2:
    """124M-shape GPT-2 with LoRA; ``dropout`` everywhere (0 where runs are compared loss for loss)."""
    config = dataclasses.replace(GPT2Config.from_preset(preset), resid_pdrop=dropout, embd_pdrop=dropout,
                                 attn_pdrop=dropout)
    model = GPT2.from_config(config, seed=0)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dropout=dropout), seed=0)
    return model


def lm_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_memory(args: argparse.Namespace) -> dict:
    """One LoRA training step (forward + backward) with checkpointing on or off."""
    model = lora_model(args.preset, dropout=0.1).train()
    enable_gradient_checkpointing(model, bool(args.checkpointing))
    batch = lm_batches(1, args.batch, args.seq, model.config.vocab_size)[0]
    before = rss_mb()
    start = time.perf_counter()
    with count_saved_tensors(model.parameters()) as saved:  # weights are not activations
        logits = model(batch["input_ids"])
    loss, _ = lm_loss(logits, batch["labels"])
    loss.backward()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    return {"checkpointing": bool(args.checkpointing), "saved_mb": saved.bytes / 2**20,
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "step_s": seconds, "loss": loss.item(),
            "grad_norm_sum": sum(grads.values())}


def timed_fit(trainer: Trainer, data: list) -> tuple[float, list[float]]:
    start = time.perf_counter()
    history = trainer.fit(data)
    return time.perf_counter() - start, history.losses


def worker_compile(args: argparse.Namespace) -> dict:
    """Trainer steps with compile off or on: first step (compiles) and the steady step time after it."""
    model = lora_model(args.preset)
    data = lm_batches(args.steps + 1, args.batch, args.seq, model.config.vocab_size)
    trainer = Trainer(model, TrainConfig(lr=1e-4, device="cpu", progress=False, optimizer="sgd",
                                         compile=bool(args.compile), max_steps=None))
    first_s, first_loss = timed_fit(trainer, data[:1])
    steady_s, losses = timed_fit(trainer, data[1:])
    return {"compile": bool(args.compile), "first_step_s": first_s, "step_s": steady_s / args.steps,
            "losses": first_loss + losses}


def worker_ddp(args: argparse.Namespace) -> dict | None:
    """Trainer throughput on the same global batches, alone or as one rank of a torchrun group."""
    model = lora_model(args.preset)
    data = lm_batches(args.steps + 1, args.batch, args.seq, model.config.vocab_size)
    trainer = Trainer(model, TrainConfig(lr=1e-4, device="cpu", progress=False, optimizer="sgd"))
    trainer.fit(data[:1])  # warm-up (and DDP's first all-reduce buckets)
    seconds, losses = timed_fit(trainer, data[1:])
    if not trainer.dist.is_main:
        return None
    return {"world_size": trainer.dist.world_size, "threads": torch.get_num_threads(), "step_s": seconds / args.steps,
            "samples_per_s": args.batch * args.steps / seconds, "losses": losses}


WORKERS = {"memory": worker_memory, "compile": worker_compile, "ddp": worker_ddp}


# ---------------------------------------------------------------------------------------------- driver

def run_worker(kind: str, options: list[str], threads: int, nproc: int = 1, timeout: int = 1800) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(HERE), "--worker", kind, "--threads", str(threads), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def measure(parts: list[str], quick: bool) -> dict:
    preset = "gpt2"
    threads = os.cpu_count() or 1
    out: dict = {"preset": preset, "machine": machine_line(), "load_before": os.getloadavg()[0]}
    if "memory" in parts:
        b, t = (2, 128) if quick else (8, 512)
        opts = ["--preset", preset, "--batch", str(b), "--seq", str(t)]
        out["memory"] = {"batch": b, "seq": t, "runs": [run_worker("memory", [*opts, "--checkpointing", str(c)],
                                                                   threads) for c in (0, 1)]}
    if "compile" in parts:
        b, t, steps = (2, 64, 2) if quick else (4, 128, 3)
        opts = ["--preset", preset, "--batch", str(b), "--seq", str(t), "--steps", str(steps)]
        out["compile"] = {"batch": b, "seq": t, "steps": steps,
                          "runs": [run_worker("compile", [*opts, "--compile", str(c)], threads) for c in (0, 1)]}
    if "ddp" in parts:
        b, t, steps = (4, 64, 2) if quick else (8, 128, 3)
        opts = ["--preset", preset, "--batch", str(b), "--seq", str(t), "--steps", str(steps)]
        out["ddp"] = {"batch": b, "seq": t, "steps": steps, "runs": [
            run_worker("ddp", opts, threads), run_worker("ddp", opts, 1),
            run_worker("ddp", opts, max(1, threads // 2), nproc=2)]}
    out["load_after"] = os.getloadavg()[0]
    return out


def scale_section(results: dict) -> str:
    """The markdown body of the "Scale levers" section of RESULTS.md, from :func:`measure`'s results."""
    lines = ["Command: `python benchmarks/bench_scale.py`  ",
             f"Machine: {results['machine']}  ",
             (f"Shape: {results['preset']} (124M, random weights), LoRA r=8 on all four block layers, LM loss. "
             f"1-minute load average {results['load_before']:.2f} before, {results['load_after']:.2f} after "
             "(the CPU is shared with other work, so times are indicative; the memory figures are not affected)."),
             ""]
    if "memory" in results:
        m = results["memory"]
        off, on = m["runs"]
        lines += [f"### Gradient checkpointing (one training step, batch {m['batch']} × {m['seq']} tokens)", "",
                  "| | off | on | on / off |", "|---|---:|---:|---:|",
                  (f"| activations saved for backward (MB) | {off['saved_mb']:.0f} | {on['saved_mb']:.0f} | "
                  f"{on['saved_mb'] / off['saved_mb']:.2f} |"),
                  (f"| peak RSS of the process (MB) | {off['peak_rss_mb']:.0f} | {on['peak_rss_mb']:.0f} | "
                  f"{on['peak_rss_mb'] / off['peak_rss_mb']:.2f} |"),
                  (f"| peak RSS − RSS before the step (MB) | {off['peak_rss_mb'] - off['rss_before_mb']:.0f} | "
                  f"{on['peak_rss_mb'] - on['rss_before_mb']:.0f} | "
                  f"{(on['peak_rss_mb'] - on['rss_before_mb']) / (off['peak_rss_mb'] - off['rss_before_mb']):.2f} |"),
                  (f"| forward + backward (s) | {off['step_s']:.1f} | {on['step_s']:.1f} | "
                  f"{on['step_s'] / off['step_s']:.2f} |"),
                  f"| loss | {off['loss']:.6f} | {on['loss']:.6f} | |", "",
                  ("Activations are the tensors autograd keeps from the model's forward (weights excluded, each "
                   "storage once), counted with `torch.autograd.graph.saved_tensors_hooks`; with checkpointing only "
                   "each block's input and the final LayerNorm/head inputs stay. The peak RSS also holds what does "
                   "not shrink: the logits (batch × tokens × 50,257 floats) and their log-softmax for the loss, and "
                   "one block's recomputed activations during backward. Dropout 0.1 (model and LoRA) is on and the "
                   "loss is the same: the recomputation replays the RNG (tests/training/test_scale.py checks losses and "
                   "gradients). The time cost is one extra forward of each block per step (at most ~1.3×)."), ""]
    if "compile" in results:
        c = results["compile"]
        eager, comp = c["runs"]
        delta = max(abs(a - b) for a, b in zip(eager["losses"], comp["losses"]))
        saved = eager["step_s"] - comp["step_s"]
        payback = (comp["first_step_s"] - eager["first_step_s"]) / saved if saved > 0 else float("inf")
        lines += [f"### torch.compile (Trainer steps, batch {c['batch']} × {c['seq']} tokens, SGD)", "",
                  "| | eager | compiled | speed-up |", "|---|---:|---:|---:|",
                  f"| first step, compile included (s) | {eager['first_step_s']:.1f} | {comp['first_step_s']:.1f} | |",
                  (f"| step after it, mean of {c['steps']} (s) | {eager['step_s']:.2f} | {comp['step_s']:.2f} | "
                  f"{eager['step_s'] / comp['step_s']:.2f}× |"), "",
                  f"Largest loss difference over the {len(eager['losses'])} steps: {delta:.1e}. "
                  + "The first compiled step includes compiling, shorter when Inductor's on-disk cache already holds "
                    "the kernels from an earlier run (a cold compile took about 50 s on the development machine). "
                  + (f"The compile time pays back after about {payback:.0f} steps." if saved > 0 else
                     "Compiled steps are not faster here, so compile never pays back.")
                  + " `TrainConfig.compile` stays off by default: on a CPU the saving per step is small against "
                    "the compile time and every new sequence length can trigger a recompile; try it on a GPU.", ""]
    if "ddp" in results:
        d = results["ddp"]
        one, single_thread, two = d["runs"]
        delta = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
        lines += [(f"### DDP (torchrun, gloo): global batch {d['batch']} × {d['seq']} tokens, mean of {d['steps']} "
                  "steps"), "",
                  "| processes × threads | step (s) | samples/s |", "|---|---:|---:|",
                  *(f"| {r['world_size']} × {r['threads']} | {r['step_s']:.2f} | {r['samples_per_s']:.2f} |"
                    for r in (one, single_thread, two)), "",
                  (f"Largest loss difference between 1 and 2 processes: {delta:.1e} (same global batches). "
                   f"Two 1-thread processes ran at {two['samples_per_s'] / single_thread['samples_per_s']:.2f}× the "
                   f"samples/s of one 1-thread process and {two['samples_per_s'] / one['samples_per_s']:.2f}× one "
                   f"process with {one['threads']} threads. On {os.cpu_count()} shared cores two ranks only divide "
                   "the same CPU between them (plus one gradient all-reduce per step), so these ratios say more about "
                   "how well torch's intra-op threads use a busy machine than about DDP; DDP's use is several GPUs "
                   "or machines, where each rank brings its own device."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=tuple(WORKERS), default=list(WORKERS))
    parser.add_argument("--quick", action="store_true", help="small batches (a check that everything runs)")
    parser.add_argument("--write", action="store_true", help="store the section in RESULTS.md (default with all parts)")
    parser.add_argument("--json", default=None, help="also save the raw results here")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="build the section from results saved with --json (parts measured separately)")
    parser.add_argument("--worker", choices=tuple(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    for name in ("--batch", "--seq", "--steps", "--checkpointing", "--compile"):
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="gpt2", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = WORKERS[args.worker](args)
        if result is not None:
            print(json.dumps(result))
        return 0
    if args.combine:
        results = {}
        for path in args.combine:
            part = json.loads(Path(path).read_text(encoding="utf-8"))
            loads = (results.get("load_before", part["load_before"]), part["load_after"])
            results.update(part)
            results["load_before"], results["load_after"] = loads
        args.parts = [p for p in WORKERS if p in results]
    else:
        results = measure(args.parts, args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    body = scale_section(results)
    print(body)
    if args.write or (set(args.parts) == set(WORKERS) and not args.quick):
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
