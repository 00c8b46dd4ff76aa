"""Bad input and faults, as a new user meets them: one-line errors or correct results, nothing
written outside the output folder, nothing deleted that the command did not create."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gptfluence.cli import main
from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.errors import InputError
from gptfluence.simulators.synthetic import synthetic_dynamics

FAST = ["--encoder", "bow:16", "--epochs", "2", "--hidden", "8", "--proj-dim", "4", "--no-progress"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (a snapshot to compare before / after)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A saved synthetic store: 6 runs of 8 steps, 24 training / 5 test examples."""
    root = tmp_path_factory.mktemp("hard") / "proj" / "dyn"
    dyn, _ = synthetic_dynamics(n_runs=6, n_steps=8, n_train=24, n_test=5, dim=16, seed=3, name="hard")
    dyn.save(root)
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# 1. data loss ----------------------------------------------------------------------------------

def test_fit_never_deletes_or_writes_into_its_input(store, tmp_path, capsys):
    proj = store.parent
    before = tree(proj)
    for out in (proj, store, store / "sims"):  # the folder holding the store, the store, inside it
        rc, _, err = run_cli(["fit", store, "--method", "mean_curve", "--out", out], capsys)
        assert rc == 2 and "the input" in err and err.count("\n") == 1, err
        rc, _, err = run_cli(["fit", store, "--method", "mean_curve", "--out", out, "--overwrite"], capsys)
        assert rc == 2 and "the input" in err
    assert tree(proj) == before


def test_fit_into_a_foreign_folder_needs_overwrite_and_then_touches_nothing_else(store, tmp_path, capsys):
    other = tmp_path / "mine"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("keep me")
    (other / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(other)
    rc, _, err = run_cli(["fit", store, "--method", "mean_curve", "--out", other], capsys)
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert tree(other) == before
    rc, _, _ = run_cli(["fit", store, "--method", "mean_curve", "--out", other, "--overwrite"], capsys)
    assert rc == 0
    after = tree(other)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"config.json", "weights.safetensors"}
    # an existing simulator is replaced without --overwrite (same kind of artifact)
    rc, _, _ = run_cli(["fit", store, "--method", "constant", "--out", other], capsys)
    assert rc == 0 and json.loads((other / "config.json").read_text())["method"] == "constant"
    assert (other / "notes.txt").read_text() == "keep me"


def test_export_and_import_refuse_their_input_and_keep_foreign_files(store, tmp_path, capsys):
    rc, _, err = run_cli(["export-gptdynamics", store, store, "--overwrite"], capsys)
    assert rc == 2 and "input" in err
    rc, _, err = run_cli(["export-gptdynamics", store, store / "exp"], capsys)
    assert rc == 2 and "input" in err
    out = tmp_path / "exp"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    rc, _, err = run_cli(["export-gptdynamics", store, out], capsys)
    assert rc == 2 and "--overwrite" in err
    assert run_cli(["export-gptdynamics", store, out, "--overwrite"], capsys)[0] == 0
    assert run_cli(["export-gptdynamics", store, out, "--overwrite"], capsys)[0] == 0  # replaces its own files
    assert (out / "README.txt").read_text() == "mine"
    rc, _, err = run_cli(["import-gptdynamics", out, out / "store"], capsys)
    assert rc == 2 and "input" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    rc, _, err = run_cli(["import-gptdynamics", out, taken], capsys)
    assert rc == 2 and "not empty" in err and (taken / "x").read_text() == "x"


# 2. ids that become paths --------------------------------------------------------------------

@pytest.mark.parametrize("rid", ["../../evil", "/tmp/abs-evil", "a/b", ".hidden", ""])
def test_run_ids_that_would_escape_the_store_are_refused_before_anything_is_written(tmp_path, capsys, rid):
    cur = tmp_path / "cur.jsonl"
    cur.write_text(json.dumps({"run_id": rid, "curriculum": [[0, 1], [2, 3]]}) + "\n")
    out = tmp_path / "a" / "store"
    rc, _, err = run_cli(["collect", "--task", "sentiment", "--n-train", "20", "--n-test", "4", "--curriculum-file",
                          cur, "--out", out, "--quiet"], capsys)
    assert rc == 2 and "cur.jsonl line 1" in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cur.jsonl"]
    assert not Path("/tmp/abs-evil").exists()


def test_store_refuses_unsafe_run_ids(store, tmp_path):
    dyn = Dynamics.open(store)
    run = dyn.run(dyn.run_ids[0])
    for rid in ("../x", "a/b"):
        with pytest.raises(InputError, match="cannot be used as a file name"):
            dyn.stage_run(rid)
    assert run.run_id in dyn.run_ids


# 3. worker processes die with their parent; SIGTERM is handled like Ctrl-C ---------------------

