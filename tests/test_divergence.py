"""Diverged rollouts are visible: n_nonfinite in every record, no MSE / Spearman of survivors."""

from __future__ import annotations

import json
import math

import numpy as np

from gptfluence.analysis.evaluate import (all_steps_errors, evaluate, format_markdown, mse_by_step,
                                          nonfinite_trajectories, score, write_results)
from gptfluence.demo import terminal_table


def _case():
    # 2 runs x 3 steps x 2 tests; true[1, 2, 0] unrecorded
    true = np.array([[[1.0, 2.0], [0.9, 1.8], [0.8, 1.6]],
                     [[1.0, 2.0], [0.95, 1.9], [np.nan, 1.7]]])
    pred = true.copy()
    pred[1, 2, 0] = 0.5  # at an unrecorded cell: no error
    pred[0, 1, 1] += 0.1
    return true, np.nan_to_num(pred, nan=0.0)


def test_finite_case_by_hand():
    true, pred = _case()
    out = all_steps_errors(true, pred)
    # only trajectory (run 0, test 1) has an error: 0.1 at one of its 2 steps -> mse 0.005, mae 0.05
    assert out["n_nonfinite"] == 0 and out["n_trajectories"] == 4
    assert math.isclose(out["mse_mean"], 0.005 / 4) and math.isclose(out["mae_mean"], 0.05 / 4)
    assert score(true, pred)["n_nonfinite"] == 0


def test_nonfinite_prediction_makes_mse_infinite_and_spearman_nan():
    true, pred = _case()
    pred[1, 1, 1] = np.inf
    pred[0, 2, 0] = np.nan
    assert nonfinite_trajectories(true, pred).tolist() == [[True, False], [False, True]]
    out = score(true, pred)
    assert out["n_nonfinite"] == 2 and out["n_trajectories"] == 4
    assert out["mse_mean"] == math.inf and out["mae_mean"] == math.inf
    assert math.isnan(out["mse_std"]) and math.isnan(out["spearman_final_mean"])
    assert math.isnan(out["curriculum_spearman_mean"])
    by_step = mse_by_step(true, pred)
    assert by_step[0] == 0.0 and by_step[1] == math.inf and by_step[2] == math.inf
    # a non-finite value only where nothing was recorded is not a divergence
    true2, pred2 = _case()
    pred2[1, 2, 0] = np.nan
    assert score(true2, pred2)["n_nonfinite"] == 0


class _Diverging:
    """A simulator whose rollout blows up for the first test example."""

    method = "diverging"

    def __init__(self, metric="loss", *a, **k):
        self.metric = metric

    def fit(self, dynamics, fit_runs, val_runs=(), progress=False):
        return {}

    def prepare(self, *a, **k):
        pass

    def simulate(self, curricula, test_ids, start, first_step=0):
        S = curricula.shape[1] + 1 - first_step
        out = np.repeat(start[:, None, :], S, axis=1).astype(np.float64)
        out[:, 1:, 0] = np.inf
        return out


def test_evaluate_tables_and_json_show_divergence(tmp_path, monkeypatch):
    from gptfluence import simulators
    from gptfluence.simulators import MethodSpec
    from gptfluence.simulators.synthetic import synthetic_dynamics

    monkeypatch.setitem(simulators.METHODS, "diverging", MethodSpec("diverging", _Diverging))
    dyn, _ = synthetic_dynamics(n_runs=6, n_steps=5, n_train=20, n_test=4)
    res = evaluate(dyn, methods=["diverging", "mean_curve"], n_val=1, n_test=2)
    rec = {r["method"]: r for r in res["results"]}
    assert rec["diverging"]["n_nonfinite"] == 2 and rec["diverging"]["mse_mean"] == math.inf
    assert rec["mean_curve"]["n_nonfinite"] == 0 and np.isfinite(rec["mean_curve"]["mse_mean"])
    out = write_results(res, tmp_path / "ev.json", markdown=tmp_path / "ev.md")
    clean = json.loads(out.read_text())
    d = [r for r in clean["results"] if r["method"] == "diverging"][0]
    assert d["mse_mean"] is None and d["n_nonfinite"] == 2
    md = (tmp_path / "ev.md").read_text()
    assert "| diverging | diverged: 2 of 8 |" in md
    assert "diverged: 2 of 8" in terminal_table(clean)
