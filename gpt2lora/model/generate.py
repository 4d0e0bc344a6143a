"""Autoregressive sampling with a preallocated KV cache: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError
from ..ops.few_row import HALF, few_row_products
from .hooks import KVCache, row_adapters

if TYPE_CHECKING:
    from .gpt2 import GPT2


def _check_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ConfigError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ConfigError(f"top_k: expected a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1)):
        raise ConfigError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")


def left_align(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move every row's padding to the left, keeping its real tokens in order.

    Generation appends after the last column, so real tokens must end there whatever padding
    side the caller used.
    """
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # padding (0) first
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` best and outside the top-``p`` nucleus.

    The nucleus is the smallest set of best tokens whose probabilities sum to at least ``top_p``.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> Tensor:
    """Choose one token per row from last-position logits (B, vocab); ``temperature=0`` is greedy."""
    if temperature == 0:
        if logits.device.type == "cpu" and logits.dtype in HALF:
            logits = logits.float()  # exact; torch's CPU argmax over 50,257 bf16 logits took twice as long
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _stop_tensor(stop_token_ids: Sequence[int] | None, like: Tensor) -> Tensor | None:
    if stop_token_ids is None:
        return None
    ids = list(stop_token_ids) if isinstance(stop_token_ids, (list, tuple, set, frozenset)) else None
    if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ConfigError(f"stop_token_ids: expected a list of non-negative token ids or None, got "
                          f"{stop_token_ids!r}")
    return torch.tensor(sorted(ids), dtype=torch.long, device=like.device) if ids else None


@torch.inference_mode()
def generate(model: GPT2, input_ids: Tensor, attention_mask: Tensor | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = 50256,
             generator: torch.Generator | None = None, stop_token_ids: Sequence[int] | None = None,
             adapter_names: list[str] | None = None) -> Tensor:
    """Prompt + continuation (B, T + new) for a batch of prompts.

    Prompts of different lengths are passed padded with an ``attention_mask`` (either side; they
    are left-aligned here). A row that produced ``eos_token_id`` is filled with it from then on,
    and generation stops early once every row has. A row that produced one of ``stop_token_ids``
    keeps that token and is finished too (e.g. every token holding a newline, for one-line answers).
    ``temperature=0`` is greedy decoding. ``adapter_names``: one LoRA adapter (or ``"__base__"``) per row,
    every step in one pass (see :mod:`gpt2lora.peft.named`).
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    stop = _stop_tensor(stop_token_ids, input_ids)
    # An id past the vocabulary is accepted (it never comes up): the default 50256 must work for
    # small test vocabularies too.
    if eos_token_id is not None and (not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool)
                                     or eos_token_id < 0):
        raise ConfigError(f"eos_token_id: expected None or a non-negative token id, got {eos_token_id!r}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ConfigError(f"input_ids: expected a (batch, tokens) tensor with at least one token, got shape "
                          f"{tuple(input_ids.shape)}")
    batch, prompt_len = input_ids.shape
    limit = model.config.n_positions
    soft_prompt = model.transformer.prompt
    virtual = soft_prompt.num_virtual_tokens if soft_prompt is not None else 0
    if virtual + prompt_len + max_new_tokens > limit:
        soft = f" + {virtual} soft-prompt vectors" if virtual else ""
        raise ConfigError(f"prompt of {prompt_len} tokens{soft} + max_new_tokens={max_new_tokens} exceeds the "
                          f"model's n_positions={limit}; shorten the prompt or ask for fewer tokens")
    if max_new_tokens == 0:
        return input_ids
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                              f"{tuple(input_ids.shape)} like input_ids")
        empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(f"attention_mask rows {empty} have no real token; every prompt needs at "
                              "least one token")
        input_ids, attention_mask = left_align(input_ids, attention_mask)
    weight = model.transformer.wpe.weight  # the activations' dtype (a frozen base may be held in bf16)
    cache = KVCache(model.config, batch, virtual + prompt_len + max_new_tokens, weight.dtype, weight.device)
    routing = nullcontext()
    if adapter_names is not None:
        routing = row_adapters(model, adapter_names, batch)
    with routing:
        new_tokens = _decode(model, input_ids, attention_mask, cache, max_new_tokens,
                             lambda logits: next_token(logits, temperature, top_k, top_p, generator), eos_token_id,
                             stop)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _decode(model: GPT2, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache, max_new_tokens: int,
            choose: Callable[[Tensor], Tensor], eos_token_id: int | None,
            stop: Tensor | None = None) -> list[Tensor]:
    """The new tokens, one (B,) tensor per step: prefill the cache, then feed back each choice."""
    hidden = model.transformer(input_ids, attention_mask, kv_cache=cache)
    # Decoding feeds one position per row: its products are bound by reading the weights, which
    # few_row_products does faster on CPU (and leaves to F.linear elsewhere). The prompt stays outside it: its
    # row count changes with every prompt, and each new count would be timed kernel by kernel again.
    with few_row_products():
        logits = model.lm_head(hidden[:, -1])
        return _steps(model, logits, attention_mask, cache, max_new_tokens, choose, eos_token_id, stop)


def _steps(model: GPT2, logits: Tensor, attention_mask: Tensor | None, cache: KVCache, max_new_tokens: int,
           choose: Callable[[Tensor], Tensor], eos_token_id: int | None, stop: Tensor | None) -> list[Tensor]:
    """The decoding steps after the prompt: choose a token from ``logits``, feed it back, repeat."""
    batch = logits.size(0)
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = choose(logits)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        if stop is not None:
            finished |= torch.isin(token, stop)
        new_tokens.append(token)
        if step == max_new_tokens - 1 or ((eos_token_id is not None or stop is not None) and bool(finished.all())):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        hidden = model.transformer(token.unsqueeze(1), attention_mask, kv_cache=cache)
        logits = model.lm_head(hidden[:, -1])
    return new_tokens
