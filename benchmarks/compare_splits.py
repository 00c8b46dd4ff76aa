"""Wins and MSE ratios of one method against the others over several `gptfluence evaluate` results
(e.g. the same stores evaluated with --seed 0, 1, 2: other splits and initialisations).

    python benchmarks/compare_splits.py benchmarks/results/evaluate_builtin.json \\
        benchmarks/results/evaluate_builtin_seed1.json benchmarks/results/evaluate_builtin_seed2.json

For each task: the all-steps MSE of ``--method`` divided by each other method's, per result file,
and how often it is lower. Writes ``benchmarks/results/compare_splits.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="evaluate JSON files (one per split)")
    ap.add_argument("--metric", default="loss")
    ap.add_argument("--method", default="gptfluence")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_splits.json"))
    args = ap.parse_args(argv)
    table: dict[str, dict[str, list[float]]] = {}  # task -> other method -> [ratio per file]
    seeds = []
    for path in args.results:
        res = json.loads(Path(path).read_text())
        seeds.append(res.get("config", {}).get("seed"))
        rows = [r for r in res["results"] if r["metric"] == args.metric]
        by = {(r["task"], r["method"]): r["mse_mean"] for r in rows}
        for (task, method), mse in by.items():
            if method == args.method or (task, args.method) not in by:
                continue
            table.setdefault(task, {}).setdefault(method, []).append(by[(task, args.method)] / mse)
    if not table:
        print(f"no {args.metric!r} results with method {args.method!r} in {args.results}", file=sys.stderr)
        return 2
    others = sorted({m for t in table.values() for m in t})
    out = {"method": args.method, "metric": args.metric, "files": args.results, "seeds": seeds, "tasks": {}}
    print(f"{args.method} / other, {args.metric} all-steps MSE (ratio < 1: {args.method} lower), over {len(args.results)} results")
    print("task".ljust(12) + "".join(f"{m:>28s}" for m in others))
    totals = {m: [0, 0] for m in others}
    for task, d in table.items():
        cells = []
        out["tasks"][task] = {}
        for m in others:
            r = d.get(m, [])
            wins = sum(x < 1 for x in r)
            totals[m][0] += wins
            totals[m][1] += len(r)
            out["tasks"][task][m] = {"ratios": r, "wins": wins, "n": len(r)}
            cells.append(f"{' '.join(f'{x:.3f}' for x in r)} ({wins}/{len(r)})".rjust(28))
        print(task.ljust(12) + "".join(cells))
    out["wins"] = {m: {"wins": w, "n": n} for m, (w, n) in totals.items()}
    geo = {m: math.exp(sum(math.log(x) for d in table.values() for x in d.get(m, [])) / max(totals[m][1], 1)) for m in others}
    out["geometric_mean_ratio"] = geo
    print("wins".ljust(12) + "".join(f"{totals[m][0]}/{totals[m][1]}, geo ratio {geo[m]:.3f}".rjust(28) for m in others))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
