"""The paper presets on a GPU: seconds per epoch of gptfluence_paper / simfluence_paper on a store
of the built-in tasks' shape (25 fit + 2 validation runs x 48 steps x 100 test examples, pool 200,
batch 8, 384-d features: 938 optimizer steps of 128 transitions per epoch), CUDA against the CPU
(one thread, as `benchmarks/simulators.py`). What `make evaluate-paper --device auto` costs there.

    python benchmarks/gpu_presets.py --epochs 3 --out benchmarks/results/gpu_presets.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gptfluence.simulators import make_simulator
from gptfluence.simulators.synthetic import synthetic_dynamics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_presets.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dyn, enc = synthetic_dynamics(n_runs=27, n_steps=48, n_train=200, n_test=100, batch=8, dim=384, seed=0)
    ids = dyn.run_ids
    res: dict = {"store": "synthetic 27 runs (25 fit, 2 val) x 48 steps x 100 test x 200 train, batch 8, 384-d",
                 "epochs_timed": args.epochs, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for method in ("gptfluence_paper", "simfluence_paper"):
        for device in args.devices:
            kw = {"encoder": enc} if method == "gptfluence_paper" else {}
            sim = make_simulator(method, "loss", epochs=args.epochs, device=device, **kw)
            t0 = time.perf_counter()
            h = sim.fit(dyn, ids[:25], ids[25:])
            total = time.perf_counter() - t0
            res[f"{method}_{device}_seconds_per_epoch"] = h["seconds"] / h["epochs_run"]
            res[f"{method}_{device}_steps_per_epoch"] = h["steps_per_epoch"]
            print(f"{method} on {device}: {h['seconds'] / h['epochs_run']:.2f} s per epoch "
                  f"({h['steps_per_epoch']} steps; fit incl. setup {total:.1f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
