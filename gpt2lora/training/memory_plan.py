"""A memory plan before a run: the peak memory per device, split into weights, gradients, optimizer state and
activations, for a model shape, method, batch, length, precision and DDP/FSDP over N devices.

Nothing is downloaded or trained. Parameter counts are exact: the model is built on the ``meta`` device (no
memory) with the run's method applied. Activations follow what gpt2lora's own blocks keep for backward, counted
with :func:`gpt2lora.ops.recompute.count_saved_tensors` (fp32, GPT-2's dropout on, every row full length; the
coefficients of :data:`LAYER_BYTES` were fitted by least squares to such counts on widths 64-256) plus the
transients of the loss and of backward; ``tests/training/test_plan.py`` checks them against the count, and
``benchmarks/bench_plan.py`` checks the whole estimate against measured peaks (fp32 on the CPU). A LoRA other than
the default (other targets, no LoRA dropout, DoRA) keeps other per-layer bytes: the plan counts them for it when
asked (:func:`counted_lora_layer_bytes`); its transients stay the default LoRA's. On a GPU the plan was checked
once, in ``benchmarks/gpu.sh``'s SST-2 setting on an H200 (gpt2 classifier, 16 x 128 tokens): full fine-tuning
peaked at 1.09x the plan (fp32 and bf16); LoRA r=4 on ``attn.c_attn`` alone without LoRA dropout at 1.05x
(fp32) and 0.98x (bf16) of the counted plan (0.59x and 0.54x of the default LoRA's bytes it used before). bf16's
:data:`HALF_ACTIVATIONS` there come from counts on the CPU under CUDA's recompute policy.

With gradient checkpointing the backward pass of a LoRA step peaks at the start of the first recomputed
block's backward, not in its attention: measured live tensors (``tests/training/test_plan_live.py``) hold the
blocks' inputs, the whole recomputed block and the two (tokens, 4·n_embd) input gradients of its MLP output
projection (the frozen path's and LoRA's, whose dropout gives it its own input); by the time the attention's
backward runs, its output projection and MLP half have been freed. The plan takes the larger of that moment,
the attention's backward (16 bytes per score of its largest block, :func:`gpt2lora.ops.attention.block_scores`)
and the loss.

The peak of a step, per device (``W`` weights, ``G`` gradients, ``O`` optimizer state, ``A`` activations)::

    W + O + max(A + G_held, G + G_ddp + update temporaries)  (+ the CPU runtime's buffers)

``G_held`` is the gradient already held while a later micro-batch runs (all of ``G`` with accumulation, else
nothing: gradients are freed after each step); ``G_ddp`` is DDP's gradient buckets (a second copy of ``G``).
With FSDP over N devices ``W``, ``G`` and ``O`` are ``1/N`` each, and the peak adds the full weights of the units
gathered at once (the root's embeddings, final norm and head, and two blocks); every device runs
``batch_size / N`` rows.

With ``precision="bf16"`` ``W`` counts the frozen matrices the Trainer holds in bf16 at 2 bytes
(:func:`gpt2lora.training.precision.hold_frozen_weights`), and on a CPU with bf16 units an LM run may add the
frozen head's packed copy (as large as the bf16 head), which the chunked loss keeps when its product measured
faster (:func:`gpt2lora.ops.products.frozen_weight_product`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import BLOCK_TARGETS, LoRAConfig
from ..constants import MODEL_CONFIG_FILE
from ..errors import ConfigError
from ..model.classifier import GPT2ForSequenceClassification
from ..model.gpt2 import GPT2, Block, GPT2Config
from ..ops.attention import block_scores, kept_scores
from ..ops.packed import packed_linear_available
from ..ops.recompute import count_saved_tensors
from ..peft.methods import prepare_model
from .precision import hold_frozen_weights

#: Shapes of the published GPT-2 checkpoints: (n_layer, n_embd, n_head); all have 50,257 tokens and 1,024 positions.
KNOWN_MODELS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25), "distilgpt2": (6, 768, 12),
}
GPT2_VOCAB, GPT2_POSITIONS = 50257, 1024

#: Bytes a layer keeps for backward, per token: ``a * n_embd + b``, plus ``c`` per attention score (the attention
#: dropout's 1-byte mask; long causal rows keep it for their query blocks' scores only,
#: :func:`gpt2lora.ops.attention.kept_scores`), by what the layer trains: ``(a, b, c)``. "full" also covers blocks that
#: only pass gradients on (prompt and embedding tuning); "lora" is the default LoRA (q/k/v/o and MLP, dropout
#: 0.05); "checkpointed" keeps only the block's input (what the recomputed block keeps while backward runs it:
#: :data:`RECOMPUTED_LAYER_BYTES`).
LAYER_BYTES: dict[str, tuple[float, float, float]] = {
    "full": (41.5, 52.0, 1.0), "lora": (93.5, 174.0, 1.0), "checkpointed": (4.0, 8.0, 0.0),
}
#: What the recomputed block keeps while checkpointed backward runs it, as ``LAYER_BYTES``: the recompute does
#: not use :mod:`gpt2lora.ops.recompute`, so full fine-tuning keeps its LayerNorm and GELU outputs too (4 + 4
#: + 16 bytes per unit of width, counted); LoRA's linear layers keep only their dropped inputs either way. The
#: block's input (4 bytes per unit of width) is the checkpoint's own saved tensor and is not counted twice.
RECOMPUTED_LAYER_BYTES: dict[str, tuple[float, float, float]] = {
    "full": (65.5, 52.0, 1.0), "lora": LAYER_BYTES["lora"],
}
#: Of those, what the block keeps after its attention core, freed before the attention's backward runs (per
#: token and unit of width): the output projection's input (4 for "full"; for "lora" its dropped input and
#: LoRA dropout mask, 8) and the residual dropout's mask (1); the MLP half: the LayerNorm input (4), the GELU
#: input (16), and for "full" the LayerNorm and GELU outputs (4 + 16), for "lora" c_fc's and c_proj's dropped
#: inputs and masks (8 + 32); its residual dropout's mask (1).
AFTER_ATTENTION_KEPT_BYTES = {"full": 46.0, "lora": 70.0}
#: What a classifier's last block keeps without checkpointing, per token and unit of width: it runs its queries,
#: output projection and MLP on each row's last token only, so over every token only its LayerNorm's input (4),
#: the keys and values (8) and for "lora" c_attn's dropped input and LoRA dropout mask (8); no score mask.
LAST_BLOCK_POOLED_BYTES = {"full": 12.0, "lora": 20.0}
#: Gradients alive at the start of a block's backward, per token and unit of width: the block output's and the
#: residual dropout's (4 + 4) and the MLP output projection's input gradient (16); with LoRA a second one
#: (16), the LoRA branch's, whose dropout gives it an input of its own.
BLOCK_START_GRADS = {"full": 24.0, "lora": 40.0}
#: Gradients alive during the attention's backward: the attention output's, the residual's and q, k, v's.
ATTENTION_GRADS = 20.0
#: Bytes per score of one block of batch rows while the CPU attention's backward runs: the recomputed
#: probabilities, the scaled dropout mask, the dropped probabilities and their gradient, fp32
#: (:func:`gpt2lora.ops.attention._block_grads`; the blocks hold about ``BLOCK_ELEMENTS`` scores).
SCORE_TRANSIENT_BYTES = 16.0
#: Outside the blocks, per token and unit of width, by (what the blocks train, checkpointed): the final norm's
#: input, the embedding dropout mask and, when the embeddings train, the hidden state's gradient the chunked loss
#: forms in the forward pass (without checkpointing a LoRA block's saved output is the final norm's input).
OUTSIDE_BYTES = {("full", False): 9.8, ("full", True): 9.1, ("lora", False): 0.8, ("lora", True): 8.1}
#: What the first fit of a CPU process adds besides tensors (autograd's engine, kernel workspaces), measured
#: with a 1-block, width-32 model (15-17 MiB); CUDA's allocated figure counts tensors only.
CPU_RUNTIME_BYTES = 16 * 2**20
#: bf16/fp16 autocast's activations as a share of fp32's on CUDA, by whether the block weights train. Every cheap
#: output is recomputed there (:mod:`gpt2lora.ops.recompute`), but full fine-tuning's linears keep bf16 copies of
#: their fp32 LayerNorm outputs (which fp32 recomputes instead), and masks and norms stay as they are: counted on
#: the CPU under that policy, 0.58-0.76 of fp32's for LoRA with a bf16 base (with and without LoRA dropout) and 1.0
#: for full fine-tuning (2 layers, widths 128-256, 256-512 tokens); the plan takes the upper ends.
HALF_ACTIVATIONS = {True: 1.0, False: 0.76}
#: The same on the CPU, where bf16 GELU outputs are kept instead of recomputed: counted 0.58-0.91 of fp32's for
#: LoRA with a bf16 base and 0.93-1.33 for full fine-tuning (1-3 layers, widths 64-256, 96-1,600 tokens).
HALF_ACTIVATIONS_CPU = {True: 1.35, False: 1.0}
METHODS_WITH_BLOCK_GRADIENTS = ("full", "lora", "prompt", "embeddings", "last_n_full")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the plan needs of a GPT-2."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = GPT2_VOCAB
    n_positions: int = GPT2_POSITIONS

    def config(self) -> GPT2Config:
        return GPT2Config(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                          vocab_size=self.vocab_size, n_positions=self.n_positions)


def model_shape(model: str) -> ModelShape:
    """The shape of a published GPT-2 name, or of a local checkpoint folder's ``config.json`` (nothing is fetched)."""
    if model in KNOWN_MODELS:
        return ModelShape(*KNOWN_MODELS[model])
    config = Path(model) / MODEL_CONFIG_FILE
    if config.is_file():
        try:
            values = json.loads(config.read_text(encoding="utf-8"))
            return ModelShape(int(values["n_layer"]), int(values["n_embd"]), int(values["n_head"]),
                              int(values.get("vocab_size", GPT2_VOCAB)), int(values.get("n_positions", GPT2_POSITIONS)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"--plan: {config} does not describe a GPT-2 (n_layer, n_embd, n_head): {err}") from None
    raise ConfigError(f"--plan: unknown model {model!r}; the plan knows {', '.join(KNOWN_MODELS)} or a local "
                      "checkpoint folder with config.json (it downloads nothing)")


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)


