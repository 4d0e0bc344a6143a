"""``gpt2lora serve`` through the real ``openai`` client on 127.0.0.1: a tiny random base model with the real GPT-2
vocabulary, three LoRA adapters and a classification adapter, all created here."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import gpt2lora as gl
from gpt2lora.app.serve import BackgroundServer, build_app
from gpt2lora.app.serve.engine import (
    PREFILL_PADDING,
    Engine,
    GenerationRequest,
    prefill_groups,
    run_on_engine,
)
from gpt2lora.ops.packed import MKL, ONEDNN, PACKED_ATTR, packed_bytes
from gpt2lora.peft.registry import adapter_configs

KEY = "test-key"
ADAPTERS = ("alpha", "beta", "gamma")
CONTEXT = 256
LABELS = ["negative", "neutral", "positive"]


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Give lora_B values (it starts at zero), so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, gpt2_vocab) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base = make_hf_checkpoint(root / "base", with_tokenizer=True, vocab_size=50257, n_positions=CONTEXT)
    out = {"base": base, "root": root / "allowed"}
    for i, name in enumerate(ADAPTERS):
        model = gl.GPT2.from_pretrained(base)
        gl.apply_lora(model, gl.LoRAConfig(rank=2 + i, alpha=8, targets=("attn.c_attn", "mlp.c_fc")[: 1 + i % 2]), seed=i)
        _randomise_lora(model, i)
        folder = root / "allowed" / name if name == "gamma" else root / name
        gl.save_adapter(model, folder)
        out[name] = folder
    # a run folder (as 'gpt2lora train' writes it) of an instruction adapter: alpha is served from it
    run = root / "run-alpha"
    (run / "adapter").mkdir(parents=True)
    for f in out["alpha"].iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "config.json").write_text(json.dumps({"method": "lora", "kind": "instruction", "label_names": []}))
    out["run-alpha"] = run
    clf = gl.GPT2ForSequenceClassification.from_pretrained(base, num_labels=3, seed=0)
    gl.apply_lora(clf, gl.LoRAConfig(rank=4, alpha=8), seed=7)
    _randomise_lora(clf, 7)
    sentiment = root / "run-sentiment"
    gl.save_adapter(clf, sentiment / "adapter")
    (sentiment / "config.json").write_text(json.dumps({"method": "lora", "kind": "classification",
                                                       "label_names": LABELS}))
    out["sentiment"] = sentiment
    outside = root / "outside"
    gl.save_adapter(gl.apply_lora(gl.GPT2.from_pretrained(base), gl.LoRAConfig(rank=2), seed=3), outside)
    os.symlink(outside, root / "allowed" / "escape")
    out["outside"] = outside
    return out


@pytest.fixture(scope="module")
def reference(files):
    """The same base and adapters on a separate model: greedy output of one prompt alone with ``generate``."""
    model = gl.GPT2.from_pretrained(files["base"]).eval()
    for name in ADAPTERS:
        gl.load_adapter(model, files[name], adapter_name=name)
    tok = gl.load_tokenizer(files["base"])
    cache: dict = {}

    def generate(ids: list[int], adapter: str, n: int, **sampling) -> list[int]:
        key = (tuple(ids), adapter, n, tuple(sorted(sampling.items())))
        if key not in cache:
            seed = sampling.pop("seed", None)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, adapter_names=[adapter],
                                 eos_token_id=tok.eot_token, generator=generator, **sampling)[0, len(ids):].tolist()
            cache[key] = out[:out.index(tok.eot_token)] if tok.eot_token in out else out
        return cache[key]

    generate.tok = tok
    return generate


@pytest.fixture(scope="module")
def server(files):
    adapters = {"alpha": str(files["run-alpha"]), "beta": str(files["beta"]), "gamma": str(files["gamma"]),
                "sentiment": str(files["sentiment"])}
    app = build_app(str(files["base"]), adapters, api_key=KEY, adapter_root=str(files["root"]), name="tiny-gpt2",
                    max_batch=6, max_queue=400, max_tokens=200)
    with BackgroundServer(app) as running:
        running.served = app.state.api.served
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def settled(server, timeout: float = 10.0) -> dict:
    """Engine statistics once nothing runs or waits (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.served.engine.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def live_tensors() -> tuple[int, int]:
    """Storages of every live CPU tensor the garbage collector sees, and their bytes; not the weights' packed
    copies (opaque oneDNN tensors, kept on the weights they pack: see ``packed_bytes``)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on every object touches torch's deprecated lazy attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "cpu" and not tensor.is_meta and not tensor.is_mkldnn:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return len(storages), sum(storages.values())


def post(server, path: str, body, key: str | None = KEY, raw: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


# ---------------------------------------------------------------------------------------------- the API


def test_models_lists_the_base_and_every_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-gpt2", *ADAPTERS, "sentiment"}
    assert models["tiny-gpt2"].parent is None
    assert all(models[name].parent == "tiny-gpt2" for name in (*ADAPTERS, "sentiment"))


def test_completion_equals_generate_for_the_base_and_each_adapter(client, reference):
    tok = reference.tok
    prompts = ["The capital of France is", "Once upon a time"]
    for model in ("tiny-gpt2", *ADAPTERS):
        result = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
        adapter = "__base__" if model == "tiny-gpt2" else model
        expected = [reference(tok.encode_ordinary(p), adapter, 12) for p in prompts]
        assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == [tok.decode(e) for e in expected]
        assert result.usage.prompt_tokens == sum(len(tok.encode_ordinary(p)) for p in prompts)
        assert result.usage.completion_tokens == sum(len(e) for e in expected)
        assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    # adapters really differ from each other and from the base
    texts = {m: client.completions.create(model=m, prompt=prompts[0], max_tokens=8, temperature=0).choices[0].text
             for m in ("tiny-gpt2", *ADAPTERS)}
    assert len(set(texts.values())) == 4


def test_token_id_prompts_and_finish_reasons(client, reference):
    ids = reference.tok.encode_ordinary("A list of token ids")
    result = client.completions.create(model="beta", prompt=ids, max_tokens=5, temperature=0)
    assert result.choices[0].text == reference.tok.decode(reference(ids, "beta", 5))
    assert result.choices[0].finish_reason == "length"


def test_concurrent_requests_over_three_adapters_and_base_equal_generate_alone(server, client, reference):
    tok = reference.tok
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(24):
        ids = torch.randint(0, 50257, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        model = ("tiny-gpt2", *ADAPTERS)[i % 4]
        jobs.append((ids, model, int(torch.randint(1, min(48, CONTEXT - len(ids)) + 1, (1,), generator=g))))

    def ask(job):
        ids, model, n = job
        return client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0).choices[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (ids, model, n), answer in zip(jobs, answers, strict=True):
        expected = reference(ids, "__base__" if model == "tiny-gpt2" else model, n)
        assert answer.text == tok.decode(expected), (model, len(ids), n)
        assert answer.finish_reason == ("length" if len(expected) == n else "stop")
    stats = settled(server)
    assert (stats["running"], stats["waiting"], stats["cache_rows"], stats["cache_length"]) == (0, 0, 0, 0)


def test_streaming_gives_the_same_text_in_pieces_and_ends_with_done(server, client, reference):
    ids = reference.tok.encode_ordinary("Streaming works")
    pieces = list(client.completions.create(model="gamma", prompt=ids, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in pieces if c.choices)
    assert text == reference.tok.decode(reference(ids, "gamma", 20))
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] in ("length", "stop")
    assert pieces[-1].usage.completion_tokens == len(reference(ids, "gamma", 20))
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gamma", "prompt": "Raw", "max_tokens": 4, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_alpaca_prompt_and_streams(client, reference):
    tok = reference.tok
    messages = [{"role": "user", "content": "Name a colour."}]
    result = client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    ids = tok.encode_ordinary(gl.alpaca_prompt("Name a colour."))
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == tok.decode(reference(ids, "alpha", 10))
    assert result.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == result.choices[0].message.content
    # earlier turns and a system message become the Input section
    turns = [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Colour?"}]
    ids = tok.encode_ordinary(gl.alpaca_prompt("Colour?", "system: Brief.\nuser: Hi\nassistant: Yo"))
    n = min(4, CONTEXT - len(ids))
    result = client.chat.completions.create(model="alpha", messages=turns, max_tokens=n, temperature=0)
    assert result.choices[0].message.content == tok.decode(reference(ids, "alpha", n))


def test_sampling_is_reproducible_for_a_seed_and_equals_generate(client, reference):
    ids = reference.tok.encode_ordinary("Sampling with a seed")
    args = {"model": "beta", "prompt": ids, "max_tokens": 16, "temperature": 0.9, "top_p": 0.8}
    first = client.completions.create(**args, seed=1234).choices[0].text
    assert client.completions.create(**args, seed=1234).choices[0].text == first
    expected = reference(ids, "beta", 16, temperature=0.9, top_p=0.8, seed=1234)
    assert first == reference.tok.decode(expected)
    others = {client.completions.create(**args, seed=s).choices[0].text for s in range(5)}
    assert len(others) > 1


def test_stop_strings_cut_the_text(client, reference):
    ids = reference.tok.encode_ordinary("Stop here")
    full = client.completions.create(model="alpha", prompt=ids, max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    result = client.completions.create(model="alpha", prompt=ids, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert result.choices[0].text == full[:full.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]


def test_classify_gives_each_input_its_label_and_probabilities(server, files):
    inputs = ["a gripping, funny film", "dull", "it was fine I guess"]
    response = post(server, "/classify", {"model": "sentiment", "input": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    clf = gl.GPT2ForSequenceClassification.from_pretrained(files["base"], num_labels=3, seed=0).eval()
    gl.load_adapter(clf, files["sentiment"] / "adapter")
    tok = gl.load_tokenizer(files["base"])
    for i, text in enumerate(inputs):
        with torch.no_grad():
            probs = clf(torch.tensor([tok.encode_ordinary(text)])).softmax(-1)[0]
        row = body["data"][i]
        assert row["index"] == i and row["num_classes"] == 3
        torch.testing.assert_close(torch.tensor(row["probs"]), probs, atol=1e-5, rtol=1e-5)
        assert row["label"] == LABELS[int(probs.argmax())]
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode_ordinary(t)) for t in inputs)
    assert post(server, "/classify", {"model": "alpha", "input": "x"}).status_code == 400
    response = post(server, "/classify", {"model": "tiny-gpt2", "input": "x"})
    assert response.status_code == 400 and "needs a classification adapter" in response.text
    response = post(server, "/v1/completions", {"model": "sentiment", "prompt": "x"})
    assert response.status_code == 400 and "use POST /classify" in response.text
    assert post(server, "/classify", {"model": "nope", "input": "x"}).status_code == 404


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "alpha"}, "prompt", "missing required parameter 'prompt'"),
    ({"model": "alpha", "prompt": "x", "max_tokens": "ten"}, "max_tokens", "expected an integer"),
    ({"model": "alpha", "prompt": "x", "temperature": -1}, "temperature", "from 0 to 2"),
    ({"model": "alpha", "prompt": "x", "frobnicate": 1}, "frobnicate", "unknown parameter 'frobnicate'"),
    ({"model": "alpha", "prompt": "x", "n": 2}, "n", "n=2 is not supported"),
    ({"model": 3, "prompt": "x"}, "model", "expected a string"),
    ({"model": "alpha", "prompt": [[]]}, "prompt", "expected a string"),
    ({"model": "alpha", "prompt": [50257]}, "prompt", "outside the vocabulary [0, 50256]"),
    ({"model": "alpha", "prompt": "x", "stop": 5}, "stop", "up to 4 strings"),
])
def test_bad_fields_are_400_in_openai_shape_naming_the_field(server, body, param, words):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_bad_chat_messages_are_400(server):
    response = post(server, "/v1/completions", b"{not json", raw=True)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert post(server, "/v1/completions", [1, 2]).status_code == 400
    response = post(server, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot",
                                                                                      "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"
    response = post(server, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user",
                                                                                      "content": "x"},
                                                                                     {"role": "assistant",
                                                                                      "content": "y"}]})
    assert response.status_code == 400 and "last message must come from the user" in response.text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_lengths_past_the_context_or_the_limit_are_400_with_the_numbers(client, reference):
    long_prompt = " word" * (CONTEXT + 6)
    n = len(reference.tok.encode_ordinary(long_prompt))
    with pytest.raises(openai.BadRequestError, match=f"the prompt has {n} tokens, the context length is {CONTEXT}"):
        client.completions.create(model="alpha", prompt=long_prompt, max_tokens=1)
    ids = list(range(1000, 1000 + CONTEXT - 10))
    with pytest.raises(openai.BadRequestError, match=f"{CONTEXT - 10} tokens and max_tokens=30: {CONTEXT + 20} is "
                                                     f"more than the context length {CONTEXT}; ask for at most 10"):
        client.completions.create(model="alpha", prompt=ids, max_tokens=30)
    with pytest.raises(openai.BadRequestError, match="max_tokens=201 is more than this server's limit of 200"):
        client.completions.create(model="alpha", prompt="x", max_tokens=201)


def test_api_key_missing_or_wrong_is_401(server):
    for key in (None, "wrong"):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "unused", max_retries=0)
        if key is None:
            response = httpx.get(server.url + "/v1/models")
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="alpha", prompt="x", max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    engine = server.served.engine
    settled(server)
    gate = threading.Event()
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "beta", "prompt": "Disconnect", "max_tokens": 200, "stream": True},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        engine.call(lambda: gate.wait(10))  # hold the engine between two steps: the row is mid-generation
        deadline = time.monotonic() + 10
        while not engine.rows and time.monotonic() < deadline:
            time.sleep(0.005)
        seq = engine.rows[0]
    # the connection is closed here; the server notices and cancels the request
    deadline = time.monotonic() + 10
    while not seq.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    assert seq.cancelled
    stats = settled(server)
    assert seq.finish_reason == "cancelled" and len(seq.tokens) < 200
    assert (stats["running"], stats["cache_rows"]) == (0, 0)


def test_engine_rows_joining_and_leaving_a_full_context_frame_equal_generate(tmp_path):
    """A 32-position model: the shared frame fills up and is compacted many times; every row stays exact."""
    base = make_hf_checkpoint(tmp_path / "short", n_positions=32, vocab_size=300)
    model = gl.GPT2.from_pretrained(base).eval()
    for i, name in enumerate(ADAPTERS):
        gl.add_adapter(model, name, gl.LoRAConfig(rank=2 + i, alpha=8), seed=i)
    _randomise_lora(model, 5)
    engine = Engine(model, eos_token_id=None, max_batch=3)
    g = torch.Generator().manual_seed(3)
    seqs, done = [], []
    try:
        for i in range(14):
            n = int(torch.randint(1, 16, (1,), generator=g))
            prompt = torch.randint(0, 300, (n,), generator=g).tolist()
            event = threading.Event()
            seq = GenerationRequest(prompt, (*ADAPTERS, "__base__")[i % 4], int(torch.randint(1, 33 - n, (1,),
                                                                                               generator=g)),
                                    lambda text, token, reason, event=event: reason and event.set(), lambda t: "")
            engine.submit(seq)
            seqs.append(seq)
            done.append(event)
        assert all(event.wait(60) for event in done)
        for seq in seqs:
            expected = engine.call(lambda seq=seq: model.generate(
                torch.tensor([seq.prompt]), max_new_tokens=seq.max_tokens, eos_token_id=None,
                adapter_names=[seq.adapter])).result()[0, len(seq.prompt):].tolist()
            assert seq.tokens == expected and seq.finish_reason == "length"
        stats = engine.stats()
        assert stats["compactions"] >= 3 and (stats["running"], stats["cache_rows"], stats["cache_length"]) == (0, 0, 0)
    finally:
        engine.stop()


def test_prompts_admitted_together_are_prefilled_in_groups_of_little_padding():
    lengths = [96, 20, 90, 16, 95, 60, 33, 64, 17, 88]
    seqs = [GenerationRequest([1] * n, "__base__", 1, lambda *a: None, lambda t: "") for n in lengths]
    groups = prefill_groups(seqs)
    assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in seqs)  # each request once
    for group in groups:
        width = max(len(s.prompt) for s in group)
        assert sum(width - len(s.prompt) for s in group) <= PREFILL_PADDING
    assert [[len(s.prompt) for s in g] for g in groups] == [[96, 95, 90, 88, 64], [60, 33], [20, 17, 16]]
    assert prefill_groups([]) == [] and len(prefill_groups(seqs[:1])) == 1


def test_one_failing_request_never_stops_the_engine_or_the_others(files, reference):
    model = gl.GPT2.from_pretrained(files["base"]).eval()
    for name in ADAPTERS:
        gl.load_adapter(model, files[name], adapter_name=name)
    tok = reference.tok
    engine = Engine(model, tok.eot_token, max_batch=4)
    events: dict[int, list] = {}
    done = {i: threading.Event() for i in range(5)}

    def emitter(i: int):
        def emit(text, token, reason):
            if i == 3 and token is not None and len(events.setdefault(i, [])) >= 2:
                raise RuntimeError("the receiver broke")
            events.setdefault(i, []).append((text, token, reason))
            if reason:
                done[i].set()
        return emit

    prompts = [tok.encode_ordinary(t) for t in ("one", "two words", "three more words", "four", "five")]
    prompts[1] = [*prompts[1], 99999]  # outside the vocabulary: its prefill fails
    adapters = ["alpha", "beta", "gamma", "__base__", "alpha"]
    seqs = [GenerationRequest(p, a, 10, emitter(i), tok.decode) for i, (p, a) in enumerate(zip(prompts, adapters,
                                                                                                strict=True))]
    try:
        for seq in seqs:
            engine.submit(seq)
        for i in (0, 1, 2, 4):
            assert done[i].wait(30)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events[1][-1][2].startswith("error: ") and "outside the vocabulary" in events[1][-1][2]
        for i in (0, 2, 4):
            tokens = [t for _, t, _ in events[i] if t is not None]
            assert tokens == reference(prompts[i], adapters[i], 10)
        assert seqs[3].cancelled and seqs[3].finish_reason == "cancelled" and not done[3].is_set()
        assert engine.stats()["failures"] == 2 and engine.stats()["running"] == 0
    finally:
        engine.stop()
    assert not engine.thread.is_alive()


# ---------------------------------------------------------------------------------------------- adapters at run time


def test_load_and_unload_adapters_at_run_time_only_from_the_root(server, client, files, reference):
    ids = reference.tok.encode_ordinary("Loaded at run time")
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "gamma"})
    assert response.status_code == 200, response.text
    assert "late" in {m.id for m in client.models.list().data}
    text = client.completions.create(model="late", prompt=ids, max_tokens=8, temperature=0).choices[0].text
    assert text == reference.tok.decode(reference(ids, "gamma", 8))
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=ids, max_tokens=2)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 404
    for path in ("../outside", str(files["outside"]), "escape", "gamma/../../outside"):
        response = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["param"] == "lora_path"
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "missing"})
    assert response.status_code == 400 and "no such folder" in response.text


def test_unloading_a_models_only_adapter_frees_its_tensors(files, reference):
    app = build_app(str(files["base"]), {"solo": str(files["gamma"]), "sentiment": str(files["sentiment"])},
                    adapter_root=str(files["root"]), name="base", max_tokens=50)
    served = app.state.api.served
    ids = reference.tok.encode_ordinary("Only one adapter")

    def complete(client, model: str) -> str:
        return client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0).choices[0].text

    def expected(adapter: str) -> str:
        return reference.tok.decode(reference(ids, adapter, 6))

    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert complete(client, "solo") == expected("gamma")
        solo = [weakref.ref(p) for n, p in served.model.named_parameters() if "lora_" in n]
        classifier = weakref.ref(served._classifier_of("sentiment"))
        base_count = sum(p.numel() for n, p in served.model.named_parameters() if "lora_" not in n)
        assert solo and classifier() is not None
        for name in ("solo", "sentiment"):
            response = httpx.post(running.url + "/v1/unload_lora_adapter", json={"lora_name": name})
            assert response.status_code == 200, response.text
        gc.collect()
        assert all(r() is None for r in solo) and classifier() is None
        assert served.classifiers == {} and not adapter_configs(served.model)
        assert sum(p.numel() for p in served.model.parameters()) == base_count  # the base alone, no LoRA left
        assert complete(client, "base") == expected("__base__")
        # and an adapter can be loaded again on the plain base
        response = httpx.post(running.url + "/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "gamma"})
        assert response.status_code == 200, response.text
        assert complete(client, "again") == expected("gamma")
        assert complete(client, "base") == expected("__base__")


def test_runtime_loading_is_off_without_an_adapter_root(files):
    app = build_app(str(files["base"]), {})
    with BackgroundServer(app) as running:
        response = httpx.post(running.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "gamma"})
        assert response.status_code == 404 and "--adapter-root" in response.json()["error"]["message"]
        models = httpx.get(running.url + "/v1/models").json()["data"]  # no key needed without --api-key
        assert [m["id"] for m in models] == [str(files["base"])]


# ---------------------------------------------------------------------------------------------- load


def test_load_300_requests_from_24_clients_over_four_models(server, client, reference):
    tok = reference.tok
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(10)]
    models = ("tiny-gpt2", *ADAPTERS)
    jobs = [(i, prompts[i % 10], models[(i // 10) % 4], 1 + i % 6) for i in range(300)]
    expected = {(tuple(p), m, n): tok.decode(reference(p, "__base__" if m == "tiny-gpt2" else m, n))
                for _, p, m, n in jobs}

    def ask(job):
        i, ids, model, n = job
        result = client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, user=str(i))
        return i, result

    engine = server.served.engine
    settled(server)
    run_on_engine(engine, lambda: None)  # a command: the engine drops its stacked adapter factors
    start, held = engine.stats(), live_tensors()
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, jobs))
    assert sorted(i for i, _ in answers) == list(range(300))
    ids = {r.id for _, r in answers}
    assert len(ids) == 300  # nothing answered twice
    for (i, p, m, n), (_, result) in zip(jobs, answers, strict=True):
        assert result.model == m and result.choices[0].text == expected[(tuple(p), m, n)], i
    stats = settled(server)
    assert (stats["running"], stats["waiting"], stats["cache_rows"], stats["cache_length"]) == (0, 0, 0, 0)
    assert stats["failures"] == start["failures"]
    assert not engine.rows and not engine.waiting and not engine.cache.valid.any()
    # memory: the KV cache is allocated once; what the load left (stacked factors) goes at the next command,
    # and then the process holds the very tensors it held before, byte for byte (tensors, not RSS: the
    # allocator keeps freed pages)
    assert stats["factor_bytes"] > 0
    run_on_engine(engine, lambda: None)
    assert engine.stats()["factor_bytes"] == 0
    for _ in range(50):  # the server's threads drop their last requests' objects a moment after answering
        if live_tensors() == held:
            break
        time.sleep(0.1)
    assert live_tensors() == held
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    # however many requests, at most one packed copy of each weight per kind of pack: an fp32 weight may keep
    # MKL's one-row pack and oneDNN's several-row pack when each was measured faster (the LM head on a Zen 4 EPYC)
    kinds = {MKL, ONEDNN}
    assert all(set(p.__dict__.get(PACKED_ATTR) or ()) <= kinds for p in engine.model.parameters())
    assert packed_bytes(engine.model) <= len(kinds) * weights


def test_readme_client_example_runs(server, capsys):
    from test_readme import README, python_blocks

    code = next(b for b in python_blocks() if "from openai import OpenAI" in b)
    code = (code.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace('"secret"', repr(KEY))
            .replace('model="alpaca"', 'model="alpha"').replace('model="gpt2"', 'model="tiny-gpt2"'))
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - the README is our own text
    printed = capsys.readouterr().out
    assert "('alpha', 'tiny-gpt2')" in printed and printed.count("\n") >= 3


def test_a_full_queue_answers_429_and_the_waiting_request_still_runs(files):
    app = build_app(str(files["base"]), {}, max_batch=1, max_queue=1, name="base")
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        engine = app.state.api.served.engine
        gate = threading.Event()
        engine.call(lambda: gate.wait(30))  # the engine is busy: requests queue up
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.completions.create, model="base", prompt="queued", max_tokens=3,
                                temperature=0)
            deadline = time.monotonic() + 10
            while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            with pytest.raises(openai.RateLimitError, match="--max-queue 1"):
                client.completions.create(model="base", prompt="one too many", max_tokens=3)
            gate.set()
            assert first.result(30).choices[0].finish_reason in ("length", "stop")
        running.served = app.state.api.served
        stats = settled(running)
        assert (stats["running"], stats["waiting"], stats["cache_rows"]) == (0, 0, 0)


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(server):
    engine = server.served.engine
    settled(server)
    gate = threading.Event()
    engine.call(lambda: gate.wait(20))  # the request waits in the queue while the engine is held
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "beta", "prompt": "Too slow", "max_tokens": 100}, timeout=1.0)
        seq = engine.waiting[0]
        deadline = time.monotonic() + 10
        while not seq.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seq.cancelled  # the server noticed the closed connection by itself
    finally:
        gate.set()
    stats = settled(server)
    assert (stats["running"], stats["waiting"], stats["cache_rows"]) == (0, 0, 0) and not seq.tokens


def test_a_cpu_without_bf16_units_or_fbgemm_refuses_a_bf16_server_naming_the_flag(files, monkeypatch):
    monkeypatch.setattr(gl.devices, "cpu_bf16_units", list)
    monkeypatch.setattr(gl.devices, "fp16_packed_available", lambda: False)
    with pytest.raises(gl.errors.ConfigError, match="--precision='bf16'.*no bf16 matrix units"):
        build_app(str(files["base"]), {}, device="cpu", precision="bf16")


@pytest.mark.parametrize("units", ["bf16 units", "none"])
def test_a_bf16_server_on_the_cpu_answers_as_the_bf16_model_generates(files, monkeypatch, units):
    """``--precision bf16`` serves the model held in bf16, an adapter too: on a CPU with bf16 units, and on one
    without them through fbgemm's fp16 product (both simulated; the real CPU's products then run either way)."""
    if units == "none":
        if not gl.ops.packed.fp16_packed_available():
            pytest.skip("torch has no fbgemm fp16 linear here (an ARM build)")
        monkeypatch.setattr(gl.devices, "cpu_bf16_units", list)
        monkeypatch.setattr(gl.ops.packed, "half_products_emulated", lambda: True)
    else:
        monkeypatch.setattr(gl.devices, "cpu_bf16_units", lambda: ["avx512_bf16"])
    app = build_app(str(files["base"]), {"beta": str(files["beta"])}, api_key=KEY, name="tiny-bf16", device="cpu",
                    precision="bf16", max_tokens=40)
    model = gl.GPT2.from_pretrained(files["base"], dtype=torch.bfloat16).eval()
    gl.load_adapter(model, files["beta"], adapter_name="beta")
    tok = gl.load_tokenizer(files["base"])
    ids = tok.encode("A bf16 server reads a prompt longer than decoding's few rows. " * 3)
    assert len(ids) > gl.ops.few_row.MAX_ROWS  # without bf16 units: widened at the first prompt, packed at the next
    with BackgroundServer(app) as running:
        served = app.state.api.served.model
        assert {p.dtype for p in served.parameters() if not p.requires_grad} == {torch.bfloat16}
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for name, adapter in (("tiny-bf16", "__base__"), ("beta", "beta")):
            answer = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
            expected = model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=tok.eot_token,
                                      adapter_names=[adapter])[0, len(ids):].tolist()
            expected = expected[:expected.index(tok.eot_token)] if tok.eot_token in expected else expected
            assert answer.choices[0].text == tok.decode(expected), name
        if units == "none":  # the second prompt's products took the fp16 packs (kept on the served weights)
            packed = gl.ops.packed
            matrices = [w for n, w in served.transformer.h.named_parameters() if w.dim() == 2 and "lora_" not in n]
            assert len(matrices) == 4 * served.config.n_layer
            assert all(packed.FP16 in (w.__dict__.get(packed.PACKED_ATTR) or {}) for w in matrices)


def test_a_server_on_2mb_pages_answers_as_the_plain_base_generates(files, reference, monkeypatch):
    """``huge_pages=True`` (``gpt2lora serve --huge-pages``) writes the base's large weights where
    :func:`~gpt2lora.model.pages.empty_on_huge_pages` puts them; the answers, an adapter's too, do not change."""
    from gpt2lora.model import hub, pages

    asked: list[tuple[int, ...]] = []
    plain = hub.empty_on_huge_pages

    def recording(shape, dtype, mode=None):
        asked.append(tuple(shape))
        return plain(shape, dtype, mode)
    monkeypatch.setattr(hub, "empty_on_huge_pages", recording)
    app = build_app(str(files["base"]), {"beta": str(files["beta"])}, api_key=KEY, name="tiny-huge", device="cpu",
                    max_tokens=40, huge_pages=True)
    wte = app.state.api.served.model.transformer.wte.weight
    assert tuple(wte.shape) in asked and wte.numel() * 4 >= pages.HUGE_PAGE  # a 12.9 MB embedding
    if pages.huge_page_mode() in ("madvise", "always"):
        assert wte.data_ptr() % pages.HUGE_PAGE == 0
    tok = reference.tok
    ids = tok.encode_ordinary("Pages of two megabytes")
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for name, adapter in (("tiny-huge", "__base__"), ("beta", "beta")):
            answer = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
            assert answer.choices[0].text == tok.decode(reference(ids, adapter, 12)), name


def test_the_serve_command_passes_huge_pages_on(monkeypatch):
    from gpt2lora.app import cli, serve

    seen: dict = {}
    monkeypatch.setattr(serve, "serve", lambda base, adapters, **options: seen.update(options, base=base))
    for flags, expected in (([], False), (["--huge-pages"], True)):
        assert cli.main(["serve", "some/base", *flags]) == 0
        assert seen["base"] == "some/base" and seen["huge_pages"] is expected
