"""Verification by re-training on the built-in tasks (benchmarks/results/verify_builtin.json).

For each task store (collected by `make evaluate-builtin`, 32 runs) and each method: fit the
simulator on the store's default split (seed 0; as `gptfluence fit` does), then `gptfluence
verify` on a held-out run of that split (``--run``, default run-0002) for the whole test set:
remove the top-k helpful / top-k harmful / k random training examples (by the influence summed
over the test set), simulate and really re-train, compare. Methods with an ``unseen`` option
(Simfluence) let examples no fit run used contribute nothing (as `evaluate` does).

    python benchmarks/verify_builtin.py runs/builtin/sentiment ... --out benchmarks/results/verify_builtin.json

``--by-label`` (label tasks): the same per label, with the test set restricted to that label's test
examples (``test_group`` 'label=<label>' in every record): summed over a mixed-label test set an
example that helps one label's test examples and hurts the other's cancels out.

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
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def verify_test_groups(store, by_label: bool) -> list[tuple[str, list[int] | None]]:
    """[(test_group, test ids or None = the whole test set)]: the whole set, or with ``by_label`` one
    group per label of a classification task's test examples (none for a generation task)."""
    if not by_label:
        return [("all", None)]
    if store.task.kind != "classification":
        print(f"{store.task.name}: not a label task; --by-label skips it", flush=True)
        return []
    groups: dict[str, list[int]] = {}
    for i in store.test_ids:
        groups.setdefault(str(store.test_example(int(i)).target).strip(), []).append(int(i))
    return [(f"label={lab}", ids) for lab, ids in sorted(groups.items())]


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
    p.add_argument("--by-label", action="store_true",
                   help="label tasks: verify for the test examples of each label separately (test_group "
                        "'label=<label>'; generation tasks are skipped), so that 'helpful' and 'harmful' are "
                        "not sums over test examples that pull in opposite directions")
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
            # one re-training folder per simulator config: a refit (new defaults) ranks other examples,
            # and a store refuses curricula it was not created with
            tag = hashlib.sha256(json.dumps(to_dict(sim.config), sort_keys=True).encode()).hexdigest()[:10]
            for test_group, test_ids in verify_test_groups(store, a.by_label):
                out = work / ((f"verify-{tag}" if a.fill == "pad" else f"verify-{a.fill}-{tag}")
                              + ("" if test_ids is None else f"-{test_group}"))
                out.mkdir(parents=True, exist_ok=True)
                save_json({"format": CONFIG_FORMAT, **to_dict(cfg), "simulator": str(sim_dir), "dynamics": str(path),
                           "run": a.run, "test_ids": test_ids}, out / "verify_config.json")
                t0 = time.time()
                rep = verify(sim, store, a.run, out, test_ids=test_ids, config=cfg, progress=False,
                             log=lambda s: print(s, flush=True))
                for r in rep["results"]:
                    r["test_group"] = test_group
                    r["fit_or_load_seconds"] = fit_s  # loading when the simulator folder exists (resumed)
                    r["verify_seconds"] = time.time() - t0
                results += rep["results"]
                # the noise runs (unchanged curriculum, other seeds / orders) are the same for every method
                noise.setdefault(f"{store.task.name}/{test_group}" if a.by_label else store.task.name,
                                 {"metric": rep["metric"], "run_id": a.run, "test_group": test_group, **rep["noise"]})
                reports.append(str(out / "verify.json"))
                for g in rep["groups"]:
                    print(f"{store.task.name:<12} {test_group:<14} {method:<11} {g['group']:<8} "
                          f"sim {g['simulated_change_mean']:+.4g} actual {g['actual_change_mean']:+.4g} "
                          f"pearson {g['pearson']:.3f} sign {g['sign_agreement']:.2f}", flush=True)
                print(f"{store.task.name:<12} {test_group:<14} {method:<11} noise: seeds "
                      f"{rep['noise']['seeds']['test_mean_std']} (deterministic {rep['noise']['deterministic']}), "
                      f"order {rep['noise']['order']['test_mean_std']}", flush=True)
    doc = {"benchmark": "verification by re-training: remove top-k helpful / harmful / k random training examples "
                        "(influence summed over the test set), simulated vs actual change of the final metric",
           "config": {"methods": a.methods, "metric": a.metric, "run": a.run, "k": a.k, "fill": a.fill,
                      "by_label": a.by_label, "noise_seeds": a.noise_seeds,
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