def parse_size(text: str, where: str = "--device-memory") -> int:
    """Bytes of ``16GB`` (10^9), ``15GiB`` (2^30), ``500MB``, ``512MiB`` or a plain number of bytes."""
    match = _SIZE.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{where}={text!r}: expected a size such as 16GB, 15.5GiB or 800MB")
    unit = (match.group(2) or "b").lower()
    power = "bkmgt".index(unit[0])
    base = 1024 if "i" in unit else 1000
    return int(float(match.group(1)) * base ** power)


def format_size(value: float) -> str:
    """``1.23 GiB`` / ``456 MiB``."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


@dataclass(frozen=True)
class PlanSetting:
    """What a run does that decides its memory (``batch_size`` is the global batch, split over ``world_size``)."""

    shape: ModelShape
    method: str = "lora"
    objective: str = "lm"
    """``lm`` (causal language model) or ``classification``."""
    num_labels: int = 2
    batch_size: int = 16
    max_length: int = 128
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    optimizer: str = "adamw"
    world_size: int = 1
    strategy: str = "ddp"
    device: str = "cpu"
    lora: LoRAConfig | None = None
    last_n: int | None = None
    loss_chunk_size: int = 128

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"--plan-devices={self.world_size}: expected a positive number of devices")
        if self.batch_size % self.world_size:
            raise ConfigError(f"batch_size={self.batch_size} does not divide over {self.world_size} devices; choose a "
                              f"batch size that is a multiple of {self.world_size}")


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device of each part, and the step's peak (see the module docstring)."""

    setting: PlanSetting
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    """The gradients, with DDP's buckets (a second copy) when several processes run DDP."""
    optimizer: int
    activations: int
    """What one micro-batch keeps for backward plus its largest transient (and the CPU runtime's buffers)."""
    update: int
    """Temporaries of the optimizer update (two of the largest trainable tensor)."""
    budget: int | None
    runtime: int = 0
    """On the CPU: what a fit adds besides tensors (:data:`CPU_RUNTIME_BYTES`)."""
    gathered: int = 0
    """FSDP: the full weights of the units gathered at once (the root: embeddings, final norm, head; two blocks)."""
    packed_head: int = 0
    """bf16 LM runs on a CPU with bf16 units: the frozen head's packed copy, if the chunked loss keeps it."""

    @property
    def held_gradients(self) -> int:
        """Gradients alive while a micro-batch's activations peak: all of them when accumulating, else none."""
        return self.gradients if self.setting.grad_accum_steps > 1 else 0

    @property
    def peak(self) -> int:
        """Weights + optimizer state + the larger of the backward pass's and the update's needs."""
        return (self.weights + self.gathered + self.packed_head + self.optimizer + self.runtime
                + max(self.activations + self.held_gradients, self.gradients + self.update))

    @property
    def training_added(self) -> int:
        """What training adds to a loaded model: the peak less the weights (what ``memory_added_mb`` measures)."""
        return self.peak - self.weights

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def text(self) -> str:
        """The plan as a few aligned lines."""
        s = self.setting
        across = f"{s.strategy.upper()} over {s.world_size} devices" if s.world_size > 1 else "1 device"
        ckpt = "with" if s.gradient_checkpointing else "without"
        accumulated = f" (x{s.grad_accum_steps} accumulated)" if s.grad_accum_steps > 1 else ""
        head = (f"memory plan: {s.method} fine-tuning ({s.objective}), {self.trainable_params / 1e6:.1f}M of "
                f"{self.total_params / 1e6:.1f}M parameters train; batch {s.batch_size} x {s.max_length} tokens"
                f"{accumulated}, {s.precision}, {ckpt} gradient checkpointing, {s.optimizer}, {across}")
        backward = self.activations + self.held_gradients >= self.gradients + self.update
        when = "in the backward pass" if backward else "at the optimizer update"
        lines = [head,
                 (f"  weights          {format_size(self.weights):>12}"
                 f"{f'  (1/{s.world_size} of them on each device)' if self.gathered else ''}"),
                 *([(f"  gathered (FSDP)  {format_size(self.gathered):>12}  (units whose weights are gathered at "
                    "once)")] if self.gathered else []),
                 *([f"  packed LM head   {format_size(self.packed_head):>12}  (kept if measured faster)"]
                   if self.packed_head else []),
                 f"  gradients        {format_size(self.gradients):>12}",
                 f"  optimizer state  {format_size(self.optimizer):>12}",
                 (f"  activations      {format_size(self.activations):>12}  (per micro-batch of "
                 f"{s.batch_size // s.world_size} rows)"),
                 *([f"  CPU runtime      {format_size(self.runtime):>12}"] if self.runtime else []),
                 f"  peak per device  {format_size(self.peak):>12}  ({when})"]
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  device memory    {format_size(self.budget):>12}  -> {verdict} "
                         f"({100 * self.peak / self.budget:.0f}% used)")
        return "\n".join(lines)


