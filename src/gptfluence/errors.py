"""User-facing errors.

Every error raised because of bad input (a malformed file, an unknown id, an invalid option) is a
`GptfluenceError` whose message names the file, line, field or id at fault. The CLI prints such
errors as one clean line (exit code 2) instead of a traceback.
"""

from __future__ import annotations


class GptfluenceError(Exception):
    """An error caused by the user's input or environment, with a message fit to show as is."""


class InputError(GptfluenceError, ValueError):
    """Malformed or inconsistent input data (file, field, id)."""


class ArtifactMismatchError(GptfluenceError):
    """An artifact (simulator, store, cache) does not match what it is being used with."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location such as ``runs/run-0003/run.json line 4, field 'seed'``."""
    out = str(path)
    if line is not None:
        out += f" line {line}"
    if field is not None:
        out += f", field {field!r}"
    return out


class MethodUnavailable(GptfluenceError):
    """A method cannot run on this input at all (e.g. gradient methods on a store without a model);
    the message is the reason. Evaluation reports the method as skipped with that reason."""
