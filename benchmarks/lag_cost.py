"""Cost of GPTfluence's lagged additive factors (``--b-lags``), side by side in one run.

    python benchmarks/lag_cost.py runs/builtin/sentiment [--lags 0 6 24] [--repeats 2] [--threads 1]
        [--out benchmarks/results/lag_cost.json]

On one store (default split, seed 0; the loss metric) GPTfluence is fitted once per lag count and
repeat, the lag counts interleaved within each repeat so that machine noise falls on all of them
alike; a warm-up fit first fills the feature caches (encoder embeddings, gradient features), so the
timed fits measure the simulator alone. For each fit also: one rollout of 64 random curricula of
the store's shape over the whole test set (what `lds` and `influence` call, many times), timed
after the fit. Reported per lag count: the median fit and rollout seconds, and their ratios to the
first lag count of ``--lags``. Fits stop early on their own validation curve, so a fit's time also
depends on how many epochs it ran (reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    import numpy as np
    import torch

    from gptfluence.analysis.splits import split_runs
    from gptfluence.config import write_text_atomic
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import make_simulator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--lags", nargs="+", type=int, default=[0, 6, 24])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/lag_cost.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    store = Dynamics.open(a.store)
    sp = split_runs(store.run_ids, 0)
    run0 = store.run(sp["fit"][0])
    rng = np.random.default_rng(0)
    pool = np.asarray(store.train_ids)
    T, b = run0.curriculum.shape
    curricula = np.stack([rng.choice(pool, size=T * b, replace=True).reshape(T, b) for _ in range(64)])
    test_ids = np.asarray(run0.test_ids)
    start = np.repeat(run0.trajectory("loss")[0][None, :], 64, axis=0)

    t0 = time.perf_counter()
    make_simulator("gptfluence", "loss", b_lags=0, epochs=1, ensemble=1).fit(store, sp["fit"], sp["val"])
    warm = time.perf_counter() - t0
    print(f"warm-up fit (fills the feature caches): {warm:.1f} s", flush=True)

    rows = []
    for rep in range(a.repeats):
        for lags in a.lags:
            sim = make_simulator("gptfluence", "loss", b_lags=lags)
            t0 = time.perf_counter()
            hist = sim.fit(store, sp["fit"], sp["val"])
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sim.simulate(curricula, test_ids, start)
            sim_s = time.perf_counter() - t0
            epochs = hist.get("epochs_run")
            rows.append({"repeat": rep, "b_lags": lags, "fit_seconds": fit_s, "simulate_seconds": sim_s,
                         "epochs_run": epochs})
            print(f"repeat {rep} b_lags {lags:>3}: fit {fit_s:7.1f} s ({epochs} epochs), "
                  f"rollout of 64 curricula {sim_s:6.2f} s", flush=True)

    summary = []
    base = a.lags[0]
    med = {lags: {k: statistics.median(r[k] for r in rows if r["b_lags"] == lags)
                  for k in ("fit_seconds", "simulate_seconds")} for lags in a.lags}
    for lags in a.lags:
        summary.append({"b_lags": lags, **{f"median_{k}": v for k, v in med[lags].items()},
                        "fit_ratio": med[lags]["fit_seconds"] / med[base]["fit_seconds"],
                        "simulate_ratio": med[lags]["simulate_seconds"] / med[base]["simulate_seconds"]})
        s = summary[-1]
        print(f"b_lags {lags:>3}: median fit {s['median_fit_seconds']:.1f} s (x{s['fit_ratio']:.2f} of b_lags {base}), "
              f"rollout {s['median_simulate_seconds']:.2f} s (x{s['simulate_ratio']:.2f})", flush=True)
    out = {"benchmark": "GPTfluence fit and rollout cost by lag count (benchmarks/lag_cost.py)",
           "store": a.store, "metric": "loss", "threads": a.threads, "repeats": a.repeats,
           "steps": int(T), "batch_size": int(b), "n_train": int(pool.size), "n_test": int(test_ids.size),
           "rollout_curricula": 64, "warmup_fit_seconds": warm, "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "runs": rows, "summary": summary,
           "note": "median over repeats; lag counts interleaved within each repeat; fits stop early on "
                   "validation, so fit time also reflects the epochs run"}
    write_text_atomic(a.out, json.dumps(out, indent=2) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
