"""The training loop: optimizer groups, warmup + cosine, clipping, accumulation, autocast, eval, checkpoints.

``Trainer(model, TrainConfig(...)).fit(train_batches, eval_batches)`` takes re-iterable batches
(dicts with ``input_ids``, ``attention_mask``, ``labels``; see :mod:`gpt2lora.data.batching`) in the
order given, and returns a :class:`~gpt2lora.training.history.History`. The jobs around the loop live in
modules of their own: batch checks (:mod:`gpt2lora.data.batching`), the loss (:mod:`gpt2lora.training.losses`),
evaluation (:mod:`gpt2lora.training.evaluation`), checkpoints (:mod:`gpt2lora.training.checkpoint`), the history file
(:mod:`gpt2lora.training.history`) and memory (:mod:`gpt2lora.training.memory`).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..constants import BEST_CHECKPOINT, CHECKPOINT_PREFIX, HISTORY_FILE, TRAINER_STATE_FILE
from ..data.batching import BucketedBatches, example_count, is_example_list
from ..devices import PRECISION_DTYPES, autocast, resolve_device, resolve_precision
from ..errors import ConfigError, DataError, TrainingError
from ..model.classifier import is_classifier
from ..model.gpt2 import Transformer
from ..peft.diagnostics import adapter_update_norm
from ..peft.lora import is_lora_b
from ..peft.registry import require_unmerged
from . import checkpoint, distributed
from . import history as history_file
from .checkpoint import find_checkpoint, write_atomic
from .evaluation import checked_batch, evaluate
from .history import History
from .losses import forward_loss, lm_loss, step_targets
from .memory import MemoryMeter
from .metrics import throughput
from .precision import hold_frozen_weights
from .tracking import Tracker

__all__ = ["BEST_CHECKPOINT", "CHECKPOINT_PREFIX", "HISTORY_FILE", "TRAINER_STATE_FILE", "History", "Trainer",
           "build_optimizer", "enable_gradient_checkpointing", "find_checkpoint", "lm_loss", "lr_at_step",
           "parameter_groups", "warmup_steps", "write_atomic"]

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
    ``config.lr`` must be set (the Trainer resolves ``lr=None`` to the method's default first).
    """
    if config.lr is None:
        raise ConfigError("lr_at_step: TrainConfig.lr is None; give a number (the Trainer picks the "
                          "method's default, see gpt2lora.config.DEFAULT_LR)")
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
    lr = config.with_default_lr(training_method(model)).lr
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps)
    momentum = config.momentum if config.optimizer == "sgd_momentum" else 0.0
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _pad_token_id(model: nn.Module) -> int:
    """A token id the model embeds (its pad, else its end-of-text id, else 0) for padding the batches the
    Trainer builds; padded positions are masked, so which id it is does not change any result."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    for candidate in (getattr(model, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, int) and candidate >= 0 and (vocab is None or candidate < vocab):
            return candidate
    return 0


def training_method(model: nn.Module) -> str:
    """What trains: the method :func:`gpt2lora.prepare_model` recorded, else ``lora`` when LoRA layers are
    present, else ``full``. It picks the default learning rate."""
    recorded = getattr(model, "training_method", None)
    if recorded:
        return recorded
    from ..peft.lora import lora_modules

    return "lora" if any(True for _ in lora_modules(model)) else "full"


# --- model features ---

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


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of ``epoch`` already consumed: where the data resumes."""
    bad_evals: int = 0


