"""Verification by re-training: does removing what a method calls helpful / harmful really move the metric?

For one recorded run (its curriculum, seed and start values) and a test set:

1. influence: the simulator's leave-one-out scores of every training example of the curriculum
   on each test example (`run_loo_influence`, > 0 = helpful), summed over the test set;
2. three changed curricula: every occurrence of the top-k HELPFUL, the top-k HARMFUL or k RANDOM
   (seeded) training examples removed. ``fill="pad"`` (default): removed occurrences become
   padding, the batches of those steps shrink, the number of steps stays; ``fill="pool"``: each
   removed example is replaced, at every occurrence, by a pool example the curriculum did not
   hold (batch sizes kept);
3. simulated change per test example = simulated final(changed) - simulated final(full curriculum);
4. actual change = final metric after really fine-tuning on the changed curriculum - final after
   re-training the full curriculum, both from the same base model with the run's seed and the
   store's collection settings (`collect` with a curriculum file and ``record_steps="ends"``, into
   a store inside the output folder: resumable, each run committed atomically);
5. the noise floor: the full curriculum re-trained with other seeds (with dropout 0 and
   deterministic kernels this may give exactly the same result: then ``deterministic`` is true and
   the seed spread is 0), and with the same examples in other orders (re-ordering spread).

Per group: the changes per test example, their means, the Pearson correlation across test examples
of simulated vs actual change, and the sign agreement (fraction of test examples whose simulated
and actual change have the same sign). Changes are in the metric's unit; for loss a negative
change means the loss went down. Removing harmful examples should lower the loss (raise a
higher-is-better metric) on average, or the ranking is wrong. With padding every removal also
means fewer examples trained on, and with a detrended simulator "harmful" means "less helpful than
an average example", so each group is also compared with the random group
(``*_minus_random``: removing harmful examples should lower the loss relative to removing random
ones, removing helpful ones raise it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import arg
from gptfluence.errors import InputError

FORMAT = "gptfluence.verify"
CONFIG_FORMAT = "gptfluence.verify-config"
GROUPS = ("helpful", "harmful", "random")


@dataclass
class VerifyConfig:
    """Settings of one verification (saved as verify_config.json in the output folder)."""

    k: int = arg(5, "training examples removed per group (top-k helpful, top-k harmful, k random)")
    noise_seeds: int = arg(2, "extra re-trainings of the full curriculum with other seeds (noise floor)")
    reorders: int = arg(2, "re-trainings of the full curriculum's examples in other random orders (noise floor)")
    seed: int = arg(0, "seed of the random group, the re-orderings and the pool fill")
    fill: str = arg("pad", "what takes a removed example's batch slots: 'pad' (padding: batches shrink, fewer examples are trained on) or 'pool' (each removed example is replaced, at every occurrence, by a training-pool example the curriculum does not hold, drawn at random: batch sizes kept)")
    workers: int = arg(0, "collection worker processes (0 = one per core)")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over pairs where both are finite; NaN with < 2 pairs or a constant side."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    a, b = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def sign_agreement(simulated: np.ndarray, actual: np.ndarray) -> float:
    """Fraction of finite pairs with ``sign(simulated) == sign(actual)`` (0 counts as its own sign)."""
    s = np.asarray(simulated, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    ok = np.isfinite(s) & np.isfinite(a)
    return float((np.sign(s[ok]) == np.sign(a[ok])).mean()) if ok.any() else float("nan")


def remove_ids(curriculum: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """``curriculum [T, b]`` with every occurrence of ``ids`` turned into padding (-1), padding moved
    to the end of each batch row; the number of steps is kept. `InputError` if a step is left
    with an empty batch."""
    c = np.asarray(curriculum, dtype=np.int64).copy()
    c[np.isin(c, np.asarray(list(ids), dtype=np.int64))] = -1
    order = np.argsort(c < 0, axis=1, kind="stable")
    c = np.take_along_axis(c, order, axis=1)
    empty = np.flatnonzero((c < 0).all(axis=1))
    if empty.size:
        raise InputError(f"removing {len(ids)} examples leaves step {int(empty[0]) + 1} with an empty batch; use a smaller --k")
    return c


def replace_ids(curriculum: np.ndarray, ids: Sequence[int], pool: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """``curriculum [T, b]`` with each of ``ids`` replaced, at every occurrence, by its own
    example of ``pool`` that the curriculum does not hold (drawn with ``rng``); shapes kept."""
    c = np.asarray(curriculum, dtype=np.int64).copy()
    ids = np.asarray(list(ids), dtype=np.int64)
    fresh = np.setdiff1d(np.asarray(list(pool), dtype=np.int64), c[c >= 0])
    if fresh.size < ids.size:
        raise InputError(f"--fill pool needs {ids.size} training-pool examples outside the curriculum, there are "
                         f"{fresh.size}; use --fill pad")
    new = rng.choice(fresh, size=ids.size, replace=False)
    out = c.copy()
    for old, nw in zip(ids, new):
        out[c == old] = nw
    return out


def reorder(curriculum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same training occurrences (ids with repeats) in a random order; padding stays where it was."""
    c = np.asarray(curriculum, dtype=np.int64).copy()
    real = c >= 0
    c[real] = rng.permutation(c[real])
    return c