def test_workers_die_when_their_parent_is_killed(tmp_path):
    """A parent SIGKILLed while its (spawned) worker runs: the worker exits within seconds."""
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import multiprocessing as mp, os, time
        from gptfluence.dynamics.collect import die_with_parent

        def work(parent):
            die_with_parent(parent, poll_seconds=0.1)
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=work, args=(os.getpid(),))
            p.start()
            time.sleep(120)
    """)
    (tmp_path / "parent.py").write_text(script)  # spawn re-imports __main__: a file, not -c
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(300):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the worker outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sigterm_exits_like_ctrl_c_with_a_message(tmp_path):
    """SIGTERM during a command: a one-line message and exit code 143 (not a bare -15)."""
    script = textwrap.dedent("""
        import argparse, sys, time
        from gptfluence import cli

        def slow(args):
            print("started", flush=True)
            time.sleep(60)
            return 0

        sys.exit(cli.run_command(argparse.Namespace(func=slow, command="collect")))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err


# 4. simulate on degenerate curricula ---------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    sim = tmp_path_factory.mktemp("sim") / "gf"
    assert main(["fit", str(store), "--method", "gptfluence", "--out", str(sim), *FAST]) == 0
    return sim


def test_simulate_padding_only_and_empty_curricula(store, fitted, tmp_path, capsys):
    pad = tmp_path / "pad.json"
    pad.write_text("[[-1, -1, -1, -1]]")
    rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", pad, "--out", tmp_path / "p.json"],
                         capsys)
    assert rc == 0, err
    (c,) = json.loads((tmp_path / "p.json").read_text())["curricula"]
    start = Dynamics.open(store).run(Dynamics.open(store).run_ids[0]).values["loss"][0]
    # no example trained on: the detrended simulator follows the fit runs' mean trajectory
    assert len(c["predicted"]) == 2 and np.allclose(c["predicted"][0], start, atol=1e-5)
    for arr in (np.zeros((0, 4), np.int64), np.zeros((3, 0), np.int64)):
        np.save(tmp_path / "e.npy", arr)
        rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", tmp_path / "e.npy", "--out",
                              tmp_path / "q.json"], capsys)
        assert rc == 2 and "e.npy" in err and "non-empty [steps, batch]" in err and "Traceback" not in err


def test_simulate_outputs_csv_and_refuses_unknown_suffixes(store, fitted, tmp_path, capsys):
    cur = tmp_path / "two.jsonl"
    cur.write_text(json.dumps({"run_id": "a", "curriculum": [[0, 1], [2, 3]]}) + "\n"
                   + json.dumps({"run_id": "b", "curriculum": [[4, 5], [6, 7], [8, 9]]}) + "\n")
    rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", cur, "--out", tmp_path / "x.csv"], capsys)
    assert rc == 0, err
    lines = (tmp_path / "x.csv").read_text().splitlines()
    assert lines[0] == "curriculum,step,test_id,predicted_loss" and len(lines) == 1 + (3 + 4) * 5
    assert lines[1].startswith("a,0,") and lines[-1].startswith("b,3,")
    rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", cur, "--out", tmp_path / "x.txt"], capsys)
    assert rc == 2 and ".json or .npy or .csv" in err


# 5. influence on a held-out run with training ids no fit run used ----------------------------

