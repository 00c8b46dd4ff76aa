"""The one Simulator protocol shared by every method (GPTfluence, Simfluence, TracIn-CP, ...).

A simulator predicts a metric's trajectory for every test example under a curriculum.

Step convention: ``curricula[r, t-1]`` holds the training ids of optimizer step t (-1 pads short
batches). ``simulate(..., start, first_step=s)`` returns ``out [R, T+1-s, M]`` with
``out[:, 0] = start`` (the metric at step s, e.g. 0 = before fine-tuning, or the first recorded
step of imported data) and ``out[:, k]`` the predicted value after step ``s + k``, computed from
the batch of step ``s + k``. A simulator of Markov order n > 1 treats the history before
``start`` as equal to ``start`` (phi_{s-1} = ... = phi_{s-n+1} = phi_s).

Evaluation and influence code call only this protocol and never special-case a method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from gptfluence.dynamics.store import Dynamics


@runtime_checkable
class Simulator(Protocol):
    method: str  # the registered method name (`gptfluence.simulators.METHODS`), presets included
    metric: str  # the metric it simulates: "loss", "bleu", "rougeL", "accuracy"

    simulates_unseen_examples: bool  # whether prepare() can make unseen training / test examples simulatable

    def prepare(self, dynamics: Dynamics, train_ids: Sequence[int] = (), test_ids: Sequence[int] = ()) -> None:
        """Make the store's examples ``train_ids`` / ``test_ids`` simulatable before `simulate`
        (e.g. embed those the simulator has no features for). A no-op for methods that need
        nothing; methods without parameters for unseen ids keep their ``unseen`` policy."""

    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str], val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        """Fit on the runs ``fit_runs`` (early-stop on ``val_runs``); returns a fit history dict."""

    def simulate(self, curricula: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                 first_step: int = 0) -> np.ndarray:
        """Roll out: curricula [R, T, b] int, test_ids [M], start [R, M] -> [R, T+1-first_step, M]."""

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` (method, metric, hyper-parameters, metadata) + ``weights.safetensors``
        into the folder ``path`` (new, empty or a simulator artifact; another non-empty folder only
        with ``overwrite``, and then nothing but these two files is written)."""
