"""``gptfluence report OUTPUT_DIR``: figures + one self-contained HTML page from an output folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write OUTPUT_DIR/report/index.html (+ PNG figures) from evaluation.json and friends",
        description=(
            "Render the results in OUTPUT_DIR as PNG figures and one self-contained HTML page "
            "(OUTPUT_DIR/report/index.html; no scripts, no external resources). Reads "
            "evaluation.json (required, from 'gptfluence evaluate'), and influence.json and "
            "mislabel.json when present."),
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder holding evaluation.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptfluence.errors import InputError
    from gptfluence.report import write_report

    out = Path(args.output_dir)
    if not out.is_dir():
        raise InputError(f"{out}: output folder not found")
    index = write_report(out)
    print(index)
    return 0
