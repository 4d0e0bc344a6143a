"""Evaluation metrics: classification scores, perplexity, SQuAD EM/F1, ROUGE-L, throughput and peak memory.

Scores are fractions in [0, 1] (multiply by 100 for the percentages papers print).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError, DataError


def _ints(values: Iterable[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    out = list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise DataError(f"{name}: expected non-negative integer class ids")
    return out


def _pair(predictions: Iterable[int] | torch.Tensor,
          labels: Iterable[int] | torch.Tensor) -> tuple[list[int], list[int]]:
    preds, golds = _ints(predictions, "predictions"), _ints(labels, "labels")
    if len(preds) != len(golds):
        raise DataError(f"predictions has {len(preds)} entries but labels has {len(golds)}; they must match")
    if not preds:
        raise DataError("predictions and labels are empty; a metric needs at least one example")
    return preds, golds


def accuracy(predictions: Iterable[int] | torch.Tensor, labels: Iterable[int] | torch.Tensor) -> float:
    """Share of predictions equal to their label."""
    preds, golds = _pair(predictions, labels)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def confusion_matrix(predictions: Iterable[int] | torch.Tensor, labels: Iterable[int] | torch.Tensor,
                     num_labels: int | None = None) -> list[list[int]]:
    """``matrix[true][predicted]`` counts; size ``num_labels`` (default: largest id seen + 1)."""
    preds, golds = _pair(predictions, labels)
    size = max(preds + golds) + 1 if num_labels is None else num_labels
    if not isinstance(size, int) or size < 1 or max(preds + golds) >= size:
        raise DataError(f"confusion_matrix: num_labels={num_labels!r} but class id {max(preds + golds)} occurs")
    matrix = [[0] * size for _ in range(size)]
    for p, g in zip(preds, golds):
        matrix[g][p] += 1
    return matrix


def per_class_scores(predictions: Iterable[int] | torch.Tensor, labels: Iterable[int] | torch.Tensor
                     ) -> dict[int, dict[str, float]]:
    """Precision, recall, F1 and support of every class seen in labels or predictions.

    A score whose denominator is zero (a class never predicted, or never true) is 0, as in scikit-learn.
    """
    preds, golds = _pair(predictions, labels)
    tp: Counter[int] = Counter(p for p, g in zip(preds, golds) if p == g)
    predicted, support = Counter(preds), Counter(golds)
    scores = {}
    for c in sorted(set(preds) | set(golds)):
        precision = tp[c] / predicted[c] if predicted[c] else 0.0
        recall = tp[c] / support[c] if support[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support[c]}
    return scores


def precision_recall_f1(predictions: Iterable[int] | torch.Tensor, labels: Iterable[int] | torch.Tensor,
                        average: str = "macro") -> tuple[float, float, float]:
    """(precision, recall, F1) averaged over classes: ``macro`` (unweighted) or ``weighted`` (by support).

    Classes are those present in labels or predictions (scikit-learn's default). The macro F1 is the
    mean of per-class F1s, not the F1 of the mean precision and recall.
    """
    if average not in ("macro", "weighted"):
        raise ConfigError(f"precision_recall_f1 average: expected 'macro' or 'weighted', got {average!r}")
    scores = per_class_scores(predictions, labels)
    if average == "macro":
        weights = {c: 1.0 / len(scores) for c in scores}
    else:
        total = sum(s["support"] for s in scores.values())
        weights = {c: s["support"] / total for c, s in scores.items()}
    return tuple(sum(weights[c] * scores[c][k] for c in scores)  # type: ignore[return-value]
                 for k in ("precision", "recall", "f1"))


def classification_metrics(predictions: Iterable[int] | torch.Tensor,
                           labels: Iterable[int] | torch.Tensor) -> dict[str, float]:
    """accuracy, precision/recall/F1 macro and weighted, as one flat dict."""
    preds, golds = _pair(predictions, labels)
    out = {"accuracy": accuracy(preds, golds)}
    for average in ("macro", "weighted"):
        p, r, f = precision_recall_f1(preds, golds, average)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    return out


#: The metrics of a classifier's evaluation, as :func:`gpt2lora.evaluate`, the Trainer's history, run folders,
#: reports and model cards all name them; a language model's are ``loss`` and ``perplexity``.
CLASSIFICATION_RESULT_METRICS = ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro")
#: Names that run folders written before these were one set gave the same metrics (HF Trainer's words).
OLD_METRIC_NAMES = {"eval_loss": "loss", "f1": "f1_macro", "precision": "precision_macro", "recall": "recall_macro"}


def current_metric_names(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` (a result read from a run folder) with older metric names read as today's ones."""
    return {(OLD_METRIC_NAMES[k] if k in OLD_METRIC_NAMES and OLD_METRIC_NAMES[k] not in row else k): v
            for k, v in row.items()}


def mean_loss(total_loss: float, count: int) -> float:
    """Mean of a summed loss over ``count`` items (examples or target tokens)."""
    if count <= 0:
        raise DataError("mean_loss: no items were scored (count is 0); check the labels hold targets")
    return total_loss / count


def perplexity(loss: float) -> float:
    """``exp(mean token cross-entropy)``; ``inf`` when it overflows."""
    if math.isnan(loss):
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# --- SQuAD v1.1 (the official evaluation script's normalisation) ---

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"SQuAD references: expected a non-empty list of answer strings, got {references!r}")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(r) for r in _references(references)))


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 of the normalised prediction against any reference."""
    return max(_token_f1(prediction, r) for r in _references(references))


def squad_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ``exact_match`` and ``f1`` over a dataset (fractions; the official script prints ×100)."""
    if len(predictions) != len(references) or not predictions:
        raise DataError(f"squad_metrics: {len(predictions)} predictions for {len(references)} questions; "
                        "expected the same non-zero number")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)
    f1 = sum(squad_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)
    return {"exact_match": em, "f1": f1}



# --- instruction following: reference metrics used when no LLM judge is at hand ---

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of ASCII letters and digits (everything else separates)."""
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 (beta = 1) of one prediction against one reference.

    Two empty texts score 1.0 (nothing to say, nothing said); one empty side scores 0.0.
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise DataError(f"rouge_l: expected two strings, got {type(prediction).__name__} and "
                        f"{type(reference).__name__}")
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred and not ref:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    common = lcs_length(pred, ref)
    if common == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = common / len(pred), common / len(ref)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def instruction_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match (SQuAD normalisation) and mean ROUGE-L F1 of generated responses."""
    if len(predictions) != len(references) or not predictions:
        raise DataError(f"instruction_metrics: {len(predictions)} responses for {len(references)} references; "
                        "expected the same non-zero number")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)
    rouge = sum(rouge_l(p, r)["f1"] for p, r in zip(predictions, references)) / len(predictions)
    return {"exact_match": em, "rouge_l_f1": rouge}

# --- speed and memory ---

def throughput(runtime_s: float, samples: int, steps: int, tokens: int) -> dict[str, float]:
    """Runtime and samples/s, steps/s, tokens/s (0 when no time passed)."""
    rate = (lambda n: n / runtime_s) if runtime_s > 0 else (lambda n: 0.0)
    return {"runtime_s": runtime_s, "samples_per_s": rate(samples), "steps_per_s": rate(steps),
            "tokens_per_s": rate(tokens)}
