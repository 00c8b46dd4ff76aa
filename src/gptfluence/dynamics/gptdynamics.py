"""Import and export of the published GPTDynamics layout (Chai et al. 2024).

Published layout (what `export_gptdynamics` writes and `import_gptdynamics` reads)::

    DIR/
      texts/train.jsonl      {"id": int, "input": prompt + target, "context": prompt} per line
      texts/test.jsonl       same fields
      runs/<run folder>/     one folder per run, named in the published style
                             output_sample_bs-{b}_shot-{N}_sample-{n}_model-{m}_lr-{lr}_epoch-{e}_seed-{s}
                             when the run's config has those fields, else the run id
        train_samples_id.json          {"step": s, "samples_id": [ids of the batch of step s]}, s = 1..T
        all_<metric>_trajectory.out    {"id": test_id, "loss_trajectory": [{"step": s, "loss": v}, ...]}
                                       (the keys say "loss" for every metric: loss, bleu, rougeL, ...)

Steps in the published files start at 1 (after the first update). What the published format
cannot hold (run ids, seeds, the step-0 values measured before fine-tuning, learning rates,
configs, example metadata, padding width, the recorded-step grid) is written beside it so that
store -> GPTDynamics -> store is lossless:

      gptfluence_manifest.json       task description, metrics, collection config, run id -> folder,
                                     example metadata
      runs/<run folder>/gptfluence.json  run id, seed, config, info, test ids, recorded steps,
                                     step-0 values, learning rates, batch width

Readers of the published layout ignore these files; `import_gptdynamics` uses them when present.
Without them (real published data) run ids are the folder names and the seed is parsed from the
folder name.

Real files have two quirks this reader tolerates: missing steps (a step with no record for any
test example is not in ``Run.steps``; a test example missing a step that others have gets NaN)
and exact repeats (the same step twice with the same value is kept once). The same step twice
with *different* values is an error naming the file, line, test id and step.

Values are float32 in the store. They are written with the shortest decimal that reads back to
the same float32 (e.g. ``1.6``), falling back to the exact float64 repr where double rounding
could differ, so an export reads back bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import check_header, json_default, load_json, save_json, write_text_atomic
from gptfluence.errors import InputError
from gptfluence.jsonl import as_int, get_field, iter_json_lines
from gptfluence.types import CLASSIFICATION, GENERATION, Example, Task

from gptfluence.dynamics.curriculum import pad_rows, read_samples_id
from gptfluence.dynamics.store import Dynamics, Run, create_store

MANIFEST_NAME = "gptfluence_manifest.json"
SIDECAR_NAME = "gptfluence.json"
MANIFEST_FORMAT = "gptfluence.gptdynamics-export"
SIDECAR_FORMAT = "gptfluence.gptdynamics-run"
SIDECAR_VERSION = 1
CURRICULUM_FILE = "train_samples_id.json"
TRAJ_RE = re.compile(r"^all_(.+)_trajectory\.out$")
_FOLDER_FIELDS = ("bs", "shot", "sample", "model", "lr", "epoch", "seed")
# config keys that can fill each field of the published folder name, first match wins
_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "bs": ("bs", "batch_size", "train_batch_size"),
    "shot": ("shot", "pool_size", "n_train", "num_train", "train_pool_size"),
    "sample": ("sample", "examples_per_run", "samples_per_run", "subset_size", "num_samples", "n_samples"),
    "model": ("model", "model_name", "base_model", "model_name_or_path"),
    "lr": ("lr", "learning_rate"),
    "epoch": ("epoch", "epochs", "num_epochs", "num_train_epochs"),
    "seed": ("seed",),
}
FOLDER_KEY = "gptdynamics_folder"  # run.info key holding the folder name a run was imported from


# ---------------------------------------------------------------------------------------------
# small helpers


def format_float32(v: float) -> str:
    """Shortest JSON number that reads back (via float64) to exactly the float32 ``v``."""
    f = np.float32(v)
    if not np.isfinite(f):
        return "NaN" if np.isnan(f) else ("Infinity" if f > 0 else "-Infinity")
    s = str(f)  # numpy's shortest round-trip repr for float32
    if np.float32(float(s)).view(np.uint32) == f.view(np.uint32):
        return s
    return repr(float(f))  # exact: float32 -> float64 is exact and repr(float64) round-trips


def format_float32_array(values: np.ndarray) -> list[str]:
    """`format_float32` of every element of a float32 array (flattened, C order), vectorised check."""
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    out = [str(x) for x in flat]
    finite = np.isfinite(flat)
    back = np.asarray([float(x) if f else 0.0 for x, f in zip(out, finite)], dtype=np.float64).astype(np.float32)
    bad = np.nonzero(~finite | (back.view(np.uint32) != flat.view(np.uint32)))[0]
    for k in bad.tolist():
        out[k] = format_float32(flat[k])
    return out


def _format_float64(v: float) -> Any:
    v = float(v)
    return v if math.isfinite(v) else None


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _format_lr_field(v: Any) -> str:
    if isinstance(v, str):
        return v
    s = f"{float(v):g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), s)


def _name_fields(run: Run) -> dict[str, Any] | None:
    """The published folder-name fields of a run, or None when its config lacks any of them."""
    cfg = run.config or {}
    out: dict[str, Any] = {}
    for fld in _FOLDER_FIELDS:
        if fld == "seed" and run.seed is not None:
            out[fld] = run.seed
            continue
        for key in _FIELD_ALIASES[fld]:
            if key in cfg and cfg[key] is not None and not isinstance(cfg[key], (dict, list)):
                out[fld] = cfg[key]
                break
        else:
            return None
    return out


def published_folder_name(run: Run) -> str | None:
    """``output_sample_bs-..._seed-...`` for ``run`` when its config has the fields, else None."""
    if isinstance(run.info.get(FOLDER_KEY), str) and run.info[FOLDER_KEY]:
        return run.info[FOLDER_KEY]
    f = _name_fields(run)
    if f is None:
        return None
    model = str(f["model"]).rstrip("/").split("/")[-1]
    name = (f"output_sample_bs-{f['bs']}_shot-{f['shot']}_sample-{f['sample']}_model-{model}"
            f"_lr-{_format_lr_field(f['lr'])}_epoch-{f['epoch']}_seed-{f['seed']}")
    return name if re.fullmatch(r"[A-Za-z0-9._+=-]+", name) else None


def _folder_names(runs: Sequence[Run]) -> list[str]:
    """One unique folder name per run: the published style where possible, else the run id."""
    wanted = [published_folder_name(r) for r in runs]
    counts: dict[str, int] = {}
    for w in wanted:
        if w:
            counts[w] = counts.get(w, 0) + 1
    names = [w if (w and counts[w] == 1) else r.run_id for w, r in zip(wanted, runs)]
    if len(set(names)) != len(names):  # a run id that equals another run's published name
        names = [r.run_id for r in runs]
    return names


# ---------------------------------------------------------------------------------------------
# export


def export_gptdynamics(dynamics: Dynamics, out_dir: str | os.PathLike,
                       metrics: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write ``dynamics`` in the published GPTDynamics layout (plus lossless sidecars) to ``out_dir``.

    ``metrics``: which metrics to write (default all); each becomes ``all_<metric>_trajectory.out``.
    Only recorded (non-NaN) values at steps >= 1 go into the published files; step-0 values, run
    ids, seeds, learning rates and configs go into the ``gptfluence.json`` sidecars.
    Refuses a non-empty ``out_dir`` unless ``overwrite`` (``--overwrite``), and an ``out_dir`` that
    is, contains or lies inside the store. With ``overwrite`` only files an earlier export wrote
    (listed in its ``gptfluence_manifest.json``) are removed; nothing else is touched.
    Returns ``out_dir``.
    """
    from gptfluence.outputs import check_not_input

    out = Path(out_dir)
    if dynamics.root is not None:
        check_not_input(out, [dynamics.root], flag="OUT")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: folder exists and is not empty (--overwrite replaces an earlier export's files; "
                         f"or use another folder)")
    if overwrite and out.is_dir():
        _remove_previous_export(out)
    runs = dynamics.runs()
    all_metrics = list(dynamics.metrics)
    if metrics is None:
        metrics = all_metrics
    else:
        metrics = list(metrics)
        for m in metrics:
            if not any(m in r.values for r in runs) and m not in all_metrics:
                raise InputError(f"unknown metric {m!r} (dynamics has {all_metrics})")
    for m in metrics:
        if not re.fullmatch(r"[A-Za-z0-9.+-][A-Za-z0-9_.+-]*", m):
            raise InputError(f"metric name {m!r} cannot be written as a file name")
    task = dynamics.task

    # texts
    for split, exs in (("train", task.train), ("test", task.test)):
        lines = [json.dumps({"id": e.id, "input": e.text, "context": e.prompt}, ensure_ascii=False) for e in exs]
        write_text_atomic(out / "texts" / f"{split}.jsonl", "\n".join(lines) + ("\n" if lines else ""))

    folders = _folder_names(runs)
    for run, folder in zip(runs, folders):
        rdir = out / "runs" / folder
        rdir.mkdir(parents=True, exist_ok=True)
        # curriculum, without -1 padding
        lines = []
        for t in range(run.num_steps):
            ids = [int(i) for i in run.curriculum[t] if i >= 0]
            lines.append(json.dumps({"step": t + 1, "samples_id": ids}))
        write_text_atomic(rdir / CURRICULUM_FILE, "\n".join(lines) + ("\n" if lines else ""))
        # trajectories
        step0: dict[str, list[Any]] = {}
        has0 = run.steps.size > 0 and run.steps[0] == 0
        for m in metrics:
            if m not in run.values:
                continue
            v = run.values[m]
            keep = run.steps >= 1
            steps = run.steps[keep]
            vals = v[keep]
            lines = []
            text = np.asarray(format_float32_array(vals.T), dtype=object).reshape(vals.shape[1], vals.shape[0])
            rec = ~np.isnan(vals.T)
            step_list = steps.tolist()
            for col, tid in enumerate(run.test_ids.tolist()):
                recs = [f'{{"step": {s}, "loss": {x}}}'
                        for s, x, ok in zip(step_list, text[col], rec[col]) if ok]
                lines.append(f'{{"id": {int(tid)}, "loss_trajectory": [{", ".join(recs)}]}}')
            write_text_atomic(rdir / f"all_{m}_trajectory.out", "\n".join(lines) + ("\n" if lines else ""))
            if has0:
                step0[m] = [None if np.isnan(x) else float(x) for x in v[0]]
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "run_id": run.run_id,
            "seed": run.seed,
            "num_steps": run.num_steps,
            "batch_size": int(run.curriculum.shape[1]),
            "metrics": [m for m in metrics if m in run.values],
            "test_ids": [int(i) for i in run.test_ids],
            "steps": [int(s) for s in run.steps],
            "step0": step0 if has0 else None,
            "lr": None if run.lr is None else [_format_float64(x) for x in run.lr],
            "config": run.config,
            "info": run.info,
        }
        write_text_atomic(rdir / SIDECAR_NAME, json.dumps(sidecar, indent=1, ensure_ascii=False, default=json_default) + "\n")

    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": SIDECAR_VERSION,
        "task": task.describe(),
        "metrics": list(metrics),
        "config": dynamics.manifest.get("config") or {},
        "runs": [{"run_id": r.run_id, "folder": f} for r, f in zip(runs, folders)],
        "example_meta": {
            split: {str(e.id): e.meta for e in exs if e.meta}
            for split, exs in (("train", task.train), ("test", task.test))
        },
        "source_manifest": {k: dynamics.manifest.get(k) for k in ("examples_sha256", "versions") if k in dynamics.manifest},
    }
    save_json(manifest, out / MANIFEST_NAME)
    return out


