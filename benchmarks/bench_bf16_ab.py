"""Before/after of the LM training step in one process: gpt2lora at an earlier commit against this tree,
each in bf16 (``precision="bf16"``: frozen base held in bf16, autocast) and fp32, all four interleaved.

    python benchmarks/bench_bf16_ab.py --before d2b829d --threads 1 --repeats 4
    python benchmarks/bench_bf16_ab.py --before d2b829d --threads 2 --batch 4 --long-rows 1024   # long rows

The earlier package is exported with ``git archive`` into a temporary folder and imported under another
name (its imports are relative), so both versions train the same random checkpoint on the same alpaca_2k
batch as ``bench_bf16.py``'s LM row (or, with ``--long-rows``, rows of that many tokens of the same text). Reports wall-clock and CPU-time medians and the bf16-vs-fp32 ratio of
each version. Prints only (the figures go into RESULTS.md's bf16 section by hand).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bf16 import lm_batch, long_rows_batch
from common import machine_line
from pairs import TARGETS, Side, adamw, check_same_loss, hf_config, ours_lm_loss

REPO = Path(__file__).resolve().parents[1]


def export_package(commit: str, folder: Path) -> str:
    """Write ``gpt2lora`` at ``commit`` to ``folder/gpt2lora_before``; returns the package name."""
    archive = folder / "before.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", commit, "gpt2lora"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    shutil.move(str(folder / "tree" / "gpt2lora"), str(folder / "gpt2lora_before"))
    return "gpt2lora_before"


def build_sides(packages: dict[str, object], checkpoint: Path) -> dict[str, Side]:
    sides = {}
    for tag, pkg in packages.items():
        hold = importlib.import_module(f"{pkg.__name__}.training.precision").hold_frozen_weights
        for precision in ("bf16", "fp32"):
            model = pkg.GPT2.from_pretrained(checkpoint).train()
            pkg.apply_lora(model, pkg.LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=TARGETS), seed=0)
            autocast = torch.bfloat16 if precision == "bf16" else None
            if autocast is not None:
                hold(model)
            name = f"{tag} {precision}"
            sides[name] = Side(name, model, adamw(model), ours_lm_loss(model, autocast), 1.0)
    return sides


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="the commit to compare this tree against")
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lm-max-length", type=int, default=512)
    parser.add_argument("--long-rows", type=int, default=None, metavar="TOKENS",
                        help="train on rows of exactly this many tokens of real text instead of alpaca_2k's rows")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    import gpt2lora

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sys.path.insert(0, str(folder))
        before = importlib.import_module(export_package(args.before, folder))
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(hf_config(args.shape)).save_pretrained(folder / "ckpt")
        sides = build_sides({"before": before, "after": gpt2lora}, folder / "ckpt")
    data = (lm_batch(args.shape, args.batch, args.lm_max_length) if args.long_rows is None
            else long_rows_batch(args.shape, args.batch, args.long_rows))
    losses = check_same_loss(sides, data, tol=5e-2)  # bf16 and fp32 sides: agree to bf16 rounding
    for side in sides.values():  # warm-up
        side.step(data)
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.repeats):
        order = list(sides.items())
        if i % 2:
            order.reverse()
        for name, side in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            side.step(data)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"Machine: {machine_line()}")
    print(f"before = {args.before}, after = this tree; batch {tuple(data['input_ids'].shape)}, "
          f"{int(data['attention_mask'].sum())} real tokens; eval losses {losses}")
    figures = {}
    for clock, seconds in (("wall", wall), ("CPU", cpu)):
        med = {name: statistics.median(values) for name, values in seconds.items()}
        for tag in ("before", "after"):
            ratio = med[f"{tag} fp32"] / med[f"{tag} bf16"]
            figures[f"{clock} {tag}"] = ratio
            print(f"{clock:>4} {tag:>6}: bf16 {med[f'{tag} bf16']:.2f} s, fp32 {med[f'{tag} fp32']:.2f} s, "
                  f"bf16 vs own fp32 {ratio:.2f}×")
        print(f"{clock:>4} after vs before: bf16 step {med['before bf16'] / med['after bf16']:.2f}× faster, "
              f"fp32 step {med['before fp32'] / med['after fp32']:.2f}× faster")
    return figures


if __name__ == "__main__":
    main()
