"""Cheap counterfactual collection (--record-steps), ``gptfluence curricula`` + ``lds`` and
``gptfluence verify`` end to end through the CLI on a tiny task (tiny base model in a tmp cache)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import TINY_COLLECT, collect_cli_flags, private_model_cache
from gptfluence.cli import main
from gptfluence.dynamics.collect import CollectConfig, collect, recorded_steps
from gptfluence.dynamics.curriculum import write_curriculum_lines
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError

TINY = CollectConfig(task="sentiment", **TINY_COLLECT)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with private_model_cache(tmp_path_factory, "verify-cache", TINY) as root:
        yield root


@pytest.fixture(scope="module")
def fit_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "store"
    assert main(["collect", "--quiet", "--runs", "5", "--workers", "1", "--out", str(out)] + collect_cli_flags(TINY)) == 0
    return out


def test_recorded_steps_spec():
    assert recorded_steps("all", 3).tolist() == [0, 1, 2, 3]
    assert recorded_steps("ends", 5).tolist() == [0, 5]
    assert recorded_steps("2, 9,1", 5).tolist() == [0, 1, 2, 5]
    for bad in ("first", "1,x", "-1"):
        with pytest.raises(InputError, match="--record-steps"):
            recorded_steps(bad, 4)
    with pytest.raises(InputError, match="--record-steps"):
        CollectConfig(record_steps="some").validate()


def test_ends_run_equals_full_run_at_its_ends(fit_store, tmp_path):
    full = Dynamics.open(fit_store).run("run-0001")
    cfile = write_curriculum_lines(tmp_path / "c.jsonl", [("again", full.curriculum, "membership", full.seed)])
    cfg = dataclasses.replace(TINY, curriculum_file=str(cfile), record_steps="ends")
    store = collect(cfg, tmp_path / "ends", workers=1, progress=False, log=lambda s: None)
    run = store.run("again")
    T = full.num_steps
    assert run.steps.tolist() == [0, T]
    assert run.info["group"] == "membership" and run.seed == full.seed
    for m in full.metrics:
        assert np.array_equal(run.values[m][0], full.values[m][0]), m
        assert np.array_equal(run.values[m][1], full.values[m][-1]), m
    assert store.manifest["config"]["record_steps"] == "ends"
    assert Dynamics.open(fit_store).manifest["config"]["record_steps"] == "all"  # old stores: see test_store


def test_curricula_and_lds_cli(fit_store, tmp_path):
    cfile = tmp_path / "held.jsonl"
    assert main(["curricula", "--dynamics", str(fit_store), "--design", "both", "order", "--n", "4",
                 "--out", str(cfile)]) == 0
    lines = [json.loads(x) for x in cfile.read_text().splitlines()]
    assert [x["group"] for x in lines] == ["both"] * 4 + ["order"] * 4
    held = tmp_path / "held"
    assert main(["collect", "--quiet", "--workers", "1", "--config", str(fit_store / "collect_config.json"),
                 "--curriculum-file", str(cfile), "--record-steps", "ends", "--out", str(held)]) == 0
    out = tmp_path / "lds.json"
    assert main(["lds", str(fit_store), str(held), "--methods", "mean_curve", "--reference-encoder", "bow",
                 "--metrics", "loss", "--n-boot", "50", "--no-progress", "--out", str(out),
                 "--markdown", str(tmp_path / "lds.md")]) == 0
    res = json.loads(out.read_text())
    keys = {(r["method"], r["variation"]) for r in res["results"]}
    assert keys == {(m, v) for m in ("mean_curve", "similarity_sum", "tfidf_sum", "label_count")
                    for v in ("both", "order")}
    for r in res["results"]:
        assert r["n_curricula"] == 4 and r["task"] == "sentiment" and r["metric"] == "loss"
        assert r["n_test_examples"] + r["n_nan"] == 6
        # membership is the same in every order-only curriculum: the datamodel references are constant
        if r["variation"] == "order" and r["method"] != "mean_curve":
            assert r["n_nan"] == 6 and r["lds_mean"] is None
    # a store collected with other settings is refused, naming the field
    other = tmp_path / "other"
    assert main(["collect", "--quiet", "--workers", "1", "--config", str(fit_store / "collect_config.json"),
                 "--curriculum-file", str(cfile), "--record-steps", "ends", "--lr", "0.001", "--out", str(other)]) == 0
    assert main(["lds", str(fit_store), str(other), "--methods", "mean_curve", "--reference-encoder", "bow",
                 "--out", str(tmp_path / "x.json")]) == 2


def test_verify_cli_end_to_end(fit_store, tmp_path, capsys):
    sim = tmp_path / "sim"
    assert main(["fit", str(fit_store), "--method", "simfluence", "--epochs", "3", "--unseen", "zero", "--no-progress",
                 "--out", str(sim)]) == 0
    out = tmp_path / "verify"
    argv = ["verify", str(sim), "--dynamics", str(fit_store), "--run", "run-0004", "--test-ids", "0", "1", "2", "3",
            "--k", "1", "--noise-seeds", "1", "--reorders", "1", "--workers", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "relative to an average training example" in text and "removing harmful examples" in text
    rep = json.loads((out / "verify.json").read_text())
    assert rep["test_ids"] == [0, 1, 2, 3] and rep["k"] == 1
    assert [g["group"] for g in rep["groups"]] == ["helpful", "harmful", "random"]
    retrain = Dynamics.open(out / "retrain")
    store = Dynamics.open(fit_store)
    run = store.run("run-0004")
    assert sorted(retrain.run_ids) == sorted(["full", "remove-helpful", "remove-harmful", "remove-random",
                                              "full-seed1", "reorder-1"])
    assert retrain.run("full").seed == run.seed == retrain.run("remove-harmful").seed
    # the re-trained full curriculum reproduces the recorded run exactly (same seed, settings, base model)
    assert rep["noise"]["replay_max_abs_diff"] == 0.0
    base = retrain.run("full").values["loss"][-1, :4]
    for g in rep["groups"]:
        changed = retrain.run(f"remove-{g['group']}")
        assert not np.isin(changed.curriculum, g["removed_train_ids"]).any()
        assert changed.curriculum.shape == run.curriculum.shape  # steps kept, slots padded
        assert (changed.curriculum < 0).sum() - (run.curriculum < 0).sum() == g["removed_occurrences"] > 0
        actual = changed.values["loss"][-1, :4] - base
        assert np.allclose(g["actual_change"], actual, atol=1e-6)
        assert g["actual_change_mean"] == pytest.approx(float(actual.mean()), abs=1e-6)
        assert -1.0 <= g["sign_agreement"] <= 1.0
    helpful, harmful, rnd = rep["groups"]
    assert min(helpful["removed_scores"]) >= max(harmful["removed_scores"])
    for g in (helpful, harmful):
        assert g["actual_minus_random_mean"] == pytest.approx(g["actual_change_mean"] - rnd["actual_change_mean"])
    assert "actual_minus_random_mean" not in rnd
    res = {r["group"]: r for r in rep["results"]}
    assert set(res["helpful"]) >= {"method", "task", "group", "k", "simulated_change_mean", "actual_change_mean",
                                   "pearson", "sign_agreement"}
    # the same command again resumes (nothing re-trained) and gives the same report
    assert main(argv) == 0
    assert json.loads((out / "verify.json").read_text())["groups"] == rep["groups"]
    # bad input: one line, exit 2
    assert main(argv[:6] + ["--run", "nope", "--out", str(tmp_path / "v2")]) == 2
    assert "nope" in capsys.readouterr().err


def test_fill_from_pool_keeps_batches():
    from gptfluence.analysis.verify import remove_ids, replace_ids

    c = np.array([[0, 1], [1, 2], [3, -1]])
    out = replace_ids(c, [1, 3], pool=range(8), rng=np.random.default_rng(0))
    assert out.shape == c.shape and (out < 0).sum() == 1
    new = set(out[c == 1].tolist())
    assert len(new) == 1 and new.isdisjoint({0, 1, 2, 3}) and out[2, 0] not in {0, 1, 2, 3} | new
    assert remove_ids(c, [1]).tolist() == [[0, -1], [2, -1], [3, -1]]
    with pytest.raises(InputError, match="empty batch"):
        remove_ids(c, [3])
    with pytest.raises(InputError, match="--fill pool"):
        replace_ids(c, [0, 1, 2], pool=range(5), rng=np.random.default_rng(0))
