"""gptfluence.lm.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gptfluence.errors import InputError
from gptfluence.lm.metrics import generation_metrics, label_accuracy, metric_names, rouge_l, sentence_bleu


def test_bleu_identical_is_100():
    assert sentence_bleu("the cat sat on the mat .", "the cat sat on the mat .") == pytest.approx(100.0)


def test_bleu_by_hand():
    # hypothesis "the cat" against "the cat sat on the mat": effective order 2, unigram precision
    # 2/2, bigram 1/1, so the precision term is 1; brevity penalty exp(1 - 6/2) = exp(-2).
    assert sentence_bleu("the cat", "the cat sat on the mat") == pytest.approx(100 * math.exp(-2), abs=1e-6)


def test_bleu_empty_and_disjoint():
    assert sentence_bleu("", "the cat") == 0.0
    assert sentence_bleu("dog", "") == 0.0
    assert sentence_bleu("zebra", "the cat sat") == 0.0  # no unigram in common


def test_rouge_l_by_hand():
    # LCS of "the cat sat on mat" and "the cat was on the mat" is "the cat on mat" (4 tokens):
    # precision 4/5, recall 4/6, F = 2PR/(P+R).
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat sat on mat", "the cat was on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("The Cat!", "the cat") == pytest.approx(1.0)  # lower-cased, punctuation ignored
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("dog", "the cat") == 0.0


def test_label_accuracy():
    assert label_accuracy("positive", " positive") == 1.0
    assert label_accuracy("Positive. It was good", "positive") == 1.0
    assert label_accuracy("  yes!", " yes") == 1.0
    assert label_accuracy("negative", " positive") == 0.0
    assert label_accuracy("it is positive", " positive") == 0.0  # first word only
    assert label_accuracy("", " yes") == 0.0
    assert label_accuracy("yesno", " yes") == 0.0


def test_generation_metrics():
    preds, refs = ["the cat", "a b c d"], ["the cat sat on the mat", "a b c d"]
    m = generation_metrics(preds, refs, "generation")
    assert set(m) == {"bleu", "rougeL"} == set(metric_names("generation"))
    assert m["bleu"].dtype == np.float64 and m["bleu"].shape == (2,)
    np.testing.assert_allclose(m["bleu"], [100 * math.exp(-2), 100.0], atol=1e-6)
    np.testing.assert_allclose(m["rougeL"], [2 * (1 * 2 / 6) / (1 + 2 / 6), 1.0])
    c = generation_metrics(["positive", "no way"], ["positive", "yes"], "classification")
    assert set(c) == {"accuracy"} == set(metric_names("classification"))
    np.testing.assert_array_equal(c["accuracy"], [1.0, 0.0])
    with pytest.raises(InputError):
        generation_metrics(["a"], ["a", "b"], "generation")
    with pytest.raises(InputError):
        generation_metrics(["a"], ["a"], "regression")
