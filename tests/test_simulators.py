"""Simulators: matrix form == per-step loop, fitting, unseen ids, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.simulators import (method_names, HashingBowEncoder, Simulator,
                                   load_simulator, make_simulator)
from gptfluence.simulators import engine
from gptfluence.simulators.common import stack_curricula
from gptfluence.simulators.gptfluence import FeaturizedFactors
from gptfluence.simulators.loop_reference import (featurized_pair_fn, loop_rollout, loop_teacher_forced_loss,
                                                  table_pair_fn)
from gptfluence.simulators.synthetic import synthetic_dynamics
from gptfluence.types import Example


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: OpenMP threads only add overhead (and stall on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_case(order: int, seed: int = 0, N: int = 7, M: int = 4, H: int = 6, R: int = 2, T: int = 6, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = FeaturizedFactors(H, 8, 5, order, share=bool(seed % 2), factor_bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.5)
        module.bias.copy_(0.05 * torch.randn(order + 1, generator=g))
    htr = torch.randn(N, H, generator=g)
    hte = torch.randn(M, H, generator=g)
    rows = torch.randint(0, N, (R, T, b), generator=g)
    rows[0, 1, 2] = -1  # a short batch
    rows[1, 3, :] = -1  # an empty batch
    start = torch.rand(R, M, generator=g) + 1.0
    return module, htr, hte, rows, start


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matrix_equals_loop(order, residual):
    module, htr, hte, rows, start = _random_case(order, seed=order + 2 * residual)
    N = htr.shape[0]
    cols = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        Fp = engine.pad_factors(module(htr, hte))
        fast = engine.rollout_tensor(Fp[:, :, cols], torch.where(rows < 0, N, rows), start, residual)
    slow = loop_rollout(featurized_pair_fn(module, htr, hte), order, rows, cols, start, residual)
    assert fast.shape == (2, 7, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    if residual:  # the empty batch of run 1, step 4 leaves every value unchanged
        torch.testing.assert_close(fast[1, 4], fast[1, 3])


@pytest.mark.parametrize("order,blocks,norms,lex", [(1, 1, False, 0), (2, 1, False, 0), (1, 3, False, 0),
                                                    (1, 3, True, 0), (2, 1, True, 0), (1, 3, True, 5),
                                                    (2, 1, False, 5)])
def test_similarity_term_matrix_form_equals_loop(order, blocks, norms, lex):
    """The learned-weight similarity terms (a cosine per block, e.g. per checkpoint, and with norms a
    norm-keeping dot product per block; with ``lex`` a lexical block of another width, cosine only):
    rollouts and teacher-forced gradients of the matrix form equal the per-pair loop; each term
    averages to zero over the fitted pool and has unit spread; one cosine, one dot and the lexical
    term checked against a hand computation."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    N, M, H, S = 7, 4, 6, 6
    module = FeaturizedFactors(H, 0, 3, order, share=False, factor_bias=True, sim_dim=S, sim_blocks=blocks,
                               sim_norms=norms, lex_dim=lex)
    terms = blocks * (2 if norms else 1) + (1 if lex else 0)
    htr, hte = torch.randn(N, H, generator=g), torch.randn(M, H, generator=g)
    s_tr, s_te = torch.randn(N, S + lex, generator=g), torch.randn(M, S + lex, generator=g)
    module.init_similarity(s_tr, s_te)
    sim = module.similarity(s_tr, s_te)
    assert sim.shape == (terms, N, M)
    torch.testing.assert_close(sim.mean(1), torch.zeros(terms, M), atol=1e-6, rtol=0)
    torch.testing.assert_close(sim.reshape(terms, -1).std(1), torch.ones(terms), atol=1e-5, rtol=0)
    w = S // blocks
    sl = slice(w * (blocks - 1), S)  # the last block, by hand
    a = torch.nn.functional.normalize(s_tr[:, sl], dim=1)
    raw = (a - a.mean(0)) @ torch.nn.functional.normalize(s_te[:, sl], dim=1).T
    torch.testing.assert_close(sim[blocks - 1], raw / raw.std(), atol=1e-5, rtol=1e-5)
    if norms:  # dot product of the slices, each side over its mean norm, centred and scaled
        a = s_tr[:, sl] / s_tr[:, sl].norm(dim=1).mean()
        raw = (a - a.mean(0)) @ (s_te[:, sl] / s_te[:, sl].norm(dim=1).mean()).T
        torch.testing.assert_close(sim[terms - 1], raw / raw.std(), atol=1e-5, rtol=1e-5)
    if lex:  # the lexical block: the last columns, its cosine term right after the main cosines
        a = torch.nn.functional.normalize(s_tr[:, S:], dim=1)
        raw = (a - a.mean(0)) @ torch.nn.functional.normalize(s_te[:, S:], dim=1).T
        torch.testing.assert_close(sim[blocks], raw / raw.std(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.3)
        module.sim_weight.copy_(0.05 * torch.randn(order + 1, terms, generator=g))
    rows = torch.randint(0, N, (2, 5, 3), generator=g)
    rows[0, 1, 2] = -1
    start = torch.rand(2, M, generator=g) + 1.0
    cols = torch.arange(M)
    with torch.no_grad():
        Fp = engine.pad_factors(module(htr, hte, s_tr, s_te))
        fast = engine.rollout_tensor(Fp, torch.where(rows < 0, N, rows), start, True)
    slow = loop_rollout(featurized_pair_fn(module, htr, hte, s_tr, s_te), order, rows, cols, start, True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    values = torch.rand(2, 6, M, generator=g) + 0.5
    block = engine.RunBlock(values, torch.where(rows < 0, N, rows), cols, 0)
    tr = block.transitions(order, bridge_gaps=True)
    pred, target = block.predict(engine.pad_factors(module(htr, hte, s_tr, s_te)), tr, order, True)
    gfast = torch.autograd.grad(torch.mean((pred - target) ** 2), [module.sim_weight])
    slow_loss = loop_teacher_forced_loss(featurized_pair_fn(module, htr, hte, s_tr, s_te), order, values, rows, cols,
                                         True, bridge_gaps=True)
    gslow = torch.autograd.grad(slow_loss, [module.sim_weight])
    torch.testing.assert_close(gfast[0], gslow[0], rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the similarity computed once (what a fit does) gives the same factors and gradients
        pre = module.similarity(s_tr, s_te)
    pred_pre, _ = block.predict(engine.pad_factors(module(htr, hte, similarity=pre)), tr, order, True)
    gpre = torch.autograd.grad(torch.mean((pred_pre - target) ** 2), [module.sim_weight])
    torch.testing.assert_close(pred_pre, pred.detach(), rtol=0, atol=0)
    torch.testing.assert_close(gpre[0], gfast[0], rtol=0, atol=0)
    with pytest.raises(InputError, match="similarity"):
        module(htr, hte)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("bridge", [False, True])
def test_teacher_forced_gradients_equal_loop(order, bridge):
    module, htr, hte, rows, start = _random_case(order, seed=10 + order)
    N, M = htr.shape[0], hte.shape[0]
    R, T, b = rows.shape
    g = torch.Generator().manual_seed(5)
    values = torch.rand(R, T + 1, M, generator=g) + 0.5
    values[0, 2, 1] = float("nan")  # drops/bridges transitions to step 2 and those that need it as history
    values[1, 5, :] = float("nan")
    values[1, 1:4, 3] = float("nan")  # a gap of 4 steps
    cols = torch.arange(M)
    block = engine.RunBlock(values, torch.where(rows < 0, N, rows), cols, 0)
    tr = block.transitions(order, bridge_gaps=bridge)
    # fast: all transitions in one tensor expression per step of the longest gap
    pred, target = block.predict(engine.pad_factors(module(htr, hte)), tr, order, True)
    fast = torch.mean((pred - target) ** 2)
    gfast = torch.autograd.grad(fast, list(module.parameters()))
    slow = loop_teacher_forced_loss(featurized_pair_fn(module, htr, hte), order, values, rows, cols, True,
                                    bridge_gaps=bridge)
    gslow = torch.autograd.grad(slow, list(module.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for a, c in zip(gfast, gslow):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    # which targets are used
    n_expected = 0
    for r in range(R):
        for k in range(1, T + 1):
            for m in range(M):
                if bridge:
                    n_expected += bool(torch.isfinite(values[r, k, m]))  # step 0 is always recorded here
                else:
                    need = [values[r, k, m]] + [values[r, max(k - j, 0), m] for j in range(1, order + 1)]
                    n_expected += all(torch.isfinite(v) for v in need)
    assert tr.shape[0] == n_expected
    if bridge:
        assert int((tr[:, 2] - tr[:, 1]).max()) == 4


def test_sparse_metric_fits_with_gap_bridging():
    # a metric recorded every 5 steps (like BLEU in a collection): no one-step transition exists
    dyn, enc = synthetic_dynamics(n_runs=5, n_steps=20, n_train=30, n_test=8, dim=16, seed=5)
    for run in dyn.runs():
        keep = run.steps % 5 == 0
        run.values["loss"][~keep] = np.nan
    with pytest.raises(InputError, match="no usable transitions"):
        make_simulator("simfluence", "loss", bridge_gaps=False).fit(dyn, dyn.run_ids[:4])
    sim = make_simulator("gptfluence", "loss", encoder=enc, hidden=8, proj_dim=4, epochs=5)
    h = sim.fit(dyn, dyn.run_ids[:3], dyn.run_ids[3:4])
    assert h["transitions"] == 3 * 4 * 8 and np.isfinite(h["best_val_mse"])


def test_simfluence_table_matches_loop():
    g = torch.Generator().manual_seed(3)
    F = 0.05 * torch.randn(2, 6, 3, generator=g)
    rows = torch.randint(0, 6, (2, 5, 2), generator=g)
    rows[0, 0, 1] = -1
    start = torch.rand(2, 3, generator=g)
    cols = torch.arange(3)
    fast = engine.rollout_tensor(engine.pad_factors(F), torch.where(rows < 0, 6, rows), start, True)
    slow = loop_rollout(table_pair_fn(F), 1, rows, cols, start, True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fitting on synthetic dynamics


@pytest.fixture(scope="module")
def synth():
    dyn, enc = synthetic_dynamics(n_runs=10, n_steps=40, n_train=60, n_test=24, dim=32, eta=0.06, seed=3)
    ids = dyn.run_ids
    return dyn, enc, ids[:7], ids[7:8], ids[8:]


def _heldout_mse(sim, dyn, runs):
    V, steps, tids = dyn.stack(sim.metric, runs)
    cur = stack_curricula(dyn, runs)
    pred = sim.simulate(cur, tids, V[:, 0])
    return float(np.nanmean((pred[:, 1:] - V[:, 1:]) ** 2)), pred


# one model (the default is a bagged ensemble of 3, tested on its own below): the tests of single-fit behaviour
FAST = dict(hidden=32, proj_dim=16, epochs=40, batch_size=1024, lr=3e-3, patience=8, ensemble=1)


@pytest.fixture(scope="module")
def fitted(synth):
    dyn, enc, fit, val, test = synth
    sims = {
        "gptfluence": make_simulator("gptfluence", "loss", encoder=enc, **FAST),
        "simfluence": make_simulator("simfluence", "loss", epochs=40, batch_size=1024),
        "constant": make_simulator("constant", "loss"),
        "mean_curve": make_simulator("mean_curve", "loss"),
        # the presets at their own configuration, cut to 2 epochs (batch 128: 53 steps each)
        "gptfluence_paper": make_simulator("gptfluence_paper", "loss", encoder=enc, epochs=2),
        "simfluence_paper": make_simulator("simfluence_paper", "loss", epochs=2),
    }
    for s in sims.values():
        s.fit(dyn, fit, val)
    return sims


def test_fit_recovers_known_process(synth, fitted):
    dyn, enc, fit, val, test = synth
    mse = {k: _heldout_mse(s, dyn, test)[0] for k, s in fitted.items() if not k.endswith("_paper")}
    assert mse["gptfluence"] < 0.5 * mse["mean_curve"], mse
    assert mse["gptfluence"] < 0.05 * mse["constant"], mse
    assert mse["simfluence"] < mse["constant"], mse
    h = fitted["gptfluence"].history
    assert h["best_val_mse"] < h["val_mse_init"]


def test_protocol_and_shapes(synth, fitted):
    dyn, enc, fit, val, test = synth
    V, steps, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    for name, sim in fitted.items():
        assert isinstance(sim, Simulator) and sim.method == name
        out = sim.simulate(cur, tids[:5], V[:, 3, :5], first_step=3)
        assert out.shape == (2, 41 - 3, 5)
        np.testing.assert_allclose(out[:, 0], V[:, 3, :5], rtol=1e-6)
    # the gradient methods need a store with a model (synthetic stores have none): tests/test_tracin.py
    assert set(method_names()) - {"tracin_cp", "grad_dot"} == set(fitted)


def test_predictions_come_out_in_metric_units(synth):
    dyn, enc, fit, val, test = synth
    # a BLEU-like scale: x 40
    big, _ = synthetic_dynamics(n_runs=10, n_steps=40, n_train=60, n_test=24, dim=32, eta=0.06, seed=3)
    for r in big.runs():
        r.values["loss"] = r.values["loss"] * 40.0
    s1 = make_simulator("gptfluence", "loss", encoder=enc, **{**FAST, "epochs": 3})
    s2 = make_simulator("gptfluence", "loss", encoder=enc, **{**FAST, "epochs": 3})
    s1.fit(dyn, fit, val)
    s2.fit(big, fit, val)
    assert s2.scale == pytest.approx(40 * s1.scale, rel=1e-5)
    _, p1 = _heldout_mse(s1, dyn, test)
    _, p2 = _heldout_mse(s2, big, test)
    np.testing.assert_allclose(p2, 40 * p1, rtol=2e-3, atol=1e-3)


def test_fit_from_step1_like_imported_data():
    dyn, enc = synthetic_dynamics(n_runs=4, n_steps=12, n_train=20, n_test=6, dim=16, record_step0=False)
    sim = make_simulator("gptfluence", "loss", encoder=enc, hidden=8, proj_dim=4, epochs=2)
    h = sim.fit(dyn, dyn.run_ids[:3], dyn.run_ids[3:])
    assert h["fit_first_step"] == 1
    V, _, tids = dyn.stack("loss", dyn.run_ids[3:])
    out = sim.simulate(stack_curricula(dyn, dyn.run_ids[3:]), tids, V[:, 1], first_step=1)
    assert out.shape == (1, 12, 6)


def test_order3_fits_and_runs(synth):
    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence", "loss", encoder=enc, order=3, **{**FAST, "epochs": 3})
    sim.fit(dyn, fit, val)
    mse, _ = _heldout_mse(sim, dyn, test)
    assert np.isfinite(mse)
    A, B = sim.factors([0, 1, 2], [0, 1])
    assert A.shape == (3, 3, 2) and B.shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# unseen examples


def test_simfluence_unseen_ids(synth, fitted):
    dyn, enc, fit, val, test = synth
    sim = fitted["simfluence"]
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)[:1]
    bad = cur.copy()
    bad[0, 2, 0] = 17_000
    with pytest.raises(InputError, match="simfluence has no parameters for training id 17000"):
        sim.simulate(bad, tids, V[:1, 0])
    with pytest.raises(InputError, match="test id 999"):
        sim.simulate(cur, np.array([999]), V[:1, 0, :1])
    zero = make_simulator("simfluence", "loss", unseen="zero")
    zero.module, zero.train_ids, zero.test_ids, zero.scale = sim.module, sim.train_ids, sim.test_ids, sim.scale
    pad = cur.copy()
    pad[0, 2, 0] = -1
    np.testing.assert_allclose(zero.simulate(bad, tids, V[:1, 0]), zero.simulate(pad, tids, V[:1, 0]), rtol=1e-6)
    # unseen test id: constant trajectory
    out = zero.simulate(cur, np.array([999]), np.array([[2.5]]))
    np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_gptfluence_unseen_examples_via_features(synth, fitted):
    dyn, enc, fit, val, test = synth
    sim = fitted["gptfluence"]
    new_train = Example(5000, "input: t1w1 t1w2 t1w3", " output: s1 s2")
    new_test = Example(6000, "input: t1w1 t1w5 t1w7", " output: s3")
    cur = np.array([[[5000, 0], [1, -1]]])
    with pytest.raises(InputError, match="no features for training id 5000"):
        sim.simulate(cur, [0], [[1.0]])
    sim2 = load_simulator_roundtrip(sim)
    sim2.encoder = enc
    sim2.set_examples([new_train], [new_test])
    out = sim2.simulate(cur, [0, 6000], [[1.0, 2.0]])
    assert out.shape == (1, 3, 2) and np.isfinite(out).all()


def load_simulator_roundtrip(sim, tmp=None):
    import tempfile

    d = tempfile.mkdtemp()
    sim.save(d)
    return load_simulator(d)


# ---------------------------------------------------------------------------------------------
# artifacts


@pytest.mark.parametrize("method", [m for m in method_names() if m not in ("tracin_cp", "grad_dot")])  # test_tracin.py
def test_save_load_same_predictions(tmp_path, synth, fitted, method):
    dyn, enc, fit, val, test = synth
    sim = fitted[method]
    sim.save(tmp_path / method)
    assert (tmp_path / method / "config.json").exists() and (tmp_path / method / "weights.safetensors").exists()
    back = load_simulator(tmp_path / method, dynamics=dyn)
    assert back.method == method and back.metric == "loss"
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    np.testing.assert_array_equal(sim.simulate(cur, tids, V[:, 0]), back.simulate(cur, tids, V[:, 0]))


def test_interrupted_save_keeps_the_old_artifact_and_mixed_pairs_are_refused(tmp_path, synth, fitted, monkeypatch):
    """A save that dies between the weights and the config leaves the previous artifact loadable
    (and no temp folder); a config.json paired with another save's weights is refused by name."""
    import shutil

    from gptfluence.simulators import common

    dyn, enc, fit, val, test = synth
    fitted["simfluence"].save(tmp_path / "sim")
    (tmp_path / "sim" / "NOTES.txt").write_text("mine")

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_json", die)
    with pytest.raises(KeyboardInterrupt):
        fitted["mean_curve"].save(tmp_path / "sim")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # nothing written outside the folder
    back = load_simulator(tmp_path / "sim", dynamics=dyn)
    assert back.method == "simfluence"
    np.testing.assert_array_equal(back.module.F.detach().numpy(), fitted["simfluence"].module.F.detach().numpy())
    fitted["mean_curve"].save(tmp_path / "sim")  # overwrite keeps other files
    assert (tmp_path / "sim" / "NOTES.txt").read_text() == "mine"
    assert load_simulator(tmp_path / "sim").method == "mean_curve"
    fitted["simfluence"].save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "weights.safetensors", tmp_path / "sim" / "weights.safetensors")
    with pytest.raises(ArtifactMismatchError, match="weights_sha256"):
        load_simulator(tmp_path / "sim")


def test_load_against_wrong_dynamics_or_encoder(tmp_path, synth, fitted):
    dyn, enc, fit, val, test = synth
    other, _ = synthetic_dynamics(n_runs=2, n_steps=5, n_train=60, n_test=24, dim=32, seed=99)
    for method in ("gptfluence", "simfluence", "mean_curve"):
        fitted[method].save(tmp_path / method)
        with pytest.raises(ArtifactMismatchError, match="other train examples"):
            load_simulator(tmp_path / method, dynamics=other)
    with pytest.raises(ArtifactMismatchError, match="encoder"):
        load_simulator(tmp_path / "gptfluence", encoder=HashingBowEncoder(32, seed=1))
    with pytest.raises(ArtifactMismatchError, match="encoder"):
        load_simulator(tmp_path / "gptfluence", encoder=HashingBowEncoder(64, seed=3))
    load_simulator(tmp_path / "gptfluence", encoder=HashingBowEncoder(32, seed=3), dynamics=dyn)
    # gptfluence may be used on other examples when asked to (it embeds them)
    sim = load_simulator(tmp_path / "gptfluence", dynamics=other, encoder=HashingBowEncoder(32, seed=3),
                         allow_new_examples=True)
    V, _, tids = other.stack("loss")
    assert np.isfinite(sim.simulate(stack_curricula(other, other.run_ids), tids, V[:, 0])).all()
    bleu, _ = synthetic_dynamics(n_runs=10, n_steps=40, n_train=60, n_test=24, dim=32, eta=0.06, seed=3, metric="bleu")
    with pytest.raises(ArtifactMismatchError, match="metric 'loss'"):
        load_simulator(tmp_path / "simfluence", dynamics=bleu)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactMismatchError, match="format"):
        load_simulator(tmp_path / "bad")


def test_mean_curve_by_hand():
    from gptfluence.dynamics.store import Dynamics, Run
    from gptfluence.simulators.synthetic import synthetic_task

    task = synthetic_task(n_train=4, n_test=2)
    cur = np.array([[0, 1], [2, 3], [0, 2]])
    a = Run("a", cur, np.arange(4), [0, 1], {"loss": np.array([[3, 2], [2, 2], [1, 2], [1, 2]], np.float32)})
    b = Run("b", cur, np.arange(4), [0, 1], {"loss": np.array([[5, 2], [4, 4], [np.nan, 4], [2, 4]], np.float32)})
    dyn = Dynamics(task, [a, b])
    sim = make_simulator("mean_curve", "loss")
    sim.fit(dyn, ["a", "b"])
    # test 0: changes a: 0,-1,-2,-2; b: 0,-1,nan,-3 -> mean 0,-1,-2,-2.5 ; test 1: 0,1,1,1
    out = sim.simulate(cur[None], [0, 1, 7], [[10.0, 10.0, 10.0]])
    np.testing.assert_allclose(out[0, :, 0], [10, 9, 8, 7.5])
    np.testing.assert_allclose(out[0, :, 1], [10, 11, 11, 11])
    # unseen test id 7: global mean change over runs and test examples
    np.testing.assert_allclose(out[0, :, 2], [10, 10, 10 + (-2 + 1 + 1) / 3, 10 + (-2 - 3 + 2) / 4])
    # from step 1: change relative to step 1
    out1 = sim.simulate(cur[None], [0], [[5.0]], first_step=1)
    np.testing.assert_allclose(out1[0, :, 0], [5, 4, 3.5])
    const = make_simulator("constant", "loss")
    np.testing.assert_array_equal(const.simulate(cur[None], [0, 1], [[1.0, 2.0]], first_step=2)[0], [[1, 2], [1, 2]])


def test_simulate_input_errors(fitted):
    sim = fitted["gptfluence"]
    with pytest.raises(InputError, match="runs, steps, batch"):
        sim.simulate(np.zeros((3, 2), int), [0], [[1.0]])
    with pytest.raises(InputError, match="start must be"):
        sim.simulate(np.zeros((1, 3, 2), int), [0, 1], [[1.0]])
    with pytest.raises(InputError, match="first_step"):
        sim.simulate(np.zeros((1, 3, 2), int), [0], [[1.0]], first_step=4)
    with pytest.raises(InputError, match="unknown simulator method"):
        make_simulator("nope")
    with pytest.raises(InputError, match="unknown field"):
        make_simulator("gptfluence", hiden=3)
    with pytest.raises(InputError, match="unseen"):
        make_simulator("simfluence", unseen="maybe")


def test_gptfluence_options_paper_literal_and_unshared(synth):
    dyn, enc, fit, val, test = synth
    for kw in (dict(share_projection=True), dict(residual=False), dict(hidden=0, center_features=False)):
        # on the raw values (detrend=False) the normalised units are those of the values themselves
        sim = make_simulator("gptfluence", "loss", encoder=enc, **{**FAST, "epochs": 3, "detrend": False, "order": 1, **kw})
        h = sim.fit(dyn, fit, val)
        # rollouts start stable: the initial validation MSE is about that of a constant prediction
        assert np.isfinite(h["val_mse_init"]) and h["val_mse_init"] < 10


def test_rollout_objective_fits_and_its_loss_is_the_rollout_mse(synth, fitted):
    """objective='rollout' backpropagates the held-out-style rollout MSE through time; it must learn
    the known process (far better than the references) and its loss must equal the rollout MSE."""
    import torch

    from gptfluence.simulators import engine

    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence", "loss", encoder=enc, objective="rollout", rollout_runs=4,
                         **{**FAST, "epochs": 60, "patience": 15})
    hist = sim.fit(dyn, fit, val)
    mse, _ = _heldout_mse(sim, dyn, test)
    ref = {k: _heldout_mse(fitted[k], dyn, test)[0] for k in ("constant", "mean_curve")}
    assert mse < 0.5 * ref["mean_curve"] and mse < 0.05 * ref["constant"], (mse, ref)
    assert hist["best_val_mse"] < hist["val_mse_init"]
    # the differentiable loss equals the float rollout MSE and has gradients
    Fp = torch.randn(2, 5, 3, requires_grad=True)
    block = engine.RunBlock(values=torch.randn(2, 4, 3), rows=torch.randint(0, 5, (2, 3, 2)),
                            cols=torch.arange(3), first_step=0)
    loss = engine.rollout_loss(Fp, block, residual=True)
    assert abs(float(loss.detach()) - engine.rollout_mse(Fp, block, residual=True)) < 1e-6
    loss.backward()
    assert Fp.grad is not None and torch.isfinite(Fp.grad).all() and Fp.grad.abs().sum() > 0
    with pytest.raises(InputError, match=r"--objective \(objective\) must be one of"):  # refused when made
        make_simulator("gptfluence", "loss", encoder=enc, objective="magic", **FAST)


# the second case is a setting whose rollout phase does not validate better on this data (a high
# learning rate with 3 lags; with 6 lags its rollout phase won there too, so the case pins 3)
@pytest.mark.parametrize("extra, rollout_wins", [({}, True), ({"lr": 3e-2, "b_lags": 3}, False)])
def test_teacher_forcing_then_rollout_starts_from_the_teacher_forced_fit_and_never_validates_worse(synth, extra, rollout_wins):
    """The default objective: its first phase is exactly a teacher-forced fit (same seed, same
    history); the rollout phase starts from that fit's best weights and keeps them unless a rollout
    epoch validates better, so its best validation MSE is never above the teacher-forced one; the
    epoch bookkeeping spans both phases (best_epoch 0 would mean untrained)."""
    dyn, enc, fit, val, test = synth
    kw = {**FAST, "epochs": 12, "patience": 4, "order": 2, **extra}
    tf = make_simulator("gptfluence", "loss", encoder=enc, objective="teacher_forcing", **kw)
    h_tf = tf.fit(dyn, fit, val)
    two = make_simulator("gptfluence", "loss", encoder=enc, **kw)
    assert two.config.objective == "auto"  # the default: the two-phase objective on loss
    h = two.fit(dyn, fit, val)
    assert h["objective"] == "teacher_forcing_then_rollout" and h_tf["objective"] == "teacher_forcing"
    first = h["teacher_forcing"]
    assert first["val_mse"] == h_tf["val_mse"] and first["best_epoch"] == h_tf["best_epoch"]
    n1 = first["epochs_run"]
    assert h["epochs_run"] == len(h["train_loss"]) == len(h["val_mse"]) > n1
    assert h["val_mse"][:n1] == h_tf["val_mse"] and h["val_mse_init"] == h_tf["val_mse_init"]
    assert h["best_val_mse"] <= h_tf["best_val_mse"]
    mse_tf, pred_tf = _heldout_mse(tf, dyn, test)
    mse_two, pred_two = _heldout_mse(two, dyn, test)
    assert (h["rollout_phase_best_epoch"] > 0) == rollout_wins  # both branches are exercised
    if h["rollout_phase_best_epoch"] == 0:  # teacher-forced weights kept: the same simulator
        assert h["best_epoch"] == h_tf["best_epoch"]
        np.testing.assert_allclose(pred_two, pred_tf, rtol=1e-5, atol=1e-6)
    else:
        assert h["best_epoch"] == n1 + h["rollout_phase_best_epoch"]
        assert h["best_val_mse"] < h_tf["best_val_mse"]
        assert h["val_mse"][h["best_epoch"] - 1] == h["best_val_mse"]
    assert np.isfinite(mse_two)


def test_objective_auto_fits_metrics_of_decoded_text_by_rollout():
    """objective='auto' (GPTfluence's default) is rollout for bleu, rougeL and accuracy and the
    two-phase objective for loss and any other metric name; an explicit objective is kept; the fit
    history records the objective that ran, and a fit under 'auto' on a 'bleu' store is exactly the
    rollout fit (same seed, same weights)."""
    from gptfluence.lm.metrics import metric_names
    from gptfluence.simulators.common import ROLLOUT_METRICS, resolve_objective
    from gptfluence.types import CLASSIFICATION, GENERATION

    # the metrics of decoded text are exactly what collection measures besides the loss
    assert set(ROLLOUT_METRICS) == set(metric_names(GENERATION) + metric_names(CLASSIFICATION))
    assert resolve_objective("auto", "loss") == "teacher_forcing_then_rollout"
    assert [resolve_objective("auto", m) for m in ("bleu", "rougeL", "accuracy")] == ["rollout"] * 3
    assert resolve_objective("auto", "perplexity") == "teacher_forcing_then_rollout"
    assert resolve_objective("teacher_forcing", "bleu") == "teacher_forcing"
    dyn, enc = synthetic_dynamics(n_runs=6, n_steps=12, n_train=20, n_test=6, dim=16, eta=0.06, seed=5, metric="bleu")
    ids = dyn.run_ids
    kw = {**FAST, "epochs": 3}
    auto = make_simulator("gptfluence", "bleu", encoder=enc, **kw)
    ro = make_simulator("gptfluence", "bleu", encoder=enc, objective="rollout", **kw)
    h_auto, h_ro = auto.fit(dyn, ids[:4], ids[4:5]), ro.fit(dyn, ids[:4], ids[4:5])
    assert h_auto["objective"] == h_ro["objective"] == "rollout" and "teacher_forcing" not in h_auto
    assert h_auto["val_mse"] == h_ro["val_mse"]
    _, p_auto = _heldout_mse(auto, dyn, ids[5:])
    _, p_ro = _heldout_mse(ro, dyn, ids[5:])
    np.testing.assert_array_equal(p_auto, p_ro)


def test_rollout_phase_keep_best_epoch_keeps_a_rollout_epoch_even_where_it_validates_worse(synth):
    """rollout_phase_keep='best_epoch': the rollout phase's best *trained* epoch is kept, also where
    the teacher-forced weights validate better (the lr=3e-2, 3-lag case above, where 'if_better'
    keeps them); the first phase is unchanged and the kept epoch is the rollout phase's lowest MSE."""
    dyn, enc, fit, val, test = synth
    kw = {**FAST, "epochs": 12, "patience": 4, "order": 2, "lr": 3e-2, "b_lags": 3}
    keep = make_simulator("gptfluence", "loss", encoder=enc, **kw)
    h_keep = keep.fit(dyn, fit, val)
    assert h_keep["rollout_phase_best_epoch"] == 0  # if_better: the teacher-forced weights win
    best = make_simulator("gptfluence", "loss", encoder=enc, rollout_phase_keep="best_epoch", **kw)
    h = best.fit(dyn, fit, val)
    n1 = h["teacher_forcing"]["epochs_run"]
    assert h["teacher_forcing"]["val_mse"] == h_keep["teacher_forcing"]["val_mse"]
    r = h["rollout_phase_best_epoch"]
    assert r >= 1 and h["best_epoch"] == n1 + r
    rollout_val = h["val_mse"][n1:]
    assert h["best_val_mse"] == min(rollout_val) == rollout_val[r - 1]
    assert h["best_val_mse"] > h_keep["best_val_mse"]  # worse on validation, kept anyway
    mse_keep, pred_keep = _heldout_mse(keep, dyn, test)
    mse_best, pred_best = _heldout_mse(best, dyn, test)
    assert np.isfinite(mse_best) and not np.allclose(pred_best, pred_keep)
    with pytest.raises(InputError, match=r"--rollout-phase-keep \(rollout_phase_keep\) must be one of"):
        make_simulator("gptfluence", "loss", encoder=enc, rollout_phase_keep="sometimes", **FAST)


def test_rollout_loss_ignores_unrecorded_targets_in_the_gradient():
    """A NaN target (metric not recorded at that step) must not turn gradients into NaN."""
    import torch

    from gptfluence.simulators import engine

    V = torch.randn(2, 5, 3)
    V[0, 2, 1] = float("nan")
    V[1, 3, :] = float("nan")
    Fp = torch.randn(2, 5, 3, requires_grad=True)
    block = engine.RunBlock(values=V, rows=torch.randint(0, 5, (2, 4, 2)), cols=torch.arange(3), first_step=0)
    loss = engine.rollout_loss(Fp, block, residual=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Fp.grad).all()
    with torch.no_grad():
        pred = engine.rollout_tensor(Fp, block.rows, V[:, 0], True)
    ok = torch.isfinite(V[:, 1:])
    assert abs(float(loss.detach()) - float(((pred[:, 1:] - V[:, 1:])[ok] ** 2).mean())) < 1e-5


def test_detrend_fits_deviations_from_the_mean_trajectory(tmp_path):
    """detrend=True: a shared non-stationary trend (which a stationary recurrence cannot follow)
    is taken from the fit runs, the factors model the deviations, and artifacts keep the trend."""
    from gptfluence.dynamics.store import Dynamics, Run
    from gptfluence.simulators import load_simulator

    base, _ = synthetic_dynamics(n_runs=10, n_steps=30, n_train=40, n_test=12, dim=16, eta=0.03, seed=5)
    wave = 0.5 * np.sin(np.arange(31) / 3.0)[:, None]  # the same bumpy trend in every run
    runs = [Run(r.run_id, r.curriculum, r.steps, r.test_ids, {"loss": r.values["loss"] + wave}, seed=r.seed)
            for r in base.runs()]
    dyn = Dynamics(base.task, runs, manifest=dict(base.manifest, metrics=["loss"]))
    ids = dyn.run_ids
    fit, val, test = ids[:7], ids[7:8], ids[8:]
    mse = {}
    for detrend in (False, True):
        sim = make_simulator("simfluence", "loss", epochs=40, batch_size=1024, detrend=detrend)
        sim.fit(dyn, fit, val)
        mse[detrend], pred = _heldout_mse(sim, dyn, test)
    mean = make_simulator("mean_curve", "loss")
    mean.fit(dyn, fit, val)
    mse["mean_curve"] = _heldout_mse(mean, dyn, test)[0]
    assert mse[True] < 0.5 * mse[False], mse
    assert mse[True] < mse["mean_curve"], mse
    sim.save(tmp_path / "s")
    again = load_simulator(tmp_path / "s", dynamics=dyn)
    np.testing.assert_allclose(_heldout_mse(again, dyn, test)[1], pred, rtol=1e-5, atol=1e-6)
    # a test id the trend has not seen takes the mean trend of the others
    from gptfluence.simulators.common import Trend

    tr = Trend(np.arange(3), np.array([4, 7]), np.array([[1.0, 3.0], [2.0, 4.0], [3.0, 5.0]]))
    np.testing.assert_allclose(tr.values([7, 99], [0, 2, 10]), [[3.0, 2.0], [5.0, 4.0], [5.0, 4.0]])


def _similar_lowers_loss_dynamics(seed: int = 11):
    """Loss-like runs in which a training example lowers a test example's loss in proportion to
    their feature similarity (B = -eta <h_i, h_m>, no multiplicative part) on top of a shared
    trend: the sign a shared projection's PSD kernel cannot express."""
    from gptfluence.dynamics.store import Dynamics, Run

    base, enc = synthetic_dynamics(n_runs=12, n_steps=30, n_train=48, n_test=16, dim=24, eta=0.0, seed=seed)
    Htr = enc.encode([e.text for e in base.task.train]).astype(np.float64)
    Hte = enc.encode([e.text for e in base.task.test]).astype(np.float64)
    B = -0.02 * (Htr @ Hte.T)
    rng = np.random.default_rng(seed)
    runs = []
    for r in base.runs():
        steps = B[r.curriculum].sum(1)  # [T, M]
        phi = 3.0 - 0.01 * np.arange(31)[:, None] + np.vstack([np.zeros((1, B.shape[1])), np.cumsum(steps, 0)])
        phi = phi + 0.002 * rng.standard_normal(phi.shape)
        runs.append(Run(r.run_id, r.curriculum, r.steps, r.test_ids, {"loss": phi.astype(np.float32)}, seed=r.seed))
    return Dynamics(base.task, runs, manifest=dict(base.manifest, metrics=["loss"])), enc


def test_default_gptfluence_learns_that_similar_examples_lower_the_loss(tmp_path):
    """The default (separate linear train/test projections, centred features; without a model the
    encoder-cosine similarity term and per-pair B projections, b_projection 'auto') recovers the
    negative-similarity effect: far below the mean curve on held-out runs, with B negatively
    correlated with feature similarity; the authors' shared projection cannot match it.
    The feature centre is part of the artifact."""
    from scipy.stats import spearmanr

    from gptfluence.simulators import load_simulator

    dyn, enc = _similar_lowers_loss_dynamics()
    ids = dyn.run_ids
    fit, val, test = ids[:8], ids[8:10], ids[10:]
    mean = make_simulator("mean_curve", "loss")
    mean.fit(dyn, fit, val)
    mse = {"mean_curve": _heldout_mse(mean, dyn, test)[0]}
    sims = {}
    # the projections alone (no similarity or lexical term) at 32 dimensions (the default is 1: the
    # similarity terms carry the pair structure), separate or shared between the two sides
    proj = dict(similarity="none", lexical=False, proj_dim=32)
    for name, kw in (("default", {}), ("unshared", proj), ("shared", dict(proj, share_projection=True))):
        sim = make_simulator("gptfluence", "loss", encoder=enc, epochs=80, patience=20, lr=3e-3, **kw)
        sim.fit(dyn, fit, val)
        mse[name], pred = _heldout_mse(sim, dyn, test)
        sims[name] = (sim, pred)
    assert mse["default"] < 0.5 * mse["mean_curve"], mse
    assert mse["unshared"] < 0.5 * mse["mean_curve"], mse  # measured: 0.41x
    assert mse["unshared"] < 0.6 * mse["shared"], mse  # measured: 0.45x
    assert sims["default"][0].similarity_kind == "features"  # no model in an in-memory store: 'auto' -> features
    assert sims["default"][0].b_projection() == "pair"  # ... and so per-pair B projections
    assert all(m.b_pair for m in sims["default"][0].module.members)
    sim, pred = sims["default"]
    assert sim.config.hidden == 0 and not sim.config.share_projection and sim.config.detrend
    Htr = enc.encode([e.text for e in dyn.task.train])
    Hte = enc.encode([e.text for e in dyn.task.test])
    tr, te = np.arange(len(Htr)), np.arange(len(Hte))
    _, B = sim.factors(tr, te)
    assert spearmanr(B.ravel(), (Htr @ Hte.T).ravel())[0] < -0.5
    centre = sim.module.center.numpy()
    np.testing.assert_allclose(centre, np.concatenate([Htr, Hte]).mean(0), atol=1e-5)
    sim.save(tmp_path / "g")
    again = load_simulator(tmp_path / "g", dynamics=dyn)
    np.testing.assert_array_equal(again.module.center.numpy(), centre)
    np.testing.assert_allclose(_heldout_mse(again, dyn, test)[1], pred, rtol=1e-5, atol=1e-6)


def test_device_settings_are_checked_in_one_place():
    from gptfluence.devices import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("gpu")
    with pytest.raises(InputError, match="device"):
        make_simulator("gptfluence", device="tpu").device
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_artifacts_that_predate_a_config_field_load_with_the_behaviour_they_were_made_with(tmp_path, synth, fitted):
    import json

    for method in ("gptfluence", "simfluence"):
        fitted[method].save(tmp_path / method)
        cfg_path = tmp_path / method / "config.json"
        meta = json.loads(cfg_path.read_text())
        for k in ("detrend", "center_features", "similarity_preconditioner", "ensemble", "a_factors", "b_projection"):
            meta["config"].pop(k, None)
        cfg_path.write_text(json.dumps(meta))
        back = load_simulator(tmp_path / method)
        assert back.config.detrend is False
        if method == "gptfluence":  # raw gradients only before the preconditioner field (default now none+kfac)
            assert back.config.center_features is False and back.config.similarity_preconditioner == "none"
            assert back.config.ensemble == 1  # one model before the ensemble field
            assert back.config.a_factors == "pair" and back.module.a_pair  # per-pair A before the field
            assert back.config.b_projection == "pair" and back.module.b_pair


# ---------------------------------------------------------------------------------------------
# checks that guard code paths the tests above do not reach


def test_early_stopping_restores_the_best_epochs_weights(synth):
    dyn, enc, fit, val, test = synth
    # a large lr makes the validation MSE jump about (here: best at epoch 4 of 12); patience 0
    # never stops
    kw = dict(epochs=12, batch_size=256, lr=0.01, patience=0)
    sim = make_simulator("simfluence", "loss", **kw)
    h = sim.fit(dyn, fit, val)
    vm = h["val_mse"]
    best = int(np.argmin(vm)) + 1
    assert h["best_epoch"] == best and vm[-1] > min(vm) and best < kw["epochs"], vm
    # the returned simulator rolls the validation run out with the best epoch's error ...
    mse, pred = _heldout_mse(sim, dyn, val)
    assert mse == pytest.approx(min(vm) * sim.scale ** 2, rel=1e-4)
    # ... and predicts exactly as a fit that ran only up to that epoch
    short = make_simulator("simfluence", "loss", **{**kw, "epochs": best})
    short.fit(dyn, fit, val)
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    np.testing.assert_array_equal(sim.simulate(cur, tids, V[:, 0]), short.simulate(cur, tids, V[:, 0]))


def test_detrended_rollout_from_a_later_first_step_by_hand():
    from gptfluence.simulators.common import Trend
    from gptfluence.simulators.simfluence import FreeFactors, SimfluenceSimulator

    # imported-like data: steps start at 1; trend (mean trajectory) 10, 8, 7, 6.5 at steps 1..4
    sim = SimfluenceSimulator("loss")
    sim.train_ids, sim.test_ids = np.array([0]), np.array([0])
    sim.module = FreeFactors(1, 1)
    with torch.no_grad():
        sim.module.F[:, 0, 0] = torch.tensor([0.5, 0.25])  # A (alpha = 1 + A), B in normalised units
    sim.scale = 2.0
    sim.trend = Trend(np.array([1, 2, 3, 4]), np.array([0]), np.array([[10.0], [8.0], [7.0], [6.5]]))
    cur = np.zeros((1, 4, 1), dtype=np.int64)  # row t-1 = batch of step t
    out = sim.simulate(cur, [0], np.array([[9.0]]), first_step=2)
    # step 2: deviation (9 - 8) / 2 = 0.5; step 3: 1.5 * 0.5 + 0.25 = 1.0 -> 1.0 * 2 + 7 = 9;
    # step 4: 1.5 * 1.0 + 0.25 = 1.75 -> 1.75 * 2 + 6.5 = 10
    np.testing.assert_allclose(out[0, :, 0], [9.0, 9.0, 10.0], rtol=1e-6)


def test_batch_sums_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    Fp = engine.pad_factors(torch.randn(3, 9, 4, generator=g))
    rows = torch.randint(0, 10, (5, 7, 3), generator=g)  # 9 = the zero (padding) row
    whole = engine.batch_sums(Fp, rows)
    for max_elems in (1, 3 * 3 * 4 * 7 + 1, 3 * 3 * 4 * 7 * 2):  # one run per chunk, then 2
        torch.testing.assert_close(engine.batch_sums(Fp, rows, max_elems=max_elems), whole, rtol=0, atol=0)
    want = torch.stack([Fp[k][rows].sum(-2) for k in range(3)])
    torch.testing.assert_close(whole, want)


@pytest.mark.parametrize("order,residual,bias", [(1, False, False), (2, True, True)])
def test_batched_reference_equals_the_engine(order, residual, bias):
    from gptfluence.simulators.loop_reference import batched_transition_pred

    torch.manual_seed(0)
    N, M, H, K, b = 9, 5, 6, 20, 3
    mod = FeaturizedFactors(H, 8, 4, order, share=True, factor_bias=bias)
    htr, hte = torch.randn(N, H), torch.randn(M, H)
    rows = torch.randint(-1, N, (K, b))
    cols = torch.randint(0, M, (K,))
    prev = torch.randn(order, K)
    fast = engine.teacher_forced_pred(engine.pad_factors(mod(htr, hte)), torch.where(rows < 0, N, rows), cols, prev,
                                      residual)
    slow = batched_transition_pred(mod, htr, hte, rows, cols, prev, residual)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(fast.pow(2).mean(), list(mod.parameters()))
    g2 = torch.autograd.grad(batched_transition_pred(mod, htr, hte, rows, cols, prev, residual).pow(2).mean(),
                             list(mod.parameters()))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_gptfluence_lexical_term_features_reload_and_new_examples(tmp_path, synth):
    """``lexical=True``: TF-IDF features fitted on the store's texts (training and test) for every
    example, one more similarity term per factor, kept by save/load (same predictions, the same
    vocabulary), and computed for examples given later; ``lexical=False`` has no such term."""
    from gptfluence.features.lexical import TfidfFeatures

    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence", "loss", encoder=enc, lexical=True, **FAST)
    sim.fit(dyn, fit, val)
    tf = TfidfFeatures.fit([e.text for e in dyn.task.train] + [e.text for e in dyn.task.test])
    assert sim.lexical.spec() == tf.spec() and sim.module.lex_dim == tf.dim > 0
    ids = [e.id for e in dyn.task.train]
    np.testing.assert_array_equal(sim.lex_train_features.get(ids, "t"), tf.encode([e.text for e in dyn.task.train]))
    plain = make_simulator("gptfluence", "loss", encoder=enc, lexical=False, **FAST)
    plain.fit(dyn, fit, val)
    assert plain.lexical is None and plain.module.lex_dim == 0
    assert sim.module.sim_terms == plain.module.sim_terms + 1  # the lexical cosine, with its own weights
    assert float(sim.module.sim_weight[:, -1].abs().sum()) > 0  # fitted (initialised at 0)
    sim.save(tmp_path / "lex")
    back = load_simulator(tmp_path / "lex")
    assert back.lexical.spec() == tf.spec()
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    np.testing.assert_array_equal(sim.simulate(cur, tids, V[:, 0]), back.simulate(cur, tids, V[:, 0]))
    back.encoder = enc
    new = Example(5000, "input: t1w1 t1w2 t1w3", " output: s1 s2")
    back.set_examples([new], [])
    np.testing.assert_array_equal(back.lex_train_features.get([5000], "t"), tf.encode([new.text]))
    out = back.simulate(np.array([[[5000, 0], [1, -1]]]), tids[:2], V[:1, 0, :2])
    assert np.isfinite(out).all()


def test_ensemble_splits_first_is_given_then_fresh_validation_runs():
    from gptfluence.simulators.common import ensemble_splits

    fit, val = [f"r{i}" for i in range(6)], ["v0", "v1"]
    sp = ensemble_splits(fit, val, 3, seed=5)
    assert sp[0] == (fit, val)
    pool = set(fit + val)
    seen_val = set(val)
    for f, v in sp[1:]:
        assert len(v) == 2 and set(f) | set(v) == pool and not set(f) & set(v)
        assert not set(v) & seen_val  # each member validates on runs no earlier member validated on
        seen_val |= set(v)
    assert ensemble_splits(fit, val, 3, seed=5) == sp  # seeded
    # more members than fresh validation runs: drawn from the whole pool, still disjoint from their fit runs
    many = ensemble_splits(["a", "b", "c"], ["d"], 6, seed=0)
    assert all(len(v) == 1 and v[0] not in f and set(f) | set(v) == {"a", "b", "c", "d"} for f, v in many)
    # no validation runs: every member fits on all runs
    assert ensemble_splits(fit, [], 3, seed=0) == [(fit, [])] * 3


def test_gptfluence_ensemble_is_the_mean_of_its_members_and_reloads(tmp_path, synth):
    """``ensemble=3``: three members fitted on the splits of `ensemble_splits` (the history names
    them), the simulator's factors are exactly their mean, and save/load keeps every member."""
    from gptfluence.simulators.common import ensemble_splits
    from gptfluence.simulators.gptfluence import FactorEnsemble

    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence", "loss", encoder=enc, **{**FAST, "ensemble": 3})
    hist = sim.fit(dyn, fit, val)
    assert isinstance(sim.module, FactorEnsemble) and len(sim.module.members) == 3
    splits = ensemble_splits(fit, val, 3, sim.config.seed)
    assert [(m["fit_runs"], m["val_runs"]) for m in hist["members"]] == [(list(f), list(v)) for f, v in splits]
    assert hist["epochs_run"] == sum(m["epochs_run"] for m in hist["members"])
    # members differ (own split and seed), the ensemble's factors are their mean
    tr, te = dyn.train_ids, dyn.test_ids
    A, B = sim.factors(tr, te)
    parts = []
    module = sim.module
    for m in module.members:
        sim.module = m
        parts.append(sim.factors(tr, te))
    sim.module = module
    assert not np.allclose(parts[0][1], parts[1][1])
    np.testing.assert_allclose(A, np.mean([p[0] for p in parts], 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(B, np.mean([p[1] for p in parts], 0), rtol=1e-5, atol=1e-7)
    # one recurrence: simulate, save, load
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    pred = sim.simulate(cur, tids, V[:, 0])
    assert np.isfinite(pred).all()
    sim.save(tmp_path / "ens")
    back = load_simulator(tmp_path / "ens")
    assert isinstance(back.module, FactorEnsemble) and back.config.ensemble == 3
    assert [m["val_runs"] for m in back.history["members"]] == [list(v) for _, v in splits]  # saved in config.json
    np.testing.assert_array_equal(back.simulate(cur, tids, V[:, 0]), pred)
    # an ensemble written before a_factors (no train_mean buffers, no field) loads with per-pair A
    from gptfluence.simulators.common import read_artifact
    from gptfluence.simulators.gptfluence import GPTfluenceSimulator

    meta, tensors = read_artifact(tmp_path / "ens")
    meta["config"].pop("a_factors")
    old = GPTfluenceSimulator._from_artifact(meta, {k: v for k, v in tensors.items() if not k.endswith("train_mean")})
    assert old.config.a_factors == "pair" and all(m.a_pair for m in old.module.members)
    assert np.isfinite(old.simulate(cur, tids, V[:, 0])).all()


def test_gptfluence_a_factors_pool_mean_is_the_fitted_pair_a_averaged_over_the_training_pool(tmp_path, synth):
    """``a_factors="pool_mean"``: the same fit as the per-pair model (same seed), then every A_j(i, m)
    is the mean over the fitted training pool of the per-pair A_j(., m) (exact for linear
    projections: the similarity terms average to 0 by their centring); B is unchanged; save/load
    keeps it."""
    dyn, enc, fit, val, test = synth
    cfg = {**FAST, "hidden": 0, "order": 2, "b_projection": "pair"}  # B as fitted (its pool mean: the next test)
    pair = make_simulator("gptfluence", "loss", encoder=enc, **cfg, a_factors="pair")
    pool = make_simulator("gptfluence", "loss", encoder=enc, **cfg)  # the default: pool_mean
    assert pool.config.a_factors == "pool_mean"
    pair.fit(dyn, fit, val)
    hist = pool.fit(dyn, fit, val)
    assert hist["a_factors"] == "pool_mean" and pair.module.sim_dim > 0
    cur = np.concatenate([stack_curricula(dyn, fit), stack_curricula(dyn, val)])
    fitted_pool = np.unique(cur[cur >= 0])
    te = dyn.test_ids
    A_pair, B_pair = pair.factors(fitted_pool, te)
    A_pool, B_pool = pool.factors(fitted_pool, te)
    assert A_pair.std(axis=1).mean() > 1e-6  # the per-pair A vary over training examples ...
    np.testing.assert_allclose(A_pool, np.broadcast_to(A_pair.mean(axis=1, keepdims=True), A_pair.shape),
                               rtol=1e-4, atol=1e-6)  # ... the pool-mean ones are their mean, for every example
    np.testing.assert_allclose(B_pool, B_pair, rtol=1e-6, atol=1e-9)
    # A no longer depends on which training rows are asked for (a single one gives the same values)
    A_one, _ = pool.factors(fitted_pool[:1], te)
    np.testing.assert_allclose(A_one[:, 0], A_pool[:, 0], rtol=1e-6, atol=1e-9)
    V, _, tids = dyn.stack("loss", test)
    tcur = stack_curricula(dyn, test)
    pred = pool.simulate(tcur, tids, V[:, 0])
    assert np.isfinite(pred).all() and not np.allclose(pred, pair.simulate(tcur, tids, V[:, 0]))
    pool.save(tmp_path / "pool")
    back = load_simulator(tmp_path / "pool")
    assert back.config.a_factors == "pool_mean" and not back.module.a_pair
    np.testing.assert_array_equal(back.simulate(tcur, tids, V[:, 0]), pred)
    # an ensemble: each member averaged the same way
    ens = make_simulator("gptfluence", "loss", encoder=enc, **{**cfg, "ensemble": 2})
    ens.fit(dyn, fit, val)
    assert all(not m.a_pair for m in ens.module.members)
    A_ens, _ = ens.factors(fitted_pool, te)
    np.testing.assert_allclose(A_ens, np.broadcast_to(A_ens[:, :1], A_ens.shape), rtol=1e-5, atol=1e-7)


def test_gptfluence_b_projection_pool_mean_leaves_the_pair_specific_part_to_the_similarity_terms(synth):
    """``b_projection="pool_mean"``: B's projection term uses the fitted pool's mean feature on the
    training side; without similarity terms B is then the same for every training example and
    equals the pool mean of the per-pair fit's B (linear projections); with them, B minus that mean
    varies over training examples exactly as the similarity terms do."""
    dyn, enc, fit, val, test = synth
    cur = np.concatenate([stack_curricula(dyn, fit), stack_curricula(dyn, val)])
    pool_ids = np.unique(cur[cur >= 0])
    te = dyn.test_ids
    for sim_cfg in ({"similarity": "none", "lexical": False}, {}):
        cfg = {**FAST, "hidden": 0, "order": 2, **sim_cfg}
        pair = make_simulator("gptfluence", "loss", encoder=enc, **cfg, b_projection="pair")
        pool = make_simulator("gptfluence", "loss", encoder=enc, **cfg, b_projection="pool_mean")
        pair.fit(dyn, fit, val)
        hist = pool.fit(dyn, fit, val)
        assert hist["b_projection"] == "pool_mean" and not pool.module.b_pair
        A_pair, B_pair = pair.factors(pool_ids, te)
        A_pool, B_pool = pool.factors(pool_ids, te)
        np.testing.assert_allclose(A_pool, A_pair, rtol=1e-6, atol=1e-9)  # A as a_factors says (pool_mean both)
        np.testing.assert_allclose(B_pool.mean(0), B_pair.mean(0), rtol=1e-4, atol=1e-7)
        if not sim_cfg:
            assert B_pool.std(axis=0).mean() > 1e-6  # the similarity terms still tell examples apart
            continue
        assert B_pair.std(axis=0).mean() > 1e-6
        np.testing.assert_allclose(B_pool, np.broadcast_to(B_pool[:1], B_pool.shape), rtol=1e-5, atol=1e-8)


def test_factor_ensemble_rejects_members_with_other_buffers():
    from gptfluence.simulators.gptfluence import FactorEnsemble

    a = FeaturizedFactors(6, 0, 4, 1, share=False, factor_bias=True)
    b = FeaturizedFactors(6, 0, 4, 1, share=False, factor_bias=True)
    FactorEnsemble([a, b])  # same (zero) centres
    with torch.no_grad():
        b.center.fill_(1.0)
    with pytest.raises(ArtifactMismatchError, match="center"):
        FactorEnsemble([a, b])


# ---------------------------------------------------------------------------------------------
# lagged additive factors (b_lags)


@pytest.mark.parametrize("stream", [False, True])
def test_lagged_factors_rollout_equals_a_per_step_loop(stream, monkeypatch):
    """``lags`` L: slot n+l of the factor tensor acts on beta at step t through the batch of step
    t-l (steps before the first: nothing). Matrix rollout (all batch sums at once, or per step when
    they would not fit) == a plain loop over steps and lags."""
    if stream:
        monkeypatch.setattr(engine, "ROLLOUT_SUMS_MAX_ELEMS", 1)
    g = torch.Generator().manual_seed(5)
    n, L, N, M, R, T, b = 2, 3, 7, 4, 3, 9, 2
    Fp = engine.pad_factors(0.1 * torch.randn(n + 1 + L, N, M, generator=g))
    rows = torch.randint(0, N + 1, (R, T, b), generator=g)  # N = padding
    start = torch.randn(R, M, generator=g)
    fast = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L)
    hist, slow = [start] * n, [start]
    for t in range(T):
        s = [Fp[k][rows[:, t]].sum(1) for k in range(n + 1)]
        beta = s[n] + sum(Fp[n + lag][rows[:, t - lag]].sum(1) for lag in range(1, L + 1) if t - lag >= 0)
        new = hist[0] + beta + sum(s[j] * hist[j] for j in range(n))
        slow.append(new)
        hist = [new] + hist[:-1]
    torch.testing.assert_close(fast, torch.stack(slow, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order,gaps", [(1, False), (1, True), (2, False)])
def test_lagged_factors_teacher_forcing_reproduces_a_rollout(order, gaps):
    """Teacher forcing with lagged factors: from a rollout's own values as the 'recorded' ones, every
    one-step prediction (and, with unrecorded steps, every bridged segment: exact for order 1)
    equals the recorded value, so both objectives fit the same model."""
    g = torch.Generator().manual_seed(order + 2 * gaps)
    L, N, M, R, T, b = 2, 6, 3, 2, 8, 2
    Fp = engine.pad_factors(0.1 * torch.randn(order + 1 + L, N, M, generator=g))
    rows = torch.randint(0, N + 1, (R, T, b), generator=g)
    values = engine.rollout_tensor(Fp, rows, torch.randn(R, M, generator=g), residual=True, lags=L)
    if gaps:
        values[:, 3] = float("nan")
        values[1, 6, 1] = float("nan")
    block = engine.RunBlock(values, rows, torch.arange(M), 0)
    tr = block.transitions(order, bridge_gaps=True)
    pred, target = block.predict(Fp, tr, order, residual=True, lags=L)
    assert tr.shape[0] > 0
    torch.testing.assert_close(pred, target, rtol=1e-5, atol=1e-5)
    # without the lagged slots the same values are not reproduced
    assert not torch.allclose(block.predict(Fp[:order + 1], tr, order, residual=True)[0], target, atol=1e-4)


def _segment_pred_per_lag(Fp, rows_grid, r, k0, gap, cols, hist, residual, lags, scale_grid):
    """`engine.segment_pred` written lag by lag (one gather per lag, summed in lag order): the
    reference the vectorised lag gathering must equal bit for bit."""
    n = Fp.shape[0] - 1 - lags
    h = list(hist)
    last_row, pad_row = rows_grid.shape[1] - 1, Fp.shape[1] - 1
    for s in range(int(gap.max())):
        col = torch.clamp(k0 + s, max=last_row)
        rows = rows_grid[r, col]
        sums = Fp[:n + 1, rows, cols[:, None]].sum(-1) * scale_grid[r, col][None]
        lagged = []
        for lag in range(1, lags + 1):
            c = torch.clamp(k0 + s - lag, min=0, max=last_row)
            lag_rows = torch.where((k0 + s - lag >= 0)[:, None], rows_grid[r, c], torch.full_like(rows, pad_row))
            lagged.append(Fp[n + lag, lag_rows, cols[:, None]].sum(-1) * scale_grid[r, c])
        sums = torch.cat([sums[:n], (sums[n] + sum(lagged))[None]])
        new = engine.step_update(sums, h, residual)
        act = gap > s
        h = [torch.where(act, new, h[0])] + [torch.where(act, h[j - 1], h[j]) for j in range(1, len(h))]
    return h[0]


def test_vectorised_lag_gathering_equals_the_per_lag_loop_bit_for_bit():
    """Teacher forcing gathers all L lagged batches in one indexing op; predictions and the
    gradient of the factors equal the lag-by-lag form exactly (same values, same summation order),
    with padding before the first step, bridged gaps and learning-rate step scales, so results
    computed before the vectorisation are reproduced unchanged."""
    g = torch.Generator().manual_seed(31)
    n, L, N, M, R, T, b = 2, 5, 7, 4, 3, 9, 3
    F = (0.1 * torch.randn(n + 1 + L, N, M, generator=g)).requires_grad_(True)
    rows = torch.randint(0, N + 1, (R, T, b), generator=g)
    values = torch.randn(R, T + 1, M, generator=g)
    values[:, 4] = float("nan")
    values[2, 7, 1] = float("nan")
    w = torch.rand(R, T, generator=g)
    block = engine.RunBlock(values, rows, torch.arange(M), 0, w)
    tr = block.transitions(n, bridge_gaps=True)
    r, k0, gap, cols, hist, _ = block.gather(tr, n)
    assert int(gap.max()) > 1 and int(k0.min()) < L  # bridged segments, and lags reaching before step 1
    fast = engine.segment_pred(engine.pad_factors(F), rows, r, k0, gap, cols, hist, True, L, w)
    (g_fast,) = torch.autograd.grad((fast * torch.arange(len(fast))).sum(), F)
    slow = _segment_pred_per_lag(engine.pad_factors(F), rows, r, k0, gap, cols, hist, True, L, w)
    (g_slow,) = torch.autograd.grad((slow * torch.arange(len(slow))).sum(), F)
    assert torch.equal(fast, slow)
    assert torch.equal(g_fast, g_slow)
    assert g_fast[n + 1:].abs().sum() > 0  # the lagged slots did take part


def test_a_lagged_factor_that_cancels_b_makes_a_one_step_effect_by_hand():
    """Order 1, residual, A = 0; example 0 has B = +0.5 and D_1 = -0.5 on the test example, example
    1 has B = -0.2 and no lagged factor: example 0 raises the value for one step only, example 1
    lowers it for good."""
    F = torch.zeros(3, 2, 1)  # slots A_1, B, D_1; training rows 0, 1; one test column
    F[1, 0, 0], F[2, 0, 0] = 0.5, -0.5
    F[1, 1, 0] = -0.2
    rows = torch.tensor([[[2], [0], [2], [1], [2]]])  # row 2 = padding: steps 1..5 = -, ex 0, -, ex 1, -
    out = engine.rollout_tensor(engine.pad_factors(F), rows, torch.tensor([[1.0]]), residual=True, lags=1)
    np.testing.assert_allclose(out[0, :, 0].numpy(), [1.0, 1.0, 1.5, 1.0, 0.8, 0.8], atol=1e-6)


def _transient_dynamics(seed: int = 13):
    """Loss-like runs in which a training example first raises a similar test example's loss
    (+0.15 <h_i, h_m>, centred over the pool, for one step: -0.25 at the next) and lowers it for good
    (-0.1 <h_i, h_m>),
    on top of a shared trend: an effect with a sign that changes over time, which per-step factors
    of the current batch alone cannot express."""
    from gptfluence.dynamics.store import Dynamics, Run

    base, enc = synthetic_dynamics(n_runs=12, n_steps=30, n_train=48, n_test=16, dim=24, eta=0.0, seed=seed)
    Htr = enc.encode([e.text for e in base.task.train]).astype(np.float64)
    Hte = enc.encode([e.text for e in base.task.test]).astype(np.float64)
    S = Htr @ Hte.T
    S = S - S.mean(0)  # centred over the pool: a random batch moves nothing on average
    rng = np.random.default_rng(seed)
    runs = []
    for r in base.runs():
        now = S[r.curriculum].sum(1)  # [T, M]: summed similarity of each step's batch
        before = np.vstack([np.zeros((1, now.shape[1])), now[:-1]])
        steps = 0.15 * now - 0.25 * before  # +0.15 at once, -0.25 one step later: net -0.1
        phi = 3.0 - 0.01 * np.arange(31)[:, None] + np.vstack([np.zeros((1, S.shape[1])), np.cumsum(steps, 0)])
        phi = phi + 0.001 * rng.standard_normal(phi.shape)
        runs.append(Run(r.run_id, r.curriculum, r.steps, r.test_ids, {"loss": phi.astype(np.float32)}, seed=r.seed))
    return Dynamics(base.task, runs, manifest=dict(base.manifest, metrics=["loss"])), enc


def test_gptfluence_b_lags_learns_a_transient_effect_and_reloads(tmp_path):
    """``b_lags=1`` fits a transient effect (a similar example raises the loss for one step, then
    lowers it) better on held-out runs than the paper's model (``b_lags=0``), with the sign of the
    process: the lagged weight of the similarity term is negative where B's is positive; the lagged
    weights are part of the artifact; `factors` still returns A [n, N, M] and B [N, M];
    leave-one-out influence runs on it."""
    from gptfluence.analysis.influence import run_loo_influence

    dyn, enc = _transient_dynamics()
    ids = dyn.run_ids
    fit, val, test = ids[:8], ids[8:10], ids[10:]
    cfg = dict(order=1, epochs=100, patience=30, lr=1e-2, ensemble=1, similarity="features", lexical=False,
               objective="teacher_forcing")
    mse, sims = {}, {}
    for lags in (0, 1):
        sim = make_simulator("gptfluence", "loss", encoder=enc, b_lags=lags, **cfg)
        sim.fit(dyn, fit, val)
        mse[lags], _ = _heldout_mse(sim, dyn, test)
        sims[lags] = sim
    assert mse[1] < 0.9 * mse[0], mse  # measured: 0.81x
    sim = sims[1]
    assert sim.module.lag_weight.shape == (1, sim.module.sim_terms)
    assert float(sim.module.lag_weight[0, 0].detach()) < -0.1 < 0.1 < float(sim.module.sim_weight[1, 0].detach())
    tr, te = np.arange(len(dyn.task.train)), dyn.test_ids
    A, B = sim.factors(tr, te)
    assert A.shape == (sim.config.order, len(tr), len(te)) and B.shape == (len(tr), len(te))
    sim.save(tmp_path / "lags")
    back = load_simulator(tmp_path / "lags", dynamics=dyn)
    assert back.config.b_lags == 1
    np.testing.assert_array_equal(_heldout_mse(back, dyn, test)[1], _heldout_mse(sim, dyn, test)[1])
    infl = run_loo_influence(back, dyn.run(test[0]), dynamics=dyn)
    assert np.isfinite(infl.scores).all()


def test_b_lags_is_checked_and_needs_similarity_terms():
    """A negative ``b_lags`` is refused by name; the default (24) applies where there are similarity
    terms and gives no lagged factors without them (similarity none, no lexical term: the paper's
    factors), which the fit history records."""
    with pytest.raises(InputError, match="b_lags"):
        make_simulator("gptfluence", "loss", b_lags=-1)
    assert make_simulator("gptfluence", "loss").config.b_lags == 24
    dyn, enc = _transient_dynamics()
    fit, val = dyn.run_ids[:8], dyn.run_ids[8:10]
    bare = make_simulator("gptfluence", "loss", encoder=enc, similarity="none", lexical=False, ensemble=1, epochs=1)
    assert bare.fit(dyn, fit, val)["b_lags"] == 0 and bare.lags == 0 and not hasattr(bare.module, "lag_weight")
    ens = make_simulator("gptfluence", "loss", encoder=enc, similarity="features", lexical=False, ensemble=2, epochs=1)
    assert ens.fit(dyn, fit, val)["b_lags"] == 24 and ens.lags == 24
    assert all(m.lag_weight.shape == (24, m.sim_terms) for m in ens.module.members)


# ---------------------------------------------------------------------------------------------
# learning-rate-scaled steps (step_lr_scaling)


@pytest.mark.parametrize("stream,lag_step", [(False, False), (True, False), (False, True), (True, True)])
def test_step_scale_multiplies_each_steps_sums_in_rollouts_and_teacher_forcing(stream, lag_step, monkeypatch):
    """``step_scale`` w_t multiplies every batch sum of step t (A, B, and a lagged factor of the
    batch of step t where it acts, with that step's w; with ``lag_step_scale`` the lagged factor
    also by the w of the step at which it acts): rollout == a per-step loop; teacher forcing from
    the rollout's values reproduces them; all ones == no scaling, exactly."""
    if stream:
        monkeypatch.setattr(engine, "ROLLOUT_SUMS_MAX_ELEMS", 1)
    g = torch.Generator().manual_seed(9)
    n, L, N, M, R, T, b = 2, 2, 6, 3, 2, 8, 2
    Fp = engine.pad_factors(0.1 * torch.randn(n + 1 + L, N, M, generator=g))
    rows = torch.randint(0, N + 1, (R, T, b), generator=g)
    start = torch.randn(R, M, generator=g)
    w = torch.rand(R, T, generator=g)
    fast = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=w, lag_step_scale=lag_step)
    hist, slow = [start] * n, [start]
    for t in range(T):
        s = [Fp[k][rows[:, t]].sum(1) * w[:, t, None] for k in range(n + 1)]
        at = w[:, t, None] if lag_step else 1.0
        beta = s[n] + sum(Fp[n + lag][rows[:, t - lag]].sum(1) * w[:, t - lag, None] * at
                          for lag in range(1, L + 1) if t - lag >= 0)
        new = hist[0] + beta + sum(s[j] * hist[j] for j in range(n))
        slow.append(new)
        hist = [new] + hist[:-1]
    torch.testing.assert_close(fast, torch.stack(slow, 1), rtol=1e-5, atol=1e-6)
    ones = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=torch.ones(R, T),
                                 lag_step_scale=lag_step)
    unscaled = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L)
    if lag_step:  # the lagged sums are added up before scaling: equal up to rounding
        torch.testing.assert_close(ones, unscaled, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(ones, unscaled)
    block = engine.RunBlock(fast.clone(), rows, torch.arange(M), 0, w, lag_step)
    tr = block.transitions(n, bridge_gaps=True)
    pred, target = block.predict(Fp, tr, n, residual=True, lags=L)
    torch.testing.assert_close(pred, target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lag_step", [False, True])
def test_streamed_and_batched_rollouts_with_lags_and_step_scales_are_identical(lag_step, monkeypatch):
    """The step-by-step rollout (beyond ROLLOUT_SUMS_MAX_ELEMS: long runs, LOO over many curricula)
    adds the lagged sums in the same order as the all-at-once one, so which path a chunk of
    curricula takes does not change a value, under either lagged-factor scaling."""
    g = torch.Generator().manual_seed(21)
    n, L, N, M, R, T, b = 2, 6, 9, 4, 4, 30, 3
    Fp = engine.pad_factors(0.1 * torch.randn(n + 1 + L, N, M, generator=g))
    rows = torch.randint(0, N + 1, (R, T, b), generator=g)
    start = torch.randn(R, M, generator=g)
    w = torch.rand(1, T, generator=g)
    batched = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=w, lag_step_scale=lag_step)
    monkeypatch.setattr(engine, "ROLLOUT_SUMS_MAX_ELEMS", 1)
    streamed = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=w, lag_step_scale=lag_step)
    assert torch.equal(batched, streamed)


def test_teacher_forcing_with_lags_on_an_empty_grid_or_no_transitions():
    """No transitions, or a grid without steps: the lagged gathers return the history unchanged
    (no error from padding an empty grid)."""
    n, L, N, M, R, b = 1, 4, 5, 3, 2, 2
    Fp = engine.pad_factors(torch.randn(n + 1 + L, N, M))
    e = torch.zeros(0, dtype=torch.long)
    for S1 in (0, 6):
        rows = torch.randint(0, N, (R, S1, b))
        out = engine.segment_pred(Fp, rows, e, e, e, e, torch.zeros(n, 0), True, L, torch.ones(R, S1), True)
        assert out.shape == (0,)


def test_a_step_with_learning_rate_zero_changes_nothing_only_when_lags_scale_by_it():
    """b_lags_lr_scaling: with ``lag_step_scale`` (batch_and_step) a step whose learning rate is 0
    leaves every value where it was, lagged factors of earlier batches included; with the batch
    scaling alone the earlier batches' lagged factors still move the value at that step."""
    g = torch.Generator().manual_seed(4)
    n, L, N, M, R, T, b = 1, 3, 5, 2, 2, 6, 2
    Fp = engine.pad_factors(0.1 * torch.randn(n + 1 + L, N, M, generator=g))
    rows = torch.randint(0, N, (R, T, b), generator=g)
    start = torch.randn(R, M, generator=g)
    w = torch.ones(R, T)
    w[:, 4] = 0.0  # step 5 trains with learning rate 0
    both = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=w, lag_step_scale=True)
    assert torch.equal(both[:, 5], both[:, 4])
    batch = engine.rollout_tensor(Fp, rows, start, residual=True, lags=L, step_scale=w)
    assert not torch.allclose(batch[:, 5], batch[:, 4])
    torch.testing.assert_close(both[:, :5], batch[:, :5], rtol=1e-6, atol=1e-7)  # w_t = 1 before: the same


def test_b_lags_lr_scaling_default_is_saved_and_an_artifact_without_it_loads_as_batch(tmp_path):
    """Under a decaying schedule with lagged factors the two scalings simulate differently; the
    default (batch_and_step) is written to config.json and reloaded with identical predictions; an
    artifact that predates the field (no ``b_lags_lr_scaling`` in its config) loads as ``batch``,
    the scaling it was made with."""
    import json

    dyn, enc = _decaying_lr_dynamics()
    ids = dyn.run_ids
    cfg = dict(order=1, epochs=3, lr=3e-3, ensemble=1, similarity="features", lexical=False, b_lags=3,
               objective="teacher_forcing")
    sim = make_simulator("gptfluence", "loss", encoder=enc, **cfg)
    assert sim.config.b_lags_lr_scaling == "batch_and_step"
    sim.fit(dyn, ids[:8], ids[8:10])
    with torch.no_grad():  # lagged weights that are not all 0, so the two scalings differ
        sim.module.lag_weight.add_(0.5)
    _, pred = _heldout_mse(sim, dyn, ids[10:])
    sim.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["config"]["b_lags_lr_scaling"] == "batch_and_step"
    back = load_simulator(tmp_path / "a", dynamics=dyn)
    np.testing.assert_array_equal(_heldout_mse(back, dyn, ids[10:])[1], pred)
    del meta["config"]["b_lags_lr_scaling"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    old = load_simulator(tmp_path / "a", dynamics=dyn)
    assert old.config.b_lags_lr_scaling == "batch"
    assert not np.allclose(_heldout_mse(old, dyn, ids[10:])[1], pred, atol=1e-4)


def test_schedule_factors_are_the_fine_tunings_learning_rates():
    """`schedule_factors` == the learning rates `make_optimizer`'s scheduler sets (over the peak),
    as `collect` trains: warmup, then constant or linear decay to 0."""
    from gptfluence.lm.training import make_optimizer, schedule_factors

    for schedule, warmup in (("linear", 3), ("constant", 2), ("linear", 0)):
        opt, sched = make_optimizer(torch.nn.Linear(1, 1), lr=0.5, warmup_steps=warmup, total_steps=10,
                                    schedule=schedule)
        got = []
        for _ in range(10):
            got.append(sched.get_last_lr()[0] / 0.5)
            opt.step()
            sched.step()
        np.testing.assert_allclose(schedule_factors(10, warmup, schedule), got, rtol=1e-12)
    np.testing.assert_allclose(schedule_factors(4, 0, "linear"), [1.0, 0.75, 0.5, 0.25])


def _decaying_lr_dynamics(schedule: str = "linear", seed: int = 17):
    """Loss-like runs fine-tuned under a learning rate that decays linearly to 0 over the run: a
    training example lowers a similar test example's loss by -0.05 <h_i, h_m> (centred) times the
    step's learning rate over the peak; the store's manifest records the schedule as `collect`
    writes it."""
    from gptfluence.dynamics.store import Dynamics, Run
    from gptfluence.lm.training import schedule_factors

    base, enc = synthetic_dynamics(n_runs=12, n_steps=30, n_train=48, n_test=16, dim=24, eta=0.0, seed=seed)
    Htr = enc.encode([e.text for e in base.task.train]).astype(np.float64)
    Hte = enc.encode([e.text for e in base.task.test]).astype(np.float64)
    S = Htr @ Hte.T
    S = S - S.mean(0)
    w = schedule_factors(30, 0, schedule)
    rng = np.random.default_rng(seed)
    runs = []
    for r in base.runs():
        steps = -0.05 * S[r.curriculum].sum(1) * w[:, None]
        phi = 3.0 - 0.01 * np.arange(31)[:, None] + np.vstack([np.zeros((1, S.shape[1])), np.cumsum(steps, 0)])
        phi = phi + 0.001 * rng.standard_normal(phi.shape)
        runs.append(Run(r.run_id, r.curriculum, r.steps, r.test_ids, {"loss": phi.astype(np.float32)}, seed=r.seed))
    manifest = dict(base.manifest, metrics=["loss"], config={"model": "default", "lr_schedule": schedule,
                                                             "warmup_steps": 0})
    return Dynamics(base.task, runs, manifest=manifest), enc


def test_step_lr_scaling_follows_the_stores_schedule_and_fits_a_decaying_one_better(tmp_path):
    """With the store's linear-decay schedule, ``step_lr_scaling`` (default) weights each step by
    its learning rate: held-out MSE well below the stationary model's (``step_lr_scaling=False``);
    the schedule is saved in the artifact and reloaded; a constant schedule or a store without a
    collection config gives no weights (the stationary model)."""
    dyn, enc = _decaying_lr_dynamics()
    ids = dyn.run_ids
    fit, val, test = ids[:8], ids[8:10], ids[10:]
    cfg = dict(order=1, epochs=60, patience=20, lr=3e-3, ensemble=1, similarity="features", lexical=False,
               b_lags=0, objective="teacher_forcing")
    mse, sims = {}, {}
    for on in (False, True):
        sim = make_simulator("gptfluence", "loss", encoder=enc, step_lr_scaling=on, **cfg)
        hist = sim.fit(dyn, fit, val)
        mse[on], _ = _heldout_mse(sim, dyn, test)
        sims[on] = sim
        assert (hist["lr_spec"] is not None) == on
    assert mse[True] < 0.7 * mse[False], mse  # measured: 0.45x (the mean curve: 1.6x)
    w = sims[True].step_weights(30)
    np.testing.assert_allclose(w, np.arange(30, 0, -1) / 30)
    sims[True].save(tmp_path / "lr")
    back = load_simulator(tmp_path / "lr", dynamics=dyn)
    assert back.lr_spec == {"lr_schedule": "linear", "warmup_steps": 0}
    np.testing.assert_array_equal(_heldout_mse(back, dyn, test)[1], _heldout_mse(sims[True], dyn, test)[1])
    const, _ = _decaying_lr_dynamics("constant")
    sim = make_simulator("gptfluence", "loss", encoder=enc, **{**cfg, "epochs": 1})
    sim.fit(const, fit, val)
    assert sim.lr_spec is not None and sim.step_weights(30) is None
    bare, _ = _transient_dynamics()  # no collection config in the manifest
    sim = make_simulator("simfluence", "loss", epochs=1)
    sim.fit(bare, fit, val)
    assert sim.lr_spec is None and sim.step_weights(30) is None
