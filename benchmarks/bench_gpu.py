"""The GPU section of RESULTS.md: bf16 training-step and LM benchmarks, and the SST-2 report's memory setting.

    bash benchmarks/gpu.sh                                           # on a CUDA machine: tests + this script
    python benchmarks/bench_gpu.py --device cuda --precision bf16    # this script alone
    python benchmarks/bench_gpu.py --device cpu --shape tiny --no-write   # dry run of the same code on a CPU

Parts:

* ``train``: ``bench_train`` (sequence classification LoRA step vs transformers + peft) on the device;
* ``lm``: ``bench_lm`` (instruction / SQuAD LoRA steps vs transformers + peft ``labels=``, alpaca epoch,
  profile) on the device; skipped with a note when ../shared (alpaca_2k, squad_v1, the GPT-2 vocabulary)
  is missing;
* ``memory``: the SST-2 report's setting, a gpt2-shape classifier (random weights), batch 16 × 128,
  LoRA r=4 alpha=8 on ``attn.c_attn`` (head trained) against full fine-tuning, three AdamW steps with
  ``gpt2lora.Trainer``: peak CUDA memory allocated (``torch.cuda.max_memory_allocated``), beside the
  published 0.49 GB (LoRA) / 1.89 GB (full). On a CPU the peak is not measured (the dry run only
  checks the code path).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_lm
import bench_train
from common import RESULTS, machine_line, write_section
from pairs import SHAPES, hf_config, pad_id

import gpt2lora as gl

PUBLISHED_GB = {"lora": 0.49, "full": 1.89}
PARTS = ("train", "lm", "memory")


def device_line(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{device} (dry run: no CUDA figures)"


def sst2_memory(method: str, shape: str = "gpt2", device: str = "cuda", precision: str = "fp32",
                batch: int = 16, length: int = 128, steps: int = 3) -> dict:
    """Peak CUDA memory of a short Trainer run in the SST-2 report's setting (``method``: lora or full)."""
    hf = hf_config(shape)
    config = gl.GPT2Config.from_hf_config(hf.to_dict())
    torch.manual_seed(0)
    model = gl.GPT2ForSequenceClassification(config, num_labels=2, pad_token_id=pad_id(shape))
    if method == "lora":
        gl.apply_lora(model, gl.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("attn.c_attn",)), seed=0)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, pad_id(shape), (batch, length), generator=g),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(steps)]
    cuda = device.startswith("cuda")
    before = 0
    if cuda:  # what earlier benchmarks of this process left allocated is not this run's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    trainer = gl.Trainer(model, gl.TrainConfig(lr=1e-4, device=device, precision=precision, progress=False))
    history = trainer.fit(data)
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    held = torch.cuda.memory_allocated() - before if cuda else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return {"method": method, "precision": precision, "peak_bytes": peak, "held_bytes": held, "trainable": trainable,
            "losses": history.losses}


def memory_rows(results: list[dict]) -> list[str]:
    rows = [("| method | precision | trainable parameters | peak CUDA memory | allocated after training "
             "| published (SST-2 report) |"), "|---|---|---|---|---|---|"]

    def gb(n: int | None) -> str:
        return f"{n / 1e9:.2f} GB" if n is not None else "not measured (CPU)"

    for r in results:
        rows.append(f"| {'LoRA r=4 on attn.c_attn' if r['method'] == 'lora' else 'full fine-tuning'} | "
                    f"{r['precision']} | {r['trainable']:,} | {gb(r['peak_bytes'])} | {gb(r['held_bytes'])} | "
                    f"{PUBLISHED_GB[r['method']]:.2f} GB |")
    return rows


def shared_data_present() -> bool:
    root = bench_lm.SHARED
    return all((root / p).exists() for p in ("data/alpaca_2k", "data/squad_v1", "gpt2-tokenizer"))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--tests", default=None, help="summary line of the CUDA-only tests (gpu.sh passes it)")
    parser.add_argument("--output", type=Path, default=None, help="results file (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py --device cuda: CUDA is not available here (use --device cpu for a dry run)")
    dry = not args.device.startswith("cuda")
    precision = "fp32" if dry else args.precision
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    quick = ["--repeats", "1"] if dry else []
    parts: list[str] = []
    if "train" not in args.skip:
        train_args = ["--device", args.device, "--precision", precision, "--no-write", "--shape", args.shape,
                      "--lengths", "128", "512", "--repeats", "1" if dry else "5"]
        if args.shape == "tiny":
            train_args += ["--large-shape", "none"]
        body, _ = bench_train.main(train_args)
        parts += ["", "### Training step (sequence classification, LoRA r=8)", "", body]
    if "lm" not in args.skip:
        if shared_data_present():
            lm_args = ["--device", args.device, "--precision", precision, "--no-write", "--shape", args.shape, *quick]
            if dry:
                lm_args += ["--samples", "1", "--epoch-rows", "64", "--skip", "memory", "squad", "profile", "generate"]
            else:  # RSS workers are a CPU measurement (the steps record CUDA peaks); a GPU step takes ~50 ms
                lm_args += ["--skip", "memory", "--repeats", "10", "--samples", "6"]
            body, _ = bench_lm.main(lm_args)
            parts += ["", "### LM fine-tuning (instruction / SQuAD LoRA steps, alpaca_2k epoch)", "", body]
        else:
            parts += ["", "### LM fine-tuning", "", (f"Not measured: {bench_lm.SHARED} lacks data/alpaca_2k, "
                                                 "data/squad_v1 or gpt2-tokenizer (set GPT2LORA_SHARED, or copy "
                                                 "them into ./shared).")]
    if "memory" not in args.skip:
        results = [sst2_memory(method, args.shape, args.device, p, steps=1 if dry else 3)
                   for method in ("lora", "full") for p in (["fp32"] if dry else ["fp32", precision])]
        parts += ["", "### Peak CUDA memory in the SST-2 report's setting", "",
                  (f"{args.shape} classifier (random weights), batch 16 × 128, three AdamW steps through "
                   "`gpt2lora.Trainer` (weights, gradients, optimizer state and activations; "
                   "`torch.cuda.max_memory_allocated`), and what stays allocated once the run is over "
                   "(`torch.cuda.memory_allocated` with model and trainer alive), both above what was allocated "
                   "before the run. The published figures come from the SST-2 report's own training script, "
                   "a column it calls \"GPU Memory Allocated\"; the setting, not the code, is the same."), "",
                  *memory_rows(results)]
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [(f"Command: `bash benchmarks/gpu.sh` (`{command.strip()}`, {minutes:.1f} min; 1-minute load average "
             f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after)  "),
            f"Device: {device_line(args.device)}; host: {machine_line()}  "]
    if args.tests:
        head.append(f"CUDA-only tests: {args.tests}  ")
    body = "\n".join(head + parts)
    if not args.no_write:
        write_section("GPU", body, path=args.output or RESULTS)
    print(body)
    return body


if __name__ == "__main__":
    main()
