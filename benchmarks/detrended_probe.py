"""Probe: is there curriculum signal beyond the mean curve, and do the simulators find it?

For each dynamics store: take the seeded 25/2/5-style split, subtract the fit runs' mean
trajectory (per test example and step) from every run, fit GPTfluence and Simfluence on these
deviations, roll out the held-out runs, add the trend back, and compare the all-steps MSE with the
mean curve itself. Also reports the Spearman correlation between Simfluence's learned additive
factors B[i, m] and the MiniLM cosine similarity of training example i and test example m (negative
= similar examples lower the metric).

    python benchmarks/detrended_probe.py runs/builtin/data2text runs/builtin/translation --metric loss
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gptfluence.analysis.splits import split_runs
from gptfluence.dynamics import Dynamics, Run
from gptfluence.features import embed_examples, load_encoder
from gptfluence.simulators import make_simulator
from gptfluence.simulators.common import stack_curricula


def probe(path: str, metric: str, seed: int) -> dict:
    d = Dynamics.open(path)
    sp = split_runs(d.run_ids, seed)
    Vf, _, _ = d.stack(metric, sp["fit"])
    trend = np.nanmean(Vf, axis=0)  # [S, M]
    detrended = Dynamics(d.task, [Run(r.run_id, r.curriculum, r.steps, r.test_ids, {metric: r.values[metric] - trend},
                                      lr=r.lr, seed=r.seed) for r in d.runs()],
                         manifest=dict(d.manifest, metrics=[metric]))
    V, _, ids = d.stack(metric, sp["test"])
    cur = stack_curricula(d, sp["test"])
    out = {"store": path, "metric": metric, "split": sp,
           "mean_curve_mse": float(np.nanmean((trend[None, 1:] - V[:, 1:]) ** 2))}
    sims = {}
    for method in ("gptfluence", "simfluence"):
        sim = make_simulator(method, metric, **({"unseen": "zero"} if method == "simfluence" else {}))
        if method == "gptfluence":
            sim.set_examples(d.task.train, d.task.test)
        hist = sim.fit(detrended, sp["fit"], sp["val"])
        pred = sim.simulate(cur, ids, V[:, 0] - trend[0]) + trend[None]
        out[f"{method}_on_deviations_mse"] = float(np.nanmean((pred[:, 1:] - V[:, 1:]) ** 2))
        out[f"{method}_best_epoch"] = hist.get("best_epoch")
        sims[method] = sim
    sf = sims["simfluence"]
    tr, te = np.asarray(sf.train_ids), np.asarray(sf.test_ids)
    _, B = sf.factors(tr, te)
    enc = load_encoder("minilm")
    Ht = embed_examples(enc, [d.train_example(int(i)) for i in tr])
    Hs = embed_examples(enc, [d.test_example(int(i)) for i in te])
    Ht /= np.linalg.norm(Ht, axis=1, keepdims=True)
    Hs /= np.linalg.norm(Hs, axis=1, keepdims=True)
    out["spearman_simfluence_B_vs_minilm_cosine"] = float(spearmanr(B.ravel(), (Ht @ Hs.T).ravel())[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--metric", default="loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/detrended_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    rows = [probe(p, args.metric, args.seed) for p in args.stores]
    for r in rows:
        print(f"{r['store']}: mean curve {r['mean_curve_mse']:.5g} | GPTfluence on deviations "
              f"{r['gptfluence_on_deviations_mse']:.5g} | Simfluence on deviations {r['simfluence_on_deviations_mse']:.5g} "
              f"| Spearman(B, cosine) {r['spearman_simfluence_B_vs_minilm_cosine']:.3f}")
    Path(args.out).write_text(json.dumps({"results": rows, "seconds": time.time() - t0, "torch": torch.__version__,
                                          "python": platform.python_version()}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
