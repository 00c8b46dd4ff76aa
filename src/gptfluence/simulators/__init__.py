"""Simulators of training dynamics: one protocol (`base.Simulator`), one registry of methods.

Every method name maps to a `MethodSpec` in `METHODS`: the simulator class, its config dataclass
(None for methods without hyper-parameters) and, for presets, the config fields that make the
preset (applied before any user override). Build with `make_simulator`, reload with
`load_simulator` (which refuses artifacts made for another store, metric or encoder). The
method name is recorded in every artifact and result, so a preset is never confused with the
class it runs on.

Methods: ``gptfluence`` (featurized, n-th order; this library's variant), ``simfluence``
(free per-pair factors), ``gptfluence_paper`` and ``simfluence_paper`` (the authors' exact
configurations, `PAPER_PRESETS`), ``tracin_cp`` and ``grad_dot`` (gradient baselines,
`simulators.tracin`), ``constant`` and ``mean_curve`` (trivial references).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.features.encoders import Encoder, HashingBowEncoder, resolve_encoder
from gptfluence.simulators.base import Simulator
from gptfluence.simulators.common import FitConfig, check_against, config_from, read_artifact
from gptfluence.simulators.gptfluence import GPTfluenceConfig, GPTfluenceSimulator
from gptfluence.simulators.simfluence import SimfluenceConfig, SimfluenceSimulator
from gptfluence.simulators.tracin import GradDotSimulator, TracInConfig, TracInSimulator
from gptfluence.simulators.trivial import ConstantSimulator, MeanCurveSimulator


@dataclass(frozen=True)
class MethodSpec:
    """What a method name stands for.

    ``cls``: the simulator class (constructed as ``cls(metric, config)``, or ``cls(metric)``
    when ``config_cls`` is None); ``preset``: config fields fixed by this method (a named
    configuration such as the paper's), applied before user overrides; ``takes_encoder``:
    whether the class accepts an ``encoder=`` object; ``description``: one line for tables and
    ``--help``.
    """

    name: str
    cls: type
    config_cls: type | None = None
    preset: dict[str, Any] = field(default_factory=dict)
    takes_encoder: bool = False
    description: str = ""
    run_by_default: bool = True  # evaluate / lds run it when no methods are named (the costly paper presets do not)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to `METHODS` (a name is registered once)."""
    if spec.name in METHODS:
        raise ValueError(f"simulator method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


register_method(MethodSpec(
    "gptfluence", GPTfluenceSimulator, GPTfluenceConfig, takes_encoder=True,
    description="GPTfluence, this library's variant (see GPTfluenceConfig: linear separate projections of centred "
                "MiniLM features, raw and K-FAC-whitened gradient-similarity terms at checkpoints, detrended, "
                "normalised, teacher forcing then rollouts)"))
register_method(MethodSpec("simfluence", SimfluenceSimulator, SimfluenceConfig,
                           description="Simfluence-Linear, this library's variant (zero init, detrended, normalised)"))
register_method(MethodSpec("constant", ConstantSimulator, description="reference: the start value at every step"))
register_method(MethodSpec("mean_curve", MeanCurveSimulator,
                           description="reference: start + the fit runs' mean change per step (ignores the curriculum)"))
register_method(MethodSpec("tracin_cp", TracInSimulator, TracInConfig,
                           description="TracIn-CP rollout: phi_t = phi_{t-1} - s eta_t sum_{i in batch} <g_i, g_m> at the "
                                       "checkpoint every k steps (default k = 1, a replayed reference run; one fitted scale)"))
register_method(MethodSpec("grad_dot", GradDotSimulator, TracInConfig, preset={"checkpoint_every": 0},
                           description="Grad-Dot rollout: like tracin_cp with the base model's gradients only "
                                       "(ignores checkpoint_every and gradient_source)"))

# The authors' configurations (ernie-research/gptfluence: train.py, model/EncSimulator.py,
# model/NOrder_EncSimulator.py, dataset/simfluence_dataset.py, utils/eval.py, run_enc_sim.sh,
# run_original.sh, model/Simulator.py); item by item with its source in `gptfluence.simulators.presets`.
from gptfluence.simulators.presets import PAPER_PRESETS  # noqa: E402

register_method(MethodSpec(
    "gptfluence_paper", GPTfluenceSimulator, GPTfluenceConfig, preset=PAPER_PRESETS["gptfluence"], takes_encoder=True,
    run_by_default=False,
    description="GPTfluence as in the authors' code (MiniLM CLS features, one 384-384-384 MLP per factor for both "
                "sides, alpha = sum A, raw values, Adam + L2, lr 1e-4, batch 128, warmup 200 + linear decay)"))
register_method(MethodSpec(
    "simfluence_paper", SimfluenceSimulator, SimfluenceConfig, preset=PAPER_PRESETS["simfluence"], run_by_default=False,
    description="Simfluence-Linear as in the authors' code (N(0,1) init, alpha = sum A, raw values, Adam + L2, "
                "lr 1e-3, batch 128, warmup 200 + linear decay)"))


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(METHODS)


def default_method_names() -> tuple[str, ...]:
    """The methods `evaluate` runs when none are named: every registered method except presets
    marked ``run_by_default=False`` (the paper presets, hours on a CPU, run only when named)."""
    return tuple(m for m, spec in METHODS.items() if spec.run_by_default)


def method_spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise InputError(f"unknown simulator method {method!r} (known: {', '.join(METHODS)})") from None


def method_config(method: str, config: Any = None, **overrides: Any) -> Any:
    """The full config object of ``method``: defaults, then the method's preset, then ``config``
    (a dataclass or dict of fields), then ``overrides``. None for methods without a config."""
    spec = method_spec(method)
    if spec.config_cls is None:
        if config or overrides:
            raise InputError(f"simulator {method!r} takes no config (got {sorted(overrides) or config})")
        return None
    from gptfluence.config import to_dict

    base = dict(spec.preset)
    if config is not None:
        base.update(config if isinstance(config, dict) else to_dict(config))
    return config_from(spec.config_cls, base, overrides, f"{method} config")


def heldout_configs(methods: Sequence[str], configs: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Per-method config overrides for simulating held-out curricula: a copy of ``configs`` where
    every method whose config has an ``unseen`` policy (Simfluence) gets ``unseen="zero"`` unless
    given (held-out curricula may hold ids no fit run used; they then contribute nothing, and the
    choice is recorded with the method's config)."""
    out = {k: dict(v) for k, v in (configs or {}).items()}
    for m in methods:
        cls = method_spec(m).config_cls
        if cls is not None and "unseen" in {f.name for f in dataclasses.fields(cls)}:
            out.setdefault(m, {}).setdefault("unseen", "zero")
    return out


class EncoderPool:
    """Encoders for many fits: the ``given`` encoder object, else one loaded encoder per distinct
    encoder spec in the methods' configs (MiniLM is loaded once per evaluation, not per fit)."""

    def __init__(self, given: Encoder | None = None) -> None:
        self.given = given
        self._loaded: dict[str, Encoder] = {}

    def for_method(self, method: str, config: dict[str, Any] | None) -> Encoder | None:
        """The encoder ``method`` fits with (None for methods that take none)."""
        if not method_spec(method).takes_encoder:
            return None
        if self.given is not None:
            return self.given
        spec = (config or {})["encoder"]
        if spec not in self._loaded:
            self._loaded[spec] = resolve_encoder(spec)
        return self._loaded[spec]


def make_simulator(method: str, metric: str = "loss", encoder: Encoder | str | None = None, config: Any = None,
                   **overrides: Any) -> Simulator:
    """A new, unfitted simulator of ``method`` for ``metric``. ``config``: a dataclass or dict of
    fields of the method's config class; ``overrides``: more fields (see `method_config`).
    ``encoder``: an encoder object (or spec string) for methods that take one; ignored by the others."""
    spec = method_spec(method)
    cfg = method_config(method, config, **overrides)
    if cfg is None:
        sim = spec.cls(metric)
    elif spec.takes_encoder and encoder is not None:
        sim = spec.cls(metric, cfg, encoder=encoder)
    else:
        sim = spec.cls(metric, cfg)
    sim.method = method  # presets run on their class under their own name
    return sim


def load_simulator(path: str | os.PathLike, dynamics: Dynamics | None = None, encoder: Encoder | None = None,
                   allow_new_examples: bool = False) -> Simulator:
    """Load a simulator folder written by ``save``.

    With ``dynamics``: refuses (`ArtifactMismatchError`) a simulator of a metric the store does
    not record or fitted on other training/test examples (sha256 of the store manifest), unless
    ``allow_new_examples`` (methods that simulate unseen examples only: the store's examples are
    then prepared with `Simulator.prepare`). With ``encoder``: refuses a featurized simulator whose
    features came from an encoder with another spec.
    """
    meta, tensors = read_artifact(path)
    method = meta["method"]
    if method not in METHODS:
        raise ArtifactMismatchError(f"{path}: unknown simulator method {method!r} (known: {', '.join(METHODS)})")
    spec = METHODS[method]
    if allow_new_examples and not getattr(spec.cls, "simulates_unseen_examples", False):
        raise InputError(f"{method} cannot be used with other examples than it was fitted on "
                         f"(methods that can: {', '.join(m for m, s in METHODS.items() if getattr(s.cls, 'simulates_unseen_examples', False))})")
    check_against(meta, dynamics, str(path), strict_examples=not allow_new_examples)
    if spec.takes_encoder:
        sim = spec.cls._from_artifact(meta, tensors, encoder=encoder)
    else:
        sim = spec.cls._from_artifact(meta, tensors)
    sim.method = method
    if dynamics is not None and allow_new_examples:
        sim.prepare(dynamics, dynamics.train_ids, dynamics.test_ids)
    return sim


__all__ = [
    "Simulator", "MethodSpec", "METHODS", "EncoderPool", "register_method", "method_names", "default_method_names", "method_spec", "method_config",
    "make_simulator", "load_simulator", "GPTfluenceSimulator", "GPTfluenceConfig", "SimfluenceSimulator",
    "SimfluenceConfig", "TracInSimulator", "TracInConfig", "ConstantSimulator", "MeanCurveSimulator", "FitConfig", "Encoder", "HashingBowEncoder",
    "resolve_encoder",
]
