"""Cost of the gradient baselines (tracin_cp, grad_dot) on one store, side by side in one run.

    python benchmarks/tracin_cost.py --store runs/builtin/data2text [--device cpu|cuda] [--threads 1]
        [--out benchmarks/results/tracin_cost.json]

Without ``--store`` (or if it does not exist), 4 data2text runs are collected at the default
scale into that folder first. Measures, on the store's base model and training pool x test set:

1. per-example target-loss gradients of the pool and the test set: ``vmap(grad)`` in chunks
   (`gptfluence.features.per_example`) against one autograd pass per example (the loop of
   `LossGradientEncoder`), the ratio of their wall times and the largest difference;
2. the reference-source dot products (one replayed run, every checkpoint, pool x test, exact) for
   k = 1 and k = 10, and Grad-Dot (base model only), without the disk cache;
3. the own source: one curriculum re-trained with its own checkpoints (k = 1), the examples of
   each step's batch and the test set only;
4. on CUDA: the base model's dot products on the GPU against the CPU (max relative difference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import numpy as np
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/tracin-cost-store")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/tracin_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from gptfluence.dynamics.collect import CollectConfig, collect, replay_run
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.features.per_example import gradient_dots, num_parameters, per_example_gradients, tokenized_rows
    from gptfluence.simulators.tracin import CheckpointDots, TracInConfig, checkpoint_of_step

    if not (Path(args.store) / "manifest.json").exists():
        collect(CollectConfig(task="data2text", gen_every=0, device=args.device), args.store, runs=4, progress=False)
        torch.set_num_threads(args.threads)
    dyn = Dynamics.open(args.store)
    run = dyn.run(dyn.run_ids[0])
    T = run.num_steps
    max_len = int(dyn.manifest["config"].get("max_length", 64))
    res: dict = {"store": str(args.store), "device": args.device, "threads": args.threads, "steps": T,
                 "n_train": len(dyn.task.train), "n_test": len(dyn.task.test), "torch": torch.__version__,
                 "machine": platform.machine(), "cpus": os.cpu_count()}

    # 1. vmap vs per-example loop at the base model (CPU or the device)
    (_, model, tok), = list(replay_run(dyn, run.run_id, [0], device=args.device))
    import copy

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    res["params"] = num_parameters(eager)
    import dataclasses

    both = [dataclasses.replace(e, id=k) for k, e in enumerate(dyn.task.train + dyn.task.test)]  # ids may coincide
    rows = tokenized_rows(tok, both, max_len, append_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    g_vmap = per_example_gradients(eager, *rows, chunk=32)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_vmap, c_vmap = time.perf_counter() - t0, time.process_time() - c0
    from gptfluence.lm import causal_lm_loss

    params = [q for q in model.parameters() if q.requires_grad]
    dev = next(model.parameters()).device
    t0, c0 = time.perf_counter(), time.process_time()
    loop = torch.empty_like(g_vmap)
    lab = rows[1]
    for i in range(rows[0].shape[0]):
        n = int((lab[i] != -100).nonzero().max()) + 1
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, {"input_ids": rows[0][i:i + 1, :n].to(dev), "labels": lab[i:i + 1, :n].to(dev)}).backward()
        loop[i] = torch.cat([q.grad.reshape(-1) for q in params]).float().cpu()
    t_loop, c_loop = time.perf_counter() - t0, time.process_time() - c0
    model.zero_grad(set_to_none=True)
    res["per_example_gradients"] = {
        "examples": int(rows[0].shape[0]), "vmap_s": round(t_vmap, 3), "loop_s": round(t_loop, 3),
        "loop_over_vmap": round(t_loop / t_vmap, 2), "vmap_cpu_s": round(c_vmap, 3), "loop_cpu_s": round(c_loop, 3),
        "loop_over_vmap_cpu": round(c_loop / c_vmap, 2),
        "max_abs_diff_rel_to_max": float((g_vmap - loop).abs().max() / loop.abs().max())}
    print("per-example gradients:", res["per_example_gradients"], flush=True)

    # 2. reference-source dot products (no disk cache)
    def timed_reference(k: int) -> tuple[float, float]:
        cfg = TracInConfig(checkpoint_every=k, device=args.device, dots_cache=False)
        steps = sorted(set(checkpoint_of_step(np.arange(1, T + 1), k).tolist()))
        ids = np.sort(dyn.train_ids)
        t0, c0 = time.perf_counter(), time.process_time()
        CheckpointDots(dyn, cfg).compute(run.curriculum, int(run.seed), steps, [ids] * len(steps), np.sort(dyn.test_ids))
        return round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)

    # wall seconds and this process's CPU seconds (the CPU time is what a busy machine does not inflate)
    res["reference_k1_s"], res["reference_k1_cpu_s"] = timed_reference(1)
    res["reference_k10_s"], res["reference_k10_cpu_s"] = timed_reference(10)
    res["grad_dot_s"], res["grad_dot_cpu_s"] = timed_reference(0)
    print({k: v for k, v in res.items() if k.startswith(("reference", "grad_dot"))}, flush=True)

    # 3. own source: one curriculum, k = 1, only each step's batch + the test set
    from gptfluence.simulators import make_simulator

    sim = make_simulator("tracin_cp", "loss", gradient_source="own", device=args.device, dots_cache=False)
    sim.dynamics = dyn
    t0, c0 = time.perf_counter(), time.process_time()
    sim._own_scores(dyn.run(dyn.run_ids[1]).curriculum, np.sort(dyn.test_ids), 0)
    res["own_one_curriculum_k1_s"] = round(time.perf_counter() - t0, 2)
    res["own_one_curriculum_k1_cpu_s"] = round(time.process_time() - c0, 2)
    print({k: v for k, v in res.items() if k.startswith("own")}, flush=True)

    # 4. CUDA against CPU dot products at the base model
    if args.device.startswith("cuda"):
        tr = tokenized_rows(tok, dyn.task.train, max_len, True)
        te = tokenized_rows(tok, dyn.task.test, max_len, False)
        d_gpu = gradient_dots(eager, tr, te)
        d_cpu = gradient_dots(copy.deepcopy(eager).to("cpu"), tr, te)
        res["cuda_vs_cpu_dots_max_rel_diff"] = float(np.abs(d_gpu - d_cpu).max() / np.abs(d_cpu).max())
        print({"cuda_vs_cpu_dots_max_rel_diff": res["cuda_vs_cpu_dots_max_rel_diff"]}, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("->", out)


if __name__ == "__main__":
    main()
