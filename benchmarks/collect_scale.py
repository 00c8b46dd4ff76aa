"""Collection throughput: sequential vs many runs at once (batched, torch.func) vs Ray tasks.

One paper-shaped fine-tuning task: data2text, runs of 96 optimizer steps (128 examples x 3
epochs, batch 4, 64 tokens), the loss of 200 test examples recorded before training and after
every step, no generation (``gen_every 0``). Each mode collects real runs into a fresh store
with `gptfluence.dynamics.collect.collect` and is timed end to end (model loading, tokenizing,
training, evaluation, atomic commits; the base model is built beforehand):

* ``sequential``: the local backend with one worker: one run after another in one process
  (on CPU one torch thread, the local backend's setting);
* ``batched``: ``--runs-per-batch`` runs trained together in one process (`backends.batched`);
  on CPU with the same one torch thread, so the ratio is the vectorisation's alone;
* ``ray``: one Ray task per run on a local Ray instance with ``--ray-workers`` CPUs. Its
  ``runs_per_hour`` is the steady rate (tasks after each worker's first, which also imports
  torch and loads the model in a fresh process); ``paper_task_minutes`` adds the measured
  start-up (instance, workers, model loading: the wall time beyond steady execution).

``runs_per_hour`` = runs / wall seconds x 3600; ``paper_task_minutes`` = the wall time of 32 such
runs at that rate (32 runs x 96 steps x loss of 200 test examples, the measurements.md task);
``speedup`` = runs_per_hour / the sequential runs_per_hour of the same model and device.

Models: ``tiny`` (the tests' 1 layer x 32 hidden GPT-NeoX), ``default`` (the project's 2 x 64);
``pythia-14m`` / ``-70m`` / ``-160m`` / ``-410m``: Pythia configurations (layers, width, heads,
vocabulary 50304) with random weights and the default model's tokenizer, for GPUs
(benchmarks/gpu_check.sh runs ``--device cuda --models pythia-14m ... --no-ray``).

Writes ``results`` (and ``machine``) of ``benchmarks/results/collect_scale.json``; other sections
(``simulator_fit`` from benchmarks/sim_scale.py) are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "collect_scale.json"
PAPER_RUNS, PAPER_STEPS, PAPER_TEST = 32, 96, 200
PYTHIA = {  # (layers, hidden, heads, intermediate)
    "pythia-14m": (6, 128, 4, 512),
    "pythia-70m": (6, 512, 8, 2048),
    "pythia-160m": (12, 768, 12, 3072),
    "pythia-410m": (24, 1024, 16, 4096),
}


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU, torch {torch.__version__})"


def pythia_folder(name: str, root: Path) -> str:
    """A Hugging Face folder with a Pythia-shaped GPT-NeoX (random weights, seed 0) and the
    default model's tokenizer (its ids are a subset of the 50304-entry vocabulary)."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from gptfluence.lm import ensure_default_model
    from gptfluence.lm.model import quiet_transformers

    path = root / name
    if (path / "config.json").exists():
        return str(path)
    layers, hidden, heads, inter = PYTHIA[name]
    tok = AutoTokenizer.from_pretrained(str(ensure_default_model(progress=False)))
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, hidden_act="gelu", max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0,
                        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg)
    with quiet_transformers():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def task_config(model: str, device: str, root: Path):
    from gptfluence.dynamics.collect import CollectConfig

    base = CollectConfig(task="data2text", n_train=200, n_test=PAPER_TEST, examples_per_run=128, batch_size=4,
                         epochs=3, gen_every=0, device=device)
    if model == "tiny":
        return dataclasses.replace(base, model_layers=1, model_hidden=32, model_pretrain_steps=20)
    if model == "default":
        return base
    return dataclasses.replace(base, model=pythia_folder(model, root))


def timed_collect(cfg, out: Path, runs: int, **kw) -> float:
    from gptfluence.dynamics.collect import collect

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    store = collect(cfg, out, runs=runs, progress=False, log=lambda s: None, **kw)
    wall = time.perf_counter() - t0
    assert len(store) == runs
    steps = {int(r.curriculum.shape[0]) for r in store.runs()}
    assert steps == {PAPER_STEPS}, steps
    return wall


def timed_ray_collect(cfg, out: Path, runs: int, workers: int) -> tuple[float, list[dict]]:
    """Wall seconds of a Ray collection and its tasks' records (``collect_ray``'s return value)."""
    from gptfluence.dynamics.backends import ray_backend

    seen: list[dict] = []
    orig = ray_backend.collect_ray

    def keep(*a, **k):
        res = orig(*a, **k)
        seen.extend(res)
        return res

    ray_backend.collect_ray = keep
    try:
        wall = timed_collect(cfg, out, runs, backend="ray", workers=workers)
    finally:
        ray_backend.collect_ray = orig
    return wall, seen