def _remove_previous_export(out: Path) -> None:
    """Remove exactly the files an earlier `export_gptdynamics` wrote into ``out`` (its manifest
    lists the run folders), so no stale run or metric file survives an ``overwrite``; folders are
    removed only when that leaves them empty. Without a manifest nothing is removed."""
    man = out / MANIFEST_NAME
    if not man.exists():
        return
    try:
        runs = load_json(man).get("runs") or []
        folders = [r["folder"] for r in runs if isinstance(r, dict) and isinstance(r.get("folder"), str)]
    except (InputError, AttributeError):
        folders = []
    from gptfluence.outputs import is_safe_name

    for folder in folders:
        rdir = out / "runs" / folder
        if not is_safe_name(folder) or not rdir.is_dir():
            continue
        for f in rdir.iterdir():
            if f.is_file() and (f.name in (CURRICULUM_FILE, SIDECAR_NAME) or TRAJ_RE.match(f.name)):
                f.unlink()
        _rmdir_if_empty(rdir)
    _rmdir_if_empty(out / "runs")
    for split in ("train", "test"):
        (out / "texts" / f"{split}.jsonl").unlink(missing_ok=True)
    _rmdir_if_empty(out / "texts")
    man.unlink()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# import


def read_texts(path: str | os.PathLike) -> list[Example]:
    """Examples from a GPTDynamics texts file: prompt = context, target = input[len(context):]."""
    path = Path(path)
    out: list[Example] = []
    seen: dict[int, int] = {}
    for lineno, obj in iter_json_lines(path):
        i = as_int(get_field(obj, "id", path, lineno), path, lineno, "id")
        inp = get_field(obj, "input", path, lineno, f" (id {i})")
        ctx = get_field(obj, "context", path, lineno, f" (id {i})")
        if not isinstance(inp, str) or not isinstance(ctx, str):
            raise InputError(f"{path} line {lineno} (id {i}): 'input' and 'context' must be strings")
        if not inp.startswith(ctx):
            raise InputError(f"{path} line {lineno} (id {i}): 'input' does not start with 'context' "
                             f"(input = prompt + target, context = prompt)")
        if i in seen:
            raise InputError(f"{path} line {lineno}: duplicate id {i} (first on line {seen[i]})")
        seen[i] = lineno
        out.append(Example(i, ctx, inp[len(ctx):]))
    return out


