"""``gpt2lora train/sweep ... --plan``: the plan is printed before anything is read, downloaded or trained, for one
run, every recipe row and every sweep point; bad settings fail in one line naming them."""

from __future__ import annotations

import pytest

from gpt2lora.app.cli import main
from gpt2lora.app.plan import plan_for
from gpt2lora.app.runconfig import RunConfig, from_settings
from gpt2lora.training.memory_plan import format_size

MEDIUM = ["--model", "gpt2-medium", "--method", "full", "--task", "alpaca", "--batch-size", "2", "--max-length",
          "512", "--device", "cuda", "--precision", "fp32"]


def test_plan_prints_the_parts_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *MEDIUM, "--device-memory", "16GB", "--out", str(tmp_path / "runs"), "--plan"]) == 0
    out = capsys.readouterr().out
    config = from_settings({"model": "gpt2-medium", "method": "full", "task": "alpaca", "batch_size": 2,
                            "max_length": 512, "device": "cuda", "precision": "fp32", "device_memory": "16GB"})
    plan = plan_for(config)
    assert "354.8M of 354.8M parameters train; batch 2 x 512 tokens, fp32" in out
    for label, value in (("weights", plan.weights), ("gradients", plan.gradients),
                         ("optimizer state", plan.optimizer), ("peak per device", plan.peak)):
        assert f"{label:<17}{format_size(value):>12}" in out
    assert "-> fits" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no download cache, nothing


def test_plan_over_two_fsdp_devices_and_a_budget_it_exceeds(capsys):
    assert main(["train", *MEDIUM, "--distributed", "fsdp", "--plan-devices", "2", "--device-memory", "1GiB",
                 "--plan"]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 2 devices" in out and "does NOT fit" in out
    one = plan_for(RunConfig(model="gpt2-medium", method="full", task="alpaca", max_length=512))
    two = plan_for(from_settings({"model": "gpt2-medium", "method": "full", "task": "alpaca", "max_length": 512,
                                  "distributed": "fsdp", "plan_devices": 2}))
    assert two.optimizer == one.optimizer // 2


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt5"], "--plan: unknown model 'gpt5'"),
    (["--model", "gpt2", "--plan-devices", "3", "--batch-size", "16"], "batch_size=16 does not divide over 3 devices"),
    (["--model", "gpt2", "--device-memory", "lots"], "RunConfig.device_memory='lots': expected a size"),
])
def test_bad_plan_settings_fail_in_one_line(argv, message, capsys):
    assert main(["train", *argv, "--plan"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sweep_prints_a_plan_per_grid_point(capsys):
    assert main(["sweep", "--model", "gpt2", "--methods", "full", "lora", "--ranks", "4", "16", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory plan:") == 3
    assert "[full]" in out and "[lora r=4]" in out and "[lora r=16]" in out


def test_a_recipe_prints_a_plan_per_row(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('title = "t"\n\n[[rows]]\nname = "a"\nmodel = "gpt2"\nmethod = "full"\ntask = "sst2"\n\n'
                      '[[rows]]\nname = "b"\nmodel = "gpt2-large"\nmethod = "lora"\ntask = "alpaca"\n'
                      'gradient_checkpointing = true\n',
                      encoding="utf-8")
    assert main(["train", "--config", str(recipe), "--plan", "--device-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory plan:") == 2 and "[a]" in out and "[b]" in out
    assert "with gradient checkpointing" in out


def test_the_shipped_cs7643_recipe_plans_every_row(capsys):
    from importlib import resources

    recipe = resources.files("gpt2lora.app") / "recipes" / "cs7643_table3_full_vs_lora.toml"
    assert main(["train", "--config", str(recipe), "--plan"]) == 0
    assert capsys.readouterr().out.count("memory plan:") >= 8
