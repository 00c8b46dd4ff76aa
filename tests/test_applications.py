"""The paper's applications: mislabelled-data detection (pure metrics against hand-computed values,
fix-and-retrain end to end) and the unseen-data cases (end to end on a tiny task)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import TINY_COLLECT, collect_cli_flags, private_model_cache
from gptfluence.analysis.mislabeled import (MislabeledConfig, detection_auc, detection_curve, fixed_task, found_at,
                                            inspection_order, perfect_auc)
from gptfluence.analysis.unseen import case_of, hidden_test_ids, restrict_tests
from gptfluence.cli import main
from gptfluence.dynamics.collect import CollectConfig, train_and_evaluate
from gptfluence.dynamics.curriculum import pool_part, read_curriculum_file
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError

TINY = CollectConfig(task="sentiment", **TINY_COLLECT)


# ---------------------------------------------------------------------------------------------
# pure functions, hand-computed


def test_detection_curve_and_auc_by_hand():
    # inspection order 0, 1, 2, 3; flipped 0 and 2
    x, y = detection_curve(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0]))
    assert x.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert y.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    # trapezoids: .25*(0+.5)/2 + .25*(.5+.5)/2 + .25*(.5+1)/2 + .25*(1+1)/2 = .0625+.125+.1875+.25
    assert detection_auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.625)
    # perfect: 1 - f/2 with f = 0.5
    assert perfect_auc(np.array([1, 0, 1, 0])) == pytest.approx(0.75)
    # worst: flipped last: .25*(0)/2*2 + .25*(0+.5)/2 + .25*(.5+1)/2 = .0625 + .1875
    assert detection_auc(np.array([0.0, 3.0, 0.0, 2.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.25)
    assert found_at(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0]), [0.25, 0.5, 0.75, 1.0]) == \
        [0.5, 0.5, 1.0, 1.0]


def test_inspection_order_ties_stable_and_nan_last():
    assert inspection_order(np.array([1.0, np.nan, 1.0, 5.0])).tolist() == [3, 0, 2, 1]
    # constant scores inspect in the given order
    x, y = detection_curve(np.zeros(4), np.array([0, 0, 1, 1]))
    assert y.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_detection_errors_name_the_problem():
    with pytest.raises(InputError, match="no flipped"):
        detection_auc(np.ones(3), np.zeros(3))
    with pytest.raises(InputError, match="one entry per training example"):
        detection_auc(np.ones(3), np.ones(2))
    with pytest.raises(InputError, match="--methods"):
        MislabeledConfig(methods=("gptfluence", "nope")).validate()
    with pytest.raises(InputError, match="--fix-fractions"):
        MislabeledConfig(fix_fractions=(0.0,)).validate()


def test_fixed_task_restores_only_flipped_inspected_labels():
    from gptfluence.tasks.builtin import get_task

    task = get_task("sentiment", n_train=20, n_test=4, seed=0, flip_fraction=0.5)
    flipped = task.metadata["flipped_ids"]
    clean = [e.id for e in task.train if e.id not in flipped]
    fixed = fixed_task(task, [flipped[0], clean[0]])
    by = {e.id: e for e in fixed.train}
    orig = {e.id: e for e in task.train}
    assert by[flipped[0]].target == orig[flipped[0]].meta["original_target"] != orig[flipped[0]].target
    assert by[flipped[0]].meta.get("fixed") and not by[flipped[0]].meta.get("flipped")
    assert by[clean[0]].target == orig[clean[0]].target
    assert by[flipped[1]].target == orig[flipped[1]].target  # not inspected: still flipped
    assert [e.id for e in fixed.train] == [e.id for e in task.train] and fixed.test == task.test


def test_pool_part_and_hidden_tests_are_seeded_subsets():
    part = pool_part(range(20), 0.75, seed=3)
    assert part.size == 15 and np.all(np.diff(part) > 0) and set(part) <= set(range(20))
    assert np.array_equal(part, pool_part(range(20), 0.75, seed=3))
    assert not np.array_equal(part, pool_part(range(20), 0.75, seed=4))
    with pytest.raises(InputError, match="--pool-fraction"):
        pool_part(range(5), 0.0, 0)
    hid = hidden_test_ids(np.arange(10), 0.3, 0)
    assert hid.size == 3 and set(hid) <= set(range(10))
    assert hidden_test_ids(np.arange(2), 0.9, 0).size == 1  # one left to fit on
    with pytest.raises(InputError, match="--test-fraction"):
        hidden_test_ids(np.arange(10), 1.0, 0)
    assert [case_of(u, h) for u in (False, True) for h in (False, True)] == ["seen", "unseen_test", "unseen_train", "both"]


def test_restrict_tests_view(tiny_task):
    from conftest import make_run

    d = Dynamics(tiny_task, runs=[make_run("a", tiny_task), make_run("b", tiny_task, seed=1)])
    v = restrict_tests(d, ["b"], [3, 1])
    assert v.run_ids == ["b"]
    assert v.run("b").test_ids.tolist() == [3, 1]
    assert np.array_equal(v.run("b").values["loss"], d.run("b").values["loss"][:, [3, 1]], equal_nan=True)
    with pytest.raises(InputError, match="no test id 9"):
        restrict_tests(d, ["a"], [9])


# ---------------------------------------------------------------------------------------------
# end to end on a tiny task (tiny base model in a private cache)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with private_model_cache(tmp_path_factory, "apps-cache", TINY) as root:
        yield root


@pytest.fixture(scope="module")
def flipped_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("flip") / "store"
    cfg = dataclasses.replace(TINY, flip_fraction=0.5, epochs=2)
    assert main(["collect", "--quiet", "--runs", "6", "--workers", "1", "--out", str(out)] + collect_cli_flags(cfg)) == 0
    return out


def test_train_and_evaluate_reproduces_a_recorded_run(flipped_store):
    d = Dynamics.open(flipped_store)
    run = d.run("run-0002")
    got = train_and_evaluate(d, run.curriculum, int(run.seed))
    np.testing.assert_allclose(got["loss"], run.values["loss"][-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["accuracy"], run.values["accuracy"][-1])


def test_mislabeled_cli_end_to_end(flipped_store, tmp_path, capsys):
    out = tmp_path / "mis.json"
    assert main(["mislabeled", str(flipped_store), "--out", str(out), "--no-progress",
                 "--methods", "gptfluence", "simfluence_test_harm", "tracin_cp", "training_loss", "random",
                 "--fix-fractions", "0.5", "--retrain-seeds", "2", "--checkpoint-every", "2",
                 "--random-draws", "5"]) == 0
    res = json.loads(out.read_text())
    d = Dynamics.open(flipped_store)
    n_flip = len(d.task.metadata["flipped_ids"])
    assert res["n_train"] == 16 and res["n_flipped"] == n_flip == 8
    assert res["auc_perfect"] == pytest.approx(1 - 0.5 / 2)
    for m in ("gptfluence", "simfluence_test_harm", "tracin_cp", "training_loss", "random"):
        r = res["methods"][m]
        assert 0.0 <= r["auc"] <= 1.0
        c = r["curve"]
        assert c["fraction_inspected"][0] == 0 and c["fraction_inspected"][-1] == 1
        assert c["fraction_found"][0] == 0 and c["fraction_found"][-1] == 1
        assert np.all(np.diff(c["fraction_found"]) >= 0)
    fr = res["fix_and_retrain"]
    by = {(s["method"], s["fraction"]): s for s in fr["summary"]}
    assert by[("oracle", 0.5)]["n_fixed_mean"] == n_flip and by[("no_fix", 0.0)]["n_fixed_mean"] == 0
    for m in ("gptfluence", "tracin_cp", "training_loss", "random"):
        s = by[(m, 0.5)]
        assert s["n_seeds"] == 2 and 0 <= s["n_fixed_mean"] <= 8 and 0 <= s["test_accuracy_mean"] <= 1
    # the fixed count of each plan is the flipped ids among its top half of the ranking
    tl = res["methods"]["training_loss"]
    assert by[("training_loss", 0.5)]["n_fixed_mean"] == pytest.approx(tl["found_at"]["0.5"] * n_flip)
    assert len(fr["results"]) == 2 * (2 + 5)
    # each ranking carries its own fix-and-retrain rows beside its AUC
    assert res["methods"]["tracin_cp"]["fix_and_retrain"][0]["test_accuracy_mean"] == by[("tracin_cp", 0.5)]["test_accuracy_mean"]
    assert set(fr["baselines"]) == {"no_fix", "oracle"}
    assert "AUC" in capsys.readouterr().out


def test_mislabeled_refuses_a_store_without_flips(tmp_path, tmp_path_factory):
    out = tmp_path / "clean"
    assert main(["collect", "--quiet", "--runs", "2", "--workers", "1", "--out", str(out)] + collect_cli_flags(TINY)) == 0
    assert main(["mislabeled", str(out), "--out", str(tmp_path / "m.json"), "--no-progress"]) == 2


def test_evaluate_unseen_cases_end_to_end(tmp_path, capsys):
    template = tmp_path / "template"
    assert main(["collect", "--quiet", "--runs", "1", "--workers", "1", "--out", str(template)] + collect_cli_flags(TINY)) == 0
    part = tmp_path / "part.jsonl"
    assert main(["curricula", "--dynamics", str(template), "--n", "6", "--pool-fraction", "0.75", "--out", str(part)]) == 0
    runs = read_curriculum_file(part)
    allowed = set(pool_part(Dynamics.open(template).train_ids, 0.75, 0).tolist())
    assert len(runs.curricula) == 6 and all(set(c[c >= 0].tolist()) <= allowed for c in runs.curricula.values())
    assert set(runs.groups.values()) == {"seen_pool"}
    fit = tmp_path / "fit"
    assert main(["collect", "--quiet", "--workers", "1", "--config", str(template / "collect_config.json"),
                 "--curriculum-file", str(part), "--out", str(fit)]) == 0
    held = tmp_path / "held.jsonl"
    assert main(["curricula", "--dynamics", str(fit), "--n", "3", "--pool-fraction", "0.75", "--whole-pool-too",
                 "--seed", "1", "--out", str(held)]) == 0
    heldout = tmp_path / "heldout"
    assert main(["collect", "--quiet", "--workers", "1", "--config", str(fit / "collect_config.json"),
                 "--curriculum-file", str(held), "--out", str(heldout)]) == 0
    out = tmp_path / "unseen.json"
    assert main(["evaluate-unseen", str(fit), str(heldout), "--metrics", "loss", "--out", str(out), "--no-progress",
                 "--test-fraction", "0.5", "--epochs", "3", "--methods", "gptfluence", "simfluence", "mean_curve"]) == 0
    res = json.loads(out.read_text())
    h = Dynamics.open(heldout)
    assert len(res["hidden_test_ids"]) == 3
    cases = {r["case"] for r in res["results"]}
    whole = [r for r in h.run_ids if h.run(r).info.get("group") == "whole_pool"]
    unseen_runs = [r for r in h.run_ids
                   if set(h.run(r).curriculum[h.run(r).curriculum >= 0].tolist()) - set(res["seen_train_ids"])]
    assert unseen_runs and set(unseen_runs) <= set(whole)
    assert {"unseen_test", "unseen_train", "both"} <= cases
    for r in res["results"]:
        if r["method"] == "simfluence":
            assert (r["status"] == "ok") == (r["case"] == "seen"), r["case"]
            if r["case"] != "seen":
                assert r["mse_mean"] is None and "no prediction" in r["reason"]
        else:
            assert r["status"] == "ok" and r["mse_mean"] >= 0 and r["n_runs"] == res["cases"][r["case"]]["n_runs"]
    assert "n/a (no parameters)" in capsys.readouterr().out
    # the same through `evaluate --unseen-heldout` (one fit store only)
    out2 = tmp_path / "unseen2.json"
    assert main(["evaluate", str(fit), "--unseen-heldout", str(heldout), "--unseen-test-fraction", "0.5", "--metrics", "loss",
                 "--methods", "simfluence", "mean_curve", "--epochs", "3", "--no-progress", "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["hidden_test_ids"] == res["hidden_test_ids"]
    mc = {r["case"]: r["mse_mean"] for r in res["results"] if r["method"] == "mean_curve"}
    assert {r["case"]: r["mse_mean"] for r in res2["results"] if r["method"] == "mean_curve"} == pytest.approx(mc)
    assert main(["evaluate", str(fit), str(heldout), "--unseen-heldout", str(heldout), "--out", str(tmp_path / "x.json")]) == 2