def _find_texts(root: Path, split: str) -> Path:
    for p in (root / "texts" / f"{split}.jsonl", root / f"{split}.jsonl"):
        if p.exists():
            return p
    raise InputError(f"{root}: no {split} texts (expected {root / 'texts' / (split + '.jsonl')})")


def _run_folders(root: Path) -> list[Path]:
    """Run folders: every visible folder of ``root/runs`` (each must hold the curriculum file; a
    folder that does not is an error, never silently skipped), or, without ``runs/``, the folders
    of ``root`` that hold a curriculum or trajectory files."""
    base = root / "runs" if (root / "runs").is_dir() else root
    dirs = []
    for p in base.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        has_traj = any(TRAJ_RE.match(f.name) for f in p.iterdir())
        if (p / CURRICULUM_FILE).exists():
            dirs.append(p)
        elif base != root or has_traj:
            raise InputError(f"{p}: run folder without {CURRICULUM_FILE} (its curriculum); restore the file or move "
                             f"the folder out of {base}")
    if not dirs:
        raise InputError(f"{base}: no run folders (folders holding {CURRICULUM_FILE})")
    return sorted(dirs, key=lambda p: _natural_key(p.name))


def read_curriculum(path: str | os.PathLike, train_ids: set[int] | None = None,
                    width: int | None = None) -> np.ndarray:
    """Curriculum [T, b] int64 from ``train_samples_id.json`` (steps 1..T, -1 pads short batches).

    Parsed by `gptfluence.dynamics.curriculum.StepBatches`: exact repeats of a step are tolerated;
    conflicting repeats, gaps and unknown ids are errors naming the file and line. ``width`` (the
    sidecar's batch width) pads the rows further.
    """
    cur = read_samples_id(path, train_ids)
    if width is not None:
        if width < cur.shape[1]:
            raise InputError(f"{path}: a batch has {cur.shape[1]} ids but the sidecar says batch width {width}")
        cur = pad_rows(cur, width)
    return cur


