"""Training methods by name: which tensors train for ``lora``, ``full``, ``last_n_full``, ``embeddings``,
``head`` and ``prompt``.

The head is ``score`` for :class:`~gpt2lora.model.classifier.GPT2ForSequenceClassification`. For the language
model :class:`~gpt2lora.model.gpt2.GPT2` the head is ``lm_head``, which every released GPT-2 ties to the
token embedding ``transformer.wte``, so "the head" and "the token embedding" are one tensor:

* ``embeddings`` on a tied LM trains ``wte`` (which is the head) and ``wpe``;
* ``last_n_full`` on a tied LM trains the last N blocks and ``ln_f`` but not the tied head, because
  updating it would also change the input embeddings of every token — not "the last N blocks";
* ``head`` on a tied LM is rejected (use ``embeddings``); on an untied LM it trains ``lm_head``.

The SST-2 report's "PreLayer" row has two readings, and both are offered: ``embeddings`` is the row as
the report describes it (whole token and position tables plus the head: 39.4M tensors for GPT-2 124M);
``prompt`` is the row as its count says — 46,080 trainable parameters (0.037%) are exactly a soft prompt
of 60 vectors of width 768 (``PromptConfig(num_virtual_tokens=60)``, see :mod:`gpt2lora.peft.prompt`).
"""

from __future__ import annotations

from torch import nn

from ..config import LoRAConfig
from ..errors import ConfigError
from ..model.classifier import is_classifier
from .layers import lora_modules
from .lora import apply_lora
from .prompt import PromptConfig, apply_prompt, get_prompt
from .registry import attach_registry

#: Training methods ``prepare_model`` accepts.
METHODS = ("lora", "full", "last_n_full", "embeddings", "head", "prompt")


def _n_layer(model: nn.Module) -> int:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"prepare_model expects a gpt2lora model with transformer.h blocks, got "
                          f"{type(model).__name__}")
    return len(blocks)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the output head that is a tensor of its own (none for a tied LM head)."""
    if is_classifier(model):
        return ("score.",)
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module) and lm_head.weight is not model.transformer.wte.weight:
        return ("lm_head.",)
    return ()


def trainable_names(model: nn.Module, method: str, last_n: int | None = None) -> set[str]:
    """Names (as ``named_parameters`` gives them) that ``method`` trains; ``lora`` is not handled here."""
    n_layer = _n_layer(model)
    names = [name for name, _ in model.named_parameters()]
    heads = head_prefixes(model)
    if method == "full":
        prefixes: tuple[str, ...] = ("",)
    elif method == "last_n_full":
        if last_n is None or isinstance(last_n, bool) or not isinstance(last_n, int) or not 1 <= last_n <= n_layer:
            raise ConfigError(f"prepare_model: method 'last_n_full' needs last_n in 1..{n_layer} (the model "
                              f"has {n_layer} blocks), got last_n={last_n!r}")
        blocks = tuple(f"transformer.h.{i}." for i in range(n_layer - last_n, n_layer))
        prefixes = (*blocks, "transformer.ln_f.", *heads)
    elif method == "embeddings":
        prefixes = ("transformer.wte.", "transformer.wpe.", *heads)
    elif method == "head":
        if not heads:
            raise ConfigError("prepare_model: method 'head' on a language model whose lm_head is tied to "
                              "transformer.wte would train the token embeddings; use method='embeddings' "
                              "for that, or a GPT2ForSequenceClassification for a linear probe")
        prefixes = heads
    elif method == "prompt":
        if get_prompt(model) is None:
            raise ConfigError("prepare_model: method 'prompt' needs a soft prompt; call prepare_model(model, "
                              "'prompt', prompt=PromptConfig(...)) on a model without one")
        prefixes = ("transformer.prompt.", *(("score.",) if "score." in heads else ()))
    else:
        raise ConfigError(f"prepare_model: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return {name for name in names if name.startswith(prefixes)}


def prepare_model(model: nn.Module, method: str, lora: LoRAConfig | None = None,
                  last_n: int | None = None, seed: int | None = None,
                  prompt: PromptConfig | None = None) -> nn.Module:
    """Set exactly the trainable tensors of ``method`` (one of :data:`METHODS`) and return ``model``.

    ``lora``: the LoRA configuration of method ``lora`` (default ``LoRAConfig()``); restrict LoRA to
    the last blocks with its ``last_n_blocks``. ``last_n``: block count of ``last_n_full``.
    ``prompt``: the soft prompt of method ``prompt`` (default ``PromptConfig()``; a model that already
    has one keeps it). ``seed``: seeds LoRA's or the prompt's initialisation. The choice is recorded in the
    model's adapter registry (read it as ``model.training_method`` / ``model.training_last_n``), which tells
    :func:`gpt2lora.save_adapter` what to save.
    """
    if method not in METHODS:
        raise ConfigError(f"prepare_model: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if last_n is not None and method != "last_n_full":
        hint = " (for LoRA on the last blocks use LoRAConfig.last_n_blocks)" if method == "lora" else ""
        raise ConfigError(f"prepare_model: last_n is only used by method 'last_n_full', got last_n={last_n} "
                          f"with method {method!r}{hint}")
    if lora is not None and method != "lora":
        raise ConfigError(f"prepare_model: lora= is only used by method 'lora', got it with method {method!r}")
    if prompt is not None and method != "prompt":
        raise ConfigError(f"prepare_model: prompt= is only used by method 'prompt', got it with method {method!r}")
    if get_prompt(model) is not None and method != "prompt":
        raise ConfigError(f"prepare_model: the model has a soft prompt (transformer.prompt); method {method!r} "
                          "needs a model without one")
    if method == "lora":
        apply_lora(model, lora if lora is not None else LoRAConfig(), seed=seed)
    else:
        wrapped = [name for name, _ in lora_modules(model)]
        if wrapped:
            raise ConfigError(f"prepare_model: the model already has LoRA ({wrapped[0]} ...); method "
                              f"{method!r} needs a model without adapters")
        if method == "prompt" and get_prompt(model) is None:
            apply_prompt(model, prompt if prompt is not None else PromptConfig(), seed=seed)
        elif method == "prompt" and prompt is not None and prompt.num_virtual_tokens != get_prompt(model).num_virtual_tokens:
            raise ConfigError(f"prepare_model: the model already has a soft prompt of "
                              f"{get_prompt(model).num_virtual_tokens} virtual tokens, not {prompt.num_virtual_tokens}")
        chosen = trainable_names(model, method, last_n)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
    registry = attach_registry(model)
    registry.method, registry.last_n = method, last_n
    return model
