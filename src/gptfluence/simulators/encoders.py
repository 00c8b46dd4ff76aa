"""Text features for the featurized simulator.

The simulator only needs an *encoder*: an object with ``spec() -> dict`` (what identifies it, saved
with every simulator and compared on load), ``dim`` and ``encode(texts) -> np.ndarray [N, dim]``
float32. `resolve_encoder` turns a spec string into one:

* ``"bow"`` / ``"bow:DIM"``: `HashingBowEncoder`, a dependency-free random projection of a bag of
  words (lower-cased word unigrams, signed hashing), L2-normalised. Cheap, deterministic, offline;
  meant for tests and quick looks, far weaker than a sentence encoder.
* anything else (``"minilm"``, a model name or path): ``gptfluence.features.load_encoder(spec)``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from gptfluence.errors import InputError
from gptfluence.types import Example


@runtime_checkable
class Encoder(Protocol):
    dim: int

    def spec(self) -> dict[str, Any]: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class HashingBowEncoder:
    """Bag of words -> ``dim``-d vector by signed feature hashing (a sparse random projection),
    L2-normalised; ``seed`` changes the hash. Output float32 [N, dim]."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        if dim < 1:
            raise InputError(f"bow encoder: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)

    def spec(self) -> dict[str, Any]:
        return {"name": "bow", "dim": self.dim, "seed": self.seed}

    def _hash(self, tok: str) -> tuple[int, float]:
        h = hashlib.blake2b(f"{self.seed}\x00{tok}".encode("utf-8"), digest_size=8).digest()
        v = int.from_bytes(h, "little")
        return v % self.dim, (1.0 if (v >> 63) & 1 else -1.0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        cache: dict[str, tuple[int, float]] = {}
        for r, text in enumerate(texts):
            for tok in _WORD.findall(text.lower()):
                if tok not in cache:
                    cache[tok] = self._hash(tok)
                j, s = cache[tok]
                out[r, j] += s
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norm, 1e-12)


def resolve_encoder(spec: str | Encoder) -> Encoder:
    """An encoder from a spec string (see module doc), or ``spec`` itself if it is an encoder."""
    if not isinstance(spec, str):
        return spec
    if spec == "bow" or spec.startswith("bow:"):
        parts = spec.split(":")
        try:
            dim = int(parts[1]) if len(parts) > 1 and parts[1] else 64
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise InputError(f"encoder spec {spec!r}: expected 'bow', 'bow:DIM' or 'bow:DIM:SEED'") from None
        return HashingBowEncoder(dim, seed)
    try:
        from gptfluence.features import load_encoder  # type: ignore[attr-defined]
    except ImportError:
        raise InputError(f"encoder {spec!r} needs gptfluence.features.load_encoder, which is not available; "
                         f"use --encoder bow for a dependency-free encoder") from None
    return load_encoder(spec)


def embed(encoder: Encoder, examples: Sequence[Example], cache_dir: Any = None) -> np.ndarray:
    """Embeddings ``[N, dim]`` float32 of ``examples`` (text = prompt + target), in order.

    Uses ``gptfluence.features.embed_examples`` (disk-cached) for encoders other than the hashing
    bag of words, falling back to ``encoder.encode``.
    """
    if not examples:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    if not isinstance(encoder, HashingBowEncoder):
        try:
            from gptfluence.features import embed_examples  # type: ignore[attr-defined]
        except ImportError:
            embed_examples = None
        if embed_examples is not None:
            return np.asarray(embed_examples(encoder, list(examples), cache_dir=cache_dir), dtype=np.float32)
    return np.asarray(encoder.encode([e.text for e in examples]), dtype=np.float32)
