import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_task():
    from gptfluence.types import Example, Task

    train = [Example(i, f"Review: film {i} was {'good' if i % 2 else 'bad'}.\nSentiment:",
                     " positive" if i % 2 else " negative") for i in range(10)]
    test = [Example(i, f"Review: movie {i} was {'good' if i % 2 else 'bad'}.\nSentiment:",
                    " positive" if i % 2 else " negative") for i in range(4)]
    return Task("tiny", train, test, kind="classification", labels=("positive", "negative"))


def make_run(run_id: str, task, steps: int = 6, batch: int = 2, seed: int = 0, metrics=("loss", "accuracy")):
    from gptfluence.dynamics.curriculum import sample_curriculum
    from gptfluence.dynamics.store import Run

    rng = np.random.default_rng(seed)
    cur = sample_curriculum([e.id for e in task.train], 0, batch, 2, seed)[:steps]
    M = len(task.test)
    # values within each metric's range (loss >= 0; accuracy, rougeL in [0, 1]; bleu in [0, 100])
    vals = {m: (np.abs(rng.normal(size=(cur.shape[0] + 1, M))) if m == "loss" else rng.random((cur.shape[0] + 1, M))
                ).astype(np.float32) for m in metrics}
    if "accuracy" in vals:
        vals["accuracy"][1::2] = np.nan  # generation metrics on a schedule
    return Run(run_id, cur, np.arange(cur.shape[0] + 1), [e.id for e in task.test], vals,
               lr=np.linspace(1e-3, 0, cur.shape[0]), seed=seed, config={"lr": 1e-3})
