"""GPT-2 in plain PyTorch. Module names mirror the Hugging Face checkpoint; no I/O and no LoRA here."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import GPT2Config
from ..constants import DEFAULT_LOSS_CHUNK_SIZE
from ..errors import ConfigError
from ..ops.attention import attention, attention_by_rows
from ..ops.dropout import Dropout
from ..ops.few_row import Linear
from ..ops.lm_head_loss import check_chunk_size, lm_head_loss
from ..ops.recompute import recompute_cheap_outputs
from .hooks import AdapterView, KVCache, row_adapters

if TYPE_CHECKING:
    from pathlib import Path



@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of a padded (B, T) batch are: training runs the block layers on those rows only.

    ``tokens`` holds the flat positions ``b * T + t`` of the real tokens (attention mask 1), in order.
    """

    tokens: Tensor
    batch: int
    length: int
    lengths: list[int] | None = None
    """Each row's count of real tokens when every row's real tokens are one unbroken run (left or right
    padding, no packed sequences): attention then runs row by row on those tokens alone. None otherwise."""

    @classmethod
    def of(cls, attention_mask: Tensor, runs: bool = True) -> Unpadded:
        """``runs``: find whether each row's tokens are one run (pass False when a row holds packed sequences)."""
        B, T = attention_mask.shape
        mask = attention_mask.bool()
        tokens = mask.reshape(-1).nonzero().squeeze(1)
        lengths = None
        if runs:
            counts = mask.sum(dim=1)
            positions = torch.arange(T, device=mask.device)
            first = torch.where(mask, positions, T).amin(dim=1)
            last = torch.where(mask, positions, -1).amax(dim=1)
            if bool(((counts == 0) | (last - first + 1 == counts)).all()):
                lengths = counts.tolist()
        return cls(tokens, B, T, lengths)

    def gather(self, padded: Tensor) -> Tensor:
        """(B, T, F) → (real tokens, F)."""
        return padded.reshape(self.batch * self.length, -1).index_select(0, self.tokens)

    def scatter(self, rows: Tensor) -> Tensor:
        """(real tokens, F) → (B, T, F), zeros at padding."""
        padded = rows.new_zeros(self.batch * self.length, rows.size(-1))
        return padded.index_copy(0, self.tokens, rows).view(self.batch, self.length, -1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                kv_cache: KVCache | None = None, layer: int = 0, unpadded: Unpadded | None = None) -> Tensor:
        """``x`` (B, T, C), or (real tokens, C) with ``unpadded``: attention sees them in their padded rows, or
        row by row when each row's tokens are one run (no score is computed for padding)."""
        qkv = self.c_attn(x)
        if unpadded is not None and unpadded.lengths is not None and kv_cache is None:
            dropout_p = self.attn_pdrop if self.training else 0.0
            out = self.c_proj(attention_by_rows(qkv, unpadded.lengths, self.n_head, dropout_p))
            return self.resid_dropout(out) if self.training else out
        if unpadded is not None:
            qkv = unpadded.scatter(qkv)
        B, T, C = qkv.size(0), qkv.size(1), self.n_embd
        # (B, T, 3 C) -> q, k, v as (B, nh, T, hs) views: one view and one permute (decoding runs this per layer
        # per token, so every op counts)
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), in fp32 for a half model on the CPU (cache_dtype)
            q = q.to(k.dtype)
        y = attention(q, k, v, attn_mask, is_causal, self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(qkv.dtype)
        if unpadded is not None:
            y = unpadded.gather(y)
        out = self.c_proj(y)
        return self.resid_dropout(out) if self.training else out  # eval: identity (one call less per token)

    def forward_rows(self, x: Tensor, attn_mask: Tensor | None, rows: Tensor) -> Tensor:
        """Output (B, 1, C) at query position ``rows[b]`` of each row: keys and values come from every position.

        ``attn_mask`` is the full (B, 1, T, T) mask, or None for plain causal attention.
        """
        B, T, C = x.shape
        batch = torch.arange(B, device=x.device)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q[batch, rows].view(B, 1, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, 1, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if attn_mask is None:
            mask = (torch.arange(T, device=x.device) <= rows.unsqueeze(1)).view(B, 1, 1, T)
        else:
            mask = attn_mask.expand(B, -1, -1, -1)[batch, :, rows].unsqueeze(2)  # (B, 1, 1, T)
        y = attention(q, k, v, mask, False, self.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, 1, C)))


