"""The lm-evaluation-harness model ``gpt2lora`` against lm-eval's own transformers backend (``hf``) on the merged
export of the same adapter: tasks are YAML files over local JSONL written here (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import gpt2_stand_in, read_jsonl

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install gpt2lora[eval])")

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from gpt2lora import GPT2, LoRAConfig, apply_lora, load_tokenizer, merge_lora, save_adapter, save_pretrained
from gpt2lora.app.harness import GPT2LoRALM
from gpt2lora.config import BLOCK_TARGETS
from gpt2lora.errors import ConfigError

N_POSITIONS = 96


def _base(folder: Path, seed: int = 0) -> Path:
    """A tiny random GPT-2 with the real vocabulary whose config names ``<|endoftext|>`` (50256) as eos,
    as the released checkpoints do (transformers' generate stops there, like lm-eval's stop string)."""
    gpt2_stand_in(folder, seed=seed, n_positions=N_POSITIONS)
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=50256, eos_token_id=50256)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _adapter(base: Path, out: Path, seed: int) -> GPT2:
    """A rank-4 LoRA with non-zero B saved to ``out``; returns the model with it applied."""
    model = GPT2.from_pretrained(base).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(seed + 1))
    save_adapter(model, out)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data: Path, gpt2_vocab: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness")
    base = _base(root / "base")
    model = _adapter(base, root / "adapter", seed=3)
    merge_lora(model)
    save_pretrained(model, root / "merged")
    _adapter(base, root / "adapter2", seed=5)
    _write_tasks(root / "tasks", shared_data)
    return {"root": root, "base": base, "adapter": root / "adapter", "adapter2": root / "adapter2",
            "merged": root / "merged", "tasks": root / "tasks"}


def _write_tasks(folder: Path, shared_data: Path) -> None:
    """Four tasks, one per request type, over real text: multiple choice (one-token and longer answers),
    last-word prediction, rolling perplexity over reviews longer than the context, and generation."""
    folder.mkdir()
    reviews = read_jsonl(shared_data / "imdb" / "test.jsonl", limit=40)
    nli = read_jsonl(shared_data / "snli" / "validation.jsonl", limit=12)
    labels = ["yes", "maybe", "no"]
    mc = [{"query": f"{r['premise']}\nQuestion: {r['hypothesis']} True, false or neither?\nAnswer:",
           "choices": [" true", " neither", " false, it is not", " true"][:3 + (i % 2)], "gold": r["label"]}
          for i, r in enumerate(nli)]
    words = [r["text"].split() for r in reviews[:10]]
    last = [{"context": " ".join(w[:25]), "word": " " + w[25]} for w in words]
    long = [{"text": r["text"]} for r in reviews if len(r["text"]) > 900][:4]
    gen = [{"prompt": f"Review: {r['text'][:160]}\nIs it {labels[0]} or {labels[2]}?", "answer": " yes"}
           for r in reviews[10:22]]
    tasks = {
        "t_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "choices",
                      "doc_to_target": "gold",
                      "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}),
        "t_last": (last, {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                          "doc_to_target": "{{word}}",
                          "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]}),
        "t_roll": (long, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                          "doc_to_target": "{{text}}",
                          "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                          {"metric": "bits_per_byte"}]}),
        "t_gen": (gen, {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
                        "doc_to_target": "{{answer}}",
                        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
                        "metric_list": [{"metric": "exact_match"}]}),
    }
    for name, (rows, spec) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(spec), encoding="utf-8")


TASKS = ["t_mc", "t_last", "t_roll", "t_gen"]


def _evaluate(model, tasks_dir: Path, model_args: dict | None = None) -> dict:
    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, num_fewshot=0, batch_size=4,
                           log_samples=True, task_manager=TaskManager(include_path=str(tasks_dir)),
                           device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def _responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """lm-eval's transformers backend on the merged export."""
    return _evaluate("hf", setup["tasks"], {"pretrained": str(setup["merged"]), "dtype": "float32"})