def _meta_model(setting: PlanSetting) -> torch.nn.Module:
    config = setting.shape.config()
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(config, num_labels=setting.num_labels, pad_token_id=0) \
            if setting.objective == "classification" else GPT2(config)
    method = setting.method if setting.method != "none" else "head"
    lora = setting.lora if setting.lora is not None else LoRAConfig()
    if method == "lora" and lora.init != "kaiming":  # PiSSA/OLoRA run an SVD: the shapes are the same
        lora = LoRAConfig(**{**lora.__dict__, "init": "kaiming"})
    last_n = setting.last_n if method == "last_n_full" else None
    prepare_model(model, method, lora=lora if method == "lora" else None, last_n=last_n, seed=0)
    return model


def _layer_activations(setting: PlanSetting, rows: int, trains: str,
                       table: dict[str, tuple[float, float, float]] = LAYER_BYTES) -> float:
    a, b, c = lora_layer_bytes(setting.lora) if trains == "lora" else table[trains]
    t, d, h = setting.max_length, setting.shape.n_embd, setting.shape.n_head
    return rows * t * (a * d + b) + c * rows * kept_scores(h, t, t, causal=True)


def lora_layer_bytes(lora: LoRAConfig | None) -> tuple[float, float, float]:
    """:data:`LAYER_BYTES`' ``(a, b, c)`` for a block with this LoRA: the fitted entry for the default one (the
    four block layers, LoRA dropout on), else :func:`counted_lora_layer_bytes`."""
    lora = lora or LoRAConfig()
    if set(lora.targets) == set(BLOCK_TARGETS) and lora.dropout > 0 and not lora.use_dora:
        return LAYER_BYTES["lora"]
    # what a block keeps depends on where LoRA sits and whether its dropout copies inputs, not on these
    return counted_lora_layer_bytes(replace(lora, last_n_blocks=None, init="kaiming", alpha=None, style="peft"))


