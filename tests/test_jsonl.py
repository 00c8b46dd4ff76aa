import pytest

from gptfluence.errors import InputError
from gptfluence.jsonl import as_int, get_field, iter_json_lines


def test_iter_json_lines_skips_blank_lines_and_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(iter_json_lines(p)) == [(1, {"a": 1}), (4, {"a": 2})]
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InputError, match=r"x\.jsonl line 2: invalid JSON"):
        list(iter_json_lines(p))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"x\.jsonl line 2: expected a JSON object, got list"):
        list(iter_json_lines(p))
    with pytest.raises(InputError, match=r"nope\.jsonl: file not found"):
        list(iter_json_lines(tmp_path / "nope.jsonl"))


def test_get_field_and_as_int():
    assert get_field({"k": 0}, "k", "f", 3) == 0
    with pytest.raises(InputError, match=r"f line 3 \(id 1\): missing field 'k'"):
        get_field({}, "k", "f", 3, " (id 1)")
    assert as_int(2.0, "f", 1, "step") == 2
    for bad in (True, 1.5, "1", None):
        with pytest.raises(InputError, match=r"f line 1, field 'step': expected an integer"):
            as_int(bad, "f", 1, "step")
