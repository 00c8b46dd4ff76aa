"""Mislabelled-data detection: rank training examples by a suspicion score, inspect from the top.

Pure functions (this part) are the measurement; `measure_mislabeled` below runs it on a store
collected with ``--flip-fraction``.

Conventions:

* ``scores [N]``: one suspicion score per training example, LARGER = inspect earlier (e.g.
  TracIn self-influence, the final training loss). Ties are broken by the given order (stable),
  so a method with constant scores inspects in id order; NaN scores are inspected last.
* ``flipped [N]`` bool: True where the example's label was flipped.
* Detection curve: after inspecting the top ``k`` examples (k = 0..N), the fraction of all flipped
  examples found; x = k / N (fraction inspected), y = found / n_flipped. It starts at (0, 0) and
  ends at (1, 1).
* AUC: the area under that curve over x in [0, 1] (trapezoid rule on the N + 1 points). Random
  inspection gives 0.5 in expectation; a perfect ranking gives ``1 - f / 2`` where ``f`` is the
  flipped fraction (all flipped found after inspecting ``f``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptfluence.errors import InputError


def _check(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.asarray(flipped).ravel()
    if s.size != f.size:
        raise InputError(f"scores ({s.size}) and flipped flags ({f.size}) must have one entry per training example")
    if s.size == 0:
        raise InputError("no training examples to rank")
    f = f.astype(bool)
    if not f.any():
        raise InputError("no flipped training example: collect with --flip-fraction > 0 (a classification task)")
    return s, f


def inspection_order(scores: np.ndarray) -> np.ndarray:
    """Indices [N] in inspection order: descending score, ties in the given order, NaN last."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    key = np.where(np.isfinite(s), -s, np.inf)
    return np.argsort(key, kind="stable")


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction_inspected [N+1], fraction_found [N+1])``: after inspecting the top k = 0..N
    examples by ``scores`` (see the module doc), k / N and the fraction of flipped ones found."""
    s, f = _check(scores, flipped)
    found = np.concatenate([[0], np.cumsum(f[inspection_order(s)])])
    n = s.size
    return np.arange(n + 1, dtype=np.float64) / n, found.astype(np.float64) / f.sum()


def detection_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """Area under `detection_curve` (trapezoid rule), in [0, 1]; 0.5 = random in expectation."""
    x, y = detection_curve(scores, flipped)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def perfect_auc(flipped: np.ndarray) -> float:
    """The AUC of a ranking that puts every flipped example first: ``1 - f / 2`` on the N + 1 points."""
    f = np.asarray(flipped).astype(bool).ravel()
    return detection_auc(f.astype(np.float64), f)


def found_at(scores: np.ndarray, flipped: np.ndarray, fractions: Any) -> list[float]:
    """Fraction of flipped examples found after inspecting each of ``fractions`` (of N, rounded
    down to whole examples)."""
    x, y = detection_curve(scores, flipped)
    n = x.size - 1
    return [float(y[int(np.floor(float(q) * n + 1e-9))]) for q in fractions]