@functools.lru_cache(maxsize=32)
def counted_lora_layer_bytes(lora: LoRAConfig) -> tuple[float, float, float]:
    """What one block with ``lora`` keeps for backward, counted as :data:`LAYER_BYTES` were: the bytes autograd
    saves (:func:`~gpt2lora.ops.recompute.count_saved_tensors`, fp32, GPT-2's dropout on) in a 2-block model
    less a 1-block one, at widths 64 and 128 (16 tokens, 2 heads), solved per token for ``a * n_embd + b``;
    ``c``, the attention dropout's mask per score, is the default LoRA's. Targets without a trained block
    layer (``lm_head`` alone) keep nothing in the blocks. A few milliseconds; the global RNG is left as it was.
    """
    c = LAYER_BYTES["lora"][2]
    rows, length, heads = 2, 16, 2
    per_token = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        for width in (64, 128):
            saved = []
            for layers in (1, 2):
                config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=64, n_positions=length)
                torch.manual_seed(0)
                model = GPT2(config)
                prepare_model(model, "lora", lora=lora, seed=0)
                model.train()
                ids = torch.arange(rows * length).view(rows, length) % config.vocab_size
                with count_saved_tensors(model.parameters()) as counter:
                    model(ids, torch.ones_like(ids), labels=ids)
                saved.append(counter.bytes)
            layer = saved[1] - saved[0] - c * rows * kept_scores(heads, length, length, causal=True)
            per_token.append(max(layer, 0.0) / (rows * length))
    a = (per_token[1] - per_token[0]) / 64
    return a, per_token[0] - 64 * a, c


