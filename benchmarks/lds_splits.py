"""LDS of GPTfluence's fitting objectives and features over validation splits (benchmarks/results/lds_splits.*, lds_kfac.*).

The two-phase objective (``teacher_forcing_then_rollout``, the default on loss) keeps its rollout phase only when a
rollout epoch beats the teacher-forced weights on the 2 validation runs, so whether its LDS gain
appears depends on the split. This runs ``gptfluence lds`` (``--metrics``, default loss; GPTfluence
only, no references) for each task, split seed and objective variant, on the stores of ``make lds-builtin``, and tables
LDS per design, marking the runs whose per-example Spearman values equal teacher forcing only's
exactly (the rollout phase was not kept). Resumable: a variant whose output exists is not re-run.
Variants (``--variants``, see VARIANTS): with raw projected gradients (the default until
``none+kfac``) the default objective, teacher forcing only, the rollout phase always kept and
rollout only; with K-FAC-whitened gradient features (``kfac``) or both kinds (``raw_and_kfac``:
today's default features) the two-phase objective (the default on loss) or rollout only
(``raw_and_kfac_rollout4``: what ``objective="auto"`` runs for bleu, rougeL and accuracy), or the
two-phase objective always keeping its rollout phase (``raw_and_kfac_keep_best_epoch``); the word
TF-IDF similarity term and rank-1 factor projections (``raw_and_kfac_lexical``, ``raw_and_kfac_proj1``,
``raw_and_kfac_lexical_proj1``), and the encoder-feature similarity a store without a model gets
(``features``, ``features_lexical_proj1``); bagged ensembles of 3 (``*_ensemble3``), and with the
A factors averaged over the training pool after fitting (``*_pool_mean``, ``--a-factors pool_mean``),
B's projection term too (``*_pool_mean_b``, ``--b-projection pool_mean``), with lagged additive factors
(``*_lags3``, ``--b-lags 3``; ``_lags1``, ``_lags6``, ``_lags12``, ``_lags24``, ``_lags48``: other lag counts; ``*_auto``: with ``--objective auto``;
``*_lr_step``: ``--b-lags-lr-scaling batch_and_step``, with 6, 12 or 24 lags); every variant that does not name them runs with ``--a-factors pair`` /
``--b-projection pair`` / ``--b-lags 0`` / ``--b-lags-lr-scaling batch``, the defaults before).

    python benchmarks/lds_splits.py --work runs/lds-splits --out benchmarks/results/lds_splits.json \
        --markdown benchmarks/results/lds_splits.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptfluence.config import write_text_atomic  # noqa: E402
from gptfluence.dynamics import Dynamics  # noqa: E402

# Every variant names its gradient features explicitly, so a result stays what its name says when
# defaults change: raw_gradients is the default objective with raw projected gradients (the
# default until none+kfac); teacher_forcing / rollout_phase_keep_best_epoch / rollout change the
# objective of that variant; raw_and_kfac is the default on loss before the lexical term (none+kfac,
# two-phase, 32-dimensional projections), spelled out; raw_and_kfac_lexical is today's, spelled out.
# Variants measured before the lexical term (the default since then) pin the earlier settings
# (PROJ32: 32-dimensional projections, no lexical term), so their cached and re-run results stay what they were.
PROJ32 = ["--proj-dim", "32", "--no-lexical", "--ensemble", "1"]
ONE = ["--ensemble", "1"]  # one model, not a bagged ensemble (the default until --ensemble)
RAW = ["--similarity-preconditioner", "none", *PROJ32]
TWO_PHASE = ["--objective", "teacher_forcing_then_rollout"]  # the default objective of loss (objective="auto")
# the bagged ensemble of 3 with the TF-IDF term and pool-mean A, with gradient terms and pool-mean B projection
# (POOL_MEAN_B) or with encoder-feature terms (FEATURES_POOL_MEAN): the bases of the lagged-factor variants
POOL_MEAN_B = ["--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim", "32", "--ensemble", "3",
               "--a-factors", "pool_mean", "--b-projection", "pool_mean"]
FEATURES_POOL_MEAN = ["--similarity", "features", "--lexical", "--proj-dim", "32", "--ensemble", "3",
                      "--a-factors", "pool_mean"]
VARIANTS = {
    "raw_gradients": [*TWO_PHASE, *RAW],
    "teacher_forcing": ["--objective", "teacher_forcing", *RAW],
    "rollout_phase_keep_best_epoch": [*TWO_PHASE, "--rollout-phase-keep", "best_epoch", *RAW],
    "rollout": ["--objective", "rollout", "--rollout-runs", "8", *RAW],
    "kfac": [*TWO_PHASE, "--similarity-preconditioner", "kfac", *PROJ32],
    "kfac_rollout": ["--similarity-preconditioner", "kfac", "--objective", "rollout", "--rollout-runs", "8", *PROJ32],
    "raw_and_kfac": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", *PROJ32],
    "raw_and_kfac_rollout": ["--similarity-preconditioner", "none+kfac", "--objective", "rollout", "--rollout-runs", "8", *PROJ32],
    # objective="auto" for metrics of decoded text: rollout with GPTfluence's default 4 runs per step
    "raw_and_kfac_rollout4": ["--similarity-preconditioner", "none+kfac", "--objective", "rollout", "--rollout-runs", "4", *PROJ32],
    "raw_and_kfac_keep_best_epoch": [*TWO_PHASE, "--rollout-phase-keep", "best_epoch", "--similarity-preconditioner", "none+kfac", *PROJ32],
    "raw_and_kfac_8checkpoints": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--similarity-checkpoints", "8", *PROJ32],
    "raw_and_kfac_damping1": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--similarity-damping", "1.0", *PROJ32],
    # the word TF-IDF similarity term (--lexical) and rank-1 projections (--proj-dim 1), apart and together
    "raw_and_kfac_lexical": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim", "32", *ONE],
    "raw_and_kfac_proj1": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--no-lexical", "--proj-dim", "1", *ONE],
    "raw_and_kfac_lexical_proj1": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim", "1", *ONE],
    "raw_and_kfac_lexical_proj8": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim", "8", *ONE],
    # what a store without a model gets (imported GPTDynamics): the encoder-feature cosine, with the same additions
    "features": [*TWO_PHASE, "--similarity", "features", "--no-lexical", "--proj-dim", "32", *ONE],
    "features_lexical_proj1": [*TWO_PHASE, "--similarity", "features", "--lexical", "--proj-dim", "1", *ONE],
    "features_lexical": [*TWO_PHASE, "--similarity", "features", "--lexical", "--proj-dim", "32", *ONE],
    # bagged ensembles of 3 (--ensemble 3) of the lexical default, with and without a model
    "raw_and_kfac_lexical_ensemble3": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim",
                                       "32", "--ensemble", "3"],
    "features_lexical_ensemble3": [*TWO_PHASE, "--similarity", "features", "--lexical", "--proj-dim", "32",
                                   "--ensemble", "3"],
    # the A factors replaced by their training-pool mean after fitting (--a-factors pool_mean), one model and ensembles
    "raw_and_kfac_lexical_pool_mean": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical", "--proj-dim",
                                       "32", *ONE, "--a-factors", "pool_mean"],
    "raw_and_kfac_lexical_ensemble3_pool_mean": [*TWO_PHASE, "--similarity-preconditioner", "none+kfac", "--lexical",
                                                 "--proj-dim", "32", "--ensemble", "3", "--a-factors", "pool_mean"],
    "features_lexical_ensemble3_pool_mean": [*TWO_PHASE, "--similarity", "features", "--lexical", "--proj-dim", "32",
                                             "--ensemble", "3", "--a-factors", "pool_mean"],
    # ... and B's projection term too (--b-projection pool_mean): the pair-specific part of B is its similarity terms
    "raw_and_kfac_lexical_ensemble3_pool_mean_b": [*TWO_PHASE, *POOL_MEAN_B],
    "features_lexical_ensemble3_pool_mean_b": [*TWO_PHASE, *FEATURES_POOL_MEAN, "--b-projection", "pool_mean"],
    # ... and lagged additive factors D_1..D_L (--b-lags L; 3: the batches of the last 3 steps act again on beta)
    **{f"raw_and_kfac_lexical_ensemble3_pool_mean_b_lags{n}": [*TWO_PHASE, *POOL_MEAN_B, "--b-lags", str(n)]
       for n in (3, 1, 6, 12, 24, 48)},
    # the same with the default objective per metric (--objective auto: rollout for bleu, rougeL and accuracy)
    **{f"ensemble3_pool_mean_b_lags{n}_auto": ["--objective", "auto", *POOL_MEAN_B, "--b-lags", str(n)] for n in (3, 6, 12, 24)},
    # 24 lags with the lagged factors also scaled by the learning rate of the step at which they act
    # (--b-lags-lr-scaling batch_and_step; only a store trained under a schedule that is not constant differs)
    **{f"ensemble3_pool_mean_b_lags{n}_auto_lr_step": ["--objective", "auto", *POOL_MEAN_B, "--b-lags", str(n),
                                                       "--b-lags-lr-scaling", "batch_and_step"] for n in (6, 12, 24)},
    **{f"features_lexical_ensemble3_pool_mean_lags{n}": [*TWO_PHASE, *FEATURES_POOL_MEAN, "--b-lags", str(n)]
       for n in (3, 6, 12, 24)},
}
# every variant that does not name its A factors (its B projection) ran with the paper's per-pair ones (the
# defaults until pool_mean), and every one that does not name --b-lags without lagged additive factors
PAIR_PINS = {"--a-factors": "pair", "--b-projection": "pair", "--b-lags": "0", "--b-lags-lr-scaling": "batch"}
DESIGNS = ("both", "membership", "order")


def heldout_store(task: str, lds_dirs: dict[str, str]) -> str:
    return f"{lds_dirs.get(task, lds_dirs['*'])}/{task}-heldout"


def run_one(task: str, seed: int, variant: str, metric: str, args: argparse.Namespace, lds_dirs: dict[str, str]) -> Path:
    suffix = "" if metric == "loss" else f"_{metric}"  # loss keeps the cache names it always had
    out = Path(args.work) / f"{task}_seed{seed}_{variant}{suffix}.json"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gptfluence", "lds", f"{args.builtin_dir}/{task}", heldout_store(task, lds_dirs),
           "--methods", "gptfluence", "--metrics", metric, "--no-references", "--no-progress", "--threads", "1",
           "--seed", str(seed), "--out", str(out), *VARIANTS[variant],
           *[x for flag, value in PAIR_PINS.items() if flag not in VARIANTS[variant] for x in (flag, value)]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def per_design(path: Path, metric: str) -> dict[str, dict]:
    d = json.loads(path.read_text())
    recs = {r["variation"]: r for r in d["results"] if r["method"] == "gptfluence" and r["metric"] == metric}
    per = {p["variation"]: p["spearman"] for p in d["per_example"] if p["method"] == "gptfluence" and p["metric"] == metric}
    return {v: {"lds_mean": recs[v]["lds_mean"], "lds_ci_low": recs[v]["lds_ci_low"], "lds_ci_high": recs[v]["lds_ci_high"],
                "n_curricula": recs[v]["n_curricula"], "spearman": per[v]} for v in recs}


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sentiment", "entailment", "yesno", "data2text", "translation"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["raw_gradients", "teacher_forcing", "rollout_phase_keep_best_epoch"],
                   choices=list(VARIANTS))
    p.add_argument("--metrics", nargs="+", default=["loss"],
                   help="metrics whose LDS is measured (default loss); a task whose store lacks one is skipped for it")
    p.add_argument("--builtin-dir", default="runs/builtin")
    p.add_argument("--lds-dir", action="append", default=[],
                   help="TASK=DIR of the held-out store DIR/TASK-heldout; '*=DIR' for the rest (default runs/lds-builtin)")
    p.add_argument("--work", default="runs/lds-splits")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs of gptfluence lds at once (each with 1 thread; default 1); results do not depend on it")
    a = p.parse_args()
    lds_dirs = {"*": "runs/lds-builtin"}
    lds_dirs.update(dict(s.split("=", 1) for s in a.lds_dir))
    recorded = {t: set(Dynamics.open(f"{a.builtin_dir}/{t}").metrics) for t in a.tasks}
    pairs = [(m, t) for m in a.metrics for t in a.tasks if m in recorded[t]]
    if a.jobs > 1:  # fill the cache in parallel; the loop below then reads it in a fixed order
        todo = [(t, seed, v, m) for m, t in pairs for seed in a.seeds for v in a.variants]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for f in [pool.submit(run_one, t, seed, v, m, a, lds_dirs) for t, seed, v, m in todo]:
                f.result()
    results = []
    for metric, task in pairs:
        for seed in a.seeds:
            got = {v: per_design(run_one(task, seed, v, metric, a, lds_dirs), metric) for v in a.variants}
            tf = got.get("teacher_forcing")
            for v, des in got.items():
                same = tf is not None and v != "teacher_forcing" and all(
                    des[d]["spearman"] == tf[d]["spearman"] for d in des if d in tf)
                rec = {"task": task, "split_seed": seed, "variant": v, "method": "gptfluence", "metric": metric,
                       "equals_teacher_forcing": bool(same),
                       **{f"lds_{d}": des[d]["lds_mean"] for d in DESIGNS if d in des},
                       **{f"lds_{d}_ci": [des[d]["lds_ci_low"], des[d]["lds_ci_high"]] for d in DESIGNS if d in des},
                       "n_curricula": {d: des[d]["n_curricula"] for d in des}}
                results.append(rec)
    means: dict[str, float | None] = {}  # "<variant>/<design>" (one metric) or "<metric>/<variant>/<design>"
    for metric in dict.fromkeys(m for m, _ in pairs):
        for v in a.variants:
            for d in DESIGNS:
                vals = [r[f"lds_{d}"] for r in results if r["metric"] == metric and r["variant"] == v
                        and r.get(f"lds_{d}") is not None]
                key = f"{v}/{d}" if len(a.metrics) == 1 else f"{metric}/{v}/{d}"
                means[key] = sum(vals) / len(vals) if vals else None
    # per (metric, task, variant, design): mean and sample standard deviation over the split seeds
    per_task: list[dict] = []
    for metric, task in pairs:
        for v in a.variants:
            rec = {"metric": metric, "task": task, "variant": v}
            for d in DESIGNS:
                vals = [r[f"lds_{d}"] for r in results if r["metric"] == metric and r["task"] == task
                        and r["variant"] == v and r.get(f"lds_{d}") is not None]
                rec[f"lds_{d}_mean"] = statistics.fmean(vals) if vals else None
                rec[f"lds_{d}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
            per_task.append(rec)
    names = " / ".join(a.metrics)
    out = {"benchmark": f"GPTfluence {names} LDS per validation split and fitting objective (gptfluence lds --seed S)",
           "metrics": a.metrics, "variants": {v: VARIANTS[v] for v in a.variants}, "seeds": a.seeds, "tasks": a.tasks,
           "heldout_stores": {t: heldout_store(t, lds_dirs) for t in a.tasks},
           "definition": "lds_<design>: mean over test examples of the Spearman across held-out curricula of simulated "
                         "vs true final metric; equals_teacher_forcing: every per-example Spearman equals the "
                         "teacher-forcing-only fit's on the same split (the rollout phase was not kept)",
           "results": results, "mean_over_tasks_and_splits": means,
           "per_task_over_splits": per_task}
    write_text_atomic(a.out, json.dumps(out, indent=1) + "\n")
    if a.markdown:
        one = len(a.metrics) == 1
        head = "| task | split seed | " if one else "| metric | task | split seed | "
        lines = [head + " | ".join(a.variants) + " |", "|" + " --- |" * ((2 if one else 3) + len(a.variants))]
        for metric in dict.fromkeys(m for m, _ in pairs):
            for task in [t for m, t in pairs if m == metric]:
                for seed in a.seeds:
                    cells = []
                    for v in a.variants:
                        r = next(r for r in results if r["metric"] == metric and r["task"] == task
                                 and r["split_seed"] == seed and r["variant"] == v)
                        s = " / ".join(fmt(r.get(f"lds_{d}")) for d in DESIGNS)
                        cells.append(s + (" (= TF)" if r["equals_teacher_forcing"] else ""))
                    lines.append(("" if one else f"| {metric} ") + f"| {task} | {seed} | " + " | ".join(cells) + " |")
            pre = "" if one else f"{metric}/"
            lines.append(("| **mean** | | " if one else f"| {metric} | **mean** | | ")
                         + " | ".join(" / ".join(fmt(means[f"{pre}{v}/{d}"]) for d in DESIGNS) for v in a.variants) + " |")
        lines += ["", f"{names} LDS random / membership-only / order-only curricula; (= TF): per-example values "
                  "identical to teacher forcing only (the rollout phase was not kept on that split).", "",
                  "Per task, mean ± sample standard deviation over the split seeds " + ", ".join(map(str, a.seeds)) + ":", "",
                  ("| task | " if one else "| metric | task | ") + " | ".join(a.variants) + " |",
                  "|" + " --- |" * ((1 if one else 2) + len(a.variants))]
        for rec_task in dict.fromkeys((r["metric"], r["task"]) for r in per_task):
            cells = []
            for v in a.variants:
                r = next(r for r in per_task if (r["metric"], r["task"]) == rec_task and r["variant"] == v)
                cells.append(" / ".join(fmt(r[f"lds_{d}_mean"]) + ("" if r[f"lds_{d}_sd"] is None else
                                                                   f" ± {r[f'lds_{d}_sd']:.3f}") for d in DESIGNS))
            lines.append(("" if one else f"| {rec_task[0]} ") + f"| {rec_task[1]} | " + " | ".join(cells) + " |")
        write_text_atomic(a.markdown, "\n".join(lines) + "\n")
    print(json.dumps(means, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
