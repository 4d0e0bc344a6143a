"""A small training run that tests start in a subprocess and kill on purpose.

``python tests/crash_worker.py trainer OUT [--resume] [--keep N] [--eval] [HOOKS]`` trains a tiny LoRA
classifier (dropout on, so resuming exactly also needs the RNG) with a checkpoint after every step into OUT
(the last ``--keep`` of them kept, 50 by default; ``--eval`` evaluates after every step, so ``OUT/best`` is
rewritten whenever the eval accuracy improves: at steps 1 and 2), and writes ``OUT/losses.json`` when it finishes.

``python tests/crash_worker.py cli [--kill-at-step N] [--sigint-at-step N] -- ARGS`` runs
``gpt2lora ARGS`` with the same hooks; ``example`` instead of ``cli`` runs ``examples/sentiment.py ARGS``.

Hooks (deterministic, so a test knows what is on disk when the process dies):
- ``--kill-at-step N``: SIGKILL just before optimizer step N starts (steps 1..N-1 are done).
- ``--kill-in-save N``: the N-th safetensors file the Trainer writes is cut in half, then SIGKILL,
  i.e. the process dies in the middle of writing a checkpoint.
- ``--sigint-at-step N``: send ourselves SIGINT (Ctrl-C) while optimizer step N runs.
- ``--pause-at-step N --pause-file F``: before optimizer step N, write ``F.paused`` and wait (at most a minute)
  until ``F`` exists, so a test can act while the run is in a known state.
- ``--kill-in-optimizer-step N``: inside ``optimizer.step()`` of step N, SIGKILL after half the trainable
  tensors got their update and before the others do.
- ``--kill-in-history-append N``: the N-th line appended to ``history.jsonl`` is written half, then SIGKILL.
- ``--kill-after-checkpoint N``: SIGKILL once the N-th checkpoint folder is complete, before old ones rotate.
- ``--kill-in-swap N``: the N-th time a checkpoint folder is rewritten in place (``best``), SIGKILL between
  moving the old folder aside and renaming the new one into its place.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Self

import torch

from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.data.batching import BucketedBatches
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.peft.lora import apply_lora
from gpt2lora.training import checkpoint as checkpoint_module
from gpt2lora.training import history as history_module
from gpt2lora.training import trainer as train_module

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 97}
PAD = 0
N_ROWS, BATCH_SIZE, EPOCHS = 36, 4, 2  # 9 batches per epoch, 18 steps in all


def build_model(seed: int = 0, lora_seed: int = 0) -> GPT2ForSequenceClassification:
    """A tiny LoRA classifier with dropout everywhere; the frozen base comes from ``seed``."""
    config = GPT2Config(**SHAPE, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2ForSequenceClassification(config, num_labels=2, pad_token_id=PAD, seed=seed)
    return apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.1), seed=lora_seed)


def build_data(seed: int = 0) -> BucketedBatches:
    """Shuffled, length-bucketed batches of random rows whose label depends on the first token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(N_ROWS):
        length = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(1, SHAPE["vocab_size"], (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "label": int(ids[0] % 2)})
    return BucketedBatches(rows, batch_size=BATCH_SIZE, shuffle=True, seed=seed, pad_token_id=PAD)


