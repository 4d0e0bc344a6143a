"""LM fine-tuning (instructions, SQuAD): gpt2lora's target-only chunked loss against transformers + peft ``labels=``.

    python benchmarks/bench_lm.py                      # 124M shape, B=8, max_length 512: step, epoch, memory
    python benchmarks/bench_lm.py --shape tiny --epoch-rows 64 --repeats 1 --samples 1 --no-write   # smoke
    python benchmarks/bench_lm.py --device cuda --precision bf16 --skip memory                     # on a GPU

Both sides: one random GPT-2 checkpoint, LoRA r=8 (alpha 16) on the four block layers with the same A
matrices, torch AdamW, gradient clipping at 1.0, real rows tokenised with the GPT-2 vocabulary (Alpaca
template with the prompt masked; SQuAD: context + question as the prompt, the answer as the target).
gpt2lora: ``GPT2.forward(..., labels=...)`` (the head at target positions only, in chunks), summed loss
over the target count. transformers + peft: ``GPT2LMHeadModel`` + ``LoraConfig(task_type=CAUSAL_LM)``,
``model(..., labels=...).loss``. The script stops if the sides compute different losses first.

Parts: ``step`` (identical batches, interleaved, median), ``squad`` (the same on SQuAD rows),
``epoch`` (2,000 alpaca_2k rows: gpt2lora bucketed and packed against transformers + peft with dynamic
padding and padded to max_length; estimated from batches sampled by width), ``memory`` (training-added
peak RSS, one process per configuration, on the epoch's widest batch) and ``profile`` (torch.profiler
over one gpt2lora step, and the step's nominal FLOP/s against a plain matmul on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_memory import reset_peak, status_kib
from common import Timing, interleaved, machine_line, write_section
from pairs import SHAPES, TARGETS, Side, check_same_loss, hf_config, lm_pair, pad_id, target_count

import gpt2lora as gl
from gpt2lora.constants import DEFAULT_LOSS_CHUNK_SIZE
from gpt2lora.data.batching import collate, collate_packed
from gpt2lora.data.tasks import encode

SHARED = Path(os.environ.get("GPT2LORA_SHARED", HERE.parent.parent / "shared"))
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("step", "squad", "epoch", "memory", "profile", "generate")
OURS, REF, FULL = "gpt2lora", "transformers+peft", "gpt2lora, full logits"
MEMORY_CONFIGS = {"gpt2lora": "gpt2lora, LoRA r=8 (target-only chunked loss)",
                  "gpt2lora-full-logits": "gpt2lora, LoRA r=8, full logits (the loss before)",
                  "gpt2lora-checkpointing": "gpt2lora, LoRA r=8, gradient checkpointing on",
                  "peft": "transformers + peft, LoRA r=8 (labels=)"}


def task_examples(task: str, rows: int, max_length: int, vocab_limit: int | None = None) -> list[dict]:
    """The first ``rows`` rows of a task over its train, validation and test files, encoded as LM examples.

    ``vocab_limit`` folds ids into a smaller vocabulary (tiny test shapes); lengths and masks stay real.
    """
    folder = SHARED / "data" / task
    if not folder.exists():
        raise SystemExit(f"{folder} not found: put ../shared beside the repository or set GPT2LORA_SHARED")
    tok = gl.load_tokenizer(SHARED / "gpt2-tokenizer")
    examples: list[dict] = []
    for split in ("train", "validation", "test"):
        if len(examples) >= rows:
            break
        examples += encode(gl.load_split(folder, split, limit=rows - len(examples)), tok, max_length)
    if vocab_limit is not None:
        for ex in examples:
            ex["input_ids"] = [i % vocab_limit for i in ex["input_ids"]]
            ex["labels"] = [t if t == -100 else t % vocab_limit for t in ex["labels"]]
    return examples


def vocab_limit(shape: str) -> int | None:
    return pad_id(shape) if SHAPES[shape].get("vocab_size") else None


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- identical-batch step ---

@dataclass
class LMStepResult:
    """One task's step comparison: timings, losses, shape of the batch and target share."""

    task: str
    batch: int
    width: int
    real_tokens: int
    targets: int
    check: dict[str, float]
    timings: dict[str, Timing]
    losses: dict[str, list[float]] = field(default_factory=dict)
    cuda_peak: dict[str, int] = field(default_factory=dict)

    def speedup(self, name: str = OURS) -> float:
        return self.timings[REF].median / self.timings[name].median


