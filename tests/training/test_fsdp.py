"""FSDP2 across two gloo processes: the same training run as one process, half the per-process state,
checkpoints in safetensors that resume on any number of processes, and the torch version check."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY, free_port
from safetensors.torch import load_file, save_file

from gpt2lora import (
    GPT2,
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    TrainConfig,
    Trainer,
    apply_lora,
    merge_lora,
)
from gpt2lora.data.batching import collate, lm_example
from gpt2lora.devices import cpu_bf16_units
from gpt2lora.errors import ConfigError
from gpt2lora.peft.methods import prepare_model
from gpt2lora.training import distributed

PAD = 0
#: Wide enough that each block's weights dominate what FSDP keeps unsharded (biases, the gathered root).
SHAPE = {**TINY, "n_embd": 64, "n_layer": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n: int, kind: str, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(1, SHAPE["vocab_size"], (length,), generator=g).tolist()
        out.append({"input_ids": ids, "label": i % 3} if kind == "cls" else lm_example(ids[:2], ids[2:], eos_token_id=7))
    return out


def batches(kind: str, sizes: tuple[int, ...] = (5, 4, 1, 6, 3, 4), seed: int = 0) -> list[dict]:
    """Uneven batches: odd sizes split 3/2 over two ranks, a 1-row batch leaves rank 1 empty."""
    data, start, out = rows(sum(sizes), kind, seed), 0, []
    for size in sizes:
        out.append(collate(data[start:start + size], pad_token_id=PAD))
        start += size
    return out


def model_for(kind: str, method: str) -> torch.nn.Module:
    config = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config, num_labels=3, pad_token_id=PAD, seed=0) if kind == "cls" \
        else GPT2(config)
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    elif method == "last_n_full":
        prepare_model(model, "last_n_full", last_n=1, seed=0)
    return model


def train_config(**overrides) -> TrainConfig:
    base = {"lr": 3e-3, "min_lr": 1e-4, "warmup_ratio": 0.2, "epochs": 1, "grad_clip": 0.5, "weight_decay": 0.1,
            "progress": False, "device": "cpu", "grad_accum_steps": 2, "distributed": "fsdp"}
    return TrainConfig(**{**base, **overrides})


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """Bytes this process holds of weights, gradients and optimizer state (its shards under FSDP)."""
    params = [p for p in trainer.model.parameters()]
    weights = sum(distributed.local_tensor(p).nbytes for p in params)
    grads = sum(distributed.local_tensor(p.grad).nbytes for p in params if p.grad is not None)
    optim = sum(distributed.local_tensor(v).nbytes for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"weights": weights, "grads": grads, "optimizer": optim}


def run_case(kind: str, method: str, strategy: str, out_dir: Path | None = None, keep: int = 2,
             resume: Path | None = None) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, int]]:
    """Train; return the steps, the full trained tensors and the peak per-process state bytes (at a step)."""
    model = model_for(kind, method)
    cfg = train_config(distributed=strategy, out_dir=str(out_dir) if out_dir else None, save_every_steps=1,
                       keep_checkpoints=keep, resume_from=str(resume) if resume else None,
                       best_metric="accuracy" if kind == "cls" else "loss")
    trainer = Trainer(model, cfg)
    peak: dict[str, int] = {}

    def measure(optimizer, args, kwargs):
        for key, value in state_bytes(trainer).items():
            peak[key] = max(peak.get(key, 0), value)

    trainer.optimizer.register_step_post_hook(measure)  # after the update: gradients and moments both exist
    data = batches(kind)
    history = trainer.fit(data, batches(kind, sizes=(3, 4), seed=1))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return history.steps, weights, peak


CASES = [("lm", "full"), ("cls", "full"), ("lm", "lora"), ("cls", "last_n_full")]


def bf16_lora_case() -> tuple[list[dict], dict[str, str]]:
    """LM LoRA with ``precision="bf16"`` (FSDP when distributed): the steps, the dtype of each frozen matrix as
    this process holds it (its shard under FSDP), and after the fit, that of a block matrix with LoRA merged."""
    model = model_for("lm", "lora")
    trainer = Trainer(model, train_config(precision="bf16"))
    held = {name: str(distributed.local_tensor(p).dtype) for name, p in model.named_parameters()
            if not p.requires_grad and p.dim() == 2}
    history = trainer.fit(batches("lm"), batches("lm", sizes=(3, 4), seed=1))
    merge_lora(model)  # the gathered model, as a user merges and saves it after training
    held["merged"] = str(model.transformer.h[0].attn.c_attn.weight.dtype)
    return history.steps, held


def fsdp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(folder)
    result: dict = {}
    try:
        Trainer(model_for("lm", "full"), train_config(batch_size=5))
        result["uneven"] = "accepted"
    except ConfigError as err:
        result["uneven"] = str(err)
    for kind, method in CASES:
        for strategy in ("fsdp", "ddp"):
            steps, weights, peak = run_case(kind, method, strategy)
            result[f"{kind}-{method}-{strategy}"] = {"steps": steps, "peak": peak}
            if strategy == "fsdp":
                # after fit the weights are gathered: every rank holds the full trained model
                save_file({n: t.contiguous() for n, t in weights.items()},
                          str(out / f"weights-{kind}-{method}-{rank}.safetensors"))
    if cpu_bf16_units():  # elsewhere precision="bf16" is refused on the CPU
        steps, held = bf16_lora_case()
        result["lm-lora-fsdp-bf16"] = {"steps": steps, "held": held}
    # a run that wrote a checkpoint at every step, resumed from step 1 by these two processes (and, in the
    # test, by one): the checkpoint holds full tensors, whatever the number of processes that wrote it
    run_case("lm", "full", "fsdp", out / "run", keep=3)
    steps, weights, _ = run_case("lm", "full", "fsdp", None, resume=out / "run" / "checkpoint-0000001")
    result["resumed-2"] = {"steps": steps}
    save_file({n: t.contiguous() for n, t in weights.items()}, str(out / f"weights-resumed-{rank}.safetensors"))
    (out / f"result-{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    context = torch.multiprocessing.start_processes(fsdp_worker, args=(2, free_port(), str(folder)), nprocs=2,
                                                    join=False, start_method="spawn")
    try:
        for _ in range(600):  # a rank stuck in a collective would otherwise hang the suite
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the two FSDP processes did not finish within 600 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return folder


def results(folder: Path) -> list[dict]:
    return [json.loads((folder / f"result-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,method", CASES)
def test_fsdp_trains_like_one_process_on_the_same_global_batches(fsdp_results, kind, method):
    single, weights, _ = run_case(kind, method, "fsdp")  # one process: "fsdp" is ignored
    assert len(single) == 3  # 6 batches, 2 accumulated per step
    for result in results(fsdp_results):
        steps = result[f"{kind}-{method}-fsdp"]["steps"]
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in single], abs=1e-5)
        # the norm sums shards in another order than one process: equal to float32 rounding of the total (on an
        # AVX-512 EPYC a norm of 6.2 differed by 1.3e-5 between the two), relative to the norm's size
        assert [s["grad_norm"] for s in steps] == pytest.approx([s["grad_norm"] for s in single], rel=1e-5,
                                                                abs=1e-5)
    for rank in (0, 1):
        trained = load_file(str(fsdp_results / f"weights-{kind}-{method}-{rank}.safetensors"))
        assert trained.keys() == weights.keys()
        for name, tensor in weights.items():
            # Each rank's rows go through other kernels than one process's batch (another row count, and rows
            # without padding take causal attention instead of row by row), so gradients differ in their last
            # bits; three AdamW steps at lr 3e-3 (each entry's update divided by its own running scale) turn that
            # into up to a few 1e-5 on single entries (5.9e-5 seen on an AVX-512 EPYC): 2-3% of one step's
            # update, while a wrong or missing gradient shard moves entries by whole updates (3e-3 a step).
            torch.testing.assert_close(trained[name], tensor, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_bf16_units(), reason="this CPU has no bf16 matrix units: bf16 training is refused")
def test_fsdp_bf16_lora_shards_the_frozen_matrices_in_bf16_and_trains_like_one_process(fsdp_results):
    single, held = bf16_lora_case()
    # the token embedding (the tied head) and the block matrices; position embeddings stay fp32
    assert held["transformer.wte.weight"] == "torch.bfloat16"
    assert held["transformer.h.0.attn.c_attn.weight"] == "torch.bfloat16"
    assert held["merged"] == "torch.float32"  # merging writes the checkpoint's dtype again
    for result in results(fsdp_results):
        sharded = result["lm-lora-fsdp-bf16"]
        # held before sharding: cast after it, FSDP would keep and gather fp32 shards (and cast per step)
        assert sharded["held"] == held
        # bf16 products over each rank's half of the rows round differently from one process's
        assert [s["loss"] for s in sharded["steps"]] == pytest.approx([s["loss"] for s in single], abs=2e-3)


@pytest.mark.slow
def test_fsdp_holds_about_half_of_ddps_weights_gradients_and_optimizer_state(fsdp_results):
    for result in results(fsdp_results):
        fsdp, ddp = result["lm-full-fsdp"]["peak"], result["lm-full-ddp"]["peak"]
        assert set(fsdp) == {"weights", "grads", "optimizer"}
        for key in ("weights", "grads", "optimizer"):
            assert 0.45 < fsdp[key] / ddp[key] < 0.55, (key, fsdp[key], ddp[key])
        lora_fsdp, lora_ddp = result["lm-lora-fsdp"]["peak"], result["lm-lora-ddp"]["peak"]
        assert 0.45 < lora_fsdp["optimizer"] / lora_ddp["optimizer"] < 0.55


@pytest.mark.slow
def test_fsdp_checkpoints_resume_on_two_or_one_process_like_an_uninterrupted_run(fsdp_results):
    uninterrupted, weights, _ = run_case("lm", "full", "fsdp")
    checkpoint = fsdp_results / "run" / "checkpoint-0000001"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["optimizer.safetensors", "trainable.safetensors",
                                                           "trainer_state.json"]
    saved = load_file(str(checkpoint / "trainable.safetensors"))  # full tensors, not one rank's shards
    assert {n: tuple(t.shape) for n, t in saved.items()} == {n: tuple(t.shape) for n, t in weights.items()}
    one_process, one_weights, _ = run_case("lm", "full", "fsdp", resume=checkpoint)
    runs = [r["resumed-2"]["steps"] for r in results(fsdp_results)] + [one_process]
    for steps in runs:
        assert [s["step"] for s in steps] == [1, 2, 3]  # the history of step 1 comes from the checkpoint
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in uninterrupted], abs=1e-5)
    # The products may run on other exact kernels than in the uninterrupted run: one process takes the batch's
    # rows through other kernels than each rank (see test_fsdp_trains_like_one_process), and resumed ranks read
    # the choice of MKL or oneDNN for each large fp32 product that the first rank stored, where each rank of the
    # uninterrupted run timed its own and may have kept the other where the two are about as fast. Their
    # gradients differ in the last bits, which AdamW turns into up to a few 1e-5 on single entries (2.3e-5 seen
    # on a Zen 3 EPYC), while a lost step or optimizer state moves entries by whole updates (3e-3 a step).
    for trained in [load_file(str(fsdp_results / f"weights-resumed-{r}.safetensors")) for r in (0, 1)] + [one_weights]:
        for name, tensor in weights.items():
            torch.testing.assert_close(trained[name], tensor, atol=1e-4, rtol=0)


def test_fsdp_refuses_a_torch_that_sums_gradients(monkeypatch):
    for old in ("2.8.0", "2.6.0+cu124", "2.7.1"):
        with pytest.raises(ConfigError, match=r"distributed=.fsdp. needs torch >= 2\.9 \(found " + re.escape(old)):
            distributed.check_fsdp_torch(old)
    distributed.check_fsdp_torch("2.9.0")
    distributed.check_fsdp_torch("3.0.1+cpu")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    with pytest.raises(ConfigError, match="needs torch >= 2.9"):
        Trainer(model_for("lm", "full"), train_config())


@pytest.mark.slow
def test_a_batch_that_does_not_divide_over_the_processes_is_named(fsdp_results):
    for result in results(fsdp_results):
        assert result["uneven"] == ("TrainConfig.batch_size=5 does not divide over WORLD_SIZE=2 processes; use a "
                                    "multiple of 2")


def test_unknown_strategy_is_named():
    with pytest.raises(ConfigError, match="TrainConfig.distributed: expected one of ddp, fsdp, got 'zero3'"):
        TrainConfig(distributed="zero3")
