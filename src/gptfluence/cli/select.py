"""``gptfluence select``: the training subset (and order) a simulator predicts best for a target test set.

    gptfluence select DYNAMICS --method gptfluence --budget 64 --out DIR [--test-ids ... | --test-ids-file F]
    gptfluence select DYNAMICS --simulator SIMDIR --budget 64 --out DIR --verify --baselines grad_dot

Writes DIR/select_config.json, DIR/selection.json and DIR/curriculum.jsonl (one run line, what
``gptfluence collect --curriculum-file`` reads). ``--verify`` fine-tunes the choice, random subsets of
the same size and the baselines' choices (DIR/verify/, resumable) and writes DIR/compare.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptfluence.config import add_arguments, from_namespace, save_json
from gptfluence.errors import InputError

CONFIG_FORMAT = "gptfluence.select-config"


def register(sub: argparse._SubParsersAction) -> None:
    from gptfluence.analysis.selection import SelectConfig

    p = sub.add_parser("select", help="choose the training subset (and order) a simulator predicts best for a test set",
                       description="Score every training-pool example by the simulator's leave-one-out influence on "
                                   "the target test examples (along reference curricula of --budget examples, the "
                                   "store's batch size and epochs), keep the top --budget, then simulate candidate "
                                   "orders of that subset and keep the best predicted. Writes the chosen curriculum "
                                   "as a file `gptfluence collect --curriculum-file` reads. --verify checks the choice "
                                   "by real fine-tuning against random subsets of the same size and the --baselines' "
                                   "choices.")
    p.add_argument("dynamics", help="dynamics store (its pool, test set, start values and collection settings)")
    p.add_argument("--simulator", default=None, help="simulator folder written by `gptfluence fit` (default: fit --method on the store)")
    p.add_argument("--test-ids", nargs="+", type=int, default=None, help="target test ids (default: every test example)")
    p.add_argument("--test-ids-file", default=None, help="file of target test ids: a JSON list or one id per line")
    p.add_argument("--out", required=True, help="output folder (selection.json, curriculum.jsonl, select_config.json)")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, SelectConfig)
    p.set_defaults(func=run)


def read_test_ids_file(path: str) -> list[int]:
    """Test ids from a JSON list or one integer per line; `InputError` naming the file and line."""
    from gptfluence.dynamics.curriculum import read_text_file

    text = read_text_file(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--test-ids-file {path} line {e.lineno}: invalid JSON ({e.msg})") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
            raise InputError(f"--test-ids-file {path}: expected a JSON list of integer test ids")
        return list(data)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(int(line.strip()))
            except ValueError:
                raise InputError(f"--test-ids-file {path} line {n}: not an integer test id: {line.strip()!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from gptfluence.analysis.selection import (SelectConfig, Choice, check_budget, compare_selections, fit_on_store,
                                               resolve_test_ids, selection_choices, selection_fit_overrides)
    from gptfluence.config import to_dict, write_text_atomic
    from gptfluence.dynamics.curriculum import write_curriculum_lines
    from gptfluence.dynamics.store import Dynamics
    from gptfluence.outputs import has_json_format, prepare_output_dir
    from gptfluence.simulators import load_simulator, method_spec

    cfg = from_namespace(SelectConfig, args)
    if args.test_ids is not None and args.test_ids_file is not None:
        raise InputError("give --test-ids or --test-ids-file, not both")
    for name in ("seeds", "random_subsets", "workers", "orders"):
        if getattr(cfg, name) < (1 if name == "seeds" else 0):
            raise InputError(f"--{name.replace('_', '-')} must be >= {1 if name == 'seeds' else 0} (got {getattr(cfg, name)})")
    inputs = [args.dynamics] + ([args.simulator] if args.simulator else [])
    is_own = has_json_format("select_config.json", CONFIG_FORMAT)
    out = prepare_output_dir(args.out, "selection", is_own, inputs=inputs, create=False)
    store = Dynamics.open(args.dynamics)
    check_budget(cfg.budget, len(store.train_ids))
    ids = read_test_ids_file(args.test_ids_file) if args.test_ids_file else args.test_ids
    tids = resolve_test_ids(store, ids)
    for m in [cfg.method] + list(cfg.baselines):
        method_spec(m)  # names an unknown method before anything runs
    overrides = selection_fit_overrides(cfg.method, cfg.fit_preset)
    log = (lambda s: print(s, file=sys.stderr)) if not args.no_progress else (lambda s: None)
    torch.set_num_threads(1)
    if args.simulator:
        sim = load_simulator(args.simulator, dynamics=store)
        if str(sim.metric) != cfg.metric:
            raise InputError(f"--metric {cfg.metric}: the simulator {args.simulator} simulates {sim.metric!r}")
        source = {"simulator": str(args.simulator), "method": sim.method}
    else:
        log(f"fitting {cfg.method} ({cfg.metric}) on {args.dynamics}"
            + (f" with {overrides} (--fit-preset {cfg.fit_preset})" if overrides else ""))
        sim = fit_on_store(cfg.method, store, cfg.metric, seed=0, **overrides)
        source = {"fitted_on": str(args.dynamics), "method": cfg.method, "split_seed": 0,
                  "fit_preset": cfg.fit_preset, "config_overrides": overrides}
    prepare_output_dir(out, "selection", is_own, inputs=inputs)
    save_json({"format": CONFIG_FORMAT, **to_dict(cfg), "dynamics": str(args.dynamics), "simulator": source,
               "test_ids": tids.tolist()}, out / "select_config.json")
    name = str(sim.method)
    sims = {name: sim}
    for b in cfg.baselines:
        if b not in sims:
            log(f"fitting baseline {b} ({cfg.metric}) on {args.dynamics}")
            sims[b] = fit_on_store(b, store, cfg.metric, seed=0)
    seeds = [cfg.seed + s for s in range(cfg.seeds)] if cfg.verify else [cfg.seed]
    choices, selections = selection_choices({name: sim} if not cfg.verify else sims, store, cfg, tids, seeds,
                                            cfg.random_subsets if cfg.verify else 0, log=log)
    sel = selections[0]
    sel.update(config=to_dict(cfg), simulator=source, dynamics=str(args.dynamics))
    save_json(sel, out / "selection.json")
    write_curriculum_lines(out / "curriculum.jsonl", [("selection", choices[0].curriculum, name, cfg.seed)])
    print(f"{name}: {sel['budget']} of {sel['pool_size']} training examples, {sel['steps']} steps "
          f"(order {sel['order_name']}); predicted mean final {sel['metric']} on {len(sel['test_ids'])} targets: "
          f"{sel['predicted_mean']:.4g} ({sel['better']} is better)")
    print(f"-> {out / 'selection.json'}, curriculum -> {out / 'curriculum.jsonl'}")
    print(f"fine-tune on it with: gptfluence collect --config {Path(args.dynamics) / 'collect_config.json'} "
          f"--curriculum-file {out / 'curriculum.jsonl'} --record-steps ends --out STORE")
    if not cfg.verify:
        return 0
    (out / "verify").mkdir(exist_ok=True)
    rep = compare_selections(store, choices, out / "verify", tids, workers=cfg.workers, progress=not args.no_progress,
                             log=log)
    rep.update(config=to_dict(cfg), simulator=source, dynamics=str(args.dynamics), selections=[
        {k: v for k, v in s.items() if k not in ("scores", "times_scored")} for s in selections])
    save_json(rep, out / "compare.json")
    print(f"\n{'choice':<22} {'n':>3} {'predicted':>10} " + " ".join(f"{'actual ' + m[7:]:>16}" for m in
          sorted({k[:-5] for s in rep['summary'] for k in s if k.startswith('actual_') and k.endswith('_mean')})))
    keys = sorted({k[:-5] for s in rep["summary"] for k in s if k.startswith("actual_") and k.endswith("_mean")})
    for s in rep["summary"]:
        pred = s.get(f"predicted_by_{name}_mean")
        cells = []
        for k in keys:
            m, sd = s.get(f"{k}_mean"), s.get(f"{k}_sd")
            cells.append(f"{m:>8.4f} ± {sd:<5.3f}" if m is not None and sd is not None else
                         (f"{m:>16.4f}" if m is not None else f"{'n/a':>16}"))
        print(f"{s['choice']:<22} {s['n']:>3} {pred if pred is None else round(pred, 4)!s:>10} " + " ".join(cells))
    print(f"-> {out / 'compare.json'}")
    return 0
