"""Matrix-form GPTfluence vs the research code's structure, side by side in one process.

Data: synthetic-but-realistic dynamics of the size in shared/design/measurements.md (16 runs x 150
steps x 100 test examples x a pool of 200 training examples, batch 8, 384-d features from the
hashing bag-of-words encoder: the same width as MiniLM, so the same model size; the metric follows
a known GPTfluence-like process, see `gptfluence.simulators.synthetic`), or a store (``--dynamics``).
Simulator: the paper preset's size (one MLP 384 -> 384 -> 384 per factor shared by the train and
the test side, order 1).

Measured (one thread for everything unless ``--threads``). Every time is the CPU time of this
process (``time.process_time``): on a shared machine other load inflates wall time but not the
work done; wall seconds are recorded beside (``wall``).

* fit, like for like (``fit_speedup``): the ``gptfluence_paper`` preset in our engine (Adam with
  coupled weight decay, batches of 128 transitions, the factor matrices of the whole pool computed
  once per optimizer step) against a reference with the authors' training-loop structure: per
  optimizer step one batch of 128 transitions, the factor MLPs run once on that batch's
  128 x (8 + 1) example rows (``loop_reference.batched_transition_pred``), Adam step, scheduler
  step. Same weights, same optimizer, same batch size; compared per transition.
* fit at our default batch (``fit_speedup_batch_4096``): the same model size in our engine with
  batches of 4096 transitions (our parametrisation: the cost per step does not depend on it)
  against the same reference, per transition. Fewer, larger optimizer steps: a throughput figure,
  not the same optimisation.
* against the authors' code as measured (``fit_speedup_vs_measured_authors_code``: ~36 ms per 128
  transitions on one thread, shared/design/measurements.md): our engine at the preset's batch 128,
  and (``..._batch_4096``) at 4096.
* rollout (``rollout_speedup``): `simulate` of every run x test example at once (factor MLPs once,
  then 150 vector steps) against one trajectory at a time, one step at a time, MLP calls per step
  (``loop_rollout``), per (trajectory, step).
* ``max_abs_diff``: the largest |difference| (metric units) between the two rollouts on the
  reference subset and between teacher-forced predictions of the engine and of the batched
  reference on one batch (same weights).
* ``paper_preset_fit_evaluate_seconds``: wall time of `evaluate` (fit with the authors' early
  stopping + roll out + score) of ``gptfluence_paper`` on a smaller store (``--paper-*`` sizes).

Writes ``benchmarks/results/simulators.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gptfluence.analysis.evaluate import evaluate
from gptfluence.dynamics.store import Dynamics
from gptfluence.features.encoders import resolve_encoder
from gptfluence.simulators import engine, make_simulator
from gptfluence.simulators.common import stack_curricula
from gptfluence.simulators.loop_reference import batched_transition_pred, featurized_pair_fn, loop_rollout
from gptfluence.simulators.synthetic import synthetic_dynamics

AUTHORS_MS_PER_128 = 36.0  # shared/design/measurements.md, one CPU thread
AUTHORS_ROLLOUT_MS_PER_TRAJECTORY_STEP = 0.8


def timed(fn, *a, **kw):
    """(result, cpu seconds of this process, wall seconds) of ``fn(*a, **kw)``."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*a, **kw)
    return out, time.process_time() - c0, time.perf_counter() - w0
