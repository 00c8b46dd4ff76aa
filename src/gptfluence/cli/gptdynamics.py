"""``gptfluence export-gptdynamics`` and ``gptfluence import-gptdynamics``: the published layout."""

from __future__ import annotations

import argparse



def _summary(dyn, what: str) -> str:
    runs = dyn.runs()
    steps = sorted({r.num_steps for r in runs})
    recorded = sum(int(r.steps.size) for r in runs)
    steps_s = "-".join(str(s) for s in (steps[:1] + steps[-1:] if len(steps) > 1 else steps)) or "0"
    return (f"{what}: {len(runs)} runs, {steps_s} steps per run ({recorded} recorded steps in all), "
            f"{len(dyn.task.train)} train / {len(dyn.task.test)} test examples, "
            f"metrics: {', '.join(dyn.metrics) or '-'}")


def _export(args: argparse.Namespace) -> int:
    from gptfluence.dynamics.gptdynamics import export_gptdynamics
    from gptfluence.dynamics.store import Dynamics

    dyn = Dynamics.open(args.dir)
    out = export_gptdynamics(dyn, args.out, metrics=args.metrics, overwrite=args.overwrite)
    print(_summary(dyn, f"exported {args.dir} -> {out}"))
    return 0


def _import(args: argparse.Namespace) -> int:
    from gptfluence.dynamics.gptdynamics import import_gptdynamics

    dyn = import_gptdynamics(args.input, args.dir, task_name=args.task_name)
    rep = dyn.import_report
    print(_summary(dyn, f"imported {args.input} -> {args.dir}")
          + f"; {rep['unrecorded_values']} unrecorded values (NaN: missing steps or ids, and "
            f"{rep['nan_records']} records whose value was NaN); {rep['exact_repeats']} exact repeats kept once")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-gptdynamics", help="write a dynamics store in the published GPTDynamics layout",
        description="Write a dynamics store DIR in the published GPTDynamics layout to OUT "
                    "(texts/, runs/<folder>/train_samples_id.json and all_<metric>_trajectory.out), "
                    "with gptfluence sidecars that make the export lossless.")
    p.add_argument("dir", metavar="DIR", help="dynamics store folder")
    p.add_argument("out", metavar="OUT", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics to write (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT: an earlier export's files there are replaced, nothing else is touched")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "import-gptdynamics", help="read the published GPTDynamics layout into a dynamics store",
        description="Read IN (texts/ and runs/ in the published GPTDynamics layout) into a new dynamics "
                    "store DIR. Missing steps and exact repeats are tolerated; conflicting repeats are errors.")
    p.add_argument("input", metavar="IN", help="folder in the GPTDynamics layout")
    p.add_argument("dir", metavar="DIR", help="dynamics store folder to create (new or empty)")
    p.add_argument("--task-name", default=None, help="task name (default: from the export manifest or IN's name)")
    p.set_defaults(func=_import)
