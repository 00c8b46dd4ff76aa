"""The simulator engine on CUDA against the same code on CPU, in one process.

Data: synthetic dynamics (`gptfluence.simulators.synthetic`) at a size where a GPU matters:
``--runs`` runs x ``--steps`` steps x ``--test`` test examples x a pool of ``--train`` training
examples, batch 8, 384-d hashing bag-of-words features. For each simulator configuration (the
default GPTfluence: linear projections to 32, separate train/test sides; the authors' size: a
384-384-384 MLP shared per factor) and each device, the same seeded fit (``--epochs`` epochs of
teacher-forced AdamW, no early stopping) is timed, then a rollout of every run x test example.

Reported per configuration: seconds per fit epoch and per full rollout on each device, the
speed-up (cpu / cuda), and the largest |difference| between the CPU and CUDA rollouts (metric
units; both fits start from the same seed, so this is float drift of two independent fits).
Writes ``benchmarks/results/gpu_engine.json``. Needs CUDA (exits 2 without it, unless
``--cpu-only`` for a dry run).

    python benchmarks/gpu_engine.py --threads 16
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

from gptfluence.simulators import make_simulator
from gptfluence.simulators.common import stack_curricula
from gptfluence.simulators.synthetic import synthetic_dynamics

# "default" = GPTfluence's defaults when gpu_engine.json was measured (2026-11-28): linear projections
# to 32, no similarity term, lr 1e-3; pinned so that the committed results stay reproducible.
CONFIGS = {
    "default": dict(similarity="none", lr=1e-3),
    "authors_size": dict(hidden=384, proj_dim=384, share_projection=True, detrend=False, center_features=False,
                         similarity="none", lr=1e-3),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(dyn, enc, device: str, cfg: dict, epochs: int, batch_size: int, reps: int) -> dict:
    runs = dyn.run_ids
    fit_runs, test_runs = runs[:-4], runs[-4:]
    sim = make_simulator("gptfluence", "loss", encoder=enc, epochs=epochs, patience=0, batch_size=batch_size,
                         min_steps_per_epoch=0, device=device, seed=0, **cfg)
    sim.set_examples(dyn.task.train, dyn.task.test)  # features outside the timing
    _sync(device)
    t0 = time.perf_counter()
    hist = sim.fit(dyn, fit_runs, [])
    _sync(device)
    fit_s = time.perf_counter() - t0
    cur = stack_curricula(dyn, runs)
    V, _, tids = dyn.stack("loss", runs)
    sim.simulate(cur[:1], tids, V[:1, 0])  # warm-up (CUDA kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        pred = sim.simulate(cur, tids, V[:, 0])
    _sync(device)
    roll_s = (time.perf_counter() - t0) / reps
    held = np.isin(np.asarray(runs), test_runs)
    mse = float(np.nanmean((pred[held, 1:] - V[held, 1:]) ** 2))
    return {"fit_seconds": fit_s, "fit_seconds_per_epoch": fit_s / max(hist["epochs_run"], 1),
            "transitions": hist["transitions"], "rollout_seconds": roll_s, "heldout_mse": mse, "pred": pred}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=65536, help="transitions per optimizer step")
    ap.add_argument("--reps", type=int, default=3, help="rollouts timed (mean)")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0 = all cores)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--cpu-only", action="store_true", help="dry run without CUDA (no speed-up reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_engine.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_only:
        print("gpu_engine: no CUDA device (use --cpu-only for a dry run)", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dyn, enc = synthetic_dynamics(n_runs=args.runs, n_steps=args.steps, n_train=args.train, n_test=args.test,
                                  batch=8, dim=384, seed=0)
    print(f"data: {args.runs} runs x {args.steps} steps x {args.test} test x {args.train} train "
          f"({time.perf_counter() - t0:.1f} s to generate)", flush=True)
    devices = ["cpu"] + ([] if args.cpu_only else ["cuda"])
    results = {}
    for name in args.configs:
        per = {d: time_one(dyn, enc, d, CONFIGS[name], args.epochs, args.batch_size, args.reps) for d in devices}
        row = {d: {k: v for k, v in r.items() if k != "pred"} for d, r in per.items()}
        if "cuda" in per:
            row["fit_speedup"] = per["cpu"]["fit_seconds_per_epoch"] / per["cuda"]["fit_seconds_per_epoch"]
            row["rollout_speedup"] = per["cpu"]["rollout_seconds"] / per["cuda"]["rollout_seconds"]
            row["cpu_vs_cuda_max_abs_diff"] = float(np.nanmax(np.abs(per["cpu"]["pred"] - per["cuda"]["pred"])))
        results[name] = row
        line = ", ".join(f"{d}: fit {r['fit_seconds_per_epoch']:.3f} s/epoch, rollout {r['rollout_seconds'] * 1e3:.1f} ms"
                         for d, r in row.items() if isinstance(r, dict))
        print(f"{name}: {line}" + (f" | speed-up fit {row['fit_speedup']:.1f}x, rollout {row['rollout_speedup']:.1f}x, "
                                   f"max |cpu-cuda| {row['cpu_vs_cuda_max_abs_diff']:.2e}" if "fit_speedup" in row else ""),
              flush=True)
    res = {"configs": results,
           "setup": {"runs": args.runs, "steps": args.steps, "train_pool": args.train, "test_examples": args.test,
                     "batch": 8, "feature_dim": 384, "epochs": args.epochs, "batch_size": args.batch_size,
                     "cpu_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
