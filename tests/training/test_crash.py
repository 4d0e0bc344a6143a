"""Crash-safe training: SIGKILL mid-epoch, mid-checkpoint-write, inside the optimizer step, inside a history
append, between a checkpoint and the rotation of old ones, and while ``best`` is replaced; Ctrl-C; then resume
to the same losses, with a history of whole lines, each step once, and every kept checkpoint loadable.

The runs happen in subprocesses (``tests/crash_worker.py``) that really die; the uninterrupted reference
run happens in this process with the same model, data and config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import crash_worker as worker
import pytest
import torch
from helpers import DATA, REPO, VOCAB, require_shared
from safetensors.torch import load_file

from gpt2lora import TrainingError
from gpt2lora.config import TrainConfig
from gpt2lora.constants import OPTIMIZER_FILE, TRAINABLE_WEIGHTS_FILE, TRAINER_STATE_FILE
from gpt2lora.model.tensorcheck import check_training_checkpoint
from gpt2lora.training.checkpoint import find_checkpoint, finish_interrupted_writes
from gpt2lora.training.trainer import Trainer

WORKER = Path(worker.__file__)
TOTAL_STEPS = worker.EPOCHS * math.ceil(worker.N_ROWS / worker.BATCH_SIZE)


def run_worker(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(WORKER), *args], check=False, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """Losses of the uninterrupted run (in this process, one thread like the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = Trainer(worker.build_model(), worker.build_config(None)).fit(worker.build_data())
    finally:
        torch.set_num_threads(threads)
    assert len(history.losses) == TOTAL_STEPS
    return history.losses


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir()
                  if p.name.startswith("checkpoint-") and not p.name.startswith("."))


def assert_loads(folder: Path, step: int | None = None) -> int:
    """A finished checkpoint: JSON state for its step, every trainable tensor readable with its shape, float and
    finite, and so is the optimizer state. Returns the checkpoint's step."""
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    assert state["step"] == (int(folder.name.split("-")[1]) if step is None else step)
    weights = load_file(str(folder / TRAINABLE_WEIGHTS_FILE))
    expected = {n: p.shape for n, p in worker.build_model().named_parameters() if p.requires_grad}
    assert {n: t.shape for n, t in weights.items()} == expected
    check_training_checkpoint(folder, weights, load_file(str(folder / OPTIMIZER_FILE)), TRAINABLE_WEIGHTS_FILE, OPTIMIZER_FILE)
    return state["step"]


def assert_history(out: Path, steps: int, evaluated: bool = False) -> None:
    """history.jsonl holds whole JSON lines only: every step once, in order (and one eval after each)."""
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]  # a torn line fails
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, steps + 1))
    if evaluated:
        assert [r["step"] for r in records if r["type"] == "eval"] == list(range(1, steps + 1))