@dataclass
class TrajectoryFile:
    """What `read_trajectories` read: ``values`` {test_id: {step: value}}, how many records were
    NaN (kept as "not recorded") and how many exact repeats were merged."""

    values: dict[int, dict[int, float]]
    n_nan: int = 0
    n_repeats: int = 0


def read_trajectories(path: str | os.PathLike, test_ids: set[int] | None = None,
                      num_steps: int | None = None, metric: str | None = None) -> TrajectoryFile:
    """The trajectories of an ``all_<metric>_trajectory.out`` file (see `TrajectoryFile`).

    Values are Python floats as read (the store keeps them as float32). A NaN value counts as not
    recorded (and is counted). +-Infinity, and a value outside the metric's range (``metric``:
    loss >= 0, bleu in [0, 100], rougeL and accuracy in [0, 1]), are errors naming file, line, id
    and step. Repeats of a (test id, step) with the same float32 value are kept once (counted);
    different values are an error. A file without any record is an error.
    """
    from gptfluence.dynamics.store import METRIC_RANGES

    path = Path(path)
    lo, hi = METRIC_RANGES.get(metric or "", (-math.inf, math.inf))
    n_nan = n_rep = 0
    out: dict[int, dict[int, float]] = {}
    where_first: dict[tuple[int, int], int] = {}
    for lineno, obj in iter_json_lines(path):
        tid = as_int(get_field(obj, "id", path, lineno), path, lineno, "id")
        if test_ids is not None and tid not in test_ids:
            raise InputError(f"{path} line {lineno}: unknown test id {tid} (not in the test texts)")
        traj = get_field(obj, "loss_trajectory", path, lineno, f" (id {tid})")
        if not isinstance(traj, list):
            raise InputError(f"{path} line {lineno} (id {tid}), field 'loss_trajectory': expected a list")
        rec = out.setdefault(tid, {})
        for k, item in enumerate(traj):
            what = f" (id {tid}, record {k})"
            if not isinstance(item, dict):
                raise InputError(f"{path} line {lineno}{what}: expected an object {{'step', 'loss'}}, got {item!r}")
            s = as_int(get_field(item, "step", path, lineno, what), path, lineno, "step", what)
            v = get_field(item, "loss", path, lineno, f" (id {tid}, step {s})")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{path} line {lineno} (id {tid}, step {s}), field 'loss': expected a number, got {v!r}")
            if s < 0 or (num_steps is not None and s > num_steps):
                raise InputError(f"{path} line {lineno} (id {tid}): step {s} outside 0..{num_steps} "
                                 f"(the curriculum has {num_steps} steps)")
            v = float(v)
            if v != v:  # NaN: not recorded
                n_nan += 1
                continue
            if math.isinf(v) or not lo <= v <= hi or not math.isfinite(float(np.float32(v))):
                rng = f"; {metric} must lie in [{lo:g}, {hi:g}]" if metric in METRIC_RANGES else ""
                raise InputError(f"{path} line {lineno} (id {tid}, step {s}), field 'loss': value {v!r} is not a "
                                 f"finite {metric or 'metric'} value{rng}")
            if s in rec:
                if np.float32(rec[s]).view(np.uint32) != np.float32(v).view(np.uint32):
                    raise InputError(
                        f"{path} line {lineno}: test id {tid}, step {s} repeated with a different value "
                        f"({rec[s]!r} on line {where_first[(tid, s)]}, {v!r} here)")
                n_rep += 1
                continue
            rec[s] = v
            where_first[(tid, s)] = lineno
    if not out:
        raise InputError(f"{path}: no trajectories (an empty file)")
    return TrajectoryFile(out, n_nan, n_rep)


