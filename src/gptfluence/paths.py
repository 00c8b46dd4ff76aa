"""Where gptfluence keeps caches (base models, embeddings): ``$GPTFLUENCE_CACHE`` or ~/.cache/gptfluence."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str | None = None) -> Path:
    root = Path(os.environ.get("GPTFLUENCE_CACHE") or Path.home() / ".cache" / "gptfluence")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
