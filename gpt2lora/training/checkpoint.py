"""Training checkpoints: write atomically, find the latest, save / restore the trainer state, rotate.

A checkpoint folder holds the trainable tensors (``trainable.safetensors``), the optimizer state and
RNG states (``optimizer.safetensors``) and everything else as JSON (``trainer_state.json``: step, data
position, history, schedule, scaler, Python RNG). Only safetensors and JSON: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..constants import (
    BEST_CHECKPOINT,
    CHECKPOINT_PREFIX,
    HISTORY_FILE,
    OPTIMIZER_FILE,
    TRAINABLE_WEIGHTS_FILE,
    TRAINER_STATE_FILE,
)
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..model.tensorcheck import check_training_checkpoint
from .distributed import current, full_tensor, gather_bytes, is_sharded, shard_like
from .history import json_safe

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(folder: Path, writers: Mapping[str, Callable[[Path], None]]) -> Path:
    """Write files into a temporary sibling folder, fsync them, then rename it to ``folder``.

    A crash leaves either the old folder or the complete new one, never a half-written checkpoint.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, write in writers.items():
        write(tmp / name)
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    if old.exists():
        shutil.rmtree(old)
    return folder


#: What a process killed inside :func:`write_atomic` or a checkpoint rotation leaves in an ``out_dir``.
LEFTOVER = re.compile(rf"\.({CHECKPOINT_PREFIX}\d+|{BEST_CHECKPOINT}|{re.escape(HISTORY_FILE)})"
                      r"\.(?:(tmp|old)-(\d+)|deleting)")


def finish_interrupted_writes(out_dir: Path) -> None:
    """Put back what a kill in the middle of writing or rotating checkpoints left in ``out_dir``.

    Killed between :func:`write_atomic`'s two renames, a process leaves its finished new folder
    (``.NAME.tmp-PID``, complete before the old one moves) beside the old one (``.NAME.old-PID``) and nothing
    called NAME: the new folder takes the name. Every other leftover (a half-written temp folder or history, an
    old copy already replaced, a rotated checkpoint half deleted) is removed.
    """
    if not out_dir.is_dir():
        return
    leftovers = [(p, m) for p in out_dir.iterdir() if (m := LEFTOVER.fullmatch(p.name))]
    for _, match in leftovers:
        name, kind, pid = match.groups()
        new = out_dir / f".{name}.tmp-{pid}"
        if kind == "old" and not (out_dir / name).exists() and new.is_dir():
            os.replace(new, out_dir / name)
            _fsync_dir(out_dir)
    for path, _ in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def step_folder(out_dir: Path, step: int) -> Path:
    """``out_dir/checkpoint-0000042``: where the checkpoint of optimizer step ``step`` goes."""
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:07d}"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest ``checkpoint-N`` inside an ``out_dir``."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"TrainConfig.resume_from: {path} does not exist")
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)) and (p / TRAINER_STATE_FILE).is_file()]
    if not found:
        raise CheckpointNotFoundError(f"TrainConfig.resume_from: {path} holds no {TRAINER_STATE_FILE} and no "
                                      f"{CHECKPOINT_PREFIX}N folder with one")
    return max(found)[1]


def rotate_checkpoints(out_dir: Path, keep: int) -> None:
    """Keep the ``keep`` latest ``checkpoint-N`` folders; drop temp folders of a process killed mid-write."""
    finish_interrupted_writes(out_dir)  # what a process killed mid-write left
    steps = sorted(p for p in out_dir.iterdir() if re.fullmatch(CHECKPOINT_PREFIX + r"\d+", p.name))
    for old in steps[:-keep]:
        # rename first: a kill during rmtree must not leave a half-deleted folder under a checkpoint name
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _cpu(tensor: Tensor) -> Tensor:
    return full_tensor(tensor.detach()).to("cpu").clone().contiguous()


def _rank_key(name: str, rank: int) -> str:
    """Rank 0 keeps the single-process key (``rng.torch``); rank r > 0 gets ``rng.torch.rank<r>``."""
    return name if rank == 0 else f"{name}.rank{rank}"


