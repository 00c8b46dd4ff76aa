"""Mislabelled-data detection: rank training examples by a suspicion score, inspect from the top.

Pure functions (this part) are the measurement; `measure_mislabeled` below runs it on a store
collected with ``--flip-fraction``.

Conventions:

* ``scores [N]``: one suspicion score per training example, LARGER = inspect earlier (e.g.
  TracIn self-influence, the final training loss). Ties are broken by the given order (stable),
  so a method with constant scores inspects in id order; NaN scores are inspected last.
* ``flipped [N]`` bool: True where the example's label was flipped.
* Detection curve: after inspecting the top ``k`` examples (k = 0..N), the fraction of all flipped
  examples found; x = k / N (fraction inspected), y = found / n_flipped. It starts at (0, 0) and
  ends at (1, 1).
* AUC: the area under that curve over x in [0, 1] (trapezoid rule on the N + 1 points). Random
  inspection gives 0.5 in expectation; a perfect ranking gives ``1 - f / 2`` where ``f`` is the
  flipped fraction (all flipped found after inspecting ``f``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptfluence.errors import InputError


def _check(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.asarray(flipped).ravel()
    if s.size != f.size:
        raise InputError(f"scores ({s.size}) and flipped flags ({f.size}) must have one entry per training example")
    if s.size == 0:
        raise InputError("no training examples to rank")
    f = f.astype(bool)
    if not f.any():
        raise InputError("no flipped training example: collect with --flip-fraction > 0 (a classification task)")
    return s, f


def inspection_order(scores: np.ndarray) -> np.ndarray:
    """Indices [N] in inspection order: descending score, ties in the given order, NaN last."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    key = np.where(np.isfinite(s), -s, np.inf)
    return np.argsort(key, kind="stable")


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction_inspected [N+1], fraction_found [N+1])``: after inspecting the top k = 0..N
    examples by ``scores`` (see the module doc), k / N and the fraction of flipped ones found."""
    s, f = _check(scores, flipped)
    found = np.concatenate([[0], np.cumsum(f[inspection_order(s)])])
    n = s.size
    return np.arange(n + 1, dtype=np.float64) / n, found.astype(np.float64) / f.sum()


def detection_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """Area under `detection_curve` (trapezoid rule), in [0, 1]; 0.5 = random in expectation."""
    x, y = detection_curve(scores, flipped)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def perfect_auc(flipped: np.ndarray) -> float:
    """The AUC of a ranking that puts every flipped example first: ``1 - f / 2`` on the N + 1 points."""
    f = np.asarray(flipped).astype(bool).ravel()
    return detection_auc(f.astype(np.float64), f)


def found_at(scores: np.ndarray, flipped: np.ndarray, fractions: Any) -> list[float]:
    """Fraction of flipped examples found after inspecting each of ``fractions`` (of N, rounded
    down to whole examples)."""
    x, y = detection_curve(scores, flipped)
    n = x.size - 1
    return [float(y[int(np.floor(float(q) * n + 1e-9))]) for q in fractions]


# ---------------------------------------------------------------------------------------------
# the measurement on a store collected with --flip-fraction

import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

from gptfluence.config import arg  # noqa: E402

#: ranking methods and what their score is (larger = inspect earlier)
RANKINGS = {
    "gptfluence": "GPTfluence self-influence: the training example is also simulated as a test point (its "
                  "encoder features, start = the base model's loss on it); score = simulated final loss on it "
                  "without it minus with it, along the reference curriculum (leave-one-out; > 0 = training on "
                  "it lowered its own loss)",
    "gptfluence_test_harm": "GPTfluence harm to the test set: minus the sum over test examples of its "
                            "leave-one-out influence on the final test loss along the reference curriculum",
    "simfluence_test_harm": "Simfluence harm to the test set (Simfluence has free parameters only for the "
                            "recorded (training, test) pairs, so it has no self-influence): minus the summed "
                            "leave-one-out influence on the final test loss along the reference curriculum",
    "tracin_cp": "TracIn-CP self-influence sum_t eta_t <g_i, g_i> at checkpoints of the reference curriculum's "
                 "fine-tuning (re-trained)",
    "training_loss": "the loss of the training example (its own, possibly flipped, target) after fine-tuning "
                     "on the reference curriculum",
    "random": "a random order (seeded; mean over draws)",
}


@dataclass
class MislabeledConfig:
    """Settings of one mislabelled-data measurement (saved with the results)."""

    methods: tuple[str, ...] = arg(tuple(RANKINGS), "rankings to measure (" + ", ".join(RANKINGS) + ")")
    curriculum_seed: int = arg(0, "seed of the reference curriculum: every pool example once per epoch, the store's batch size and epochs")
    checkpoint_every: int = arg(5, "TracIn-CP: a checkpoint every k steps of the reference curriculum")
    random_draws: int = arg(20, "random rankings averaged for the 'random' method")
    fix_fractions: tuple[float, ...] = arg((0.2, 0.4), "fix-and-retrain: fractions of the pool inspected (their flipped labels fixed)")
    retrain_seeds: int = arg(3, "fix-and-retrain: fine-tunings per (method, fraction), seeds 0..k-1 (curriculum and training)")
    split_seed: int = arg(0, "seed of the fit / validation split of the store's runs for the simulators")
    curve_points: int = arg(101, "points of the stored detection curves (the AUC uses every example)")

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.fix_fractions = tuple(float(q) for q in self.fix_fractions)

    def validate(self) -> None:
        """`InputError` naming the flag of the first bad field."""
        for m in self.methods:
            if m not in RANKINGS:
                raise InputError(f"--methods: unknown ranking {m!r} (known: {', '.join(RANKINGS)})")
        if not self.methods:
            raise InputError("--methods: give at least one ranking")
        for q in self.fix_fractions:
            if not 0.0 < q <= 1.0:
                raise InputError(f"--fix-fractions must lie in (0, 1], got {q}")
        for name in ("checkpoint_every", "random_draws", "retrain_seeds", "curve_points"):
            if int(getattr(self, name)) < (2 if name == "curve_points" else 1):
                raise InputError(f"--{name.replace('_', '-')} must be >= {2 if name == 'curve_points' else 1}, "
                                 f"got {getattr(self, name)}")


def reference_curriculum(dynamics: Any, seed: int) -> np.ndarray:
    """``[T, b]``: every training example of the pool once per epoch, the store's batch size and
    epochs (a new order each epoch when the store reshuffles), drawn with ``seed``."""
    from gptfluence.dynamics.collect import store_collect_config
    from gptfluence.dynamics.curriculum import sample_curriculum

    cfg = store_collect_config(dynamics)
    return sample_curriculum(dynamics.train_ids, 0, cfg.batch_size, cfg.epochs, seed,
                             reshuffle_each_epoch=cfg.reshuffle_each_epoch)


def flipped_mask(dynamics: Any) -> np.ndarray:
    """[N] bool in ``dynamics.train_ids`` order: the training labels ``--flip-fraction`` flipped."""
    meta = dynamics.task.metadata or {}
    ids = meta.get("flipped_ids")
    if not ids:
        name = dynamics.root or dynamics.task.name
        raise InputError(f"{name}: no flipped training labels (collect a classification task with --flip-fraction > 0)")
    return np.isin(dynamics.train_ids, np.asarray(ids, dtype=np.int64))


def fixed_task(task: Any, ids: Sequence[int]) -> Any:
    """A copy of ``task`` whose training examples ``ids`` that were flipped get their original
    target back (``meta["original_target"]``); other examples, ids and the test set unchanged."""
    fix = {int(i) for i in ids}
    train = []
    for e in task.train:
        if e.id in fix and e.meta.get("flipped"):
            meta = {k: v for k, v in e.meta.items() if k not in ("flipped", "original_target")}
            meta["fixed"] = True
            train.append(dataclasses.replace(e, target=e.meta["original_target"], meta=meta))
        else:
            train.append(e)
    return dataclasses.replace(task, train=train, metadata=dict(task.metadata or {}))


def _thin_curve(x: np.ndarray, y: np.ndarray, points: int) -> dict[str, list[float]]:
    """The curve at about ``points`` evenly spaced inspection counts (first and last kept)."""
    keep = np.unique(np.round(np.linspace(0, x.size - 1, max(2, points))).astype(int))
    return {"fraction_inspected": x[keep].round(6).tolist(), "fraction_found": y[keep].round(6).tolist()}


def _curve_summary(scores: np.ndarray, flipped: np.ndarray, points: int) -> dict[str, Any]:
    return {"auc": detection_auc(scores, flipped), "curve": _thin_curve(*detection_curve(scores, flipped), points)}


def _pseudo_tests(dynamics: Any) -> tuple[list[Any], np.ndarray]:
    """The training examples as test points, with ids shifted past every test id (no clash)."""
    offset = int(max(dynamics.test_ids.max(initial=0), dynamics.train_ids.max(initial=0))) + 1_000_000
    ex = [dataclasses.replace(e, id=e.id + offset) for e in dynamics.task.train]
    return ex, np.asarray([e.id for e in ex], dtype=np.int64)


def rank_scores(dynamics: Any, config: MislabeledConfig | None = None, log: Any = None,
                progress: bool = False) -> dict[str, Any]:
    """Suspicion scores ``{method: {"scores" [N] (train_ids order), "seconds", "description"}}``
    for every ranking of ``config.methods`` but ``random`` (see `RANKINGS`), plus the reference
    curriculum and the per-example losses before/after fine-tuning on it."""
    import time

    from gptfluence.analysis.influence import loo_influence
    from gptfluence.analysis.splits import fit_and_validation_runs
    from gptfluence.dynamics.collect import store_collect_config, train_curriculum
    from gptfluence.lm import prepare_eval, target_losses
    from gptfluence.simulators import make_simulator

    cfg = config or MislabeledConfig()
    say = log or (lambda s: None)
    unknown = [m for m in cfg.methods if m not in RANKINGS]
    if unknown:
        raise InputError(f"unknown ranking {unknown[0]!r} (known: {', '.join(RANKINGS)})")
    ids = dynamics.train_ids
    cur = reference_curriculum(dynamics, cfg.curriculum_seed)
    T = int(cur.shape[0])
    pseudo, pseudo_ids = _pseudo_tests(dynamics)
    max_len = store_collect_config(dynamics).max_length
    t0 = time.perf_counter()
    losses = {}
    for step, model, tok in train_curriculum(dynamics, cur, cfg.curriculum_seed, [0, T], label="reference curriculum"):
        losses[step] = np.asarray(target_losses(model, prepare_eval(tok, pseudo, max_len)), dtype=np.float64)
    train_s = time.perf_counter() - t0
    out: dict[str, Any] = {}
    if "training_loss" in cfg.methods:
        out["training_loss"] = {"scores": losses[T], "seconds": train_s}
    sims: dict[str, Any] = {}
    fit_runs, val_runs = fit_and_validation_runs(dynamics.run_ids, cfg.split_seed)
    test_ids = np.asarray(dynamics.run(dynamics.run_ids[0]).test_ids)
    step0 = dynamics.run(dynamics.run_ids[0])
    if int(step0.steps[0]) != 0:
        raise InputError(f"{dynamics.root}: run {step0.run_id!r} did not record step 0 (the start values)")
    test_start = step0.trajectory("loss")[0].astype(np.float64)
    for m in cfg.methods:
        if not m.startswith(("gptfluence", "simfluence")):
            continue
        kind = m.split("_")[0]
        t0 = time.perf_counter()
        if kind not in sims:
            say(f"fitting {kind} (loss) on {len(fit_runs)} runs")
            sim = make_simulator(kind, "loss", config={"unseen": "zero"} if kind == "simfluence" else None)
            sim.fit(dynamics, fit_runs, val_runs, progress=progress)
            sim.prepare(dynamics, ids, test_ids)
            sims[kind] = (sim, time.perf_counter() - t0)
            t0 = time.perf_counter()
        sim, fit_s = sims[kind]
        if m == "gptfluence":
            sim.set_examples(test=pseudo)  # the training examples as test points (encoder + gradient features)
            inf = loo_influence(sim, cur, pseudo_ids, losses[0], train_ids=ids)
            score = np.diag(inf.scores).copy()
        else:
            inf = loo_influence(sim, cur, test_ids, test_start, train_ids=ids)
            score = -inf.scores.sum(axis=1)
        out[m] = {"scores": score, "seconds": fit_s + time.perf_counter() - t0}
    if "tracin_cp" in cfg.methods:
        from gptfluence.simulators.tracin import self_influence

        say(f"TracIn-CP self-influence (checkpoint every {cfg.checkpoint_every} of {T} steps)")
        t0 = time.perf_counter()
        _, v = self_influence(dynamics, checkpoint_every=cfg.checkpoint_every, train_ids=ids, curriculum=cur,
                              seed=cfg.curriculum_seed)
        out["tracin_cp"] = {"scores": v, "seconds": train_s + time.perf_counter() - t0}
    for m, d in out.items():
        d["description"] = RANKINGS[m]
    return {"scores": out, "curriculum": cur, "loss_before": losses[0], "loss_after": losses[T]}


def measure_mislabeled(dynamics: Any, config: MislabeledConfig | None = None, log: Any = None,
                       progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Detection (curve, AUC) of the flipped labels of ``dynamics`` by every ranking, then fix and
    re-train: for each ranking and fraction q of ``fix_fractions``, the flipped labels among its top
    ``floor(q N)`` are fixed and the base model really fine-tuned (every pool example once per
    epoch, seeds 0..retrain_seeds-1: curriculum and training) on the fixed data; test accuracy and
    loss (mean over the test set) per seed, beside no fix and all flips fixed (oracle).

    Returns a JSON-able dict: ``{"task", "n_train", "n_flipped", "auc_perfect", "auc_random_expected",
    "methods": {name: {"auc", "curve", "found_at", "seconds", "description"}}, "fix_and_retrain":
    {"results": [...], "summary": [...]}, "config"}``.
    """
    from gptfluence.config import to_dict
    from gptfluence.dynamics.collect import store_collect_config, train_and_evaluate
    from gptfluence.dynamics.curriculum import sample_curriculum

    cfg = config or MislabeledConfig()
    cfg.validate()
    say = log or (lambda s: None)
    flipped = flipped_mask(dynamics)
    ids = dynamics.train_ids
    N = ids.size
    ranked = rank_scores(dynamics, dataclasses.replace(cfg, methods=tuple(m for m in cfg.methods if m != "random")),
                         log=log, progress=progress) if any(m != "random" for m in cfg.methods) else {"scores": {}}
    methods: dict[str, Any] = {}
    orders: dict[str, list[np.ndarray]] = {}
    fracs = [float(q) for q in cfg.fix_fractions]
    for m in cfg.methods:
        if m == "random":
            rng = np.random.default_rng([cfg.curriculum_seed, 0xF11B])
            draws = [rng.permutation(N).astype(np.float64) for _ in range(max(1, cfg.random_draws))]
            aucs = [detection_auc(d, flipped) for d in draws]
            ys = np.mean([detection_curve(d, flipped)[1] for d in draws], axis=0)
            methods[m] = {"auc": float(np.mean(aucs)), "auc_sd": float(np.std(aucs)), "n_draws": len(draws),
                          "curve": _thin_curve(np.arange(N + 1) / N, ys, cfg.curve_points),
                          "found_at": {str(q): float(np.mean([found_at(d, flipped, [q])[0] for d in draws]))
                                       for q in fracs},
                          "seconds": 0.0, "description": RANKINGS[m]}
            orders[m] = [inspection_order(d) for d in draws]
            continue
        d = ranked["scores"][m]
        s = np.asarray(d["scores"], dtype=np.float64)
        rec = _curve_summary(s, flipped, cfg.curve_points)
        rec.update(found_at={str(q): v for q, v in zip(fracs, found_at(s, flipped, fracs))},
                   seconds=float(d["seconds"]), description=d["description"],
                   n_nonfinite=int((~np.isfinite(s)).sum()))
        methods[m] = rec
        orders[m] = [inspection_order(s)]
    # fix and re-train
    ccfg = store_collect_config(dynamics)
    results = []
    plans: list[tuple[str, float, np.ndarray]] = [("no_fix", 0.0, np.zeros(0, np.int64)),
                                                  ("oracle", float(flipped.mean()), ids[flipped])]
    for m in cfg.methods:
        for q in fracs:
            k = int(np.floor(q * N + 1e-9))
            plans.append((m, q, ids[orders[m][0][:k]]))  # random: its first draw
    for s in range(max(1, cfg.retrain_seeds)):
        cur = sample_curriculum(ids, 0, ccfg.batch_size, ccfg.epochs, s, reshuffle_each_epoch=ccfg.reshuffle_each_epoch)
        for name, q, inspected in plans:
            fix = np.intersect1d(inspected, ids[flipped])
            say(f"re-training: {name} fraction {q:.2f} seed {s} ({fix.size} labels fixed)")
            vals = train_and_evaluate(dynamics, cur, s, task=fixed_task(dynamics.task, fix), device=device,
                                      label=f"{name} q={q} seed {s}")
            results.append({"method": name, "fraction": q, "seed": s, "n_inspected": int(inspected.size),
                            "n_fixed": int(fix.size), "test_loss": float(np.mean(vals["loss"])),
                            "test_accuracy": float(np.mean(vals["accuracy"])) if "accuracy" in vals else None})
    summary = []
    for name, q, _ in plans:
        rs = [r for r in results if r["method"] == name and r["fraction"] == q]
        acc = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        summary.append({"method": name, "fraction": q, "n_fixed_mean": float(np.mean([r["n_fixed"] for r in rs])),
                        "test_loss_mean": float(np.mean([r["test_loss"] for r in rs])),
                        "test_loss_sd": float(np.std([r["test_loss"] for r in rs])),
                        "test_accuracy_mean": float(np.mean(acc)) if acc else None,
                        "test_accuracy_sd": float(np.std(acc)) if acc else None, "n_seeds": len(rs)})
    return attach_fix_results({"task": dynamics.task.name, "store": str(dynamics.root) if dynamics.root else None,
            "n_train": int(N), "n_flipped": int(flipped.sum()), "flip_fraction": float(flipped.mean()),
            "auc_perfect": perfect_auc(flipped), "auc_random_expected": 0.5,
            "reference_curriculum": {"steps": int(ranked["curriculum"].shape[0]) if "curriculum" in ranked else None,
                                     "seed": cfg.curriculum_seed,
                                     "definition": "every pool example once per epoch; the store's batch size, "
                                                   "epochs and reshuffling"},
            "methods": methods,
            "fix_and_retrain": {"definition": "fix the flipped labels among each ranking's top fraction, fine-tune the "
                                              "base model on the whole pool (every example once per epoch, the "
                                              "store's settings), curriculum and training seed s; test metrics are "
                                              "means over the test set at the last step. no_fix: the flipped data as "
                                              "is; oracle: every flipped label fixed; random: its first draw",
                                "results": results, "summary": summary},
            "config": to_dict(cfg)})


def attach_fix_results(result: dict[str, Any]) -> dict[str, Any]:
    """Copy each ranking's fix-and-retrain summary rows (per fraction: ``n_fixed_mean``, test
    accuracy and loss mean / sd over seeds) into its ``methods[name]["fix_and_retrain"]``, beside
    its AUC and curve; the no-fix and all-fixed rows become ``fix_and_retrain["baselines"]``.
    Returns ``result`` (changed in place)."""
    fr = result.get("fix_and_retrain") or {}
    rows = fr.get("summary") or []
    for name, rec in (result.get("methods") or {}).items():
        rec["fix_and_retrain"] = [{k: v for k, v in r.items() if k != "method"} for r in rows if r["method"] == name]
    fr["baselines"] = {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in rows
                       if r["method"] in ("no_fix", "oracle")}
    return result