def step_batch(examples: list[dict], batch: int, seed: int, pad: int) -> dict[str, torch.Tensor]:
    """``batch`` rows drawn at random (seeded), padded to the longest of them."""
    rows = random.Random(seed).sample(range(len(examples)), batch)
    return collate([examples[i] for i in rows], pad)


def bench_lm_step(task: str, sides: dict[str, Side], data: dict[str, torch.Tensor], repeats: int = 3,
                  warmup: int = 1, device: str = "cpu", tol: float = 1e-4) -> LMStepResult:
    """Interleaved training steps of every side on one batch, after checking they compute the same loss."""
    check = check_same_loss(sides, data, tol=tol)
    losses: dict[str, list[float]] = {name: [] for name in sides}

    def runner(name: str):
        def run() -> None:
            losses[name].append(sides[name].step(data))
            sync(device)
        return run

    timings = interleaved({name: runner(name) for name in sides}, repeats=repeats, warmup=warmup)
    result = LMStepResult(task, data["input_ids"].size(0), data["input_ids"].size(1),
                          int(data["attention_mask"].sum()), target_count(data["labels"]), check, timings, losses)
    if device.startswith("cuda"):
        for name, side in sides.items():
            result.cuda_peak[name] = side.cuda_peak(data)
    return result


# --- epoch ---

@dataclass
class EpochPlan:
    name: str
    side: str
    batches: list[dict]
    """Per batch: ``rows`` (example indices, or packed rows: lists of them) and ``width``."""
    packed: bool = False


@dataclass
class EpochEstimate:
    name: str
    batches: int
    real_tokens: int
    slots: int
    seconds: float
    sampled: int
    check_loss: float


def epoch_plans(examples: list[dict], batch: int, max_length: int, seed: int) -> list[EpochPlan]:
    lengths = [len(ex["input_ids"]) for ex in examples]
    bucketed = gl.BucketedBatches(examples, batch, shuffle=True, seed=seed)
    packed = gl.BucketedBatches(examples, batch, shuffle=True, seed=seed, packing=True, max_length=max_length)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [order[i:i + batch] for i in range(0, len(order), batch)]

    def plain(rows_list: list[list[int]], width: int | None) -> list[dict]:
        return [{"rows": rows, "width": width or max(lengths[i] for i in rows)} for rows in rows_list]

    packed_batches = [{"rows": [packed.packed_rows[r] for r in rows],
                       "width": max(sum(lengths[i] for i in packed.packed_rows[r]) for r in rows)}
                      for rows in packed.batch_indices()]
    return [
        EpochPlan("gpt2lora, length-bucketed (BucketedBatches)", OURS, plain(bucketed.batch_indices(), None)),
        EpochPlan(f"gpt2lora, packed into rows of {max_length} (packing=True)", OURS, packed_batches, packed=True),
        EpochPlan("transformers + peft, dynamic padding per batch", REF, plain(shuffled, None)),
        EpochPlan(f"transformers + peft, every row padded to {max_length}", REF, plain(shuffled, max_length)),
    ]


def stratified(widths: list[int], k: int) -> list[int]:
    """Indices of ``k`` batches at the midpoints of ``k`` equal slices of the width ranking (all when k ≤ 0)."""
    ranked = sorted(range(len(widths)), key=lambda i: widths[i])
    if k <= 0 or k >= len(ranked):
        return ranked
    return [ranked[int((j + 0.5) * len(ranked) / k)] for j in range(k)]


