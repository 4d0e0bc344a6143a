"""A small training run that tests start in a subprocess and kill on purpose.

``python tests/crash_worker.py trainer OUT [--resume] [--kill-at-step N] [--kill-in-save N]
[--sigint-at-step N]`` trains a tiny LoRA classifier (dropout on, so resuming exactly also needs the RNG)
with a checkpoint after every step into OUT, and writes ``OUT/losses.json`` when it finishes.

``python tests/crash_worker.py cli [--kill-at-step N] [--sigint-at-step N] -- ARGS`` runs
``gpt2lora ARGS`` with the same hooks; ``example`` instead of ``cli`` runs ``examples/sentiment.py ARGS``.

Hooks (deterministic, so a test knows what is on disk when the process dies):
- ``--kill-at-step N``: SIGKILL just before optimizer step N starts (steps 1..N-1 are done).
- ``--kill-in-save N``: the N-th safetensors file the Trainer writes is cut in half, then SIGKILL,
  i.e. the process dies in the middle of writing a checkpoint.
- ``--sigint-at-step N``: send ourselves SIGINT (Ctrl-C) while optimizer step N runs.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from gpt2lora import checkpoint as checkpoint_module
from gpt2lora import train as train_module
from gpt2lora.batching import BucketedBatches
from gpt2lora.config import GPT2Config, LoRAConfig, TrainConfig
from gpt2lora.heads import GPT2ForSequenceClassification
from gpt2lora.lora import apply_lora

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


def build_config(out: str | None, resume: bool = False) -> TrainConfig:
    return TrainConfig(lr=3e-3, min_lr=1e-4, warmup_ratio=0.1, epochs=EPOCHS, grad_clip=1.0, weight_decay=0.1,
                       device="cpu", precision="fp32", progress=False, out_dir=out, save_every_steps=1,
                       keep_checkpoints=50, resume_from=out if resume else None, seed=7)


def install_hooks(kill_at_step: int | None, kill_in_save: int | None, sigint_at_step: int | None) -> None:
    """Patch the Trainer so the process dies (or gets Ctrl-C) at a known point."""
    step_calls = {"n": 0}
    original_step = train_module.Trainer._train_step

    def train_step(self, group, counts):
        step_calls["n"] += 1
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("trainer", "cli", "example"))
    parser.add_argument("out", nargs="?")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--sigint-at-step", type=int)
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(rest) - (1 if "--" in argv else 0)])
    torch.set_num_threads(1)
    install_hooks(args.kill_at_step, args.kill_in_save, args.sigint_at_step)
    if args.mode == "cli":
        from gpt2lora.cli import main as cli_main

        return cli_main(rest)
    if args.mode == "example":
        sys.argv = ["sentiment.py", *rest]
        try:
            runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "sentiment.py"), run_name="__main__")
        except SystemExit as done:
            return int(done.code or 0)
        return 0
    trainer = train_module.Trainer(build_model(), build_config(args.out, args.resume))
    try:
        history = trainer.fit(build_data())
    except KeyboardInterrupt as err:
        print(f"worker: {err}", file=sys.stderr)
        return 130
    (Path(args.out) / "losses.json").write_text(json.dumps(history.losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
