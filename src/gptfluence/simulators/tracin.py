"""TracIn-CP and Grad-Dot as trajectory simulators (the paper's gradient baselines).

Recurrence, per test example m, after optimizer step t (first-order Taylor expansion of one SGD
step on the batch c_t)::

    phi_t[m] = phi_{t-1}[m] - s * eta_t * sum_{i in c_t} D[ckpt(t)][i, m]
    D[c][i, m] = <g_i(theta_c), g_m(theta_c)>

``g_i``: gradient of training example i's mean target-token loss (as the training step sees it:
target + eos); ``g_m``: gradient of test example m's recorded loss metric (target tokens only);
both at the weights ``theta_c`` after step c (`gptfluence.features.per_example`; exact dot
products by default). ``eta_t``: the learning rate of step t (the store run's recorded lr for a
curriculum of the store, else the store's schedule for that many steps). ``s``: one scale, fitted
by least squares on the fit runs (the rollout ``pred_t = start - s * C_t`` is linear in s, so s
minimises the rollout MSE over every recorded (run, step, test example) exactly). It absorbs
what the first-order SGD picture leaves out (AdamW's per-parameter scaling, clipping, the batch
mean: the loss of a batch is the token-weighted mean of its examples').

Checkpoints: the update of step t is computed at theta_{t-1}, so step t uses the last checkpoint
at or before t-1: ``ckpt(t) = k * floor((t - 1) / k)`` with ``k = checkpoint_every`` (k = 1: the
exact weights before every step, the paper's "all steps"; k = 10: its "10 steps"). Grad-Dot
(``checkpoint_every = 0``): one checkpoint, the base model, ``ckpt(t) = 0``.

Gradient sources (``gradient_source``):

* ``reference``: the checkpoints of one store run (``reference_run``, default the first fit run),
  re-trained with the store's settings (`gptfluence.dynamics.collect.replay_run`); D is computed
  once for the whole training pool x test set at every checkpoint, so any curriculum is then
  simulated without training (what a user simulating a new curriculum has). Steps beyond the
  reference run's last checkpoint use that checkpoint.
* ``own``: every simulated curriculum is re-trained (seed: the store run with the identical
  curriculum, else the collection's ``run_seed``) and its own checkpoints are used (the paper's
  protocol; one fine-tuning replay plus gradients per curriculum). The scale is fitted on the
  first ``own_fit_runs`` fit runs, each with its own checkpoints.

Other metrics than loss (BLEU, ROUGE-L, accuracy): the same loss-gradient scores with a
separately fitted scale of free sign (results say ``scores: "loss-gradient"``).

A store without a model (imported GPTDynamics) has no gradients: `fit` raises `MethodUnavailable`.

Cost (default 2-layer base model, 231k parameters, 200-example pool, 100 test examples, 48
steps, one CPU thread; CPU seconds from ``benchmarks/tracin_cost.py`` ->
``benchmarks/results/tracin_cost.json``): the reference source with k = 1 takes 45 s (0.9 s per
checkpoint: one replayed step, 300 per-example gradients, 20,000 dot products), k = 10 5 s,
Grad-Dot 1 s; computed once per store and reference run and cached on disk (``dots_cache``),
so every metric and later simulation reuses them. ``own`` re-trains each curriculum: 14 s per
curriculum at k = 1 (only each step's batch and the test set), i.e. a held-out evaluation with 2
scale-fit runs and 5 test runs costs ~100 s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import arg
from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.errors import InputError, MethodUnavailable
from gptfluence.simulators.common import SimulatorBase, check_inputs, write_artifact

SOURCES = ("reference", "own")


@dataclasses.dataclass
class TracInConfig:
    """Settings of the gradient baselines (TracIn-CP, Grad-Dot)."""

    checkpoint_every: int = arg(1, "k: step t uses the gradients at the checkpoint ckpt(t) = k * floor((t-1)/k) (k = 1: before every step); 0 = one checkpoint, the base model (Grad-Dot)")
    gradient_source: str = arg("reference", "reference: checkpoints of one replayed store run for every curriculum; own: re-train each simulated curriculum and use its own checkpoints (the paper's protocol, one replay per curriculum)")
    reference_run: str = arg("", "gradient_source reference: the store run whose replay gives the checkpoints ('' = the first fit run)")
    own_fit_runs: int = arg(2, "gradient_source own: how many fit runs (the first ones) are replayed to fit the scale (0 = all)")
    project_dim: int = arg(0, "0 = exact gradient dot products; > 0 = dot products of CountSketch-projected gradients of this dim (large models)")
    seed: int = arg(0, "seed of the gradient projection (project_dim > 0)")
    grad_chunk: int = arg(32, "examples per vmap call of per-example gradients")
    device: str = arg("cpu", "torch device of the replays and gradients: cpu, cuda[:k] or auto")
    dots_cache: bool = arg(True, "cache the checkpoint dot products on disk (GPTFLUENCE_CACHE/gradient-dots), keyed by the store's run, settings and examples")

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise InputError(f"checkpoint_every must be >= 0 (got {self.checkpoint_every})")
        if self.gradient_source not in SOURCES:
            raise InputError(f"gradient_source must be one of {', '.join(SOURCES)} (got {self.gradient_source!r})")
        if self.own_fit_runs < 0 or self.project_dim < 0 or self.grad_chunk < 1:
            raise InputError("own_fit_runs and project_dim must be >= 0 and grad_chunk >= 1")


def checkpoint_of_step(t: np.ndarray | int, k: int) -> np.ndarray:
    """``ckpt(t)``: the checkpoint step whose gradients step t uses (t >= 1): ``k * floor((t-1)/k)``,
    0 for k = 0 (Grad-Dot)."""
    t = np.asarray(t, dtype=np.int64)
    if k <= 0:
        return np.zeros_like(t)
    return k * ((t - 1) // k)


def rollout(start: np.ndarray, scores: np.ndarray, scale: float) -> np.ndarray:
    """``start [R, M]``, ``scores [R, S, M]`` (eta_t * sum_{i in c_t} D[ckpt(t)][i, m] of the simulated
    steps) -> ``[R, S+1, M]``: ``out[:, 0] = start``, ``out[:, k] = start - scale * sum_{u<=k} scores[:, u-1]``."""
    c = np.concatenate([np.zeros_like(scores[:, :1]), np.cumsum(scores, axis=1)], axis=1)
    return start[:, None, :] - scale * c


def fit_scale(start: np.ndarray, cum: np.ndarray, true: np.ndarray) -> float:
    """Least-squares ``s`` of ``true ~ start - s * cum`` over every finite cell (arrays of one shape
    ``[R, S, M]``, start broadcast); 0 when every ``cum`` is 0."""
    y = (start - true)
    ok = np.isfinite(y) & np.isfinite(cum)
    den = float((cum[ok] ** 2).sum())
    return float((cum[ok] * y[ok]).sum() / den) if den > 0 else 0.0


def _model_or_unavailable(dynamics: Dynamics) -> None:
    """Raise `MethodUnavailable` when the store has no model whose gradients can be taken."""
    cfg = dynamics.manifest.get("config") or {}
    if not cfg.get("model"):
        raise MethodUnavailable("the store records no model (imported dynamics): no gradients to take")
    if cfg.get("model") == "default":
        from gptfluence.dynamics.collect import cached_base_model

        if not cfg.get("base_model"):
            raise MethodUnavailable("the store's manifest names no base model: no gradients to take")
        try:
            cached_base_model(str(cfg["base_model"]))
        except InputError as e:
            raise MethodUnavailable(str(e)) from None


class CheckpointDots:
    """Computes ``D[c]`` of one curriculum's fine-tuning at its checkpoint steps (one replay)."""

    def __init__(self, dynamics: Dynamics, config: TracInConfig) -> None:
        self.dynamics = dynamics
        self.config = config
        self._eager: Any = None

    def _device(self) -> str:
        from gptfluence.devices import resolve_device

        return resolve_device(self.config.device)

    def _key(self, curriculum: np.ndarray, seed: int, steps: list[int], rows: list[np.ndarray],
             test_ids: np.ndarray) -> str:
        cfg = self.dynamics.manifest.get("config") or {}
        h = hashlib.sha256()
        h.update(json.dumps({"kind": "tracin-dots", "version": 1, "collection": cfg, "seed": int(seed), "steps": steps,
                             "examples": self.dynamics.manifest.get("examples_sha256"),
                             "project_dim": self.config.project_dim, "proj_seed": self.config.seed,
                             "device": "cuda" if self._device().startswith("cuda") else "cpu"},
                            sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(curriculum, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(test_ids, dtype=np.int64).tobytes())
        for r in rows:
            h.update(b"|" + np.ascontiguousarray(r, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def compute(self, curriculum: np.ndarray, seed: int, steps: Sequence[int], train_ids: Sequence[np.ndarray],
                test_ids: np.ndarray, self_dots: bool = False) -> list[Any]:
        """For each checkpoint ``steps[c]``: ``D_c [len(train_ids[c]), M]`` float64 (and with
        ``self_dots``, ``(D_c, self_c [len])``). Cached on disk when ``dots_cache``."""
        from gptfluence.paths import cache_dir

        steps = [int(s) for s in steps]
        rows = [np.asarray(r, dtype=np.int64) for r in train_ids]
        key = self._key(curriculum, seed, steps, rows, test_ids) + ("-self" if self_dots else "")
        path = cache_dir("gradient-dots") / f"{key}.npz" if self.config.dots_cache else None
        if path is not None and path.exists():
            try:
                with np.load(path) as z:
                    return [(z[f"d{c}"], z[f"s{c}"]) if self_dots else z[f"d{c}"] for c in range(len(steps))]
            except Exception:  # a damaged cache file is recomputed
                pass
        out = self._compute(curriculum, seed, steps, rows, test_ids, self_dots)
        if path is not None:
            arrays = {}
            for c, v in enumerate(out):
                arrays[f"d{c}"] = v[0] if self_dots else v
                if self_dots:
                    arrays[f"s{c}"] = v[1]
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        return out

    def _compute(self, curriculum: np.ndarray, seed: int, steps: list[int], rows: list[np.ndarray],
                 test_ids: np.ndarray, self_dots: bool) -> list[Any]:
        import torch

        from gptfluence.dynamics.collect import train_curriculum
        from gptfluence.features.per_example import gradient_dots, tokenized_rows
        from gptfluence.types import rows_for

        dyn = self.dynamics
        max_len = int((dyn.manifest.get("config") or {}).get("max_length", 64))
        order = np.argsort(steps)
        out: list[Any] = [None] * len(steps)
        test_ex = [dyn.task.test[r] for r in rows_for(test_ids.tolist(), dyn.test_row, "test")]
        threads = torch.get_num_threads()
        try:
            it = train_curriculum(dyn, curriculum, seed, [steps[i] for i in order], self._device(),
                                  label="tracin curriculum")
            for (step, model, tok), c in zip(it, order):
                assert step == steps[c]
                eager = self._eager_copy(model)
                test_rows = tokenized_rows(tok, test_ex, max_len, append_eos=False)
                tr = [dyn.task.train[r] for r in rows_for(rows[c].tolist(), dyn.train_row, "training")]
                train_rows = tokenized_rows(tok, tr, max_len, append_eos=True) if tr else \
                    (torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int64))
                out[c] = gradient_dots(eager, train_rows, test_rows, chunk=self.config.grad_chunk,
                                       project_dim=self.config.project_dim, seed=self.config.seed, self_dots=self_dots)
        finally:
            torch.set_num_threads(threads)
        return out

    def _eager_copy(self, model: Any) -> Any:
        """A copy of ``model``'s weights in a model with eager attention (vmap-able; the replayed
        model keeps training with its own attention implementation, so its steps are unchanged)."""
        from gptfluence.features.per_example import eager_copy

        if self._eager is None:
            self._eager = eager_copy(model)
        self._eager.load_state_dict(model.state_dict())
        self._eager.eval()
        return self._eager


class TracInSimulator(SimulatorBase):
    """TracIn-CP (``tracin_cp``) and Grad-Dot (``grad_dot``) rollouts; see the module doc."""

    method = "tracin_cp"

    def __init__(self, metric: str = "loss", config: TracInConfig | None = None) -> None:
        super().__init__(metric)
        self.config = config or TracInConfig()
        self.config.validate()
        self.scale: float | None = None
        self.dynamics: Dynamics | None = None
        # reference source: dot products over the store's pool x test set at the reference checkpoints
        self.ref_steps = np.zeros(0, np.int64)  # [K] checkpoint steps
        self.ref_dots: np.ndarray | None = None  # [K, N, M] float64
        self.ref_lr = np.zeros(0, np.float64)  # [T_ref]
        self.ref_run = ""
        self.train_ids = np.zeros(0, np.int64)  # [N] columns of ref_dots' axis 1 (sorted)
        self.test_ids = np.zeros(0, np.int64)  # [M] (sorted)

    @property
    def k(self) -> int:
        return int(self.config.checkpoint_every)

    @property
    def source(self) -> str:
        """The gradient source actually used (Grad-Dot's one checkpoint is the base model for all)."""
        return "base model" if self.k == 0 else self.config.gradient_source

    # -- helpers --------------------------------------------------------------------------------
    def _lr_for(self, curriculum: np.ndarray) -> np.ndarray:
        """eta_t [T] of a curriculum: the store run with this curriculum's recorded lr, else the
        reference run's (same length), else the store's schedule."""
        assert self.dynamics is not None
        run = self._matching_run(curriculum)
        T = int(curriculum.shape[0])
        if run is not None and run.lr is not None:
            return run.lr.astype(np.float64)
        if self.ref_lr.size == T:
            return self.ref_lr
        from gptfluence.dynamics.collect import curriculum_lrs

        return curriculum_lrs(self.dynamics, T)

    def _matching_run(self, curriculum: np.ndarray) -> Run | None:
        """The store run whose curriculum equals ``curriculum`` (up to extra padding columns), else None."""
        assert self.dynamics is not None
        c = np.asarray(curriculum, dtype=np.int64)
        for rid in self.dynamics.run_ids:
            r = self.dynamics.run(rid)
            T, b = r.curriculum.shape
            if T == c.shape[0] and b <= c.shape[1] and np.array_equal(r.curriculum, c[:, :b]) and np.all(c[:, b:] < 0):
                return r
        return None

    def _seed_for(self, curriculum: np.ndarray) -> int:
        assert self.dynamics is not None
        run = self._matching_run(curriculum)
        if run is not None and run.seed is not None:
            return int(run.seed)
        return int((self.dynamics.manifest.get("config") or {}).get("run_seed", 0))

    def _own_scores(self, curriculum: np.ndarray, test_ids: np.ndarray, first_step: int) -> np.ndarray:
        """``[T - first_step, M]`` scores of steps first_step+1..T from the curriculum's own replay."""
        assert self.dynamics is not None
        T = int(curriculum.shape[0])
        ts = np.arange(first_step + 1, T + 1)
        if ts.size == 0:
            return np.zeros((0, test_ids.size))
        ck = checkpoint_of_step(ts, self.k)
        steps = sorted(set(ck.tolist()))
        needed = []
        for c in steps:
            b = curriculum[ts[ck == c] - 1].reshape(-1)
            needed.append(np.unique(b[b >= 0]))
        dots = CheckpointDots(self.dynamics, self.config).compute(curriculum, self._seed_for(curriculum), steps,
                                                                 needed, test_ids)
        lr = self._lr_for(curriculum)
        out = np.zeros((ts.size, test_ids.size))
        for c, ids, D in zip(steps, needed, dots):
            pos = {int(i): j for j, i in enumerate(ids)}
            for j in np.nonzero(ck == c)[0]:
                b = curriculum[ts[j] - 1]
                rows = [pos[int(i)] for i in b if i >= 0]
                out[j] = lr[ts[j] - 1] * D[rows].sum(0)
        return out

    def _reference_scores(self, cur: np.ndarray, test_ids: np.ndarray, first_step: int) -> np.ndarray:
        """``[R, T - first_step, M]`` scores from the reference checkpoints' dot products."""
        assert self.ref_dots is not None
        R, T, b = cur.shape
        cols = np.searchsorted(self.test_ids, test_ids)
        cols = np.minimum(cols, max(self.test_ids.size - 1, 0))
        bad = self.test_ids[cols] != test_ids if self.test_ids.size else np.ones(test_ids.shape, bool)
        if bad.any():
            raise InputError(f"{self.method}: test id {int(test_ids[bad][0])} is not in the store it was fitted on")
        N = self.train_ids.size
        flat = cur.reshape(-1)
        rows = np.searchsorted(self.train_ids, flat)
        rows = np.minimum(rows, max(N - 1, 0))
        known = (flat >= 0) & (self.train_ids[rows] == flat) if N else np.zeros(flat.shape, bool)
        if ((flat >= 0) & ~known).any():
            raise InputError(f"{self.method}: training id {int(flat[(flat >= 0) & ~known][0])} is not in the store's pool")
        rows = np.where(known, rows, N).reshape(R, T, b)  # N = the zero row (padding)
        Dp = np.concatenate([self.ref_dots[:, :, cols], np.zeros((self.ref_dots.shape[0], 1, cols.size))], axis=1)
        ts = np.arange(first_step + 1, T + 1)
        ck = checkpoint_of_step(ts, self.k)
        kidx = np.searchsorted(self.ref_steps, ck, side="right") - 1  # the last reference checkpoint <= ckpt(t)
        kidx = np.clip(kidx, 0, self.ref_steps.size - 1)
        out = np.zeros((R, ts.size, cols.size))
        for r in range(R):
            lr = self._lr_for(cur[r]) if self.dynamics is not None else self._stored_lr(T)
            for j, t in enumerate(ts):
                out[r, j] = lr[t - 1] * Dp[kidx[j], rows[r, t - 1]].sum(0)
        return out

    def _stored_lr(self, T: int) -> np.ndarray:
        """Without a store (a loaded artifact): the reference run's lr, the last value repeated."""
        lr = self.ref_lr
        if lr.size >= T:
            return lr[:T]
        return np.concatenate([lr, np.full(T - lr.size, lr[-1] if lr.size else 0.0)])

    def _scores(self, cur: np.ndarray, test_ids: np.ndarray, first_step: int) -> np.ndarray:
        if self.k > 0 and self.config.gradient_source == "own":
            if self.dynamics is None:
                raise InputError(f"{self.method} with gradient_source 'own' re-trains every curriculum: it needs the "
                                 f"store (call prepare(dynamics, ...) before simulate)")
            return np.stack([self._own_scores(cur[r], test_ids, first_step) for r in range(cur.shape[0])])
        return self._reference_scores(cur, test_ids, first_step)

    def _prepare_reference(self, dynamics: Dynamics, fit_runs: Sequence[str]) -> None:
        self.train_ids = np.sort(dynamics.train_ids)
        self.test_ids = np.sort(dynamics.test_ids)
        rid = self.config.reference_run or list(fit_runs)[0]  # Grad-Dot: only its base model is used
        run = dynamics.run(rid)
        steps = sorted(set(checkpoint_of_step(np.arange(1, run.num_steps + 1), self.k).tolist())) or [0]
        if run.seed is None:
            raise InputError(f"run {rid!r} records no seed; its fine-tuning cannot be replayed")
        dots = CheckpointDots(dynamics, self.config).compute(run.curriculum, int(run.seed), steps,
                                                             [self.train_ids] * len(steps), self.test_ids)
        self.ref_dots = np.stack(dots)
        self.ref_steps = np.asarray(steps, dtype=np.int64)
        self.ref_run = rid
        self.ref_lr = run.lr.astype(np.float64) if run.lr is not None else self._schedule(dynamics, run.num_steps)

    @staticmethod
    def _schedule(dynamics: Dynamics, T: int) -> np.ndarray:
        from gptfluence.dynamics.collect import curriculum_lrs

        return curriculum_lrs(dynamics, T)

    # -- protocol -------------------------------------------------------------------------------
    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str], val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        """Compute the checkpoint dot products (reference source) and fit the scale on ``fit_runs``
        (the validation runs are not needed: one parameter, fitted in closed form)."""
        from gptfluence.simulators import engine
        from gptfluence.simulators.common import stack_curricula

        t0 = time.perf_counter()
        fit_runs = list(fit_runs)
        if not fit_runs:
            raise InputError(f"{self.method}: no fit runs given")
        _model_or_unavailable(dynamics)
        self._remember_dynamics(dynamics)
        self.dynamics = dynamics
        own = self.k > 0 and self.config.gradient_source == "own"
        if not own:
            self._prepare_reference(dynamics, fit_runs)
        runs = fit_runs
        if own and self.config.own_fit_runs > 0:
            runs = fit_runs[:self.config.own_fit_runs]
        V, steps, tids = dynamics.stack(self.metric, runs)
        f0 = engine.first_recorded_step(V, steps)
        true = V[:, f0:].astype(np.float64)
        start = true[:, :1]
        cur = stack_curricula(dynamics, runs)
        scores = self._scores(cur, tids, f0)
        cum = np.concatenate([np.zeros_like(scores[:, :1]), np.cumsum(scores, axis=1)], axis=1)
        self.scale = fit_scale(start, cum, true)
        pred = rollout(true[:, 0], scores, self.scale)
        err = (pred - true)[:, 1:]
        self.history = {
            "seconds": time.perf_counter() - t0, "scale": self.scale, "scale_fit_runs": list(runs),
            "fit_rollout_mse": float(np.nanmean(err ** 2)) if np.isfinite(err).any() else float("nan"),
            "record": {"scores": "loss-gradient", "gradient_source": self._source_label(),
                       "checkpoint_every": self.k, "scale": self.scale},
        }
        return self.history

    def _source_label(self) -> str:
        if self.k == 0:
            return "base model"
        if self.config.gradient_source == "own":
            return "own checkpoints (each curriculum re-trained)"
        return f"reference run {self.ref_run}"

    def prepare(self, dynamics: Dynamics, train_ids: Sequence[int] = (), test_ids: Sequence[int] = ()) -> None:
        """Remember the store (gradient_source own re-trains curricula of it; the lr of its runs)."""
        self.dynamics = dynamics

    def simulate(self, curricula: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                 first_step: int = 0) -> np.ndarray:
        """``[R, T+1-first_step, M]`` metric units: start - s * cumulative eta_t-weighted batch dot products."""
        if self.scale is None:
            raise InputError(f"{self.method} simulator is not fitted")
        cur, tid, st = check_inputs(curricula, test_ids, start, first_step)
        scores = self._scores(cur, tid, first_step)
        return rollout(st, scores, self.scale).astype(np.float32)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        if self.scale is None:
            raise InputError(f"{self.method} simulator is not fitted; nothing to save")
        meta = self._meta()
        meta.update(config=dataclasses.asdict(self.config), scale=self.scale, reference_run=self.ref_run)
        tensors: dict[str, np.ndarray] = {"ref_steps": self.ref_steps, "ref_lr": self.ref_lr,
                                          "train_ids": self.train_ids, "test_ids": self.test_ids}
        if self.ref_dots is not None:
            tensors["ref_dots"] = self.ref_dots
        return write_artifact(path, meta, tensors, overwrite=overwrite)

    @classmethod
    def _from_artifact(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray], **_: Any) -> "TracInSimulator":
        from gptfluence.simulators.common import config_from, stored_config

        cfg = config_from(TracInConfig, stored_config(meta, TracInConfig), {}, f"{meta.get('method')} config")
        sim = cls(meta["metric"], cfg)
        sim._load_meta(meta)
        sim.scale = float(meta["scale"])
        sim.ref_run = str(meta.get("reference_run") or "")
        sim.ref_steps = tensors["ref_steps"].astype(np.int64)
        sim.ref_lr = tensors["ref_lr"].astype(np.float64)
        sim.train_ids = tensors["train_ids"].astype(np.int64)
        sim.test_ids = tensors["test_ids"].astype(np.int64)
        sim.ref_dots = tensors["ref_dots"].astype(np.float64) if "ref_dots" in tensors else None
        return sim


class GradDotSimulator(TracInSimulator):
    """Grad-Dot (``grad_dot``): `TracInSimulator` with one checkpoint, the base model, whatever
    ``checkpoint_every`` and ``gradient_source`` say (so flags meant for ``tracin_cp`` in a joint
    evaluation never turn it into TracIn-CP)."""

    method = "grad_dot"

    @property
    def k(self) -> int:
        return 0


def self_influence(dynamics: Dynamics, run_id: str | None = None, checkpoint_every: int = 1,
                   config: TracInConfig | None = None, train_ids: Sequence[int] | None = None,
                   curriculum: np.ndarray | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TracIn self-influence along run ``run_id`` (re-trained), or along any ``curriculum [T, b]``
    of the store's training ids fine-tuned with training seed ``seed``: per training example i,
    ``sum_{t=1..T} eta_t <g_i, g_i>(theta_ckpt(t))`` (nats^2 per parameter-unit^2 times lr; large =
    the example's own loss moved a lot, e.g. a mislabelled example). Returns
    ``(train_ids [N], values [N] float64)`` (default: the whole pool, sorted)."""
    cfg = dataclasses.replace(config or TracInConfig(), checkpoint_every=int(checkpoint_every))
    cfg.validate()
    _model_or_unavailable(dynamics)
    if (run_id is None) == (curriculum is None):
        raise InputError("self_influence: give either a run id or a curriculum (with its seed)")
    if run_id is not None:
        run = dynamics.run(run_id)
        if run.seed is None:
            raise InputError(f"run {run_id!r} records no seed; its fine-tuning cannot be replayed")
        cur, train_seed, lr_rec = run.curriculum, int(run.seed), run.lr
    else:
        if seed is None:
            raise InputError("self_influence: a curriculum needs its training seed")
        cur, train_seed, lr_rec = np.asarray(curriculum, dtype=np.int64), int(seed), None
    ids = np.sort(np.asarray(dynamics.train_ids if train_ids is None else train_ids, dtype=np.int64))
    T = int(cur.shape[0])
    ts = np.arange(1, T + 1)
    ck = checkpoint_of_step(ts, cfg.checkpoint_every)
    steps = sorted(set(ck.tolist())) or [0]
    lr = lr_rec.astype(np.float64) if lr_rec is not None else TracInSimulator._schedule(dynamics, T)
    test0 = dynamics.test_ids[:1]  # one test column (the dot products themselves are not used here)
    res = CheckpointDots(dynamics, cfg).compute(cur, train_seed, steps, [ids] * len(steps), test0,
                                                self_dots=True)
    out = np.zeros(ids.size)
    for c, (_, own) in zip(steps, res):
        out += lr[ck == c].sum() * own
    return ids, out
