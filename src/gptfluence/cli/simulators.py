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

from gptfluence.config import add_arguments, load_json
from gptfluence.errors import InputError


def _config_classes() -> list[type]:
    from gptfluence.simulators import GPTfluenceConfig, SimfluenceConfig

    return [GPTfluenceConfig, SimfluenceConfig]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    seen: set[str] = set()
    group = p.add_argument_group("simulator config (fields of GPTfluenceConfig / SimfluenceConfig)")
    for cls in _config_classes():
        skip = tuple(seen)
        add_arguments(group, cls, skip=skip)  # type: ignore[arg-type]
        seen |= {f.name for f in dataclasses.fields(cls)}


def _given_config(ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for cls in _config_classes() for f in dataclasses.fields(cls)}
    return {k: getattr(ns, k) for k in sorted(names) if getattr(ns, k, None) is not None}


def _method_configs(methods: list[str], given: dict[str, Any], strict: bool) -> dict[str, dict[str, Any]]:
    from gptfluence.simulators import CONFIG_CLASSES

    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for m in methods:
        cls = CONFIG_CLASSES.get(m)
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
    from gptfluence.simulators import SIMULATOR_METHODS

    p = subparsers.add_parser("fit", help="fit a simulator on a dynamics store",
                              description="Fit a simulator (teacher forcing, early stopping on validation runs).")
    p.add_argument("dynamics", help="dynamics store folder")
    p.add_argument("--method", default="gptfluence", choices=SIMULATOR_METHODS)
    p.add_argument("--metric", default="loss", help="metric to simulate (default: loss)")
    p.add_argument("--out", required=True, help="simulator folder to write (config.json + weights.safetensors)")
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
                   help="a run id of the store, or a file: JSON lines {\"step\", \"samples_id\"} (GPTDynamics), "
                        "a .json [T][b] array or a .npy [T, b] array of training ids (-1 = padding)")
    p.add_argument("--test-ids", nargs="+", type=int, default=None, help="test ids (default: all of the start run)")
    p.add_argument("--start-run", default=None,
                   help="run whose values at the first step are the start values (default: the curriculum's run, else the first run)")
    p.add_argument("--first-step", type=int, default=None, help="step of the start values (default: first recorded step of the start run)")
    p.add_argument("--allow-new-examples", action="store_true",
                   help="gptfluence only: use a store with other examples than the fit store (embeds them)")
    p.add_argument("--out", required=True, help="output: .json ({steps, test_ids, predicted [S][M]}) or .npy [S, M]")
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("evaluate", help="fit and score simulators on held-out runs",
                              description="Fit each method on each store's fit runs, roll out on held-out runs, "
                                          "report all-steps MSE/MAE, final-step and curriculum Spearman.")
    p.add_argument("dynamics", nargs="+", help="dynamics store folders (one per task)")
    p.add_argument("--methods", nargs="+", default=list(SIMULATOR_METHODS), choices=SIMULATOR_METHODS)
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
    _add_config_flags(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the simulators' small tensor ops are fastest single-threaded)")
    p.set_defaults(func=cmd_evaluate)


# ---------------------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from gptfluence.analysis.splits import split_runs
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import make_simulator

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
    out = sim.save(args.out)
    msg = f"fitted {args.method} ({args.metric}) on {len(fit_runs)} runs"
    if val_runs:
        msg += f", validated on {len(val_runs)}"
    if hist.get("best_val_mse") is not None:
        msg += f"; best validation rollout MSE {hist['best_val_mse'] * getattr(sim, 'scale', 1.0) ** 2:.4g} (epoch {hist['best_epoch']})"
    print(msg + f" -> {out}")
    held = [r for r in store.run_ids if r not in set(fit_runs) | set(val_runs)]
    if held:
        print(f"held-out runs: {' '.join(held)}")
    return 0


def read_curriculum(path: str | Path) -> np.ndarray:
    """A curriculum [T, b] int64 (-1 = padding) from .npy, a .json [T][b] array, or JSON lines
    ``{"step": s, "samples_id": [...]}`` (s = 1..T; exact repeats tolerated, see
    `gptfluence.dynamics.curriculum.StepBatches`)."""
    from gptfluence.dynamics.curriculum import load_npy, pad_rows, read_samples_id

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".npy":
        arr = load_npy(path)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{path}: expected an integer array [steps, batch], got {arr.dtype} {arr.shape}")
        return arr.astype(np.int64)
    if path.read_text(encoding="utf-8").lstrip().startswith("["):
        data = load_json(path)
        for t, row in enumerate(data):
            if not isinstance(row, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
                raise InputError(f"{path}: row {t} (step {t + 1}) must be a list of integer ids")
        if not data:
            raise InputError(f"{path}: empty curriculum")
        out = pad_rows(data)
    else:
        out = read_samples_id(path)
    if out.min() < -1:
        raise InputError(f"{path}: id {int(out.min())} is negative (only -1, padding, may be)")
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.simulators import GPTfluenceSimulator, load_simulator

    store = Dynamics.open(args.dynamics)
    sim = load_simulator(args.simulator, dynamics=store, allow_new_examples=args.allow_new_examples)
    cur_src = args.curriculum
    if cur_src in store.run_ids:
        cur = store.run(cur_src).curriculum
        start_run = args.start_run or cur_src
        src_name = f"run {cur_src!r}"
    else:
        if not Path(cur_src).exists():
            raise InputError(f"--curriculum {cur_src!r}: neither a run id of the store nor a file")
        cur = read_curriculum(cur_src)
        if not args.start_run and not store.run_ids:
            raise InputError(f"{args.dynamics}: the store has no runs to take start values from")
        start_run = args.start_run or store.run_ids[0]
        src_name = str(cur_src)
        for t, row in enumerate(cur):
            for i in row:
                if i >= 0 and int(i) not in store.train_row:
                    raise InputError(f"{cur_src}: training id {int(i)} (step {t + 1}) is not in the store's training pool")
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
    if first > cur.shape[0]:
        raise InputError(f"{src_name}: first step {first} is beyond its {cur.shape[0]} steps")
    if isinstance(sim, GPTfluenceSimulator):
        sim.ensure_features(store, np.unique(cur[cur >= 0]), test_ids)
    pred = sim.simulate(cur[None], test_ids, start, first_step=first)[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = list(range(first, cur.shape[0] + 1))
    if out.suffix == ".npy":
        np.save(out, pred)
    else:
        out.write_text(json.dumps({"method": sim.method, "metric": sim.metric, "curriculum": src_name,
                                   "start_run": start_run, "steps": steps, "test_ids": test_ids.tolist(),
                                   "predicted": np.round(pred.astype(np.float64), 6).tolist()}) + "\n", encoding="utf-8")
    print(f"{sim.method} ({sim.metric}): {len(steps)} steps x {test_ids.size} test examples from step {first} -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from gptfluence.analysis.evaluate import evaluate, format_markdown, write_results
    from gptfluence.dynamics.store import Dynamics

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
    write_results(res, args.out, args.markdown)
    sys.stdout.write(format_markdown(res))
    for s in res["config"]["skipped"]:
        print(f"skipped {s['task']} / {s['metric']}: {s['reason']}", file=sys.stderr)
    print(f"results -> {args.out}" + (f", table -> {args.markdown}" if args.markdown else ""))
    return 0
