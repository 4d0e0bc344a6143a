"""Greedy generation speed and checkpoint load time: gpt2lora against transformers, in the same run.

    python benchmarks/bench_generate.py                 # GPT-2 124M shape, writes RESULTS.md "Generation"
    python benchmarks/bench_generate.py --shape tiny --no-write   # seconds-long smoke run

Weights are random (saved by transformers to a temporary folder): speed does not depend on their
values. Every timed pair is also checked token for token, so a speed-up can never hide a change
of output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved, machine_line, write_section

from gpt2lora import GPT2, generate

NOTES = """\
Where the time goes (torch.profiler, batch 1, 124M shape, 128 new tokens): before the change below,
over 90 % of each step was the matrix-vector products of the block linears and the LM head, i.e.
reading 500 MB of weights per token; attention, LayerNorm, GELU, cache writes and Python together take
about 1.4 ms a token (transformers: 2.8 ms, measured on a 12-layer model with tiny matrices).
`F.linear` on one row runs BLAS's single-threaded matrix-vector kernel: about 21 ms a token for the
block weights (stored (in, out), as the checkpoint's Conv1D) and 14 ms for the (vocab, n_embd) LM head.
generate now runs every CPU product of at most 32 rows as one `bmm` over two halves of the weight
(`gpt2lora/rowlinear.py`: the model's `Linear` layers and LoRA's base products take that path inside
`few_row_products()`, which generate enters; weights are viewed, not copied): 14-15 ms and 4.5-5 ms,
measured on 48 distinct weights so the 32 MB L3 cache cannot flatter it. A plain streaming read of the
same weights takes 8-12 ms, so the products still run above the bandwidth bound. Already in place: one
preallocated KV cache, LM head applied to the last prompt position only, no mask tensor at batch 1.
With the CPU shared by other processes, 2 intra-op threads can be slower than 1 (`--threads 1`).\
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


def bench_generation(ours: GPT2, ref, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    ids, mask = prompts(batch, prompt_len, ours.config.vocab_size)
    outputs: dict[str, torch.Tensor] = {}

    def run_ours():
        outputs["ours"] = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)

    def run_ref():
        with torch.inference_mode():
            outputs["ref"] = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                          pad_token_id=0)

    timings = interleaved({"gpt2lora": run_ours, "transformers": run_ref}, repeats=repeats)
    if outputs["ours"].shape != (batch, prompt_len + new) or not torch.equal(outputs["ours"], outputs["ref"]):
        raise SystemExit(f"batch {batch}: gpt2lora and transformers generated different tokens")
    tokens = batch * new
    return {name: (t, tokens / t.median) for name, t in timings.items()}


def ablation_note(ours: GPT2, prompt_len: int, new: int, repeats: int) -> str:
    """Batch 1 with and without the few-row linear path (``rowlinear.few_row_products``) that generate uses."""
    module = sys.modules["gpt2lora.model.generate"]  # the package's `generate` attribute is the function
    few_row = module.few_row_products
    ids, _ = prompts(1, prompt_len, ours.config.vocab_size)
    outputs = {}

    def run(name: str, mode) -> None:
        module.few_row_products = mode
        try:
            outputs[name] = generate(ours, ids, max_new_tokens=new, eos_token_id=None)
        finally:
            module.few_row_products = few_row

    timings = interleaved({"with": lambda: run("with", few_row),
                           "without": lambda: run("without", contextlib.nullcontext)},
                          repeats=repeats)
    if not torch.equal(outputs["with"], outputs["without"]):
        raise SystemExit("the few-row linear path changed the generated tokens")
    with_, without = (new / timings[k].median for k in ("with", "without"))
    return (f"Ablation (batch 1, same run): gpt2lora {with_:.1f} tok/s with the few-row linear path, "
            f"{without:.1f} tok/s with plain F.linear ({with_ / without:.2f}×); tokens identical.")


def bench_load(folder: Path, repeats: int) -> dict:
    import transformers

    return interleaved({
        "gpt2lora": lambda: GPT2.from_pretrained(folder),
        "transformers": lambda: transformers.GPT2LMHeadModel.from_pretrained(folder),
    }, repeats=repeats)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the with/without transposed LM head comparison")
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
        for batch in args.batches:
            result = bench_generation(ours, ref, batch, args.prompt, args.new, args.repeats)
            (t_ours, tps_ours), (t_ref, tps_ref) = result["gpt2lora"], result["transformers"]
            rows.append(f"| greedy, batch {batch} | {tps_ours:.1f} tok/s ({t_ours.median:.2f} s) "
                        f"| {tps_ref:.1f} tok/s ({t_ref.median:.2f} s) | {tps_ours / tps_ref:.2f}× |")
            print(rows[-1], flush=True)
        load = bench_load(folder, args.repeats)
        load_after = os.getloadavg()[0]
        ratio = load["transformers"].median / load["gpt2lora"].median
        rows.append(f"| load checkpoint | {load['gpt2lora'].median:.3f} s | {load['transformers'].median:.3f} s "
                    f"| {ratio:.2f}× |")
        print(rows[-1], flush=True)

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
        *notes,
        "",
        NOTES,
    ])
    if not args.no_write:
        write_section("Generation", body)
    print(body)
    return body


if __name__ == "__main__":
    main()
