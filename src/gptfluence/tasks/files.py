"""Tasks read from your own files: JSONL (one JSON object per line), JSON, CSV or Parquet.

Either a train file and a test file (``test_path``), or one file with a ``split`` column holding
``train`` or ``test``. Each row needs a prompt and a target column (names configurable) and may
carry an id column; without one, ids are 0..N-1 in file order within each split. Every error
names the file, the line (row for Parquet / JSON arrays) and the field, e.g.
``data/train.jsonl line 7: missing field 'target'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gptfluence.config import sha256_file
from gptfluence.errors import InputError
from gptfluence.tasks.common import detect_kind, flip_task_labels, join_space, make_rng, subsample
from gptfluence.types import CLASSIFICATION, GENERATION, TASK_KINDS, Example, Task

SPLITS = ("train", "test")


def _parse_id(v: Any, where: str, field: str) -> int:
    if isinstance(v, bool):
        raise InputError(f"{where}: field {field!r} must be an integer id, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise InputError(f"{where}: field {field!r} must be an integer id, got {v!r}") from None
    if not isinstance(v, int):
        raise InputError(f"{where}: field {field!r} must be an integer id, got {v!r}")
    if v < 0:
        raise InputError(f"{where}: field {field!r} must be a non-negative id, got {v}")
    return v


def _examples(path: Path, rows: list[tuple[int, dict[str, Any]]], pos: str, prompt_column: str,
              target_column: str, id_column: str | None, add_space: bool, split: str
              ) -> list[Example]:
    out: list[Example] = []
    first_line: dict[int, int] = {}
    for n, (lineno, row) in enumerate(rows):
        where = f"{path} {pos} {lineno}"
        vals = {}
        for col in (prompt_column, target_column):
            if col not in row or row[col] is None:
                raise InputError(f"{where}: missing field {col!r}")
            if not isinstance(row[col], str):
                raise InputError(f"{where}: field {col!r} must be a string, got {row[col]!r}")
            vals[col] = row[col]
        prompt, target = vals[prompt_column], vals[target_column]
        if not target.strip():
            raise InputError(f"{where}: field {target_column!r} is empty")
        if add_space:
            target = join_space(prompt, target)
        if id_column is not None:
            if id_column not in row or row[id_column] in (None, ""):
                raise InputError(f"{where}: missing field {id_column!r}")
            i = _parse_id(row[id_column], where, id_column)
        else:
            i = n
        if i in first_line:
            raise InputError(f"{where}: duplicate id {i} in the {split} split (first on {pos} {first_line[i]})")
        first_line[i] = lineno
        out.append(Example(i, prompt, target, {"source": str(path), pos: lineno}))
    return out


def read_task_file(path: str | Path, name: str | None = None, prompt_column: str = "prompt",
                   target_column: str = "target", id_column: str | None = None,
                   test_path: str | Path | None = None, split_column: str = "split",
                   kind: str | None = None, labels: Sequence[str] | None = None,
                   n_train: int | None = None, n_test: int | None = None, seed: int = 0,
                   flip_fraction: float = 0.0, add_space: bool = True) -> Task:
    """A `Task` from a train file and a test file, or from one file with a ``split_column``.

    ``kind``: ``"classification"`` or ``"generation"``; by default classification when there are
    at most 10 distinct single-word targets and some repeat, else generation. ``labels``: the
    label words (default: the sorted distinct targets). ``add_space``: give a target a leading
    space when neither the prompt's end nor the target's start is whitespace (so that ``"Answer:"``
    + ``"yes"`` reads ``"Answer: yes"``). ``n_train`` / ``n_test``: keep only that many examples
    of each split, chosen with ``seed`` (ids are kept). ``flip_fraction``: flip that fraction of
    training labels (classification only). Texts appearing in both splits are counted in
    ``metadata["train_test_overlap"]``, not removed.
    """
    from gptfluence.tasks.io import read_rows

    path = Path(path)
    if kind is not None and kind not in TASK_KINDS:
        raise InputError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    files = [path] + ([Path(test_path)] if test_path is not None else [])
    if test_path is None:
        rows, pos = read_rows(path)
        parts: dict[str, list[tuple[int, dict[str, Any]]]] = {s: [] for s in SPLITS}
        for lineno, row in rows:
            if split_column not in row:
                raise InputError(f"{path} {pos} {lineno}: missing field {split_column!r} (give a test file, "
                                 f"or a {split_column!r} column with 'train' or 'test')")
            s = str(row[split_column]).strip().lower()
            if s not in parts:
                raise InputError(f"{path} {pos} {lineno}: field {split_column!r} must be 'train' or 'test', "
                                 f"got {row[split_column]!r}")
            parts[s].append((lineno, row))
        split_rows = {s: (path, parts[s], pos) for s in SPLITS}
    else:
        tr_rows, tr_pos = read_rows(path)
        te_rows, te_pos = read_rows(test_path)
        split_rows = {"train": (path, tr_rows, tr_pos), "test": (Path(test_path), te_rows, te_pos)}
    ex: dict[str, list[Example]] = {}
    for s, (p, rows, pos) in split_rows.items():
        if not rows:
            raise InputError(f"{p}: no {s} examples")
        ex[s] = _examples(p, rows, pos, prompt_column, target_column, id_column, add_space, s)

    if kind is None:
        kind, found = detect_kind([e.target for e in ex["train"] + ex["test"]])
    else:
        found = tuple(sorted({e.target.strip() for e in ex["train"] + ex["test"]})) if kind == CLASSIFICATION else ()
    if labels is not None:
        if kind != CLASSIFICATION:
            raise InputError("labels given for a generation task (pass kind='classification')")
        labels = tuple(labels)
        for s in SPLITS:
            for e in ex[s]:
                if e.target.strip() not in labels:
                    raise InputError(f"{e.meta['source']} {'line' if 'line' in e.meta else 'row'} "
                                     f"{e.meta.get('line', e.meta.get('row'))}: field {target_column!r}: "
                                     f"{e.target.strip()!r} is not one of the labels {labels}")
    else:
        labels = found

    full = {s: len(ex[s]) for s in SPLITS}
    for s, n in (("train", n_train), ("test", n_test)):
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n_{s} must be a positive integer, got {n!r}")
        if n > len(ex[s]):
            raise InputError(f"{split_rows[s][0]}: has {len(ex[s])} {s} examples; asked for n_{s}={n}")
        ex[s] = subsample(ex[s], n, make_rng("gptfluence-file", s, seed))

    train_texts = {e.text for e in ex["train"]}
    overlap = sum(1 for e in ex["test"] if e.text in train_texts)
    task = Task(name or path.stem, ex["train"], ex["test"], kind=kind or GENERATION, labels=labels or (),
                metadata={
                    "generator": "gptfluence.tasks.files", "files": [str(f) for f in files],
                    "sha256": {str(f): sha256_file(f) for f in files},
                    "prompt_column": prompt_column, "target_column": target_column,
                    "id_column": id_column, "split_column": None if test_path is not None else split_column,
                    "seed": seed, "n_train": len(ex["train"]), "n_test": len(ex["test"]),
                    "rows_in_files": full, "train_test_overlap": overlap,
                })
    return flip_task_labels(task, flip_fraction, seed)
