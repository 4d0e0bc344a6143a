"""Data-parallel training with ``torch.distributed``: joining the process group torchrun set up, and the
few collectives the trainer needs.

``torchrun --nproc_per_node=N -m gpt2lora.app.cli train ...`` starts N copies of the same command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`setup` joins them into one group (``nccl`` on CUDA, ``gloo`` on the CPU); the trainer then wraps
the model in :class:`torch.nn.parallel.DistributedDataParallel` and gives each rank a contiguous slice
of every batch (:func:`shard_bounds`), so ``batch_size`` is the *global* batch. Only rank 0 writes files.

With ``TrainConfig.distributed="fsdp"`` the trainer shards the model with FSDP2 instead
(:func:`shard_model`: ``fully_shard`` on every block, then on the root for the embeddings, final norm and head):
each rank keeps ``1/N`` of the weights, gradients and optimizer state and gathers one unit's weights at a
time. Checkpoints gather the full tensors to rank 0 (:func:`full_tensor`) and every rank takes its own
shard back on resume (:func:`shard_like`), so a checkpoint is plain safetensors whatever ``N`` wrote it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError

#: First torch whose FSDP2 averages gradients on gloo (pytorch#162338: summed on 2.7-2.8, crashes on 2.6).
FSDP_MIN_TORCH = (2, 9)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the group: ``rank`` of ``world_size``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, history, run folders and prints."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set; WORLD_SIZE > 1 needs RANK, LOCAL_RANK, "
                              "MASTER_ADDR and MASTER_PORT too (start the command with torchrun)")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r}: expected a non-negative integer") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={text!r}: expected a non-negative integer")
    return value


def current() -> DistInfo:
    """The group this process belongs to now (rank 0 of 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
    return DistInfo()


def is_main_process() -> bool:
    """True on rank 0, and in every process that trains alone."""
    return current().is_main


def setup(device_type: str = "cpu") -> DistInfo:
    """Join the process group when torchrun started this process with ``WORLD_SIZE`` > 1.

    A group that is already initialised (a user's own ``init_process_group``) is used as it is; with
    ``WORLD_SIZE`` unset or 1 nothing happens. On CUDA each process uses GPU ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world = _env_int("WORLD_SIZE", 1)
    if world < 2:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if rank >= world:
        raise ConfigError(f"environment variable RANK={rank}: expected a value below WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; start the command with torchrun "
                              "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              "visible; use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank)


def shard_bounds(rows: int, info: DistInfo) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous slice of a batch of ``rows`` (sizes differ by ≤ 1).

    Ranks beyond the last row get an empty slice; the trainer then runs one row with weight 0 so that
    every rank still takes part in DDP's gradient all-reduce.
    """
    base, extra = divmod(rows, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return start, start + base + (1 if info.rank < extra else 0)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over every rank (float64, so logged losses agree to the last bit)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of an integer or float tensor over every rank (a copy; the input is left alone)."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if current().enabled:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks: e.g. create a file once, then read it."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:  # on an error rank 0 still releases the others (who then meet the same error themselves)
        if main:
            barrier()


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (as UTF-8 bytes in a tensor; no pickle)."""
    info = current()
    if not info.enabled:
        return text
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if not info.is_main:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode("utf-8")



def gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` in rank order, on every rank (``[data]`` without a group; no pickle)."""
    info = current()
    if not info.enabled:
        return [data]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else padded[:0]
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return [bytes(part[:int(n)].cpu().tolist()) for part, n in zip(parts, sizes)]

# --- FSDP2 ---

def torch_version(text: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string (default: the installed torch)."""
    text = torch.__version__ if text is None else text
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ConfigError(f"torch version {text!r}: expected MAJOR.MINOR[.PATCH]") from None


def check_fsdp_torch(version: str | None = None) -> None:
    """Refuse FSDP on a torch whose FSDP2 gives wrong gradients on the CPU or lacks ``fully_shard``."""
    found = torch_version(version)
    if found < FSDP_MIN_TORCH:
        need = ".".join(map(str, FSDP_MIN_TORCH))
        raise ConfigError(f"TrainConfig.distributed='fsdp' needs torch >= {need} (found "
                          f"{version or torch.__version__}: FSDP2 sums instead of averaging gradients on gloo in "
                          "2.7-2.8 and crashes on 2.6, pytorch#162338); upgrade torch or use distributed='ddp'")


def shard_model(model: nn.Module, device: torch.device, info: DistInfo,
                param_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """``fully_shard`` every gpt2lora block, then the root (embeddings, final norm, head, classifier).

    The device mesh is built and passed explicitly (one dimension: the ``world_size`` ranks).
    ``param_dtype`` (CUDA bf16/fp16 runs): FSDP's mixed-precision policy gathers weights in that dtype and
    reduces gradients in fp32. Returns the sharded modules, root last.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ..model.gpt2 import Block

    check_fsdp_torch()
    with torch.no_grad():  # FSDP shards contiguous tensors only (a weight may be a view)
        for param in model.parameters():
            if not param.is_contiguous():
                param.data = param.data.contiguous()
    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            # a classifier's last block pools through forward_rows: it must gather its weights there too
            register_fsdp_forward_method(module, "forward_rows")
            units.append(module)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # backward needs it at once
    units.append(model)
    return units


def gather_weights(units: Sequence[nn.Module]) -> None:
    """Gather every sharded unit's full weights and keep them (no re-sharding after a forward).

    Forwards then run without collectives, so ranks may run different numbers of them: sharded evaluation,
    generation, saving the model after training. :func:`scatter_weights` undoes it before training goes on.
    """
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def scatter_weights(units: Sequence[nn.Module]) -> None:
    """Drop the gathered weights again: blocks re-shard after each forward, the root keeps its gathered ones."""
    for unit in units:
        unit.reshard()
        unit.set_reshard_after_forward(unit is not units[-1], recurse=False)


def is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor (a parameter or optimizer state FSDP split across ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a DTensor: every rank must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` laid out as ``like``: a DTensor with ``like``'s mesh and placements, built from this rank's own
    copy of ``full`` (no communication: every rank read the same file). A plain tensor stays as it is."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
