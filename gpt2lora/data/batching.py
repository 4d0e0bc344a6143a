"""Examples to batches: prompt masking for LM rows, dynamic padding, length-bucketed shuffling, packing.

An *example* is a dict with ``"input_ids": list[int]`` and either ``"label": int`` (classification)
or ``"labels": list[int]`` (language modelling: as long as ``input_ids``, ``-100`` = not a target).
Labels stay aligned with ``input_ids`` as in Hugging Face; the loss shifts them by one.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..constants import IGNORE_INDEX
from ..errors import ConfigError, DataError

Example = dict[str, Any]


def _token_list(value: Any, what: str) -> list[int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise DataError(f"{what}: expected a list of non-negative integer token ids, got {_short(value)}")
    return list(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def lm_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_token_id: int = 50256,
               max_length: int | None = None, min_prompt_tokens: int = 1) -> Example:
    """A language-modelling example: ``prompt + response + EOS``, with the loss on ``response + EOS`` only.

    ``labels`` is ``-100`` over the prompt and equals ``input_ids`` over the response and the EOS.

    Truncation, when the row is longer than ``max_length``: the response and its EOS keep priority.
    The prompt loses tokens from its *start* (its end, usually the "### Response:" marker next to the
    answer, is kept) down to ``min_prompt_tokens`` tokens (at least one, so the first response token
    is still predicted from something). If that is still too long, the response is cut at its end
    and the EOS is dropped too, since the response did not end there.
    """
    prompt = _token_list(prompt_ids, "lm_example prompt_ids")
    response = _token_list(response_ids, "lm_example response_ids")
    if not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool) or eos_token_id < 0:
        raise ConfigError(f"lm_example eos_token_id: expected a non-negative integer, got {eos_token_id!r}")
    if not isinstance(min_prompt_tokens, int) or min_prompt_tokens < 1:
        raise ConfigError(f"lm_example min_prompt_tokens: expected an integer >= 1, got {min_prompt_tokens!r}")
    if not prompt and not response:
        raise DataError("lm_example: prompt_ids and response_ids are both empty")
    tail = response + [eos_token_id]
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= min_prompt_tokens:
            raise ConfigError(f"lm_example max_length: expected an integer > min_prompt_tokens="
                              f"{min_prompt_tokens}, got {max_length!r}")
        if len(prompt) + len(tail) > max_length:
            keep = max(min(len(prompt), min_prompt_tokens), max_length - len(tail))
            prompt = prompt[len(prompt) - keep:]
            room = max_length - len(prompt)
            if len(tail) > room:
                tail = response[:room]
    return {"input_ids": prompt + tail, "labels": [IGNORE_INDEX] * len(prompt) + tail}


def example_objective(example: Mapping[str, Any], index: int = 0) -> str:
    """The objective an example trains: ``"classification"`` (a ``label``) or ``"lm"`` (token ``labels``);
    checks the example's keys and values. (A task's *kind*, :data:`gpt2lora.data.tasks.TASKS`, is another
    word: classification and nli tasks give classification examples, instruction and qa tasks lm ones.)"""
    where = f"example {index}"
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a dict with input_ids and label/labels, got {type(example).__name__}")
    if "input_ids" not in example:
        raise DataError(f"{where}: missing key 'input_ids'")
    ids = _token_list(example["input_ids"], f"{where} input_ids")
    if not ids:
        raise DataError(f"{where}: input_ids is empty")
    if "label" in example:
        label = example["label"]
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise DataError(f"{where}: label must be a non-negative integer class id, got {label!r}")
        return "classification"
    if "labels" in example:
        labels = example["labels"]
        if isinstance(labels, Tensor):
            labels = labels.tolist()
        if not isinstance(labels, (list, tuple)) or len(labels) != len(ids):
            raise DataError(f"{where}: labels must be a list as long as input_ids ({len(ids)}), "
                            f"got {_short(labels)}")
        if not all(isinstance(t, int) and (t >= 0 or t == IGNORE_INDEX) for t in labels):
            raise DataError(f"{where}: labels must hold token ids or {IGNORE_INDEX}, got {_short(labels)}")
        return "lm"
    raise DataError(f"{where}: missing key 'label' (class id) or 'labels' (token targets)")


def is_example_list(data: Any) -> bool:
    """Whether ``data`` is a list of examples (one row each, as ``encode`` / :func:`lm_example` give them)
    rather than of batches: its first item's ``input_ids`` is a flat row of token ids."""
    if not isinstance(data, (list, tuple)) or not data or not isinstance(data[0], Mapping):
        return False
    ids = data[0].get("input_ids")
    if isinstance(ids, Tensor):
        return ids.dim() == 1
    return isinstance(ids, (list, tuple)) and bool(ids) and isinstance(ids[0], int)


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 50256, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Pad a list of examples to the longest row of the batch (dynamic padding).

    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T) with 1 on real tokens, and ``labels``:
    class ids (B,) for classification, token targets (B, T) padded with ``-100`` for LM examples.
    ``pad_to_multiple_of`` rounds T up (tensor-core friendly shapes).
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"collate padding_side: expected 'right' or 'left', got {padding_side!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"collate pad_to_multiple_of: expected a positive integer, got {pad_to_multiple_of!r}")
    if len(examples) == 0:
        raise DataError("collate: got no examples; a batch needs at least one")
    objectives = [example_objective(ex, i) for i, ex in enumerate(examples)]
    if len(set(objectives)) > 1:
        other = objectives.index("lm" if objectives[0] == "classification" else "classification")
        raise DataError(f"collate: example 0 is {objectives[0]} but example {other} is {objectives[other]}; "
                        "a batch mixes 'label' and 'labels'")
    lm = objectives[0] == "lm"
    width = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long) if lm else torch.empty(B, dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = torch.as_tensor(list(ex["input_ids"]), dtype=torch.long)
        n = ids.numel()
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
        if lm:
            labels[row, span] = torch.as_tensor(list(ex["labels"]), dtype=torch.long)
        else:
            labels[row] = int(ex["label"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Example indices of each packed row: every row's lengths sum to at most ``max_length``.

    Best-fit decreasing: longest example first, each into the fullest row it still fits in (ties: the
    earliest row), else a new row. Deterministic; leaves little room unused when short examples can
    fill the gaps the long ones leave.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"pack_rows max_length: expected a positive integer, got {max_length!r}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > max_length:
            raise DataError(f"example {i} has {n} tokens, more than max_length={max_length}; packed rows hold "
                            "whole examples, so truncate it first (lm_example max_length) or raise max_length")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    return rows


def collate_packed(rows: Sequence[Sequence[Mapping[str, Any]]], pad_token_id: int = 50256,
                   pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Pad packed rows (each a list of LM examples laid end to end) to the longest row, on the right.

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens), ``labels`` and ``position_ids`` (B, T).
    Positions restart at 0 for every example, which tells the model where each one begins (it then
    attends within each example only; see :func:`gpt2lora.model.gpt2.packed_segments`). The label of each
    example's first token is -100: it would be predicted from the previous example's last token. So
    every example's loss terms are those it has alone. The padding tail gets positions of its own.
    """
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"collate_packed pad_to_multiple_of: expected a positive integer, got "
                          f"{pad_to_multiple_of!r}")
    if len(rows) == 0 or any(len(row) == 0 for row in rows):
        raise DataError("collate_packed: got an empty batch or an empty row; each row needs an example")
    seqs = []
    for r, row in enumerate(rows):
        for k, ex in enumerate(row):
            if example_objective(ex, k) != "lm":
                raise ConfigError(f"collate_packed: row {r} example {k} is a classification example ('label'); "
                                  "packing is for language-model examples ('labels') only")
        seqs.append([(list(ex["input_ids"]), list(ex["labels"])) for ex in row])
    width = max(sum(len(ids) for ids, _ in row) for row in seqs)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    for r, row in enumerate(seqs):
        at = 0
        for ids, targets in row:
            n = len(ids)
            input_ids[r, at:at + n] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[r, at:at + n] = 1
            labels[r, at + 1:at + n] = torch.as_tensor(targets[1:], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids}


@dataclass(frozen=True)
class PaddingStats:
    """Token slots of one epoch of batches: real tokens, dynamic padding, and fixed-length padding."""

    rows: int
    """Batch rows (packed rows under packing)."""
    real_tokens: int
    """Tokens that are not padding."""
    batch_tokens: int
    """Slots of the dynamically padded batches (real + padding)."""
    fixed_tokens: int | None
    """Slots if every example had a row of ``max_length`` to itself (None when no max_length was given)."""

    @property
    def padding_share(self) -> float:
        """Share of the dynamically padded slots that are padding."""
        return 1.0 - self.real_tokens / self.batch_tokens if self.batch_tokens else 0.0

    @property
    def saving(self) -> float | None:
        """Share of the fixed-length slots that dynamic padding does not compute."""
        if not self.fixed_tokens:
            return None
        return 1.0 - self.batch_tokens / self.fixed_tokens


class BucketedBatches:
    """Re-iterable, length-bucketed batches of collated examples.

    Per epoch (seeded by ``(seed, epoch)``, see :meth:`set_epoch`): shuffle the rows, cut them into
    mega-batches of ``batch_size * mega_batch_factor`` rows, sort each mega-batch by length, chunk it
    into batches, and shuffle the batch order. Rows of similar length share a batch, so little padding
    is computed, while batches stay random. ``shuffle=False`` keeps row and batch order (rows are
    still sorted inside each mega-batch when ``sort_by_length``).

    ``packing=True`` (language-model examples only): the examples are first packed, once, into rows of
    at most ``max_length`` tokens (:func:`pack_rows`), and those rows are what gets shuffled, bucketed
    and batched as above, ``batch_size`` packed rows per batch, collated by :func:`collate_packed`
    (positions restart per example, attention stays inside each example). The packing does not change
    between epochs, so ``len()`` and a resumed position stay valid; :meth:`padding_stats` reports the
    padding left. ``batch_indices`` then indexes :attr:`packed_rows`.
    """

    def __init__(self, examples: Sequence[Mapping[str, Any]], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, pad_token_id: int = 50256,
                 mega_batch_factor: int = 50, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None, sort_by_length: bool = True,
                 packing: bool = False, max_length: int | None = None) -> None:
        for name, value in (("batch_size", batch_size), ("mega_batch_factor", mega_batch_factor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BucketedBatches {name}: expected a positive integer, got {value!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"BucketedBatches seed: expected an integer, got {seed!r}")
        self.examples = list(examples)
        if not self.examples:
            raise DataError("BucketedBatches: got no examples")
        objectives = {example_objective(ex, i) for i, ex in enumerate(self.examples)}
        if len(objectives) > 1:
            raise DataError("BucketedBatches: examples mix 'label' (classification) and 'labels' (LM)")
        self.objective = objectives.pop()
        """``"classification"`` or ``"lm"``: what the examples train (:func:`example_objective`)."""
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad_token_id = pad_token_id
        self.mega_batch_factor = mega_batch_factor
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sort_by_length = sort_by_length
        self.epoch = 0
        self.lengths = [len(ex["input_ids"]) for ex in self.examples]
        self.packing = self._check_packing(packing, max_length)
        self.max_length = max_length
        self.packed_rows: list[list[int]] | None = None
        """Under packing: the example indices of every packed row (fixed for the object's lifetime)."""
        self._row_lengths = self.lengths
        if self.packing:
            self.packed_rows = pack_rows(self.lengths, max_length)
            self._row_lengths = [sum(self.lengths[i] for i in row) for row in self.packed_rows]
        if drop_last and len(self._row_lengths) < batch_size:
            rows = "packed rows" if self.packing else "examples"
            raise DataError(f"BucketedBatches: {len(self._row_lengths)} {rows} make no full batch of "
                            f"batch_size={batch_size} with drop_last=True")

    def _check_packing(self, packing: Any, max_length: Any) -> bool:
        if not isinstance(packing, bool):
            raise ConfigError(f"BucketedBatches packing: expected True or False, got {packing!r}")
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise ConfigError(f"BucketedBatches max_length: expected a positive integer or None, got {max_length!r}")
        if not packing:
            return False
        if self.objective != "lm":
            raise ConfigError("BucketedBatches packing=True: packing is for language-model examples ('labels'); "
                              "these are classification examples ('label'), batched one per row; set packing=False")
        if max_length is None:
            raise ConfigError("BucketedBatches packing=True needs max_length (the tokens of one packed row)")
        if self.padding_side != "right":
            raise ConfigError(f"BucketedBatches padding_side={self.padding_side!r} with packing=True: packed rows "
                              "are padded on the right")
        return True

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (deterministic in seed and epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self._row_lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """Row indices of every batch of an epoch (the current one by default), in yield order.

        A row is an example, or under packing an index into :attr:`packed_rows`.
        """
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self._row_lengths)))
        if self.shuffle:
            rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            if self.sort_by_length:
                chunk.sort(key=lambda i: self._row_lengths[i], reverse=True)
            batches.extend(chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def iter_from(self, start: int) -> Iterator[dict[str, Tensor]]:
        """The current epoch's batches from batch ``start`` on, without collating the skipped ones."""
        for rows in self.batch_indices()[start:]:
            if self.packed_rows is not None:
                yield collate_packed([[self.examples[i] for i in self.packed_rows[r]] for r in rows],
                                     self.pad_token_id, self.pad_to_multiple_of)
            else:
                yield collate([self.examples[i] for i in rows], self.pad_token_id, self.padding_side,
                              self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.iter_from(0)

    def padding_stats(self, max_length: int | None = None) -> PaddingStats:
        """Real vs padded token slots over the current epoch's batches (and vs padding each example to
        ``max_length``, by default the packing length under packing)."""
        if max_length is None and self.packing:
            max_length = self.max_length
        real = batch_slots = rows_used = examples_used = 0
        for rows in self.batch_indices():
            lengths = [self._row_lengths[i] for i in rows]
            width = max(lengths)
            if self.pad_to_multiple_of:
                width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            real += sum(lengths)
            batch_slots += width * len(rows)
            rows_used += len(rows)
            examples_used += sum(len(self.packed_rows[r]) for r in rows) if self.packed_rows is not None else len(rows)
        fixed = examples_used * max_length if max_length is not None else None
        return PaddingStats(rows=rows_used, real_tokens=real, batch_tokens=batch_slots, fixed_tokens=fixed)


def validate_batch(batch: Any, where: str, classification: bool, num_labels: int | None = None,
                   n_positions: int | None = None, vocab_size: int | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Check one batch (a dict with ``input_ids``, ``labels`` and optionally ``attention_mask``) and move it.

    Raises :class:`DataError` naming ``where`` and the key at fault: a missing key, a non-integer or empty
    ``input_ids``, rows longer than ``n_positions``, a mask of another shape, class ids outside
    ``[0, num_labels)`` or token targets outside the vocabulary, ``position_ids`` (packed rows, see
    :func:`collate_packed`) of another shape or outside ``[0, n_positions)``. Returns long tensors on
    ``device``, ``position_ids`` only when the batch has them.
    """
    if not isinstance(batch, Mapping):
        raise DataError(f"{where}: expected a dict with input_ids, attention_mask, labels; got "
                        f"{type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise DataError(f"{where}: missing key {key!r} (a batch needs input_ids, labels and "
                            "optionally attention_mask)")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise DataError(f"{where}: input_ids must be a non-empty (batch, tokens) integer tensor, got "
                        f"shape {tuple(ids.shape)} dtype {ids.dtype}")
    if n_positions is not None and ids.size(1) > n_positions:
        raise DataError(f"{where}: rows of {ids.size(1)} tokens, longer than the model's n_positions="
                        f"{n_positions}; truncate them (max_length)")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise DataError(f"{where}: attention_mask has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")
    labels = torch.as_tensor(batch["labels"]).long()
    if classification:
        if labels.shape != (ids.size(0),):
            raise DataError(f"{where}: labels must be class ids of shape ({ids.size(0)},), got "
                            f"{tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= (num_labels or 2**62))]
        if bad.numel():
            raise DataError(f"{where}: labels contains class id {int(bad[0])}, outside [0, {num_labels - 1}] "
                            f"(the model has num_labels={num_labels})")
    else:
        if labels.shape != ids.shape:
            raise DataError(f"{where}: labels must have the shape of input_ids {tuple(ids.shape)} "
                            f"(token targets, -100 = ignored), got {tuple(labels.shape)}")
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= (vocab_size or 2**62)))]
        if bad.numel():
            raise DataError(f"{where}: labels contains {int(bad[0])}, expected a token id in "
                            f"[0, {vocab_size}) or {IGNORE_INDEX}")
    out = {"input_ids": ids.long().to(device), "attention_mask": mask.long().to(device), "labels": labels.to(device)}
    if batch.get("position_ids") is not None:
        positions = torch.as_tensor(batch["position_ids"])
        if positions.shape != ids.shape or positions.dtype not in (torch.int64, torch.int32):
            raise DataError(f"{where}: position_ids must be an integer tensor of shape {tuple(ids.shape)} "
                            f"(packed rows), got shape {tuple(positions.shape)} dtype {positions.dtype}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= (n_positions or 2**62)):
            raise DataError(f"{where}: position_ids must lie in [0, {n_positions}) (the model's n_positions), "
                            f"got values from {int(positions.min())} to {int(positions.max())}")
        out["position_ids"] = positions.long().to(device)
    return out


def example_count(batch: Mapping[str, Tensor]) -> int:
    """Examples in a collated batch: its rows, or for packed rows the examples laid end to end in them."""
    positions = batch.get("position_ids")
    if positions is None:
        return int(batch["input_ids"].size(0))
    mask = batch.get("attention_mask")
    starts = positions == 0
    return int((starts & mask.bool()).sum()) if mask is not None else int(starts.sum())
