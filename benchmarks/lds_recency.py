"""What decides a test example's final loss on a label task: the whole run, or its last batches?

For a held-out store (``gptfluence curricula`` + ``collect --record-steps ends``), the LDS of the
`label_count` reference restricted to the last k batches of each curriculum (k = 1 .. T): minus
the number of training occurrences in those batches whose label equals the test example's.
A high LDS for small k and a lower one for the whole run means recency decides the final value.

    python benchmarks/lds_recency.py runs/lds-builtin/sentiment-heldout [more held-out stores] \\
        --out benchmarks/results/lds_recency.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gptfluence.analysis.lds import heldout_finals, label_count_predict, lds_summary, per_example_spearman, run_groups
from gptfluence.dynamics.store import Dynamics

WINDOWS = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("heldout", nargs="+", help="held-out stores of label tasks")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)
    results = []
    for path in args.heldout:
        store = Dynamics.open(path)
        if store.task.kind != "classification":
            print(f"{path}: not a label task, skipped", file=sys.stderr)
            continue
        runs = run_groups(store).get("both") or store.run_ids
        cur, _, true, _ = heldout_finals(store, "loss", runs)
        T = cur.shape[1]
        train_labels = [e.target for e in store.task.train]
        test_ids = store.run(runs[0]).test_ids
        test_labels = [store.test_example(int(i)).target for i in test_ids]
        for k in sorted({*(w for w in WINDOWS if w < T), T}):
            pred = label_count_predict(train_labels, test_labels, store.train_ids, cur[:, T - k:], "loss")
            summ = lds_summary(per_example_spearman(true, pred))
            results.append({"task": store.task.name, "last_batches": k, "whole_run": k == T,
                            "n_curricula": len(runs), **summ})
            print(f"{store.task.name:<12} last {k:>3} batches: LDS {summ.get('lds_mean', float('nan')):.3f}")
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[1].replace("\n", " "),
                                          "results": results}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
