"""Random corruptions of valid files (Hypothesis): the GPTDynamics importer, the store loader and
the curriculum reader either give a named `GptfluenceError` or read exactly what the corrupted
files say: never a traceback, never a silently different store."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptfluence.dynamics.curriculum import read_curriculum_file
from gptfluence.dynamics.gptdynamics import export_gptdynamics, import_gptdynamics
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import GptfluenceError
from gptfluence.simulators.synthetic import synthetic_dynamics

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _mutate(data: bytes, kind: str, pos: float, payload: bytes) -> bytes:
    """One corruption of ``data``: flip a byte, truncate, delete a span, insert bytes, duplicate a line."""
    if not data:
        return payload
    i = min(int(pos * len(data)), len(data) - 1)
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (payload[0] if payload else 0xFF) or 1]) + data[i + 1:]
    if kind == "truncate":
        return data[:i]
    if kind == "delete":
        return data[:i] + data[i + 1 + len(payload):]
    if kind == "insert":
        return data[:i] + payload + data[i:]
    lines = data.split(b"\n")  # duplicate a line
    k = min(int(pos * len(lines)), len(lines) - 1)
    return b"\n".join(lines[:k + 1] + [lines[k]] + lines[k + 1:])


corruption = st.tuples(st.sampled_from(["flip", "truncate", "delete", "insert", "dupline"]),
                       st.floats(0, 1), st.binary(min_size=1, max_size=6) | st.sampled_from(
                           [b"NaN", b"Infinity", b"-1", b"}", b"\n", b'"', b"1e400", b"\xff", b"[]", b"null"]))


@pytest.fixture(scope="module")
def source():
    dyn, _ = synthetic_dynamics(n_runs=2, n_steps=4, n_train=12, n_test=3, dim=8, seed=7, name="fuzz")
    return dyn


# GPTDynamics importer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def published(source, tmp_path_factory):
    """The published layout of `source`, without gptfluence's sidecars (real published data)."""
    out = export_gptdynamics(source, tmp_path_factory.mktemp("pub") / "gd")
    (out / "gptfluence_manifest.json").unlink()
    for p in out.glob("runs/*/gptfluence.json"):
        p.unlink()
    return out


def _records(path: Path) -> dict[int, dict[int, float]]:
    """An independent reading of a trajectory file: {id: {step: value}} (non-NaN values)."""
    out: dict[int, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            for rec in obj["loss_trajectory"]:
                if not math.isnan(float(rec["loss"])):
                    out.setdefault(int(obj["id"]), {})[int(rec["step"])] = float(rec["loss"])
    return out


@SETTINGS
@given(which=st.integers(0, 10_000), mut=corruption)
def test_importer_named_error_or_exactly_what_the_files_say(published, which, mut):
    files = sorted(p for p in published.rglob("*") if p.is_file())
    target = files[which % len(files)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "gd"
        shutil.copytree(published, copy)
        victim = copy / target.relative_to(published)
        victim.write_bytes(_mutate(victim.read_bytes(), *mut))
        try:
            dyn = import_gptdynamics(copy)
        except GptfluenceError:
            return
        for run in dyn.runs():
            rdir = copy / "runs" / run.run_id
            steps = {}
            for line in (rdir / "train_samples_id.json").read_text(encoding="utf-8").splitlines():
                if line.strip():
                    obj = json.loads(line)
                    steps[int(obj["step"])] = [int(i) for i in obj["samples_id"]]
            assert [list(run.batch(t)) for t in range(1, run.num_steps + 1)] == [steps[t] for t in sorted(steps)]
            recs = _records(rdir / "all_loss_trajectory.out")
            vals = run.values["loss"]
            row = {int(s): k for k, s in enumerate(run.steps)}
            col = {int(t): k for k, t in enumerate(run.test_ids)}
            n = 0
            for tid, per in recs.items():
                for s, v in per.items():
                    assert vals[row[s], col[tid]] == np.float32(v)
                    n += 1
            assert int(np.isfinite(vals).sum()) == n  # nothing invented, nothing dropped


# store loader ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(source, tmp_path_factory):
    return source.save(tmp_path_factory.mktemp("store") / "s").root


def _content(dyn: Dynamics) -> tuple:
    runs = []
    for r in dyn.runs():
        runs.append((r.run_id, r.seed, json.dumps(r.config, sort_keys=True), json.dumps(r.info, sort_keys=True),
                     r.curriculum.tobytes(), r.steps.tobytes(), r.test_ids.tobytes(),
                     tuple((k, v.tobytes()) for k, v in r.values.items()),
                     None if r.lr is None else r.lr.tobytes()))
    ex = [(e.id, e.prompt, e.target, json.dumps(e.meta, sort_keys=True)) for e in dyn.task.train + dyn.task.test]
    man = json.dumps({k: v for k, v in dyn.manifest.items() if k != "content_sha256"}, sort_keys=True, default=str)
    return tuple(runs), tuple(ex), man


@SETTINGS
@given(which=st.integers(0, 10_000), mut=corruption)
def test_store_loader_named_error_or_the_same_store(saved, which, mut):
    want = _content(Dynamics.open(saved))
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    target = files[which % len(files)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "s"
        shutil.copytree(saved, copy)
        victim = copy / target.relative_to(saved)
        victim.write_bytes(_mutate(victim.read_bytes(), *mut))
        try:
            got = _content(Dynamics.open(copy))
        except GptfluenceError:
            return
        assert got == want


# curriculum reader -----------------------------------------------------------------------------

VALID = (json.dumps({"run_id": "a", "curriculum": [[0, 1], [2, 3], [4, -1]]}) + "\n"
         + json.dumps({"run_id": "b", "curriculum": [[5, 6], [7, 8]], "group": "order"}) + "\n").encode()


@SETTINGS
@given(mut=corruption)
def test_curriculum_reader_named_error_or_exactly_what_the_file_says(mut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.jsonl"
        path.write_bytes(_mutate(VALID, *mut))
        try:
            got = read_curriculum_file(path, train_ids=range(10))
        except GptfluenceError:
            return
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if all("samples_id" in x for x in lines):
            return  # a valid step file (the mutation made one): its own tests cover it
        want = {x["run_id"]: x["curriculum"] for x in lines}
        assert list(got.curricula) == list(want)
        for rid, rows in want.items():
            arr = got.curricula[rid]
            assert [[int(i) for i in r if i != -1] for r in arr.tolist()] == [[i for i in r if i != -1] for r in rows]
            assert set(np.unique(arr).tolist()) <= set(range(-1, 10))
        assert got.groups == {x["run_id"]: x["group"] for x in lines if "group" in x}
