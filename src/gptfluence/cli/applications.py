"""``gptfluence mislabeled`` and ``gptfluence evaluate-unseen``: the paper's applications, checked.

    gptfluence collect --task sentiment --flip-fraction 0.4 --runs 32 --out FLIPPED
    gptfluence mislabeled FLIPPED --out mislabeled.json

    gptfluence curricula --dynamics TEMPLATE --design both --n 32 --pool-fraction 0.75 --out part.jsonl
    gptfluence collect --config TEMPLATE/collect_config.json --curriculum-file part.jsonl --out FIT
    gptfluence curricula --dynamics FIT --design both --n 12 --pool-fraction 0.75 --whole-pool-too --out heldout.jsonl
    gptfluence collect --config FIT/collect_config.json --curriculum-file heldout.jsonl --out HELDOUT
    gptfluence evaluate-unseen FIT HELDOUT --out unseen.json [--markdown unseen.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from gptfluence.config import add_arguments, from_namespace, write_text_atomic


def register(sub: argparse._SubParsersAction) -> None:
    from gptfluence.analysis.mislabeled import MislabeledConfig
    from gptfluence.cli.simulators import _add_config_flags
    from gptfluence.simulators import method_names

    p = sub.add_parser("mislabeled", help="find flipped labels: detection curve / AUC per ranking, then fix and re-train",
                       description="On a store collected with --flip-fraction: rank the training pool by GPTfluence "
                                   "self-influence, the simulators' harm to the test set, TracIn-CP self-influence, "
                                   "the training loss and at random; the detection curve (fraction of flipped labels "
                                   "found vs fraction inspected) and its AUC; then fix the flipped labels among each "
                                   "ranking's top fractions and really fine-tune again (several seeds): test accuracy "
                                   "and loss per ranking, beside no fix and all fixed.")
    p.add_argument("store", help="store collected with --flip-fraction (a classification task)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, MislabeledConfig)
    p.set_defaults(func=cmd_mislabeled)

    p = sub.add_parser("evaluate-unseen", help="accuracy on unseen training / test data (the paper's three cases)",
                       description="Fit each method on FIT_STORE (a seeded --test-fraction of the test examples "
                                   "hidden from fitting) and roll out every run of HELDOUT_STORE; scores per case: "
                                   "seen, unseen_train (the run holds training examples no fit run used), unseen_test "
                                   "(test examples hidden from fitting), both. Methods with free per-pair parameters "
                                   "(Simfluence) are reported as not applicable where they have none.")
    p.add_argument("fit_store", help="store whose curricula use part of the pool (curricula --pool-fraction)")
    p.add_argument("heldout_store", help="store of held-out curricula (curricula --pool-fraction F --whole-pool-too)")
    p.add_argument("--methods", nargs="+", default=["gptfluence", "simfluence", "mean_curve", "constant"],
                   choices=method_names(), help="methods (default: gptfluence simfluence mean_curve constant)")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics (default: every metric of both stores)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="fraction of test examples hidden from fitting (default 0.3)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_unseen)


def _log(args: argparse.Namespace) -> Any:
    return (lambda s: print(s, file=sys.stderr, flush=True)) if not args.no_progress else None


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def cmd_mislabeled(args: argparse.Namespace) -> int:
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.mislabeled import MislabeledConfig, measure_mislabeled
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import prepare_output_file

    out = prepare_output_file(args.out, inputs=[args.store], suffixes=(".json",))
    cfg = from_namespace(MislabeledConfig, args)
    cfg.validate()
    res = measure_mislabeled(Dynamics.open(args.store), cfg, log=_log(args))
    write_text_atomic(out, json.dumps(_sanitize(res), indent=1) + "\n")
    print(f"{res['n_flipped']} of {res['n_train']} training labels flipped; AUC perfect {res['auc_perfect']:.3f}, "
          f"random 0.5")
    print(f"{'ranking':<22} {'AUC':>6}  " + "  ".join(f"found@{q}" for q in cfg.fix_fractions))
    for m, r in res["methods"].items():
        print(f"{m:<22} {r['auc']:>6.3f}  " + "  ".join(f"{r['found_at'][str(q)]:>8.3f}" for q in cfg.fix_fractions))
    print(f"\n{'fix and re-train':<22} {'fraction':>8} {'fixed':>6} {'accuracy':>14} {'loss':>14}")
    for s in res["fix_and_retrain"]["summary"]:
        print(f"{s['method']:<22} {s['fraction']:>8.2f} {s['n_fixed_mean']:>6.1f} "
              f"{_f(s['test_accuracy_mean'])} ± {_f(s['test_accuracy_sd'])} {_f(s['test_loss_mean'])} ± {_f(s['test_loss_sd'])}")
    print(f"-> {out}")
    return 0


def cmd_unseen(args: argparse.Namespace) -> int:
    return run_unseen(args, args.fit_store, args.heldout_store, args.test_fraction)


def run_unseen(args: argparse.Namespace, fit_store: str, heldout_store: str, test_fraction: float) -> int:
    """`gptfluence evaluate-unseen` (and `evaluate --unseen-heldout`): fit, roll out, score per case, write."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.unseen import format_unseen_markdown, measure_unseen
    from gptfluence.cli.simulators import _given_config, _method_configs
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import prepare_output_file

    out = prepare_output_file(args.out, inputs=[fit_store, heldout_store], suffixes=(".json",))
    md = prepare_output_file(args.markdown, inputs=[fit_store, heldout_store], flag="--markdown",
                             suffixes=(".md",)) if args.markdown else None
    given = _given_config(args)
    configs = _method_configs(list(args.methods), given, strict=True)
    res = measure_unseen(Dynamics.open(fit_store), Dynamics.open(heldout_store), methods=args.methods,
                         metrics=args.metrics, test_fraction=test_fraction, seed=given.get("seed", 0),
                         configs=configs, log=_log(args))
    write_text_atomic(out, json.dumps(_sanitize(res), indent=1) + "\n")
    table = format_unseen_markdown(res)
    if md is not None:
        write_text_atomic(md, table)
    print(table, end="")
    print(f"-> {out}")
    return 0
