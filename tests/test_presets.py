"""The paper presets (gptfluence_paper, simfluence_paper): one test per item of
`gptfluence.simulators.presets` where one can be written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptfluence.errors import InputError
from gptfluence.simulators import METHODS, default_method_names, load_simulator, make_simulator, method_config
from gptfluence.simulators import engine
from gptfluence.simulators.common import stack_curricula
from gptfluence.simulators.presets import PAPER_ENCODER, PAPER_PRESETS
from gptfluence.simulators.synthetic import synthetic_dynamics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth():
    dyn, enc = synthetic_dynamics(n_runs=6, n_steps=20, n_train=40, n_test=12, batch=4, dim=16, eta=0.06, seed=5)
    ids = dyn.run_ids
    return dyn, enc, ids[:4], ids[4:5], ids[5:]


def test_preset_config_values_and_overrides():
    g = method_config("gptfluence_paper")
    expect_g = dict(encoder=PAPER_ENCODER, hidden=384, proj_dim=384, share_projection=True, residual=False,
                    factor_bias=False, init="pytorch_default", center_features=False, similarity="none", lexical=False,
                    normalize=False, detrend=False, optimizer="adam_l2", weight_decay=1e-5, lr=1e-4, batch_size=128,
                    min_steps_per_epoch=0, lr_schedule="warmup_linear_decay", warmup_steps=200, epochs=300,
                    early_stopping="consecutive_increases", patience=10, history_padding="zeros", order=1,
                    objective="teacher_forcing")
    assert {k: getattr(g, k) for k in expect_g} == expect_g
    s = method_config("simfluence_paper")
    expect_s = dict(residual=False, init="normal", l2_penalty=0.0, normalize=False, detrend=False,
                    optimizer="adam_l2", weight_decay=1e-5, lr=1e-3, batch_size=128, min_steps_per_epoch=0,
                    lr_schedule="warmup_linear_decay", warmup_steps=200, epochs=300,
                    early_stopping="consecutive_increases", patience=10)
    assert {k: getattr(s, k) for k in expect_s} == expect_s
    # user overrides apply after the preset; the method name is the preset's
    sim = make_simulator("gptfluence_paper", "loss", epochs=3)
    assert sim.config.epochs == 3 and sim.config.lr == 1e-4 and sim.method == "gptfluence_paper"
    # our defaults are not the preset's (nothing leaked into the base classes)
    assert method_config("gptfluence").optimizer == "adamw" and method_config("simfluence").init == "zeros"
    assert METHODS["gptfluence_paper"].preset is PAPER_PRESETS["gptfluence"]
    assert "gptfluence_paper" not in default_method_names() and "gptfluence" in default_method_names()


def test_unknown_choices_are_refused_by_field_name():
    for field, method in (("optimizer", "gptfluence"), ("lr_schedule", "simfluence"), ("early_stopping", "gptfluence"),
                          ("history_padding", "gptfluence"), ("init", "gptfluence"), ("init", "simfluence")):
        with pytest.raises(InputError, match=field):
            make_simulator(method, "loss", **{field: "bogus"})


def test_paper_encoder_is_minilm_cls_unnormalised_512():
    from transformers import AutoModel, AutoTokenizer

    from gptfluence.features.encoders import load_encoder, minilm_path

    enc = load_encoder(PAPER_ENCODER)
    assert enc.spec()["pooling"] == "cls" and enc.spec()["normalize"] is False and enc.spec()["max_length"] == 512
    texts = ["Review: a warm, funny film.\nSentiment: positive", "word " * 700]  # the second is truncated at 512
    got = enc.encode(texts)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = AutoModel.from_pretrained(str(minilm_path())).eval()
    with torch.no_grad():
        for i, t in enumerate(texts):
            b = tok([t], return_tensors="pt", truncation=True, max_length=512)
            want = model(**b).last_hidden_state[0, 0].numpy()  # the authors' features: first token, raw
            np.testing.assert_allclose(got[i], want, atol=2e-4)
    assert abs(float(np.linalg.norm(got[0])) - 1.0) > 0.1  # not unit vectors


def test_shared_mlp_per_factor_and_pytorch_default_init(synth):
    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence_paper", "loss", encoder=enc, epochs=0)  # no epoch: the initial weights
    sim.fit(dyn, fit, val)
    mod = sim.module
    assert mod.g is None and len(mod.f) == 2 and mod.bias is None  # one MLP per factor for both sides, no bias
    for proj in mod.f:
        assert proj.l1.weight.shape == (384, 16) and proj.l2.weight.shape == (384, 384)
        for lin in (proj.l1, proj.l2):  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
            bound = 1 / math.sqrt(lin.in_features)
            w = lin.weight.detach()
            assert float(w.abs().max()) <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
    # A_k(i, m) = <f_k(h_i), f_k(h_m)>: the same MLP on both sides
    h = torch.as_tensor(sim.train_features.get([0, 1], "training"))
    hm = torch.as_tensor(sim.test_features.get([2], "test"))
    A = mod(h, hm)
    torch.testing.assert_close(A[1, :, 0], mod.f[1](h) @ mod.f[1](hm)[0])


def test_alpha_is_the_batch_sum_of_A_without_offset(synth):
    dyn, enc, fit, val, test = synth
    for method in ("gptfluence_paper", "simfluence_paper"):
        kw = {"encoder": enc} if method == "gptfluence_paper" else {}
        sim = make_simulator(method, "loss", epochs=0, **kw)
        sim.fit(dyn, fit, val)
        cur = stack_curricula(dyn, fit[:1])[:, :1]  # one step, one batch
        batch = cur[0, 0]
        A, B = sim.factors(batch, [3])
        start = np.array([[2.0]])
        out = sim.simulate(cur, [3], start)
        # raw values (scale 1): phi_1 = (sum_i A(i, m)) phi_0 + sum_i B(i, m), no identity, no bias
        assert sim.scale == 1.0 and sim.residual is False
        np.testing.assert_allclose(out[0, 1, 0], A[0, :, 0].sum() * 2.0 + B[:, 0].sum(), rtol=1e-5)


def test_simfluence_normal_init_statistics(synth):
    dyn, enc, fit, val, test = synth
    sim = make_simulator("simfluence_paper", "loss", epochs=0)
    sim.fit(dyn, fit, val)
    F = sim.module.F.detach()
    assert F.shape == (2, 40, 12)
    assert abs(float(F.mean())) < 0.1 and abs(float(F.std()) - 1.0) < 0.1
    zero = make_simulator("simfluence", "loss", epochs=0)
    zero.fit(dyn, fit, val)
    assert float(zero.module.F.detach().abs().max()) == 0.0


def test_simfluence_unsquared_l2_term_enters_the_training_loss(synth):
    dyn, enc, fit, val, test = synth
    loss = {}
    for lam in (0.0, 0.5):
        # lr 0: the parameters stay at their (seeded, identical) init; the epoch's mean loss is
        # the teacher-forced MSE plus the penalty
        sim = make_simulator("simfluence_paper", "loss", epochs=1, lr=1e-12, l2_penalty=lam)  # lr > 0 is required; this small, nothing moves
        h = sim.fit(dyn, fit, val)
        loss[lam] = h["train_loss"][0]
        F = sim.module.F.detach().double()
    want = 0.5 * (math.sqrt(float((F[0] ** 2).sum())) + math.sqrt(float((F[1] ** 2).sum())))
    assert loss[0.5] - loss[0.0] == pytest.approx(want, rel=1e-4)
    assert sim._penalty()().item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(InputError, match="l2_penalty"):
        make_simulator("simfluence", "loss", l2_penalty=-1.0)


def test_adam_with_coupled_weight_decay():
    def one_step(kind: str) -> float:
        p = torch.nn.Parameter(torch.tensor([2.0]))
        opt = engine.make_optimizer(kind, [p], lr=0.1, weight_decay=0.01)
        (p * 0.0).sum().backward()  # zero loss gradient: only the weight decay acts
        opt.step()
        return float(p.detach())

    assert type(engine.make_optimizer("adam_l2", [torch.nn.Parameter(torch.ones(1))], 0.1, 0.0)) is torch.optim.Adam
    # coupled: the decay is a gradient (wd * p), normalised by Adam: the first step moves by lr
    assert one_step("adam_l2") == pytest.approx(2.0 - 0.1, abs=1e-6)
    # decoupled (AdamW): p * (1 - lr * wd), Adam's own step is 0
    assert one_step("adamw") == pytest.approx(2.0 * (1 - 0.1 * 0.01), abs=1e-7)


def test_linear_warmup_then_decay_schedule():
    f = lambda s: engine.lr_factor("warmup_linear_decay", s, 200, 1000)  # noqa: E731
    assert [f(s) for s in (0, 100, 200, 600, 999, 1000, 1200)] == pytest.approx([0, 0.5, 1, 0.5, 1 / 800, 0, 0])
    g = lambda s: engine.lr_factor("warmup_constant", s, 20, 1000)  # noqa: E731
    assert [g(s) for s in (0, 9, 19, 500)] == pytest.approx([1 / 20, 0.5, 1, 1])
    # the same multipliers as transformers' get_linear_schedule_with_warmup (the authors' call)
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.Adam([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=30)
    theirs = []
    for _ in range(32):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert theirs == pytest.approx([engine.lr_factor("warmup_linear_decay", s, 7, 30) for s in range(32)])


def test_fit_uses_the_schedule_over_the_maximum_epochs(synth, monkeypatch):
    dyn, enc, fit, val, test = synth
    seen = []
    real = engine.lr_factor

    def spy(schedule, step, warmup, total):
        seen.append((schedule, warmup, total))
        return real(schedule, step, warmup, total)

    monkeypatch.setattr(engine, "lr_factor", spy)
    sim = make_simulator("simfluence_paper", "loss", epochs=3)
    h = sim.fit(dyn, fit, val)
    assert {s[:2] for s in seen} == {("warmup_linear_decay", 200)}
    assert {s[2] for s in seen} == {3 * h["steps_per_epoch"]} and h["batch_size"] == 128


def test_consecutive_increases_rule_on_a_constructed_history():
    hist = [5.0, 4.0, 4.5, 4.6, 4.4, 4.7, 4.8, 4.9, 3.0]

    def run(rule: str, initial: float | None = None) -> tuple[int, int]:
        es = engine.EarlyStopping(rule, patience=3, initial=initial)
        for epoch, v in enumerate(hist, start=1):
            _, stop = es.update(epoch, v)
            if stop:
                return epoch, es.best_epoch
        return len(hist), es.best_epoch

    # authors: a counter of epochs each above the *previous* one (4.5, 4.6 | reset by 4.4 | 4.7, 4.8, 4.9)
    assert run("consecutive_increases") == (8, 2)
    # ours: epochs without a new best (4.5, 4.6, 4.4 are all above 4.0)
    assert run("patience") == (5, 2)
    # the untrained start competes only in ours
    assert run("patience", initial=1.0) == (3, 0)
    assert run("consecutive_increases", initial=1.0) == (8, 2)
    es = engine.EarlyStopping("consecutive_increases", 2)
    assert es.update(1, float("nan")) == (False, False) and es.update(2, 1.0) == (True, False)


def test_zero_history_padding_in_a_hand_computed_order2_rollout():
    # one training example, one test example: A_1 = 0.5, A_2 = 0.25, B = 1; alpha_j = sum A_j
    Fp = engine.pad_factors(torch.tensor([[[0.5]], [[0.25]], [[1.0]]]))
    rows = torch.zeros(1, 3, 1, dtype=torch.long)
    start = torch.tensor([[2.0]])
    zeros = engine.rollout_tensor(Fp, rows, start, residual=False, zero_history=True)[0, :, 0]
    # phi_1 = .5*2 + .25*0 + 1 = 2; phi_2 = .5*2 + .25*2 + 1 = 2.5; phi_3 = .5*2.5 + .25*2 + 1 = 2.75
    assert zeros.tolist() == pytest.approx([2.0, 2.0, 2.5, 2.75])
    padded = engine.rollout_tensor(Fp, rows, start, residual=False)[0, :, 0]
    assert padded.tolist() == pytest.approx([2.0, 2.5, 2.75, 3.0])  # history = start: .5*2 + .25*2 + 1, then as above
    # teacher forcing: the first transition sees phi_{-1} = 0
    block = engine.RunBlock(torch.tensor([[[2.0], [2.0], [2.5]]]), rows[:, :2], torch.tensor([0]), 0)
    tr = block.transitions(2, bridge_gaps=True)
    pred, target = block.predict(Fp, tr, 2, residual=False, zero_history=True)
    assert pred.tolist() == pytest.approx([2.0, 2.5])
    pred_start, _ = block.predict(Fp, tr, 2, residual=False)
    assert pred_start.tolist() == pytest.approx([2.5, 2.5])


def test_simulator_with_zero_history_padding_rolls_out_with_zeros(synth):
    dyn, enc, fit, val, test = synth
    sim = make_simulator("gptfluence_paper", "loss", encoder=enc, epochs=0, order=2)
    sim.fit(dyn, fit, val)
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    got = sim.simulate(cur, tids, V[:, 0])
    rows = np.searchsorted(np.unique(cur[cur >= 0]), cur)
    with torch.no_grad():
        F = sim._factor_fn(np.unique(cur[cur >= 0]), tids, "error")()
        want = engine.rollout_tensor(engine.pad_factors(F), torch.as_tensor(rows), torch.as_tensor(V[:, 0]),
                                     residual=False, zero_history=True)
        other = engine.rollout_tensor(engine.pad_factors(F), torch.as_tensor(rows), torch.as_tensor(V[:, 0]),
                                      residual=False)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, other.numpy(), rtol=1e-3)


def test_preset_artifact_roundtrip_keeps_the_preset(tmp_path, synth):
    dyn, enc, fit, val, test = synth
    sim = make_simulator("simfluence_paper", "loss", epochs=2)
    sim.fit(dyn, fit, val)
    sim.save(tmp_path / "s")
    back = load_simulator(tmp_path / "s", dynamics=dyn)
    assert back.method == "simfluence_paper" and back.residual is False and back.config.init == "normal"
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    np.testing.assert_array_equal(sim.simulate(cur, tids, V[:, 0]), back.simulate(cur, tids, V[:, 0]))


def test_cli_fit_preset_paper_and_evaluate_by_name(tmp_path, synth, capsys):
    import json

    from gptfluence.cli import main

    dyn, enc, fit, val, test = synth
    store = str(dyn.save(tmp_path / "store").root)
    assert main(["fit", store, "--method", "simfluence", "--preset", "paper", "--epochs", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["method"] == "simfluence_paper" and cfg["config"]["init"] == "normal" and cfg["config"]["epochs"] == 2
    assert cfg["config"]["optimizer"] == "adam_l2" and cfg["residual"] is False
    assert main(["fit", store, "--method", "constant", "--preset", "paper", "--out", str(tmp_path / "c")]) == 2
    assert "no such preset" in capsys.readouterr().err
    out = tmp_path / "ev.json"
    assert main(["evaluate", store, "--methods", "gptfluence_paper", "mean_curve", "--metrics", "loss", "--epochs", "1",
                 "--encoder", "bow:16", "--no-progress", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["method"] for r in d["results"]] == ["gptfluence_paper", "mean_curve"]
    assert d["config"]["method_configs"]["gptfluence_paper"]["lr_schedule"] == "warmup_linear_decay"


def test_artifacts_without_the_new_fields_load_with_the_old_behaviour(tmp_path, synth):
    import json

    dyn, enc, fit, val, test = synth
    sim = make_simulator("simfluence", "loss", epochs=2)
    sim.fit(dyn, fit, val)
    sim.save(tmp_path / "s")
    cfg_path = tmp_path / "s" / "config.json"
    meta = json.loads(cfg_path.read_text())
    for k in ("residual", "init", "l2_penalty", "optimizer", "lr_schedule", "early_stopping"):
        meta["config"].pop(k)
    cfg_path.write_text(json.dumps(meta))
    back = load_simulator(tmp_path / "s")
    c = back.config
    assert (c.residual, c.init, c.l2_penalty, c.optimizer, c.lr_schedule, c.early_stopping) == (
        True, "zeros", 0.0, "adamw", "warmup_constant", "patience")
    assert back.residual is True
    V, _, tids = dyn.stack("loss", test)
    cur = stack_curricula(dyn, test)
    np.testing.assert_array_equal(sim.simulate(cur, tids, V[:, 0]), back.simulate(cur, tids, V[:, 0]))
