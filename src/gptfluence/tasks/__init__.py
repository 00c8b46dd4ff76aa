"""Tasks: a training pool and a test set of `Example`s, from three sources.

* built-in offline generators (`get_task`, names in `BUILTIN_TASKS`): ``sentiment``,
  ``entailment``, ``yesno``, ``data2text``, ``translation`` and the instruction-tuning ``mix``;
* Hugging Face data sets with FLAN-style prompts (`hf_task`, names in `HF_TASKS`): ``glue/sst2``,
  ``glue/rte``, ``super_glue/boolq``, ``web_nlg``, ``wmt16/de-en`` (hub, or local files);
* your own JSONL / CSV files (`read_task_file`).

`TaskConfig` + `load_task` pick among them. `pretraining_corpus` is the built-in plain text used
to train the default GPT's tokenizer and pre-train it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptfluence.config import arg
from gptfluence.errors import InputError
from gptfluence.tasks.builtin import (
    BUILTIN_TASKS,
    INSTRUCTIONS,
    MIX_MEMBERS,
    get_task,
    pretraining_corpus,
    tokenizer_corpus,
)
from gptfluence.tasks.common import flip_task_labels
from gptfluence.tasks.files import read_task_file
from gptfluence.tasks.hf import HF_TASKS, hf_task
from gptfluence.types import Task

__all__ = [
    "BUILTIN_TASKS", "HF_TASKS", "INSTRUCTIONS", "MIX_MEMBERS", "TaskConfig", "Task",
    "flip_task_labels", "get_task", "hf_task", "load_task", "pretraining_corpus", "read_task_file",
    "tokenizer_corpus",
]


@dataclass
class TaskConfig:
    """Which task to fine-tune on and measure: built-in, Hugging Face, or a file."""

    name: str = arg("sentiment", "built-in task (sentiment, entailment, yesno, data2text, translation, mix), "
                                 "Hugging Face task (glue/sst2, glue/rte, super_glue/boolq, web_nlg, wmt16/de-en), "
                                 "or any name for a task read from --path")
    n_train: int | None = arg(None, "training pool size (default: 200 for built-in and Hugging Face tasks, "
                                    "all rows for file tasks)")
    n_test: int | None = arg(None, "test set size (default: 100 for built-in and Hugging Face tasks, "
                                   "all rows for file tasks)")
    seed: int = arg(0, "seed of the generator / of the sample drawn from the data")
    flip_fraction: float = arg(0.0, "fraction of training labels to flip (classification tasks; "
                                    "mislabelled-data experiments)")
    path: str = arg("", "JSONL/CSV/JSON/Parquet file of a file task (with a 'split' column unless "
                        "test_path is given); setting it makes this a file task")
    test_path: str = arg("", "test file of a file task (default: the 'split' column of path)")
    prompt_column: str = arg("prompt", "prompt column of a file task")
    target_column: str = arg("target", "target column of a file task")
    id_column: str = arg("", "id column of a file task (default: ids 0..N-1 in file order)")
    kind: str = arg("", "classification or generation for a file task (default: detected)")
    data_dir: str = arg("", "folder with local files (train.jsonl, validation.jsonl, ...) of a Hugging Face "
                            "task, instead of downloading it")
    max_chars: int | None = arg(None, "Hugging Face tasks: drop examples whose prompt+target is longer (characters)")


def load_task(cfg: TaskConfig) -> Task:
    """The task ``cfg`` describes: a file task when ``cfg.path`` is set (named ``cfg.name``, or
    after the file when the name is a built-in / HF name, ``"file"`` or the path itself), else a
    built-in task, else a Hugging Face task; an unknown name raises `InputError` listing the known
    ones. For file tasks ``n_train`` / ``n_test`` larger than the file is an `InputError`."""
    if cfg.path:
        return read_task_file(
            cfg.path, name=None if cfg.name in BUILTIN_TASKS + HF_TASKS + ("", "file", cfg.path) else cfg.name,
            prompt_column=cfg.prompt_column, target_column=cfg.target_column,
            id_column=cfg.id_column or None, test_path=cfg.test_path or None, kind=cfg.kind or None,
            n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, flip_fraction=cfg.flip_fraction)
    n_train = 200 if cfg.n_train is None else cfg.n_train
    n_test = 100 if cfg.n_test is None else cfg.n_test
    if cfg.name in BUILTIN_TASKS:
        return get_task(cfg.name, n_train=n_train, n_test=n_test, seed=cfg.seed, flip_fraction=cfg.flip_fraction)
    if cfg.name in HF_TASKS:
        return hf_task(cfg.name, n_train=n_train, n_test=n_test, seed=cfg.seed, data_dir=cfg.data_dir or None,
                       flip_fraction=cfg.flip_fraction, max_chars=cfg.max_chars)
    raise InputError(f"unknown task {cfg.name!r}; known: built-in {', '.join(BUILTIN_TASKS)}; Hugging Face "
                     f"{', '.join(HF_TASKS)}; or set path to read a JSONL/CSV file")
