"""Reading JSON-lines files with errors that name the file, the line and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from gptfluence.errors import InputError


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file.

    Raises `InputError` naming the file (and line) when it is missing, a line is not valid JSON
    or a line holds something other than a JSON object.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def get_field(obj: dict, key: str, path: str | os.PathLike, lineno: int, what: str = "") -> Any:
    """``obj[key]``; `InputError` naming file, line (and ``what``, e.g. " (id 3)") when missing."""
    if key not in obj:
        raise InputError(f"{path} line {lineno}{what}: missing field {key!r}")
    return obj[key]


def as_int(v: Any, path: str | os.PathLike, lineno: int, field: str, what: str = "") -> int:
    """``v`` as an int (integral floats accepted, bools not); `InputError` naming file, line, field."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise InputError(f"{path} line {lineno}{what}, field {field!r}: expected an integer, got {v!r}")
    return int(v)
