"""Validated configuration dataclasses: the one place where defaults live."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .constants import DEFAULT_LOSS_CHUNK_SIZE, MODEL_CONFIG_FILE
from .errors import ConfigError

#: Activation names accepted in a checkpoint's ``config.json``.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu")

#: Hugging Face hub repositories of the released GPT-2 checkpoints, by short name.
HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


def _require(condition: bool, owner: str, field: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{owner}.{field}: expected {expected}, got {value!r}")


def _positive_int(owner: str, name: str, value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _require(ok, owner, name, "a positive integer", value)


def _probability(owner: str, name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    _require(ok, owner, name, "a number in [0, 1)", value)


@dataclass(frozen=True)
class GPT2Config:
    """Shape and regularisation of a GPT-2 model (field names follow Hugging Face's ``config.json``)."""

    vocab_size: int = 50257
    """Number of token embeddings (50,257 for the released checkpoints)."""
    n_positions: int = 1024
    """Longest sequence the position embeddings cover."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_inner: int | None = None
    """Hidden width of the MLP; ``None`` means ``4 * n_embd``."""
    activation_function: str = "gelu_new"
    """MLP activation; GPT-2 uses the tanh approximation of GELU (``gelu_new``)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    embd_pdrop: float = 0.1
    """Dropout on the sum of token and position embeddings."""
    attn_pdrop: float = 0.1
    """Dropout on attention probabilities."""
    resid_pdrop: float = 0.1
    """Dropout on each block's attention and MLP outputs."""
    tie_word_embeddings: bool = True
    """Whether the LM head shares its weight with ``wte`` (true for every released GPT-2)."""
    eos_token_id: int = 50256
    """End-of-text token, also used as padding."""

    def __post_init__(self) -> None:
        owner = "GPT2Config"
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _positive_int(owner, name, getattr(self, name))
        if self.n_inner is not None:
            _positive_int(owner, "n_inner", self.n_inner)
        _require(self.n_embd % self.n_head == 0, owner, "n_head",
                 f"a divisor of n_embd={self.n_embd}", self.n_head)
        _require(self.activation_function in ACTIVATIONS, owner, "activation_function",
                 f"one of {', '.join(ACTIVATIONS)}", self.activation_function)
        eps = self.layer_norm_epsilon
        _require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0, owner,
                 "layer_norm_epsilon", "a positive number", eps)
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            _probability(owner, name, getattr(self, name))
        _require(isinstance(self.eos_token_id, int) and 0 <= self.eos_token_id, owner,
                 "eos_token_id", "a non-negative integer", self.eos_token_id)

    @property
    def inner_dim(self) -> int:
        """Hidden width of the MLP."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """The shape of a released checkpoint by short name (``gpt2``, ``gpt2-medium``, ...)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = MODEL_CONFIG_FILE) -> GPT2Config:
        """Read the fields gpt2lora needs from a Hugging Face ``config.json`` dictionary."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, gpt2lora reads only 'gpt2'")
        unsupported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                       "reorder_and_upcast_attn": False, "add_cross_attention": False}
        for key, supported in unsupported.items():
            if key in hf and hf[key] is not None and bool(hf[key]) != supported:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (gpt2lora implements "
                                  f"{key}={supported}, as in every released GPT-2)")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: hf[name] for name in names if name in hf and hf[name] is not None}
        if "n_inner" in hf:
            values["n_inner"] = hf["n_inner"]
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that ``transformers.GPT2Config`` reads back to this shape."""
        hf = dataclasses.asdict(self)
        hf.update(model_type="gpt2", n_ctx=self.n_positions, bos_token_id=self.eos_token_id,
                  architectures=["GPT2LMHeadModel"])
        return hf


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPT2Config(n_layer=6, n_head=12, n_embd=768),
}


#: The four linear layers of a block, as peft names them: the default LoRA targets.
BLOCK_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: Query, key and value slices of the fused ``attn.c_attn``, each with its own LoRA pair.
QKV_TARGETS = ("attn.q", "attn.k", "attn.v")
#: The output head: ``lm_head`` of a language model, ``score`` of a classifier.
HEAD_TARGET = "lm_head"
#: Every name ``LoRAConfig.targets`` accepts.
LORA_TARGETS = (*BLOCK_TARGETS, *QKV_TARGETS, HEAD_TARGET)
LORA_STYLES = ("peft", "from_scratch")
LORA_BIAS = ("none", "all", "lora_only")
#: Initialisations of A and B (``pissa_niter_N``, N >= 1, is PiSSA by a randomized SVD of N power iterations).
LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora")
#: Initialisations that move the principal part of W into the adapter and leave the residual in the base.
RESIDUAL_INITS = ("pissa", "olora")
#: Largest LoRA rank accepted: above every GPT-2 layer width (gpt2-xl's MLP is 6,400 wide) with room to spare.
MAX_LORA_RANK = 65536
#: Largest LoRA alpha accepted; larger scalings only overflow (an adapter's output would be inf or NaN).
MAX_LORA_ALPHA = 1e6
#: Most power iterations of ``pissa_niter_N``: a handful already converge (peft's examples use 4-16).
MAX_PISSA_NITER = 64


