"""Reading and checking the report's inputs: evaluation.json, influence.json, mislabel.json.

Every problem raises `InputError` naming the file and the field (``results[3].metric``).
Numbers may be JSON null or NaN (both mean "not available"); arrays are returned as float64 numpy
arrays with NaN for missing values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gptfluence.config import load_json
from gptfluence.errors import InputError

EVALUATION_FILE = "evaluation.json"
INFLUENCE_FILE = "influence.json"
MISLABEL_FILE = "mislabel.json"
APPLICATIONS_FILE = "applications.json"

NUMERIC_FIELDS = (
    "mse_mean", "mse_std", "mae_mean", "mae_std", "spearman_final_mean", "spearman_final_std",
    "curriculum_spearman_mean", "curriculum_spearman_std", "n_runs", "n_test_examples", "fit_seconds",
)


def _err(source: str, field: str, msg: str) -> InputError:
    return InputError(f"{source}, field {field!r}: {msg}")


def _obj(v: Any, source: str, field: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _err(source, field, f"expected a JSON object, got {_kind(v)}")
    return v


def _list(v: Any, source: str, field: str) -> list[Any]:
    if not isinstance(v, list):
        raise _err(source, field, f"expected a list, got {_kind(v)}")
    return v


def _str(d: dict[str, Any], key: str, source: str, field: str, default: str | None = None) -> str:
    if key not in d or d[key] is None:
        if default is not None:
            return default
        raise _err(source, f"{field}.{key}" if field else key, "missing")
    v = d[key]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise _err(source, f"{field}.{key}" if field else key, f"expected a string, got {_kind(v)}")
    return str(v)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _number(v: Any, source: str, field: str) -> float:
    """A float (NaN for null / missing); raises on anything that is not a number."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(source, field, f"expected a number or null, got {_kind(v)}")
    return float(v)


def _vector(v: Any, source: str, field: str) -> np.ndarray:
    items = _list(v, source, field)
    return np.asarray([_number(x, source, f"{field}[{i}]") for i, x in enumerate(items)], dtype=np.float64)


def _matrix(v: Any, rows: int, cols: int, source: str, field: str) -> np.ndarray:
    items = _list(v, source, field)
    if len(items) != rows:
        raise _err(source, field, f"has {len(items)} rows, expected {rows} (one per step)")
    out = np.empty((rows, cols), dtype=np.float64)
    for i, row in enumerate(items):
        r = _vector(row, source, f"{field}[{i}]")
        if r.size != cols:
            raise _err(source, f"{field}[{i}]", f"has {r.size} values, expected {cols} (one per test id)")
        out[i] = r
    return out


# ---------------------------------------------------------------------------------------------
# evaluation.json


def check_evaluation(data: Any, source: str = EVALUATION_FILE) -> dict[str, Any]:
    """Validate and normalise an evaluation dict (the output of ``gptfluence evaluate``).

    Returns ``{"config": dict, "split": dict, "results": [record], "trajectories": [traj]}`` where
    each record has str ``method/task/metric``, float fields (NaN = missing) and numpy
    ``mse_by_step`` / ``steps``, and each trajectory has numpy ``steps [S]``, ``test_ids [M]``,
    ``true [S, M]``, ``predicted [S, M]``.
    """
    d = _obj(data, source, "(top level)")
    if "results" not in d:
        raise InputError(f"{source}: missing field 'results' (expected the output of 'gptfluence evaluate')")
    out: dict[str, Any] = {
        "config": _obj(d.get("config") or {}, source, "config"),
        "split": _obj(d.get("split") or {}, source, "split"),
        "results": [],
        "trajectories": [],
    }
    for i, rec in enumerate(_list(d["results"], source, "results")):
        f = f"results[{i}]"
        rec = _obj(rec, source, f)
        r: dict[str, Any] = {k: _str(rec, k, source, f) for k in ("method", "task", "metric")}
        for k in NUMERIC_FIELDS:
            r[k] = _number(rec.get(k), source, f"{f}.{k}")
        mbs = rec.get("mse_by_step")
        steps = rec.get("steps")
        r["mse_by_step"] = _vector(mbs, source, f"{f}.mse_by_step") if mbs is not None else np.zeros(0)
        if steps is not None:
            r["steps"] = _vector(steps, source, f"{f}.steps")
        else:
            r["steps"] = np.arange(r["mse_by_step"].size, dtype=np.float64)
        if r["steps"].size != r["mse_by_step"].size:
            raise _err(source, f"{f}.steps", f"has {r['steps'].size} values but mse_by_step has "
                       f"{r['mse_by_step'].size}")
        out["results"].append(r)
    for i, tr in enumerate(_list(d.get("trajectories") or [], source, "trajectories")):
        f = f"trajectories[{i}]"
        tr = _obj(tr, source, f)
        t: dict[str, Any] = {k: _str(tr, k, source, f) for k in ("method", "task", "metric")}
        t["run_id"] = _str(tr, "run_id", source, f, default="")
        for k in ("steps", "test_ids", "true", "predicted"):
            if k not in tr:
                raise _err(source, f"{f}.{k}", "missing")
        t["steps"] = _vector(tr["steps"], source, f"{f}.steps")
        ids = _vector(tr["test_ids"], source, f"{f}.test_ids")
        if np.any(~np.isfinite(ids)) or np.any(ids != np.round(ids)):
            raise _err(source, f"{f}.test_ids", "expected integer ids")
        t["test_ids"] = ids.astype(np.int64)
        S, M = t["steps"].size, t["test_ids"].size
        t["true"] = _matrix(tr["true"], S, M, source, f"{f}.true")
        t["predicted"] = _matrix(tr["predicted"], S, M, source, f"{f}.predicted")
        out["trajectories"].append(t)
    return out


