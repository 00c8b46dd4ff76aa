"""``gptfluence fit``, ``gptfluence simulate`` and ``gptfluence evaluate``.

    gptfluence fit DYNAMICS --method gptfluence --metric loss --out SIMDIR [--fit-runs ... --val-runs ...] [config flags]
    gptfluence simulate SIMDIR --dynamics DYNAMICS --curriculum FILE_or_RUN_ID [--test-ids ...] --out FILE
    gptfluence evaluate DYNAMICS [DYNAMICS ...] --methods ... --metrics ... --out FILE.json [--markdown FILE.md]

Config flags (``--lr``, ``--epochs``, ``--order``, ``--encoder`` ...) are the fields of
`GPTfluenceConfig` and `SimfluenceConfig`; each applies to the methods that have that field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gptfluence.config import add_arguments, write_text_atomic
from gptfluence.errors import InputError


def _config_classes() -> list[type]:
    """The distinct config classes of the registered methods (their fields become flags)."""
    from gptfluence.simulators import METHODS

    out: list[type] = []
    for spec in METHODS.values():
        if spec.config_cls is not None and spec.config_cls not in out:
            out.append(spec.config_cls)
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    seen: set[str] = set()
    group = p.add_argument_group("simulator config (fields of " + " / ".join(c.__name__ for c in _config_classes()) + ")")
    for cls in _config_classes():
        skip = tuple(seen)
        add_arguments(group, cls, skip=skip)  # type: ignore[arg-type]
        seen |= {f.name for f in dataclasses.fields(cls)}


def _given_config(ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for cls in _config_classes() for f in dataclasses.fields(cls)}
    return {k: getattr(ns, k) for k in sorted(names) if getattr(ns, k, None) is not None}


def _method_configs(methods: list[str], given: dict[str, Any], strict: bool) -> dict[str, dict[str, Any]]:
    from gptfluence.simulators import method_spec

    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for m in methods:
        cls = method_spec(m).config_cls
        if cls is None:
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        out[m] = {k: v for k, v in given.items() if k in fields}
        used |= set(out[m])
    unused = sorted(set(given) - used - {"seed"})
    if unused and strict:
        flag = "--" + unused[0].replace("_", "-")
        raise InputError(f"{flag} does not apply to method(s) {', '.join(methods)}")
    return out


def register(subparsers: Any) -> None:
    from gptfluence.simulators import default_method_names, method_names

    SIMULATOR_METHODS = method_names()

    p = subparsers.add_parser("fit", help="fit a simulator on a dynamics store",
                              description="Fit a simulator (teacher forcing, early stopping on validation runs).")
    p.add_argument("dynamics", help="dynamics store folder")
    p.add_argument("--method", default="gptfluence", choices=SIMULATOR_METHODS)
    p.add_argument("--preset", default=None, choices=["paper"],
                   help="paper: the authors' exact configuration of --method (gptfluence -> gptfluence_paper, "
                        "simfluence -> simfluence_paper; see gptfluence.simulators.presets); config flags still override")
    p.add_argument("--metric", default="loss", help="metric to simulate (default: loss)")
    p.add_argument("--out", required=True, help="simulator folder to write (config.json + weights.safetensors): new, "
                                                "empty or an earlier simulator")
    p.add_argument("--overwrite", action="store_true",
                   help="write the simulator's two files into a non-empty folder that holds no simulator (nothing else there is touched)")
    p.add_argument("--fit-runs", nargs="+", default=None, help="run ids to fit on (default: the seeded split's fit runs)")
    p.add_argument("--val-runs", nargs="*", default=None, help="run ids for early stopping (default: the seeded split's validation runs; none when --fit-runs is given)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the simulators' small tensor ops are fastest single-threaded)")
    p.set_defaults(func=cmd_fit)

    p = subparsers.add_parser("simulate", help="roll a fitted simulator out on a curriculum",
                              description="Predict every test example's metric trajectory under a curriculum.")
    p.add_argument("simulator", help="simulator folder written by `gptfluence fit`")
    p.add_argument("--dynamics", required=True, help="the dynamics store the simulator belongs to (examples, start values)")
    p.add_argument("--curriculum", required=True,
                   help="a run id of the store, or a curriculum file as `collect --curriculum-file` takes it: JSON lines "
                        "{\"run_id\", \"curriculum\"} (one run per line; every run is simulated), JSON lines "
                        "{\"step\", \"samples_id\"} (GPTDynamics), a .json [T][b] array or a .npy [T, b] array of "
                        "training ids (-1 = padding)")
    p.add_argument("--test-ids", nargs="+", type=int, default=None, help="test ids (default: all of the start run)")
    p.add_argument("--start-run", default=None,
                   help="run whose values at the first step are the start values (default: the curriculum's run, else the first run)")
    p.add_argument("--first-step", type=int, default=None, help="step of the start values (default: first recorded step of the start run)")
    p.add_argument("--allow-new-examples", action="store_true",
                   help="gptfluence only: use a store with other examples than the fit store (embeds them)")
    p.add_argument("--out", required=True, help="output file: .json ({method, metric, test_ids, curricula: [{name, steps, "
                                                "predicted [S][M]}]}), .npy ([S, M], or [R, S, M] for several curricula) "
                                                "or .csv (curriculum, step, test_id, predicted value)")
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("evaluate", help="fit and score simulators on held-out runs",
                              description="Fit each method on each store's fit runs, roll out on held-out runs, "
                                          "report all-steps MSE/MAE, final-step and curriculum Spearman.")
    p.add_argument("dynamics", nargs="+", help="dynamics store folders (one per task)")
    p.add_argument("--methods", nargs="+", default=list(default_method_names()), choices=SIMULATOR_METHODS,
                   help="default: every method except the presets (gptfluence_paper, simfluence_paper: name them)")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics (default: every metric of each store)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--fit-runs", nargs="+", default=None)
    p.add_argument("--val-runs", nargs="*", default=None)
    p.add_argument("--test-runs", nargs="+", default=None)
    p.add_argument("--n-val", type=int, default=None, help="validation runs (default max(1, round(R*2/32)))")
    p.add_argument("--n-test", type=int, default=None, help="test runs (default max(2, round(R*5/32)))")
    p.add_argument("--no-trajectories", action="store_true", help="leave per-run trajectories out of the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--unseen-heldout", default=None, metavar="HELDOUT_STORE",
                   help="the paper's unseen-data cases instead: fit on the one store given (curricula from part of "
                        "the pool, --unseen-test-fraction of its test examples hidden) and score every run of "
                        "HELDOUT_STORE per case seen / unseen_train / unseen_test / both (same as "
                        "`gptfluence evaluate-unseen`; README, \"Applications\")")
    p.add_argument("--unseen-test-fraction", type=float, default=0.3,
                   help="with --unseen-heldout: fraction of test examples hidden from fitting (default 0.3)")
    _add_config_flags(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the simulators' small tensor ops are fastest single-threaded)")
    p.set_defaults(func=cmd_evaluate)


# ---------------------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    from gptfluence.analysis.splits import split_runs
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import make_simulator

    from gptfluence.outputs import prepare_output_dir
    from gptfluence.simulators.common import is_simulator_artifact

    prepare_output_dir(args.out, "simulator", is_simulator_artifact, overwrite=args.overwrite,
                       inputs=[args.dynamics], create=False)  # refuse before fitting, not after
    if args.preset is not None:
        from gptfluence.simulators import METHODS

        name = f"{args.method}_{args.preset}"
        if name not in METHODS:
            raise InputError(f"--preset {args.preset}: method {args.method!r} has no such preset "
                             f"(presets: {', '.join(m for m, s in METHODS.items() if s.preset)})")
        args.method = name
    store = Dynamics.open(args.dynamics)
    given = _given_config(args)
    cfg = _method_configs([args.method], given, strict=True).get(args.method, {})
    seed = given.get("seed", 0)
    if args.fit_runs is None:
        sp = split_runs(store.run_ids, seed, val=args.val_runs)
        fit_runs, val_runs = sp["fit"], sp["val"]
    else:
        fit_runs, val_runs = args.fit_runs, args.val_runs or []
        for r in list(fit_runs) + list(val_runs):
            store.run(r)  # raises naming an unknown run id
    sim = make_simulator(args.method, args.metric, **cfg)
    hist = sim.fit(store, fit_runs, val_runs, progress=not args.no_progress)
    out = sim.save(args.out, overwrite=args.overwrite)
    msg = f"fitted {args.method} ({args.metric}) on {len(fit_runs)} runs"
    if hist.get("objective"):
        msg += f" by {hist['objective']}"
    if val_runs:
        msg += f", validated on {len(val_runs)}"
    if hist.get("members"):  # a bagged ensemble (--ensemble k): each member validated on its own runs
        msg += (f"; an ensemble of {len(hist['members'])} members, each on its own fit / validation split of these runs "
                f"(in the artifact's config.json)")
        if hist.get("best_val_mse") is not None:
            msg += f", mean best validation rollout MSE {hist['best_val_mse'] * getattr(sim, 'scale', 1.0) ** 2:.4g}"
    elif hist.get("best_val_mse") is not None:
        msg += f"; best validation rollout MSE {hist['best_val_mse'] * getattr(sim, 'scale', 1.0) ** 2:.4g} (epoch {hist['best_epoch']})"
    pooled = [name for key, name in (("a_factors", "the A factors"), ("b_projection", "B's projection term"))
              if hist.get(key) == "pool_mean"]
    if pooled:  # gptfluence: what it simulates differs from what was validated
        msg += (f"; then {' and '.join(pooled)} replaced by their mean over the training pool "
                f"(--a-factors / --b-projection; the validation MSE is the per-pair fit's)")
    if hist.get("b_lags"):
        msg += f"; with lagged additive factors of the last {hist['b_lags']} batches (--b-lags)"
    print(msg + f" -> {out}")
    held = [r for r in store.run_ids if r not in set(fit_runs) | set(val_runs)]
    if held:
        print(f"held-out runs: {' '.join(held)}")
    return 0


SIMULATE_OUTPUTS = (".json", ".npy", ".csv")


def cmd_simulate(args: argparse.Namespace) -> int:
    from gptfluence.dynamics.curriculum import read_curriculum_file
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import prepare_output_file
    from gptfluence.simulators import load_simulator

    out = prepare_output_file(args.out, inputs=[args.dynamics, args.simulator], suffixes=SIMULATE_OUTPUTS)
    store = Dynamics.open(args.dynamics)
    sim = load_simulator(args.simulator, dynamics=store, allow_new_examples=args.allow_new_examples)
    cur_src = args.curriculum
    if cur_src in store.run_ids:
        curricula = {cur_src: store.run(cur_src).curriculum}
        start_run = args.start_run or cur_src
        src_name = f"run {cur_src!r}"
    else:
        if not Path(cur_src).exists():
            raise InputError(f"--curriculum {cur_src!r}: neither a run id of the store nor a file")
        curricula = read_curriculum_file(cur_src, store.train_ids, allow_empty_steps=True).curricula
        if not args.start_run and not store.run_ids:
            raise InputError(f"{args.dynamics}: the store has no runs to take start values from")
        start_run = args.start_run or store.run_ids[0]
        src_name = str(cur_src)
    run = store.run(start_run)
    vals = run.trajectory(sim.metric)
    rec = np.isfinite(vals).any(1)
    if args.first_step is None:
        if not rec.any():
            raise InputError(f"run {start_run!r} records no {sim.metric} values")
        first = int(run.steps[int(np.argmax(rec))])
    else:
        first = args.first_step
        if first not in set(run.steps.tolist()):
            raise InputError(f"run {start_run!r} has no record of step {first}")
    row = {int(s): k for k, s in enumerate(run.steps)}[first]
    test_ids = np.asarray(args.test_ids if args.test_ids is not None else run.test_ids, dtype=np.int64)
    col = {int(i): k for k, i in enumerate(run.test_ids)}
    for i in test_ids:
        if int(i) not in col:
            raise InputError(f"test id {int(i)} is not recorded in run {start_run!r} (no start value)")
    start = vals[row, [col[int(i)] for i in test_ids]][None].astype(np.float64)
    if not np.isfinite(start).all():
        bad = int(test_ids[np.flatnonzero(~np.isfinite(start[0]))[0]])
        raise InputError(f"run {start_run!r}: {sim.metric} of test id {bad} is not recorded at step {first}")
    preds: dict[str, np.ndarray] = {}
    for name, cur in curricula.items():
        if first > cur.shape[0]:
            raise InputError(f"{src_name} ({name}): first step {first} is beyond its {cur.shape[0]} steps")
        sim.prepare(store, np.unique(cur[cur >= 0]), test_ids)
        preds[name] = sim.simulate(cur[None], test_ids, start, first_step=first)[0]
    suffix = out.suffix.lower()
    if suffix == ".npy":
        shapes = {p.shape for p in preds.values()}
        if len(shapes) > 1:
            raise InputError(f"--out {out}: the curricula have different numbers of steps; write .json or .csv")
        arr = next(iter(preds.values())) if len(preds) == 1 else np.stack(list(preds.values()))
        np.save(out, arr)  # [S, M] for one curriculum, [R, S, M] for several (file order)
    elif suffix == ".csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["curriculum", "step", "test_id", f"predicted_{sim.metric}"])
        for name, pred in preds.items():
            for k, step in enumerate(range(first, first + pred.shape[0])):
                for j, tid in enumerate(test_ids.tolist()):
                    w.writerow([name, step, tid, f"{float(pred[k, j]):.6g}"])
        write_text_atomic(out, buf.getvalue())
    else:
        doc = {"method": sim.method, "metric": sim.metric, "source": src_name, "start_run": start_run,
               "first_step": first, "test_ids": test_ids.tolist(),
               "curricula": [{"name": name, "steps": list(range(first, first + pred.shape[0])),
                              "predicted": np.round(pred.astype(np.float64), 6).tolist()}
                             for name, pred in preds.items()]}
        write_text_atomic(out, json.dumps(doc, allow_nan=True) + "\n")
    sizes = ", ".join(f"{name}: {pred.shape[0]} steps" for name, pred in list(preds.items())[:3])
    more = f" (+{len(preds) - 3} more)" if len(preds) > 3 else ""
    print(f"{sim.method} ({sim.metric}): {len(preds)} curriculum(s) x {test_ids.size} test examples from step {first} "
          f"({sizes}{more}) -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    from gptfluence.analysis.evaluate import evaluate, format_markdown, write_results
    from gptfluence.dynamics.store import Dynamics

    from gptfluence.outputs import prepare_output_file

    prepare_output_file(args.out, inputs=args.dynamics, suffixes=(".json",))
    if args.markdown:
        prepare_output_file(args.markdown, inputs=args.dynamics, flag="--markdown")
    if args.unseen_heldout:
        if len(args.dynamics) != 1:
            raise InputError(f"--unseen-heldout takes one fit store, got {len(args.dynamics)} stores")
        from gptfluence.cli.applications import run_unseen

        return run_unseen(args, args.dynamics[0], args.unseen_heldout, args.unseen_test_fraction)
    stores = [Dynamics.open(p) for p in args.dynamics]
    given = _given_config(args)
    configs = _method_configs(list(args.methods), given, strict=True)
    seed = given.get("seed", 0)
    split = None
    if args.fit_runs is not None or args.val_runs is not None or args.test_runs is not None:
        split = {"fit": args.fit_runs, "val": args.val_runs, "test": args.test_runs}
    res = evaluate(stores, methods=args.methods, metrics=args.metrics, split=split, seed=seed, configs=configs,
                   progress=not args.no_progress, keep_trajectories=not args.no_trajectories,
                   n_val=args.n_val, n_test=args.n_test)
    if not res["results"]:
        why = "; ".join(f"{s['task']} / {s['metric']}: {s['reason']}" for s in res["config"]["skipped"]) or "no metric"
        raise InputError(f"nothing to evaluate ({why}); choose --metrics the stores record")
    write_results(res, args.out, args.markdown)
    sys.stdout.write(format_markdown(res))
    for s in res["config"]["skipped"]:
        print(f"skipped {s['task']} / {s['metric']}: {s['reason']}", file=sys.stderr)
    print(f"results -> {args.out}" + (f", table -> {args.markdown}" if args.markdown else ""))
    return 0
