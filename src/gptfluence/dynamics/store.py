"""The Dynamics store: training runs of one task on disk, written atomically, readable while growing.

Layout of a store folder (format ``gptfluence.dynamics``, version 1)::

    DIR/
      manifest.json          task description, metrics, collection config, versions, example hashes
      examples/train.parquet columns id (int64), prompt, target (str), meta (JSON str)
      examples/test.parquet  same columns
      runs/<run_id>/         one folder per *finished* run, made visible by one atomic rename
        run.json             run id, seed, config, number of steps, metrics, sha256 of arrays
        arrays.safetensors   curriculum int64 [T, b]   row t-1 = training ids of step t (-1 = padding)
                             steps      int64 [S]      recorded steps, sorted; 0 = before any update
                             test_ids   int64 [M]      test ids, the column order of every metric
                             lr         float64 [T]    learning rate used at step t (optional)
                             metric.<name> float32 [S, M]  value after that step; NaN = not recorded
        captures/            optional extra state written during collection (checkpoints,
                             projected gradients), see `RunStaging.captures_dir`
      runs/.staging-*        unfinished runs; ignored by readers, removed by the next collection

Sign and unit conventions: ``loss`` is the mean cross-entropy (nats) over the target tokens;
``bleu`` is sacrebleu sentence BLEU on 0-100; ``rougeL`` is the ROUGE-L F-measure on 0-1;
``accuracy`` is 1.0 / 0.0 per example.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from gptfluence.config import check_header, load_json, save_json, sha256_file
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.types import Example, Task, examples_sha256, id_to_row, rows_for

FORMAT = "gptfluence.dynamics"
FORMAT_VERSION = 1
METRIC_PREFIX = "metric."
STAGING_PREFIX = ".staging-"


@dataclass
class Run:
    """One fine-tuning run: its curriculum and every test example's metrics along the steps.

    Shapes: ``curriculum`` [T, b] int64 (row t-1 = ids of the batch of step t, -1 pads short
    batches); ``steps`` [S] int64 sorted unique recorded steps (0 = the model before any update);
    ``values[metric]`` [S, M] float32 aligned with ``steps`` and ``test_ids`` (NaN = not recorded);
    ``lr`` [T] float64 or None.
    """

    run_id: str
    curriculum: np.ndarray
    steps: np.ndarray
    test_ids: np.ndarray
    values: dict[str, np.ndarray]
    lr: np.ndarray | None = None
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.curriculum = np.asarray(self.curriculum, dtype=np.int64)
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.test_ids = np.asarray(self.test_ids, dtype=np.int64)
        self.values = {k: np.asarray(v, dtype=np.float32) for k, v in self.values.items()}
        if self.lr is not None:
            self.lr = np.asarray(self.lr, dtype=np.float64)
        self.validate()

    @property
    def num_steps(self) -> int:
        """T, the number of optimizer steps."""
        return int(self.curriculum.shape[0])

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    def validate(self, source: str | None = None) -> None:
        src = source or f"run {self.run_id!r}"
        if self.curriculum.ndim != 2:
            raise InputError(f"{src}: curriculum must be [steps, batch], got shape {self.curriculum.shape}")
        if self.steps.ndim != 1 or (self.steps.size and (np.any(np.diff(self.steps) <= 0) or self.steps[0] < 0)):
            raise InputError(f"{src}: steps must be sorted, unique and >= 0")
        if self.steps.size and self.steps[-1] > self.num_steps:
            raise InputError(
                f"{src}: step {int(self.steps[-1])} recorded but the curriculum has only {self.num_steps} steps")
        for name, v in self.values.items():
            if v.shape != (self.steps.size, self.test_ids.size):
                raise InputError(
                    f"{src}: metric {name!r} has shape {v.shape}, expected "
                    f"(steps={self.steps.size}, test examples={self.test_ids.size})")
            check_metric_values(name, v, src, self.steps, self.test_ids)
        if self.lr is not None and self.lr.shape != (self.num_steps,):
            raise InputError(f"{src}: lr has shape {self.lr.shape}, expected ({self.num_steps},)")
        id_to_row(self.test_ids.tolist(), f"{src} test_ids")

    def trajectory(self, metric: str) -> np.ndarray:
        """Values of ``metric`` [S, M] along ``steps``; raises naming the run if not recorded."""
        try:
            return self.values[metric]
        except KeyError:
            raise InputError(f"run {self.run_id!r} has no metric {metric!r} (has {sorted(self.values)})") from None

    def on_grid(self, metric: str, first_step: int = 0) -> np.ndarray:
        """Values on the full step grid ``first_step..T`` [T+1-first_step, M]; NaN where not recorded."""
        out = np.full((self.num_steps + 1 - first_step, self.test_ids.size), np.nan, dtype=np.float32)
        keep = self.steps >= first_step
        out[self.steps[keep] - first_step] = self.trajectory(metric)[keep]
        return out

    def batch(self, step: int) -> np.ndarray:
        """Training ids of the batch of ``step`` (1-based), without padding."""
        row = self.curriculum[step - 1]
        return row[row >= 0]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"curriculum": self.curriculum, "steps": self.steps, "test_ids": self.test_ids}
        if self.lr is not None:
            out["lr"] = self.lr
        for k, v in self.values.items():
            out[METRIC_PREFIX + k] = v
        return out


# ---------------------------------------------------------------------------------------------
# integrity: every byte a reader relies on is covered by a hash

CONTENT_HASH = "content_sha256"  # field of run.json / manifest.json: sha256 of the rest of the object


def content_sha256(obj: dict[str, Any]) -> str:
    """sha256 of a JSON object's canonical form, without its own `CONTENT_HASH` field (so that a
    header can carry its own hash; whitespace and key order do not matter)."""
    import hashlib

    rest = {k: v for k, v in obj.items() if k != CONTENT_HASH}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


def with_content_hash(obj: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in obj.items() if k != CONTENT_HASH}, CONTENT_HASH: content_sha256(obj)}


def check_content_hash(obj: dict[str, Any], path: Path) -> None:
    """`InputError` naming ``path`` when its recorded content hash does not match (edited or
    corrupted); headers written before the hash existed carry none and are accepted."""
    want = obj.get(CONTENT_HASH)
    if want is not None and want != content_sha256(obj):
        raise InputError(f"{path}: content does not match its {CONTENT_HASH} (file edited or corrupted)")


# Value ranges of the standard metrics; a value outside (or +-inf) is refused on write and read.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, float("inf")), "bleu": (0.0, 100.0), "rougeL": (0.0, 1.0), "accuracy": (0.0, 1.0),
}


def check_metric_values(name: str, values: np.ndarray, source: str, steps: np.ndarray | None = None,
                        test_ids: np.ndarray | None = None) -> None:
    """NaN means "not recorded"; +-inf, and values outside `METRIC_RANGES` for a standard metric,
    are errors naming ``source``, the metric, the step and the test id."""
    v = np.asarray(values)
    lo, hi = METRIC_RANGES.get(name, (-np.inf, np.inf))
    bad = np.isinf(v) | (np.isfinite(v) & ((v < lo) | (v > hi)))
    if bad.any():
        idx = tuple(int(x) for x in np.argwhere(bad)[0])
        where = ""
        if steps is not None and test_ids is not None and len(idx) == 2:
            where = f" at step {int(steps[idx[0]])}, test id {int(test_ids[idx[1]])}"
        rng = f" (must lie in [{lo:g}, {hi:g}])" if name in METRIC_RANGES else " (must be finite, or NaN = not recorded)"
        raise InputError(f"{source}: metric {name!r} has value {float(v[idx])!r}{where}{rng}")


# ---------------------------------------------------------------------------------------------
# examples on disk


def write_examples(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    """Write examples to a Parquet file (id, prompt, target, meta-as-JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([e.id for e in examples], type=pa.int64()),
        "prompt": pa.array([e.prompt for e in examples], type=pa.string()),
        "target": pa.array([e.target for e in examples], type=pa.string()),
        "meta": pa.array([json.dumps(e.meta, ensure_ascii=False, sort_keys=True) for e in examples], type=pa.string()),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read examples written by `write_examples`; errors name the file, row and field."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    cols = table.column_names
    for c in ("id", "prompt", "target"):
        if c not in cols:
            raise InputError(f"{path}: missing column {c!r} (has {cols})")
    d = table.to_pydict()
    metas = d.get("meta") or ["{}"] * len(d["id"])
    out = []
    for row, (i, p, t, m) in enumerate(zip(d["id"], d["prompt"], d["target"], metas)):
        if i is None or p is None or t is None:
            raise InputError(f"{path} row {row}: id, prompt and target must not be null")
        try:
            meta = json.loads(m) if m else {}
        except json.JSONDecodeError:
            raise InputError(f"{path} row {row} (id {i}), field 'meta': invalid JSON") from None
        out.append(Example(int(i), p, t, meta))
    id_to_row((e.id for e in out), str(path))
    return out


# ---------------------------------------------------------------------------------------------
# run folders


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class RunStaging:
    """A run being written. Files go to a hidden staging folder; `commit` renames it into place.

    Anything written under `captures_dir` (checkpoints, projected gradients) becomes part of the
    run at commit. If the process dies before `commit`, the staging folder is ignored by readers
    and removed by the next collection.
    """

    def __init__(self, runs_dir: Path, run_id: str) -> None:
        self.runs_dir = runs_dir
        self.run_id = run_id
        # the writer's pid is part of the name, so cleaning never removes a live writer's folder
        self.path = runs_dir / f"{STAGING_PREFIX}{run_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        self.final_path = runs_dir / run_id
        self._done = False

    @property
    def captures_dir(self) -> Path:
        p = self.path / "captures"
        p.mkdir(exist_ok=True)
        return p

    def commit(self, run: Run) -> Path:
        from safetensors.numpy import save_file

        if run.run_id != self.run_id:
            raise ValueError(f"staging for {self.run_id!r} cannot commit run {run.run_id!r}")
        arrays_path = self.path / "arrays.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in run.arrays().items()}, str(arrays_path))
        meta = {
            "run_id": run.run_id,
            "seed": run.seed,
            "num_steps": run.num_steps,
            "batch_size": int(run.curriculum.shape[1]),
            "num_test": int(run.test_ids.size),
            "metrics": run.metrics,
            "recorded_steps": int(run.steps.size),
            "arrays_sha256": sha256_file(arrays_path),
            "config": run.config,
            "info": run.info,
        }
        save_json(with_content_hash(meta), self.path / "run.json")
        for p in self.path.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(self.path)
        if self.final_path.exists():
            raise InputError(f"{self.final_path}: run {self.run_id!r} already exists in the store")
        os.replace(self.path, self.final_path)
        _fsync_dir(self.runs_dir)
        self._done = True
        return self.final_path

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "RunStaging":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def _writer_alive(staging_name: str) -> bool:
    """True if the staging folder's writer process (pid in its name) is still running here."""
    parts = staging_name[len(STAGING_PREFIX):].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_run(run_dir: str | os.PathLike) -> Run:
    """Load one finished run folder, checking its arrays against the hash in run.json."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    meta = load_json(meta_path)
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    check_content_hash(meta, meta_path)
    for key in ("run_id", "arrays_sha256", "num_steps"):
        if key not in meta:
            raise InputError(f"{meta_path}: missing field {key!r}")
    if not isinstance(meta["run_id"], str) or not isinstance(meta["arrays_sha256"], str):
        raise InputError(f"{meta_path}: fields 'run_id' and 'arrays_sha256' must be strings")
    if isinstance(meta["num_steps"], bool) or not isinstance(meta["num_steps"], int):
        raise InputError(f"{meta_path}, field 'num_steps': expected an integer, got {meta['num_steps']!r}")
    if meta.get("seed") is not None and (isinstance(meta["seed"], bool) or not isinstance(meta["seed"], int)):
        raise InputError(f"{meta_path}, field 'seed': expected an integer or null, got {meta['seed']!r}")
    for key in ("config", "info"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise InputError(f"{meta_path}, field {key!r}: expected an object, got {meta[key]!r}")
    arrays_path = run_dir / "arrays.safetensors"
    if not arrays_path.exists():
        raise InputError(f"{arrays_path}: file not found (run {meta['run_id']!r} is incomplete)")
    if sha256_file(arrays_path) != meta["arrays_sha256"]:
        raise InputError(f"{arrays_path}: sha256 does not match run.json (file corrupted or edited)")
    try:
        arrays = load_file(str(arrays_path))
    except Exception as e:
        raise InputError(f"{arrays_path}: unreadable safetensors file ({e})") from None
    for key in ("curriculum", "steps", "test_ids"):
        if key not in arrays:
            raise InputError(f"{arrays_path}: missing array {key!r}")
    values = {k[len(METRIC_PREFIX):]: v for k, v in arrays.items() if k.startswith(METRIC_PREFIX)}
    run = Run.__new__(Run)
    run.run_id = meta["run_id"]
    run.curriculum = arrays["curriculum"].astype(np.int64)
    run.steps = arrays["steps"].astype(np.int64)
    run.test_ids = arrays["test_ids"].astype(np.int64)
    order = [m for m in meta.get("metrics") or [] if m in values] + sorted(set(values) - set(meta.get("metrics") or []))
    run.values = {k: values[k].astype(np.float32) for k in order}  # the order the run was written in
    run.lr = arrays["lr"].astype(np.float64) if "lr" in arrays else None
    run.seed = meta.get("seed")
    run.config = meta.get("config") or {}
    run.info = meta.get("info") or {}
    run.validate(source=str(run_dir))
    if run.num_steps != meta["num_steps"]:
        raise InputError(f"{meta_path}: num_steps {meta['num_steps']} but the curriculum has {run.num_steps} rows")
    return run


# ---------------------------------------------------------------------------------------------
# the store


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("gptfluence", "torch", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def _config_diff(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Fields whose values differ between a store's recorded config and a new one; a field the old
    config lacks (written before the field existed) counts as its default value in ``defaults``."""
    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    out = []
    for k in sorted(set(old) | set(new)):
        was = old[k] if k in old else norm(defaults[k]) if k in defaults else None
        if was != norm(new.get(k)):
            out.append(k)
    return out


def create_store(path: str | os.PathLike, task: Task, metrics: Sequence[str],
                 config: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> "Dynamics":
    """Create a store for ``task`` (or reopen it if it exists with the same task and config).

    Reopening a store made for other examples or another collection config raises
    `ArtifactMismatchError`, so two collections never mix in one folder (``defaults``: the
    values of config fields a store written before they existed is taken to have).
    """
    root = Path(path)
    manifest_path = root / "manifest.json"
    hashes = {"train": examples_sha256(task.train), "test": examples_sha256(task.test)}
    config = dict(config or {})
    if manifest_path.exists():
        dyn = Dynamics.open(root)
        m = dyn.manifest
        diff = _config_diff(m.get("config") or {}, config, defaults or {}) if config else []
        same = m.get("examples_sha256") == hashes and not diff
        if not same and not dyn.run_ids and not any((root / "runs").glob(STAGING_PREFIX + "*")):
            # a store without a single run (e.g. a first collection that failed before its first run)
            # holds nothing to lose: it is re-made for the new task and settings
            return _write_new_store(root, task, metrics, config, hashes)
        if m.get("examples_sha256") != hashes:
            raise ArtifactMismatchError(
                f"{manifest_path}: the store holds other examples than task {task.name!r} now gives "
                f"(different seed, size or data); use another --out folder")
        if diff:
            raise ArtifactMismatchError(
                f"{manifest_path}: the store was collected with another config "
                f"(fields differ: {', '.join(diff)}); use another --out folder")
        return dyn
    return _write_new_store(root, task, metrics, config, hashes)


def _write_new_store(root: Path, task: Task, metrics: Sequence[str], config: dict[str, Any],
                     hashes: dict[str, str]) -> "Dynamics":
    manifest_path = root / "manifest.json"
    root.mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    write_examples(root / "examples" / "train.parquet", task.train)
    write_examples(root / "examples" / "test.parquet", task.test)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task.describe(),
        "metrics": list(metrics),
        "config": config,
        "examples_sha256": hashes,
        "files_sha256": {f"examples/{split}.parquet": sha256_file(root / "examples" / f"{split}.parquet")
                         for split in ("train", "test")},
        "versions": _versions(),
    }
    save_json(with_content_hash(manifest), manifest_path)
    return Dynamics.open(root)


class Dynamics:
    """A collection of training runs of one task (GPTDynamics), with explicit id -> row maps.

    ``train_row[id]`` / ``test_row[id]`` give the row of an example in ``task.train`` /
    ``task.test`` (and in any per-example array built from them, such as embeddings).
    Runs are loaded lazily; `refresh` picks up runs finished since the store was opened.
    """

    def __init__(self, task: Task, runs: Iterable[Run] = (), manifest: dict[str, Any] | None = None,
                 root: Path | None = None) -> None:
        if isinstance(task, (str, os.PathLike)):
            raise InputError(f"Dynamics({str(task)!r}): the constructor takes a Task; open a store folder with "
                             f"Dynamics.open({str(task)!r})")
        self.task = task
        self.root = root
        self.manifest = manifest or {
            "format": FORMAT, "format_version": FORMAT_VERSION, "task": task.describe(),
            "metrics": [], "config": {},
            "examples_sha256": {"train": examples_sha256(task.train), "test": examples_sha256(task.test)},
            "versions": _versions(),
        }
        self.train_row = id_to_row((e.id for e in task.train), "train pool")
        self.test_row = id_to_row((e.id for e in task.test), "test set")
        self._runs: dict[str, Run | None] = {}
        for r in runs:
            self.add_run(r)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Dynamics":
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not root.is_dir():
            raise InputError(f"{root}: not a dynamics store (folder not found)")
        if not manifest_path.exists():
            raise InputError(f"{root}: not a dynamics store (no manifest.json)")
        manifest = check_header(load_json(manifest_path), manifest_path, FORMAT, FORMAT_VERSION,
                                ("task", "examples_sha256"))
        check_content_hash(manifest, manifest_path)
        for key in ("task", "examples_sha256"):
            if not isinstance(manifest[key], dict):
                raise InputError(f"{manifest_path}, field {key!r}: expected an object")
        for rel, want in (manifest.get("files_sha256") or {}).items():
            f = root / rel
            if rel not in ("examples/train.parquet", "examples/test.parquet"):
                raise InputError(f"{manifest_path}, field 'files_sha256': unexpected file {rel!r}")
            if f.exists() and sha256_file(f) != want:
                raise InputError(f"{f}: sha256 does not match manifest.json (file corrupted or edited)")
        tdesc = manifest["task"]
        train = read_examples(root / "examples" / "train.parquet")
        test = read_examples(root / "examples" / "test.parquet")
        got = {"train": examples_sha256(train), "test": examples_sha256(test)}
        for split in ("train", "test"):
            if got[split] != manifest["examples_sha256"].get(split):
                raise InputError(f"{root / 'examples' / (split + '.parquet')}: sha256 does not match manifest.json")
        task = Task(name=tdesc.get("name", root.name), train=train, test=test,
                    kind=tdesc.get("kind", "generation"), labels=tuple(tdesc.get("labels", ())),
                    metadata=tdesc.get("metadata", {}))
        dyn = cls(task, manifest=manifest, root=root)
        dyn.refresh()
        return dyn

    def refresh(self) -> list[str]:
        """Register runs finished on disk since the last look; returns the new run ids."""
        if self.root is None:
            return []
        runs_dir = self.root / "runs"
        new = []
        if runs_dir.is_dir():
            for p in sorted(runs_dir.iterdir()):
                if p.name.startswith("."):  # staging folders of runs being written, hidden files
                    continue
                if not p.is_dir() or not (p / "run.json").exists():
                    what = "a file" if not p.is_dir() else "a folder without run.json"
                    raise InputError(f"{p}: {what} among the store's runs is not a finished run (a run becomes "
                                     f"visible with its run.json); restore it, or move it out of {runs_dir}")
                if p.name not in self._runs:
                    self._runs[p.name] = None
                    new.append(p.name)
        return new

    # -- runs ---------------------------------------------------------------------------------
    def add_run(self, run: Run) -> None:
        """Add an in-memory run (checks its ids against the examples)."""
        rows_for(run.test_ids.tolist(), self.test_row, f"test (run {run.run_id!r})")
        rows_for(np.unique(run.curriculum).tolist(), self.train_row, f"training (run {run.run_id!r})")
        if run.run_id in self._runs:
            raise InputError(f"duplicate run id {run.run_id!r}")
        self._runs[run.run_id] = run

    @property
    def run_ids(self) -> list[str]:
        return list(self._runs)

    def run(self, run_id: str) -> Run:
        if run_id not in self._runs:
            raise InputError(f"unknown run id {run_id!r} (store has {len(self._runs)} runs"
                             + (f": {', '.join(self.run_ids[:8])}{'...' if len(self._runs) > 8 else ''}" if self._runs else "") + ")")
        r = self._runs[run_id]
        if r is None:
            assert self.root is not None
            r = read_run(self.root / "runs" / run_id)
            if r.run_id != run_id:
                raise InputError(f"{self.root / 'runs' / run_id / 'run.json'}: run_id {r.run_id!r} does not match its folder")
            rows_for(r.test_ids.tolist(), self.test_row, f"test (run {run_id!r})")
            rows_for(np.unique(r.curriculum).tolist(), self.train_row, f"training (run {run_id!r})")
            self._runs[run_id] = r
        return r

    def runs(self, run_ids: Sequence[str] | None = None) -> list[Run]:
        return [self.run(r) for r in (self.run_ids if run_ids is None else run_ids)]

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs())

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def metrics(self) -> list[str]:
        if self.manifest.get("metrics"):
            return list(self.manifest["metrics"])
        seen: list[str] = []
        for r in self.runs():
            for m in r.metrics:
                if m not in seen:
                    seen.append(m)
        return seen

    @property
    def train_ids(self) -> np.ndarray:
        return np.asarray([e.id for e in self.task.train], dtype=np.int64)

    @property
    def test_ids(self) -> np.ndarray:
        return np.asarray([e.id for e in self.task.test], dtype=np.int64)

    def train_example(self, i: int) -> Example:
        return self.task.train[rows_for([i], self.train_row, "training")[0]]

    def test_example(self, i: int) -> Example:
        return self.task.test[rows_for([i], self.test_row, "test")[0]]

    def stack(self, metric: str, run_ids: Sequence[str] | None = None, first_step: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Trajectories of ``metric`` of several runs on a common grid.

        Returns ``(values [R, S, M], steps [S], test_ids [M])`` with steps ``first_step..T``
        (NaN where a run did not record a step). All runs must have the same number of steps
        and the same test ids in the same order.
        """
        runs = self.runs(run_ids)
        if not runs:
            raise InputError("no runs to stack")
        T = runs[0].num_steps
        ids = runs[0].test_ids
        for r in runs[1:]:
            if r.num_steps != T:
                raise InputError(f"runs {runs[0].run_id!r} and {r.run_id!r} have different numbers of steps ({T} vs {r.num_steps})")
            if not np.array_equal(r.test_ids, ids):
                raise InputError(f"runs {runs[0].run_id!r} and {r.run_id!r} record different test ids")
        vals = np.stack([r.on_grid(metric, first_step) for r in runs])
        return vals, np.arange(first_step, T + 1, dtype=np.int64), ids.copy()

    # -- writing ------------------------------------------------------------------------------
    def stage_run(self, run_id: str) -> RunStaging:
        """Start writing run ``run_id``; see `RunStaging`."""
        if self.root is None:
            raise InputError("this Dynamics has no folder; use save() first")
        from gptfluence.outputs import check_name

        check_name(run_id, "run id")
        if (self.root / "runs" / run_id).exists():
            raise InputError(f"{self.root / 'runs' / run_id}: run already exists")
        return RunStaging(self.root / "runs", run_id)

    def write_run(self, run: Run) -> None:
        """Commit ``run`` to the store (ids checked against the examples first)."""
        rows_for(run.test_ids.tolist(), self.test_row, f"test (run {run.run_id!r})")
        rows_for(np.unique(run.curriculum).tolist(), self.train_row, f"training (run {run.run_id!r})")
        with self.stage_run(run.run_id) as st:
            st.commit(run)
        self._runs[run.run_id] = run

    def clean_staging(self) -> int:
        """Remove staging folders left by interrupted runs; returns how many were removed."""
        if self.root is None:
            return 0
        n = 0
        for p in (self.root / "runs").glob(STAGING_PREFIX + "*"):
            if _writer_alive(p.name):
                continue  # another collection is writing this run right now
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        return n

    def save(self, path: str | os.PathLike) -> "Dynamics":
        """Write this (in-memory) collection as a new store folder and return it opened."""
        metrics = self.manifest.get("metrics") or self.metrics
        cfg = self.manifest.get("config") or {}
        store = create_store(path, self.task, metrics, cfg)
        for r in self.runs():
            if r.run_id not in store._runs:
                store.write_run(r)
        return store

    def check_compatible(self, manifest_hashes: dict[str, str], what: str) -> None:
        """Raise `ArtifactMismatchError` unless the examples hash like ``manifest_hashes``."""
        mine = self.manifest.get("examples_sha256", {})
        for split in ("train", "test"):
            if split in manifest_hashes and manifest_hashes[split] != mine.get(split):
                raise ArtifactMismatchError(
                    f"{what} was made for other {split} examples than this dynamics store "
                    f"({self.root or 'in memory'}) holds")
