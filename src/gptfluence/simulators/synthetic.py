"""Synthetic dynamics from a known GPTfluence-like process (for tests and benchmarks).

Examples are short texts drawn from ``n_clusters`` topics (words of the topic + shared words), so
that a bag-of-words encoder (``HashingBowEncoder``) gives features in which same-topic examples
are similar. Each run samples a curriculum (``n_steps`` batches of ``batch`` training ids drawn
from the pool, epoch-style shuffling) and a loss-like metric follows::

    s(i, m)  = max(0, <h_i, h_m>)                   (h = bag-of-words features, unit norm)
    phi_t[m] = phi_{t-1}[m] - eta * sum_{i in c_t} s(i, m) * (phi_{t-1}[m] - floor[m])
               + noise * N(0, 1)

i.e. alpha = 1 - eta sum s, beta = eta sum s floor: training on similar examples pulls the test
loss towards its floor, dissimilar ones leave it alone. Start values phi_0 ~ 3 + 0.3 N(0, 1).
"""

from __future__ import annotations

import numpy as np

from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.features.encoders import HashingBowEncoder
from gptfluence.types import Example, Task


def synthetic_task(n_train: int = 200, n_test: int = 100, n_clusters: int = 8, seed: int = 0,
                   name: str = "synthetic") -> Task:
    rng = np.random.default_rng(seed)
    vocab = [[f"t{c}w{k}" for k in range(12)] for c in range(n_clusters)]
    shared = [f"s{k}" for k in range(30)]

    def text(c: int) -> tuple[str, str]:
        words = list(rng.choice(vocab[c], size=6)) + list(rng.choice(shared, size=3))
        rng.shuffle(words)
        return "input: " + " ".join(words[:6]), " output: " + " ".join(words[6:])

    train = [Example(i, *text(int(rng.integers(n_clusters))), meta={}) for i in range(n_train)]
    test = [Example(i, *text(int(rng.integers(n_clusters))), meta={}) for i in range(n_test)]
    return Task(name=name, train=train, test=test, kind="generation")


def synthetic_dynamics(n_runs: int = 16, n_steps: int = 150, n_train: int = 200, n_test: int = 100,
                       batch: int = 8, dim: int = 64, eta: float = 0.04, noise: float = 0.005,
                       record_step0: bool = True, seed: int = 0, name: str = "synthetic",
                       metric: str = "loss") -> tuple[Dynamics, HashingBowEncoder]:
    """A `Dynamics` (in memory) of ``n_runs`` runs and the encoder whose features drive it.

    ``record_step0=False`` mimics imported GPTDynamics (first recorded step = 1).
    """
    task = synthetic_task(n_train, n_test, seed=seed, name=name)
    enc = HashingBowEncoder(dim, seed=seed)
    Htr = enc.encode([e.text for e in task.train]).astype(np.float64)
    Hte = enc.encode([e.text for e in task.test]).astype(np.float64)
    S = np.maximum(Htr @ Hte.T, 0.0)  # [N, M]
    rng = np.random.default_rng(seed + 1)
    floor = 0.5 + 0.3 * rng.random(n_test)
    runs = []
    for r in range(n_runs):
        order = np.concatenate([rng.permutation(n_train) for _ in range(-(-n_steps * batch // n_train))])
        cur = order[:n_steps * batch].reshape(n_steps, batch)
        phi = np.empty((n_steps + 1, n_test))
        phi[0] = 3.0 + 0.3 * rng.standard_normal(n_test)
        for t in range(1, n_steps + 1):
            s = S[cur[t - 1]].sum(0)
            phi[t] = phi[t - 1] - eta * s * (phi[t - 1] - floor) + noise * rng.standard_normal(n_test)
        steps = np.arange(0 if record_step0 else 1, n_steps + 1)
        runs.append(Run(run_id=f"run-{r:04d}", curriculum=cur, steps=steps, test_ids=np.arange(n_test),
                        values={metric: phi[steps].astype(np.float32)}, seed=r))
    dyn = Dynamics(task, runs)
    dyn.manifest["metrics"] = [metric]
    return dyn, enc
