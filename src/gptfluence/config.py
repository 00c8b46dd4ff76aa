"""Typed configs: dataclasses whose fields carry help text, saved as JSON beside every artifact.

Use ``arg(default, "help text")`` for fields. `to_dict` / `from_dict` round-trip a config through
JSON; `from_dict` rejects unknown fields and wrong types with an error naming the file and field.
`add_arguments` / `from_namespace` expose a config's fields as CLI flags (``--field-name``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from gptfluence.errors import InputError

T = TypeVar("T")


def arg(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``--help`` and kept in the JSON schema)."""
    if isinstance(default, (list, dict, set)):
        val = default
        return dataclasses.field(default_factory=lambda: type(val)(val), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict, naming ``source`` and the field in any error."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{source}, field {k!r}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InputError(f"{source}: {e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a unique temp file beside it, fsync, rename."""
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file + rename)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = to_dict(obj)
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths."""
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a syntax error names the file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a JSON file") from None


def check_header(obj: Any, path: str | os.PathLike, fmt: str, version: int, required: tuple[str, ...] = (),
                 mismatch: type[Exception] = InputError) -> dict[str, Any]:
    """Check a loaded artifact header: ``format`` and ``format_version`` (else ``mismatch``, naming
    the file and field) and the ``required`` fields (else `InputError`). Returns ``obj``."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        got = obj.get("format") if isinstance(obj, dict) else obj
        raise mismatch(f"{path}, field 'format': expected {fmt!r}, got {got!r}")
    if obj.get("format_version") != version:
        raise mismatch(f"{path}, field 'format_version': this gptfluence reads version {version}, "
                       f"got {obj.get('format_version')!r}")
    for key in required:
        if key not in obj:
            raise InputError(f"{path}: missing field {key!r}")
    return obj


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    return from_dict(cls, load_json(path), source=str(path))


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per dataclass field (default None = keep the config's value)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings; a literal '17 %' broke --help
        base = tp
        if typing.get_origin(tp) is typing.Union or str(typing.get_origin(tp)) == "<class 'types.UnionType'>":
            base = next(a for a in typing.get_args(tp) if a is not type(None))
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) in (list, tuple):
            inner = (typing.get_args(base) or (str,))[0]
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", type=inner if inner in (int, float, str) else str, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=base if base in (int, float, str) else str, help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace, base: T | None = None) -> T:
    """Config from parsed flags: fields not given on the command line keep ``base``'s values."""
    cfg = base if base is not None else cls()
    changes = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            changes[f.name] = v
    return dataclasses.replace(cfg, **changes) if changes else cfg
