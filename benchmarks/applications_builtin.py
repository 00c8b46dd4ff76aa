"""The paper's applications on the built-in tasks -> benchmarks/results/applications_builtin.json.

Sections (README, "Applications"):

* ``mislabeled``: `gptfluence.analysis.mislabeled.measure_mislabeled` on a store collected with
  ``--flip-fraction`` (detection curves and AUC per ranking; fix and re-train, several seeds);
* ``unseen``: `gptfluence.analysis.unseen.measure_unseen` on (fit store, held-out store) pairs, one
  per task (cases seen / unseen_train / unseen_test / both);
* ``selection`` and ``peer``: parts written by benchmarks/applications_selection.py and
  benchmarks/applications_peers.py (merged as they are; a missing part is listed under
  ``missing_sections``, never invented).

Each section this script computes is first written as a part file (``--parts``), so one section can
be re-run (``--sections``) and the merge redone (``--sections`` with nothing) without the others.
``make applications-builtin`` runs everything (collection included).

    python benchmarks/applications_builtin.py --flipped runs/apps/sentiment-flip40 \\
        --unseen runs/apps/sentiment-part runs/apps/sentiment-unseen-heldout \\
        --parts benchmarks/results/applications_parts --out benchmarks/results/applications_builtin.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SECTIONS = ("mislabeled", "unseen", "selection", "peer")
COMPUTED_HERE = ("mislabeled", "unseen")


def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def write_json(path: Path, obj: dict) -> None:
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.config import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_sanitize(obj), indent=1) + "\n")


def run_mislabeled(args: argparse.Namespace) -> dict:
    import dataclasses

    from gptfluence.analysis.mislabeled import MislabeledConfig, measure_mislabeled
    from gptfluence.dynamics.store import Dynamics

    out = []
    for path in args.flipped:
        cfg = dataclasses.replace(MislabeledConfig(), retrain_seeds=args.retrain_seeds,
                                  fix_fractions=tuple(args.fix_fractions))
        log(f"mislabeled: {path}")
        out.append(measure_mislabeled(Dynamics.open(path), cfg, log=log))
    return {"experiments": out}


def run_unseen(args: argparse.Namespace) -> dict:
    from gptfluence.analysis.unseen import measure_unseen
    from gptfluence.dynamics.store import Dynamics

    if len(args.unseen) % 2:
        raise SystemExit("--unseen takes pairs: FIT_STORE HELDOUT_STORE [FIT_STORE HELDOUT_STORE ...]")
    tasks = []
    for fit, held in zip(args.unseen[::2], args.unseen[1::2]):
        log(f"unseen: {fit} / {held}")
        tasks.append(measure_unseen(Dynamics.open(fit), Dynamics.open(held), methods=args.unseen_methods,
                                    metrics=args.unseen_metrics, test_fraction=args.test_fraction, log=log))
    return {"tasks": tasks,
            "records": [r for t in tasks for r in t["results"]]}


def attach_ours_to_peer(peer: dict, mislabeled: dict | None, lds_file: Path | None) -> dict:
    """Ours next to the peers: the simulators' and references' LDS on the same held-out store (from
    the committed LDS results) and our rankings' AUC (from the mislabeled section)."""
    ours: dict = {}
    if lds_file is not None and lds_file.exists():
        lds = json.loads(lds_file.read_text())
        task = peer.get("task") or "sentiment"
        ours["lds"] = [{k: r.get(k) for k in ("method", "kind", "task", "metric", "variation", "lds_mean",
                                              "lds_ci_low", "lds_ci_high", "n_nan", "n_curricula")}
                       for r in lds.get("results", []) if r.get("task") == task and r.get("metric") == "loss"]
        ours["lds_source"] = str(lds_file)
    if mislabeled:
        ours["auc"] = {e["task"]: {m: r["auc"] for m, r in e["methods"].items()} for e in mislabeled["experiments"]}
    peer = dict(peer)
    peer["ours"] = ours
    return peer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="*", default=list(COMPUTED_HERE), choices=COMPUTED_HERE,
                   help="sections to compute now (default: mislabeled unseen; none = only merge the parts)")
    p.add_argument("--flipped", nargs="+", default=["runs/apps/sentiment-flip40"],
                   help="stores collected with --flip-fraction (mislabeled)")
    p.add_argument("--unseen", nargs="+", default=[], help="FIT_STORE HELDOUT_STORE pairs (unseen)")
    p.add_argument("--unseen-methods", nargs="+", default=["gptfluence", "simfluence", "mean_curve", "constant"])
    p.add_argument("--unseen-metrics", nargs="+", default=None)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--retrain-seeds", type=int, default=5)
    p.add_argument("--fix-fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--lds", default="benchmarks/results/lds_builtin.json",
                   help="our LDS results on the held-out store the peers are scored on (put next to theirs)")
    p.add_argument("--parts", default="benchmarks/results/applications_parts", help="folder of the section parts")
    p.add_argument("--out", default="benchmarks/results/applications_builtin.json")
    args = p.parse_args()
    parts = Path(args.parts)
    t0 = time.time()
    for s in args.sections:
        res = run_mislabeled(args) if s == "mislabeled" else run_unseen(args)
        res["command"] = " ".join(sys.argv)
        res["seconds"] = round(time.time() - t0, 1)
        write_json(parts / f"{s}.json", res)
        log(f"{s} -> {parts / (s + '.json')}")
    merged: dict = {"format": "gptfluence.applications", "sections": {}, "missing_sections": []}
    for s in SECTIONS:
        f = parts / f"{s}.json"
        if not f.exists():
            merged["missing_sections"].append(s)
            continue
        merged[s] = json.loads(f.read_text())
        merged["sections"][s] = {"part": str(f), "command": merged[s].get("command")}
    if "peer" in merged:
        merged["peer"] = attach_ours_to_peer(merged["peer"], merged.get("mislabeled"), Path(args.lds))
    if merged["missing_sections"]:
        log("MISSING SECTIONS (not measured, not invented): " + ", ".join(merged["missing_sections"]))
    write_json(Path(args.out), merged)
    log(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
