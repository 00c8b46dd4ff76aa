"""Data selection checked by real fine-tuning (part ``selection`` of benchmarks/results/applications_builtin.json).

For one task store (e.g. runs/builtin/sentiment: 32 runs of 128 of 200 pool examples x 3 epochs, batch 8):
fit each method on the store (every run but a seeded validation split, as `gptfluence lds` fits), then
per target set (``--targets``: the whole test set, a seeded random subset of n test ids) and
per selection seed s = 0..S-1 (`gptfluence.analysis.selection.selection_choices`):

* each method's choice of ``--budget`` training examples and their order for the target test set
  (`select`: leave-one-out scores along reference curricula of the budget's shape, top-k, best of
  ``--orders`` + 2 simulated orders);
* ``<method>-topk``: each method's plain top-k by its leave-one-out scores, before the simulated
  subset search, in a random order (what the search adds);
* ``<first method>-worst``: that method's bottom-k in a random order (diagnostic: do the scores
  carry signal at all?);
* ``random-r`` (r < ``--random-subsets``): random subsets of the same size in a random order;

then really fine-tune the store's base model on every one of these curricula (the store's settings,
training seed = s, ``record_steps="ends"``) and record the actual mean final target loss and
accuracy. ``check-train-seed``: the first method's seed-0 curriculum re-trained with another
training seed (is training deterministic given the curriculum?). Each record also holds every
method's prediction for that curriculum (``predicted_by_<method>``), for a predicted-vs-actual
plot. Rerunning resumes the fine-tuning (``--work``).

    python benchmarks/applications_selection.py runs/builtin/sentiment --budget 64 --targets 0 20 \\
        --methods gptfluence grad_dot tracin_cp --seeds 5 --random-subsets 4 --work runs/selection \\
        --out benchmarks/results/applications_parts/selection.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def run_setting(a, store, sims, cfg, tids, target_set, target_desc):
    """Choose, fine-tune and compare for one target set; every record and summary row carries ``target_set``."""
    from gptfluence.analysis.selection import Choice, compare_selections, selection_choices
    from gptfluence.analysis.verify import pearson
    from scipy.stats import spearmanr

    t0 = time.time()
    choices, selections = selection_choices(sims, store, cfg, tids, list(range(a.seeds)), a.random_subsets,
                                            worst=a.methods[0], topk_of=a.methods, log=lambda s: print(s, flush=True))
    select_s = time.time() - t0
    first = next(c for c in choices if c.choice == a.methods[0] and c.seed == 0)
    choices.append(Choice("check-train-seed", 0, first.curriculum, first.predicted, 1000,
                          predictions=dict(first.predictions)))
    work = Path(a.work) / target_set
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rep = compare_selections(store, choices, work, tids, workers=a.workers, progress=False,
                             log=lambda s: print(s, flush=True))
    train_s = time.time() - t0
    recs = {(r["choice"], r["seed"]): r for r in rep["records"]}
    chk, base = recs[("check-train-seed", 0)], recs[(a.methods[0], 0)]
    deterministic = bool(chk["actual_loss"] == base["actual_loss"])
    # each choice against the random subsets of the same seed, and the main simulator's predictions vs actual
    rnd = [r for r in rep["records"] if str(r["choice"]).startswith("random-")]
    vs_random = []
    for name in dict.fromkeys(r["choice"] for r in rep["records"]):
        mine = [r for r in rep["records"] if r["choice"] == name]
        for m in ("loss", "accuracy"):
            key = f"actual_{m}"
            pairs = [(r[key], q[key]) for r in mine for q in rnd if q["seed"] == r["seed"] and q is not r
                     and r.get(key) is not None and q.get(key) is not None]
            if not pairs:
                continue
            d = np.asarray([x - y for x, y in pairs])
            better = (d < 0) if m == "loss" else (d > 0)
            vs_random.append({"target_set": target_set, "choice": name, "metric": m, "n_pairs": len(pairs),
                              "mean_difference": float(d.mean()), "better_than_random_fraction": float(better.mean())})
    main_key = f"predicted_by_{a.methods[0]}"
    ok = [r for r in rep["records"] if r.get(main_key) is not None and r.get("actual_loss") is not None]
    x = np.asarray([r[main_key] for r in ok])
    y = np.asarray([r["actual_loss"] for r in ok])
    pva = {"simulator": a.methods[0], "n_curricula": len(ok), "pearson": pearson(x, y),
           "spearman": float(spearmanr(x, y).statistic) if len(ok) > 2 else None}
    for r in rep["records"] + rep["summary"]:
        r["target_set"] = target_set
    return {"target_set": target_set, "targets": target_desc, "test_ids": tids.tolist(),
            "steps": int(first.curriculum.shape[0]), "training_deterministic_given_curriculum": deterministic,
            "predicted_vs_actual": pva, "runs_fine_tuned": len(choices),
            "seconds": {"select_all": select_s, "fine_tuning": train_s},
            "records": rep["records"], "summary": rep["summary"], "vs_random": vs_random,
            "selections": [{"target_set": target_set, **{k: v for k, v in s.items()
                                                         if k not in ("scores", "times_scored", "curriculum", "test_ids")}}
                           for s in selections]}


def main() -> int:
    import torch

    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.selection import SelectConfig, fit_on_store, resolve_test_ids, selection_fit_overrides
    from gptfluence.config import to_dict, write_text_atomic
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import method_names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="task store (e.g. runs/builtin/sentiment); read only")
    p.add_argument("--methods", nargs="+", default=["gptfluence", "grad_dot", "tracin_cp"], choices=method_names(),
                   help="simulators whose choices are compared (the first is the main one)")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--metric", default="loss")
    p.add_argument("--targets", type=int, nargs="+", default=[0],
                   help="target sets, one setting each: 0 = every test example of the store; n > 0 = a seeded random "
                        "subset of n test ids (seed --target-seed)")
    p.add_argument("--target-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--random-subsets", type=int, default=4)
    p.add_argument("--orders", type=int, default=16)
    p.add_argument("--reference-passes", type=int, default=4)
    p.add_argument("--start-random", type=int, default=32)
    p.add_argument("--swap-rounds", type=int, default=40)
    p.add_argument("--swap-proposals", type=int, default=64)
    p.add_argument("--eval-orders", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--work", default="runs/selection", help="folder for the fine-tuning store (resumable)")
    p.add_argument("--fit-preset", default="selection", choices=("selection", "default"),
                   help="config of the main (first) method, as `gptfluence select --fit-preset` fits it")
    p.add_argument("--main-config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="config fields of the main method over --fit-preset's, VALUE as JSON or a string, "
                        "e.g. similarity_preconditioner=none")
    p.add_argument("--out", default="benchmarks/results/applications_parts/selection.json")
    a = p.parse_args()
    main_config = selection_fit_overrides(a.methods[0], a.fit_preset)
    for item in a.main_config:
        key, _, raw = item.partition("=")
        try:
            main_config[key] = json.loads(raw)
        except json.JSONDecodeError:
            main_config[key] = raw
    torch.set_num_threads(1)
    t_all = time.time()
    store = Dynamics.open(a.store)
    sims, fit_s = {}, {}
    for m in a.methods:
        t0 = time.time()
        print(f"fitting {m}", flush=True)
        sims[m] = fit_on_store(m, store, a.metric, seed=0, **(main_config if m == a.methods[0] else {}))
        fit_s[m] = time.time() - t0
    cfg = SelectConfig(budget=a.budget, metric=a.metric, reference_passes=a.reference_passes, orders=a.orders,
                       start_random=a.start_random, swap_rounds=a.swap_rounds, swap_proposals=a.swap_proposals,
                       eval_orders=a.eval_orders)
    settings = []
    for n_targets in a.targets:
        if n_targets > 0:
            rng = np.random.default_rng([a.target_seed, 0x7A6])
            tids = np.sort(rng.choice(np.asarray(store.test_ids), size=n_targets, replace=False))
            target_set = f"random{n_targets}"
            target_desc = (f"seeded random subset of {n_targets} of the store's {len(store.test_ids)} test examples "
                           f"(seed {a.target_seed})")
        else:
            tids = resolve_test_ids(store, None)
            target_set = "all"
            target_desc = f"every test example of the store ({tids.size})"
        print(f"target set {target_set}: {target_desc}", flush=True)
        settings.append(run_setting(a, store, sims, cfg, tids, target_set, target_desc))
    doc = {"benchmark": "applications_selection",
           "definition": "choose `budget` training examples (and their order) for a target test set with a simulator; "
                         "fine-tune the store's base model on the choice and on random subsets of the same size; "
                         "actual_* = mean over the targets of the final metric after that fine-tuning",
           "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
           "task": store.task.name, "store": a.store, "metric": a.metric, "budget": a.budget,
           "pool_size": int(len(store.train_ids)), "methods": a.methods,
           "better": "lower" if a.metric == "loss" else "higher",
           "select_config": to_dict(cfg), "fit_preset": a.fit_preset, "main_config": to_dict(sims[a.methods[0]].config), "seeds": a.seeds, "random_subsets": a.random_subsets,
           "seed_meaning": "seed s: the selection seed (reference curricula, subset search, candidate orders), the "
                           "random subsets' seed and the training seed",
           "vs_random_definition": "every record of a choice paired with every random-subset record of the same seed "
                                   "(same target set): mean of (choice - random) of the actual metric, and the fraction "
                                   "of pairs where the choice is better (lower loss, higher accuracy)",
           "target_sets": [{k: st[k] for k in ("target_set", "targets", "test_ids", "steps",
                                               "training_deterministic_given_curriculum", "predicted_vs_actual",
                                               "runs_fine_tuned", "seconds")} for st in settings],
           "records": [r for st in settings for r in st["records"]],
           "summary": [r for st in settings for r in st["summary"]],
           "vs_random": [r for st in settings for r in st["vs_random"]],
           "selections": [r for st in settings for r in st["selections"]],
           "seconds_fit": fit_s, "seconds_total": time.time() - t_all}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out, json.dumps(_sanitize(doc), indent=1) + "\n")
    for st in settings:
        print(f"\ntarget set {st['target_set']}: {st['targets']}")
        print(f"{'choice':<20} {'n':>3} {'actual loss':>18} {'actual accuracy':>18} {'predicted':>10}")
        for s in st["summary"]:
            def cell(k: str) -> str:
                m, sd = s.get(f"{k}_mean"), s.get(f"{k}_sd")
                return f"{m:.4f} ± {sd:.4f}" if m is not None and sd is not None else (f"{m:.4f}" if m is not None else "n/a")
            pm = s.get(f"predicted_by_{a.methods[0]}_mean")
            print(f"{s['choice']:<20} {s['n']:>3} {cell('actual_loss'):>18} {cell('actual_accuracy'):>18} "
                  f"{'n/a' if pm is None else f'{pm:.4f}':>10}")
        for v in st["vs_random"]:
            if v["metric"] == "loss" and not v["choice"].startswith("random"):
                print(f"{v['choice']:<20} vs random (same seed): loss difference {v['mean_difference']:+.4f}, better "
                      f"in {v['better_than_random_fraction']:.0%} of {v['n_pairs']} pairs")
        pva = st["predicted_vs_actual"]
        print(f"{a.methods[0]} predicted vs actual final loss over {pva['n_curricula']} curricula: Pearson "
              f"{pva['pearson']:.3f}, Spearman {pva['spearman']:.3f}; training deterministic given the curriculum: "
              f"{st['training_deterministic_given_curriculum']}")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