_FOLDER_RE = re.compile(
    r"bs-(?P<bs>[^_]+)_shot-(?P<shot>[^_]+)_sample-(?P<sample>[^_]+)_model-(?P<model>.+?)"
    r"_lr-(?P<lr>[^_]+)_epoch-(?P<epoch>[^_]+)_seed-(?P<seed>-?\d+)$")


def parse_folder_name(name: str) -> dict[str, Any]:
    """Fields of a published run folder name (bs, shot, sample, model, lr, epoch, seed); {} if none.

    Numbers become int / float; ``seed`` is also found alone (``..._seed-3``).
    """
    m = _FOLDER_RE.search(name)
    if m:
        out: dict[str, Any] = {}
        for k, v in m.groupdict().items():
            if k == "model":
                out[k] = v
                continue
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
        return out
    m2 = re.search(r"seed-(-?\d+)$", name)
    return {"seed": int(m2.group(1))} if m2 else {}


@dataclass
class _Sidecar:
    data: dict[str, Any]
    path: Path


def _read_sidecar(rdir: Path) -> _Sidecar | None:
    p = rdir / SIDECAR_NAME
    if not p.exists():
        return None
    d = check_header(load_json(p), p, SIDECAR_FORMAT, SIDECAR_VERSION, ("run_id", "test_ids", "steps", "num_steps"))
    return _Sidecar(d, p)


