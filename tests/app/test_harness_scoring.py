"""How the lm-eval model scores: batches of bounded padding, the LM head in blocks reduced to the targets'
log-probabilities, and the greedy check, each against the plain full-logits computation of every request
alone; mixed-adapter batches with an adapter on the LM head; lm-eval's own command line finding the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_jsonl

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install gpt2lora[eval])")

from gpt2lora import GPT2, LoRAConfig, apply_lora, load_tokenizer, save_adapter
from gpt2lora.app.harness import HEAD_CHUNK_ROWS, MIN_BATCH_TOKENS, GPT2LoRALM
from gpt2lora.config import BLOCK_TARGETS, HEAD_TARGET
from gpt2lora.errors import ConfigError
from tests.app.test_harness import _base

pytestmark = pytest.mark.usefixtures("one_thread")


def _head_adapter(base: Path, out: Path, seed: int) -> None:
    """A rank-4 LoRA on the blocks and the LM head, B non-zero."""
    model = GPT2.from_pretrained(base).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=(*BLOCK_TARGETS, HEAD_TARGET)), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(seed + 1))
    save_adapter(model, out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness-scoring")
    base = _base(root / "base")
    _head_adapter(base, root / "a", seed=3)
    _head_adapter(base, root / "b", seed=7)
    return {"root": root, "base": base, "a": root / "a", "b": root / "b"}


@torch.inference_mode()
def _full_logits_answer(model: GPT2, ctx: list[int], cont: list[int], limit: int) -> tuple[float, bool]:
    """The continuation's log-likelihood and greedy flag the plain way: this request alone, every position's
    logits, a full log-softmax (what lm-eval's hf backend computes)."""
    inp = (ctx + cont)[-(limit + 1):][:-1]
    logprobs = torch.log_softmax(model(torch.tensor([inp])).float(), dim=-1)[0, -len(cont):]
    target = torch.tensor(cont)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _requests(folders: dict[str, Path], lm: GPT2LoRALM, shared_data: Path) -> list[tuple[list[int], list[int], None]]:
    """Real text cut at many lengths: short and long continuations, inputs shared by several requests,
    inputs cut from the left, and continuations that are the model's own greedy tokens."""
    tok = load_tokenizer(folders["base"])
    texts = [r["text"] for r in read_jsonl(shared_data / "imdb" / "test.jsonl", limit=12)]
    requests = []
    for i, text in enumerate(texts):
        ids = tok.encode(text)[:150]
        cut = 5 + (i * 13) % 60
        requests.append((ids[:cut], ids[cut:cut + 1 + (i * 7) % 40], None))
    ctx = tok.encode("The film was")
    requests += [(ctx, [c], None) for c in tok.encode(" good bad fine")]  # one input, three answers
    words = tok.encode(" a great deal")  # one input, continuations of different lengths
    requests += [(ctx + words[:2], words[2:], None), (ctx, words, None), (ctx + words[:1], words[1:], None)]
    requests.append((tok.encode(texts[0]), tok.encode(texts[1])[:30], None))  # cut from the left
    with torch.inference_mode():  # the model's greedy continuation of a prompt: greedy must say True
        prompt = tok.encode("I think that")
        greedy = []
        for _ in range(6):
            greedy.append(int(lm.model(torch.tensor([prompt + greedy]))[0, -1].argmax()))
    requests.append((prompt, greedy, None))
    return requests


@pytest.mark.parametrize("max_padding", [None, 0.0, 0.1])
def test_scores_equal_the_full_logits_of_each_request_alone(folders, shared_data, max_padding) -> None:
    lm = GPT2LoRALM(pretrained=folders["base"], adapter=folders["a"], batch_size=4, max_padding=max_padding)
    requests = _requests(folders, lm, shared_data)
    got = lm.score_tokens(requests)
    scored = sum(len(c) for _, c, _ in requests)
    assert scored > 2 * HEAD_CHUNK_ROWS  # the head runs in several blocks
    want = [_full_logits_answer(lm.model, ctx, cont, lm.max_length) for ctx, cont, _ in requests]
    for (g_value, g_greedy), (w_value, w_greedy) in zip(got, want):
        assert g_value == pytest.approx(w_value, abs=1e-4)
        assert g_greedy == w_greedy
    assert want[-1][1] and not all(w[1] for w in want)  # both greedy answers occur
    # one-token answers only: the model returns each row's last state alone (rows of different lengths)
    first = [(ctx, cont[:1], None) for ctx, cont, _ in requests]
    want = [_full_logits_answer(lm.model, ctx, cont, lm.max_length) for ctx, cont, _ in first]
    for (g_value, g_greedy), (w_value, w_greedy) in zip(lm.score_tokens(first), want):
        assert g_value == pytest.approx(w_value, abs=1e-4) and g_greedy == w_greedy
    # without the greedy check the values stay, and every flag is False
    assert [v for v, _ in lm.score_tokens(requests, greedy=False)] == pytest.approx([v for v, _ in got], abs=1e-6)
    assert not any(g for _, g in lm.score_tokens(requests, greedy=False))


def test_rolling_loglikelihood_of_a_short_text_is_every_next_token(folders) -> None:
    lm = GPT2LoRALM(pretrained=folders["base"], adapter=folders["a"])
    text = "A short review: the plot was thin, the acting was fine, and the music was loud."
    ids = lm.tok_encode(text)
    assert len(ids) < lm.max_length
    want, _ = _full_logits_answer(lm.model, [lm.eot_token_id], ids, lm.max_length)
    assert lm.rolling_mixed([text], [None])[0] == pytest.approx(want, abs=1e-4)


def test_batches_close_before_their_padding_exceeds_the_bound(folders) -> None:
    lengths = [347, 275, 252, 246, 179, 165, 158, 155, 150, 148]
    bounded = GPT2LoRALM(pretrained=folders["base"], batch_size=16, max_padding=0.1)
    assert bounded._length_batches(lengths) == [(0, 1), (1, 4), (4, 8), (8, 10)]
    for start, stop in bounded._length_batches(lengths):
        padded, real = lengths[start] * (stop - start), sum(lengths[start:stop])
        assert padded <= 1.1 * real
    # a batch below MIN_BATCH_TOKENS real tokens takes the next row whatever the padding
    small = [MIN_BATCH_TOKENS // 2, 10, 10]
    assert bounded._length_batches(small) == [(0, 3)]
    unbounded = GPT2LoRALM(pretrained=folders["base"], batch_size=3, max_padding=None)
    assert unbounded._length_batches(lengths) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert GPT2LoRALM(pretrained=folders["base"], max_padding="auto").max_padding == 0.1  # on the CPU
    assert GPT2LoRALM(pretrained=folders["base"], max_padding="none").max_padding is None
    with pytest.raises(ConfigError, match="max_padding='lots'"):
        GPT2LoRALM(pretrained=folders["base"], max_padding="lots")
    with pytest.raises(ConfigError, match="max_padding=-1"):
        GPT2LoRALM(pretrained=folders["base"], max_padding=-1)


def test_mixed_batches_with_an_adapter_on_the_lm_head_equal_each_adapter_alone(folders) -> None:
    both = GPT2LoRALM(pretrained=folders["base"], adapter={"a": folders["a"], "b": folders["b"]}, batch_size=4)
    alone = {"a": GPT2LoRALM(pretrained=folders["base"], adapter=folders["a"]),
             "b": GPT2LoRALM(pretrained=folders["base"], adapter=folders["b"]),
             "__base__": GPT2LoRALM(pretrained=folders["base"])}
    pairs = [("The movie was", " great fun to watch"), ("I think that", " it is"), ("Once upon a", " time"),
             ("The movie was", " great fun to watch"), ("It rained all", " day long, and then some")]
    names = ["a", "b", "__base__", "b", "a"]
    mixed = both.loglikelihood_mixed(pairs, names)
    for pair, name, got in zip(pairs, names, mixed):
        want = alone[name].loglikelihood_mixed([pair], [None])[0]
        assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == want[1]
    assert mixed[0][0] != pytest.approx(mixed[3][0], abs=1e-4)  # the head's adapter matters
    texts = ["A review that goes on. " * 12, "Short text here."]
    rolled = both.rolling_mixed(texts, ["b", "a"])
    assert rolled == pytest.approx([alone["b"].rolling_mixed(texts[:1], [None])[0],
                                    alone["a"].rolling_mixed(texts[1:], [None])[0]], abs=1e-4)


def _task_yaml(folder: Path, shared_data: Path, register: bool) -> Path:
    rows = read_jsonl(shared_data / "imdb" / "test.jsonl", limit=4)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": " ".join(r["text"].split()[:20]),
                                        "word": " " + r["text"].split()[20]}) + "\n" for r in rows))
    name = "c_reg" if register else "c_plain"
    spec = json.dumps({"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                       "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                       "doc_to_target": "{{word}}", "metric_list": [{"metric": "perplexity"}]})
    if register:  # YAML's tag, which JSON cannot write: lm-eval imports gpt2lora.app.harness for it
        spec = spec[:-1] + ', "process_docs": !function gpt2lora.app.harness.process_docs}'
    path = folder / f"{name}.yaml"
    path.write_text(spec + "\n")
    return path


@pytest.mark.slow  # two fresh interpreters importing lm-eval and torch
def test_lm_evals_own_command_finds_the_model_through_a_task_yaml_path(folders, shared_data, tmp_path) -> None:
    registering = _task_yaml(tmp_path, shared_data, register=True)
    plain = _task_yaml(tmp_path, shared_data, register=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = ["--model", "gpt2lora", "--model_args", f"pretrained={folders['base']},adapter={folders['a']}",
            "--device", "cpu", "--limit", "2"]
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", *args, "--tasks", str(registering)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "c_reg" in done.stdout and "perplexity" in done.stdout
    # a task given by name (here through --include_path) is read without its functions before the model is
    # looked up: lm-eval's command alone does not know gpt2lora then (use python -m gpt2lora.app.harness run)
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", *args, "--tasks", "c_plain",
                           "--include_path", str(plain.parent)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode != 0 and "no model for this name" in done.stderr
