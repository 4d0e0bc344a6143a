"""Greedy generation speed and checkpoint load time: gpt2lora against transformers, in the same run.

    python benchmarks/bench_generate.py                 # GPT-2 124M shape, writes RESULTS.md "Generation"
    python benchmarks/bench_generate.py --shape tiny --no-write   # seconds-long smoke run

Weights are random (saved by transformers to a temporary folder): speed does not depend on their
values. Every timed pair is also checked token for token, so a speed-up can never hide a change
of output.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timing, interleaved, machine_line, write_section

from gpt2lora import GPT2, generate
from gpt2lora.devices import cpu_bf16_units
from gpt2lora.model.pages import HUGE_PAGE, huge_page_mode
from gpt2lora.ops import few_row as few_row_module
from gpt2lora.ops.few_row import KERNELS, KernelChoice, linear_by_halves
from gpt2lora.ops.packed import (
    fp16_packed_available,
    fp16_packed_linear,
    mkl_packed_available,
    mkl_packed_linear,
    packed_bytes,
    packed_linear,
    packed_linear_available,
    release_packed,
)

NOTES = """\
Decoding one row is bound by reading the weights: every new token reads every block matrix and the
(vocab, n_embd) LM head once. The ceiling printed above is the machine's read bandwidth divided by those
bytes: the fastest of three read rates, a `sum` over 1 GB of fp32 and one row through the model's own
weights with the kernels decoding chose (a decoding step's products back to back), both timed interleaved with
the batch-1 runs (so that all see the same load), and the fastest fp32 kernel of the back-to-back passes of the
"kernels alone" line (on some machines the `sum` reads slower than the products, and a pass right after the
`sum` slower than repeated passes, whose weights partly stay in a large L3; a ceiling below what decoding
reaches would say nothing); the fraction is how much of it generation reaches. A virtual machine's read
bandwidth can move by half within minutes (other tenants of the host), so the share is also given paired per
round: each decoding run against the fastest read pass of its own round, the median over rounds. The bf16 line
times a `sum` beside its runs too, and gives the fp32 runs there a ceiling line of their own. Attention,
LayerNorm, GELU, cache writes and Python take the rest: about 1.4 ms a token with the caches warm, 3-4 ms in
decoding, where every token's weights have just flushed them.
Which kernel reads a weight fastest for one or a few rows depends on the CPU and its BLAS: splitting the
product into a two-block `bmm` was 1.4-2.9x faster than `F.linear` on an AVX2 EPYC and is slower for
most shapes on an AMX Xeon. bf16 weights have two packed candidates, copies of the weight made once
(`gpt2lora/ops/packed.py`, kept on the weight, remade when it changes): oneDNN's bf16 product (on a CPU with
bf16 units; about twice as fast as plain bf16 `F.linear`, which reads at about half the fp32 speed on the
Xeon) and fbgemm's fp16 product ("fp16_packed": an fp16 copy widened to fp32 in registers, in every x86 build;
on the Zen 4 EPYC the fastest bf16 kernel, reading about as many GB/s as the fp32 split; on a CPU without bf16
units, where torch emulates bf16 products, a bf16 model's prompt and other products without gradients take it
too, and the "A 512-token prompt" line times that against fp32). A bf16 model's keys
and values are cached in fp32 on the CPU (torch's one-query attention over bf16 keys took several times as long as
over fp32 ones). For one fp32 row the packed candidate is MKL's layout for exactly one row ("mkl_packed"; on the
Xeon it reads the LM head about 10% faster than `F.linear` and the block matrices slower), for 2-32 fp32 rows
oneDNN's. generate
times the candidates on first use of each decoding shape (dtype, rows, thread count) and keeps the fastest
only when it beats `F.linear` by more than 5% over 8 timed calls each (`gpt2lora/ops/few_row.py`,
`KernelChoice`; the choice is stored per machine, so later processes reuse it untimed); while a packed
candidate is timed only one weight of each shape is packed, and its pack is dropped when another kernel wins;
no candidate is timed more than once ahead of another, so all are timed over the same stretch of the run.
Each timed call follows an untimed run of the same kernel on a few rows of the weight: a kept kernel runs call
after call, while on trial it may not have run for a whole step (fbgemm's fp16 product took 1.5-2x as long then
on a Zen 3 EPYC, and lost shapes it wins once kept). A kept packed product packs each other weight of its shape
only once that weight's unpacked products would have paid for the pack (its plan: the pack's seconds over the
seconds it saves a call, both from the trials, stored with the choice; `few_row.PackPlan`): the bf16 line's
timed runs come after every plan is due, and the "first generate" line times a one-off generate on freshly
loaded models, which pays for no pack it would not use. The prompt's forward stays on `F.linear` (every prompt
length would be a new shape to time). A decided call costs one dict lookup (about 2 us, ~50 calls a token), so where `F.linear` is
kept the choice costs well under 1% of a token. The choice is scoped to the generate call's thread: other
threads and models keep `F.linear`. "Paired per round" ratios are medians of the ratio within each
interleaved round. With the CPU shared by other processes, 2 intra-op threads can be slower than 1
(`--threads 1`). The "2 MB pages" line loads the same checkpoint with `huge_pages=True` (`gpt2lora/model/pages.py`)
and decodes it interleaved with the default load and transformers; its ceiling also counts the read pass over
those weights. Its first load pays a fault per 2 MB page (slow in a VM whose host backs memory on first
touch); the load row with `huge_pages=True` times later loads in the same process.\
"""

SHAPES = {
    "gpt2": {},  # transformers' defaults are the 124M shape
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256, "vocab_size": 512},
}


def make_checkpoint(folder: Path, shape: str) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape]))
    model.save_pretrained(folder)


def prompts(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts; from batch 2 on their lengths differ (left padding + attention mask)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = row % (length // 2)
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def bench_generation(ours: GPT2, ref, batch: int, prompt_len: int, new: int, repeats: int,
                     reads: dict[str, tuple[Callable[[], object], int]] | None = None) -> dict:
    """tok/s of both sides; with ``reads`` (name: (a pass that reads some bytes, those bytes)), each pass is timed
    between them too, and ``result["bandwidth"]`` holds its bytes per second."""
    ids, mask = prompts(batch, prompt_len, ours.config.vocab_size)
    outputs: dict[str, torch.Tensor] = {}

    def run_ours():
        outputs["ours"] = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)

    def run_ref():
        with torch.inference_mode():
            outputs["ref"] = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                          pad_token_id=0)

    contenders = {"gpt2lora": run_ours, "transformers": run_ref}
    reads = reads or {}
    contenders.update({name: fn for name, (fn, _) in reads.items()})
    timings = interleaved(contenders, repeats=repeats)
    if outputs["ours"].shape != (batch, prompt_len + new) or not torch.equal(outputs["ours"], outputs["ref"]):
        raise SystemExit(f"batch {batch}: gpt2lora and transformers generated different tokens")
    tokens = batch * new
    result: dict = {name: (timings[name], tokens / timings[name].median) for name in ("gpt2lora", "transformers")}
    if reads:
        result["bandwidth"] = {name: size / timings[name].median for name, (_, size) in reads.items()}
        passes = {name: (timings[name], size) for name, (_, size) in reads.items()}
        result["rounds"] = paired_rounds(timings["gpt2lora"], tokens, passes)
    return result


def paired_rounds(decoding: Timing, tokens: int, reads: dict[str, tuple[Timing, int]]) -> list[tuple[float, float]]:
    """Per interleaved round: (tok/s of the decoding run, the fastest read rate of the passes timed in that round).

    The host's read bandwidth can move by half within minutes (other tenants): a decoding run compared with the
    read passes of its own round sees the same machine, where medians over the whole run mix slow and fast
    phases."""
    return [(tokens / seconds, max(size / timing.seconds[i] for timing, size in reads.values()))
            for i, seconds in enumerate(decoding.seconds)]


def linear_weights(model: GPT2) -> tuple[list[torch.Tensor], dict[int, torch.Tensor], int]:
    """Every linear weight of ``model`` (the 48 block matrices and the LM head, as one decoding step reads them),
    one random input row per input width, and the weights' bytes."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {w.size(1): torch.randn(1, w.size(1), dtype=w.dtype) for w in weights}
    return weights, rows, sum(w.numel() * w.element_size() for w in weights)


