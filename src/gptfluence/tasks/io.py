"""Reading rows from JSONL / JSON / CSV / Parquet files, each row with its line number for errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from gptfluence.config import load_json
from gptfluence.errors import InputError
from gptfluence.jsonl import iter_json_lines

Row = tuple[int, dict[str, Any]]  # (line number, or row number for parquet / JSON arrays; the row)
TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path: str | Path, json_cells: bool = False) -> tuple[list[Row], str]:
    """All rows of a table file and the word for its row positions (``"line"`` or ``"row"``).

    JSONL: one JSON object per line (blank lines skipped), numbered by line. JSON: an array of
    objects (rows numbered from 1), or JSONL content. CSV: a header line, then rows numbered by
    the line they start on (the header is line 1); with ``json_cells``, cells holding JSON
    lists/objects are decoded.
    Parquet: rows numbered from 1, nested columns become lists and dicts.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    ext = path.suffix.lower()
    if ext == ".parquet":
        return _parquet(path), "row"
    if ext == ".csv":
        return list(_csv(path, json_cells)), "line"
    if ext == ".json":
        if path.read_text(encoding="utf-8").lstrip().startswith("["):
            data = load_json(path)
            rows = []
            for i, obj in enumerate(data, 1):
                if not isinstance(obj, dict):
                    raise InputError(f"{path} row {i}: expected a JSON object, got {type(obj).__name__}")
                rows.append((i, obj))
            return rows, "row"
        return list(iter_json_lines(path)), "line"
    if ext in (".jsonl", ".ndjson", ".txt", ""):
        return list(iter_json_lines(path)), "line"
    raise InputError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json, .csv or .parquet)")


def _maybe_json(cell: Any) -> Any:
    if isinstance(cell, str) and cell[:1] in ("[", "{"):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _csv(path: Path, json_cells: bool) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise InputError(f"{path} line 1: duplicate column {dup!r}")
        prev_end = reader.line_num
        for cells in reader:
            lineno, prev_end = prev_end + 1, reader.line_num  # a quoted cell may span lines
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise InputError(f"{path} line {lineno}: {len(cells)} cells but the header has {len(header)} columns")
            yield lineno, {h: _maybe_json(c) if json_cells else c for h, c in zip(header, cells)}


def _parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise InputError(f"{path}: reading parquet needs pyarrow ({e})") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
        raise InputError(f"{path}: cannot read parquet ({e})") from None
    return [(i, row) for i, row in enumerate(table.to_pylist(), 1)]


def find_split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The files of ``split`` in ``data_dir``: ``<split>.<ext>`` for a table extension, else every
    ``<split>-*.<ext>`` shard (Hugging Face hub layout, also one folder down), else []."""
    d = Path(data_dir)
    for ext in TABLE_EXTENSIONS:
        p = d / f"{split}{ext}"
        if p.is_file():
            return [p]
    for ext in TABLE_EXTENSIONS:
        hits = sorted(d.glob(f"{split}-*{ext}")) + sorted(d.glob(f"*/{split}-*{ext}"))
        if hits:
            return hits
    return []
