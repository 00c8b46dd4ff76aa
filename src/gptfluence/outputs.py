"""Where commands may write: one safe-name rule for ids that become paths, one output-folder check.

Rules every command follows:

* An id that becomes a file or folder name (run ids, task names, method names, metric names)
  passes `check_name`: letters, digits and ``. _ + = -``, starting with a letter or digit, at
  most 200 characters. So ``../evil``, ``/abs``, ``a/b`` and hidden names are refused with an
  error naming the id and where it came from, before anything is written.
* An output folder is checked by `prepare_output_dir` before anything is written: it may be
  new, empty, or an artifact of the same kind (then only that artifact's own files are
  replaced). Any other non-empty folder is refused unless ``overwrite`` (``--overwrite``), and
  even then only the artifact's own files are written: nothing the command did not create is
  deleted. A folder that is, or contains, one of the command's inputs is always refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from gptfluence.errors import InputError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")


def is_safe_name(name: object) -> bool:
    """Whether ``name`` may become one path component (see the module doc)."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def check_name(name: object, what: str, source: str | None = None) -> str:
    """``name`` if it is a safe path component, else `InputError` naming ``what`` (e.g. "run id")
    and ``source`` (the file, line or flag it came from)."""
    if not is_safe_name(name):
        where = f"{source}: " if source else ""
        raise InputError(f"{where}{what} {name!r} cannot be used as a file name: use letters, digits and "
                         f"'._+=-' (starting with a letter or digit, at most 200 characters)")
    return str(name)


def slug(name: str) -> str:
    """A safe path component made from a free-form name (HF task names like ``glue/sst2``):
    every character outside the safe set becomes ``_``; a leading non-alphanumeric gets ``x``."""
    s = re.sub(r"[^A-Za-z0-9._+=-]", "_", str(name))[:200] or "x"
    return s if s[0].isalnum() else ("x" + s)[:200]


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "--out",
                    allow_inside: bool = False) -> None:
    """Refuse an output path that is an input, contains one or (unless ``allow_inside``, for
    output files) lies inside one."""
    o = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        i = _resolved(inp)
        if _within(i, o) or (_within(o, i) and not allow_inside):
            rel = "is" if o == i else ("lies inside" if _within(o, i) else "contains")
            raise InputError(f"{flag} {out}: the output {rel} the input {inp}; choose a folder outside it")


def prepare_output_dir(path: str | os.PathLike, kind: str, is_own: Callable[[Path], bool],
                       overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                       flag: str = "--out", create: bool = True) -> Path:
    """Check that the folder ``path`` may receive an artifact of ``kind`` (e.g. "simulator") and
    create it. ``is_own(path)`` tells whether an existing folder already is such an artifact.

    Allowed: a new or empty folder; an artifact of the same kind; with ``overwrite`` any folder
    (the caller then writes only its own files). Refused with a one-line `InputError`: a file in
    the way, a non-empty folder of another kind without ``overwrite``, and a folder that is,
    contains or lies inside one of ``inputs``. ``create=False`` only checks (call it before a
    long computation, then again with ``create=True`` when writing).
    """
    out = Path(path)
    check_not_input(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_own(out) and not overwrite:
        raise InputError(f"{flag} {out}: folder is not empty and holds no {kind}; choose a new or empty folder "
                         f"(or --overwrite to write the {kind}'s files into it, leaving the rest alone)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def has_json_format(filename: str, fmt: str) -> Callable[[Path], bool]:
    """An ``is_own`` test: the folder holds ``filename``, a JSON object whose ``format`` is ``fmt``."""
    def test(folder: Path) -> bool:
        import json

        try:
            with open(folder / filename, encoding="utf-8") as f:
                return json.load(f).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            return False
    return test


def prepare_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                        flag: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Check an output file path: not an existing folder, not one of the inputs (nor inside an
    input folder), one of ``suffixes`` when given; creates its parent folder."""
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {out}: expected a file ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise InputError(f"{flag} {out}: is a folder; give a file name")
    check_not_input(out, inputs, flag, allow_inside=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
