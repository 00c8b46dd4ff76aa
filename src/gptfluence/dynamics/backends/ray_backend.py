"""The ``ray`` collection backend: every run is a Ray task (``pip install 'gptfluence[ray]'``).

``collect_ray`` connects to an existing cluster (``address``, e.g. ``"auto"`` on a cluster node
or ``"ray://head:10001"``) or starts a local Ray instance (``workers`` CPUs, all cores when 0)
and shuts it down afterwards. Each run is one task (``num_cpus=1``; ``num_gpus=gpus_per_run``,
where 0 means 1 when the cluster has GPUs and the device is not ``cpu``, so ``0.25`` packs four
runs on a GPU). A worker process loads the model and tokenizes the task once and keeps them
for every later task with the same settings (`_cached_collector`).

Every task opens the store at its path and commits its own run folder atomically
(`Dynamics.stage_run` ... ``commit``), exactly like the local backend: the store folder must be
on a filesystem every node sees (NFS, a mounted bucket with rename, or the local disk of a
one-machine cluster). A worker that dies mid-run loses only that run: Ray retries the task
(``max_retries``, default `DEFAULT_MAX_RETRIES` = 2) on another worker, and the dead writer's staging folder is removed
by the next collection. When retries run out, the collection stops with a one-line error and
the same command resumes it (finished runs are skipped). A task whose run is already in the
store (a retry of a task that died after committing) returns at once.

Runs are deterministic per run (one torch thread per task on CPU), so a Ray collection on CPU
equals a local one bit for bit (tests/test_scale.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from gptfluence.errors import GptfluenceError, InputError

# environment a local instance's workers need to find the same caches and offline settings
ENV_VARS = ("GPTFLUENCE_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "PYTHONPATH")

_CACHE: dict[str, Any] = {}
DEFAULT_MAX_RETRIES = 2  # Ray retries of a task whose worker died (system failures only)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray needs Ray: pip install 'gptfluence[ray]' (or pip install ray)") from None
    return ray


def _cached_collector(cfg_json: str, store_path: str, device: str) -> tuple[Any, Any, list]:
    """(RunCollector, store, hooks) of this worker process for these settings (built once)."""
    from gptfluence.devices import resolve_device
    from gptfluence.dynamics.collect import CheckpointCapture, CollectConfig, RunCollector
    from gptfluence.dynamics.store import Dynamics

    key = f"{cfg_json}\0{store_path}\0{device}"
    if _CACHE.get("key") != key:
        _CACHE.clear()
        cfg = CollectConfig(**json.loads(cfg_json))
        dev = resolve_device(device)
        store = Dynamics.open(store_path)
        collector = RunCollector(cfg, store.task, dev, threads=None if dev.startswith("cuda") else 1)
        hooks = [CheckpointCapture(cfg.capture_every)] if cfg.capture_every > 0 else []
        _CACHE.update(key=key, value=(collector, store, hooks))
    return _CACHE["value"]


def run_task(cfg_json: str, store_path: str, device: str, run_id: str, seed: int, curriculum: np.ndarray) -> dict:
    """The body of one Ray task: train run ``run_id`` and commit it to the store at ``store_path``.
    Returns ``{"run_id", "steps", "seconds", "pid", "skipped"}``."""
    from pathlib import Path

    t0 = time.time()
    if (Path(store_path) / "runs" / run_id / "run.json").exists():  # a retry after the commit
        return {"run_id": run_id, "steps": int(curriculum.shape[0]), "seconds": 0.0, "pid": os.getpid(),
                "skipped": True}
    collector, store, hooks = _cached_collector(cfg_json, store_path, device)
    collector.run(run_id, int(seed), curriculum, store, hooks=hooks)
    return {"run_id": run_id, "steps": int(curriculum.shape[0]), "seconds": time.time() - t0, "pid": os.getpid(),
            "skipped": False}


def _wait_for_staging_writers(store_path: str, timeout: float) -> None:
    """After cancelling tasks: wait (up to ``timeout`` s) until no process that is still alive on
    this machine owns a staging folder of the store. A force-cancelled worker can outlive
    ``ray.wait`` on a loaded machine; its folder then looks in use to the next collection's
    clean-up, which would leave it behind."""
    from gptfluence.dynamics.store import STAGING_PREFIX, _writer_alive

    runs = os.path.join(store_path, "runs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = [n for n in os.listdir(runs) if n.startswith(STAGING_PREFIX)]
        except OSError:
            return
        if not any(_writer_alive(n) for n in names):
            return
        time.sleep(0.2)


def collect_ray(cfg: Any, store_path: str, device: str, todo: Sequence[tuple[str, int, np.ndarray]],
                address: str | None = None, workers: int = 0, gpus_per_run: float = 0.0, max_retries: int | None = None,
                on_step: Callable[[int], None] | None = None, on_run: Callable[[int], None] | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
    """Run ``todo`` ((run_id, seed, curriculum)) as Ray tasks that commit into ``store_path``.
    Returns the tasks' result records in completion order."""
    from gptfluence.config import to_dict

    ray = import_ray()
    max_retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    if gpus_per_run < 0:
        raise InputError(f"--gpus-per-run must be >= 0 (got {gpus_per_run})")
    started = False
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InputError(f"--address {address!r}: cannot connect to a Ray cluster "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        else:
            env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, runtime_env={"env_vars": env} if env else None)
        started = True
    try:
        gpus = gpus_per_run
        if not gpus and str(cfg.device) != "cpu" and ray.cluster_resources().get("GPU", 0) > 0:
            gpus = 1.0
        # the workers resolve "auto" themselves: the driver of a cluster may have no GPU
        task_device = cfg.device if address else device
        task = ray.remote(run_task).options(num_cpus=1, num_gpus=gpus, max_retries=max_retries,
                                            retry_exceptions=False)
        cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
        store_abs = os.path.abspath(store_path)
        pending = {task.remote(cfg_json, store_abs, task_device, rid, int(seed), cur): rid for rid, seed, cur in todo}
        results = []
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    rid = pending.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, GptfluenceError):
                            raise cause from None
                        raise GptfluenceError(f"run {rid!r} failed on a Ray worker: {type(cause).__name__ if cause else ''}"
                                              f" {str(cause or e).splitlines()[0]}") from None
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                            ray.exceptions.RayError) as e:
                        raise GptfluenceError(f"run {rid!r}: its Ray worker died {max_retries + 1} times "
                                              f"({type(e).__name__}); finished runs are kept, rerun the same "
                                              f"command to resume") from None
                    results.append(res)
                    if on_step:
                        on_step(res["steps"])
                    if on_run:
                        on_run(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            # wait (briefly) until the cancelled tasks' workers are gone, so that their staging
            # folders belong to dead writers and the next collection removes them
            with contextlib.suppress(Exception):
                ray.wait(list(pending), num_returns=len(pending), timeout=10.0)
            _wait_for_staging_writers(store_abs, timeout=60.0)
            raise
        return results
    finally:
        if started:
            ray.shutdown()
