"""LoRA: a wrapper around ``nn.Linear``, injection by module name, merge / unmerge, parameter counts.

``apply_lora(model, config)`` replaces the chosen layers of the chosen blocks with :class:`LoRALinear`
after the weights are loaded, freezes the base model and leaves the classification head trainable.
A wrapped layer keeps its base tensors under the keys of a plain linear layer (``<name>.weight``,
``<name>.bias``) and adds ``<name>.lora_A`` and ``<name>.lora_B``. Targets ``attn.q`` / ``attn.k`` /
``attn.v`` wrap the fused ``c_attn`` in a :class:`QKVLoRALinear` (``lora_q_A``, ``lora_q_B``, ...), and
``lm_head`` wraps the output head (a :class:`TiedLoRALinear` when it shares ``wte``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BLOCK_TARGETS, HEAD_TARGET, QKV_TARGETS, LoRAConfig
from .errors import ConfigError
from .rowlinear import linear

#: Name of the classification head; LoRA never wraps or freezes it.
HEAD_NAME = "score"


def init_lora_A(rank: int, in_features: int, style: str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh (rank, in_features) ``lora_A``: within ±1/sqrt(in) for ``peft``, ±1/sqrt(rank) for ``from_scratch``.

    Drawn on the CPU in fp32 so a (CPU) generator gives the same A on every device and dtype.
    """
    if style == "from_scratch":
        a_t = torch.empty(in_features, rank)  # from-scratch code stores A as (in, rank)
        nn.init.kaiming_uniform_(a_t, a=math.sqrt(5), generator=generator)  # bound 1/sqrt(rank)
        return a_t.t()
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # bound 1/sqrt(in)
    return a


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * B A dropout(x)`` around an already-loaded ``nn.Linear``.

    ``weight`` and ``bias`` are the base layer's own Parameters (same objects, same keys), so a
    state dict of a wrapped model still holds ``<name>.weight`` / ``<name>.bias``. ``lora_A`` is
    (rank, in_features), ``lora_B`` (out_features, rank) and starts at zero, so a fresh wrapper
    computes exactly what the base layer computes.

    ``style="peft"``: A is Kaiming-uniform (a=√5) over (rank, in), i.e. within ±1/√in, and
    ``scaling = alpha / rank`` (``alpha / √rank`` with rsLoRA). ``style="from_scratch"``: A is
    Kaiming-uniform over an (in, rank) matrix, i.e. within ±1/√rank, and ``scaling = alpha``.

    When the base weight is fp16/bf16 the adapter tensors are kept in fp32 (as peft does by default)
    so that small optimizer updates are not rounded away; the forward casts between the two.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, style: str = "peft",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, style=style)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.style = style
        self.use_rslora = use_rslora
        self.scaling = config.scaling
        self.weight = base.weight
        self.bias = base.bias
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=weight.device))
        # No module (and no call) when dropout is 0: the forward stays two small matmuls.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        """Whether ``scaling * B @ A`` is currently added into ``weight``."""
        self.reset_lora_parameters(generator)

    @staticmethod
    def adapter_params() -> tuple[str, ...]:
        """Names of this module's own trainable tensors: they drive the trainable set, the file and merge."""
        return ("lora_A", "lora_B")

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise A as the style says and set B to zero (so the update starts at zero)."""
        if self.merged:
            raise ConfigError("reset_lora_parameters on a merged LoRALinear; call unmerge() first")
        self.lora_A.copy_(init_lora_A(self.rank, self.in_features, self.style, generator))
        self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return linear(x, self.weight, self.bias)
        h = self.lora_dropout(x) if self.lora_dropout is not None else x
        if x.dtype == self.weight.dtype == self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            # Scale the small (tokens, rank) product, then let BLAS accumulate B's product straight into
            # the base output (beta=1): no full-size update tensor, multiply or add. In-place is safe:
            # the base linear's backward keeps its inputs, not its output.
            out = linear(x.reshape(-1, self.in_features), self.weight, self.bias)
            down = F.linear(h.reshape(-1, self.in_features), self.lora_A) * self.scaling
            return out.addmm_(down, self.lora_B.t()).view(*x.shape[:-1], self.out_features)
        out = linear(x, self.weight, self.bias)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)  # under autocast F.linear casts again to the autocast dtype
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in fp32, shaped like ``weight`` (out, in)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into ``weight`` (in fp32, cast back); a no-op when already merged.

        While merged the forward is the base linear alone, so ``lora_A`` / ``lora_B`` get no gradients:
        unmerge before training on.
        """
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again; a no-op when not merged.

        In fp32 this restores the base weight to rounding (~1e-7 relative); with bf16/fp16 base
        weights merge + unmerge rounds twice, so keep an unmerged copy if you need bit-exact weights.
        """
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, style={self.style}, merged={self.merged}")


class TiedLoRALinear(LoRALinear):
    """LoRA on an LM head that shares its weight with ``transformer.wte``.

    Unmerged, the forward reads the shared weight and adds the LoRA update, so the input embeddings never
    change. Merging unties the head: it gets a weight of its own (shared + update) and ``wte`` stays as it
    was; unmerging ties it to the very same shared tensor again (exactly, no subtraction).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, style: str = "peft",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora, style, generator)
        self._shared: tuple[nn.Parameter, ...] = ()  # a tuple, so the tied tensor is not registered twice

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        shared = self.weight
        self._shared = (shared,)
        merged = (shared.float() + self.delta_weight().to(shared.device)).to(shared.dtype)
        self.weight = nn.Parameter(merged, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight = self._shared[0]
        self._shared = ()
        self.merged = False


#: Parts of the fused ``c_attn`` output, in order, and the config target that names each.
QKV_PARTS = {"attn.q": "q", "attn.k": "k", "attn.v": "v"}


class QKVLoRALinear(nn.Module):
    """The fused query/key/value layer ``c_attn`` with a separate LoRA pair on each chosen slice.

    ``y = x W^T + b`` plus, on output slice ``q`` (``k``, ``v``), ``scaling * B_q A_q dropout(x)`` — exactly
    the parametrisation of code with separate query, key and value layers, while the base keeps the fused
    keys ``weight`` / ``bias``. Adapter tensors are ``lora_q_A`` (rank, in) and ``lora_q_B`` (out/3, rank),
    likewise for k and v; scaling and initialisation follow ``style`` as in :class:`LoRALinear`.
    """

    PARTS = ("q", "k", "v")

    def __init__(self, base: nn.Linear, parts: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, style: str = "peft",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"QKVLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if base.out_features % 3:
            raise ConfigError(f"QKVLoRALinear wraps a fused query/key/value layer, whose out_features is "
                              f"divisible by 3; got {base.out_features}")
        unknown = [p for p in parts if p not in self.PARTS]
        if unknown or not parts:
            raise ConfigError(f"QKVLoRALinear parts: expected a non-empty subset of q, k, v, got {list(parts)}")
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, style=style)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.width = base.out_features // 3
        self.parts = tuple(p for p in self.PARTS if p in parts)
        self.rank, self.alpha, self.style, self.use_rslora = rank, float(alpha), style, use_rslora
        self.scaling = config.scaling
        self.weight, self.bias = base.weight, base.bias
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for part in self.parts:
            setattr(self, f"lora_{part}_A", nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype,
                                                                     device=weight.device)))
            setattr(self, f"lora_{part}_B", nn.Parameter(torch.zeros(self.width, rank, dtype=dtype,
                                                                     device=weight.device)))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        """Whether the three slices' updates are currently added into ``weight``."""
        self.reset_lora_parameters(generator)

    def adapter_params(self) -> tuple[str, ...]:
        """Names of this module's own trainable tensors (``lora_q_A``, ``lora_q_B``, ...)."""
        return tuple(f"lora_{part}_{m}" for part in self.parts for m in "AB")

    def pair(self, part: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)`` of slice ``part``."""
        return getattr(self, f"lora_{part}_A"), getattr(self, f"lora_{part}_B")

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every A as the style says and every B to zero."""
        if self.merged:
            raise ConfigError("reset_lora_parameters on a merged QKVLoRALinear; call unmerge() first")
        for part in self.parts:
            a, b = self.pair(part)
            a.copy_(init_lora_A(self.rank, self.in_features, self.style, generator))
            b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = linear(x, self.weight, self.bias)
        if self.merged:
            return out
        dtype = self.pair(self.parts[0])[0].dtype
        updates = []
        for part in self.PARTS:
            if part not in self.parts:
                updates.append(x.new_zeros((*x.shape[:-1], self.width), dtype=dtype))
                continue
            a, b = self.pair(part)
            h = self.lora_dropout(x) if self.lora_dropout is not None else x  # own mask, as separate layers
            updates.append(F.linear(F.linear(h.to(a.dtype), a), b) * self.scaling)
        return out + torch.cat(updates, dim=-1).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """The three slices' ``scaling * B @ A`` stacked in fp32, shaped like ``weight`` (out, in)."""
        rows = []
        for part in self.PARTS:
            if part in self.parts:
                a, b = self.pair(part)
                rows.append((b.detach().float() @ a.detach().float()) * self.scaling)
            else:
                rows.append(torch.zeros(self.width, self.in_features, device=self.weight.device))
        return torch.cat(rows, dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        """Add every slice's update into ``weight``; a no-op when already merged."""
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the updates again; a no-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={','.join(self.parts)}, "
                f"rank={self.rank}, scaling={self.scaling:g}, style={self.style}, merged={self.merged}")


