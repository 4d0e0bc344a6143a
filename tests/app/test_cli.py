"""The ``gpt2lora`` command end to end: every subcommand in a subprocess on tiny models and real rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO, VOCAB, require_shared

from gpt2lora.app.cli import main
from gpt2lora.devices import cpu_bf16_units
from gpt2lora.ops import packed

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m gpt2lora.app.cli ARGS`` with one torch thread (tiny models are fastest that way)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", *args], check=False, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt2lora {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def smoke_args(out: Path) -> list[str]:
    return ["--smoke", "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)),
            "--out", str(out), "--quiet"]


def check_classification_metrics(result: dict) -> None:
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert math.isfinite(result["loss"]) and result["loss"] > 0


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    run_cli("train", "--task", "sst2", *smoke_args(out), "--run-name", "sst2-lora", "--rank", "4",
            "--epochs", "2", "--eval-every", "5")
    return out / "sst2-lora"


def test_train_writes_the_run_folder(sst2_run):
    for name in ("config.json", "history.jsonl", "metrics.json", "summary.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (sst2_run / name).is_file(), name
    config = json.loads((sst2_run / "config.json").read_text())
    assert config["method"] == "lora" and config["lora"]["rank"] == 4 and config["train_rows"] == 300
    assert config["num_labels"] == 2 and config["label_names"] == ["negative", "positive"]
    lines = [json.loads(line) for line in (sst2_run / "history.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["type"] == "step"]
    evals = [r for r in lines if r["type"] == "eval"]
    assert len(steps) == 2 * math.ceil(300 / 16) and all(math.isfinite(s["loss"]) for s in steps)
    assert [e["step"] for e in evals][:2] == [5, 10] and steps[-1]["lr"] < steps[len(steps) // 2]["lr"]
    result = json.loads((sst2_run / "metrics.json").read_text())["result"]
    check_classification_metrics(result)
    assert result["eval_rows"] == 100 and result["trainable_params"] > 0 and 0 < result["trainable_pct"] < 5
    assert result["train_time_s"] > 0 and result["samples_per_s"] > 0 and result["peak_memory_mb"] > 0
    summary = (sst2_run / "summary.md").read_text()
    assert ("| Method | Eval loss | Accuracy (%) | F1 (macro) | Precision (macro) | Recall (macro) | Trainable params"
            in summary)
    assert "LoRA (r=4, α=4)" in summary  # alpha follows the rank unless given
    if (sst2_run / "loss.png").exists() or "matplotlib" in sys.modules:
        assert (sst2_run / "loss.png").read_bytes()[:8] == PNG and (sst2_run / "lr.png").read_bytes()[:8] == PNG


def test_eval_of_the_run_reproduces_its_metrics(sst2_run):
    proc = run_cli("eval", "--run", str(sst2_run), "--eval-rows", "100", "--data-root", str(DATA))
    saved = json.loads((sst2_run / "eval-sst2-validation.json").read_text())["result"]
    trained = json.loads((sst2_run / "metrics.json").read_text())["result"]
    assert saved["eval_rows"] == 100
    for key in ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert saved[key] == pytest.approx(trained[key], abs=1e-6), key
    assert f"{100 * trained['accuracy']:.2f}" in proc.stdout


@pytest.mark.skipif(not cpu_bf16_units(), reason="this CPU has no bf16 matrix units")
def test_eval_in_bf16_holds_the_base_in_bf16_and_keeps_autocasts_losses(sst2_run, tmp_path, monkeypatch):
    from gpt2lora.app import cli, commands

    seen: dict[str, torch.dtype] = {}
    task_metrics = commands.task_metrics

    def spy(model, *rest, **options):
        seen.update({n: p.dtype for n, p in model.named_parameters()})
        return task_metrics(model, *rest, **options)

    monkeypatch.setattr(commands, "task_metrics", spy)
    args = ["eval", "--run", str(sst2_run), "--eval-rows", "100", "--data-root", str(DATA), "--precision", "bf16",
            "--out", str(tmp_path)]
    assert cli.main([*args, "--run-name", "held"]) == 0
    assert seen["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16
    assert {dtype for n, dtype in seen.items() if "lora_" in n} == {torch.float32}
    monkeypatch.setattr(commands, "hold_for_inference", lambda model, precision: model)  # autocast alone
    assert cli.main([*args, "--run-name", "autocast"]) == 0
    assert seen["transformer.h.0.mlp.c_fc.weight"] == torch.float32
    held, cast = (json.loads((tmp_path / name / "eval-sst2-validation.json").read_text())["result"]
                  for name in ("held", "autocast"))
    # the same rounded weights; only LoRA's product runs fused in bf16 on a bf16 base (1e-5 here)
    assert held["loss"] == pytest.approx(cast["loss"], abs=1e-3)
    assert held["accuracy"] == pytest.approx(cast["accuracy"], abs=0.02)


def test_eval_of_the_foundation_model(tmp_path):
    proc = run_cli("eval", "--task", "snli", *smoke_args(tmp_path), "--run-name", "foundation", "--eval-rows", "60")
    result = json.loads((tmp_path / "foundation" / "eval-snli-validation.json").read_text())["result"]
    check_classification_metrics(result)
    assert result["method"].startswith("Foundation") and result["eval_rows"] == 60
    assert result["loss"] == pytest.approx(math.log(3), abs=0.3)  # random head: near chance
    assert "Foundation (no fine-tuning)" in proc.stdout


def test_merge_writes_a_checkpoint_transformers_loads_with_the_same_logits(sst2_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2lora.app.commands import load_run_model

    proc = run_cli("merge", "--run", str(sst2_run), "--out", str(tmp_path / "merged"))
    assert "max |merged - unmerged| =" in proc.stdout
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ours, _ = load_run_model(sst2_run)
    ours.eval()
    ids = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_generate_with_an_instruction_run_is_greedy_and_matches_the_library(tmp_path, monkeypatch,
                                                                            the_real_cpus_half_products):
    from gpt2lora import load_tokenizer
    from gpt2lora.app.commands import generate_texts, load_run_model
    from gpt2lora.data.tasks import alpaca_prompt
    from gpt2lora.training.precision import hold_frozen_weights

    run_cli("train", "--task", "alpaca_2k", *smoke_args(tmp_path), "--run-name", "alp")
    generations = (tmp_path / "alp" / "generations.md").read_text()
    assert generations.count("**Before:**") == 3 and generations.count("**After:**") == 3
    args = ["generate", "Name a color.", "--run", str(tmp_path / "alp"), "--alpaca", "--max-new-tokens", "6"]
    first, second = run_cli(*args).stdout, run_cli(*args).stdout
    assert first == second and "### generated" in first
    model, config = load_run_model(tmp_path / "alp")
    tok = load_tokenizer(config["base_model"])
    prompt = [tok.encode_ordinary(alpaca_prompt("Name a color."))]
    expected = generate_texts(model, tok, prompt, 6, torch.device("cpu"))[0]
    assert first.split("### generated\n")[1].rstrip("\n") == expected

    # --precision bf16: the base's matrices held in bf16 for decoding (LoRA stays fp32), where the CPU has bf16 units
    # or, without them, fbgemm's fp16 product (gpt2lora.ops.packed.takes_fp16_pack_route)
    half = run_cli(*args, "--precision", "bf16", check=False)
    if not cpu_bf16_units() and not packed.fp16_packed_available():
        assert half.returncode != 0 and "--precision='bf16'" in half.stderr and "no bf16 matrix units" in half.stderr
        return
    assert half.returncode == 0, half.stderr[-3000:]
    hold_frozen_weights(model.requires_grad_(False))
    assert {p.dtype for n, p in model.named_parameters() if n.endswith("c_fc.weight")} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    held = generate_texts(model, tok, prompt, 6, torch.device("cpu"))[0]
    assert half.stdout.split("### generated\n")[1].rstrip("\n") == held
    # the same command in this process: the model it decodes with holds its base in bf16 and its LoRA in fp32
    from gpt2lora.app import cli, commands

    seen = {}

    def spy(model, *rest, **options):
        seen.update({n: p.dtype for n, p in model.named_parameters()})
        return generate_texts(model, *rest, **options)

    monkeypatch.setattr(commands, "generate_texts", spy)
    assert cli.main([*args, "--precision", "bf16"]) == 0
    assert seen["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16 == seen["transformer.wte.weight"]
    assert {dtype for n, dtype in seen.items() if "lora_" in n} == {torch.float32}


def test_sweep_writes_one_comparison_table_and_plots(tmp_path):
    run_cli("sweep", "--task", "sms_spam", *smoke_args(tmp_path), "--run-name", "grid", "--methods", "lora", "head",
            "--ranks", "2", "4", "--train-rows", "96", "--eval-rows", "48", "--foundation")
    folder = tmp_path / "grid"
    rows = json.loads((folder / "results.json").read_text())
    assert [r.get("method_name") for r in rows] == [None, "lora", "lora", "head"]
    assert [r.get("rank") for r in rows[1:3]] == [2, 4]
    for row in rows:
        check_classification_metrics(row)
    assert rows[3]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    summary = (folder / "summary.md").read_text()
    assert "| Method | rank |" in summary and "Foundation (no fine-tuning)" in summary
    assert (folder / "results.csv").read_text().count("\n") == 5
    for plot in ("accuracy_vs_rank", "accuracy_vs_trainable_params", "accuracy_vs_train_time"):
        assert (folder / f"{plot}.png").read_bytes()[:8] == PNG, plot  # matplotlib is a dependency
        assert f"]({plot}.png)" in summary
    assert "Memory added" in summary and all(r["memory_added_mb"] >= 0 for r in rows[1:])
    assert rows[3]["memory_added_mb"] < rows[2]["memory_added_mb"] + 50  # head-only adds no more than LoRA
    assert len([p for p in folder.iterdir() if (p / "adapter").is_dir()]) == 3


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["train", "--rank", "0"], "--rank: expected a positive integer, got '0'"),
    (["train", "--lr", "0"], "--lr: expected a number > 0, got '0'"),
    (["train", "--warmup-ratio=-0.1"], "--warmup-ratio: expected a number in [0, 1)"),
    (["train", "--dropout", "1.5"], "--dropout: expected a number in [0, 1)"),
    (["train", "--method", "prefix"], "--method: invalid choice: 'prefix'"),
    (["train", "--optimizer", "adam"], "--optimizer: invalid choice: 'adam'"),
    (["train", "--column", "text"], "expected FIELD=COLUMN"),
    (["sweep", "--ranks", "4", "x"], "--ranks: expected a positive integer, got 'x'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["merge"], "the following arguments are required: --run, --out"),
])
def test_bad_flags_exit_with_argparse_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, not argparse's usage block


def test_library_errors_exit_1_with_the_message(tmp_path, capsys):
    bad = tmp_path / "d" / "train.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ok", "label": 0}\n{"text": "broken", "label": \n', encoding="utf-8")
    assert main(["train", "--task", "sst2", "--data", str(bad.parent), *smoke_args(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "gpt2lora train: error:" in err and f"{bad} line 2: invalid JSON" in err
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["train", "--task", "sst2", "--data-root", str(DATA), "--smoke", "--vocab", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 1
    assert f"--vocab {tmp_path}: no vocab.json there" in capsys.readouterr().err
    assert main(["train", "--task", "sst2", *smoke_args(tmp_path), "--method", "last_n_full"]) == 1
    assert "last_n" in capsys.readouterr().err


def test_train_on_a_hub_preset_through_the_local_hub(hub, tmp_path, monkeypatch):
    """enron_spam has no local copy: rows come over HTTP from the local hub server, column mapping included."""
    rows = [{"message_id": i, "text": f"{'win cash now' if i % 2 else 'meeting notes'} {i}", "label": i % 2,
             "label_text": "spam" if i % 2 else "ham", "subject": "", "message": "", "date": ""}
            for i in range(40)]
    hub.put("SetFit/enron_spam", {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                                  "test.jsonl": "".join(json.dumps(r) + "\n" for r in rows[::-1])},
            repo_type="dataset")
    monkeypatch.delenv("GPT2LORA_DATA", raising=False)
    torch.set_num_threads(1)
    assert main(["train", "--task", "enron_spam", "--smoke", "--vocab", str(require_shared(VOCAB)),
                 "--out", str(tmp_path / "runs"), "--run-name", "enron", "--quiet", "--method", "head"]) == 0
    fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert [p.rsplit("/", 1)[1] for p in fetched] == ["train.jsonl", "test.jsonl"]  # no validation: test instead
    assert all(p.startswith("/datasets/SetFit/enron_spam/resolve/") for p in fetched)
    result = json.loads((tmp_path / "runs" / "enron" / "metrics.json").read_text())["result"]
    assert result["eval_rows"] == 40 and result["method"] == "Head only"
    check_classification_metrics(result)


# ---------------------------------------------------------------------------------------------- quickstart

def test_quickstart_small_in_process(tmp_path):
    from gpt2lora.app.quickstart import ByteTokenizer, run_quickstart, synthetic_reviews

    assert synthetic_reviews(50, 3) == synthetic_reviews(50, 3) != synthetic_reviews(50, 4)
    assert {r["label"] for r in synthetic_reviews(200, 0)} == {0, 1}
    tok = ByteTokenizer()
    assert tok.decode(tok.encode_ordinary("café ok") + [tok.eot_token]) == "café ok"
    torch.set_num_threads(1)
    rows = run_quickstart(tmp_path, seed=1, progress=False, rows=96, pretrain_steps=4, epochs=1)
    assert [r["method"] for r in rows] == ["Foundation (no fine-tuning)", "LoRA (r=8, α=16)", "Full fine-tuning",
                                           "Head only"]
    for row in rows:
        check_classification_metrics(row)
    assert rows[3]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(v < 1e-4 for v in results["merge_check"].values())
    for name in ("summary.md", "data/train.jsonl", "base/model.safetensors", "lora/adapter/adapter_config.json",
                 "lora/merged/model.safetensors", "full/adapter/adapter_model.safetensors", "head/summary.md"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow
def test_quickstart_command_learns_the_task(tmp_path):
    proc = run_cli("quickstart", "--out", str(tmp_path), "--quiet", timeout=900)  # ~3 min idle, more under load
    results = json.loads((tmp_path / "results.json").read_text())
    foundation, lora, full, _head = results["rows"]
    assert lora["accuracy"] > foundation["accuracy"] + 0.1 and full["accuracy"] > foundation["accuracy"] + 0.1
    assert lora["trainable_params"] < 0.2 * full["trainable_params"]
    assert "| LoRA (r=8, α=16) |" in proc.stdout and "max |merged - unmerged|" in proc.stdout


def test_a_run_on_local_data_is_named_after_it(tmp_path):
    """`train --data ./my_reviews` (no --task): the run folder, summary title and notes name the data, not a preset;
    the kind comes from the columns."""
    rows = [json.loads(line) for line in (require_shared(DATA) / "sst2" / "train.jsonl").read_text().splitlines()[:60]]
    data = tmp_path / "my_reviews"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run_cli("train", "--data", str(data), *smoke_args(tmp_path / "runs"), "--max-steps", "2")
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]  # .smoke-base-0 aside
    assert folder.name.startswith("my_reviews-lora-")
    summary = (folder / "summary.md").read_text()
    assert summary.startswith("# my_reviews: LoRA") and f"data {data}" in summary and "sst2" not in summary
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "classification" and config["settings"]["data"] == str(data)
