"""Continuous batching across adapters: one thread owns the model and runs every request's rows together.

Each engine step admits waiting requests into free slots (their prompts prefilled in one left-padded batch,
one adapter per row), then feeds every running row its last token in one forward pass whatever its adapter
(``adapter_names``). Rows finish on their own (end of text, a stop string, ``max_tokens``) and leave at once;
their slot is free for the next step.

The KV cache (:class:`SlotCache`) has one row per slot and a shared column frame: a decoding step appends one
column for every row, a joining row's prompt goes right-aligned at the end of the frame, and columns a row does
not own are masked out. The model counts each row's positions from its attention mask, so a row sees exactly its
own tokens at their own positions, as when it runs alone. When the frame reaches the context length the rows are
compacted to the left.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...config import GPT2Config
from ...errors import ConfigError
from ...model.generate import next_token
from ...model.hooks import KVCache, cache_dtype
from ...ops.few_row import few_row_products
from ...peft.mixed import FactorCache
from ...peft.registry import adapter_configs

SLACK = 32
"""Columns of holes the cache frame may carry before it is compacted, beyond the longest row again."""

PREFILL_PADDING = 64
"""Padding positions one prefill forward may carry before the prompts are split into more forwards: about what
an extra forward costs in reading the weights once (a padded position costs the block products of a token)."""

BASE = "__base__"
"""The adapter name of rows that run the base model (as in mixed batches)."""


class QueueFull(ConfigError):
    """The engine's waiting queue holds ``max_queue`` requests already."""


class EngineStopped(ConfigError):
    """The engine is shutting down and takes no new requests."""


class Detokenizer:
    """Text of a growing token list, released only where it is final: no half UTF-8 character, nothing that
    may still turn out to be the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0
        self.text = ""

    def add(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The new text to send after ``tokens``, and whether a stop string ended it."""
        text = self.decode(tokens)
        start = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(text), False
        else:
            end, stopped = len(text) - self.hold, False
            while end > self.sent and text[end - 1] == "\ufffd":  # a character still missing bytes
                end -= 1
        end = max(end, self.sent)
        delta, self.sent, self.text = text[self.sent:end], end, text[:end]
        return delta, stopped


@dataclass
class GenerationRequest:
    """One generation request as the engine sees it. ``emit(text, token, finish_reason)`` is called on the
    engine thread for every new token (token None with the final event when a stop string ended the text),
    and once more with a finish reason: ``stop``, ``length``, ``cancelled`` or ``error: ...``."""

    prompt: list[int]
    adapter: str
    max_tokens: int
    emit: Callable[[str, int | None, str | None], None]
    decode: Callable[[list[int]], str]
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None


