"""What every simulator shares: configs, input checks, artifacts, and the learned-recurrence base.

Artifacts: a folder with ``config.json`` (format ``gptfluence.simulator`` version 1: method,
metric, hyper-parameters, metric scale, examples' sha256 of the store it was fitted on, encoder
spec, fit summary) and ``weights.safetensors`` (parameters, id arrays, features).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gptfluence.config import arg, check_header, from_dict, load_json, save_json, sha256_file, to_dict
from gptfluence.devices import resolve_device
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.simulators import engine

FORMAT = "gptfluence.simulator"
FORMAT_VERSION = 1
UNSEEN_POLICIES = ("error", "zero")


# objective="auto": metrics scored on decoded text (sentence BLEU, ROUGE-L, label accuracy: per test
# example they jump between steps as the greedy decode flips) are fitted by whole rollouts; every
# other metric (loss, and any metric an imported store names) by teacher_forcing_then_rollout.
# Measured on the built-in tasks: benchmarks/results/lds_objective_metrics.md.
ROLLOUT_METRICS = ("bleu", "rougeL", "accuracy")  # = gptfluence.lm.metrics.metric_names of both task kinds (tested)
OBJECTIVE_CHOICES = engine.OBJECTIVES + ("auto",)


def resolve_objective(objective: str, metric: str) -> str:
    """The engine objective a config's ``objective`` means for ``metric``: itself, or for "auto"
    rollout on `ROLLOUT_METRICS` and teacher_forcing_then_rollout otherwise."""
    if objective != "auto":
        return objective
    return "rollout" if metric in ROLLOUT_METRICS else "teacher_forcing_then_rollout"


@dataclasses.dataclass
class FitConfig:
    """Optimisation settings shared by the learned simulators."""

    lr: float = arg(1e-3, "peak learning rate (after warmup)")
    weight_decay: float = arg(1e-3, "weight decay (the L2 term): decoupled with optimizer=adamw, added to the gradient with adam_l2")
    epochs: int = arg(60, "maximum epochs over all teacher-forcing transitions of the fit runs")
    batch_size: int = arg(4096, "transitions (run, step, test example) per optimizer step; 0 = all")
    min_steps_per_epoch: int = arg(16, "small fits: shrink the batch (not below 64) so that an epoch has at least this many optimizer steps (0 = off)")
    warmup_steps: int = arg(20, "optimizer steps of linear learning-rate warmup")
    patience: int = arg(10, "stop after this many epochs without a better validation rollout MSE (0 = never)")
    seed: int = arg(0, "seed of initialisation and transition shuffling")
    device: str = arg("cpu", "torch device: cpu, cuda[:k] or auto (cuda when available)")
    bridge_gaps: bool = arg(True, "teacher forcing across unrecorded steps: roll the model from the last recorded value to the next (metrics recorded every k steps); false = only targets whose previous order values are recorded")
    detrend: bool = arg(True, "fit deviations from the fit runs' mean trajectory (per test example and step) and add that trend back when simulating; false = the paper's model of the raw values")
    objective: str = arg("teacher_forcing", "fitting loss: teacher_forcing (the paper: one-step MSE from true previous values), rollout (MSE of whole autoregressive rollouts of the fit runs, backpropagated through time; what evaluation measures), teacher_forcing_then_rollout (teacher forcing to its best validation epoch, then rollout from those weights; kept only if a rollout epoch beats them on the validation runs) or auto (rollout for bleu, rougeL and accuracy, teacher_forcing_then_rollout otherwise)")
    rollout_runs: int = arg(8, "objective=rollout / the rollout phase: fit runs per optimizer step (0 = all)")
    rollout_phase_keep: str = arg("if_better", "objective=teacher_forcing_then_rollout: if_better (keep the rollout phase's best epoch only if it beats the teacher-forced weights on the validation runs) or best_epoch (always keep the rollout phase's best validation epoch)")
    normalize: bool = arg(True, "fit on metric / scale (scale = mean |value| over the fit runs); outputs stay in metric units")
    optimizer: str = arg("adamw", "adamw (decoupled weight decay) or adam_l2 (Adam with coupled weight decay, the authors' code)")
    lr_schedule: str = arg("warmup_constant", "warmup_constant (linear warmup, then constant) or warmup_linear_decay (linear warmup from 0, then linear decay to 0 at the last epoch; the authors' code)")
    step_lr_scaling: bool = arg(True, "multiply each simulated step's factor sums by the fine-tuning's learning rate at that step over its peak (the store's collection schedule: warmup, then constant or linear decay; our extension, with residual=True): to first order an optimizer step moves the model, and so the metrics, in proportion to its learning rate, so under a decaying schedule early batches weigh more than late ones. A constant schedule without warmup (the built-in default) gives 1 at every step: no change. Stores without a collection config (imported GPTDynamics) and residual=False: no scaling; false = the paper's stationary model. On a built-in store trained under warmup and linear decay (benchmarks/results/lds_draw2*.md) it raises GPTfluence's loss LDS over held-out curricula from 0.228 / 0.242 / -0.184 to 0.411 / 0.401 / 0.228 (random / membership-only / order-only; README \"What raised LDS (10)\")")
    early_stopping: str = arg("patience", "patience (stop after `patience` epochs without a new best; the untrained start is a candidate) or consecutive_increases (the authors' code: stop after `patience` epochs in a row each worse than the epoch before; only trained epochs are candidates); the best epoch's weights are kept")

    def validate(self) -> None:
        """Raise `InputError` naming the first invalid field (as its flag). Subclasses extend it;
        `config_from` calls it whenever a simulator config is made."""
        import math

        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise config_error(self, "lr", "a number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise config_error(self, "weight_decay", ">= 0")
        for name in ("epochs", "batch_size", "min_steps_per_epoch", "warmup_steps", "patience", "rollout_runs"):
            if getattr(self, name) < 0:
                raise config_error(self, name, ">= 0")
        for name, allowed in (("objective", OBJECTIVE_CHOICES), ("optimizer", engine.OPTIMIZERS),
                              ("lr_schedule", engine.LR_SCHEDULES), ("early_stopping", engine.EARLY_STOPPING),
                              ("rollout_phase_keep", engine.ROLLOUT_PHASE_KEEP)):
            engine.check_choice(flag_name(name), getattr(self, name), allowed)


def flag_name(field: str) -> str:
    """How errors name a config field: its flag and the field, ``--init-std (init_std)``."""
    return f"--{field.replace('_', '-')} ({field})"


def config_error(config: Any, field: str, rule: str) -> InputError:
    """`InputError` for ``config.field`` breaking ``rule`` (e.g. ">= 0"), named as its flag."""
    return InputError(f"{flag_name(field)} must be {rule}, got {getattr(config, field)!r}")


# ---------------------------------------------------------------------------------------------
# input checks


def check_inputs(curricula: Any, test_ids: Any, start: Any, first_step: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert simulate() inputs: curricula [R, T, b] int64, test_ids [M] int64,
    start [R, M] float64."""
    cur = np.asarray(curricula)
    if cur.ndim == 2:
        raise InputError(f"curricula must be [runs, steps, batch]; got a 2-d array {cur.shape} (wrap one curriculum as [None])")
    if cur.ndim != 3:
        raise InputError(f"curricula must be [runs, steps, batch], got shape {cur.shape}")
    if cur.size and not np.issubdtype(cur.dtype, np.integer):
        if not np.all(np.equal(np.mod(cur, 1), 0)):
            raise InputError("curricula must hold integer training ids (-1 = padding)")
    cur = cur.astype(np.int64)
    if cur.size and cur.min() < -1:
        raise InputError(f"curricula hold id {int(cur.min())}; ids are >= 0 and -1 marks padding")
    tid = np.asarray(test_ids).astype(np.int64).reshape(-1)
    st = np.asarray(start, dtype=np.float64)
    if st.shape != (cur.shape[0], tid.size):
        raise InputError(f"start must be [runs={cur.shape[0]}, test examples={tid.size}], got shape {st.shape}")
    T = cur.shape[1]
    if not (0 <= first_step <= T):
        raise InputError(f"first_step must be in 0..{T} (the curricula have {T} steps), got {first_step}")
    return cur, tid, st


