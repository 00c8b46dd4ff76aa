"""One self-contained HTML page (inline CSS, no scripts, no external resources) + PNG figures.

Every piece of text that comes from data (example texts, task, method and run names, config) is
escaped with `html.escape` (quotes too, so it is also safe inside attributes).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Sequence


from gptfluence.errors import InputError
from gptfluence.report import data as rdata
from gptfluence.report import figures as rfig
from gptfluence.report.style import (HARMFUL_COLOR, HELPFUL_COLOR, Palette, fmt, fmt_seconds, is_reference,
                                     method_label, metric_label, order_methods, slug, squared_unit)

REPORT_DIR = "report"
WRITTEN_LIST = ".gptfluence-report-files.json"  # what the last report wrote, the only files a rewrite removes
MAX_INFLUENCE_EXAMPLES = 12   # test examples shown per influence report
MAX_TEXT = 240                # characters of an example text shown in a table cell

CSS = """
:root { --fg:#1d2127; --muted:#5f6b7a; --line:#dde2e8; --bg:#ffffff; --soft:#f5f7fa; --accent:#1f77b4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 64px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 18px; padding-bottom: 10px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 22px; margin: 40px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 18px; margin: 28px 0 8px; }
h4 { font-size: 15px; margin: 18px 0 6px; }
p, li { max-width: 980px; }
.muted { color: var(--muted); }
.small { font-size: 13px; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px; }
nav ul { margin: 4px 0; padding-left: 20px; columns: 2; }
nav a, a { color: var(--accent); text-decoration: none; }
nav a:hover, a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; border-bottom: 2px solid #c8d0da; white-space: nowrap; }
td.name, th.name { text-align: left; white-space: nowrap; }
td.text { text-align: left; max-width: 340px; white-space: pre-wrap; word-break: break-word; font-size: 13px; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.ref td { color: var(--muted); font-style: italic; background: #f3f3f3; }
td.best { font-weight: 700; color: #000; }
tr.ref td.best { color: #333; }
.badge { display: inline-block; font-size: 11px; font-style: normal; padding: 0 6px; margin-left: 6px;
  border-radius: 9px; background: #e4e7eb; color: #555; vertical-align: 1px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.pm { color: var(--muted); font-size: 12px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 980px; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row > figure { flex: 0 0 auto; margin: 0; }
.row > .tables { flex: 1 1 420px; min-width: 360px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px 6px; margin: 14px 0; }
.card h4 { margin-top: 4px; }
.ex { background: var(--soft); border-radius: 4px; padding: 6px 10px; font-size: 13px;
  white-space: pre-wrap; word-break: break-word; margin: 4px 0 8px; }
.ex b { color: var(--muted); font-weight: 600; }
.helpful th { border-bottom-color: """ + HELPFUL_COLOR + """; }
.harmful th { border-bottom-color: """ + HARMFUL_COLOR + """; }
td.pos { color: """ + HELPFUL_COLOR + """; font-weight: 600; }
td.neg { color: """ + HARMFUL_COLOR + """; font-weight: 600; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--muted); }
pre { background: var(--soft); padding: 10px; border-radius: 4px; overflow-x: auto; font-size: 12px; }
.note { border-left: 4px solid var(--accent); background: #f3f8fc; padding: 8px 12px; margin: 10px 0; }
footer { margin-top: 48px; border-top: 1px solid var(--line); padding-top: 10px; }
"""

# accuracy-table columns: (field, header, better, tooltip)
COLUMNS = (
    ("mse", "MSE", "lower", "mean squared error of the rollout over steps 2..T, mean ± std over held-out trajectories"),
    ("mae", "MAE", "lower", "mean absolute error of the rollout over steps 2..T, mean ± std over held-out trajectories"),
    ("spearman_final", "Spearman (final step)", "higher",
     "per held-out run: Spearman correlation across test examples of true vs simulated final values; mean ± std over runs"),
    ("curriculum_spearman", "Spearman (across curricula)", "higher",
     "per test example: Spearman correlation across held-out runs of true vs simulated final values; mean ± std"),
)


def e(s: Any) -> str:
    """Escape for HTML text and attribute values."""
    return escape(str(s), quote=True)


def _clip(s: str, n: int = MAX_TEXT) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _finite(x: float) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x)


def _img(src: str, alt: str, title: str | None = None) -> str:
    t = f' title="{e(title)}"' if title else ""
    return f'<img src="{e(src)}" alt="{e(alt)}"{t} loading="lazy">'


class _Files:
    """Unique PNG names inside the report folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.used: set[str] = set()
        self.paths: list[Path] = []

    def __call__(self, *parts: str) -> Path:
        base = slug(*parts)
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}-{k}", k + 1
        self.used.add(name)
        self.paths.append(self.root / f"{name}.png")
        return self.paths[-1]


# ---------------------------------------------------------------------------------------------
# sections


def _accuracy_table(records: Sequence[dict[str, Any]], metric: str, palette: Palette) -> str:
    by_method = {r["method"]: r for r in records}
    methods = order_methods(by_method)
    best: dict[str, str | None] = {}
    for field, _, better, _ in COLUMNS:
        vals = [(by_method[m][f"{field}_mean"], m) for m in methods if _finite(by_method[m][f"{field}_mean"])]
        if not vals:
            best[field] = None
            continue
        best[field] = (min(vals) if better == "lower" else max(vals))[1]
    unit = squared_unit(metric)
    head = ['<th class="name">method</th>']
    for field, header, better, tip in COLUMNS:
        u = f" ({unit})" if field == "mse" and unit else ""
        arrow = "↓" if better == "lower" else "↑"
        head.append(f'<th title="{e(tip)}">{e(header + u)} {arrow}</th>')
    head += ['<th title="held-out runs">runs</th>', '<th title="test examples">test ex.</th>',
             '<th title="wall-clock time to fit the simulator">fit time</th>']
    rows = []
    for m in methods:
        r = by_method[m]
        ref = is_reference(m)
        cls = ' class="ref"' if ref else ""
        name = (f'<span class="swatch" style="background:{e(palette(m))}"></span>{e(method_label(m, plain=True))}'
                + ('<span class="badge">reference</span>' if ref else ""))
        cells = [f'<td class="name">{name}</td>']
        for field, _, _, _ in COLUMNS:
            mean, std = r[f"{field}_mean"], r[f"{field}_std"]
            txt = e(fmt(mean)) + (f' <span class="pm">± {e(fmt(std))}</span>' if _finite(std) else "")
            b = ' class="best"' if best[field] == m else ""
            cells.append(f"<td{b}>{txt}</td>")
        for field in ("n_runs", "n_test_examples"):
            v = r[field]
            cells.append(f"<td>{int(v) if _finite(v) else '–'}</td>")
        cells.append(f"<td>{e(fmt_seconds(r['fit_seconds']))}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _choose_run(trajs: Sequence[dict[str, Any]]) -> str | None:
    """The held-out run covered by the most methods (first seen wins ties)."""
    count: dict[str, set[str]] = {}
    for t in trajs:
        count.setdefault(t["run_id"], set()).add(t["method"])
    if not count:
        return None
    return max(count, key=lambda r: len(count[r]))


def _task_metric_section(task: str, metric: str, records: list[dict[str, Any]], trajs: list[dict[str, Any]],
                         palette: Palette, files: _Files, anchor: str) -> str:
    parts = [f'<h3 id="{e(anchor)}">{e(task)} · {e(metric_label(metric))}</h3>']
    if records:
        parts.append(_accuracy_table(records, metric, palette))
        parts.append('<p class="small muted">Bold = best in the column (↓ lower is better, ↑ higher is better), '
                     'references included. Grey italic rows are trivial references (a simulator must beat '
                     'them to be useful). Values are mean ± std.</p>')
    run = _choose_run(trajs)
    if run is not None:
        of_run = [t for t in trajs if t["run_id"] == run]
        got = rfig.trajectories_figure(files(task, metric, "trajectories"), task, metric, run, of_run, palette)
        if got is not None:
            path, shown = got
            alt = f"{task} {metric}: true vs simulated trajectories of test examples {', '.join(map(str, shown))} on run {run}"
            parts.append(f"<figure>{_img(path.name, alt)}<figcaption>True (thick black) and simulated "
                         f"{e(metric_label(metric))} of the test examples with the largest rise, the median "
                         f"change and the largest drop of the true value, on held-out run "
                         f"<code>{e(run)}</code>. Each simulator is rolled out from the true value at the "
                         f"first recorded step; dashed lines are references.</figcaption></figure>")
    path = rfig.error_growth_figure(files(task, metric, "error-growth"), task, metric, records, palette)
    if path is not None:
        alt = f"{task} {metric}: MSE of the rollout per step and method"
        parts.append(f"<figure>{_img(path.name, alt)}<figcaption>How the rollout error grows with the "
                     f"number of simulated steps: MSE at each step, mean over held-out trajectories."
                     f"</figcaption></figure>")
    return "\n".join(parts)


def _split_summary(split: dict[str, Any]) -> str:
    if not split:
        return ""
    items = []
    for k in ("fit", "val", "test"):
        if k in split:
            v = split[k]
            ids = v if isinstance(v, list) else [v]
            shown = ", ".join(str(x) for x in ids[:12]) + (" …" if len(ids) > 12 else "")
            items.append(f"<li><b>{e(k)}</b>: {len(ids)} run(s) <span class='muted small'>{e(shown)}</span></li>")
    for k, v in split.items():
        if k not in ("fit", "val", "test"):
            items.append(f"<li><b>{e(k)}</b>: {e(json.dumps(v, ensure_ascii=False)[:300])}</li>")
    return "<h4>Runs</h4><ul>" + "".join(items) + "</ul>"


def _entries_table(entries: Sequence[dict[str, Any]], kind: str) -> str:
    if not entries:
        return f'<p class="small muted">no {kind} training example (no score {">" if kind == "helpful" else "<"} 0)</p>'
    rows = []
    for k, en in enumerate(entries, 1):
        s = en["score"]
        cls = "pos" if _finite(s) and s > 0 else "neg" if _finite(s) and s < 0 else ""
        rows.append(
            f'<tr><td>{k}</td><td>#{e(en["train_id"])}</td><td class="{cls}">{e(fmt(s))}</td>'
            f'<td class="text" title="{e(_clip(en["prompt"], 2000))}">{e(_clip(en["prompt"]))}</td>'
            f'<td class="text" title="{e(_clip(en["target"], 2000))}">{e(_clip(en["target"]))}</td></tr>')
    return (f'<table class="{kind}"><thead><tr><th>#</th><th>train id</th><th>score</th>'
            f'<th class="name">prompt</th><th class="name">target</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _influence_section(reports: Sequence[dict[str, Any]], files: _Files) -> str:
    parts = ['<h2 id="influence">Training-data influence</h2>',
             '<p class="note">Leave-one-out counterfactuals computed with the simulator: each training '
             'example is removed from the curriculum and the run is simulated again. '
             '<b>Positive score = helpful</b> (training on the example improves the test metric: for loss, '
             'removing it raises the simulated final loss; for BLEU / ROUGE-L / accuracy, removing it lowers '
             'the simulated final value). Scores are in the metric\'s unit. A score is relative to the '
             'simulator\'s baseline: for a detrended simulator (the default) every step keeps the fit runs\' '
             'mean change, so helpful means <i>more helpful than an average training example at that step</i>, '
             'not better than not training.</p>']
    for i, rep in enumerate(reports):
        title = " · ".join(x for x in (rep["task"], method_label(rep["method"]), metric_label(rep["metric"])) if x)
        parts.append(f'<h3 id="influence-{i}">{e(title)}</h3>')
        parts.append(f'<p class="small muted">{e(rep["kind"])}; sign: {e(rep["sign"])}</p>')
        items = rep["test_examples"]
        if not items:
            parts.append('<p class="muted">no test examples in this report</p>')
        for te in items[:MAX_INFLUENCE_EXAMPLES]:
            png = rfig.influence_figure(files("influence", rep["task"], rep["method"], rep["metric"], te["test_id"]),
                                        te["test_id"], rep["metric"], te["helpful"], te["harmful"])
            alt = (f"influence of training examples on test example #{te['test_id']} "
                   f"({_clip(te['prompt'], 80)})")
            img = _img(png.name, alt, title="test #" + te["test_id"])
            parts.append(
                '<div class="card">'
                f'<h4>test example #{e(te["test_id"])} '
                f'<span class="muted small">simulated final {e(rep["metric"])}: {e(fmt(te["final_simulated"]))}</span></h4>'
                f'<div class="ex"><b>prompt</b> {e(_clip(te["prompt"], 600))}\n<b>target</b> {e(_clip(te["target"], 300))}</div>'
                '<div class="row">'
                f'<figure>{img}</figure>'
                '<div class="tables">'
                f'<h4 style="color:{HELPFUL_COLOR}">most helpful</h4>{_entries_table(te["helpful"], "helpful")}'
                f'<h4 style="color:{HARMFUL_COLOR}">most harmful</h4>{_entries_table(te["harmful"], "harmful")}'
                '</div></div></div>')
        if len(items) > MAX_INFLUENCE_EXAMPLES:
            parts.append(f'<p class="muted small">{len(items) - MAX_INFLUENCE_EXAMPLES} more test examples '
                         f'are in influence.json.</p>')
    return "\n".join(parts)


def _mislabel_section(experiments: Sequence[dict[str, Any]], palette: Palette, files: _Files) -> str:
    parts = ['<h2 id="mislabel">Mislabelled-data detection</h2>',
             '<p>Training examples are ranked by each method\'s self-influence; the curve shows the fraction '
             'of deliberately flipped labels found after inspecting a given fraction of the training data '
             '(higher and further left is better; the dotted line is a random inspection order).</p>']
    for exp in experiments:
        png = rfig.mislabel_figure(files("mislabel", exp["task"] or "task"), exp, palette)
        if png is not None:
            parts.append(f"<figure>{_img(png.name, 'mislabelled-data detection curves ' + exp['task'])}"
                         f"<figcaption>{e(exp['task'])}</figcaption></figure>")
    return "\n".join(parts)


def _num(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and _finite(float(x)) else "n/a"


def _selection_section(sel: dict[str, Any], palette: Palette, files: _Files) -> str:
    parts = ['<h2 id="selection">Data selection</h2>',
             '<p>Each choice of training subset (the simulator\'s, the gradient baselines\', random subsets of '
             'the same size) really fine-tuned from the base model; dots: subsets and seeds, bars: means.</p>']
    png = rfig.selection_figure(files("selection", "result"), sel, palette)
    if png is not None:
        parts.append(f"<figure>{_img(png.name, 'data selection result')}</figure>")
    return "\n".join(parts)


def _unseen_section(unseen: dict[str, Any], palette: Palette, files: _Files) -> str:
    from gptfluence.analysis.unseen import CASES

    recs = unseen.get("records") or [r for t in unseen.get("tasks") or [] for r in t.get("results") or []]
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in recs:
        rows.setdefault((str(r.get("task")), str(r.get("metric")), str(r.get("method"))), {})[str(r.get("case"))] = r

    def cell(r: Any) -> str:
        if not r:
            return "<td></td>"
        if r.get("status") == "not_applicable":
            return '<td class="muted">n/a (no parameters)</td>'
        if r.get("status") != "ok":
            return '<td class="muted">skipped</td>'
        return f"<td>{_num(r.get('mse_mean'), '.4g')} ({_num(r.get('spearman_final_mean'), '.2f')})</td>"

    head = "".join(f"<th>{e(c)}</th>" for c in CASES)
    body = "".join(f"<tr><td>{e(t)}</td><td>{e(metric_label(m))}</td><td>{e(method_label(me))}</td>"
                   + "".join(cell(by.get(c)) for c in CASES) + "</tr>" for (t, m, me), by in rows.items())
    return ('<h2 id="unseen">Unseen data</h2><p>Trajectory MSE (final-step Spearman across test examples) on '
            'held-out runs, per case: unseen_train = the run holds training examples no fit run used; '
            'unseen_test = test examples hidden from fitting; both.</p>'
            f"<table><tr><th>task</th><th>metric</th><th>method</th>{head}</tr>{body}</table>")


def _peer_section(peer: dict[str, Any], palette: Palette, files: _Files) -> str:
    recs = [r for r in peer.get("records") or [] if isinstance(r, dict)]
    rows = []
    for r in recs:
        lds = r.get("lds") or {}
        lds_txt = ", ".join(f"{e(v)} {_num((x or {}).get('lds_mean'))}" for v, x in lds.items()) \
            if isinstance(lds, dict) else e(str(lds))
        rows.append(f"<tr><td>{e(r.get('library'))}</td><td>{e(r.get('method'))}</td><td>{e(r.get('version'))}</td>"
                    f"<td>{lds_txt}</td><td>{_num(r.get('auc', (r.get('mislabeled') or {}).get('auc')))}</td></tr>")
    ours = peer.get("ours") or {}
    mine = [f"{e(method_label(x.get('method')))} ({e(x.get('variation'))}) {_num(x.get('lds_mean'))}"
            for x in ours.get("lds") or []]
    return ('<h2 id="peer">Peer attribution libraries</h2><p>Maintained libraries run through their own APIs on '
            'the same model and data; LDS on the same held-out curricula (linear datamodel: a curriculum\'s '
            'prediction is the sum of its examples\' scores) and AUC of mislabelled-data detection.</p>'
            "<table><tr><th>library</th><th>method</th><th>version</th><th>LDS (loss)</th><th>AUC</th></tr>"
            + "".join(rows) + "</table>"
            + (f"<p class=\"small\">Ours on the same curricula: {'; '.join(mine)}</p>" if mine else ""))


# ---------------------------------------------------------------------------------------------
# the page


def write_report(out_dir: str | Path, evaluation: dict[str, Any] | None = None,
                 influence: dict[str, Any] | list[Any] | None = None,
                 mislabel: dict[str, Any] | list[Any] | None = None) -> Path:
    """Write ``out_dir/report/index.html`` and its PNG figures; returns the path of index.html.

    ``evaluation`` (the dict of ``evaluation.json``) is read from ``out_dir/evaluation.json`` when
    not given; ``influence`` ({"reports": [...]}) and ``mislabel`` likewise from
    ``influence.json`` / ``mislabel.json`` when present. A missing or malformed evaluation raises
    `InputError` naming the file and the field. The report folder is rewritten from scratch.
    """
    out_dir = Path(out_dir)
    apps = rdata.load_applications(out_dir)
    if evaluation is None and apps is not None and not (out_dir / rdata.EVALUATION_FILE).exists():
        ev = {"config": {}, "split": {}, "results": [], "trajectories": []}  # an applications-only report
    else:
        ev = (rdata.load_evaluation(out_dir) if evaluation is None
              else rdata.check_evaluation(evaluation, "evaluation"))
    inf = (rdata.load_influence(out_dir) if influence is None
           else rdata.check_influence(influence, "influence"))
    mis = (rdata.load_mislabel(out_dir) if mislabel is None
           else rdata.check_mislabel(mislabel, "mislabel"))
    if apps is not None and apps.get("mislabel"):
        mis = list(mis or []) + apps["mislabel"]

    root = out_dir / REPORT_DIR
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: exists and is not a folder; the report is written there")
    listing = root / WRITTEN_LIST
    if listing.exists():  # stale figures of an earlier report: exactly the files it wrote
        try:
            earlier = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = []
        for name in earlier if isinstance(earlier, list) else []:
            if isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", ".."):
                (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    files = _Files(root)

    methods = [r["method"] for r in ev["results"]] + [t["method"] for t in ev["trajectories"]]
    for exp in mis or []:
        methods += list(exp["methods"])
    palette = Palette(methods)

    # task -> metric -> records / trajectories, in first-seen order
    groups: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for r in ev["results"]:
        groups.setdefault(r["task"], {}).setdefault(r["metric"], {"rec": [], "traj": []})["rec"].append(r)
    for t in ev["trajectories"]:
        groups.setdefault(t["task"], {}).setdefault(t["metric"], {"rec": [], "traj": []})["traj"].append(t)

    body: list[str] = []
    nav: list[str] = []
    for ti, (task, metrics) in enumerate(groups.items()):
        body.append(f'<h2 id="task-{ti}">Simulation accuracy: {e(task)}</h2>')
        for mi, (metric, g) in enumerate(metrics.items()):
            anchor = f"task-{ti}-{mi}"
            nav.append(f'<li><a href="#{anchor}">{e(task)} · {e(metric_label(metric))}</a></li>')
            body.append(_task_metric_section(task, metric, g["rec"], g["traj"], palette, files, anchor))
    if not groups and apps is None:
        body.append('<p class="muted">evaluation.json holds no results.</p>')
    if inf:
        nav.append('<li><a href="#influence">Training-data influence</a></li>')
        body.append(_influence_section(inf, files))
    if mis:
        nav.append('<li><a href="#mislabel">Mislabelled-data detection</a></li>')
        body.append(_mislabel_section(mis, palette, files))
    if apps is not None:
        for key, title, fn in (("selection", "Data selection", _selection_section),
                               ("unseen", "Unseen data", _unseen_section),
                               ("peer", "Peer attribution libraries", _peer_section)):
            if apps.get(key):
                nav.append(f'<li><a href="#{key}">{title}</a></li>')
                body.append(fn(apps[key], palette, files))

    cfg = ev["config"]
    n_tasks = len(groups)
    n_methods = len({r["method"] for r in ev["results"]})
    summary = (f"{n_tasks} task(s), {n_methods} method(s), "
               f"{len(ev['results'])} result row(s)")
    config_html = ""
    if cfg:
        config_html = ("<details><summary>evaluation configuration</summary><pre>"
                       + e(json.dumps(cfg, indent=2, ensure_ascii=False, default=str)) + "</pre></details>")
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    html = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>GPTfluence report: {e(out_dir.resolve().name)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>GPTfluence report</h1>
<div class="muted">{e(out_dir.resolve().name)} · {e(summary)} · generated {e(when)}</div>
</header>
<p>How well each simulator predicts the fine-tuning dynamics of test examples on held-out training
runs (curricula never seen in fitting), rolled out from the true value at the first recorded step.
Units: loss in nats, BLEU 0-100, ROUGE-L F 0-1; MSE in the squared unit.</p>
{_split_summary(ev["split"])}
{config_html}
<nav><b>Contents</b><ul>{''.join(nav)}</ul></nav>
{chr(10).join(body)}
<footer class="small muted">Made by <code>gptfluence report</code>. Sign convention for influence:
positive = helpful. References (<i>constant</i>, <i>mean curve</i>) are trivial simulators that
use no model of the training data. <i>GPTfluence (gptfluence variant)</i> is this library's improved
configuration of the method (separate linear projections of centred MiniLM features, gradient-similarity
terms at fine-tuning checkpoints, fitted on deviations from the mean trajectory); <i>(authors' config)</i>
rows are the published code's exact configuration (methods <code>gptfluence_paper</code>,
<code>simfluence_paper</code>).</footer>
</main>
</body>
</html>
"""
    index = root / "index.html"
    tmp = root / ".index.html.tmp"
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(index)
    written = sorted(p.name for p in files.paths if p.exists()) + ["index.html"]
    (root / WRITTEN_LIST).write_text(json.dumps(written) + "\n", encoding="utf-8")
    return index
