"""Experiment tracking: TensorBoard event files read back with TensorBoard's reader, W&B offline run files read
back record by record, the choice of backends and its errors, rank 0 only, and nothing imported unless chosen."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO, TINY, VOCAB, require_shared

from gpt2lora import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    TrainConfig,
    Trainer,
    prepare_model,
)
from gpt2lora.errors import ConfigError
from gpt2lora.training import distributed
from gpt2lora.training.tracking import Trackers, make_trackers, parse_report_to

HPARAMS = {"task": "sst2", "method": "lora", "lora": {"rank": 4, "alpha": 8, "targets": ["attn.c_attn"]},
           "train": {"lr": 0.001, "seed": 0, "max_steps": 6}}


def tiny_run(tracker, steps: int = 6, eval_every: int = 2):
    """A few LoRA steps of a tiny classifier, evaluated every ``eval_every`` steps."""
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification.from_config(GPT2Config(**TINY), num_labels=2, seed=0)
    prepare_model(model, "lora", LoRAConfig(rank=4, alpha=8), seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, TINY["vocab_size"], (4, 10), generator=g),
                "attention_mask": torch.ones(4, 10, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(3)]
    config = TrainConfig(lr=1e-3, max_steps=steps, eval_every_steps=eval_every, eval_every_epoch=False,
                         progress=False, warmup_ratio=0.0)
    return Trainer(model, config, tracker=tracker).fit(batches, batches[:2])


# ---------------------------------------------------------------------------------------------- choosing backends


def test_report_to_values():
    assert parse_report_to("tensorboard,wandb") == ("tensorboard", "wandb")
    assert parse_report_to(["wandb", " TensorBoard ", "wandb"]) == ("wandb", "tensorboard")
    assert parse_report_to("none") == parse_report_to(None) == parse_report_to("") == ()
    with pytest.raises(ConfigError, match=r"report_to: unknown backend 'mlflow'; choose from tensorboard, wandb or none"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(ConfigError, match=r"'none' cannot be combined"):
        parse_report_to("none,wandb")


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_names_the_extra_and_starts_nothing(name, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec answers None
    with pytest.raises(ConfigError) as info:
        make_trackers(["tensorboard", "wandb"], tmp_path / "run", "run")
    message = str(info.value)
    assert message == (f"report_to {name}: the {module} package is not installed; "
                       f"pip install 'gpt2lora[{name}]'")
    assert not (tmp_path / "run").exists()  # the other backend was not started either


def test_none_and_other_ranks_track_nothing(monkeypatch, tmp_path):
    assert not make_trackers("none", tmp_path / "a", "run")
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=1, world_size=2))
    assert not make_trackers(["tensorboard"], tmp_path / "b", "run")
    assert not (tmp_path / "b").exists()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.closed = False

    def log_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def log_metrics(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_trainer_reports_every_step_and_every_evaluation():
    recorder = Recorder()
    history = tiny_run(Trackers([recorder]))
    steps = [(s, m) for s, m in recorder.calls if "train/loss" in m]
    evals = [(s, m) for s, m in recorder.calls if "eval/loss" in m]
    assert [s for s, _ in steps] == [r["step"] for r in history.steps] == [1, 2, 3, 4, 5, 6]
    for (_, m), record in zip(steps, history.steps):
        assert m["train/loss"] == record["loss"] and m["train/lr"] == record["lr"]
        assert m["train/grad_norm"] == record["grad_norm"] and m["train/tokens_per_s"] > 0
    assert [s for s, _ in evals] == [e["step"] for e in history.evals] == [2, 4, 6]
    for (_, m), record in zip(evals, history.evals):
        assert m == {f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch")}
        assert {"eval/accuracy", "eval/f1_macro", "eval/precision_macro", "eval/recall_macro"} <= set(m)


def test_trainer_refuses_something_that_is_not_a_tracker():
    with pytest.raises(ConfigError, match=r"Trainer tracker: expected a gpt2lora.training.tracking.Tracker .*got str"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(progress=False), tracker="tensorboard")


def test_a_rank_other_than_zero_never_calls_the_tracker(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.DistInfo(rank=1, world_size=1))
    tiny_run(recorder, steps=2)
    assert recorder.calls == []


class FileRecorder(Recorder):
    """Writes what it is given to ``path`` (created on the first call only)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def log_metrics(self, step, metrics):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    with make_trackers(["tensorboard"], Path(folder) / "run", "ddp") as trackers:
        (Path(folder) / f"made-{rank}").write_text(str(len(trackers.trackers)))
        tiny_run(Trackers([*trackers.trackers, FileRecorder(Path(folder) / f"calls-{rank}.jsonl")]), steps=4)
    torch.distributed.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_only_rank_zero_tracks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"made-{r}").read_text() for r in (0, 1)] == ["1", "0"]
    assert not (tmp_path / "calls-1.jsonl").exists()
    calls = [json.loads(line) for line in (tmp_path / "calls-0.jsonl").read_text().splitlines()]
    assert [c["step"] for c in calls if "train/loss" in c] == [1, 2, 3, 4]
    assert [c["step"] for c in calls if "eval/accuracy" in c] == [2, 4]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_file_holds_the_series_and_hparams(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with make_trackers("tensorboard", tmp_path / "run", "run", HPARAMS) as tracker:
        history = tiny_run(tracker)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1

    reader = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    loss = reader.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx(history.losses, rel=1e-6)
    assert [e.value for e in reader.Scalars("train/lr")] == pytest.approx(history.lrs, rel=1e-6)
    assert {"train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/accuracy", "eval/f1_macro"} <= set(
        reader.Tags()["scalars"])
    accuracy = reader.Scalars("eval/accuracy")
    assert [e.step for e in accuracy] == [2, 4, 6]
    assert [e.value for e in accuracy] == pytest.approx([e["accuracy"] for e in history.evals], rel=1e-6)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = reader.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    hparams = start.session_start_info.hparams
    assert hparams["lora.rank"].number_value == 4 and hparams["task"].string_value == "sst2"
    assert json.loads(hparams["lora.targets"].string_value) == ["attn.c_attn"]


# ---------------------------------------------------------------------------------------------- W&B (offline)


def wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` run file: a ``:W&B`` header, then LevelDB-log records (32 KiB blocks of
    ``crc32c(4) length(2) type(1)`` + data; types 1 full, 2 first, 3 middle, 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B", "not a W&B run file"
    offset, records, pending = 7, [], b""
    while offset + 7 <= len(raw):
        room = block - offset % block
        if room < 7:  # a block ends in zero padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + 7])
        data = raw[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_files_hold_the_same_series(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "gpt2lora-tests")
    with make_trackers(["wandb"], tmp_path / "run", "sst2-lora", HPARAMS) as tracker:
        history = tiny_run(tracker)
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    # the W&B service writes the file from its own process: on a loaded machine the last records can land a
    # moment after finish() returns, so read until the steps are there (bounded)
    deadline = time.monotonic() + 60
    records = wandb_records(run_file)
    while sum(r.WhichOneof("record_type") == "history" for r in records) < 6 and time.monotonic() < deadline:
        time.sleep(0.5)
        records = wandb_records(run_file)
    rows: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = rows.setdefault(record.history.step.num, {})
            row.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item if not (item.key or "").startswith("_")})
    losses = {step: row["train/loss"] for step, row in rows.items() if "train/loss" in row}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [losses[s] for s in sorted(losses)] == pytest.approx(history.losses, rel=1e-6)
    accuracy = {step: row["eval/accuracy"] for step, row in rows.items() if "eval/accuracy" in row}
    assert sorted(accuracy) == [2, 4, 6]
    assert [accuracy[s] for s in (2, 4, 6)] == pytest.approx([e["accuracy"] for e in history.evals], rel=1e-6)
    config = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.WhichOneof("record_type") == "run":
            assert record.run.display_name == "sst2-lora" and record.run.project == "gpt2lora-tests"
    assert config["lora.rank"] == 4 and config["train.lr"] == 0.001


# ---------------------------------------------------------------------------------------------- nothing imported


def test_a_run_without_trackers_imports_neither(tmp_path):
    root, vocab = require_shared(DATA), require_shared(VOCAB)
    code = (
        "import sys\n"
        "from gpt2lora.app.cli import main\n"
        "from gpt2lora.training.tracking import make_trackers\n"
        "assert not make_trackers('none', sys.argv[1], 'run')\n"
        "code = main(['train', '--task', 'sst2', '--smoke', '--vocab', sys.argv[2], '--data-root', sys.argv[3],\n"
        "             '--out', sys.argv[1], '--run-name', 'plain', '--quiet', '--max-steps', '2'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'tensorboardX')\n"
        "                or m.startswith('torch.utils.tensorboard'))\n"
        "print('LOADED', loaded, code)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(vocab), str(root)], check=False,
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED [] 0" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "plain" / "metrics.json").is_file()


def test_train_report_to_tensorboard_from_the_command_line(tmp_path):
    """`gpt2lora train --report-to tensorboard` (in a subprocess): the run folder holds an event file with the
    run's own step losses and its settings as hyperparameters."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    root, vocab = require_shared(DATA), require_shared(VOCAB)
    args = [sys.executable, "-m", "gpt2lora.app.cli", "train", "--task", "sst2", "--smoke", "--vocab", str(vocab),
            "--data-root", str(root), "--out", str(tmp_path), "--run-name", "tb", "--quiet", "--max-steps", "3",
            "--eval-every", "3", "--report-to", "tensorboard"]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    reader = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    steps = [json.loads(line) for line in (tmp_path / "tb" / "history.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["type"] == "step"]
    assert [e.value for e in reader.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in reader.Scalars("eval/accuracy")] == [3]
    assert "hparams" in reader.PluginTagToContent("hparams") or reader.PluginTagToContent("hparams")


def test_unknown_report_to_backend_is_one_line(capsys):
    from gpt2lora.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--report-to", "mlflow"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "unknown backend 'mlflow'" in err
