"""Evaluation: loss and metrics over batches, and the generated answers of instruction / QA tasks.

:func:`evaluate` is standalone — a model and batches, no Trainer — and is what :meth:`Trainer.evaluate`
runs. :func:`task_metrics` adds what a task kind reports (accuracy/F1, perplexity, SQuAD EM/F1 of
greedy answers, instruction responses) for a run folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..constants import DEFAULT_LOSS_CHUNK_SIZE
from ..data.batching import BucketedBatches, collate, validate_batch
from ..data.tasks import CLASSIFICATION_KINDS, Dataset, Tokenizer, encode, prompt_ids
from ..devices import autocast, resolve_precision
from ..errors import ConfigError, DataError
from ..model.classifier import is_classifier, label_count
from . import distributed
from .losses import forward_loss
from .metrics import (
    CLASSIFICATION_RESULT_METRICS,
    classification_metrics,
    instruction_metrics,
    mean_loss,
    perplexity,
    squad_metrics,
)

#: Per-row details of :func:`task_metrics` kept out of result rows (QA samples, instruction responses).
DETAIL_KEYS = ("samples", "responses")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def checked_batch(model: nn.Module, batch: Any, where: str, device: torch.device) -> dict[str, torch.Tensor]:
    """:func:`~gpt2lora.data.batching.validate_batch` with the limits ``model`` sets (labels, positions, vocab)."""
    config = getattr(model, "config", None)
    classification = is_classifier(model)
    return validate_batch(batch, where, classification, label_count(model) if classification else None,
                          getattr(config, "n_positions", None), getattr(config, "vocab_size", None), device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str | None = None,
             precision: str = "fp32", dist: distributed.DistInfo | None = None,
             loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE) -> dict[str, float]:
    """Loss + accuracy/precision/recall/F1 (classifier) or loss + perplexity + target tokens (LM).

    The loss is :func:`~gpt2lora.training.losses.forward_loss`'s, as in training: a language model's head runs at
    target positions only, ``loss_chunk_size`` rows at a time; packed batches (with ``position_ids``) work.
    ``device``: where the batches go (default: the model's). In a distributed run (``dist`` enabled)
    every rank must pass the same batches: batch i is evaluated by rank i mod world_size and the sums
    (and a confusion matrix) are all-reduced, so every rank gets the metrics. The model's train/eval
    mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else model_device(model)
    precision = resolve_precision(precision, device)
    classification = is_classifier(model)
    was_training = model.training
    model.eval()
    total, count, preds, golds = 0.0, 0, [], []
    try:
        for i, raw in enumerate(batches):
            batch = checked_batch(model, raw, f"eval batch {i}", device)
            if dist is not None and dist.enabled and i % dist.world_size != dist.rank:
                continue  # sharded: batch i is evaluated by rank i mod world_size, then reduced below
            with autocast(precision, device):
                summed, n, logits = forward_loss(model, batch, classification, loss_chunk_size)
            total += float(summed)
            count += n
            if classification:
                preds.extend(logits.argmax(-1).tolist())
                golds.extend(batch["labels"].tolist())
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        total, count, preds, golds = _reduce(model, total, count, preds, golds, device)
    if count == 0:
        raise DataError("eval_data: no batches (or no target tokens) to evaluate")
    loss = mean_loss(total, count)
    if classification:
        return {"loss": loss, **classification_metrics(preds, golds)}
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


def _reduce(model: nn.Module, total: float, count: int, preds: list[int], golds: list[int],
            device: torch.device) -> tuple[float, int, list[int], list[int]]:
    """Every rank's eval sums, and its predictions as a summed confusion matrix (metrics need no order)."""
    total, count = distributed.all_reduce_sum([total, count], device)
    if not is_classifier(model):
        return total, int(count), preds, golds
    n = label_count(model)
    confusion = torch.zeros(n * n, dtype=torch.int64, device=device)
    if golds:
        cells = torch.tensor(golds, device=device) * n + torch.tensor(preds, device=device)
        confusion += torch.bincount(cells, minlength=n * n)
    confusion = distributed.all_reduce_tensor(confusion).tolist()
    golds = [cell // n for cell, c in enumerate(confusion) for _ in range(c)]
    preds = [cell % n for cell, c in enumerate(confusion) for _ in range(c)]
    return total, int(count), preds, golds


def newline_token_ids(tok: Tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids of every token (below ``vocab_size``) whose text holds a newline: where a one-line answer ends."""
    n = tok.n_vocab if vocab_size is None else min(vocab_size, tok.n_vocab)
    out = []
    for i in range(n):
        try:
            if b"\n" in tok.decode_single_token_bytes(i):
                out.append(i)
        except KeyError:  # a hole in the vocabulary
            continue
    return out


@torch.no_grad()
def generate_texts(model: nn.Module, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   device: torch.device, batch_size: int = 8, stop_at_newline: bool = False,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0) -> list[str]:
    """Continuations of tokenised prompts (greedy by default), decoded up to EOS, in the prompts' order.

    Prompts are answered in batches of similar length (sorted, longest first, left-padded), so little
    padding is computed; each row's greedy answer is the one it gets alone, so the texts (and the EM / F1
    computed from them) do not depend on ``batch_size``. ``stop_at_newline``: the text ends at its first
    newline, and a row stops generating once it produced a token holding one. Sampling
    (``temperature > 0``) draws from one generator over the sorted batches.
    """
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    limit = model.config.n_positions - max_new_tokens
    if limit < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                          f"n_positions={model.config.n_positions}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"generate_texts batch_size: expected a positive integer, got {batch_size!r}")
    stop = newline_token_ids(tok, model.config.vocab_size) if stop_at_newline else None
    cut = [p[-limit:] for p in prompts]
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]))  # stable: equal lengths keep their order
    texts = [""] * len(cut)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": cut[i], "label": 0} for i in chunk], tok.eot_token, padding_side="left")
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=tok.eot_token, generator=generator, stop_token_ids=stop)
        for i, row in zip(chunk, out[:, batch["input_ids"].size(1):].tolist(), strict=True):
            row = row[:row.index(tok.eot_token)] if tok.eot_token in row else row
            text = tok.decode(row)
            texts[i] = text.split("\n")[0].strip() if stop_at_newline else text.strip()
    return texts


def instruction_samples(model: nn.Module, tok: Tokenizer, records: list[dict[str, Any]], max_new_tokens: int,
                        max_length: int, device: torch.device) -> list[dict[str, str]]:
    """Greedy responses to instruction records, with the instruction, input and reference."""
    prompts = [prompt_ids(tok, r, "instruction", max_length) for r in records]
    outputs = generate_texts(model, tok, prompts, max_new_tokens, device)
    return [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"], "generated": o}
            for r, o in zip(records, outputs)]


def task_metrics(model: nn.Module, tok: Tokenizer, eval_set: Dataset, max_length: int, batch_size: int,
                 device: torch.device, precision: str = "auto", gen_rows: int = 200,
                 max_new_tokens: int | None = None) -> dict[str, Any]:
    """The metrics a task kind reports over every eval row.

    Classification / NLI: ``loss``, ``accuracy``, ``f1_macro``, ``precision_macro``, ``recall_macro`` (the names
    :func:`evaluate` gives). Instruction / QA: ``loss`` and
    perplexity, plus, over the first ``gen_rows`` rows answered greedily with ``max_new_tokens`` tokens
    (default 32 for QA, 128 for instructions), SQuAD EM / F1 with five samples, or ROUGE-L / exact match
    with every response (kept for ``gpt2lora judge``).
    """
    kind = eval_set.kind
    examples = encode(eval_set, tok, max_length)
    data = BucketedBatches(examples, batch_size, shuffle=False, pad_token_id=tok.eot_token)
    model.to(device)
    start = time.perf_counter()
    raw = evaluate(model, data, device=device, precision=precision)
    runtime = time.perf_counter() - start
    names = CLASSIFICATION_RESULT_METRICS if kind in CLASSIFICATION_KINDS else ("loss", "perplexity")
    metrics: dict[str, Any] = {name: raw[name] for name in names}  # evaluate's names, unchanged
    metrics.update(eval_time_s=runtime, eval_rows=len(examples),
                   eval_samples_per_s=len(examples) / runtime if runtime else 0.0)
    rows = eval_set.records[:gen_rows]
    if kind == "qa":
        prompts = [prompt_ids(tok, r, "qa", max_length) for r in rows]
        answers = generate_texts(model, tok, prompts, max_new_tokens or 32, device, stop_at_newline=True)
        scores = squad_metrics(answers, [r["answers"] for r in rows])
        metrics.update(exact_match=scores["exact_match"], squad_f1=scores["f1"], generated_rows=len(rows),
                       samples=[{"question": r["question"], "answers": r["answers"], "prediction": a}
                                for r, a in list(zip(rows, answers))[:5]])
    if kind == "instruction":
        responses = generate_texts(model, tok, [prompt_ids(tok, r, "instruction", max_length) for r in rows],
                                   max_new_tokens or 128, device)
        metrics.update(instruction_metrics(responses, [r["output"] for r in rows]), generated_rows=len(rows),
                       responses=[{"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
                                   "response": text} for r, text in zip(rows, responses)])
    return metrics
