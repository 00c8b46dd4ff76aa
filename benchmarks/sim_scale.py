"""Simulators on dynamics the size of the paper's instruction-tuning data: memory and time.

Data: synthetic dynamics (`gptfluence.simulators.synthetic`, a known GPTfluence-like process)
of 25 runs x 288 steps x 1055 test examples x a pool of 768 training examples, batch 8,
384-d bag-of-words features. Every measurement runs in a fresh subprocess and reports the
process's peak resident memory (ru_maxrss) above the same process's baseline after the data
are built, and the wall time:

* ``transitions_tensor``: the ``[K, 4]`` int64 tensor of all K = 7.6 M teacher-forcing targets
  (`RunBlock.transitions`, what fitting materialised before);
* ``transition_index``: the same targets decoded by index arithmetic (`RunBlock.transition_index`,
  what fitting uses now; ``index[idx] == transitions[idx]``, tests/test_scale.py);
* ``fit_gptfluence`` / ``fit_simfluence``: ``--epochs`` epochs of teacher-forced fitting (batch
  4096 transitions, the default) on 23 runs with 2 validation runs;
* ``simulate``: rollouts of ``--sim-runs`` curricula of 288 steps x 1055 test examples (the
  simulations an LDS or a leave-one-out estimate makes), in chunks of 32 curricula.

Writes the ``simulator_fit`` section of ``benchmarks/results/collect_scale.json`` (other sections
kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PAPER = dict(n_runs=25, n_steps=288, n_test=1055, n_train=768, batch=8)
RESULTS = Path(__file__).parent / "results" / "collect_scale.json"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, epochs: int, sim_runs: int, threads: int, scale: float) -> dict:
    import numpy as np
    import torch

    from gptfluence.simulators import make_simulator
    from gptfluence.simulators.synthetic import synthetic_dynamics

    torch.set_num_threads(threads)
    size = dict(PAPER)
    if scale != 1.0:
        size = {k: max(2, int(round(v * scale))) if k != "batch" else v for k, v in size.items()}
    dyn, enc = synthetic_dynamics(n_runs=size["n_runs"], n_steps=size["n_steps"], n_train=size["n_train"],
                                  n_test=size["n_test"], batch=size["batch"], dim=384, seed=0)
    runs = dyn.run_ids
    fit_runs, val_runs = runs[:-2], runs[-2:]
    base = rss_mb()
    out: dict = {"mode": mode, "size": size}
    t0 = time.perf_counter()
    if mode in ("transitions_tensor", "transition_index"):
        sim = make_simulator("simfluence", "loss")
        V, steps, tids = dyn.stack("loss", fit_runs)
        sim.scale, sim.trend = 1.0, None
        train_ids = np.unique([r.curriculum for r in dyn.runs()])
        block = sim._block(dyn, fit_runs, train_ids, np.unique(tids), 0)
        base = rss_mb()
        t0 = time.perf_counter()
        tr = block.transitions(1, True) if mode == "transitions_tensor" else block.transition_index(1, True)
        out["transitions"] = int(tr.shape[0])
        idx = torch.randperm(int(tr.shape[0]))[:4096]
        out["minibatch_check"] = int(tr[idx].sum())  # touch a minibatch
    elif mode.startswith("fit_"):
        method = mode[4:]
        kw = dict(epochs=epochs, patience=0)
        if method == "gptfluence":
            kw.update(encoder=enc, similarity="features")
        sim = make_simulator(method, "loss", **kw)
        hist = sim.fit(dyn, fit_runs, val_runs)
        out.update(transitions=int(hist["transitions"]), epochs=int(hist["epochs_run"]),
                   batch_size=int(hist["batch_size"]), fit_seconds=round(float(hist["seconds"]), 2),
                   seconds_per_epoch=round(float(hist["seconds"]) / max(1, hist["epochs_run"]), 2),
                   best_val_mse=hist.get("best_val_mse"))
    elif mode == "simulate":
        sim = make_simulator("simfluence", "loss", epochs=1, patience=0, unseen="zero")
        sim.fit(dyn, fit_runs[:2], [])
        base = rss_mb()
        rng = np.random.default_rng(0)
        tids = dyn.test_ids
        cur = np.stack([dyn.run(runs[r % len(runs)]).curriculum for r in range(sim_runs)])
        cur = np.where(rng.random(cur.shape) < 0.5, cur, -1)  # random halves, as an LDS design
        start = np.tile(dyn.run(runs[0]).values["loss"][0], (sim_runs, 1))
        t0 = time.perf_counter()
        finals = []
        for lo in range(0, sim_runs, 32):
            finals.append(sim.simulate(cur[lo:lo + 32], tids, start[lo:lo + 32])[:, -1])
        out["simulated_runs"] = sim_runs
        out["finite"] = bool(np.isfinite(np.concatenate(finals)).all())
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_above_data_mb"] = round(rss_mb() - base, 1)
    out["peak_rss_mb"] = round(rss_mb(), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="fit epochs (each 7.6 M transitions at paper size)")
    ap.add_argument("--sim-runs", type=int, default=64, help="curricula to simulate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size (quick checks)")
    ap.add_argument("--modes", nargs="*", default=["transitions_tensor", "transition_index", "fit_simfluence",
                                                    "fit_gptfluence", "simulate"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.sim_runs, args.threads, args.scale)))
        return 0
    records = []
    for mode in args.modes:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--epochs", str(args.epochs),
                            "--sim-runs", str(args.sim_runs), "--threads", str(args.threads), "--scale", str(args.scale)],
                           capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        rec["process_seconds"] = round(time.perf_counter() - t0, 1)
        records.append(rec)
        print(f"{mode:<20} {rec['seconds']:>8.1f} s   peak RSS +{rec['peak_rss_above_data_mb']:>7.1f} MB "
              f"(total {rec['peak_rss_mb']:.0f} MB)  " + ", ".join(f"{k}={v}" for k, v in rec.items()
                                                              if k in ("transitions", "seconds_per_epoch", "best_val_mse",
                                                                       "simulated_runs")), flush=True)
    section = {
        "what": "simulators on synthetic dynamics of the paper's instruction-tuning size; each row a fresh process; "
                "peak_rss_above_data_mb = peak resident memory minus the memory after the dynamics were built",
        "size": records[0]["size"] if records else None,
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads, CPU",
        "command": "python benchmarks/sim_scale.py " + " ".join(sys.argv[1:]),
        "records": records,
    }
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["simulator_fit"] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out} (simulator_fit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
