"""Curricula: the ordered training batches of one fine-tuning run.

A curriculum is an int64 array [T, b]: row t-1 holds the training ids of optimizer step t;
-1 pads a short final batch. Curricula are sampled from a seed (a subset of the pool and an
order per epoch) or read from a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np

from gptfluence.errors import InputError
from gptfluence.jsonl import as_int, get_field, iter_json_lines

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


def _epochs_to_rows(orders: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Cut each epoch's order into batches of ``batch_size`` (a short last batch padded with -1)."""
    rows = []
    for order in orders:
        for start in range(0, order.size, batch_size):
            chunk = order[start:start + batch_size]
            if chunk.size < batch_size:
                chunk = np.concatenate([chunk, np.full(batch_size - chunk.size, PAD, dtype=np.int64)])
            rows.append(chunk)
    return np.stack(rows).astype(np.int64)


LDS_DESIGNS = ("both", "membership", "order")


def design_curricula(pool_ids: Sequence[int], examples_per_run: int, batch_size: int, epochs: int,
                     design: str, n: int, seed: int, reshuffle_each_epoch: bool = True,
                     exclude: Sequence[np.ndarray] = ()) -> list[tuple[str, np.ndarray]]:
    """``n`` held-out curricula ``[(run_id, [T, b])]`` for measuring LDS, all of the shape that
    `sample_curriculum` gives for these sizes, run ids ``<design>-0000`` ...

    * ``"both"``: random subset and random order (exactly as `sample_curriculum` samples);
    * ``"membership"``: random subsets, ordered by one fixed rule: fixed permutations pi_1..pi_E of
      the whole pool (drawn once from ``seed``; pi_1 every epoch unless ``reshuffle_each_epoch``),
      and epoch e visits the subset in pi_e's order. Curricula then differ only in which examples
      they hold;
    * ``"order"``: one fixed subset (drawn once from ``seed``), random orders per curriculum.

    A curriculum equal to one of ``exclude`` (e.g. the fit runs') or to an earlier one is drawn
    again, so held-out curricula are never fit curricula.
    """
    if design not in LDS_DESIGNS:
        raise InputError(f"--design must be one of {', '.join(LDS_DESIGNS)} (got {design!r})")
    if n < 1:
        raise InputError(f"--n must be >= 1 (got {n})")
    pool = np.asarray(list(pool_ids), dtype=np.int64)
    if pool.size == 0:
        raise InputError("cannot design curricula from an empty training pool")
    size = pool.size if examples_per_run <= 0 or examples_per_run >= pool.size else examples_per_run
    if design == "order" and size < 2:
        raise InputError("order-only curricula need at least 2 examples per run")
    if design == "membership" and size == pool.size:
        raise InputError("membership-only curricula need examples_per_run below the pool size "
                         f"({pool.size}): with the whole pool every curriculum is the same")
    rng = np.random.default_rng([int(seed), LDS_DESIGNS.index(design), 0x1D5])
    rank = [rng.permutation(pool.size) for _ in range(epochs if reshuffle_each_epoch else 1)]
    position = []
    for r in rank:  # position[e][i] = where pool[i] comes in epoch e's fixed order
        pos = np.empty(pool.size, dtype=np.int64)
        pos[r] = np.arange(pool.size)
        position.append(pos)
    fixed_rows = rng.choice(pool.size, size=size, replace=False)
    seen = {np.asarray(c, dtype=np.int64).tobytes() for c in exclude}
    out: list[tuple[str, np.ndarray]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise InputError(f"could not draw {n} distinct {design!r} curricula (pool too small?)")
        if design == "both":
            c = sample_curriculum(pool, size, batch_size, epochs, int(rng.integers(2**31)),
                                  reshuffle_each_epoch=reshuffle_each_epoch)
        elif design == "membership":
            rows = rng.choice(pool.size, size=size, replace=False)
            orders = [pool[rows[np.argsort(position[e % len(position)][rows])]] for e in range(epochs)]
            c = _epochs_to_rows(orders, batch_size)
        else:
            first = rng.permutation(pool[fixed_rows])
            orders = [first if e == 0 or not reshuffle_each_epoch else rng.permutation(pool[fixed_rows])
                      for e in range(epochs)]
            c = _epochs_to_rows(orders, batch_size)
        key = c.tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append((f"{design}-{len(out):04d}", c))
    return out


def pool_part(pool_ids: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """The seeded part of the pool that curricula drawn with ``--pool-fraction`` use: sorted ids,
    ``round(fraction * N)`` of them (at least 1). The same (pool, fraction, seed) always gives the
    same part, so a fit store and its held-out curricula agree on which examples are unseen."""
    pool = np.sort(np.asarray(list(pool_ids), dtype=np.int64))
    if not 0.0 < float(fraction) <= 1.0:
        raise InputError(f"--pool-fraction must be in (0, 1], got {fraction}")
    if pool.size == 0:
        raise InputError("cannot take a part of an empty training pool")
    k = max(1, int(round(float(fraction) * pool.size)))
    rng = np.random.default_rng([int(seed), 0x9001])
    return np.sort(rng.choice(pool, size=k, replace=False))


def write_curriculum_lines(path: str | os.PathLike, runs: Iterable[tuple[str, np.ndarray, str | None, int | None]]
                           ) -> Path:
    """Write run-per-line JSON (``{"run_id", "curriculum", "group"?, "seed"?}``) atomically;
    the file `read_curriculum_file` and ``collect --curriculum-file`` read."""
    import json

    from gptfluence.config import write_text_atomic

    lines = []
    for rid, cur, group, seed in runs:
        obj: dict[str, Any] = {"run_id": rid, "curriculum": np.asarray(cur, dtype=np.int64).tolist()}
        if group is not None:
            obj["group"] = group
        if seed is not None:
            obj["seed"] = int(seed)
        lines.append(json.dumps(obj, separators=(",", ":")))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def check_curriculum(curriculum: np.ndarray, train_ids: Collection[int] | None, source: str,
                     allow_empty_steps: bool = False) -> np.ndarray:
    """Validate shape and ids (``train_ids`` None: any id >= 0); a step whose batch is all padding
    is an error unless ``allow_empty_steps``. Raises `InputError` naming ``source``, the step and
    the id."""
    c = np.asarray(curriculum)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise InputError(f"{source}: a curriculum must be a non-empty [steps, batch] array, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise InputError(f"{source}: curriculum ids must be integers, got {c.dtype}")
    c = c.astype(np.int64)
    bad = np.argwhere(c < PAD)
    if bad.size:
        t, k = bad[0]
        raise InputError(f"{source}, step {t + 1}: id {int(c[t, k])} is negative (only -1, padding, may be)")
    if train_ids is not None:
        known = np.fromiter((int(i) for i in train_ids), dtype=np.int64)
        unknown = (c != PAD) & ~np.isin(c, known)
        if unknown.any():
            t, k = np.argwhere(unknown)[0]
            raise InputError(f"{source}, step {t + 1}: unknown training id {int(c[t, k])}")
    if not allow_empty_steps:
        empty = np.flatnonzero((c == PAD).all(axis=1))
        if empty.size:
            raise InputError(f"{source}, step {int(empty[0]) + 1}: empty batch (only padding)")
    return c


def pad_rows(rows: Iterable[Sequence[int]], width: int | None = None) -> np.ndarray:
    """Rows of ids -> int64 [T, width] (``width`` = the longest row by default), -1 after each row."""
    rows = [list(r) for r in rows]
    b = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), b), PAD, dtype=np.int64)
    for t, r in enumerate(rows):
        if len(r) > b:
            raise ValueError(f"row {t} has {len(r)} ids, more than the width {b}")
        out[t, :len(r)] = r
    return out


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """The array of a .npy file (no pickles); `InputError` naming the file when unreadable."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None


class StepBatches:
    """One curriculum in the published GPTDynamics style: lines ``{"step": s, "samples_id": [...]}``.

    `add` each line (in file order); `curriculum` then gives the [T, b] array (-1 pads short
    batches). Steps must be 1..T without gaps, in any order. An exact repeat of a step is kept
    once; a repeat with a different batch is an error naming the file, line and step. With
    ``train_ids``, an unknown id is an error naming the file, line, id and step.
    """

    def __init__(self, path: str | os.PathLike, train_ids: Collection[int] | None = None):
        self.path = Path(path)
        self.train_ids = train_ids
        self.batches: dict[int, tuple[list[int], int]] = {}  # step -> (ids, line)

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, lineno: int, obj: dict[str, Any]) -> None:
        path = self.path
        s = as_int(get_field(obj, "step", path, lineno), path, lineno, "step")
        ids = get_field(obj, "samples_id", path, lineno, f" (step {s})")
        if not isinstance(ids, list):
            raise InputError(f"{path} line {lineno} (step {s}), field 'samples_id': expected a list, got {ids!r}")
        ids = [as_int(i, path, lineno, "samples_id", f" (step {s})") for i in ids]
        if self.train_ids is not None:
            for i in ids:
                if i not in self.train_ids:
                    raise InputError(f"{path} line {lineno}: unknown training id {i} (step {s})")
        if s in self.batches:
            first, first_line = self.batches[s]
            if first != ids:
                raise InputError(f"{path} line {lineno}: step {s} repeated with a different batch "
                                 f"(line {first_line} has {first}, this line {ids})")
            return
        self.batches[s] = (ids, lineno)

    def curriculum(self) -> np.ndarray:
        path, batches = self.path, self.batches
        if not batches:
            raise InputError(f"{path}: no steps")
        steps = sorted(batches)
        T = len(steps)
        if steps[0] != 1 or steps[-1] != T:
            missing = sorted(set(range(1, max(steps[-1], 1) + 1)) - set(steps))
            bad = [s for s in steps if s < 1]
            detail = f"step {bad[0]} (line {batches[bad[0]][1]}) is out of range" if bad else f"missing step {missing[0]}"
            raise InputError(f"{path}: steps must be 1..T without gaps; {detail}")
        return pad_rows(batches[s][0] for s in steps)


def read_samples_id(path: str | os.PathLike, train_ids: Collection[int] | None = None) -> np.ndarray:
    """Curriculum [T, b] int64 from a GPTDynamics ``train_samples_id.json`` (see `StepBatches`)."""
    steps = StepBatches(path, train_ids)
    for lineno, obj in iter_json_lines(path):
        steps.add(lineno, obj)
    return steps.curriculum()


CURRICULUM_LINE_FIELDS = ("run_id", "curriculum", "group", "seed")


@dataclass
class CurriculumFile:
    """Curricula read from one file: ``curricula`` {run_id: [T, b] int64} in file order and
    ``groups`` {run_id: group label} for lines that carry one (e.g. the LDS designs' "membership");
    ``seeds`` {run_id: training seed} for lines that carry one (collect otherwise uses
    ``run_seed`` + the line's index; `gptfluence verify` re-trains changed curricula with one seed)."""

    path: Path
    curricula: dict[str, np.ndarray]
    groups: dict[str, str]
    seeds: dict[str, int] = field(default_factory=dict)


def read_curriculum_file(path: str | os.PathLike, train_ids: Collection[int] | None = None,
                         allow_empty_steps: bool = False) -> CurriculumFile:
    """The one reader of curriculum files (``collect --curriculum-file``, ``simulate --curriculum``).

    Formats (errors name the file, line, field, step and id):

    * JSON lines, one run per line: ``{"run_id": "a", "curriculum": [[3, 1], [0, 2], ...],
      "group": "membership", "seed": 7}`` (``group`` and ``seed`` optional; run ids must be safe
      file names);
    * JSON lines in the published GPTDynamics style (``train_samples_id.json``):
      ``{"step": 1, "samples_id": [3, 1]}``, steps 1..T without gaps (see `StepBatches`); one run,
      named after the file's stem;
    * a ``.json`` file holding one [T][b] array of ids (-1 = padding), or a ``.npy`` file holding
      one [T, b] integer array; one run named after the file's stem.

    ``train_ids``: every id must be one of them (-1 = padding is always allowed).
    ``allow_empty_steps``: a step whose batch is all padding is allowed (simulation); collection
    refuses it.
    """
    from gptfluence.outputs import check_name, slug

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: curriculum file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a curriculum file")
    ids = None if train_ids is None else {int(i) for i in train_ids}
    stem = slug(path.stem)

    def checked(arr: Any, source: str) -> np.ndarray:
        return check_curriculum(arr, ids, source, allow_empty_steps=allow_empty_steps)

    if path.suffix.lower() == ".npy":
        return CurriculumFile(path, {stem: checked(load_npy(path), str(path))}, {})
    text = read_text_file(path)
    if not text.strip():
        raise InputError(f"{path}: empty file, no curricula")
    if text.lstrip().startswith("["):
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list) or not data:
            raise InputError(f"{path}: expected a non-empty [steps][batch] array of training ids")
        for t, row in enumerate(data):
            if not isinstance(row, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
                raise InputError(f"{path}: row {t} (step {t + 1}) must be a list of integer ids")
        return CurriculumFile(path, {stem: checked(pad_rows(data), str(path))}, {})
    runs: dict[str, np.ndarray] = {}
    groups: dict[str, str] = {}
    seeds: dict[str, int] = {}
    steps = StepBatches(path, ids)
    for lineno, obj in iter_json_lines(path):
        if "curriculum" in obj:
            unknown = sorted(set(obj) - set(CURRICULUM_LINE_FIELDS))
            if unknown:
                raise InputError(f"{path} line {lineno}: unknown field {unknown[0]!r} "
                                 f"(a run line has {', '.join(CURRICULUM_LINE_FIELDS)})")
            rid = obj.get("run_id")
            if not isinstance(rid, str) or not rid:
                raise InputError(f"{path} line {lineno}, field 'run_id': expected a non-empty string")
            check_name(rid, "run id", f"{path} line {lineno}")
            if rid in runs:
                raise InputError(f"{path} line {lineno}: duplicate run_id {rid!r}")
            rows = obj["curriculum"]
            if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
                raise InputError(f"{path} line {lineno}, field 'curriculum': expected a non-empty list of id lists")
            if not all(isinstance(i, int) and not isinstance(i, bool) for r in rows for i in r):
                raise InputError(f"{path} line {lineno}, field 'curriculum': ids must be integers")
            runs[rid] = checked(pad_rows(rows), f"{path} line {lineno} (run {rid!r})")
            if "group" in obj:
                if not isinstance(obj["group"], str) or not obj["group"]:
                    raise InputError(f"{path} line {lineno}, field 'group': expected a non-empty string")
                groups[rid] = obj["group"]
            if "seed" in obj:
                seeds[rid] = as_int(obj["seed"], path, lineno, "seed")
        elif "samples_id" in obj:
            steps.add(lineno, obj)
        else:
            raise InputError(f"{path} line {lineno}: expected field 'curriculum' (one run per line) or "
                             f"'samples_id' (one step per line)")
    if steps and runs:
        raise InputError(f"{path}: mixes per-run lines ('curriculum') and per-step lines ('samples_id')")
    if steps:
        runs[stem] = checked(steps.curriculum(), str(path))
    if not runs:
        raise InputError(f"{path}: no curricula found")
    return CurriculumFile(path, runs, groups, seeds)


def read_curricula(path: str | os.PathLike, train_ids: Collection[int] | None = None,
                   allow_empty_steps: bool = False) -> dict[str, np.ndarray]:
    """{run_id: curriculum [T, b]} of a curriculum file (see `read_curriculum_file`)."""
    return read_curriculum_file(path, train_ids, allow_empty_steps).curricula


def read_text_file(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file; `InputError` naming the file when missing or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
