"""The training loop: optimizer groups, warmup + cosine, clipping, accumulation, autocast, eval, checkpoints.

``Trainer(model, TrainConfig(...)).fit(train_batches, eval_batches)`` takes re-iterable batches
(dicts with ``input_ids``, ``attention_mask``, ``labels``; see :mod:`gpt2lora.batching`) in the
order given, and returns a :class:`History`. Checkpoints hold only safetensors and JSON (no pickle).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .batching import IGNORE_INDEX
from .config import TrainConfig
from .diagnostics import adapter_update_norm
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, DataError, TrainingError
from .lora import is_lora_b
from .metrics import classification_metrics, mean_loss, peak_memory_mb, perplexity, throughput
from .model import Transformer

CHECKPOINT_PREFIX = "checkpoint-"
BEST_NAME = "best"
HISTORY_NAME = "history.jsonl"
STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
FORMAT_VERSION = 1

logger = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro",
                          "precision_weighted", "recall_weighted", "f1_weighted")
LM_METRICS = ("loss", "perplexity")
LOWER_IS_BETTER = ("loss", "perplexity")


# --- schedule and optimizer ---

def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """W = ceil(warmup_ratio * S)."""
    return math.ceil(warmup_ratio * total_steps)


def lr_at_step(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup (s < W): ``min_lr + (lr - min_lr) (s + 1) / W``. Then ``cosine``:
    ``min_lr + ½ (lr - min_lr)(1 + cos(π (s - W) / max(1, S - W)))``, or ``constant``: ``lr``.
    """
    lr, low = config.lr, config.min_lr
    warm = warmup_steps(total_steps, config.warmup_ratio)
    if step < warm:
        return low + (lr - low) * (step + 1) / warm
    if config.schedule == "constant":
        return lr
    progress = (step - warm) / max(1, total_steps - warm)
    return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable tensor, tied tensors once, in module order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, weight_decay: float,
                     loraplus_lr_ratio: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: tensors with ≥ 2 dims get ``weight_decay``; biases, LayerNorms (1-D) get none.

    With ``loraplus_lr_ratio`` (LoRA+) the groups are peft's ``create_loraplus_optimizer`` ones: LoRA B
    matrices, and every 1-D tensor (biases, DoRA magnitudes), train at ``ratio × lr``; A matrices and the
    other matrices (a classification head) at ``lr``. Each group's ``lr_scale`` is that factor.
    """
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("Trainer: the model has no trainable parameters (every requires_grad is False)")
    decay = [(n, p) for n, p in params if p.dim() >= 2]
    rest = [(n, p) for n, p in params if p.dim() < 2]
    if loraplus_lr_ratio is None:
        plan = [(decay, weight_decay, 1.0), (rest, 0.0, 1.0)]
    else:
        plan = [([(n, p) for n, p in decay if not is_lora_b(n)], weight_decay, 1.0),
                ([(n, p) for n, p in decay if is_lora_b(n)], weight_decay, float(loraplus_lr_ratio)),
                (rest, 0.0, float(loraplus_lr_ratio))]
    return [{"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd, "lr_scale": scale}
            for g, wd, scale in plan if g]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay), SGD or SGD with momentum over :func:`parameter_groups`.

    For the SGD variants torch adds the decay to the gradient (L2), the classic SGD form.
    """
    groups = parameter_groups(model, config.weight_decay, config.loraplus_lr_ratio)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    momentum = config.momentum if config.optimizer == "sgd_momentum" else 0.0
    return torch.optim.SGD(groups, lr=config.lr, momentum=momentum)


# --- model kind, batches and loss ---

def is_classifier(model: nn.Module) -> bool:
    """Classification when the model has a ``score`` head or ``num_labels``; else a language model."""
    return hasattr(model, "score") or hasattr(model, "num_labels")


