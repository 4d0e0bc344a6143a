"""Keep how to recompute the outputs of cheap layers for backward instead of the outputs themselves.

In LoRA training the linear layers save their inputs for the factor gradients, and in GPT-2 those
inputs are mostly outputs of a LayerNorm (``ln_1``, ``ln_2``) or of the MLP's activation: per layer
two (tokens, n_embd) tensors and one (tokens, 4·n_embd) tensor, whose own inputs the LayerNorm and
the activation already keep for their backward. Inside :func:`recompute_cheap_outputs`, a saved
tensor that is (a view of) such an output is stored as (layer, input, view geometry) and computed
again when backward reads it: the same function of the same input, so the same values; about a
third less saved activation memory for one extra LayerNorm/activation forward per layer in backward.

``keep_half_on_cpu`` keeps bf16/fp16 outputs on the CPU as they are. There the recompute is the costly half
of the trade: torch's CPU tanh-GELU takes as long in bf16 as in fp32 (about 5 ms for a (900, 3072) tensor on
the AMX Xeon), so in a bf16 LoRA step, 2.4x shorter than an fp32 one, recomputing it cost 5% of the step
(0.4% in fp32), while the kept outputs take half the bytes fp32 ones would (benchmarks/RESULTS.md, bf16).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .few_row import HALF


@dataclass
class RecomputeRule:
    """A saved tensor to recompute: ``layer(input)`` seen through ``size``/``stride``/``offset``."""

    layer: nn.Module
    input: Tensor
    version: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    autocast: tuple[str, bool, torch.dtype]

    def compute(self) -> Tensor:
        if self.input._version != self.version:
            raise RuntimeError(f"the input of {type(self.layer).__name__} was modified in place after the forward "
                               "pass; its output cannot be recomputed for backward")
        device, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = self.layer(self.input)
        return out.as_strided(self.size, self.stride, self.offset)


class OutputRegistry:
    """Outputs of the watched layers in the current forward pass, by tensor identity."""

    def __init__(self, keep_half_on_cpu: bool = False) -> None:
        self.outputs: dict[int, tuple[weakref.ref, nn.Module, Tensor]] = {}
        self.thread = threading.get_ident()
        self.keep_half_on_cpu = keep_half_on_cpu

    def record(self, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        # The hooks sit on the layers; a forward of the same layers in another thread is not this pass.
        if (threading.get_ident() == self.thread and isinstance(output, Tensor) and len(inputs) == 1
                and isinstance(inputs[0], Tensor) and not (self.keep_half_on_cpu and _half_on_cpu(output))):
            self.outputs[id(output)] = (weakref.ref(output), layer, inputs[0])

    def pack(self, tensor: Tensor) -> Tensor | RecomputeRule:
        """``tensor`` itself, or a :class:`RecomputeRule` when it is (a view of) a watched output; counters see either."""
        saved: Tensor | RecomputeRule = tensor
        base = tensor._base if tensor._base is not None else tensor
        entry = self.outputs.get(id(base))
        if entry is not None and entry[0]() is base:
            _, layer, source = entry
            device = tensor.device.type
            saved = RecomputeRule(layer, source, source._version, tensor.size(), tensor.stride(), tensor.storage_offset(),
                           (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        for counter in _counters.get():
            counter.see(saved)
        return saved

    @staticmethod
    def unpack(saved: Tensor | RecomputeRule) -> Tensor:
        return saved.compute() if isinstance(saved, RecomputeRule) else saved


def _half_on_cpu(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in HALF


@contextmanager
def recompute_cheap_outputs(layers: Iterable[nn.Module], keep_half_on_cpu: bool = False) -> Iterator[None]:
    """Within this block, tensors autograd saves that are outputs of ``layers`` are recomputed in backward.

    Each layer must be deterministic and take one tensor (LayerNorm, GELU): its output is computed
    again from the same input, which must not be modified in place before backward. With
    ``keep_half_on_cpu``, bf16/fp16 outputs on the CPU are saved as they are (see the module's docstring).
    """
    registry = OutputRegistry(keep_half_on_cpu)
    handles = [layer.register_forward_hook(registry.record) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()


class SavedTensors:
    """What autograd kept for backward while :func:`count_saved_tensors` was active (parameters excluded).

    ``bytes``: storage bytes, each storage once (views of one tensor share it); ``tensors``: (elements,
    dtype) of each storage's first saved tensor; ``recomputed``: outputs stored as recipes by
    :func:`recompute_cheap_outputs`.
    """

    def __init__(self, parameters: Iterable[Tensor] = ()) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages: dict[int, tuple[int, int, torch.dtype]] = {}
        self.recomputed = 0

    @property
    def bytes(self) -> int:
        return sum(nbytes for nbytes, _, _ in self._storages.values())

    @property
    def tensors(self) -> list[tuple[int, torch.dtype]]:
        return [(numel, dtype) for _, numel, dtype in self._storages.values()]

    def see(self, saved: Tensor | RecomputeRule) -> None:
        if isinstance(saved, RecomputeRule):
            self.recomputed += 1
            return
        storage = saved.untyped_storage()
        if storage.data_ptr() not in self._parameters and storage.data_ptr() not in self._storages:
            self._storages[storage.data_ptr()] = (storage.nbytes(), saved.numel(), saved.dtype)

    def pack(self, tensor: Tensor) -> Tensor:
        self.see(tensor)
        return tensor


_counters: ContextVar[tuple[SavedTensors, ...]] = ContextVar("gpt2lora_saved_tensor_counters", default=())
"""The counters open in this thread (context): autograd's saved-tensor hooks are per thread too."""


@contextmanager
def count_saved_tensors(parameters: Iterable[Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the tensors autograd saves in this block, including those :func:`recompute_cheap_outputs` sees.

    ``parameters`` (e.g. ``model.parameters()``) are left out: weights are not activations.
    """
    counter = SavedTensors(parameters)
    token = _counters.set((*_counters.get(), counter))
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            yield counter
    finally:
        _counters.reset(token)
