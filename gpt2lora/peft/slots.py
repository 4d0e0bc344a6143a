"""Where one adapter lives on one LoRA layer: names, constants and :class:`Slot`.

Every adapter on a wrapped layer is a :class:`Slot`: its config, its q/k/v parts (none for a pair over the
whole layer), the module that holds its tensors (the layer itself for ``"default"``, an
:class:`AdapterFactors` under ``lora_extra.<adapter>`` otherwise) and the math of its update.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..errors import ConfigError

#: Name of the classification head; LoRA never wraps or freezes it.
HEAD_NAME = "score"
#: The adapter that single-adapter calls create, save and load (peft's name for it too).
DEFAULT_ADAPTER = "default"
#: In ``adapter_names`` of a mixed batch: the base model for that row.
BASE_ADAPTER = "__base__"
#: Parts of the fused ``c_attn`` output, in order, and the config target that names each.
QKV_PARTS = {"attn.q": "q", "attn.k": "k", "attn.v": "v"}
PARTS = ("q", "k", "v")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_adapter_name(name: Any, argument: str = "adapter_name") -> str:
    """An adapter name usable as a module key (letters, digits, ``_``, ``-``; not ``__base__``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"{argument}: expected a name of letters, digits, '_' or '-' starting with a letter "
                          f"(and not a ModuleDict attribute such as 'keys'), got {name!r}")
    return name


class AdapterFactors(nn.Module):
    """Holder of one non-default adapter's tensors on one layer (``<layer>.lora_extra.<adapter>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_dropout: nn.Module | None = None


class Slot:
    """One adapter on one wrapped layer: where its tensors live and what they compute.

    ``parts`` is empty for one pair over the whole layer (``lora_A`` (rank, in), ``lora_B`` (out, rank),
    with DoRA ``lora_magnitude_vector`` (out,)), or names q/k/v slices of a fused layer with a pair each
    (``lora_q_A`` (rank, in), ``lora_q_B`` (out/3, rank), ...). ``A0`` / ``B0`` keep the initial factors of
    a PiSSA / OLoRA init, whose product the base weight lacks (see :func:`gpt2lora.peft.init.initial_factors`).
    """

    def __init__(self, name: str, owner: nn.Module, config: LoRAConfig, parts: tuple[str, ...],
                 out_features: int) -> None:
        self.name, self.owner, self.config = name, owner, config
        self.parts = tuple(p for p in PARTS if p in parts)
        self.width = out_features // 3 if self.parts else out_features
        self.rank, self.scaling, self.use_dora = config.rank, config.scaling, config.use_dora
        self.plain = not self.parts and not self.use_dora
        """One pair over the whole layer, no DoRA: the forward's fused fast path applies."""

    def param_names(self) -> tuple[str, ...]:
        """Names of this adapter's tensors on ``owner``."""
        if self.parts:
            return tuple(f"lora_{p}_{m}" for p in self.parts for m in "AB")
        return ("lora_A", "lora_B", "lora_magnitude_vector") if self.use_dora else ("lora_A", "lora_B")

    def tensors(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.owner, n) for n in self.param_names()}

    @property
    def dropout(self) -> nn.Module | None:
        return self.owner.lora_dropout

    @property
    def magnitude(self) -> nn.Parameter:
        return self.owner.lora_magnitude_vector

    def pair(self, part: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)`` of the whole-layer pair (``part=None``) or of slice ``part``."""
        if part is None:
            return self.owner.lora_A, self.owner.lora_B
        return getattr(self.owner, f"lora_{part}_A"), getattr(self.owner, f"lora_{part}_B")

    def pieces(self) -> list[tuple[int, int, nn.Parameter, nn.Parameter]]:
        """``(first output row, end row, A, B)`` of every pair."""
        if not self.parts:
            a, b = self.pair()
            return [(0, b.shape[0], a, b)]
        return [(PARTS.index(p) * self.width, (PARTS.index(p) + 1) * self.width, *self.pair(p)) for p in self.parts]

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces()[0][2].dtype

    def initial(self) -> list[tuple[Tensor, Tensor]]:
        """``(A0, B0)`` of every pair after a PiSSA / OLoRA init (empty for other inits)."""
        return list(getattr(self.owner, "_initial", {}).get(self.name, []))


def adapter_parameter(shape: tuple[int, ...], like: Tensor, values: Tensor | None = None) -> nn.Parameter:
    """A zero (or ``values``) adapter tensor beside base tensor ``like``: fp32 beside a half-precision base."""
    # Adapters stay fp32 beside a half-precision base (as peft does) so small updates are not rounded away.
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    tensor = torch.zeros(shape, dtype=dtype, device=like.device) if values is None else \
        values.to(device=like.device, dtype=dtype).clone()
    return nn.Parameter(tensor)

