"""Run folders that cannot be lost, mixed or escaped: one owner per folder, resume checked against what the run
is, nothing written outside --out, config.json that means the same from any directory, sweeps that continue."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CRASH_WORKER, DATA, REPO, VOCAB, gpt2_stand_in, require_shared
from safetensors.torch import load_file

from gpt2lora.app.cli import main as cli_main
from gpt2lora.app.folders import OWNER_FILE, check_run_name, claim, read_owner, release
from gpt2lora.app.run import lora_training_bytes
from gpt2lora.config import GPT2Config, LoRAConfig
from gpt2lora.errors import ConfigError


def smoke_args(out: Path | str, *extra: str, task: str = "sms_spam") -> list[str]:
    return ["train", "--task", task, "--smoke", "--data-root", str(require_shared(DATA)), "--vocab",
            str(require_shared(VOCAB)), "--out", str(out), "--quiet", "--no-plots", "--threads", "1",
            "--train-rows", "40", "--eval-rows", "8", "--batch-size", "8", "--max-length", "32", *extra]


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


def step_losses(folder: Path) -> list[float]:
    lines = [json.loads(x) for x in (folder / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "step"]


def popen(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "gpt2lora.app.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ---------------------------------------------------------------------------------------------- claims

def test_two_processes_racing_for_one_run_name(tmp_path):
    """The second starts while the first has loaded everything and is about to train: exactly one trains, the
    other exits 1 with one line naming the owner; the winner's folder is what a run made alone makes (before:
    both exited 0, history.jsonl held both runs' lines and config.json the second's)."""
    out, gate = tmp_path / "runs", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, str(CRASH_WORKER), "cli", "--pause-at-step", "1", "--pause-file", str(gate),
                              "--", *smoke_args(out, "--run-name", "same", "--rank", "2")], cwd=tmp_path, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):  # the first is paused before its first optimizer step
            if Path(f"{gate}.paused").exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        second = popen(smoke_args(out, "--run-name", "same", "--rank", "4"), tmp_path)
        second_code, second_err = second.wait(timeout=300), second.stderr.read()
    finally:
        gate.write_text("")
    first_code = first.wait(timeout=300)
    assert (first_code, second_code) == (0, 1), (first.stderr.read(), second_err)
    lines = second_err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second_err, second_err
    assert f"run folder {out / 'same'} is in use by pid {first.pid} on " in lines[0], lines[0]
    winner = "2"
    folder = out / "same"
    assert not (folder / OWNER_FILE).exists()  # released when the winner finished
    config = json.loads((folder / "config.json").read_text())
    assert config["lora"]["rank"] == int(winner)

    alone = tmp_path / "alone"
    alone_proc = popen(smoke_args(alone, "--run-name", "same", "--rank", winner), tmp_path)
    assert alone_proc.wait(timeout=300) == 0, alone_proc.stderr.read()
    assert step_losses(folder) == step_losses(alone / "same")
    history = [json.loads(x)["type"] for x in (folder / "history.jsonl").read_text().splitlines()]
    assert history == [json.loads(x)["type"] for x in (alone / "same" / "history.jsonl").read_text().splitlines()]
    ours = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(alone / "same" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_m = json.loads((folder / "metrics.json").read_text())["result"]
    theirs_m = json.loads((alone / "same" / "metrics.json").read_text())["result"]
    assert ours_m["accuracy"] == theirs_m["accuracy"] and ours_m["loss"] == theirs_m["loss"]


def test_a_live_claim_is_refused_naming_the_owner_and_a_dead_one_is_taken_over_on_resume(tmp_path):
    folder = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        record = {"pid": sleeper.pid, "host": os.uname().nodename, "started": "now"}
        (folder / OWNER_FILE).write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=rf"run folder {folder} is in use by pid {sleeper.pid} on "):
            claim(folder, resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        claim(folder, resume=False)  # a dead owner's folder is not a new run's
    claim(folder, resume=True)  # the claim of a dead process is taken over
    assert read_owner(folder).pid == os.getpid()
    release(folder)
    assert not (folder / OWNER_FILE).exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b", "..", ".", "x" * 300, ""])
def test_run_names_are_single_path_components(name):
    with pytest.raises(ConfigError, match="--run-name"):
        check_run_name(name)


def test_escaping_run_name_writes_nothing_outside_out(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    code, err = cli(capsys, *smoke_args(out, "--run-name", "../../escaped"))
    assert code == 1 and "single folder name" in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "escaped").exists() and not out.exists()


def test_failed_new_run_leaves_no_empty_folder(tmp_path, capsys):
    """A rank too large for memory is refused before anything is allocated, and the run folder is gone
    (before: it died allocating 128 TB and left an empty folder)."""
    out = tmp_path / "runs"
    code, err = cli(capsys, *smoke_args(out, "--run-name", "big", "--rank", "1000000000000"))
    assert code == 1 and "rank: expected at most 65536" in err
    assert not (out / "big").exists()


def test_a_rank_the_memory_cannot_hold_is_refused_before_anything_is_allocated(tmp_path, capsys):
    shape = {"n_layer": 24, "n_embd": 128, "n_head": 2, "n_positions": 64}
    base = gpt2_stand_in(tmp_path / "base", **shape)
    need = lora_training_bytes(GPT2Config(**shape), LoRAConfig(rank=65536), 2)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need <= free:
        pytest.skip(f"this machine has {free / 2**30:.0f} GiB free: rank 65536 ({need / 2**30:.0f} GiB) would fit")
    out = tmp_path / "runs"
    code, err = cli(capsys, "train", "--model", str(base), "--task", "sms_spam", "--data-root",
                    str(require_shared(DATA)), "--out", str(out), "--run-name", "big", "--rank", "65536",
                    "--train-rows", "40", "--eval-rows", "8", "--max-length", "32", "--quiet")
    assert code == 1 and err.count("\n") == 1
    assert "--rank 65536: the LoRA tensors would need" in err and "choose a smaller rank" in err
    assert not (out / "big").exists()


def test_lora_training_bytes_counts_every_wrapped_matrix():
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768)
    lora = LoRAConfig(rank=8, targets=("attn.c_attn", "mlp.c_fc"))
    per_block = 8 * ((768 + 3 * 768) + (768 + 4 * 768))
    assert lora_training_bytes(config, lora, 2) == 16 * 12 * per_block
    head = LoRAConfig(rank=4, targets=("lm_head",))
    assert lora_training_bytes(config, head, 50257) == 16 * 4 * (768 + 50257)


# ---------------------------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def spam_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "runs"
    assert cli_main(smoke_args(out, "--run-name", "spam", "--epochs", "1")) == 0
    return out / "spam"


def test_resume_on_another_task_is_refused_naming_the_setting(spam_run, capsys):
    """Before: it continued the sms_spam run on rt_polarity and rewrote config.json and metrics.json."""
    metrics = (spam_run / "metrics.json").read_bytes()
    code, err = cli(capsys, *smoke_args(spam_run.parent, "--resume", str(spam_run), "--epochs", "1",
                                        task="rt_polarity"))
    assert code == 1 and err.count("\n") == 1
    assert "task: run 'sms_spam', now 'rt_polarity'" in err
    assert (spam_run / "metrics.json").read_bytes() == metrics
    assert json.loads((spam_run / "config.json").read_text())["task"] == "sms_spam"


def test_resume_with_other_lora_settings_is_refused_naming_each(spam_run, capsys):
    code, err = cli(capsys, *smoke_args(spam_run.parent, "--resume", str(spam_run), "--epochs", "1",
                                        "--lora-init", "pissa", "--rank", "4"))
    assert code == 1
    assert "init: run 'kaiming', now 'pissa'" in err and "rank: run 8, now 4" in err


def test_resume_with_another_run_name_is_refused(spam_run, capsys):
    code, err = cli(capsys, *smoke_args(spam_run.parent, "--resume", str(spam_run), "--run-name", "other"))
    assert code == 1 and "--run-name other and --resume" in err


def test_settings_that_may_change_on_resume_are_accepted(spam_run, capsys, tmp_path):
    copy = Path(shutil.copytree(spam_run.parent, tmp_path / "runs"))
    losses = step_losses(copy / "spam")
    code, err = cli(capsys, *smoke_args(copy, "--resume", str(copy / "spam"), "--epochs", "1", "--save-every",
                                        "3", "--eval-every", "2", "--eval-batch-size", "4", "--keep-checkpoints",
                                        "1"))
    assert code == 0, err
    assert step_losses(copy / "spam") == losses


@pytest.mark.slow  # three CLI runs in subprocesses
def test_sigkill_then_resume_auto_from_another_directory_gives_the_same_losses(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def worker(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CRASH_WORKER), *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    args = ("--epochs", "2", "--save-every", "2")
    clean = worker(here, "cli", "--", *smoke_args("runs", "--run-name", "clean", *args))
    assert clean.returncode == 0, clean.stderr
    killed = worker(here, "cli", "--kill-at-step", "4", "--", *smoke_args("runs", "--run-name", "crash", *args))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_owner(here / "runs" / "crash").pid != os.getpid()  # the dead process's claim is still there
    resumed = worker(there, "cli", "--", *smoke_args("../here/runs", "--run-name", "crash", "--resume", "auto",
                                                     *args))
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(here / "runs" / "crash") == step_losses(here / "runs" / "clean")
    assert not (there / "runs").exists()  # nothing written where the resume ran
    assert not (here / "runs" / "crash" / OWNER_FILE).exists()


# ---------------------------------------------------------------------------------------------- relocation

def test_config_json_holds_absolute_paths_and_a_moved_out_folder_still_evaluates(spam_run, tmp_path, capsys):
    config = json.loads((spam_run / "config.json").read_text())
    assert Path(config["base_model"]).is_absolute() and Path(config["data_root"]).is_absolute()
    assert config["base_model_from_run"] == "../.smoke-base-0"
    shutil.copytree(spam_run.parent, tmp_path / "elsewhere")
    run = tmp_path / "elsewhere" / "spam"
    original = json.loads((spam_run / "metrics.json").read_text())["result"]["accuracy"]
    # the copy's config.json names the original base; the base beside the moved folder is found when it is gone
    config["base_model"] = str(tmp_path / "gone" / ".smoke-base-0")
    (run / "config.json").write_text(json.dumps(config))
    code, err = cli(capsys, "eval", "--run", str(run), "--quiet", "--eval-rows", "8")
    assert code == 0, err
    assert json.loads((run / f"eval-sms_spam-{config['eval_split']}.json").read_text())["result"]["accuracy"] \
        == original


def test_local_model_is_stored_absolute(tmp_path, capsys, monkeypatch):
    """Before: '--model tiny' was stored as 'tiny', another directory's 'tiny' (or the hub) was used later."""
    gpt2_stand_in(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "train", "--model", "tiny", "--task", "sms_spam", "--data-root",
                    str(require_shared(DATA)), "--out", "o", "--run-name", "r", "--quiet", "--no-plots",
                    "--train-rows", "40", "--eval-rows", "8", "--batch-size", "8", "--max-length", "32",
                    "--max-steps", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "r" / "config.json").read_text())["base_model"] == str(tmp_path / "tiny")


