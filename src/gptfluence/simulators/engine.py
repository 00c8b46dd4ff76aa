"""The generic matrix-form engine shared by every learned recurrence simulator.

Model (n-th order, per test example m, after optimizer step t)::

    phi_t[m] = alpha_1[t, m] * phi_{t-1}[m] + ... + alpha_n[t, m] * phi_{t-n}[m] + beta[t, m]
    alpha_1[t, m] = off + sum_{i in batch t} A_1[i, m]          (off = 1 if ``residual`` else 0)
    alpha_j[t, m] =       sum_{i in batch t} A_j[i, m]          (j = 2..n)
    beta[t, m]    =       sum_{i in batch t} B[i, m]
                    + sum_{l=1..L} sum_{i in batch t-l} D_l[i, m]   (``lags`` L, default 0)

A *factor provider* is any callable returning the stacked factor tensor ``F [n+1+L, N, M]``
(``F[j-1] = A_j`` for j = 1..n, ``F[n] = B``, ``F[n+l] = D_l``: the additive factors of the
batch l steps back, for l = 1..L) over its own training rows (N) and test columns
(M), in *normalised* metric units (values divided by the simulator's ``scale``; A is
dimensionless, B is in normalised units). GPTfluence computes F from features through MLPs;
Simfluence holds F as free parameters. The engine computes F once per optimizer step and then

* gathers batch sums by curriculum rows (``-1`` = padding and maps to an all-zero row),
* evaluates teacher-forced predictions for a minibatch of transitions (run, step, test example)
  in one tensor expression (no per-transition model calls),
* rolls out all runs x test examples at once, one small vector step per optimizer step.

Histories before the start value equal the start value (``history_padding="start"``, default) or
zero (``"zeros"``: the authors' code pads the n previous values of the first steps with 0).
Batches before the first simulated (or teacher-forced) step count as padding for the lagged
factors D_l.

``step_scale`` w_t (optional; the simulators' ``step_lr_scaling``): every batch sum of step t
(A_1..A_n, B, and D_l of the batch trained at step t, wherever it acts) is multiplied by w_t, the
learning rate of step t over the schedule's peak, so a step moves the values in proportion to its
learning rate (as an optimizer step's effect is, to first order); the identity offset of alpha_1
is not scaled. With ``lag_step_scale`` a lagged factor D_l of the batch of step t-l acting at step
t is multiplied by w_t as well (w_{t-l} w_t): the later step's update is what carries the batch's
delayed effect, so a step with learning rate 0 changes nothing.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from gptfluence.errors import InputError

FactorFn = Callable[[], torch.Tensor]
OBJECTIVES = ("teacher_forcing", "rollout", "teacher_forcing_then_rollout")
ROLLOUT_PHASE_KEEP = ("if_better", "best_epoch")
OPTIMIZERS = ("adamw", "adam_l2")
LR_SCHEDULES = ("warmup_constant", "warmup_linear_decay")
EARLY_STOPPING = ("patience", "consecutive_increases")
HISTORY_PADDINGS = ("start", "zeros")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else InputError naming the field."""
    if value not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# pure tensor functions


def pad_factors(F: torch.Tensor) -> torch.Tensor:
    """``F [n+1, N, M]`` -> ``[n+1, N+1, M]`` with a zero row N (padding / ignored ids)."""
    return torch.cat([F, F.new_zeros(F.shape[0], 1, F.shape[2])], dim=1)


