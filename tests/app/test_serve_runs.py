"""``gpt2lora serve`` on real run folders written by ``gpt2lora train --smoke``: an instruction run answers chat
as the run's own model does, a classification run classifies with its label names."""

from __future__ import annotations

import httpx
import pytest
import torch
from test_cli import run_cli, smoke_args

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import gpt2lora as gl
from gpt2lora.app.serve import BackgroundServer, build_app


@pytest.mark.slow
def test_serving_an_instruction_run_and_a_classification_run(tmp_path):
    run_cli("train", "--task", "alpaca_2k", *smoke_args(tmp_path), "--run-name", "alp")
    run_cli("train", "--task", "sst2", *smoke_args(tmp_path), "--run-name", "sst", "--rank", "4")
    alp_model, alp_config = gl.load_run_model(tmp_path / "alp")
    sst_model, sst_config = gl.load_run_model(tmp_path / "sst")
    assert alp_config["base_model"] == sst_config["base_model"]
    base = alp_config["base_model"]
    app = build_app(base, {"alp": str(tmp_path / "alp"), "sst": str(tmp_path / "sst")}, name="smoke")
    tok = gl.load_tokenizer(base)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="alp", max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Name a color."}])
        ids = tok.encode_ordinary(gl.alpaca_prompt("Name a color."))
        out = alp_model.eval().generate(torch.tensor([ids]), max_new_tokens=8, eos_token_id=tok.eot_token)[0]
        new = out[len(ids):].tolist()
        new = new[:new.index(tok.eot_token)] if tok.eot_token in new else new
        assert answer.choices[0].message.content == tok.decode(new)
        body = httpx.post(server.url + "/classify", json={"model": "sst", "input": ["a gripping, funny film"]},
                          timeout=60).json()
        with torch.no_grad():
            probs = sst_model.eval()(torch.tensor([tok.encode_ordinary("a gripping, funny film")])).softmax(-1)[0]
        torch.testing.assert_close(torch.tensor(body["data"][0]["probs"]), probs, atol=1e-5, rtol=1e-5)
        assert body["data"][0]["label"] == sst_config["label_names"][int(probs.argmax())]
