"""The evaluation protocol: fit on some runs, roll out on held-out runs, score the trajectories.

Arrays: ``true`` and ``pred`` are ``[R, S, M]`` (held-out runs x recorded-grid steps x test
examples) in metric units; index 0 is the start value (the first recorded step: step 0 for
collected stores, step 1 for imported GPTDynamics), from which every rollout starts, so it is
excluded from the errors. NaN in ``true`` (a step not recorded) is skipped.

Metrics (pure functions, tested against hand-computed values):

* all-steps MSE / MAE: per trajectory (run, test example), the mean over steps 1..S-1 (every
  recorded step after the start) of the squared / absolute error; then mean and std (population,
  ddof = 0) over trajectories.
* final-step Spearman: per held-out run, Spearman correlation across test examples between the
  true and the simulated final values (the last recorded step of each trajectory); mean and std
  over runs.
* curriculum Spearman (LDS-style): per test example, Spearman across held-out runs between the
  true and the simulated final values; mean and std over test examples. A constant vector gives
  NaN for that run / test example, which is left out of the mean (NaN if all are).
* ``mse_by_step``: the mean squared error over trajectories at each grid step (error growth).

Divergence is never dropped: ``n_nonfinite`` counts the trajectories whose prediction is NaN or
infinite at a recorded step (index >= 1, where ``true`` is finite). When it is above 0, MSE and
MAE are infinite (their std NaN) and both Spearman correlations NaN, never numbers computed on
the surviving trajectories; tables show "diverged: k of N".
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import write_text_atomic
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError, MethodUnavailable

# ---------------------------------------------------------------------------------------------
# pure metric functions


def _check(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 3:
        raise InputError(f"true and predicted trajectories must both be [runs, steps, tests]; got {t.shape} and {p.shape}")
    return t, p


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std())


def trajectory_errors(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-trajectory (mse [R, M], mae [R, M]) over steps 1..S-1 where both values are finite;
    NaN for a trajectory with no such step."""
    t, p = _check(true, pred)
    d = p[:, 1:] - t[:, 1:]
    ok = np.isfinite(d)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = np.where(n > 0, np.where(ok, d * d, 0.0).sum(1) / n, np.nan)
        mae = np.where(n > 0, np.where(ok, np.abs(d), 0.0).sum(1) / n, np.nan)
    return mse, mae