def activation(name: str) -> nn.Module:
    """The MLP activation named in a GPT-2 ``config.json``."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[name]


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim)
        self.act = activation(config.activation_function)
        self.c_proj = Linear(config.inner_dim, config.n_embd)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        out = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(out) if self.training else out


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                kv_cache: KVCache | None = None, layer: int = 0, unpadded: Unpadded | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, kv_cache, layer, unpadded)
        return x + self.mlp(self.ln_2(x))

    def forward_rows(self, x: Tensor, attn_mask: Tensor | None, rows: Tensor) -> Tensor:
        """``forward(x)[b, rows[b]]`` for every row b, as (B, 1, C), computing the MLP on those rows only."""
        picked = x[torch.arange(x.size(0), device=x.device), rows].unsqueeze(1)  # (B, 1, C)
        x = picked + self.attn.forward_rows(self.ln_1(x), attn_mask, rows)
        return x + self.mlp(self.ln_2(x))


def cheap_layers(blocks: Iterable[Block]) -> list[nn.Module]:
    """The LayerNorms and MLP activations of ``blocks``: layers whose outputs are cheaper to recompute than keep."""
    return [layer for block in blocks for layer in (block.ln_1, block.ln_2, block.mlp.act)]


def last_token_index(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Index of each row's last real token: the last 1 in its attention mask, whatever the padding side."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)
    return (attention_mask.bool() * positions).amax(dim=-1)


def position_ids_from_mask(attention_mask: Tensor, length: int) -> Tensor:
    """Positions counted over real tokens only, so a left-padded row starts at 0 like an unpadded one.

    ``attention_mask`` covers every position so far (cache + new); the last ``length`` are returned.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -length:]


def attends_by_rows(device: torch.device, setting: bool | None) -> bool:
    """``Transformer.attention_by_rows`` resolved for ``device``: ``None`` means row by row on the CPU only."""
    return setting if setting is not None else device.type == "cpu"


def packed_segments(position_ids: Tensor) -> Tensor | None:
    """Which packed sequence each position belongs to, (B, T) counting from 0; None if no row holds several.

    A new sequence starts wherever a position is not the previous one + 1, as when packed examples
    restart at 0 (the rule transformers applies to ``position_ids`` given without an attention mask).
    """
    starts = torch.diff(position_ids, dim=-1) != 1  # (B, T - 1)
    if not bool(starts.any()):
        return None
    return F.pad(starts.long().cumsum(-1), (1, 0))


def attention_bias(attention_mask: Tensor, query_length: int, segments: Tensor | None = None) -> Tensor:
    """Boolean mask (B, 1, T, S): causal, padding keys hidden, and each query always sees itself.

    Letting a padding query see itself keeps every row of the softmax non-empty (no NaN); real
    queries never see padding keys, so their outputs are unaffected. ``segments`` (B, S, no cache):
    a query sees only keys of its own packed sequence (block-diagonal causal attention).
    """
    B, S = attention_mask.shape
    past = S - query_length
    device = attention_mask.device
    query_pos = torch.arange(past, S, device=device).view(query_length, 1)
    key_pos = torch.arange(S, device=device).view(1, S)
    causal = key_pos <= query_pos  # (T, S)
    visible = causal & attention_mask.bool().view(B, 1, 1, S)
    if segments is not None:
        visible = visible & (segments.view(B, 1, S, 1) == segments.view(B, 1, 1, S))
    return visible | (key_pos == query_pos)


