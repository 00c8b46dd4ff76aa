"""Test metrics of one generation against its reference.

* `sentence_bleu`: sacrebleu sentence BLEU (0-100; exponential smoothing and effective n-gram
  order, sacrebleu's sentence-level defaults; default 13a tokenization).
* `rouge_l`: rouge-score ROUGE-L F-measure (0-1; rouge-score's tokenizer: lower-cased,
  alphanumeric tokens, no stemming).
* `label_accuracy`: 1.0 when the first word of the prediction, lower-cased and stripped of
  punctuation, is the label word (same normalisation), else 0.0.
* `generation_metrics`: per-example arrays: ``{"bleu", "rougeL"}`` for generation tasks and
  ``{"accuracy"}`` for classification tasks (BLEU of a one-word label is not informative).
* `masked_target_loss`: per-example mean cross-entropy of full-sequence logits over target tokens
  (labels != -100), the reference computation the fast path of `gptfluence.lm.evaluation` is
  tested against.
"""

from __future__ import annotations

import string
from functools import lru_cache
from typing import Sequence

import numpy as np

from gptfluence.errors import InputError
from gptfluence.types import CLASSIFICATION, GENERATION

_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019\u2026"


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU of ``prediction`` against one ``reference``, 0-100."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(min(100.0, _bleu().sentence_score(prediction, [reference]).score))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score), 0-1."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def _norm_word(word: str) -> str:
    return word.strip().strip(_PUNCT).lower()


def label_accuracy(prediction: str, label: str) -> float:
    """1.0 if the first word of ``prediction`` (normalised) equals ``label`` (normalised)."""
    words = prediction.split()
    if not words:
        return 0.0
    return 1.0 if _norm_word(words[0]) == _norm_word(label) else 0.0


def generation_metrics(predictions: Sequence[str], references: Sequence[str], kind: str) -> dict[str, np.ndarray]:
    """Per-example metrics: {"bleu", "rougeL"} (generation) or {"accuracy"} (classification)."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} references")
    if kind == GENERATION:
        return {
            "bleu": np.array([sentence_bleu(p, r) for p, r in zip(predictions, references)], dtype=np.float64),
            "rougeL": np.array([rouge_l(p, r) for p, r in zip(predictions, references)], dtype=np.float64),
        }
    if kind == CLASSIFICATION:
        return {"accuracy": np.array([label_accuracy(p, r) for p, r in zip(predictions, references)],
                                     dtype=np.float64)}
    raise InputError(f"unknown task kind {kind!r} (expected {GENERATION!r} or {CLASSIFICATION!r})")


def metric_names(kind: str) -> tuple[str, ...]:
    """The metrics `generation_metrics` returns for a task kind (loss is always measured besides)."""
    if kind == GENERATION:
        return ("bleu", "rougeL")
    if kind == CLASSIFICATION:
        return ("accuracy",)
    raise InputError(f"unknown task kind {kind!r} (expected {GENERATION!r} or {CLASSIFICATION!r})")


def masked_target_loss(logits, labels):
    """Per-example mean CE over target tokens: ``logits`` [B, L, V], ``labels`` [B, L] (-100 ignored).

    Position t's logits predict token t + 1. Returns a float tensor [B] (nan for a row without
    target tokens).
    """
    import torch

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                           shift_labels.reshape(-1), reduction="none",
                                           ignore_index=-100).view(shift_labels.shape)
    mask = (shift_labels != -100).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1)
