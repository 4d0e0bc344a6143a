"""How a LoRA pair starts: Kaiming / Gaussian A with B = 0, or PiSSA / OLoRA factors taken out of W.

Every function here works on the (out, in) orientation of ``nn.Linear``, which is how gpt2lora holds GPT-2's
Conv1D matrices after loading (transposed once, by hub.py). peft's PiSSA transposes a Conv1D weight
first; its OLoRA does not, so on GPT-2 it factors the (in, out) matrix and its shapes do not fit the layer.

* ``pissa``: W = U S Vᵀ; with S_r the top ``rank`` singular values divided by ``scaling``,
  ``B = U_r √S_r`` and ``A = √S_r V_rᵀ``, so ``scaling · B A`` is W's best rank-r approximation.
* ``pissa_niter_N``: the same from ``torch.svd_lowrank`` (N power iterations), for large layers.
* ``olora``: W = Q R (reduced QR); ``B = Q[:, :rank]``, ``A = R[:rank]`` (peft's definition, no rescaling).

For both the base weight becomes the residual ``W - scaling · B A``, so the layer's output is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import init_niter, is_residual_init
from ..errors import ConfigError


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


def check_rank_fits(init: str, rank: int, weight_shape: tuple[int, int], where: str) -> None:
    """PiSSA and OLoRA take ``rank`` singular vectors / columns of Q: at most min(out, in) exist."""
    if is_residual_init(init) and rank > min(weight_shape):
        out_features, in_features = weight_shape
        raise ConfigError(f"LoRAConfig.init={init!r} needs rank <= min(out_features, in_features) = "
                          f"{min(weight_shape)} for {where} ({out_features} x {in_features}), got rank={rank}")


def _seed_from(generator: torch.Generator | None) -> int | None:
    return None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))


def initial_factors(init: str, weight: Tensor, rank: int, scaling: float, style: str,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(A, B, residual)`` in fp32 for a layer whose (out, in) weight is ``weight``.

    ``residual`` is None for ``kaiming`` / ``gaussian`` (the base is left alone), else ``W - scaling · B A``.
    """
    out_features, in_features = weight.shape
    if init == "kaiming":
        return init_lora_A(rank, in_features, style, generator), torch.zeros(out_features, rank), None
    if init == "gaussian":
        a = torch.empty(rank, in_features).normal_(0.0, 1.0 / rank, generator=generator)  # peft's std 1/r
        return a, torch.zeros(out_features, rank), None
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    niter = init_niter(init)
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank] / scaling, vh[:rank]
    elif niter is not None:
        seed = _seed_from(generator)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        s, vh = s / scaling, v.t()
    elif init == "olora":
        q, r = torch.linalg.qr(w)
        b, a = q[:, :rank].contiguous(), r[:rank].contiguous()
        return a, b, w - scaling * (b @ a)
    else:
        raise ConfigError(f"LoRAConfig.init: unknown initialisation {init!r}")
    root = s.sqrt()
    a = (root.unsqueeze(1) * vh).contiguous()
    b = (u * root.unsqueeze(0)).contiguous()
    return a, b, w - scaling * (b @ a)
