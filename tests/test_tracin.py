"""TracIn-CP / Grad-Dot (simulators.tracin) and per-example gradients (features.per_example), on a
tiny base model built in a private GPTFLUENCE_CACHE and a tiny collected store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptfluence.dynamics.collect import CollectConfig, collect, curriculum_lrs, model_spec, replay_run
from gptfluence.errors import InputError, MethodUnavailable
from gptfluence.features.per_example import (CountSketch, gradient_dots, num_parameters, per_example_gradients,
                                             tokenized_rows)
from gptfluence.lm import causal_lm_loss, tokenize_examples
from gptfluence.simulators import load_simulator, make_simulator
from gptfluence.simulators.tracin import checkpoint_of_step, fit_scale, rollout, self_influence

# 2 epochs of 8 examples in batches of 4: T = 4 steps; generation metrics every 2 steps
TINY = dict(task="data2text", n_train=16, n_test=6, examples_per_run=8, batch_size=4, epochs=2, model_layers=1,
            model_hidden=32, model_pretrain_steps=20, gen_every=2, gen_max_new_tokens=4, max_length=48, lr=3e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("tracin-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLUENCE_CACHE", str(root))
        dyn = collect(CollectConfig(**TINY), tmp_path_factory.mktemp("tracin") / "store", runs=3, workers=1,
                      progress=False, log=lambda s: None)
        torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and robust on a busy machine
        yield dyn
    torch.set_num_threads(threads)


def _loop_gradients(model, tok, examples, append_eos):
    """Reference: one autograd pass per example through the library's training loss."""
    t = tokenize_examples(tok, examples, TINY["max_length"], append_eos=append_eos)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(examples)):
        n = int(t.lengths[i])
        batch = {"input_ids": t.input_ids[i:i + 1, :n], "attention_mask": t.attention_mask[i:i + 1, :n],
                 "labels": t.labels[i:i + 1, :n]}
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, batch).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


@pytest.fixture(scope="module")
def hand(store):
    """Reference gradients of the first run's replay at every step 0..T-1 (the checkpoints any k
    uses), one autograd pass per example: ``{step: (train [N, P], test [M, P])}`` float64."""
    run = store.run(store.run_ids[0])
    out = {}
    for step, model, tok in replay_run(store, run.run_id, list(range(run.num_steps))):
        out[step] = (_loop_gradients(model, tok, store.task.train, append_eos=True),
                     _loop_gradients(model, tok, store.task.test, append_eos=False))
    return out


def _base(store):
    (step, model, tok), = list(replay_run(store, store.run_ids[0], [0]))
    assert step == 0
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m, tok


def test_vmap_gradients_equal_the_per_example_loop(store, hand):
    model, tok = _base(store)
    ex = store.task.train[:10]
    got = per_example_gradients(model, *tokenized_rows(tok, ex, TINY["max_length"], True), chunk=4).double()
    want = hand[0][0][:10]
    assert got.shape == want.shape == (10, num_parameters(model))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    # test-side gradients: the loss metric's tokens (no eos)
    got = per_example_gradients(model, *tokenized_rows(tok, store.task.test, TINY["max_length"], False)).double()
    want = hand[0][1]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_projected_dot_products_track_exact_ones(store):
    """CountSketch to 4096 of ~79k parameters: the projected train x test dot products keep a
    Pearson correlation above 0.95 with the exact ones (relative error ~ sqrt(2/4096))."""
    model, tok = _base(store)
    tr = tokenized_rows(tok, store.task.train, TINY["max_length"], True)
    te = tokenized_rows(tok, store.task.test, TINY["max_length"], False)
    exact = gradient_dots(model, tr, te)
    proj = gradient_dots(model, tr, te, project_dim=4096, seed=3)
    assert exact.shape == proj.shape == (16, 6) and exact.dtype == np.float64
    assert np.corrcoef(exact.ravel(), proj.ravel())[0, 1] > 0.95
    assert not np.allclose(exact, proj)  # it is a projection
    # unbiased sketch of one vector against itself: E|Sx|^2 = |x|^2
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    s = CountSketch(5000, 1024, seed=1)(x)
    assert np.allclose((s ** 2).sum(1).numpy(), (x ** 2).sum(1).numpy(), rtol=0.15)