def _infer_kind(train: Sequence[Example], test: Sequence[Example]) -> tuple[str, tuple[str, ...]]:
    """Classification when the targets are a few label words repeated, else generation."""
    targets = [e.target for e in list(train) + list(test)]
    distinct = sorted(set(targets))
    if targets and len(distinct) <= 10 and len(distinct) * 2 <= len(targets) and \
            all(t.strip() and len(t.split()) == 1 for t in distinct):
        return CLASSIFICATION, tuple(distinct)
    return GENERATION, ()


def import_gptdynamics(in_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       task_name: str | None = None) -> Dynamics:
    """Read a folder in the GPTDynamics layout into a `Dynamics` (a store in ``out_dir`` if given).

    With the sidecars written by `export_gptdynamics` everything is restored (run ids, seeds,
    step-0 values, lrs, configs, metadata). Without them run ids are the folder names, seeds come
    from the folder names, a run's test ids are the test ids seen in any run (in texts order),
    its steps are the steps recorded for any test example of any metric of that run, and the
    folder-name fields (bs, shot, sample, model, lr, epoch) go into ``Run.config``.
    """
    root = Path(in_dir)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found")
    if out_dir is not None:
        from gptfluence.outputs import prepare_output_dir

        # a new store in a new or empty folder, never inside or around the input
        prepare_output_dir(out_dir, "dynamics store", lambda _: False, inputs=[root], flag="DIR", create=False)
    manifest = load_json(root / MANIFEST_NAME) if (root / MANIFEST_NAME).exists() else None
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{root / MANIFEST_NAME}, field 'format': expected {MANIFEST_FORMAT!r}, "
                         f"got {manifest.get('format')!r}")
    train_path, test_path = _find_texts(root, "train"), _find_texts(root, "test")
    train, test = read_texts(train_path), read_texts(test_path)
    if not train:
        raise InputError(f"{train_path}: no examples")
    if not test:
        raise InputError(f"{test_path}: no examples")
    train_ids = {e.id for e in train}
    test_ids_set = {e.id for e in test}

    # run folders, in manifest order when there is one
    folders = _run_folders(root)
    if manifest is not None and isinstance(manifest.get("runs"), list):
        order = {r.get("folder"): k for k, r in enumerate(manifest["runs"]) if isinstance(r, dict)}
        folders.sort(key=lambda p: (order.get(p.name, len(order)), _natural_key(p.name)))

    parsed = []  # (folder, sidecar, curriculum, {metric: trajectories})
    stats = {"nan": 0, "repeats": 0}
    for rdir in folders:
        side = _read_sidecar(rdir)
        width = int(side.data["batch_size"]) if side and side.data.get("batch_size") is not None else None
        cur = read_curriculum(rdir / CURRICULUM_FILE, train_ids, width)
        if side and int(side.data["num_steps"]) != cur.shape[0]:
            raise InputError(f"{side.path}: num_steps {side.data['num_steps']} but {rdir / CURRICULUM_FILE} "
                             f"has {cur.shape[0]} steps")
        trajs: dict[str, dict[int, dict[int, float]]] = {}
        files = sorted((p for p in rdir.iterdir() if TRAJ_RE.match(p.name)), key=lambda p: p.name)
        if not files:
            raise InputError(f"{rdir}: no trajectory files (all_<metric>_trajectory.out)")
        for p in files:
            metric = TRAJ_RE.match(p.name).group(1)  # type: ignore[union-attr]
            read = read_trajectories(p, test_ids_set, cur.shape[0], metric=metric)
            trajs[metric] = read.values
            stats["nan"] += read.n_nan
            stats["repeats"] += read.n_repeats
        parsed.append((rdir, side, cur, trajs))

    # metrics: manifest order, then the conventional order, then alphabetical
    seen_metrics = {m for _, _, _, t in parsed for m in t}
    conventional = ["loss", "accuracy", "bleu", "rougeL"]
    if manifest is not None and manifest.get("metrics"):
        metric_order = [m for m in manifest["metrics"]]
    else:
        metric_order = [m for m in conventional if m in seen_metrics]
    metric_order += sorted(seen_metrics - set(metric_order))

    # the common test-id order for runs without sidecars: ids seen anywhere, in texts order
    seen_ids = {tid for _, _, _, t in parsed for traj in t.values() for tid in traj}
    common_test_ids = np.asarray([e.id for e in test if e.id in seen_ids], dtype=np.int64)

    runs: list[Run] = []
    for rdir, side, cur, trajs in parsed:
        with _malformed(side.path if side is not None else rdir):
            runs.append(_build_run(rdir, side, cur, trajs, metric_order, common_test_ids))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{root}: two run folders have run id {dup!r}")

    # the task
    with _malformed(root / MANIFEST_NAME):
        if manifest is not None:
            tdesc = manifest.get("task") or {}
            meta = manifest.get("example_meta") or {}
            if meta:
                train = [Example(e.id, e.prompt, e.target, dict(meta.get("train", {}).get(str(e.id), {}))) for e in train]
                test = [Example(e.id, e.prompt, e.target, dict(meta.get("test", {}).get(str(e.id), {}))) for e in test]
            task = Task(name=task_name or tdesc.get("name") or root.name, train=train, test=test,
                        kind=tdesc.get("kind", GENERATION), labels=tuple(tdesc.get("labels", ())),
                        metadata=dict(tdesc.get("metadata", {})))
            config = dict(manifest.get("config") or {})
        else:
            kind, labels = _infer_kind(train, test)
            task = Task(name=task_name or root.name, train=train, test=test, kind=kind, labels=labels,
                        metadata={"source": "gptdynamics"})
            config = {}

    report = {"runs": len(runs), "nan_records": stats["nan"], "exact_repeats": stats["repeats"],
              "unrecorded_values": int(sum(int(np.isnan(v).sum()) for r in runs for v in r.values.values()))}
    if out_dir is not None:
        store = create_store(out_dir, task, metric_order, config)
        for r in runs:
            if r.run_id in store.run_ids:
                raise InputError(f"{Path(out_dir) / 'runs' / r.run_id}: run already exists in the store")
            store.write_run(r)
        store.import_report = report
        return store
    dyn = Dynamics(task, runs)
    dyn.manifest["metrics"] = metric_order
    dyn.manifest["config"] = config
    dyn.import_report = report
    return dyn


