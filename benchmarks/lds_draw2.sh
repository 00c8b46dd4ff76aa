#!/bin/bash
# Unseen task kinds and settings (runs/draw2, loss only), never used to choose a default: the mixed task
# (mix: every built-in member in one pool), sentiment trained with batch 4, 96 examples per run, 2 epochs
# and lr 1e-3 with 10 warmup steps and linear decay (sentiment-b4), translation on a 3-layer, 96-wide model
# (translation-l3); task seed 2, held-out curricula seed 2. Per store: every method at today's defaults
# (-> lds_draw2.*), GPTfluence at the default before lagged factors, without them and learning-rate
# scaling (--b-lags 0 --no-step-lr-scaling -> lds_draw2_previous.*), with 3 lagged factors (the default
# before 6: --b-lags 3 -> lds_draw2_b_lags3.*), with 6 (the default before 24: --b-lags 6 -> lds_draw2_b_lags6.*;
# both with the lagged factors scaled as they were then, --b-lags-lr-scaling batch),
# and GPTfluence without
# learning-rate scaling alone (--no-step-lr-scaling; only sentiment-b4's schedule is not constant ->
# lds_draw2_no_lr_scaling.*). Resumable: a store or result that exists is not redone.
#   benchmarks/lds_draw2.sh        (BIN: the virtual environment's bin folder, default .venv/bin)
set -e
cd "$(dirname "$0")/.."
B=${BIN:-.venv/bin}
D=runs/draw2
R=benchmarks/results
lds() {  # name, out suffix, flags...
  n=$1; out=$D/$n-lds-$2.json; shift 2
  [ -f $out ] || $B/gptfluence lds $D/$n $D/$n-heldout --no-progress --threads 1 "$@" --out $out
}
collect() {  # name, collection flags...
  n=$1; shift
  [ -d $D/$n/runs ] && [ "$(ls $D/$n/runs | wc -l)" -ge 32 ] || \
    $B/gptfluence collect --quiet "$@" --runs 32 --gen-every 0 --out $D/$n
  [ -f $D/$n-heldout.jsonl ] || \
    $B/gptfluence curricula --dynamics $D/$n --design both membership order --n 48 --seed 2 --out $D/$n-heldout.jsonl
  [ -d $D/$n-heldout/runs ] && [ "$(ls $D/$n-heldout/runs | wc -l)" -ge 144 ] || \
    $B/gptfluence collect --quiet --config $D/$n/collect_config.json --curriculum-file $D/$n-heldout.jsonl \
      --record-steps ends --out $D/$n-heldout
  lds $n default
  lds $n previous --methods gptfluence --no-references --b-lags 0 --no-step-lr-scaling
  lds $n b_lags3 --methods gptfluence --no-references --b-lags 3 --b-lags-lr-scaling batch
  lds $n b_lags6 --methods gptfluence --no-references --b-lags 6 --b-lags-lr-scaling batch
}
collect mix --task mix --task-seed 2
collect sentiment-b4 --task sentiment --task-seed 2 --batch-size 4 --examples-per-run 96 --epochs 2 --lr 0.001 \
  --lr-schedule linear --warmup-steps 10
lds sentiment-b4 no_lr_scaling --methods gptfluence --no-references --no-step-lr-scaling
collect translation-l3 --task translation --task-seed 2 --model-layers 3 --model-hidden 96
S="mix sentiment-b4 translation-l3"
$B/python benchmarks/merge_lds.py $(for n in $S; do echo $D/$n-lds-default.json; done) \
  --out $R/lds_draw2.json --markdown $R/lds_draw2.md
$B/python benchmarks/merge_lds.py $(for n in $S; do echo $D/$n-lds-previous.json; done) \
  --out $R/lds_draw2_previous.json --markdown $R/lds_draw2_previous.md
$B/python benchmarks/merge_lds.py $(for n in $S; do echo $D/$n-lds-b_lags3.json; done) \
  --out $R/lds_draw2_b_lags3.json --markdown $R/lds_draw2_b_lags3.md
$B/python benchmarks/merge_lds.py $(for n in $S; do echo $D/$n-lds-b_lags6.json; done) \
  --out $R/lds_draw2_b_lags6.json --markdown $R/lds_draw2_b_lags6.md
$B/python benchmarks/merge_lds.py $D/sentiment-b4-lds-no_lr_scaling.json \
  --out $R/lds_draw2_no_lr_scaling.json --markdown $R/lds_draw2_no_lr_scaling.md