def ray_record(model: str, device: str, runs: int, workers: int, wall: float, tasks: list[dict],
               seq_rph: float) -> dict:
    """Steady rate from the tasks that were not their worker's first (the first one also imports
    torch and loads the model in a fresh process); start-up = wall time beyond steady execution."""
    import math

    import numpy as np

    first: dict[int, float] = {}
    later = []
    for t in tasks:  # completion order; a worker's first task ends first
        if t["pid"] in first:
            later.append(t["seconds"])
        else:
            first[t["pid"]] = t["seconds"]
    per_run = float(np.median(later)) if later else wall / math.ceil(runs / workers)
    startup = max(0.0, wall - math.ceil(runs / workers) * per_run)
    rph = workers * 3600.0 / per_run
    paper = (startup + math.ceil(PAPER_RUNS / workers) * per_run) / 60.0
    rec = {"model": model, "device": device, "mode": "ray", "runs": runs, "steps_per_run": PAPER_STEPS,
           "test_examples": PAPER_TEST, "wall_seconds": round(wall, 2), "runs_per_hour": round(rph, 1),
           "speedup": round(rph / seq_rph, 3), "paper_task_minutes": round(paper, 2), "workers": workers, "threads": 1,
           "seconds_per_run_steady": round(per_run, 2),
           "first_task_seconds": [round(v, 1) for v in first.values()], "startup_seconds": round(startup, 1),
           "end_to_end_runs_per_hour": round(runs / wall * 3600.0, 1),
           "note": "runs_per_hour = steady rate (tasks after each worker's first); paper_task_minutes adds the "
                   "measured start-up (local Ray instance, worker processes importing torch, model loading)"}
    print(json.dumps(rec), flush=True)
    return rec


def record(model: str, device: str, mode: str, runs: int, wall: float, seq_rph: float | None, **extra) -> dict:
    rph = runs / wall * 3600.0
    rec = {"model": model, "device": device, "mode": mode, "runs": runs, "steps_per_run": PAPER_STEPS,
           "test_examples": PAPER_TEST, "wall_seconds": round(wall, 2), "runs_per_hour": round(rph, 1),
           "speedup": round(rph / seq_rph, 3) if seq_rph else 1.0,
           "paper_task_minutes": round(PAPER_RUNS / rph * 60.0, 2), **extra}
    print(json.dumps(rec), flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="*", default=["tiny", "default"])
    ap.add_argument("--seq-runs", type=int, default=4, help="runs collected by the sequential mode")
    ap.add_argument("--batched-runs", type=int, default=8, help="runs collected by the batched mode")
    ap.add_argument("--runs-per-batch", type=int, default=8, help="batched mode: R (0 = from free memory)")
    ap.add_argument("--ray-runs", type=int, default=4)
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray mode")
    ap.add_argument("--modes", nargs="*", default=["sequential", "batched", "ray"],
                    help="modes to measure (without sequential, the output file's sequential record is the reference)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    old_results = data.get("results", [])

    import torch

    from gptfluence.devices import resolve_device
    from gptfluence.dynamics.collect import model_spec

    device = resolve_device(args.device)
    cpu = device == "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="collect-scale-"))
    results = []
    try:
        for model in args.models:
            cfg = task_config(model, device, tmp / "models")
            name, base = model_spec(cfg)
            if name == "default":
                from gptfluence.lm import ensure_default_model

                ensure_default_model(base, progress=False)
            threads = torch.get_num_threads()
            if "sequential" in args.modes:
                wall = timed_collect(cfg, tmp / "seq", args.seq_runs, workers=1)
                seq = record(model, device, "sequential", args.seq_runs, wall, None, workers=1,
                             threads=1 if cpu else threads)
                results.append(seq)
            else:  # the committed sequential record of this model and device
                seq = next(r for r in old_results if r["model"] == model and r["device"] == device
                           and r["mode"] == "sequential")
            seq_rph = seq["runs_per_hour"]
            if "batched" in args.modes:
                if cpu:
                    torch.set_num_threads(1)  # the same single core as the sequential mode
                try:
                    wall = timed_collect(cfg, tmp / "bat", args.batched_runs, backend="batched",
                                         runs_per_batch=args.runs_per_batch)
                finally:
                    torch.set_num_threads(threads)
                results.append(record(model, device, "batched", args.batched_runs, wall, seq_rph,
                                      runs_per_batch=args.runs_per_batch or "auto", workers=1,
                                      threads=1 if cpu else threads))
            if "ray" in args.modes and not args.no_ray:
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print("ray not installed: no ray record", file=sys.stderr)
                else:
                    wall, tasks = timed_ray_collect(cfg, tmp / "ray", args.ray_runs, args.ray_workers)
                    results.append(ray_record(model, device, args.ray_runs, args.ray_workers, wall, tasks,
                                              seq_rph))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["machine"] = machine(device)
    data["collect_task"] = (f"data2text, {PAPER_STEPS} steps per run (128 examples x 3 epochs, batch 4, 64 tokens), "
                            f"loss of {PAPER_TEST} test examples before training and after every step, no generation; "
                            f"paper_task_minutes = {PAPER_RUNS} runs at the measured rate")
    cmd = "python benchmarks/collect_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data["collect_commands"] = [c for c in data.get("collect_commands", []) if c != cmd] + [cmd]
    new = {(r["model"], r["device"], r["mode"]) for r in results}
    data["results"] = [r for r in old_results if (r["model"], r["device"], r["mode"]) not in new] + results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