def materialise(plan: EpochPlan, spec: dict, examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    if plan.packed:
        return collate_packed([[examples[i] for i in row] for row in spec["rows"]], pad)
    batch = collate([examples[i] for i in spec["rows"]], pad)
    if spec["width"] > batch["input_ids"].size(1):  # padded to max_length
        extra = spec["width"] - batch["input_ids"].size(1)
        batch = {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad),
                 "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra)),
                 "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)}
    return batch


def bench_lm_epoch(sides: dict[str, Side], examples: list[dict], batch: int, max_length: int, samples: int,
                   pad: int, seed: int = 0, device: str = "cpu", tol: float = 1e-4,
                   warm: bool = False) -> list[EpochEstimate]:
    """Estimated epoch time of every plan: mean time of sampled batches × batches (contenders interleaved).

    ``warm``: step each sampled batch once untimed before timing it. On a GPU a shape's first step picks
    kernels and grows the allocator's pool, which an epoch pays once per shape, not per batch: one timed
    step of ~50 ms then measured that setup (a padded-to-512 plan came out 3.5× faster than bucketing).

    Plans whose batches nearly all have the same size (90 % of them within 10 % of the largest: padded to
    max_length, full packed rows) time one batch. Before timing, the loss of the first rows of each plan's
    first batch (one packed row, or two rows) is checked against transformers + peft on the same examples
    unpadded (untrained sides: call this before they step).
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    plans = epoch_plans(examples, batch, max_length, seed)
    picks = {}
    for p in plans:  # one sample where every batch has (nearly) the same shape: fixed padding, full packed rows
        widths = sorted(b["width"] * len(b["rows"]) for b in p.batches)
        uniform = widths[len(widths) // 10] >= 0.9 * widths[-1]  # 90 % of batches within 10 % of the largest
        picks[p.name] = stratified([b["width"] * len(b["rows"]) for b in p.batches], 1 if uniform else samples)
    checks = {}
    for plan in plans:  # the first rows of each plan's first batch: same loss as the reference's on them unpadded
        first = plan.batches[picks[plan.name][0]]
        spec = {"rows": first["rows"][:1 if plan.packed else 2], "width": first["width"]}
        flat = [i for row in spec["rows"] for i in row] if plan.packed else spec["rows"]
        ref = check_same_loss({REF: sides[REF]}, to_device(collate([examples[i] for i in flat], pad), device))[REF]
        got = check_same_loss({plan.side: sides[plan.side]},
                              to_device(materialise(plan, spec, examples, pad), device))[plan.side]
        if abs(got - ref) > tol:
            raise SystemExit(f"{plan.name}: loss {got} on its first batch, but transformers + peft computes {ref} "
                             "on the same rows")
        checks[plan.name] = got
    times: dict[str, list[float]] = {p.name: [] for p in plans}
    for j in range(max(len(v) for v in picks.values())):
        for plan in plans if j % 2 == 0 else plans[::-1]:
            if j >= len(picks[plan.name]):
                continue
            data = to_device(materialise(plan, plan.batches[picks[plan.name][j]], examples, pad), device)
            if warm:
                sides[plan.side].step(data)
            sync(device)
            start = time.perf_counter()
            sides[plan.side].step(data)
            sync(device)
            times[plan.name].append(time.perf_counter() - start)
    out = []
    for plan in plans:
        slots = sum(b["width"] * len(b["rows"]) for b in plan.batches)
        out.append(EpochEstimate(plan.name, len(plan.batches), sum(lengths), slots,
                                 statistics.fmean(times[plan.name]) * len(plan.batches), len(times[plan.name]),
                                 checks[plan.name]))
    return out


# --- memory, one process per configuration ---

def widest_batch(examples: list[dict], batch: int, pad: int) -> dict[str, torch.Tensor]:
    """The ``batch`` longest rows: the batch that sets a run's peak memory."""
    rows = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))[:batch]
    return collate([examples[i] for i in rows], pad)


MEMORY_BATCHES = ("step", "widest")
"""``step``: the instruction step's batch (8 random rows padded to their longest); ``widest``: the 8 longest."""


def measure_memory(config: str, shape: str, batch: int, max_length: int, rows: int, steps: int,
                   which: str = "step") -> dict:
    """Inside a worker: RSS after building model, optimizer and batch, then the peak over ``steps`` steps."""
    from pairs import adamw, full_logits_lm_loss, ours_lm_loss, reference_loss

    examples = task_examples("alpaca_2k", rows, max_length, vocab_limit(shape))
    data = (widest_batch(examples, batch, pad_id(shape)) if which == "widest"
            else step_batch(examples, batch, seed=0, pad=pad_id(shape)))
    torch.manual_seed(0)
    hf = hf_config(shape)
    if config.startswith("gpt2lora"):
        model = gl.GPT2(gl.GPT2Config.from_hf_config(hf.to_dict()))
        gl.apply_lora(model, gl.LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=TARGETS), seed=0)
        loss = full_logits_lm_loss(model) if config == "gpt2lora-full-logits" else ours_lm_loss(model)
        model.transformer.gradient_checkpointing = config == "gpt2lora-checkpointing"
    else:
        import peft
        import transformers

        transformers.logging.set_verbosity_error()
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(hf), peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), fan_in_fan_out=True,
            task_type="CAUSAL_LM"))
        loss = reference_loss(model)
    model.train()
    side = Side(config, model, adamw(model), loss, clip=1.0)
    baseline = status_kib("VmRSS")
    resettable = reset_peak()
    losses = [side.step(data) for _ in range(steps)]
    peak = status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": config, "baseline_kib": baseline, "peak_kib": peak, "reset": resettable, "losses": losses,
            "width": data["input_ids"].size(1), "targets": target_count(data["labels"])}