def init_niter(init: str) -> int | None:
    """Power iterations of ``pissa_niter_N`` (None for every other init name)."""
    prefix = "pissa_niter_"
    if isinstance(init, str) and init.startswith(prefix) and init[len(prefix):].isdigit():
        return int(init[len(prefix):])
    return None


def is_residual_init(init: str) -> bool:
    """Whether ``init`` rewrites the base weight (PiSSA, its randomized variant, OLoRA)."""
    return init in RESIDUAL_INITS or init_niter(init) is not None


@dataclass(frozen=True)
class LoRAConfig:
    """Where LoRA goes and how it is scaled."""

    rank: int = 8
    """Rank r of the update B @ A."""
    alpha: float | None = None
    """Scale numerator: the update is multiplied by alpha / rank (peft style). None (the default) sets
    alpha = rank, the choice the reference reports found best (scaling 1)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input only; the frozen path never sees it."""
    targets: tuple[str, ...] = BLOCK_TARGETS
    """Layers to wrap: block layers ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; or
    ``attn.q`` / ``attn.k`` / ``attn.v`` (separate pairs on the slices of the fused ``c_attn``, as in code
    with separate query/key/value layers; not together with ``attn.c_attn``); and ``lm_head``, the output
    head (on a classifier: LoRA on ``score``, whose base is then frozen instead of trained in full)."""
    last_n_blocks: int | None = None
    """Only the last N blocks get LoRA (None = every block); ``lm_head`` is not in a block."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(rank) instead of alpha / rank (rank-stabilised LoRA)."""
    train_bias: str = "none"
    """Which biases train: ``none``, ``all`` (every bias) or ``lora_only`` (biases of wrapped layers)."""
    style: str = "peft"
    """``peft``: scaling alpha / rank, A ~ Kaiming-uniform over in_features. ``from_scratch``: scaling
    alpha, A within ±1/sqrt(rank), as in LLMs-from-scratch-style code. Layout is identical."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output feature times the direction of W + scaling B A (peft's
    ``use_dora``). Defined on whole layers only, so not with the ``attn.q`` / ``attn.k`` / ``attn.v`` slices."""
    init: str = "kaiming"
    """How A and B start: ``kaiming`` (A as ``style`` says, B = 0), ``gaussian`` (A ~ N(0, 1/rank²), B = 0),
    ``pissa`` (A, B from the top-rank SVD of W; W keeps the residual), ``pissa_niter_N`` (the same by a
    randomized SVD with N power iterations, for large layers) or ``olora`` (A, B from a QR of W; W keeps the
    residual). With pissa/olora the output is unchanged at initialisation and saving converts the adapter
    to a plain LoRA of rank 2 * rank for the unmodified base."""

    def __post_init__(self) -> None:
        owner = "LoRAConfig"
        _positive_int(owner, "rank", self.rank)
        _require(self.rank <= MAX_LORA_RANK, owner, "rank", f"at most {MAX_LORA_RANK}", self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        ok = (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
              and math.isfinite(self.alpha) and 0 < self.alpha <= MAX_LORA_ALPHA)
        _require(ok, owner, "alpha", f"a finite number in (0, {MAX_LORA_ALPHA:g}]", self.alpha)
        _probability(owner, "dropout", self.dropout)
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        _require(isinstance(targets, (tuple, list)) and len(targets) > 0, owner, "targets",
                 "a non-empty list of layer names", self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        _require(not unknown, owner, "targets", f"names among {', '.join(LORA_TARGETS)}", unknown)
        split = [t for t in targets if t in QKV_TARGETS]
        _require("attn.c_attn" not in targets or not split, owner, "targets",
                 "either attn.c_attn (one LoRA pair on the fused query/key/value layer) or attn.q/attn.k/"
                 "attn.v (a pair per slice), not both: they would adapt the same weights twice",
                 list(targets))
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.last_n_blocks is not None:
            _positive_int(owner, "last_n_blocks", self.last_n_blocks)
        _require(isinstance(self.use_rslora, bool), owner, "use_rslora", "true or false", self.use_rslora)
        _require(self.train_bias in LORA_BIAS, owner, "train_bias", f"one of {', '.join(LORA_BIAS)}",
                 self.train_bias)
        _require(self.style in LORA_STYLES, owner, "style", f"one of {', '.join(LORA_STYLES)}", self.style)
        _require(isinstance(self.use_dora, bool), owner, "use_dora", "true or false", self.use_dora)
        _require(not (self.use_dora and split), owner, "use_dora",
                 f"targets DoRA can wrap: its magnitude is per output feature of a whole layer, and {split} "
                 "adapt slices of the fused attn.c_attn (use attn.c_attn instead)", True)
        niter = init_niter(self.init)
        _require(isinstance(self.init, str) and (self.init in LORA_INITS or (niter is not None and niter >= 1)),
                 owner, "init", f"one of {', '.join(LORA_INITS)}", self.init)
        _require(niter is None or niter <= MAX_PISSA_NITER, owner, "init",
                 f"pissa_niter_N with N at most {MAX_PISSA_NITER}", self.init)

    @property
    def scaling(self) -> float:
        """Factor applied to B @ A x."""
        if self.style == "from_scratch":
            return float(self.alpha)
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def blocks(self, n_layer: int) -> list[int]:
        """Indices of the blocks that get LoRA in a model of ``n_layer`` blocks."""
        if self.last_n_blocks is None:
            return list(range(n_layer))
        if self.last_n_blocks > n_layer:
            raise ConfigError(f"LoRAConfig.last_n_blocks={self.last_n_blocks} but the model has only "
                              f"{n_layer} blocks; use 1..{n_layer}")
        return list(range(n_layer - self.last_n_blocks, n_layer))


OPTIMIZERS = ("adamw", "sgd", "sgd_momentum")
#: Peak learning rate when none is given, by training method: small adapters and heads take a larger
#: step than full fine-tuning of every weight.
DEFAULT_LR = {"lora": 2e-4, "head": 2e-4, "embeddings": 2e-4, "prompt": 2e-4, "full": 5e-5, "last_n_full": 5e-5}


def default_lr(method: str | None) -> float:
    """The default peak learning rate of a training method (:data:`DEFAULT_LR`; ``full``'s when unknown)."""
    return DEFAULT_LR.get(method or "full", DEFAULT_LR["full"])
SCHEDULES = ("cosine", "constant")
#: How several torchrun processes train together: ``ddp`` (a full copy each) or ``fsdp`` (FSDP2, sharded).
DISTRIBUTED = ("ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings of :class:`gpt2lora.Trainer`."""

    lr: float | None = None
    """Peak learning rate, reached at the end of warmup. None: the default of the training method,
    :data:`DEFAULT_LR` (2e-4 for lora / head / embeddings / prompt, 5e-5 for full / last_n_full)."""
    min_lr: float = 0.0
    """Learning rate at the first warmup step's start and at the end of the cosine decay."""
    warmup_ratio: float = 0.05
    """Share of optimizer steps spent warming up linearly from min_lr to lr, in [0, 1)."""
    schedule: str = "cosine"
    """After warmup: ``cosine`` decay to min_lr, or ``constant`` at lr."""
    epochs: int = 1
    """Passes over the training batches (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead of counting epochs."""
    batch_size: int = 16
    """Rows per batch when :meth:`Trainer.fit` / :meth:`Trainer.evaluate` get a list of examples: the Trainer
    batches them itself (:class:`~gpt2lora.data.batching.BucketedBatches`, shuffled by ``seed`` for training).
    Batches given ready-made (collated dicts, a ``BucketedBatches``) are used as they come, whatever their rows;
    under torchrun this is the global batch."""
    grad_accum_steps: int = 1
    """Batches whose gradients are summed (averaged) into one optimizer step."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None = no clipping; the norm is still recorded)."""
    optimizer: str = "adamw"
    """``adamw``, ``sgd`` or ``sgd_momentum``."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied only to trainable tensors with two or more dimensions."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch defaults)."""
    eps: float = 1e-8
    """AdamW epsilon (torch default)."""
    momentum: float = 0.9
    """Momentum of ``sgd_momentum``."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA if supported, else fp32), ``fp32``, ``bf16`` (CUDA, or a CPU with bf16
    matrix units: the frozen base is then held in bf16) or ``fp16`` (CUDA only)."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps, in addition to the end of each epoch when eval_every_epoch."""
    eval_every_epoch: bool = True
    """Evaluate at the end of every epoch."""
    best_metric: str = "loss"
    """Eval metric that picks the best checkpoint (``loss``, ``accuracy``, ``f1_macro``, ...)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improving best_metric (None = never)."""
    out_dir: str | None = None
    """Folder for checkpoints and history.jsonl (None = keep nothing on disk)."""
    history_path: str | None = None
    """The ``history.jsonl`` the loop appends each step and evaluation to (None = ``out_dir/history.jsonl``
    when out_dir is set, else no file)."""
    save_every_steps: int | None = None
    """Write a checkpoint every N optimizer steps (each epoch end always writes one when out_dir is set)."""
    keep_checkpoints: int = 2
    """Most recent step checkpoints kept on disk (the best one is kept besides)."""
    resume_from: str | None = None
    """Checkpoint folder (or ``out_dir`` to take its latest) to continue from."""
    seed: int = 0
    """Seed for dropout and anything else random inside the loop."""
    progress: bool = True
    """Show a tqdm progress bar."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (non-reentrant
    ``torch.utils.checkpoint``): less activation memory for about one extra forward pass per step."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices (and every 1-D tensor: biases, DoRA magnitudes, as peft's
    ``create_loraplus_optimizer`` groups them) train at ``loraplus_lr_ratio * lr`` (None = one learning rate)."""
    compile: bool = False
    """Run the training forward through ``torch.compile`` (off by default: on CPU the first step pays a
    long compile and the speed-up is small; see benchmarks/RESULTS.md, "Scale levers")."""
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE
    """Language models: target positions whose (rows, vocab) logits the loss computes at a time (the LM head
    runs at target positions only; see :mod:`gpt2lora.ops.lm_head_loss`). Smaller: less memory, more, smaller
    matmuls."""
    distributed: str = "ddp"
    """Under torchrun: ``ddp`` (every process holds all weights, gradients and optimizer state) or ``fsdp``
    (FSDP2: each of N processes holds 1/N of them; needs torch >= 2.9). Ignored in a single process."""

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        _positive_int(owner, "loss_chunk_size", self.loss_chunk_size)
        if self.lr is not None:
            value = self.lr
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            _require(ok and value > 0, owner, "lr", "a finite number > 0", value)
        top = self.lr if self.lr is not None else math.inf
        _require(isinstance(self.min_lr, (int, float)) and not isinstance(self.min_lr, bool)
                 and 0 <= self.min_lr <= top, owner, "min_lr", f"a number in [0, lr={self.lr}]", self.min_lr)
        _probability(owner, "warmup_ratio", self.warmup_ratio)
        _require(self.schedule in SCHEDULES, owner, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        _positive_int(owner, "epochs", self.epochs)
        for name in ("max_steps", "eval_every_steps", "save_every_steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "batch_size", self.batch_size)
        _positive_int(owner, "grad_accum_steps", self.grad_accum_steps)
        _positive_int(owner, "keep_checkpoints", self.keep_checkpoints)
        if self.grad_clip is not None:
            _require(isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0, owner, "grad_clip",
                     "a number > 0 or None", self.grad_clip)
        _require(self.optimizer in OPTIMIZERS, owner, "optimizer", f"one of {', '.join(OPTIMIZERS)}",
                 self.optimizer)
        _require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, owner,
                 "weight_decay", "a number >= 0", self.weight_decay)
        betas = tuple(self.betas)
        _require(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), owner,
                 "betas", "two numbers in [0, 1)", self.betas)
        object.__setattr__(self, "betas", betas)
        _require(isinstance(self.eps, (int, float)) and self.eps > 0, owner, "eps", "a number > 0", self.eps)
        _probability(owner, "momentum", self.momentum)
        _require(self.precision in PRECISIONS, owner, "precision", f"one of {', '.join(PRECISIONS)}",
                 self.precision)
        _require(isinstance(self.seed, int), owner, "seed", "an integer", self.seed)
        ratio = self.loraplus_lr_ratio
        if ratio is not None:
            ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio)
            _require(ok and ratio > 0, owner, "loraplus_lr_ratio", "a finite number > 0 or None", ratio)
        for name in ("gradient_checkpointing", "compile"):
            _require(isinstance(getattr(self, name), bool), owner, name, "True or False", getattr(self, name))
        _require(self.distributed in DISTRIBUTED, owner, "distributed", f"one of {', '.join(DISTRIBUTED)}",
                 self.distributed)

    def with_default_lr(self, method: str | None) -> TrainConfig:
        """This config with ``lr`` resolved: its own, else the default of training ``method`` (:func:`default_lr`).

        The one place a missing learning rate is filled in (the Trainer, its optimizer and ``RunConfig`` call it).
        """
        if self.lr is not None:
            return self
        lr = default_lr(method)
        if self.min_lr > lr:
            raise ConfigError(f"TrainConfig.min_lr={self.min_lr} is above the default lr {lr} of method "
                              f"{method or 'full'!r}; set lr too")
        return dataclasses.replace(self, lr=lr)
