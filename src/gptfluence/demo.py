"""The main job: from nothing to answers on the embedded default, in one command.

Stages (each reuses what is cached and says so):

1. **collect**: for each task, fine-tune the default small GPT-NeoX under ``runs`` curricula
   (the base model is built and pre-trained once, offline, and cached);
2. **evaluate**: fit GPTfluence, Simfluence and the trivial references on the fit runs, roll out
   on held-out runs, score (all-steps MSE/MAE, final-step Spearman, curriculum Spearman);
3. **influence**: leave-one-out influence of every training example of a held-out curriculum on
   a few test examples, with the fitted GPTfluence simulator of the test loss;
4. **report**: ``report/index.html`` with figures, and a final table in the terminal.

Sizes come from a packaged scale (``configs/<scale>.json``: ``demo`` by default, ``tiny`` for
tests, ``paper`` for the paper's fine-tuning shape), a ``--config`` file, and flags, in that order.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptfluence.config import arg, save_json
from gptfluence.errors import InputError

SCALES = ("demo", "tiny", "paper")


def _collect_field(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A DemoConfig field that *is* a `CollectConfig` field: the same help text (one definition),
    with the demo's own default when given."""
    from gptfluence.dynamics.collect import CollectConfig

    f = CollectConfig.__dataclass_fields__[name]
    return arg(f.default if default is dataclasses.MISSING else default, f.metadata.get("help", ""))