def enable_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch block recomputation on (or off) in every gpt2lora ``Transformer`` inside ``model``; returns how many."""
    found = [m for m in model.modules() if isinstance(m, Transformer)]
    if not found:
        raise ConfigError(f"TrainConfig.gradient_checkpointing: {type(model).__name__} holds no gpt2lora Transformer "
                          "(GPT2 or GPT2ForSequenceClassification) whose blocks could be checkpointed")
    for module in found:
        module.gradient_checkpointing = enabled
    return len(found)


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``; a :class:`ConfigError` when this torch build cannot compile at all."""
    if not hasattr(torch, "compile"):
        raise ConfigError(f"TrainConfig.compile=True but torch {torch.__version__} has no torch.compile; "
                          "set compile=False")
    try:
        return torch.compile(module)
    except RuntimeError as err:  # e.g. a Python version dynamo does not support yet
        raise ConfigError(f"TrainConfig.compile=True but torch.compile is unavailable here ({err}); "
                          "set compile=False") from None


def _is_compiler_failure(err: BaseException) -> bool:
    """Errors raised by dynamo / inductor themselves (no C++ compiler, unsupported op), not by the model."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy over the batch's target tokens, and their number.

    The logit at position t predicts token t+1, so labels are shifted left by one here; ``-100`` is skipped.
    """
    targets = labels[:, 1:].reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / max(count, 1), count


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``; half precision only on CUDA (CPU trains in fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"TrainConfig.precision={precision!r} needs a CUDA device; on {device} use 'fp32' "
                          "or 'auto'")
    return precision


@dataclass
class History:
    """What a :meth:`Trainer.fit` run did: per-step records, evaluations, best result and speed.

    ``steps``: dicts with ``step`` (1-based count of optimizer steps), ``epoch``, ``loss`` (mean over
    the step's batches), ``lr`` (= ``lr_at_step(step - 1)``), ``grad_norm`` (before clipping) and
    ``skipped`` (true when a non-finite gradient norm skipped the update). ``evals``: dicts with
    ``step``, ``epoch`` and the metrics of :meth:`Trainer.evaluate`.
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    """``{"step", "metric", "value", "path"}`` of the best evaluation (None without eval data)."""
    stopped_early: bool = False
    total_steps: int = 0
    runtime_s: float = 0.0
    samples_per_s: float = 0.0
    steps_per_s: float = 0.0
    tokens_per_s: float = 0.0
    """Real (non-padding) tokens per second."""
    peak_memory_mb: float = 0.0
    """CUDA max allocated on a GPU, the process's peak RSS on the CPU."""

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    @property
    def lrs(self) -> list[float]:
        return [s["lr"] for s in self.steps]

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step and per-eval lists."""
        skip = {"steps", "evals"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of ``epoch`` already consumed: where the data resumes."""
    bad_evals: int = 0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest ``checkpoint-N`` inside an ``out_dir``."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"TrainConfig.resume_from: {path} does not exist")
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)) and (p / STATE_NAME).is_file()]
    if not found:
        raise CheckpointNotFoundError(f"TrainConfig.resume_from: {path} holds no {STATE_NAME} and no "
                                      f"{CHECKPOINT_PREFIX}N folder with one")
    return max(found)[1]


