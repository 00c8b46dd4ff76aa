"""``gptfluence demo``: the whole pipeline on the embedded default (see `gptfluence.demo`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gptfluence.config import add_arguments, from_dict, from_namespace, load_json, to_dict


def register(sub: argparse._SubParsersAction) -> None:
    from gptfluence.demo import SCALES, DemoConfig

    p = sub.add_parser("demo", help="collect, fit, evaluate, attribute and report on built-in tasks (offline)",
                       description="Run the whole pipeline on the embedded default: collect training dynamics "
                                   "of a small GPT, fit GPTfluence and baselines, evaluate on held-out runs, "
                                   "compute influence, write a report. Re-running reuses everything cached.")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--scale", default="demo", choices=SCALES,
                   help="packaged sizes: demo (a few minutes on 2 cores), tiny (tests), paper (the paper's fine-tuning shape; GPU)")
    p.add_argument("--config", default=None, help="JSON file with DemoConfig fields (applied after --scale)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that is not an earlier demo's output (only the demo's files are written)")
    add_arguments(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptfluence.demo import DemoConfig, load_scale, run_demo, terminal_table

    from gptfluence.errors import InputError

    base = from_dict(DemoConfig, load_scale(args.scale), source=f"scale {args.scale!r}")
    if args.config:
        given = load_json(args.config)
        if not isinstance(given, dict):
            raise InputError(f"{args.config}: expected a JSON object of DemoConfig fields, got {type(given).__name__}")
        base = from_dict(DemoConfig, {**to_dict(base), **given}, source=args.config)
    cfg = from_namespace(DemoConfig, args, base)
    t0 = time.perf_counter()
    res = run_demo(cfg, Path(args.out), progress=not args.quiet, overwrite=args.overwrite)
    out = Path(args.out)
    print("\nHow well each simulator predicts held-out fine-tuning runs "
          "(rollout from the step-0 value; lower MSE/MAE and higher Spearman are better; * = lowest MSE):\n")
    print(terminal_table(res["result"]))
    for rep in res["influence"][:1]:
        ex = rep["test_examples"][0] if rep["test_examples"] else None
        if ex:
            print(f"\nMost helpful training examples for {rep['task']} test example {ex['test_id']} "
                  f"({ex['prompt'].strip()!r} -> {ex['target'].strip()!r}), by GPTfluence leave-one-out on run {rep['run_id']}:")
            for h in ex["helpful"][:3]:
                print(f"  +{h['score']:.4f} nats  train {h['train_id']}: {(h['prompt'] + h['target']).strip()!r}")
            for h in ex["harmful"][:2]:
                print(f"  {h['score']:.4f} nats  train {h['train_id']}: {(h['prompt'] + h['target']).strip()!r}")
    t = res["timings"]
    print(f"\ndone in {time.perf_counter() - t0:.0f} s (collect {t['collect_s']:.0f} s, evaluate {t['evaluate_s']:.0f} s, "
          f"influence {t['influence_s']:.0f} s, report {t['report_s']:.0f} s)")
    print(f"evaluation: {out / 'evaluation.json'} (table: {out / 'evaluation.md'})")
    print(f"report:     {res['report']}")
    return 0
