"""Scale levers: gradient checkpointing, torch.compile, and DDP across processes (gloo) / under torchrun."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO, TINY, VOCAB, free_port, require_shared
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import gpt2lora.training.checkpoint as checkpoint_module
import gpt2lora.training.trainer as train_module
from gpt2lora import (
    GPT2,
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    TrainConfig,
    Trainer,
    apply_lora,
)
from gpt2lora.data.batching import BucketedBatches, collate, lm_example
from gpt2lora.errors import ConfigError
from gpt2lora.ops.recompute import count_saved_tensors
from gpt2lora.training.distributed import DistInfo, setup, shard_bounds

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n: int, kind: str, seed: int = 0) -> list[dict]:
    """Rows of different lengths; LM rows mask their 2-token prompt, so target counts differ per row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(1, TINY["vocab_size"], (length,), generator=g).tolist()
        out.append({"input_ids": ids, "label": i % 3} if kind == "cls" else lm_example(ids[:2], ids[2:], eos_token_id=7))
    return out


def batches(kind: str, sizes: tuple[int, ...] = (5, 4, 1, 6), seed: int = 0) -> list[dict]:
    """Uneven batch sizes: odd ones split 3/2 over two ranks, and a 1-row batch leaves rank 1 empty."""
    data, start = rows(sum(sizes), kind, seed), 0
    out = []
    for size in sizes:
        out.append(collate(data[start:start + size], pad_token_id=PAD))
        start += size
    return out


def tiny_model(kind: str, method: str = "lora", dropout: float = 0.0, lora_dropout: float = 0.0) -> torch.nn.Module:
    config = GPT2Config(**TINY, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0) if kind == "cls" \
        else GPT2(config)
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=lora_dropout), seed=0)
    return model


