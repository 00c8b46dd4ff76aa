import contextlib
import dataclasses
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# collection sizes of the tiny end-to-end tests (a 1-layer, 32-wide default model pre-trained 20 steps)
TINY_COLLECT = dict(n_train=16, n_test=6, examples_per_run=8, batch_size=4, epochs=1, model_layers=1, model_hidden=32,
                    model_pretrain_steps=20, gen_every=1, gen_max_new_tokens=8, max_length=64)


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


def collect_cli_flags(cfg) -> list[str]:
    """`gptfluence collect` flags reproducing the `CollectConfig` ``cfg`` (fields that differ from the defaults)."""
    from gptfluence.dynamics.collect import CollectConfig

    out = []
    default = CollectConfig()
    for f in dataclasses.fields(CollectConfig):
        v = getattr(cfg, f.name)
        if v != getattr(default, f.name):
            out += ["--" + f.name.replace("_", "-"), str(v)]
    return out


@contextlib.contextmanager
def private_model_cache(tmp_path_factory, name: str, cfg):
    """A private GPTFLUENCE_CACHE (folder ``name``) holding the default base model of the
    `CollectConfig` ``cfg``, built once; restores torch's thread count afterwards (in-process
    collections set it to 1). Use from a module-scoped fixture: ``with ... as root: yield root``."""
    import torch

    from gptfluence.dynamics.collect import model_spec
    from gptfluence.lm import ensure_default_model

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLUENCE_CACHE", str(root))
        ensure_default_model(model_spec(cfg)[1], progress=False)
        yield root
    torch.set_num_threads(threads)
