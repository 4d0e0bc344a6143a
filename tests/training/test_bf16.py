"""bf16 on the CPU: precision resolution, the frozen base held in bf16, loss trajectories against fp32,
bf16 generation against fp32 greedy tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_DROPOUT, TINY

from gpt2lora import ConfigError, generate
from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.data.batching import collate, lm_example
from gpt2lora.devices import cpu_bf16_units, resolve_precision
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.peft.methods import prepare_model
from gpt2lora.training.evaluation import evaluate
from gpt2lora.training.precision import hold_frozen_weights
from gpt2lora.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PAD = 0
#: bf16 keeps 8 significant bits: a loss of ~1-7 nats moves by a few hundredths; the trajectories must stay
#: that close over every step (a wrong cast, a bf16 optimizer state or a bf16 loss reduction drifts further).
TRAJECTORY_ATOL = 5e-2


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with bf16 matrix units (autocast computes the same bf16 values without them, slower)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)


def test_bf16_is_resolved_on_a_cpu_with_bf16_units(bf16_cpu):
    assert cpu_bf16_units()[0] == "amx_bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"  # documented: bf16 on the CPU is asked for by name
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(ConfigError, match=r"^TrainConfig.precision='fp16' needs a CUDA device; on cpu"):
        resolve_precision("fp16", CPU, "TrainConfig.precision")


def test_bf16_is_refused_on_a_cpu_without_bf16_units(no_bf16_cpu):
    assert cpu_bf16_units() == []
    with pytest.raises(ConfigError, match=r"^--precision='bf16' on cpu: this CPU has no bf16 matrix units "
                                          r"\(avx512_bf16 or amx_bf16\)"):
        resolve_precision("bf16", CPU, "--precision")
    assert resolve_precision("auto", CPU) == "fp32"
    with pytest.raises(ConfigError, match="TrainConfig.precision='bf16' on cpu"):
        Trainer(tiny_model("cls", "lora"), cfg("bf16"))


def tiny_model(kind: str, method: str) -> torch.nn.Module:
    config = GPT2Config(**TINY, **NO_DROPOUT)
    torch.manual_seed(0)
    model = (GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0) if kind == "cls"
             else GPT2(config))
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0) if method == "lora" else None
    return prepare_model(model, method, lora=lora, seed=0)


def batches(kind: str, n_rows: int = 16, batch_size: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(1, TINY["vocab_size"], (int(torch.randint(4, 14, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": ids.tolist(), "label": i % 3} if kind == "cls"
                    else lm_example(ids[:2].tolist(), ids[2:].tolist(), eos_token_id=7))
    return [collate(rows[i:i + batch_size], pad_token_id=PAD) for i in range(0, n_rows, batch_size)]


def cfg(precision: str) -> TrainConfig:
    return TrainConfig(lr=3e-3, min_lr=1e-4, warmup_ratio=0.2, epochs=2, grad_clip=1.0, progress=False,
                       device="cpu", precision=precision)


@pytest.mark.parametrize("kind", ["cls", "lm"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_trajectory_tracks_fp32(bf16_cpu, kind, method):
    data = batches(kind)
    reference = Trainer(tiny_model(kind, method), cfg("fp32")).fit(data)
    model = tiny_model(kind, method)
    trainer = Trainer(model, cfg("bf16"))
    half = trainer.fit(data)
    assert len(half.losses) == len(reference.losses) == 8
    assert half.losses == pytest.approx(reference.losses, abs=TRAJECTORY_ATOL)
    assert half.losses != reference.losses  # bf16 really ran
    assert reference.losses[-1] < reference.losses[0] and half.losses[-1] < half.losses[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    for state in trainer.optimizer.state.values():  # AdamW's moments stay fp32
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if method == "lora":
        assert trainer.held_in_bf16 > 0
        matrices = {n for n, p in frozen if p.dim() == 2 and "wpe" not in n and not (kind == "cls" and "wte" in n)}
        assert matrices and all(dict(frozen)[n].dtype == torch.bfloat16 for n in matrices)
        assert all(p.dtype == torch.float32 for n, p in frozen if p.dim() == 1)  # LayerNorms, biases
    else:
        assert trainer.held_in_bf16 == 0 and not frozen
    # the trained model still evaluates in fp32 (bf16 base read by fp32 activations) and in bf16
    fp32_eval = evaluate(model, data, CPU, "fp32")
    bf16_eval = evaluate(model, data, CPU, "bf16")
    assert fp32_eval["loss"] == pytest.approx(bf16_eval["loss"], abs=TRAJECTORY_ATOL)


def test_holding_the_frozen_base_in_bf16_computes_what_autocast_computes():
    model = tiny_model("lm", "lora").eval()
    ids = torch.randint(1, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        before = model(ids)
        assert hold_frozen_weights(model) > 0
        assert hold_frozen_weights(model) == 0  # already held
        after = model(ids)
    # the same bf16 products; only the token embedding (tied with the head) is now read rounded to bf16
    torch.testing.assert_close(after.float(), before.float(), atol=0.1, rtol=0.02)


def greedy_agrees_until_margin(fp32: GPT2, other: GPT2, ids: torch.Tensor, new: int, margin: float) -> int:
    """Steps on which ``other`` picks fp32's greedy token; stops at the first step whose fp32 margin between the
    two best logits is under ``margin`` (where bf16 rounding may legitimately swap them)."""
    expected = generate(fp32, ids, max_new_tokens=new, eos_token_id=None)
    got = generate(other, ids, max_new_tokens=new, eos_token_id=None)
    checked = 0
    for step in range(new):
        with torch.no_grad():
            logits = fp32(expected[:, :ids.size(1) + step])[:, -1]
        top = logits.topk(2, dim=-1).values
        if bool(((top[:, 0] - top[:, 1]) < margin).any()):
            break
        assert torch.equal(got[:, ids.size(1) + step], expected[:, ids.size(1) + step]), f"step {step}"
        checked += 1
    return checked


@pytest.mark.parametrize("held", [False, True])
def test_bf16_generation_gives_the_fp32_greedy_tokens(held):
    torch.manual_seed(3)
    fp32 = GPT2(GPT2Config(**{**TINY, "n_embd": 128, "n_head": 4}, **NO_DROPOUT)).eval()
    with torch.no_grad():  # sharpen the head so that most steps have a clear winner
        fp32.lm_head.weight.mul_(4)
    other = GPT2(fp32.config).eval()
    other.load_state_dict(fp32.state_dict())
    if held:  # a frozen base held in bf16 under fp32 activations, as after bf16 training
        for p in other.parameters():
            p.requires_grad_(False)
        assert hold_frozen_weights(other) > 0
    else:  # weights loaded in bf16 (dtype=torch.bfloat16): bf16 activations too
        other.to(torch.bfloat16)
    ids = torch.randint(1, TINY["vocab_size"], (3, 5), generator=torch.Generator().manual_seed(4))
    assert greedy_agrees_until_margin(fp32, other, ids, new=24, margin=0.5) >= 4


@pytest.mark.parametrize("method", ["dora", "head", "prompt", "embeddings", "last_n_full"])
def test_every_method_trains_in_bf16_with_dropout(bf16_cpu, method):
    """Dropout on (attention with dropout, the 1-byte masks, recompute) and DoRA's norms, all under bf16."""
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPT2Config(**TINY, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        net = GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0)
        if method == "dora":
            return prepare_model(net, "lora", lora=LoRAConfig(rank=4, alpha=8, dropout=0.1, use_dora=True), seed=0)
        return prepare_model(net, method, last_n=1 if method == "last_n_full" else None, seed=0)

    data = batches("cls")
    torch.manual_seed(5)
    reference = Trainer(model(), cfg("fp32")).fit(data)
    torch.manual_seed(5)
    half = Trainer(model(), cfg("bf16")).fit(data)
    assert all(torch.isfinite(torch.tensor(half.losses)))
    assert half.losses == pytest.approx(reference.losses, abs=0.1)