def build_eval_data() -> BucketedBatches:
    """Eight rows of another seed, evaluated after every step when a test wants ``best`` rewritten."""
    g = torch.Generator().manual_seed(99)
    rows = []
    for _ in range(8):
        ids = torch.randint(1, SHAPE["vocab_size"], (int(torch.randint(3, 15, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": ids.tolist(), "label": int(ids[0] % 2)})
    return BucketedBatches(rows, batch_size=BATCH_SIZE, shuffle=False, pad_token_id=PAD)


def build_config(out: str | None, resume: bool = False, keep: int = 50, evaluate: bool = False) -> TrainConfig:
    return TrainConfig(lr=3e-3, min_lr=1e-4, warmup_ratio=0.1, epochs=EPOCHS, grad_clip=1.0, weight_decay=0.1,
                       device="cpu", precision="fp32", progress=False, out_dir=out, save_every_steps=1,
                       keep_checkpoints=keep, resume_from=out if resume else None, seed=7,
                       eval_every_steps=1 if evaluate else None, best_metric="accuracy")


def install_hooks(kill_at_step: int | None, kill_in_save: int | None, sigint_at_step: int | None,
                  pause_at_step: int | None = None, pause_file: str | None = None) -> None:
    """Patch the Trainer so the process dies (or gets Ctrl-C, or waits) at a known point."""
    step_calls = {"n": 0}
    original_step = train_module.Trainer._train_step

    def train_step(self, group, counts):
        step_calls["n"] += 1
        if pause_at_step is not None and step_calls["n"] == pause_at_step:
            Path(f"{pause_file}.paused").write_text(str(os.getpid()))
            for _ in range(1200):  # until the test creates pause_file (at most a minute)
                if Path(pause_file).exists():
                    break
                time.sleep(0.05)
        if kill_at_step is not None and step_calls["n"] == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if sigint_at_step is not None and step_calls["n"] == sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once, in the middle of this step
        return original_step(self, group, counts)

    train_module.Trainer._train_step = train_step
    if kill_in_save is None:
        return
    save_calls = {"n": 0}
    original_save = checkpoint_module.save_file

    def save_file(tensors, filename, metadata=None):
        save_calls["n"] += 1
        original_save(tensors, filename, metadata=metadata)
        if save_calls["n"] == kill_in_save:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_module.save_file = save_file


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class TornFile:
    """A text file whose next write lands half on disk before the process dies."""

    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, text: str) -> int:
        self.file.write(text[: len(text) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        kill()
        return 0


def install_kill_hooks(in_optimizer_step: int | None, in_history_append: int | None,
                       after_checkpoint: int | None, in_swap: int | None) -> None:
    """Patch the Trainer's collaborators so the process is SIGKILLed at one of the points named above."""
    if in_optimizer_step is not None:
        original_build = train_module.build_optimizer

        def build_optimizer(model, config):
            optimizer = original_build(model, config)
            real_step, calls = optimizer.step, {"n": 0}

            def step(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == in_optimizer_step:
                    group = optimizer.param_groups[0]  # the first half of its tensors get the update, then death
                    optimizer.param_groups = [{**group, "params": group["params"][: len(group["params"]) // 2]}]
                    real_step()
                    kill()
                return real_step(*args, **kwargs)

            optimizer.step = step
            return optimizer

        train_module.build_optimizer = build_optimizer
    if in_history_append is not None:
        appends = {"n": 0}

        def open_(file, mode="r", *args, **kwargs):
            handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
            if Path(file).name == train_module.HISTORY_FILE and "a" in mode:
                appends["n"] += 1
                if appends["n"] == in_history_append:
                    return TornFile(handle)
            return handle

        history_module.open = open_  # the module's own lookups of open() find this first
    if after_checkpoint is not None:
        original_write, writes = checkpoint_module.write_atomic, {"n": 0}

        def write_atomic(folder, writers):
            done = original_write(folder, writers)
            writes["n"] += 1
            if writes["n"] == after_checkpoint:
                kill()
            return done

        checkpoint_module.write_atomic = write_atomic
    if in_swap is not None:
        original_replace, swaps = os.replace, {"n": 0}

        def replace(src, dst):
            original_replace(src, dst)
            if ".old-" in Path(dst).name:  # write_atomic moved the previous folder aside
                swaps["n"] += 1
                if swaps["n"] == in_swap:
                    kill()

        os.replace = replace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("trainer", "cli"))
    parser.add_argument("out", nargs="?")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--sigint-at-step", type=int)
    parser.add_argument("--kill-in-optimizer-step", type=int)
    parser.add_argument("--kill-in-history-append", type=int)
    parser.add_argument("--kill-after-checkpoint", type=int)
    parser.add_argument("--kill-in-swap", type=int)
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--pause-file")
    parser.add_argument("--keep", type=int, default=50)
    parser.add_argument("--eval", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(rest) - (1 if "--" in argv else 0)])
    torch.set_num_threads(1)
    install_hooks(args.kill_at_step, args.kill_in_save, args.sigint_at_step, args.pause_at_step, args.pause_file)
    install_kill_hooks(args.kill_in_optimizer_step, args.kill_in_history_append, args.kill_after_checkpoint,
                       args.kill_in_swap)
    if args.mode == "cli":
        from gpt2lora.app.cli import main as cli_main

        return cli_main(rest)
    trainer = train_module.Trainer(build_model(), build_config(args.out, args.resume, args.keep, args.eval))
    try:
        history = trainer.fit(build_data(), build_eval_data() if args.eval else None)
    except KeyboardInterrupt as err:
        print(f"worker: {err}", file=sys.stderr)
        return 130
    (Path(args.out) / "losses.json").write_text(json.dumps(history.losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