class SlotCache:
    """Keys and values for ``slots`` rows over a shared frame of columns; ``valid[s, c]`` says whether column c
    holds a token of slot s's sequence. The model sees it as a :class:`~gpt2lora.model.hooks.KVCache` over the
    first ``batch`` slots (the running rows) and the columns ``start:end``.

    Every row's tokens end at ``end`` (each step appends one column to every row; a joining row goes
    right-aligned), so no running row has a token before the first column of the row that started earliest:
    a forward reads the frame from there (``start``). When that row leaves, the frame narrows at no cost; the
    columns before ``start`` are dead and are reused when the frame is compacted.
    """

    def __init__(self, config: GPT2Config, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        width = config.n_positions
        shape = (config.n_layer, slots, config.n_head, width, config.head_dim)
        self.keys = torch.zeros(shape, dtype=cache_dtype(dtype, device), device=device)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(slots, width, dtype=torch.bool, device=device)
        self.first = [0] * slots
        """Each slot's first column holding a token of its sequence."""
        self.width = width
        self.start = 0
        self.end = 0
        self.batch = 0
        self.compactions = 0

    @property
    def length(self) -> int:
        """Columns a forward reads (what the model counts as cached positions)."""
        return self.end - self.start

    @length.setter
    def length(self, value: int) -> None:  # the model adds each forward's new columns
        self.end = self.start + value

    def reset(self) -> None:
        """No running row: an empty frame."""
        self.valid.zero_()
        self.start = self.end = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`KVCache.update`, on the first ``batch`` slots."""
        end = self.end + k.size(2)
        self.keys[layer, :self.batch, :, self.end:end] = k
        self.values[layer, :self.batch, :, self.end:end] = v
        return self.keys[layer, :self.batch, :, self.start:end], self.values[layer, :self.batch, :, self.start:end]

    def mask(self, extra: int) -> Tensor:
        """The attention mask of the running rows for a forward that appends ``extra`` columns (and the frame's
        start moved to the earliest running row's first token)."""
        self.start = min(self.first[:self.batch], default=self.end)
        ones = torch.ones(self.batch, extra, dtype=torch.bool, device=self.valid.device)
        return torch.cat([self.valid[:self.batch, self.start:self.end], ones], dim=1).long()

    def insert(self, slots: list[int], prefill: KVCache, mask: Tensor) -> None:
        """Place prefilled rows (left-padded, ``mask`` (n, P)) right-aligned at the end of the frame."""
        width = mask.size(1)
        if width > self.end:  # the frame grows; the new columns belong to no running row
            self.valid[:, self.end:width] = False
            self.end = width
        index = torch.tensor(slots, device=self.keys.device)
        cols = slice(self.end - width, self.end)
        self.keys[:, index, :, cols] = prefill.keys[:, :, :, :width]
        self.values[:, index, :, cols] = prefill.values[:, :, :, :width]
        self.valid[index] = False
        self.valid[index, cols] = mask.bool()
        for slot, count in zip(slots, mask.sum(dim=1).tolist(), strict=True):
            self.first[slot] = self.end - int(count)

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s sequence into slot ``dst`` (keeping the running rows the first ``batch`` slots)."""
        lo = self.first[src]
        self.keys[:, dst, :, lo:self.end] = self.keys[:, src, :, lo:self.end]
        self.values[:, dst, :, lo:self.end] = self.values[:, src, :, lo:self.end]
        self.valid[dst] = self.valid[src]
        self.valid[src] = False
        self.first[dst] = lo

    def compact(self) -> None:
        """Right-align every running row's tokens in the narrowest frame that holds them all, from column 0
        (the rows' own positions come from their masks, so nothing they compute changes)."""
        counts = self.valid[:self.batch].sum(dim=1).tolist()
        new_length = max(counts, default=0)
        for slot, count in enumerate(counts):
            src = self.valid[slot].nonzero().squeeze(1)
            dst = torch.arange(new_length - count, new_length, device=src.device)
            self.keys[:, slot, :, dst] = self.keys[:, slot, :, src]
            self.values[:, slot, :, dst] = self.values[:, slot, :, src]
            self.valid[slot] = False
            self.valid[slot, dst] = True
            self.first[slot] = new_length - count
        self.start, self.end = 0, new_length
        self.compactions += 1


class Engine:
    """Runs generation requests for ``model`` (a :class:`~gpt2lora.GPT2`, possibly with named LoRA adapters)
    on its own thread, ``max_batch`` rows at a time; at most ``max_queue`` more wait.

    :meth:`submit` a :class:`GenerationRequest`; :meth:`call` runs a function on the engine thread between steps
    (loading adapters, classification), so nothing else touches the model while it decodes.
    """

    def __init__(self, model: nn.Module, eos_token_id: int | None, max_batch: int = 16, max_queue: int = 256,
                 device: torch.device | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.eos = eos_token_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        weight = model.lm_head.weight
        self.device = device or weight.device
        self.cache = SlotCache(model.config, max_batch, weight.dtype, self.device)
        self.factors = FactorCache()
        """The adapters' stacked factors, kept across steps; cleared after every :meth:`call` (which may load
        or delete adapters)."""
        self.rows: list[GenerationRequest] = []
        self.waiting: deque[GenerationRequest] = deque()
        self.commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="gpt2lora-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ called from other threads

    def submit(self, seq: GenerationRequest) -> None:
        """Queue ``seq``; raises :class:`QueueFull` or :class:`EngineStopped` instead of waiting."""
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue "
                                f"{self.max_queue}); retry later")
            if seq.temperature > 0:
                seed = seq.seed if seq.seed is not None else int(torch.randint(0, 2**62, ()).item())
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            seq.detok = Detokenizer(seq.decode, seq.stop)
            self.waiting.append(seq)
            self.cond.notify()

    def cancel(self, seq: GenerationRequest) -> None:
        """Drop ``seq`` at the next step (its slot is freed then; it gets no more events)."""
        with self.cond:
            seq.cancelled = True
            self.cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps; its result (or exception) in the future."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            self.commands.append((fn, future))
            self.cond.notify()
        return future

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "cache_length": self.cache.length,
                    "cache_rows": int(self.cache.valid.any(dim=1).sum()), "compactions": self.cache.compactions,
                    "steps": self.steps, "failures": self.failures, "factor_bytes": self.factors.nbytes()}

    def in_use(self, adapter: str) -> bool:
        """Whether a running or waiting request uses ``adapter``."""
        with self.cond:
            return any(s.adapter == adapter for s in itertools.chain(self.rows, self.waiting))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running and waiting requests (cancel what is left after ``timeout`` seconds), then stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(0.05)
        if self.thread.is_alive():
            with self.cond:
                for seq in itertools.chain(self.rows, self.waiting):
                    seq.cancelled = True
                self.cond.notify()
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.rows or self.waiting or self.commands or self.stopping):
                    self.cond.wait()
                if self.stopping and not (self.rows or self.waiting or self.commands):
                    return
                commands = list(self.commands)
                self.commands.clear()
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - the caller gets it
                    future.set_exception(err)
                finally:
                    self.factors.clear()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # noqa: BLE001 - a bug must not stop the server: fail what runs, go on
                self.failures += len(self.rows)
                for slot in reversed(range(len(self.rows))):
                    self._release(slot, f"error: {err}")
                self.cache.reset()

    def _step(self) -> None:
        with self.cond:
            self._drop_cancelled()
            admitted = []
            while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        for group in prefill_groups(admitted):
            self._prefill(group)
        if self.rows:
            self._decode()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for slot in reversed(range(len(self.rows))):
            if self.rows[slot].cancelled:
                self._release(slot, "cancelled", notify=False)

    def _release(self, slot: int, reason: str, notify: bool = True) -> None:
        seq = self.rows[slot]
        last = len(self.rows) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.rows[slot] = self.rows[last]
        else:
            self.cache.valid[slot] = False
        self.rows.pop()
        self.cache.batch = len(self.rows)
        if not self.rows:
            self.cache.reset()
        seq.finish_reason = reason
        if notify:
            self._emit(seq, "", None, reason)

    def _emit(self, seq: GenerationRequest, text: str, token: int | None, reason: str | None) -> bool:
        """Send one event; a failing receiver fails its own request only. False when it failed."""
        try:
            seq.emit(text, token, reason)
            return True
        except Exception:  # noqa: BLE001 - the receiver is gone or broken: drop the request, keep serving
            seq.cancelled = True
            self.failures += 1
            return False

    def _forward(self, ids: Tensor, mask: Tensor, cache: KVCache | SlotCache, seqs: list[GenerationRequest]) -> Tensor:
        """Last-position logits of ``seqs`` (one row each, through its adapter) in one pass."""
        routing: AbstractContextManager = nullcontext()
        if adapter_configs(self.model):  # stacked adapter factors are kept across steps (self.factors)
            routing = self.model.adapter_router.route_rows(self.model, [s.adapter for s in seqs], len(seqs),
                                                           factors=self.factors)
        with routing:
            states = self.model.transformer(ids, mask, kv_cache=cache)
        return self.model.lm_head(states[:, -1])

    def _prefill(self, seqs: list[GenerationRequest]) -> None:
        """Prefill ``seqs`` in one batch; if that fails, one at a time, so only a faulty request fails."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt):] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[row, width - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        weight = self.model.lm_head.weight
        prefill = KVCache(self.model.config, len(seqs), width, weight.dtype, self.device)
        try:
            logits = self._forward(ids, mask, prefill, seqs)
        except Exception as err:  # noqa: BLE001 - find the faulty request, serve the others
            if len(seqs) > 1:
                for seq in seqs:
                    self._prefill([seq])
                return
            self.failures += 1
            seqs[0].finish_reason = f"error: {err}"
            self._emit(seqs[0], "", None, seqs[0].finish_reason)
            return
        slots = list(range(len(self.rows), len(self.rows) + len(seqs)))
        self.rows.extend(seqs)
        self.cache.batch = len(self.rows)
        self.cache.insert(slots, prefill, mask)
        self._choose(slots, logits)

    def _decode(self) -> None:
        cache = self.cache
        frame = cache.end - min(cache.first[:cache.batch])
        if cache.end + 1 > cache.width or frame > SLACK:
            # Attention reads the whole frame: once holes make it much wider than the longest row, close them.
            longest = int(cache.valid[:cache.batch].sum(dim=1).max())
            if cache.end + 1 > cache.width or frame > 2 * longest + SLACK:
                cache.compact()
        rows = list(self.rows)
        ids = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=self.device)
        before = cache.end
        try:
            with few_row_products():
                logits = self._forward(ids, cache.mask(1), cache, rows)
        except Exception as err:  # noqa: BLE001 - fail the rows of this pass, keep the engine
            cache.end = before
            self.failures += len(rows)
            for slot in reversed(range(len(rows))):
                self._release(slot, f"error: {err}")
            return
        cache.valid[:len(rows), cache.end - 1] = True
        self._choose(list(range(len(rows))), logits)

    def _choose(self, slots: list[int], logits: Tensor) -> None:
        """Pick each row's next token, send it, and let finished rows leave."""
        # max() gives argmax's index (the first maximum) in well under half argmax's time on CPU
        greedy = logits.max(dim=-1).indices.tolist()
        done: list[tuple[int, str]] = []
        for row, slot in enumerate(slots):
            seq = self.rows[slot]
            if seq.generator is None:
                token = greedy[row]
            else:
                token = int(next_token(logits[row:row + 1], seq.temperature, None, seq.top_p, seq.generator))
            reason = None
            if self.eos is not None and token == self.eos:
                reason = "stop"
            else:
                seq.tokens.append(token)
                if len(seq.tokens) >= seq.max_tokens:
                    reason = "length"
            delta, stopped = seq.detok.add(seq.tokens, final=reason is not None)
            if stopped:
                reason = "stop"
            if not self._emit(seq, delta, None if token == self.eos else token, None):
                done.append((slot, None))  # its receiver failed: the row leaves now, silently
            elif reason is not None:
                done.append((slot, reason))
        for slot, reason in sorted(done, reverse=True):
            self._release(slot, reason or "cancelled", notify=reason is not None)


def prefill_groups(seqs: list[GenerationRequest]) -> list[list[GenerationRequest]]:
    """``seqs`` in groups to prefill together: by prompt length, longest first, each group padding at most
    :data:`PREFILL_PADDING` positions in all (left padding to the group's longest prompt)."""
    groups: list[list[GenerationRequest]] = []
    padding = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt), reverse=True):
        if groups and padding + len(groups[-1][0].prompt) - len(seq.prompt) <= PREFILL_PADDING:
            groups[-1].append(seq)
            padding += len(groups[-1][0].prompt) - len(seq.prompt)
        else:
            groups.append([seq])
            padding = 0
    return groups


def run_on_engine(engine: Engine, fn: Callable[[], Any], timeout: float | None = None) -> Any:
    """Run ``fn`` on the engine thread and wait for its result."""
    return engine.call(fn).result(timeout)
