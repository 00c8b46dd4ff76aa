"""gptfluence.dynamics.collect and ``gptfluence collect``: determinism, store content, resume after
a hard kill / Ctrl-C, clean errors, checkpoint captures (tiny base model in a tmp cache)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_COLLECT, collect_cli_flags, private_model_cache
from gptfluence.dynamics.collect import CheckpointCapture, CollectConfig, collect, load_task_for, model_spec, plan_runs
from gptfluence.dynamics.store import STAGING_PREFIX, Dynamics
from gptfluence.errors import ArtifactMismatchError, InputError

TINY = TINY_COLLECT
SENT = CollectConfig(task="sentiment", **TINY)
D2T = CollectConfig(task="data2text", **TINY)
KILL_RUNS = 8  # runs of the reference collection and of the interrupted CLI collections


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private GPTFLUENCE_CACHE for this module; one tiny base model serves SENT and D2T."""
    with private_model_cache(tmp_path_factory, "collect-cache", SENT) as root:
        yield root


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted in-process collection of SENT (the reference for every comparison)."""
    return collect(SENT, tmp_path_factory.mktemp("ref") / "store", runs=KILL_RUNS, workers=1, progress=False,
                   log=lambda s: None)


def assert_same_runs(a: Dynamics, b: Dynamics) -> None:
    """Every run of ``b`` equals the run of the same id in ``a`` (bitwise)."""
    ids = b.run_ids
    assert ids
    for rid in ids:
        ra, rb = a.run(rid), b.run(rid)
        assert np.array_equal(ra.curriculum, rb.curriculum), rid
        assert np.array_equal(ra.steps, rb.steps), rid
        assert np.array_equal(ra.test_ids, rb.test_ids), rid
        assert np.array_equal(ra.lr, rb.lr), rid
        assert ra.seed == rb.seed, rid
        assert ra.metrics == rb.metrics, rid
        for m in ra.metrics:
            va, vb = ra.values[m], rb.values[m]
            assert va.dtype == vb.dtype and va.shape == vb.shape
            # bitwise: compare the raw bytes (NaN patterns included)
            assert va.tobytes() == vb.tobytes(), f"{rid} {m}: max |diff| {np.nanmax(np.abs(va - vb))}"


# ---------------------------------------------------------------------------------------------
# 1. determinism


def test_same_config_twice_and_any_worker_count_give_bitwise_equal_runs(ref, tmp_path):
    again = collect(SENT, tmp_path / "again", runs=KILL_RUNS, workers=1, progress=False, log=lambda s: None)
    assert again.run_ids == ref.run_ids == [f"run-{r:04d}" for r in range(KILL_RUNS)]
    assert_same_runs(ref, again)
    # two worker processes (spawned, one torch thread each): the same values as one in-process worker
    par = collect(SENT, tmp_path / "par", runs=4, workers=2, progress=False, log=lambda s: None)
    assert par.run_ids == ref.run_ids[:4]
    assert_same_runs(ref, par)


# ---------------------------------------------------------------------------------------------
# 2. what the store holds


def test_sentiment_store_content(ref):
    task = load_task_for(SENT)
    plan = plan_runs(SENT, task, KILL_RUNS)
    assert ref.metrics == ["loss", "accuracy"]
    assert ref.task.kind == "classification"
    assert np.array_equal(ref.test_ids, [e.id for e in task.test]) and len(ref.test_ids) == SENT.n_test
    assert np.array_equal(ref.train_ids, [e.id for e in task.train]) and len(ref.train_ids) == SENT.n_train
    assert ref.manifest["config"]["lr"] == SENT.lr and "device" not in ref.manifest["config"]
    T = SENT.examples_per_run // SENT.batch_size * SENT.epochs
    for (rid, seed, cur), run in zip(plan, ref.runs()):
        assert run.run_id == rid and run.seed == seed
        assert np.array_equal(run.curriculum, cur) and run.curriculum.shape == (T, SENT.batch_size)
        assert len(set(run.curriculum.ravel().tolist())) == SENT.examples_per_run  # a subset, each once per epoch
        assert np.array_equal(run.steps, np.arange(T + 1))
        assert np.array_equal(run.test_ids, ref.test_ids)
        loss = run.values["loss"]
        assert loss.shape == (T + 1, SENT.n_test) and np.all(np.isfinite(loss)) and np.all(loss > 0)
        acc = run.values["accuracy"]
        assert acc.shape == loss.shape and set(np.unique(acc).tolist()) <= {0.0, 1.0}
        assert run.lr is not None and run.lr.shape == (T,) and np.allclose(run.lr, SENT.lr)  # constant schedule
        assert run.config["lr"] == SENT.lr and run.config["batch_size"] == SENT.batch_size
    # training moves the loss (the runs are not no-ops), and different curricula give different dynamics
    r0, r1 = ref.run("run-0000"), ref.run("run-0001")
    assert not np.array_equal(r0.values["loss"][0], r0.values["loss"][-1])
    assert np.array_equal(r0.values["loss"][0], r1.values["loss"][0])  # same initial model
    assert not np.array_equal(r0.values["loss"][-1], r1.values["loss"][-1])


def test_data2text_store_content_and_lr_schedule(tmp_path):
    cfg = dataclasses.replace(D2T, lr_schedule="linear", warmup_steps=1, epochs=2)
    store = collect(cfg, tmp_path / "d2t", runs=1, workers=1, progress=False, log=lambda s: None)
    task = load_task_for(cfg)
    assert store.metrics == ["loss", "bleu", "rougeL"] and store.task.kind == "generation"
    run = store.run("run-0000")
    T = 4
    assert np.array_equal(run.curriculum, plan_runs(cfg, task, 1)[0][2])
    assert np.array_equal(run.test_ids, [e.id for e in task.test])
    assert np.array_equal(run.steps, np.arange(T + 1))
    assert np.all(np.isfinite(run.values["loss"])) and np.all(run.values["loss"] > 0)
    bleu, rouge = run.values["bleu"], run.values["rougeL"]
    assert bleu.shape == rouge.shape == (T + 1, cfg.n_test)
    assert not np.isnan(bleu).any() and not np.isnan(rouge).any()  # gen_every=1: every step
    assert np.all((bleu >= 0) & (bleu <= 100)) and np.all((rouge >= 0) & (rouge <= 1))
    # warmup 1 step then linear decay to 0 at T: factors 1/2, 1, 2/3, 1/3
    assert np.allclose(run.lr, cfg.lr * np.array([0.5, 1.0, 2 / 3, 1 / 3]))


def test_generation_metrics_follow_gen_every(tmp_path):
    cfg = dataclasses.replace(SENT, epochs=2, gen_every=3)  # T = 4: recorded at 0, 3 and T
    run = collect(cfg, tmp_path / "s", runs=1, workers=1, progress=False, log=lambda s: None).run("run-0000")
    recorded = ~np.isnan(run.values["accuracy"]).all(axis=1)
    assert recorded.tolist() == [True, False, False, True, True]
    assert not np.isnan(run.values["accuracy"][recorded]).any()
    assert np.all(np.isfinite(run.values["loss"]))  # loss at every step
    off = collect(dataclasses.replace(SENT, gen_every=0), tmp_path / "off", runs=1, workers=1, progress=False,
                  log=lambda s: None)
    assert off.metrics == ["loss"] and off.run("run-0000").metrics == ["loss"]


# ---------------------------------------------------------------------------------------------
# 3./4. interrupted CLI collections


def _cli(out: Path, runs: int = KILL_RUNS) -> list[str]:
    return [sys.executable, "-m", "gptfluence", "collect", "--out", str(out), "--runs", str(runs),
            "--workers", "1", "--quiet", *collect_cli_flags(SENT)]


def _names(runs_dir: Path) -> tuple[list[str], list[str]]:
    try:
        names = [p.name for p in runs_dir.iterdir()]
    except FileNotFoundError:
        return [], []
    return sorted(n for n in names if not n.startswith(".")), sorted(n for n in names if n.startswith(STAGING_PREFIX))


def _start_and_signal(out: Path, sig: int, cwd: Path, workers: int = 1) -> tuple[subprocess.Popen, list[str]]:
    """Start the CLI; send ``sig`` once >= 1 run is committed while the next one is being written.

    With ``workers`` > 1 the signal goes to the whole process group, as a terminal's Ctrl-C does."""
    cmd = _cli(out)
    cmd[cmd.index("--workers") + 1] = str(workers)
    # SIGINT back to default in the child: a test run started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                         start_new_session=workers > 1)
    deadline = time.monotonic() + 240  # generous: a loaded 2-core machine starts Python + torch slowly
    try:
        while True:
            done, staging = _names(out / "runs")
            if done and staging:
                if workers > 1:
                    os.killpg(p.pid, sig)
                else:
                    p.send_signal(sig)
                return p, done
            if p.poll() is not None:
                pytest.fail(f"collect ended (rc {p.returncode}) before it could be interrupted:\n{p.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("collect did not commit a run within 240 s")
            time.sleep(0.005)
    except BaseException:
        if p.poll() is None:
            p.kill()
        raise


def test_resume_after_sigkill_equals_uninterrupted_collection(ref, tmp_path):
    out = tmp_path / "store"
    p, _ = _start_and_signal(out, signal.SIGKILL, tmp_path)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    done, staging = _names(out / "runs")
    assert 1 <= len(done) < KILL_RUNS
    # only committed runs are visible and each is complete; the staging folder (if any) is ignored
    partial = Dynamics.open(out)
    assert partial.run_ids == done == ref.run_ids[:len(done)]
    assert_same_runs(ref, partial)
    assert not any(rid.startswith(".") for rid in partial.run_ids)

    res = subprocess.run(_cli(out), cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {len(done)} of {KILL_RUNS} runs already in" in res.stdout
    if staging:
        assert f"removed {len(staging)} unfinished run folder(s)" in res.stdout
    assert "Traceback" not in res.stderr
    assert _names(out / "runs")[1] == []  # no staging folder left
    final = Dynamics.open(out)
    assert final.run_ids == ref.run_ids
    assert_same_runs(ref, final)
    assert final.manifest["config"] == ref.manifest["config"]
    # a third call has nothing to do
    res = subprocess.run(_cli(out), cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"resuming: {KILL_RUNS} of {KILL_RUNS} runs" in res.stdout


def test_ctrl_c_exits_130_cleanly_and_keeps_finished_runs(ref, tmp_path):
    out = tmp_path / "store"
    p, done_before = _start_and_signal(out, signal.SIGINT, tmp_path)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "gptfluence collect: interrupted; finished work is saved" in err
    done, staging = _names(out / "runs")
    assert staging == []  # the run in progress was discarded on the way out
    assert set(done_before) <= set(done) and len(done) < KILL_RUNS
    kept = Dynamics.open(out)
    assert kept.run_ids == done == ref.run_ids[:len(done)]
    assert_same_runs(ref, kept)


def test_ctrl_c_with_worker_processes_exits_130_cleanly(ref, tmp_path):
    out = tmp_path / "store"
    p, done_before = _start_and_signal(out, signal.SIGINT, tmp_path, workers=2)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "gptfluence collect: interrupted; finished work is saved" in err
    kept = Dynamics.open(out)
    assert set(done_before) <= set(kept.run_ids) and len(kept) < KILL_RUNS
    assert_same_runs(ref, kept)


# ---------------------------------------------------------------------------------------------
# 5. errors and explicit curricula


def _main(args: list[str]) -> int:
    from gptfluence.cli import main

    return main(["collect", "--workers", "1", "--quiet", *args])


def test_other_config_into_existing_store_is_refused(ref, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(ref.root, store)
    with pytest.raises(ArtifactMismatchError, match=r"fields differ: lr\b"):
        collect(dataclasses.replace(SENT, lr=1e-3), store, runs=1, workers=1, progress=False)
    with pytest.raises(ArtifactMismatchError, match=r"fields differ: batch_size, epochs\b"):
        collect(dataclasses.replace(SENT, epochs=2, batch_size=2), store, runs=1, workers=1, progress=False)
    capsys.readouterr()
    rc = _main(["--out", str(store), *collect_cli_flags(dataclasses.replace(SENT, lr=1e-3))])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptfluence collect: error: ")
    assert "fields differ: lr" in lines[0] and str(store / "manifest.json") in lines[0]
    assert "Traceback" not in cap.err
    assert Dynamics.open(store).run_ids == ref.run_ids  # untouched


def test_examples_per_run_larger_than_pool_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(InputError, match="--examples-per-run 20 exceeds the pool size --n-train 16"):
        collect(dataclasses.replace(SENT, examples_per_run=20), tmp_path / "a", runs=1, workers=1, progress=False)
    rc = _main(["--out", str(tmp_path / "b"), *collect_cli_flags(dataclasses.replace(SENT, examples_per_run=20))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == "gptfluence collect: error: --examples-per-run 20 exceeds the pool size --n-train 16"
    assert not (tmp_path / "b").exists()


def test_curriculum_file_with_unknown_id_names_file_line_and_id(tmp_path, capsys):
    cur = tmp_path / "curricula.jsonl"
    cur.write_text(json.dumps({"run_id": "a", "curriculum": [[0, 1], [2, 3]]}) + "\n"
                   + json.dumps({"run_id": "b", "curriculum": [[4, 999]]}) + "\n")
    rc = _main(["--out", str(tmp_path / "s"), "--curriculum-file", str(cur), *collect_cli_flags(SENT)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gptfluence collect: error: ")
    assert f"{cur} line 2" in err[0] and "999" in err[0] and "unknown training id" in err[0]


def test_explicit_curriculum_file(tmp_path, capsys):
    cur = tmp_path / "curricula.jsonl"
    curricula = {"alpha": [[3, 1, 4, 15], [5, 9]], "beta": [[2, 6, 5, 3], [5, 8, 9, 7], [0, 0]]}
    cur.write_text("".join(json.dumps({"run_id": k, "curriculum": v}) + "\n" for k, v in curricula.items()))
    out = tmp_path / "s"
    rc = _main(["--out", str(out), "--curriculum-file", str(cur), *collect_cli_flags(SENT)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "2 runs of task 'sentiment'" in cap.out
    store = Dynamics.open(out)
    assert store.run_ids == ["alpha", "beta"]
    for r, (rid, rows) in enumerate(curricula.items()):
        run = store.run(rid)
        want = np.array([row + [-1] * (4 - len(row)) for row in rows])
        assert np.array_equal(run.curriculum, want)
        assert run.seed == SENT.run_seed + r
        assert np.array_equal(run.steps, np.arange(len(rows) + 1))
        assert np.all(np.isfinite(run.values["loss"]))
    assert json.loads((out / "collect_config.json").read_text())["curriculum_file"] == str(cur)


# ---------------------------------------------------------------------------------------------
# 6. hooks


def test_checkpoint_capture_writes_into_committed_run(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gptfluence.lm import load_model

    cfg = dataclasses.replace(SENT, epochs=2, capture_every=2)  # T = 4
    store = collect(cfg, tmp_path / "s", runs=1, workers=1, progress=False, log=lambda s: None)
    run = store.run("run-0000")
    cap = tmp_path / "s" / "runs" / "run-0000" / "captures"
    names = sorted(p.name for p in cap.iterdir())
    assert names == [f"checkpoint_step{s:06d}.safetensors" for s in (0, 2, 4)]
    assert _names(tmp_path / "s" / "runs")[1] == []
    for s in (0, 2, 4):
        with safe_open(str(cap / f"checkpoint_step{s:06d}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["step"] == str(s)
        want = cfg.lr if s == 0 else run.lr[s - 1]
        assert float(meta["lr"]) == pytest.approx(want)
    name, base = model_spec(cfg)
    model, _ = load_model(name, base_config=base, progress=False)
    init = {k: v.detach() for k, v in model.state_dict().items()}
    first, last = load_file(str(cap / "checkpoint_step000000.safetensors")), load_file(str(cap / "checkpoint_step000004.safetensors"))
    assert set(first) == set(init)
    assert all(np.array_equal(first[k].numpy(), init[k].numpy()) for k in init)  # step 0 = base model
    assert any(not np.array_equal(first[k].numpy(), last[k].numpy()) for k in init)  # trained


def test_checkpoint_capture_schedule():
    def no_write():
        pytest.fail("an off-schedule step must not touch the captures folder")

    for step in (1, 2, 4, 5):
        CheckpointCapture(3)(step, None, 0.1, no_write)
    CheckpointCapture(0)(0, None, 0.1, no_write)


def test_curriculum_file_ignores_examples_per_run(tmp_path):
    cur = tmp_path / "c.jsonl"
    cur.write_text(json.dumps({"run_id": "a", "curriculum": [[0, 1], [2, 3]]}) + "\n")
    cfg = dataclasses.replace(SENT, examples_per_run=CollectConfig().examples_per_run, curriculum_file=str(cur))
    store = collect(cfg, tmp_path / "s", runs=1, workers=1, progress=False, log=lambda s: None)
    assert store.run_ids == ["a"]


def test_invalid_settings_fail_before_the_store_exists(tmp_path, capsys):
    """A bad flag or curriculum must not lock a config into a new store: fixing it just works."""
    bad_cur = tmp_path / "c.jsonl"
    bad_cur.write_text(json.dumps({"run_id": "a", "curriculum": [[0, 999]]}) + "\n")
    for flags, msg in ((["--lr-schedule", "cosine"], "--lr-schedule must be 'constant' or 'linear'"),
                       (["--batch-size", "0"], "--batch-size must be >= 1"),
                       (["--curriculum-file", str(bad_cur)], "unknown training id 999")):
        out = tmp_path / f"s{len(flags)}{flags[0]}"
        assert _main(["--out", str(out), *collect_cli_flags(SENT), *flags]) == 2
        assert msg in capsys.readouterr().err
        assert not (out / "manifest.json").exists()


def test_worker_start_failure_is_a_clean_error(tmp_path, capsys):
    """A model that cannot load in the worker processes ends with one error line, not a broken pool."""
    from gptfluence.cli import main

    missing = tmp_path / "no-such-model"
    rc = main(["collect", "--workers", "2", "--quiet", "--runs", "2", "--out", str(tmp_path / "s"),
               *collect_cli_flags(SENT), "--model", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "gptfluence collect: error:" in err
    assert str(missing) in err or "no-such-model" in err


def test_loss_gradient_features_preserve_gradient_inner_products(ref, monkeypatch):
    """Projected target-loss gradients of the store's base model: their inner products match the
    exact gradients' (computed here by hand) up to the Johnson-Lindenstrauss error; the spec names
    the model; a missing base model is a clean error naming it."""
    import numpy as np
    import torch

    from gptfluence.features import LossGradientEncoder
    from gptfluence.lm import load_model, tokenize_examples
    from gptfluence.lm.metrics import masked_target_loss

    enc = LossGradientEncoder.for_dynamics(ref, dim=8192)
    assert enc.spec()["model"] == "default:" + ref.manifest["config"]["base_model"]
    ex = ref.task.train[:6]
    G = enc.encode_examples(ex).astype(np.float64)
    assert G.shape == (6, 8192)
    np.testing.assert_array_equal(G, enc.encode_examples(ex))  # seeded projection: deterministic
    model, tok = load_model(enc._path(), progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    toks = tokenize_examples(tok, ex, enc.max_length)
    exact = []
    for i in range(len(ex)):
        model.zero_grad()
        n = int(toks.lengths[i])
        loss = masked_target_loss(model(input_ids=toks.input_ids[i:i + 1, :n]).logits, toks.labels[i:i + 1, :n])[0]
        loss.backward()
        exact.append(torch.cat([p.grad.reshape(-1) for p in params]).double().numpy())
    E = np.stack(exact)
    gram, gram_proj = E @ E.T, G @ G.T
    scale = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert np.abs(gram_proj - gram).max() / scale.max() < 0.1  # JL at dim 8192: ~1/sqrt(8192) relative
    cos = gram / scale
    cos_proj = gram_proj / np.sqrt(np.outer(np.diag(gram_proj), np.diag(gram_proj)))
    assert np.corrcoef(cos[np.triu_indices(6, 1)], cos_proj[np.triu_indices(6, 1)])[0, 1] > 0.95
    monkeypatch.setenv("GPTFLUENCE_CACHE", str(ref.root / "elsewhere"))
    with pytest.raises(InputError, match="base model"):
        LossGradientEncoder.for_dynamics(ref).encode_examples(ex)


def test_replayed_run_reproduces_the_captured_checkpoints(tmp_path):
    """`replay_run` re-trains a run from the store alone (curriculum, seed, collection settings):
    its weights at the captured steps equal the checkpoints the collection saved."""
    from safetensors.torch import load_file

    from gptfluence.dynamics.collect import replay_run

    cfg = dataclasses.replace(SENT, epochs=2, capture_every=2)  # T = 4
    store = collect(cfg, tmp_path / "s", runs=2, workers=1, progress=False, log=lambda s: None)
    cap = tmp_path / "s" / "runs" / "run-0001" / "captures"
    seen = []
    for step, model, _ in replay_run(store, "run-0001", [4, 0, 2]):
        seen.append(step)
        want = load_file(str(cap / f"checkpoint_step{step:06d}.safetensors"))
        got = model.state_dict()
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=1e-6, err_msg=f"step {step} {k}")
    assert seen == [0, 2, 4]
    with pytest.raises(InputError, match="steps must lie in 0..4"):
        next(replay_run(store, "run-0001", [5]))


def test_checkpoint_gradient_features(ref):
    """Gradient features at K checkpoints of a replayed run: K concatenated blocks; the step-0 block
    is the base model's features; the spec names the run, its steps and hashes; later steps differ
    from the base model's."""
    from gptfluence.features import LossGradientEncoder

    T = int(ref.run("run-0002").curriculum.shape[0])
    enc = LossGradientEncoder.for_dynamics(ref, dim=256, checkpoints=3, run_id="run-0002")
    ck = enc.spec()["checkpoints"]
    assert ck["run_id"] == "run-0002" and ck["steps"] == [0, round(T / 2), T] and len(ck["curriculum_sha256"]) == 64
    ex = ref.task.train[:5]
    G = enc.encode_examples(ex)
    assert G.shape == (5, 3 * 256) and enc.out_dim == 3 * 256
    blocks = G.reshape(5, 3, 256)
    base = LossGradientEncoder.for_dynamics(ref, dim=256).encode_examples(ex)
    np.testing.assert_allclose(blocks[:, 0], base, rtol=1e-4, atol=1e-6 * np.abs(base).max())
    assert np.abs(blocks[:, 2] - blocks[:, 0]).max() > 1e-3 * np.abs(base).max()
    with pytest.raises(InputError, match="run"):
        LossGradientEncoder.for_dynamics(ref, checkpoints=2)


def test_gptfluence_checkpoint_similarity_artifact(ref, tmp_path):
    """A GPTfluence fitted on a collected store replays its first fit run for the gradient term; the
    artifact reloads with identical predictions; new examples get gradients from the recorded store,
    and a moved-away store is a clean error naming the run."""
    from gptfluence.simulators import GPTfluenceSimulator, load_simulator

    fit, val = ["run-0003", "run-0000", "run-0001", "run-0002", "run-0004"], ["run-0005"]
    sim = GPTfluenceSimulator("loss", encoder="bow:64", epochs=2, similarity_dim=64,
                              similarity_checkpoints=2)
    sim.fit(ref, fit, val)
    assert sim.similarity_kind == "grad"
    # b_projection 'auto' with gradient terms: B's projection pooled after fitting (kept on reload)
    assert sim.b_projection() == "pool_mean" and not any(m.b_pair for m in sim.module.members)
    assert sim.similarity_spec["checkpoints"]["run_id"] == "run-0003"
    assert sim.sim_train_features.dim == 2 * 64 * 2  # 2 checkpoints x (raw, K-FAC) blocks: the default none+kfac
    run = ref.run("run-0006")
    start = run.values["loss"][0]
    want = sim.simulate(run.curriculum[None], np.asarray(run.test_ids), start[None])
    path = sim.save(tmp_path / "sim")
    loaded = load_simulator(path, dynamics=ref)
    assert loaded.config.b_projection == "auto" and not any(m.b_pair for m in loaded.module.members)
    np.testing.assert_allclose(loaded.simulate(run.curriculum[None], np.asarray(run.test_ids), start[None]), want,
                               rtol=1e-6, atol=1e-7)
    from gptfluence.types import Example

    from gptfluence.features import LossGradientEncoder

    new = Example(10_000, ref.task.train[0].prompt, ref.task.train[0].target + " indeed")
    loaded.set_examples([new], [])  # gradients from the run of the store the spec records
    direct = LossGradientEncoder.for_dynamics(ref, dim=64, checkpoints=2, run_id="run-0003",
                                              preconditioner="none+kfac").encode_examples([new])
    np.testing.assert_allclose(loaded.sim_train_features.get([10_000], "t"), direct, atol=1e-5)
    moved = load_simulator(path)
    moved.similarity_spec["checkpoints"]["store"] = str(tmp_path / "gone")
    with pytest.raises(InputError, match="run-0003"):
        moved.set_examples([new], [])
    moved.ensure_features(ref, ref.train_ids, ref.test_ids)  # the store given holds the run: used
    moved.set_examples([Example(10_001, new.prompt, new.target)], [])
    np.testing.assert_allclose(moved.sim_train_features.get([10_001], "t"), direct, atol=1e-5)
    sim.fit(ref, ["run-0004", "run-0000", "run-0001"], val)  # a refit replays its own first fit run
    assert sim.similarity_spec["checkpoints"]["run_id"] == "run-0004"


def test_gradient_features_are_cached_on_disk(ref, tmp_path, monkeypatch):
    """`LossGradientEncoder.embed`: a second call with the same spec and examples reads the cache
    (no gradient computed); new examples are computed and equal the uncached values."""
    from gptfluence.features import LossGradientEncoder

    enc = LossGradientEncoder.for_dynamics(ref, dim=32, checkpoints=2, run_id="run-0001")
    ex = ref.task.train[:4]
    first = enc.embed(ex, cache_dir=tmp_path)
    np.testing.assert_allclose(first, enc.encode_examples(ex), atol=1e-6)
    monkeypatch.setattr(LossGradientEncoder, "encode_groups", lambda *a, **k: pytest.fail("recomputed"))
    np.testing.assert_array_equal(LossGradientEncoder.for_dynamics(ref, dim=32, checkpoints=2, run_id="run-0001")
                                  .embed(ex[::-1], cache_dir=tmp_path), first[::-1])
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # another run to replay: another key
        LossGradientEncoder.for_dynamics(ref, dim=32, checkpoints=2, run_id="run-0002").embed(ex, cache_dir=tmp_path)


def test_kfac_whiten_is_the_damped_kronecker_inverse():
    """`kfac_whiten`: inner products of whitened gradients equal vec(G_i)^T (S (x) A + lambda I)^{-1}
    vec(G_m), lambda = damping x the mean eigenvalue product (checked against an explicit inverse)."""
    import torch

    from gptfluence.features.gradients import kfac_whiten

    gen = torch.Generator().manual_seed(0)
    out_f, in_f, n = 3, 4, 5
    Xa, Xs = torch.randn(in_f, 9, generator=gen, dtype=torch.float64), torch.randn(out_f, 7, generator=gen, dtype=torch.float64)
    A, S = Xa @ Xa.T / 9, Xs @ Xs.T / 7
    G = torch.randn(n, out_f, in_f, generator=gen, dtype=torch.float64)
    W = kfac_whiten(G, A, S, damping=0.1).double()
    lam = 0.1 * torch.outer(torch.linalg.eigvalsh(S), torch.linalg.eigvalsh(A)).mean()
    K = torch.kron(S, A) + lam * torch.eye(out_f * in_f, dtype=torch.float64)  # vec row-major: G[o, i] -> o * in + i
    vec = G.reshape(n, -1)
    want = vec @ torch.linalg.solve(K, vec.T)
    np.testing.assert_allclose((W @ W.T).numpy(), want.numpy(), rtol=1e-4, atol=1e-8)


def test_kfac_gradient_features_match_hand_computed_kfac_influence(ref):
    """`LossGradientEncoder(preconditioner="kfac")`: its projected features' inner products match
    K-FAC influences computed here by hand from exact per-example gradients of the Linear layers
    and the factors (up to the projection's error); the bias column of A is the mean of 1 (= 1);
    the spec records the preconditioner and the pool; no pool is a clean error."""
    import torch

    from gptfluence.features import LossGradientEncoder
    from gptfluence.features.gradients import kfac_factors, kfac_whiten
    from gptfluence.lm import load_model, tokenize_examples
    from gptfluence.lm.metrics import masked_target_loss

    enc = LossGradientEncoder.for_dynamics(ref, dim=8192, preconditioner="kfac", damping=0.1)
    spec = enc.spec()
    assert spec["preconditioner"]["kind"] == "kfac" and spec["preconditioner"]["n_factor_examples"] == len(ref.task.train)
    assert spec != LossGradientEncoder.for_dynamics(ref, dim=8192).spec()  # another cache key
    ex = ref.task.train[:5]
    F = enc.encode_examples(ex).astype(np.float64)
    np.testing.assert_allclose(enc.encode_examples(ex[:2]), F[:2], rtol=1e-5, atol=1e-6)  # factors reused (matmul order only)
    assert len(enc._kfac) == 1  # one checkpoint: its factors computed once for both calls
    model, tok = load_model(enc._path(), progress=False)
    factors = kfac_factors(model, tok, ref.task.train, enc.max_length)
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    lins = [m for _, m in named]
    assert set(factors) == {name for name, _ in named}
    for name, (A, S) in factors.items():
        if dict(named)[name].bias is not None:
            assert abs(float(A[-1, -1]) - 1.0) < 1e-9
        assert float(torch.linalg.eigvalsh(A).min()) > -1e-9 and float(torch.linalg.eigvalsh(S).min()) > -1e-9
    toks = tokenize_examples(tok, ex, enc.max_length)
    blocks = []
    for i in range(len(ex)):
        model.zero_grad()
        n = int(toks.lengths[i])
        masked_target_loss(model(input_ids=toks.input_ids[i:i + 1, :n]).logits, toks.labels[i:i + 1, :n])[0].backward()
        per_layer = []
        for m in lins:
            g = m.weight.grad.double()
            if m.bias is not None:
                g = torch.cat([g, m.bias.grad.double()[:, None]], 1)
            per_layer.append(g)
        blocks.append(per_layer)
    exact = torch.cat([torch.cat([kfac_whiten(b[j][None], *factors[name], damping=0.1).double() for b in blocks])
                       for j, (name, _) in enumerate(named)], 1).numpy()
    gram, gram_proj = exact @ exact.T, F @ F.T
    scale = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert np.abs(gram_proj - gram).max() / scale.max() < 0.1
    assert np.corrcoef(gram[np.triu_indices(5, 1)], gram_proj[np.triu_indices(5, 1)])[0, 1] > 0.95
    plain = LossGradientEncoder.for_dynamics(ref, dim=8192).encode_examples(ex).astype(np.float64)
    assert np.abs(np.corrcoef((plain @ plain.T)[np.triu_indices(5, 1)], gram[np.triu_indices(5, 1)])[0, 1]) < 0.999
    for kind in ("kfac", "none+kfac"):
        with pytest.raises(InputError, match="factor_examples"):
            LossGradientEncoder(enc.model_id, preconditioner=kind)
    with pytest.raises(InputError, match="preconditioner must be one of"):
        LossGradientEncoder(enc.model_id, preconditioner="ekfac")


def test_gptfluence_with_kfac_similarity_reloads_with_identical_predictions(ref, tmp_path):
    """similarity_preconditioner='kfac': the fitted simulator records the preconditioner, reloads
    (curvature pool found in the store given) with identical predictions, and embeds new examples
    with the same K-FAC features as a fresh encoder."""
    from gptfluence.features import LossGradientEncoder
    from gptfluence.simulators import GPTfluenceSimulator, load_simulator
    from gptfluence.types import Example

    fit, val = ["run-0003", "run-0000", "run-0001", "run-0002", "run-0004"], ["run-0005"]
    sim = GPTfluenceSimulator("loss", encoder="bow:64", epochs=2, similarity_dim=64, similarity_checkpoints=2,
                              similarity_preconditioner="kfac")
    sim.fit(ref, fit, val)
    assert sim.similarity_spec["preconditioner"]["kind"] == "kfac"
    run = ref.run("run-0006")
    start = run.values["loss"][0]
    want = sim.simulate(run.curriculum[None], np.asarray(run.test_ids), start[None])
    loaded = load_simulator(sim.save(tmp_path / "sim"), dynamics=ref)
    np.testing.assert_allclose(loaded.simulate(run.curriculum[None], np.asarray(run.test_ids), start[None]), want,
                               rtol=1e-6, atol=1e-7)
    new = Example(10_000, ref.task.train[0].prompt, ref.task.train[0].target + " indeed")
    loaded.set_examples([new], [])
    direct = LossGradientEncoder.for_dynamics(ref, dim=64, checkpoints=2, run_id="run-0003",
                                              preconditioner="kfac").encode_examples([new])
    np.testing.assert_allclose(loaded.sim_train_features.get([10_000], "t"), direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="similarity-preconditioner"):
        GPTfluenceSimulator("loss", encoder="bow:64", similarity_preconditioner="ekfac")


def test_raw_and_kfac_gradient_features_concatenate_both_blocks_per_checkpoint(ref):
    """preconditioner='none+kfac': per checkpoint the raw block, then the K-FAC block, each equal
    to the single-kind encoder's."""
    from gptfluence.features import LossGradientEncoder

    kw = dict(dim=32, checkpoints=2, run_id="run-0001")
    both = LossGradientEncoder.for_dynamics(ref, preconditioner="none+kfac", **kw)
    ex = ref.task.train[:3]
    F = both.encode_examples(ex)
    assert F.shape == (3, 4 * 32) and both.out_dim == 4 * 32
    raw = LossGradientEncoder.for_dynamics(ref, **kw).encode_examples(ex)
    kf = LossGradientEncoder.for_dynamics(ref, preconditioner="kfac", **kw).encode_examples(ex)
    blocks = F.reshape(3, 2, 2, 32)
    np.testing.assert_allclose(blocks[:, :, 0].reshape(3, -1), raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks[:, :, 1].reshape(3, -1), kf, rtol=1e-5, atol=1e-6)