def batch_sums(Fp: torch.Tensor, rows: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
    """Sum the padded factors over each batch: ``Fp [n+1, N+1, M]``, ``rows [..., b]`` (values in
    0..N, N = zero row) -> ``[n+1, ..., M]``. Chunked over the first axis of ``rows`` to bound memory."""
    k, _, M = Fp.shape
    lead = rows.shape[:-1]
    b = rows.shape[-1]
    if rows.ndim == 1 or rows.shape[0] == 0:
        return Fp[:, rows].sum(-2)
    per_item = k * b * M * int(np.prod(lead[1:], dtype=np.int64))
    chunk = max(1, max_elems // max(per_item, 1))
    if chunk >= rows.shape[0]:
        return Fp[:, rows].sum(-2)
    outs = [Fp[:, rows[i:i + chunk]].sum(-2) for i in range(0, rows.shape[0], chunk)]
    return torch.cat(outs, dim=1)


def step_update(sums: torch.Tensor, hist: list[torch.Tensor], residual: bool) -> torch.Tensor:
    """One recurrence step. ``sums [n+1, ..., M]`` (batch sums of A_1..A_n, B) and
    ``hist[j-1]`` = phi_{t-j} (same trailing shape) -> phi_t."""
    n = sums.shape[0] - 1
    out = sums[n].clone() if not residual else sums[n] + hist[0]
    for j in range(n):
        out = out + sums[j] * hist[j]
    return out


ROLLOUT_SUMS_MAX_ELEMS = 1 << 27  # 512 MB of float32 batch sums; beyond, rollouts gather per step


def _with_lags(sums: torch.Tensor, lags: int, step_scale: torch.Tensor | None = None,
               lag_step_scale: bool = False) -> torch.Tensor:
    """Batch sums ``[n+1+L, R, T, M]`` (slot n+l summed over each step's own batch) -> ``[n+1, R,
    T, M]``: slot n (beta) gets, at step t, slot n+l's sum of step t-l added (0 for t < l). With
    ``step_scale [R or 1, T]`` every sum of step t is first multiplied by its w_t; with
    ``lag_step_scale`` the lagged sums added at step t are multiplied by w_t as well."""
    if step_scale is not None:
        sums = sums * step_scale[None, :, :, None]
    if not lags:
        return sums
    n = sums.shape[0] - 1 - lags
    scale_lags = lag_step_scale and step_scale is not None
    beta = torch.zeros_like(sums[n]) if scale_lags else sums[n]  # scaled: the lags summed apart first
    for lag in range(1, lags + 1):
        if lag < sums.shape[2]:
            beta = beta + torch.nn.functional.pad(sums[n + lag, :, :-lag], (0, 0, lag, 0))
    if scale_lags:
        beta = sums[n] + beta * step_scale[:, :, None]
    return torch.cat([sums[:n], beta[None]])


def rollout_tensor(Fp: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, residual: bool,
                   zero_history: bool = False, lags: int = 0, step_scale: torch.Tensor | None = None,
                   lag_step_scale: bool = False) -> torch.Tensor:
    """Autoregressive rollout. ``Fp [n+1+L, N+1, M]`` (already restricted to the M test columns;
    ``lags`` = L), ``rows [R, T, b]`` (row t-1 = batch of the t-th simulated step, N = padding),
    ``start [R, M]`` -> ``[R, T+1, M]`` with ``out[:, 0] = start``. The n-1 values before the start
    equal the start value, or 0 with ``zero_history`` (the authors' padding). ``step_scale [R or 1,
    T]``: w_t of each simulated step (None: 1); ``lag_step_scale``: lagged factors acting at step t
    also times w_t."""
    n = Fp.shape[0] - 1 - lags
    R, T, _ = rows.shape
    if T == 0:
        return start[:, None].clone()
    # all batch sums at once [n+1+L, R, T, M], or step by step when that would exceed
    # ROLLOUT_SUMS_MAX_ELEMS (many long runs: LDS on paper-size dynamics); same values
    stream = Fp.shape[0] * R * T * Fp.shape[2] > ROLLOUT_SUMS_MAX_ELEMS
    sums = None if stream else _with_lags(batch_sums(Fp, rows), lags, step_scale, lag_step_scale)
    hist = [start] + [torch.zeros_like(start) if zero_history else start] * (n - 1)
    outs = [start]
    for t in range(T):
        if stream:
            step = Fp[:n + 1, rows[:, t]].sum(-2)
            if step_scale is not None:
                step = step * step_scale[None, :, t, None]
            scale_lags = lag_step_scale and step_scale is not None
            total = None  # scale_lags: as _with_lags, the lags summed apart, then times w_t
            for lag in range(1, min(lags, t) + 1):
                lagged = Fp[n + lag, rows[:, t - lag]].sum(-2)
                if step_scale is not None:
                    lagged = lagged * step_scale[:, t - lag, None]
                if scale_lags:
                    total = lagged if total is None else total + lagged
                else:
                    step = torch.cat([step[:n], (step[n] + lagged)[None]])
            if total is not None:
                step = torch.cat([step[:n], (step[n] + total * step_scale[:, t, None])[None]])
        new = step_update(step if stream else sums[:, :, t], hist, residual)
        outs.append(new)
        hist = [new] + hist[:-1]
    return torch.stack(outs, dim=1)  # differentiable (objective="rollout" backpropagates through it)


def teacher_forced_pred(Fp: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, prev: torch.Tensor,
                        residual: bool, lag_rows: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        lag_scale: torch.Tensor | None = None, lag_step_scale: bool = False) -> torch.Tensor:
    """One-step predictions for K transitions at once.

    ``Fp [n+1+L, N+1, M]``, ``rows [K, b]`` (batch of the transition's step, N = padding),
    ``cols [K]`` (test column), ``prev [n, K]`` (true phi_{t-1}..phi_{t-n}), ``lag_rows [L, K, b]``
    (the batches 1..L steps before; None = no lagged factors); ``scale [K]`` / ``lag_scale [L, K]``:
    w of the transition's step / of the steps of ``lag_rows`` (None: 1); ``lag_step_scale``: the
    lagged sums also times ``scale`` -> ``[K]``.
    """
    lags = 0 if lag_rows is None else int(lag_rows.shape[0])
    n = Fp.shape[0] - 1 - lags
    sums = Fp[:n + 1, rows, cols[:, None]].sum(-1)  # [n+1, K]
    if scale is not None:
        sums = sums * scale[None]
    if lags:
        # every lag in one gather ([L, K]: slot n+l at the batch l steps back), then summed over
        # the lags one after another (the order of summing them one by one, so values do not
        # depend on this being vectorised)
        P, M = Fp.shape[1], Fp.shape[2]
        slots = torch.arange(n + 1, n + 1 + lags, device=Fp.device)[:, None, None]
        flat = (slots * P + lag_rows) * M + cols[None, :, None]  # [L, K, b] positions in Fp.reshape(-1)
        # (advanced indexing: its backward accumulates deterministically on CUDA, index_select's does not)
        lagged = Fp.reshape(-1)[flat.reshape(-1)].view(flat.shape).sum(-1)
        if lag_scale is not None:
            lagged = lagged * lag_scale
        per_lag = lagged.unbind(0)
        total = per_lag[0]
        for x in per_lag[1:]:
            total = total + x
        if lag_step_scale and scale is not None:
            total = total * scale
        sums = torch.cat([sums[:n], (sums[n] + total)[None]])
    return step_update(sums, list(prev), residual)


# ---------------------------------------------------------------------------------------------
# data preparation


def first_recorded_step(values: np.ndarray, steps: np.ndarray) -> int:
    """The first step at which any value of ``values [R, S, M]`` (aligned with ``steps``) is recorded."""
    rec = np.isfinite(values).any(axis=(0, 2))
    if not rec.any():
        raise InputError("no recorded values in these runs")
    return int(steps[int(np.argmax(rec))])


@dataclass
class RunBlock:
    """Runs prepared for the engine, on a grid starting at ``first_step``.

    ``values [R, S, M]`` float32 (normalised units, NaN = not recorded), ``rows [R, S-1, b]``
    int64 (provider rows of the batch of grid step k = row k-1; N = padding/ignored),
    ``cols [M]`` int64 provider test columns.
    """

    values: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    first_step: int
    step_scale: torch.Tensor | None = None  # [R, S-1] float32: w of the batch of grid step k = column k-1
    lag_step_scale: bool = False  # lagged factors acting at a step also times that step's w (module docstring)

    def to(self, device: str) -> "RunBlock":
        return RunBlock(self.values.to(device), self.rows.to(device), self.cols.to(device), self.first_step,
                        None if self.step_scale is None else self.step_scale.to(device), self.lag_step_scale)

    def transitions(self, order: int, bridge_gaps: bool = False) -> torch.Tensor:
        """Teacher-forcing targets ``[K, 4]``: (run, k0, k1, test position), predicting the value
        at grid step k1 >= 1 from the recorded value at k0 < k1.

        ``bridge_gaps=False``: only one-step transitions (k0 = k1 - 1) whose target and previous
        ``order`` values (history clamped at grid index 0) are recorded.
        ``bridge_gaps=True``: every recorded target with an earlier recorded value; k0 = the last
        recorded step before k1, and the model is rolled through the k1 - k0 batches in between
        (needed for metrics recorded every few steps). History values before k0 that are not
        recorded are taken equal to the next newer history value (at a segment start: phi_k0).
        """
        V = self.values
        R, S, M = V.shape
        ok = torch.isfinite(V)
        if not bridge_gaps:
            valid = ok[:, 1:].clone()
            for j in range(1, order + 1):
                idx = torch.clamp(torch.arange(1, S, device=V.device) - j, min=0)
                valid &= ok[:, idx]
            tr = valid.nonzero()
            k1 = tr[:, 1] + 1  # column j of valid is grid step k = j + 1
            return torch.stack([tr[:, 0], k1 - 1, k1, tr[:, 2]], dim=1)
        ar = torch.arange(S, device=V.device).view(1, S, 1).expand(R, S, M)
        last = torch.where(ok, ar, torch.full_like(ar, -1)).cummax(dim=1).values  # last recorded index <= k
        prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # last recorded index < k
        valid = ok & (prev >= 0)
        tr = valid.nonzero()
        k0 = prev[tr[:, 0], tr[:, 1], tr[:, 2]]
        return torch.stack([tr[:, 0], k0, tr[:, 1], tr[:, 2]], dim=1)

    def transition_index(self, order: int, bridge_gaps: bool = False) -> "TransitionIndex":
        """The targets of `transitions`, in the same order, without the ``[K, 4]`` tensor:
        ``index[idx]`` (``idx`` LongTensor of positions in 0..K-1) returns ``transitions(...)[idx]``.
        Memory: nothing per transition when every target is usable (the decode is index
        arithmetic), else one int64 flat position per target (and, with ``bridge_gaps``, one
        int32 previous-recorded index per grid value)."""
        return TransitionIndex(self.values, order, bridge_gaps)

    def gather(self, tr: torch.Tensor, order: int, zero_history: bool = False) -> tuple[torch.Tensor, ...]:
        """For targets ``tr [K, 4]`` (see `transitions`): (run [K], k0 [K], gap [K] = k1 - k0,
        cols [K], history [n, K] = phi_k0, phi_k0-1, ... (missing -> newer value; before grid
        index 0: phi_0, or 0 with ``zero_history``), target [K])."""
        r, k0, k1, m = tr[:, 0], tr[:, 1], tr[:, 2], tr[:, 3]
        hist = [self.values[r, k0, m]]
        for j in range(1, order):
            v = self.values[r, torch.clamp(k0 - j, min=0), m]
            if zero_history:
                v = torch.where(k0 - j < 0, torch.zeros_like(v), v)
            hist.append(torch.where(torch.isfinite(v), v, hist[-1]))
        return r, k0, k1 - k0, self.cols[m], torch.stack(hist), self.values[r, k1, m]

    def predict(self, Fp: torch.Tensor, tr: torch.Tensor, order: int, residual: bool,
                zero_history: bool = False, lags: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced predictions and targets [K] for targets ``tr``: one tensor expression
        per step of the longest gap in the minibatch (1 when every step is recorded)."""
        r, k0, gap, cols, hist, target = self.gather(tr, order, zero_history)
        return segment_pred(Fp, self.rows, r, k0, gap, cols, hist, residual, lags, self.step_scale,
                            self.lag_step_scale), target


class TransitionIndex:
    """Teacher-forcing targets of a ``values [R, S, M]`` grid (see `RunBlock.transitions`),
    decoded on demand: ``self[idx]`` -> ``[len(idx), 4]`` (run, k0, k1, test position), equal to
    ``RunBlock.transitions(order, bridge_gaps)[idx]`` (same order: run-major, then step, then
    test position). ``shape`` = ``(K, 4)`` and ``device`` mimic the tensor it replaces.

    Paper-size dynamics (25 runs x 288 steps x 1055 test examples = 7.6 M transitions) need no
    memory per transition when every value is recorded, instead of 243 MB for the ``[K, 4]``
    int64 tensor (plus its ~0.5 GB of intermediates)."""

    def __init__(self, values: torch.Tensor, order: int, bridge_gaps: bool) -> None:
        R, S, M = values.shape
        self.R, self.S, self.M = R, S, M
        self.device = values.device
        self.prev: torch.Tensor | None = None  # [R, S, M] int32: last recorded index < k (bridge_gaps)
        self.flat: torch.Tensor | None = None  # [K] int64 flat (r, k1, m) positions; None = all
        ok = torch.isfinite(values)
        if not bridge_gaps or bool(ok.all()):  # (every value recorded: bridging changes nothing)
            valid = ok[:, 1:].clone()
            for j in range(1, order + 1):
                idx = torch.clamp(torch.arange(1, S, device=values.device) - j, min=0)
                valid &= ok[:, idx]
            self.grid = (R, S - 1, M)  # target k1 = j + 1 of column j
            self.offset = 1
        else:
            prev = torch.empty((R, S, M), dtype=torch.int32, device=values.device)
            ar = torch.arange(S, dtype=torch.int32, device=values.device).view(S, 1).expand(S, M)
            for r in range(R):  # one run at a time bounds the int64 intermediates to [S, M]
                last = torch.where(ok[r], ar, torch.full_like(ar, -1)).cummax(dim=0).values
                prev[r, 0] = -1
                prev[r, 1:] = last[:-1]
            valid = ok & (prev >= 0)
            self.prev = prev
            self.grid = (R, S, M)
            self.offset = 0
        if bool(valid.all()):
            self.K = int(valid.numel())
        else:
            self.flat = valid.reshape(-1).nonzero().squeeze(1)
            self.K = int(self.flat.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.K, 4)

    def __len__(self) -> int:
        return self.K

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        q = idx if self.flat is None else self.flat[idx]
        _, G, M = self.grid
        r = torch.div(q, G * M, rounding_mode="floor")
        rest = q - r * (G * M)
        j = torch.div(rest, M, rounding_mode="floor")
        m = rest - j * M
        k1 = j + self.offset
        k0 = k1 - 1 if self.prev is None else self.prev[r, k1, m].long()
        return torch.stack([r, k0, k1, m], dim=1)


def segment_pred(Fp: torch.Tensor, rows_grid: torch.Tensor, r: torch.Tensor, k0: torch.Tensor, gap: torch.Tensor,
                 cols: torch.Tensor, hist: torch.Tensor, residual: bool, lags: int = 0,
                 scale_grid: torch.Tensor | None = None, lag_step_scale: bool = False) -> torch.Tensor:
    """Roll K segments forward from their recorded start: ``Fp [n+1+L, N+1, M]`` (``lags`` = L),
    ``rows_grid [R, S-1, b]``, run/start index/gap/test column ``[K]``, ``hist [n, K]`` ->
    prediction at k0 + gap. The lagged factors see the grid's earlier batches (before grid
    step 1: padding). ``scale_grid [R, S-1]``: w of each grid step's batch (None: 1);
    ``lag_step_scale``: see `teacher_forced_pred`."""
    G = int(gap.max()) if gap.numel() else 0
    h = list(hist)
    last_row = rows_grid.shape[1] - 1
    pad_row = Fp.shape[1] - 1
    if lags:  # grids with L columns in front (padding batches, whose zero factors make their w irrelevant)
        R, _, b = rows_grid.shape
        rows_pad = torch.cat([rows_grid.new_full((R, lags, b), pad_row), rows_grid], dim=1)
        scale_pad = None if scale_grid is None else torch.cat([scale_grid.new_ones(R, lags), scale_grid], dim=1)
        back_lags = torch.arange(1, lags + 1, device=k0.device)[:, None]
    for s in range(G):
        col = torch.clamp(k0 + s, max=last_row)
        rows = rows_grid[r, col]  # batch of grid step k0 + s + 1
        scale = None if scale_grid is None else scale_grid[r, col]
        lag_rows = lag_scale = None
        if lags:  # [L, K]: padded-grid column of the batch l = 1..L steps back (before grid step 1: padding)
            lag_cols = torch.clamp((k0 + s)[None] - back_lags, max=last_row) + lags
            lag_rows = rows_pad[r[None], lag_cols]
            if scale_pad is not None:
                lag_scale = scale_pad[r[None], lag_cols]
        new = teacher_forced_pred(Fp, rows, cols, torch.stack(h), residual, lag_rows, scale, lag_scale,
                                  lag_step_scale)
        if G == 1:
            h = [new] + h[:-1]
            continue
        act = gap > s
        h = [torch.where(act, new, h[0])] + [torch.where(act, h[j - 1], h[j]) for j in range(1, len(h))]
    return h[0]


def rollout_loss(Fp: torch.Tensor, block: RunBlock, residual: bool, runs: torch.Tensor | None = None,
                 zero_history: bool = False, lags: int = 0) -> torch.Tensor:
    """Mean squared error (normalised units, a differentiable scalar) of rollouts of ``block``'s
    runs (or the subset ``runs``) from the first grid value over all recorded later values;
    NaN if nothing is recorded."""
    V = block.values if runs is None else block.values[runs]
    rows = block.rows if runs is None else block.rows[runs]
    w = block.step_scale if runs is None or block.step_scale is None else block.step_scale[runs]
    start = V[:, 0]
    pred = rollout_tensor(Fp[:, :, block.cols], rows, torch.nan_to_num(start), residual, zero_history, lags, w,
                          block.lag_step_scale)
    # mask before squaring: a NaN target must not reach the gradient (NaN * 0 is NaN)
    ok = torch.isfinite(V[:, 1:]) & torch.isfinite(start)[:, None, :]
    if not ok.any():
        return pred.new_tensor(float("nan"))
    diff = torch.where(ok, pred[:, 1:] - torch.nan_to_num(V[:, 1:]), torch.zeros_like(pred[:, 1:]))
    return (diff * diff).sum() / ok.sum()


def rollout_mse(Fp: torch.Tensor, block: RunBlock, residual: bool, zero_history: bool = False,
                lags: int = 0) -> float:
    """`rollout_loss` as a float."""
    return float(rollout_loss(Fp, block, residual, zero_history=zero_history, lags=lags).detach())


# ---------------------------------------------------------------------------------------------
# fitting


@dataclass
class FitOptions:
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    min_steps_per_epoch: int
    warmup_steps: int
    patience: int
    seed: int
    device: str
    residual: bool
    order: int
    bridge_gaps: bool = True
    objective: str = "teacher_forcing"
    rollout_runs: int = 8
    rollout_phase_keep: str = "if_better"
    optimizer: str = "adamw"
    lr_schedule: str = "warmup_constant"
    early_stopping: str = "patience"
    history_padding: str = "start"
    lags: int = 0  # lagged additive factors D_1..D_L after A_1..A_n, B in the factor tensor


def make_optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``"adamw"``: AdamW, decoupled weight decay; ``"adam_l2"``: Adam with coupled weight decay
    (``weight_decay * p`` added to the gradient, i.e. an L2 term ``weight_decay / 2 * |p|^2`` in
    the loss, as ``torch.optim.Adam(weight_decay=...)`` in the authors' code)."""
    check_choice("optimizer", kind, OPTIMIZERS)
    if kind == "adam_l2":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``.

    ``"warmup_constant"``: (step + 1) / warmup during warmup, then 1. ``"warmup_linear_decay"``
    (transformers' ``get_linear_schedule_with_warmup``, the authors' code): step / warmup during
    warmup (the first step has lr 0), then linear from 1 down to 0 at ``total`` steps
    (= epochs x steps per epoch, the maximum epochs, reached only without early stopping).
    """
    check_choice("lr_schedule", schedule, LR_SCHEDULES)
    warm = max(0, int(warmup))
    if schedule == "warmup_constant":
        return min(1.0, (step + 1) / warm) if warm else 1.0
    if step < warm:
        return step / max(1, warm)
    return max(0.0, (total - step) / max(1, total - warm))


class EarlyStopping:
    """Which epoch's weights to keep and when to stop, from validation rollout MSEs.

    ``"patience"`` (default): the untrained start (``initial``) is a candidate; stop after
    ``patience`` epochs in a row without a new best. ``"consecutive_increases"`` (the authors'
    code): only trained epochs are candidates (best = lowest MSE, kept as best-checkpoint); a
    counter grows by one for each epoch whose MSE is above the previous epoch's and is reset by
    any epoch that is not; stop when it reaches ``patience``. ``patience = 0``: never stop.
    A NaN MSE is never a best and, like the authors' comparisons, does not count as an increase.
    """

    def __init__(self, rule: str, patience: int, initial: float | None = None) -> None:
        self.rule = check_choice("early_stopping", rule, EARLY_STOPPING)
        self.patience = int(patience)
        self.best, self.best_epoch, self.count = float("inf"), -1, 0
        self.prev = float("inf")
        if rule == "patience" and initial is not None and math.isfinite(initial):
            self.best, self.best_epoch = initial, 0

    def update(self, epoch: int, v: float) -> tuple[bool, bool]:
        """Record epoch ``epoch``'s MSE ``v``: (new best, stop now)."""
        better = v < self.best  # False for NaN
        if better:
            self.best, self.best_epoch = v, epoch
        if self.rule == "patience":
            self.count = 0 if better else self.count + 1
        else:
            self.count = self.count + 1 if v > self.prev else 0
            self.prev = v
        return better, self.patience > 0 and self.count >= self.patience


def fit_engine(module: torch.nn.Module, factor_fn: FactorFn, fit: RunBlock, val: RunBlock | None,
               opt: FitOptions, progress: bool = False, desc: str = "fit",
               penalty: Callable[[], torch.Tensor] | None = None, start_competes: bool = True) -> dict[str, Any]:
    """Teacher-forced MSE fitting (targets from `RunBlock.transitions`) with ``opt.optimizer``
    (AdamW, decoupled weight decay as the L2 term, or Adam with coupled weight decay), the
    ``opt.lr_schedule`` (linear warmup, then constant or linear decay to 0 at the last epoch),
    early stopping on the validation rollout MSE by ``opt.early_stopping`` (best weights kept).

    ``factor_fn()`` must return ``F [n+1, N, M]`` computed from ``module``'s parameters;
    ``penalty()``, when given, is added to every minibatch loss (Simfluence's unsquared L2 term).
    ``start_competes=False``: with the ``"patience"`` rule, the weights the fit starts from are not
    a candidate for the best epoch (a trained epoch is always kept).
    Returns a history dict (per-epoch train loss, penalty included, and validation MSE in
    normalised units).
    """
    if opt.objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {OBJECTIVES}, got {opt.objective!r}")
    if opt.objective == "teacher_forcing_then_rollout":
        return _fit_two_phase(module, factor_fn, fit, val, opt, progress, desc, penalty)
    check_choice("history_padding", opt.history_padding, HISTORY_PADDINGS)
    zh = opt.history_padding == "zeros"
    torch.manual_seed(opt.seed)
    gen = torch.Generator(device="cpu").manual_seed(opt.seed)
    tr_all = fit.transition_index(opt.order, opt.bridge_gaps)  # tr_all[idx] == fit.transitions(...)[idx]
    K = int(tr_all.shape[0])
    if K == 0:
        raise InputError("no usable transitions: no recorded value follows another recorded value"
                         + ("" if opt.bridge_gaps else " at the next step (bridge_gaps=True rolls through gaps)"))
    rollout = opt.objective == "rollout"
    if rollout:  # an epoch = one pass over the fit runs, `rollout_runs` whole runs per step
        R = int(fit.values.shape[0])
        bs = R if opt.rollout_runs <= 0 else min(opt.rollout_runs, R)
        steps_per_epoch = math.ceil(R / bs)
        K = R
    else:
        bs = K if opt.batch_size <= 0 else min(opt.batch_size, K)
        if opt.min_steps_per_epoch > 0:
            bs = min(bs, max(64, math.ceil(K / opt.min_steps_per_epoch)))
        steps_per_epoch = math.ceil(K / bs)
    params = [p for p in module.parameters() if p.requires_grad]
    optim = make_optimizer(opt.optimizer, params, opt.lr, opt.weight_decay)
    total_steps = max(1, opt.epochs) * steps_per_epoch
    schedule, warm = opt.lr_schedule, opt.warmup_steps
    lr_factor(schedule, 0, warm, total_steps)  # checks the schedule's name before any work
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(schedule, s, warm, total_steps))

    history: dict[str, Any] = {"train_loss": [], "val_mse": [], "transitions": K, "batch_size": bs,
                               "steps_per_epoch": steps_per_epoch}
    best_state = copy.deepcopy(module.state_dict())
    v0 = None
    if val is not None:
        with torch.no_grad():
            v0 = rollout_mse(pad_factors(factor_fn()), val, opt.residual, zh, opt.lags)
        history["val_mse_init"] = v0
    stopper = EarlyStopping(opt.early_stopping, opt.patience, v0 if start_competes else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=opt.epochs, desc=desc, unit="epoch", leave=False)
    t0 = time.perf_counter()
    for epoch in range(1, opt.epochs + 1):
        perm = torch.randperm(K, generator=gen).to(tr_all.device)
        total, count = 0.0, 0
        module.train()
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            if rollout:
                loss = rollout_loss(pad_factors(factor_fn()), fit, opt.residual, runs=idx, zero_history=zh,
                                    lags=opt.lags)
                if not torch.isfinite(loss):
                    continue
            else:
                pred, target = fit.predict(pad_factors(factor_fn()), tr_all[idx], opt.order, opt.residual, zh,
                                           opt.lags)
                loss = torch.mean((pred - target) ** 2)
            if penalty is not None:
                loss = loss + penalty()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += float(loss.detach()) * idx.shape[0]
            count += idx.shape[0]
        history["train_loss"].append(total / max(count, 1))
        module.eval()
        stop = False
        if val is not None:
            with torch.no_grad():
                v = rollout_mse(pad_factors(factor_fn()), val, opt.residual, zh, opt.lags)
            history["val_mse"].append(v)
            better, stop = stopper.update(epoch, v)
            if better:
                best_state = copy.deepcopy(module.state_dict())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.4g}",
                            **({"val": f"{history['val_mse'][-1]:.4g}"} if history["val_mse"] else {}))
        if stop:
            break
    if bar is not None:
        bar.close()
    best_val, best_epoch = stopper.best, stopper.best_epoch
    if val is not None and best_epoch >= 0:
        module.load_state_dict(best_state)
    history.update(epochs_run=len(history["train_loss"]), best_epoch=best_epoch if val is not None else len(history["train_loss"]),
                   best_val_mse=best_val if val is not None and math.isfinite(best_val) else None,
                   seconds=time.perf_counter() - t0)
    return history


