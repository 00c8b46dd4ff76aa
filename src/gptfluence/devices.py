"""One place that turns a device setting into a torch device string."""

from __future__ import annotations

import re

from gptfluence.errors import InputError

_CUDA = re.compile(r"cuda(:\d+)?")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when CUDA is available, else ``"cpu"``; ``"cpu"`` and
    ``"cuda[:k]"`` are checked (CUDA present, index in range). Anything else: `InputError`."""
    import torch

    d = str(device).strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if not _CUDA.fullmatch(d):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:k]', got {device!r}")
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r}: no CUDA device is available on this machine")
    if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d
