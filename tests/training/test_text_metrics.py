"""ROUGE-L and instruction exact match against hand-computed cases and a brute-force LCS."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lora.errors import DataError
from gpt2lora.training.metrics import instruction_metrics, lcs_length, rouge_l, rouge_tokens


def test_tokens_are_lowercase_alphanumeric_runs():
    assert rouge_tokens("Hello, World! It's 2 o'clock.") == ["hello", "world", "it", "s", "2", "o", "clock"]
    assert rouge_tokens("  ...  ") == []


@pytest.mark.parametrize(("prediction", "reference", "lcs", "precision", "recall"), [
    # the cat [sat] on the mat / the cat [is] on the mat: LCS "the cat on the mat" = 5 of 6 each side
    ("the cat sat on the mat", "the cat is on the mat", 5, 5 / 6, 5 / 6),
    # Lin (2004)'s example: LCS "police the gunman" = 3 of 4
    ("police killed the gunman", "police kill the gunman", 3, 3 / 4, 3 / 4),
    # word order matters: only "the gunman" survives in order
    ("police kill the gunman", "the gunman kill police", 2, 2 / 4, 2 / 4),
    # a longer prediction that contains the reference in order: recall 1, precision 3/5
    ("a b c d e", "a c e", 3, 3 / 5, 1.0),
    # case and punctuation do not count
    ("Sarah baked the cake.", "sarah BAKED the cake", 4, 1.0, 1.0),
    # nothing in common
    ("yes", "no", 0, 0.0, 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, lcs, precision, recall):
    assert lcs_length(rouge_tokens(prediction), rouge_tokens(reference)) == lcs
    score = rouge_l(prediction, reference)
    assert score["precision"] == pytest.approx(precision)
    assert score["recall"] == pytest.approx(recall)
    expected_f1 = 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)
    assert score["f1"] == pytest.approx(expected_f1)


def test_rouge_l_f1_of_unequal_lengths():
    # P = 3/5, R = 1 -> F1 = 2 * 0.6 / 1.6 = 0.75
    assert rouge_l("a b c d e", "a c e")["f1"] == pytest.approx(0.75)
    # symmetric in F1, swapped in precision / recall
    swapped = rouge_l("a c e", "a b c d e")
    assert (swapped["precision"], swapped["recall"]) == (pytest.approx(1.0), pytest.approx(0.6))


def test_rouge_l_empty_texts():
    assert rouge_l("", "")["f1"] == 1.0
    assert rouge_l("", "something")["f1"] == 0.0
    assert rouge_l("!!!", "something")["f1"] == 0.0


def _brute_lcs(a: list[str], b: list[str]) -> int:
    for size in range(min(len(a), len(b)), 0, -1):
        subsequences = set(itertools.combinations(a, size))
        if any(c in subsequences for c in itertools.combinations(b, size)):
            return size
    return 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_matches_brute_force(a, b):
    assert lcs_length(a, b) == _brute_lcs(a, b)
    assert lcs_length(a, b) == lcs_length(b, a)


def test_instruction_metrics_means():
    predictions = ["Sarah baked the cake.", "The cat sat on the mat", "no idea"]
    references = ["Sarah baked the cake.", "the cat is on the mat", "Paris"]
    scores = instruction_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l_f1"] == pytest.approx((1.0 + 5 / 6 + 0.0) / 3)


def test_instruction_exact_match_uses_squad_normalisation():
    # articles, case and punctuation are ignored; a different word is not
    assert instruction_metrics(["The answer: Sacramento!"], ["answer sacramento"])["exact_match"] == 1.0
    assert instruction_metrics(["San Francisco"], ["Sacramento"])["exact_match"] == 0.0


def test_bad_input_names_the_problem():
    with pytest.raises(DataError, match="2 responses for 1 references"):
        instruction_metrics(["a", "b"], ["a"])
    with pytest.raises(DataError, match="0 responses"):
        instruction_metrics([], [])
    with pytest.raises(DataError, match="expected two strings, got int and str"):
        rouge_l(3, "x")  # type: ignore[arg-type]