def choose_groups(total: np.ndarray, train_ids: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """{group: training ids}: the k largest (helpful) and k smallest (harmful) ``total`` scores and
    k ids drawn at random (seeded), each among ``train_ids``; NaN scores are never chosen as
    helpful or harmful."""
    ok = np.flatnonzero(np.isfinite(total))
    if k < 1 or k > ok.size:
        raise InputError(f"--k must be in 1..{ok.size} (the curriculum's scored training examples), got {k}")
    by = ok[np.argsort(-total[ok], kind="stable")]
    rng = np.random.default_rng(seed)
    return {"helpful": train_ids[by[:k]], "harmful": train_ids[by[::-1][:k]],
            "random": np.sort(rng.choice(train_ids, size=k, replace=False))}


def _retrain_config(store: Any, curriculum_file: Path) -> Any:
    from gptfluence.dynamics.collect import store_collect_config

    cfg = store_collect_config(store)
    return dataclasses.replace(cfg, curriculum_file=str(curriculum_file), record_steps="ends", capture_every=0)


def retrain_curricula(store: Any, lines: Sequence[tuple[str, np.ndarray, str | None, int | None]], out: Path,
                      workers: int = 0, progress: bool = False, log: Any = print) -> Any:
    """Really fine-tune ``lines`` (``(run_id, curriculum [T, b], group, seed)``, written to
    ``out/curricula.jsonl``) from the store's base model with its collection settings, metrics at
    steps 0 and T only, into the store ``out/retrain`` (resumable: finished runs are kept); checks
    that the same base model was used and saves the collection config beside it. Returns the store."""
    from gptfluence.config import save_json
    from gptfluence.dynamics.collect import collect
    from gptfluence.dynamics.curriculum import write_curriculum_lines

    cfile = write_curriculum_lines(out / "curricula.jsonl", lines)
    ccfg = _retrain_config(store, cfile)
    retrain = collect(ccfg, out / "retrain", runs=len(lines), workers=workers, progress=progress, log=log)
    recorded = (store.manifest.get("config") or {}).get("base_model")
    got = (retrain.manifest.get("config") or {}).get("base_model")
    if recorded != got:
        raise InputError(f"re-training used base model {got!r}, the store was collected with {recorded!r}")
    save_json(ccfg, out / "retrain" / "collect_config.json")
    return retrain


def verify(simulator: Any, store: Any, run_id: str, out: str | Path, test_ids: Sequence[int] | None = None,
           config: VerifyConfig | None = None, progress: bool = False, log: Any = print) -> dict[str, Any]:
    """Verify ``simulator``'s influence ranking on run ``run_id`` of ``store`` by re-training
    (see the module doc). ``out``: the output folder (already checked by the caller); the
    re-trainings are collected into ``out/retrain``. Returns the JSON-ready report (also written to
    ``out/verify.json``)."""
    from gptfluence.analysis.influence import LOWER_IS_BETTER, run_loo_influence
    from gptfluence.config import save_json, to_dict

    cfg = config or VerifyConfig()
    out = Path(out)
    run = store.run(run_id)
    if run.seed is None:
        raise InputError(f"run {run_id!r} records no seed; it cannot be re-trained with the same seed")
    metric = str(simulator.metric)
    infl = run_loo_influence(simulator, run, test_ids=test_ids, dynamics=store)
    tids = infl.test_ids
    total = infl.scores.sum(axis=1)  # [N]: summed over the test set
    groups = choose_groups(total, infl.train_ids, cfg.k, cfg.seed)
    if cfg.fill == "pad":
        changed = {g: remove_ids(run.curriculum, ids) for g, ids in groups.items()}
    elif cfg.fill == "pool":
        frng = np.random.default_rng([cfg.seed, 0xF111])
        changed = {g: replace_ids(run.curriculum, ids, store.train_ids, frng) for g, ids in groups.items()}
    else:
        raise InputError(f"--fill must be 'pad' or 'pool' (got {cfg.fill!r})")

    # simulated changes, from the run's recorded start values (as the influence was computed)
    steps = np.asarray(run.steps)
    col = {int(t): j for j, t in enumerate(np.asarray(run.test_ids).tolist())}
    start = run.trajectory(metric)[0, [col[int(t)] for t in tids]].astype(np.float64)
    cur = np.stack([changed[g] for g in GROUPS])
    simulator.prepare(store, np.unique(cur[cur >= 0]), tids)
    sim_final = np.asarray(simulator.simulate(cur, tids, np.broadcast_to(start, (len(GROUPS), tids.size)).copy(),
                                              first_step=int(steps[0])))[:, -1]
    sim_change = {g: sim_final[i] - infl.final_full for i, g in enumerate(GROUPS)}

    # actual changes: re-train everything with the run's seed (noise runs with other seeds / orders)
    seed = int(run.seed)
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    lines = [("full", run.curriculum, "full", seed)]
    lines += [(f"remove-{g}", changed[g], g, seed) for g in GROUPS]
    lines += [(f"full-seed{s + 1}", run.curriculum, "noise-seed", seed + 1000 + s) for s in range(cfg.noise_seeds)]
    lines += [(f"reorder-{s + 1}", reorder(run.curriculum, rng), "noise-order", seed) for s in range(cfg.reorders)]
    log(f"re-training {len(lines)} curricula of run {run_id!r} ({run.num_steps} steps each) into {out / 'retrain'}")
    retrain = retrain_curricula(store, lines, out, workers=cfg.workers, progress=progress, log=log)

    def final(rid: str) -> np.ndarray:
        r = retrain.run(rid)
        c = {int(t): j for j, t in enumerate(np.asarray(r.test_ids).tolist())}
        return r.trajectory(metric)[-1, [c[int(t)] for t in tids]].astype(np.float64)

    base = final("full")
    recorded_final = run.trajectory(metric)[-1, [col[int(t)] for t in tids]].astype(np.float64) \
        if int(steps[-1]) == run.num_steps else np.full(tids.size, np.nan)
    lower = metric in LOWER_IS_BETTER
    report_groups = []
    results = []
    for g in GROUPS:
        act = final(f"remove-{g}") - base
        sim = sim_change[g]
        occ = int(np.isin(run.curriculum, groups[g]).sum())
        rec = {"group": g, "k": cfg.k, "removed_train_ids": groups[g].tolist(),
               "removed_scores": [float(total[np.flatnonzero(infl.train_ids == i)[0]]) for i in groups[g]],
               "removed_occurrences": occ,
               "simulated_change_mean": float(np.nanmean(sim)), "actual_change_mean": float(np.nanmean(act)),
               "pearson": pearson(sim, act), "sign_agreement": sign_agreement(sim, act),
               "simulated_change": sim.tolist(), "actual_change": act.tolist()}
        if g == "harmful":
            rec["expected_direction"] = "actual change < 0 (removing harmful examples lowers the loss)" if lower \
                else f"actual change > 0 (removing harmful examples raises {metric})"
            rec["expected_direction_ok"] = bool(rec["actual_change_mean"] < 0) if lower else bool(rec["actual_change_mean"] > 0)
        if g == "helpful":
            rec["expected_direction"] = "actual change > 0 (removing helpful examples raises the loss)" if lower \
                else f"actual change < 0 (removing helpful examples lowers {metric})"
            rec["expected_direction_ok"] = bool(rec["actual_change_mean"] > 0) if lower else bool(rec["actual_change_mean"] < 0)
        report_groups.append(rec)
        results.append({"method": simulator.method, "task": store.task.name, "metric": metric, "group": g, "k": cfg.k,
                        "simulated_change_mean": rec["simulated_change_mean"],
                        "actual_change_mean": rec["actual_change_mean"], "pearson": rec["pearson"],
                        "sign_agreement": rec["sign_agreement"], "n_test_examples": int(tids.size),
                        "removed_occurrences": occ})

    rnd = next(r for r in report_groups if r["group"] == "random")
    for rec, res in zip(report_groups, results):
        if rec["group"] == "random":
            continue
        sim_rel = np.asarray(rec["simulated_change"]) - np.asarray(rnd["simulated_change"])
        act_rel = np.asarray(rec["actual_change"]) - np.asarray(rnd["actual_change"])
        rel = {"simulated_minus_random_mean": float(np.nanmean(sim_rel)),
               "actual_minus_random_mean": float(np.nanmean(act_rel)),
               "pearson_minus_random": pearson(sim_rel, act_rel), "sign_agreement_minus_random": sign_agreement(sim_rel, act_rel)}
        want_up = (rec["group"] == "helpful") == lower  # loss: removing helpful raises it more than random does
        rel["expected_vs_random_ok"] = bool(rel["actual_minus_random_mean"] > 0) if want_up \
            else bool(rel["actual_minus_random_mean"] < 0)
        rec.update(rel)
        res.update(rel)
    seed_runs = [base] + [final(f"full-seed{s + 1}") for s in range(cfg.noise_seeds)]
    order_runs = [base] + [final(f"reorder-{s + 1}") for s in range(cfg.reorders)]

    def spread(finals: list[np.ndarray]) -> dict[str, Any]:
        a = np.stack(finals)  # [n, M]
        if a.shape[0] < 2:
            return {"n_runs": int(a.shape[0]), "per_example_std_mean": None, "test_mean_std": None}
        return {"n_runs": int(a.shape[0]), "per_example_std_mean": float(a.std(axis=0, ddof=1).mean()),
                "test_mean_std": float(a.mean(axis=1).std(ddof=1)),
                "max_abs_diff": float(np.abs(a - a[0]).max())}

    noise = {"seeds": spread(seed_runs), "order": spread(order_runs),
             "deterministic": bool(all(np.array_equal(seed_runs[0], s) for s in seed_runs[1:])) if cfg.noise_seeds else None,
             "replay_max_abs_diff": float(np.nanmax(np.abs(base - recorded_final))) if np.isfinite(recorded_final).any() else None,
             "note": "seeds: the full curriculum re-trained with other seeds (same order); order: the same training "
                     "occurrences in other random orders (run's seed). per_example_std_mean: mean over test examples "
                     "of the std across those runs of the final metric; test_mean_std: std of the test-set mean. A "
                     "group's actual_change_mean should exceed test_mean_std to count as an effect. "
                     "replay_max_abs_diff: the re-trained full curriculum vs the store's recorded final values."}
    report = {"format": FORMAT, "format_version": 1, "method": simulator.method, "metric": metric,
              "task": store.task.name, "run_id": run_id, "seed": seed, "k": cfg.k, "config": to_dict(cfg),
              "test_ids": tids.tolist(), "sign": infl.sign,
              "score": "influence summed over the test set; removed = top-k by that sum (helpful), bottom-k (harmful), "
                       "k random (seeded)",
              "change": f"final {metric} with the changed curriculum minus final {metric} with the full curriculum "
                        f"(simulated: both simulated; actual: both re-trained with the run's seed)",
              "removal": ("every occurrence of a removed example becomes padding: those batches shrink, the number of "
                          "steps is kept (nothing is filled in from the pool), so any removal also means fewer "
                          "examples trained on; compare a group with the random group (*_minus_random)")
              if cfg.fill == "pad" else
              ("every occurrence of a removed example is replaced by one training-pool example the curriculum "
               "did not hold (drawn at random): batch sizes and steps kept"),
              "simulated_final_full": infl.final_full.tolist(), "actual_final_full": base.tolist(),
              "groups": report_groups, "noise": noise, "results": results}
    save_json(report, out / "verify.json")
    return report
