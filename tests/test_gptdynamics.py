"""Import / export of the published GPTDynamics layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptfluence.cli import main
from gptfluence.dynamics.gptdynamics import (export_gptdynamics, format_float32, import_gptdynamics,
                                             parse_folder_name)
from gptfluence.dynamics.store import Dynamics, Run
from gptfluence.errors import InputError
from gptfluence.types import Example, Task

SAMPLE = Path(__file__).parent / "data" / "gptdynamics-sample"  # copy of the published-layout sample
RUN1 = "output_sample_bs-2_shot-8_sample-6_model-tiny_lr-1e-3_epoch-2_seed-1"
RUN2 = "output_sample_bs-2_shot-8_sample-6_model-tiny_lr-1e-3_epoch-2_seed-2"

needs_sample = pytest.mark.usefixtures()  # the sample ships with the tests: never skipped


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _published_files(root: Path) -> dict[str, str]:
    """The published-layout files under root (relative path -> text), without gptfluence sidecars."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".out") and "gptfluence" not in p.name:
            out[str(p.relative_to(root))] = p.read_text()
    return out


@pytest.fixture
def sample(tmp_path) -> Path:
    assert SAMPLE.is_dir(), f"{SAMPLE} missing: the sample ships with the tests"
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# the published sample


def test_import_sample(sample):
    dyn = import_gptdynamics(sample)
    assert dyn.run_ids == [RUN1, RUN2]
    assert [e.id for e in dyn.task.train] == list(range(8)) and [e.id for e in dyn.task.test] == [0, 1, 2]
    ex = dyn.test_example(0)
    assert ex.prompt == "Review: a lovely story.\nSentiment:" and ex.target == " positive"
    assert dyn.task.kind == "classification" and dyn.task.labels == (" negative", " positive")
    r1, r2 = dyn.runs()
    assert (r1.seed, r2.seed) == (1, 2)
    assert r1.config == {"bs": 2, "shot": 8, "sample": 6, "model": "tiny", "lr": 0.001, "epoch": 2}
    # curricula equal the files
    for r, name in ((r1, RUN1), (r2, RUN2)):
        rows = _jsonl(sample / "runs" / name / "train_samples_id.json")
        assert r.curriculum.tolist() == [row["samples_id"] for row in rows]
        assert r.num_steps == 6 and r.metrics == ["loss"]
    # run seed-1: all steps, the repeated value (step 3 == step 2) kept as is
    assert r1.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert r1.values["loss"][1, 0] == r1.values["loss"][2, 0] == np.float32(1.28)
    # run seed-2: step 4 missing -> not among the recorded steps, NaN on the grid
    assert r2.steps.tolist() == [1, 2, 3, 5, 6]
    grid = r2.on_grid("loss")
    assert np.isnan(grid[0]).all() and np.isnan(grid[4]).all()
    assert grid[5, 0] == np.float32(0.8192) and grid[3, 2] == np.float32(1.1264)
    vals, steps, ids = dyn.stack("loss", first_step=1)
    assert vals.shape == (2, 6, 3) and ids.tolist() == [0, 1, 2]


def test_reexport_of_sample_reproduces_files(sample, tmp_path):
    dyn = import_gptdynamics(sample, tmp_path / "store")
    out = export_gptdynamics(Dynamics.open(tmp_path / "store"), tmp_path / "exp")
    a, b = _published_files(sample), _published_files(out)
    assert a.keys() == b.keys()
    for k in a:  # same JSON values line by line (the text is byte-identical too)
        assert [json.loads(x) for x in a[k].splitlines()] == [json.loads(x) for x in b[k].splitlines()], k
        assert a[k] == b[k], k
    # and that export reads back to the same dynamics
    again = import_gptdynamics(out)
    for r, s in zip(dyn.runs(), again.runs()):
        assert r.run_id == s.run_id and np.array_equal(r.curriculum, s.curriculum)
        assert np.array_equal(r.values["loss"].view(np.uint32), s.values["loss"].view(np.uint32))


def test_exact_repeats_are_deduplicated(sample):
    p = sample / "runs" / RUN2 / "all_loss_trajectory.out"
    rows = _jsonl(p)
    rows[0]["loss_trajectory"].insert(2, dict(rows[0]["loss_trajectory"][1]))  # step 2 twice, same value
    lines = [json.dumps(r) for r in rows] + [json.dumps(rows[1])]  # a whole line repeated
    p.write_text("\n".join(lines) + "\n")
    c = sample / "runs" / RUN2 / "train_samples_id.json"
    c.write_text(c.read_text() + '{"step": 3, "samples_id": [7, 5]}\n')  # a curriculum line repeated
    r = import_gptdynamics(sample).run(RUN2)
    assert r.steps.tolist() == [1, 2, 3, 5, 6] and r.values["loss"][1, 0] == np.float32(1.28)
    assert r.curriculum.shape == (6, 2)


# ---------------------------------------------------------------------------------------------
# errors name the file, line and id


