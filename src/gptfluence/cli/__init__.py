"""The ``gptfluence`` command line.

Each sub-command lives in its own module under ``gptfluence.cli`` with a ``register(subparsers)``
function that adds its parser and sets ``func`` (called with the parsed namespace, returning an
exit code). Errors caused by input (`GptfluenceError`) print one line and exit with code 2;
Ctrl-C exits with 130 after the command has saved what it finished.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from gptfluence.errors import GptfluenceError

# Modules providing sub-commands, in the order shown by --help.
COMMAND_MODULES = (
    "gptfluence.cli.collect",
    "gptfluence.cli.gptdynamics",
    "gptfluence.cli.simulators",
    "gptfluence.cli.influence",
    "gptfluence.cli.lds",
    "gptfluence.cli.applications",
    "gptfluence.cli.select",
    "gptfluence.cli.report",
    "gptfluence.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    from gptfluence import __version__

    parser = argparse.ArgumentParser(
        prog="gptfluence",
        description="Training-data attribution for fine-tuned GPT models (GPTfluence and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"gptfluence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that it unwinds like Ctrl-C (worker processes are
    stopped, finished work is kept, temporary files are removed)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    # the default pipeline never touches a hub; a hub model or dataset named by the user may
    # (set HF_HUB_OFFLINE=1 to forbid it, as `make demo` and the tests do)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed sub-command (``args.func(args)``) with SIGTERM handled like Ctrl-C."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """Run the sub-command; input errors, interrupts and termination become one line and an exit code."""
    try:
        return int(args.func(args) or 0)
    except GptfluenceError as e:
        print(f"gptfluence {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a file where a folder is expected, a full disk, ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"gptfluence {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"gptfluence {args.command}: error: a file is not UTF-8 text ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngptfluence {args.command}: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Terminated:
        print(f"\ngptfluence {args.command}: terminated (SIGTERM); finished work is saved, rerun the same command "
              f"to resume", file=sys.stderr)
        return 143


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
