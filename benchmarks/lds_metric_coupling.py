"""How much of a generation metric's ranking across curricula the final loss carries.

For held-out stores of generation tasks (``gptfluence curricula`` + ``collect --record-steps
ends``), the LDS-style score of an *oracle* that knows each curriculum's true final loss and ranks
the curricula by minus it, against the true final BLEU / ROUGE-L: per test example the Spearman
across curricula of -loss_T vs metric_T, mean over test examples with a bootstrap CI (the
`gptfluence lds` definition; constant columns counted as NaN, not dropped silently). A low value
means the greedy-decoded metric moves with the curriculum in ways the loss does not show, so no
simulator of the loss (and no similarity sum) can rank it well; it bounds what transferring a
loss simulator to the metric could reach.

    python benchmarks/lds_metric_coupling.py runs/lds-builtin-full/data2text-heldout \\
        runs/lds-builtin-full/translation-heldout --out benchmarks/results/lds_metric_coupling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptfluence.analysis.lds import heldout_finals, lds_summary, per_example_spearman, run_groups
from gptfluence.dynamics.store import Dynamics

METRICS = ("bleu", "rougeL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("heldout", nargs="+", help="held-out stores of generation tasks")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)
    results = []
    for path in args.heldout:
        store = Dynamics.open(path)
        metrics = [m for m in METRICS if m in store.metrics]
        if not metrics:
            print(f"{path}: records none of {METRICS}, skipped", file=sys.stderr)
            continue
        for design, runs in sorted(run_groups(store).items()):
            _, _, loss, _ = heldout_finals(store, "loss", runs)
            for m in metrics:
                _, _, true, _ = heldout_finals(store, m, runs)
                summ = lds_summary(per_example_spearman(true, -loss))
                results.append({"task": store.task.name, "store": str(path), "metric": m, "variation": design,
                                "predictor": "minus the true final loss", "n_curricula": len(runs), **summ})
                print(f"{store.task.name:<12} {m:<7} {design:<11} LDS of -true final loss {summ['lds_mean']:.3f} "
                      f"[{summ['lds_ci_low']:.3f}, {summ['lds_ci_high']:.3f}] ({summ['n_nan']} NaN)")
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[1].replace("\n", " "),
                                          "results": results}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
