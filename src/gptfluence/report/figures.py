"""The report's matplotlib figures, drawn with the Agg canvas (no pyplot state, no windows).

Each function writes one PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from gptfluence.report.style import (HARMFUL_COLOR, HELPFUL_COLOR, TRUE_COLOR, Palette, is_reference,
                                     method_label, metric_label, metric_unit, mpl_text, order_methods,
                                     squared_unit)

DPI = 110
RC = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "text.usetex": False,
}


def _figure(w: float, h: float, layout: str | None = None) -> Any:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(w, h), dpi=DPI, layout=layout)
        FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(RC):
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.12)
    return path


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def _line_style(method: str) -> dict[str, Any]:
    if is_reference(method):
        return {"linestyle": (0, (4, 2)), "linewidth": 1.4, "alpha": 0.9}
    return {"linestyle": "-", "linewidth": 1.7, "alpha": 0.95}


# ---------------------------------------------------------------------------------------------
# (a) true vs simulated trajectories


def choose_examples(true: np.ndarray, n: int = 3) -> list[tuple[int, str]]:
    """Columns of ``true [S, M]`` with the largest rise, the median change and the largest drop
    (change = last recorded value - first recorded value). Returns ``(column, description)``."""
    S, M = true.shape
    change = np.full(M, np.nan)
    for m in range(M):
        col = true[:, m]
        ok = np.flatnonzero(np.isfinite(col))
        if ok.size >= 1:
            change[m] = col[ok[-1]] - col[ok[0]]
    valid = np.flatnonzero(np.isfinite(change))
    if valid.size == 0:
        return [(m, "") for m in range(min(n, M))]
    order = valid[np.argsort(change[valid], kind="stable")]
    picks = [(int(order[-1]), "largest rise"), (int(order[len(order) // 2]), "median change"),
             (int(order[0]), "largest drop")]
    out, seen = [], set()
    for col, what in picks:
        if col not in seen:
            seen.add(col)
            out.append((col, what))
    return out[:n]


def trajectories_figure(path: Path, task: str, metric: str, run_id: str,
                        trajs: Sequence[dict[str, Any]], palette: Palette, n_examples: int = 3
                        ) -> tuple[Path, list[int]] | None:
    """True (thick black) vs simulated trajectories of a few test examples on one held-out run,
    one line per method. ``trajs`` are the evaluation's trajectory records of this run.
    Returns the PNG path and the test ids shown."""
    if not trajs:
        return None
    base = trajs[0]
    chosen = choose_examples(base["true"], n_examples)
    if not chosen:
        return None
    by_method = {t["method"]: t for t in trajs}
    methods = order_methods(by_method)
    with _rc():
        fig = _figure(max(4.1 * len(chosen), 7.0), 3.7, layout="constrained")
        axes = fig.subplots(1, len(chosen), squeeze=False)[0]
        shown = []
        for ax, (col, what) in zip(axes, chosen):
            tid = int(base["test_ids"][col])
            shown.append(tid)
            y = base["true"][:, col]
            ok = np.isfinite(y)
            for m in methods:
                t = by_method[m]
                where = np.flatnonzero(t["test_ids"] == tid)
                if where.size == 0:
                    continue
                p = t["predicted"][:, where[0]]
                okp = np.isfinite(p)
                ax.plot(t["steps"][okp], p[okp], color=palette(m), label=mpl_text(method_label(m)),
                        zorder=3, **_line_style(m))
            ax.plot(base["steps"][ok], y[ok], color=TRUE_COLOR, linewidth=3.0, label="true", zorder=2,
                    solid_capstyle="round")
            ax.set_title(mpl_text(f"test #{tid} · {what}" if what else f"test #{tid}"))
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.margins(x=0.01)
        axes[0].set_ylabel(mpl_text(metric_label(metric)))
        handles, labels = axes[0].get_legend_handles_labels()
        # true first in the legend
        if labels and labels[-1] == "true":
            handles = handles[-1:] + handles[:-1]
            labels = labels[-1:] + labels[:-1]
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7), frameon=False)
        fig.suptitle(mpl_text(f"{task}: {metric_label(metric)}, true vs simulated, held-out run {run_id}"),
                     fontsize=12)
        return _save(fig, path), shown


# ---------------------------------------------------------------------------------------------
# (c) error growth along the steps


def error_growth_figure(path: Path, task: str, metric: str, records: Sequence[dict[str, Any]],
                        palette: Palette) -> Path | None:
    """MSE of the rollout at each step (mean over held-out trajectories) per method."""
    recs = [r for r in records if r["mse_by_step"].size and np.any(np.isfinite(r["mse_by_step"]))]
    if not recs:
        return None
    by_method = {r["method"]: r for r in recs}
    vals = np.concatenate([r["mse_by_step"][np.isfinite(r["mse_by_step"])] for r in recs])
    pos = vals[vals > 0]
    log = pos.size == vals.size and pos.size > 0 and pos.max() / pos.min() > 30
    with _rc():
        fig = _figure(6.4, 3.7)
        ax = fig.subplots()
        for m in order_methods(by_method):
            r = by_method[m]
            y = r["mse_by_step"]
            ok = np.isfinite(y) & ((y > 0) if log else True)
            ax.plot(r["steps"][ok], y[ok], color=palette(m), label=mpl_text(method_label(m)), **_line_style(m))
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        unit = squared_unit(metric)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(mpl_text(f"MSE ({unit})" if unit else "MSE"))
        ax.set_title(mpl_text(f"{task}: error growth of the {metric} rollout"
                              + (" (log scale)" if log else "")))
        ax.legend(frameon=False, loc="best")
        ax.margins(x=0.01)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# (d) influence bars


def influence_figure(path: Path, test_id: str, metric: str, helpful: Sequence[dict[str, Any]],
                     harmful: Sequence[dict[str, Any]]) -> Path:
    """Horizontal bars: most helpful training examples (green, top) and most harmful (red, bottom)."""
    rows = [(f"#{e['train_id']}", e["score"], HELPFUL_COLOR) for e in helpful]
    rows += [(f"#{e['train_id']}", e["score"], HARMFUL_COLOR) for e in harmful]
    rows = [r for r in rows if np.isfinite(r[1])]
    n = max(len(rows), 1)
    with _rc():
        fig = _figure(4.6, 0.9 + 0.30 * n)
        ax = fig.subplots()
        if not rows:
            ax.text(0.5, 0.5, "no training example with a nonzero score", ha="center", va="center",
                    transform=ax.transAxes, color="#666666")
            ax.set_yticks([])
            ax.set_xticks([])
            ax.spines["left"].set_visible(False)
        else:
            y = np.arange(len(rows))[::-1]
            scores = np.array([r[1] for r in rows])
            ax.barh(y, scores, color=[r[2] for r in rows], height=0.7, zorder=3)
            ax.set_yticks(y, [mpl_text(r[0]) for r in rows])
            ax.axvline(0, color="#333333", linewidth=0.8, zorder=4)
            ax.grid(axis="y", visible=False)
            lim = float(np.max(np.abs(scores))) or 1.0
            ax.set_xlim(-lim * 1.15, lim * 1.15)
            ax.set_ylim(-0.6, len(rows) - 0.4)
        unit = metric_unit(metric)
        ax.set_xlabel(mpl_text(f"influence on final {metric}" + (f" ({unit})" if unit else "")
                               + ", > 0 = helpful"))
        ax.set_title(mpl_text(f"test #{test_id}: top helpful / harmful"), fontsize=10)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# (e) mislabelled-data detection


def mislabel_figure(path: Path, experiment: dict[str, Any], palette: Palette) -> Path | None:
    methods = experiment["methods"]
    if not methods and experiment.get("random") is None:
        return None
    with _rc():
        fig = _figure(5.4, 4.2)
        ax = fig.subplots()
        for m in order_methods(methods):
            c = methods[m]
            ax.plot(c["fraction_inspected"], c["fraction_found"], color=palette(m),
                    label=mpl_text(method_label(m)), marker="o", markersize=3, **_line_style(m))
        if experiment.get("random") is not None:
            c = experiment["random"]
            ax.plot(c["fraction_inspected"], c["fraction_found"], color="#999999", linestyle=":",
                    linewidth=1.6, label="random order")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        task = experiment.get("task") or ""
        ax.set_title(mpl_text(f"mislabelled-data detection{': ' + task if task else ''}"))
        ax.legend(frameon=False, loc="lower right")
        fig.tight_layout()
        return _save(fig, path)


def selection_figure(path: Path, selection: dict[str, Any], palette: Palette) -> Path | None:
    """Data selection: per choice (simulator, gradient baselines, random subsets) the actual final
    test loss after really fine-tuning on the chosen subset, one dot per (subset, seed) and a bar at
    the mean; one panel per target set (``target_set`` of the records, e.g. "all", "random20").
    Records without an ``actual_loss`` and determinism checks (``check-*``) are left out."""
    recs = [r for r in selection.get("records") or [] if isinstance(r, dict) and r.get("choice")
            and not str(r["choice"]).startswith("check")
            and isinstance(r.get("actual_loss"), (int, float)) and np.isfinite(r["actual_loss"])]
    if not recs:
        return None

    def family(c: str) -> str:
        return "random" if str(c).startswith("random") else str(c)

    sets = list(dict.fromkeys(str(r.get("target_set") or "") for r in recs))
    with _rc():
        fig = _figure(4.6 * len(sets) + 0.4, 4.0)
        axes = fig.subplots(1, len(sets), squeeze=False)[0]
        for ax, ts in zip(axes, sets):
            sub = [r for r in recs if str(r.get("target_set") or "") == ts]
            choices = list(dict.fromkeys(family(r["choice"]) for r in sub))
            for i, c in enumerate(choices):
                ys = np.asarray([r["actual_loss"] for r in sub if family(r["choice"]) == c], dtype=float)
                color = "#999999" if c == "random" else palette(c.split("-")[0])
                jitter = np.linspace(-0.15, 0.15, ys.size) if ys.size > 1 else np.zeros(1)
                ax.scatter(i + jitter, ys, s=14, color=color, alpha=0.7, zorder=3)
                ax.hlines(ys.mean(), i - 0.3, i + 0.3, color=color, linewidth=2.5, zorder=4)
            ax.set_xticks(range(len(choices)))
            ax.set_xticklabels([mpl_text(c) if c != "random" else "random subsets" for c in choices],
                               rotation=25, ha="right")
            ax.set_ylabel("target loss after fine-tuning (nats)")
            ax.set_title(mpl_text(f"targets: {ts}" if ts else "targets"))
        budget = selection.get("budget")
        fig.suptitle(mpl_text("data selection, actual result of each choice"
                              + (f" (budget {budget})" if budget else "")), fontsize=11)
        fig.tight_layout()
        return _save(fig, path)