def stack_curricula(dynamics: Dynamics, run_ids: Sequence[str]) -> np.ndarray:
    """Curricula of several runs as one array [R, T, b_max] (-1 padding)."""
    curs = [dynamics.run(r).curriculum for r in run_ids]
    T = {c.shape[0] for c in curs}
    if len(T) > 1:
        raise InputError(f"runs {list(run_ids)} have different numbers of steps {sorted(T)}")
    b = max(c.shape[1] for c in curs)
    out = np.full((len(curs), curs[0].shape[0], b), -1, dtype=np.int64)
    for i, c in enumerate(curs):
        out[i, :, :c.shape[1]] = c
    return out


def metric_scale(values: np.ndarray) -> float:
    v = np.abs(values[np.isfinite(values)])
    s = float(v.mean()) if v.size else 1.0
    return s if s > 1e-8 else 1.0


# ---------------------------------------------------------------------------------------------
# artifacts


PREVIOUS_WEIGHTS = ".weights.safetensors.prev"  # the committed weights while a re-save is under way


def is_simulator_artifact(folder: Path) -> bool:
    """Whether ``folder`` holds a simulator artifact (a config.json of this format)."""
    from gptfluence.outputs import has_json_format

    return has_json_format("config.json", FORMAT)(Path(folder))