@pytest.mark.slow  # two lm-eval runs over four tasks: ~45 s on 2 cores, minutes when the cores are shared
def test_every_response_and_score_matches_the_hf_backend(setup, reference, one_thread) -> None:
    import gpt2lora.app.harness  # noqa: F401  (registers the model type)

    ours = _evaluate("gpt2lora", setup["tasks"], {"pretrained": str(setup["base"]),
                                                  "adapter": str(setup["adapter"])})
    for task in TASKS:
        want, got = _responses(reference, task), _responses(ours, task)
        assert len(want) == len(got) > 0
        for w, g in zip(want, got):
            assert len(w) == len(g)
            for w_resp, g_resp in zip(w, g):
                w_resp, g_resp = w_resp[0], g_resp[0]  # each request's one response
                if task == "t_gen":
                    assert g_resp == w_resp  # identical text under greedy decoding
                elif task == "t_roll":
                    # a sum over ~1000 tokens: fp32 summation order differs by ~1e-7 of it
                    assert g_resp == pytest.approx(w_resp, rel=1e-7, abs=1e-4)
                else:
                    assert g_resp[0] == pytest.approx(w_resp[0], abs=1e-4)
                    assert g_resp[1] == w_resp[1]
        for metric, value in reference["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    texts = [r[0][0] for r in _responses(ours, "t_gen")]
    assert any(t.strip() for t in texts)  # the generation task produced text, not only empty stops
    rolled = [row["doc"]["text"] for row in ours["samples"]["t_roll"]]
    tok = load_tokenizer(setup["base"])
    assert all(len(tok.encode(t)) > N_POSITIONS for t in rolled)  # every text spans several windows


def test_mixed_adapter_batches_equal_one_adapter_at_a_time(setup, one_thread) -> None:
    both = GPT2LoRALM(pretrained=setup["base"], adapter={"adapter": setup["adapter"], "adapter2": setup["adapter2"]},
                      batch_size=3)
    one = GPT2LoRALM(pretrained=setup["base"], adapter=setup["adapter"], batch_size=3)
    two = GPT2LoRALM(pretrained=setup["base"], adapter=setup["adapter2"], batch_size=3)
    base = GPT2LoRALM(pretrained=setup["base"], batch_size=3)
    pairs = [("The movie was", " great"), ("The movie was", " bad"), ("I think that", " it is fine"),
             ("Once upon a", " time")] * 2
    names = ["adapter", "adapter2", "__base__", "adapter"] + ["adapter2", "adapter", "adapter", "__base__"]
    mixed = both.loglikelihood_mixed(pairs, names)
    alone = {"adapter": one, "adapter2": two, "__base__": base}
    for pair, name, got in zip(pairs, names, mixed):
        want = alone[name].loglikelihood_mixed([pair], [None])[0]
        assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == want[1]
    assert mixed[0][0] != pytest.approx(mixed[4][0], abs=1e-6)  # same pair, other adapter
    prompts = ["The movie was", "I think that the", "Once upon a time there"]
    kwargs = [{"until": ["."], "max_gen_toks": 8, "do_sample": False}] * 3
    gen = both.generate_mixed(prompts * 2, kwargs * 2, ["adapter"] * 3 + ["adapter2"] * 3)
    assert gen[:3] == one.generate_mixed(prompts, kwargs, [None] * 3)
    assert gen[3:] == two.generate_mixed(prompts, kwargs, [None] * 3)
    assert gen[:3] != gen[3:]


def test_shared_inputs_run_once_and_give_each_request_its_own_answer(setup) -> None:
    lm = GPT2LoRALM(pretrained=setup["base"], adapter=setup["adapter"], batch_size=2)
    tok = load_tokenizer(setup["base"])
    ctx = tok.encode("A long day at the")
    requests = [(ctx, tok.encode(" office")[:1], None), (ctx, [262], None), (ctx, [11], None)]
    shared = lm.score_tokens(requests)
    separate = [lm.score_tokens([r])[0] for r in requests]
    assert [s[0] for s in shared] == pytest.approx([s[0] for s in separate], abs=1e-5)
    assert len({round(s[0], 4) for s in shared}) == 3


def test_bad_arguments_are_named(setup) -> None:
    with pytest.raises(ConfigError, match="exactly one of pretrained"):
        GPT2LoRALM()
    with pytest.raises(ConfigError, match="batch_size"):
        GPT2LoRALM(pretrained=setup["base"], batch_size="many")
    with pytest.raises(ConfigError, match="max_length"):
        GPT2LoRALM(pretrained=setup["base"], max_length=10_000)
    lm = GPT2LoRALM(pretrained=setup["base"])
    with pytest.raises(ConfigError, match="adapter_names: 1 names for 2"):
        lm.loglikelihood_mixed([("a", " b"), ("c", " d")], ["x"])
    with pytest.raises(ConfigError, match="only greedy"):
        lm.generate_mixed(["a"], [{"do_sample": True, "temperature": 1.0}], [None])


def test_adapter_argument_forms() -> None:
    from gpt2lora.app.harness import _adapters_arg

    assert _adapters_arg(None) == {} and _adapters_arg("") == {}
    assert _adapters_arg("runs/x/adapter") == {"default": Path("runs/x/adapter")}
    assert _adapters_arg("runs/r1/adapter+runs/r-2/adapter") == {"r1": Path("runs/r1/adapter"),
                                                                 "r-2": Path("runs/r-2/adapter")}
    assert _adapters_arg({"a": "p"}) == {"a": Path("p")}
    with pytest.raises(ConfigError, match="both named 'x'"):
        _adapters_arg("a/x+b/x")
