"""Metrics against independent computations (numpy by hand) and hand-worked SQuAD cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lora import ConfigError, DataError
from gpt2lora.training.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    exact_match,
    mean_loss,
    normalize_answer,
    per_class_scores,
    perplexity,
    precision_recall_f1,
    squad_f1,
    squad_metrics,
    throughput,
)


def numpy_scores(preds, golds):
    """Precision/recall/F1 from a numpy confusion matrix, macro and weighted (scikit-learn's definitions)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    classes = np.union1d(preds, golds)
    cm = np.array([[np.sum((golds == t) & (preds == p)) for p in classes] for t in classes], dtype=float)
    tp = np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(0))
        recall = np.nan_to_num(tp / cm.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    support = cm.sum(1)
    out = {}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"{name}_macro"] = values.mean()
        out[f"{name}_weighted"] = (values * support).sum() / support.sum()
    out["accuracy"] = tp.sum() / len(golds)
    return out


def test_hand_worked_binary_case():
    golds = [1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 0, 1, 0, 0, 0, 0]
    # class 1: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3; class 0: tp 4, fp 1, fn 1 -> 4/5
    assert accuracy(preds, golds) == 6 / 8
    p, r, f = precision_recall_f1(preds, golds, "macro")
    assert (p, r, f) == pytest.approx((11 / 15, 11 / 15, 11 / 15))
    _, _, fw = precision_recall_f1(preds, golds, "weighted")
    assert fw == pytest.approx((3 * 2 / 3 + 5 * 4 / 5) / 8)
    assert confusion_matrix(preds, golds) == [[4, 1], [1, 2]]
    assert per_class_scores(preds, golds)[1]["support"] == 3


def test_class_never_predicted_scores_zero_and_counts_in_macro():
    golds, preds = [0, 1, 2, 2], [0, 1, 1, 1]
    scores = per_class_scores(preds, golds)
    assert scores[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # class 1: tp 1 of 3 predicted (P 1/3), its one true row found (R 1) -> F1 1/2
    assert precision_recall_f1(preds, golds)[2] == pytest.approx((1 + 1 / 2 + 0) / 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5).flatmap(lambda k: st.lists(st.tuples(st.integers(0, k), st.integers(0, k)),
                                                    min_size=1, max_size=60)))
def test_scores_match_numpy(pairs):
    preds, golds = [p for p, _ in pairs], [g for _, g in pairs]
    got = classification_metrics(preds, golds)
    expected = numpy_scores(preds, golds)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key
    cm = np.asarray(confusion_matrix(preds, golds, num_labels=6))
    assert cm.sum() == len(pairs) and np.trace(cm) == sum(p == g for p, g in pairs)


def test_tensors_are_accepted():
    assert accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_bad_metric_input():
    with pytest.raises(DataError, match="3 entries but labels has 2"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(DataError, match="empty"):
        accuracy([], [])
    with pytest.raises(DataError, match="non-negative integer"):
        accuracy([1.5], [1])
    with pytest.raises(ConfigError, match="average"):
        precision_recall_f1([1], [1], average="micro")
    with pytest.raises(DataError, match="num_labels=2 but class id 2"):
        confusion_matrix([2], [0], num_labels=2)
    with pytest.raises(DataError, match="count is 0"):
        mean_loss(0.0, 0)


def test_perplexity_is_exp_of_mean_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50257)) == pytest.approx(50257)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))
    assert perplexity(mean_loss(6.0, 3)) == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear\tand THE plum. ", "apple pear and plum"),
    ("Theatre", "theatre"),  # "the" only as a whole word
    ("rock'n'roll", "rocknroll"),
    ("", ""),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_squad_exact_match_and_f1_hand_cases():
    assert exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # "denver" vs "denver broncos": P = 1, R = 1/2 -> F1 = 2/3; vs "broncos": 0 -> max 2/3
    assert squad_f1("Denver", ["Denver Broncos", "Broncos"]) == pytest.approx(2 / 3)
    # bag of tokens with repeats: pred "a b b c", ref "b b b d" -> common 2 (b, b) after dropping "a"
    # pred tokens [b, b, c] (3), ref [b, b, b, d] (4): P = 2/3, R = 1/2, F1 = 4/7
    assert squad_f1("a b b c", "b b b d") == pytest.approx(4 / 7)
    assert squad_f1("the", "a") == 0.0  # both normalise to nothing: no common tokens
    result = squad_metrics(["Denver Broncos", "1990"], [["Denver Broncos"], ["in 1990", "1991"]])
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(DataError, match="2 predictions for 1"):
        squad_metrics(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="references"):
        exact_match("a", [])


def test_throughput():
    speed = throughput(2.0, samples=64, steps=8, tokens=1000)
    assert speed == {"runtime_s": 2.0, "samples_per_s": 32.0, "steps_per_s": 4.0, "tokens_per_s": 500.0}
    assert throughput(0.0, 1, 1, 1)["samples_per_s"] == 0.0