def _fit_two_phase(module: torch.nn.Module, factor_fn: FactorFn, fit: RunBlock, val: RunBlock | None,
                   opt: FitOptions, progress: bool, desc: str,
                   penalty: Callable[[], torch.Tensor] | None) -> dict[str, Any]:
    """``objective="teacher_forcing_then_rollout"``: a teacher-forced fit (to its early-stopping
    best), then, from those weights, a rollout fit (``rollout_runs`` whole fit runs per step,
    backpropagated through time) with the same options. The rollout phase's early stopping counts
    the teacher-forced weights as its start, so they are kept unless a rollout epoch beats them on
    the validation runs (rule ``"patience"``), or, with ``opt.rollout_phase_keep="best_epoch"``,
    the rollout phase's best validation epoch is kept even where it validates worse than them.

    History: per-epoch ``train_loss`` / ``val_mse`` of both phases in order; ``epochs_run`` and
    ``best_epoch`` count epochs over both phases (0 = the untrained start);
    ``rollout_phase_best_epoch`` (0 = the teacher-forced weights were kept); the teacher-forced
    phase's own history under ``"teacher_forcing"``."""
    check_choice("rollout_phase_keep", opt.rollout_phase_keep, ROLLOUT_PHASE_KEEP)  # before any fitting
    first = fit_engine(module, factor_fn, fit, val, replace(opt, objective="teacher_forcing"),
                       progress, desc + " (teacher forcing)", penalty)
    second = fit_engine(module, factor_fn, fit, val, replace(opt, objective="rollout"),
                        progress, desc + " (rollout)", penalty,
                        start_competes=opt.rollout_phase_keep == "if_better")
    n1 = first["epochs_run"]
    kept_first = val is not None and second["best_epoch"] == 0
    hist = dict(second)
    hist.update(
        train_loss=first["train_loss"] + second["train_loss"],
        val_mse=first["val_mse"] + second["val_mse"],
        epochs_run=n1 + second["epochs_run"],
        best_epoch=first["best_epoch"] if kept_first else n1 + second["best_epoch"],
        rollout_phase_best_epoch=second["best_epoch"],
        transitions=first["transitions"],  # teacher-forcing transitions (the rollout phase counts runs)
        seconds=first["seconds"] + second["seconds"],
        teacher_forcing=first,
    )
    if "val_mse_init" in first:
        hist["val_mse_init"] = first["val_mse_init"]
    return hist


def iter_chunks(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