def write_artifact(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, np.ndarray | torch.Tensor],
                   overwrite: bool = False) -> Path:
    """Write the simulator folder ``path``: ``weights.safetensors`` + ``config.json``.

    The folder must be new, empty or already a simulator artifact; any other non-empty folder
    is refused unless ``overwrite`` (see `gptfluence.outputs.prepare_output_dir`). Only the
    artifact's own files are written, all inside the folder; nothing else there is touched.
    ``config.json`` (written last, atomically) is the commit point and records the sha256 of its
    weights. Until it is written, the previous weights are kept as ``.weights.safetensors.prev``
    (a hard link), so an interrupted re-save still loads as the previous artifact
    (`read_artifact` falls back to the file whose hash config.json records).
    """
    from safetensors.numpy import save_file

    from gptfluence.outputs import prepare_output_dir

    out = prepare_output_dir(path, "simulator", is_simulator_artifact, overwrite=overwrite)
    arrays = {}
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        arrays[k] = np.ascontiguousarray(v)
    if not arrays:
        arrays["_empty"] = np.zeros(0, dtype=np.float32)
    weights, prev = out / "weights.safetensors", out / PREVIOUS_WEIGHTS
    for stale in out.glob(".weights.safetensors.tmp-*"):  # an interrupted save's temporary file (ours by name)
        stale.unlink(missing_ok=True)
    wtmp = out / f".weights.safetensors.tmp-{os.getpid()}"
    try:
        save_file(arrays, str(wtmp))
        with open(wtmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(wtmp)
        if weights.exists() and not prev.exists():  # keep the committed weights until the new config lands
            try:
                os.link(weights, prev)
            except OSError:  # no hard links here: a copy
                import shutil

                shutil.copy2(weights, prev)
        os.replace(wtmp, weights)
        save_json({"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights_sha256": digest},
                  out / "config.json")
        prev.unlink(missing_ok=True)
    finally:
        wtmp.unlink(missing_ok=True)
    return out


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    root = Path(path)
    cfg_path = root / "config.json"
    if not root.is_dir():
        raise InputError(f"{root}: not a simulator folder (folder not found)")
    meta = check_header(load_json(cfg_path), cfg_path, FORMAT, FORMAT_VERSION, ("method", "metric"),
                        mismatch=ArtifactMismatchError)
    wpath = root / "weights.safetensors"
    if not wpath.exists():
        raise InputError(f"{wpath}: file not found")
    want = meta.get("weights_sha256")
    if want is not None:
        got = sha256_file(wpath)
        prev = root / PREVIOUS_WEIGHTS
        if got != want and prev.exists() and sha256_file(prev) == want:
            wpath, got = prev, want  # a re-save was interrupted before its config.json: the previous artifact
        if got != want:
            raise ArtifactMismatchError(f"{wpath}: sha256 {got[:12]}... does not match config.json's weights_sha256 "
                                        f"{str(want)[:12]}... (files from two different saves?); save the simulator again")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:
        raise InputError(f"{wpath}: unreadable safetensors file ({e})") from None
    return meta, tensors


def check_against(meta: dict[str, Any], dynamics: Dynamics | None, source: str, strict_examples: bool = True) -> None:
    """Refuse (ArtifactMismatchError) a simulator made for another metric or other examples."""
    if dynamics is None:
        return
    metrics = dynamics.metrics
    if metrics and meta["metric"] not in metrics:
        raise ArtifactMismatchError(f"{source}: simulator of metric {meta['metric']!r}, but the dynamics store "
                                    f"({dynamics.root or 'in memory'}) records {metrics}")
    hashes = meta.get("examples_sha256")
    if strict_examples and hashes:
        dynamics.check_compatible(hashes, f"{source} (method {meta['method']!r})")


class SimulatorBase:
    """Shared plumbing: metric, examples' hashes, metadata."""

    method = "base"
    simulates_unseen_examples = False
    #: free parameters per fitted (training, test) pair (Simfluence): nothing to say about unseen examples
    per_pair_parameters = False

    def __init__(self, metric: str = "loss") -> None:
        self.metric = metric
        self.examples_sha256: dict[str, str] | None = None
        self.task_name: str | None = None
        self.history: dict[str, Any] = {}

    def prepare(self, dynamics: Dynamics, train_ids: Sequence[int] = (), test_ids: Sequence[int] = ()) -> None:
        """Nothing to prepare (see `Simulator.prepare`)."""

    def _remember_dynamics(self, dynamics: Dynamics) -> None:
        self.examples_sha256 = dict(dynamics.manifest.get("examples_sha256") or {})
        self.task_name = dynamics.task.name

    def _meta(self) -> dict[str, Any]:
        # per-epoch lists stay out; an ensemble's member summaries (runs, epochs, seconds) are kept
        hist = {k: v for k, v in self.history.items() if not isinstance(v, list) or k == "members"}
        return {"method": self.method, "metric": self.metric, "examples_sha256": self.examples_sha256,
                "task": self.task_name, "fit": hist}

    def _load_meta(self, meta: dict[str, Any]) -> None:
        self.examples_sha256 = meta.get("examples_sha256")
        self.task_name = meta.get("task")
        self.history = dict(meta.get("fit") or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(metric={self.metric!r})"


class Trend:
    """The fit runs' mean trajectory, per test example and absolute step (``detrend=True``).

    ``values(test_ids, steps) -> [len(steps), M]`` in metric units: steps outside the fitted range
    take the nearest fitted step's value; a test id not seen in fitting takes the mean over the
    fitted test examples; unrecorded (step, id) cells are filled from the nearest recorded step.
    """

    def __init__(self, steps: np.ndarray, test_ids: np.ndarray, table: np.ndarray) -> None:
        self.steps = np.asarray(steps, dtype=np.int64)
        self.test_ids = np.asarray(test_ids, dtype=np.int64)
        self.table = np.asarray(table, dtype=np.float64)  # [S, M]
        self.overall = self.table.mean(axis=1)
        self._col = {int(i): c for c, i in enumerate(self.test_ids)}

    @classmethod
    def from_runs(cls, V: np.ndarray, steps: np.ndarray, test_ids: np.ndarray) -> "Trend":
        """From ``V [R, S, M]`` on ``steps [S]``: mean over runs, gaps filled along the steps."""
        with warnings.catch_warnings():  # all-NaN cells (never recorded) stay NaN, silently
            warnings.simplefilter("ignore", category=RuntimeWarning)
            mean = np.nanmean(V, axis=0)  # [S, M]
        rec = np.isfinite(mean).any(axis=1)
        if not rec.any():
            raise InputError("detrend: no recorded values in the fit runs")
        keep = np.flatnonzero(rec)[0]
        mean, steps = mean[keep:], np.asarray(steps)[keep:]
        for m in range(mean.shape[1]):
            col = mean[:, m]
            ok = np.isfinite(col)
            if not ok.any():
                continue
            idx = np.flatnonzero(ok)
            col[:] = np.interp(np.arange(col.size), idx, col[idx])  # nearest-recorded fill at the ends
        bad = ~np.isfinite(mean)
        if bad.any():  # test examples never recorded: the mean of the others
            mean[bad] = np.broadcast_to(np.nanmean(mean, axis=1, keepdims=True), mean.shape)[bad]
        return cls(steps, test_ids, mean)

    def values(self, test_ids: Sequence[int], steps: Sequence[int]) -> np.ndarray:
        rows = np.clip(np.searchsorted(self.steps, np.asarray(steps, dtype=np.int64)), 0, self.steps.size - 1)
        cols = [self._col.get(int(i), -1) for i in test_ids]
        out = np.empty((rows.size, len(cols)), dtype=np.float64)
        for j, c in enumerate(cols):
            out[:, j] = self.table[rows, c] if c >= 0 else self.overall[rows]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps.tolist(), "test_ids": self.test_ids.tolist(), "table": self.table.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trend":
        try:
            return cls(np.asarray(d["steps"]), np.asarray(d["test_ids"]), np.asarray(d["table"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactMismatchError(f"simulator config.json, field 'trend': malformed ({e})") from None


def ensemble_splits(fit_runs: Sequence[str], val_runs: Sequence[str], members: int,
                    seed: int) -> list[tuple[list[str], list[str]]]:
    """(fit runs, validation runs) of each member of a bagged ensemble: the first is the given
    split; each further member validates on ``len(val_runs)`` other runs of the same pool (fit +
    validation runs), drawn with ``seed + k`` among the runs no earlier member validated on (any
    run of the pool once those run out), and fits on the rest. Without validation runs every member
    fits on all runs (they then differ only in their initialisation and shuffling seeds)."""
    fit_runs, val_runs = list(fit_runs), list(val_runs)
    pool = fit_runs + val_runs
    order = {r: i for i, r in enumerate(pool)}
    out = [(fit_runs, val_runs)]
    used = set(val_runs)
    n_val = len(val_runs)
    for k in range(1, members):
        if not n_val:
            out.append((fit_runs, []))
            continue
        fresh = [r for r in pool if r not in used]
        cand = fresh if len(fresh) >= n_val else pool
        rng = np.random.default_rng(seed + k)
        val = sorted((cand[i] for i in rng.choice(len(cand), size=n_val, replace=False)), key=order.__getitem__)
        used.update(val)
        held = set(val)
        out.append(([r for r in pool if r not in held], val))
    return out


def ensemble_history(hists: list[dict[str, Any]], splits: list[tuple[list[str], list[str]]]) -> dict[str, Any]:
    """One fit history for an ensemble: ``members`` (each member's summary: its runs, epochs, best
    epoch and validation MSE, seconds), ``transitions`` (the first member's teacher-forcing
    transitions, those of the given fit runs), ``epochs_run`` summed over members, ``best_epoch`` the largest
    member's (0 only when every member kept its untrained start), ``best_val_mse`` the members' mean
    (each on its own validation runs, normalised units; None without validation), ``seconds`` summed."""
    summary = []
    for h, (fr, vr) in zip(hists, splits):
        summary.append({"fit_runs": list(fr), "val_runs": list(vr), "epochs_run": h.get("epochs_run"),
                        "best_epoch": h.get("best_epoch"), "best_val_mse": h.get("best_val_mse"),
                        "seconds": h.get("seconds")})
    vals = [h["best_val_mse"] for h in hists if h.get("best_val_mse") is not None]
    return {"members": summary, "ensemble": len(hists), "transitions": hists[0].get("transitions"),
            "epochs_run": int(sum(int(h.get("epochs_run") or 0) for h in hists)),
            "best_epoch": max(int(h.get("best_epoch") or 0) for h in hists),
            "best_val_mse": float(np.mean(vals)) if vals else None,
            "seconds": float(sum(float(h.get("seconds") or 0.0) for h in hists))}


class RecurrenceSimulator(SimulatorBase):
    """Base of the learned recurrence simulators (GPTfluence, Simfluence): one fit / rollout
    engine (`gptfluence.simulators.engine`); subclasses provide the factors.

    Subclasses implement ``_init_params(dynamics, train_ids, test_ids, fit_train_ids, fit_runs)``, ``_factor_fn(train_ids,
    test_ids, unseen) -> callable returning F [n+1+L, N, M]`` (normalised units; L = `lags`) and the
    ``_state``/``_set_state`` pair for artifacts; they set ``self.order`` and ``self.residual``.
    """

    config: FitConfig
    order: int = 1
    residual: bool = True
    module: torch.nn.Module | None

    @property
    def lags(self) -> int:
        """Lagged additive factors D_1..D_L in the factor tensor after A_1..A_n, B: the fitted
        module's (GPTfluence's ``b_lags``, 0 without similarity terms); 0 for modules without any
        and before fitting."""
        return int(getattr(self.module, "lags", 0) or 0)

    @property
    def history_padding(self) -> str:
        """Values before the start of an order-n history: "start" (= the start value) or "zeros"."""
        return getattr(self.config, "history_padding", "start")

    def _penalty(self) -> Callable[[], torch.Tensor] | None:
        """A term added to every minibatch loss while fitting (None: none)."""
        return None

    def __init__(self, metric: str = "loss") -> None:
        super().__init__(metric)
        self.scale = 1.0
        self.fit_first_step: int | None = None
        self.module = None
        self.trend: Trend | None = None
        # step_lr_scaling: the fine-tuning's learning-rate schedule {"lr_schedule", "warmup_steps"}
        # (None: no scaling; set by fit from the store's collection config, saved in the artifact)
        self.lr_spec: dict[str, Any] | None = None

    def _resolve_lr_spec(self, dynamics: Dynamics) -> None:
        """``self.lr_spec`` from the store's collection config when ``step_lr_scaling`` applies
        (config on, ``residual``, a store collected by `gptfluence collect`), else None."""
        self.lr_spec = None
        if not getattr(self.config, "step_lr_scaling", False) or not self.residual:
            return
        raw = dynamics.manifest.get("config") or {}
        if not raw.get("model") or "lr_schedule" not in raw:
            return
        self.lr_spec = {"lr_schedule": str(raw["lr_schedule"]), "warmup_steps": int(raw.get("warmup_steps") or 0)}

    def _lag_step_scale(self) -> bool:
        """Lagged factors acting at a step also scaled by that step's learning rate (GPTfluence's
        ``b_lags_lr_scaling`` = batch_and_step; see `engine`)."""
        return getattr(self.config, "b_lags_lr_scaling", "batch") == "batch_and_step"

    def step_weights(self, num_steps: int) -> np.ndarray | None:
        """``[num_steps]`` float64: w_t = the fine-tuning's learning rate at steps 1..T of a run of
        ``num_steps`` steps over the schedule's peak (``step_lr_scaling``); None when there is no
        scaling or every w_t is 1 (a constant schedule without warmup)."""
        if self.lr_spec is None or num_steps < 1:
            return None
        from gptfluence.lm.training import schedule_factors

        w = schedule_factors(num_steps, self.lr_spec["warmup_steps"], self.lr_spec["lr_schedule"])
        peak = float(w.max())
        if peak <= 0 or bool(np.all(w == peak)):
            return None
        return w / peak

    # -- hooks ------------------------------------------------------------------------------
    def _init_params(self, dynamics: Dynamics, train_ids: np.ndarray, test_ids: np.ndarray,
                     fit_train_ids: np.ndarray, fit_runs: Sequence[str]) -> None:
        raise NotImplementedError

    def _factor_fn(self, train_ids: np.ndarray, test_ids: np.ndarray, unseen: str) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> str:
        return resolve_device(self.config.device)

    # -- fitting ----------------------------------------------------------------------------
    def _block(self, dynamics: Dynamics, run_ids: Sequence[str], train_ids: np.ndarray, test_ids: np.ndarray,
               first_step: int | None = None) -> engine.RunBlock:
        V, steps, tids = dynamics.stack(self.metric, run_ids)
        if first_step is None:
            first_step = engine.first_recorded_step(V, steps)
        V = V[:, first_step:]
        if self.trend is not None:
            V = V - self.trend.values(tids, steps[first_step:])[None]
        V = V / self.scale
        full = stack_curricula(dynamics, run_ids)
        cur = full[:, first_step:]
        rows = np.searchsorted(train_ids, np.maximum(cur, 0))
        rows[cur < 0] = train_ids.size
        cols = np.searchsorted(test_ids, tids)
        scale = None
        if self.lr_spec is not None:  # each run's own schedule (its number of steps)
            ws = [self.step_weights(dynamics.run(r).num_steps) for r in run_ids]
            if any(w is not None for w in ws):
                grid = np.ones(full.shape[:2], dtype=np.float32)
                for k, w in enumerate(ws):
                    if w is not None:
                        grid[k, :w.size] = w[:grid.shape[1]]
                scale = torch.as_tensor(grid[:, first_step:])
        return engine.RunBlock(torch.as_tensor(V, dtype=torch.float32), torch.as_tensor(rows),
                               torch.as_tensor(cols), first_step, scale, self._lag_step_scale())

    def _ensemble_size(self) -> int:
        """Members of a bagged ensemble (`ensemble_splits`); 1 = one model (simulators without the field)."""
        return max(1, int(getattr(self.config, "ensemble", 1)))

    def _new_member(self, dynamics: Dynamics, train_ids: np.ndarray, test_ids: np.ndarray, seed: int) -> None:
        """Ensembles: replace ``self.module`` by a freshly initialised one (seed ``seed``), the features
        and fixed buffers as `_init_params` set them. Only simulators with an ``ensemble`` field."""
        raise NotImplementedError

    def _combine(self, modules: list[torch.nn.Module]) -> torch.nn.Module:
        """Ensembles: one module whose factors are the mean of ``modules``' factors."""
        raise NotImplementedError

    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str], val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        """Fit on ``fit_runs`` (teacher forcing, rollouts or both, per the config's ``objective``);
        early-stop on the rollout MSE of ``val_runs``. With ``ensemble = k > 1`` (GPTfluence), k
        members are fitted on the splits of `ensemble_splits` (the first: the given one) and the
        simulator's factors are their mean. Returns the fit history (losses in normalised units,
        seconds)."""
        fit_runs, val_runs = list(fit_runs), list(val_runs)
        if not fit_runs:
            raise InputError(f"{self.method}: no fit runs given")
        overlap = set(fit_runs) & set(val_runs)
        if overlap:
            raise InputError(f"runs {sorted(overlap)} are both fit and validation runs")
        t0 = time.perf_counter()
        device = self.device
        members = self._ensemble_size()
        self._remember_dynamics(dynamics)
        c = self.config
        splits = ensemble_splits(fit_runs, val_runs, members, c.seed)
        # trend and scale: from the fit runs; for an ensemble (one normalisation and trend for all
        # members) from the runs that no member validates on, so that no validation run is part of
        # the trend its member is early-stopped against
        V, steps, fit_tids = dynamics.stack(self.metric, fit_runs)
        self.fit_first_step = engine.first_recorded_step(V, steps)
        test_ids = np.unique(np.concatenate([fit_tids] + ([dynamics.stack(self.metric, val_runs)[2]] if val_runs else [])))
        if members > 1:
            validated = {r for _, vr in splits for r in vr}
            base = [r for r in fit_runs + val_runs if r not in validated] or fit_runs + val_runs  # tiny pools: all
            V, steps, fit_tids = dynamics.stack(self.metric, base)
        self.trend = Trend.from_runs(V, steps, fit_tids) if getattr(self.config, "detrend", False) else None
        self._resolve_lr_spec(dynamics)
        dev = V if self.trend is None else V - self.trend.values(fit_tids, steps)[None]
        self.scale = metric_scale(dev[:, self.fit_first_step:]) if self.config.normalize else 1.0
        fit_cur = stack_curricula(dynamics, fit_runs)
        all_cur = [fit_cur] + ([stack_curricula(dynamics, val_runs)] if val_runs else [])
        train_ids = np.unique(np.concatenate([c[c >= 0] for c in all_cur]))
        fit_train_ids = np.unique(fit_cur[fit_cur >= 0])
        self._init_params(dynamics, train_ids, test_ids, fit_train_ids, fit_runs)
        assert self.module is not None
        opts = engine.FitOptions(lr=c.lr, weight_decay=c.weight_decay, epochs=c.epochs, batch_size=c.batch_size,
                                 min_steps_per_epoch=c.min_steps_per_epoch,
                                 warmup_steps=c.warmup_steps, patience=c.patience, seed=c.seed, device=device,
                                 residual=self.residual, order=self.order, bridge_gaps=c.bridge_gaps,
                                 objective=resolve_objective(c.objective, self.metric), rollout_runs=c.rollout_runs,
                                 rollout_phase_keep=c.rollout_phase_keep, optimizer=c.optimizer,
                                 lr_schedule=c.lr_schedule, early_stopping=c.early_stopping,
                                 history_padding=self.history_padding, lags=self.lags)
        modules, hists = [], []
        for k, (fr, vr) in enumerate(splits):
            if k:
                self._new_member(dynamics, train_ids, test_ids, seed=c.seed + k)
            self.module.to(device)
            fn = self._factor_fn(train_ids, test_ids, unseen="zero")
            # the first member starts at the given fit runs' first recorded step; the others at their own
            # (`_block` finds it in the stack it builds anyway)
            first = self.fit_first_step if k == 0 else None
            fit_block = self._block(dynamics, fr, train_ids, test_ids, first).to(device)
            val_block = self._block(dynamics, vr, train_ids, test_ids).to(device) if vr else None
            desc = f"{self.method} {self.metric}" + (f" (member {k + 1}/{members})" if members > 1 else "")
            hists.append(engine.fit_engine(self.module, fn, fit_block, val_block,
                                           dataclasses.replace(opts, seed=c.seed + k), progress=progress,
                                           desc=desc, penalty=self._penalty()))
            self.module.eval()
            modules.append(self.module)
        if members == 1:
            hist = hists[0]
        else:
            self.module = self._combine(modules).to(device)
            self.module.eval()
            hist = ensemble_history(hists, splits)
        hist.update(objective=opts.objective, fit_runs=fit_runs, val_runs=val_runs, scale=self.scale, lr_spec=self.lr_spec,
                    fit_first_step=self.fit_first_step,
                    total_seconds=time.perf_counter() - t0)
        self.history = hist
        return hist

    # -- simulation -------------------------------------------------------------------------
    def simulate(self, curricula: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                 first_step: int = 0) -> np.ndarray:
        """Roll out: curricula [R, T, b] (training ids, -1 = padding), test_ids [M], start [R, M]
        (metric units, value at step ``first_step``) -> [R, T+1-first_step, M] float32 in metric
        units; out[:, k] is the value after step first_step + k."""
        if self.module is None:
            raise InputError(f"{self.method} simulator is not fitted")
        cur, tid, st = check_inputs(curricula, test_ids, start, first_step)
        cur = cur[:, first_step:]
        uniq = np.unique(cur[cur >= 0])
        rows = np.searchsorted(uniq, np.maximum(cur, 0))
        rows[cur < 0] = uniq.size
        device = self.device
        if uniq.size:
            fn = self._factor_fn(uniq, tid, unseen=getattr(self.config, "unseen", "error"))
        else:  # only padding (or no steps): every batch sum is zero, no factor is computed
            fn = lambda: torch.zeros(self.order + 1 + self.lags, 0, tid.size, device=device)  # noqa: E731
        trend = None
        if self.trend is not None:
            trend = self.trend.values(tid, np.arange(first_step, first_step + cur.shape[1] + 1))  # [T+1, M]
            st = st - trend[0][None]
        w = self.step_weights(cur.shape[1] + first_step)  # the schedule of a run of this many steps
        with torch.no_grad():
            Fp = engine.pad_factors(fn())
            start_t = torch.as_tensor(st / self.scale, dtype=torch.float32, device=device)
            out = engine.rollout_tensor(Fp, torch.as_tensor(rows, device=device), start_t, self.residual,
                                        zero_history=self.history_padding == "zeros", lags=self.lags,
                                        step_scale=None if w is None else torch.as_tensor(
                                            w[first_step:][None], dtype=torch.float32, device=device),
                                        lag_step_scale=self._lag_step_scale())
        pred = out.cpu().numpy().astype(np.float64) * self.scale
        if trend is not None:
            pred = pred + trend[None]
        return pred.astype(np.float32)

    def factors(self, train_ids: Sequence[int], test_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-pair factors: ``A [n, N, M]`` (dimensionless; alpha_1 = 1 + sum A_1 when residual)
        and ``B [N, M]`` in metric units (the additive change per step a training example makes);
        lagged additive factors (GPTfluence's ``b_lags``) are not part of it."""
        if self.module is None:
            raise InputError(f"{self.method} simulator is not fitted")
        tr = np.asarray(train_ids, dtype=np.int64).reshape(-1)
        te = np.asarray(test_ids, dtype=np.int64).reshape(-1)
        fn = self._factor_fn(tr, te, unseen=getattr(self.config, "unseen", "error"))
        with torch.no_grad():
            F = fn().cpu().numpy().astype(np.float64)
        n = self.order
        return F[:n], F[n] * self.scale

    def _meta(self) -> dict[str, Any]:
        m = super()._meta()
        m.update(config=to_dict(self.config), scale=self.scale, fit_first_step=self.fit_first_step,
                 order=self.order, residual=self.residual, trend=self.trend.to_dict() if self.trend else None,
                 lr_spec=self.lr_spec)
        return m

    def _load_meta(self, meta: dict[str, Any]) -> None:
        super()._load_meta(meta)
        self.scale = float(meta.get("scale", 1.0))
        self.fit_first_step = meta.get("fit_first_step")
        self.trend = Trend.from_dict(meta["trend"]) if meta.get("trend") else None
        self.lr_spec = dict(meta["lr_spec"]) if meta.get("lr_spec") else None


# Fields added to the simulator configs after artifacts of format 1 were first written, with the
# behaviour of an artifact that lacks them (not today's defaults). (step_lr_scaling: the schedule an
# artifact scales by is in its meta, "lr_spec", absent = none.)
LEGACY_FIELD_VALUES = {"detrend": False, "center_features": False, "similarity": "none", "similarity_checkpoints": 1,
                       "similarity_norms": False, "similarity_preconditioner": "none", "lexical": False,
                       "ensemble": 1, "a_factors": "pair",
                       "b_projection": "pair", "b_lags": 0, "step_lr_scaling": False,
                       "b_lags_lr_scaling": "batch"}


def stored_config(meta: dict[str, Any], cls: type) -> dict[str, Any]:
    """The config dict of an artifact, fields it predates filled with what it was made with."""
    cfg = dict(meta.get("config") or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in LEGACY_FIELD_VALUES.items():
        if k in names:
            cfg.setdefault(k, v)
    return cfg


def config_from(cls: type, config: Any, overrides: dict[str, Any], source: str) -> Any:
    if config is None:
        config = cls()
    elif isinstance(config, dict):
        config = from_dict(cls, config, source)
    if overrides:
        config = from_dict(cls, {**to_dict(config), **overrides}, source)
    if hasattr(config, "validate"):
        config.validate()
    return config
