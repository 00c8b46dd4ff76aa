"""Simulators of training dynamics: one protocol (`base.Simulator`), one matrix-form engine.

Methods: ``gptfluence`` (featurized, n-th order), ``simfluence`` (free per-pair factors),
``constant`` and ``mean_curve`` (trivial references). Build with `make_simulator`, reload with
`load_simulator` (which refuses artifacts made for another store, metric or encoder).
"""

from __future__ import annotations

import os
from typing import Any

from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.simulators.base import Simulator
from gptfluence.simulators.common import FitConfig, check_against, read_artifact
from gptfluence.simulators.encoders import Encoder, HashingBowEncoder, resolve_encoder
from gptfluence.simulators.gptfluence import GPTfluenceConfig, GPTfluenceSimulator
from gptfluence.simulators.simfluence import SimfluenceConfig, SimfluenceSimulator
from gptfluence.simulators.trivial import ConstantSimulator, MeanCurveSimulator

SIMULATOR_CLASSES: dict[str, type] = {
    "gptfluence": GPTfluenceSimulator,
    "simfluence": SimfluenceSimulator,
    "constant": ConstantSimulator,
    "mean_curve": MeanCurveSimulator,
}
SIMULATOR_METHODS: tuple[str, ...] = tuple(SIMULATOR_CLASSES)
CONFIG_CLASSES: dict[str, type | None] = {
    "gptfluence": GPTfluenceConfig, "simfluence": SimfluenceConfig, "constant": None, "mean_curve": None,
}


def make_simulator(method: str, metric: str = "loss", encoder: Encoder | None = None, **config: Any) -> Simulator:
    """A new, unfitted simulator. ``config``: fields of the method's config dataclass
    (`GPTfluenceConfig`, `SimfluenceConfig`; the trivial methods take none) or ``config=`` a
    dataclass/dict. ``encoder`` is used by gptfluence only."""
    if method not in SIMULATOR_CLASSES:
        raise InputError(f"unknown simulator method {method!r} (known: {', '.join(SIMULATOR_METHODS)})")
    cls = SIMULATOR_CLASSES[method]
    base = config.pop("config", None)
    if method == "gptfluence":
        if encoder is not None and not isinstance(encoder, str):
            return cls(metric, base, encoder=encoder, **config)
        if isinstance(encoder, str):
            config["encoder"] = encoder
        return cls(metric, base, **config)
    if method == "simfluence":
        return cls(metric, base, **config)
    if config or base:
        raise InputError(f"simulator {method!r} takes no config (got {sorted(config) or base})")
    return cls(metric)


def load_simulator(path: str | os.PathLike, dynamics: Dynamics | None = None, encoder: Encoder | None = None,
                   allow_new_examples: bool = False) -> Simulator:
    """Load a simulator folder written by ``save``.

    With ``dynamics``: refuses (`ArtifactMismatchError`) a simulator of a metric the store does
    not record or fitted on other training/test examples (sha256 of the store manifest), unless
    ``allow_new_examples`` (gptfluence only: the store's examples are then embedded with the
    simulator's encoder). With ``encoder``: refuses a gptfluence simulator whose features came
    from an encoder with another spec.
    """
    meta, tensors = read_artifact(path)
    method = meta["method"]
    if method not in SIMULATOR_CLASSES:
        raise ArtifactMismatchError(f"{path}: unknown simulator method {method!r} (known: {', '.join(SIMULATOR_METHODS)})")
    if allow_new_examples and method != "gptfluence":
        raise InputError(f"{method} cannot be used with other examples than it was fitted on (only gptfluence can)")
    check_against(meta, dynamics, str(path), strict_examples=not allow_new_examples)
    cls = SIMULATOR_CLASSES[method]
    if method == "gptfluence":
        sim = cls._from_artifact(meta, tensors, encoder=encoder)
        if dynamics is not None and allow_new_examples:
            sim.ensure_features(dynamics, dynamics.train_ids, dynamics.test_ids)
        return sim
    return cls._from_artifact(meta, tensors)


__all__ = [
    "Simulator", "SIMULATOR_METHODS", "SIMULATOR_CLASSES", "CONFIG_CLASSES", "make_simulator", "load_simulator",
    "GPTfluenceSimulator", "GPTfluenceConfig", "SimfluenceSimulator", "SimfluenceConfig", "ConstantSimulator",
    "MeanCurveSimulator", "FitConfig", "Encoder", "HashingBowEncoder", "resolve_encoder",
]