@dataclass(frozen=True)
class CheckpointedBackward:
    """Bytes alive in the backward pass of a checkpointed micro-batch, by what holds them (one device).

    The backward pass reaches the blocks once the loss and the final norm have given up what they kept; the
    first block's backward recomputes that block and peaks either at its start (``start_gradients`` on top of
    the whole recomputed block) or in its attention (what comes after the attention core freed, ``attention``
    on top).
    """

    in_blocks: float
    """The blocks' saved inputs, the head's weight gradient when it trains, the embedding dropout's mask when
    the embeddings train."""
    recomputed: float
    """What the recomputed block keeps (:data:`RECOMPUTED_LAYER_BYTES`, less its input: the checkpoint's)."""
    start_gradients: float
    """At the start of its backward: the gradients of :data:`BLOCK_START_GRADS`."""
    attention: float
    """In its attention's backward: one block of scores and :data:`ATTENTION_GRADS`, less
    :data:`AFTER_ATTENTION_KEPT_BYTES`."""

    @property
    def peak(self) -> float:
        return self.in_blocks + self.recomputed + max(self.start_gradients, self.attention)


def _blocks_that_train(s: PlanSetting) -> tuple[int, str]:
    """How many blocks keep activations for backward, and what they keep (a :data:`LAYER_BYTES` key)."""
    if s.method in ("full", "prompt", "embeddings"):
        return s.shape.n_layer, "full"
    if s.method == "last_n_full":
        return min(s.last_n or 0, s.shape.n_layer), "full"
    if s.method == "lora":
        lora_blocks = s.lora.last_n_blocks if s.lora and s.lora.last_n_blocks else None
        return lora_blocks or s.shape.n_layer, "lora"
    return 0, "full"  # head / none: nothing inside the blocks needs a gradient