#: Module types that carry LoRA tensors.
LoRALayer = LoRALinear | QKVLoRALinear
LORA_LAYERS = (LoRALinear, QKVLoRALinear)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Every LoRA layer (:class:`LoRALinear`, :class:`QKVLoRALinear`) of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def head_module_name(model: nn.Module) -> str:
    """The output head the ``lm_head`` target wraps: ``score`` on a classifier, else ``lm_head``."""
    for name in (HEAD_NAME, "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"LoRA target 'lm_head': {type(model).__name__} has neither a score nor an lm_head module")


def lora_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(qualified name, q/k/v parts)`` of every module ``config`` wraps; parts are empty but for c_attn
    split into ``attn.q`` / ``attn.k`` / ``attn.v``."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"apply_lora expects a gpt2lora model with transformer.h blocks, got "
                          f"{type(model).__name__}")
    split = [t for t in config.targets if t in QKV_TARGETS]
    parts = tuple(QKV_PARTS[t] for t in split)
    layers: list[tuple[str, tuple[str, ...]]] = []
    for i in config.blocks(len(blocks)):
        for target in config.targets:
            if target in BLOCK_TARGETS:
                layers.append((f"transformer.h.{i}.{target}", ()))
            elif split and target == split[0]:  # one wrapper on c_attn, where the first of q/k/v is listed
                layers.append((f"transformer.h.{i}.attn.c_attn", parts))
    if HEAD_TARGET in config.targets:
        layers.append((head_module_name(model), ()))
    return layers


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules ``config`` wraps (``transformer.h.{i}.<target>``, ``lm_head``/``score``)."""
    return [name for name, _ in lora_layers(model, config)]


def _wrap(model: nn.Module, name: str, base: nn.Module, parts: tuple[str, ...], config: LoRAConfig,
          generator: torch.Generator | None) -> nn.Module:
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"apply_lora: {name} is a {type(base).__name__}, expected nn.Linear")
    args = (config.rank, config.alpha, config.dropout, config.use_rslora, config.style)
    if parts:
        return QKVLoRALinear(base, parts, *args, generator=generator)
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    if name == "lm_head" and wte is not None and base.weight is wte.weight:
        return TiedLoRALinear(base, *args, generator=generator)
    return LoRALinear(base, *args, generator=generator)


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int | None = None) -> nn.Module:
    """Wrap the layers ``config`` names with LoRA layers, freeze the rest, return ``model``.

    Block targets get a :class:`LoRALinear`; ``attn.q`` / ``attn.k`` / ``attn.v`` one
    :class:`QKVLoRALinear` on ``c_attn``; ``lm_head`` a :class:`TiedLoRALinear` on a tied LM head (which
    never changes ``wte``), a :class:`LoRALinear` on an untied head or on a classifier's ``score``.
    Trainable afterwards: every adapter tensor, the classification head ``score`` unless LoRA wraps it
    (target ``lm_head``: then its base is frozen) and the biases ``config.train_bias`` names (``all``:
    every parameter named ``*.bias`` as in peft, ``lora_only``: biases of wrapped layers). ``seed`` makes
    the initialisation of A reproducible. The config is kept as ``model.lora_config``.
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    existing = [name for name, _ in lora_modules(model)]
    if existing or getattr(model, "lora_config", None) is not None:
        where = existing[0] if existing else "model.lora_config"
        raise ConfigError(f"apply_lora: LoRA is already applied to this model ({where}); applying it twice "
                          "would wrap LoRA layers again. Load a fresh model, or use load_adapter to "
                          "replace the adapter weights.")
    layers = lora_layers(model, config)
    for name, _ in layers:  # check everything before changing anything
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"apply_lora: {name} is a {type(base).__name__}, expected nn.Linear")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, parts in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapped = _wrap(model, name, base, parts, config, generator)
        wrapped.train(base.training)  # a new module starts in training mode; keep the model's mode
        setattr(parent, child, wrapped)
    model.lora_config = config
    set_lora_trainable(model, config.train_bias)
    return model


