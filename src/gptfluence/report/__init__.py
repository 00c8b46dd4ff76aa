"""Report: matplotlib PNG figures + one self-contained HTML page (``OUT/report/index.html``).

Inputs in an output folder: ``evaluation.json`` (required, from ``gptfluence evaluate``),
``influence.json`` ({"reports": [{"task", **influence_report}]}, optional) and ``mislabel.json``
(mislabelled-data detection curves, optional). See `write_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def write_report(out_dir: Any, evaluation: Any = None, influence: Any = None, mislabel: Any = None) -> Path:
    """Write ``out_dir/report/index.html`` and its PNG figures; returns the path of index.html.

    Inputs not given are read from ``out_dir`` (evaluation.json required; influence.json and
    mislabel.json optional). See `gptfluence.report.page.write_report`; matplotlib is imported
    only when a report is written.
    """
    from gptfluence.report.page import write_report as _write

    return _write(out_dir, evaluation=evaluation, influence=influence, mislabel=mislabel)
