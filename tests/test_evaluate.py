"""Evaluation protocol: metric functions vs hand-computed values, splits, JSON format, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gptfluence.analysis.evaluate import (all_steps_errors, curriculum_spearman, evaluate, final_step_spearman,
                                          final_values, format_markdown, mse_by_step, spearman, trajectory_errors,
                                          write_results)
from gptfluence.analysis.splits import split_runs
from gptfluence.cli import main
from gptfluence.errors import InputError
from gptfluence.simulators.synthetic import synthetic_dynamics

nan = float("nan")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# true / pred [R=2, S=3, M=2]; index 0 is the start value
TRUE = np.array([[[1, 2], [2, 3], [3, 4]],
                 [[0, 0], [1, nan], [2, 1]]], dtype=float)
PRED = np.array([[[1, 2], [2, 5], [4, 4]],
                 [[0, 0], [0, 7], [2, 4]]], dtype=float)


def test_all_steps_errors_by_hand():
    mse, mae = trajectory_errors(TRUE, PRED)
    np.testing.assert_allclose(mse, [[0.5, 2.0], [0.5, 9.0]])
    np.testing.assert_allclose(mae, [[0.5, 1.0], [0.5, 3.0]])
    e = all_steps_errors(TRUE, PRED)
    assert e["mse_mean"] == pytest.approx(3.0)
    assert e["mse_std"] == pytest.approx(math.sqrt(49.5 / 4))
    assert e["mae_mean"] == pytest.approx(1.25)
    assert e["mae_std"] == pytest.approx(math.sqrt(4.25 / 4))
    assert e["n_trajectories"] == 4


def test_spearman_by_hand():
    m, s, per_run = final_step_spearman(TRUE, PRED)
    # run 0: true finals (3, 4), predicted (4, 4): constant -> NaN, left out; run 1: (2, 1) vs (2, 4) -> -1
    assert math.isnan(per_run[0]) and per_run[1] == pytest.approx(-1.0)
    assert m == pytest.approx(-1.0) and s == pytest.approx(0.0)
    m, s, per_test = curriculum_spearman(TRUE, PRED)
    # test 0 across runs: true (3, 2), predicted (4, 2) -> +1; test 1: predicted (4, 4) constant -> NaN
    assert per_test[0] == pytest.approx(1.0) and math.isnan(per_test[1])
    assert m == pytest.approx(1.0)
    from scipy.stats import spearmanr

    x, y = [1, 2, 2, 3, 7], [1, 3, 2, 4, 0]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    assert spearman([1, nan, 3, 2], [1, 5, 3, 2]) == pytest.approx(1.0)
    allnan = np.full((2, 3, 2), 1.0)
    assert math.isnan(final_step_spearman(allnan, allnan)[0])


def test_mse_by_step_and_final_values_by_hand():
    np.testing.assert_allclose(mse_by_step(TRUE, PRED), [0.0, 5 / 3, 2.5])
    t = np.array([[[1.0], [2.0], [nan]]])
    p = np.array([[[1.0], [5.0], [9.0]]])
    tf, pf = final_values(t, p)  # the last *recorded* step of the trajectory
    assert tf[0, 0] == 2.0 and pf[0, 0] == 5.0
    t2 = np.array([[[1.0], [nan], [nan]]])
    tf, pf = final_values(t2, p)
    assert math.isnan(tf[0, 0]) and math.isnan(pf[0, 0])
    assert math.isnan(all_steps_errors(t2, p)["mse_mean"])
    with pytest.raises(InputError):
        trajectory_errors(TRUE, PRED[:, :2])


def test_split_shapes():
    ids = [f"r{i:02d}" for i in range(32)]
    s = split_runs(ids, seed=0)
    assert (len(s["fit"]), len(s["val"]), len(s["test"])) == (25, 2, 5)
    assert sorted(s["fit"] + s["val"] + s["test"]) == ids
    assert s == split_runs(ids, seed=0) and s != split_runs(ids, seed=1)
    for R, shape in [(16, (13, 1, 2)), (8, (5, 1, 2)), (64, (50, 4, 10)), (4, (1, 1, 2))]:
        s = split_runs(ids[:R] if R <= 32 else [f"x{i}" for i in range(R)], seed=3)
        assert (len(s["fit"]), len(s["val"]), len(s["test"])) == shape, R
    s = split_runs(ids[:10], seed=0, n_val=0, n_test=3)
    assert (len(s["fit"]), len(s["val"]), len(s["test"])) == (7, 0, 3)
    s = split_runs(ids[:6], fit=["r00", "r01"], val=["r02"], test=["r05"])
    assert s == {"fit": ["r00", "r01"], "val": ["r02"], "test": ["r05"]}
    s = split_runs(ids[:6], test=["r05", "r04"])
    assert s["test"] == ["r04", "r05"] and len(s["val"]) == 1 and len(s["fit"]) == 3
    with pytest.raises(InputError, match="not in the store"):
        split_runs(ids[:6], test=["zzz"])
    with pytest.raises(InputError, match="two splits"):
        split_runs(ids[:6], fit=["r00"], test=["r00"])
    with pytest.raises(InputError, match="no runs left"):
        split_runs(ids[:3])


SMALL = {"gptfluence": {"epochs": 3, "hidden": 8, "proj_dim": 4, "batch_size": 512}, "simfluence": {"epochs": 3}}


def test_evaluate_json_format(tmp_path):
    dyn, enc = synthetic_dynamics(n_runs=8, n_steps=15, n_train=30, n_test=10, dim=16, seed=1)
    res = evaluate(dyn, methods=["gptfluence", "simfluence", "constant", "mean_curve"], seed=0, configs=SMALL,
                   encoder=enc)
    res["results"][0]["curriculum_spearman_std"] = float("nan")  # NaN must become null
    out = write_results(res, tmp_path / "r.json", tmp_path / "r.md")
    d = json.loads(out.read_text())
    assert set(d) >= {"config", "split", "results", "trajectories"}
    assert set(d["split"]) == {"fit", "val", "test"} and len(d["split"]["test"]) == 2
    need = {"method", "task", "metric", "mse_mean", "mse_std", "mae_mean", "mae_std", "spearman_final_mean",
            "spearman_final_std", "curriculum_spearman_mean", "curriculum_spearman_std", "n_runs", "n_test_examples",
            "fit_seconds", "mse_by_step", "steps"}
    assert len(d["results"]) == 4
    for r in d["results"]:
        assert need <= set(r), need - set(r)
        assert r["task"] == "synthetic" and r["metric"] == "loss" and r["n_runs"] == 2 and r["n_test_examples"] == 10
        assert len(r["mse_by_step"]) == len(r["steps"]) == 16 and r["steps"][0] == 0
    assert d["results"][0]["curriculum_spearman_std"] is None
    assert len(d["trajectories"]) == 4 * 2
    t = d["trajectories"][0]
    assert set(t) >= {"method", "task", "metric", "run_id", "steps", "test_ids", "true", "predicted"}
    assert len(t["true"]) == len(t["predicted"]) == 16 and len(t["true"][0]) == 10
    assert t["true"][0] == t["predicted"][0]  # rollouts start from the true first value
    by = {r["method"]: r for r in d["results"]}
    assert by["constant"]["mse_mean"] > by["mean_curve"]["mse_mean"]
    # the fitting objective that ran (gptfluence's "auto" resolved for loss), none for unfitted methods
    assert by["gptfluence"]["objective"] == "teacher_forcing_then_rollout"
    assert by["simfluence"]["objective"] == "teacher_forcing" and by["mean_curve"]["objective"] is None
    md = (tmp_path / "r.md").read_text()
    assert md.count("\n") == 2 + 4 and "| synthetic | loss | gptfluence |" in md
    assert "n/a" in format_markdown(d)


def test_evaluate_imported_like_store_starts_at_step1():
    dyn, enc = synthetic_dynamics(n_runs=6, n_steps=10, n_train=20, n_test=5, dim=16, record_step0=False)
    res = evaluate(dyn, methods=["constant", "mean_curve"], split={"fit": dyn.run_ids[:3], "val": dyn.run_ids[3:4],
                                                                    "test": dyn.run_ids[4:]})
    r = res["results"][0]
    assert r["steps"][0] == 1 and r["first_step"] == 1 and len(r["steps"]) == 10


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a, _ = synthetic_dynamics(n_runs=6, n_steps=12, n_train=24, n_test=6, dim=16, seed=2, name="taskA")
    b, _ = synthetic_dynamics(n_runs=6, n_steps=12, n_train=24, n_test=6, dim=16, seed=4, name="taskB")
    return str(a.save(root / "a").root), str(b.save(root / "b").root)


def test_cli_fit_simulate_evaluate(tmp_path, stores, capsys):
    a, b = stores
    sim = tmp_path / "sim"
    flags = ["--encoder", "bow:16", "--epochs", "2", "--hidden", "8", "--proj-dim", "4", "--no-progress"]
    capsys.readouterr()
    assert main(["fit", a, "--method", "gptfluence", "--metric", "loss", "--out", str(sim), *flags]) == 0
    # no model in a synthetic store: A pooled (the default), B per pair (b_projection auto), lagged factors
    out = capsys.readouterr().out
    assert "then the A factors replaced by their mean over the training pool" in out
    assert "with lagged additive factors of the last 24 batches" in out
    assert (sim / "config.json").exists() and (sim / "weights.safetensors").exists()
    cfg = json.loads((sim / "config.json").read_text())
    assert cfg["config"]["hidden"] == 8 and cfg["method"] == "gptfluence" and cfg["encoder_spec"]["dim"] == 16
    assert main(["simulate", str(sim), "--dynamics", a, "--curriculum", "run-0001", "--out", str(tmp_path / "p.json")]) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    (c,) = p["curricula"]
    assert c["name"] == "run-0001" and len(c["steps"]) == 13 and len(c["predicted"]) == 13 and len(c["predicted"][0]) == 6
    cur = tmp_path / "cur.jsonl"
    cur.write_text('{"step": 1, "samples_id": [0, 1]}\n{"step": 2, "samples_id": [5]}\n')
    assert main(["simulate", str(sim), "--dynamics", a, "--curriculum", str(cur), "--test-ids", "1", "2",
                 "--out", str(tmp_path / "p.npy")]) == 0
    assert np.load(tmp_path / "p.npy").shape == (3, 2)
    capsys.readouterr()
    cur.write_text('{"step": 1, "samples_id": [0, 1]}\n{"step": 2, "samples_id": [500]}\n')
    assert main(["simulate", str(sim), "--dynamics", a, "--curriculum", str(cur), "--out", str(tmp_path / "q.json")]) == 2
    assert "unknown training id 500 (step 2)" in capsys.readouterr().err
    cur.write_text('{"step": 1, "samples_id": [0, 1]}\nnot json\n')
    assert main(["simulate", str(sim), "--dynamics", a, "--curriculum", str(cur), "--out", str(tmp_path / "q.json")]) == 2
    assert "cur.jsonl line 2" in capsys.readouterr().err
    # a simulator fitted on store a refuses store b (other examples)
    assert main(["simulate", str(sim), "--dynamics", b, "--curriculum", "run-0001", "--out", str(tmp_path / "q.json")]) == 2
    assert "other train examples" in capsys.readouterr().err
    assert main(["fit", a, "--method", "simfluence", "--hidden", "8", "--out", str(tmp_path / "s2")]) == 2
    assert "--hidden does not apply" in capsys.readouterr().err

    out = tmp_path / "ev.json"
    assert main(["evaluate", a, b, "--methods", "gptfluence", "simfluence", "constant", "mean_curve",
                 "--metrics", "loss", "--out", str(out), "--markdown", str(tmp_path / "ev.md"), "--seed", "1",
                 *flags]) == 0
    printed = capsys.readouterr().out
    assert "| taskA | loss | gptfluence |" in printed and "| taskB | loss | mean_curve |" in printed
    d = json.loads(out.read_text())
    assert len(d["results"]) == 8 and set(d["splits"]) == {"taskA", "taskB"}
    assert d["config"]["method_configs"]["gptfluence"]["epochs"] == 2


def test_markdown_marks_fits_that_kept_untrained_weights():
    from gptfluence.analysis.evaluate import format_markdown

    rec = dict(task="t", metric="loss", mse_mean=1.0, mse_std=0.0, mae_mean=1.0, mae_std=0.0,
               spearman_final_mean=0.5, spearman_final_std=0.0, curriculum_spearman_mean=None,
               curriculum_spearman_std=None, n_runs=2, n_test_examples=3, fit_seconds=0.1)
    md = format_markdown({"results": [dict(rec, method="simfluence", best_epoch=0),
                                      dict(rec, method="gptfluence", best_epoch=7),
                                      dict(rec, method="constant", best_epoch=None),
                                      dict(rec, method="mean_curve", mse_mean=4.0, best_epoch=None)]})
    assert "| simfluence † |" in md and "| gptfluence |" in md and "| constant |" in md
    assert "| 1 ± 0 | 0.250 |" in md and "| 4 ± 0 | 1.000 |" in md  # MSE ÷ mean curve
    assert "kept the initial (untrained) weights" in md


def test_evaluate_records_equal_the_metric_functions_on_its_own_trajectories():
    dyn, enc = synthetic_dynamics(n_runs=9, n_steps=12, n_train=30, n_test=8, dim=16, seed=6)
    res = evaluate(dyn, methods=["simfluence", "constant", "mean_curve"], seed=1, configs={"simfluence": {"epochs": 3}},
                   n_test=3)
    test_runs = res["split"]["test"]
    assert len(res["results"]) == 3
    for rec in res["results"]:
        trs = {t["run_id"]: t for t in res["trajectories"] if (t["method"], t["metric"]) == (rec["method"], rec["metric"])}
        true = np.array([trs[r]["true"] for r in test_runs], dtype=float)  # [R, S, M], rounded to 1e-6
        pred = np.array([trs[r]["predicted"] for r in test_runs], dtype=float)
        d = pred[:, 1:] - true[:, 1:]  # every value is recorded here: plain means over steps 1..S-1
        mse, mae = (d ** 2).mean(1), np.abs(d).mean(1)  # per trajectory [R, M]
        want = {"mse_mean": mse.mean(), "mse_std": mse.std(), "mae_mean": mae.mean(), "mae_std": mae.std(),
                "n_trajectories": mse.size}
        got = all_steps_errors(true, pred)
        assert {k: got[k] for k in want} == pytest.approx(want) and got.get("n_nonfinite", 0) == 0
        want["spearman_final_mean"], want["spearman_final_std"], _ = final_step_spearman(true, pred)
        want["curriculum_spearman_mean"], want["curriculum_spearman_std"], _ = curriculum_spearman(true, pred)
        for k, v in want.items():
            assert rec[k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (rec["method"], k)
        np.testing.assert_allclose(rec["mse_by_step"], mse_by_step(true, pred), rtol=1e-4, atol=1e-9)
        # the fields differ from each other here, so a swapped field cannot pass
        assert len({round(want[k], 6) for k in ("mse_mean", "mae_mean", "spearman_final_mean")}) == 3
    by = {r["method"]: r for r in res["results"]}
    assert by["simfluence"]["spearman_final_mean"] != pytest.approx(by["simfluence"]["curriculum_spearman_mean"])