def test_recipe_smoke_base_goes_inside_out(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('title = "t"\n[defaults]\ntask = "sms_spam"\nmax_steps = 1\n[[rows]]\nname = "a"\n')
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "train", "--config", str(recipe), "--smoke", "--data-root", str(require_shared(DATA)),
                    "--vocab", str(require_shared(VOCAB)), "--out", "X", "--threads", "1")
    assert code == 0, err
    assert (tmp_path / "X" / ".smoke-base-0").is_dir()
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- sweeps

def sweep_args(out: Path, *extra: str) -> list[str]:
    args = smoke_args(out, "--run-name", "sw", "--max-steps", "2", "--save-every", "1", *extra)
    return ["sweep", *args[1:], "--ranks", "2", "4"]


def test_interrupted_sweep_continues_with_resume_auto(tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli(capsys, *sweep_args(out))[0] == 0
    folder = out / "sw"
    rows = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(rows) == 2 and rows[0].startswith("00-lora-r2") and rows[1].startswith("01-lora-r4")
    finished = (folder / rows[0] / "metrics.json").read_bytes()
    reference = step_losses(folder / rows[1])
    # the second row as a kill after its first checkpoint leaves it: history of step 1, checkpoint 1, no results
    second = folder / rows[1]
    for name in ("metrics.json", "summary.md", "adapter"):
        path = second / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for extra in sorted((second / "checkpoints").glob("checkpoint-*"))[1:]:
        shutil.rmtree(extra)
    lines = (second / "history.jsonl").read_text().splitlines()
    (second / "history.jsonl").write_text(lines[0] + "\n")
    for name in ("results.json", "results.csv", "summary.md"):
        (folder / name).unlink()

    code, err = cli(capsys, *sweep_args(out, "--resume", "auto"))
    assert code == 0, err
    assert (folder / rows[0] / "metrics.json").read_bytes() == finished  # kept, not retrained
    assert step_losses(second) == reference  # continued from its checkpoint to the same losses
    assert len(json.loads((folder / "results.json").read_text())) == 2


def test_sweep_into_a_used_folder_without_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "sw").mkdir(parents=True)
    (out / "sw" / "x").write_text("earlier work")
    code, err = cli(capsys, *sweep_args(out))
    assert code == 1 and "exists and is not empty" in err


def test_readme_lists_the_settings_that_may_change_on_resume():
    from gpt2lora.app.resume import RESUMABLE

    text = (REPO / "README.md").read_text(encoding="utf-8")
    sentence = text.split("These may change on resume: ", 1)[1].split(" (`gpt2lora.app.resume.RESUMABLE`)", 1)[0]
    assert tuple(sentence.replace("`", "").split(", ")) == RESUMABLE


@pytest.mark.parametrize("change", [{"lora_alpha": 1e300}, {"init_lora_weights": "pissa_niter_999999999"}])
def test_inspect_reports_an_out_of_bounds_adapter_config_in_one_warning(tmp_path, tiny_checkpoint, capsys, change):
    """Before: alpha 1e300 ended in a LinAlgError traceback, pissa_niter_999999999 ran for minutes."""
    from gpt2lora.model.gpt2 import GPT2
    from gpt2lora.peft.files import save_adapter
    from gpt2lora.peft.lora import apply_lora

    folder = save_adapter(apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2), seed=0),
                          tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    code = cli_main(["inspect", str(folder), "--model", str(tiny_checkpoint)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"load_adapter refuses this folder .*LoRAConfig\.(alpha|init): expected", out), out
