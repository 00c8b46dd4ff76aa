"""gptfluence.analysis.lds and the held-out curriculum designs: hand-computed cases, agreement with
dattri.metric.lds, and the measurement on synthetic stores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptfluence.analysis.lds import (bootstrap_ci, check_same_collection, cosine_matrix, datamodel_predict,
                                     format_lds_markdown, label_count_predict, lds_summary, measure_lds,
                                     occurrence_counts, per_example_spearman, same_label_matrix,
                                     similarity_sum_predict)
from gptfluence.features.lexical import TfidfFeatures
from gptfluence.dynamics.curriculum import design_curricula, read_curriculum_file, sample_curriculum, \
    write_curriculum_lines
from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.errors import InputError


def test_per_example_spearman_hand_computed():
    true = np.array([[1, 1, 1], [2, 1, 1], [3, 2, 1], [4, 3, 1]], dtype=float)
    pred = np.array([[1, 1, 5], [3, 2, 6], [2, 3, 7], [4, 4, 8]], dtype=float)
    per = per_example_spearman(true, pred)
    # column 0: rank differences (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15) = 0.8
    assert per[0] == pytest.approx(0.8)
    # column 1: ties in true -> average ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert per[1] == pytest.approx(4.5 / math.sqrt(22.5))
    # column 2: true constant -> NaN (counted, not dropped)
    assert math.isnan(per[2])
    s = lds_summary(per, n_boot=200, seed=0)
    assert s["lds_mean"] == pytest.approx((0.8 + 4.5 / math.sqrt(22.5)) / 2)
    assert s["n_test_examples"] == 2 and s["n_nan"] == 1
    assert s["lds_ci_low"] <= s["lds_mean"] <= s["lds_ci_high"]


def test_paired_difference_uses_common_test_examples():
    from gptfluence.analysis.lds import paired_difference

    d = paired_difference(np.array([0.5, 0.2, np.nan, 0.9]), np.array([0.1, 0.4, 0.3, np.nan]), n_boot=500)
    assert d["n_paired"] == 2 and d["diff_mean"] == pytest.approx((0.4 - 0.2) / 2)
    assert d["diff_ci_low"] == pytest.approx(-0.2) and d["diff_ci_high"] == pytest.approx(0.4)


def test_bootstrap_ci_percentiles():
    assert bootstrap_ci(np.full(7, 0.3)) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([np.nan, np.nan])))
    v = np.array([0.0, 1.0])
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=3)
    # means of two draws from {0, 1} are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    assert lo == 0.0 and hi == 1.0
    assert bootstrap_ci(np.arange(10.0), seed=1) == bootstrap_ci(np.arange(10.0), seed=1)
    lo, hi = bootstrap_ci(np.arange(10.0), n_boot=2000, seed=1, level=0.5)
    assert 3.0 < lo < 4.5 < hi < 6.0


def test_datamodel_predict_counts_repeats_and_ignores_padding():
    cur = np.array([[[0, 2], [2, -1]], [[1, 1], [1, 3]]])  # [K=2, T=2, b=2]
    ids = np.array([3, 0, 1, 2])  # rows of the score matrix, not sorted
    counts = occurrence_counts(cur, ids)
    assert counts.tolist() == [[0, 1, 0, 2], [1, 0, 3, 0]]
    scores = np.array([[10.0, 1.0], [1.0, 0.0], [0.5, 2.0], [0.25, -1.0]])  # [N=4, M=2]
    pred = datamodel_predict(scores, ids, cur)
    assert pred.tolist() == [[1.0 + 0.5, 0.0 - 2.0], [10.0 + 1.5, 1.0 + 6.0]]
    assert datamodel_predict(scores, ids, cur, sign=-1.0).tolist() == (-pred).tolist()
    with pytest.raises(InputError, match="4 rows"):
        datamodel_predict(scores[:3], ids, cur)


def test_references_sign_follow_the_metric():
    H_train = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    H_test = np.array([[3.0, 0.0]])
    cos = cosine_matrix(H_train, H_test)
    assert cos[:, 0] == pytest.approx([1.0, 0.0, 1 / math.sqrt(2)])
    cur = np.array([[[0, 0], [2, -1]], [[1, 1], [1, 1]]])
    loss = similarity_sum_predict(H_train, H_test, [0, 1, 2], cur, "loss")
    assert loss[:, 0] == pytest.approx([-(2 + 1 / math.sqrt(2)), 0.0])  # similar examples lower the loss
    bleu = similarity_sum_predict(H_train, H_test, [0, 1, 2], cur, "bleu")
    assert bleu[:, 0] == pytest.approx([2 + 1 / math.sqrt(2), 0.0])
    assert same_label_matrix([" yes", "no", " no"], ["no"]).ravel().tolist() == [0.0, 1.0, 1.0]
    lab = label_count_predict([" yes", " no", " no"], [" no"], [0, 1, 2], cur, "loss")
    assert lab[:, 0].tolist() == [-1.0, -4.0]


def test_tfidf_features_hand_computed():
    """Word TF-IDF (sublinear tf, smooth idf, L2 rows) against values computed by hand."""
    tf = TfidfFeatures.fit(["the cat sat", "the dog sat down", "a bird"])  # 'a': one character, no token
    assert tf.vocabulary == ["bird", "cat", "dog", "down", "sat", "the"]
    idf1, idf2 = 1 + math.log(4 / 2), 1 + math.log(4 / 3)  # df 1 ('bird', ...) and df 2 ('sat', 'the')
    assert tf.idf == pytest.approx([idf1, idf1, idf1, idf1, idf2, idf2])
    X = tf.encode(["The CAT", "zz q", "cat cat dog"])
    a = np.array([idf1, idf2]) / math.hypot(idf1, idf2)
    assert X[0, [1, 5]] == pytest.approx(a) and X[0].sum() == pytest.approx(a.sum())
    assert not X[1].any()  # no known word: a zero row, cosine 0 with everything
    b = np.array([(1 + math.log(2)) * idf1, idf1])
    assert X[2, [1, 2]] == pytest.approx(b / np.linalg.norm(b), rel=1e-6)
    again = TfidfFeatures.from_state(json.loads(json.dumps(tf.state())))
    assert np.array_equal(again.encode(["cat cat dog"]), X[2:]) and again.spec() == tf.spec()
    small = TfidfFeatures.fit(["the cat", "the dog", "bird"])  # the tfidf_sum reference of measure_lds
    loss = similarity_sum_predict(small.encode(["cat", "dog", "bird"]), small.encode(["the cat"]), [5, 6, 7],
                                  np.array([[[5, 5]], [[6, 7]]]), "loss")
    assert loss[0, 0] < 0 and loss[1, 0] == 0.0  # two 'cat' occurrences vs none: a lower predicted loss


def test_agrees_with_dattri_lds():
    dattri_metric = pytest.importorskip("dattri.metric")
    import torch

    rng = np.random.default_rng(0)
    N, M, K, size = 30, 6, 20, 12
    scores = rng.normal(size=(N, M))
    indices = np.stack([rng.choice(N, size=size, replace=False) for _ in range(K)])
    gt = rng.normal(size=(K, M)) + 0.5 * datamodel_predict(scores, np.arange(N), indices)
    ours = per_example_spearman(gt, datamodel_predict(scores, np.arange(N), indices))
    theirs, _ = dattri_metric.lds(torch.tensor(scores), (torch.tensor(gt), torch.tensor(indices)))
    assert np.allclose(ours, theirs.numpy(), atol=1e-10)
    assert np.isfinite(ours).all() and ours.mean() > 0.2


# ---------------------------------------------------------------------------------------------
# designs


def test_designs_membership_order_both():
    pool = list(range(40))
    fit = [sample_curriculum(pool, 12, 4, 2, s) for s in range(3)]
    both = design_curricula(pool, 12, 4, 2, "both", 6, seed=1, exclude=fit)
    assert [r for r, _ in both] == [f"both-{k:04d}" for k in range(6)]
    assert all(c.shape == fit[0].shape for _, c in both)
    assert len({c.tobytes() for _, c in both}) == 6
    mem = design_curricula(pool, 12, 4, 2, "membership", 6, seed=1)
    subsets = [set(c[c >= 0].tolist()) for _, c in mem]
    assert len({frozenset(s) for s in subsets}) == 6 and all(len(s) == 12 for s in subsets)
    # one fixed order rule: two curricula order their shared examples alike in every epoch
    (_, a), (_, b) = mem[0], mem[1]
    shared = subsets[0] & subsets[1]
    for e in range(2):
        ea, eb = a[3 * e:3 * e + 3].ravel(), b[3 * e:3 * e + 3].ravel()
        assert [x for x in ea if x in shared] == [x for x in eb if x in shared]
    order = design_curricula(pool, 12, 4, 2, "order", 6, seed=1)
    assert len({frozenset(c[c >= 0].tolist()) for _, c in order}) == 1
    assert len({c.tobytes() for _, c in order}) == 6
    # never a fit curriculum: excluding a design's own first draw makes it draw another one
    again = design_curricula(pool, 12, 4, 2, "both", 1, seed=1, exclude=[both[0][1]])
    assert not np.array_equal(again[0][1], both[0][1])
    with pytest.raises(InputError, match="membership"):
        design_curricula(pool, 40, 4, 2, "membership", 2, seed=0)
    with pytest.raises(InputError, match="--design"):
        design_curricula(pool, 12, 4, 2, "subset", 2, seed=0)


def test_curriculum_lines_round_trip_with_group_and_seed(tmp_path):
    c = np.array([[3, 1], [2, -1]])
    path = write_curriculum_lines(tmp_path / "c.jsonl", [("a", c, "membership", 7), ("b", c, None, None)])
    cf = read_curriculum_file(path, train_ids=range(4))
    assert list(cf.curricula) == ["a", "b"] and np.array_equal(cf.curricula["a"], c)
    assert cf.groups == {"a": "membership"} and cf.seeds == {"a": 7}
    path.write_text('{"run_id": "x", "curriculum": [[1]], "seed": "s"}\n')
    with pytest.raises(InputError, match="line 1.*'seed'"):
        read_curriculum_file(path)


# ---------------------------------------------------------------------------------------------
# the measurement on synthetic stores


def _stores(n_fit=10, n_held=12, groups=("both", "membership")):
    from gptfluence.simulators.synthetic import synthetic_dynamics

    dyn, enc = synthetic_dynamics(n_runs=n_fit + n_held, n_steps=12, n_train=40, n_test=8, seed=0)
    runs = dyn.runs()
    for k, r in enumerate(runs[n_fit:]):
        r.info["group"] = groups[k % len(groups)]
    fit, held = Dynamics(dyn.task, runs[:n_fit]), Dynamics(dyn.task, runs[n_fit:])
    for d in (fit, held):
        d.manifest["metrics"] = ["loss"]
    return fit, held, enc


def test_measure_lds_synthetic():
    fit, held, enc = _stores()
    res = measure_lds(fit, held, methods=["mean_curve", "constant"], encoder=enc, n_boot=100)
    recs = {(r["method"], r["variation"]): r for r in res["results"]}
    assert set(recs) == {(m, v) for m in ("mean_curve", "constant", "similarity_sum", "tfidf_sum")
                         for v in ("both", "membership")}
    assert all(r["n_curricula"] == 6 and r["task"] == "synthetic" and r["metric"] == "loss" for r in recs.values())
    # synthetic runs draw their own start values, so mean_curve (start + trend) ranks by the start
    mc = recs[("mean_curve", "both")]
    assert mc["n_test_examples"] + mc["n_nan"] == 8
    # constant predicts the start value: its final prediction is the start, a real column
    # the similarity_sum reference equals the hand-made datamodel sum on the same runs
    ids = [r for r in held.run_ids if held.run(r).info["group"] == "membership"]
    cur = np.stack([held.run(r).curriculum for r in ids])
    H_tr, H_te = enc.encode([e.text for e in fit.task.train]), enc.encode([e.text for e in fit.task.test])
    pred = -occurrence_counts(cur, held.train_ids) @ cosine_matrix(H_tr, H_te)
    true = np.stack([held.run(r).values["loss"][-1] for r in ids])
    want = np.nanmean(per_example_spearman(true, pred))
    assert recs[("similarity_sum", "membership")]["lds_mean"] == pytest.approx(want)
    d = recs[("mean_curve", "membership")]["vs_similarity_sum"]
    assert d["n_paired"] == min(recs[("mean_curve", "membership")]["n_test_examples"],
                                recs[("similarity_sum", "membership")]["n_test_examples"])
    assert "vs_similarity_sum" not in recs[("similarity_sum", "both")]
    # tfidf_sum: the same datamodel sum with the word TF-IDF cosine (fitted on all the task's texts)
    tf = TfidfFeatures.fit([e.text for e in fit.task.train] + [e.text for e in fit.task.test])
    pred = -occurrence_counts(cur, held.train_ids) @ cosine_matrix(tf.encode([e.text for e in fit.task.train]),
                                                                  tf.encode([e.text for e in fit.task.test]))
    assert recs[("tfidf_sum", "membership")]["lds_mean"] == pytest.approx(np.nanmean(per_example_spearman(true, pred)))
    assert "vs_tfidf_sum" in recs[("similarity_sum", "both")] and "vs_tfidf_sum" not in recs[("tfidf_sum", "both")]
    md = format_lds_markdown(res)
    assert "| synthetic | loss | similarity_sum |" in md and "LDS membership" in md


def test_lds_refuses_fit_curricula_and_other_examples():
    fit, held, enc = _stores(n_fit=6, n_held=4)
    r0 = fit.run(fit.run_ids[0])
    held.add_run(Run("copy", r0.curriculum, r0.steps, r0.test_ids, r0.values, seed=0))
    with pytest.raises(InputError, match="held-out run 'copy' has the curriculum of fit run 'run-0000'"):
        check_same_collection(fit, held)
    fit2, held2, _ = _stores(n_fit=6, n_held=4)
    held2.manifest["examples_sha256"] = {"train": "x", "test": "y"}
    with pytest.raises(InputError, match="other training/test examples"):
        check_same_collection(fit2, held2)
    fit2.manifest["examples_sha256"] = held2.manifest["examples_sha256"]
    fit2.manifest["config"] = {"lr": 1e-3, "record_steps": "all", "run_seed": 0}
    held2.manifest["config"] = {"lr": 1e-3, "record_steps": "ends", "run_seed": 9}
    check_same_collection(fit2, held2)  # record_steps and run_seed do not matter
    held2.manifest["config"]["lr"] = 2e-3
    with pytest.raises(InputError, match="lr = 0.002 vs 0.001"):
        check_same_collection(fit2, held2)
