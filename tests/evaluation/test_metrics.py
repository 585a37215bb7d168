"""Metrics against hand-computed values and the scorers' own definitions."""

import math

import pytest

from free_jax.evaluation import metrics


def test_squad_em_f1_by_hand():
    preds = ["The Eiffel Tower", "in 1889", "Paris France"]
    refs = [["Eiffel Tower"], ["1889", "in the year 1889"], "paris"]
    out = metrics.squad(preds, refs)
    # ex1: "eiffel tower" both sides after dropping the article -> EM 1, F1 1.
    # ex2: "in 1889" vs "1889": P 1/2, R 1 -> F1 2/3; vs "in year 1889": P 1, R 2/3 -> F1 0.8;
    #      EM 0, F1 is the max, 0.8.
    # ex3: "paris france" vs "paris": P 1/2, R 1 -> F1 2/3, EM 0.
    assert out["em"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3) / 3)
    assert out["score"] == out["f1"]


def test_bleu_perfect_and_disjoint():
    ref = ["Die Datei konnte nicht geöffnet werden.", "Unbekannte Option in der Befehlszeile."]
    assert metrics.bleu(ref, ref)["score"] == pytest.approx(100.0)
    assert metrics.bleu(["xx yy zz ww vv"] * 2, ref)["score"] == pytest.approx(0.0)


def test_rouge_by_hand():
    out = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigram overlap 3: P = 3/3, R = 3/6 -> F = 2/3
    assert out["rouge1"] == pytest.approx(100 * 2 / 3)
    assert out["score"] == out["rougeLsum"]


def test_repetition_loops():
    assert metrics.has_repetition_loop("Eingabe Eingabe Eingabe")
    assert metrics.has_repetition_loop("x a b a b a b y")
    assert not metrics.has_repetition_loop("a b a b c")
    assert math.isclose(metrics.loop_rate(["a a a", "b c", "d e f", "g g g g"]), 0.5)


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        metrics.score("meteor", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.score("bleu", ["a", "b"], ["a"])
