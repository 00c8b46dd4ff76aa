"""`collect`: fine-tune a causal LM once per curriculum and record every test example's metrics.

For each run r (seed ``run_seed + r``), the base model is fine-tuned from the same initial
weights with AdamW on the run's curriculum. Before the first update (step 0) and after every
optimizer step t = 1..T it records, for every test example:

* ``loss``: mean cross-entropy (nats) over the target tokens (for label tasks: the label word);
* on the schedule ``gen_every`` (every k-th step, plus steps 0 and T), from greedy decoding:
  ``bleu`` (sacrebleu, 0-100) and ``rougeL`` (rouge-score F, 0-1) for generation tasks,
  ``accuracy`` (0/1) for classification tasks. Unscheduled steps hold NaN.

``record_steps`` (``--record-steps``) limits the evaluation to chosen steps ("ends" = 0 and T: held-out
curricula for LDS cost a fraction of a full run, since evaluation dominates); training still runs
every step and the run's ``steps`` array lists the recorded ones.

Each finished run is committed to the store with one atomic rename (see `dynamics.store`), so an
interrupted collection keeps every finished run and the same command resumes where it stopped.
Runs are spread over worker processes (one torch thread each, which also makes results
independent of the number of workers), or with ``collect(backend=...)`` trained several at once
in one process (``batched``) or as Ray tasks (``ray``); see `gptfluence.dynamics.backends`.

Hooks: a `StepHook` sees the model after every step and may write into the run's ``captures/``
folder (`CheckpointCapture` saves weights every k steps for the TracIn-CP / Grad-Dot baselines),
so no second pass over training is ever needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from gptfluence.config import arg, sha256_file, to_dict
from gptfluence.dynamics.curriculum import read_curricula, read_curriculum_file, sample_curriculum
from gptfluence.dynamics.store import Dynamics, Run, create_store
from gptfluence.devices import resolve_device
from gptfluence.errors import GptfluenceError, InputError
from gptfluence.types import CLASSIFICATION, Task


@dataclass
class CollectConfig:
    """Everything that decides the collected dynamics (saved in the store's manifest)."""

    task: str = arg("sentiment", "built-in task name (sentiment, entailment, yesno, data2text, translation, mix), an HF adapter name (glue/sst2, ...) or a .jsonl/.csv file")
    n_train: int = arg(200, "size of the training pool")
    n_test: int = arg(100, "number of test examples whose metrics are recorded")
    task_seed: int = arg(0, "seed of the task generator / of sampling from a dataset")
    flip_fraction: float = arg(0.0, "fraction of classification training labels to flip (mislabelled-data experiments)")
    data_dir: str = arg("", "local folder with files in an HF dataset's schema (HF adapters), instead of the hub")
    model: str = arg("default", "'default' (small GPT-NeoX built and pre-trained offline, cached) or any HF causal LM name/path")
    model_layers: int = arg(2, "default model: number of layers")
    model_hidden: int = arg(64, "default model: hidden size")
    model_pretrain_steps: int = arg(600, "default model: pre-training steps on the built-in corpus")
    examples_per_run: int = arg(128, "training examples sampled from the pool per run (0 = whole pool)")
    batch_size: int = arg(8, "training batch size")
    epochs: int = arg(3, "epochs over each run's examples")
    reshuffle_each_epoch: bool = arg(True, "new order each epoch (False: the same order every epoch)")
    lr: float = arg(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = arg(0.001, "AdamW weight decay")
    lr_schedule: str = arg("constant", "learning-rate schedule after warmup: constant (stationary dynamics, what the simulators assume) or linear (decay to 0)")
    warmup_steps: int = arg(0, "linear warmup steps")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    max_length: int = arg(64, "max tokens per example (prompts are truncated from the left)")
    run_seed: int = arg(0, "run r uses seed run_seed + r for its curriculum and its training randomness")
    curriculum_file: str = arg("", "explicit curricula (JSON lines, see dynamics.curriculum.read_curricula) instead of sampled ones")
    gen_every: int = arg(1, "record generation metrics every k steps (plus steps 0 and T); 0 = never")
    record_steps: str = arg("all", "steps at which test metrics are evaluated and recorded: 'all' (0..T), 'ends' (0 and T only: cheap held-out runs for LDS, training still runs every step) or a comma list of steps (0 and T always added; steps beyond a run's T are skipped)")
    gen_max_new_tokens: int = arg(24, "max new tokens of greedy decoding for generation tasks (label tasks use 3)")
    eval_batch_size: int = arg(128, "test examples per forward pass")
    decode: str = arg("auto", "greedy decoding: auto (= loop), loop (lean loop, dynamic KV cache), static (lean loop, static KV cache), compile (static cache + torch.compile of the one-token step, for CUDA) or hf (Hugging Face generate); all give the same tokens, so not part of the store's identity")
    capture_every: int = arg(0, "save a weights checkpoint into the run's captures/ every k steps (0 = off; for TracIn-CP)")
    device: str = arg("auto", "auto, cpu or cuda")

    def validate(self) -> None:
        """Raise `InputError` naming the first invalid field (before anything is written)."""
        positive = ("n_train", "n_test", "batch_size", "epochs", "max_length", "eval_batch_size",
                    "model_layers", "model_hidden", "gen_max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("examples_per_run", "warmup_steps", "gen_every", "capture_every", "model_pretrain_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0 (got {self.lr})")
        if self.lr_schedule not in ("constant", "linear"):
            raise InputError(f"--lr-schedule must be 'constant' or 'linear' (got {self.lr_schedule!r})")
        if not 0.0 <= self.flip_fraction <= 1.0:
            raise InputError(f"--flip-fraction must be in [0, 1] (got {self.flip_fraction})")
        recorded_steps(self.record_steps, 1)  # names a malformed --record-steps before anything runs
        from gptfluence.lm.decoding import resolve_decode

        resolve_decode(self.decode)  # names a bad --decode
        if not self.curriculum_file and self.examples_per_run > self.n_train:
            raise InputError(f"--examples-per-run {self.examples_per_run} exceeds the pool size --n-train {self.n_train}")

    def task_fields(self) -> dict[str, Any]:
        return {"name": self.task, "n_train": self.n_train, "n_test": self.n_test, "seed": self.task_seed,
                "flip_fraction": self.flip_fraction, "data_dir": self.data_dir}


def recorded_steps(spec: str, T: int) -> np.ndarray:
    """The sorted steps recorded for a run of ``T`` optimizer steps under ``record_steps`` = ``spec``:
    "all" -> 0..T; "ends" -> [0, T]; "a,b,c" -> those steps that are <= T, plus 0 and T.
    Raises `InputError` naming ``--record-steps`` for anything else."""
    s = str(spec).strip().lower()
    if s == "all":
        return np.arange(T + 1)
    if s == "ends":
        return np.array(sorted({0, T}))
    try:
        steps = {int(x) for x in s.split(",") if x.strip()}
    except ValueError:
        raise InputError(f"--record-steps must be 'all', 'ends' or a comma list of steps, got {spec!r}") from None
    if not steps or min(steps) < 0:
        raise InputError(f"--record-steps must be 'all', 'ends' or a comma list of steps >= 0, got {spec!r}")
    return np.array(sorted({0, T} | {x for x in steps if x <= T}))


def load_task_for(cfg: CollectConfig) -> Task:
    from gptfluence.tasks import TaskConfig, load_task

    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    kwargs = {k: v for k, v in cfg.task_fields().items() if k in fields}
    if "path" in fields and (cfg.task.endswith(".jsonl") or cfg.task.endswith(".csv")):
        kwargs["path"] = cfg.task
    return load_task(TaskConfig(**kwargs))


def model_spec(cfg: CollectConfig) -> tuple[str, Any]:
    """(name_or_path, base model config or None) for `gptfluence.lm.load_model`."""
    if cfg.model != "default":
        return cfg.model, None
    from gptfluence.lm import BaseModelConfig

    base = BaseModelConfig(num_layers=cfg.model_layers, hidden_size=cfg.model_hidden,
                           intermediate_size=4 * cfg.model_hidden, max_length=cfg.max_length,
                           pretrain_steps=cfg.model_pretrain_steps)
    return "default", base


# ---------------------------------------------------------------------------------------------
# hooks


class StepHook(Protocol):
    """Called after step 0 (before training) and after every optimizer step."""

    def __call__(self, step: int, model: Any, lr: float, captures_dir: Callable[[], Path]) -> None: ...


@dataclass
class CheckpointCapture:
    """Save the model's weights (safetensors) at step 0 and every ``every`` steps, with the step's lr."""

    every: int

    def __call__(self, step: int, model: Any, lr: float, captures_dir: Callable[[], Path]) -> None:
        if self.every <= 0 or step % self.every:
            return
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(captures_dir() / f"checkpoint_step{step:06d}.safetensors"),
                  metadata={"step": str(step), "lr": repr(lr)})


# ---------------------------------------------------------------------------------------------
# one run


def generation_metric_names(task: Task) -> list[str]:
    from gptfluence.lm.metrics import metric_names

    return list(metric_names(task.kind))


def metrics_for(cfg: CollectConfig, task: Task) -> list[str]:
    """The metrics a collection records: loss, plus generation metrics if ``gen_every`` > 0."""
    return ["loss"] + (generation_metric_names(task) if cfg.gen_every > 0 else [])


class RunCollector:
    """Holds a loaded model, the tokenized task and evaluation set; trains one curriculum at a time."""

    def __init__(self, cfg: CollectConfig, task: Task, device: str, threads: int | None = 1,
                 evaluate: bool = True) -> None:
        import torch

        from gptfluence.lm import load_model, prepare_eval, tokenize_examples

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.task = task
        self.device = device
        name, base = model_spec(cfg)
        # fp32 weights (AdamW updates need them); on CUDA forward passes run under bf16 autocast
        dtype = None
        # the default model was built (or found) by collect(); no "reusing cached base model" line per worker
        self.model, self.tokenizer = load_model(name, device=device, dtype=dtype, base_config=base, progress=False)
        self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") \
            else contextlib.nullcontext
        self.train_data = tokenize_examples(self.tokenizer, task.train, cfg.max_length)
        self.train_row = {e.id: r for r, e in enumerate(task.train)}
        self.eval_set = prepare_eval(self.tokenizer, task.test, cfg.max_length) if evaluate else None
        self.gen_tokens = 3 if task.kind == CLASSIFICATION else cfg.gen_max_new_tokens
        self.gen_metrics = generation_metric_names(task)
        self.metrics = metrics_for(cfg, task)

    def _evaluate(self, step: int, T: int) -> dict[str, np.ndarray]:
        from gptfluence.lm import generation_metrics, greedy_generate, target_losses

        out = {"loss": np.asarray(target_losses(self.model, self.eval_set, batch_size=self.cfg.eval_batch_size))}
        k = self.cfg.gen_every
        if k > 0 and (step % k == 0 or step == T):
            preds = greedy_generate(self.model, self.tokenizer, self.eval_set, max_new_tokens=self.gen_tokens,
                                    batch_size=self.cfg.eval_batch_size, decode=self.cfg.decode)
            scores = generation_metrics(preds, self.eval_set.references, self.task.kind)
            for m in self.gen_metrics:
                out[m] = np.asarray(scores[m])
        return out

    def train(self, run_id: str, seed: int, curriculum: np.ndarray) -> Iterator[tuple[int, float]]:
        """Fine-tune from the initial weights on ``curriculum [T, b]`` (ids, -1 = padding): yields
        ``(0, lr)`` before the first update, then ``(t, lr of step t)`` after every optimizer step
        t = 1..T, with ``self.model`` holding the weights after step t."""
        import torch

        from gptfluence.lm import causal_lm_loss, make_optimizer

        cfg = self.cfg
        self.model.load_state_dict(self.init_state)
        self.model.train()
        torch.manual_seed(seed)
        T = int(curriculum.shape[0])
        opt, sched = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    warmup_steps=cfg.warmup_steps, total_steps=T,
                                    schedule=cfg.lr_schedule)
        yield 0, float(sched.get_last_lr()[0])
        for t in range(1, T + 1):
            ids = curriculum[t - 1]
            rows = [self.train_row[int(i)] for i in ids if i >= 0]
            batch = self.train_data.batch(rows)
            batch = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}
            lr = float(sched.get_last_lr()[0])
            with self.autocast():
                loss = causal_lm_loss(self.model, batch)
            if not torch.isfinite(loss):
                raise InputError(f"run {run_id!r}, step {t}: training loss is {loss.item()} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            yield t, lr

    def run(self, run_id: str, seed: int, curriculum: np.ndarray, store: Dynamics,
            hooks: Sequence[StepHook] = (), on_step: Callable[[int], None] | None = None,
            group: str | None = None) -> Run:
        """Train ``curriculum`` and commit the run; metrics are evaluated at the steps of
        ``record_steps`` only (training runs every step). ``group``: a curriculum file's group
        label, kept as ``run.info["group"]``."""
        cfg = self.cfg
        t0 = time.time()
        T = int(curriculum.shape[0])
        M = len(self.task.test)
        steps = recorded_steps(cfg.record_steps, T)
        row = {int(s): k for k, s in enumerate(steps)}
        values = {m: np.full((steps.size, M), np.nan, dtype=np.float32) for m in self.metrics}
        lrs = np.zeros(T, dtype=np.float64)
        with store.stage_run(run_id) as staging:
            for t, lr in self.train(run_id, seed, curriculum):
                if t:
                    lrs[t - 1] = lr
                if t in row:
                    with self.autocast():
                        scores = self._evaluate(t, T)
                    for m, v in scores.items():
                        values[m][row[t]] = v
                for h in hooks:
                    h(t, self.model, lr, lambda: staging.captures_dir)
                if on_step and t:
                    on_step(1)
            info: dict[str, Any] = {"wall_seconds": round(time.time() - t0, 3), "device": self.device}
            if group is not None:
                info["group"] = group
            run = Run(run_id=run_id, curriculum=curriculum, steps=steps, test_ids=[e.id for e in self.task.test],
                      values=values, lr=lrs, seed=seed,
                      config={"lr": cfg.lr, "batch_size": int(curriculum.shape[1]), "epochs": cfg.epochs,
                              "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps, "model": cfg.model},
                      info=info)
            staging.commit(run)
        return run


def store_collect_config(dynamics: Dynamics) -> CollectConfig:
    """The `CollectConfig` a store was collected with (from its manifest)."""
    raw = dynamics.manifest.get("config") or {}
    if not raw.get("model"):
        raise InputError(f"{dynamics.root or 'dynamics'}: the manifest records no collection config with a model "
                         f"(imported dynamics?); the fine-tuning cannot be replayed")
    fields = {f.name for f in dataclasses.fields(CollectConfig)}
    return CollectConfig(**{k: v for k, v in raw.items() if k in fields})


def cached_base_model(name: str) -> Path:
    """Folder of the cached default base model ``name`` (a store manifest's ``base_model``);
    `InputError` naming the cache when it is not there."""
    from gptfluence.paths import cache_dir

    path = cache_dir("models") / name
    if not (path / "config.json").exists():
        raise InputError(f"the store's base model {name!r} is not in {path.parent} "
                         f"(GPTFLUENCE_CACHE={os.environ.get('GPTFLUENCE_CACHE', '')!r}); collect once with the same "
                         f"settings to rebuild it")
    return path


def replay_config(dynamics: Dynamics) -> CollectConfig:
    """The store's collection config for re-training its fine-tuning: for the default model, the
    exact cached base model the store was collected with (its manifest's ``base_model``), never a
    rebuilt one; `InputError` when the manifest names none or the cache lacks it."""
    cfg = store_collect_config(dynamics)
    if cfg.model == "default":
        recorded = (dynamics.manifest.get("config") or {}).get("base_model")
        if not recorded:
            raise InputError(f"{dynamics.root or 'dynamics'}: manifest config has no 'base_model'; the fine-tuning "
                             f"cannot be replayed")
        cfg = dataclasses.replace(cfg, model=str(cached_base_model(str(recorded))))
    return cfg


def replay_run(dynamics: Dynamics, run_id: str, steps: Sequence[int], device: str = "cpu"
               ) -> Iterator[tuple[int, Any, Any]]:
    """Re-train run ``run_id`` of the store (its curriculum and seed, the store's collection
    settings, no evaluation) and yield ``(step, model, tokenizer)`` at each of ``steps`` (0 = the
    base model, before any update), in increasing order. The model is the collector's own and is
    trained on after each yield: read it, do not keep it. Used for gradient features at
    fine-tuning checkpoints (TracIn-CP); it needs no captured weights in the store."""
    run = dynamics.run(run_id)
    if run.seed is None:
        raise InputError(f"run {run_id!r} records no seed; its fine-tuning cannot be replayed")
    return train_curriculum(dynamics, run.curriculum, int(run.seed), steps, device, label=f"run {run_id!r}")


def train_curriculum(dynamics: Dynamics, curriculum: np.ndarray, seed: int, steps: Sequence[int],
                     device: str = "cpu", label: str = "curriculum") -> Iterator[tuple[int, Any, Any]]:
    """Fine-tune the store's base model on any ``curriculum [T, b]`` (training ids of the store,
    -1 = padding) with the store's collection settings and training seed ``seed``, no evaluation,
    and yield ``(step, model, tokenizer)`` at each of ``steps`` (0..T, increasing; 0 = the base
    model). A store run's own curriculum and seed reproduce that run (`replay_run`). The model is
    trained on after each yield: read it, do not keep it. ``label`` names the curriculum in errors."""
    cfg = replay_config(dynamics)
    cur = np.asarray(curriculum, dtype=np.int64)
    if cur.ndim != 2:
        raise InputError(f"{label}: a curriculum must be [steps, batch], got shape {cur.shape}")
    T = int(cur.shape[0])
    want = sorted({int(s) for s in steps})
    if not want or want[0] < 0 or want[-1] > T:
        raise InputError(f"replay of {label}: steps must lie in 0..{T}, got {list(steps)}")
    collector = RunCollector(cfg, dynamics.task, device, threads=None, evaluate=False)
    for t, _ in collector.train(label, int(seed), cur):
        if t in want:
            collector.model.eval()
            yield t, collector.model, collector.tokenizer
            collector.model.train()
        if t >= want[-1]:
            return


def train_and_evaluate(dynamics: Dynamics, curriculum: np.ndarray, seed: int, task: Task | None = None,
                       device: str = "cpu", label: str = "curriculum") -> dict[str, np.ndarray]:
    """Fine-tune the store's base model on ``curriculum [T, b]`` with the store's collection
    settings and training seed ``seed`` (as `train_curriculum`), then evaluate the test set once at
    step T: ``{metric: values [M]}`` in ``task.test`` order (loss in nats per target token, plus the
    task's generation metrics). ``task``: the examples to train and test on (default: the store's);
    a task with edited training targets (e.g. fixed labels) keeps the store's ids, so the same
    curriculum selects the same examples."""
    cfg = replay_config(dynamics)
    task = dynamics.task if task is None else task
    cur = np.asarray(curriculum, dtype=np.int64)
    if cur.ndim != 2 or cur.shape[0] < 1:
        raise InputError(f"{label}: a curriculum must be [steps >= 1, batch], got shape {cur.shape}")
    collector = RunCollector(cfg, task, device, threads=None, evaluate=True)
    T = int(cur.shape[0])
    for _ in collector.train(label, int(seed), cur):
        pass
    collector.model.eval()
    with collector.autocast():
        out = collector._evaluate(T, T)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def curriculum_lrs(dynamics: Dynamics, num_steps: int) -> np.ndarray:
    """``[num_steps]`` float64: the learning rate of each step 1..T of a fine-tuning of that many
    steps with the store's collection settings (its schedule; what `RunCollector.train` uses)."""
    from gptfluence.lm.training import schedule_factors

    cfg = store_collect_config(dynamics)
    if num_steps < 1:
        return np.zeros(0, dtype=np.float64)
    return float(cfg.lr) * schedule_factors(int(num_steps), cfg.warmup_steps, cfg.lr_schedule)


# ---------------------------------------------------------------------------------------------
# worker processes

_WORKER: dict[str, Any] = {}


def die_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """Make this (worker) process end when ``parent_pid`` ends, however it ends (SIGKILL too):
    the kernel's parent-death signal where there is one (Linux), and a watchdog thread that
    exits as soon as the process is re-parented. A run in progress is lost (its staging
    folder is removed by the next collection); committed runs are kept."""
    import signal

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog still works
            pass
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_init(cfg_dict: dict[str, Any], store_path: str, device: str, progress_q: Any,
                 parent_pid: int | None = None) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it terminates us
    if parent_pid is not None:
        die_with_parent(parent_pid)
    try:
        cfg = CollectConfig(**cfg_dict)
        store = Dynamics.open(store_path)
        _WORKER["collector"] = RunCollector(cfg, store.task, device, threads=1)
        _WORKER["store"] = store
        _WORKER["q"] = progress_q
        _WORKER["hooks"] = [CheckpointCapture(cfg.capture_every)] if cfg.capture_every > 0 else []
    except Exception as e:  # reported by the first job instead of breaking the pool
        _WORKER["init_error"] = e


def _worker_run(run_id: str, seed: int, curriculum: np.ndarray, group: str | None = None) -> str:
    err = _WORKER.get("init_error")
    if err is not None:
        if isinstance(err, GptfluenceError):
            raise err
        raise GptfluenceError(f"worker could not start: {type(err).__name__}: {err}")
    q = _WORKER["q"]
    _WORKER["collector"].run(run_id, seed, curriculum, _WORKER["store"], hooks=_WORKER["hooks"],
                             on_step=(lambda n: q.put(n)) if q is not None else None, group=group)
    return run_id


# ---------------------------------------------------------------------------------------------
# the whole collection

NON_IDENTITY_FIELDS = ("device", "decode")  # how, not what: a store resumes under another device or decoding


def curriculum_groups(cfg: CollectConfig) -> dict[str, str]:
    """{run_id: group label} of the curriculum file's lines that carry one (none without a file)."""
    if not cfg.curriculum_file:
        return {}
    return read_curriculum_file(cfg.curriculum_file).groups


def plan_runs(cfg: CollectConfig, task: Task, runs: int) -> list[tuple[str, int, np.ndarray]]:
    """(run_id, seed, curriculum) for every run of the collection, deterministic from the config
    (a curriculum file line's ``seed`` wins over ``run_seed`` + its index)."""
    pool = [e.id for e in task.train]
    if cfg.curriculum_file:
        cf = read_curriculum_file(cfg.curriculum_file, pool)
        return [(rid, cf.seeds.get(rid, cfg.run_seed + r), c) for r, (rid, c) in enumerate(cf.curricula.items())]
    if runs < 1:
        raise InputError(f"--runs must be >= 1 (got {runs})")
    out = []
    for r in range(runs):
        seed = cfg.run_seed + r
        c = sample_curriculum(pool, cfg.examples_per_run, cfg.batch_size, cfg.epochs, seed,
                              reshuffle_each_epoch=cfg.reshuffle_each_epoch)
        out.append((f"run-{r:04d}", seed, c))
    return out


def collect(cfg: CollectConfig, out: str | os.PathLike, runs: int = 8, workers: int = 0,
            progress: bool = True, log: Callable[[str], None] = print, backend: str = "local",
            address: str | None = None, runs_per_batch: int = 0, gpus_per_run: float = 0.0) -> Dynamics:
    """Collect ``runs`` fine-tuning runs into the store at ``out`` (resuming if it exists).

    ``workers`` = number of processes (0 = min(runs left, CPU cores) on CPU, 1 on CUDA; for
    ``backend="ray"`` on a local instance: its CPUs). ``backend`` (see `gptfluence.dynamics.backends`):
    ``local``, ``batched`` (``runs_per_batch`` runs per process step, 0 = from free memory) or
    ``ray`` (``address`` of an existing cluster, else a local instance; ``gpus_per_run`` GPUs per
    task, 0 = 1 where the cluster has GPUs and the device is not cpu). None of these settings
    changes the collected store's identity. Returns the opened store.
    """
    from tqdm.auto import tqdm

    from gptfluence.dynamics.store import FORMAT as STORE_FORMAT
    from gptfluence.outputs import has_json_format, prepare_output_dir

    from gptfluence.dynamics.backends import BACKENDS

    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if runs_per_batch < 0:
        raise InputError(f"--runs-per-batch must be >= 0 (got {runs_per_batch})")
    cfg.validate()
    if workers < 0:
        raise InputError(f"--workers must be >= 0 (0 = one per core), got {workers}")
    prepare_output_dir(out, "dynamics store", has_json_format("manifest.json", STORE_FORMAT), create=False,
                       inputs=[cfg.curriculum_file] if cfg.curriculum_file else [])
    device = resolve_device(cfg.device)
    task = load_task_for(cfg)
    plan = plan_runs(cfg, task, runs)  # bad curricula fail here, before the store is created
    groups = curriculum_groups(cfg)
    identity = {k: v for k, v in to_dict(cfg).items() if k not in NON_IDENTITY_FIELDS}
    # make sure the base model exists before workers start (they would race to build it)
    name, base = model_spec(cfg)
    if name == "default":
        from gptfluence.lm import ensure_default_model

        path = ensure_default_model(base, progress=progress)
        identity["base_model"] = path.name  # the config+corpus hash; not the cache location, so a moved cache still resumes
    if cfg.curriculum_file:
        # the file's content, not only its path, decides the runs: an edited file is a new collection
        identity["curriculum_sha256"] = sha256_file(cfg.curriculum_file) if Path(cfg.curriculum_file).exists() else None
    # a store written before a field existed (record_steps, ...) reopens when the field is at its default
    defaults = {k: v for k, v in to_dict(CollectConfig()).items() if k not in NON_IDENTITY_FIELDS}
    store = create_store(out, task, metrics_for(cfg, task), identity, defaults=defaults)  # out was checked above
    removed = store.clean_staging()
    if removed:
        log(f"removed {removed} unfinished run folder(s) left by an interrupted collection")
    todo = [p for p in plan if p[0] not in store.run_ids]
    done = len(plan) - len(todo)
    if done:
        log(f"resuming: {done} of {len(plan)} runs already in {out}")
    if not todo:
        return Dynamics.open(out)
    total_steps = sum(int(c.shape[0]) for _, _, c in todo)
    if workers <= 0 and backend == "local":
        workers = 1 if device.startswith("cuda") else max(1, min(len(todo), os.cpu_count() or 1))
    bar = tqdm(total=total_steps, desc=f"collect {task.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    runs_bar = tqdm(total=len(plan), initial=done, desc="runs", unit="run", disable=not progress,
                    dynamic_ncols=True, position=1, leave=False) if progress else None
    try:
        if backend == "batched":
            from gptfluence.dynamics.backends.batched import collect_batched

            collect_batched(cfg, task, device, store, todo, runs_per_batch, on_step=bar.update,
                            on_run=runs_bar.update if runs_bar else None, log=log)
        elif backend == "ray":
            from gptfluence.dynamics.backends.ray_backend import collect_ray

            collect_ray(cfg, str(out), device, todo, address=address, workers=workers, gpus_per_run=gpus_per_run,
                        on_step=bar.update, on_run=runs_bar.update if runs_bar else None, log=log)
        elif workers == 1:
            import torch

            threads = torch.get_num_threads()
            try:
                collector = RunCollector(cfg, task, device, threads=None if device.startswith("cuda") else 1)
                hooks = [CheckpointCapture(cfg.capture_every)] if cfg.capture_every > 0 else []
                for rid, seed, c in todo:
                    collector.run(rid, seed, c, store, hooks=hooks, on_step=bar.update, group=groups.get(rid))
                    if runs_bar:
                        runs_bar.update(1)
            finally:
                torch.set_num_threads(threads)  # one thread per run for determinism; the caller's setting back
        else:
            _collect_parallel(cfg, str(out), device, todo, workers, bar, runs_bar, groups)
    finally:
        bar.close()
        if runs_bar:
            runs_bar.close()
    return Dynamics.open(out)


def _collect_parallel(cfg: CollectConfig, out: str, device: str, todo: list, workers: int, bar: Any,
                      runs_bar: Any, groups: dict[str, str] | None = None) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            try:
                bar.update(q.get(timeout=0.2))
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(to_dict(cfg), out, device, q, os.getpid()))
    try:
        pending = {ex.submit(_worker_run, rid, seed, c, (groups or {}).get(rid)) for rid, seed, c in todo}
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()  # re-raise worker errors here
                if runs_bar:
                    runs_bar.update(1)
    except BrokenProcessPool:
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            p.terminate()
        raise GptfluenceError("a collection worker process died (out of memory?); finished runs are kept, "
                              "rerun the same command to resume (try --workers 1)") from None
    except BaseException:
        procs = list((getattr(ex, "_processes", None) or {}).values())  # shutdown() sets it to None
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        stop.set()
        th.join(timeout=2)


def summarize(store: Dynamics) -> list[dict[str, Any]]:
    """One row per metric: first/last recorded means over runs and test examples."""
    rows = []
    runs = store.runs()
    for m in store.metrics:
        firsts, lasts = [], []
        for r in runs:
            v = r.values.get(m)
            if v is None:
                continue
            ok = ~np.all(np.isnan(v), axis=1)
            if ok.any():
                firsts.append(np.nanmean(v[ok][0]))
                lasts.append(np.nanmean(v[ok][-1]))
        if firsts:
            rows.append({"metric": m, "runs": len(firsts), "start_mean": float(np.mean(firsts)),
                         "final_mean": float(np.mean(lasts)), "final_std_over_runs": float(np.std(lasts))})
    return rows