def _head_gradient(s: PlanSetting, model: torch.nn.Module) -> float:
    """The LM head's weight gradient (tied to wte), formed in the forward pass when the head trains."""
    trains = s.objective == "lm" and any(p.requires_grad for p in model.lm_head.parameters())
    return 4.0 * s.shape.vocab_size * s.shape.n_embd if trains else 0.0


def checkpointed_backward(setting: PlanSetting, model: torch.nn.Module) -> CheckpointedBackward:
    """The terms of a checkpointed backward pass's peak (see :class:`CheckpointedBackward`)."""
    s, d = setting, setting.shape.n_embd
    rows = s.batch_size // s.world_size
    tokens = rows * s.max_length
    active, stored = _blocks_that_train(s)
    in_blocks = active * _layer_activations(s, rows, "checkpointed") + _head_gradient(s, model)
    in_blocks += 1.0 * tokens * d if s.method in ("full", "prompt", "embeddings") else 0.0
    if not active:
        return CheckpointedBackward(in_blocks, 0.0, 0.0, 0.0)
    recomputed = _layer_activations(s, rows, stored, RECOMPUTED_LAYER_BYTES) - 4.0 * tokens * d
    freed = AFTER_ATTENTION_KEPT_BYTES[stored]
    attention = attention_scores_transient(s, rows) + (ATTENTION_GRADS - freed) * tokens * d
    return CheckpointedBackward(in_blocks, recomputed, BLOCK_START_GRADS[stored] * tokens * d, attention)


def activation_parts(setting: PlanSetting, model: torch.nn.Module) -> tuple[float, float, float]:
    """Bytes of one micro-batch on one device: ``(kept, loss transient, backward transient)``.

    ``kept``: what the forward pass keeps for backward (what :func:`~gpt2lora.ops.recompute.count_saved_tensors`
    counts); the two transients come at different moments, so the peak adds the larger of them. The backward
    one is what the backward pass holds at its peak beyond ``kept``: the attention's score blocks, or with
    checkpointing :class:`CheckpointedBackward`'s peak less ``kept`` (what the loss and final norm kept is
    freed by then).
    """
    s, d = setting, setting.shape.n_embd
    rows = s.batch_size // s.world_size
    tokens = rows * s.max_length
    active, stored = _blocks_that_train(s)
    # kept from the forward into the backward pass: what the blocks save (only their inputs when checkpointed),
    # what the final norm and the loss keep, and the head's weight gradient
    kept = active * _layer_activations(s, rows, "checkpointed" if s.gradient_checkpointing else stored)
    kept += OUTSIDE_BYTES[stored, s.gradient_checkpointing] * tokens * d + _head_gradient(s, model)
    if s.objective == "classification" and active and not s.gradient_checkpointing:
        # a classifier runs the last block's queries, output projection and MLP on each row's last token only
        kept += LAST_BLOCK_POOLED_BYTES[stored] * tokens * d - _layer_activations(s, rows, stored)
    # transient, at different moments: the chunked LM loss's (chunk, vocab) logits, probabilities and their
    # gradient at the end of the forward pass; the backward pass's
    loss_block = 3 * 4.0 * min(s.loss_chunk_size, tokens) * s.shape.vocab_size if s.objective == "lm" else 0.0
    if not active:
        return kept, loss_block, 0.0
    if not s.gradient_checkpointing:
        scores = attention_scores_transient(s, rows)
        if s.objective == "classification":
            return kept, loss_block, scores
        # the last block's backward: at its start the gradients of BLOCK_START_GRADS; in its attention's backward
        # one block of scores and ATTENTION_GRADS, the tensors kept after the attention core freed by then
        start = BLOCK_START_GRADS[stored] * tokens * d
        attention = scores + (ATTENTION_GRADS - after_attention_kept(stored, recomputed=False)) * tokens * d
        return kept, loss_block, max(start, attention)
    return kept, loss_block, checkpointed_backward(s, model).peak - kept