@dataclass
class DemoConfig:
    """Sizes and settings of `gptfluence demo` (saved as ``demo_config.json`` in the output).
    The fine-tuning fields are `CollectConfig`'s (same meaning and help), with smaller defaults."""

    tasks: list[str] = arg(["sentiment", "entailment", "yesno", "data2text", "translation"], "built-in tasks to run")
    runs: int = arg(16, "fine-tuning runs (curricula) per task")
    n_train: int = _collect_field("n_train", 100)
    n_test: int = _collect_field("n_test", 50)
    examples_per_run: int = _collect_field("examples_per_run", 64)
    batch_size: int = _collect_field("batch_size")
    epochs: int = _collect_field("epochs", 4)
    lr: float = _collect_field("lr")
    gen_every: int = _collect_field("gen_every")
    gen_max_new_tokens: int = _collect_field("gen_max_new_tokens")
    model: str = _collect_field("model")
    model_layers: int = _collect_field("model_layers")
    model_hidden: int = _collect_field("model_hidden")
    model_pretrain_steps: int = _collect_field("model_pretrain_steps")
    device: str = _collect_field("device")
    methods: list[str] = arg(["gptfluence", "simfluence", "constant", "mean_curve"], "simulators to fit and compare")
    encoder: str = arg("minilm", "text encoder for GPTfluence features")
    sim_epochs: int = arg(60, "maximum fitting epochs of the learned simulators")
    split_val: int = arg(0, "validation runs per task (0 = the paper's 2/32 share, at least 1)")
    split_test: int = arg(0, "held-out test runs per task (0 = the paper's 5/32 share, at least 2)")
    influence_test_examples: int = arg(3, "test examples per task whose top helpful/harmful training examples are reported")
    seed: int = arg(0, "seed of the task generators, curricula and run split")
    workers: int = arg(0, "collection worker processes (0 = one per core)")

    def validate(self) -> None:
        """Refuse settings that would fail after collecting (`InputError` naming the flag)."""
        from gptfluence.simulators import method_spec

        if self.runs < 1:
            raise InputError(f"--runs must be >= 1, got {self.runs}")
        for name in ("split_val", "split_test", "influence_test_examples", "workers"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.sim_epochs < 1:
            raise InputError(f"--sim-epochs must be >= 1, got {self.sim_epochs}")
        n_test = self.split_test or max(2, round(self.runs * 5 / 32))
        n_val = self.split_val or max(1, round(self.runs * 2 / 32))
        if n_test + n_val >= self.runs:
            raise InputError(f"--runs {self.runs} leaves no run to fit after {n_test} held-out and {n_val} validation "
                             f"runs (--split-test / --split-val); collect more runs or hold out fewer")
        if not self.tasks:
            raise InputError("--tasks: give at least one task")
        for m in self.methods:
            method_spec(m)
        collect_config_for(self, self.tasks[0]).validate()  # the collection's own checks, before anything runs


def load_scale(scale: str) -> dict[str, Any]:
    if scale not in SCALES:
        raise InputError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    text = resources.files("gptfluence").joinpath("configs", f"{scale}.json").read_text(encoding="utf-8")
    return json.loads(text)


def collect_config_for(cfg: DemoConfig, task: str):
    """The `CollectConfig` of one demo task: the shared fields, task seed and run seed = ``cfg.seed``."""
    from gptfluence.dynamics.collect import CollectConfig

    return CollectConfig(task=task, task_seed=cfg.seed, run_seed=cfg.seed,
                         **{name: getattr(cfg, name) for name in shared_collect_fields()})


def shared_collect_fields() -> tuple[str, ...]:
    """The `DemoConfig` fields that are `CollectConfig` fields (declared with `_collect_field`),
    passed through to every task's collection; task seed and run seed both come from ``seed``."""
    from gptfluence.dynamics.collect import CollectConfig

    return tuple(f.name for f in dataclasses.fields(DemoConfig) if f.name in CollectConfig.__dataclass_fields__)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def terminal_table(result: dict[str, Any]) -> str:
    """Aligned text table; the lowest MSE of each (task, metric) is marked with '*'."""
    rows = result["results"]
    head = ["task", "metric", "method", "MSE", "MAE", "final Spearman", "curriculum Spearman"]
    body = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["metric"]), []).append(r)
    for (task, metric), rs in groups.items():
        finite = [r["mse_mean"] for r in rs if r["mse_mean"] is not None and np.isfinite(r["mse_mean"])]
        best = min(finite) if finite else None
        for r in rs:
            star = "*" if best is not None and r["mse_mean"] == best else " "
            name = r["method"] + (" (untrained)" if r.get("best_epoch") == 0 else "")
            if r.get("status") == "skipped":
                body.append([task, metric, name, f"skipped: {r.get('reason', '')}", "", "", ""])
                continue
            if r.get("n_nonfinite"):  # never a number computed on the surviving trajectories
                n = r.get("n_trajectories") or r.get("n_runs", 0) * r.get("n_test_examples", 0)
                body.append([task, metric, name, f"diverged: {r['n_nonfinite']} of {n}", "n/a", "n/a", "n/a"])
                continue
            body.append([task, metric, name, f"{_fmt(r['mse_mean'])}{star}", _fmt(r["mae_mean"]),
                         f"{_fmt(r['spearman_final_mean'], 3)} ± {_fmt(r['spearman_final_std'], 2)}",
                         _fmt(r["curriculum_spearman_mean"], 3)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for b in body:
        if prev is not None and b[:2] != prev:
            out.append("")
        out.append(line(b))
        prev = b[:2]
    return "\n".join(out)


def is_demo_output(folder: Path) -> bool:
    """Whether ``folder`` is the output of an earlier demo (it holds demo_config.json)."""
    return (Path(folder) / "demo_config.json").is_file()


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True, log: Callable[[str], None] = print,
             overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into ``out`` (new, empty or an earlier demo's output; another non-empty
    folder only with ``overwrite``, and then only the demo's own files and folders are written);
    returns a summary dict (paths, timings, the evaluation)."""
    import torch

    from gptfluence.analysis.evaluate import evaluate, format_markdown, write_results
    from gptfluence.analysis.influence import influence_report, run_loo_influence
    from gptfluence.dynamics.collect import collect
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.report import write_report
    from gptfluence.simulators import load_simulator

    from gptfluence.outputs import prepare_output_dir, slug

    cfg.validate()
    out = prepare_output_dir(out, "demo output", is_demo_output, overwrite=overwrite)
    save_json(cfg, out / "demo_config.json")
    timings: dict[str, float] = {}

    # 1. collect -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    stores = []
    for i, task in enumerate(cfg.tasks):
        ccfg = collect_config_for(cfg, task)
        path = out / "dynamics" / slug(task)
        have = len(Dynamics.open(path)) if (path / "manifest.json").exists() else 0
        log(f"[1/4 collect] {task}: {cfg.runs} runs" + (f" ({min(have, cfg.runs)} cached)" if have else ""))
        store = collect(ccfg, path, runs=cfg.runs, workers=cfg.workers, progress=progress, log=log)
        save_json(ccfg, path / "collect_config.json")
        if len(store) > cfg.runs:  # the folder holds more runs than asked for: use the first `runs`
            store = Dynamics(store.task, store.runs(store.run_ids[:cfg.runs]), manifest=store.manifest)
        stores.append(store)
    timings["collect_s"] = time.perf_counter() - t0

    # 2. evaluate ------------------------------------------------------------------------------
    log(f"[2/4 evaluate] fitting {', '.join(cfg.methods)} on each task; held-out runs for scoring")
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the simulators' small tensor ops are fastest single-threaded
    configs: dict[str, dict[str, Any]] = {}
    for m in cfg.methods:
        if m == "gptfluence":
            configs[m] = {"epochs": cfg.sim_epochs, "encoder": cfg.encoder}
        elif m == "simfluence":
            configs[m] = {"epochs": cfg.sim_epochs}
    result = evaluate(stores, methods=cfg.methods, seed=cfg.seed, configs=configs, progress=progress,
                      n_val=cfg.split_val or None, n_test=cfg.split_test or None,
                      save_simulators=out / "simulators")
    write_results(result, out / "evaluation.json", markdown=out / "evaluation.md")
    timings["evaluate_s"] = time.perf_counter() - t0

    # 3. influence -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    reports = []
    if "gptfluence" in cfg.methods and cfg.influence_test_examples > 0:
        log("[3/4 influence] leave-one-out influence with GPTfluence (loss) on a held-out curriculum")
        for task, store in zip(result["config"]["tasks"], stores):
            sim_dir = out / "simulators" / slug(task) / "gptfluence-loss"
            if not sim_dir.exists():
                continue
            sim = load_simulator(sim_dir, dynamics=store)
            run = store.run(result["splits"][task]["test"][0])
            # the test examples whose loss changed most along this run (most to explain)
            v = run.trajectory("loss")
            change = np.abs(v[-1] - v[0])
            chosen = run.test_ids[np.argsort(-change)[:cfg.influence_test_examples]]
            infl = run_loo_influence(sim, run, test_ids=chosen, dynamics=store)
            rep = influence_report(infl, store, test_ids=chosen.tolist(), k=5)
            rep["task"] = task
            rep["run_id"] = run.run_id
            reports.append(rep)
        save_json({"reports": reports}, out / "influence.json")
    timings["influence_s"] = time.perf_counter() - t0

    # 4. report --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    log("[4/4 report] writing figures and the HTML page")
    index = write_report(out)
    timings["report_s"] = time.perf_counter() - t0
    save_json(timings, out / "timings.json")
    return {"result": result, "report": index, "timings": timings, "influence": reports,
            "markdown": format_markdown(result)}
