"""lm-evaluation-harness wall time: gpt2lora's model (base + LoRA adapter) vs lm-eval's transformers backend on
the merged export of the same adapter, same tasks, same batch size, in one process (interleaved).

    python benchmarks/bench_harness.py --threads 1 [--shape gpt2] [--docs 40] [--repeats 2] [--no-write]

Random weights of the named shape with the real GPT-2 vocabulary (``$GPT2LORA_SHARED/gpt2-tokenizer``), real
text from ``$GPT2LORA_SHARED/data``: a multiple-choice task over SNLI (3 answers), last-word prediction and
rolling perplexity over IMDB reviews, written as local task YAML files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_model, interleaved, machine_line, write_section

SHARED = Path(os.environ.get("GPT2LORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
def rows(name: str, split: str, limit: int) -> list[dict]:
    with open(SHARED / "data" / name / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def write_tasks(folder: Path, docs: int) -> list[str]:
    nli = rows("snli", "validation", docs)
    reviews = rows("imdb", "test", 2 * docs)
    mc = [{"query": f"{r['premise']}\nQuestion: {r['hypothesis']} True, false or neither?\nAnswer:",
           "choices": [" true", " neither", " false"], "gold": r["label"]} for r in nli]
    words = [r["text"].split() for r in reviews[:docs] if len(r["text"].split()) > 60]
    last = [{"context": " ".join(w[:60]), "word": " " + w[60]} for w in words]
    long = [{"text": r["text"]} for r in reviews[docs:]][: max(4, docs // 4)]
    specs = {
        "b_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "choices",
                      "doc_to_target": "gold", "metric_list": [{"metric": "acc"}]}),
        "b_last": (last, {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                          "doc_to_target": "{{word}}", "metric_list": [{"metric": "perplexity"}]}),
        "b_roll": (long, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                          "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, spec) in specs.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(spec), encoding="utf-8")
    return list(specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", help="GPT-2 preset of the random model")
    parser.add_argument("--docs", type=int, default=40, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora, merge_lora, save_adapter, save_pretrained
    from gpt2lora.app.harness import HEAD_CHUNK_ROWS, GPT2LoRALM

    tmp = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    torch.manual_seed(0)
    model = GPT2.from_config(GPT2Config.from_preset(args.shape), seed=0).eval()
    save_pretrained(model, tmp / "base")
    for name in ("vocab.json", "merges.txt"):
        (tmp / "base" / name).write_bytes((SHARED / "gpt2-tokenizer" / name).read_bytes())
    model = GPT2.from_pretrained(tmp / "base").eval()
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    save_adapter(model, tmp / "adapter")
    merge_lora(model)
    save_pretrained(model, tmp / "merged")
    del model
    tasks = write_tasks(tmp / "tasks", args.docs)
    manager = TaskManager(include_path=str(tmp / "tasks"))

    ours = GPT2LoRALM(pretrained=tmp / "base", adapter=tmp / "adapter", batch_size=args.batch_size)
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(tmp / "merged"), dtype="float32", batch_size=args.batch_size, device="cpu")
    table = []
    for task in tasks:
        seconds: dict[str, list[float]] = {"gpt2lora": [], "hf": []}
        scores: dict[str, dict] = {}
        for i in range(args.repeats):
            order = [("gpt2lora", ours), ("hf", theirs)]
            for label, lm in (order if i % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, batch_size=args.batch_size,
                                      device="cpu", verbosity="ERROR", bootstrap_iters=0)
                seconds[label].append(time.perf_counter() - start)
                scores[label] = {k: v for k, v in out["results"][task].items()
                                 if isinstance(v, float) and "stderr" not in k}
        for key, value in scores["hf"].items():
            assert abs(scores["gpt2lora"][key] - value) <= 1e-4 * max(1.0, abs(value)), (task, key, scores)
        best = {k: min(v) for k, v in seconds.items()}
        table.append((task, best["gpt2lora"], best["hf"], best["hf"] / best["gpt2lora"]))
        print(f"{task}: gpt2lora {best['gpt2lora']:.2f} s, hf {best['hf']:.2f} s, {best['hf'] / best['gpt2lora']:.2f}x",
              flush=True)
    # the model calls alone: the same Instances through each backend, interleaved, median of the repeats
    from lm_eval.api.instance import Instance

    data = {t: [json.loads(line) for line in (tmp / "tasks" / f"{t}.jsonl").read_text().splitlines()]
            for t in tasks}
    requests = {
        "b_mc": ("loglikelihood", [Instance("loglikelihood", d, (d["query"], c), i)
                                   for i, d in enumerate(data["b_mc"]) for c in d["choices"]]),
        "b_last": ("loglikelihood", [Instance("loglikelihood", d, (d["context"], d["word"]), i)
                                     for i, d in enumerate(data["b_last"])]),
        "b_roll": ("loglikelihood_rolling", [Instance("loglikelihood_rolling", d, (d["text"],), i)
                                             for i, d in enumerate(data["b_roll"])]),
    }
    calls = []
    for task, (kind, reqs) in requests.items():
        timing = interleaved({"gpt2lora": lambda k=kind, r=reqs: getattr(ours, k)(r, disable_tqdm=True),
                              "hf": lambda k=kind, r=reqs: getattr(theirs, k)(r, disable_tqdm=True)},
                             repeats=max(2, args.repeats), warmup=1)
        a, b = timing["gpt2lora"].median, timing["hf"].median
        calls.append((f"{task} ({len(reqs)} {kind})", a, b, b / a))
        print(f"{task} calls: gpt2lora {a:.2f} s, hf {b:.2f} s, {b / a:.2f}x", flush=True)
    total_ours, total_hf = sum(r[1] for r in table), sum(r[2] for r in table)
    calls_ours, calls_hf = sum(r[1] for r in calls), sum(r[2] for r in calls)
    load = os.getloadavg()[0]
    body = [
        (f"Command: `python benchmarks/bench_harness.py --threads {args.threads} --shape {args.shape} "
        f"--docs {args.docs} --repeats {args.repeats}`  "),
        f"Machine: {machine_line()}  ",
        (f"lm-eval {lm_eval.__version__}; the CPU was shared with other work (1-minute load average {load:.1f} at "
        "the end; both sides interleaved, so read the ratios, not the seconds)."),
        "",
        (f"Random `{args.shape}` weights, real GPT-2 vocabulary and text; gpt2lora: `GPT2LoRALM(pretrained=base, "
        f"adapter=LoRA r=8)` (defaults: `max_padding` {ours.max_padding} here, the LM head in "
        f"{HEAD_CHUNK_ROWS}-row blocks on the scored positions only); reference: lm-eval's `hf` backend (`HFLM`, "
        "float32) on the merged export, as its users run it. Same "
        f"batch size ({args.batch_size}), whole `simple_evaluate` per task (dataset building included, "
        "`bootstrap_iters=0`: lm-eval's bootstrap of standard errors, the same for both, would otherwise take "
        f"most of the time), best of {args.repeats} interleaved runs; every score agreed within 1e-4 before the "
        "figure was kept."),
        "",
        "| task (requests) | gpt2lora | lm-eval hf | speed-up |",
        "|---|---|---|---|",
        *[f"| {t} | {a:.2f} s | {b:.2f} s | {r:.2f}× |" for t, a, b, r in table],
        f"| all three | {total_ours:.2f} s | {total_hf:.2f} s | {total_hf / total_ours:.2f}× |",
        "",
        ("The model calls alone (`lm.loglikelihood(requests)` / `loglikelihood_rolling`, the same Instances for "
        f"both, interleaved, median of {max(2, args.repeats)} after a warm-up):"),
        "",
        "| requests | gpt2lora | lm-eval hf | speed-up |",
        "|---|---|---|---|",
        *[f"| {t} | {a:.2f} s | {b:.2f} s | {r:.2f}× |" for t, a, b, r in calls],
        f"| all three | {calls_ours:.2f} s | {calls_hf:.2f} s | {calls_hf / calls_ours:.2f}× |",
        "",
        (f"Goal ≥ 1.5× wall time: **{'met' if total_hf / total_ours >= 1.5 else 'not met'}** "
        f"({total_hf / total_ours:.2f}× over the three tasks end to end; {calls_hf / calls_ours:.2f}× for the "
        "model calls alone)."),
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("lm-evaluation-harness", text)
    print(cpu_model())


if __name__ == "__main__":
    main()
