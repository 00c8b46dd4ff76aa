"""Verification by re-training on the built-in tasks (benchmarks/results/verify_builtin.json).

For each task store (collected by `make evaluate-builtin`, 32 runs) and each method: fit the
simulator on the store's default split (seed 0; as `gptfluence fit` does), then `gptfluence
verify` on a held-out run of that split (``--run``, default run-0002) for the whole test set:
remove the top-k helpful / top-k harmful / k random training examples (by the influence summed
over the test set), simulate and really re-train, compare. Methods with an ``unseen`` option
(Simfluence) let examples no fit run used contribute nothing (as `evaluate` does).

    python benchmarks/verify_builtin.py runs/builtin/sentiment ... --out benchmarks/results/verify_builtin.json

Output: ``results`` (method, task, metric, group, k, simulated_change_mean, actual_change_mean,
pearson, sign_agreement, n_test_examples, removed_occurrences, and for helpful / harmful the same
relative to the random group: *_minus_random) and ``noise`` ({task: record}: the spread of the
final metric over re-trainings of the unchanged curriculum with other seeds and in other orders;
the same runs for every method). Each verification's folder (verify.json, the re-trained store)
is kept under ``--work``; rerunning resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.splits import split_runs
    from gptfluence.analysis.verify import CONFIG_FORMAT, VerifyConfig, verify
    from gptfluence.config import save_json, to_dict, write_text_atomic
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import load_simulator, make_simulator, method_config, method_names, method_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", help="task stores (runs/builtin/<task>)")
    p.add_argument("--methods", nargs="+", default=["gptfluence", "simfluence"], choices=method_names())
    p.add_argument("--metric", default="loss")
    p.add_argument("--run", default="run-0002", help="held-out run of the default split (seed 0)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--noise-seeds", type=int, default=2)
    p.add_argument("--reorders", type=int, default=2)
    p.add_argument("--fill", default="pad", choices=("pad", "pool"), help="see VerifyConfig.fill")
    p.add_argument("--work", default="runs/verify", help="folder for simulators and re-trainings")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    results, reports = [], []
    noise: dict = {}
    for path in a.stores:
        store = Dynamics.open(path)
        sp = split_runs(store.run_ids, 0)
        if a.run in sp["fit"] + sp["val"]:
            raise SystemExit(f"{path}: {a.run} is a fit/validation run of the default split; choose a held-out run "
                             f"({' '.join(sp['test'])})")
        for method in a.methods:
            spec = method_spec(method)
            over = {}
            if spec.config_cls is not None and "unseen" in {f.name for f in dataclasses.fields(spec.config_cls)}:
                over["unseen"] = "zero"
            work = Path(a.work) / store.task.name / method
            sim_dir = work / "simulator"
            t0 = time.time()
            sim = None
            if (sim_dir / "config.json").exists():  # reuse a fitted simulator only at today's config
                sim = load_simulator(sim_dir, dynamics=store)
                want = method_config(method, **over) if spec.config_cls is not None else None
                if want is not None and to_dict(sim.config) != to_dict(want):
                    print(f"{sim_dir}: fitted with another config than the current default; refitting", flush=True)
                    sim = None
            if sim is None:
                sim = make_simulator(method, a.metric, **over)
                sim.fit(store, sp["fit"], sp["val"])
                sim.save(sim_dir, overwrite=True)
            fit_s = time.time() - t0
            cfg = VerifyConfig(k=a.k, noise_seeds=a.noise_seeds, reorders=a.reorders, fill=a.fill)
            out = work / ("verify" if a.fill == "pad" else f"verify-{a.fill}")
            out.mkdir(parents=True, exist_ok=True)
            save_json({"format": CONFIG_FORMAT, **to_dict(cfg), "simulator": str(sim_dir), "dynamics": str(path),
                       "run": a.run, "test_ids": None}, out / "verify_config.json")
            t0 = time.time()
            rep = verify(sim, store, a.run, out, config=cfg, progress=False, log=lambda s: print(s, flush=True))
            for r in rep["results"]:
                r["fit_or_load_seconds"] = fit_s  # loading when the simulator folder exists (resumed)
                r["verify_seconds"] = time.time() - t0
            results += rep["results"]
            # the noise runs (unchanged curriculum, other seeds / orders) are the same for every method
            noise.setdefault(store.task.name, {"metric": rep["metric"], "run_id": a.run, **rep["noise"]})
            reports.append(str(out / "verify.json"))
            for g in rep["groups"]:
                print(f"{store.task.name:<12} {method:<11} {g['group']:<8} sim {g['simulated_change_mean']:+.4g} "
                      f"actual {g['actual_change_mean']:+.4g} pearson {g['pearson']:.3f} "
                      f"sign {g['sign_agreement']:.2f}", flush=True)
            print(f"{store.task.name:<12} {method:<11} noise: seeds {rep['noise']['seeds']['test_mean_std']} "
                  f"(deterministic {rep['noise']['deterministic']}), order {rep['noise']['order']['test_mean_std']}",
                  flush=True)
    doc = {"benchmark": "verification by re-training: remove top-k helpful / harmful / k random training examples "
                        "(influence summed over the test set), simulated vs actual change of the final metric",
           "config": {"methods": a.methods, "metric": a.metric, "run": a.run, "k": a.k, "fill": a.fill, "noise_seeds": a.noise_seeds,
                      "reorders": a.reorders, "stores": a.stores},
           "change": "final metric with the changed curriculum minus with the full one (loss: negative = lower loss)",
           "removal": "removed occurrences become padding (batches shrink, steps kept); *_minus_random compares a "
                      "group with removing k random examples" if a.fill == "pad" else
                      "each removed example replaced by a pool example the curriculum did not hold (batch sizes kept)",
           "results": results, "noise": noise, "reports": reports}
    write_text_atomic(a.out, json.dumps(_sanitize(doc), indent=1) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
