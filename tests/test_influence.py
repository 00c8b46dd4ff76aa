"""Leave-one-out influence through the Simulator protocol, on simulators with hand-computable answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptfluence.analysis.influence import (LOWER_IS_BETTER, Influence, influence_report, loo_influence,
                                           run_loo_influence, sign_description)
from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.errors import InputError
from gptfluence.types import Example, Task


class AdditiveSim:
    """phi_t = phi_{t-1} + sum_{i in c_t} w[i, m]: removing id i changes the final value by
    exactly -(occurrences of i after first_step) * w[i, m]."""

    method = "additive"

    def __init__(self, w: dict[int, list[float]], test_ids, metric: str = "loss") -> None:
        self.metric = metric
        self.w = {int(k): np.asarray(v, dtype=np.float64) for k, v in w.items()}
        self.test_ids = list(test_ids)
        self.calls: list[np.ndarray] = []

    def fit(self, dynamics, fit_runs, val_runs=(), progress=False):
        return {}

    def save(self, path):  # pragma: no cover - not needed
        raise NotImplementedError

    def simulate(self, curricula, test_ids, start, first_step=0):
        curricula = np.asarray(curricula)
        self.calls.append(curricula.copy())
        R, T, _ = curricula.shape
        cols = [self.test_ids.index(int(t)) for t in test_ids]
        out = np.empty((R, T + 1 - first_step, len(cols)))
        out[:, 0] = start
        for r in range(R):
            for k in range(1, T + 1 - first_step):
                step = first_step + k
                inc = sum((self.w[int(i)][cols] for i in curricula[r, step - 1] if i >= 0), np.zeros(len(cols)))
                out[r, k] = out[r, k - 1] + inc
        return out


CUR = np.array([[0, 1, 2],
                [3, 0, -1],
                [1, 4, 0],
                [2, -1, -1]])
W = {0: [-0.5, 0.1], 1: [0.2, -0.3], 2: [0.0, 0.0], 3: [1.0, 2.0], 4: [-0.25, 0.5]}
TEST_IDS = [7, 9]


def expected_delta(cur, first_step=0):
    """Change of the final value caused by each id: occurrences after first_step x w."""
    counts = {i: int(np.sum(cur[first_step:] == i)) for i in W}
    return {i: counts[i] * np.asarray(W[i]) for i in W}


@pytest.mark.parametrize("metric", ["loss", "bleu", "rougeL", "accuracy"])
def test_loo_scores_exact_and_signed(metric):
    sim = AdditiveSim(W, TEST_IDS, metric=metric)
    start = np.array([2.0, 3.0])
    inf = loo_influence(sim, CUR, TEST_IDS, start)
    assert inf.train_ids.tolist() == [0, 1, 2, 3, 4]  # default: every id in the curriculum, no padding
    assert inf.test_ids.tolist() == TEST_IDS
    assert inf.metric == metric and inf.method == "additive" and inf.kind == "loo"
    delta = expected_delta(CUR)
    full = start + sum(delta.values())
    np.testing.assert_allclose(inf.final_full, full)
    for n, i in enumerate(inf.train_ids):
        # final(without i) = full - delta_i
        if metric in LOWER_IS_BETTER:
            want = (full - delta[int(i)]) - full      # = -delta: lowering the loss is helpful
        else:
            want = full - (full - delta[int(i)])      # = +delta: raising BLEU is helpful
        np.testing.assert_allclose(inf.scores[n], want, atol=1e-12)
    # id 0 lowers the loss of test 7 (w=-0.5, used 3 times): helpful for loss, harmful for bleu
    s = inf.scores[0, 0]
    assert (s > 0) if metric == "loss" else (s < 0)
    assert s == pytest.approx(1.5 if metric == "loss" else -1.5)
    assert "positive = helpful" in inf.sign and metric in inf.sign
    assert inf.sign == f"{sign_description(metric)}; {inf.relative_to}" and inf.relative_to


def test_relative_description_follows_detrending():
    from types import SimpleNamespace

    from gptfluence.analysis.influence import relative_description

    assert "more than an average example" in relative_description(SimpleNamespace(config=SimpleNamespace(detrend=True)))
    assert "not training on it" in relative_description(SimpleNamespace(config=SimpleNamespace(detrend=False)))
    sim = AdditiveSim(W, TEST_IDS)
    sim.config = SimpleNamespace(detrend=True)
    inf = loo_influence(sim, CUR, TEST_IDS, np.zeros(2))
    assert "average training example" in inf.sign and Influence.from_dict(inf.to_dict()).relative_to == inf.relative_to


@pytest.mark.parametrize("chunk, calls", [(256, 1), (6, 1), (5, 2), (4, 2), (2, 3), (1, 6)])
def test_batched_one_simulate_call_per_chunk(chunk, calls):
    sim = AdditiveSim(W, TEST_IDS)
    inf = loo_influence(sim, CUR, TEST_IDS, np.zeros(2), chunk=chunk)
    assert len(sim.calls) == calls                          # 5 variants + the full curriculum
    assert sum(c.shape[0] for c in sim.calls) == 6
    assert all(c.shape[0] <= chunk and c.shape[1:] == CUR.shape for c in sim.calls)
    ref = loo_influence(AdditiveSim(W, TEST_IDS), CUR, TEST_IDS, np.zeros(2), chunk=256)
    np.testing.assert_allclose(inf.scores, ref.scores)
    # the variants: first the unmodified curriculum, then id 0 removed everywhere, padding moved last
    allc = np.concatenate(sim.calls)
    np.testing.assert_array_equal(allc[0], CUR)
    np.testing.assert_array_equal(allc[1], [[1, 2, -1], [3, -1, -1], [1, 4, -1], [2, -1, -1]])
    for n, i in enumerate(inf.train_ids):
        v = allc[n + 1]
        assert not np.any(v == i)
        assert sorted(v[v >= 0].tolist()) == sorted(CUR[(CUR >= 0) & (CUR != i)].tolist())


def test_explicit_train_ids_first_step_and_unused_ids():
    sim = AdditiveSim({**W, 99: [5.0, 5.0]}, TEST_IDS)
    inf = loo_influence(sim, CUR, TEST_IDS, np.array([1.0, 1.0]), train_ids=[3, 0, 99], first_step=2)
    delta = expected_delta(CUR, first_step=2)  # steps 3..4 only: rows 2 and 3
    assert inf.train_ids.tolist() == [3, 0, 99]
    np.testing.assert_allclose(inf.scores[0], -delta[3])   # id 3 only at step 2: no effect
    np.testing.assert_allclose(inf.scores[0], [0.0, 0.0])
    np.testing.assert_allclose(inf.scores[1], -delta[0])
    np.testing.assert_allclose(inf.scores[2], [0.0, 0.0])  # not in the curriculum
    assert sim.calls[0].shape == (4, 4, 3)


def test_top_helpful_harmful():
    inf = Influence(scores=np.array([[0.5, -1.0], [-0.2, 0.0], [2.0, np.nan], [0.0, 3.0]]),
                    train_ids=[10, 11, 12, 13], test_ids=[1, 2], metric="loss", method="x",
                    final_full=[0.1, 0.2])
    assert inf.top(1, k=5) == [(12, 2.0), (10, 0.5)]
    assert inf.top(1, k=1) == [(12, 2.0)]
    assert inf.top(1, k=5, helpful=False) == [(11, -0.2)]
    assert inf.top(2, k=5) == [(13, 3.0)]                  # NaN and 0 are neither
    assert inf.top(2, k=5, helpful=False) == [(10, -1.0)]
    with pytest.raises(InputError, match="unknown test id 3"):
        inf.top(3)


def test_to_dict_round_trip_is_strict_json():
    inf = Influence(scores=np.array([[0.5, np.nan]]), train_ids=[4], test_ids=[1, 2], metric="bleu",
                    method="x", final_full=[30.0, np.inf])
    d = inf.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = Influence.from_dict(json.loads(text))
    assert back.metric == "bleu" and back.train_ids.tolist() == [4]
    np.testing.assert_array_equal(back.scores, inf.scores)
    assert np.isnan(back.final_full[1])


def _dynamics():
    train = [Example(i, f"train prompt {i} <b>", f" t{i}") for i in range(5)]
    test = [Example(7, "test seven", " yes"), Example(9, "test nine", " no")]
    return Dynamics(Task("toy", train, test, kind="classification", labels=(" yes", " no")))


def test_influence_report_and_run_helper():
    dyn = _dynamics()
    steps = np.arange(0, 5)
    vals = np.linspace(1, 2, 10, dtype=np.float32).reshape(5, 2)
    run = Run("run-0000", CUR, steps, TEST_IDS, {"loss": vals})
    dyn.add_run(run)
    sim = AdditiveSim(W, TEST_IDS)
    inf = run_loo_influence(sim, run)
    direct = loo_influence(AdditiveSim(W, TEST_IDS), CUR, TEST_IDS, vals[0])
    np.testing.assert_allclose(inf.scores, direct.scores)
    np.testing.assert_allclose(inf.final_full, direct.final_full)

    rep = influence_report(inf, dyn, k=2)
    json.dumps(rep, allow_nan=False)
    assert rep["method"] == "additive" and rep["metric"] == "loss" and "positive = helpful" in rep["sign"]
    assert [t["test_id"] for t in rep["test_examples"]] == TEST_IDS
    t7 = rep["test_examples"][0]
    assert t7["prompt"] == "test seven" and t7["target"] == " yes"
    assert t7["final_simulated"] == pytest.approx(float(direct.final_full[0]))
    # test 7, loss scores = -delta: id0 +1.5, id4 +0.25, id1 -0.4, id3 -1.0, id2 0
    assert [(h["train_id"], round(h["score"], 6)) for h in t7["helpful"]] == [(0, 1.5), (4, 0.25)]
    assert [(h["train_id"], round(h["score"], 6)) for h in t7["harmful"]] == [(3, -1.0), (1, -0.4)]
    assert t7["helpful"][0]["prompt"] == "train prompt 0 <b>" and t7["helpful"][0]["target"] == " t0"
    only9 = influence_report(inf, dyn, test_ids=[9], k=1)
    assert len(only9["test_examples"]) == 1 and len(only9["test_examples"][0]["helpful"]) == 1


def test_errors():
    sim = AdditiveSim(W, TEST_IDS)
    with pytest.raises(InputError, match="start has 1 values"):
        loo_influence(sim, CUR, TEST_IDS, np.zeros(1))
    with pytest.raises(InputError, match="curriculum must be"):
        loo_influence(sim, CUR[0], TEST_IDS, np.zeros(2))

    class Wrong(AdditiveSim):
        def simulate(self, curricula, test_ids, start, first_step=0):
            return super().simulate(curricula, test_ids, start, first_step)[:, 1:]

    with pytest.raises(InputError, match="returned shape"):
        loo_influence(Wrong(W, TEST_IDS), CUR, TEST_IDS, np.zeros(2))
