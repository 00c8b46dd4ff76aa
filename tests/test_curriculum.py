import json

import numpy as np
import pytest

from gptfluence.dynamics.curriculum import read_curricula, sample_curriculum
from gptfluence.errors import InputError


def test_sample_curriculum_shape_subset_and_determinism():
    pool = list(range(100, 120))
    c = sample_curriculum(pool, 10, 4, 3, seed=7)
    assert c.shape == (9, 4)  # 3 batches per epoch (4, 4, 2+2 padding) x 3 epochs
    assert (c == -1).sum() == 6
    ids = c[c >= 0]
    subset = set(ids.tolist())
    assert len(subset) == 10 and subset <= set(pool)
    for e in range(3):  # every epoch sees each example once
        epoch = c[3 * e:3 * e + 3]
        assert sorted(epoch[epoch >= 0].tolist()) == sorted(subset)
    np.testing.assert_array_equal(c, sample_curriculum(pool, 10, 4, 3, seed=7))
    assert not np.array_equal(c, sample_curriculum(pool, 10, 4, 3, seed=8))
    same = sample_curriculum(pool, 8, 4, 2, seed=1, reshuffle_each_epoch=False)
    np.testing.assert_array_equal(same[:2], same[2:])


def test_read_curricula_formats(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"run_id": "a", "curriculum": [[1, 2], [3]]}) + "\n")
    c = read_curricula(p, range(5))
    np.testing.assert_array_equal(c["a"], [[1, 2], [3, -1]])
    g = tmp_path / "train_samples_id.json"
    g.write_text("\n".join(json.dumps({"step": s, "samples_id": [s, s + 1]}) for s in (2, 1, 3)))
    c = read_curricula(g, range(10))
    np.testing.assert_array_equal(c["train_samples_id"], [[1, 2], [2, 3], [3, 4]])
    np.save(tmp_path / "x.npy", np.array([[0, 1]]))
    assert read_curricula(tmp_path / "x.npy", range(2))["x"].shape == (1, 2)


def test_read_curricula_errors_name_file_line_and_id(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"run_id": "a", "curriculum": [[1, 2]]}) + "\n" +
                 json.dumps({"run_id": "b", "curriculum": [[1, 99]]}) + "\n")
    with pytest.raises(InputError, match=r"c.jsonl line 2 \(run 'b'\), step 1: unknown training id 99"):
        read_curricula(p, range(5))
    p.write_text('{"run_id": "a", "curriculum": [[1]]}\n{oops\n')
    with pytest.raises(InputError, match="c.jsonl line 2: invalid JSON"):
        read_curricula(p, range(5))
    g = tmp_path / "g.json"
    g.write_text("\n".join(json.dumps({"step": s, "samples_id": [0]}) for s in (1, 3)))
    with pytest.raises(InputError, match="missing step 2"):
        read_curricula(g, range(5))


def cli_read(path):
    """What `simulate --curriculum FILE` reads: the one curriculum reader, any id."""
    (c,) = read_curricula(path, allow_empty_steps=True).values()
    return c


def test_published_step_lines_one_parser_for_every_reader(tmp_path):
    from gptfluence.dynamics.curriculum import read_samples_id
    from gptfluence.dynamics.gptdynamics import read_curriculum as gd_read

    g = tmp_path / "train_samples_id.json"
    g.write_text('{"step": 2, "samples_id": [3]}\n\n{"step": 1, "samples_id": [1, 2]}\n{"step": 2, "samples_id": [3]}\n')
    want = [[1, 2], [3, -1]]
    for got in (read_samples_id(g, {1, 2, 3}), read_curricula(g, range(5))["train_samples_id"], gd_read(g),
                cli_read(g)):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)  # the exact repeat of step 2 is kept once
    np.testing.assert_array_equal(gd_read(g, width=3), [[1, 2, -1], [3, -1, -1]])
    with pytest.raises(InputError, match="batch width 1"):
        gd_read(g, width=1)

    g.write_text('{"step": 1, "samples_id": [1]}\n{"step": 1, "samples_id": [2]}\n')
    for read in (read_samples_id, lambda p: read_curricula(p, range(5)), gd_read, cli_read):
        with pytest.raises(InputError, match=r"train_samples_id\.json line 2: step 1 repeated with a different batch"):
            read(g)
    g.write_text('{"step": 1, "samples_id": [1]}\n{"step": 3, "samples_id": [2]}\n')
    for read in (read_samples_id, lambda p: read_curricula(p, range(5)), gd_read, cli_read):
        with pytest.raises(InputError, match=r"train_samples_id\.json: steps must be 1\.\.T without gaps; missing step 2"):
            read(g)
    g.write_text('{"samples_id": [1]}\n')
    with pytest.raises(InputError, match=r"train_samples_id\.json line 1: missing field 'step'"):
        cli_read(g)
    g.write_text('{"step": 1, "samples_id": [1, 7]}\n')
    with pytest.raises(InputError, match=r"train_samples_id\.json line 1: unknown training id 7 \(step 1\)"):
        read_curricula(g, range(5))


def test_cli_read_curriculum_array_formats(tmp_path):
    j = tmp_path / "c.json"
    j.write_text("[[0, 1], [2]]")
    np.testing.assert_array_equal(cli_read(j), [[0, 1], [2, -1]])
    j.write_text("[[0, 1], [2, -3]]")
    with pytest.raises(InputError, match="id -3 is negative"):
        cli_read(j)
    j.write_text("[[0, 1],\n [2, ")
    with pytest.raises(InputError, match=r"c\.json line 2: invalid JSON"):
        cli_read(j)
    np.save(tmp_path / "c.npy", np.array([[4, -1]], dtype=np.int32))
    assert cli_read(tmp_path / "c.npy").dtype == np.int64
    (tmp_path / "bad.npy").write_text("nope")
    with pytest.raises(InputError, match=r"bad\.npy: not a readable \.npy file"):
        cli_read(tmp_path / "bad.npy")