def test_error_conflicting_repeat(sample):
    p = sample / "runs" / RUN1 / "all_loss_trajectory.out"
    rows = _jsonl(p)
    rows[1]["loss_trajectory"].append({"step": 4, "loss": 9.5})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError) as e:
        import_gptdynamics(sample)
    msg = str(e.value)
    assert str(p) in msg and "line 2" in msg and "test id 1" in msg and "step 4" in msg


def test_error_bad_json_line(sample):
    p = sample / "runs" / RUN2 / "all_loss_trajectory.out"
    lines = p.read_text().splitlines()
    lines[2] = lines[2][:-5]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"all_loss_trajectory\.out line 3: invalid JSON"):
        import_gptdynamics(sample)


def test_error_unknown_ids(sample):
    c = sample / "runs" / RUN1 / "train_samples_id.json"
    lines = c.read_text().splitlines()
    lines[4] = '{"step": 5, "samples_id": [3, 42]}'
    c.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        import_gptdynamics(sample)
    assert str(c) in str(e.value) and "line 5" in str(e.value) and "unknown training id 42" in str(e.value)


def test_error_unknown_test_id(sample):
    p = sample / "runs" / RUN1 / "all_loss_trajectory.out"
    p.write_text(p.read_text() + '{"id": 7, "loss_trajectory": [{"step": 1, "loss": 1.0}]}\n')
    with pytest.raises(InputError) as e:
        import_gptdynamics(sample)
    assert str(p) in str(e.value) and "line 4" in str(e.value) and "unknown test id 7" in str(e.value)


def test_error_curriculum_gap(sample):
    c = sample / "runs" / RUN1 / "train_samples_id.json"
    lines = c.read_text().splitlines()
    del lines[2]
    c.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="missing step 3"):
        import_gptdynamics(sample)


def test_error_input_does_not_start_with_context(sample):
    t = sample / "texts" / "train.jsonl"
    rows = _jsonl(t)
    rows[3]["context"] = "something else"
    t.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError) as e:
        import_gptdynamics(sample)
    assert str(t) in str(e.value) and "line 4" in str(e.value) and "id 3" in str(e.value)


def test_parse_folder_name():
    assert parse_folder_name(RUN2) == {"bs": 2, "shot": 8, "sample": 6, "model": "tiny", "lr": 0.001,
                                       "epoch": 2, "seed": 2}
    assert parse_folder_name("run_seed-7") == {"seed": 7}
    assert parse_folder_name("run-0001") == {}


# ---------------------------------------------------------------------------------------------
# lossless round trip store -> GPTDynamics -> store


def _random_dynamics(seed: int = 0) -> Dynamics:
    rng = np.random.default_rng(seed)
    train = [Example(i, f"Q{i}: what is {i}?\nA:", f" answer {i}", {"src": "x"} if i % 3 == 0 else {})
             for i in range(10, 30)]
    test = [Example(i, f"T{i}: say {i}\nA:", f" {i * 2}") for i in (5, 2, 9, 7)]
    task = Task("roundtrip", train, test, kind="generation", metadata={"generator": "test", "seed": seed})
    runs = []
    T, b = 7, 3
    for k in range(3):
        cur = rng.choice(np.arange(10, 30), size=(T, b))
        cur[-1, 2] = -1  # a short last batch
        steps = np.arange(0, T + 1)
        if k == 2:
            steps = np.asarray([0, 1, 2, 4, 5, 7])  # missing steps
        M = len(test)
        loss = np.abs(rng.standard_normal((steps.size, M)) * 3).astype(np.float32)  # losses are >= 0
        loss[0, 1] = np.float32(1e-42)  # subnormal
        loss[1, 2] = np.float32(3.4e38)
        bleu = (rng.random((steps.size, M)) * 100).astype(np.float32)
        bleu[steps % 2 == 1] = np.nan  # generation metrics on a schedule (step 0 recorded)
        bleu[2, 3] = np.nan
        rouge = rng.random((steps.size, M)).astype(np.float32)
        rouge[:, 1] = np.nan
        if k == 1:
            config = {"batch_size": b, "pool_size": 20, "examples_per_run": 18, "model": "EleutherAI/pythia-14m",
                      "lr": 5e-7, "epochs": 1}
        else:
            config = {"note": f"run {k}"}
        runs.append(Run(run_id=f"run-{k:04d}", curriculum=cur, steps=steps, test_ids=[e.id for e in test],
                        values={"loss": loss, "bleu": bleu, "rougeL": rouge},
                        lr=rng.random(T) * 1e-6 if k != 0 else None, seed=100 + k, config=config,
                        info={"wall_s": 1.5 * k}))
    dyn = Dynamics(task, runs)
    dyn.manifest["metrics"] = ["loss", "bleu", "rougeL"]
    dyn.manifest["config"] = {"collect": {"eval_every": 2}, "model": "tiny"}
    return dyn