def sum_read() -> tuple[Callable[[], object], int]:
    """A ``sum`` over a fresh :data:`READ_MB` buffer (larger than the model and the L3), and the bytes it reads."""
    buffer = torch.ones(READ_MB * 2**20 // 4)
    return buffer.sum, buffer.numel() * buffer.element_size()


def weight_read(model: GPT2) -> tuple[Callable[[], object], int]:
    """A pass of one row against every linear weight of ``model`` with the kernels decoding chose for each shape
    (``few_row_products``: the products of a decoding step back to back), and the bytes it reads."""
    weights, rows, size = linear_weights(model)

    def read() -> None:
        with torch.no_grad(), few_row_module.few_row_products():
            for w in weights:
                few_row_module.linear(rows[w.size(1)], w)

    return read, size


def even(repeats: int) -> int:
    """At least 6 rounds, an even number: ``interleaved`` reverses the order every other round, so each side
    runs first equally often (a 2% gap between two runs of the same code needs more than 3 rounds)."""
    return max(6, repeats + repeats % 2)


def paired(fast: Timing, slow: Timing) -> float:
    """Median over repeats of ``slow``'s time / ``fast``'s time in the same round: runs of one round are
    adjacent in time, so a load change between rounds (the CPU is shared) cancels out of each ratio."""
    return statistics.median(s / f for f, s in zip(fast.seconds, slow.seconds, strict=True))


def route_cost(calls: int = 2000) -> float:
    """Seconds a decided call adds to ``F.linear`` inside ``few_row_products`` (a weight below the few-row
    size, so both sides run the same kernel), median of interleaved loops."""
    layer = torch.nn.Linear(128, 256)
    x = torch.randn(1, 128)
    plain, routed = torch.nn.functional.linear, few_row_module.linear

    def loop(fn):
        def go() -> None:
            with few_row_module.few_row_products():
                for _ in range(calls):
                    fn(x, layer.weight, layer.bias)
        return go

    with torch.inference_mode():
        timings = interleaved({"plain": loop(plain), "routed": loop(routed)}, repeats=7)
    return (timings["routed"].median - timings["plain"].median) / calls


class PlainLinear(KernelChoice):
    """A kernel choice that decides ``F.linear`` for every few-row shape, storing nothing: decoding's products as
    plain ``F.linear``. (Without any choice a bf16 model's few-row products would take the fp16 pack on a CPU
    without bf16 units, as its many-row ones still do here: ``gpt2lora.ops.packed.takes_fp16_pack_route``.)"""

    def pick(self, key, candidates, warm_up=None):
        self.chosen[key] = "F.linear"
        return candidates["F.linear"]()


PLAIN = PlainLinear()


def timed_generate(model: GPT2, ids: torch.Tensor, new: int, plain: bool, outputs: dict[str, torch.Tensor],
                   cpu_seconds: list[float], name: str) -> Callable[[], None]:
    """A greedy ``generate`` to time: its tokens go to ``outputs[name]``, its CPU seconds to ``cpu_seconds``;
    ``plain``: decoding's products on plain ``F.linear`` (:class:`PlainLinear`) instead of the measured choice."""
    module = sys.modules["gpt2lora.model.generate"]  # the package's `generate` attribute is the function

    def go() -> None:
        few_row = module.few_row_products
        if plain:
            module.few_row_products = lambda: few_row(PLAIN)
        try:
            start = time.process_time()
            outputs[name] = generate(model, ids, max_new_tokens=new, eos_token_id=None)
            cpu_seconds.append(time.process_time() - start)
        finally:
            module.few_row_products = few_row
    return go


def kept_kernels(dtype: torch.dtype) -> list[str]:
    """The kernel the measured choice kept for each one-row shape of ``dtype`` decided so far."""
    return [name for key, name in KERNELS.chosen.items() if key[1] == 1 and key[5] == dtype]


def counted(names: list[str]) -> str:
    """``names`` as "name count" pairs, e.g. "F.linear 2, by_halves 3"."""
    return ", ".join(f"{name} {names.count(name)}" for name in sorted(set(names)))


def ablation_note(ours: GPT2, prompt_len: int, new: int, repeats: int) -> str:
    """Batch 1 with the measured few-row kernel choice (``few_row_products``) and with plain ``F.linear``."""
    ids, _ = prompts(1, prompt_len, ours.config.vocab_size)
    outputs = {}
    cpu: dict[str, list[float]] = {"with": [], "without": []}

    def run(name: str, plain: bool) -> Callable[[], None]:
        return timed_generate(ours, ids, new, plain, outputs, cpu[name], name)

    timings = interleaved({"with": run("with", False), "without": run("without", True)}, repeats=even(repeats))
    if not torch.equal(outputs["with"], outputs["without"]):
        raise SystemExit("the few-row linear path changed the generated tokens")
    with_, without = (new / timings[k].median for k in ("with", "without"))
    # CPU time of this process: on a shared CPU a run also waits for the core, which wall time counts
    cpu_with, cpu_without = (Timing(k, cpu[k][-even(repeats):]) for k in ("with", "without"))
    kept = kept_kernels(torch.float32)
    return (f"Ablation (batch 1, same run, median of {even(repeats)}): gpt2lora {with_:.1f} tok/s with the "
            f"measured few-row kernel choice, {without:.1f} tok/s with plain F.linear ({with_ / without:.2f}×, "
            f"paired per round {paired(timings['with'], timings['without']):.2f}×; in CPU time "
            f"{cpu_without.median / cpu_with.median:.2f}×, paired {paired(cpu_with, cpu_without):.2f}×; goal: never "
            f"below 1×); tokens identical. Kernels kept for the {len(kept)} one-row fp32 shapes: "
            f"{counted(kept)}; a decided call costs {route_cost() * 1e6:.1f} us more than F.linear itself.")


READ_MB = 1024
"""The buffer whose ``sum`` measures read bandwidth: larger than the model and than this CPU's L3 (480 MB)."""


def bytes_per_token(model: GPT2) -> int:
    """Weight bytes one decoding step reads: every parameter but the position table (one row of it is read)."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - wpe.numel() * wpe.element_size()


READ_PASSES = {"sum": "a `sum` over 1 GB",
               "weights": "the model's one-row products (decoding's kernel choice) beside the runs",
               "kernels": "the fastest fp32 one-row kernel in the kernels-alone passes",
               "huge weights": "the one-row products over the weights on 2 MB pages beside those runs"}
"""The passes whose read rates measure the machine's read bandwidth: the first two timed between the batch-1
runs, the third back to back with the other few-row kernels (the "kernels alone" line), the fourth between the
runs of the "2 MB pages" line."""


def ceiling_line(model: GPT2, bandwidths: dict[str, float], tok_s: float, label: str,
                 rounds: list[tuple[float, float]] | None = None) -> str:
    """The decoding ceiling: the fastest of the measured read rates over the bytes a token reads; with
    ``rounds`` (see :func:`paired_rounds`), also the median share of each round's own ceiling."""
    per_token = bytes_per_token(model)
    bandwidth = max(bandwidths.values())
    ceiling = bandwidth / per_token
    rates = ", ".join(f"{READ_PASSES[name]} {rate / 1e9:.1f}" for name, rate in bandwidths.items())
    line = (f"{label}: {per_token / 1e6:,.0f} MB read per token, read bandwidth {bandwidth / 1e9:.1f} GB/s "
            f"(the fastest of: {rates} GB/s), ceiling {ceiling:.1f} tok/s; gpt2lora {tok_s:.1f} tok/s = "
            f"{100 * tok_s / ceiling:.0f}% of it")
    if rounds:
        shares = [rate * per_token / read for rate, read in rounds]
        line += (f" (paired per round, each run against the read passes of its own round: "
                 f"{100 * statistics.median(shares):.0f}%, {100 * min(shares):.0f}-{100 * max(shares):.0f}%)")
    return line


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bf16_note(ours: GPT2, folder: Path, prompt_len: int, new: int, repeats: int,
              bandwidth: dict[str, float]) -> str:
    """Batch 1 with the weights loaded in bf16 against the same model in fp32, interleaved with a `sum` read pass
    (``bandwidth``: the read rates measured so far); also bf16 on plain ``F.linear`` (no kernel choice, no
    packing). The fp32 runs get a ceiling line of their own: the same model, later in the run."""
    half = GPT2.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids, _ = prompts(1, prompt_len, ours.config.vocab_size)
    outputs = {}
    cpu: dict[str, list[float]] = {"first": [], "fp32": [], "bf16": [], "bf16 plain": []}

    def run(name: str, model: GPT2, plain: bool = False) -> Callable[[], None]:
        return timed_generate(model, ids, new, plain, outputs, cpu[name], name)

    warm_tokens = until_packed(run("first", half), new)  # the packed copies the choice keeps, made as planned
    read, size = sum_read()
    timings = interleaved({"fp32": run("fp32", ours), "bf16": run("bf16", half),
                           "bf16 plain": run("bf16 plain", half, plain=True), "sum": read}, repeats=even(repeats))
    del read  # the 1 GB buffer
    fp32, bf16, plain = (new / timings[k].median for k in ("fp32", "bf16", "bf16 plain"))
    rates = {**bandwidth, "sum": max(bandwidth.get("sum", 0.0), size / timings["sum"].median)}
    reads = {"sum": (timings["sum"], size)}
    cpu_fp32, cpu_bf16, cpu_plain = (Timing(k, cpu[k][-even(repeats):]) for k in ("fp32", "bf16", "bf16 plain"))
    same = int((outputs["fp32"][0, prompt_len:] == outputs["bf16"][0, prompt_len:]).cumprod(0).sum())
    units = ", ".join(cpu_bf16_units()) or "none"
    kept = packed_bytes(half)
    return (f"bf16 weights (batch 1, same run, bf16 units: {units}): {bf16:.1f} tok/s vs fp32 {fp32:.1f} tok/s "
            f"({bf16 / fp32:.2f}×, paired per round {paired(timings['bf16'], timings['fp32']):.2f}×, in CPU time "
            f"{cpu_fp32.median / cpu_bf16.median:.2f}× paired {paired(cpu_bf16, cpu_fp32):.2f}×; goal ≥ 1.6× "
            f"where the CPU has a fast bf16 path); bf16 on plain F.linear {plain:.1f} tok/s (the kernel choice "
            f"{bf16 / plain:.2f}× that, paired {paired(timings['bf16'], timings['bf16 plain']):.2f}×, in CPU time "
            f"{cpu_plain.median / cpu_bf16.median:.2f}×; tokens "
            f"{'identical' if torch.equal(outputs['bf16'], outputs['bf16 plain']) else 'DIFFERENT'}); the first "
            f"{same} of {new} tokens equal fp32's (random weights: tiny logit margins). Kernels kept for the "
            f"one-row bf16 shapes: {counted(kept_kernels(torch.bfloat16))}. Packed "
            f"copies kept on "
            f"the bf16 model: {kept / 1e6:,.0f} MB (of {bytes_per_token(half) / 1e6:,.0f} MB of weights), made "
            f"over its first {warm_tokens} tokens, untimed (each weight's pack put off by its plan, the unpacked "
            f"kernel for the calls named: {pack_plans()}); peak RSS of the whole benchmark "
            f"{peak_rss_bytes() / 1e9:.2f} GB. "
            + ceiling_line(half, rates, bf16, "bf16", paired_rounds(timings["bf16"], new, reads)) + ". "
            + ceiling_line(ours, rates, fp32, "fp32 in these runs", paired_rounds(timings["fp32"], new, reads)) + ".")


def pack_plans() -> str:
    """The plans of the packed products kept so far, e.g. "1-row 3072x768 bf16: F.linear for 407 calls"."""
    plans = {(route[0].numel() // route[3][1], *route[3], route[5]): plan for route, plan in KERNELS.pack_plans.items()}
    return "; ".join(f"{rows}-row {out}x{inp} {DTYPE_NAMES.get(dtype, dtype)}: {plan.unpacked} for {plan.calls} "
                     f"calls" for (rows, out, inp, dtype), plan in sorted(plans.items(), key=str)) or "none"


def until_packed(decode: Callable[[], None], new: int) -> int:
    """Run ``decode`` (``new`` tokens a call) until every weight whose kept kernel runs on a pack has it: a pack
    is made once its weight's unpacked products would have paid for it (``gpt2lora.ops.few_row.PackPlan``), so the
    timed runs after it see the steady state a long-running process (a server) reaches. The tokens decoded."""
    decode()  # decides (or recalls) the choices and their plans
    tokens = new
    while tokens <= max((plan.calls for plan in KERNELS.pack_plans.values()), default=0):
        decode()
        tokens += new
    return tokens


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def first_generate_note(folder: Path, prompt_len: int, new: int, repeats: int, bf16: bool) -> str:
    """A one-off ``generate`` (what ``gpt2lora generate`` runs): a freshly loaded model's first ``new`` tokens with
    the measured kernel choice (stored by now) against plain ``F.linear``, each round on fresh models."""
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
    parts = []
    for dtype in dtypes:
        timings: dict[str, list[float]] = {"choice": [], "plain": []}
        for _ in range(repeats):
            for name in ("choice", "plain"):
                model = GPT2.from_pretrained(folder, dtype=dtype).eval()
                ids, _ = prompts(1, prompt_len, model.config.vocab_size)
                go = timed_generate(model, ids, new, name == "plain", {}, [], name)
                start = time.perf_counter()
                go()
                timings[name].append(time.perf_counter() - start)
                if name == "choice":  # plain F.linear never packs
                    held = packed_bytes(model)
                del model
        choice, plain = (statistics.median(timings[k]) for k in ("choice", "plain"))
        ratio = statistics.median(p / c for c, p in zip(timings["choice"], timings["plain"], strict=True))
        parts.append(f"{DTYPE_NAMES[dtype]} {new / choice:.1f} tok/s against {new / plain:.1f} "
                     f"({plain / choice:.2f}×, paired {ratio:.2f}×; packed after it: {held / 1e6:,.0f} MB)")
    return (f"A fresh model's first generate (batch 1, {new} tokens, the choices stored by now, median of {repeats} "
            f"rounds on freshly loaded models): the kernel choice against plain F.linear, " + "; ".join(parts)
            + " (goal: never below 1×).")


def prompt_note(ours: GPT2, folder: Path, length: int, repeats: int) -> str:
    """A long prompt with bf16 weights against fp32: the time to the first token (the prompt's forward and one
    step), interleaved, and the block matrices' products of ``length`` rows alone, fp32 and bf16 ``F.linear``
    and bf16 through the fp16 pack (what a bf16 model's products without gradients take on a CPU without bf16
    units: ``gpt2lora.ops.packed.takes_fp16_pack_route``)."""
    half = GPT2.from_pretrained(folder, dtype=torch.bfloat16).eval()
    length = min(length, ours.config.n_positions - 1)  # room for the one new token
    ids = torch.randint(0, ours.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    generate(half, ids, max_new_tokens=1, eos_token_id=None)  # a fresh model's first prompt: nothing packed yet
    fresh = time.perf_counter() - start
    first = interleaved({name: (lambda m=model: generate(m, ids, max_new_tokens=1, eos_token_id=None))
                         for name, model in (("fp32", ours), ("bf16", half))}, repeats=repeats)
    blocks = {"fp32": [m.weight for m in ours.transformer.h.modules() if isinstance(m, torch.nn.Linear)],
              "bf16": [m.weight for m in half.transformer.h.modules() if isinstance(m, torch.nn.Linear)]}
    rows = {dtype: {w.size(1): torch.randn(length, w.size(1)).to(ws[0].dtype) for w in ws}
            for dtype, ws in blocks.items()}
    plain = torch.nn.functional.linear
    kernels = {"fp32 F.linear": ("fp32", plain), "bf16 F.linear": ("bf16", plain)}
    if fp16_packed_available():
        kernels["bf16 fp16_packed"] = ("bf16", functools.partial(fp16_packed_linear, keep=True))
    with torch.no_grad():
        alone = interleaved({name: (lambda d=dtype, fn=fn: [fn(rows[d][w.size(1)], w) for w in blocks[d]])
                             for name, (dtype, fn) in kernels.items()}, repeats=repeats)
    flops = 2 * length * sum(w.numel() for w in blocks["fp32"])
    rates = ", ".join(f"{name} {flops / alone[name].median / 1e9:,.0f}" for name in kernels)
    release_packed(half)
    fp32, bf16 = first["fp32"].median, first["bf16"].median
    units = ", ".join(cpu_bf16_units()) or "none"
    return (f"A {length}-token prompt (batch 1, bf16 units: {units}; time to the first token, median of "
            f"{repeats} interleaved): bf16 weights {bf16:.3f} s against fp32 {fp32:.3f} s ({fp32 / bf16:.2f}× as "
            f"fast, paired per round {paired(first['bf16'], first['fp32']):.2f}×; a fresh bf16 model's first prompt "
            f"{fresh:.3f} s, its products widened to fp32 where the CPU has no bf16 units, the packs made at the "
            f"second); the {len(blocks['fp32'])} block "
            f"matrices' products of {length} rows alone, GFLOP/s: {rates}"
            + (" (without bf16 units a bf16 model's products that need no gradient take the fp16 pack)"
               if units == "none" else "") + ".")


def huge_pages_note(ours: GPT2, ref, folder: Path, prompt_len: int, new: int, repeats: int,
                    bandwidth: dict[str, float]) -> str:
    """Batch 1 with the weights loaded on 2 MB pages (``huge_pages=True``) against the default load and
    transformers, interleaved, with the one-row read pass over those weights beside them."""
    start = time.perf_counter()
    huge = GPT2.from_pretrained(folder, huge_pages=True).eval()
    first_load = time.perf_counter() - start
    ids, _ = prompts(1, prompt_len, ours.config.vocab_size)
    outputs: dict[str, torch.Tensor] = {}
    cpu_seconds: list[float] = []  # timed_generate's CPU times: not reported here

    def run(name: str, model: GPT2) -> Callable[[], None]:
        return timed_generate(model, ids, new, False, outputs, cpu_seconds, name)

    def run_ref() -> None:
        with torch.inference_mode():
            outputs["ref"] = ref.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)

    run("first", huge)()
    read, size = weight_read(huge)
    timings = interleaved({"4 KB": run("4 KB", ours), "2 MB": run("2 MB", huge), "transformers": run_ref,
                           "huge weights": read}, repeats=even(repeats))
    if not (torch.equal(outputs["2 MB"], outputs["4 KB"]) and torch.equal(outputs["2 MB"], outputs["ref"])):
        raise SystemExit("the weights on 2 MB pages generated other tokens")
    small, large, theirs = (new / timings[k].median for k in ("4 KB", "2 MB", "transformers"))
    rates = {**bandwidth, "huge weights": size / timings["huge weights"].median}
    weights = [p for p in huge.parameters() if p.numel() * p.element_size() >= HUGE_PAGE]
    aligned = sum(p.numel() * p.element_size() for p in weights if p.data_ptr() % HUGE_PAGE == 0)
    return (f"Weights on 2 MB pages (`GPT2.from_pretrained(..., huge_pages=True)`; transparent huge pages: "
            f"{huge_page_mode() or 'none'}; batch 1, same run, median of {even(repeats)}): {large:.1f} tok/s "
            f"against {small:.1f} on 4 KB pages ({large / small:.2f}×, paired per round "
            f"{paired(timings['2 MB'], timings['4 KB']):.2f}×) and transformers {theirs:.1f} ({large / theirs:.2f}×, "
            f"paired {paired(timings['2 MB'], timings['transformers']):.2f}×); tokens identical; "
            f"{aligned / 1e6:,.0f} MB of weights start on a 2 MB boundary; the first such load took "
            f"{first_load:.2f} s. " + ceiling_line(huge, rates, large, "fp32 batch 1 on 2 MB pages")
            + " (goal ≥ 85%).")


def kernel_note(ours: GPT2, folder: Path, repeats: int, bf16: bool = True) -> tuple[str, dict[str, float]]:
    """Read bandwidth of each few-row kernel over the model's own linear weights (48 block matrices + the LM
    head, one row, as one decoding step reads them), fp32 and (with ``bf16``) bf16, interleaved: the note and the
    GB/s of each ``"dtype kernel"``."""
    models = {"fp32": ours}
    if bf16:
        models["bf16"] = GPT2.from_pretrained(folder, dtype=torch.bfloat16).eval()
    contenders, sizes = {}, {}
    for label, model in models.items():
        weights, xs, sizes[label] = linear_weights(model)
        kernels = {"F.linear": torch.nn.functional.linear, "by_halves": linear_by_halves}
        if packed_linear_available(weights[0].dtype):
            kernels["packed"] = packed_linear
        if label == "fp32" and mkl_packed_available():
            kernels["mkl_packed"] = mkl_packed_linear
        if label == "bf16" and fp16_packed_available():
            kernels["fp16_packed"] = fp16_packed_linear
        for name, fn in kernels.items():
            contenders[f"{label} {name}"] = (lambda fn=fn, weights=weights, xs=xs:
                                             [fn(xs[w.size(1)], w) for w in weights])
    with torch.inference_mode():
        timings = interleaved(contenders, repeats=max(repeats, 5))
    rates = {name: sizes[name.split()[0]] / timings[name].median for name in contenders}
    for model in models.values():  # the packs of kernels the choice did not keep; the kept ones are made again
        release_packed(model)
    return ("Few-row kernels alone (1 row, every linear weight of the model once per pass, as a decoding step "
            "reads them; GB/s of weights read, median of interleaved passes): "
            + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in rates.items()) + "."), rates


def bench_load(folder: Path, repeats: int, forward: bool = False, huge_pages: bool = False) -> dict:
    """Seconds to load the checkpoint; with ``forward``, to load it and run one 16-token forward (transformers
    maps the file and reads a weight's pages on its first use; gpt2lora copies the Conv1D matrices at load);
    ``huge_pages``: gpt2lora's load puts the weights on 2 MB pages."""
    import transformers

    ids = torch.zeros(1, 16, dtype=torch.long)

    def then_forward(model) -> None:
        if forward:
            with torch.inference_mode():
                model.eval()(ids)

    return interleaved({
        "gpt2lora": lambda: then_forward(GPT2.from_pretrained(folder, huge_pages=huge_pages)),
        "transformers": lambda: then_forward(transformers.GPT2LMHeadModel.from_pretrained(folder)),
    }, repeats=repeats)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the measured-kernel vs plain F.linear comparison")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip the bf16-weights row (run where torch reports bf16 matrix units)")
    parser.add_argument("--long-prompt", type=int, default=512,
                        help="tokens of the prompt whose first token is timed in bf16 and fp32 (0: skip)")
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                        help="skip the rows with the weights loaded on 2 MB pages")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        make_checkpoint(folder, args.shape)
        ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        ref.generation_config.eos_token_id = None  # both sides produce exactly --new tokens
        ours = GPT2.from_pretrained(folder).eval()
        rows = []
        load_before = os.getloadavg()[0]
        notes = []
        if args.ablation and 1 in args.batches:
            notes.append(ablation_note(ours, args.prompt, args.new, args.repeats))
            print(notes[-1], flush=True)
        reads = {"sum": sum_read(), "weights": weight_read(ours)}
        bandwidth: dict[str, float] = {}
        for batch in args.batches:
            result = bench_generation(ours, ref, batch, args.prompt, args.new, args.repeats,
                                      reads if batch == 1 else None)
            bandwidth = result.get("bandwidth", bandwidth)
            (t_ours, tps_ours), (t_ref, tps_ref) = result["gpt2lora"], result["transformers"]
            rows.append(f"| greedy, batch {batch} | {tps_ours:.1f} tok/s ({t_ours.median:.2f} s) "
                        f"| {tps_ref:.1f} tok/s ({t_ref.median:.2f} s) | {tps_ours / tps_ref:.2f}× |")
            print(rows[-1], flush=True)
            if batch == 1:
                batch_one, batch_one_rounds = (tps_ours, tps_ref), result["rounds"]
        del reads
        if 1 in args.batches:
            note, rates = kernel_note(ours, folder, args.repeats, args.bf16)
            bandwidth["kernels"] = max(rate for name, rate in rates.items() if name.startswith("fp32 "))
            tps_ours, tps_ref = batch_one
            notes += [ceiling_line(ours, bandwidth, tps_ours, "Memory bound, fp32 batch 1", batch_one_rounds)
                      + f" (goal ≥ 85%; transformers {tps_ref:.1f} tok/s).", note]
            print(*notes[-2:], sep="\n", flush=True)
        if args.bf16 and 1 in args.batches:
            notes.append(bf16_note(ours, folder, args.prompt, args.new, args.repeats, bandwidth))
            print(notes[-1], flush=True)
        if 1 in args.batches:
            notes.append(first_generate_note(folder, args.prompt, args.new, args.repeats, args.bf16))
            print(notes[-1], flush=True)
        if args.bf16 and 1 in args.batches and args.long_prompt:
            notes.append(prompt_note(ours, folder, args.long_prompt, args.repeats))
            print(notes[-1], flush=True)
        if args.huge_pages and 1 in args.batches:
            notes.append(huge_pages_note(ours, ref, folder, args.prompt, args.new, args.repeats, bandwidth))
            print(notes[-1], flush=True)
        loads = [("load checkpoint", False, False), ("load checkpoint + a 16-token forward", True, False)]
        if args.huge_pages:
            loads.append(("load checkpoint, `huge_pages=True`", False, True))
        for label, forward, huge_pages in loads:
            load = bench_load(folder, args.repeats, forward, huge_pages)
            ratio = load["transformers"].median / load["gpt2lora"].median
            rows.append(f"| {label} | {load['gpt2lora'].median:.3f} s | {load['transformers'].median:.3f} s "
                        f"| {ratio:.2f}× |")
            print(rows[-1], flush=True)
        load_after = os.getloadavg()[0]

    command = "python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine_line()}  ",
        (f"Shape: {args.shape} (random weights saved by transformers {transformers.__version__}); prompt "
         f"{args.prompt} tokens (batches > 1: left-padded, lengths differ), {args.new} new tokens, greedy; "
         f"median of {args.repeats} interleaved runs after one warm-up. Outputs checked token-identical. "
         f"1-minute load average {load_before:.2f} before, {load_after:.2f} after (the CPU is shared)."),
        "",
        "| measurement | gpt2lora | transformers | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
        *[f"{note}  " for note in notes],
        "",
        NOTES,
    ])
    if not args.no_write:
        write_section("Generation", body)
    print(body)
    return body


if __name__ == "__main__":
    main()