def set_lora_trainable(model: nn.Module, train_bias: str = "none") -> None:
    """Freeze everything, then unfreeze adapter tensors, the ``score`` head (unless LoRA wraps it) and the
    chosen biases."""
    for param in model.parameters():
        param.requires_grad_(False)
    head = getattr(model, HEAD_NAME, None)
    if isinstance(head, nn.Module) and not isinstance(head, LORA_LAYERS):
        for param in head.parameters():
            param.requires_grad_(True)
    for _, module in lora_modules(model):
        if train_bias == "lora_only" and module.bias is not None:
            module.bias.requires_grad_(True)
    if train_bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    for _, module in lora_modules(model):
        for pname in module.adapter_params():
            getattr(module, pname).requires_grad_(True)


def _require_lora(model: nn.Module, verb: str) -> list[LoRALayer]:
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ConfigError(f"{verb}: the model has no LoRA layers; call apply_lora (or load_adapter) first")
    return modules


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every LoRA update into its base weight (idempotent); the forward becomes the plain model's.

    A LoRA on a tied LM head unties it: the head gets its own merged weight and ``wte`` is unchanged.
    """
    for module in _require_lora(model, "merge_lora"):
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every LoRA update out of its base weight again (idempotent); a tied head is tied again."""
    for module in _require_lora(model, "unmerge_lora"):
        module.unmerge()
    return model


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of a model (tied tensors counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable share of the total in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        share = f"{self.share:.2g}" if self.share < 1 else f"{self.share:.3g}"
        return f"{_human(self.trainable)} trainable of {_human(self.total)} ({share}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total parameter counts; ``str()`` reads like ``148K trainable of 124M (0.12%)``."""
    trainable = total = 0
    for param in model.parameters():  # parameters() yields a tied tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable=trainable, total=total)