class Trainer:
    """Trains a gpt2lora model (full fine-tuning or LoRA: whatever has ``requires_grad``).

    Classification models (with ``score`` / ``num_labels``) use cross-entropy on (B, num_labels)
    logits against class ids (B,); language models the shifted token cross-entropy at target positions
    only (:func:`gpt2lora.training.losses.forward_loss`; packed rows with ``position_ids`` too). A step's loss is
    the sum over every target (row or token) of all its ``grad_accum_steps`` batches divided by their
    count, so accumulating k batches updates the weights as one batch of the same rows would.
    ``TrainConfig.lr=None`` takes the default of the model's training method (:data:`~gpt2lora.config.DEFAULT_LR`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or an already initialised ``torch.distributed`` group) the
    model is wrapped in ``DistributedDataParallel`` and each rank trains on its contiguous slice of
    every batch: ``batch_size`` and the batches given to :meth:`fit` are the *global* batch (give every
    rank the same batches), and losses, gradients and history equal one process on those batches
    (dropout aside: every rank draws masks from the same seed for its own rows). Evaluation is sharded
    by batch across ranks and reduced. Only rank 0 writes checkpoints and history and shows progress.
    With ``TrainConfig.distributed="fsdp"`` the model is sharded with FSDP2 instead of wrapped in DDP (see
    :mod:`gpt2lora.training.distributed`): the same losses, 1/N of the weights, gradients and optimizer state per
    rank; checkpoints hold the full tensors; after :meth:`fit` the weights stay gathered for evaluation and saving.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, tracker: Tracker | None = None) -> None:
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Trainer model: expected a torch.nn.Module, got {type(model).__name__}")
        config = config.with_default_lr(training_method(model))
        self.model = model
        self.config = config
        self.device = resolve_device(config.device, "TrainConfig.device")
        self.dist = distributed.setup(self.device.type)
        """This process's place in a torchrun group (rank 0 of 1 when training alone)."""
        if self.dist.enabled and config.batch_size % self.dist.world_size:
            raise ConfigError(f"TrainConfig.batch_size={config.batch_size} does not divide over WORLD_SIZE="
                              f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}")
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        if tracker is not None and not callable(getattr(tracker, "log_metrics", None)):
            raise ConfigError(f"Trainer tracker: expected a gpt2lora.training.tracking.Tracker (log_metrics(step, metrics)), "
                              f"got {type(tracker).__name__}")
        self.tracker = tracker if self.dist.is_main else None
        """Gets every step's loss, lr, grad_norm, tokens/s and every evaluation (rank 0 only; see tracking)."""
        self.precision = resolve_precision(config.precision, self.device, "TrainConfig.precision")
        self.classification = is_classifier(model)
        self.model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.held_in_bf16 = hold_frozen_weights(model) if self.precision == "bf16" else 0
        """How many frozen base matrices the Trainer holds in bf16 (``precision='bf16'``; see training.precision)."""
        # FSDP2 units (blocks, then the root) when sharding; the parameters become DTensors before the optimizer
        # is built over them
        self._fsdp_units: list[nn.Module] = []
        if config.distributed == "fsdp":
            distributed.check_fsdp_torch()
            if self.dist.enabled:
                cast = self.device.type == "cuda" and self.precision in ("bf16", "fp16")
                dtype = PRECISION_DTYPES[self.precision] if cast else None
                self._fsdp_units = distributed.shard_model(model, self.device, self.dist, dtype)
        self.params = trainable_parameters(model)
        # None when nothing trains: such a Trainer can still evaluate(), fit() refuses.
        self.optimizer = build_optimizer(model, config) if self.params else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None
        self.history_path = (Path(config.history_path) if config.history_path is not None
                             else self.out_dir / HISTORY_FILE if self.out_dir is not None else None)
        self.history = History()
        self._position = _Position()
        self._n_batches = 0
        self._last_checkpoint: Path | None = None
        # what the training forward runs through: the model, its DDP wrapper, or a compiled one (set by fit)
        self._train_module: nn.Module | None = None
        self._eager_module: nn.Module = model
        self._ddp: DistributedDataParallel | None = None
        self._in_fit = False  # under FSDP: weights gathered for an evaluation inside fit() are sharded again

    # --- batches and loss ---

    def _prepare(self, batch: Any, where: str) -> dict[str, Tensor]:
        return checked_batch(self.model, batch, where, self.device)

    def _forward_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The summed training loss (:func:`~gpt2lora.training.losses.forward_loss`) through the training forward:
        compiled when asked (falling back to eager if compiling fails), DDP-wrapped."""
        module = self.model if self._train_module is None else self._train_module
        chunk = self.config.loss_chunk_size
        if module is not self._eager_module:
            try:
                return forward_loss(module, batch, self.classification, chunk)[0]
            except Exception as err:
                if not _is_compiler_failure(err):
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                warnings.warn(f"TrainConfig.compile: torch.compile failed ({type(err).__name__}: {first[:200]}); "
                              "training continues without compiling", RuntimeWarning, stacklevel=2)
                self._train_module = self._eager_module
        return forward_loss(self._eager_module, batch, self.classification, chunk)[0]

    def _prepare_train_module(self) -> None:
        if self._train_module is not None:
            return
        module: nn.Module = self.model
        if self.dist.enabled and not self._fsdp_units:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)
            module = self._ddp
        self._eager_module = module
        self._train_module = compile_module(module) if self.config.compile else module

    def _step_loss(self, batch: dict[str, Tensor], step_total: int) -> tuple[Tensor, float]:
        """(loss to backpropagate, its value) of one micro-batch of a step with ``step_total`` targets.

        The loss is the batch's *summed* loss over ``step_total``, the rows (classifier) or target tokens
        (language model) of every micro-batch of the optimizer step, so the backward passes of a step add
        up to the gradient of the step's mean over all its targets (token-exact accumulation). Under DDP
        each rank runs its slice of the rows and scales its summed loss by ``world_size / step_total``, so
        DDP's gradient average is that same gradient however the tokens fall on the ranks; the value is
        all-reduced (the same on every rank). The values of a step's micro-batches add up to its loss.
        """
        labels = batch["labels"]
        start, stop, weight = 0, labels.size(0), 1.0
        if self.dist.enabled:
            start, stop = distributed.shard_bounds(labels.size(0), self.dist)
            if stop == start:  # fewer rows than ranks: run one row with weight 0 so this rank joins the all-reduce
                start, stop, weight = 0, 1, 0.0
        part = {key: value[start:stop] for key, value in batch.items()}
        with autocast(self.precision, self.device):
            summed = self._forward_loss(part)
        if not self.dist.enabled:
            loss = summed / step_total
            return loss, float(loss.detach())
        loss = summed * (weight * self.dist.world_size / step_total)
        value = distributed.all_reduce_sum([float(summed.detach()) * weight], self.device)[0] / step_total
        return loss, value

    # --- evaluation ---

    def evaluate(self, eval_data: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Loss + accuracy/precision/recall/F1 (classification) or loss + perplexity (LM) over ``eval_data``.

        :func:`gpt2lora.training.evaluation.evaluate` on this Trainer's device, precision and torchrun group: in a
        distributed run every rank must call it with the same batches (each evaluates its share, then
        the sums are all-reduced).
        """
        eval_data = self._as_batches(eval_data, shuffle=False)
        if not self._fsdp_units:
            return evaluate(self.model, eval_data, self.device, self.precision, self.dist, self.config.loss_chunk_size)
        # each rank evaluates its own batches: with the weights gathered, forwards need no collectives
        distributed.gather_weights(self._fsdp_units)
        try:
            return evaluate(self.model, eval_data, self.device, self.precision, self.dist, self.config.loss_chunk_size)
        finally:
            if self._in_fit:
                distributed.scatter_weights(self._fsdp_units)

    def _as_batches(self, data: Any, shuffle: bool) -> Any:
        """``data`` when it holds batches; a list of examples batched at ``config.batch_size`` rows."""
        if not is_example_list(data):
            return data
        return BucketedBatches(data, self.config.batch_size, shuffle=shuffle, seed=self.config.seed,
                               pad_token_id=_pad_token_id(self.model))

    # --- checkpoints ---

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write trainable tensors, optimizer, scaler, RNG, step and data position atomically.

        In a distributed run every rank must call it: each rank's RNG states (and, under FSDP, the full
        tensors) are gathered, then rank 0 writes them; the other ranks return the folder's path.
        """
        pos = self._position
        state = {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "bad_evals": pos.bad_evals,
                 "total_steps": self.history.total_steps, "batches_per_epoch": self._n_batches,
                 "best": self.history.best, "history_steps": self.history.steps,
                 "history_evals": self.history.evals}
        return checkpoint.save_state(folder, self.params, self.optimizer, self.scaler, self.device, state,
                                     self.config, write=self.dist.is_main)

    def load_checkpoint(self, path: str | Path, allow_nonfinite: bool = False) -> Path:
        """Restore everything :meth:`save_checkpoint` wrote; the next step continues the run exactly.

        Tensors that are not floats, or hold NaN/inf (unless ``allow_nonfinite``), are refused by name.
        """
        expected = {"total_steps": self.history.total_steps, "batches_per_epoch": self._n_batches,
                    "optimizer": self.config.optimizer}
        folder, state = checkpoint.load_state(path, self.params, self.optimizer, self.scaler, self.device,
                                              expected, allow_nonfinite, validate=self._check_groups)
        self._position = _Position(state["step"], state["epoch"], state["batch"], state["bad_evals"])
        self.history.steps = state["history_steps"]
        self.history.evals = state["history_evals"]
        self.history.best = state["best"]
        self._last_checkpoint = folder
        return folder

    def _check_groups(self, folder: Path, state: dict[str, Any]) -> None:
        """A checkpoint's optimizer state fits only the same parameter groups (LoRA+ splits them)."""
        order = state.get("optimizer_param_order")
        saved_ratio = (state.get("config") or {}).get("loraplus_lr_ratio")
        names = [n for g in self.optimizer.param_groups for n in g["names"]]
        if saved_ratio != self.config.loraplus_lr_ratio or (order is not None and order != names):
            raise ConfigError(f"TrainConfig.resume_from: {folder} groups its optimizer state differently "
                              f"(loraplus_lr_ratio={saved_ratio!r} there, {self.config.loraplus_lr_ratio!r} here); "
                              "resume with the same TrainConfig")

    def _save_step_checkpoint(self) -> None:
        assert self.out_dir is not None
        folder = checkpoint.step_folder(self.out_dir, self._position.step)
        self._last_checkpoint = self.save_checkpoint(folder)  # every rank gathers; rank 0 writes
        if self.dist.is_main:
            checkpoint.rotate_checkpoints(self.out_dir, self.config.keep_checkpoints)

    # --- history file ---

    def _log(self, record: dict[str, Any]) -> None:
        if self.history_path is not None and self.dist.is_main:
            history_file.append_record(self.history_path, record)

    def _rewrite_log(self) -> None:
        if self.history_path is not None and self.dist.is_main:
            history_file.rewrite(self.history_path, self.history)

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
            objective = "classification" if self.classification else "language-model"
            raise ConfigError(f"TrainConfig.best_metric={cfg.best_metric!r} is not a {objective} metric; choose one "
                              f"of {', '.join(names)}")
        if cfg.early_stopping_patience is not None and eval_data is None:
            raise ConfigError("TrainConfig.early_stopping_patience is set but fit() got no eval_data")

    def _batches_from(self, train_data: Any, start: int) -> Iterator[Any]:
        if hasattr(train_data, "iter_from"):
            return iter(train_data.iter_from(start))
        return itertools.islice(iter(train_data), start, None)

    def fit(self, train_data: Iterable[Mapping[str, Any]],
            eval_data: Iterable[Mapping[str, Any]] | None = None) -> History:
        """Train on ``train_data``: batches, in the order given (``set_epoch(e)`` is called if it exists), or a
        list of examples, which the Trainer batches at ``config.batch_size`` rows (length-bucketed, shuffled per
        epoch by ``config.seed``); ``eval_data`` likewise (examples in order). Ready-made batches are used as
        they come: their rows, not ``batch_size``, make a batch.

        Ctrl-C (SIGINT, main thread only) finishes the current optimizer step, writes a checkpoint there
        when ``out_dir`` is set, logs where, and re-raises :class:`KeyboardInterrupt` (``self.history``
        holds the steps done); resuming from that checkpoint continues exactly. A second Ctrl-C stops at once.
        The history's memory figures cover this fit only (see :mod:`gpt2lora.training.memory`).
        """
        cfg = self.config
        if self.optimizer is None:
            raise ConfigError("Trainer.fit: the model has no trainable parameters (every requires_grad is False)")
        require_unmerged(self.model, "Trainer.fit")  # merged factors get no gradient: torch's error says nothing
        self._check_eval_config(eval_data)
        train_data = self._as_batches(train_data, shuffle=True)
        if eval_data is not None:
            eval_data = self._as_batches(eval_data, shuffle=False)
        self._n_batches = self._count_batches(train_data)
        per_epoch = math.ceil(self._n_batches / cfg.grad_accum_steps)
        self.history = History(total_steps=cfg.max_steps or cfg.epochs * per_epoch)
        self._position = _Position()
        if cfg.resume_from is not None:
            self.load_checkpoint(cfg.resume_from)
            if self.out_dir is not None and self.dist.is_main:
                checkpoint.finish_interrupted_writes(self.out_dir)
            self._rewrite_log()
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            if self.history_path is not None and self.dist.is_main:
                self.history_path.unlink(missing_ok=True)
        self.model.train()
        self._prepare_train_module()
        if self._fsdp_units:  # sharded again when an earlier fit or evaluate() left them gathered
            distributed.scatter_weights(self._fsdp_units)
            self._in_fit = True
        meter = MemoryMeter(self.device).start()
        counts = {"samples": 0, "tokens": 0, "steps": 0}
        start = time.perf_counter()
        bar = self._progress_bar()
        try:
            with self._sigint_stops_at_step_end():
                self._run(train_data, eval_data, counts, bar)
            if self._fsdp_units:  # the trained model is used whole afterwards: evaluated, generated from, saved
                self._in_fit = False
                distributed.gather_weights(self._fsdp_units)
        finally:
            if bar is not None:
                bar.close()
            runtime = time.perf_counter() - start
            speed = throughput(runtime, counts["samples"], counts["steps"], counts["tokens"])
            self.history.runtime_s = speed["runtime_s"]
            self.history.samples_per_s = speed["samples_per_s"]
            self.history.steps_per_s = speed["steps_per_s"]
            self.history.tokens_per_s = speed["tokens_per_s"]
            memory = meter.stop()
            self.history.peak_memory_mb = memory.peak_mb
            self.history.memory_added_mb = memory.added_mb
            self.history.peak_reserved_mb = memory.reserved_mb
            self.history.memory_method = memory.method
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
            if latest is None or latest.name != checkpoint.step_folder(self.out_dir, step).name:
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

    def _last_good(self) -> str:
        return str(self._last_checkpoint or "none (set TrainConfig.out_dir to keep checkpoints)")

    def _train_step(self, group: list[Any], counts: dict[str, int]) -> dict[str, Any]:
        pos, cfg = self._position, self.config
        started, tokens_before = time.perf_counter(), counts["tokens"]
        loss_sum = 0.0
        wheres = [f"batch {pos.batch + k} of epoch {pos.epoch}" for k in range(len(group))]
        batches = [self._prepare(raw, where) for raw, where in zip(group, wheres)]
        step_total = step_targets(batches, self.classification)
        if step_total == 0:  # a micro-batch without targets adds zero; a whole step without any is an error
            where = wheres[0] if len(group) == 1 else f"batches {pos.batch}-{pos.batch + len(group) - 1} of epoch {pos.epoch}"
            raise DataError(f"{where}: no target tokens (every label after the first position is -100)")
        for k, (batch, where) in enumerate(zip(batches, wheres)):
            # DDP all-reduces (FSDP reduce-scatters) gradients only after the step's last batch
            last = k == len(group) - 1 or (self._ddp is None and not self._fsdp_units)
            if self._fsdp_units:
                self.model.set_requires_gradient_sync(last)
            with nullcontext() if last or self._fsdp_units else self._ddp.no_sync():
                loss, value = self._step_loss(batch, step_total)
                if not math.isfinite(value):
                    raise TrainingError(f"non-finite loss ({value}) at step {pos.step + 1} ({where}); training "
                                        f"stopped, the last good checkpoint is {self._last_good()}. Lower "
                                        "TrainConfig.lr, set grad_clip, or use precision='fp32'.")
                self.scaler.scale(loss).backward()
            loss_sum += value
            counts["samples"] += example_count(batch)
            counts["tokens"] += int(batch["attention_mask"].sum())
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.params]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm,
                                                                           error_if_nonfinite=False)))
        lr = lr_at_step(pos.step, self.history.total_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+ groups keep their ratio at every step
        skipped = not math.isfinite(norm)
        if math.isnan(norm) and not self.scaler.is_enabled():
            # inf norms are skipped below (and fp16's scaler skips its own overflows); NaN means broken values
            raise TrainingError(f"non-finite gradients (norm {norm}) at step {pos.step + 1}; training stopped, "
                                f"the last good checkpoint is {self._last_good()}. Lower TrainConfig.lr or check "
                                "the data.")
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
                  "loss": loss_sum, "lr": lr, "grad_norm": norm, "skipped": skipped}
        self.history.steps.append(record)
        self._log({"type": "step", **record})
        if self.tracker is not None:
            speed = (counts["tokens"] - tokens_before) / max(time.perf_counter() - started, 1e-9)
            self.tracker.log_metrics(pos.step, {"train/loss": record["loss"], "train/lr": lr,
                                                "train/grad_norm": norm, "train/tokens_per_s": speed})
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
            self.save_checkpoint(self.out_dir / BEST_CHECKPOINT)

    def _evaluate_and_track(self, eval_data: Any) -> bool:
        cfg, pos = self.config, self._position
        metrics = self.evaluate(eval_data)
        record = {"step": pos.step, "epoch": pos.epoch + pos.batch / self._n_batches, **metrics}
        update = adapter_update_norm(self.model)  # "did LoRA learn?": sqrt(sum ||s B A||_F^2), None without LoRA
        if update is not None:
            record["adapter_update_norm"] = update
        self.history.evals.append(record)
        self._log({"type": "eval", **record})
        if self.tracker is not None:
            self.tracker.log_metrics(pos.step, {f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch")})
        value = metrics[cfg.best_metric]
        best = self.history.best
        lower = cfg.best_metric in LOWER_IS_BETTER
        improved = best is None or (value < best["value"] if lower else value > best["value"])
        if improved:
            path = str(self.out_dir / BEST_CHECKPOINT) if self.out_dir is not None else None
            self.history.best = {"step": pos.step, "metric": cfg.best_metric, "value": value, "path": path}
            pos.bad_evals = 0
        else:
            pos.bad_evals += 1
            if cfg.early_stopping_patience is not None and pos.bad_evals >= cfg.early_stopping_patience:
                self.history.stopped_early = True
        return improved
