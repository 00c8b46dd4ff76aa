"""Simfluence-Linear (Guu et al. 2023): free per-pair factors, first order.

    phi_t[m] = (1 + sum_{i in c_t} A[i, m]) phi_{t-1}[m] + sum_{i in c_t} B[i, m]

A [N, M] (dimensionless) and B [N, M] (normalised metric units) are free parameters for every
training id seen in the fit runs' curricula x every test id recorded in the fit runs, initialised
to 0 (``init="zeros"``, default: the first rollouts are constant; the authors' N(0, 1) init,
``init="normal"``, diverges) and L2-regularised through the optimizer's weight decay. The identity
offset on alpha (``residual=True``, default) is the same reparametrisation as in GPTfluence (the
original alpha = sum A with A^orig = A + 1/b for full batches of size b); ``residual=False`` is the
original alpha = sum A. ``l2_penalty`` = lambda adds lambda * (||A||_2 + ||B||_2) to every
minibatch loss: the *unsquared* Euclidean norms of all of A and of all of B, as the authors' code
computes its L2 term (their run script sets lambda = 0).

Unseen ids: Simfluence has no parameters for them. ``unseen="error"`` (default) raises InputError
naming the id; ``unseen="zero"`` lets an unseen training example contribute nothing (alpha += 0,
beta += 0) and gives an unseen test example a constant trajectory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from gptfluence.config import arg
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError
from gptfluence.simulators import engine
from gptfluence.simulators.common import (UNSEEN_POLICIES, FitConfig, RecurrenceSimulator, config_error, flag_name,
                                         config_from, stored_config, write_artifact)

INITS = ("zeros", "normal")


@dataclasses.dataclass
class SimfluenceConfig(FitConfig):
    """Hyper-parameters of Simfluence-Linear."""

    unseen: str = arg("error", "what simulate() does with ids not seen in fitting: 'error' or 'zero' (contribute nothing)")
    residual: bool = arg(True, "alpha = 1 + sum A (stable start); false = the original alpha = sum A")
    init: str = arg("zeros", "initial A, B: zeros or normal (N(0, 1), the authors' code)")
    l2_penalty: float = arg(0.0, "lambda of the term lambda * (||A||_2 + ||B||_2) (unsquared norms over all pairs, the authors' code) added to every minibatch loss; 0 = none")

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("unseen", UNSEEN_POLICIES), ("init", INITS)):
            engine.check_choice(flag_name(name), getattr(self, name), allowed)
        if not self.l2_penalty >= 0:
            raise config_error(self, "l2_penalty", ">= 0")


class FreeFactors(nn.Module):
    """F [2, N, M] = (A, B) as free parameters over (train row, test column)."""

    def __init__(self, n_train: int, n_test: int, init: str = "zeros") -> None:
        super().__init__()
        self.F = nn.Parameter(torch.zeros(2, n_train, n_test) if init == "zeros" else torch.randn(2, n_train, n_test))

    def forward(self) -> torch.Tensor:
        return self.F


def _lookup(ids: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``ids`` in sorted ``known`` and a mask of which are present."""
    pos = np.searchsorted(known, ids)
    pos = np.minimum(pos, max(known.size - 1, 0))
    ok = known.size > 0
    present = (known[pos] == ids) if ok else np.zeros(ids.shape, bool)
    return pos, present


class SimfluenceSimulator(RecurrenceSimulator):
    method = "simfluence"
    per_pair_parameters = True

    def __init__(self, metric: str = "loss", config: SimfluenceConfig | dict | None = None, **overrides: Any) -> None:
        super().__init__(metric)
        self.config: SimfluenceConfig = config_from(SimfluenceConfig, config, overrides, "simfluence config")
        self.order = 1
        self.residual = self.config.residual
        self.train_ids = np.zeros(0, np.int64)  # sorted ids with parameters
        self.test_ids = np.zeros(0, np.int64)
        self.module: FreeFactors | None = None

    def _init_params(self, dynamics: Dynamics, train_ids: np.ndarray, test_ids: np.ndarray,
                     fit_train_ids: np.ndarray, fit_runs: Sequence[str]) -> None:
        self.train_ids = np.asarray(fit_train_ids, dtype=np.int64)
        self.test_ids = np.asarray(test_ids, dtype=np.int64)
        torch.manual_seed(self.config.seed)
        self.module = FreeFactors(self.train_ids.size, self.test_ids.size, self.config.init)

    def _penalty(self) -> Callable[[], torch.Tensor] | None:
        """``l2_penalty * (||A||_2 + ||B||_2)`` over all fitted pairs (None when 0)."""
        lam = float(self.config.l2_penalty)
        if lam == 0:
            return None
        module = self.module
        assert module is not None
        return lambda: lam * (module.F[0].norm() + module.F[1].norm())

    def _factor_fn(self, train_ids: np.ndarray, test_ids: np.ndarray, unseen: str) -> Callable[[], torch.Tensor]:
        assert self.module is not None
        tr = np.asarray(train_ids, dtype=np.int64)
        te = np.asarray(test_ids, dtype=np.int64)
        rpos, rok = _lookup(tr, self.train_ids)
        cpos, cok = _lookup(te, self.test_ids)
        if unseen == "error":
            if not rok.all():
                raise InputError(f"simfluence has no parameters for training id {int(tr[~rok][0])}; it cannot simulate "
                                 f"unseen examples (unseen='zero', --unseen zero, lets them contribute nothing)")
            if not cok.all():
                raise InputError(f"simfluence has no parameters for test id {int(te[~cok][0])}; it cannot simulate "
                                 f"unseen examples (unseen='zero', --unseen zero, gives a constant trajectory)")
        dev = self.device
        rpos = np.where(rok, rpos, self.train_ids.size)  # index of the zero row
        cpos = np.where(cok, cpos, self.test_ids.size)
        r = torch.as_tensor(rpos, device=dev)
        c = torch.as_tensor(cpos, device=dev)
        module = self.module.to(dev)

        def fn() -> torch.Tensor:
            F = module()
            F = torch.cat([F, F.new_zeros(2, 1, F.shape[2])], dim=1)
            F = torch.cat([F, F.new_zeros(2, F.shape[1], 1)], dim=2)
            return F[:, r][:, :, c]

        return fn

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        if self.module is None:
            raise InputError("simfluence simulator is not fitted; nothing to save")
        return write_artifact(path, self._meta(), {"F": self.module.F, "train_ids": self.train_ids,
                                                   "test_ids": self.test_ids}, overwrite=overwrite)

    @classmethod
    def _from_artifact(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray], **_: Any) -> "SimfluenceSimulator":
        sim = cls(meta["metric"], stored_config(meta, SimfluenceConfig))
        sim._load_meta(meta)
        sim.train_ids = tensors["train_ids"].astype(np.int64)
        sim.test_ids = tensors["test_ids"].astype(np.int64)
        sim.module = FreeFactors(sim.train_ids.size, sim.test_ids.size)
        with torch.no_grad():
            sim.module.F.copy_(torch.as_tensor(tensors["F"]))
        sim.module.eval()
        return sim