def bench_lm_memory(shape: str, batch: int, max_length: int, rows: int, steps: int = 1,
                    threads: int | None = None, configs: tuple[str, ...] = tuple(MEMORY_CONFIGS),
                    batches: tuple[str, ...] = MEMORY_BATCHES) -> dict[str, dict[str, dict]]:
    """``{batch kind: {configuration: worker result}}``, each configuration in a fresh process."""
    results: dict[str, dict[str, dict]] = {}
    for which in batches:
        for config in configs:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--shape", shape, "--batch",
                   str(batch), "--max-length", str(max_length), "--epoch-rows", str(rows), "--memory-steps",
                   str(steps), "--memory-batch", which]
            if threads is not None:
                cmd += ["--threads", str(threads)]
            out = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                raise SystemExit(f"memory worker {config} ({which} batch) failed:\n{out.stderr[-3000:]}")
            results.setdefault(which, {})[config] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def added_mib(r: dict) -> float:
    return (r["peak_kib"] - r["baseline_kib"]) / 1024


# --- profile and matmul peak ---

def lm_step_flops(shape: str, batch: int, width: int, targets: int, real_tokens: int | None = None) -> float:
    """Useful FLOPs of one LoRA LM step: blocks and attention as in bench_train, the head at targets only.

    Forward 2 FLOPs per block weight per real token (``real_tokens``; every slot when None: gpt2lora's
    block layers skip padding in training) + 4·B·T²·C attention per layer over the padded width, backward
    as much again for the input gradients (attention: twice); the head 2·V·C per target forward and again
    backward.
    """
    cfg = hf_config(shape)
    tokens = batch * width if real_tokens is None else real_tokens
    linear = 12 * cfg.n_embd ** 2 * cfg.n_layer
    attention = 4 * batch * width ** 2 * cfg.n_embd * cfg.n_layer
    head = 2 * cfg.vocab_size * cfg.n_embd * targets
    return 2 * (2 * linear * tokens) + 3 * attention + 2 * head