class Transformer(nn.Module):
    """Embeddings, blocks and final LayerNorm: everything of GPT-2 but its output head."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.prompt: nn.Module | None = None
        """Soft prompt of method ``prompt`` (see :mod:`gpt2lora.peft.prompt`), prepended to every row."""
        self.gradient_checkpointing = False
        """Recompute block activations in backward (training with grad enabled only, never with a cache)."""
        self.recompute_cheap_outputs: bool | None = None
        """In training, save the inputs of ``ln_1``, ``ln_2`` and the MLP activation in place of their outputs
        and recompute those in backward (see :mod:`gpt2lora.ops.recompute`): exact, less memory. ``None`` (the
        default): all but bf16/fp16 outputs on the CPU, whose recompute costs a larger share of the step than
        the memory it saves is worth there; ``True``: all of them; ``False``: none."""
        self.attention_by_rows: bool | None = None
        """In padded training, run causal attention row by row over each row's real tokens (no score for
        padding) rather than once over the padded batch. ``None`` (the default): row by row on the CPU, where
        the padding's scores cost more than the loop; one padded batch elsewhere: on an H200 each row's kernels
        cost a launch, the launches bound a small model's step, and one batch made the LM LoRA step 1.20-1.54x
        faster (``benchmarks/bench_attention_layout.py``)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, kv_cache: KVCache | None = None,
                inputs_embeds: Tensor | None = None, last_token_only: bool = False) -> Tensor:
        """Hidden states (B, T, n_embd) after ``ln_f``.

        Training with padding (``attention_mask`` has zeros, grad enabled): the block layers run on the real
        tokens only (:class:`Unpadded`), and the states at padding positions are zeros.

        ``last_token_only``: only each row's state at its last real token, (B, n_embd), as classification
        reads it; the last block's attention still reads every position, while its projection, MLP and
        ``ln_f`` run on that one row per sequence.

        ``attention_mask`` (B, S) marks real tokens with 1 and padding with 0; with a cache it covers
        the cached positions too (S = cached + T). ``inputs_embeds`` replaces the token lookup. With a
        soft prompt its vectors go in front of the tokens and are dropped from the output again.

        Packed rows (see :func:`gpt2lora.data.batching.collate_packed`): ``position_ids`` that restart inside a
        row (without a cache) start a new sequence there, and no position attends across that boundary.
        """
        past = kv_cache.length if kv_cache is not None else 0
        segments = packed_segments(position_ids) if position_ids is not None and kv_cache is None else None
        if segments is not None and (last_token_only or self.prompt is not None):
            what = "a classifier's pooled last token" if last_token_only else "a soft prompt (method 'prompt')"
            raise ConfigError(f"position_ids restart inside a row (packed examples), which {what} does not "
                              "support; pack only language-model rows and train without a soft prompt")
        if inputs_embeds is None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.wte(input_ids)
        n_prompt = 0
        if self.prompt is not None and past == 0:
            n_prompt = self.prompt.num_virtual_tokens
            inputs_embeds, attention_mask, position_ids = self.prompt.prepend(
                inputs_embeds, attention_mask, position_ids)
        elif self.prompt is not None:  # the prompt is in the cache already; the caller's mask covers the text
            n = self.prompt.num_virtual_tokens
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.size(0), n), attention_mask], 1)
            if position_ids is not None:
                position_ids = position_ids + n
        B, T, _ = inputs_embeds.shape
        if past + T > self.config.n_positions:
            raise ConfigError(
                f"sequence of {past + T} tokens is longer than the model's n_positions="
                f"{self.config.n_positions}; truncate the input (e.g. max_length) or use fewer new tokens")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                              f"{(B, past + T)} (batch, cached + new tokens)")
        if last_token_only:
            if kv_cache is not None:
                raise ConfigError("last_token_only=True cannot be combined with a kv_cache")
            rows = last_token_index(attention_mask, B, T, inputs_embeds.device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)
            else:
                position_ids = position_ids_from_mask(attention_mask, T)
        x = inputs_embeds + self.wpe(position_ids)
        if self.training:
            x = self.drop(x)
        if segments is not None:
            keys = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                 device=x.device)
            mask, is_causal = attention_bias(keys, T, segments.expand(B, T)), False
        elif attention_mask is None:
            mask, is_causal = None, T > 1 and past == 0
            if T > 1 and past > 0:
                mask = attention_bias(torch.ones(B, past + T, dtype=torch.bool, device=x.device), T)
        else:
            mask, is_causal = attention_bias(attention_mask, T), False
        training = self.training and torch.is_grad_enabled() and kv_cache is None
        blocks = self.h[:-1] if last_token_only else self.h
        # Padding slots carry nothing a real token reads: in training the block layers skip them.
        unpadded = (Unpadded.of(attention_mask,
                                runs=segments is None and attends_by_rows(x.device, self.attention_by_rows))
                    if training and attention_mask is not None and blocks else None)
        if unpadded is not None:
            x = unpadded.gather(x)
        if training and self.gradient_checkpointing:
            for layer, block in enumerate(blocks):
                # Non-reentrant: works when the input needs no grad (frozen base + LoRA) and replays
                # dropout with the saved RNG state, so losses and gradients equal the plain pass.
                x = checkpoint(block, x, mask, is_causal, None, layer, unpadded, use_reentrant=False)
        else:
            cheap = training and self.recompute_cheap_outputs is not False and not torch.compiler.is_compiling()
            keep_half = self.recompute_cheap_outputs is None
            with recompute_cheap_outputs(cheap_layers(blocks), keep_half) if cheap else nullcontext():
                for layer, block in enumerate(blocks):
                    x = block(x, mask, is_causal, kv_cache, layer, unpadded)
        if unpadded is not None and last_token_only:
            x = unpadded.scatter(x)
        if kv_cache is not None:
            kv_cache.length += T
        if last_token_only:
            return self.ln_f(self.h[-1].forward_rows(x, mask, rows)).squeeze(1)  # (B, C)
        if unpadded is not None:  # hidden states at padding are zeros
            return unpadded.scatter(self.ln_f(x))[:, n_prompt:]
        return self.ln_f(x[:, n_prompt:])

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ConfigError(f"input_ids contains token id {bad}, outside the vocabulary "
                                  f"[0, {self.config.vocab_size - 1}] (vocab_size={self.config.vocab_size})")