class _malformed:
    """Turn a type or value error while interpreting ``path`` (a sidecar or manifest written by
    gptfluence, then edited or corrupted) into an `InputError` naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, (TypeError, ValueError, KeyError, AttributeError,
                                                          IndexError, OverflowError)) \
                and not issubclass(exc_type, InputError):
            raise InputError(f"{self.path}: malformed ({exc_type.__name__}: {exc})") from None
        return False


def _build_run(rdir: Path, side: "_Sidecar | None", cur: np.ndarray, trajs: dict[str, dict[int, dict[int, float]]],
               metric_order: list[str], common_test_ids: np.ndarray) -> Run:
    """One imported run from its parsed files (the sidecar, when there is one, restores everything)."""
    from gptfluence.outputs import check_name

    if side is not None:
        d = side.data
        tids = np.asarray(d["test_ids"], dtype=np.int64)
        steps = np.asarray(d["steps"], dtype=np.int64)
        tid_set = set(tids.tolist())
        for m, traj in trajs.items():
            for tid in traj:
                if tid not in tid_set:
                    raise InputError(f"{rdir / f'all_{m}_trajectory.out'}: test id {tid} is not among the run's "
                                     f"test ids in {side.path}")
        run_metrics = [m for m in (d.get("metrics") or metric_order) if m in trajs]
        run_metrics += [m for m in metric_order if m in trajs and m not in run_metrics]
        lr = None if d.get("lr") is None else np.asarray([np.nan if x is None else x for x in d["lr"]], dtype=np.float64)
        run_id, seed = d["run_id"], d.get("seed")
        config, info = d.get("config") or {}, d.get("info") or {}
        step0 = d.get("step0") or {}
    else:
        tids = common_test_ids
        rec_steps = {s for traj in trajs.values() for per in traj.values() for s in per}
        steps = np.asarray(sorted(rec_steps), dtype=np.int64)
        run_metrics = [m for m in metric_order if m in trajs]
        lr = None
        fields = parse_folder_name(rdir.name)
        seed = fields.pop("seed", None)
        run_id = rdir.name
        config = {k: v for k, v in fields.items()}
        info = {FOLDER_KEY: rdir.name}
        step0 = {}
    col = {int(t): k for k, t in enumerate(tids.tolist())}
    srow = {int(s): k for k, s in enumerate(steps.tolist())}
    values: dict[str, np.ndarray] = {}
    for m in run_metrics:
        arr = np.full((steps.size, tids.size), np.nan, dtype=np.float32)
        for tid, per in trajs[m].items():
            c = col[tid]
            for s, v in per.items():
                if s not in srow:
                    raise InputError(f"{rdir / f'all_{m}_trajectory.out'}: test id {tid} has step {s}, which is not "
                                     f"among the recorded steps in {side.path if side else rdir}")
                arr[srow[s], c] = v
        if 0 in srow and m in step0 and step0[m] is not None:
            vals0 = step0[m]
            if len(vals0) != tids.size:
                raise InputError(f"{side.path if side else rdir}, field 'step0': metric {m!r} has {len(vals0)} "
                                 f"values for {tids.size} test ids")
            arr[srow[0]] = np.asarray([np.nan if x is None else x for x in vals0], dtype=np.float32)
        values[m] = arr
    check_name(run_id, "run id", str(side.path if side is not None else rdir))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise InputError(f"{side.path if side is not None else rdir}, field 'seed': expected an integer, got {seed!r}")
    return Run(run_id=run_id, curriculum=cur, steps=steps, test_ids=tids, values=values, lr=lr,
               seed=None if seed is None else int(seed), config=config, info=info)


__all__ = [
    "export_gptdynamics", "import_gptdynamics", "read_texts", "read_curriculum", "read_trajectories",
    "parse_folder_name", "published_folder_name", "format_float32",
]
