"""Embeddings of texts, cached on disk so an encoder never runs twice on the same text.

Cache layout (under ``gptfluence.paths.cache_dir("embeddings")`` unless ``cache_dir`` is given)::

    <cache_dir>/<sha256(encoder spec)[:24]>/
        spec.json                      the encoder spec (kind, name, pooling, max_length, normalize)
        shard-<time>-<uuid>.safetensors  hashes uint8 [n, 32] (sha256 of the UTF-8 text),
                                         vectors float32 [n, dim]

The key of a vector is (encoder spec, sha256 of the text); the spec holds the pooling and
max_length, so changing either makes a new folder. Shards are written to a temporary name and
renamed into place (atomic), so concurrent writers and readers never see half a shard; many small
shards are merged once there are more than `MAX_SHARDS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import write_text_atomic
from gptfluence.errors import ArtifactMismatchError, InputError

MAX_SHARDS = 64
CHUNK = 4096  # texts encoded between two shard writes (an interruption loses at most this many)


@dataclass
class EmbedStats:
    """What one `embed_texts` call did: texts asked for, distinct texts, found in the cache, encoded."""

    n_texts: int
    n_unique: int
    n_cached: int
    n_encoded: int
    cache_path: str | None


def spec_key(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an encoder spec (the cache folder name uses its first 24 hex)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class _Index:
    """In-memory view of one cache folder: digest -> vector, loaded shard by shard."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = folder
        self.dim = dim
        self.loaded: set[str] = set()
        self.rows: dict[bytes, np.ndarray] = {}

    def refresh(self) -> None:
        from safetensors.numpy import load_file

        for p in sorted(self.folder.glob("shard-*.safetensors")):
            if p.name in self.loaded:
                continue
            try:
                arrs = load_file(str(p))
            except FileNotFoundError:  # merged away by another process; its rows are in the merged shard
                continue
            except Exception as e:
                raise ArtifactMismatchError(f"{p}: unreadable embedding cache shard ({e}); delete it") from None
            h, v = arrs.get("hashes"), arrs.get("vectors")
            if h is None or v is None or h.ndim != 2 or h.shape[1] != 32 or v.shape != (h.shape[0], self.dim):
                raise ArtifactMismatchError(
                    f"{p}: cache shard does not hold [n, 32] hashes and [n, {self.dim}] vectors; delete it")
            for k in range(h.shape[0]):
                key = h[k].tobytes()
                if key not in self.rows:
                    self.rows[key] = v[k]
            self.loaded.add(p.name)

    def append(self, digests: Sequence[bytes], vectors: np.ndarray) -> None:
        if not digests:
            return
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        hashes = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
        self._write(name, hashes, np.ascontiguousarray(vectors, dtype=np.float32))
        for d, v in zip(digests, vectors):
            self.rows.setdefault(d, np.asarray(v, dtype=np.float32))
        self.loaded.add(name)
        if len(list(self.folder.glob("shard-*.safetensors"))) > MAX_SHARDS:
            self.compact()

    def _write(self, name: str, hashes: np.ndarray, vectors: np.ndarray) -> None:
        from safetensors.numpy import save_file

        tmp = self.folder / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        save_file({"hashes": hashes, "vectors": vectors}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)

    def compact(self) -> None:
        """Merge every shard into one (readers that lose a shard mid-read find its rows in the new one)."""
        self.refresh()
        old = sorted(p for p in self.folder.glob("shard-*.safetensors") if p.name in self.loaded)
        keys = list(self.rows)
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        hashes = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        vectors = np.stack([self.rows[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, self.dim), np.float32)
        self._write(name, hashes, vectors)
        self.loaded.add(name)
        for p in old:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            self.loaded.discard(p.name)


_INDEXES: dict[str, _Index] = {}


def _index_for(encoder: Any, cache_dir: str | os.PathLike | None) -> _Index:
    from gptfluence.paths import cache_dir as default_cache_dir

    spec = encoder.spec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir("embeddings")
    folder = root / spec_key(spec)[:24]
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    if spec_path.exists():
        try:
            on_disk = json.loads(spec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            on_disk = None
        if isinstance(on_disk, dict):
            disk_dim = on_disk.pop("dim", None)
            if json.dumps(on_disk, sort_keys=True) != json.dumps(json.loads(json.dumps(spec)), sort_keys=True) \
                    or (disk_dim is not None and int(disk_dim) != int(encoder.dim)):
                raise ArtifactMismatchError(f"{spec_path}: cache folder holds another encoder spec ({on_disk}, "
                                            f"dim {disk_dim}); delete the folder")
    else:
        write_text_atomic(spec_path, json.dumps({**spec, "dim": int(encoder.dim)}, indent=2, sort_keys=True) + "\n")
    key = str(folder.resolve())
    idx = _INDEXES.get(key)
    if idx is None or idx.dim != int(encoder.dim):
        idx = _Index(folder, int(encoder.dim))
        _INDEXES[key] = idx
    return idx


def embed_texts_with_stats(encoder: Any, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                           progress: bool = False, batch_size: int = 64, use_cache: bool = True
                           ) -> tuple[np.ndarray, EmbedStats]:
    """Like `embed_texts`, also returning `EmbedStats` (how many texts were cached / encoded)."""
    texts = list(texts)
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {k}: expected a string, got {type(t).__name__}")
    dim = int(encoder.dim)
    digests = [_text_digest(t) for t in texts]
    unique: dict[bytes, str] = {}
    for d, t in zip(digests, texts):
        unique.setdefault(d, t)
    idx = _index_for(encoder, cache_dir) if use_cache else None
    have: dict[bytes, np.ndarray] = {}
    if idx is not None:
        idx.refresh()
        have = idx.rows
    missing = [d for d in unique if d not in have]
    n_cached = len(unique) - len(missing)
    fresh: dict[bytes, np.ndarray] = {}
    chunks = range(0, len(missing), CHUNK)
    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"embedding ({getattr(encoder, 'name', 'encoder')})", unit="text")
    try:
        for start in chunks:
            part = missing[start:start + CHUNK]
            vecs = np.asarray(encoder.encode([unique[d] for d in part], batch_size=batch_size), dtype=np.float32)
            if vecs.shape != (len(part), dim):
                raise ArtifactMismatchError(
                    f"encoder {getattr(encoder, 'name', encoder)!r} returned shape {vecs.shape}, expected {(len(part), dim)}")
            if idx is not None:
                idx.append(part, vecs)
            for d, v in zip(part, vecs):
                fresh[d] = v
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
    out = np.empty((len(texts), dim), dtype=np.float32)
    for k, d in enumerate(digests):
        v = fresh.get(d)
        out[k] = v if v is not None else have[d]
    stats = EmbedStats(len(texts), len(unique), n_cached, len(missing),
                       str(idx.folder) if idx is not None else None)
    return out, stats


def embed_texts(encoder: Any, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                progress: bool = False, batch_size: int = 64, use_cache: bool = True) -> np.ndarray:
    """Embeddings float32 [len(texts), encoder.dim], row i for texts[i].

    Vectors are looked up in the on-disk cache keyed by (encoder spec, sha256 of the text); only
    texts not there are encoded (each distinct text once) and then added to the cache.
    """
    return embed_texts_with_stats(encoder, texts, cache_dir, progress, batch_size, use_cache)[0]


def embed_examples(encoder: Any, examples: Sequence[Any], cache_dir: str | os.PathLike | None = None,
                   progress: bool = False, batch_size: int = 64, use_cache: bool = True) -> np.ndarray:
    """Embeddings float32 [len(examples), dim] of ``example.text`` (prompt + target), in order.
    Encoders with ``cacheable = False`` (the hashing bag of words) bypass the disk cache."""
    if not examples:
        return np.zeros((0, int(encoder.dim)), dtype=np.float32)
    use_cache = use_cache and getattr(encoder, "cacheable", True)
    return embed_texts(encoder, [e.text for e in examples], cache_dir, progress, batch_size, use_cache)
