"""Core value types shared by every part of gptfluence.

Conventions
-----------
* An `Example` has an integer id that is stable within its split (train pool or test set).
  Ids are *not* row numbers: every lookup of a per-example row (an embedding, a parameter)
  goes through an explicit id -> row map.
* ``text = prompt + target``. The LM's loss is measured on the target tokens only.
* For classification tasks the target is a single label word with a leading space
  (e.g. ``" positive"``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from gptfluence.errors import InputError

CLASSIFICATION = "classification"
GENERATION = "generation"
TASK_KINDS = (CLASSIFICATION, GENERATION)


@dataclass(frozen=True)
class Example:
    """One training or test example: ``id`` (int), ``prompt`` and ``target`` (str), ``meta``."""

    id: int
    prompt: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The full text the LM sees: prompt followed by target."""
        return self.prompt + self.target


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def examples_sha256(examples: Sequence[Example]) -> str:
    """A hash of (id, prompt, target) of every example, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.target], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def id_to_row(ids: Iterable[int], what: str = "examples") -> dict[int, int]:
    """Map each id to its row; raises `InputError` naming the first duplicate id."""
    out: dict[int, int] = {}
    for row, i in enumerate(ids):
        i = int(i)
        if i in out:
            raise InputError(f"duplicate id {i} in {what} (rows {out[i]} and {row})")
        out[i] = row
    return out


def rows_for(ids: Iterable[int], mapping: dict[int, int], what: str) -> np.ndarray:
    """Rows of ``ids`` under ``mapping``; raises `InputError` naming the first unknown id."""
    rows = []
    for i in ids:
        i = int(i)
        if i < 0:
            rows.append(-1)  # padding in curricula stays padding
            continue
        try:
            rows.append(mapping[i])
        except KeyError:
            raise InputError(f"unknown {what} id {i}") from None
    return np.asarray(rows, dtype=np.int64)


@dataclass
class Task:
    """What to fine-tune on and what to measure: a training pool and a test set.

    ``kind`` is ``"classification"`` (targets are label words from ``labels``) or
    ``"generation"`` (free text targets). ``metadata`` records how the task was made
    (generator, seed, flipped label ids, source files).
    """

    name: str
    train: list[Example]
    test: list[Example]
    kind: str = GENERATION
    labels: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise InputError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        self.labels = tuple(self.labels)
        id_to_row((e.id for e in self.train), f"task {self.name!r} train pool")
        id_to_row((e.id for e in self.test), f"task {self.name!r} test set")
        if not self.train:
            raise InputError(f"task {self.name!r} has an empty training pool")
        if not self.test:
            raise InputError(f"task {self.name!r} has an empty test set")

    @property
    def flipped_ids(self) -> list[int]:
        """Training ids whose label was deliberately flipped (mislabelled-data experiments)."""
        return list(self.metadata.get("flipped_ids", []))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "metadata": self.metadata,
        }