def load_evaluation(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / EVALUATION_FILE
    if not path.exists():
        raise InputError(f"{path}: file not found (run 'gptfluence evaluate' with this output folder first)")
    return check_evaluation(load_json(path), str(path))


# ---------------------------------------------------------------------------------------------
# influence.json


def _check_entries(v: Any, source: str, field: str) -> list[dict[str, Any]]:
    out = []
    for j, e in enumerate(_list(v if v is not None else [], source, field)):
        fe = f"{field}[{j}]"
        e = _obj(e, source, fe)
        if "train_id" not in e:
            raise _err(source, f"{fe}.train_id", "missing")
        out.append({
            "train_id": _str(e, "train_id", source, fe),
            "score": _number(e.get("score"), source, f"{fe}.score"),
            "prompt": _str(e, "prompt", source, fe, default=""),
            "target": _str(e, "target", source, fe, default=""),
        })
    return out


def check_influence(data: Any, source: str = INFLUENCE_FILE) -> list[dict[str, Any]]:
    """Validate influence reports: ``{"reports": [{"task", **influence_report}]}``, a list of
    reports, or one report. Returns the list of normalised reports."""
    if isinstance(data, dict) and "reports" in data:
        reports, base = _list(data["reports"], source, "reports"), "reports"
    elif isinstance(data, list):
        reports, base = data, ""
    elif isinstance(data, dict) and "test_examples" in data:
        reports, base = [data], ""
    else:
        raise InputError(f"{source}: expected {{\"reports\": [...]}} (a list of influence reports), got {_kind(data)}")
    out = []
    for i, rep in enumerate(reports):
        f = f"{base}[{i}]" if base else f"[{i}]"
        rep = _obj(rep, source, f)
        r: dict[str, Any] = {
            "task": _str(rep, "task", source, f, default=""),
            "method": _str(rep, "method", source, f, default="?"),
            "metric": _str(rep, "metric", source, f, default="loss"),
            "kind": _str(rep, "kind", source, f, default="loo"),
        }
        r["sign"] = _str(rep, "sign", source, f, default="positive = helpful")
        if "test_examples" not in rep:
            raise _err(source, f"{f}.test_examples", "missing")
        items = []
        for j, te in enumerate(_list(rep["test_examples"], source, f"{f}.test_examples")):
            fj = f"{f}.test_examples[{j}]"
            te = _obj(te, source, fj)
            if "test_id" not in te:
                raise _err(source, f"{fj}.test_id", "missing")
            items.append({
                "test_id": _str(te, "test_id", source, fj),
                "prompt": _str(te, "prompt", source, fj, default=""),
                "target": _str(te, "target", source, fj, default=""),
                "final_simulated": _number(te.get("final_simulated"), source, f"{fj}.final_simulated"),
                "helpful": _check_entries(te.get("helpful"), source, f"{fj}.helpful"),
                "harmful": _check_entries(te.get("harmful"), source, f"{fj}.harmful"),
            })
        r["test_examples"] = items
        out.append(r)
    return out


def load_influence(out_dir: str | Path) -> list[dict[str, Any]] | None:
    """The checked reports of ``out_dir/influence.json``, or None when there is none."""
    return load_optional(out_dir, INFLUENCE_FILE, check_influence)


def load_optional(out_dir: str | Path, name: str, check: Any) -> Any:
    """``check(data, path)`` of the JSON file ``out_dir/name``, or None when the file is absent."""
    path = Path(out_dir) / name
    if not path.exists():
        return None
    return check(load_json(path), str(path))


# ---------------------------------------------------------------------------------------------
# mislabel.json


def _curve(v: Any, source: str, field: str) -> dict[str, np.ndarray]:
    c = _obj(v, source, field)
    if "curve" in c:  # a `gptfluence mislabeled` method record: {"auc", "curve": {...}, ...}
        c, field = _obj(c["curve"], source, f"{field}.curve"), f"{field}.curve"
    for k in ("fraction_inspected", "fraction_found"):
        if k not in c:
            raise _err(source, f"{field}.{k}", "missing")
    x = _vector(c["fraction_inspected"], source, f"{field}.fraction_inspected")
    y = _vector(c["fraction_found"], source, f"{field}.fraction_found")
    if x.size != y.size:
        raise _err(source, f"{field}.fraction_found", f"has {y.size} values but fraction_inspected has {x.size}")
    return {"fraction_inspected": x, "fraction_found": y}


def check_mislabel(data: Any, source: str = MISLABEL_FILE) -> list[dict[str, Any]]:
    """Validate mislabelled-data detection curves: one experiment
    ``{"task", "methods": {name: {"fraction_inspected", "fraction_found"}}, "random": {...}}``,
    a list of them, or ``{"experiments": [...]}``. Returns a list of experiments."""
    if isinstance(data, dict) and "experiments" in data:
        exps, base = _list(data["experiments"], source, "experiments"), "experiments"
    elif isinstance(data, list):
        exps, base = data, ""
    else:
        exps, base = [data], None
    out = []
    for i, e in enumerate(exps):
        f = "" if base is None else (f"{base}[{i}]" if base else f"[{i}]")
        e = _obj(e, source, f or "(top level)")
        pre = f"{f}." if f else ""
        methods = dict(_obj(e.get("methods"), source, f"{pre}methods"))
        rnd = e.get("random")
        if rnd is None and "random" in methods:  # `gptfluence mislabeled` lists random among the methods
            rnd = methods.pop("random")
        out.append({
            "task": _str(e, "task", source, f, default=""),
            "methods": {str(m): _curve(c, source, f"{pre}methods.{m}") for m, c in methods.items()},
            "random": _curve(rnd, source, f"{pre}random") if rnd is not None else None,
            "auc": {str(m): c.get("auc") for m, c in methods.items() if isinstance(c, dict)},
        })
    return out


def load_mislabel(out_dir: str | Path) -> list[dict[str, Any]] | None:
    """The checked experiments of ``out_dir/mislabel.json``, or None when there is none."""
    return load_optional(out_dir, MISLABEL_FILE, check_mislabel)


# ---------------------------------------------------------------------------------------------
# applications.json (benchmarks/applications_builtin.py's merged sections)


def check_applications(data: Any, source: str = APPLICATIONS_FILE) -> dict[str, Any]:
    """Validate the parts of an applications file the report draws: ``mislabeled`` (checked as
    mislabel experiments), ``selection`` (records with ``choice`` and an ``actual_*`` metric),
    ``unseen`` and ``peer`` (tables, passed through). Returns ``{"mislabel", "selection", "unseen",
    "peer"}`` (None where the section is absent)."""
    d = _obj(data, source, "(top level)")
    out: dict[str, Any] = {"mislabel": None, "selection": None, "unseen": None, "peer": None}
    if d.get("mislabeled") is not None:
        out["mislabel"] = check_mislabel(d["mislabeled"], source + " (mislabeled)")
    if d.get("selection") is not None:
        sel = _obj(d["selection"], source, "selection")
        recs = _list(sel.get("records") or [], source, "selection.records")
        for i, r in enumerate(recs):
            r = _obj(r, source, f"selection.records[{i}]")
            _str(r, "choice", source, f"selection.records[{i}]")
        out["selection"] = sel
    if d.get("unseen") is not None:
        out["unseen"] = _obj(d["unseen"], source, "unseen")
    if d.get("peer") is not None:
        out["peer"] = _obj(d["peer"], source, "peer")
    return out


def load_applications(out_dir: str | Path) -> dict[str, Any] | None:
    return load_optional(out_dir, APPLICATIONS_FILE, check_applications)
