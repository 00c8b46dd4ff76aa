"""Peer attribution libraries side by side with ours: LDS on held-out curricula and AUC of finding
mislabelled training examples, every library run through its own API (gptfluence.analysis.peers).

Protocol (the linear datamodel behind LDS): a peer scores ONE model, the fine-tuning of fit run
``--run`` re-trained to its last step; its prediction for a held-out curriculum is minus the sum
of the (helpful > 0) scores of the examples the curriculum holds, with repeats
(`datamodel_predict(scores, train_ids, curricula, sign=-1)`: a larger prediction = a larger
loss); LDS per variation exactly as `gptfluence.analysis.lds.measure_lds` scores its references
(Spearman per test example across curricula, mean over test examples, bootstrap CI over test
examples, NaN columns counted). A sum of scores cannot tell two orders of one subset apart: on
the ``order`` variation every prediction column is constant (all test examples NaN, no LDS).

Mislabelled data: on a store collected with ``--flip-fraction``, the peer's self-influence of
every training example at the re-trained final model of run ``--run`` of that store, inspected
from the largest down (`gptfluence.analysis.mislabeled`).

"ours": the same protocol with our exact gradient dot products at the same model
(`gptfluence.features.per_example.gradient_dots`, Grad-Dot at the final model; self-influence
= the squared gradient norm), the in-house counterpart of every single-model peer.

    python benchmarks/applications_peers.py --fit runs/builtin/sentiment \\
        --heldout runs/lds-builtin/sentiment-heldout --flipped runs/apps/sentiment-flip40 \\
        --out benchmarks/results/applications_parts/peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

DEFAULT_METHODS = ("captum/tracincp", "dattri/tracin", "dattri/trak", "kronfluence/identity", "kronfluence/ekfac")
FOUND_AT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def lds_records(scores: np.ndarray, train_ids: np.ndarray, cur: np.ndarray, true: np.ndarray,
                groups: dict[str, list[str]], all_ids: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    from gptfluence.analysis.lds import datamodel_predict, lds_summary, per_example_spearman

    pred = datamodel_predict(scores, train_ids, cur, sign=-1.0)  # helpful scores, loss: larger sum = lower loss
    out = {}
    for variation, ids in groups.items():
        sel = np.asarray([all_ids.index(r) for r in ids])
        rec = lds_summary(per_example_spearman(true[sel], pred[sel]), n_boot=n_boot, seed=seed)
        rec["n_curricula"] = int(sel.size)
        out[variation] = rec
    return out


def mislabeled_record(own: np.ndarray, flipped: np.ndarray) -> dict[str, Any]:
    from gptfluence.analysis.mislabeled import detection_auc, found_at, perfect_auc

    return {"auc": detection_auc(own, flipped), "perfect_auc": perfect_auc(flipped),
            "found_at": dict(zip([str(f) for f in FOUND_AT], found_at(own, flipped, FOUND_AT))),
            "n_nan_scores": int((~np.isfinite(own)).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", required=True, help="fit store whose run --run is re-trained and scored (LDS)")
    ap.add_argument("--heldout", required=True, help="held-out store of the fit store's task (gptfluence curricula + collect)")
    ap.add_argument("--flipped", default="", help="store collected with --flip-fraction (mislabelled AUC); '' = skip")
    ap.add_argument("--run", default="run-0000", help="the run of each store whose re-trained final model is scored")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="peer methods (library/method)")
    ap.add_argument("--no-ours", action="store_true", help="skip our own gradient dot products")
    ap.add_argument("--ensemble", type=int, default=1,
                    help="also score the first N runs of each store (--run first) and average their scores (N > 1)")
    ap.add_argument("--ensemble-methods", nargs="*", default=["ours", "kronfluence/ekfac", "dattri/trak"],
                    help="methods (and 'ours') also measured as --ensemble averages")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/results/applications_parts/peer.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch progress bars

    import torch

    from gptfluence.analysis import peers as P
    from gptfluence.analysis.evaluate import _sanitize
    from gptfluence.analysis.lds import check_same_collection, heldout_finals, run_groups
    from gptfluence.config import write_text_atomic
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.errors import InputError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for m in args.methods + [m for m in args.ensemble_methods if m != "ours"]:
        P.peer_spec(m)
    missing = [m for m in args.ensemble_methods if m != "ours" and m not in args.methods]
    if missing:
        raise InputError(f"--ensemble-methods {missing[0]} is not among --methods")
    if args.ensemble < 1:
        raise InputError(f"--ensemble must be >= 1, got {args.ensemble}")
    inputs_paths = [args.fit, args.heldout] + ([args.flipped] if args.flipped else [])
    out_path = prepare_output_file_(args.out, inputs_paths)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    fit, held = Dynamics.open(args.fit), Dynamics.open(args.heldout)
    check_same_collection(fit, held)
    groups = run_groups(held)
    all_ids = list(held.run_ids)
    cur, _, true, _ = heldout_finals(held, "loss", all_ids)
    tids = np.asarray(held.run(all_ids[0]).test_ids)
    fl = Dynamics.open(args.flipped) if args.flipped else None

    def model_runs(store: Any) -> list[str]:
        rest = [r for r in store.run_ids if r != args.run]
        runs = [store.run(args.run).run_id] + rest  # an unknown --run is the store's InputError
        if len(runs) < args.ensemble:
            raise InputError(f"{store.root}: --ensemble {args.ensemble} needs that many runs, it has {len(runs)}")
        return runs[:args.ensemble]

    fit_runs = model_runs(fit)
    flip_runs = model_runs(fl) if fl is not None else []
    flipped = None
    if fl is not None:
        ids = set(int(i) for i in (fl.task.metadata or {}).get("flipped_ids") or [])
        flipped = np.asarray([int(i) in ids for i in fl.train_ids])
        if not flipped.any():
            raise InputError(f"{args.flipped}: task.metadata has no flipped_ids (collect with --flip-fraction)")

    # per method: per model j, (scores [N, M], seconds) and (self [N], seconds) or an error
    scores: dict[str, list[Any]] = {}
    selfs: dict[str, list[Any]] = {}
    names = (["ours"] if not args.no_ours else []) + list(args.methods)
    replay_s = []
    steps = {}
    for j in range(args.ensemble):
        todo = names if j == 0 else [m for m in names if m in args.ensemble_methods]
        t = time.perf_counter()
        lds_in = P.load_peer_inputs(fit, fit_runs[j], test_ids=tids)
        flip_in = P.load_peer_inputs(fl, flip_runs[j], test_ids=fl.test_ids[:1]) if fl is not None else None
        replay_s.append(time.perf_counter() - t)
        steps.setdefault("lds", []).append(lds_in.step)
        steps.setdefault("mislabeled", []).append(flip_in.step if flip_in is not None else None)
        say(f"model {j + 1}/{args.ensemble}: runs {fit_runs[j]} / {flip_runs[j] if flip_runs else '-'} re-trained "
            f"to steps {lds_in.step} / {flip_in.step if flip_in else '-'} ({replay_s[-1]:.1f} s)")
        for name in todo:
            scores.setdefault(name, []).append(_timed(lambda: _scores(P, name, lds_in)))
            if flip_in is not None:
                selfs.setdefault(name, []).append(_timed(lambda: _self(P, name, flip_in)))
            say(f"  {name}: {scores[name][-1][1]:.1f} s scores" + (f", {selfs[name][-1][1]:.1f} s self" if selfs else ""))

    records: list[dict[str, Any]] = []
    for name in names:
        for n in sorted({1, args.ensemble}):
            if len(scores[name]) < n:
                continue
            if name == "ours":
                rec = {"library": "gptfluence", "method": "grad_dot_final", "name": "ours/grad_dot_final",
                       "version": _own_version(),
                       "description": "our exact gradient dot products at the same re-trained final model "
                                      "(gptfluence.features.per_example.gradient_dots); self: squared gradient norm"}
            else:
                lib, meth = name.split("/", 1)
                rec = {"library": lib, "method": meth, "name": name, "version": P.peer_version(name),
                       "description": P.peer_spec(name).description}
            rec.update({"n_models": n, "fit_runs": fit_runs[:n], "flipped_runs": flip_runs[:n]})
            got = scores[name][:n]
            err = next((v for v, _ in got if isinstance(v, str)), None)
            if err is not None:
                rec["error"] = err
            else:
                s = np.mean([v for v, _ in got], axis=0)
                rec["seconds"] = float(sum(t for _, t in got))
                rec["finite_scores"] = bool(np.isfinite(s).all())
                rec["lds"] = lds_records(np.nan_to_num(s), fit.train_ids, cur, true, groups, all_ids, args.n_boot,
                                         args.seed)
            if name in selfs:
                got = selfs[name][:n]
                err = next((v for v, _ in got if isinstance(v, str)), None)
                if err is not None:
                    rec["mislabeled"] = {"error": err}
                else:
                    rec["seconds_self"] = float(sum(t for _, t in got))
                    rec["mislabeled"] = mislabeled_record(np.mean([v for v, _ in got], axis=0), flipped)
            records.append(rec)
            say(f"{rec['name']} {rec['version']} x{n}: {_brief(rec)}")

    result = {
        "section": "peer",
        "benchmark": "benchmarks/applications_peers.py",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "protocol": {
            "model": f"the final model of run {args.run} of each store re-trained (n_models 1); n_models > 1: scores "
                     f"averaged over that many runs' re-trained final models (fit_runs / flipped_runs)",
            "lds": "prediction for a held-out curriculum = minus the sum of the helpful (> 0) scores of the examples it "
                   "holds, with repeats (linear datamodel); LDS = mean over test examples of the Spearman across held-out "
                   "curricula of true vs predicted final loss; CI: percentile bootstrap over test examples; n_nan test "
                   "examples (constant column) counted and left out of the mean. The order variation holds one subset "
                   "in several orders: a sum of scores is constant there (every test example NaN, lds_mean null).",
            "mislabeled": "self-influence at the re-trained final model, inspected from the largest; AUC of the fraction "
                          "of flipped training examples found vs the fraction inspected (0.5 = random; perfect_auc = "
                          "every flipped one first); found_at: fraction of flipped found after inspecting that fraction",
            "sign": "scores: positive = helpful (each library's convention checked in tests/test_peers.py)",
            "seconds": "CPU wall seconds of the library's scoring calls (summed over models), on a shared 2-core machine",
        },
        "stores": {"fit": args.fit, "heldout": args.heldout, "flipped": args.flipped or None},
        "model_steps": steps,
        "replay_seconds": replay_s,
        "torch_threads": torch.get_num_threads(),
        "variations": {g: len(v) for g, v in groups.items()},
        "n_train": int(fit.train_ids.size), "n_test": int(tids.size),
        "n_flipped": int(flipped.sum()) if flipped is not None else None,
        "records": records,
    }
    write_text_atomic(out_path, json.dumps(_sanitize(result), indent=1, allow_nan=False) + "\n")
    say(f"wrote {out_path}")
    return 0


def prepare_output_file_(out: str, inputs: list[str]) -> Any:
    from gptfluence.outputs import prepare_output_file

    return prepare_output_file(out, inputs, suffixes=(".json",))


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    v = fn()
    return v, time.perf_counter() - t


def _scores(P: Any, name: str, inputs: Any) -> Any:
    """Scores [N, M], or the error message of a library that failed (recorded, the others go on)."""
    from gptfluence.errors import GptfluenceError
    from gptfluence.features.per_example import gradient_dots

    try:
        if name == "ours":
            return gradient_dots(inputs.model, inputs.train_rows, inputs.test_rows)
        return P.peer_scores(name, inputs)
    except (GptfluenceError, RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _self(P: Any, name: str, inputs: Any) -> Any:
    from gptfluence.errors import GptfluenceError
    from gptfluence.features.per_example import gradient_dots

    try:
        if name == "ours":
            return gradient_dots(inputs.model, inputs.train_rows, inputs.test_rows, self_dots=True)[1]
        return P.peer_self_influence(name, inputs)
    except (GptfluenceError, RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _own_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gptfluence")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _brief(rec: dict[str, Any]) -> str:
    if "lds" not in rec:
        return rec.get("error", "n/a")
    parts = [f"{v} {r['lds_mean']:.3f}" for v, r in rec["lds"].items()]
    if "auc" in (rec.get("mislabeled") or {}):
        parts.append(f"AUC {rec['mislabeled']['auc']:.3f}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
