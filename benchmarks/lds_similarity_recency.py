"""Do recent similar training examples help or hurt? A recency-weighted similarity reference.

For held-out stores (``gptfluence curricula`` + ``collect --record-steps ends``), the LDS of minus
the curriculum's summed word TF-IDF cosine to the test example (centred over the training pool, as
`tfidf_sum`), each step's batch weighted by ``gamma ** (T - t)`` (gamma = 1: `tfidf_sum` itself;
small gamma: the last few batches only). On order-only curricula (one subset, random orders) the
unweighted sum is the same for every curriculum, so any LDS there comes from *when* similar
examples were trained on: positive = recent similar examples lower the final loss, negative =
they raise it. Per test example the Spearman across curricula, mean over test examples with a
bootstrap CI (the `gptfluence lds` definition).

    python benchmarks/lds_similarity_recency.py runs/lds-builtin-full/data2text-heldout \\
        runs/draw1/data2text-heldout --out benchmarks/results/lds_similarity_recency.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gptfluence.analysis.lds import (cosine_matrix, heldout_finals, lds_summary, per_example_spearman,
                                     run_groups)
from gptfluence.dynamics.store import Dynamics
from gptfluence.features.lexical import TfidfFeatures

GAMMAS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("heldout", nargs="+", help="held-out stores")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)
    results = []
    for path in args.heldout:
        store = Dynamics.open(path)
        task, ids = store.task, list(store.run_ids)
        tids = np.asarray(store.run(ids[0]).test_ids)
        rows = np.asarray([store.test_row[int(t)] for t in tids])
        tf = TfidfFeatures.for_task(task)
        S = cosine_matrix(tf.encode([e.text for e in task.train]), tf.encode([e.text for e in task.test])[rows])
        S = S - S.mean(0, keepdims=True)  # [N, M], centred over the training pool
        pos = {int(t): i for i, t in enumerate(store.train_ids)}
        cur, _, true, _ = heldout_finals(store, "loss", ids)
        K, T, _ = cur.shape
        per_step = np.zeros((K, T, S.shape[1]))  # summed similarity of each step's batch
        for k in range(K):
            for t in range(T):
                for i in cur[k, t]:
                    if i >= 0:
                        per_step[k, t] += S[pos[int(i)]]
        for design, gids in sorted(run_groups(store).items()):
            sel = np.asarray([ids.index(r) for r in gids])
            for gamma in GAMMAS:
                w = gamma ** np.arange(T - 1, -1, -1, dtype=np.float64)
                pred = -(per_step[sel] * w[None, :, None]).sum(1)
                summ = lds_summary(per_example_spearman(true[sel], pred))
                results.append({"task": task.name, "store": str(path), "variation": design, "gamma": gamma,
                                "n_curricula": int(sel.size), **summ})
                m = summ["lds_mean"]
                print(f"{task.name:<12} {design:<11} gamma {gamma:<5} LDS "
                      f"{'n/a' if m is None else f'{m:+.3f}'} ({summ['n_nan']} NaN)")
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[1].replace("\n", " "), "gammas": GAMMAS,
                                          "results": results}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
