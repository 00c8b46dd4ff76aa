"""Colours, method order, metric units and number formatting shared by the figures and the page."""

from __future__ import annotations

import math
import re
from typing import Iterable

# Fixed colours for the known methods, so a method looks the same in every figure and report.
METHOD_COLORS = {
    "gptfluence": "#1f77b4",   # blue
    "simfluence": "#ff7f0e",   # orange
    "tracin_cp": "#9467bd",    # purple
    "grad_dot": "#8c564b",     # brown
    "constant": "#7f7f7f",     # grey
    "mean_curve": "#bcbd22",   # olive
}
# Unknown methods get these, in sorted name order (green/red are kept for helpful/harmful).
EXTRA_COLORS = ("#17becf", "#e377c2", "#1a55a0", "#d4a017", "#6b4c9a", "#008b8b", "#b05a7a", "#556b2f")
METHOD_ORDER = ("gptfluence", "simfluence", "tracin_cp", "grad_dot")
# Trivial references: a simulator has to beat these to be worth anything.
REFERENCE_METHODS = ("constant", "mean_curve")
METHOD_LABELS = {
    "gptfluence": "GPTfluence (gptfluence variant)", "simfluence": "Simfluence (gptfluence variant)", "tracin_cp": "TracIn-CP",
    "grad_dot": "Grad-Dot", "constant": "constant (ref.)", "mean_curve": "mean curve (ref.)",
    "gptfluence_paper": "GPTfluence (authors' config)", "simfluence_paper": "Simfluence (authors' config)",
}

HELPFUL_COLOR = "#2ca02c"
HARMFUL_COLOR = "#d62728"
TRUE_COLOR = "#111111"

# metric -> (display name, unit for values, unit for squared errors)
METRIC_UNITS = {
    "loss": ("test loss", "nats", "nats²"),
    "bleu": ("BLEU", "0-100", "BLEU²"),
    "rougeL": ("ROUGE-L F", "0-1", "(ROUGE-L)²"),
    "accuracy": ("accuracy", "0-1", "(accuracy)²"),
}


def metric_label(metric: str) -> str:
    """``"test loss (nats)"``, ``"BLEU (0-100)"``, ``"ROUGE-L F (0-1)"``."""
    name, unit, _ = METRIC_UNITS.get(metric, (metric, "", ""))
    return f"{name} ({unit})" if unit else name


def metric_unit(metric: str) -> str:
    return METRIC_UNITS.get(metric, (metric, "", ""))[1]


def squared_unit(metric: str) -> str:
    return METRIC_UNITS.get(metric, (metric, "", ""))[2]


def is_reference(method: str) -> bool:
    return method in REFERENCE_METHODS


def method_label(method: str, plain: bool = False) -> str:
    """Display name (``plain``: without the "(ref.)" suffix of references)."""
    label = METHOD_LABELS.get(method, method)
    return label.replace(" (ref.)", "") if plain else label


def order_methods(methods: Iterable[str]) -> list[str]:
    """Known simulators first (paper order), then other methods by name, then the references."""
    ms = list(dict.fromkeys(methods))
    known = [m for m in METHOD_ORDER if m in ms]
    refs = [m for m in REFERENCE_METHODS if m in ms]
    other = sorted(m for m in ms if m not in known and m not in refs)
    return known + other + refs


class Palette:
    """Method -> colour, stable for one report: known methods fixed, others in name order."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.colors = dict(METHOD_COLORS)
        extra = sorted(m for m in set(methods) if m not in self.colors)
        for k, m in enumerate(extra):
            self.colors[m] = EXTRA_COLORS[k % len(EXTRA_COLORS)]

    def __call__(self, method: str) -> str:
        if method not in self.colors:
            self.colors[method] = EXTRA_COLORS[len(self.colors) % len(EXTRA_COLORS)]
        return self.colors[method]


def fmt(x: float | None) -> str:
    """A compact human number with about 3 significant digits (``–`` for missing)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    x = float(x)
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e5 or a < 1e-3:
        return f"{x:.2e}"
    if a >= 1e3:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    decimals = 3 if a >= 0.1 else 2 - math.floor(math.log10(a))
    return f"{x:.{decimals}f}"


def fmt_seconds(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min"


def slug(*parts: str) -> str:
    """A file-name-safe slug of ``parts`` (letters, digits, '-' and '_' only)."""
    s = "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p).strip("_") or "x" for p in parts)
    return s[:80]


def mpl_text(s: str) -> str:
    """Text safe to give matplotlib (no mathtext interpretation of '$')."""
    return str(s).replace("$", r"\$")