def _assert_same(a: Dynamics, b: Dynamics) -> None:
    assert a.task.name == b.task.name and a.task.kind == b.task.kind and a.task.metadata == b.task.metadata
    for x, y in ((a.task.train, b.task.train), (a.task.test, b.task.test)):
        assert [(e.id, e.prompt, e.target, e.meta) for e in x] == [(e.id, e.prompt, e.target, e.meta) for e in y]
    assert a.manifest["config"] == b.manifest["config"] and list(a.metrics) == list(b.metrics)
    assert a.run_ids == b.run_ids
    for r, s in zip(a.runs(), b.runs()):
        assert r.seed == s.seed and r.config == s.config and r.info == s.info
        assert r.curriculum.dtype == s.curriculum.dtype and np.array_equal(r.curriculum, s.curriculum)
        assert np.array_equal(r.steps, s.steps) and np.array_equal(r.test_ids, s.test_ids)
        assert sorted(r.metrics) == sorted(s.metrics)  # the store reads metrics back in name order
        for m in r.metrics:
            assert s.values[m].dtype == np.float32
            assert np.array_equal(r.values[m].view(np.uint32), s.values[m].view(np.uint32)), (r.run_id, m)
        if r.lr is None:
            assert s.lr is None
        else:
            assert np.array_equal(r.lr.view(np.uint64), s.lr.view(np.uint64))


def test_round_trip_lossless(tmp_path):
    mem = _random_dynamics()
    store = mem.save(tmp_path / "store")
    out = export_gptdynamics(Dynamics.open(tmp_path / "store"), tmp_path / "exp")
    folders = sorted(p.name for p in (out / "runs").iterdir())
    assert folders == ["output_sample_bs-3_shot-20_sample-18_model-pythia-14m_lr-5e-7_epoch-1_seed-101",
                       "run-0000", "run-0002"]
    rd = out / "runs" / folders[0]
    assert sorted(p.name for p in rd.iterdir()) == ["all_bleu_trajectory.out", "all_loss_trajectory.out",
                                                    "all_rougeL_trajectory.out", "gptfluence.json",
                                                    "train_samples_id.json"]
    # published files: steps from 1, no padding, no NaN
    cur = _jsonl(rd / "train_samples_id.json")
    assert [c["step"] for c in cur] == list(range(1, 8)) and len(cur[-1]["samples_id"]) == 2
    bleu = _jsonl(rd / "all_bleu_trajectory.out")
    assert [x["step"] for x in bleu[0]["loss_trajectory"]] == [2, 4, 6]
    assert all(x["step"] >= 1 for row in _jsonl(rd / "all_loss_trajectory.out") for x in row["loss_trajectory"])
    assert [e["id"] for e in _jsonl(out / "texts" / "test.jsonl")] == [5, 2, 9, 7]
    t0 = _jsonl(out / "texts" / "train.jsonl")[0]
    assert t0 == {"id": 10, "input": "Q10: what is 10?\nA: answer 10", "context": "Q10: what is 10?\nA:"}

    back = import_gptdynamics(out, tmp_path / "store2")
    _assert_same(store, back)
    _assert_same(mem, Dynamics.open(tmp_path / "store2"))
    _assert_same(mem, import_gptdynamics(out))  # in memory as well


def test_export_metric_subset_and_refuses_nonempty(tmp_path):
    mem = _random_dynamics(1)
    out = export_gptdynamics(mem, tmp_path / "exp", metrics=["loss"])
    assert not any(p.name.startswith("all_bleu") for p in out.rglob("*"))
    back = import_gptdynamics(out)
    assert back.metrics == ["loss"] and back.run("run-0002").metrics == ["loss"]
    with pytest.raises(InputError, match="not empty"):
        export_gptdynamics(mem, tmp_path / "exp")
    with pytest.raises(InputError, match="unknown metric"):
        export_gptdynamics(mem, tmp_path / "exp2", metrics=["accuracy"])
    # overwriting with fewer runs and metrics leaves nothing stale behind
    full = export_gptdynamics(mem, tmp_path / "exp3")
    assert any(p.name.startswith("all_bleu") for p in full.rglob("*"))
    fewer = Dynamics(mem.task, mem.runs(mem.run_ids[:1]), manifest=mem.manifest)
    export_gptdynamics(fewer, full, metrics=["loss"], overwrite=True)
    assert not any(p.name.startswith("all_bleu") for p in full.rglob("*"))
    assert import_gptdynamics(full).run_ids == [mem.run_ids[0]]


def test_format_float32_round_trips():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    vals = bits.view(np.float32)
    vals = vals[np.isfinite(vals)]
    for v in vals:
        s = format_float32(v)
        assert np.float32(json.loads(s)).view(np.uint32) == v.view(np.uint32), (v, s)
    assert format_float32(np.float32(1.6)) == "1.6"


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_import_export(sample, tmp_path, capsys):
    assert main(["import-gptdynamics", str(sample), str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "8 train / 3 test" in out and "loss" in out
    assert main(["export-gptdynamics", str(tmp_path / "store"), str(tmp_path / "exp")]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert _published_files(sample) == _published_files(tmp_path / "exp")
    # an error is one clean line and exit code 2
    assert main(["export-gptdynamics", str(tmp_path / "store"), str(tmp_path / "exp")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import-gptdynamics", str(tmp_path / "nope"), str(tmp_path / "s2")]) == 2
