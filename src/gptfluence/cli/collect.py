"""``gptfluence collect``: fine-tune under R curricula and store the training dynamics."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptfluence.config import add_arguments, from_namespace, load_config, save_json
from gptfluence.dynamics.collect import CollectConfig, collect, summarize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="fine-tune the LM under R curricula and record the training dynamics",
                       description="Fine-tune the LM once per curriculum and record every test example's "
                                   "metrics after every optimizer step into a Dynamics store (resumable).")
    p.add_argument("--out", required=False, default=None, help="store folder (default: dynamics/<task>)")
    p.add_argument("--runs", type=int, default=8, help="number of runs (curricula) to collect (default: 8)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = one per core on CPU)")
    p.add_argument("--backend", default="local",
                   help="local (worker processes, default), batched (several runs per process through torch.func) "
                        "or ray (one Ray task per run; pip install 'gptfluence[ray]')")
    p.add_argument("--runs-per-batch", type=int, default=0,
                   help="batched backend: runs trained together (0 = as many as fit in half the free memory)")
    p.add_argument("--address", default=None,
                   help="ray backend: address of an existing Ray cluster ('auto', 'ray://head:10001'); "
                        "default: start a local instance with --workers CPUs")
    p.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="ray backend: GPUs per run (0.25 = four runs per GPU; 0 = 1 where the cluster has GPUs)")
    p.add_argument("--config", default=None, help="JSON file with collection settings (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, CollectConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = load_config(CollectConfig, args.config) if args.config else CollectConfig()
    cfg = from_namespace(CollectConfig, args, base)
    out = Path(args.out or Path("dynamics") / cfg.task.replace("/", "_"))
    store = collect(cfg, out, runs=args.runs, workers=args.workers, progress=not args.quiet, backend=args.backend,
                    address=args.address, runs_per_batch=args.runs_per_batch, gpus_per_run=args.gpus_per_run)
    save_json(cfg, out / "collect_config.json")
    print(f"\n{len(store)} runs of task {store.task.name!r} in {out} "
          f"({len(store.task.train)} training / {len(store.task.test)} test examples)")
    print(f"{'metric':<10} {'runs':>5} {'step 0 mean':>12} {'final mean':>12} {'final std (runs)':>17}")
    for row in summarize(store):
        print(f"{row['metric']:<10} {row['runs']:>5} {row['start_mean']:>12.4f} {row['final_mean']:>12.4f} "
              f"{row['final_std_over_runs']:>17.4f}")
    return 0
