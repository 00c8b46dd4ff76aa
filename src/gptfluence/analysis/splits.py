"""Splitting runs into fit / validation / held-out test runs.

The paper's shape is 25 fit / 2 validation / 5 test runs of 32. For R runs the default scales it:
``n_test = max(2, round(R * 5 / 32))``, ``n_val = max(1, round(R * 2 / 32))``, the rest fit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gptfluence.errors import InputError


def split_runs(run_ids: Sequence[str], seed: int = 0, n_val: int | None = None, n_test: int | None = None,
               fit: Sequence[str] | None = None, val: Sequence[str] | None = None,
               test: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{"fit": [...], "val": [...], "test": [...]}`` (each in the order of ``run_ids``).

    Random (seeded) by default; explicit ``fit``/``val``/``test`` lists are used as given (runs
    not named in any explicit list are distributed to the lists left unspecified: test first,
    then validation, the rest fit). Raises `InputError` for unknown or repeated run ids or if no
    run is left to fit.
    """
    ids = list(run_ids)
    if len(set(ids)) != len(ids):
        raise InputError("duplicate run ids")
    known = set(ids)
    given = {"fit": fit, "val": val, "test": test}
    used: set[str] = set()
    for name, lst in given.items():
        if lst is None:
            continue
        for r in lst:
            if r not in known:
                raise InputError(f"{name} run {r!r} is not in the store (has {len(ids)} runs)")
            if r in used:
                raise InputError(f"run {r!r} is named in two splits")
            used.add(r)
    if n_test is not None and n_test < 1:
        raise InputError(f"n_test must be >= 1 (got {n_test})")
    if n_val is not None and n_val < 0:
        raise InputError(f"n_val must be >= 0 (got {n_val})")
    R = len(ids)
    rest = [r for r in ids if r not in used]
    rng = np.random.default_rng(seed)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    out: dict[str, list[str]] = {}
    if test is None:
        k = n_test if n_test is not None else max(2, round(R * 5 / 32))
        out["test"], rest = rest[:k], rest[k:]
    else:
        out["test"] = list(test)
    if val is None:
        k = n_val if n_val is not None else max(1, round(R * 2 / 32))
        out["val"], rest = rest[:k], rest[k:]
    else:
        out["val"] = list(val)
    out["fit"] = list(fit) if fit is not None else rest
    if not out["fit"]:
        raise InputError(f"no runs left to fit ({R} runs: {len(out['val'])} validation, {len(out['test'])} test); "
                         f"collect more runs, lower --n-val / --n-test, or name the runs with --fit-runs / --val-runs / "
                         f"--test-runs")
    if not out["test"]:
        raise InputError("no held-out test runs")
    order = {r: i for i, r in enumerate(ids)}
    return {k: sorted(out[k], key=order.__getitem__) for k in ("fit", "val", "test")}


def fit_and_validation_runs(run_ids: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """``(fit_runs, val_runs)`` for fitting on a whole store when the test runs live elsewhere
    (held-out curricula: `gptfluence lds`, `evaluate-unseen`, `mislabeled`, `select`): the seeded
    `split_runs` with one test run, that run folded back into the fit runs (after them)."""
    sp = split_runs(run_ids, seed, n_test=1)
    return sp["fit"] + sp["test"], sp["val"]
