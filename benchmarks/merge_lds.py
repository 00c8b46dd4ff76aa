"""Merge per-task `gptfluence lds` results into one file and table (benchmarks/results/lds_builtin.*).

    python benchmarks/merge_lds.py --out benchmarks/results/lds_builtin.json --markdown benchmarks/results/lds_builtin.md \
        runs/lds/sentiment.json runs/lds/entailment.json ...

The merged JSON keeps every input's ``config`` under ``configs`` (one per task) and concatenates
``results`` (records: method, kind, task, metric, variation, lds_mean, lds_ci_low, lds_ci_high,
n_curricula, n_test_examples, n_nan, n_true_constant, fit_seconds); per-example Spearman values
are left out (they stay in the per-task files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptfluence.analysis.lds import format_lds_markdown  # noqa: E402
from gptfluence.config import write_text_atomic  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="per-task JSON files written by `gptfluence lds`")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", default=None)
    a = p.parse_args()
    merged = {"benchmark": "LDS on held-out curricula, per built-in task (gptfluence lds)", "configs": {},
              "results": []}
    for path in a.inputs:
        d = json.loads(Path(path).read_text())
        tasks = sorted({r["task"] for r in d["results"]})
        for t in tasks:
            merged["configs"][t] = d["config"]
        merged["results"] += d["results"]
    write_text_atomic(a.out, json.dumps(merged, indent=1) + "\n")
    if a.markdown:
        write_text_atomic(a.markdown, format_lds_markdown(merged))
    print(format_lds_markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