PAPER_SIZE = dict(hidden=384, proj_dim=384, share_projection=True, order=1, center_features=False, similarity="none")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dynamics", default=None, help="a dynamics store (default: synthetic data)")
    ap.add_argument("--metric", default="loss")
    ap.add_argument("--encoder", default="bow:384", help="encoder spec for features with --dynamics (default bow:384)")
    ap.add_argument("--preset-fit-runs", type=int, default=2,
                    help="fit runs of the timed epoch of the preset (batch 128); the cost per step depends on the pool, not the runs")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the timed batch-4096 fit")
    ap.add_argument("--ref-fit-steps", type=int, default=10, help="reference optimizer steps (x128 transitions) to time")
    ap.add_argument("--ref-rollout-trajectories", type=int, default=4, help="reference trajectories to roll out")
    ap.add_argument("--paper-runs", type=int, default=12, help="whole fit + evaluate of the preset: runs of its store")
    ap.add_argument("--paper-steps", type=int, default=32, help="... steps per run (batch 4)")
    ap.add_argument("--paper-tests", type=int, default=40, help="... test examples")
    ap.add_argument("--paper-pool", type=int, default=100, help="... training pool")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both implementations")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulators.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    if args.dynamics:
        dyn = Dynamics.open(args.dynamics)
        encoder = resolve_encoder(args.encoder)
        source = str(args.dynamics)
    else:
        dyn, encoder = synthetic_dynamics(n_runs=16, n_steps=150, n_train=200, n_test=100, batch=8, dim=384, seed=0)
        source = "synthetic (16 runs x 150 steps x 100 test x 200 train, batch 8, 384-d bag-of-words features)"
    runs = dyn.run_ids
    fit_runs = runs[:-4]

    # --- ours at batch 4096 (our parametrisation, the paper's model size); its weights serve the
    # rollout comparison below (stable rollouts: identity offset, scaled init) --------------------
    big_kw = dict(PAPER_SIZE, epochs=args.epochs, batch_size=4096, patience=0, lr=1e-3, detrend=False)
    sim = make_simulator("gptfluence", args.metric, encoder=encoder, **big_kw)
    sim.fit(dyn, fit_runs, [])  # also embeds the examples (excluded from the timing below)
    sim_t = make_simulator("gptfluence", args.metric, encoder=encoder, **big_kw)
    sim_t.train_features, sim_t.test_features = sim.train_features, sim.test_features
    h, big_cpu, big_wall = timed(sim_t.fit, dyn, fit_runs, [])
    ours_big_per_tr = big_cpu / (h["epochs_run"] * h["transitions"])
    print(f"ours, batch {h['batch_size']}: {h['epochs_run']} epochs x {h['transitions']} transitions in "
          f"{big_cpu:.2f} CPU-s ({big_wall:.2f} s wall; {1e6 * ours_big_per_tr:.2f} us per transition)")

    # --- ours at the paper preset (batch 128, Adam + coupled decay, linear warmup/decay) ----------
    paper = make_simulator("gptfluence_paper", args.metric, encoder=encoder, epochs=1)
    paper.train_features, paper.test_features = sim.train_features, sim.test_features
    hp, paper_cpu, paper_wall = timed(paper.fit, dyn, fit_runs[:args.preset_fit_runs], [])
    ours_paper_per_tr = paper_cpu / (hp["epochs_run"] * hp["transitions"])
    print(f"ours, gptfluence_paper (batch {hp['batch_size']}): 1 epoch x {hp['transitions']} transitions in "
          f"{paper_cpu:.2f} CPU-s ({paper_wall:.2f} s wall; {1e6 * ours_paper_per_tr:.1f} us per transition, "
          f"{1e3 * paper_cpu / hp['steps_per_epoch']:.1f} ms per optimizer step)")

    # --- reference: the authors' loop structure, batched as theirs ---------------------------------
    V, steps, tids = dyn.stack(args.metric, fit_runs)
    train_ids = np.unique(stack_curricula(dyn, runs)[stack_curricula(dyn, runs) >= 0])
    htr = torch.as_tensor(sim.train_features.get(train_ids, "training"))
    hte = torch.as_tensor(sim.test_features.get(tids, "test"))
    f0 = paper.fit_first_step or 0
    Vr = torch.as_tensor(V[:, f0:], dtype=torch.float32)  # raw values (the preset: no normalisation)
    cur = stack_curricula(dyn, fit_runs)[:, f0:]
    rows = np.searchsorted(train_ids, np.maximum(cur, 0))
    rows[cur < 0] = -1
    rows_t = torch.as_tensor(rows)
    R, S, M = Vr.shape
    gen = np.random.default_rng(0)
    n_picks = 128 * (args.ref_fit_steps + 1)
    picks = np.stack([gen.integers(R, size=n_picks), gen.integers(1, S, size=n_picks), gen.integers(M, size=n_picks)], 1)
    ref_module = type(paper.module)(htr.shape[1], 384, 384, 1, True, False)
    ref_module.load_state_dict(paper.module.state_dict())
    c = paper.config
    opt = engine.make_optimizer(c.optimizer, ref_module.parameters(), c.lr, c.weight_decay)
    total = 300 * math.ceil(R * (S - 1) * M / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: engine.lr_factor(c.lr_schedule, s, c.warmup_steps, total))

    def ref_batch(p: np.ndarray) -> tuple[torch.Tensor, ...]:
        r, k, m = (torch.as_tensor(p[:, i]) for i in range(3))
        return rows_t[r, k - 1], m, Vr[r, k - 1, m][None], Vr[r, k, m]

    def ref_step(p: np.ndarray) -> None:
        brows, bcols, prev, target = ref_batch(p)
        pred = batched_transition_pred(ref_module, htr, hte, brows, bcols, prev, residual=False)
        loss = torch.mean((pred - target) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    def ref_steps() -> None:
        for s in range(1, args.ref_fit_steps + 1):
            ref_step(picks[128 * s:128 * (s + 1)])

    ref_step(picks[:128])  # warm-up
    _, ref_fit_s, ref_fit_wall = timed(ref_steps)
    ref_fit_per_tr = ref_fit_s / (128 * args.ref_fit_steps)
    print(f"reference (authors' loop, batched): {args.ref_fit_steps} x 128 transitions in {ref_fit_s:.2f} CPU-s "
          f"({ref_fit_wall:.2f} s wall; {1000 * ref_fit_s / args.ref_fit_steps:.1f} ms per 128)")

    # equal teacher-forced predictions with the same weights: the engine vs the batched reference
    scale = sim.scale
    brows, bcols, prev, _ = ref_batch(picks[:128])
    with torch.no_grad():
        Fp = engine.pad_factors(sim.module(htr, hte))
        fast_pred = engine.teacher_forced_pred(Fp, torch.where(brows < 0, train_ids.size, brows), bcols, prev / scale, True)
        slow_pred = batched_transition_pred(sim.module, htr, hte, brows, bcols, prev / scale, residual=True)
    tf_diff = float((fast_pred - slow_pred).abs().max() * scale)

    # --- rollouts (the batch-4096 simulator's weights) ----------------------------------------------
    cur_all = stack_curricula(dyn, runs)
    start_all = dyn.stack(args.metric, runs)[0][:, f0]
    sim.simulate(cur_all[:1], tids, start_all[:1], first_step=f0)  # warm-up
    reps = 5
    fast, ours_roll_s, _ = timed(lambda: [sim.simulate(cur_all, tids, start_all, first_step=f0) for _ in range(reps)][-1])
    ours_roll_s /= reps
    ours_roll_per = ours_roll_s / (len(runs) * M * (cur_all.shape[1] - f0))
    print(f"ours: rollout of {len(runs)} runs x {M} test x {cur_all.shape[1] - f0} steps in {ours_roll_s * 1000:.1f} ms "
          f"({ours_roll_per * 1e9:.0f} ns per trajectory-step)")
    K = args.ref_rollout_trajectories
    rr = np.searchsorted(train_ids, np.maximum(cur_all[:1, f0:], 0))
    rr[cur_all[:1, f0:] < 0] = -1
    pair = featurized_pair_fn(sim.module, htr, hte)
    slow, ref_roll_s, _ = timed(loop_rollout, pair, 1, torch.as_tensor(rr), torch.arange(K),
                                torch.as_tensor(start_all[:1, :K] / scale, dtype=torch.float32))
    ref_roll_per = ref_roll_s / (K * (cur_all.shape[1] - f0))
    roll_diff = float(np.abs(slow.numpy() * scale - fast[:1, :, :K]).max())
    print(f"reference: rollout of {K} trajectories x {cur_all.shape[1] - f0} steps in {ref_roll_s:.2f} s "
          f"({ref_roll_per * 1e3:.3f} ms per trajectory-step)")

    # --- a whole fit + evaluation of the paper preset -----------------------------------------------
    pdyn, penc = synthetic_dynamics(n_runs=args.paper_runs, n_steps=args.paper_steps, n_train=args.paper_pool,
                                    n_test=args.paper_tests, batch=4, dim=384, seed=1)
    pres, paper_eval_cpu, paper_eval_wall = timed(
        evaluate, pdyn, methods=["gptfluence_paper"], encoder=penc, keep_trajectories=False)
    gp = pres["results"][0]
    others = evaluate(pdyn, methods=["simfluence_paper", "gptfluence", "simfluence", "mean_curve"], encoder=penc,
                      keep_trajectories=False, configs={"gptfluence": {"similarity": "features"}})
    prec = {r["method"]: r for r in pres["results"] + others["results"]}
    print(f"gptfluence_paper fit + evaluate: {paper_eval_cpu:.1f} CPU-s ({paper_eval_wall:.1f} s wall; "
          f"{gp['epochs_run']} epochs, best {gp['best_epoch']})")

    res = {
        "fit_speedup": ref_fit_per_tr / ours_paper_per_tr,
        "fit_speedup_batch_4096": ref_fit_per_tr / ours_big_per_tr,
        "fit_speedup_vs_measured_authors_code": (AUTHORS_MS_PER_128 * 1e-3 / 128) / ours_paper_per_tr,
        "fit_speedup_vs_measured_authors_code_batch_4096": (AUTHORS_MS_PER_128 * 1e-3 / 128) / ours_big_per_tr,
        "rollout_speedup": ref_roll_per / ours_roll_per,
        "rollout_speedup_vs_measured_authors_code": AUTHORS_ROLLOUT_MS_PER_TRAJECTORY_STEP * 1e-3 / ours_roll_per,
        "max_abs_diff": max(roll_diff, tf_diff),
        "rollout_max_abs_diff": roll_diff,
        "teacher_forced_max_abs_diff": tf_diff,
        "ours_paper_preset_us_per_transition": 1e6 * ours_paper_per_tr,
        "ours_paper_preset_ms_per_optimizer_step": 1e3 * paper_cpu / hp["steps_per_epoch"],
        "ours_batch_4096_us_per_transition": 1e6 * ours_big_per_tr,
        "ref_fit_ms_per_128_transitions": 1000 * ref_fit_per_tr * 128,
        "measured_authors_code_ms_per_128_transitions": AUTHORS_MS_PER_128,
        "ours_rollout_ns_per_trajectory_step": ours_roll_per * 1e9,
        "ref_rollout_ms_per_trajectory_step": ref_roll_per * 1e3,
        "ours_rollout_seconds_all_runs": ours_roll_s,
        "paper_preset_fit_evaluate_seconds": paper_eval_cpu,
        "paper_preset_fit_evaluate_seconds_wall": paper_eval_wall,
        "paper_preset_epochs_run": gp["epochs_run"],
        "paper_preset_best_epoch": gp["best_epoch"],
        "paper_preset_seconds_per_epoch": paper_eval_cpu / max(1, gp["epochs_run"]),
        "paper_evaluation": {m: {k: prec[m][k] for k in ("mse_mean", "spearman_final_mean", "fit_seconds",
                                                          "epochs_run", "best_epoch")} for m in prec},
        "targets": {"rollout_speedup": 1000, "fit_speedup_vs_measured_authors_code": 100},
        "wall": {"ours_paper_preset_epoch": paper_wall, "ours_batch_4096_fit": big_wall, "ref_fit": ref_fit_wall},
        "seconds_total_wall": time.perf_counter() - t_start,
        "setup": {
            "data": source, "runs": len(runs), "steps": int(cur_all.shape[1]), "test_examples": int(M),
            "train_pool": int(train_ids.size), "feature_dim": int(htr.shape[1]),
            "simulator": "gptfluence order 1, MLP 384->384->384 shared per factor (the paper preset's size)",
            "preset_timed": f"1 epoch on {args.preset_fit_runs} fit runs ({hp['transitions']} transitions, "
                            f"{hp['steps_per_epoch']} steps of {hp['batch_size']})",
            "batch_4096_timed": f"{h['epochs_run']} epochs x {h['transitions']} transitions",
            "ref_fit_transitions_timed": 128 * args.ref_fit_steps,
            "ref_rollout_trajectory_steps_timed": K * int(cur_all.shape[1] - f0),
            "paper_evaluation_store": f"synthetic {args.paper_runs} runs x {args.paper_steps} steps x {args.paper_tests} "
                                      f"test x {args.paper_pool} train, batch 4, 384-d; split "
                                      f"{len(pres['split']['fit'])}/{len(pres['split']['val'])}/{len(pres['split']['test'])}",
            "clock": "CPU time of the process (time.process_time); wall seconds under 'wall'",
            "paper_evaluation_note": "gptfluence with similarity=features (a synthetic store has no GPT for gradients)",
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
            "note": "reference timed on a subset and scaled per transition / per (trajectory, step); shared weights",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"fit speed-up per transition, like for like (batch 128): {res['fit_speedup']:.1f}x; at batch 4096: "
          f"{res['fit_speedup_batch_4096']:.0f}x; vs the authors' measured 36 ms/128: "
          f"{res['fit_speedup_vs_measured_authors_code']:.1f}x (batch 128), "
          f"{res['fit_speedup_vs_measured_authors_code_batch_4096']:.0f}x (batch 4096; target >= 100); "
          f"rollout {res['rollout_speedup']:,.0f}x (target >= 1000); max |diff| {res['max_abs_diff']:.2e} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