def init_weights(module: nn.Module, n_layer: int, generator: torch.Generator | None = None) -> None:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std, generator=generator)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02, generator=generator)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class GPT2(AdapterView, nn.Module):
    """GPT-2 language model: ``forward(input_ids, attention_mask=None) -> logits (B, T, vocab)``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            init_weights(self, config.n_layer)
        self.name_or_path: str | None = None
        """Where the weights came from (set by ``from_pretrained``)."""
        self.checkpoint_dir: Path | None = None
        """Local folder of the checkpoint, used to copy tokenizer files on export."""

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embedding, as every released GPT-2 does."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, kv_cache: KVCache | None = None,
                labels: Tensor | None = None, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
                adapter_names: list[str] | None = None) -> Tensor:
        """Next-token logits (B, T, vocab_size); with ``labels``, the *summed* loss instead (no logits).

        ``labels`` (B, T) as in Hugging Face (aligned with the input, ``-100`` = not a target): returns the
        0-dim fp32 sum of the next-token cross-entropy over the target tokens, the head applied at
        those positions only, ``loss_chunk_size`` rows at a time (:func:`gpt2lora.ops.lm_head_loss.lm_head_loss`).
        Divide by :func:`~gpt2lora.ops.lm_head_loss.count_targets` for the mean transformers' ``labels=`` gives.
        ``adapter_names``: with several LoRA adapters, one name (or ``"__base__"``) per row, all rows in one
        pass (inference only; see :mod:`gpt2lora.peft.named`).
        """
        if adapter_names is not None:
            with row_adapters(self, adapter_names, input_ids.size(0)):
                return self.forward(input_ids, attention_mask, position_ids, kv_cache, labels, loss_chunk_size)
        if labels is not None:
            check_chunk_size(loss_chunk_size, "GPT2.forward loss_chunk_size")
            if kv_cache is not None:
                raise ConfigError("GPT2.forward: labels (a training loss) cannot be combined with a kv_cache")
        hidden = self.transformer(input_ids, attention_mask, position_ids, kv_cache)
        if labels is None:
            return self.lm_head(hidden)
        return lm_head_loss(hidden, self.lm_head, labels, loss_chunk_size)[0]

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` this model is saved with."""
        return self.config.to_hf_config()

    @classmethod
    def from_config(cls, config: GPT2Config | str, seed: int | None = None) -> GPT2:
        """A randomly initialised model of the given shape (or preset name)."""
        if isinstance(config, str):
            config = GPT2Config.from_preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None,
                        cache_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, allow_nonfinite: bool = False,
                        huge_pages: bool = False) -> GPT2:
        """Load a hub id (``gpt2``, ``openai-community/gpt2-medium``, ...) or a local HF-layout folder.

        ``dtype`` converts the weights (default, as transformers: the dtype ``config.json`` names, else the
        checkpoint's own). A weight holding NaN or inf is refused by name unless ``allow_nonfinite=True``.
        ``huge_pages=True`` puts the CPU weights on 2 MB pages where Linux allows it (:mod:`gpt2lora.model.pages`):
        faster decoding for a process that generates long enough to repay the slower load.
        """
        from .hub import load_pretrained

        return load_pretrained(cls, name_or_path, revision=revision, cache_dir=cache_dir,
                               dtype=dtype, device=device, allow_nonfinite=allow_nonfinite, huge_pages=huge_pages)

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = 50256,
                 generator: torch.Generator | None = None, stop_token_ids: list[int] | None = None,
                 adapter_names: list[str] | None = None) -> Tensor:
        """Continue each prompt; see :func:`gpt2lora.model.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator, stop_token_ids=stop_token_ids,
                        adapter_names=adapter_names)
