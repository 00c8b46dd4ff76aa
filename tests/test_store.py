import numpy as np
import pytest

from conftest import make_run
from gptfluence.dynamics.store import Dynamics, Run, create_store, read_examples, write_examples
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.types import Example


def test_store_round_trip(tmp_path, tiny_task):
    store = create_store(tmp_path / "s", tiny_task, ["loss", "accuracy"], {"lr": 1e-3})
    runs = [make_run(f"run-{i}", tiny_task, seed=i) for i in range(3)]
    for r in runs:
        store.write_run(r)
    again = Dynamics.open(tmp_path / "s")
    assert again.run_ids == ["run-0", "run-1", "run-2"]
    for r in runs:
        got = again.run(r.run_id)
        np.testing.assert_array_equal(got.curriculum, r.curriculum)
        np.testing.assert_array_equal(got.steps, r.steps)
        np.testing.assert_array_equal(got.test_ids, r.test_ids)
        np.testing.assert_array_equal(got.lr, r.lr)
        for m in r.values:
            np.testing.assert_array_equal(got.values[m], r.values[m])  # NaN positions included
        assert got.seed == r.seed
    assert [e.text for e in again.task.train] == [e.text for e in tiny_task.train]
    vals, steps, ids = again.stack("loss")
    assert vals.shape == (3, runs[0].num_steps + 1, len(tiny_task.test))
    assert steps[0] == 0


def test_store_reopen_checks_task_and_config(tmp_path, tiny_task):
    create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3})
    # a store without runs (a first collection that failed before its first run) is re-made
    create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 5e-3})
    store = create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3})
    assert store.manifest["config"] == {"lr": 1e-3}
    store.write_run(make_run("run-0", tiny_task, metrics=("loss",)))
    create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3})  # same: fine
    with pytest.raises(ArtifactMismatchError, match="fields differ: lr"):
        create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 2e-3})
    other = type(tiny_task)("tiny", tiny_task.train[:-1], tiny_task.test, kind="classification")
    with pytest.raises(ArtifactMismatchError, match="other examples"):
        create_store(tmp_path / "s", other, ["loss"], {"lr": 1e-3})


def test_staging_folders_are_invisible_and_cleaned(tmp_path, tiny_task):
    store = create_store(tmp_path / "s", tiny_task, ["loss"])
    st = store.stage_run("run-9")
    (st.path / "arrays.safetensors").write_bytes(b"partial")  # a run killed mid-write
    again = Dynamics.open(tmp_path / "s")
    assert again.run_ids == []
    assert again.clean_staging() == 1
    assert not any((tmp_path / "s" / "runs").iterdir())


def test_corrupted_arrays_are_detected(tmp_path, tiny_task):
    store = create_store(tmp_path / "s", tiny_task, ["loss"])
    store.write_run(make_run("run-0", tiny_task, metrics=("loss",)))
    p = tmp_path / "s" / "runs" / "run-0" / "arrays.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="arrays.safetensors: sha256 does not match"):
        Dynamics.open(tmp_path / "s").run("run-0")


def test_malformed_manifest_and_run_json_are_named(tmp_path, tiny_task):
    create_store(tmp_path / "s", tiny_task, ["loss"])
    m = tmp_path / "s" / "manifest.json"
    m.write_text(m.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(InputError, match=r"manifest.json, field 'format_version'"):
        Dynamics.open(tmp_path / "s")
    m.write_text("{not json")
    with pytest.raises(InputError, match=r"manifest.json line 1: invalid JSON"):
        Dynamics.open(tmp_path / "s")
    with pytest.raises(InputError, match="not a dynamics store"):
        Dynamics.open(tmp_path / "nothing")


def test_unknown_ids_in_runs_are_named(tmp_path, tiny_task):
    dyn = Dynamics(tiny_task)
    bad = make_run("run-0", tiny_task, metrics=("loss",))
    bad.curriculum[2, 1] = 77
    with pytest.raises(InputError, match="unknown training .*id 77"):
        dyn.add_run(bad)
    r = make_run("run-1", tiny_task, metrics=("loss",))
    r.test_ids[0] = 55
    with pytest.raises(InputError, match="unknown test .*id 55"):
        dyn.add_run(r)


def test_run_validation_names_shape_problems(tiny_task):
    with pytest.raises(InputError, match="metric 'loss' has shape"):
        Run("r", np.zeros((3, 2), dtype=np.int64), np.arange(4), [0, 1], {"loss": np.zeros((4, 3))})
    with pytest.raises(InputError, match="step 9 recorded but the curriculum has only 3 steps"):
        Run("r", np.zeros((3, 2), dtype=np.int64), [0, 9], [0], {"loss": np.zeros((2, 1))})


def test_examples_parquet_round_trip_and_errors(tmp_path):
    ex = [Example(3, "a <b>", " c", {"k": 1}), Example(1, "é", "ü")]
    write_examples(tmp_path / "e.parquet", ex)
    back = read_examples(tmp_path / "e.parquet")
    assert back == ex and back[0].meta == {"k": 1}
    write_examples(tmp_path / "d.parquet", [Example(1, "a", "b"), Example(1, "c", "d")])
    with pytest.raises(InputError, match="duplicate id 1"):
        read_examples(tmp_path / "d.parquet")
    (tmp_path / "x.parquet").write_text("garbage")
    with pytest.raises(InputError, match="x.parquet: not a readable Parquet file"):
        read_examples(tmp_path / "x.parquet")


def test_cleaning_spares_a_live_writers_staging_folder(tmp_path, tiny_task):
    import subprocess
    import sys

    store = create_store(tmp_path / "s", tiny_task, ["loss"])
    runs = tmp_path / "s" / "runs"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = runs / f".staging-run-1-{child.pid}-abcd1234"
        live.mkdir()
        (runs / ".staging-run-2-999999999-abcd1234").mkdir()  # no such process: left by a dead writer
        assert store.clean_staging() == 1
        assert live.exists() and not (runs / ".staging-run-2-999999999-abcd1234").exists()
    finally:
        child.kill()
        child.wait()
    assert store.clean_staging() == 1 and not live.exists()


def test_write_run_refuses_ids_the_store_does_not_know(tmp_path, tiny_task):
    store = create_store(tmp_path / "s", tiny_task, ["loss", "accuracy"])
    bad = make_run("run-0", tiny_task)
    bad.test_ids[1] = 42
    with pytest.raises(InputError, match="unknown test .*id 42"):
        store.write_run(bad)
    assert Dynamics.open(tmp_path / "s").run_ids == []


def test_store_written_before_a_config_field_existed_reopens_at_that_fields_default(tmp_path, tiny_task):
    store = create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3})
    store.write_run(make_run("run-0", tiny_task, metrics=("loss",)))
    defaults = {"lr": 3e-4, "record_steps": "all"}
    create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3, "record_steps": "all"}, defaults=defaults)
    with pytest.raises(ArtifactMismatchError, match="fields differ: record_steps"):
        create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3, "record_steps": "ends"}, defaults=defaults)
    with pytest.raises(ArtifactMismatchError, match="fields differ: record_steps"):  # no default known: a difference
        create_store(tmp_path / "s", tiny_task, ["loss"], {"lr": 1e-3, "record_steps": "all"})


def test_constructor_given_a_path_points_to_open(tmp_path):
    """``Dynamics("folder")`` is a clean error naming ``Dynamics.open``, not an AttributeError."""
    for arg in (str(tmp_path / "s"), tmp_path / "s"):
        with pytest.raises(InputError, match=r"Dynamics\.open\("):
            Dynamics(arg)
