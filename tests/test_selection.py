"""Data selection (`gptfluence.analysis.selection`, ``gptfluence select``): budget, subset, order, CLI, re-training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import collect_cli_flags, make_run, private_model_cache
from gptfluence.analysis.selection import (Choice, SelectConfig, SelectionShape, best_index, check_budget,
                                           fit_on_store, reference_curricula, select, selection_fit_overrides,
                                           subset_curriculum, summarize_records, top_k)
from gptfluence.cli import main
from gptfluence.dynamics.collect import CollectConfig
from gptfluence.dynamics.curriculum import read_curriculum_file
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import InputError


class AdditiveSim:
    """Synthetic loss simulator: each occurrence of training id i at step t lowers test m's loss by
    ``w[i, m] * (1 + recency * t)``; ``imbalance`` adds ``imbalance * (#even ids - #odd ids)^2 / T``
    per step (a penalty the additive scores cannot see)."""

    metric = "loss"
    method = "additive"

    def __init__(self, w: np.ndarray, recency: float = 0.0, imbalance: float = 0.0):
        self.w, self.recency, self.imbalance = w, recency, imbalance

    def prepare(self, *a, **k):
        pass

    def simulate(self, curricula, test_ids, start, first_step=0):
        cur = np.asarray(curricula)
        R, T, _ = cur.shape
        out = np.empty((R, T + 1, len(test_ids)))
        out[:, 0] = start
        for r in range(R):
            ids = cur[r][cur[r] >= 0]
            even, odd = np.unique(ids[ids % 2 == 0]).size, np.unique(ids[ids % 2 == 1]).size
            pen = self.imbalance * (even - odd) ** 2 / T
            for t in range(1, T + 1):
                b = cur[r, t - 1]
                b = b[b >= 0]
                out[r, t] = out[r, t - 1] - self.w[b].sum(axis=0) * (1 + self.recency * t) + pen
        return out


@pytest.fixture
def mem_store(tiny_task):
    return Dynamics(tiny_task, runs=[make_run("run-0000", tiny_task, seed=0)])


SHAPE = SelectionShape(batch_size=2, epochs=3, reshuffle_each_epoch=True)
NO_SEARCH = dict(start_random=0, swap_rounds=0)


def weights(n=10, m=4, seed=0):
    return np.random.default_rng(seed).random((n, m))


def test_budget_checks(mem_store):
    assert check_budget(3, 10) == 3
    for bad in (0, 11, -1):
        with pytest.raises(InputError, match="--budget must be in 1..10"):
            check_budget(bad, 10)
    sim = AdditiveSim(weights())
    with pytest.raises(InputError, match="--budget"):
        select(sim, mem_store, config=SelectConfig(budget=11), shape=SHAPE)
    with pytest.raises(InputError, match="--test-ids: unknown test id 99"):
        select(sim, mem_store, test_ids=[0, 99], config=SelectConfig(budget=3), shape=SHAPE)
    with pytest.raises(InputError, match="--metric"):
        select(sim, mem_store, config=SelectConfig(budget=3, metric="accuracy"), shape=SHAPE)


def test_reference_curricula_cover_pool():
    pool = np.arange(10, 20)
    curs = reference_curricula(pool, 4, SHAPE, passes=2, seed=1)
    assert len(curs) == 2 * 3  # ceil(10 / 4) blocks per pass
    counts = {i: 0 for i in pool}
    for c in curs:
        ids = np.unique(c[c >= 0])
        assert ids.size == 4 and set(ids) <= set(pool)
        for i in ids:
            counts[i] += 1
    assert min(counts.values()) >= 2


def test_subset_curriculum_layout():
    c = subset_curriculum([5, 3, 9], SHAPE, seed=0)
    assert c.shape == (6, 2)  # 3 examples: 2 batches per epoch (last one padded) x 3 epochs
    real = c[c >= 0]
    assert sorted(np.unique(real)) == [3, 5, 9]
    assert all((real == i).sum() == 3 for i in (3, 5, 9))


def test_topk_is_the_additive_optimum_and_subset_respects_budget(mem_store):
    w = weights()
    sim = AdditiveSim(w)
    res = select(sim, mem_store, config=SelectConfig(budget=4, orders=3, **NO_SEARCH), shape=SHAPE)
    want = set(np.argsort(-w.mean(axis=1))[:4].tolist())  # LOO score of i = 3 epochs * mean_m w[i, m]
    assert set(res["subset"]) == want and len(res["subset"]) == 4
    scores = {int(k): v for k, v in res["scores"].items()}
    assert scores[0] == pytest.approx(3 * w[0].mean())
    assert [scores[i] for i in res["subset"]] == sorted((scores[i] for i in res["subset"]), reverse=True)
    cur = np.asarray(res["curriculum"])
    real = cur[cur >= 0]
    assert set(np.unique(real)) == want
    assert all((real == i).sum() == SHAPE.epochs for i in want)
    assert cur.shape == (6, 2)
    # the search keeps the optimum of an additive simulator
    res2 = select(sim, mem_store, config=SelectConfig(budget=4, orders=3, start_random=8, swap_rounds=5,
                                                      swap_proposals=8), shape=SHAPE)
    assert set(res2["subset"]) == want and res2["search"]["start"] == "topk"


def test_search_beats_topk_when_scores_miss_an_interaction(mem_store):
    w = np.zeros((10, 4))
    w[0::2] = 1.0  # even ids look best one by one ...
    w[1::2] = 0.4
    # ... but imbalance costs 0.4 * (#even - #odd)^2: all four even -12 + 6.4 = -5.6, three even and one odd
    # -10.2 + 1.6 = -8.6 (the optimum), two and two -8.4 (final minus start, summed over 3 epochs)
    sim = AdditiveSim(w, imbalance=0.4)
    cfg = SelectConfig(budget=4, orders=2, reference_passes=20, start_random=4, swap_rounds=10, swap_proposals=16)
    res = select(sim, mem_store, config=cfg, shape=SHAPE)
    assert set(res["topk"]) <= set(range(0, 10, 2))  # the plain top-k: even ids only
    sub = np.asarray(res["subset"])
    assert len(set(sub.tolist())) == 4 and (sub % 2 == 0).sum() == 3  # the search finds the optimum
    assert res["search"]["predicted"] == pytest.approx(res["search"]["topk_predicted"] - 3.0)
    assert res["search"]["swaps_accepted"] >= (1 if res["search"]["start"] == "topk" else 0)


def test_order_choice_picks_best_predicted(mem_store):
    sim = AdditiveSim(weights(seed=3), recency=1.0)  # later steps count more: helpful examples last is best
    res = select(sim, mem_store, config=SelectConfig(budget=6, orders=5, **NO_SEARCH), shape=SHAPE)
    means = [c["predicted_mean"] for c in res["candidates"]]
    assert len(means) == 5 + 2
    assert res["predicted_mean"] == min(means)
    assert res["order_name"] == "helpful-last"
    # the returned curriculum really is the one predicted
    cur = np.asarray(res["curriculum"])[None]
    tids = np.asarray(res["test_ids"])
    start = mem_store.run("run-0000").trajectory("loss")[0]
    assert np.nanmean(sim.simulate(cur, tids, start[None])[0, -1]) == pytest.approx(res["predicted_mean"])


def test_best_index_direction():
    assert best_index([0.5, 0.2, np.nan, 0.3], "loss") == 1
    assert best_index([0.5, 0.2, np.nan, 0.3], "accuracy") == 0
    with pytest.raises(InputError):
        best_index([np.nan], "loss")


def test_top_k_and_summary():
    assert top_k([7, 8, 9], np.array([0.1, np.nan, 0.3]), 2).tolist() == [9, 7]
    assert top_k([7, 8, 9], np.array([0.1, np.nan, 0.3]), 1, helpful=False).tolist() == [7]
    with pytest.raises(InputError, match="--budget 3"):
        top_k([7, 8, 9], np.array([0.1, np.nan, 0.3]), 3)
    recs = [{"choice": "a", "seed": 0, "actual_loss": 1.0, "predicted": 0.5},
            {"choice": "a", "seed": 1, "actual_loss": 3.0, "predicted": 0.7},
            {"choice": "random-0", "seed": 0, "actual_loss": 2.0, "predicted": None},
            {"choice": "random-1", "seed": 0, "actual_loss": 4.0, "predicted": None}]
    s = {r["choice"]: r for r in summarize_records(recs)}
    assert s["a"]["actual_loss_mean"] == 2.0 and s["a"]["actual_loss_sd"] == pytest.approx(np.sqrt(2.0))
    assert s["a"]["predicted_mean"] == pytest.approx(0.6)
    assert s["random"]["n"] == 2 and s["random"]["actual_loss_mean"] == 3.0 and "predicted_mean" not in s["random"]
    assert s["random-0"]["actual_loss_sd"] is None


# ------------------------------------------------------------------------------------------
# end to end on a tiny collected store

TINY = CollectConfig(task="sentiment", n_train=12, n_test=4, examples_per_run=6, batch_size=2, epochs=2,
                     model_layers=1, model_hidden=32, model_pretrain_steps=20, gen_every=1, gen_max_new_tokens=4,
                     max_length=64)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with private_model_cache(tmp_path_factory, "select-cache", TINY) as root:
        yield root


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("sel") / "store"
    assert main(["collect", "--quiet", "--runs", "3", "--workers", "1", "--out", str(out)] + collect_cli_flags(TINY)) == 0
    return out


def test_cli_select_and_verify(tiny_store, tmp_path, capsys):
    out = tmp_path / "sel"
    args = ["select", str(tiny_store), "--method", "mean_curve", "--budget", "4", "--orders", "2", "--test-ids", "0", "2",
            "--start-random", "2", "--swap-rounds", "1", "--swap-proposals", "2", "--no-progress", "--out", str(out)]
    assert main(args + ["--verify", "--random-subsets", "1", "--seeds", "2", "--workers", "1"]) == 0
    store = Dynamics.open(tiny_store)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["budget"] == 4 and sel["test_ids"] == [0, 2] and sel["method"] == "mean_curve"
    cf = read_curriculum_file(out / "curriculum.jsonl", train_ids=store.train_ids)
    (rid, cur), = cf.curricula.items()
    real = cur[cur >= 0]
    assert sorted(np.unique(real).tolist()) == sorted(sel["subset"]) and len(set(sel["subset"])) == 4
    assert all((real == i).sum() == TINY.epochs for i in sel["subset"])
    assert json.loads((out / "select_config.json").read_text())["budget"] == 4
    rep = json.loads((out / "compare.json").read_text())
    assert {(r["choice"], r["seed"]) for r in rep["records"]} == {("mean_curve", 0), ("mean_curve", 1),
                                                                  ("random-0", 0), ("random-0", 1)}
    retrain = Dynamics.open(out / "verify" / "retrain")
    for r in rep["records"]:
        assert r["budget"] == 4 and r["steps"] == 4  # 4 examples, batch 2, 2 epochs
        run = retrain.run(f"{r['choice']}-s{r['seed']}")
        col = {int(t): j for j, t in enumerate(run.test_ids.tolist())}
        final = run.trajectory("loss")[-1, [col[0], col[2]]]
        assert r["actual_loss"] == pytest.approx(float(final.mean()))
        assert 0.0 <= r["actual_accuracy"] <= 1.0
    # the chosen curriculum was fine-tuned as written
    assert np.array_equal(retrain.run("mean_curve-s0").curriculum, cur)
    assert any(s["choice"] == "random" for s in rep["summary"])
    # resumable: the same command again reuses the store
    assert main(args + ["--verify", "--random-subsets", "1", "--seeds", "2", "--workers", "1"]) == 0


def test_cli_select_errors(tiny_store, tmp_path, capsys):
    base = ["select", str(tiny_store), "--method", "constant", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(base + ["--budget", "13"]) == 2
    assert "--budget must be in 1..12" in capsys.readouterr().err
    assert main(base + ["--budget", "3", "--test-ids", "0", "77"]) == 2
    assert "unknown test id 77" in capsys.readouterr().err
    ids = tmp_path / "ids.txt"
    ids.write_text("0\nx\n")
    assert main(base + ["--budget", "3", "--test-ids-file", str(ids)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(base + ["--budget", "3", "--method", "nope"]) == 2
    assert "unknown simulator method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_cli_select_test_ids_file(tiny_store, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text("[3, 1]")
    out = tmp_path / "sel"
    assert main(["select", str(tiny_store), "--method", "constant", "--budget", "12", "--orders", "1",
                 "--test-ids-file", str(ids), "--no-progress", "--out", str(out)]) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sel["test_ids"] == [3, 1] and sorted(sel["subset"]) == list(range(12))  # budget = the whole pool
    assert sel["search"]["swaps_accepted"] == 0
    cf = read_curriculum_file(out / "curriculum.jsonl")
    assert cf.seeds == {"selection": 0}


def test_select_fit_preset(tiny_store, tmp_path, capsys):
    """`select` fits gptfluence with the 'selection' preset (teacher forcing, raw gradients) unless
    --fit-preset default; other methods keep their defaults; the overrides reach the fit and are
    recorded; a bad preset is a clean error before anything is written."""
    assert selection_fit_overrides("gptfluence", "selection") == {"objective": "teacher_forcing",
                                                                  "similarity_preconditioner": "none",
                                                                  "proj_dim": 32, "lexical": False,
                                                                  "ensemble": 1, "a_factors": "pair",
                                                                  "b_projection": "pair", "b_lags": 0}
    assert selection_fit_overrides("gptfluence", "default") == {}
    assert selection_fit_overrides("simfluence", "selection") == {}
    with pytest.raises(InputError, match="fit-preset"):
        selection_fit_overrides("gptfluence", "best")
    sim = fit_on_store("simfluence", Dynamics.open(tiny_store), "loss", seed=0, epochs=1)
    assert sim.config.epochs == 1
    out = tmp_path / "sel"
    base = ["select", str(tiny_store), "--method", "constant", "--budget", "3", "--orders", "1", "--no-progress"]
    assert main(base + ["--out", str(out)]) == 0
    cfg = json.loads((out / "select_config.json").read_text())
    assert cfg["fit_preset"] == "selection" and cfg["simulator"]["config_overrides"] == {}
    assert main(base + ["--fit-preset", "best", "--out", str(tmp_path / "bad")]) == 2
    assert "--fit-preset must be one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
