"""Matrix-form GPTfluence vs a loop with the research code's structure, in one process.

Data: synthetic-but-realistic dynamics of the size in shared/design/measurements.md (16 runs x 150
steps x 100 test examples x a pool of 200 training examples, batch 8, 384-d features from the
hashing bag-of-words encoder; the GPT's metric follows a known GPTfluence-like process, see
`gptfluence.simulators.synthetic`), or a dynamics store given with ``--dynamics``.
Simulator: the authors' size (2-layer MLPs 384 -> 384 -> 384, one shared between the train and
the test side per factor, order 1).

Measured (same weights, same thread count for both):

* fit: ours = full epochs of teacher-forced AdamW steps (batch ``--batch-size`` transitions,
  the factor matrices computed once per optimizer step); reference = AdamW steps of 128
  transitions where every transition calls the factor MLPs on its batch and test example
  (``loop_teacher_forced_loss``), timed on ``--ref-fit-steps`` steps. Compared per transition.
* rollout: ours = `simulate` of every run x test example at once (factor MLPs once, then 150
  vector steps); reference = one trajectory at a time, one step at a time, MLP calls per step
  (``loop_rollout``), timed on ``--ref-rollout-trajectories`` trajectories. Compared per
  (trajectory, step).
* max_abs_diff: the largest |difference| between the two rollouts (metric units) on the
  reference subset, and between teacher-forced one-step predictions on the reference fit batch.

Writes ``benchmarks/results/simulators.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gptfluence.dynamics.store import Dynamics
from gptfluence.simulators import make_simulator
from gptfluence.simulators import engine
from gptfluence.simulators.common import stack_curricula
from gptfluence.features.encoders import resolve_encoder
from gptfluence.simulators.loop_reference import featurized_pair_fn, loop_rollout, loop_teacher_forced_loss
from gptfluence.simulators.synthetic import synthetic_dynamics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dynamics", default=None, help="a dynamics store (default: synthetic data)")
    ap.add_argument("--metric", default="loss")
    ap.add_argument("--encoder", default="bow:384", help="encoder spec for features (default bow:384)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of our fit to time")
    ap.add_argument("--batch-size", type=int, default=4096, help="our fit's transitions per optimizer step")
    ap.add_argument("--ref-fit-steps", type=int, default=3, help="reference optimizer steps (x128 transitions) to time")
    ap.add_argument("--ref-rollout-trajectories", type=int, default=4, help="reference trajectories to roll out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both implementations")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulators.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.dynamics:
        dyn = Dynamics.open(args.dynamics)
        encoder = resolve_encoder(args.encoder)
        source = str(args.dynamics)
    else:
        dyn, encoder = synthetic_dynamics(n_runs=16, n_steps=150, n_train=200, n_test=100, batch=8, dim=384, seed=0)
        source = "synthetic (16 runs x 150 steps x 100 test x 200 train, batch 8, 384-d bag-of-words features)"
    runs = dyn.run_ids
    fit_runs, val_runs = runs[:-4], []
    sim = make_simulator("gptfluence", args.metric, encoder=encoder, epochs=args.epochs, batch_size=args.batch_size,
                         hidden=384, proj_dim=384, share_projection=True, order=1, patience=0, lr=1e-3,
                         detrend=False, center_features=False, similarity="none")
    V, steps, tids = dyn.stack(args.metric, fit_runs)

    # --- our fit -------------------------------------------------------------------------------
    sim.fit(dyn, fit_runs, val_runs)  # also embeds the examples (excluded from the timing below)
    sim2 = make_simulator("gptfluence", args.metric, encoder=encoder, epochs=args.epochs, batch_size=args.batch_size,
                          hidden=384, proj_dim=384, share_projection=True, order=1, patience=0, lr=1e-3,
                          detrend=False, center_features=False, similarity="none")
    sim2.train_features, sim2.test_features = sim.train_features, sim.test_features
    h = sim2.fit(dyn, fit_runs, val_runs)
    ours_fit_per_tr = h["seconds"] / (h["epochs_run"] * h["transitions"])
    print(f"ours: fit {h['epochs_run']} epochs x {h['transitions']} transitions in {h['seconds']:.2f} s "
          f"({1 / ours_fit_per_tr:,.0f} transitions/s, batch {h['batch_size']})")

    module = sim.module
    assert module is not None
    scale = sim.scale
    f0 = sim.fit_first_step or 0
    train_ids = np.unique(stack_curricula(dyn, runs)[stack_curricula(dyn, runs) >= 0])
    htr = torch.as_tensor(sim.train_features.get(train_ids, "training"))
    hte = torch.as_tensor(sim.test_features.get(tids, "test"))
    pair = featurized_pair_fn(module, htr, hte)

    # --- reference fit: 128 transitions per AdamW step, MLP calls per transition ----------------
    Vn = torch.as_tensor(V[:, f0:] / scale, dtype=torch.float32)
    cur = stack_curricula(dyn, fit_runs)[:, f0:]
    rows = np.searchsorted(train_ids, np.maximum(cur, 0))
    rows[cur < 0] = -1
    rows_t = torch.as_tensor(rows)
    gen = np.random.default_rng(0)
    R, S, M = Vn.shape
    ref_module = type(module)(htr.shape[1], 384, 384, 1, True, True)
    ref_module.load_state_dict(module.state_dict())
    ref_pair = featurized_pair_fn(ref_module, htr, hte)
    opt = torch.optim.AdamW(ref_module.parameters(), lr=1e-3, weight_decay=1e-3)
    # one step of 128 transitions = a [1, 129, 1]-shaped slice per transition; pick random ones
    picks = [(int(gen.integers(R)), int(gen.integers(1, S)), int(gen.integers(M))) for _ in range(128 * (args.ref_fit_steps + 1))]

    def ref_step(batch: list[tuple[int, int, int]], step: bool = True) -> torch.Tensor:
        total = torch.zeros(())
        for r, k, m in batch:
            loss = loop_teacher_forced_loss(ref_pair, 1, Vn[r:r + 1, k - 1:k + 1, m:m + 1], rows_t[r:r + 1, k - 1:k],
                                            torch.tensor([m]), True)
            total = total + loss
        total = total / len(batch)
        if step:
            opt.zero_grad()
            total.backward()
            opt.step()
        return total

    ref_step(picks[:128])  # warm-up
    t0 = time.perf_counter()
    for s in range(1, args.ref_fit_steps + 1):
        ref_step(picks[128 * s:128 * (s + 1)])
    ref_fit_s = time.perf_counter() - t0
    ref_fit_per_tr = ref_fit_s / (128 * args.ref_fit_steps)
    print(f"reference: fit {args.ref_fit_steps} x 128 transitions in {ref_fit_s:.2f} s "
          f"({1 / ref_fit_per_tr:,.0f} transitions/s; {1000 * ref_fit_s / args.ref_fit_steps:.1f} ms per 128)")

    # equal one-step predictions with the same weights (the fitted `module`)
    tr = torch.tensor([(r, k - 1, k, m) for r, k, m in picks[:128]])
    block = engine.RunBlock(Vn, torch.where(rows_t < 0, train_ids.size, rows_t), torch.arange(M), f0)
    with torch.no_grad():
        fast_pred, _ = block.predict(engine.pad_factors(module(htr, hte)), tr, 1, True)
        slow_pred = torch.stack([
            engine.step_update(torch.stack([pair(k, rows_t[r, kk - 1][rows_t[r, kk - 1] >= 0], m).sum() for k in range(2)]),
                               [Vn[r, kk - 1, m]], True) for r, kk, m in picks[:128]])
    tf_diff = float((fast_pred - slow_pred).abs().max() * scale)

    # --- rollouts --------------------------------------------------------------------------------
    test_runs = runs[-4:]
    Vt, _, _ = dyn.stack(args.metric, test_runs)
    cur_all = stack_curricula(dyn, runs)
    start_all = dyn.stack(args.metric, runs)[0][:, f0]
    sim.simulate(cur_all[:1], tids, start_all[:1], first_step=f0)  # warm-up
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        fast = sim.simulate(cur_all, tids, start_all, first_step=f0)
    ours_roll_s = (time.perf_counter() - t0) / reps
    n_ts = len(runs) * M * (cur_all.shape[1] - f0)
    ours_roll_per = ours_roll_s / n_ts
    t0 = time.perf_counter()
    sim.simulate(cur_all[-4:], tids, start_all[-4:], first_step=f0)
    ours_4_runs_s = time.perf_counter() - t0
    print(f"ours: rollout of {len(runs)} runs x {M} test x {cur_all.shape[1] - f0} steps in {ours_roll_s * 1000:.1f} ms "
          f"({ours_roll_per * 1e9:.0f} ns per trajectory-step); 4 runs: {ours_4_runs_s * 1000:.1f} ms")

    K = args.ref_rollout_trajectories
    cols = torch.arange(K)
    rr = np.searchsorted(train_ids, np.maximum(cur_all[:1, f0:], 0))
    rr[cur_all[:1, f0:] < 0] = -1
    t0 = time.perf_counter()
    slow = loop_rollout(pair, 1, torch.as_tensor(rr), cols, torch.as_tensor(start_all[:1, :K] / scale, dtype=torch.float32))
    ref_roll_s = time.perf_counter() - t0
    ref_roll_per = ref_roll_s / (K * (cur_all.shape[1] - f0))
    roll_diff = float(np.abs(slow.numpy() * scale - fast[:1, :, :K]).max())
    print(f"reference: rollout of {K} trajectories x {cur_all.shape[1] - f0} steps in {ref_roll_s:.2f} s "
          f"({ref_roll_per * 1e3:.3f} ms per trajectory-step)")

    res = {
        "rollout_speedup": ref_roll_per / ours_roll_per,
        "fit_speedup": ref_fit_per_tr / ours_fit_per_tr,
        "max_abs_diff": max(roll_diff, tf_diff),
        "rollout_max_abs_diff": roll_diff,
        "teacher_forced_max_abs_diff": tf_diff,
        "ours_fit_transitions_per_s": 1 / ours_fit_per_tr,
        "ref_fit_transitions_per_s": 1 / ref_fit_per_tr,
        "ref_fit_ms_per_128_transitions": 1000 * ref_fit_per_tr * 128,
        "ours_fit_seconds_per_epoch": h["seconds"] / h["epochs_run"],
        "ours_rollout_ns_per_trajectory_step": ours_roll_per * 1e9,
        "ref_rollout_ms_per_trajectory_step": ref_roll_per * 1e3,
        "ours_rollout_seconds_all_runs": ours_roll_s,
        "ours_rollout_seconds_4_runs": ours_4_runs_s,
        # the authors' code as measured in shared/design/measurements.md (~0.8 ms per trajectory-step
        # of rollout, ~36 ms per 128 transitions of fitting, one thread, same kind of data), for context
        "rollout_speedup_vs_measured_authors_code": 0.8e-3 / ours_roll_per,
        "fit_speedup_vs_measured_authors_code": (36e-3 / 128) / ours_fit_per_tr,
        "targets": {"rollout_speedup": 1000, "fit_speedup": 100},
        "setup": {
            "data": source, "runs": len(runs), "steps": int(cur_all.shape[1]), "test_examples": int(M),
            "train_pool": int(train_ids.size), "feature_dim": int(htr.shape[1]),
            "simulator": "gptfluence order 1, MLP 384->384->384 shared per factor", "our_batch_size": h["batch_size"],
            "our_epochs_timed": h["epochs_run"], "ref_fit_transitions_timed": 128 * args.ref_fit_steps,
            "ref_rollout_trajectory_steps_timed": K * int(cur_all.shape[1] - f0), "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
            "note": "reference timed on a subset and scaled per transition / per (trajectory, step); both share weights",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"rollout speedup {res['rollout_speedup']:,.0f}x (target >= 1000), fit speedup {res['fit_speedup']:,.0f}x "
          f"(target >= 100) per transition, max |diff| {res['max_abs_diff']:.2e} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
