"""Trivial reference simulators, always reported next to the learned ones.

* `ConstantSimulator` ("constant"): every step equals the start value. It ignores the curriculum.
* `MeanCurveSimulator` ("mean_curve"): start + the mean change from the start at each step,
  learned from the fit runs. Per test example where that test id was recorded in the fit runs
  (mean over fit runs of phi_k - phi_start, NaN-skipping); for unseen test ids the global mean
  change (averaged over runs and test examples). It ignores *which* examples are in the
  curriculum, so it is the bar a simulator must clear to show it has learned anything about
  training data. Steps are counted from the fit runs' first recorded step f0; a rollout from
  first_step s uses the change between f0-relative steps s and s+k; steps beyond the fit
  horizon repeat the last mean change; steps never recorded are filled from the nearest
  earlier (else later) recorded step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError
from gptfluence.simulators import engine
from gptfluence.simulators.common import SimulatorBase, check_inputs, write_artifact


class ConstantSimulator(SimulatorBase):
    method = "constant"

    def __init__(self, metric: str = "loss", **_: Any) -> None:
        super().__init__(metric)

    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str] = (), val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        self._remember_dynamics(dynamics)
        self.history = {"seconds": 0.0}
        return self.history

    def simulate(self, curricula: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                 first_step: int = 0) -> np.ndarray:
        """[R, T+1-first_step, M]: ``start`` repeated (metric units)."""
        cur, tid, st = check_inputs(curricula, test_ids, start, first_step)
        S = cur.shape[1] + 1 - first_step
        return np.repeat(st[:, None, :], S, axis=1).astype(np.float32)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return write_artifact(path, self._meta(), {}, overwrite=overwrite)

    @classmethod
    def _from_artifact(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray], **_: Any) -> "ConstantSimulator":
        sim = cls(meta["metric"])
        sim._load_meta(meta)
        return sim


def _fill_steps(x: np.ndarray) -> np.ndarray:
    """Fill NaN along axis 0 of ``x [S, ...]`` from the nearest earlier, else later, finite value."""
    x = x.copy()
    S = x.shape[0]
    ok = np.isfinite(x)
    idx = np.where(ok, np.arange(S).reshape((S,) + (1,) * (x.ndim - 1)), -1)
    idx = np.maximum.accumulate(idx, axis=0)  # last finite index at or before each step
    first = np.argmax(ok, axis=0)
    idx = np.where(idx < 0, first, idx)
    return np.take_along_axis(x, idx, axis=0)


class MeanCurveSimulator(SimulatorBase):
    method = "mean_curve"

    def __init__(self, metric: str = "loss", **_: Any) -> None:
        super().__init__(metric)
        self.delta: np.ndarray | None = None  # [S, M] mean change from f0, per known test id
        self.global_delta: np.ndarray | None = None  # [S]
        self.test_ids = np.zeros(0, np.int64)
        self.fit_first_step = 0

    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str], val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        if not list(fit_runs):
            raise InputError("mean_curve: no fit runs given")
        self._remember_dynamics(dynamics)
        V, steps, tids = dynamics.stack(self.metric, list(fit_runs))
        f0 = engine.first_recorded_step(V, steps)
        V = V[:, f0:].astype(np.float64)
        D = V - V[:, :1]  # change from the start, [R, S, M]
        with np.errstate(invalid="ignore"), _quiet():
            per = np.nanmean(D, axis=0)  # [S, M]
            glob = np.nanmean(D, axis=(0, 2))  # [S]
        glob = _fill_steps(glob)
        glob = np.where(np.isfinite(glob), glob, 0.0)
        per = _fill_steps(per)
        per = np.where(np.isfinite(per), per, glob[:, None])
        per[0] = 0.0
        glob[0] = 0.0
        order = np.argsort(tids)
        self.test_ids, self.delta, self.global_delta = tids[order], per[:, order], glob
        self.fit_first_step = f0
        self.history = {"seconds": time.perf_counter() - t0, "fit_first_step": f0}
        return self.history

    def _curve(self, steps: np.ndarray, tid: np.ndarray) -> np.ndarray:
        """Mean change at absolute ``steps [S]`` for test ids ``tid [M]`` -> [S, M]."""
        assert self.delta is not None and self.global_delta is not None
        k = np.clip(steps - self.fit_first_step, 0, self.delta.shape[0] - 1)
        pos = np.minimum(np.searchsorted(self.test_ids, tid), max(self.test_ids.size - 1, 0))
        known = (self.test_ids[pos] == tid) if self.test_ids.size else np.zeros(tid.shape, bool)
        out = np.where(known[None, :], self.delta[k][:, pos], self.global_delta[k][:, None])
        return out

    def simulate(self, curricula: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                 first_step: int = 0) -> np.ndarray:
        """[R, T+1-first_step, M]: start + (mean change at step s+k - mean change at step s)."""
        if self.delta is None:
            raise InputError("mean_curve simulator is not fitted")
        cur, tid, st = check_inputs(curricula, test_ids, start, first_step)
        steps = np.arange(first_step, cur.shape[1] + 1)
        c = self._curve(steps, tid)
        c = c - c[:1]
        return (st[:, None, :] + c[None]).astype(np.float32)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        if self.delta is None:
            raise InputError("mean_curve simulator is not fitted; nothing to save")
        meta = self._meta()
        meta["fit_first_step"] = self.fit_first_step
        return write_artifact(path, meta, {"delta": self.delta, "global_delta": self.global_delta,
                                           "test_ids": self.test_ids}, overwrite=overwrite)

    @classmethod
    def _from_artifact(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray], **_: Any) -> "MeanCurveSimulator":
        sim = cls(meta["metric"])
        sim._load_meta(meta)
        sim.delta = tensors["delta"].astype(np.float64)
        sim.global_delta = tensors["global_delta"].astype(np.float64)
        sim.test_ids = tensors["test_ids"].astype(np.int64)
        sim.fit_first_step = int(meta.get("fit_first_step", 0))
        return sim


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a: Any) -> None:
        self._w.__exit__(*a)
