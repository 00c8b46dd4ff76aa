#!/usr/bin/env bash
# The GPU checks as one script, for a machine with CUDA (run from the repository root):
#   1. the GPU test tier (pytest -m gpu),
#   2. benchmarks/gpu_engine.py (simulator fit and rollout, CPU vs CUDA),
#   3. collection of 4 data2text runs at the default scale on CUDA and on the CPU (wall time), and
#      how far the CUDA (bf16 autocast) losses are from the CPU (fp32) ones,
#   4. benchmarks/decode_speed.py on CUDA (bf16 autocast): greedy decoding with HF generate vs the lean
#      loop (dynamic cache, static cache, static cache + torch.compile), ms per batch and token identity
#      ($OUT/decode_speed.json),
#   5. benchmarks/collect_scale.py on CUDA: sequential vs batched (torch.func) collection of a
#      paper-shaped task with Pythia-14M/70M/160M/410M configurations (random weights), runs per
#      hour and the projected minutes of 32 runs x 96 steps ($OUT/collect_scale.json).
# Logs and JSON go to $OUT (default /tmp/gpu-check). Extra packages can come via EXTRA_PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export GPTFLUENCE_CACHE=${GPTFLUENCE_CACHE:-/tmp/gptfluence-cache}
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 benchmarks/gpu_engine.py --threads "$(nproc)" --out "$OUT/gpu_engine.json" 2>&1 | tee "$OUT/gpu_engine.log"
for d in cuda cpu; do
  s=$(date +%s.%N)
  timeout 240 python3 -m gptfluence collect --quiet --task data2text --runs 4 --device "$d" --out "/tmp/gpu-check-dyn-$d"
  echo "collect --device $d: $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s wall (4 runs, default scale)"
done 2>&1 | tee "$OUT/collect.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/collect.log"
import numpy as np
from gptfluence.dynamics import Dynamics
a, b = Dynamics.open("/tmp/gpu-check-dyn-cuda"), Dynamics.open("/tmp/gpu-check-dyn-cpu")
for m in ("loss", "bleu"):
    va, _, _ = a.stack(m, a.run_ids); vb, _, _ = b.stack(m, b.run_ids)
    d = np.abs(va - vb)
    print(f"{m}: cuda(bf16 autocast) vs cpu(fp32): mean |diff| {np.nanmean(d):.4g}, max {np.nanmax(d):.4g}, "
          f"final-step mean cuda {np.nanmean(va[:, -1]):.4g} cpu {np.nanmean(vb[:, -1]):.4g}")
PY
# the default model is cached by now (collect above)
timeout 300 python3 benchmarks/decode_speed.py --device cuda --repeats 3 --out "$OUT/decode_speed.json" 2>&1 | tee "$OUT/decode_speed.log"
timeout 600 python3 benchmarks/collect_scale.py --device cuda --models pythia-14m pythia-70m pythia-160m pythia-410m \
  --seq-runs 2 --batched-runs 8 --runs-per-batch 0 --no-ray --out "$OUT/collect_scale.json" 2>&1 | tee "$OUT/collect_scale.log"
