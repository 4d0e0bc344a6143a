"""Diagnostics: untrained and trained adapters, direct norms, target typos, files for other layers, run folders,
and the update norm the Trainer logs per evaluation."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers
from helpers import TINY
from safetensors.torch import load_file, save_file

from gpt2lora import (
    GPT2,
    ConfigError,
    GPT2ForSequenceClassification,
    LoRAConfig,
    TrainConfig,
    Trainer,
    apply_lora,
    diagnose,
    format_diagnostics,
    inspect_adapter,
    save_adapter,
)
from gpt2lora.data.batching import collate
from gpt2lora.peft.diagnostics import adapter_update_norm, effective_rank
from gpt2lora.peft.lora import lora_modules


def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "magnitude" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_a_fresh_adapter_is_reported_untrained(tiny_checkpoint) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=4, last_n_blocks=1), seed=0)
    report = diagnose(model)
    assert report.untrained and report.update_norm == 0
    assert all(s.b_norm == 0 and s.effective_rank == 0 and s.a_norm > 0 for s in report.layers)
    assert report.output_change["max_abs"] == 0
    assert any("every lora_B is zero" in w for w in report.warnings)
    assert report.matched == {t: [1] for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert "UNTRAINED" in format_diagnostics(report)


def test_a_trained_adapter_reports_its_norms(clf_checkpoint) -> None:
    config = LoRAConfig(rank=4, alpha=8, use_dora=True, targets=("attn.c_attn", "mlp.c_fc"))
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint), config, seed=0)
    perturb(model)
    report = diagnose(model, rows=6)
    assert not report.untrained and not any("lora_B is zero" in w for w in report.warnings)
    assert report.output_change["max_abs"] > 0 and report.output_change["rows"] == 6
    assert "changed_predictions" in report.output_change
    by_layer = {s.layer: s for s in report.layers}
    assert set(by_layer) == {n for n, _ in lora_modules(model)}
    for name, module in lora_modules(model):
        s = by_layer[name]
        assert s.b_norm == pytest.approx(float(module.lora_B.norm()), rel=1e-6)
        merged = module.merged_weight() - module.weight.detach()
        assert s.delta_norm == pytest.approx(float(merged.norm()), rel=1e-4)
        assert s.relative_change == pytest.approx(float(merged.norm() / module.weight.norm()), rel=1e-4)
        sv = torch.linalg.svdvals(module.delta_weight())
        assert s.effective_rank == pytest.approx(effective_rank(sv), rel=1e-4)
        rows = module.weight.detach().norm(dim=1)
        expected = float(((module.lora_magnitude_vector - rows).abs() / rows).mean())
        assert s.magnitude_change == pytest.approx(expected, rel=1e-5) and expected > 0
    text = format_diagnostics(report)
    assert "DoRA" in text and "transformer.h.0.attn.c_attn" in text and "predictions changed" in text
    assert json.loads(json.dumps(report.to_dict()))["untrained"] is False


def test_effective_rank_counts_directions() -> None:
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert 1.0 < effective_rank(torch.tensor([5.0, 1.0])) < 2.0


def test_update_norm_is_the_frobenius_norm_of_every_update(tiny_checkpoint) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=3, alpha=5,
                                                                         targets=("attn.q", "attn.v", "mlp.c_proj")))
    assert adapter_update_norm(model) == 0.0
    perturb(model, 1)
    direct = math.sqrt(sum(float(m.delta_weight().norm()) ** 2 for _, m in lora_modules(model)))
    assert adapter_update_norm(model) == pytest.approx(direct, rel=1e-5)
    assert diagnose(model).update_norm == pytest.approx(direct, rel=1e-5)
    assert diagnose(model).matched["attn.q"] == [0, 1]
    assert adapter_update_norm(GPT2.from_pretrained(tiny_checkpoint)) is None


def test_inspect_a_saved_adapter_and_a_run_folder(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, targets=("attn.c_attn",)), seed=0)
    perturb(model, 2)
    save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"base_model": str(tiny_checkpoint)}))
    from_run = inspect_adapter(tmp_path / "run")
    direct = diagnose(model)
    assert from_run.source == str(tmp_path / "run" / "adapter") and not from_run.warnings
    assert from_run.update_norm == pytest.approx(direct.update_norm, rel=1e-6)
    assert from_run.output_change["max_abs"] == pytest.approx(direct.output_change["max_abs"], rel=1e-5)
    alone = inspect_adapter(tmp_path / "run" / "adapter", model=tiny_checkpoint)
    assert alone.update_norm == pytest.approx(direct.update_norm, rel=1e-6)
    by_config = inspect_adapter(tmp_path / "run" / "adapter")  # base_model_name_or_path names the checkpoint
    assert by_config.update_norm == pytest.approx(direct.update_norm, rel=1e-6)
    path = tmp_path / "run" / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match=r"does not say its base model; pass model="):
        inspect_adapter(tmp_path / "run" / "adapter")


def test_a_target_typo_is_reported(tiny_checkpoint, tmp_path) -> None:
    twin = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint), peft.LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    twin.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["c_attn", "c_atn"]}))
    report = inspect_adapter(tmp_path / "a", model=tiny_checkpoint)
    assert any("target 'c_atn' (target_modules) matched no layer" in w for w in report.warnings)
    assert any("load_adapter refuses" in w and "'c_atn'" in w for w in report.warnings)
    assert "c_atn" in format_diagnostics(report)


def test_an_adapter_for_more_layers_than_the_model_has_is_reported(tiny_checkpoint, tmp_path) -> None:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, targets=("mlp.c_fc",)))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    for block in (5, 6):
        state[f"base_model.model.transformer.h.{block}.mlp.c_fc.lora_A.weight"] = torch.zeros(2, 64)
        state[f"base_model.model.transformer.h.{block}.mlp.c_fc.lora_B.weight"] = torch.zeros(256, 2)
    save_file(state, weights)
    report = inspect_adapter(tmp_path / "a", model=tiny_checkpoint)
    assert any("holds LoRA tensors for 4 layers but only 2 match this model" in w for w in report.warnings)


def test_trainer_logs_the_update_norm_per_evaluation(clf_checkpoint) -> None:
    model = apply_lora(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint), LoRAConfig(rank=2), seed=0)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, TINY["vocab_size"], (5,), generator=g).tolist(), "label": i % 2}
            for i in range(8)]
    data = [collate(rows[i:i + 4], pad_token_id=0) for i in (0, 4)]
    history = Trainer(model, TrainConfig(lr=1e-2, epochs=3, eval_every_steps=1, progress=False,
                                         device="cpu")).fit(data, data[:1])
    norms = [e["adapter_update_norm"] for e in history.evals]
    assert len(norms) >= 6 and norms[0] > 0 and norms[-1] > norms[0]
    assert norms[-1] == pytest.approx(adapter_update_norm(model), rel=1e-6)


def test_diagnose_bad_input(tiny_checkpoint) -> None:
    with pytest.raises(ConfigError, match="diagnose: the model has no LoRA adapters"):
        diagnose(GPT2.from_pretrained(tiny_checkpoint))
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match=r"diagnose: the model has no adapter 'x'; it has \['default'\]"):
        diagnose(model, adapter="x")


def test_inspect_command_on_a_trained_dora_run(tmp_path) -> None:
    """`gpt2lora train --dora --loraplus-lr-ratio 4` then `gpt2lora inspect RUN` (subprocesses): the flags reach
    the run (DoRA magnitudes in the adapter, LoRA+ groups) and the report shows a trained adapter."""
    import os
    import subprocess
    import sys

    from helpers import DATA, REPO, VOCAB, require_shared

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "gpt2lora.app.cli", "train", "--task", "sst2", "--smoke", "--vocab",
             str(require_shared(VOCAB)), "--data-root", str(require_shared(DATA)), "--out", str(tmp_path),
             "--run-name", "dora", "--quiet", "--max-steps", "3", "--dora", "--loraplus-lr-ratio", "4",
             "--lr", "0.01"]
    proc = subprocess.run(train, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "dora" / "config.json").read_text())
    assert config["lora"]["use_dora"] is True and config["train"]["loraplus_lr_ratio"] == 4.0
    assert json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    proc = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", "inspect", str(tmp_path / "dora")], check=False,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DoRA" in proc.stdout and "untrained" not in proc.stdout.lower()
    proc = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", "inspect", str(tmp_path / "dora"), "--json"],
                          check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["update_norm"] > 0


def test_a_pissa_run_reloads_from_its_converted_adapter(tmp_path) -> None:
    """A PiSSA run's adapter is saved for the unmodified base; load_run_model (eval, merge, push) rebuilds the
    trained model from it: the same logits as the model the run evaluated."""
    from helpers import DATA, VOCAB, require_shared

    from gpt2lora.app.cli import main
    from gpt2lora.app.run import load_run_model

    assert main(["train", "--task", "sst2", "--smoke", "--vocab", str(require_shared(VOCAB)), "--data-root",
                 str(require_shared(DATA)), "--out", str(tmp_path), "--run-name", "pissa", "--quiet", "--max-steps",
                 "2", "--lora-init", "pissa", "--rank", "2", "--eval-rows", "32"]) == 0
    model, config = load_run_model(tmp_path / "pissa")
    assert config["lora"]["init"] == "pissa"
    ranks = {int(p.shape[0]) for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {4}  # rank 2 converted to a plain rank-2r LoRA for the unmodified base
    saved = json.loads((tmp_path / "pissa" / "metrics.json").read_text())["result"]
    again = main(["eval", "--run", str(tmp_path / "pissa"), "--eval-rows", "32"])
    assert again == 0
    evaluated = json.loads((tmp_path / "pissa" / "eval-sst2-validation.json").read_text())["result"]
    assert evaluated["loss"] == pytest.approx(saved["loss"], abs=1e-5)
