"""DoRA training-step cost and mixed-adapter batches: gpt2lora against transformers + peft, in one process.

    python benchmarks/bench_adapters.py                                   # 124M, writes RESULTS.md
    python benchmarks/bench_adapters.py --shape tiny --repeats 1 --no-write   # smoke

1. Training step (forward, backward, AdamW) of a classifier, B=8, T=128, r=8 on the four block layers:
   LoRA and DoRA in gpt2lora and in peft. Each pair's losses on the timed batch are checked equal first.
2. A batch of 8 rows over 4 adapters (2 rows each, r=8 on the four block layers; plain LoRA, since peft 0.21
   refuses ``adapter_names`` with DoRA): forward of a classifier and greedy generation of a language model,
   gpt2lora's ``adapter_names`` against peft's, with the outputs checked equal first. gpt2lora with all rows
   on one adapter is the floor a mixed batch is measured against.
All contenders of a table are timed interleaved (A, B, C, A, ...) after a warm-up, so a busy phase of the
shared machine falls on each of them; the ratios are the figures to read, the seconds indicative.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved, machine_line, write_section
from pairs import TARGETS, hf_config, pad_id, random_batch

import gpt2lora as gl

ADAPTERS = ("a", "b", "c", "d")
ROWS = ["a", "b", "c", "d", "a", "b", "c", "d"]


def _checkpoint(shape: str, kind: str, folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = hf_config(shape, dropout=0.0)
    cls = transformers.GPT2ForSequenceClassification if kind == "clf" else transformers.GPT2LMHeadModel
    cls(config).save_pretrained(folder)
    return folder


def _peft(folder: Path, kind: str, configs: dict[str, gl.LoRAConfig]):
    import peft
    import transformers

    cls = transformers.GPT2ForSequenceClassification if kind == "clf" else transformers.GPT2LMHeadModel
    twin = None
    for name, c in configs.items():
        cfg = peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=list(c.targets),
                              fan_in_fan_out=True, use_dora=c.use_dora,
                              task_type="SEQ_CLS" if kind == "clf" else "CAUSAL_LM")
        if twin is None:
            twin = peft.get_peft_model(cls.from_pretrained(folder), cfg, adapter_name=name)
        else:
            twin.add_adapter(name, cfg)
    return twin


def _copy_into_peft(ours: torch.nn.Module, twin: torch.nn.Module) -> None:
    params = dict(twin.named_parameters())
    names = {"lora_A": "lora_A.{}.weight", "lora_B": "lora_B.{}.weight",
             "lora_magnitude_vector": "lora_magnitude_vector.{}.weight"}
    with torch.no_grad():
        for layer, module in gl.peft.lora.lora_modules(ours):
            for name, slot in module.slots.items():
                peft_name = "default" if name == "default" and "default" in twin.peft_config else name
                for pname, tensor in slot.tensors().items():
                    params[f"base_model.model.{layer}.{names[pname].format(peft_name)}"].copy_(tensor)
        for name in getattr(ours, "lora_configs", {}):
            head = gl.peft.lora.adapter_head(ours, name)
            key = f"base_model.model.score.modules_to_save.{name}.weight"
            if head is not None and key in params:
                params[key].copy_(head.weight)


# --- 1. DoRA step ------------------------------------------------------------------------------------------

def bench_dora(shape: str, batch: int, length: int, repeats: int, rank: int = 8) -> dict[str, object]:
    """Seconds per training step of LoRA and DoRA, gpt2lora and peft; the losses each pair computed."""
    sides, losses = {}, {}
    data = random_batch(shape, batch, length)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _checkpoint(shape, "clf", Path(tmp) / "ckpt")
        for dora in (False, True):
            label = "DoRA" if dora else "LoRA"
            config = gl.LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.0, targets=TARGETS, use_dora=dora)
            ours = gl.apply_lora(gl.GPT2ForSequenceClassification.from_pretrained(folder, pad_token_id=pad_id(shape)),
                                 config, seed=0).train()
            twin = _peft(folder, "clf", {"default": config}).train()
            _copy_into_peft(ours, twin)
            for name, model, call in ((f"gpt2lora {label}", ours, lambda m, b: m(b["input_ids"], b["attention_mask"])),
                                      (f"peft {label}", twin, lambda m, b: m(input_ids=b["input_ids"],
                                                                             attention_mask=b["attention_mask"]).logits)):
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
                with torch.no_grad():
                    model.eval()
                    losses[name] = float(F.cross_entropy(call(model, data), data["labels"]))
                    model.train()

                def step(model=model, call=call, opt=opt) -> None:
                    loss = F.cross_entropy(call(model, data), data["labels"])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sides[name] = step
    for label in ("LoRA", "DoRA"):
        gap = abs(losses[f"gpt2lora {label}"] - losses[f"peft {label}"])
        if gap > 1e-4:
            raise SystemExit(f"{label}: gpt2lora and peft compute different losses ({gap:.2e}); stopping")
    timings = interleaved(sides, repeats=repeats, warmup=1)
    return {"timings": timings, "losses": losses}


# --- 2. mixed batches --------------------------------------------------------------------------------------

def _multi(folder: Path, shape: str, kind: str, rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    configs = {name: gl.LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.0, targets=TARGETS) for name in ADAPTERS}
    cls = gl.GPT2ForSequenceClassification if kind == "clf" else gl.GPT2
    ours = cls.from_pretrained(folder) if kind == "lm" else cls.from_pretrained(folder, pad_token_id=pad_id(shape))
    g = torch.Generator().manual_seed(1)
    for seed, (name, config) in enumerate(configs.items()):
        gl.add_adapter(ours, name, config, seed=seed)
        with torch.no_grad():
            for _, module in gl.peft.lora.lora_modules(ours):
                module.slots[name].pair()[1].normal_(0, 0.02, generator=g)
    ours.eval()
    twin = _peft(folder, kind, configs).eval()
    _copy_into_peft(ours, twin)
    return ours, twin


def bench_mixed(shape: str, length: int, new_tokens: int, repeats: int, rank: int = 8) -> dict[str, object]:
    """Forward of 8 rows over 4 adapters (classifier) and greedy generation of them (LM)."""
    out: dict[str, object] = {}
    data = random_batch(shape, len(ROWS), length)
    ids, mask = data["input_ids"], data["attention_mask"]
    with tempfile.TemporaryDirectory() as tmp:
        clf_folder = _checkpoint(shape, "clf", Path(tmp) / "clf")
        ours, twin = _multi(clf_folder, shape, "clf", rank)
        with torch.no_grad():
            mine = ours(ids, mask, adapter_names=ROWS)
            theirs = twin(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
        out["forward_gap"] = float((mine - theirs).abs().max())
        if out["forward_gap"] > 1e-4:
            raise SystemExit(f"mixed forward: gpt2lora and peft differ by {out['forward_gap']:.2e}; stopping")

        def one_adapter() -> None:
            with torch.no_grad():
                ours(ids, mask)

        def ours_mixed() -> None:
            with torch.no_grad():
                ours(ids, mask, adapter_names=ROWS)

        def peft_mixed() -> None:
            with torch.no_grad():
                twin(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
        out["forward"] = interleaved({"gpt2lora, one adapter": one_adapter, "gpt2lora adapter_names": ours_mixed,
                                      "peft adapter_names": peft_mixed}, repeats=repeats, warmup=1)
        del ours, twin
        lm_folder = _checkpoint(shape, "lm", Path(tmp) / "lm")
        ours, twin = _multi(lm_folder, shape, "lm", rank)
        prompt = ids[:, : max(4, length // 4)]
        with torch.no_grad():
            mine = ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, adapter_names=ROWS)
            theirs = twin.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=new_tokens, do_sample=False, adapter_names=ROWS,
                                   pad_token_id=pad_id(shape))
        out["generate_same"] = bool(torch.equal(mine, theirs))

        def gen_one() -> None:
            ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)

        def gen_ours() -> None:
            ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, adapter_names=ROWS)

        def gen_peft() -> None:
            with torch.no_grad():
                twin.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, adapter_names=ROWS, pad_token_id=pad_id(shape))
        out["generate"] = interleaved({"gpt2lora, one adapter": gen_one, "gpt2lora adapter_names": gen_ours,
                                       "peft adapter_names": gen_peft}, repeats=repeats, warmup=1)
        out["prompt"] = int(prompt.size(1))
    return out


def _table(timings: dict, base: str, unit: str = "s") -> list[str]:
    rows = [f"| | median ({unit}) | range | vs {base} |", "|---|---:|---:|---:|"]
    for name, t in timings.items():
        rows.append(f"| {name} | {t.median:.3f} | {t.spread()} | {t.median / timings[base].median:.2f}× |")
    return rows


def report(shape: str, batch: int, length: int, new_tokens: int, repeats: int, dora: dict, mixed: dict,
           load: tuple[float, float]) -> str:
    t = dora["timings"]
    lines = [f"Command: `python benchmarks/bench_adapters.py --shape {shape} --repeats {repeats}`  ",
             f"Machine: {machine_line()}  ",
             (f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after (the machine is shared with other "
              "agents: read the ratios, which were measured interleaved in the same run; the seconds are indicative)."),
             "",
             (f"### DoRA training step ({shape}, classifier, batch {batch} × {length} tokens, r=8 on the four block "
              "layers, AdamW)"), ""]
    lines += _table(t, "gpt2lora LoRA")
    ours_ratio = t["gpt2lora DoRA"].median / t["gpt2lora LoRA"].median
    peft_ratio = t["peft DoRA"].median / t["peft LoRA"].median
    lines += ["", (f"DoRA costs {100 * (ours_ratio - 1):.0f} % over LoRA in gpt2lora and "
                   f"{100 * (peft_ratio - 1):.0f} % in peft (peft's documentation says about 13 %); gpt2lora's DoRA "
                   f"step takes {t['gpt2lora DoRA'].median / t['peft DoRA'].median:.2f}× peft's. Losses on the timed "
                   "batch: " + ", ".join(f"{k} {v:.6f}" for k, v in dora["losses"].items()) + ". Both compute the "
                   "weight norm ‖W + s B A‖ per output feature every step (no gradient through it, as the DoRA paper "
                   "says); gpt2lora then applies m/‖·‖ and the bias in one fused op on the base + LoRA product."), "",
              f"### Mixed batch: 8 rows over 4 adapters (2 rows each, r=8, plain LoRA), {shape}", "",
              f"Classifier forward, 8 × {length} tokens:", ""]
    lines += _table(mixed["forward"], "gpt2lora, one adapter")
    f = mixed["forward"]
    lines += ["", f"Generation, greedy, 8 prompts of {mixed['prompt']} tokens + {new_tokens} new tokens (LM):", ""]
    lines += _table(mixed["generate"], "gpt2lora, one adapter")
    g = mixed["generate"]
    lines += ["", (f"gpt2lora's mixed forward takes "
                   f"{f['gpt2lora adapter_names'].median / f['peft adapter_names'].median:.2f}× peft's time and "
                   f"{f['gpt2lora adapter_names'].median / f['gpt2lora, one adapter'].median:.2f}× its own "
                   "single-adapter forward; mixed generation "
                   f"{g['gpt2lora adapter_names'].median / g['peft adapter_names'].median:.2f}× peft's. "
                   f"Largest logit difference from peft: {mixed['forward_gap']:.1e}; generated tokens equal peft's: "
                   f"{mixed['generate_same']}. gpt2lora stacks the present adapters' A and B once per call and "
                   "runs every wrapped layer's LoRA part as two matmuls over all rows, masking each row to its own "
                   "adapter's columns; peft runs one sub-batch per adapter in each layer (index, two matmuls, "
                   "scatter).")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=["gpt2", "gpt2-medium", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    before = os.getloadavg()[0]
    dora = bench_dora(args.shape, args.batch, args.length, args.repeats)
    mixed = bench_mixed(args.shape, args.length, args.new_tokens, args.repeats)
    text = report(args.shape, args.batch, args.length, args.new_tokens, args.repeats, dora, mixed,
                  (before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section("Adapters: DoRA and mixed batches", text)


if __name__ == "__main__":
    main()