def matmul_gflops(device: str = "cpu", repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of a (2048, 768) @ (768, 3072) matmul, the shape of a c_fc product."""
    a = torch.randn(2048, 768, device=device)
    b = torch.randn(768, 3072, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 768 * 3072 / best / 1e9


def profile_step(side: Side, data: dict[str, torch.Tensor], top: int = 8) -> list[tuple[str, float]]:
    """Share of self CPU time of the ``top`` ops of one training step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step(data)
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    events.sort(key=lambda item: -item[1])
    return [(name, t / total) for name, t in events[:top]]


# --- evaluation generation ---

def bench_generation(shape: str, prompts: int = 32, new_tokens: int = 16, batch: int = 8,
                     device: str = "cpu") -> dict:
    """Greedy instruction answers for evaluation: prompts in their own order vs length-sorted (``generate_texts``).

    Both left-pad every batch; the texts must be identical. Random weights, so answers rarely end early:
    the gain shown is the padding that sorting saves.
    """
    from gpt2lora.data.tasks import prompt_ids
    from gpt2lora.training.evaluation import generate_texts

    tok = gl.load_tokenizer(SHARED / "gpt2-tokenizer")
    cfg = gl.GPT2Config.from_hf_config(hf_config(shape).to_dict())

    def task_prompts(task: str, kind: str, n: int) -> list[list[int]]:
        rows = gl.load_split(SHARED / "data" / task, "validation", limit=n).records
        return [prompt_ids(tok, r, kind, cfg.n_positions - new_tokens) for r in rows]

    def slots(lengths: list[int]) -> int:
        return sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))

    saved = {}
    for task, kind in (("alpaca_2k", "instruction"), ("squad_v1", "qa")):
        lengths = [len(p) for p in task_prompts(task, kind, 200)]
        saved[kind] = 1 - slots(sorted(lengths, reverse=True)) / slots(lengths)
    torch.manual_seed(0)
    model = gl.GPT2(cfg).to(device).eval()
    limit = vocab_limit(shape)
    encoded = task_prompts("alpaca_2k", "instruction", prompts)
    if limit is not None:
        encoded = [[i % limit for i in p] for p in encoded]
    eot = tok.eot_token if limit is None else limit

    def in_order() -> list[list[int]]:
        out = []
        for start in range(0, len(encoded), batch):
            data = collate([{"input_ids": p, "label": 0} for p in encoded[start:start + batch]], eot,
                           padding_side="left")
            gen = model.generate(data["input_ids"].to(device), data["attention_mask"].to(device),
                                 max_new_tokens=new_tokens, eos_token_id=eot)
            out += gen[:, data["input_ids"].size(1):].tolist()
        return out

    class Tok:  # generate_texts decodes; compare token ids instead, through a tokenizer that returns them
        eot_token = eot
        n_vocab = cfg.vocab_size

        @staticmethod
        def decode(ids: list[int]) -> str:
            return " ".join(map(str, ids))

    def sorted_batches() -> list[str]:
        return generate_texts(model, Tok, encoded, new_tokens, torch.device(device), batch_size=batch)

    lengths = [len(p) for p in encoded]
    widths = {"in order": slots(lengths), "length-sorted": slots(sorted(lengths, reverse=True))}
    results: dict[str, list] = {}
    timings = interleaved({"in order": lambda: results.__setitem__("in order", in_order()),
                           "length-sorted": lambda: results.__setitem__("length-sorted", sorted_batches())},
                          repeats=1, warmup=0)
    expected = [" ".join(map(str, row[:row.index(eot)] if eot in row else row)).strip()
                for row in results["in order"]]
    if expected != results["length-sorted"]:
        raise SystemExit("length-sorted generation gave other answers than generation in prompt order")
    return {"prompts": len(encoded), "new_tokens": new_tokens, "batch": batch, "slots": widths,
            "seconds": {name: t.median for name, t in timings.items()}, "saved_slots": saved}


# --- report ---

def seconds(t: float) -> str:
    """A step's time: milliseconds below a second (GPU steps), else seconds."""
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def step_rows(results: list[LMStepResult]) -> list[str]:
    cuda = any(r.cuda_peak for r in results)
    head = "| task | B × T (real tokens, targets) | gpt2lora | transformers + peft | speed-up | full logits (ablation) |"
    rule = "|---|---|---|---|---|---|"
    if cuda:
        head += " peak CUDA MiB, side alone (ours / ref) |"
        rule += "---|"
    rows = [head, rule]
    for r in results:
        ours, ref = r.timings[OURS].median, r.timings[REF].median
        full = (f"{seconds(r.timings[FULL].median)} ({ref / r.timings[FULL].median:.2f}×)" if FULL in r.timings
                else "–")
        row = (f"| {r.task} | {r.batch} × {r.width} ({r.real_tokens:,}, {r.targets:,} = "
               f"{r.targets / (r.batch * r.width):.0%} of slots) | {seconds(ours)} | {seconds(ref)} | {ref / ours:.2f}× "
               f"| {full} |")
        if cuda:
            row += f" {r.cuda_peak[OURS] / 2**20:,.0f} / {r.cuda_peak[REF] / 2**20:,.0f} |"
        rows.append(row)
    return rows


def epoch_rows(results: list[EpochEstimate]) -> list[str]:
    ours = results[0]
    rows = [("| contender | batches | real tokens | computed slots (padding share) | sampled | est. epoch "
             "| vs gpt2lora bucketed |"), "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.name} | {r.batches} | {r.real_tokens:,} | {r.slots:,} ({1 - r.real_tokens / r.slots:.0%}) "
                    f"| {r.sampled} | {r.seconds:,.0f} s | {r.seconds / ours.seconds:.2f}× |")
    return rows


def memory_rows(results: dict[str, dict[str, dict]]) -> list[str]:
    """One row per configuration, training-added peak RSS (and its ratio to the reference) per batch kind."""
    kinds = list(results)
    head = "| configuration |" + "".join(
        f" {kind} batch ({next(iter(results[kind].values()))['width']} tokens wide): training adds |" for kind in kinds)
    rows = [head + " peak RSS (last batch) |", "|---|" + "---|" * (len(kinds) + 1)]
    for config in results[kinds[0]]:
        row = f"| {MEMORY_CONFIGS[config]} |"
        for kind in kinds:
            r, ref = results[kind][config], results[kind].get("peft")
            ratio = f" ({added_mib(r) / added_mib(ref):.2f}×)" if ref else ""
            row += f" {added_mib(r):,.0f} MiB{ratio} |"
        rows.append(row + f" {results[kinds[-1]][config]['peak_kib'] / 1024:,.0f} MiB |")
    return rows


