"""Sequence classification: the GPT-2 body with a linear ``score`` head in place of the LM head."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import GPT2Config
from ..errors import ConfigError
from .gpt2 import Transformer, init_weights, last_token_index
from .hooks import AdapterView, row_adapters

__all__ = ["GPT2ForSequenceClassification", "is_classifier", "label_count", "last_token_index"]


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` ends in a classification head (a ``score`` layer / ``num_labels``), not an LM head.

    The one test of "is this a classifier?" that training, evaluation, adapters and the run layer use.
    """
    return isinstance(getattr(model, "score", None), nn.Module) or hasattr(model, "num_labels")


def label_count(model: nn.Module) -> int:
    """Number of classes of a classifier (``num_labels``, else the ``score`` layer's outputs)."""
    return int(getattr(model, "num_labels", 0) or model.score.out_features)


class GPT2ForSequenceClassification(AdapterView, nn.Module):
    """GPT-2 with ``score = Linear(n_embd, num_labels, bias=False)`` read at the last real token.

    ``forward(input_ids, attention_mask=None) -> logits (B, num_labels)``. Without a mask every
    token counts as real, so the last position is read.
    """

    def __init__(self, config: GPT2Config, num_labels: int = 2, pad_token_id: int = 50256,
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ConfigError(f"num_labels: expected a positive integer, got {num_labels!r}")
        self.config = config
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.transformer = Transformer(config)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        if self.score.weight.device.type != "meta":
            init_weights(self, config.n_layer, generator=torch.Generator().manual_seed(seed))
        self.name_or_path: str | None = None
        self.checkpoint_dir = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, adapter_names: list[str] | None = None) -> Tensor:
        """Class logits (B, num_labels) from the hidden state of each row's last real token.

        ``adapter_names`` (one LoRA adapter name, or ``"__base__"``, per row; inference only): every row
        through its own adapter and that adapter's head, in one pass (see :mod:`gpt2lora.peft.named`).
        """
        if adapter_names is not None:
            with row_adapters(self, adapter_names, input_ids.size(0)):
                return self.forward(input_ids, attention_mask, position_ids)
        # Only the pooled row of each sequence goes through the last block's MLP and ln_f.
        pooled = self.transformer(input_ids, attention_mask, position_ids, last_token_only=True)  # (B, C)
        router = getattr(self, "adapter_router", None)
        logits = router.head_logits(self, pooled) if router is not None else None
        return self.score(pooled) if logits is None else logits

    def tie_weights(self) -> None:
        """Nothing is tied: the classification model has no LM head."""

    def new_module_prefixes(self, found: Iterable[str]) -> tuple[str, ...]:
        """Modules a plain LM checkpoint lacks and loading initialises instead: the head."""
        return () if "score.weight" in set(found) else ("score.",)

    def init_new_modules(self, dtype: torch.dtype | None = None) -> None:
        """Give a freshly added head real storage and a seeded N(0, 0.02) initialisation."""
        device = self.transformer.wte.weight.device
        self.score.to_empty(device=device)
        with torch.no_grad():
            weight = torch.empty(self.score.weight.shape).normal_(
                0.0, 0.02, generator=torch.Generator().manual_seed(self.seed))
            self.score.weight.copy_(weight)
        if dtype is not None:
            self.score.to(dtype)

    def hf_config(self) -> dict[str, Any]:
        hf = self.config.to_hf_config()
        hf.update(architectures=["GPT2ForSequenceClassification"], pad_token_id=self.pad_token_id,
                  id2label={str(i): f"LABEL_{i}" for i in range(self.num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(self.num_labels)})
        return hf

    @classmethod
    def from_config(cls, config: GPT2Config | str, num_labels: int = 2, pad_token_id: int = 50256,
                    seed: int = 0) -> GPT2ForSequenceClassification:
        """A randomly initialised classifier of the given shape (or preset name)."""
        if isinstance(config, str):
            config = GPT2Config.from_preset(config)
        return cls(config, num_labels=num_labels, pad_token_id=pad_token_id, seed=seed)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int | None = None,
                        pad_token_id: int = 50256, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        seed: int = 0, allow_nonfinite: bool = False) -> GPT2ForSequenceClassification:
        """Load a plain GPT-2 checkpoint (new head, seeded init) or a classification checkpoint.

        ``num_labels=None`` takes the count from the checkpoint's ``id2label`` (2 if it has none).
        ``dtype`` and ``allow_nonfinite`` are as in :meth:`GPT2.from_pretrained`.
        """
        from .hub import load_pretrained, read_config, resolve_checkpoint

        if num_labels is None:
            folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir)
            num_labels = len(read_config(folder).get("id2label") or {}) or 2
        return load_pretrained(cls, name_or_path, revision=revision, cache_dir=cache_dir, dtype=dtype,
                               device=device, allow_nonfinite=allow_nonfinite, num_labels=num_labels,
                               pad_token_id=pad_token_id, seed=seed)