def _gather_rng_states(device: torch.device) -> tuple[dict[str, Tensor], list[list[Any]]]:
    """Every rank's torch (and CUDA) and Python RNG states, collected on every rank.

    Each rank draws its own dropout masks, so a resumed distributed run continues exactly only when each rank
    gets its own states back. A collective: every rank of a distributed run must call it.
    """
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors: dict[str, Tensor] = {}
    for name, state in states.items():
        for rank, data in enumerate(gather_bytes(state.numpy().tobytes())):
            tensors[_rank_key(name, rank)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    version, py_state, gauss = random.getstate()
    python = json.dumps([version, list(py_state), gauss]).encode("utf-8")
    return tensors, [json.loads(data) for data in gather_bytes(python)]


def _restore_rng_states(opt_tensors: Mapping[str, Tensor], state: Mapping[str, Any], device: torch.device) -> None:
    """This rank's RNG states from :func:`_gather_rng_states`; rank 0's where the run had fewer ranks."""
    rank = current().rank
    by_rank = state.get("python_rng_by_rank") or []
    if rank > 0 and (_rank_key("rng.torch", rank) not in opt_tensors or len(by_rank) < rank):
        rank = 0
    torch.set_rng_state(opt_tensors[_rank_key("rng.torch", rank)])
    cuda_key = _rank_key("rng.cuda", rank)
    if cuda_key in opt_tensors and device.type == "cuda":
        torch.cuda.set_rng_state(opt_tensors[cuda_key], device)
    version, py_state, gauss = state["python_rng"] if rank == 0 else by_rank[rank - 1]
    random.setstate((version, tuple(py_state), gauss))


def save_state(folder: str | os.PathLike, params: Sequence[tuple[str, nn.Parameter]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               state: dict[str, Any], config: Any, write: bool = True) -> Path:
    """Write one checkpoint atomically.

    Every rank of a distributed run must call this: each rank's RNG states are gathered (and, under FSDP, the
    sharded tensors whole); only the one with ``write`` (rank 0) writes the files.

    ``params``: the trainable ``(name, tensor)`` pairs; ``state``: the trainer's JSON-able position and
    history (step, epoch, batch, bad_evals, total_steps, batches_per_epoch, best, history_*); ``config``:
    the :class:`~gpt2lora.config.TrainConfig`, recorded for reference. The optimizer's parameter groups
    must carry a ``names`` list (see :func:`gpt2lora.training.trainer.parameter_groups`).
    """
    rng_tensors, python_rngs = _gather_rng_states(device)
    if not write and not any(is_sharded(p) for _, p in params):
        return Path(folder)  # nothing to gather: the tensors rank 0 writes are its own
    weights = {name: _cpu(p) for name, p in params}
    opt = optimizer.state_dict()
    opt_tensors: dict[str, Tensor] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                opt_tensors[f"state.{index}.{key}"] = _cpu(value)
            else:
                opt_scalars.setdefault(str(index), {})[key] = value
    if not write:
        return Path(folder)
    opt_tensors.update(rng_tensors)
    full = {
        "format_version": FORMAT_VERSION, **state, "trainable": [n for n, _ in params],
        "optimizer": config.optimizer, "optimizer_param_order": [n for g in optimizer.param_groups for n in g["names"]],
        "optimizer_scalars": opt_scalars, "scaler": scaler.state_dict(),
        "python_rng": python_rngs[0], "python_rng_by_rank": python_rngs[1:], "config": dataclasses.asdict(config),
    }
    writers = {
        TRAINABLE_WEIGHTS_FILE: lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
        OPTIMIZER_FILE: lambda p: save_file(opt_tensors, str(p), metadata={"format": "pt"}),
        TRAINER_STATE_FILE: lambda p: p.write_text(json.dumps(json_safe(full), indent=1) + "\n", encoding="utf-8"),
    }
    return write_atomic(Path(folder), writers)


def load_state(path: str | os.PathLike, params: Sequence[tuple[str, nn.Parameter]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               expected: Mapping[str, Any], allow_nonfinite: bool = False,
               validate: Callable[[Path, dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Restore what :func:`save_state` wrote into ``params``, ``optimizer``, ``scaler`` and the RNGs.

    Tensors that are not floats, or hold NaN/inf (unless ``allow_nonfinite``), are refused by name.

    ``path``: a checkpoint folder or an ``out_dir`` (its latest). ``expected``: values the checkpoint
    must hold to continue this run (total_steps, batches_per_epoch, optimizer); ``validate(folder, state)``
    may refuse it too, before anything changes. Returns the folder and its JSON state (step, epoch, batch, bad_evals, best, history_steps, history_evals).
    """
    folder = find_checkpoint(path)
    try:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(folder / TRAINABLE_WEIGHTS_FILE))
        opt_tensors = load_file(str(folder / OPTIMIZER_FILE))
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"checkpoint {folder}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {err}") from None
    check_training_checkpoint(folder, weights, opt_tensors, TRAINABLE_WEIGHTS_FILE, OPTIMIZER_FILE, allow_nonfinite)
    missing_keys = [k for k in ("step", "epoch", "batch", "trainable", "optimizer_scalars", "python_rng")
                    if k not in state]
    if missing_keys:
        raise CheckpointError(f"{folder / TRAINER_STATE_FILE}: missing keys {', '.join(missing_keys)}")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / TRAINER_STATE_FILE}: format_version {state.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    names = [n for n, _ in params]
    if state["trainable"] != names:
        missing = sorted(set(names) - set(state["trainable"]))
        extra = sorted(set(state["trainable"]) - set(names))
        raise CheckpointError(f"checkpoint {folder} trained other tensors than this model: missing "
                              f"{missing[:5]}, unexpected {extra[:5]} (same model and LoRA config needed)")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ConfigError(f"TrainConfig.resume_from: {folder} has {key}={state.get(key)!r} but this run has "
                              f"{value!r}; resume with the same data and TrainConfig")
    if validate is not None:
        validate(folder, state)
    with torch.no_grad():
        for name, param in params:
            tensor = weights.get(name)
            if tensor is None or tensor.shape != param.shape:
                raise CheckpointError(f"{folder / TRAINABLE_WEIGHTS_FILE}: tensor {name} is missing or has shape "
                                      f"{None if tensor is None else tuple(tensor.shape)}, expected "
                                      f"{tuple(param.shape)}")
            param.copy_(shard_like(tensor, param))  # under FSDP: this rank's shard of the full tensor
    by_index = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict[str, Any]] = {}
    for key, tensor in opt_tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            param = by_index[int(index)] if int(index) < len(by_index) else None
            if param is not None and tensor.shape == param.shape:  # moments follow the parameter's sharding
                tensor = shard_like(tensor, param)
            opt_state.setdefault(int(index), {})[name] = tensor
    for index, values in state["optimizer_scalars"].items():
        opt_state.setdefault(int(index), {}).update(values)
    param_groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _restore_rng_states(opt_tensors, state, device)
    return folder, state