def after_attention_kept(stored: str, recomputed: bool) -> float:
    """:data:`AFTER_ATTENTION_KEPT_BYTES`, per token and unit of width; outside a checkpointed recompute, full
    fine-tuning does not keep the LayerNorm and GELU outputs (:mod:`gpt2lora.ops.recompute` remakes them)."""
    not_kept = 0.0 if recomputed else RECOMPUTED_LAYER_BYTES[stored][0] - LAYER_BYTES[stored][0]
    return AFTER_ATTENTION_KEPT_BYTES[stored] - not_kept


def attention_scores_transient(setting: PlanSetting, rows: int) -> float:
    """Bytes the CPU attention's backward adds for its largest block of scores (it works block by block; GPT-2's
    masks are all causal, so long sequences go in blocks of queries)."""
    t, h = setting.max_length, setting.shape.n_head
    return SCORE_TRANSIENT_BYTES * block_scores(rows, h, t, t, causal=True)


def plan_memory(setting: PlanSetting, device_memory: int | None = None) -> MemoryPlan:
    """The estimated peak memory per device of one training step of ``setting`` (see the module docstring)."""
    if setting.max_length > setting.shape.n_positions:
        raise ConfigError(f"max_length={setting.max_length} is beyond the model's {setting.shape.n_positions} "
                          "positions")
    model = _meta_model(setting)
    n, s = setting.world_size, setting
    if s.precision == "bf16":
        hold_frozen_weights(model)  # as the Trainer does: the frozen matrices in bf16
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    sharded = s.strategy == "fsdp" and n > 1
    half = s.precision in ("bf16", "fp16")

    weights = float(_bytes(params))
    grads = 4.0 * n_train
    moments = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}.get(s.optimizer, 2) * 4.0 * n_train
    if sharded:
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        block_params = list(blocks[0].parameters()) if blocks else []
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root_params = [p for p in params if id(p) not in in_blocks]
        if half and s.device.startswith("cuda"):  # FSDP's mixed-precision policy gathers every weight in 2 bytes
            gathered = 2.0 * (sum(p.numel() for p in root_params) + 2 * sum(p.numel() for p in block_params))
        else:
            gathered = float(_bytes(root_params) + 2 * _bytes(block_params))
        weights, grads, moments = weights / n, grads / n, moments / n
    else:
        gathered = 0.0
    packed_head = _packed_head_bytes(s, model) if not sharded else 0  # FSDP's head moves: not packed

    # activations of one micro-batch on one device
    kept, loss_block, backward = activation_parts(s, model)
    acts = kept + max(loss_block, backward)
    if half:
        blocks_train = s.method in ("full", "last_n_full")
        acts *= (HALF_ACTIVATIONS if s.device.startswith("cuda") else HALF_ACTIVATIONS_CPU)[blocks_train]
    grads += grads if n > 1 and not sharded else 0.0  # DDP's gradient buckets
    largest = max((p.numel() for p in trainable), default=0)
    update = 8.0 * largest / (n if sharded else 1)
    runtime = 0 if s.device.startswith("cuda") else CPU_RUNTIME_BYTES
    return MemoryPlan(s, total, n_train, int(weights), int(grads), int(moments), int(acts), int(update),
                      device_memory, runtime, int(gathered), packed_head)


def _bytes(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _packed_head_bytes(setting: PlanSetting, model: torch.nn.Module) -> int:
    """The frozen bf16 LM head's packed copy a CPU with bf16 units may keep (0 where it is never packed)."""
    if setting.objective != "lm" or setting.device != "cpu" or not packed_linear_available(torch.bfloat16):
        return 0
    head = model.lm_head.weight if isinstance(model, GPT2) else None
    if head is None or head.requires_grad or head.dtype != torch.bfloat16:
        return 0
    return head.numel() * head.element_size()


def default_device_memory(device: str) -> int | None:
    """Memory of the device a run would use: the first GPU's, or the machine's RAM (None where unknown)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


__all__ = ["KNOWN_MODELS", "LAYER_BYTES", "CheckpointedBackward", "MemoryPlan", "ModelShape", "PlanSetting",
           "checkpointed_backward", "default_device_memory", "format_size", "model_shape", "parse_size",
           "plan_memory"]