def config(**overrides) -> TrainConfig:
    base = {"lr": 3e-3, "min_lr": 1e-4, "warmup_ratio": 0.2, "epochs": 2, "grad_clip": 0.5, "weight_decay": 0.1,
            "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- gradient checkpointing ---

@pytest.mark.parametrize("kind,method", [("cls", "lora"), ("lm", "lora"), ("cls", "full")])
def test_checkpointing_gives_the_same_training_run(kind, method):
    """Dropout everywhere (model and LoRA): non-reentrant recomputation replays the same masks."""
    data = batches(kind)
    runs = []
    for on in (False, True):
        model = tiny_model(kind, method, dropout=0.1, lora_dropout=0.1)
        history = Trainer(model, config(gradient_checkpointing=on, grad_accum_steps=2)).fit(data, data[:2])
        runs.append((history, trainable(model)))
    (plain, w_plain), (ckpt, w_ckpt) = runs
    assert len(plain.losses) == 4
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    assert [s["grad_norm"] for s in ckpt.steps] == pytest.approx([s["grad_norm"] for s in plain.steps], abs=1e-6)
    assert ckpt.evals[-1]["loss"] == pytest.approx(plain.evals[-1]["loss"], abs=1e-6)
    for name, tensor in w_plain.items():
        torch.testing.assert_close(w_ckpt[name], tensor, atol=1e-6, rtol=0)


def saved_bytes_and_grads(model: torch.nn.Module, batch: dict, on: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward in one forward, and the gradients of one backward."""
    model.train()
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = on
    with count_saved_tensors(model.parameters()) as saved:
        logits = model(batch["input_ids"], batch["attention_mask"])
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return saved.bytes, grads


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_saves_fewer_activations_with_equal_gradients(method):
    model = tiny_model("cls", method, dropout=0.1, lora_dropout=0.1)
    batch = batches("cls", sizes=(6,))[0]
    torch.manual_seed(1)
    plain_bytes, plain = saved_bytes_and_grads(model, batch, False)
    torch.manual_seed(1)
    ckpt_bytes, ckpt = saved_bytes_and_grads(model, batch, True)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert plain.keys() == ckpt.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0 or "lora_A" in name  # lora_B starts at zero, so A gets no gradient yet
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=0)


def test_checkpointing_leaves_eval_and_generation_alone():
    model = tiny_model("lm", "full").eval()
    prompt = torch.randint(1, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(prompt, max_new_tokens=6, eos_token_id=None)
    Trainer(model, config(gradient_checkpointing=True))  # switches it on
    assert model.transformer.gradient_checkpointing
    model.eval()
    assert torch.equal(model.generate(prompt, max_new_tokens=6, eos_token_id=None), expected)


def test_checkpointing_needs_a_gpt2lora_model():
    with pytest.raises(ConfigError, match="gradient_checkpointing.*Linear.*Transformer"):
        Trainer(torch.nn.Linear(3, 3), config(gradient_checkpointing=True))


@pytest.mark.parametrize("field", ["gradient_checkpointing", "compile"])
def test_config_flags_must_be_booleans(field):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}: expected True or False, got 'yes'"):
        TrainConfig(**{field: "yes"})
    assert getattr(TrainConfig(), field) is False


# --- torch.compile ---

def inductor_or_skip() -> None:
    """Skip, saying why, where torch.compile's default backend cannot build a kernel here."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 - a missing C++ compiler, an unsupported Python ...
        pytest.skip(f"torch.compile (Inductor) cannot run here: {type(err).__name__}: {str(err)[:200]}")


@pytest.mark.slow
def test_compile_gives_the_same_training_run():
    inductor_or_skip()
    import warnings

    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    data = batches("cls", sizes=(4, 4, 4))
    eager_model, compiled_model = tiny_model("cls"), tiny_model("cls")
    eager = Trainer(eager_model, config(epochs=1)).fit(data)
    counters.clear()
    trainer = Trainer(compiled_model, config(epochs=1, compile=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the eager fallback warns: here it must not happen
        compiled = trainer.fit(data)
    # the forward really ran compiled: still the compiled module, and dynamo captured at least one graph
    assert isinstance(trainer._train_module, OptimizedModule)
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-5)
    for name, tensor in trainable(eager_model).items():
        torch.testing.assert_close(trainable(compiled_model)[name], tensor, atol=1e-5, rtol=1e-4)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    data = batches("cls", sizes=(4, 4))
    eager = Trainer(tiny_model("cls"), config(epochs=1)).fit(data)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*without compiling"):
        fallback = Trainer(tiny_model("cls"), config(epochs=1, compile=True)).fit(data)
    assert fallback.losses == pytest.approx(eager.losses, abs=1e-6)


def test_compile_without_torch_compile_is_a_config_error(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(ConfigError, match="TrainConfig.compile=True but torch .* has no torch.compile"):
        Trainer(tiny_model("cls"), config(compile=True)).fit(batches("cls", sizes=(2,)))


# --- DDP: shards, process group set-up ---

@given(st.integers(1, 40), st.integers(1, 8))
def test_shards_are_contiguous_balanced_and_cover_the_batch(rows_, world):
    bounds = [shard_bounds(rows_, DistInfo(rank, world)) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows_
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2.*below WORLD_SIZE=2"),
])
def test_bad_torchrun_environment_is_named(monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        setup("cpu")


def test_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup("cpu")
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)


# --- DDP: two gloo processes against one ---

def run_kind(kind: str, out_dir: Path | None) -> tuple[train_module.History, dict[str, torch.Tensor]]:
    """``cls`` / ``lm``: uneven batches; ``lm-packed``: packed rows (3 per batch: 2 on rank 0, 1 on rank 1)."""
    model = tiny_model("lm" if kind == "lm-packed" else kind)
    if kind == "lm-packed":
        data = BucketedBatches(rows(24, "lm"), batch_size=3, seed=0, pad_token_id=PAD, packing=True, max_length=30)
        evals = BucketedBatches(rows(8, "lm", seed=1), batch_size=3, shuffle=False, pad_token_id=PAD, packing=True,
                                max_length=30)
    else:
        data, evals = batches(kind), batches(kind, sizes=(3, 4, 2), seed=1)
    cfg = config(grad_accum_steps=2, epochs=2, best_metric="accuracy" if kind == "cls" else "loss",
                 out_dir=str(out_dir) if out_dir else None, save_every_steps=1)
    history = Trainer(model, cfg).fit(data, evals)
    return history, trainable(model)


def uneven_accumulation(one_batch: bool) -> dict[str, torch.Tensor]:
    """One SGD step over micro-batches with 26 and 2 target tokens (accumulated), or over their rows as one batch."""
    g = torch.Generator().manual_seed(9)

    def example(prompt: int, response: int) -> dict:
        ids = torch.randint(1, TINY["vocab_size"], (prompt + response,), generator=g).tolist()
        return lm_example(ids[:prompt], ids[prompt:], eos_token_id=7)

    many = [example(2, 12), example(3, 10), example(2, 2)]
    few = [example(12, 1), example(9, 0)]
    data = [collate(many + few, pad_token_id=PAD)] if one_batch else [collate(many, PAD), collate(few, PAD)]
    model = tiny_model("lm")
    Trainer(model, config(optimizer="sgd", lr=0.5, grad_clip=None, weight_decay=0.0, warmup_ratio=0.0,
                          schedule="constant", epochs=1, grad_accum_steps=1 if one_batch else 2)).fit(data)
    return trainable(model)


def ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes = []
    real_write = checkpoint_module.write_atomic
    checkpoint_module.write_atomic = lambda path, writers: writes.append(str(path)) or real_write(path, writers)
    result = {"writes": writes}
    for kind in ("cls", "lm", "lm-packed"):
        history, weights = run_kind(kind, Path(folder) / f"out-{kind}")
        result[kind] = {"steps": history.steps, "evals": history.evals}
        save_file({n: t.contiguous() for n, t in weights.items()}, str(Path(folder) / f"weights-{kind}-{rank}.safetensors"))
    save_file({n: t.contiguous() for n, t in uneven_accumulation(one_batch=False).items()},
              str(Path(folder) / f"weights-accumulated-{rank}.safetensors"))
    (Path(folder) / f"result-{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cls", "lm", "lm-packed"])
def test_two_processes_train_like_one_on_the_same_global_batches(ddp_results, kind):
    single, weights = run_kind(kind, None)
    results = [json.loads((ddp_results / f"result-{r}.json").read_text()) for r in (0, 1)]
    for result in results:  # both ranks logged the same, all-reduced history
        steps = result[kind]["steps"]
        assert [s["step"] for s in steps] == [s["step"] for s in single.steps] == [1, 2, 3, 4]
        assert [s["loss"] for s in steps] == pytest.approx(single.losses, abs=1e-6)
        assert [s["grad_norm"] for s in steps] == pytest.approx([s["grad_norm"] for s in single.steps], abs=1e-6)
        assert [s["lr"] for s in steps] == single.lrs
        evals = result[kind]["evals"]
        assert len(evals) == len(single.evals) == 2
        for ours, ref in zip(evals, single.evals):
            for key, value in ref.items():
                assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    for rank in (0, 1):
        ddp_weights = load_file(str(ddp_results / f"weights-{kind}-{rank}.safetensors"))
        assert ddp_weights.keys() == weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(ddp_weights[name], tensor, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_accumulating_uneven_batches_equal_one_batch_of_their_rows(ddp_results):
    """Token-exact across ranks and micro-batches: the 2-target micro-batch weighs 2 tokens' worth, not half."""
    one_batch = uneven_accumulation(one_batch=True)
    for rank in (0, 1):
        ddp_weights = load_file(str(ddp_results / f"weights-accumulated-{rank}.safetensors"))
        assert ddp_weights.keys() == one_batch.keys()
        for name, tensor in one_batch.items():
            torch.testing.assert_close(ddp_weights[name], tensor, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_only_rank_zero_writes(ddp_results):
    writes = [json.loads((ddp_results / f"result-{r}.json").read_text())["writes"] for r in (0, 1)]
    assert writes[1] == []
    assert len(writes[0]) >= 8  # a checkpoint per step (4 per kind) plus best
    for kind in ("cls", "lm"):
        out = ddp_results / f"out-{kind}"
        lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if r["type"] == "step"] == [1, 2, 3, 4]  # once each: one writer
        assert sum(r["type"] == "summary" for r in lines) == 1
        assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-0000003", "checkpoint-0000004",
                                                         "history.jsonl"]


def ctrl_c_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Ctrl-C reaches rank 1 only, during step 2: every rank must stop after step 2 (none waits in an all-reduce)."""
    import signal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    real_step = train_module.Trainer._train_step
    calls = {"n": 0}

    def train_step(self, group, counts):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, group, counts)

    train_module.Trainer._train_step = train_step
    trainer = Trainer(tiny_model("cls"), config(epochs=2, out_dir=str(Path(folder) / "out")))
    try:
        trainer.fit(batches("cls"))
        outcome = "finished"
    except KeyboardInterrupt as err:
        outcome = str(err)
    (Path(folder) / f"ctrl-c-{rank}.json").write_text(json.dumps(
        {"outcome": outcome, "steps": [s["step"] for s in trainer.history.steps]}), encoding="utf-8")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    context = torch.multiprocessing.start_processes(ctrl_c_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                                    join=False, start_method="spawn")
    try:
        for _ in range(240):  # a rank left waiting in an all-reduce would otherwise hang the test suite
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the ranks did not both stop within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"ctrl-c-{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["steps"] == [1, 2]
        assert result["outcome"].startswith("training interrupted after step 2; saved checkpoint")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-0000002"]


# --- torchrun on the gpt2lora command ---

@pytest.mark.slow
def test_torchrun_two_processes_on_the_train_command(tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lora.app.cli",
         "train", "--task", "sst2", "--smoke", "--data-root", str(require_shared(DATA)),
         "--vocab", str(require_shared(VOCAB)), "--out", str(out), "--quiet", "--max-steps", "3",
         "--gradient-checkpointing"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 prints the table
    runs = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    steps = [json.loads(line) for line in (runs[0] / "history.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["type"] == "step"]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    saved = json.loads((runs[0] / "config.json").read_text())
    assert saved["train"]["gradient_checkpointing"] is True and saved["train"]["compile"] is False
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
