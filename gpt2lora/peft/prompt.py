"""Prompt tuning: trainable input vectors prepended to every sequence (peft's ``PROMPT_TUNING``).

:func:`apply_prompt` attaches a :class:`SoftPrompt` as ``model.transformer.prompt``. The transformer then
puts its ``num_virtual_tokens`` vectors in front of the token embeddings of every row, marks them as real
tokens in the attention mask, gives them positions ``0 .. n-1`` (the text's positions start at ``n``) and
drops them again from its output, so logits, pooling and losses see only the text's positions. Only the
prompt trains (and a classifier's ``score`` head, as peft's ``modules_to_save``).

The SST-2 report's "PreLayer" row (46,080 trainable parameters on GPT-2 124M) is what a soft prompt of 60
vectors of width 768 holds; method ``embeddings`` is the other reading (whole embedding tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .registry import attach_registry

PROMPT_INITS = ("vocab", "random")


@dataclass(frozen=True)
class PromptConfig:
    """How many virtual tokens a soft prompt has and how they start."""

    num_virtual_tokens: int = 20
    """Number of trainable vectors prepended to every sequence (width ``n_embd`` each)."""
    init: str = "vocab"
    """``vocab``: copies of randomly chosen rows of ``wte`` (seeded), so the prompt starts at the scale of
    real token embeddings; ``random``: N(0, 1) entries, as peft's ``prompt_tuning_init="RANDOM"``."""

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"PromptConfig.num_virtual_tokens: expected a positive integer, got {n!r}")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"PromptConfig.init: expected one of {', '.join(PROMPT_INITS)}, got {self.init!r}")


class SoftPrompt(nn.Module):
    """``weight`` (num_virtual_tokens, n_embd): the vectors the transformer prepends to each row."""

    def __init__(self, num_virtual_tokens: int, n_embd: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_virtual_tokens, n_embd, dtype=dtype, device=device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.size(0)

    def prepend(self, inputs_embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Embeddings (B, n+T, C) with the prompt in front; mask and positions extended to match."""
        B, T, _ = inputs_embeds.shape
        n = self.num_virtual_tokens
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(B, n, -1)  # (B, n, C)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} "
                                  f"(batch, tokens; the {n} virtual tokens of the soft prompt are added by "
                                  "the model)")
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
        if position_ids is not None:
            first = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(B, n)
            position_ids = torch.cat([first, position_ids.expand(B, T) + n], dim=1)
        return embeds, attention_mask, position_ids

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, n_embd={self.weight.size(1)}"


def get_prompt(model: nn.Module) -> SoftPrompt | None:
    """The model's soft prompt, or None."""
    prompt = getattr(getattr(model, "transformer", None), "prompt", None)
    return prompt if isinstance(prompt, SoftPrompt) else None


@torch.no_grad()
def apply_prompt(model: nn.Module, config: PromptConfig, seed: int | None = None) -> nn.Module:
    """Attach a soft prompt to ``model`` (a GPT2 or classifier), freeze the rest, return ``model``.

    Trainable afterwards: ``transformer.prompt.weight`` and a classifier's ``score`` head. ``seed``
    makes the initialisation reproducible. The config is kept in the model's adapter registry (read it as
    ``model.prompt_config``).
    """
    if not isinstance(config, PromptConfig):
        raise ConfigError(f"apply_prompt: config must be a PromptConfig, got {type(config).__name__}")
    transformer = getattr(model, "transformer", None)
    wte = getattr(transformer, "wte", None)
    if not isinstance(wte, nn.Embedding):
        raise ConfigError(f"apply_prompt expects a gpt2lora model with transformer.wte, got {type(model).__name__}")
    if get_prompt(model) is not None:
        raise ConfigError("apply_prompt: the model already has a soft prompt (transformer.prompt); load a fresh "
                          "model, or use load_adapter to replace its values")
    n = config.num_virtual_tokens
    if n >= transformer.config.n_positions:
        raise ConfigError(f"PromptConfig.num_virtual_tokens={n} leaves no position for text: the model has "
                          f"n_positions={transformer.config.n_positions}")
    weight = wte.weight
    prompt = SoftPrompt(n, weight.size(1), dtype=weight.dtype, device=weight.device)
    if weight.device.type != "meta":
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if config.init == "vocab":
            rows = torch.randint(0, weight.size(0), (n,), generator=generator)
            prompt.weight.copy_(weight[rows.to(weight.device)])
        else:
            prompt.weight.copy_(torch.randn(n, weight.size(1), generator=generator))
    for param in model.parameters():
        param.requires_grad_(False)
    transformer.prompt = prompt
    head = getattr(model, "score", None)
    if isinstance(head, nn.Module):
        head.requires_grad_(True)
    attach_registry(model).prompt_config = config
    return model