def nonfinite_trajectories(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``[R, M]`` bool: the prediction is NaN or infinite at some recorded step (index >= 1 where
    ``true`` is finite)."""
    t, p = _check(true, pred)
    return (np.isfinite(t[:, 1:]) & ~np.isfinite(p[:, 1:])).any(1)


def all_steps_errors(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{"mse_mean", "mse_std", "mae_mean", "mae_std", "n_trajectories", "n_nonfinite"}`` (see
    module doc): with any diverged trajectory (``n_nonfinite`` > 0), the means are infinite and
    the stds NaN, not statistics of the survivors."""
    mse, mae = trajectory_errors(true, pred)
    bad = int(nonfinite_trajectories(true, pred).sum())
    if bad:
        inf, nan = float("inf"), float("nan")
        n = int(np.isfinite(np.asarray(true, dtype=np.float64)[:, 1:]).any(1).sum())
        return {"mse_mean": inf, "mse_std": nan, "mae_mean": inf, "mae_std": nan, "n_trajectories": n,
                "n_nonfinite": bad}
    n = int(np.isfinite(mse).sum())
    a, b = _mean_std(mse)
    c, d = _mean_std(mae)
    return {"mse_mean": a, "mse_std": b, "mae_mean": c, "mae_std": d, "n_trajectories": n, "n_nonfinite": 0}


def final_values(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true [R, M], pred [R, M]) at the last step (index >= 1) where ``true`` is recorded; NaN if none."""
    t, p = _check(true, pred)
    S = t.shape[1]
    ok = np.isfinite(t)
    ok[:, 0] = False
    last = np.where(ok.any(1), S - 1 - np.argmax(ok[:, ::-1], axis=1), -1)  # [R, M]
    idx = np.maximum(last, 0)[:, None, :]
    tf = np.take_along_axis(t, idx, 1)[:, 0]
    pf = np.take_along_axis(p, idx, 1)[:, 0]
    tf[last < 0] = np.nan
    pf[last < 0] = np.nan
    return tf, pf


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation (average ranks for ties) over pairs where both are finite; NaN with
    fewer than 2 pairs or if either side is constant."""
    from scipy.stats import rankdata

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if den == 0.0:
        return float("nan")
    return float((rx * ry).sum() / den)


def final_step_spearman(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean, std, per-run [R]) of the Spearman across test examples of the final values."""
    tf, pf = final_values(true, pred)
    per = np.array([spearman(tf[r], pf[r]) for r in range(tf.shape[0])])
    return (*_mean_std(per), per)


def curriculum_spearman(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean, std, per-test [M]) of the Spearman across runs of the final values (LDS-style)."""
    tf, pf = final_values(true, pred)
    per = np.array([spearman(tf[:, m], pf[:, m]) for m in range(tf.shape[1])])
    return (*_mean_std(per), per)


def mse_by_step(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[S]: mean over trajectories of the squared error at each grid step (skipping unrecorded
    ``true``); infinite at a step where a prediction of a recorded value is not finite."""
    t, p = _check(true, pred)
    with np.errstate(invalid="ignore", over="ignore"):
        d = (p - t) ** 2
    ok = np.isfinite(d)
    n = ok.sum((0, 2))
    diverged = (np.isfinite(t) & ~np.isfinite(p)).any((0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, np.where(ok, d, 0.0).sum((0, 2)) / np.maximum(n, 1), np.nan)
    return np.where(diverged, np.inf, out)


def score(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Every metric of one (method, task, metric) evaluation as a flat dict."""
    out: dict[str, Any] = dict(all_steps_errors(true, pred))
    a, b, _ = final_step_spearman(true, pred)
    c, d, _ = curriculum_spearman(true, pred)
    if out["n_nonfinite"]:  # not correlations of the surviving trajectories
        a = b = c = d = float("nan")
    out.update(spearman_final_mean=a, spearman_final_std=b, curriculum_spearman_mean=c, curriculum_spearman_std=d,
               mse_by_step=mse_by_step(true, pred).tolist())
    return out


def skipped_record(method: str, task: str, metric: str, reason: str, n_runs: int, n_tests: int) -> dict[str, Any]:
    """The result record of a method that cannot run on a store (``status: "skipped"``, ``reason``);
    every score NaN, so readers of the other records' fields keep working."""
    nan = float("nan")
    rec: dict[str, Any] = {"method": method, "task": task, "metric": metric, "status": "skipped", "reason": reason}
    rec.update({k: nan for k in ("mse_mean", "mse_std", "mae_mean", "mae_std", "spearman_final_mean",
                                 "spearman_final_std", "curriculum_spearman_mean", "curriculum_spearman_std")})
    rec.update(n_trajectories=0, n_nonfinite=0, mse_by_step=[], steps=[], n_runs=n_runs, n_test_examples=n_tests,
               fit_seconds=0.0, simulate_seconds=0.0, first_step=None, objective=None, epochs_run=None, best_epoch=None)
    return rec


# ---------------------------------------------------------------------------------------------
# the protocol


def _store_name(d: Dynamics) -> str:
    return d.task.name or (d.root.name if d.root else "task")


def evaluate(dynamics: Dynamics | Sequence[Dynamics], methods: Sequence[str] | None = None,
             metrics: Sequence[str] | None = None, split: dict[str, Sequence[str]] | None = None, seed: int = 0,
             configs: dict[str, dict[str, Any]] | None = None, encoder: Any = None, progress: bool = False,
             keep_trajectories: bool = True, n_val: int | None = None, n_test: int | None = None,
             save_simulators: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit every method on each store's fit runs (early-stopping on its validation runs), roll out
    on the held-out test runs from their first recorded step, and score.

    ``dynamics``: one store per task. ``split``: explicit ``{"fit", "val", "test"}`` run ids
    (used for every store), else `split_runs(run_ids, seed, n_val, n_test)` per store.
    ``configs``: per-method config overrides, e.g. ``{"gptfluence": {"epochs": 50}}``.
    ``encoder``: for gptfluence (default: resolved from its config's ``encoder`` spec).
    ``save_simulators``: if given, every fitted simulator is saved to
    ``save_simulators/<task>/<method>-<metric>`` (reload with `load_simulator`).
    Returns the JSON-ready dict described in `write_results` (NaN kept as float NaN here).
    """
    from gptfluence.analysis.splits import split_runs
    from gptfluence.config import to_dict
    from gptfluence.simulators import (EncoderPool, default_method_names, heldout_configs, make_simulator,
                                       method_config, method_spec)
    from gptfluence.outputs import slug
    from gptfluence.simulators.common import stack_curricula
    from gptfluence.simulators.engine import first_recorded_step

    stores = [dynamics] if isinstance(dynamics, Dynamics) else list(dynamics)
    if not stores:
        raise InputError("no dynamics stores to evaluate")
    methods = list(methods or default_method_names())
    for m in methods:
        method_spec(m)  # names the unknown method
    # held-out curricula may use training ids no fit run used; methods without parameters for
    # them (Simfluence) let them contribute nothing in the comparison (recorded in the config)
    configs = heldout_configs(methods, configs)
    for k in configs:
        if k not in methods:
            raise InputError(f"config given for method {k!r}, which is not evaluated")
    full_cfg: dict[str, Any] = {}
    for m in methods:
        cfg = method_config(m, configs.get(m) or None)
        if cfg is not None:
            full_cfg[m] = to_dict(cfg)

    encoders = EncoderPool(encoder)

    results: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    splits: dict[str, dict[str, list[str]]] = {}
    skipped: list[dict[str, str]] = []
    names: list[str] = []
    for store in stores:
        task = _store_name(store)
        if task in names:
            task = f"{task}-{len(names)}"
        names.append(task)
        if split is not None:
            sp = split_runs(store.run_ids, seed, fit=split.get("fit"), val=split.get("val"), test=split.get("test"))
        else:
            sp = split_runs(store.run_ids, seed, n_val=n_val, n_test=n_test)
        splits[task] = sp
        for metric in (metrics or store.metrics):
            if not all(metric in store.run(r).values for r in sp["fit"] + sp["val"] + sp["test"]):
                skipped.append({"task": task, "metric": metric,
                                "reason": f"not recorded in every run (the store records {', '.join(store.metrics) or 'nothing'})"})
                continue
            V, steps, tids = store.stack(metric, sp["test"])
            f0 = first_recorded_step(V, steps)
            true = V[:, f0:]
            cur = stack_curricula(store, sp["test"])
            for method in methods:
                sim = make_simulator(method, metric, encoder=encoders.for_method(method, full_cfg.get(method)),
                                     config=full_cfg.get(method))
                t0 = time.perf_counter()
                try:
                    hist = sim.fit(store, sp["fit"], sp["val"], progress=progress)
                except MethodUnavailable as e:  # e.g. gradient methods on a store without a model
                    results.append(skipped_record(method, task, metric, str(e), len(sp["test"]), int(tids.size)))
                    continue
                fit_s = time.perf_counter() - t0
                if save_simulators is not None:
                    sim.save(Path(save_simulators) / slug(task) / f"{method}-{slug(metric)}")
                t0 = time.perf_counter()
                sim.prepare(store, np.unique(cur[cur >= 0]), tids)
                pred = sim.simulate(cur, tids, true[:, 0], first_step=f0)
                sim_s = time.perf_counter() - t0
                rec: dict[str, Any] = {"method": method, "task": task, "metric": metric, "status": "ok"}
                rec.update(score(true, pred))
                rec.update(hist.get("record") or {})  # method-specific fields (e.g. scores: "loss-gradient")
                rec.update(n_runs=len(sp["test"]), n_test_examples=int(tids.size), fit_seconds=fit_s,
                           simulate_seconds=sim_s, steps=steps[f0:].tolist(), first_step=f0,
                           objective=hist.get("objective"), epochs_run=hist.get("epochs_run"),
                           best_epoch=hist.get("best_epoch"))
                results.append(rec)
                if keep_trajectories:
                    for r, rid in enumerate(sp["test"]):
                        trajectories.append({"method": method, "task": task, "metric": metric, "run_id": rid,
                                             "steps": steps[f0:].tolist(), "test_ids": tids.tolist(),
                                             "true": np.round(true[r].astype(np.float64), 6).tolist(),
                                             "predicted": np.round(pred[r].astype(np.float64), 6).tolist()})
    first = splits[names[0]]
    return {
        "config": {"methods": methods, "metrics": list(metrics) if metrics else None, "seed": seed,
                   "method_configs": full_cfg,
                   "encoders": {m: encoders.for_method(m, full_cfg.get(m)).spec()  # type: ignore[union-attr]
                                for m in methods if method_spec(m).takes_encoder},
                   "stores": [str(s.root) if s.root else _store_name(s) for s in stores], "tasks": names,
                   "skipped": skipped},
        "split": first,
        "splits": splits,
        "results": results,
        "trajectories": trajectories,
    }


# ---------------------------------------------------------------------------------------------
# writing


def _sanitize(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    if isinstance(o, np.generic):
        return _sanitize(o.item())
    if isinstance(o, np.ndarray):
        return _sanitize(o.tolist())
    return o


def _fmt(mean: Any, std: Any) -> str:
    def f(x: Any) -> str:
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return "n/a"
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"

    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    return f"{f(mean)} ± {f(std)}"


def format_markdown(result: dict[str, Any]) -> str:
    """One Markdown table of every (task, metric, method) record (mean ± std). The column
    "MSE ÷ mean curve" divides each all-steps MSE by the `mean_curve` reference's for the same
    task and metric (below 1: the method predicts more than the average trajectory; n/a without
    that reference). A learned method whose early stopping kept its initial weights (``best_epoch``
    0: no epoch beat the untrained simulator on the validation runs) is marked with a dagger."""
    ref = {(r["task"], r["metric"]): r["mse_mean"] for r in result["results"] if r["method"] == "mean_curve"}
    lines = ["| task | metric | method | MSE | MSE ÷ mean curve | MAE | final-step Spearman | "
             "curriculum Spearman (LDS-style) | runs | tests | fit s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    untrained = grad_scores = False
    for r in result["results"]:
        if r.get("status") == "skipped":
            reason = str(r.get("reason", "")).replace("|", "/")
            lines.append(f"| {r['task']} | {r['metric']} | {r['method']} | skipped: {reason} | n/a | n/a | n/a | n/a | "
                         f"{r.get('n_runs', '')} | {r.get('n_test_examples', '')} | n/a |")
            continue
        mark = " †" if r.get("best_epoch") == 0 else ""
        untrained = untrained or bool(mark)
        if r.get("scores") == "loss-gradient" and r["metric"] != "loss":
            mark += " ‡"
            grad_scores = True
        if r.get("n_nonfinite"):
            n = r.get("n_trajectories") or (r.get("n_runs", 0) * r.get("n_test_examples", 0))
            lines.append(f"| {r['task']} | {r['metric']} | {r['method']}{mark} | diverged: {r['n_nonfinite']} of {n} | "
                         f"n/a | n/a | n/a | n/a | {r['n_runs']} | {r['n_test_examples']} | {r['fit_seconds']:.1f} |")
            continue
        base = ref.get((r["task"], r["metric"]))
        ok = base is not None and r["mse_mean"] is not None and base > 0 and math.isfinite(base) \
            and math.isfinite(r["mse_mean"])
        ratio = f"{r['mse_mean'] / base:.3f}" if ok else "n/a"
        lines.append(f"| {r['task']} | {r['metric']} | {r['method']}{mark} | {_fmt(r['mse_mean'], r['mse_std'])} | "
                     f"{ratio} | {_fmt(r['mae_mean'], r['mae_std'])} | "
                     f"{_fmt(r['spearman_final_mean'], r['spearman_final_std'])} | "
                     f"{_fmt(r['curriculum_spearman_mean'], r['curriculum_spearman_std'])} | {r['n_runs']} | "
                     f"{r['n_test_examples']} | {r['fit_seconds']:.1f} |")
    if untrained:
        lines += ["", "† early stopping kept the initial (untrained) weights: no fitted epoch beat them on the validation runs."]
    if grad_scores:
        lines += ["", "‡ loss-gradient scores: this metric is simulated with the dot products of loss gradients and a "
                      "separately fitted scale (no gradient of the metric itself)."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: str | os.PathLike, markdown: str | os.PathLike | None = None) -> Path:
    """Write the evaluation JSON (NaN -> null) and optionally the Markdown table.

    Format: ``{"config": {...}, "split": {"fit", "val", "test"}, "splits": {task: split},
    "results": [{method, task, metric, status ("ok" | "skipped", with reason), mse_mean, mse_std,
    mae_mean, mae_std, spearman_final_mean, spearman_final_std, curriculum_spearman_mean,
    curriculum_spearman_std, n_runs, n_test_examples, n_trajectories, n_nonfinite (diverged
    trajectories; > 0: mse_mean / mae_mean null = infinite), fit_seconds, simulate_seconds,
    mse_by_step [S], steps [S], first_step, objective (the fitting objective that ran; null for
    unfitted methods), epochs_run, best_epoch, + method fields such as
    scores ("loss-gradient"), gradient_source, checkpoint_every, scale}], "trajectories": [{method, task, metric, run_id, steps,
    test_ids, true [S][M], predicted [S][M]}]}``.
    """
    clean = _sanitize(result)
    text = json.dumps(clean, allow_nan=False, ensure_ascii=False)  # compact: trajectories are large
    out = write_text_atomic(out, text + "\n")
    if markdown is not None:
        write_text_atomic(markdown, format_markdown(clean))
    return out
