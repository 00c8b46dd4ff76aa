"""Counterfactual influence of training examples, computed with any fitted `Simulator`.

Leave-one-out (LOO): for every training id ``i`` the curriculum is simulated with every occurrence
of ``i`` removed (set to the padding id -1), and the simulated final value of each test example is
compared with the one under the unmodified curriculum. All variants go to the simulator as one
batch of curricula ``[N, T, b]`` per chunk (a rollout over many curricula is a tensor operation;
a Python loop over examples is not), so the cost is ``ceil((N + 1) / chunk)`` simulate calls.

SIGN CONVENTION (everywhere in gptfluence): a score > 0 means the training example is HELPFUL
for the test example, i.e. training on it improves the test metric.

* lower-is-better metrics (``LOWER_IS_BETTER``, i.e. loss):
  ``score = final(without i) - final(with all)`` (removing a helpful example raises the loss);
* higher-is-better metrics (bleu, rougeL, accuracy):
  ``score = final(with all) - final(without i)`` (removing a helpful example lowers the metric).

Scores are in the metric's own unit (nats for loss, BLEU points 0-100, ROUGE-L 0-1).

WHAT A SCORE IS RELATIVE TO: the difference of two simulated final values, with and without the
example's occurrences (its batch slots become padding). For a detrended simulator (``detrend``,
the default of gptfluence and simfluence) every step still gets the fit runs' mean change (the
trend), which holds the effect of an average training example; the learned factors model only
deviations from it. So "helpful" there means "helps more than an average training example at that
step would", and "harmful" "helps less than average (or hurts)", not "better / worse than not
training at all". `relative_description` states it per simulator; it is part of `Influence.sign`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gptfluence.errors import InputError

LOWER_IS_BETTER = {"loss"}

__all__ = [
    "LOWER_IS_BETTER",
    "Influence",
    "loo_influence",
    "run_loo_influence",
    "influence_report",
    "sign_description",
    "relative_description",
]


def sign_description(metric: str) -> str:
    """The human-readable sign convention for ``metric`` (used in reports and JSON)."""
    if metric in LOWER_IS_BETTER:
        return (f"positive = helpful (removing the training example raises the simulated final {metric}; "
                f"score = {metric}(without) - {metric}(with all))")
    return (f"positive = helpful (removing the training example lowers the simulated final {metric}; "
            f"score = {metric}(with all) - {metric}(without))")


def relative_description(simulator: Any) -> str:
    """What a LOO score of ``simulator`` is relative to (see the module docstring), one sentence."""
    detrend = getattr(getattr(simulator, "config", None), "detrend", None)
    if detrend:
        return ("relative to an average training example at that step: the simulator is detrended (the fit runs' "
                "mean change per step stays when an example is removed), so helpful = helps more than an average "
                "example at that step, harmful = helps less (or hurts)")
    if detrend is False:
        return ("relative to leaving the example's batch slots empty (no detrending: the simulator models the raw "
                "values, so a score compares training on the example with not training on it)")
    return ("relative to the simulator's prediction with the example's occurrences left out (padding); for a "
            "simulator with a trend term, relative to an average example at that step")


def _num(x: Any) -> float | None:
    """A JSON-able float: NaN / inf become None."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Influence:
    """Influence scores of N training examples on M test examples.

    ``scores[n, m]`` is the influence of training id ``train_ids[n]`` on test id ``test_ids[m]``
    under the sign convention of this module (> 0 = helpful). ``final_full[m]`` is the simulated
    final metric value under the unmodified curriculum. ``method`` is the simulator's method name
    and ``kind`` the counterfactual ("loo").
    """

    scores: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    metric: str
    method: str
    final_full: np.ndarray
    kind: str = "loo"
    relative_to: str = ""  # `relative_description` of the simulator (empty when unknown)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        self.test_ids = np.asarray(self.test_ids, dtype=np.int64)
        self.final_full = np.asarray(self.final_full, dtype=np.float64)
        if self.scores.shape != (self.train_ids.size, self.test_ids.size):
            raise InputError(f"influence scores have shape {self.scores.shape}, expected "
                             f"(train={self.train_ids.size}, test={self.test_ids.size})")
        if self.final_full.shape != (self.test_ids.size,):
            raise InputError(f"final_full has shape {self.final_full.shape}, expected ({self.test_ids.size},)")
        self._test_col = {int(t): k for k, t in enumerate(self.test_ids.tolist())}

    @property
    def sign(self) -> str:
        """The sign convention and, when known, what the scores are relative to."""
        base = sign_description(self.metric)
        return f"{base}; {self.relative_to}" if self.relative_to else base

    def column(self, test_id: int) -> np.ndarray:
        """Scores [N] of every training example for ``test_id``."""
        try:
            return self.scores[:, self._test_col[int(test_id)]]
        except KeyError:
            raise InputError(f"unknown test id {test_id} (influence has {self.test_ids.size} test ids)") from None

    def top(self, test_id: int, k: int = 5, helpful: bool = True) -> list[tuple[int, float]]:
        """The ``k`` most helpful (largest positive scores) or most harmful (most negative scores)
        training examples for ``test_id``, as ``(train_id, score)``, strongest first.

        Only examples with a strictly positive (helpful) / negative (harmful) score are listed, so
        fewer than ``k`` may come back. Ties keep the order of ``train_ids``.
        """
        col = self.column(test_id)
        ok = np.isfinite(col) & ((col > 0) if helpful else (col < 0))
        idx = np.flatnonzero(ok)
        key = -col[idx] if helpful else col[idx]
        idx = idx[np.argsort(key, kind="stable")][: max(int(k), 0)]
        return [(int(self.train_ids[n]), float(col[n])) for n in idx]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN -> None); `from_dict` reads it back."""
        return {
            "kind": self.kind,
            "method": self.method,
            "metric": self.metric,
            "sign": self.sign,
            "relative_to": self.relative_to,
            "train_ids": self.train_ids.tolist(),
            "test_ids": self.test_ids.tolist(),
            "final_full": [_num(v) for v in self.final_full],
            "scores": [[_num(v) for v in row] for row in self.scores],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "influence") -> "Influence":
        for key in ("method", "metric", "train_ids", "test_ids", "final_full", "scores"):
            if key not in d:
                raise InputError(f"{source}: missing field {key!r}")

        def arr(v: Any) -> np.ndarray:
            return np.array(v, dtype=np.float64)  # None -> NaN

        return cls(scores=arr(d["scores"]).reshape(len(d["train_ids"]), len(d["test_ids"])),
                   train_ids=d["train_ids"], test_ids=d["test_ids"], metric=d["metric"],
                   method=d["method"], final_full=arr(d["final_full"]), kind=d.get("kind", "loo"),
                   relative_to=str(d.get("relative_to") or ""))


def _compact(curricula: np.ndarray) -> np.ndarray:
    """Move padding (-1) to the end of every batch row, keeping the order of the real ids."""
    order = np.argsort(curricula < 0, axis=-1, kind="stable")
    return np.take_along_axis(curricula, order, axis=-1)


def loo_influence(simulator: Any, curriculum: np.ndarray, test_ids: Sequence[int] | np.ndarray,
                  start: np.ndarray, train_ids: Sequence[int] | np.ndarray | None = None,
                  first_step: int = 0, chunk: int = 256) -> Influence:
    """Leave-one-out influence of training examples on the final simulated metric.

    ``curriculum`` [T, b] int (-1 = padding; row t-1 = batch of step t), ``test_ids`` [M],
    ``start`` [M] the metric at ``first_step`` (see the step convention in
    `gptfluence.simulators.base`). ``train_ids`` [N] defaults to every id occurring in the
    curriculum (sorted). For each id, every occurrence is removed (set to -1; padding is moved to
    the end of its batch row). The unmodified curriculum and the N variants are simulated in
    batches of ``chunk`` curricula, one ``simulator.simulate`` call per batch.

    Returns an `Influence` with ``scores [N, M]``; > 0 = helpful (see the module docstring).
    """
    cur = np.asarray(curriculum)
    if cur.ndim != 2:
        raise InputError(f"curriculum must be [steps, batch], got shape {cur.shape}")
    if cur.size and not np.issubdtype(cur.dtype, np.integer):
        if not np.all(np.equal(np.mod(cur, 1), 0)):
            raise InputError("curriculum must hold integer training ids")
    cur = cur.astype(np.int64)
    T = cur.shape[0]
    if not 0 <= first_step <= T:
        raise InputError(f"first_step must be in 0..{T}, got {first_step}")
    tids = np.asarray(test_ids, dtype=np.int64).reshape(-1)
    st = np.asarray(start, dtype=np.float64).reshape(-1)
    if st.shape != tids.shape:
        raise InputError(f"start has {st.size} values but there are {tids.size} test ids")
    if train_ids is None:
        ids = np.unique(cur[cur >= 0])
    else:
        ids = np.asarray(train_ids, dtype=np.int64).reshape(-1)
        if np.any(ids < 0):
            raise InputError(f"training ids must be >= 0, got {int(ids[ids < 0][0])}")
    chunk = max(int(chunk), 1)
    metric = str(getattr(simulator, "metric", "loss"))
    method = str(getattr(simulator, "method", type(simulator).__name__))

    # variant 0 is the full curriculum, variant n+1 removes ids[n]
    all_ids = np.concatenate([np.array([-2], dtype=np.int64), ids])  # -2 never matches
    finals = np.empty((all_ids.size, tids.size), dtype=np.float64)
    n_steps = T + 1 - first_step
    for lo in range(0, all_ids.size, chunk):
        sel = all_ids[lo:lo + chunk]
        variants = np.broadcast_to(cur, (sel.size, *cur.shape)).copy()
        variants[variants == sel[:, None, None]] = -1
        variants = _compact(variants)
        start_b = np.broadcast_to(st, (sel.size, tids.size)).copy()
        out = np.asarray(simulator.simulate(variants, tids, start_b, first_step=first_step))
        if out.shape != (sel.size, n_steps, tids.size):
            raise InputError(f"simulator {method!r} returned shape {out.shape}, expected "
                             f"({sel.size}, {n_steps}, {tids.size}) (see the Simulator step convention)")
        finals[lo:lo + sel.size] = out[:, -1, :]
    full = finals[0]
    without = finals[1:]
    scores = (without - full[None]) if metric in LOWER_IS_BETTER else (full[None] - without)
    return Influence(scores=scores, train_ids=ids, test_ids=tids, metric=metric, method=method,
                     final_full=full, kind="loo", relative_to=relative_description(simulator))


def run_loo_influence(simulator: Any, run: Any, test_ids: Sequence[int] | None = None,
                      train_ids: Sequence[int] | None = None, first_step: int | None = None,
                      chunk: int = 256, dynamics: Any = None) -> Influence:
    """`loo_influence` on the curriculum of a recorded `Run`, starting from its recorded values.

    ``first_step`` defaults to the run's first recorded step; the start values are the run's
    values of ``simulator.metric`` at that step (which must be recorded for every chosen test id).
    ``dynamics``: the store the run belongs to; the simulator is first prepared for the run's
    examples (`Simulator.prepare`: e.g. GPTfluence embeds training examples no fit run used).
    """
    metric = str(getattr(simulator, "metric", "loss"))
    steps = np.asarray(run.steps)
    if steps.size == 0:
        raise InputError(f"run {run.run_id!r} has no recorded steps")
    s = int(steps[0]) if first_step is None else int(first_step)
    where = np.flatnonzero(steps == s)
    if where.size == 0:
        raise InputError(f"run {run.run_id!r} did not record step {s}")
    row = run.trajectory(metric)[where[0]]
    col = {int(t): k for k, t in enumerate(np.asarray(run.test_ids).tolist())}
    tids = list(col) if test_ids is None else [int(t) for t in test_ids]
    missing = [t for t in tids if t not in col]
    if missing:
        raise InputError(f"run {run.run_id!r} has no test id {missing[0]}")
    start = np.asarray([row[col[t]] for t in tids], dtype=np.float64)
    if not np.all(np.isfinite(start)):
        bad = tids[int(np.flatnonzero(~np.isfinite(start))[0])]
        raise InputError(f"run {run.run_id!r}: {metric} of test id {bad} not recorded at step {s}")
    if dynamics is not None and hasattr(simulator, "prepare"):
        cur = np.asarray(run.curriculum)
        simulator.prepare(dynamics, np.unique(cur[cur >= 0]), tids)
    return loo_influence(simulator, run.curriculum, tids, start, train_ids=train_ids,
                         first_step=s, chunk=chunk)


def influence_report(influence: Influence, dynamics: Any, test_ids: Sequence[int] | None = None,
                     k: int = 5) -> dict[str, Any]:
    """A JSON-able summary: per test example its k most helpful and k most harmful training examples.

    Example texts come from ``dynamics.test_example`` / ``dynamics.train_example``. Shape::

        {"method", "metric", "kind", "sign" (convention + what scores are relative to), "relative_to",
         "test_examples": [{"test_id", "prompt", "target", "final_simulated",
                            "helpful": [{"train_id", "score", "prompt", "target"}, ...],
                            "harmful": [...]}]}
    """
    ids = influence.test_ids.tolist() if test_ids is None else [int(t) for t in test_ids]
    items = []
    for t in ids:
        ex = dynamics.test_example(t)
        col = influence._test_col.get(int(t))
        if col is None:
            raise InputError(f"test id {t} is not among the influence's test ids")
        entry: dict[str, Any] = {
            "test_id": int(t),
            "prompt": ex.prompt,
            "target": ex.target,
            "final_simulated": _num(influence.final_full[col]),
        }
        for name, helpful in (("helpful", True), ("harmful", False)):
            rows = []
            for tr, score in influence.top(t, k, helpful=helpful):
                tex = dynamics.train_example(tr)
                rows.append({"train_id": tr, "score": _num(score), "prompt": tex.prompt, "target": tex.target})
            entry[name] = rows
        items.append(entry)
    return {
        "method": influence.method,
        "metric": influence.metric,
        "kind": influence.kind,
        "sign": influence.sign,
        "relative_to": influence.relative_to,
        "test_examples": items,
    }