def resume_in_process(resume_from: Path, out: Path, evaluate: bool = False, before_first_step=None,
                      **overrides) -> list[float]:
    """Resume like ``--resume`` does, in this process; ``before_first_step()`` runs once the resume is done."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = worker.build_config(str(out), evaluate=evaluate)
        config = TrainConfig(**{**config.__dict__, "resume_from": str(resume_from), **overrides})
        model = worker.build_model(lora_seed=123)  # another LoRA init: the checkpoint must overwrite it
        trainer = Trainer(model, config)
        if before_first_step is not None:
            original = trainer._train_step

            def step(group, counts):
                if trainer._train_step is step:
                    before_first_step()
                    trainer._train_step = original
                return original(group, counts)

            trainer._train_step = step
        return trainer.fit(worker.build_data(), worker.build_eval_data() if evaluate else None).losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # two subprocesses: about 10 s on an idle 2-core machine, more when it is busy
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(reference, tmp_path):
    out = tmp_path / "run"
    killed = run_worker("trainer", str(out), "--kill-at-step", "7")  # mid-epoch 0 (9 steps per epoch)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(out) == list(range(1, 7))
    assert find_checkpoint(out).name == "checkpoint-0000006"
    for step in checkpoint_steps(out):
        assert_loads(out / f"checkpoint-{step:07d}")

    resumed = run_worker("trainer", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "losses.json").read_text()) == reference  # bit for bit
    assert checkpoint_steps(out) == list(range(1, TOTAL_STEPS + 1))
    steps = [json.loads(x)["step"] for x in (out / "history.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "step"]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # the log has every step once


@pytest.mark.slow  # two subprocesses: about 10 s on an idle 2-core machine, more when it is busy
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_latest(reference, tmp_path):
    out = tmp_path / "run"
    # 2 safetensors files per checkpoint: call 9 is the weights file of the checkpoint of step 5
    killed = run_worker("trainer", str(out), "--kill-in-save", "9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    temps = [p for p in out.iterdir() if p.name.startswith(".checkpoint-0000005.tmp-")]
    assert len(temps) == 1 and (temps[0] / "trainable.safetensors").is_file()  # really died mid-write
    with pytest.raises(Exception):  # noqa: B017 - the half file is corrupt, which is the point
        load_file(str(temps[0] / "trainable.safetensors"))
    assert checkpoint_steps(out) == [1, 2, 3, 4]
    assert find_checkpoint(out).name == "checkpoint-0000004"
    for step in checkpoint_steps(out):
        assert_loads(out / f"checkpoint-{step:07d}")

    resumed = run_worker("trainer", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "losses.json").read_text()) == reference
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the dead writer's temp folder is gone


def test_every_finished_checkpoint_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    killed = run_worker("trainer", str(out), "--kill-at-step", "12")  # epoch 1, after 2 epoch-0 checkpoints
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for step in (1, 9, 10, 11):  # first, epoch end, first of epoch 1, latest
        losses = resume_in_process(out / f"checkpoint-{step:07d}", tmp_path / f"from-{step}")
        assert losses == reference, step


@pytest.mark.slow  # two subprocesses: about 10 s on an idle 2-core machine, more when it is busy
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    out = tmp_path / "run"
    interrupted = run_worker("trainer", str(out), "--sigint-at-step", "5")
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert f"training interrupted after step 5; saved checkpoint {out / 'checkpoint-0000005'}" in interrupted.stderr
    assert find_checkpoint(out).name == "checkpoint-0000005"  # the step that was running finished first
    resumed = run_worker("trainer", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "losses.json").read_text()) == reference


def test_sigkill_inside_the_optimizer_step_then_resume(reference, tmp_path):
    out = tmp_path / "run"
    killed = run_worker("trainer", str(out), "--kill-in-optimizer-step", "7")  # half of step 7's tensors updated
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(out) == list(range(1, 7))
    for step in checkpoint_steps(out):
        assert_loads(out / f"checkpoint-{step:07d}")
    assert_history(out, 6)  # step 7 never reached the log
    assert resume_in_process(out, out) == reference
    assert_history(out, TOTAL_STEPS)


def test_sigkill_inside_a_history_append_then_resume(reference, tmp_path):
    out = tmp_path / "run"
    killed = run_worker("trainer", str(out), "--kill-in-history-append", "5")  # step 5's line, half written
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 5 and [json.loads(x)["step"] for x in lines[:4]] == [1, 2, 3, 4]
    with pytest.raises(json.JSONDecodeError):  # really torn
        json.loads(lines[4])
    assert checkpoint_steps(out) == [1, 2, 3, 4]
    for step in checkpoint_steps(out):
        assert_loads(out / f"checkpoint-{step:07d}")
    assert resume_in_process(out, out) == reference
    assert_history(out, TOTAL_STEPS)  # the torn line is gone, no step twice


def test_sigkill_between_a_checkpoint_and_the_rotation_then_resume(reference, tmp_path):
    out = tmp_path / "run"
    killed = run_worker("trainer", str(out), "--keep", "2", "--kill-after-checkpoint", "7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(out) == [5, 6, 7]  # the new one is complete, the oldest not yet rotated away
    for step in checkpoint_steps(out):
        assert_loads(out / f"checkpoint-{step:07d}")
    assert find_checkpoint(out).name == "checkpoint-0000007"
    assert resume_in_process(out, out, keep_checkpoints=2) == reference
    assert checkpoint_steps(out) == [TOTAL_STEPS - 1, TOTAL_STEPS]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert_history(out, TOTAL_STEPS)


def test_sigkill_while_best_is_replaced_keeps_the_new_best(reference, tmp_path):
    out = tmp_path / "run"
    # best is written at step 1, then replaced at every improvement: die between moving the old one aside and
    # renaming the new one into place, the moment when no folder is called "best"
    killed = run_worker("trainer", str(out), "--eval", "--kill-in-swap", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "best").exists()
    (new,) = out.glob(".best.tmp-*")
    (old,) = out.glob(".best.old-*")
    step = assert_loads(new, step=json.loads((new / TRAINER_STATE_FILE).read_text())["step"])
    assert assert_loads(old, step=json.loads((old / TRAINER_STATE_FILE).read_text())["step"]) < step
    assert checkpoint_steps(out)[-1] == step  # the step checkpoint came first
    seen = []

    def look_at_best():
        seen.append(json.loads((out / "best" / TRAINER_STATE_FILE).read_text())["step"])
        assert not [p for p in out.iterdir() if p.name.startswith(".")]

    assert resume_in_process(out, out, evaluate=True, before_first_step=look_at_best) == reference
    assert seen == [step]  # the finished new best took the name once the resume had loaded its checkpoint
    assert_history(out, TOTAL_STEPS, evaluated=True)
    best = json.loads((out / "best" / TRAINER_STATE_FILE).read_text())
    assert_loads(out / "best", step=best["step"])
    assert best["best"]["step"] == best["step"]


def test_finish_interrupted_writes_completes_a_swap_and_removes_only_leftovers(tmp_path):
    def folder(name: str, content: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / TRAINER_STATE_FILE).write_text(content)

    folder("checkpoint-0000003", "current")
    folder(".checkpoint-0000003.old-11", "replaced already")
    folder(".best.old-12", "previous best")
    folder(".best.tmp-12", "new best")  # killed between the two renames: nothing is called best
    folder(".checkpoint-0000004.tmp-13", "half written")
    folder(".checkpoint-0000001.deleting", "half deleted")
    (tmp_path / ".history.jsonl.tmp-14").write_text("{")
    (tmp_path / ".keep-me").write_text("not ours")
    folder("notes", "not ours either")
    finish_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep-me", "best", "checkpoint-0000003", "notes"]
    assert (tmp_path / "best" / TRAINER_STATE_FILE).read_text() == "new best"
    assert (tmp_path / "checkpoint-0000003" / TRAINER_STATE_FILE).read_text() == "current"


def test_ctrl_c_without_out_dir_still_stops_and_restores_the_handler():
    data = worker.build_data()
    trainer = Trainer(worker.build_model(), worker.build_config(None))
    original = trainer._train_step
    calls = []

    def step(group, counts):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(group, counts)

    trainer._train_step = step
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 3; saved no checkpoint"):
        trainer.fit(data)
    assert len(trainer.history.steps) == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_nan_gradient_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    model = worker.build_model()
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * math.nan if len(calls) == 4 else grad  # one call per step (batch size 1 group)

    model.score.weight.register_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite gradients \(norm nan\) at step 4; .*checkpoint-0000003"):
        Trainer(model, worker.build_config(str(out))).fit(worker.build_data())
    assert checkpoint_steps(out) == [1, 2, 3]
    assert_loads(out / "checkpoint-0000003")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    model = worker.build_model()
    calls = []
    forward = model.forward

    def nan_on_third_step(*args, **kwargs):
        calls.append(1)
        logits = forward(*args, **kwargs)
        return logits * math.nan if len(calls) == 3 else logits

    model.forward = nan_on_third_step
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3 .*checkpoint-0000002"):
        Trainer(model, worker.build_config(str(out))).fit(worker.build_data())
    assert find_checkpoint(out).name == "checkpoint-0000002"


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_inf_gradient_norm_is_skipped_with_or_without_clipping(grad_clip):
    model = worker.build_model()
    calls = []

    def inf_on_second(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 2 else grad

    model.score.weight.register_hook(inf_on_second)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(**{**worker.build_config(None).__dict__, "grad_clip": grad_clip, "max_steps": 3})
    trainer = Trainer(model, config)
    snapshot = {}
    original = trainer._train_step

    def step(group, counts):
        if len(trainer.history.steps) == 1:
            snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        record = original(group, counts)
        if len(trainer.history.steps) == 2:  # the skipped step changed nothing and left no NaN behind
            for name, p in model.named_parameters():
                assert torch.equal(p, snapshot[name]), name
        return record

    trainer._train_step = step
    history = trainer.fit(worker.build_data())
    assert [s["skipped"] for s in history.steps] == [False, True, False]
    assert history.steps[1]["grad_norm"] == math.inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def cli_smoke(out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "sst2", "--smoke", "--data-root", str(require_shared(DATA)), "--vocab",
            str(require_shared(VOCAB)), "--out", str(out), "--quiet", "--train-rows", "40", "--eval-rows", "8",
            "--batch-size", "8", "--epochs", "2", "--save-every", "2", *extra]


def run_losses(folder: Path) -> list[float]:
    lines = [json.loads(x) for x in (folder / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "step"]


@pytest.mark.slow
def test_cli_run_killed_then_interrupted_resumes_to_the_same_losses(tmp_path):
    out = tmp_path / "runs"
    clean = run_worker("cli", "--", *cli_smoke(out, "--run-name", "clean"))
    assert clean.returncode == 0, clean.stderr
    reference = run_losses(out / "clean")
    assert len(reference) == 10  # 5 batches per epoch, 2 epochs

    killed = run_worker("cli", "--kill-at-step", "4", "--", *cli_smoke(out, "--run-name", "crash"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(out / "crash" / "checkpoints") == [2]
    assert not (out / "crash" / "adapter").exists()

    resume = cli_smoke(out, "--run-name", "crash", "--resume", "auto")
    interrupted = run_worker("cli", "--sigint-at-step", "3", "--", *resume)  # 3rd step of this process = step 5
    assert interrupted.returncode == 130, interrupted.stderr
    lines = interrupted.stderr.strip().splitlines()
    assert lines[-2] == ("training interrupted after step 5; saved checkpoint "
                         f"{out / 'crash' / 'checkpoints' / 'checkpoint-0000005'}")
    assert lines[-1].startswith("gpt2lora train: interrupted; continue with the same command plus --resume")
    assert "Traceback" not in interrupted.stderr
    assert find_checkpoint(out / "crash" / "checkpoints").name == "checkpoint-0000005"

    finished = run_worker("cli", "--", *cli_smoke(out, "--resume", str(out / "crash")))
    assert finished.returncode == 0, finished.stderr
    assert run_losses(out / "crash") == reference
    shutil.rmtree(out)


@pytest.mark.slow  # three CLI runs in subprocesses
def test_cli_killed_inside_a_history_append_resumes_auto_to_the_same_losses(tmp_path):
    out = tmp_path / "runs"
    clean = run_worker("cli", "--", *cli_smoke(out, "--run-name", "clean"))
    assert clean.returncode == 0, clean.stderr
    reference = run_losses(out / "clean")

    # appends: steps 1-5, the epoch-end eval, steps 6-10; the 4th is step 4's line, after checkpoint 2
    killed = run_worker("cli", "--kill-in-history-append", "4", "--", *cli_smoke(out, "--run-name", "torn"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    log = out / "torn" / "history.jsonl"  # the run folder holds the one history file
    *whole, torn = log.read_text().splitlines()
    assert [json.loads(x)["step"] for x in whole] == [1, 2, 3]
    with pytest.raises(json.JSONDecodeError):
        json.loads(torn)
    assert find_checkpoint(out / "torn" / "checkpoints").name == "checkpoint-0000002"

    resumed = run_worker("cli", "--", *cli_smoke(out, "--run-name", "torn", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert run_losses(out / "torn") == reference
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, len(reference) + 1))
    for folder in (out / "torn" / "checkpoints").glob("checkpoint-*"):
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        check_training_checkpoint(folder, load_file(str(folder / TRAINABLE_WEIGHTS_FILE)),
                                  load_file(str(folder / OPTIMIZER_FILE)), TRAINABLE_WEIGHTS_FILE, OPTIMIZER_FILE)
        assert state["step"] == int(folder.name.split("-")[1])
