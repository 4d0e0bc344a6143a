"""Per-process memory of full fine-tuning over two gloo processes: DDP against FSDP2, measured, and the plan's figure.

    python benchmarks/bench_fsdp.py                    # 6 blocks, width 512, GPT-2's vocabulary, batch 8 x 128
    python benchmarks/bench_fsdp.py --no-write

Each strategy runs in its own pair of processes (``torch.multiprocessing`` with gloo, 1 thread each). Measured per
process: the bytes of the weights, gradients and optimizer state it holds right after an optimizer step (its
shards under FSDP), and what the fit added to its resident set (``MemoryMeter``; large blocks mmapped so the
resident set follows the live tensors). The plan: :func:`gpt2lora.training.memory_plan.plan_memory` for the same
setting.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine_line, write_section

SHAPE = {"n_layer": 6, "n_embd": 512, "n_head": 8}


def worker(rank: int, world: int, port: int, strategy: str, rows: int, length: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    from gpt2lora import GPT2, GPT2Config, TrainConfig, Trainer
    from gpt2lora.training import distributed

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**SHAPE, vocab_size=50257, n_positions=1024))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, 50257, (rows, length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    trainer = Trainer(model, TrainConfig(lr=1e-4, max_steps=steps, progress=False, device="cpu", precision="fp32",
                                         batch_size=rows, distributed=strategy))
    held: dict[str, int] = {}

    def measure(optimizer, args, kwargs):
        params = list(trainer.model.parameters())
        figures = {"weights": sum(distributed.local_tensor(p).nbytes for p in params),
                   "gradients": sum(distributed.local_tensor(p.grad).nbytes for p in params if p.grad is not None),
                   "optimizer": sum(distributed.local_tensor(v).nbytes for s in optimizer.state.values()
                                    for v in s.values() if isinstance(v, torch.Tensor))}
        for key, value in figures.items():
            held[key] = max(held.get(key, 0), value)

    trainer.optimizer.register_step_post_hook(measure)
    start = time.perf_counter()
    history = trainer.fit(batches)
    seconds = (time.perf_counter() - start) / steps
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(
        {**held, "added_mb": history.memory_added_mb, "s_per_step": seconds, "losses": history.losses}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import tempfile

    import torch

    from gpt2lora.training.memory_plan import ModelShape, PlanSetting, plan_memory

    torch.set_num_threads(1)  # as each process does: machine_line() names the threads the figures used
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes' malloc at start
    os.environ["OMP_NUM_THREADS"] = "1"
    out = tempfile.mkdtemp()
    results = {}
    for strategy in ("ddp", "fsdp"):
        torch.multiprocessing.spawn(worker, args=(2, free_port(), strategy, args.rows, args.length, args.steps, out),
                                    nprocs=2, join=True)
        results[strategy] = [json.loads(Path(out, f"{strategy}-{r}.json").read_text()) for r in (0, 1)]
    mib = 2**20
    lines = ["| per process (rank 0 / rank 1) | DDP | FSDP | FSDP / DDP | plan DDP | plan FSDP |", "|---|---|---|---|---|---|"]
    plans = {s: plan_memory(PlanSetting(ModelShape(**SHAPE), method="full", batch_size=args.rows,
                                        max_length=args.length, world_size=2, strategy=s)) for s in ("ddp", "fsdp")}
    plan_parts = {s: {"weights": p.weights, "gradients": p.gradients, "optimizer": p.optimizer}
                  for s, p in plans.items()}
    plan_parts["ddp"]["gradients"] //= 2  # the plan counts DDP's buckets with the gradients; these are .grad only
    for key in ("weights", "gradients", "optimizer"):
        ddp = [r[key] / mib for r in results["ddp"]]
        fsdp = [r[key] / mib for r in results["fsdp"]]
        lines.append(f"| {key} (tensors held after a step) | {ddp[0]:.0f} / {ddp[1]:.0f} MiB | {fsdp[0]:.0f} / "
                     f"{fsdp[1]:.0f} MiB | {fsdp[0] / ddp[0]:.2f} | {plan_parts['ddp'][key] / mib:.0f} MiB | "
                     f"{plan_parts['fsdp'][key] / mib:.0f} MiB |")
    total = {s: [r["weights"] + r["gradients"] + r["optimizer"] for r in results[s]] for s in results}
    lines.append(f"| weights + gradients + optimizer state | {total['ddp'][0] / mib:.0f} MiB | "
                 f"{total['fsdp'][0] / mib:.0f} MiB | {total['fsdp'][0] / total['ddp'][0]:.2f} | | |")
    added = {s: [r["added_mb"] for r in results[s]] for s in results}
    lines.append(f"| resident set added by the fit | {added['ddp'][0]:.0f} / {added['ddp'][1]:.0f} MiB | "
                 f"{added['fsdp'][0]:.0f} / {added['fsdp'][1]:.0f} MiB | {added['fsdp'][0] / added['ddp'][0]:.2f} | "
                 f"{plans['ddp'].training_added / mib:.0f} MiB | {plans['fsdp'].training_added / mib:.0f} MiB |")
    speed = {s: results[s][0]["s_per_step"] for s in results}
    lines.append(f"| seconds per step | {speed['ddp']:.2f} | {speed['fsdp']:.2f} | {speed['fsdp'] / speed['ddp']:.2f} | | |")
    same = all(abs(a - b) < 1e-5 for a, b in zip(results["ddp"][0]["losses"], results["fsdp"][0]["losses"]))
    body = "\n".join([
        f"Command: `python benchmarks/bench_fsdp.py --rows {args.rows} --length {args.length} --steps {args.steps}`  ",
        f"Machine: {machine_line()}; 2 gloo processes, 1 thread each (the machine was shared with other jobs)  ",
        (f"Full fine-tuning of a GPT-2 with {SHAPE['n_layer']} blocks, width {SHAPE['n_embd']}, 50,257 tokens "
        f"({plans['ddp'].total_params / 1e6:.1f}M parameters), global batch {args.rows} × {args.length}, fp32, AdamW, "
        f"`MALLOC_MMAP_THRESHOLD_=65536`. Losses of the two strategies equal (≤ 1e-5): {'yes' if same else 'NO'}."),
        "",
        *lines,
        "",
        ("FSDP keeps half of the weights, gradients and optimizer state per process (the goal: about half of DDP's). "
        "The plan's resident-set figure is its training-added peak; under FSDP it includes the units gathered at once (the root's embeddings and head, two blocks)."),
    ])
    if not args.no_write:
        write_section("FSDP: per-process memory against DDP", body)
    print(body)


if __name__ == "__main__":
    main()