@pytest.mark.skipif(not cpu_bf16_units(), reason="the command line runs on this CPU: needs bf16 matrix units")
@pytest.mark.parametrize("task", ["sst2", "alpaca_2k"])
def test_command_line_trains_and_evaluates_in_bf16_on_the_cpu(tmp_path, task):
    import json
    import os
    import subprocess
    import sys

    from helpers import DATA, REPO, VOCAB, require_shared

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["train", "--task", task, "--smoke", "--data-root", str(require_shared(DATA)), "--vocab",
            str(require_shared(VOCAB)), "--out", str(tmp_path), "--quiet", "--run-name", "run", "--rank", "4",
            "--epochs", "1", "--train-rows", "64", "--eval-rows", "16", "--gen-rows", "4", "--precision", "bf16"]
    proc = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "- precision: bf16 on the CPU (bf16 matrix units: " in summary
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())["result"]
    assert 0 < result["loss"] < 20


def test_merging_and_exporting_after_bf16_training_keep_the_checkpoint_dtype(bf16_cpu, tmp_path):
    from safetensors import safe_open

    from gpt2lora import merge_lora
    from gpt2lora.model.hub import save_pretrained

    model = tiny_model("lm", "lora")
    Trainer(model, cfg("bf16")).fit(batches("lm")[:2])
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.weight.dtype == torch.bfloat16
    expected = layer.merged_weight()
    merge_lora(model)
    assert layer.weight.dtype == torch.float32  # merged in fp32: the update is not rounded to bf16
    torch.testing.assert_close(layer.weight, expected)
    save_pretrained(model, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.float32}


def test_a_bf16_checkpoint_merges_and_exports_in_bf16(tmp_path):
    from safetensors import safe_open

    from gpt2lora import apply_lora, merge_lora
    from gpt2lora.model.hub import save_pretrained

    torch.manual_seed(0)
    model = GPT2(GPT2Config(**TINY)).to(torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=4, alpha=8), seed=0)
    merge_lora(model)
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    save_pretrained(model, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