def test_influence_on_a_run_with_unseen_training_ids(tmp_path, capsys):
    dyn, _ = synthetic_dynamics(n_runs=5, n_steps=4, n_train=200, n_test=3, dim=16, seed=5, name="unseen")
    runs = dyn.runs()
    held = runs[-1]
    used = set(np.unique(np.concatenate([r.curriculum.ravel() for r in runs[:-1]])).tolist())
    fresh = [i for i in range(200) if i not in used]
    assert fresh, "the synthetic pool should have ids no fit run uses"
    cur = held.curriculum.copy()
    cur[0, 0] = fresh[0]
    held = Run(held.run_id, cur, held.steps, held.test_ids, held.values, seed=held.seed)
    d2 = Dynamics(dyn.task, runs[:-1] + [held])
    d2.manifest["metrics"] = ["loss"]
    d2.save(tmp_path / "s")
    sim = tmp_path / "sim"
    assert main(["fit", str(tmp_path / "s"), "--method", "gptfluence", "--out", str(sim), "--fit-runs",
                 *[r.run_id for r in runs[:3]], "--val-runs", runs[3].run_id, *FAST]) == 0
    rc, _, err = run_cli(["influence", sim, "--dynamics", tmp_path / "s", "--run", held.run_id, "--out",
                          tmp_path / "i.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "i.json").read_text())["reports"][0]
    assert rep["run_id"] == held.run_id and rep["test_examples"]


# 6. nothing dropped silently -----------------------------------------------------------------

def test_a_run_folder_without_run_json_is_an_error_not_a_silent_drop(store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    rid = Dynamics.open(copy).run_ids[2]
    (copy / "runs" / rid / "run.json").unlink()
    with pytest.raises(InputError, match=f"{rid}: a folder without run.json"):
        Dynamics.open(copy)
    rc, _, err = run_cli(["evaluate", copy, "--methods", "mean_curve", "--out", tmp_path / "e.json"], capsys)
    assert rc == 2 and rid in err


def _export(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "gd"
    assert main(["export-gptdynamics", str(store), str(out)]) == 0
    return out


def test_import_rejects_what_it_used_to_drop_or_accept(store, tmp_path, capsys):
    from gptfluence.dynamics.gptdynamics import import_gptdynamics

    out = _export(store, tmp_path)
    run_dir = sorted((out / "runs").iterdir())[0]
    traj = run_dir / "all_loss_trajectory.out"
    good = traj.read_text()
    cases = {
        "negative": (good.replace('"loss": ', '"loss": -', 1), "must lie in [0, inf]"),
        "infinity": (good.replace('"loss": ', '"loss": Infinity, "x": ', 1), "not a finite loss value"),
        "empty": ("", "no trajectories"),
    }
    for name, (text, msg) in cases.items():
        traj.write_text(text)
        with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            import_gptdynamics(out, tmp_path / f"imp-{name}")
        assert not (tmp_path / f"imp-{name}").exists()
    traj.write_text(good)
    (run_dir / "train_samples_id.json").rename(run_dir / "moved.json")
    with pytest.raises(InputError, match="run folder without train_samples_id.json"):
        import_gptdynamics(out, tmp_path / "imp-nocur")
    (run_dir / "moved.json").rename(run_dir / "train_samples_id.json")
    # NaN stays "not recorded" and the summary says how many
    lines = good.splitlines()
    first = json.loads(lines[0])
    first["loss_trajectory"][0]["loss"] = float("nan")
    traj.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    rc, printed, err = run_cli(["import-gptdynamics", out, tmp_path / "imp-nan"], capsys)
    assert rc == 0, err
    assert "1 records whose value was NaN" in printed


# 7. messages -----------------------------------------------------------------------------------

def test_non_utf8_files_are_named(store, fitted, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"run_id": "a", "curriculum": [[1]]}\n{"run_id": "caf\xe9"}\n'.encode("latin-1"))
    rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", bad, "--out", tmp_path / "o.json"],
                         capsys)
    assert rc == 2 and "latin1.jsonl: not UTF-8" in err
    out = _export(store, tmp_path)
    texts = out / "texts" / "train.jsonl"
    texts.write_bytes(texts.read_bytes().replace(b"\n", b"\xe9\n", 2))
    rc, _, err = run_cli(["import-gptdynamics", out, tmp_path / "imp"], capsys)
    assert rc == 2 and "train.jsonl line 1: not UTF-8" in err
    j = tmp_path / "latin1.json"
    j.write_bytes(b'[[1, 2]] \xff')
    rc, _, err = run_cli(["simulate", fitted, "--dynamics", store, "--curriculum", j, "--out", tmp_path / "o.json"],
                         capsys)
    assert rc == 2 and "latin1.json: not UTF-8" in err


def test_flags_are_checked_and_messages_name_flags(store, tmp_path, capsys):
    rc, _, err = run_cli(["evaluate", store, "--metrics", "bleu", "--methods", "mean_curve", "--out",
                          tmp_path / "e.json"], capsys)
    assert rc == 2 and "nothing to evaluate" in err and "bleu" in err and "records loss" in err
    rc, _, err = run_cli(["fit", store, "--method", "gptfluence", "--lr", "0", "--out", tmp_path / "s"], capsys)
    assert rc == 2 and "--lr (lr) must be a number > 0" in err
    rc, _, err = run_cli(["fit", store, "--method", "mean_curve", "--threads", "0", "--out", tmp_path / "s"], capsys)
    assert rc == 2 and "--threads must be >= 1" in err
    rc, _, err = run_cli(["collect", "--task", "sentiment", "--workers", "-2", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "--workers must be >= 0" in err
    rc, _, err = run_cli(["evaluate", store, "--methods", "mean_curve", "--n-test", "3", "--n-val", "3", "--out",
                          tmp_path / "e.json"], capsys)
    assert rc == 2 and "no runs left to fit" in err and "--fit-runs" in err
    rc, _, err = run_cli(["demo", "--scale", "tiny", "--split-test", "5", "--runs", "3", "--out", tmp_path / "d",
                          "--quiet"], capsys)
    assert rc == 2 and "--runs 3 leaves no run to fit" in err
    assert not (tmp_path / "d").exists()
    rc, _, err = run_cli(["export-gptdynamics", store, tmp_path / "x"], capsys)
    rc, _, err = run_cli(["export-gptdynamics", store, tmp_path / "x"], capsys)
    assert rc == 2 and "--overwrite" in err and "overwrite=True" not in err


def test_a_failed_first_collect_does_not_block_the_corrected_retry(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "cache"))
    tiny = ["--task", "sentiment", "--n-train", "8", "--n-test", "3", "--examples-per-run", "4", "--batch-size", "2",
            "--epochs", "1", "--gen-every", "0", "--model-layers", "1", "--model-hidden", "16",
            "--model-pretrain-steps", "2", "--runs", "1", "--workers", "1", "--quiet", "--out", tmp_path / "s"]
    rc, _, err = run_cli(["collect", *tiny, "--model", str(tmp_path / "no-such-model")], capsys)
    assert rc == 2 and "no-such-model" in err
    rc, printed, err = run_cli(["collect", *tiny], capsys)
    assert rc == 0, err
    assert len(Dynamics.open(tmp_path / "s")) == 1
