"""Curricula: the ordered training batches of one fine-tuning run.

A curriculum is an int64 array [T, b]: row t-1 holds the training ids of optimizer step t;
-1 pads a short final batch. Curricula are sampled from a seed (a subset of the pool and an
order per epoch) or read from a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gptfluence.errors import InputError

PAD = -1


def sample_curriculum(pool_ids: Sequence[int], examples_per_run: int, batch_size: int, epochs: int,
                      seed: int, reshuffle_each_epoch: bool = True, drop_last: bool = False) -> np.ndarray:
    """Sample a curriculum [T, b] from ``seed``.

    Takes ``examples_per_run`` ids of the pool without replacement (0 or >= pool size = the whole
    pool), then for each of ``epochs`` epochs a permutation of that subset (the same order every
    epoch unless ``reshuffle_each_epoch``), cut into batches of ``batch_size``. A short last batch
    of an epoch is padded with -1, or dropped with ``drop_last``.
    """
    pool = np.asarray(list(pool_ids), dtype=np.int64)
    if batch_size < 1 or epochs < 1:
        raise InputError(f"batch_size and epochs must be >= 1 (got {batch_size}, {epochs})")
    if pool.size == 0:
        raise InputError("cannot sample a curriculum from an empty training pool")
    rng = np.random.default_rng(seed)
    n = pool.size if examples_per_run <= 0 or examples_per_run >= pool.size else examples_per_run
    subset = rng.choice(pool, size=n, replace=False)
    rows = []
    order = rng.permutation(subset)
    for epoch in range(epochs):
        if epoch > 0 and reshuffle_each_epoch:
            order = rng.permutation(subset)
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            if chunk.size < batch_size:
                if drop_last:
                    continue
                chunk = np.concatenate([chunk, np.full(batch_size - chunk.size, PAD, dtype=np.int64)])
            rows.append(chunk)
    if not rows:
        raise InputError(f"examples_per_run={n} < batch_size={batch_size} with drop_last leaves no steps")
    return np.stack(rows).astype(np.int64)


def check_curriculum(curriculum: np.ndarray, train_ids: set[int], source: str) -> np.ndarray:
    """Validate ids and shape; raises `InputError` naming ``source``, the step and the id."""
    c = np.asarray(curriculum)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise InputError(f"{source}: a curriculum must be a non-empty [steps, batch] array, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise InputError(f"{source}: curriculum ids must be integers")
    for t, row in enumerate(c, start=1):
        for i in row:
            if i != PAD and int(i) not in train_ids:
                raise InputError(f"{source}, step {t}: unknown training id {int(i)}")
        if np.all(row == PAD):
            raise InputError(f"{source}, step {t}: empty batch")
    return c.astype(np.int64)


def _pad_rows(rows: list[list[int]], source: str) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.asarray([list(r) + [PAD] * (width - len(r)) for r in rows], dtype=np.int64)


def read_curricula(path: str | os.PathLike, train_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Read explicit curricula from a file; returns {run_id: curriculum [T, b]}.

    Accepted formats (JSON lines, one object per line):

    * ``{"run_id": "a", "curriculum": [[3, 1], [0, 2], ...]}``: one run per line;
    * ``{"step": 1, "samples_id": [3, 1]}``: the published GPTDynamics ``train_samples_id.json``
      (one run, named after the file's stem; steps must be 1..T without gaps);
    * a ``.npy`` file holding one [T, b] array (run id = file stem).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: curriculum file not found")
    ids = {int(i) for i in train_ids}
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from None
        return {path.stem: check_curriculum(arr, ids, str(path))}
    runs: dict[str, np.ndarray] = {}
    steps: list[tuple[int, list[int]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path} line {lineno}: expected a JSON object")
            if "curriculum" in obj:
                rid = obj.get("run_id")
                if not isinstance(rid, str) or not rid:
                    raise InputError(f"{path} line {lineno}, field 'run_id': expected a non-empty string")
                if rid in runs:
                    raise InputError(f"{path} line {lineno}: duplicate run_id {rid!r}")
                rows = obj["curriculum"]
                if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
                    raise InputError(f"{path} line {lineno}, field 'curriculum': expected a list of non-empty id lists")
                if not all(isinstance(i, int) and not isinstance(i, bool) for r in rows for i in r):
                    raise InputError(f"{path} line {lineno}, field 'curriculum': ids must be integers")
                runs[rid] = check_curriculum(_pad_rows(rows, str(path)), ids, f"{path} line {lineno} (run {rid!r})")
            elif "samples_id" in obj:
                s, b = obj.get("step"), obj["samples_id"]
                if not isinstance(s, int) or isinstance(s, bool):
                    raise InputError(f"{path} line {lineno}, field 'step': expected an integer")
                if not isinstance(b, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in b):
                    raise InputError(f"{path} line {lineno}, field 'samples_id': expected a list of integer ids")
                for i in b:
                    if i not in ids:
                        raise InputError(f"{path} line {lineno}: unknown training id {i}")
                steps.append((s, b))
            else:
                raise InputError(f"{path} line {lineno}: expected field 'curriculum' or 'samples_id'")
    if steps and runs:
        raise InputError(f"{path}: mixes per-run lines ('curriculum') and per-step lines ('samples_id')")
    if steps:
        steps.sort(key=lambda x: x[0])
        got = [s for s, _ in steps]
        if got != list(range(1, len(got) + 1)):
            missing = sorted(set(range(1, max(got) + 1)) - set(got))
            dup = sorted({s for s in got if got.count(s) > 1})
            raise InputError(f"{path}: steps must be 1..T without gaps or repeats"
                             + (f" (missing step {missing[0]})" if missing else "")
                             + (f" (step {dup[0]} repeated)" if dup else ""))
        runs[path.stem] = _pad_rows([b for _, b in steps], str(path))
    if not runs:
        raise InputError(f"{path}: no curricula found")
    return runs