def test_checkpoint_rule_and_scale_fit_by_hand():
    assert checkpoint_of_step(np.arange(1, 8), 1).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert checkpoint_of_step(np.arange(1, 8), 3).tolist() == [0, 0, 0, 3, 3, 3, 6]
    assert checkpoint_of_step(np.arange(1, 8), 0).tolist() == [0] * 7
    start = np.array([[2.0, 1.0]])
    scores = np.array([[[1.0, 0.0], [0.5, 2.0]]])  # [R=1, S=2, M=2]
    out = rollout(start, scores, 0.1)
    assert np.allclose(out, [[[2.0, 1.0], [1.9, 1.0], [1.85, 0.8]]])
    true = rollout(start, scores, 0.37)
    cum = np.concatenate([np.zeros((1, 1, 2)), np.cumsum(scores, 1)], 1)
    assert fit_scale(start[:, None], cum, true) == pytest.approx(0.37)
    true[0, 1, 0] = np.nan  # unrecorded cells are skipped
    assert fit_scale(start[:, None], cum, true) == pytest.approx(0.37)


def test_rollout_equals_a_hand_written_loop(store, hand):
    """tracin_cp (k = 1, 2) / grad_dot (k = 0) with the reference run's checkpoints == a loop over
    steps with the re-trained reference run's per-example autograd gradients."""
    fit, other = store.run_ids[:2], store.run_ids[2]
    run = store.run(other)
    T = run.num_steps
    for k in (0, 1, 2):
        sim = make_simulator("tracin_cp", "loss", checkpoint_every=k, dots_cache=False) if k else \
            make_simulator("grad_dot", "loss", dots_cache=False)
        hist = sim.fit(store, fit)
        s = hist["scale"]
        assert np.isfinite(s) and hist["record"]["checkpoint_every"] == k
        assert hist["record"]["gradient_source"] == ("base model" if k == 0 else "reference run run-0000")
        ck = [0] * T if k == 0 else [k * ((t - 1) // k) for t in range(1, T + 1)]
        phi = run.values["loss"][0].astype(np.float64)
        want = [phi.copy()]
        for t in range(1, T + 1):
            rows = [store.train_row[int(i)] for i in run.curriculum[t - 1] if i >= 0]
            gtr, gte = hand[ck[t - 1]]
            phi = phi - s * run.lr[t - 1] * (gtr[rows] @ gte.T).sum(0).numpy()
            want.append(phi.copy())
        got = sim.simulate(run.curriculum[None], run.test_ids, run.values["loss"][:1].astype(np.float64))
        assert got.shape == (1, T + 1, 6)
        assert np.allclose(got[0], np.stack(want), rtol=1e-4, atol=1e-5), k
        assert not np.allclose(got[0, -1], got[0, 0])  # the rollout moves
        # from a later first step: the same increments
        later = sim.simulate(run.curriculum[None], run.test_ids, got[:, 2].astype(np.float64), first_step=2)
        assert np.allclose(later[0], got[0, 2:], rtol=1e-4, atol=1e-5)
    # grad_dot is the base model whatever checkpoint_every says
    assert make_simulator("grad_dot", "loss", checkpoint_every=3).k == 0


def test_own_checkpoints_reproduce_the_reference_replay_and_save_load(store, tmp_path):
    """gradient_source own re-trains each curriculum: for a store run, that replay is the run itself,
    so its rollout equals the reference source's with that run as reference (same scale)."""
    rid = store.run_ids[1]
    ref = make_simulator("tracin_cp", "loss", reference_run=rid, dots_cache=False)
    ref.fit(store, [rid])
    # with the dots cache, re-simulating a curriculum already replayed reads its dot products back
    own = make_simulator("tracin_cp", "loss", gradient_source="own", own_fit_runs=1)
    hist = own.fit(store, [rid])
    assert hist["scale"] == pytest.approx(ref.scale, rel=1e-6)
    assert hist["record"]["gradient_source"].startswith("own")
    run = store.run(rid)
    start = run.values["loss"][:1].astype(np.float64)
    assert np.allclose(own.simulate(run.curriculum[None], run.test_ids, start),
                       ref.simulate(run.curriculum[None], run.test_ids, start), rtol=1e-5, atol=1e-6)
    # a new curriculum (no store run has it) is re-trained with the collection's run seed
    new = run.curriculum[::-1][:2].copy()
    out = own.simulate(new[None], run.test_ids, start)
    assert out.shape == (1, 3, 6) and np.isfinite(out).all()
    # artifacts: the reference source simulates after a reload without the store
    ref.save(tmp_path / "sim")
    back = load_simulator(tmp_path / "sim", store)
    assert back.method == "tracin_cp" and back.scale == ref.scale
    cur = store.run(store.run_ids[2]).curriculum[None]
    assert np.allclose(back.simulate(cur, run.test_ids, start), ref.simulate(cur, run.test_ids, start))
    own.save(tmp_path / "own")
    again = load_simulator(tmp_path / "own", store)
    with pytest.raises(InputError, match="prepare"):
        again.simulate(cur, run.test_ids, start)
    again.prepare(store)
    assert np.allclose(again.simulate(run.curriculum[None], run.test_ids, start),
                       own.simulate(run.curriculum[None], run.test_ids, start))


def test_generation_metric_uses_loss_gradient_scores(store, tmp_path):
    sim = make_simulator("grad_dot", "bleu", dots_cache=False)
    hist = sim.fit(store, store.run_ids[:2])
    assert hist["record"]["scores"] == "loss-gradient" and np.isfinite(hist["scale"])
    run = store.run(store.run_ids[2])
    start = run.values["bleu"][:1].astype(np.float64)
    out = sim.simulate(run.curriculum[None], run.test_ids, start)
    assert out.shape == (1, run.num_steps + 1, 6) and np.isfinite(out).all()
    sim.save(tmp_path / "gd")
    back = load_simulator(tmp_path / "gd", store)
    assert back.method == "grad_dot" and back.k == 0 and back.metric == "bleu"
    np.testing.assert_array_equal(back.simulate(run.curriculum[None], run.test_ids, start), out)


def test_evaluate_records_and_dots_cache(store, monkeypatch):
    """Every metric's fit uses the same reference dot products: computed once, then read from
    the disk cache."""
    from gptfluence.analysis.evaluate import evaluate, format_markdown
    from gptfluence.simulators import tracin

    calls = []
    real = tracin.CheckpointDots._compute
    monkeypatch.setattr(tracin.CheckpointDots, "_compute", lambda self, *a: calls.append(1) or real(self, *a))
    res = evaluate(store, methods=["tracin_cp", "mean_curve"], metrics=["loss", "rougeL"],
                   split={"fit": store.run_ids[:2], "val": [], "test": store.run_ids[2:]},
                   configs={"tracin_cp": {"checkpoint_every": 3}})
    assert len(calls) <= 1  # 0 if an earlier test cached these checkpoints
    recs = {(r["method"], r["metric"]): r for r in res["results"]}
    assert set(recs) == {("tracin_cp", "loss"), ("tracin_cp", "rougeL"), ("mean_curve", "loss"), ("mean_curve", "rougeL")}
    assert all(r["n_nonfinite"] == 0 and r["status"] == "ok" for r in recs.values())
    assert recs[("tracin_cp", "rougeL")]["scores"] == "loss-gradient"
    assert recs[("tracin_cp", "loss")]["checkpoint_every"] == 3
    md = format_markdown(res)
    assert "tracin_cp ‡" in md and "loss-gradient scores" in md and "| loss | tracin_cp |" in md


def test_store_without_model_is_skipped_with_a_reason():
    from gptfluence.analysis.evaluate import evaluate, format_markdown, write_results
    from gptfluence.demo import terminal_table
    from gptfluence.simulators.synthetic import synthetic_dynamics

    dyn, _ = synthetic_dynamics(n_runs=6, n_steps=5, n_train=20, n_test=4)
    with pytest.raises(MethodUnavailable, match="no model"):
        make_simulator("tracin_cp").fit(dyn, dyn.run_ids[:3])
    res = evaluate(dyn, methods=["tracin_cp", "grad_dot", "mean_curve"], n_val=1, n_test=2)
    skipped = [r for r in res["results"] if r["method"] in ("tracin_cp", "grad_dot")]
    assert len(skipped) == 2 and all(r["status"] == "skipped" and "no model" in r["reason"] for r in skipped)
    md = format_markdown(res)
    assert md.count("skipped: the store records no model") == 2
    assert "skipped: the store records no model" in terminal_table(res)
    ok = [r for r in res["results"] if r["method"] == "mean_curve"][0]
    assert ok["status"] == "ok" and np.isfinite(ok["mse_mean"])


def test_self_influence_against_a_direct_computation(store, hand):
    rid = store.run_ids[0]
    ids, got = self_influence(store, rid, checkpoint_every=2, config=None)
    run = store.run(rid)
    T = run.num_steps
    want = np.zeros(len(store.task.train))
    for t in range(1, T + 1):
        g = hand[2 * ((t - 1) // 2)][0]
        want += run.lr[t - 1] * (g * g).sum(1).numpy()
    order = np.argsort(store.train_ids)
    assert np.array_equal(ids, store.train_ids[order])
    assert np.allclose(got, want[order], rtol=1e-4)
    assert (got > 0).all()


def test_curriculum_lrs_match_the_recorded_lr(store):
    run = store.run(store.run_ids[0])
    assert np.allclose(curriculum_lrs(store, run.num_steps), run.lr)
