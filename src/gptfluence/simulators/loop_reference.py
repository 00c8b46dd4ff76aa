"""Reference implementations of the same model, with the research code's structure.

`loop_rollout`: one trajectory (run, test example) at a time, one step at a time; at each step
the factor MLPs are called on that step's batch and the test example, and the recurrence is
applied to scalars (the authors' validation rollouts work so). `loop_teacher_forced_loss`: one
model call per transition (a check, slower than the authors' training). `batched_transition_pred`:
teacher forcing as the authors' training loop does it, the MLPs once per batch of transitions on
all its (transition, example) rows. They exist to check the matrix-form engine (tests: equal
rollouts, predictions and loss gradients) and to measure what the matrix form buys
(`benchmarks/simulators.py`). Never use them for real work.
"""

from __future__ import annotations

from typing import Callable

import torch

PairFn = Callable[[int, torch.Tensor, int], torch.Tensor]
"""pair_fn(k, train_rows [b] (no padding), test_col) -> factor k of each (row, col) pair, [b]."""


def featurized_pair_fn(module: torch.nn.Module, h_train: torch.Tensor, h_test: torch.Tensor,
                       s_train: torch.Tensor | None = None, s_test: torch.Tensor | None = None) -> PairFn:
    """Per-pair factors of a `FeaturizedFactors` module: MLP calls on the batch's features
    (``s_*``: the similarity features, when the module has a similarity term)."""
    if s_train is None:
        return lambda k, rows, col: module.pair(k, h_train[rows], h_test[col])
    return lambda k, rows, col: module.pair(k, h_train[rows], h_test[col], s_train[rows], s_test[col])


def table_pair_fn(F: torch.Tensor) -> PairFn:
    """Per-pair factors looked up in a table ``F [n+1, N, M]`` (Simfluence)."""
    return lambda k, rows, col: F[k, rows, col]


def _step(pair_fn: PairFn, order: int, rows: torch.Tensor, col: int, hist: list[torch.Tensor],
          residual: bool) -> torch.Tensor:
    rows = rows[rows >= 0]
    if rows.numel() == 0:
        sums = [torch.zeros(()) for _ in range(order + 1)]
    else:
        sums = [pair_fn(k, rows, col).sum() for k in range(order + 1)]
    out = sums[order] + (hist[0] if residual else 0.0)
    for j in range(order):
        out = out + sums[j] * hist[j]
    return out


def loop_rollout(pair_fn: PairFn, order: int, rows: torch.Tensor, cols: torch.Tensor, start: torch.Tensor,
                 residual: bool = True) -> torch.Tensor:
    """``rows [R, T, b]`` (provider rows, -1 = padding), ``cols [M]``, ``start [R, M]`` ->
    ``[R, T+1, M]``, computed trajectory by trajectory and step by step."""
    R, T, _ = rows.shape
    M = cols.shape[0]
    out = torch.empty(R, T + 1, M)
    with torch.no_grad():
        for r in range(R):
            for m in range(M):
                col = int(cols[m])
                hist = [start[r, m]] * order
                out[r, 0, m] = start[r, m]
                for t in range(T):
                    new = _step(pair_fn, order, rows[r, t], col, hist, residual)
                    out[r, t + 1, m] = new
                    hist = [new] + hist[:-1]
    return out


def loop_teacher_forced_loss(pair_fn: PairFn, order: int, values: torch.Tensor, rows: torch.Tensor,
                             cols: torch.Tensor, residual: bool = True, bridge_gaps: bool = False) -> torch.Tensor:
    """Mean squared teacher-forced error, one model call per transition and step.

    ``values [R, S, M]``, ``rows [R, S-1, b]`` (-1 = padding), ``cols [M]``. Without
    ``bridge_gaps``: every target whose previous ``order`` values (history clamped at grid index
    0) are finite, predicted in one step. With it: every finite target k1 >= 1 with an earlier
    finite value; rolled from the last finite k0 < k1 through the batches in between, history
    before k0 that is not finite taken equal to the next newer history value.
    """
    R, S, M = values.shape
    total = torch.zeros(())
    count = 0
    for r in range(R):
        for m in range(M):
            for k1 in range(1, S):
                target = values[r, k1, m]
                if not torch.isfinite(target):
                    continue
                if bridge_gaps:
                    k0 = max((k for k in range(k1) if torch.isfinite(values[r, k, m])), default=-1)
                    if k0 < 0:
                        continue
                    hist = [values[r, k0, m]]
                    for j in range(1, order):
                        v = values[r, max(k0 - j, 0), m]
                        hist.append(v if torch.isfinite(v) else hist[-1])
                else:
                    k0 = k1 - 1
                    hist = [values[r, max(k1 - j, 0), m] for j in range(1, order + 1)]
                    if not all(torch.isfinite(p) for p in hist):
                        continue
                for k in range(k0 + 1, k1 + 1):
                    new = _step(pair_fn, order, rows[r, k - 1], int(cols[m]), hist, residual)
                    hist = [new] + hist[:-1]
                total = total + (hist[0] - target) ** 2
                count += 1
    return total / max(count, 1)


def batched_transition_pred(module: torch.nn.Module, h_train: torch.Tensor, h_test: torch.Tensor, rows: torch.Tensor,
                            cols: torch.Tensor, prev: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """Teacher-forced predictions for K transitions with the structure of the authors' training
    loop: the factor MLPs run once per *batch of transitions*, on every (transition, batch
    example) row and on every transition's test example (K x b + K rows per factor), and the
    products are summed per transition. ``module``: a `FeaturizedFactors` without similarity
    term; ``rows [K, b]`` (training rows, -1 = padding), ``cols [K]``, ``prev [n, K]`` (true
    phi_{t-1}..phi_{t-n}) -> ``[K]``. The matrix-form engine instead computes every factor of the
    pool once per optimizer step (N + M rows) and gathers; `benchmarks/simulators.py` times both.
    """
    x_src = h_train[rows.clamp(min=0)] - module.center  # [K, b, H]
    x_tgt = h_test[cols] - module.center  # [K, H]
    sums = []
    for k in range(module.order + 1):
        a = (module.f[k](x_src) * module._g(k)(x_tgt)[:, None, :]).sum(-1)  # [K, b]
        if module.bias is not None:
            a = a + module.bias[k]
        sums.append(torch.where(rows >= 0, a, torch.zeros_like(a)).sum(1))
    out = torch.stack(sums)[module.order] + (prev[0] if residual else 0.0)
    for j in range(module.order):
        out = out + sums[j] * prev[j]
    return out
