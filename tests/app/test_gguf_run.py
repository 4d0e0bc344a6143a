"""``gpt2lora export RUN``: a run folder written by ``gpt2lora train`` as a merged GGUF and as an adapter GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA, VOCAB, require_shared

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gpt2lora[gguf])")

from gpt2lora.app.cli import main
from gpt2lora.app.commands import merged_run_model
from gpt2lora.app.run import load_run_model
from gpt2lora.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-run")
    assert main(["train", "--task", "alpaca_2k", "--smoke", "--data-root", str(require_shared(DATA)), "--vocab",
                 str(require_shared(VOCAB)), "--out", str(out), "--run-name", "alp", "--max-steps", "2",
                 "--lr", "0.05", "--quiet", "--threads", "1"]) in (0, None)
    return out / "alp"


@pytest.mark.slow  # a training run, two exports and the gguf reader over a 50257-token vocabulary
def test_export_of_a_run_merged_and_adapter_only(run, tmp_path) -> None:
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) in (0, None)
    assert main(["export", str(run), "--format", "gguf", "--adapter-only", "--out", str(tmp_path / "a.gguf")]) in (
        0, None)
    assert main(["export", str(run), "--adapter-only", "--dtype", "f16", "--out", str(tmp_path / "x.gguf")]) == 1
    model, _, _ = merged_run_model(run)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    w = model.transformer.h[0].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(qkv.data).reshape(w.shape), w)
    adapter = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    names = {t.name for t in adapter.tensors}
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import llama_cpp

    unmerged, config = load_run_model(run)
    ids = load_tokenizer(config["base_model"]).encode("Below is an instruction that describes a task.")
    with torch.no_grad():
        want = unmerged.eval()(torch.tensor([ids]))[0].numpy()
    base = tmp_path / "base.gguf"
    assert main(["export", config["base_model"], "--out", str(base)]) in (0, None)
    for path, lora in ((tmp_path / "m.gguf", None), (base, tmp_path / "a.gguf")):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                              **({"lora_path": str(lora)} if lora else {}))
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max())), path
