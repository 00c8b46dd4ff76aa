"""LDS (linear datamodeling score): does a method rank held-out curricula by their true outcome?

Definitions (see also the README section "Checking attribution"):

* Held-out curricula k = 1..K (never fit, never validation), same examples, collection settings
  and base model as the fit runs. ``true [K, M]``: the true final metric of test example m after
  training on curriculum k; ``pred [K, M]``: a method's prediction (a simulator: the final value
  of its rollout from the same recorded start; a scoring method: the linear-datamodel sum of
  `datamodel_predict`).
* ``LDS_m = Spearman(true[:, m], pred[:, m])`` across curricula (average ranks for ties). A test
  example whose true or predicted column is constant (or has < 2 finite pairs) has no Spearman:
  it is NaN, COUNTED (``n_nan``) and left out of the mean; nothing is dropped silently.
* ``LDS`` = mean of the finite LDS_m; the confidence interval is a seeded percentile bootstrap
  over TEST EXAMPLES (resampling the finite LDS_m), so it says how much the number depends on
  which test examples were drawn, not on which curricula.

Sign convention of predictions: larger prediction = larger metric value (for loss: larger =
worse). The references follow it: `similarity_sum` for loss is MINUS the summed encoder cosine
of the curriculum's examples (with repeats) to the test example (similar examples lower the
loss), PLUS for higher-is-better metrics; `tfidf_sum` likewise with the word TF-IDF cosine of
the two texts (`gptfluence.features.lexical`: the shared rare words that a sentence encoder
blurs; on the built-in generation tasks it ranks curricula far better than the encoder cosine);
`label_count` (classification tasks) likewise with the number of training occurrences whose
label equals the test example's label.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gptfluence.errors import GptfluenceError, InputError

LOWER_IS_BETTER = {"loss"}
VARIATIONS = ("both", "membership", "order")


# ---------------------------------------------------------------------------------------------
# pure functions


def per_example_spearman(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[M] Spearman across curricula (rows) of ``true [K, M]`` vs ``pred [K, M]`` per test example
    (column); average ranks for ties; NaN where a column is constant or has < 2 finite pairs."""
    from gptfluence.analysis.evaluate import spearman

    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 2:
        raise InputError(f"true and predicted final values must both be [curricula, tests]; got {t.shape} and {p.shape}")
    return np.array([spearman(t[:, m], p[:, m]) for m in range(t.shape[1])], dtype=np.float64)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite ``values`` (resampled with replacement,
    ``n_boot`` times, numpy generator seeded with ``seed``); (NaN, NaN) if none are finite."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def lds_summary(per_example: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """``{"lds_mean", "lds_ci_low", "lds_ci_high", "n_test_examples", "n_nan"}`` from the per-test
    Spearman values: mean and bootstrap CI over the finite ones; ``n_test_examples`` counts those,
    ``n_nan`` the test examples without a Spearman (constant column)."""
    v = np.asarray(per_example, dtype=np.float64).ravel()
    ok = np.isfinite(v)
    lo, hi = bootstrap_ci(v, n_boot, seed, level)
    return {"lds_mean": float(v[ok].mean()) if ok.any() else float("nan"), "lds_ci_low": lo, "lds_ci_high": hi,
            "n_test_examples": int(ok.sum()), "n_nan": int((~ok).sum())}


def paired_difference(per_a: np.ndarray, per_b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Method A minus method B on the test examples where both have a Spearman (paired):
    ``{"diff_mean", "diff_ci_low", "diff_ci_high", "n_paired"}``, CI by the same bootstrap over
    test examples. A CI above 0 means A ranks curricula better than B on these test examples."""
    a = np.asarray(per_a, dtype=np.float64).ravel()
    b = np.asarray(per_b, dtype=np.float64).ravel()
    d = a - b
    ok = np.isfinite(d)
    lo, hi = bootstrap_ci(d, n_boot, seed, level)
    return {"diff_mean": float(d[ok].mean()) if ok.any() else float("nan"), "diff_ci_low": lo, "diff_ci_high": hi,
            "n_paired": int(ok.sum())}


