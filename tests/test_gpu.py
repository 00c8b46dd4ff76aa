"""GPU tier: run with `pytest -m gpu` on a machine with CUDA (deselected by default)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_collect_on_cuda_matches_shapes_and_learns(tmp_path, monkeypatch):
    from gptfluence.dynamics.collect import CollectConfig, collect

    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "cache"))
    cfg = CollectConfig(task="data2text", n_train=16, n_test=6, examples_per_run=8, batch_size=4, epochs=2,
                        model_layers=1, model_hidden=32, model_pretrain_steps=20, gen_every=1,
                        gen_max_new_tokens=8, device="cuda")
    store = collect(cfg, tmp_path / "dyn", runs=2, progress=False)
    run = store.run(store.run_ids[0])
    assert run.info["device"].startswith("cuda")
    loss = run.trajectory("loss")
    assert np.isfinite(loss).all() and loss.shape == (run.num_steps + 1, 6)

    # checkpoint gradient features (replayed run) on CUDA agree with the CPU ones
    from gptfluence.features import LossGradientEncoder

    ex = store.task.train[:4]
    feats = {d: LossGradientEncoder.for_dynamics(store, dim=64, checkpoints=2, run_id=store.run_ids[0],
                                                 device=d).encode_examples(ex) for d in ("cpu", "cuda")}
    cos = (feats["cpu"] * feats["cuda"]).sum(1)  # mean per-checkpoint cosine (unit blocks / sqrt(2))
    assert cos.min() > 0.95, cos


def test_gptfluence_fit_on_cuda_matches_cpu_rollout(tmp_path):
    from gptfluence.simulators import make_simulator
    from gptfluence.simulators.synthetic import synthetic_dynamics

    dyn, enc = synthetic_dynamics(n_runs=6, n_steps=30, n_train=40, n_test=10)
    preds = {}
    for device in ("cpu", "cuda"):
        sim = make_simulator("gptfluence", "loss", encoder=enc, epochs=3, device=device)
        sim.fit(dyn, dyn.run_ids[:-2], dyn.run_ids[-2:-1])
        r = dyn.run(dyn.run_ids[-1])
        preds[device] = sim.simulate(r.curriculum[None], r.test_ids, r.trajectory("loss")[:1])
    assert np.abs(preds["cpu"] - preds["cuda"]).max() < 1e-2


def test_paper_presets_fit_on_cuda_like_on_cpu():
    from gptfluence.simulators import make_simulator
    from gptfluence.simulators.synthetic import synthetic_dynamics

    dyn, enc = synthetic_dynamics(n_runs=6, n_steps=20, n_train=40, n_test=10, dim=32)
    r = dyn.run(dyn.run_ids[-1])
    for method in ("gptfluence_paper", "simfluence_paper"):
        out = {}
        for device in ("cpu", "cuda"):
            kw = {"encoder": enc} if method == "gptfluence_paper" else {}
            sim = make_simulator(method, "loss", epochs=3, device=device, **kw)
            h = sim.fit(dyn, dyn.run_ids[:-2], dyn.run_ids[-2:-1])
            one_step = sim.simulate(r.curriculum[None, :1], r.test_ids, r.trajectory("loss")[:1])
            out[device] = (np.array(h["train_loss"]), one_step)
        np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], rtol=1e-3)
        np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], rtol=1e-3, atol=1e-4)


def test_batched_backend_on_cuda_matches_sequential_cuda(tmp_path, monkeypatch):
    """Several runs at once (torch.func, bf16 autocast) against one at a time on the same GPU."""
    from gptfluence.dynamics.collect import CollectConfig, collect

    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "cache"))
    cfg = CollectConfig(task="data2text", n_train=16, n_test=6, examples_per_run=8, batch_size=4, epochs=2,
                        model_layers=1, model_hidden=32, model_pretrain_steps=20, gen_every=2,
                        gen_max_new_tokens=8, device="cuda")
    seq = collect(cfg, tmp_path / "seq", runs=3, workers=1, progress=False)
    bat = collect(cfg, tmp_path / "bat", runs=3, backend="batched", runs_per_batch=0, progress=False)
    for rid in seq.run_ids:
        a, b = seq.run(rid), bat.run(rid)
        assert np.array_equal(a.curriculum, b.curriculum)
        d = np.abs(a.values["loss"] - b.values["loss"])
        assert np.isfinite(b.values["loss"]).all() and d.max() < 0.05, d.max()  # bf16 autocast on both paths


def test_lean_greedy_decoding_on_cuda_under_bf16_agrees_with_generate(tmp_path, monkeypatch):
    """The decoding modes of collection on CUDA under bf16 autocast: generate (hf), the lean loop with
    a dynamic cache (loop), a static cache (static) and a static cache with the one-token step
    compiled into CUDA graphs (compile) give (nearly) the same continuations of a fine-tuned model."""
    from gptfluence.dynamics.collect import CollectConfig, load_task_for, model_spec
    from gptfluence.lm import causal_lm_loss, ensure_default_model, load_model, make_optimizer, prepare_eval, \
        tokenize_examples
    from gptfluence.lm.decoding import greedy_tokens
    from gptfluence.lm.evaluation import _hf_generate, greedy_generate

    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "cache"))
    cfg = CollectConfig(task="data2text", n_train=64, n_test=24, model_layers=1, model_hidden=32,
                        model_pretrain_steps=20, device="cuda")
    task = load_task_for(cfg)
    model, tok = load_model(str(ensure_default_model(model_spec(cfg)[1], progress=False)), device="cuda")
    data = tokenize_examples(tok, task.train, cfg.max_length)
    opt, _ = make_optimizer(model, lr=3e-3, weight_decay=0.0, warmup_steps=0, total_steps=40)
    model.train()
    for t in range(40):
        b = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in data.batch([(8 * t + j) % 64 for j in range(8)]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    es = prepare_eval(tok, task.test, cfg.max_length)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        texts = {m: greedy_generate(model, tok, es, max_new_tokens=16, batch_size=8, decode=m)
                 for m in ("hf", "loop", "static", "compile", "compile")}  # compile twice: graphs reused
    assert sum(bool(s) for s in texts["hf"]) >= 12
    for m in ("loop", "static", "compile"):
        same = sum(a == b for a, b in zip(texts[m], texts["hf"]))
        assert same >= 0.8 * len(es), (m, same, texts[m], texts["hf"])
    # token level, one left-padded batch: the dynamic loop without compaction runs generate's shapes
    width = max(len(p) for p in es.prompt_ids)
    ids = torch.full((len(es), width), es.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(es.prompt_ids):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = _hf_generate(model, ids, mask, 16, list(es.stop_token_ids), es.pad_token_id)
        outs = {kw: greedy_tokens(model, ids, mask, 16, es.stop_token_ids, es.pad_token_id, **dict(kw))
                for kw in ((("compact", 0.0),), (), (("cache", "static"),), (("cache", "static"), ("compile", True)))}
    for kw, got in outs.items():
        n = min(got.shape[1], want.shape[1])
        agree = (got[:, :n] == want[:, :n]).float().mean().item()
        assert agree >= 0.9, (kw, agree)
