"""``gptfluence influence``: rank helpful and harmful training examples with a fitted simulator."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("influence", help="leave-one-out influence of training examples on test examples",
                       description="For one recorded run (its curriculum and start values), simulate the run "
                                   "with each training example left out and rank the training examples per "
                                   "test example. Score > 0 = helpful (removing it makes the metric worse).")
    p.add_argument("simulator", help="simulator folder written by `gptfluence fit` (or demo's simulators/...)")
    p.add_argument("--dynamics", required=True, help="the dynamics store the simulator belongs to")
    p.add_argument("--run", required=True, help="run id whose curriculum is analysed")
    p.add_argument("--test-ids", nargs="+", type=int, default=None, help="test ids (default: all of the run)")
    p.add_argument("--k", type=int, default=5, help="helpful / harmful examples listed per test example (default 5)")
    p.add_argument("--out", required=True, help="JSON file ({'reports': [...]}, readable by `gptfluence report`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptfluence.analysis.influence import influence_report, run_loo_influence
    from gptfluence.config import save_json
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.errors import InputError
    from gptfluence.simulators import load_simulator

    from gptfluence.outputs import prepare_output_file

    if args.k < 1:
        raise InputError(f"--k must be >= 1 (got {args.k})")
    prepare_output_file(args.out, inputs=[args.dynamics, args.simulator], suffixes=(".json",))
    store = Dynamics.open(args.dynamics)
    sim = load_simulator(args.simulator, dynamics=store)
    rec = store.run(args.run)
    infl = run_loo_influence(sim, rec, test_ids=args.test_ids, dynamics=store)
    rep = influence_report(infl, store, test_ids=args.test_ids, k=args.k)
    rep.update(task=store.task.name, run_id=rec.run_id)
    save_json({"reports": [rep]}, Path(args.out))
    print(f"{rep['sign']}")
    for ex in rep["test_examples"][:3]:
        print(f"\ntest {ex['test_id']}: {(ex['prompt'] + ex['target']).strip()!r}")
        for h in ex["helpful"][:args.k]:
            print(f"  +{h['score']:.4g}  train {h['train_id']}: {(h['prompt'] + h['target']).strip()!r}")
        for h in ex["harmful"][:args.k]:
            print(f"  {h['score']:.4g}  train {h['train_id']}: {(h['prompt'] + h['target']).strip()!r}")
    print(f"\n{len(rep['test_examples'])} test examples -> {args.out}")
    return 0
