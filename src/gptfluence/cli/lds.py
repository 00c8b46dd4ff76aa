"""``gptfluence curricula``, ``gptfluence lds`` and ``gptfluence verify``: attribution you can check.

    gptfluence curricula --dynamics FIT_STORE --design both membership order --n 48 --out heldout.jsonl
    gptfluence collect --config FIT_STORE/collect_config.json --curriculum-file heldout.jsonl \\
        --record-steps ends --out HELDOUT_STORE
    gptfluence lds FIT_STORE HELDOUT_STORE --out lds.json [--markdown lds.md]
    gptfluence verify SIMULATOR --dynamics STORE --run RUN_ID --k 5 --out DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from gptfluence.config import add_arguments, from_namespace, save_json, write_text_atomic
from gptfluence.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    from gptfluence.analysis.verify import VerifyConfig
    from gptfluence.cli.simulators import _add_config_flags
    from gptfluence.dynamics.curriculum import LDS_DESIGNS
    from gptfluence.simulators import default_method_names, method_names

    p = sub.add_parser("curricula", help="write held-out curricula for measuring LDS (JSON lines)",
                       description="Draw held-out curricula of the fit store's sizes (examples per run, batch size, "
                                   "epochs, order rule) in one or more designs: both (random subset and order), "
                                   "membership (random subsets, one fixed order rule), order (one subset, random "
                                   "orders). None equals a fit run's curriculum. Collect them with `collect "
                                   "--config FIT_STORE/collect_config.json --curriculum-file FILE --record-steps ends`.")
    p.add_argument("--dynamics", required=True, help="the fit store (sizes come from its collection config)")
    p.add_argument("--design", nargs="+", default=["both"], choices=LDS_DESIGNS, help="designs (default: both)")
    p.add_argument("--n", type=int, default=48, help="curricula per design (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--pool-fraction", type=float, default=1.0,
                   help="draw only from a seeded part of the training pool of this fraction (run ids 'seen-<design>-NNNN', "
                        "group 'seen_pool'): a fit store whose simulators never see the rest (unseen training data; "
                        "default 1 = the whole pool)")
    p.add_argument("--pool-seed", type=int, default=0, help="seed of the pool part of --pool-fraction (default 0)")
    p.add_argument("--whole-pool-too", action="store_true",
                   help="with --pool-fraction: also --n curricula per design from the whole pool (run ids "
                        "'whole-<design>-NNNN', group 'whole_pool'): held-out curricula holding unseen training examples")
    p.add_argument("--out", required=True, help="JSON lines file, one run per line {run_id, curriculum, group}")
    p.set_defaults(func=cmd_curricula)

    p = sub.add_parser("lds", help="LDS of every method on held-out curricula (with bootstrap CIs)",
                       description="Fit each method on FIT_STORE, simulate every curriculum of HELDOUT_STORE from its "
                                   "recorded start and report per method, metric and variation (the runs' group "
                                   "label): LDS = mean over test examples of the Spearman across curricula of "
                                   "simulated vs true final metric, with a bootstrap CI over test examples, beside "
                                   "the similarity_sum, tfidf_sum (and label_count) references.")
    p.add_argument("fit_store", help="store of fit runs (e.g. collected with --runs 32)")
    p.add_argument("heldout_store", help="store of held-out curricula (same examples and settings)")
    p.add_argument("--methods", nargs="+", default=list(default_method_names()), choices=method_names(),
                   help="methods (default: every method run by default; the paper presets only when named)")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics (default: every metric of both stores)")
    p.add_argument("--reference-encoder", default="minilm", help="encoder spec of the similarity_sum reference (default minilm)")
    p.add_argument("--no-references", action="store_true", help="leave out the references similarity_sum, tfidf_sum, label_count")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over test examples (default 1000)")
    p.add_argument("--out", required=True, help="results JSON ({config, results: [...], per_example})")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_lds)

    p = sub.add_parser("verify", help="check influence by re-training without the top-k helpful / harmful / k random",
                       description="For a run and a test set: rank the run's training examples by the simulator's "
                                   "influence summed over the test set, remove the top-k helpful, top-k harmful and k "
                                   "random examples (their batch slots become padding, or other pool examples with --fill pool; steps "
                                   "are kept), compare each group with the random one, simulate and "
                                   "really re-train each from the same base model with the run's seed, and compare "
                                   "simulated with actual change (Pearson, sign agreement), beside the noise floor "
                                   "(other seeds, other orders). Resumable: rerun the same command.")
    p.add_argument("simulator", help="simulator folder written by `gptfluence fit`")
    p.add_argument("--dynamics", required=True, help="the store the simulator belongs to")
    p.add_argument("--run", required=True, help="run id whose curriculum is changed")
    p.add_argument("--test-ids", nargs="+", type=int, default=None, help="test set (default: every test example)")
    p.add_argument("--out", required=True, help="output folder (verify.json, curricula.jsonl, retrain/ store)")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, VerifyConfig)
    p.set_defaults(func=cmd_verify)


def cmd_curricula(args: argparse.Namespace) -> int:
    from gptfluence.dynamics.collect import store_collect_config
    from gptfluence.dynamics.curriculum import design_curricula, pool_part, write_curriculum_lines
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import prepare_output_file

    out = prepare_output_file(args.out, inputs=[args.dynamics], suffixes=(".jsonl",))
    store = Dynamics.open(args.dynamics)
    cfg = store_collect_config(store)
    fit_curricula = [store.run(r).curriculum for r in store.run_ids]
    if args.whole_pool_too and args.pool_fraction >= 1.0:
        raise InputError("--whole-pool-too needs --pool-fraction below 1")
    part = pool_part(store.train_ids, args.pool_fraction, args.pool_seed)
    pools = [(store.train_ids, None, "")] if args.pool_fraction >= 1.0 else \
        [(part, "seen_pool", "seen-")] + ([(store.train_ids, "whole_pool", "whole-")] if args.whole_pool_too else [])
    lines = []
    for pool, group, prefix in pools:
        for design in dict.fromkeys(args.design):
            for rid, c in design_curricula(pool, cfg.examples_per_run, cfg.batch_size, cfg.epochs, design,
                                           args.n, args.seed, reshuffle_each_epoch=cfg.reshuffle_each_epoch,
                                           exclude=fit_curricula + [x[1] for x in lines]):
                lines.append((prefix + rid, c, group or design, None))
    write_curriculum_lines(out, lines)
    where = "" if args.pool_fraction >= 1.0 else \
        f"; pool part {part.size} of {store.train_ids.size} (fraction {args.pool_fraction}, seed {args.pool_seed})" + \
        (" and the whole pool" if args.whole_pool_too else "")
    print(f"{len(lines)} curricula ({', '.join(f'{args.n} {d}' for d in dict.fromkeys(args.design))}{where}; "
          f"{cfg.examples_per_run} examples, batch {cfg.batch_size}, {cfg.epochs} epochs) -> {out}")
    print(f"collect them with: gptfluence collect --config {Path(args.dynamics) / 'collect_config.json'} "
          f"--curriculum-file {out} --record-steps ends --out HELDOUT_STORE")
    return 0


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def cmd_lds(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.lds import format_lds_markdown, measure_lds
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import prepare_output_file
    import json

    out = prepare_output_file(args.out, inputs=[args.fit_store, args.heldout_store], suffixes=(".json",))
    md = prepare_output_file(args.markdown, inputs=[args.fit_store, args.heldout_store], flag="--markdown",
                             suffixes=(".md",)) if args.markdown else None
    if args.n_boot < 1:
        raise InputError(f"--n-boot must be >= 1 (got {args.n_boot})")
    from gptfluence.cli.simulators import _given_config, _method_configs

    given = _given_config(args)
    configs = _method_configs(list(args.methods), given, strict=True)
    fit, held = Dynamics.open(args.fit_store), Dynamics.open(args.heldout_store)
    log = (lambda s: print(s, file=sys.stderr)) if not args.no_progress else None
    res = measure_lds(fit, held, methods=args.methods, metrics=args.metrics, seed=given.get("seed", 0),
                      configs=configs, encoder=args.reference_encoder,
                      n_boot=args.n_boot, references=not args.no_references, log=log)
    write_text_atomic(out, json.dumps(_sanitize(res), indent=1) + "\n")
    table = format_lds_markdown(res)
    if md is not None:
        write_text_atomic(md, table)
    print(f"{'metric':<9} {'method':<16} {'variation':<11} {'LDS':>7} {'95% CI (test examples)':>24} {'K':>4} "
          f"{'tests':>6} {'NaN':>4}")
    for r in res["results"]:
        ci = f"[{_f(r['lds_ci_low'])}, {_f(r['lds_ci_high'])}]"
        print(f"{r['metric']:<9} {r['method']:<16} {r['variation']:<11} {_f(r['lds_mean']):>7} {ci:>24} "
              f"{r['n_curricula']:>4} {r['n_test_examples']:>6} {r['n_nan']:>4}")
    for sk in res["config"]["skipped"]:
        print(f"skipped {sk['method']} / {sk['metric']}: {sk['reason']}", file=sys.stderr)
    print(f"results -> {out}" + (f", table -> {md}" if md else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gptfluence.analysis.verify import CONFIG_FORMAT, VerifyConfig, verify
    from gptfluence.config import to_dict
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import has_json_format, prepare_output_dir
    from gptfluence.simulators import load_simulator

    cfg = from_namespace(VerifyConfig, args)
    for name in ("noise_seeds", "reorders", "workers"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
    out = prepare_output_dir(args.out, "verification", has_json_format("verify_config.json", CONFIG_FORMAT),
                             inputs=[args.dynamics, args.simulator], create=False)
    store = Dynamics.open(args.dynamics)
    sim = load_simulator(args.simulator, dynamics=store)
    store.run(args.run)  # names an unknown run before anything is written
    prepare_output_dir(out, "verification", has_json_format("verify_config.json", CONFIG_FORMAT),
                       inputs=[args.dynamics, args.simulator])
    save_json({"format": CONFIG_FORMAT, **to_dict(cfg), "simulator": str(args.simulator),
               "dynamics": str(args.dynamics), "run": args.run, "test_ids": args.test_ids},
              out / "verify_config.json")
    rep = verify(sim, store, args.run, out, test_ids=args.test_ids, config=cfg, progress=not args.no_progress)
    print(f"\n{rep['method']} ({rep['metric']}), run {rep['run_id']}, {len(rep['test_ids'])} test examples, k = {rep['k']}")
    print(f"sign: {rep['sign']}")
    print(f"removal: {rep['removal']}")
    print(f"{'group':<8} {'occurrences':>11} {'simulated change':>17} {'actual change':>14} {'Pearson':>8} "
          f"{'sign agree':>10} {'sim - random':>13} {'actual - random':>16}")
    for g in rep["groups"]:
        rel = (f"{g['simulated_minus_random_mean']:>13.4g} {g['actual_minus_random_mean']:>16.4g}"
               if "actual_minus_random_mean" in g else "")
        print(f"{g['group']:<8} {g['removed_occurrences']:>11} {g['simulated_change_mean']:>17.4g} "
              f"{g['actual_change_mean']:>14.4g} {_f(g['pearson']):>8} {_f(g['sign_agreement']):>10} {rel}")
    n = rep["noise"]
    det = n["deterministic"]
    print(f"noise: other seeds: test-mean std {_f(n['seeds']['test_mean_std'])}"
          + (" (training is deterministic given the curriculum)" if det else "")
          + f"; other orders: test-mean std {_f(n['order']['test_mean_std'])}")
    harmful = next(g for g in rep["groups"] if g["group"] == "harmful")
    print(f"removing harmful examples: {harmful['expected_direction']}: "
          f"{'yes' if harmful['expected_direction_ok'] else 'NO'}; below removing random ones: "
          f"{'yes' if harmful['expected_vs_random_ok'] else 'NO'}")
    print(f"-> {out / 'verify.json'}")
    return 0
