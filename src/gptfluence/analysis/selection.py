"""Data selection: the training subset (and its order) a simulator predicts best for a target test set.

Given a budget ``k`` (distinct training examples), a target test set and a fitted simulator:

1. **score** every pool example by leave-one-out influence on the targets, simulated along
   *reference curricula of the budget's shape* (``k`` examples, the store's batch size, epochs and
   reshuffle rule): each of ``reference_passes`` passes is a seeded permutation of the pool cut
   into blocks of ``k`` (the last block topped up with random other pool examples), so every pool
   example is scored at least ``reference_passes`` times. An example's score is the mean, over the
   reference curricula that hold it, of its LOO score (`gptfluence.analysis.influence.loo_influence`)
   averaged over the targets: metric units, > 0 = helpful (for a detrended simulator: more helpful
   than an average example at that step);
2. **subset**: the ``k`` best-scored examples (NaN scores are never chosen), then a search by
   simulation of whole curricula (`search_subset`): the best predicted of the top-k and
   ``start_random`` random subsets, improved by ``swap_rounds`` rounds of simulated swaps (one
   member out, one non-member in; the best of ``swap_proposals`` is kept when it improves the
   prediction). Why: top-k of additive scores ignores interactions; on the built-in sentiment task
   the mean-over-targets top-k is one label only, which real fine-tuning punishes (and GPTfluence's
   rollout predicts: its whole-curriculum prediction sees what the additive scores do not);
3. **order**: ``orders`` seeded random curricula of that subset (each epoch a permutation, as
   `sample_curriculum` lays a run out) plus two heuristic ones (every epoch in ascending score
   order, "most helpful last", and descending, "most helpful first") are simulated from the
   targets' recorded step-0 values; the candidate whose simulated mean final target metric is best
   (lowest loss, highest accuracy / BLEU / ROUGE-L) is the choice.

With ``start_random = swap_rounds = 0`` the subset is the plain top-k of the scores.

The gradient baselines (``tracin_cp``, ``grad_dot``) are simulators too, so "their choice" is the
same procedure with them. `compare_selections` checks choices by really fine-tuning each chosen
curriculum (and random subsets of the same size) from the store's base model with the store's
settings (`gptfluence.dynamics.collect.collect` with a curriculum file, ``record_steps="ends"``,
resumable) and reports the actual mean final target metric per choice and seed.
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

FORMAT = "gptfluence.selection"
COMPARE_FORMAT = "gptfluence.selection-compare"


@dataclass
class SelectConfig:
    """Settings of one data selection (saved as select_config.json beside the output)."""

    budget: int = arg(64, "number of distinct training examples to select (1..pool size)")
    metric: str = arg("loss", "target metric (loss: lower is better; accuracy, bleu, rougeL: higher is better)")
    reference_passes: int = arg(4, "scoring: passes over the pool, each a seeded permutation cut into reference curricula of --budget examples (every example is scored at least this often)")
    orders: int = arg(16, "random orders of the chosen subset simulated (plus 2 heuristic orders); the best predicted is kept")
    start_random: int = arg(32, "subset search: random subsets simulated beside the top-k as starting points (0 = start from the top-k)")
    swap_rounds: int = arg(40, "subset search: rounds of swap proposals (one member out, one non-member in) simulated on whole curricula; the best proposal is kept if it improves the prediction (0 = no search: the top-k, or the best start)")
    swap_proposals: int = arg(64, "subset search: swap proposals per round")
    eval_orders: int = arg(8, "subset search: random orders (the same for every candidate) over which a candidate subset's simulated mean final target metric is averaged")
    seed: int = arg(0, "seed of the reference curricula and the candidate orders (also the training seed written to the curriculum file)")
    chunk: int = arg(256, "curricula per simulate call")
    method: str = arg("gptfluence", "simulator method fitted on the store (all its runs but a seeded validation split) when no --simulator folder is given")
    fit_preset: str = arg("selection", "config of the simulator fitted here (not of a --simulator folder): 'selection' = for gptfluence teacher forcing only and raw gradient features (objective=teacher_forcing, similarity_preconditioner=none; SELECTION_FIT_OVERRIDES), 'default' = the method's defaults. The search visits extreme subsets (e.g. one label only); on the built-in sentiment task the default gptfluence (rollout phase, K-FAC features) predicts those far too well (0.8 vs an actual loss of 2.6) and its choices were worse than random subsets, the 'selection' config's were not; on data2text the two were close (README \"Choosing training data\")")
    verify: bool = arg(False, "check the choice by really fine-tuning: the choice, --random-subsets random subsets of the same size and the --baselines' choices, for --seeds seeds each (into OUT/verify, resumable)")
    baselines: list[str] = arg([], "verify: other simulator methods whose choices are fine-tuned too (e.g. grad_dot tracin_cp; fitted on the store)")
    random_subsets: int = arg(3, "verify: random subsets of --budget examples (random order) per seed")
    seeds: int = arg(3, "verify: selection seeds seed..seed+S-1 (reference curricula, candidate orders, random subsets, training seed)")
    workers: int = arg(0, "verify: collection worker processes (0 = one per core)")


@dataclass
class SelectionShape:
    """How a curriculum of a subset is laid out (the store's collection settings)."""

    batch_size: int
    epochs: int
    reshuffle_each_epoch: bool = True

    @classmethod
    def of_store(cls, store: Any) -> "SelectionShape":
        from gptfluence.dynamics.collect import store_collect_config

        c = store_collect_config(store)
        return cls(int(c.batch_size), int(c.epochs), bool(c.reshuffle_each_epoch))


def check_budget(budget: int, pool_size: int) -> int:
    """``budget`` as int; `InputError` naming ``--budget`` unless 1 <= budget <= pool_size."""
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or not 1 <= int(budget) <= pool_size:
        raise InputError(f"--budget must be in 1..{pool_size} (the training pool's size), got {budget}")
    return int(budget)


def subset_curriculum(subset: Sequence[int], shape: SelectionShape, seed: int) -> np.ndarray:
    """A curriculum [T, b] of exactly the ids ``subset``: each epoch a seeded permutation of it
    (the same order every epoch unless ``reshuffle_each_epoch``), cut into batches (short last
    batch padded with -1). Every id occurs ``epochs`` times."""
    from gptfluence.dynamics.curriculum import sample_curriculum

    return sample_curriculum(np.asarray(subset, dtype=np.int64), 0, shape.batch_size, shape.epochs, int(seed),
                             reshuffle_each_epoch=shape.reshuffle_each_epoch)


def ordered_curriculum(order: Sequence[int], shape: SelectionShape) -> np.ndarray:
    """A curriculum [T, b] visiting ``order`` in the same order every epoch (short last batch padded)."""
    from gptfluence.dynamics.curriculum import _epochs_to_rows

    o = np.asarray(order, dtype=np.int64)
    return _epochs_to_rows([o] * shape.epochs, shape.batch_size)


def reference_curricula(pool: Sequence[int], budget: int, shape: SelectionShape, passes: int,
                        seed: int) -> list[np.ndarray]:
    """Curricula of ``budget`` examples covering the pool ``passes`` times (see the module doc)."""
    pool = np.asarray(pool, dtype=np.int64)
    if passes < 1:
        raise InputError(f"--reference-passes must be >= 1 (got {passes})")
    rng = np.random.default_rng([int(seed), 0x5E1EC7])
    out = []
    for _ in range(passes):
        perm = rng.permutation(pool)
        for lo in range(0, pool.size, budget):
            block = perm[lo:lo + budget]
            if block.size < budget:
                others = np.setdiff1d(pool, block)
                block = np.concatenate([block, rng.choice(others, size=budget - block.size, replace=False)])
            out.append(subset_curriculum(block, shape, int(rng.integers(2**31))))
    return out


def simulate_finals(simulator: Any, curricula: Sequence[np.ndarray], test_ids: np.ndarray, start: np.ndarray,
                    chunk: int = 256) -> np.ndarray:
    """Simulated final values [C, M] of ``curricula`` (all of one shape [T, b]) from ``start`` [M] at step 0."""
    cur = np.stack([np.asarray(c, dtype=np.int64) for c in curricula])
    out = np.empty((cur.shape[0], test_ids.size), dtype=np.float64)
    for lo in range(0, cur.shape[0], max(int(chunk), 1)):
        sel = cur[lo:lo + chunk]
        st = np.broadcast_to(np.asarray(start, dtype=np.float64), (sel.shape[0], test_ids.size)).copy()
        res = np.asarray(simulator.simulate(sel, test_ids, st, first_step=0))
        if res.shape != (sel.shape[0], sel.shape[1] + 1, test_ids.size):
            raise InputError(f"simulator returned shape {res.shape}, expected "
                             f"({sel.shape[0]}, {sel.shape[1] + 1}, {test_ids.size})")
        out[lo:lo + sel.shape[0]] = res[:, -1]
    return out


def score_pool(simulator: Any, pool: Sequence[int], test_ids: np.ndarray, start: np.ndarray, budget: int,
               shape: SelectionShape, passes: int = 4, seed: int = 0, chunk: int = 256
               ) -> tuple[np.ndarray, np.ndarray]:
    """(score [N], times scored [N]) of every pool id: the mean over the reference curricula that
    hold it of its leave-one-out influence averaged over ``test_ids`` (> 0 = helpful, metric units)."""
    from gptfluence.analysis.influence import loo_influence

    pool = np.asarray(pool, dtype=np.int64)
    col = {int(i): n for n, i in enumerate(pool.tolist())}
    total = np.zeros(pool.size)
    count = np.zeros(pool.size, dtype=np.int64)
    for cur in reference_curricula(pool, budget, shape, passes, seed):
        infl = loo_influence(simulator, cur, test_ids, start, first_step=0, chunk=chunk)
        s = infl.scores.mean(axis=1)
        for i, v in zip(infl.train_ids.tolist(), s.tolist()):
            if math.isfinite(v):
                total[col[i]] += v
                count[col[i]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return score, count


def top_k(pool: Sequence[int], scores: np.ndarray, budget: int, helpful: bool = True) -> np.ndarray:
    """The ``budget`` pool ids with the largest (``helpful``) or smallest finite scores, best first
    (ties keep pool order); `InputError` naming ``--budget`` when fewer are scored."""
    pool = np.asarray(pool, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(s))
    if budget > ok.size:
        raise InputError(f"--budget {budget}: only {ok.size} pool examples have a finite score")
    key = -s[ok] if helpful else s[ok]
    return pool[ok[np.argsort(key, kind="stable")][:budget]]


def predict_subsets(simulator: Any, subsets: Sequence[np.ndarray], test_ids: np.ndarray, start: np.ndarray,
                    shape: SelectionShape, order_seeds: Sequence[int], chunk: int = 256) -> np.ndarray:
    """Simulated mean final target metric [C] of each subset, averaged over its orders drawn with
    ``order_seeds`` (each subset sorted first, so a seed gives every subset a reproducible order)."""
    curs = [subset_curriculum(np.sort(np.asarray(sub, dtype=np.int64)), shape, int(o)) for sub in subsets for o in order_seeds]
    fin = simulate_finals(simulator, curs, test_ids, start, chunk)
    return np.nanmean(fin, axis=1).reshape(len(subsets), len(order_seeds)).mean(axis=1)


def search_subset(simulator: Any, pool: np.ndarray, topk: np.ndarray, test_ids: np.ndarray, start: np.ndarray,
                  shape: SelectionShape, cfg: "SelectConfig", metric: str, log: Any = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Improve the top-k subset by simulation (local search, seeded by ``cfg.seed``).

    Starts: the top-k and ``cfg.start_random`` random subsets of the same size; the best predicted
    (mean final target metric, averaged over ``cfg.eval_orders`` orders) is the current subset.
    Then ``cfg.swap_rounds`` rounds: ``cfg.swap_proposals`` random swaps (one member out, one
    non-member in) are simulated and the best is kept if it beats the current prediction. Every
    candidate is predicted as the mean over the same ``cfg.eval_orders`` random orders (a sample
    average over orders: with few orders the search can fit the simulator's order effects; the
    final order is then chosen afresh among new candidates, see `candidate_orders`).
    Returns (subset, {"start", "start_predicted", "topk_predicted", "predicted", "swaps_accepted",
    "rounds"}); with no starts and no rounds the subset is the top-k unchanged."""
    from gptfluence.analysis.lds import metric_sign

    say = log or (lambda s: None)
    for name in ("start_random", "swap_rounds", "swap_proposals", "eval_orders"):
        if getattr(cfg, name) < (1 if name in ("swap_proposals", "eval_orders") else 0):
            raise InputError(f"--{name.replace('_', '-')} must be >= {1 if name in ('swap_proposals', 'eval_orders') else 0} "
                             f"(got {getattr(cfg, name)})")
    if cfg.start_random == 0 and cfg.swap_rounds == 0:
        return topk, {"start": "topk", "rounds": 0, "swaps_accepted": 0}
    sign = -metric_sign(metric)  # lower (sign * value) = better
    rng = np.random.default_rng([int(cfg.seed), 0x5EA7C4])

    orders = [int(x) for x in rng.integers(2**31, size=cfg.eval_orders)]  # the same for every candidate
    k = topk.size
    starts = [topk] + [rng.choice(pool, size=k, replace=False) for _ in range(cfg.start_random)]
    pred = predict_subsets(simulator, starts, test_ids, start, shape, orders, cfg.chunk)
    key = np.where(np.isfinite(pred), sign * pred, np.inf)
    b = int(np.argmin(key))
    cur, cur_key = np.asarray(starts[b]), float(key[b])
    info: dict[str, Any] = {"start": "topk" if b == 0 else f"random-{b - 1}", "topk_predicted": _num(pred[0]),
                            "start_predicted": _num(pred[b]), "rounds": int(cfg.swap_rounds), "swaps_accepted": 0}
    if k < pool.size:
        for _ in range(cfg.swap_rounds):
            outside = np.setdiff1d(pool, cur)
            props = []
            for _ in range(cfg.swap_proposals):
                new = cur.copy()
                new[rng.integers(k)] = outside[rng.integers(outside.size)]
                props.append(new)
            p = predict_subsets(simulator, props, test_ids, start, shape, orders, cfg.chunk)
            pk = np.where(np.isfinite(p), sign * p, np.inf)
            j = int(np.argmin(pk))
            if pk[j] < cur_key:
                cur, cur_key = props[j], float(pk[j])
                info["swaps_accepted"] += 1
    info["predicted"] = _num(sign * cur_key)
    say(f"subset search: start {info['start']} (predicted {info['start_predicted']:.4g}), "
        f"{info['swaps_accepted']} of {cfg.swap_rounds} rounds improved it to {info['predicted']:.4g}")
    return np.asarray(cur, dtype=np.int64), info


def candidate_orders(subset: Sequence[int], scores_of_subset: Sequence[float], shape: SelectionShape, n: int,
                     seed: int) -> list[tuple[str, np.ndarray]]:
    """[(name, curriculum)]: ``n`` seeded random orders of ``subset`` ("random-0" ...) and the
    heuristic orders "helpful-last" (ascending score every epoch) and "helpful-first"."""
    sub = np.asarray(subset, dtype=np.int64)
    s = np.asarray(scores_of_subset, dtype=np.float64)
    if n < 0:
        raise InputError(f"--orders must be >= 0 (got {n})")
    rng = np.random.default_rng([int(seed), 0x0D0E5])
    out = [(f"random-{j}", subset_curriculum(sub, shape, int(rng.integers(2**31)))) for j in range(n)]
    asc = sub[np.argsort(np.nan_to_num(s, nan=-np.inf), kind="stable")]
    out.append(("helpful-last", ordered_curriculum(asc, shape)))
    out.append(("helpful-first", ordered_curriculum(asc[::-1], shape)))
    return out


def best_index(predicted_means: Sequence[float], metric: str) -> int:
    """Index of the best predicted mean (lowest for lower-is-better metrics, else highest); NaN never wins."""
    from gptfluence.analysis.lds import metric_sign

    v = np.asarray(predicted_means, dtype=np.float64) * -metric_sign(metric)  # lower = better
    v = np.where(np.isfinite(v), v, np.inf)
    if not np.isfinite(v).any():
        raise InputError("every candidate order was simulated as NaN/inf; no choice possible")
    return int(np.argmin(v))


def start_values(store: Any, metric: str, test_ids: np.ndarray) -> np.ndarray:
    """The targets' recorded step-0 values of ``metric`` (the same for every run: the base model)."""
    for rid in store.run_ids:
        run = store.run(rid)
        steps = np.asarray(run.steps)
        if steps.size and int(steps[0]) == 0 and metric in run.metrics:
            col = {int(t): j for j, t in enumerate(np.asarray(run.test_ids).tolist())}
            missing = [int(t) for t in test_ids if int(t) not in col]
            if missing:
                raise InputError(f"--test-ids: test id {missing[0]} is not recorded in run {rid!r}")
            v = run.trajectory(metric)[0, [col[int(t)] for t in test_ids]].astype(np.float64)
            if np.all(np.isfinite(v)):
                return v
    raise InputError(f"{store.root or 'dynamics'}: no run records finite step-0 values of {metric!r} for the targets")


def resolve_test_ids(store: Any, test_ids: Sequence[int] | None) -> np.ndarray:
    """The target ids (default: every test id of the store); `InputError` naming ``--test-ids`` for
    an unknown or repeated id."""
    known = [int(t) for t in np.asarray(store.test_ids).tolist()]
    if test_ids is None:
        return np.asarray(known, dtype=np.int64)
    ids = [int(t) for t in test_ids]
    if not ids:
        raise InputError("--test-ids: no test ids given")
    ks = set(known)
    for t in ids:
        if t not in ks:
            raise InputError(f"--test-ids: unknown test id {t} (the store has {len(known)} test examples)")
    if len(set(ids)) != len(ids):
        dup = next(t for t in ids if ids.count(t) > 1)
        raise InputError(f"--test-ids: test id {dup} given twice")
    return np.asarray(ids, dtype=np.int64)


def select(simulator: Any, store: Any, test_ids: Sequence[int] | None = None, config: SelectConfig | None = None,
           shape: SelectionShape | None = None, log: Any = None) -> dict[str, Any]:
    """Choose the subset and order (see the module doc). Returns a JSON-ready dict:

    ``subset`` (the ``budget`` chosen ids, best-scored first), ``topk`` (the top-``budget`` by score
    before the search), ``search`` (see `search_subset`), ``curriculum`` [T][b] (the chosen
    order; -1 = padding), ``order_name``, ``predicted_final`` [M] (simulated final target values of
    the choice), ``predicted_mean``, ``candidates`` [{name, predicted_mean}], ``scores``
    {pool id: score} (> 0 = helpful), ``times_scored``, ``test_ids``, ``metric``, ``method``.
    """
    cfg = config or SelectConfig()
    say = log or (lambda s: None)
    metric = str(getattr(simulator, "metric", cfg.metric))
    if metric != cfg.metric:
        raise InputError(f"--metric {cfg.metric}: the simulator simulates {metric!r}")
    if metric not in store.metrics:
        raise InputError(f"--metric {metric}: the store records {', '.join(store.metrics)}")
    pool = np.asarray(store.train_ids, dtype=np.int64)
    budget = check_budget(cfg.budget, pool.size)
    if cfg.orders < 0:
        raise InputError(f"--orders must be >= 0 (got {cfg.orders})")
    tids = resolve_test_ids(store, test_ids)
    shape = shape or SelectionShape.of_store(store)
    start = start_values(store, metric, tids)
    if hasattr(simulator, "prepare"):
        simulator.prepare(store, pool, tids)
    say(f"scoring {pool.size} pool examples along reference curricula of {budget} examples")
    scores, times = score_pool(simulator, pool, tids, start, budget, shape, cfg.reference_passes, cfg.seed, cfg.chunk)
    topk = top_k(pool, scores, budget)
    subset, search = search_subset(simulator, pool, topk, tids, start, shape, cfg, metric, log=say)
    col = {int(i): n for n, i in enumerate(pool.tolist())}
    sub_scores = scores[[col[int(i)] for i in subset]]
    by = np.argsort(-np.nan_to_num(sub_scores, nan=-np.inf), kind="stable")  # best-scored first
    subset, sub_scores = subset[by], sub_scores[by]
    cands = candidate_orders(subset, sub_scores, shape, cfg.orders, cfg.seed)
    say(f"simulating {len(cands)} candidate orders of the chosen subset")
    finals = simulate_finals(simulator, [c for _, c in cands], tids, start, cfg.chunk)
    means = np.nanmean(finals, axis=1) if finals.size else np.zeros(0)
    best = best_index(means, metric)
    from gptfluence.analysis.lds import metric_sign

    return {"format": FORMAT, "format_version": 1, "method": str(getattr(simulator, "method", type(simulator).__name__)),
            "metric": metric, "budget": budget, "pool_size": int(pool.size), "seed": int(cfg.seed),
            "shape": dataclasses.asdict(shape), "test_ids": tids.tolist(),
            "subset": subset.tolist(), "topk": topk.tolist(), "search": search, "order_name": cands[best][0],
            "curriculum": cands[best][1].tolist(), "steps": int(cands[best][1].shape[0]),
            "predicted_final": [_num(v) for v in finals[best]], "predicted_mean": _num(means[best]),
            "better": "lower" if metric_sign(metric) < 0 else "higher",
            "candidates": [{"name": n, "predicted_mean": _num(m)} for (n, _), m in zip(cands, means)],
            "scores": {str(int(i)): _num(v) for i, v in zip(pool, scores)},
            "times_scored": {str(int(i)): int(c) for i, c in zip(pool, times)},
            "score": "mean over the reference curricula holding the example of its leave-one-out influence averaged "
                     "over the targets (> 0 = helpful, metric units); subset: the top budget by score, then the best "
                     "predicted of it and start_random random subsets, improved by simulated swaps (search)"}


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def random_subset_curriculum(pool: Sequence[int], budget: int, shape: SelectionShape, seed: int) -> np.ndarray:
    """A seeded random subset of ``budget`` pool ids in a random order (the random baseline)."""
    rng = np.random.default_rng([int(seed), 0xA11D])
    sub = rng.choice(np.asarray(pool, dtype=np.int64), size=budget, replace=False)
    return subset_curriculum(sub, shape, int(rng.integers(2**31)))


@dataclass
class Choice:
    """One curriculum to check by fine-tuning: ``choice`` (e.g. "gptfluence", "random-0"), the
    selection ``seed`` and the training ``train_seed``, and ``predicted`` (the choosing simulator's
    simulated mean final target metric; None for random choices)."""

    choice: str
    seed: int
    curriculum: np.ndarray
    predicted: float | None = None
    train_seed: int | None = None
    predictions: dict = dataclasses.field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.choice}-s{self.seed}"


def compare_selections(store: Any, choices: Sequence[Choice], out: str | Path, test_ids: Sequence[int] | None = None,
                       workers: int = 0, progress: bool = False, log: Any = print) -> dict[str, Any]:
    """Fine-tune the store's base model on every choice's curriculum (the store's collection
    settings, ``record_steps="ends"``, into ``out/retrain``: resumable) and report per choice and
    seed the actual mean final target ``loss`` and, where recorded, ``accuracy`` (and the other
    generation metrics), plus a summary per choice (mean and sd over seeds; random choices
    ``random-*`` also pooled as ``random``). ``out`` must exist (checked by the caller)."""
    from gptfluence.analysis.verify import retrain_curricula

    out = Path(out)
    tids = resolve_test_ids(store, test_ids)
    if not choices:
        raise InputError("no choices to compare")
    ids = [c.run_id for c in choices]
    if len(set(ids)) != len(ids):
        raise InputError(f"two choices share the run id {next(i for i in ids if ids.count(i) > 1)!r}")
    lines = [(c.run_id, c.curriculum, c.choice, c.seed if c.train_seed is None else c.train_seed) for c in choices]
    log(f"fine-tuning {len(lines)} chosen curricula into {out / 'retrain'}")
    retrain = retrain_curricula(store, lines, out, workers=workers, progress=progress, log=log)
    records = []
    for c in choices:
        r = retrain.run(c.run_id)
        col = {int(t): j for j, t in enumerate(np.asarray(r.test_ids).tolist())}
        rows = [col[int(t)] for t in tids]
        rec: dict[str, Any] = {"choice": c.choice, "seed": c.seed, "budget": int(np.unique(c.curriculum[c.curriculum >= 0]).size),
                               "steps": int(c.curriculum.shape[0]), "predicted": None if c.predicted is None else _num(c.predicted)}
        rec.update({f"predicted_by_{k}": v for k, v in c.predictions.items()})
        for m in r.metrics:
            v = r.trajectory(m)[-1, rows].astype(np.float64)
            rec[f"actual_{m}"] = _num(np.nanmean(v)) if np.isfinite(v).any() else None
        records.append(rec)
    return {"format": COMPARE_FORMAT, "format_version": 1, "task": store.task.name, "test_ids": tids.tolist(),
            "records": records, "summary": summarize_records(records)}


def summarize_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per choice (and ``random``: every ``random-*`` record pooled): n, and mean / sd (ddof 1; None
    for one record) over records of every ``actual_*`` and ``predicted`` field."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["choice"], []).append(r)
    rnd = [r for r in records if str(r["choice"]).startswith("random-")]
    if rnd:
        groups["random"] = rnd
    fields = sorted({k for r in records for k in r if k.startswith("actual_")}) + ["predicted"] + \
        sorted({k for r in records for k in r if k.startswith("predicted_by_")})
    out = []
    for name, rs in groups.items():
        s: dict[str, Any] = {"choice": name, "n": len(rs)}
        for f in fields:
            v = np.asarray([r[f] for r in rs if r.get(f) is not None], dtype=np.float64)
            if v.size == 0:
                continue
            s[f"{f}_mean"] = float(v.mean())
            s[f"{f}_sd"] = float(v.std(ddof=1)) if v.size > 1 else None
        out.append(s)
    return out


# Config fields over a method's defaults for the simulator `gptfluence select` fits itself
# (SelectConfig.fit_preset "selection"); methods not listed use their defaults.
SELECTION_FIT_OVERRIDES: dict[str, dict[str, Any]] = {
    # as measured in README "Choosing training data" (the defaults then: 32-dimensional projections, no lexical
    # term, one model, per-pair A factors)
    "gptfluence": {"objective": "teacher_forcing", "similarity_preconditioner": "none", "proj_dim": 32, "lexical": False,
                   "ensemble": 1, "a_factors": "pair", "b_projection": "pair", "b_lags": 0},
}
FIT_PRESETS = ("selection", "default")


def selection_fit_overrides(method: str, preset: str) -> dict[str, Any]:
    """The config overrides of ``method`` under ``SelectConfig.fit_preset`` ``preset``."""
    if preset not in FIT_PRESETS:
        raise InputError(f"--fit-preset must be one of {', '.join(FIT_PRESETS)} (got {preset!r})")
    return dict(SELECTION_FIT_OVERRIDES.get(method, {})) if preset == "selection" else {}


def fit_on_store(method: str, store: Any, metric: str = "loss", seed: int = 0, progress: bool = False,
                 encoder: Any = None, **overrides: Any) -> Any:
    """A ``method`` simulator (config fields ``overrides`` over its defaults) fitted on every run of
    ``store`` but a seeded validation split (`fit_and_validation_runs`, as `gptfluence lds` fits)."""
    from gptfluence.analysis.splits import fit_and_validation_runs
    from gptfluence.simulators import make_simulator

    fit_runs, val_runs = fit_and_validation_runs(store.run_ids, seed)
    sim = make_simulator(method, metric, encoder=encoder, **overrides)
    sim.fit(store, fit_runs, val_runs, progress=progress)
    return sim


def selection_choices(simulators: dict[str, Any], store: Any, config: SelectConfig, test_ids: Sequence[int] | None = None,
                      seeds: Sequence[int] = (0,), random_subsets: int = 3, worst: str | None = None,
                      topk_of: Sequence[str] = (), log: Any = None) -> tuple[list[Choice], list[dict[str, Any]]]:
    """The curricula to compare by fine-tuning, and the selections behind them.

    Per seed s: each simulator's choice (`select` with ``seed = s``; choice name = the dict key),
    ``random_subsets`` random subsets ``random-r`` of the same size (seed (s, r), random order)
    and, with ``worst`` (a key of ``simulators``), that simulator's bottom-``budget`` subset in a
    random order (``<worst>-worst``, a diagnostic: if the scores carry signal it should be worse);
    for each name in ``topk_of``, its plain top-``budget`` subset before the search in a random
    order (``<name>-topk``: what the simulated search adds).
    Every choice gets ``predictions[name]`` = each simulator's simulated mean final target metric.
    """
    if random_subsets < 0:
        raise InputError(f"--random-subsets must be >= 0 (got {random_subsets})")
    if not seeds:
        raise InputError("--seeds must be >= 1")
    tids = resolve_test_ids(store, test_ids)
    shape = SelectionShape.of_store(store)
    pool = np.asarray(store.train_ids, dtype=np.int64)
    budget = check_budget(config.budget, pool.size)
    choices: list[Choice] = []
    selections: list[dict[str, Any]] = []
    for s in seeds:
        for name, sim in simulators.items():
            res = select(sim, store, tids, dataclasses.replace(config, seed=int(s)), shape, log=log)
            res["choice"] = name
            selections.append(res)
            choices.append(Choice(name, int(s), np.asarray(res["curriculum"], dtype=np.int64), res["predicted_mean"], int(s)))
            if name in topk_of:
                choices.append(Choice(f"{name}-topk", int(s), subset_curriculum(np.asarray(res["topk"]), shape, int(s)),
                                      None, int(s)))
            if worst == name:
                sc = np.asarray([res["scores"][str(int(i))] if res["scores"][str(int(i))] is not None else np.nan
                                 for i in pool], dtype=np.float64)
                bottom = top_k(pool, sc, budget, helpful=False)
                choices.append(Choice(f"{name}-worst", int(s), subset_curriculum(bottom, shape, int(s)), None, int(s)))
        for r in range(random_subsets):
            choices.append(Choice(f"random-{r}", int(s), random_subset_curriculum(pool, budget, shape, 1000 * int(s) + r),
                                  None, int(s)))
    for name, sim in simulators.items():
        start = start_values(store, str(sim.metric), tids)
        fin = simulate_finals(sim, [c.curriculum for c in choices], tids, start, config.chunk)
        for c, v in zip(choices, np.nanmean(fin, axis=1)):
            c.predictions[name] = _num(v)
    return choices, selections