def occurrence_counts(curricula: np.ndarray, train_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """[K, N] how often each of ``train_ids`` occurs in each curriculum of ``curricula [K, T, b]``
    (or [K, L] flat id lists); -1 = padding and ids outside ``train_ids`` are ignored."""
    c = np.asarray(curricula, dtype=np.int64).reshape(len(curricula), -1)
    ids = np.asarray(train_ids, dtype=np.int64).ravel()
    out = np.zeros((c.shape[0], ids.size), dtype=np.float64)
    if ids.size == 0 or c.size == 0:
        return out
    if ids.min() < 0:
        raise InputError(f"training ids must be >= 0, got {int(ids.min())}")
    lut = np.full(max(int(ids.max()), int(c.max())) + 1, -1, dtype=np.int64)
    lut[ids] = np.arange(ids.size)
    cols = np.where(c >= 0, lut[np.maximum(c, 0)], -1)
    hit = cols >= 0
    rows = np.broadcast_to(np.arange(c.shape[0])[:, None], c.shape)
    np.add.at(out, (rows[hit], cols[hit]), 1.0)
    return out


def datamodel_predict(scores: np.ndarray, train_ids: Sequence[int] | np.ndarray, curricula: np.ndarray,
                      sign: float = 1.0) -> np.ndarray:
    """Linear-datamodel prediction [K, M]: for each curriculum, the sum over its training examples
    (with repeats) of their ``scores [N, M]`` (rows aligned with ``train_ids``), times ``sign``.
    Choose ``sign`` so that a larger prediction means a larger metric value (e.g. -1 for
    "helpful" influence scores on the loss, where helpful lowers the loss)."""
    s = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(train_ids, dtype=np.int64).ravel()
    if s.ndim != 2 or s.shape[0] != ids.size:
        raise InputError(f"scores must be [train examples, tests] with {ids.size} rows, got shape {s.shape}")
    return float(sign) * (occurrence_counts(curricula, ids) @ s)


def metric_sign(metric: str) -> float:
    """-1 for lower-is-better metrics (loss), +1 otherwise: the sign that turns a 'more of what
    helps' sum into a 'larger metric' prediction."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def cosine_matrix(train_features: np.ndarray, test_features: np.ndarray) -> np.ndarray:
    """[N, M] cosine similarity of each training row to each test row (zero rows give 0)."""
    a = np.asarray(train_features, dtype=np.float64)
    b = np.asarray(test_features, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def same_label_matrix(train_labels: Sequence[str], test_labels: Sequence[str]) -> np.ndarray:
    """[N, M] 1.0 where the training example's label equals the test example's, else 0.0."""
    tr = np.asarray([str(x).strip() for x in train_labels], dtype=object)
    te = np.asarray([str(x).strip() for x in test_labels], dtype=object)
    return (tr[:, None] == te[None, :]).astype(np.float64)


def similarity_sum_predict(train_features: np.ndarray, test_features: np.ndarray, train_ids: Sequence[int],
                           curricula: np.ndarray, metric: str) -> np.ndarray:
    """The `similarity_sum` reference [K, M]: ±(sum over the curriculum's examples, with repeats,
    of the encoder cosine to the test example); minus for loss, plus for higher-is-better."""
    return datamodel_predict(cosine_matrix(train_features, test_features), train_ids, curricula, metric_sign(metric))


def label_count_predict(train_labels: Sequence[str], test_labels: Sequence[str], train_ids: Sequence[int],
                        curricula: np.ndarray, metric: str) -> np.ndarray:
    """The `label_count` reference [K, M] (classification): ±(number of training occurrences
    whose label equals the test example's); minus for loss, plus for higher-is-better."""
    return datamodel_predict(same_label_matrix(train_labels, test_labels), train_ids, curricula, metric_sign(metric))


# ---------------------------------------------------------------------------------------------
# the measurement: a fit store and a store of held-out curricula

# collection settings that do not change what training does or the recorded final values
NOT_COMPARED = ("record_steps", "curriculum_file", "curriculum_sha256", "run_seed", "capture_every", "device",
                "gen_every")


def check_same_collection(fit: Any, heldout: Any) -> None:
    """`InputError` unless the two stores hold the same examples (sha256 in the manifests), the
    same collection settings (every config field except `NOT_COMPARED`, base model included) and
    no held-out curriculum equal to a fit-store curriculum."""
    fm, hm = fit.manifest, heldout.manifest
    fname = str(fit.root or "fit store")
    hname = str(heldout.root or "held-out store")
    if fm.get("examples_sha256") != hm.get("examples_sha256"):
        raise InputError(f"{hname}: holds other training/test examples than {fname} (examples_sha256 differ)")
    fc, hc = fm.get("config") or {}, hm.get("config") or {}
    if fc or hc:
        diff = sorted(k for k in set(fc) | set(hc) if k not in NOT_COMPARED and fc.get(k) != hc.get(k))
        if diff:
            k = diff[0]
            raise InputError(f"{hname}: collected with other settings than {fname}: {k} = {hc.get(k)!r} vs "
                             f"{fc.get(k)!r} (collect the held-out curricula with --config {fname}/collect_config.json)")
    seen = {fit.run(r).curriculum.tobytes(): r for r in fit.run_ids}
    for r in heldout.run_ids:
        hit = seen.get(heldout.run(r).curriculum.tobytes())
        if hit is not None:
            raise InputError(f"{hname}: held-out run {r!r} has the curriculum of fit run {hit!r}; held-out "
                             f"curricula must never be fit curricula")


def heldout_finals(heldout: Any, metric: str, run_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(curricula [K, T, b], start [K, M], true final [K, M], first_step) of the held-out runs:
    the start is the value at each run's first recorded step (the same for all runs), the final
    the value at step T (which every run must have recorded)."""
    from gptfluence.simulators.common import stack_curricula

    runs = [heldout.run(r) for r in run_ids]
    firsts = {int(r.steps[0]) for r in runs}
    if len(firsts) > 1:
        raise InputError(f"held-out runs start at different steps {sorted(firsts)}")
    start, final = [], []
    for r in runs:
        v = r.trajectory(metric)
        if int(r.steps[-1]) != r.num_steps:
            raise InputError(f"held-out run {r.run_id!r} did not record its final step {r.num_steps}")
        start.append(v[0])
        final.append(v[-1])
    return stack_curricula(heldout, list(run_ids)), np.asarray(start, np.float64), np.asarray(final, np.float64), firsts.pop()


def run_groups(heldout: Any) -> dict[str, list[str]]:
    """{variation: run ids} from each run's ``info["group"]`` ("both" when unlabelled)."""
    out: dict[str, list[str]] = {}
    for r in heldout.run_ids:
        g = str(heldout.run(r).info.get("group") or "both")
        out.setdefault(g, []).append(r)
    return out


def reference_names(task: Any) -> list[str]:
    """The attribution references measured beside the simulators: ``similarity_sum`` and ``tfidf_sum`` always,
    ``label_count`` for classification tasks."""
    from gptfluence.types import CLASSIFICATION

    return ["similarity_sum", "tfidf_sum"] + (["label_count"] if task.kind == CLASSIFICATION else [])


def measure_lds(fit: Any, heldout: Any, methods: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                seed: int = 0, configs: dict[str, dict[str, Any]] | None = None, encoder: Any = "minilm",
                n_boot: int = 1000, references: bool = True, progress: bool = False,
                log: Any = None) -> dict[str, Any]:
    """LDS of every method on the held-out curricula of ``heldout`` (see the module doc).

    Each method (default: every registered simulator, `gptfluence.simulators.METHODS`) is fitted
    on ``fit`` (validation runs from `fit_and_validation_runs(fit.run_ids, seed)`, every other run fitted on),
    prepared for the held-out examples and rolled out on every held-out curriculum from its
    recorded start; its final values are the prediction. ``references``: also the
    `similarity_sum` (encoder ``encoder``, a spec or object) and, for classification,
    `label_count` references. Results per (method, metric, variation); the variation is each
    held-out run's group label. Returns ``{"config", "results": [record...], "per_example"}``.
    """
    import time

    from gptfluence.analysis.splits import fit_and_validation_runs
    from gptfluence.config import to_dict
    from gptfluence.features import embed_examples, resolve_encoder
    from gptfluence.features.lexical import TfidfFeatures
    from gptfluence.simulators import (EncoderPool, default_method_names, heldout_configs, make_simulator,
                                       method_config, method_spec)

    check_same_collection(fit, heldout)
    say = log or (lambda s: None)
    methods = list(methods or default_method_names())
    for m in methods:
        method_spec(m)
    configs = heldout_configs(methods, configs)  # held-out curricula may hold ids no fit run used
    full_cfg = {m: to_dict(c) for m in methods if (c := method_config(m, configs.get(m) or None)) is not None}
    task = heldout.task
    task_name = task.name or (heldout.root.name if heldout.root else "task")
    want = list(metrics or [m for m in heldout.metrics if m in fit.metrics])
    for m in want:
        if m not in fit.metrics or m not in heldout.metrics:
            raise InputError(f"metric {m!r} is not recorded in both stores (fit: {fit.metrics}, held-out: {heldout.metrics})")
    groups = run_groups(heldout)
    if not heldout.run_ids:
        raise InputError(f"{heldout.root or 'held-out store'}: no runs")
    fit_runs, val_runs = fit_and_validation_runs(fit.run_ids, seed)  # the held-out store is the test
    encoders = EncoderPool()

    all_ids = list(heldout.run_ids)
    results: list[dict[str, Any]] = []
    per_example: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    ref_preds: dict[str, Any] = {}
    train_ids = np.asarray(heldout.train_ids)
    if references:
        ref_enc = resolve_encoder(encoder)
        H_train = embed_examples(ref_enc, task.train)
        H_test_all = embed_examples(ref_enc, task.test)
        # tfidf_sum: `similarity_sum_predict` on word TF-IDF vectors fitted on the task's texts
        tfidf = TfidfFeatures.for_task(task)
        T_train, T_test_all = tfidf.encode([e.text for e in task.train]), tfidf.encode([e.text for e in task.test])
    for metric in want:
        cur, start, true, f0 = heldout_finals(heldout, metric, all_ids)
        tids = np.asarray(heldout.run(all_ids[0]).test_ids)
        preds: dict[str, tuple[str, np.ndarray, float]] = {}
        objectives: dict[str, str | None] = {}  # the fitting objective each learned method ran
        for method in methods:
            say(f"{task_name} / {metric}: fitting {method} on {len(fit_runs)} runs")
            sim = make_simulator(method, metric, encoder=encoders.for_method(method, full_cfg.get(method)),
                                 config=full_cfg.get(method))
            t0 = time.perf_counter()
            try:
                sim.fit(fit, fit_runs, val_runs, progress=progress)
                fit_s = time.perf_counter() - t0
                sim.prepare(heldout, np.unique(cur[cur >= 0]), tids)
                out = np.asarray(sim.simulate(cur, tids, start, first_step=f0))
            except GptfluenceError as e:  # e.g. a metric a method cannot fit: reported, the others go on
                skipped.append({"method": method, "task": task_name, "metric": metric, "reason": str(e)})
                say(f"{task_name} / {metric}: {method} skipped: {e}")
                continue
            preds[method] = ("simulator", out[:, -1].astype(np.float64), fit_s)
            objectives[method] = (getattr(sim, "history", None) or {}).get("objective")
        if references:
            rows = np.asarray([heldout.test_row[int(t)] for t in tids])
            H_test = H_test_all[rows]
            preds["similarity_sum"] = ("reference", similarity_sum_predict(H_train, H_test, train_ids, cur, metric), 0.0)
            preds["tfidf_sum"] = ("reference", similarity_sum_predict(T_train, T_test_all[rows], train_ids, cur, metric),
                                  0.0)
            ref_preds["encoder"] = ref_enc.spec()
            if "label_count" in reference_names(task):
                tr_lab = [e.target for e in task.train]
                te_lab = [heldout.test_example(int(t)).target for t in tids]
                preds["label_count"] = ("reference", label_count_predict(tr_lab, te_lab, train_ids, cur, metric), 0.0)
        for variation, ids in groups.items():
            sel = np.asarray([all_ids.index(r) for r in ids])
            pers = {name: per_example_spearman(true[sel], pred[sel]) for name, (_, pred, _) in preds.items()}
            for name, (kind, pred, fit_s) in preds.items():
                per = pers[name]
                rec = {"method": name, "kind": kind, "task": task_name, "metric": metric, "variation": variation,
                       "n_curricula": int(sel.size)}
                rec.update(lds_summary(per, n_boot=n_boot, seed=seed))
                rec["n_true_constant"] = int(sum(np.unique(col[np.isfinite(col)]).size < 2 for col in true[sel].T))
                for ref in ("similarity_sum", "tfidf_sum"):
                    if ref in pers and name != ref:
                        rec[f"vs_{ref}"] = paired_difference(per, pers[ref], n_boot, seed)
                rec["fit_seconds"] = fit_s
                if objectives.get(name):
                    rec["objective"] = objectives[name]
                results.append(rec)
                per_example.append({"method": name, "task": task_name, "metric": metric, "variation": variation,
                                    "test_ids": tids.tolist(), "spearman": per.tolist()})
    return {"config": {"methods": methods, "references": reference_names(task) if references else [],
                       "metrics": want, "seed": seed, "n_boot": n_boot, "method_configs": full_cfg,
                       "reference_encoder": ref_preds.get("encoder"),
                       "fit_store": str(fit.root) if fit.root else None,
                       "heldout_store": str(heldout.root) if heldout.root else None,
                       "fit_runs": fit_runs, "val_runs": val_runs,
                       "variations": {g: len(v) for g, v in groups.items()}, "skipped": skipped,
                       "definition": "LDS = mean over test examples of the Spearman across held-out curricula of "
                                     "true vs predicted final metric; CI: percentile bootstrap over test examples; "
                                     "n_nan test examples (constant column) are counted and left out of the mean"},
            "results": results, "per_example": per_example}


def format_lds_markdown(result: dict[str, Any]) -> str:
    """One Markdown table: a row per (task, metric, method), a column per variation with
    ``mean [CI low, CI high]`` (the count of test examples without a Spearman after it, if any)."""
    import math

    variations = [v for v in VARIATIONS if any(r["variation"] == v for r in result["results"])]
    variations += sorted({r["variation"] for r in result["results"]} - set(variations))
    table: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    ncur: dict[tuple[str, str, str], int] = {}
    for r in result["results"]:
        key = (r["task"], r["metric"], r["method"])
        table.setdefault(key, {})[r["variation"]] = r
        ncur[(r["task"], r["metric"], r["variation"])] = r["n_curricula"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        m = r.get("lds_mean")
        if m is None or (isinstance(m, float) and not math.isfinite(m)):
            s = "n/a"
        else:
            s = f"{m:.3f} [{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}]"
        if r.get("n_nan"):
            s += f" ({r['n_nan']} NaN)"
        for key, label in (("vs_similarity_sum", "Δsim"), ("vs_tfidf_sum", "Δtfidf")):
            d = r.get(key) or {}
            dm = d.get("diff_mean")
            if dm is not None and isinstance(dm, float) and math.isfinite(dm):
                s += f"; {label} {dm:+.3f} [{d['diff_ci_low']:+.3f}, {d['diff_ci_high']:+.3f}]"
        return s

    head = "| task | metric | method | " + " | ".join(f"LDS {v}" for v in variations) + " |"
    lines = [head, "|" + " --- |" * (3 + len(variations))]
    for (task, metric, method), by in table.items():
        lines.append(f"| {task} | {metric} | {method} | " + " | ".join(cell(by.get(v)) for v in variations) + " |")
    sizes = sorted({(t, v, n) for (t, _, v), n in ncur.items()})
    lines.append("")
    lines.append("LDS: per test example, Spearman across held-out curricula of the true vs predicted final metric; "
                 "mean over test examples, [95% percentile bootstrap CI over test examples]. '(k NaN)': k test "
                 "examples whose true or predicted values were constant across curricula (no Spearman; counted, left "
                 "out of the mean). Variations: both = random subset and order; membership = random subsets, one "
                 "fixed order rule; order = one subset, random orders. References: similarity_sum (minus the "
                 "summed encoder cosine of the curriculum's examples to the test example, for loss), tfidf_sum "
                 "(the same with the word TF-IDF cosine of the texts), label_count "
                 "(same-label count, label tasks). Δsim / Δtfidf: the method's LDS minus similarity_sum's / "
                 "tfidf_sum's on the same test examples (paired), with its bootstrap CI; above 0 = ranks curricula "
                 "better than the one-line reference. Curricula per task and variation: "
                 + ", ".join(f"{t} {v} {n}" for t, v, n in sizes) + ".")
    return "\n".join(lines) + "\n"