def section(results: dict, command: str, args: argparse.Namespace, load: tuple[float, float]) -> str:
    device = f"{args.device}, {args.precision}" + (" (autocast; gpt2lora holds its frozen base in bf16, the reference fp32 weights)" if args.precision != "fp32" else "")
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after  ",
        (f"{args.shape} shape (random weights), LoRA r=8 alpha=16 on {', '.join(TARGETS)}, no LoRA dropout, "
         f"model dropout as in GPT-2's config (0.1), torch AdamW, clip 1.0, {device}, batch {args.batch}, "
         f"max_length {args.max_length}. gpt2lora: `GPT2.forward(..., labels=...)` (LM head + cross-entropy at "
         f"target positions only, {DEFAULT_LOSS_CHUNK_SIZE} rows at a time) / target count; transformers + peft: `GPT2LMHeadModel` + "
         "`LoraConfig(task_type=CAUSAL_LM)`, `model(..., labels=...).loss`. Every comparison first checks both "
         "sides compute the same loss (eval mode, within 1e-4)."),
    ]
    if "step" in results:
        lines += ["", (f"**Step on identical batches** ({args.batch} rows drawn at random, padded to the longest; "
                       f"median of {args.repeats} interleaved steps after one warm-up; instruction = alpaca_2k in "
                       "the Alpaca template with the prompt masked, squad = context + question masked, answer + EOS "
                       "the target):"), "", *step_rows(results["step"])]
    if "epoch" in results:
        lines += ["", (f"**Epoch over {args.epoch_rows:,} alpaca_2k rows** (train, validation and test files), "
                       f"batch {args.batch} (packed: {args.batch} rows of up to {args.max_length} tokens). "
                       "Estimated: batches sampled at the midpoints of equal slices of the width ranking "
                       f"({args.samples} per contender, 1 where every batch has nearly the same size), timed once each"
                       f"{' after one untimed step on it' if args.device.startswith('cuda') else ''}, "
                       "contenders interleaved; mean × batches. Token counts are exact. Each contender's loss on rows of its "
                       "first batch (a packed row: its examples) was checked against transformers + peft on the same "
                       "examples unpadded."),
                  "", *epoch_rows(results["epoch"])]
    if "memory" in results:
        mem = results["memory"]
        described = "; ".join(f"{kind}: {next(iter(mem[kind].values()))['targets']:,} targets" for kind in mem)
        lines += ["", (f"**Training-added peak memory**: one process per configuration, {args.memory_steps} step(s) on "
                       f"the instruction step's batch (`step`) and on the {args.batch} longest alpaca_2k rows "
                       f"(`widest`, the batch that sets a run's peak) ({described}). Baseline = RSS after building "
                       "model, optimizer and batch; peak = VmHWM after resetting it there; in brackets the ratio to "
                       "transformers + peft."), "", *memory_rows(mem)]
    if "generate" in results:
        gen = results["generate"]
        t, slots = gen["seconds"], gen["slots"]
        saved = ", ".join(f"{task} {share:.0%}" for task, share in gen["saved_slots"].items())
        lines += ["", (f"**Evaluation answers** (`evaluation.generate_texts`, greedy, {gen['prompts']} alpaca_2k "
                       f"validation prompts, {gen['new_tokens']} new tokens, batch {gen['batch']}, left padding, random "
                       f"weights): in the prompts' order {t['in order']:.1f} s ({slots['in order']:,} prompt slots), "
                       f"length-sorted {t['length-sorted']:.1f} s ({slots['length-sorted']:,} slots): "
                       f"{t['in order'] / t['length-sorted']:.2f}×, the same answers. Prompt slots sorting saves over "
                       f"the first 200 validation prompts at batch 8: {saved}. A trained model also stops a QA "
                       "batch once every row has written a newline (`stop_token_ids`).")]
    if "profile" in results:
        prof = results["profile"]
        ops = ", ".join(f"`{name}` {share:.0%}" for name, share in prof["ops"])
        lines += ["", (f"**Where the time goes** (torch.profiler, one gpt2lora instruction step, self CPU time): {ops}. "
                       f"The step's useful work is {prof['flops'] / 1e9:,.0f} GFLOP (blocks at real tokens and attention "
                       "forward + input gradients, the head at target positions; see `lm_step_flops`): "
                       f"{prof['achieved']:.0f} GFLOP/s against {prof['peak']:.0f} GFLOP/s for a lone (2048×768)·"
                       f"(768×3072) fp32 matmul measured in the same run ({prof['achieved'] / prof['peak']:.0%} of it).")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per side (median)")
    parser.add_argument("--epoch-rows", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2, help="batches timed per epoch contender")
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--memory-batch", choices=MEMORY_BATCHES, default="step", help=argparse.SUPPRESS)
    parser.add_argument("--memory-batches", nargs="+", choices=MEMORY_BATCHES, default=list(MEMORY_BATCHES))
    parser.add_argument("--memory-configs", nargs="+", choices=sorted(MEMORY_CONFIGS), default=list(MEMORY_CONFIGS))
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--no-ablation", action="store_true", help="leave out the full-logits gpt2lora side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", choices=sorted(MEMORY_CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_memory(args.worker, args.shape, args.batch, args.max_length, args.epoch_rows,
                                        args.memory_steps, args.memory_batch)))
        return "", {}
    load_before = os.getloadavg()[0]
    autocast = PRECISIONS[args.precision]
    tol = 1e-4 if autocast is None else 5e-2
    pad, limit = pad_id(args.shape), vocab_limit(args.shape)
    results: dict = {}
    alpaca = task_examples("alpaca_2k", args.epoch_rows, args.max_length, limit)
    sides: dict[str, Side] = {}

    def fresh(full_logits: bool) -> dict[str, Side]:
        """New untrained sides (steps make Adam's trajectories drift apart, so loss checks need a fresh start)."""
        sides.clear()
        sides.update(lm_pair(args.shape, device=args.device, autocast=autocast, full_logits=full_logits))
        return sides

    for task, part in (("instruction", "step"), ("squad", "squad")):
        if part in args.skip:
            continue
        examples = alpaca if task == "instruction" else task_examples("squad_v1", 400, args.max_length, limit)
        data = to_device(step_batch(examples, args.batch, seed=0, pad=pad), args.device)
        results.setdefault("step", []).append(bench_lm_step(task, fresh(not args.no_ablation), data, args.repeats,
                                                            device=args.device, tol=tol))
        print(step_rows(results["step"][-1:])[-1], flush=True)
    if "profile" not in args.skip:
        if not sides:
            fresh(False)
        data = to_device(step_batch(alpaca, args.batch, seed=0, pad=pad), args.device)
        ops = profile_step(sides[OURS], data)
        times = []
        for _ in range(2):
            sync(args.device)
            start = time.perf_counter()
            sides[OURS].step(data)
            sync(args.device)
            times.append(time.perf_counter() - start)
        flops = lm_step_flops(args.shape, data["input_ids"].size(0), data["input_ids"].size(1),
                              target_count(data["labels"]), int(data["attention_mask"].sum()))
        results["profile"] = {"ops": ops, "flops": flops, "achieved": flops / min(times) / 1e9,
                              "peak": matmul_gflops(args.device)}
    if "generate" not in args.skip:
        sides.clear()
        results["generate"] = bench_generation(args.shape, device=args.device)
    if "epoch" not in args.skip:
        results["epoch"] = bench_lm_epoch(fresh(False), alpaca, args.batch, args.max_length, args.samples, pad,
                                          device=args.device, tol=tol, warm=args.device.startswith("cuda"))
        print("\n".join(epoch_rows(results["epoch"])), flush=True)
    sides.clear()
    if "memory" not in args.skip and args.device == "cpu":
        results["memory"] = bench_lm_memory(args.shape, args.batch, args.max_length, args.epoch_rows,
                                            args.memory_steps, args.threads, tuple(args.memory_configs),
                                            tuple(args.memory_batches))
    command = "python benchmarks/bench_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = section(results, command.strip(), args, (load_before, os.getloadavg()[0]))
    if not args.no_write:
        write_section("LM fine-tuning" + (" (GPU)" if args.device.startswith("cuda") else ""), body)
    print(body)
    return body, results


if __name__ == "__main__":
    main()