class Trainer:
    """Trains a gpt2lora model (full fine-tuning or LoRA: whatever has ``requires_grad``).

    Classification models (with ``score`` / ``num_labels``) use cross-entropy on (B, num_labels)
    logits against class ids (B,); language models use the shifted token cross-entropy of
    :func:`lm_loss`. With gradient accumulation each batch's mean loss is divided by the number of
    batches in the step, so a step's gradient is the mean of its batches' gradients.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or an already initialised ``torch.distributed`` group) the
    model is wrapped in ``DistributedDataParallel`` and each rank trains on its contiguous slice of
    every batch: ``batch_size`` and the batches given to :meth:`fit` are the *global* batch (give every
    rank the same batches), and losses, gradients and history equal one process on those batches
    (dropout aside: every rank draws masks from the same seed for its own rows). Evaluation is sharded
    by batch across ranks and reduced. Only rank 0 writes checkpoints and history and shows progress.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None) -> None:
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Trainer model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = config
        self.device = resolve_device(config.device)
        self.dist = distributed.setup(self.device.type)
        """This process's place in a torchrun group (rank 0 of 1 when training alone)."""
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(config.precision, self.device)
        self.classification = is_classifier(model)
        self.model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.params = trainable_parameters(model)
        # None when nothing trains: such a Trainer can still evaluate(), fit() refuses.
        self.optimizer = build_optimizer(model, config) if self.params else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None
        self.history = History()
        self._position = _Position()
        self._n_batches = 0
        self._last_checkpoint: Path | None = None
        # what the training forward runs through: the model, its DDP wrapper, or a compiled one (set by fit)
        self._train_module: nn.Module | None = None
        self._eager_module: nn.Module = model
        self._ddp: DistributedDataParallel | None = None

    # --- batches ---

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self, batch: Any, where: str) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping):
            raise DataError(f"{where}: expected a dict with input_ids, attention_mask, labels; got "
                            f"{type(batch).__name__}")
        for key in ("input_ids", "labels"):
            if key not in batch:
                raise DataError(f"{where}: missing key {key!r} (a batch needs input_ids, labels and "
                                "optionally attention_mask)")
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise DataError(f"{where}: input_ids must be a non-empty (batch, tokens) integer tensor, got "
                            f"shape {tuple(ids.shape)} dtype {ids.dtype}")
        limit = getattr(getattr(self.model, "config", None), "n_positions", None)
        if isinstance(limit, int) and ids.size(1) > limit:
            raise DataError(f"{where}: rows of {ids.size(1)} tokens, longer than the model's n_positions={limit}; "
                            "truncate them (max_length)")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise DataError(f"{where}: attention_mask has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")
        labels = torch.as_tensor(batch["labels"]).long()
        if self.classification:
            num_labels = int(getattr(self.model, "num_labels", 0) or self.model.score.out_features)
            if labels.shape != (ids.size(0),):
                raise DataError(f"{where}: labels must be class ids of shape ({ids.size(0)},), got "
                                f"{tuple(labels.shape)}")
            bad = labels[(labels < 0) | (labels >= num_labels)]
            if bad.numel():
                raise DataError(f"{where}: labels contains class id {int(bad[0])}, outside [0, {num_labels - 1}] "
                                f"(the model has num_labels={num_labels})")
        else:
            if labels.shape != ids.shape:
                raise DataError(f"{where}: labels must have the shape of input_ids {tuple(ids.shape)} "
                                f"(token targets, -100 = ignored), got {tuple(labels.shape)}")
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
            bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= (vocab or 2**62)))]
            if bad.numel():
                raise DataError(f"{where}: labels contains {int(bad[0])}, expected a token id in "
                                f"[0, {vocab}) or {IGNORE_INDEX}")
        return {"input_ids": ids.long().to(self.device), "attention_mask": mask.long().to(self.device),
                "labels": labels.to(self.device)}

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The training forward: compiled when asked (falling back to eager if compiling fails), DDP-wrapped."""
        module = self.model if self._train_module is None else self._train_module
        if module is not self._eager_module:
            try:
                return module(input_ids, attention_mask)
            except Exception as err:
                if not _is_compiler_failure(err):
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                warnings.warn(f"TrainConfig.compile: torch.compile failed ({type(err).__name__}: {first[:200]}); "
                              "training continues without compiling", RuntimeWarning, stacklevel=2)
                self._train_module = self._eager_module
        return self._eager_module(input_ids, attention_mask)

    def _prepare_train_module(self) -> None:
        if self._train_module is not None:
            return
        module: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)
            module = self._ddp
        self._eager_module = module
        self._train_module = compile_module(module) if self.config.compile else module

    def _step_loss(self, batch: dict[str, Tensor], where: str) -> tuple[Tensor, float]:
        """(loss to backpropagate, mean loss of the whole batch) of one training batch.

        Alone, both are the batch's mean loss. Under DDP each rank runs its slice of the rows and scales
        its *summed* loss by ``world_size / N`` (N = rows, or target tokens for a language model, of the
        global batch), so DDP's gradient average equals the gradient of the global mean even when the
        slices hold different numbers of tokens; the logged value is all-reduced (same on every rank).
        """
        if not self.dist.enabled:
            loss, _ = self._loss(batch, where)
            return loss, float(loss.detach())
        labels = batch["labels"]
        total = labels.size(0) if self.classification else int((labels[:, 1:] != IGNORE_INDEX).sum())
        if total == 0:
            raise DataError(f"{where}: no target tokens (every label after the first position is -100)")
        start, stop = distributed.shard_bounds(labels.size(0), self.dist)
        weight = 1.0
        if stop == start:  # fewer rows than ranks: run one row with weight 0 so this rank joins the all-reduce
            start, stop, weight = 0, 1, 0.0
        part = {key: value[start:stop] for key, value in batch.items()}
        with self._autocast():
            logits = self._forward(part["input_ids"], part["attention_mask"])
        if self.classification:
            summed = F.cross_entropy(logits.float(), part["labels"], reduction="sum")
        else:
            flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
            summed = F.cross_entropy(flat, part["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        loss = summed * (weight * self.dist.world_size / total)
        value = distributed.all_reduce_sum([float(summed.detach()) * weight], self.device)[0] / total
        return loss, value

    def _loss(self, batch: dict[str, Tensor], where: str) -> tuple[Tensor, Tensor]:
        """(mean loss, logits) of one prepared batch."""
        with self._autocast():
            logits = self._forward(batch["input_ids"], batch["attention_mask"])
        if self.classification:
            return F.cross_entropy(logits.float(), batch["labels"]), logits
        loss, count = lm_loss(logits, batch["labels"])
        if count == 0:
            raise DataError(f"{where}: no target tokens (every label after the first position is -100)")
        return loss, logits

    # --- evaluation ---

    @torch.no_grad()
    def evaluate(self, eval_data: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Loss + accuracy/precision/recall/F1 (classification) or loss + perplexity (LM) over ``eval_data``.

        In a distributed run every rank must call it with the same batches: batch i is evaluated by rank
        i mod world_size and the sums (and a confusion matrix) are all-reduced, so all ranks get the metrics.
        """
        was_training = self.model.training
        self.model.eval()
        total, count, preds, golds = 0.0, 0, [], []
        try:
            for i, raw in enumerate(eval_data):
                batch = self._prepare(raw, f"eval batch {i}")
                if self.dist.enabled and i % self.dist.world_size != self.dist.rank:
                    continue  # sharded: batch i is evaluated by rank i mod world_size, then reduced below
                with self._autocast():
                    logits = self.model(batch["input_ids"], batch["attention_mask"])
                if self.classification:
                    total += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                    count += batch["labels"].numel()
                    preds.extend(logits.argmax(-1).tolist())
                    golds.extend(batch["labels"].tolist())
                else:
                    loss, n = lm_loss(logits, batch["labels"])
                    total += float(loss) * n
                    count += n
        finally:
            self.model.train(was_training)
        if self.dist.enabled:
            total, count, preds, golds = self._reduce_eval(total, count, preds, golds)
        if count == 0:
            raise DataError("eval_data: no batches (or no target tokens) to evaluate")
        loss = mean_loss(total, count)
        if self.classification:
            return {"loss": loss, **classification_metrics(preds, golds)}
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}

    def _reduce_eval(self, total: float, count: int, preds: list[int],
                     golds: list[int]) -> tuple[float, int, list[int], list[int]]:
        """Every rank's eval sums, and its predictions as a summed confusion matrix (metrics need no order)."""
        total, count = distributed.all_reduce_sum([total, count], self.device)
        if not self.classification:
            return total, int(count), preds, golds
        n = int(getattr(self.model, "num_labels", 0) or self.model.score.out_features)
        confusion = torch.zeros(n * n, dtype=torch.int64, device=self.device)
        if golds:
            cells = torch.tensor(golds, device=self.device) * n + torch.tensor(preds, device=self.device)
            confusion += torch.bincount(cells, minlength=n * n)
        confusion = distributed.all_reduce_tensor(confusion).tolist()
        golds = [cell // n for cell, c in enumerate(confusion) for _ in range(c)]
        preds = [cell % n for cell, c in enumerate(confusion) for _ in range(c)]
        return total, int(count), preds, golds

    # --- checkpoints ---

    def _optimizer_names(self) -> list[str]:
        return [n for g in self.optimizer.param_groups for n in g["names"]]

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write trainable tensors, optimizer, scaler, RNG, step and data position atomically.

        In a distributed run only rank 0 writes; the other ranks return the folder's path.
        """
        if not self.dist.is_main:
            return Path(folder)
        pos = self._position
        weights = {name: p.detach().to("cpu").clone().contiguous() for name, p in self.params}
        opt = self.optimizer.state_dict()
        opt_tensors: dict[str, Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for index, values in opt["state"].items():
            for key, value in values.items():
                if isinstance(value, Tensor):
                    opt_tensors[f"state.{index}.{key}"] = value.detach().to("cpu").clone().contiguous()
                else:
                    opt_scalars.setdefault(str(index), {})[key] = value
        opt_tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            opt_tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        py_version, py_state, py_gauss = random.getstate()
        state = {
            "format_version": FORMAT_VERSION, "step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
            "bad_evals": pos.bad_evals, "total_steps": self.history.total_steps,
            "batches_per_epoch": self._n_batches, "trainable": [n for n, _ in self.params],
            "optimizer": self.config.optimizer, "optimizer_param_order": self._optimizer_names(),
            "optimizer_scalars": opt_scalars, "scaler": self.scaler.state_dict(),
            "python_rng": [py_version, list(py_state), py_gauss], "best": self.history.best,
            "history_steps": self.history.steps, "history_evals": self.history.evals,
            "config": dataclasses.asdict(self.config),
        }
        writers = {
            WEIGHTS_NAME: lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
            OPTIMIZER_NAME: lambda p: save_file(opt_tensors, str(p), metadata={"format": "pt"}),
            STATE_NAME: lambda p: p.write_text(json.dumps(_json_safe(state), indent=1) + "\n", encoding="utf-8"),
        }
        return write_atomic(Path(folder), writers)

    def load_checkpoint(self, path: str | os.PathLike) -> Path:
        """Restore everything :meth:`save_checkpoint` wrote; the next step continues the run exactly."""
        folder = find_checkpoint(path)
        try:
            state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
            weights = load_file(str(folder / WEIGHTS_NAME))
            opt_tensors = load_file(str(folder / OPTIMIZER_NAME))
        except FileNotFoundError as err:
            raise CheckpointNotFoundError(f"checkpoint {folder}: {err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint {folder} is unreadable: {err}") from None
        missing_keys = [k for k in ("step", "epoch", "batch", "trainable", "optimizer_scalars", "python_rng")
                        if k not in state]
        if missing_keys:
            raise CheckpointError(f"{folder / STATE_NAME}: missing keys {', '.join(missing_keys)}")
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{folder / STATE_NAME}: format_version {state.get('format_version')!r}, "
                                  f"expected {FORMAT_VERSION}")
        names = [n for n, _ in self.params]
        if state["trainable"] != names:
            missing = sorted(set(names) - set(state["trainable"]))
            extra = sorted(set(state["trainable"]) - set(names))
            raise CheckpointError(f"checkpoint {folder} trained other tensors than this model: missing "
                                  f"{missing[:5]}, unexpected {extra[:5]} (same model and LoRA config needed)")
        for key, expected in (("total_steps", self.history.total_steps),
                              ("batches_per_epoch", self._n_batches), ("optimizer", self.config.optimizer)):
            if state.get(key) != expected:
                raise ConfigError(f"TrainConfig.resume_from: {folder} has {key}={state.get(key)!r} but this run has "
                                  f"{expected!r}; resume with the same data and TrainConfig")
        order = state.get("optimizer_param_order")
        saved_ratio = (state.get("config") or {}).get("loraplus_lr_ratio")
        if saved_ratio != self.config.loraplus_lr_ratio or (order is not None and order != self._optimizer_names()):
            raise ConfigError(f"TrainConfig.resume_from: {folder} groups its optimizer state differently "
                              f"(loraplus_lr_ratio={saved_ratio!r} there, {self.config.loraplus_lr_ratio!r} here); "
                              "resume with the same TrainConfig")
        with torch.no_grad():
            for name, param in self.params:
                tensor = weights.get(name)
                if tensor is None or tensor.shape != param.shape:
                    raise CheckpointError(f"{folder / WEIGHTS_NAME}: tensor {name} is missing or has shape "
                                          f"{None if tensor is None else tuple(tensor.shape)}, expected "
                                          f"{tuple(param.shape)}")
                param.copy_(tensor)
        opt_state: dict[int, dict[str, Any]] = {}
        for key, tensor in opt_tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = tensor
        for index, values in state["optimizer_scalars"].items():
            opt_state.setdefault(int(index), {}).update(values)
        param_groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(opt_tensors["rng.torch"])
        if "rng.cuda" in opt_tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(opt_tensors["rng.cuda"], self.device)
        version, py_state, gauss = state["python_rng"]
        random.setstate((version, tuple(py_state), gauss))
        self._position = _Position(state["step"], state["epoch"], state["batch"], state["bad_evals"])
        self.history.steps = state["history_steps"]
        self.history.evals = state["history_evals"]
        self.history.best = state["best"]
        self._last_checkpoint = folder
        return folder

    def _save_step_checkpoint(self) -> None:
        assert self.out_dir is not None
        folder = self.out_dir / f"{CHECKPOINT_PREFIX}{self._position.step:07d}"
        if not self.dist.is_main:
            self._last_checkpoint = folder
            return
        self._last_checkpoint = self.save_checkpoint(folder)
        steps = sorted(p for p in self.out_dir.iterdir() if re.fullmatch(CHECKPOINT_PREFIX + r"\d+", p.name))
        for stale in self.out_dir.glob(f".{CHECKPOINT_PREFIX}*"):  # temp folders of a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        for old in steps[:-self.config.keep_checkpoints]:
            # rename first: a kill during rmtree must not leave a half-deleted folder under a checkpoint name
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # --- history file ---

    def _log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / HISTORY_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")

    def _rewrite_log(self) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / HISTORY_NAME).unlink(missing_ok=True)
        merged = sorted([("step", s) for s in self.history.steps] + [("eval", e) for e in self.history.evals],
                        key=lambda item: (item[1]["step"], item[0] == "eval"))
        for kind, record in merged:
            self._log({"type": kind, **record})

    # --- the loop ---

    def _count_batches(self, train_data: Any) -> int:
        try:
            n = len(train_data)
        except TypeError:
            raise ConfigError("Trainer.fit train_data: expected a re-iterable with len() (a list of batches or "
                              f"BucketedBatches), got {type(train_data).__name__}") from None
        if n == 0:
            raise DataError("Trainer.fit train_data: no batches to train on (the training data is empty)")
        return n

    def _check_eval_config(self, eval_data: Any) -> None:
        cfg = self.config
        names = CLASSIFICATION_METRICS if self.classification else LM_METRICS
        if cfg.best_metric not in names:
            kind = "classification" if self.classification else "language-model"
            raise ConfigError(f"TrainConfig.best_metric={cfg.best_metric!r} is not a {kind} metric; choose one "
                              f"of {', '.join(names)}")
        if cfg.early_stopping_patience is not None and eval_data is None:
            raise ConfigError("TrainConfig.early_stopping_patience is set but fit() got no eval_data")

    def _batches_from(self, train_data: Any, start: int) -> Iterator[Any]:
        if hasattr(train_data, "iter_from"):
            return iter(train_data.iter_from(start))
        return itertools.islice(iter(train_data), start, None)

    def fit(self, train_data: Iterable[Mapping[str, Any]],
            eval_data: Iterable[Mapping[str, Any]] | None = None) -> History:
        """Train on ``train_data`` (batches, in the order given; ``set_epoch(e)`` is called if it exists).

        Ctrl-C (SIGINT, main thread only) finishes the current optimizer step, writes a checkpoint there
        when ``out_dir`` is set, logs where, and re-raises :class:`KeyboardInterrupt` (``self.history``
        holds the steps done); resuming from that checkpoint continues exactly. A second Ctrl-C stops at once.
        """
        cfg = self.config
        if self.optimizer is None:
            raise ConfigError("Trainer.fit: the model has no trainable parameters (every requires_grad is False)")
        self._check_eval_config(eval_data)
        self._n_batches = self._count_batches(train_data)
        per_epoch = math.ceil(self._n_batches / cfg.grad_accum_steps)
        self.history = History(total_steps=cfg.max_steps or cfg.epochs * per_epoch)
        self._position = _Position()
        if cfg.resume_from is not None:
            self.load_checkpoint(cfg.resume_from)
            self._rewrite_log()
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            if self.out_dir is not None and self.dist.is_main:
                (self.out_dir / HISTORY_NAME).unlink(missing_ok=True)
        self.model.train()
        self._prepare_train_module()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        counts = {"samples": 0, "tokens": 0, "steps": 0}
        start = time.perf_counter()
        bar = self._progress_bar()
        try:
            with self._sigint_stops_at_step_end():
                self._run(train_data, eval_data, counts, bar)
        finally:
            if bar is not None:
                bar.close()
            runtime = time.perf_counter() - start
            speed = throughput(runtime, counts["samples"], counts["steps"], counts["tokens"])
            self.history.runtime_s = speed["runtime_s"]
            self.history.samples_per_s = speed["samples_per_s"]
            self.history.steps_per_s = speed["steps_per_s"]
            self.history.tokens_per_s = speed["tokens_per_s"]
            self.history.peak_memory_mb = peak_memory_mb(self.device)
        self._log({"type": "summary", **self.history.summary()})
        return self.history

    @contextmanager
    def _sigint_stops_at_step_end(self) -> Iterator[None]:
        """While fitting, SIGINT only sets a flag that the loop checks between optimizer steps.

        Interrupting inside ``optimizer.step()`` could leave half the tensors updated; a step boundary
        is a state that a checkpoint describes exactly (weights, optimizer, RNG, data position).
        """
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_if_interrupted(self) -> None:
        requested = getattr(self, "_stop_requested", False)
        if self.dist.enabled:  # all ranks stop after the same step, or one would wait forever in an all-reduce
            requested = distributed.all_reduce_sum([float(requested)], self.device)[0] > 0
        if not requested:
            return
        step = self._position.step
        where = "no checkpoint (TrainConfig.out_dir is not set)"
        if self.out_dir is not None:
            latest = self._last_checkpoint
            if latest is None or latest.name != f"{CHECKPOINT_PREFIX}{step:07d}":
                self._save_step_checkpoint()
            where = f"checkpoint {self._last_checkpoint}"
        message = f"training interrupted after step {step}; saved {where}"
        logger.warning(message)
        raise KeyboardInterrupt(message)

    def _progress_bar(self) -> Any:
        if not self.config.progress or not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.history.total_steps, initial=self._position.step, desc="train", dynamic_ncols=True)

    def _run(self, train_data: Any, eval_data: Any, counts: dict[str, int], bar: Any) -> None:
        cfg, pos, total = self.config, self._position, self.history.total_steps
        while pos.step < total and not self.history.stopped_early:
            if hasattr(train_data, "set_epoch"):
                train_data.set_epoch(pos.epoch)
            batches = self._batches_from(train_data, pos.batch)
            while pos.step < total:
                size = min(cfg.grad_accum_steps, self._n_batches - pos.batch)
                group = []
                for k in range(size):
                    try:
                        group.append(next(batches))
                    except StopIteration:
                        raise DataError(f"train_data yielded only {pos.batch + k} batches in epoch {pos.epoch} "
                                        f"but len() is {self._n_batches}") from None
                record = self._train_step(group, counts)
                pos.batch += size
                epoch_done = pos.batch == self._n_batches
                if epoch_done:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                self._after_step(eval_data, epoch_done)
                self._stop_if_interrupted()
                if epoch_done or self.history.stopped_early:
                    break

    def _train_step(self, group: list[Any], counts: dict[str, int]) -> dict[str, Any]:
        pos, cfg = self._position, self.config
        loss_sum = 0.0
        for k, raw in enumerate(group):
            where = f"batch {pos.batch + k} of epoch {pos.epoch}"
            batch = self._prepare(raw, where)
            # DDP all-reduces gradients only after the step's last batch (forward and backward inside no_sync)
            last = k == len(group) - 1 or self._ddp is None
            with nullcontext() if last else self._ddp.no_sync():
                loss, value = self._step_loss(batch, where)
                if not math.isfinite(value):
                    saved = self._last_checkpoint or "none (set TrainConfig.out_dir to keep checkpoints)"
                    raise TrainingError(f"non-finite loss ({value}) at step {pos.step + 1} ({where}); training "
                                        f"stopped, the last good checkpoint is {saved}. Lower TrainConfig.lr, "
                                        "set grad_clip, or use precision='fp32'.")
                self.scaler.scale(loss / len(group)).backward()
            loss_sum += value
            counts["samples"] += batch["input_ids"].size(0)
            counts["tokens"] += int(batch["attention_mask"].sum())
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.params]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False))
        lr = lr_at_step(pos.step, self.history.total_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+ groups keep their ratio at every step
        skipped = not math.isfinite(norm)
        if math.isnan(norm) and not self.scaler.is_enabled():
            # inf norms are skipped below (and fp16's scaler skips its own overflows); NaN means broken values
            saved = self._last_checkpoint or "none (set TrainConfig.out_dir to keep checkpoints)"
            raise TrainingError(f"non-finite gradients (norm {norm}) at step {pos.step + 1}; training stopped, "
                                f"the last good checkpoint is {saved}. Lower TrainConfig.lr or check the data.")
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()
            skipped = skipped or self.scaler.get_scale() < scale
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        counts["steps"] += 1
        record = {"step": pos.step, "epoch": pos.epoch + (pos.batch + len(group)) / self._n_batches,
                  "loss": loss_sum / len(group), "lr": lr, "grad_norm": norm, "skipped": skipped}
        self.history.steps.append(record)
        self._log({"type": "step", **record})
        return record

    def _after_step(self, eval_data: Any, epoch_done: bool) -> None:
        cfg, pos = self.config, self._position
        last = pos.step >= self.history.total_steps
        every = cfg.eval_every_steps is not None and pos.step % cfg.eval_every_steps == 0
        improved = False
        if eval_data is not None and (every or (cfg.eval_every_epoch and (epoch_done or last))):
            improved = self._evaluate_and_track(eval_data)
        if self.out_dir is None:
            return
        if (cfg.save_every_steps is not None and pos.step % cfg.save_every_steps == 0) or epoch_done or last \
                or self.history.stopped_early:
            self._save_step_checkpoint()
        if improved:
            self.save_checkpoint(self.out_dir / BEST_NAME)

    def _evaluate_and_track(self, eval_data: Any) -> bool:
        cfg, pos = self.config, self._position
        metrics = self.evaluate(eval_data)
        record = {"step": pos.step, "epoch": pos.epoch + pos.batch / self._n_batches, **metrics}
        update = adapter_update_norm(self.model)  # "did LoRA learn?": sqrt(sum ||s B A||_F^2), None without LoRA
        if update is not None:
            record["adapter_update_norm"] = update
        self.history.evals.append(record)
        self._log({"type": "eval", **record})
        value = metrics[cfg.best_metric]
        best = self.history.best
        lower = cfg.best_metric in LOWER_IS_BETTER
        improved = best is None or (value < best["value"] if lower else value > best["value"])
        if improved:
            path = str(self.out_dir / BEST_NAME) if self.out_dir is not None else None
            self.history.best = {"step": pos.step, "metric": cfg.best_metric, "value": value, "path": path}
            pos.bad_evals = 0
        else:
            pos.bad_evals += 1
            if cfg.early_stopping_patience is not None and pos.bad_evals >= cfg.early_stopping_patience:
                self.history.stopped_early = True
        return improved
