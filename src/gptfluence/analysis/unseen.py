"""Generalisation to unseen data: the paper's three cases, measured on real held-out runs.

Set-up (README, "Unseen data"): a fit store whose curricula draw only from a part of the training
pool (``gptfluence curricula --pool-fraction``), and a held-out store of the same examples and
settings whose curricula draw from that part (group ``seen_pool``) or from the whole pool (group
``whole_pool``, so they hold training examples no fit run used). A seeded fraction of the test
examples is hidden from fitting (``test_fraction``): every simulator is fitted on the fit store's
trajectories of the other test examples only.

Each held-out trajectory (run r, test example m) falls in one case:

* ``seen``: r holds only training examples the fit runs used, m was fitted (the reference);
* ``unseen_train``: r holds at least one training example no fit run used, m was fitted;
* ``unseen_test``: r holds only seen training examples, m was hidden from fitting;
* ``both``: unseen training examples in r and m hidden.

Records are those of `gptfluence.analysis.evaluate.score` (rollout from each run's recorded first
step, MSE/MAE over steps, final-step Spearman across test examples, curriculum Spearman across
runs) plus ``case``. A method that has no parameters for unseen examples (Simfluence: free
parameters per fitted (training, test) pair) gets ``status: "not_applicable"`` and no numbers in
the cases that need them, instead of numbers from parameters it does not have.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import GptfluenceError, InputError

CASES = ("seen", "unseen_train", "unseen_test", "both")


def restrict_tests(dynamics: Dynamics, run_ids: Sequence[str], test_ids: Sequence[int]) -> Dynamics:
    """An in-memory view of ``dynamics`` holding ``run_ids`` with only the columns of ``test_ids``
    (same examples, manifest and root, so replays and gradient features still find the store)."""
    keep = np.asarray(test_ids, dtype=np.int64)
    runs = []
    for rid in run_ids:
        r = dynamics.run(rid)
        col = {int(t): k for k, t in enumerate(r.test_ids.tolist())}
        missing = [int(t) for t in keep if int(t) not in col]
        if missing:
            raise InputError(f"run {rid!r} has no test id {missing[0]}")
        idx = np.asarray([col[int(t)] for t in keep], dtype=np.int64)
        runs.append(dataclasses.replace(r, test_ids=keep.copy(), values={k: v[:, idx] for k, v in r.values.items()}))
    return Dynamics(dynamics.task, runs=runs, manifest=dynamics.manifest, root=dynamics.root)


def hidden_test_ids(test_ids: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """The seeded ``round(fraction * M)`` test ids hidden from fitting (sorted; at least 1, and at
    least one test id is left to fit on)."""
    ids = np.sort(np.asarray(test_ids, dtype=np.int64))
    if not 0.0 < float(fraction) < 1.0:
        raise InputError(f"--test-fraction must be in (0, 1), got {fraction}")
    k = min(ids.size - 1, max(1, int(round(float(fraction) * ids.size))))
    if k < 1:
        raise InputError("need at least 2 test examples to hide some from fitting")
    rng = np.random.default_rng([int(seed), 0x7E57])
    return np.sort(rng.choice(ids, size=k, replace=False))


def case_of(holds_unseen_train: bool, hidden_test: bool) -> str:
    """The case name of a (run, test example) pair; see the module doc."""
    return {(False, False): "seen", (True, False): "unseen_train", (False, True): "unseen_test",
            (True, True): "both"}[(bool(holds_unseen_train), bool(hidden_test))]


def measure_unseen(fit: Dynamics, heldout: Dynamics, methods: Sequence[str] | None = None,
                   metrics: Sequence[str] | None = None, test_fraction: float = 0.3, seed: int = 0,
                   configs: dict[str, dict[str, Any]] | None = None, progress: bool = False,
                   log: Any = None) -> dict[str, Any]:
    """Fit every method on ``fit`` (test examples outside `hidden_test_ids` only; validation runs
    from `fit_and_validation_runs(fit.run_ids, seed)`), roll out every held-out run from its recorded first
    step on every test example, and score each case of the module doc separately.

    Returns ``{"config", "seen_train_ids", "hidden_test_ids", "cases": {case: {"n_runs", "n_tests"}},
    "results": [record...]}``; each record is an evaluate record plus ``case`` (``status`` "ok",
    "skipped" with ``reason``, or "not_applicable" with ``reason``).
    """
    from gptfluence.analysis.evaluate import score, skipped_record
    from gptfluence.analysis.lds import check_same_collection
    from gptfluence.analysis.splits import fit_and_validation_runs
    from gptfluence.config import to_dict
    from gptfluence.simulators import EncoderPool, heldout_configs, make_simulator, method_config, method_spec
    from gptfluence.simulators.common import stack_curricula
    from gptfluence.simulators.engine import first_recorded_step

    check_same_collection(fit, heldout)
    say = log or (lambda s: None)
    methods = list(methods or ["gptfluence", "simfluence", "mean_curve", "constant"])
    for m in methods:
        method_spec(m)
    configs = heldout_configs(methods, configs)  # held-out curricula may hold ids no fit run used
    full_cfg = {m: to_dict(c) for m in methods if (c := method_config(m, configs.get(m) or None)) is not None}
    task = heldout.task.name or (heldout.root.name if heldout.root else "task")
    if not heldout.run_ids:
        raise InputError(f"{heldout.root or 'held-out store'}: no runs")
    fit_runs, val_runs = fit_and_validation_runs(fit.run_ids, seed)
    seen_train = np.unique(np.concatenate([fit.run(r).curriculum.ravel() for r in fit_runs + val_runs]))
    seen_train = seen_train[seen_train >= 0]
    all_tids = np.asarray(fit.run(fit.run_ids[0]).test_ids)
    hidden = hidden_test_ids(all_tids, test_fraction, seed)
    shown = np.setdiff1d(all_tids, hidden)
    view = restrict_tests(fit, fit_runs + val_runs, shown)
    hid_ids = list(heldout.run_ids)
    cur = stack_curricula(heldout, hid_ids)
    holds = np.asarray([np.setdiff1d(c[c >= 0], seen_train).size > 0 for c in cur])
    encoders = EncoderPool()
    want = list(metrics or [m for m in heldout.metrics if m in fit.metrics])
    results: list[dict[str, Any]] = []
    cases: dict[str, dict[str, int]] = {}
    for metric in want:
        if metric not in fit.metrics or metric not in heldout.metrics:
            raise InputError(f"metric {metric!r} is not recorded in both stores")
        V, steps, tids = heldout.stack(metric, hid_ids)
        f0 = first_recorded_step(V, steps)
        true = V[:, f0:]
        is_hidden = np.isin(tids, hidden)
        sel = {case_of(u, h): (np.flatnonzero(holds == u), np.flatnonzero(is_hidden == h))
               for u in (False, True) for h in (False, True)}
        cases = {c: {"n_runs": int(r.size), "n_tests": int(m.size)} for c, (r, m) in sel.items()}
        for method in methods:
            spec = method_spec(method)
            say(f"{task} / {metric}: fitting {method} on {len(fit_runs)} runs, {shown.size} of {all_tids.size} tests")
            sim = make_simulator(method, metric, encoder=encoders.for_method(method, full_cfg.get(method)),
                                 config=full_cfg.get(method))
            t0 = time.perf_counter()
            try:
                hist = sim.fit(view, fit_runs, val_runs, progress=progress)
                fit_s = time.perf_counter() - t0
                sim.prepare(heldout, np.unique(cur[cur >= 0]), tids)
                pred = np.asarray(sim.simulate(cur, tids, true[:, 0], first_step=f0))
            except GptfluenceError as e:
                for c, (r, m) in sel.items():
                    rec = skipped_record(method, task, metric, str(e), int(r.size), int(m.size))
                    rec["case"] = c
                    results.append(rec)
                continue
            generalises = not getattr(spec.cls, "per_pair_parameters", False)
            for c in CASES:
                r, m = sel[c]
                if r.size == 0 or m.size == 0:
                    continue
                if c != "seen" and not generalises:
                    what = {"unseen_train": "training examples no fit run used",
                            "unseen_test": "test examples it was not fitted on",
                            "both": "unseen training and test examples"}[c]
                    rec = skipped_record(method, task, metric, f"{method} has free parameters only for the (training, "
                                         f"test) pairs it was fitted on: no prediction for {what}", int(r.size), int(m.size))
                    rec["status"] = "not_applicable"
                else:
                    rec = {"method": method, "task": task, "metric": metric, "status": "ok"}
                    rec.update(score(true[r][:, :, m], pred[r][:, :, m]))
                    rec.update(n_runs=int(r.size), n_test_examples=int(m.size), fit_seconds=fit_s,
                               steps=steps[f0:].tolist(), first_step=f0, epochs_run=hist.get("epochs_run"))
                rec["case"] = c
                results.append(rec)
    return {"config": {"methods": methods, "metrics": want, "seed": seed, "test_fraction": test_fraction,
                       "method_configs": full_cfg, "fit_store": str(fit.root) if fit.root else None,
                       "heldout_store": str(heldout.root) if heldout.root else None,
                       "fit_runs": fit_runs, "val_runs": val_runs,
                       "definition": "cases per (held-out run, test example): unseen_train = the run holds a "
                                     "training example no fit run used; unseen_test = the test example was hidden "
                                     "from fitting; both; seen = neither. Scores as in evaluate (rollout from the "
                                     "run's first recorded step)."},
            "seen_train_ids": seen_train.tolist(), "hidden_test_ids": hidden.tolist(), "cases": cases,
            "results": results}


def format_unseen_markdown(result: dict[str, Any]) -> str:
    """One Markdown table: a row per (task, metric, method), per case ``MSE (final Spearman)``."""
    import math

    table: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in result["results"]:
        table.setdefault((r["task"], r["metric"], r["method"]), {})[r["case"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        if r.get("status") == "not_applicable":
            return "n/a (no parameters)"
        if r.get("status") != "ok":
            return "skipped"
        mse, sp = r.get("mse_mean"), r.get("spearman_final_mean")
        f = (lambda x: "nan" if x is None or not math.isfinite(x) else f"{x:.4g}")
        return f"{f(mse)} ({f(sp)})"

    lines = ["| task | metric | method | " + " | ".join(CASES) + " |", "|" + " --- |" * (3 + len(CASES))]
    for (task, metric, method), by in table.items():
        lines.append(f"| {task} | {metric} | {method} | " + " | ".join(cell(by.get(c)) for c in CASES) + " |")
    sizes = ", ".join(f"{c}: {v['n_runs']} runs x {v['n_tests']} tests" for c, v in result.get("cases", {}).items())
    lines += ["", "Cell: trajectory MSE over steps (final-step Spearman across test examples). " + sizes + "."]
    return "\n".join(lines) + "\n"
