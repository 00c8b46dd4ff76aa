#!/bin/bash
# A store trained under a decaying learning rate, to choose how GPTfluence's lagged factors scale
# with it (--b-lags-lr-scaling; runs/draw3, loss only): entailment, task seed 3, lr 6e-4 with 5
# warmup steps and linear decay to 0 (otherwise the built-in settings: 128 examples per run, batch 8,
# 3 epochs, 48 steps), 32 fit runs, 48 held-out curricula per design (seed 3), split seed 0.
# Every method at today's defaults (-> lds_draw3.*) and GPTfluence with the other
# --b-lags-lr-scaling (-> lds_draw3_b_lags_lr_<other>.*). The decaying-rate sentiment store of
# benchmarks/lds_draw2.sh (never used to choose a default) checks the choice: GPTfluence with the
# other scaling there -> lds_draw2_b_lags_lr_<other>.*. Resumable: a store or result that exists is
# not redone.
#   benchmarks/lds_draw3.sh        (BIN: the virtual environment's bin folder, default .venv/bin;
#                                   OTHER: the non-default scaling, default batch)
set -e
cd "$(dirname "$0")/.."
B=${BIN:-.venv/bin}
OTHER=${OTHER:-batch}
D=runs/draw3
R=benchmarks/results
n=entailment-decay
[ -d $D/$n/runs ] && [ "$(ls $D/$n/runs | wc -l)" -ge 32 ] || \
  $B/gptfluence collect --quiet --task entailment --task-seed 3 --lr 0.0006 --lr-schedule linear --warmup-steps 5 \
    --runs 32 --gen-every 0 --out $D/$n
[ -f $D/$n-heldout.jsonl ] || \
  $B/gptfluence curricula --dynamics $D/$n --design both membership order --n 48 --seed 3 --out $D/$n-heldout.jsonl
[ -d $D/$n-heldout/runs ] && [ "$(ls $D/$n-heldout/runs | wc -l)" -ge 144 ] || \
  $B/gptfluence collect --quiet --config $D/$n/collect_config.json --curriculum-file $D/$n-heldout.jsonl \
    --record-steps ends --out $D/$n-heldout
lds() {  # fit store, held-out store, out, flags...
  [ -f $3 ] || $B/gptfluence lds $1 $2 --no-progress --threads 1 "${@:4}" --out $3
}
lds $D/$n $D/$n-heldout $D/$n-lds-default.json
lds $D/$n $D/$n-heldout $D/$n-lds-$OTHER.json --methods gptfluence --no-references --b-lags-lr-scaling $OTHER
S2=runs/draw2/sentiment-b4
[ -d $S2-heldout/runs ] || { echo "run benchmarks/lds_draw2.sh first (the decaying-rate sentiment store)"; exit 2; }
lds $S2 $S2-heldout $S2-lds-$OTHER.json --methods gptfluence --no-references --b-lags-lr-scaling $OTHER
$B/python benchmarks/merge_lds.py $D/$n-lds-default.json --out $R/lds_draw3.json --markdown $R/lds_draw3.md
$B/python benchmarks/merge_lds.py $D/$n-lds-$OTHER.json --out $R/lds_draw3_b_lags_lr_$OTHER.json \
  --markdown $R/lds_draw3_b_lags_lr_$OTHER.md
$B/python benchmarks/merge_lds.py $S2-lds-$OTHER.json --out $R/lds_draw2_b_lags_lr_$OTHER.json \
  --markdown $R/lds_draw2_b_lags_lr_$OTHER.md
