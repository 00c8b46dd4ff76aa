"""Helpers shared by every task source: seeded RNGs, label flipping, sampling, kind detection."""

from __future__ import annotations

import random
from typing import Any, Sequence

from gptfluence.errors import InputError
from gptfluence.types import CLASSIFICATION, GENERATION, Example, Task


def make_rng(*parts: Any) -> random.Random:
    """A `random.Random` seeded from a string of ``parts`` (stable across Python versions)."""
    return random.Random(":".join(str(p) for p in parts))


def check_sizes(name: str, n_train: int, n_test: int) -> None:
    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise InputError(f"task {name!r}: {what} must be an integer, got {n!r}")
        if n < 1:
            raise InputError(f"task {name!r}: {what} must be >= 1, got {n}")


def check_fraction(name: str, flip_fraction: float) -> float:
    if isinstance(flip_fraction, bool) or not isinstance(flip_fraction, (int, float)):
        raise InputError(f"task {name!r}: flip_fraction must be a number in [0, 1], got {flip_fraction!r}")
    if not 0.0 <= float(flip_fraction) <= 1.0:
        raise InputError(f"task {name!r}: flip_fraction must be in [0, 1], got {flip_fraction}")
    return float(flip_fraction)


def label_of(target: str) -> str:
    """The label word of a classification target (``" positive"`` -> ``"positive"``)."""
    return target.strip()


def flip_examples(examples: list[Example], labels: Sequence[str], fraction: float, rng: random.Random,
                  ) -> tuple[list[Example], list[int]]:
    """Flip the label of ``round(fraction * len(examples))`` examples chosen with ``rng``.

    A flipped example gets another label word (the other one for two labels, a random other one
    otherwise), keeping the target's leading whitespace; ``meta["original_target"]`` keeps the
    original target. Returns the new list (same order) and the sorted flipped ids.
    """
    k = int(round(fraction * len(examples)))
    if k == 0 or not examples:
        return list(examples), []
    chosen = set(rng.sample(range(len(examples)), k))
    out: list[Example] = []
    flipped: list[int] = []
    for row, ex in enumerate(examples):
        if row not in chosen:
            out.append(ex)
            continue
        cur = label_of(ex.target)
        others = [lab for lab in labels if lab != cur]
        if not others:
            raise InputError(f"cannot flip example {ex.id}: label {cur!r} has no alternative in {tuple(labels)}")
        new = others[0] if len(others) == 1 else rng.choice(others)
        lead = ex.target[: len(ex.target) - len(ex.target.lstrip())]
        meta = dict(ex.meta)
        meta["original_target"] = ex.target
        meta["flipped"] = True
        out.append(Example(ex.id, ex.prompt, lead + new, meta))
        flipped.append(ex.id)
    return out, sorted(flipped)


def flip_task_labels(task: Task, fraction: float, seed: int) -> Task:
    """Flip ``fraction`` of the training labels of a classification task (in place; returns it).

    Records ``metadata["flipped_ids"]`` (sorted) and ``metadata["flip_fraction"]``. Raises
    `InputError` for a generation task when ``fraction > 0``.
    """
    fraction = check_fraction(task.name, fraction)
    task.metadata["flip_fraction"] = fraction
    if fraction == 0.0:
        task.metadata.setdefault("flipped_ids", [])
        return task
    if task.kind != CLASSIFICATION:
        raise InputError(f"task {task.name!r} is a {task.kind} task: flip_fraction applies only to "
                         f"classification tasks (got flip_fraction={fraction})")
    task.train, flipped = flip_examples(task.train, task.labels, fraction, make_rng("flip", task.name, seed))
    task.metadata["flipped_ids"] = flipped
    return task


def detect_kind(targets: Sequence[str], max_labels: int = 10) -> tuple[str, tuple[str, ...]]:
    """Classification if there are <= ``max_labels`` distinct single-word targets and at least one
    repeats; else generation. Returns (kind, sorted label words)."""
    words = [t.strip() for t in targets]
    distinct = sorted(set(words))
    if (distinct and len(distinct) <= max_labels and len(distinct) < len(words)
            and all(w and len(w.split()) == 1 for w in distinct)):
        return CLASSIFICATION, tuple(distinct)
    return GENERATION, ()


def subsample(items: list[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` of ``items`` chosen with ``rng``, in their original order (all of them if n >= len)."""
    if n >= len(items):
        return list(items)
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def join_space(prompt: str, target: str) -> str:
    """``target`` with a leading space added when neither side has whitespace at the seam."""
    if target and not target[0].isspace() and prompt and not prompt[-1].isspace():
        return " " + target
    return target
