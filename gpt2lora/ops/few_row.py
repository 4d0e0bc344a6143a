"""Linear layers on a few rows (one token per sequence while decoding) as batched matrix products.

On CPU, ``F.linear`` of a handful of rows against a large weight runs BLAS's matrix-vector
kernel, which reads the weight at a fraction of the memory bandwidth (12-13 GB/s measured on a
2-core AVX2 EPYC). Viewing the same weight as two halves and multiplying them with
one ``torch.bmm`` lets torch split the work across threads with a faster kernel: 1.4x faster
for GPT-2 124M's block weights and 2.9x for its LM head at batch 1. The weight is only viewed,
never copied, so LoRA-wrapped and merged layers take the same path: the model's layers are
:class:`Linear` (an ``nn.Linear``) and LoRA's base products call :func:`linear`.
Results equal ``F.linear`` up to float rounding (a different summation order).

A third candidate runs on a packed copy of the weight (:mod:`gpt2lora.ops.packed`): oneDNN's product for bf16
weights on a CPU with bf16 units (plain bf16 ``F.linear`` reads a weight at half the fp32 speed on an AMX Xeon,
the packed one about twice as fast as that) and for fp32 products of 2 to 32 rows (``F.linear`` repacks the
weight on every such call); MKL's for one fp32 row; fbgemm's fp16 copy for bf16 and fp16 weights (on a Zen 4
EPYC the only half-precision product that reads about as fast as the fp32 split). Only one weight of a shape is
packed while it is timed. On a CPU without bf16 units, where torch emulates half products, a half model's
products of more than ``MAX_ROWS`` rows that need no gradient (a prompt's forward) are widened to fp32 at a
weight's first such product and take fbgemm's fp16 pack from its second on
(:func:`gpt2lora.ops.packed.half_inference_linear`).

Which one is faster depends on the CPU and its BLAS (the split was 1.4-2.9x faster on an AVX2 EPYC and
slower on an AMX Xeon), so inside ``few_row_products()`` each product shape is timed every way on first use
and the fastest kept (:class:`KernelChoice`, cached per shape, dtype and thread count); a decided call then
costs :func:`linear` one tuple and one dict lookup (``KernelChoice.routes``), about 2 us. A kept product on a
packed copy packs each weight only once its unpacked products would have paid for the pack (:class:`PackPlan`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packed import (
    FP16,
    HALF,
    MKL,
    ONEDNN,
    can_fp16_pack,
    can_hold_pack,
    can_mkl_pack,
    can_pack,
    count_unpacked_call,
    fp16_packed_linear,
    half_inference_linear,
    has_pack,
    mkl_packed_linear,
    packed_linear,
    remake_pack,
    settle_pack,
    takes_fp16_pack_route,
)
from .stored_choices import ChoiceFile, key_text

MAX_ROWS = 32           # beyond this BLAS's matrix-matrix kernel is as fast
MIN_WEIGHT_SIZE = 1 << 16  # small weights (LoRA A/B, heads) stay in cache; F.linear is fine
SPLITS = 2


def linear_by_halves(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` computed as one ``bmm`` over ``SPLITS`` blocks of the weight.

    A contiguous (out, in) ``weight`` — every weight of a loaded or built model — is cut into blocks of output
    features (each block's rows dotted with the input: the faster form); the transpose of a contiguous (in, out)
    tensor — a Conv1D matrix passed as it is stored — into blocks of input features whose partial products are
    summed.
    """
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if weight.is_contiguous():
        even = out_features - out_features % SPLITS
        halves = weight[:even].view(SPLITS, even // SPLITS, in_features)
        out = torch.bmm(halves, rows.t().unsqueeze(0).expand(SPLITS, -1, -1)).permute(2, 0, 1)
        out = out.reshape(rows.size(0), even)
        if even < out_features:  # an odd feature count (GPT-2's 50,257-token head): the last one on its own
            out = torch.cat([out, F.linear(rows, weight[even:])], dim=1)
    else:
        halves = weight.t().view(SPLITS, in_features // SPLITS, out_features)
        parts = rows.reshape(rows.size(0), SPLITS, in_features // SPLITS).transpose(0, 1)
        out = torch.bmm(parts, halves).sum(dim=0)
    if bias is not None:  # added after: baddbmm with a bias broadcast over rows is slow on CPU
        out.add_(bias)
    return out.view(*x.shape[:-1], out_features)


def takes_few_row_path(x: Any, weight: Any, bias: Any = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` is a few-row product on CPU worth splitting."""
    return (isinstance(x, Tensor) and isinstance(weight, Tensor) and weight.dim() == 2
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype == weight.dtype))
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == weight.dtype and not torch.is_grad_enabled()
            and x.dim() >= 1 and x.size(-1) == weight.size(1) and x.numel() // max(weight.size(1), 1) <= MAX_ROWS
            and weight.numel() >= MIN_WEIGHT_SIZE and weight.size(0) >= SPLITS
            and (weight.is_contiguous() or (weight.t().is_contiguous() and weight.size(1) % SPLITS == 0)))


class KernelChoice:
    """Which of several exact implementations of one product is fastest, measured on first uses and cached.

    The first calls with a new ``key`` take the candidates in turn, each timed where it really runs (in
    decoding: the weights as cold as they are when each token reads them, the machine as busy as it is; the
    kernel itself warm, as a kept one is, where the caller passes ``pick`` a warm-up), until
    every candidate has ``samples`` timings after one untimed first run (which also makes a packed copy); a
    call that is not offered the candidate whose turn it is runs the best so far untimed; the
    candidate with the lowest median is kept for ``key``, and later calls run it alone. The first candidate is
    the plain one: another replaces it only when faster by more than ``margin`` (a fraction), so a difference
    within the noise of single-call timings on a busy machine keeps the plain kernel. The key holds everything the speed depends on
    (shape, layout, dtype, thread count). Every candidate computes the same product, so the cache decides how
    fast a call is, never what another model computes beyond float rounding.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter, samples: int = 8,
                 margin: float = 0.05, store: ChoiceFile | None = None) -> None:
        self.timer = timer
        self.samples = samples
        self.margin = margin
        self.store = store
        """Where the choices are kept for every process on this machine (``None``: this object only)."""
        self.chosen: dict[Hashable, str] = {}
        self.routes: dict[Hashable, str] = {}
        """:func:`linear`'s index of decided calls: exact call shape (and dtype, device, threads) -> kernel."""
        self._trials: dict[Hashable, dict[str, list[float]]] = {}
        self._lock = threading.Lock()
        self.timings: dict[Hashable, dict[str, list[float]]] = {}
        """The trial timings (seconds, each candidate's untimed-in-the-median first run first) of every key decided
        by timing here: what :func:`linear` weighs a kept pack's one-off cost against (:class:`PackPlan`)."""
        self.pack_plans: dict[Hashable, PackPlan] = {}
        """:func:`linear`'s plans for decided calls whose kept kernel runs on a pack, by the ``routes`` key."""
        self.packed_on_trial: dict[Hashable, weakref.ref] = {}
        """The one weight per undecided key whose packed product is timed (the others of that shape are not
        packed unless the packed product wins: a pack is as large as its weight)."""

    def pick(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]],
             warm_up: Callable[[str], object] | None = None) -> Tensor:
        """The result of the kept candidate for ``key``, or of the next one to time while ``key`` is new.

        ``warm_up(name)``, when given, runs right before a timed call of candidate ``name``, untimed: a kernel
        kept for a shape runs often, so its library's threads and buffers are warm when it is called, while on
        trial it may not have run for a whole decoding step (fbgemm's fp16 product took 1.5-2x as long after
        one on a 2-core Zen 3 EPYC, and lost shapes it wins once kept).

        With a ``store``, a key first met here takes the choice an earlier process on this machine stored (when
        that kernel is among ``candidates``) instead of being timed again, and a choice made here is stored.
        """
        name = self.kept(key, candidates)
        if name is not None:
            return candidates[name]()
        out, decided = self._timed_run(key, candidates, warm_up)
        if decided is not None and self.store is not None:
            with self.store.open() as stored:
                if stored is not None:  # the first process's choice stays (later ones may differ within the noise)
                    stored.setdefault(key_text(key), decided)
        return out

    def kept(self, key: Hashable, offered: Collection[str]) -> str | None:
        """The kernel kept for ``key`` without running anything: decided here, or stored by an earlier process on
        this machine and among ``offered`` (then kept here too); ``None`` while ``key`` is new or on trial. The file
        is read once per key: a key it does not settle goes on trial."""
        name = self.chosen.get(key)
        if name is not None or self.store is None or key in self._trials:
            return name
        name = self._recall(key, offered)
        if name is None:
            with self._lock:
                if key not in self.chosen:
                    self._trials.setdefault(key, {})
        return name

    def _recall(self, key: Hashable, candidates: Collection[str]) -> str | None:
        """The stored choice for ``key``, now kept for it, if it is one of ``candidates``; else ``None``."""
        with self.store.open() as stored:  # type: ignore[union-attr]
            name = stored.get(key_text(key)) if stored is not None else None
        if name not in candidates:
            return None
        with self._lock:
            self._trials.pop(key, None)
            return self.chosen.setdefault(key, name)

    def _timed_run(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]],
                   warm_up: Callable[[str], object] | None = None) -> tuple[Tensor, str | None]:
        """One call of the next candidate to time for ``key`` (or of the kept one, decided meanwhile), and the
        name kept when this call's timing decided ``key``."""
        with self._lock:
            name = self.chosen.get(key)
            if name is None:
                trials = self._trials.setdefault(key, {})
                for n in candidates:  # a candidate may be offered on some calls only (a packed one: one weight)
                    trials.setdefault(n, [])
                timing = _next_to_time(trials, candidates)
        if name is not None:
            return candidates[name](), None
        if timing is None:  # untimed: see _next_to_time
            return candidates[_best_so_far(trials, candidates)](), None
        name = timing
        if warm_up is not None:
            warm_up(name)
        start = self.timer()
        out = candidates[name]()
        elapsed = self.timer() - start
        decided = None
        with self._lock:
            trials = self._trials.get(key)
            if trials is not None and key not in self.chosen:
                trials[name].append(elapsed)
                if all(len(t) > self.samples for t in trials.values()):  # the first run of each is a warm-up
                    decided = self.chosen[key] = self._fastest({n: statistics.median(t[1:])
                                                                for n, t in trials.items()})
                    self.timings[key] = self._trials.pop(key)
        return out, decided

    def decide(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]]) -> str:
        """The kept candidate for ``key``; a new key is decided at once, every candidate timed on this call's own
        operands (``samples`` + 1 runs each, round robin) before its result is used.

        For products whose results feed training: every result a caller uses then comes from the kept kernel,
        so the choice never mixes kernels within one run once decided (they agree only up to float rounding).
        With a ``store``, a choice made by an earlier process on this machine is reused untimed and a new one
        is written there, so two runs of the same seed compute with the same kernels (bit for bit).
        """
        name = self.chosen.get(key)
        if name is not None:
            return name
        # Locked: a second process deciding this key waits, then reads the first's choice.
        with self.store.open() if self.store is not None else contextlib.nullcontext() as stored:
            if stored is None:
                return self._measure(key, candidates)
            text = key_text(key)
            if stored.get(text) in candidates:
                with self._lock:
                    self._trials.pop(key, None)
                    return self.chosen.setdefault(key, stored[text])
            stored[text] = self._measure(key, candidates)
            return stored[text]

    def _measure(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]]) -> str:
        for _ in range((self.samples + 2) * len(candidates)):  # pick times the least-timed candidate each call
            name = self.chosen.get(key)
            if name is not None:
                return name
            self._timed_run(key, candidates)  # not pick: the caller holds the store's lock
        return self.chosen.get(key) or next(iter(candidates))

    def _fastest(self, medians: dict[str, float]) -> str:
        plain = next(iter(medians))
        best = min(medians, key=medians.__getitem__)
        return best if medians[best] < medians[plain] * (1 - self.margin) else plain


def _next_to_time(trials: dict[str, list[float]], offered: dict[str, Callable[[], Tensor]]) -> str | None:
    """The candidate this call times: one of the least-timed of all seen for the key (the last of them, so that a
    candidate offered on few calls takes its turn when it can), if offered here; else ``None``, and the call runs
    untimed. No candidate gets more than one timing ahead of another, so all are timed over the same stretch of
    a run: a packed candidate runs on one weight of a shape and the plain ones on all of them, and a host's
    speed can change by half within seconds."""
    fewest = min(len(times) for times in trials.values())
    least = [name for name, times in trials.items() if len(times) == fewest and name in offered]
    return least[-1] if least else None


def _best_so_far(trials: dict[str, list[float]], offered: dict[str, Callable[[], Tensor]]) -> str:
    """The offered candidate with the lowest median timing so far (warm-ups left out), else the plain one."""
    timed = {name: statistics.median(trials[name][1:]) for name in offered if len(trials.get(name, ())) > 1}
    return min(timed, key=timed.__getitem__) if timed else next(iter(offered))


KERNELS = KernelChoice(store=ChoiceFile())
"""The process's measured choices: a cache of which kernel is faster per shape and thread count; the choices
that feed training are shared with the machine's other processes (:mod:`gpt2lora.ops.stored_choices`)."""


_few_rows: ContextVar[KernelChoice | None] = ContextVar("gpt2lora_few_row_products", default=None)
"""The measurements in force inside ``few_row_products()``: per thread and per context, never process-wide."""


@contextmanager
def few_row_products(kernels: KernelChoice | None = None) -> Iterator[KernelChoice]:
    """Within this context (this thread only), :func:`linear` picks the faster exact kernel for few rows.

    ``generate`` enters it for decoding; other threads, training, gradients, other devices and many-row
    products go to ``F.linear`` as always. ``kernels``: whose measurements to use (default :data:`KERNELS`).
    """
    token = _few_rows.set(kernels or KERNELS)
    try:
        yield _few_rows.get()
    finally:
        _few_rows.reset(token)


_KERNEL_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "F.linear": F.linear, "by_halves": lambda x, w, b: linear_by_halves(x, w, b), "packed": packed_linear,
    "mkl_packed": mkl_packed_linear, "fp16_packed": fp16_packed_linear}
PACK_KINDS = {"packed": ONEDNN, "mkl_packed": MKL, "fp16_packed": FP16}
"""The candidates that run on a packed copy of the weight, and the kind of pack each needs."""
PACKED_OFFERS: dict[str, Callable[[Tensor, Tensor, Tensor | None], bool]] = {
    "packed": can_pack, "mkl_packed": can_mkl_pack, "fp16_packed": can_fp16_pack}
"""When each packed candidate is offered (looked up at each first use, so a test can take one away)."""


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``; inside ``few_row_products()``, for a few CPU rows without gradients, the fastest of
    ``F.linear``, ``linear_by_halves`` and the packed products offered for the weight's dtype and the row count
    (:data:`PACKED_OFFERS`) as measured on first use of the shape (see :class:`KernelChoice`)."""
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dtype != weight.dtype
            and weight.dtype in HALF and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)):
        # A frozen base held in half precision (gpt2lora.training.precision) read by fp32 activations outside
        # autocast: the product in the weight's dtype, the result and the bias in the input's.
        out = linear(x.to(weight.dtype), weight).to(x.dtype)
        return out.add_(bias) if bias is not None else out
    kernels = _few_rows.get()
    if (weight.dtype in HALF and isinstance(x, Tensor) and x.numel() > MAX_ROWS * x.size(-1)
            and not torch.compiler.is_compiling() and takes_fp16_pack_route(x, weight, bias)):
        # A half-precision model's inference on a CPU that emulates half products (a prompt's forward, any
        # forward without gradients). A few rows stay on F.linear (1.2-4.5x fp32's time, where making a pack
        # costs as much as hundreds of such products: 0.55 s for GPT-2's head), or in decoding go to the
        # kernel choice below, which times this pack too.
        return half_inference_linear(x, weight, bias)
    if kernels is None or weight.numel() < MIN_WEIGHT_SIZE or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    # Every decoding step makes ~50 of these calls, so a decided shape costs one tuple and one dict lookup:
    # the key holds everything takes_few_row_path and the choice depend on.
    route = (x.shape, x.dtype, x.is_cpu, weight.shape, weight.stride(), weight.dtype, weight.is_cpu,
             weight.is_inference(), None if bias is None else (bias.dtype, bias.is_inference()),
             torch.is_grad_enabled(), torch.get_num_threads())
    name = kernels.routes.get(route)
    if name is not None:
        return _run_route(kernels, route, name, x, weight, bias)
    return _first_uses(kernels, route, x, weight, bias)


def _run_route(kernels: KernelChoice, route: tuple, name: str, x: Tensor, weight: Tensor,
               bias: Tensor | None) -> Tensor:
    """A decided call: kernel ``name``; for a kernel on a pack, the unpacked one until the weight's
    :class:`PackPlan` is due, then the pack, made and kept (a losing trial of another shape on this weight, or of
    another chooser, leaves it)."""
    kind = PACK_KINDS.get(name)
    if kind is None or has_pack(weight, kind):
        return _KERNEL_FUNCTIONS[name](x, weight, bias)
    plan = kernels.pack_plans.get(route)
    if plan is not None and count_unpacked_call(weight, kind) <= plan.calls:
        return _KERNEL_FUNCTIONS[plan.unpacked](x, weight, bias)
    out = _KERNEL_FUNCTIONS[name](x, weight, bias)
    settle_pack(weight, kind, chosen=True)
    return out


@dataclass(frozen=True)
class PackPlan:
    """When a weight whose kept kernel runs on a pack gets that pack: its first ``calls`` products run ``unpacked``
    (the fastest candidate without one), the pack is made at the next.

    Making a pack costs what hundreds of products save (fbgemm's fp16 pack of a 3072x768 bf16 weight took 15 ms
    on a 2-core Zen 3 EPYC, GPT-2's head 0.63 s; the product saved 20-45 us a call), so packing every weight at
    its first use made a one-off ``generate`` of 128 tokens 1.2-1.4x slower than plain ``F.linear`` there. Putting
    each pack off until the products run without it would have paid for it (``calls`` = pack seconds / seconds
    saved per call, both from the trials) costs a run that ends before then nothing, and any run at most twice
    the better of packing at once and never packing, whatever its length (the ski-rental rule)."""

    unpacked: str
    calls: int

    @classmethod
    def from_trials(cls, timings: dict[str, list[float]], chosen: str) -> PackPlan | None:
        """The plan for ``chosen`` (a packed kernel) from a key's trial timings, each candidate's first run first
        (the packed one's first made its pack); ``None`` when no unpacked candidate was timed."""
        medians = {name: statistics.median(times[1:]) for name, times in timings.items() if len(times) > 1}
        unpacked = [name for name in medians if name not in PACK_KINDS]
        if chosen not in medians or not unpacked:
            return None
        fallback = min(unpacked, key=medians.__getitem__)
        saving = medians[fallback] - medians[chosen]
        pack_seconds = timings[chosen][0] - medians[chosen]
        calls = math.ceil(pack_seconds / saving) if saving > 0 and pack_seconds > 0 else 0
        return cls(fallback, calls)

    def text(self) -> str:
        """How the choices file stores it: ``"<unpacked> <calls>"``."""
        return f"{self.unpacked} {self.calls}"

    @classmethod
    def parse(cls, text: str | None) -> PackPlan | None:
        """A stored plan, or ``None`` for a missing or unreadable one (the pack is then made at once)."""
        name, _, calls = (text or "").rpartition(" ")
        if name not in _KERNEL_FUNCTIONS or name in PACK_KINDS or not calls.isdigit():
            return None
        return cls(name, int(calls))


def _plan_text_key(key: Hashable) -> str:
    return key_text(("pack plan", key))


def _pack_plan(kernels: KernelChoice, key: Hashable, chosen: str) -> PackPlan | None:
    """The plan for a key whose kept kernel ``chosen`` runs on a pack: from this process's trials (and stored for
    the machine's later processes), else the one stored with the choice; ``None``: pack at the first product."""
    timings = kernels.timings.get(key)
    if timings is not None:
        plan = PackPlan.from_trials(timings, chosen)
        if plan is not None and kernels.store is not None:
            with kernels.store.open() as stored:
                if stored is not None:
                    stored.setdefault(_plan_text_key(key), plan.text())
        return plan
    if kernels.store is None:
        return None
    with kernels.store.open() as stored:
        return PackPlan.parse(stored.get(_plan_text_key(key)) if stored is not None else None)


def row_bucket(rows: int) -> int:
    """The row counts that share one measured choice: 1, 2, then up to the next power of two (3-4, 5-8, ...).

    A kernel's speed changes smoothly with the rows, while every key costs trials: a serving engine's batch
    takes every count from 1 to its maximum, and the LM head, called once a step, needs about 27 steps to
    decide a key."""
    return 1 << (rows - 1).bit_length()


def _first_uses(kernels: KernelChoice, route: tuple, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``linear`` for a call shape not routed yet: not eligible (``F.linear`` at once), a shape whose choice is
    known (made here or stored by an earlier process: routed now), or one more timed trial."""
    if not takes_few_row_path(x, weight, bias):
        if x.numel() <= MAX_ROWS * x.size(-1):  # many-row shapes (prompts) are not remembered: unbounded
            kernels.routes[route] = "F.linear"
        return F.linear(x, weight, bias)
    key = ("linear", row_bucket(x.numel() // weight.size(1)), *weight.shape, weight.is_contiguous(), weight.dtype,
           bias is not None, torch.get_num_threads())
    if not can_hold_pack(weight, bias):
        # Decided apart: a packed kernel kept for the shape would pack such a weight again on every call.
        key = (*key, "no packs")
    packed = [name for name in PACK_KINDS if PACKED_OFFERS[name](x, weight, bias)]
    chosen = kernels.kept(key, ["F.linear", "by_halves", *packed])
    if chosen is not None:  # not through pick: a kept pack is made when its plan says, not for this first call
        _add_route(kernels, route, key, chosen)
        return _run_route(kernels, route, chosen, x, weight, bias)
    candidates = {"F.linear": lambda: F.linear(x, weight, bias),
                  "by_halves": lambda: linear_by_halves(x, weight, bias)}
    if packed:
        trial = kernels.packed_on_trial.get(key)
        if trial is None or trial() is None:
            trial = kernels.packed_on_trial[key] = weakref.ref(weight)
            for name in packed:  # the first timed run of its product makes the pack: the cost its plan weighs
                remake_pack(weight, PACK_KINDS[name])
        if trial() is weight:  # the other weights of this shape take the other candidates meanwhile
            for name in packed:
                candidates[name] = functools.partial(_run_kernel, name, x, weight, bias)
    out = kernels.pick(key, candidates, functools.partial(_warm_up, x, weight, bias))
    chosen = kernels.chosen.get(key)
    if chosen is not None:
        _add_route(kernels, route, key, chosen)
        ref = kernels.packed_on_trial.pop(key, None)
        if ref is not None and (timed := ref()) is not None:
            for name in packed:  # each pack kept only if its product won (made for the trial: no plan to wait for)
                settle_pack(timed, PACK_KINDS[name], chosen == name)
    return out


def _add_route(kernels: KernelChoice, route: tuple, key: Hashable, chosen: str) -> None:
    """Route later calls of ``route`` to the kernel kept for ``key``, with its :class:`PackPlan` when it runs on
    a pack."""
    if chosen in PACK_KINDS and (plan := _pack_plan(kernels, key, chosen)) is not None and plan.calls > 0:
        kernels.pack_plans[route] = plan
    kernels.routes[route] = chosen


def _run_kernel(name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _KERNEL_FUNCTIONS[name](x, weight, bias)


WARM_UP_FEATURES = 8


def _warm_up(x: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> None:
    """Kernel ``name`` once on a slice of ``weight`` (its first ``WARM_UP_FEATURES`` output features, or input
    features where it is a transposed (in, out) matrix; a view, which a packed kernel packs for this call only), so
    that the timed call after it finds the kernel warm."""
    if weight.is_contiguous():
        _run_kernel(name, x, weight[:WARM_UP_FEATURES], bias[:WARM_UP_FEATURES] if bias is not None else None)
    else:
        _run_kernel(name, x[..., :WARM_UP_FEATURES], weight[:, :WARM_UP_FEATURES], bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward goes through :func:`linear`: same parameters, names and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
