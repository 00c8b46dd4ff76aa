"""The report: figures + one self-contained, escaped HTML page; clean errors for bad input."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from gptfluence.cli import main
from gptfluence.errors import GptfluenceError
from gptfluence.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"
AMP = "a & b <b>"


def synthetic_evaluation(seed: int = 0, tasks=("rte", "webnlg"), T: int = 24, M: int = 6) -> dict:
    """An evaluation.json as `gptfluence evaluate` writes it (NaN as null), with plausible numbers."""
    rng = np.random.default_rng(seed)
    methods = ["gptfluence", "simfluence", "constant", "mean_curve", "my_new_method"]
    results, trajs = [], []
    steps = list(range(1, T + 1))
    for task in tasks:
        for metric in (("loss",) if task == "rte" else ("loss", "bleu")):
            scale = 1.0 if metric == "loss" else 30.0
            start = scale * (1.5 + rng.random(M))
            drift = scale * rng.normal(-0.6, 0.5, M)
            true = start[None] + drift[None] * (1 - np.exp(-np.arange(T)[:, None] / 8))
            true += scale * 0.03 * rng.standard_normal((T, M))
            for k, m in enumerate(methods):
                err = (0.02 + 0.05 * k) * scale
                pred = true + err * np.cumsum(rng.standard_normal((T, M)), 0) / np.sqrt(T)
                pred[0] = true[0]
                mse_by_step = np.mean((pred - true) ** 2, axis=1)
                mse_by_step[0] = 0.0
                rec = {
                    "method": m, "task": task, "metric": metric,
                    "mse_mean": float(mse_by_step[1:].mean()), "mse_std": float(mse_by_step[1:].std()),
                    "mae_mean": float(np.abs(pred - true)[1:].mean()), "mae_std": 0.01 * scale,
                    "spearman_final_mean": 0.9 - 0.15 * k, "spearman_final_std": 0.05,
                    "curriculum_spearman_mean": (None if m == "constant" else 0.5 - 0.1 * k),
                    "curriculum_spearman_std": None,
                    "n_runs": 5, "n_test_examples": M, "fit_seconds": 3.2 * (k + 1) if k < 2 else 0.001,
                    "mse_by_step": [None if i == 0 else float(v) for i, v in enumerate(mse_by_step)],
                    "steps": steps,
                }
                results.append(rec)
                tr = true.copy()
                if T > 3 and M > 2:
                    tr[3, 2] = np.nan  # a step that was not recorded
                trajs.append({
                    "method": m, "task": task, "metric": metric, "run_id": "run-0030",
                    "steps": steps, "test_ids": list(range(100, 100 + M)),
                    "true": [[None if not math.isfinite(v) else float(v) for v in row] for row in tr],
                    "predicted": pred.tolist(),
                })
    return {"config": {"seed": 0, "note": EVIL}, "split": {"fit": ["run-0000", "run-0001"], "val": ["run-0025"],
                                                              "test": ["run-0030", "run-0031"]},
            "results": results, "trajectories": trajs}


def synthetic_influence(k: int = 4) -> dict:
    rng = np.random.default_rng(1)
    exs = []
    for t in range(3):
        exs.append({
            "test_id": t, "prompt": f"Premise {t}: {EVIL}", "target": AMP, "final_simulated": 0.42 + t,
            "helpful": [{"train_id": 10 + j, "score": float(0.3 / (j + 1) + rng.random() * 0.01),
                         "prompt": f"train {j} {EVIL}", "target": AMP} for j in range(k)],
            "harmful": ([] if t == 2 else
                        [{"train_id": 50 + j, "score": -float(0.2 / (j + 1)), "prompt": AMP,
                          "target": '" onerror="alert(2)'} for j in range(k)]),
        })
    return {"reports": [{"task": f"rte {EVIL}", "method": "gptfluence", "metric": "loss",
                         "sign": "positive = helpful (removing raises the loss)", "test_examples": exs}]}


def synthetic_mislabel() -> dict:
    x = np.linspace(0, 1, 11)
    return {"task": "sst2", "methods": {"gptfluence": {"fraction_inspected": x.tolist(),
                                                       "fraction_found": np.sqrt(x).tolist()},
                                        "tracin_cp": {"fraction_inspected": x.tolist(),
                                                      "fraction_found": (x ** 0.6).tolist()}},
            "random": {"fraction_inspected": x.tolist(), "fraction_found": x.tolist()}}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.attr_values: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        d = dict(attrs)
        self.attr_values += [v for v in d.values() if v]
        if tag == "img":
            self.imgs.append(d)
        if tag in ("link", "a") and d.get("href"):
            self.links.append(d["href"])

    def handle_data(self, data):
        self.text.append(data)


def _write_inputs(folder: Path, mislabel: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(synthetic_evaluation()), encoding="utf-8")
    (folder / "influence.json").write_text(json.dumps(synthetic_influence()), encoding="utf-8")
    if mislabel:
        (folder / "mislabel.json").write_text(json.dumps(synthetic_mislabel()), encoding="utf-8")


def _check_page(index: Path) -> _Collect:
    html = index.read_text(encoding="utf-8")
    p = _Collect()
    p.feed(html)
    assert "script" not in p.tags, "the page must hold no <script> element"
    assert p.imgs, "the page should show figures"
    for img in p.imgs:
        src = img["src"]
        assert src and "://" not in src and not src.startswith("/"), f"image must be relative: {src}"
        f = index.parent / src
        assert f.is_file(), f"missing image {src}"
        assert f.read_bytes()[:8] == PNG_MAGIC, f"{src} is not a PNG"
        assert img.get("alt"), "every image needs alt text"
    # no external resources
    assert "http://" not in html and "https://" not in html
    assert all(h.startswith("#") for h in p.links)
    # malicious texts only escaped
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert AMP not in html
    assert "a &amp; b &lt;b&gt;" in html
    assert 'onerror="alert(2)' not in html
    # and they round-trip as text / attribute values (what a browser would show)
    assert any(EVIL in t for t in p.text)
    assert any(EVIL in v for v in p.attr_values), "alt/title attributes carry the escaped text"
    return p


def test_write_report_full(tmp_path):
    _write_inputs(tmp_path)
    index = write_report(tmp_path)
    assert index == tmp_path / "report" / "index.html"
    p = _check_page(index)
    html = index.read_text(encoding="utf-8")
    # a trajectory + error-growth figure per task x metric (3), one influence figure per test example
    # (3), one mislabel figure
    assert len(p.imgs) == 3 * 2 + 3 + 1
    for want in ("GPTfluence", "Simfluence", "my_new_method", "reference", "Mislabelled-data detection",
                 "test loss (nats)", "BLEU (0-100)", "most helpful", "most harmful", "positive = helpful"):
        assert want in html, want
    assert '<td class="best">' in html
    # every png in the folder is referenced (no stale files)
    assert {i["src"] for i in p.imgs} == {f.name for f in index.parent.glob("*.png")}


def test_report_without_optional_inputs_and_rerun(tmp_path):
    """A rewrite removes the figures the previous report wrote and nothing else (a user's file in
    the report folder stays)."""
    (tmp_path / "evaluation.json").write_text(json.dumps(synthetic_evaluation(tasks=("rte", "wmt"))), encoding="utf-8")
    mine = tmp_path / "report" / "my-notes.png"
    mine.parent.mkdir()
    mine.write_bytes(PNG_MAGIC)
    first = {f.name for f in write_report(tmp_path).parent.glob("*.png")} - {"my-notes.png"}
    (tmp_path / "evaluation.json").write_text(json.dumps(synthetic_evaluation(tasks=("rte",))), encoding="utf-8")
    index = write_report(tmp_path)
    html = index.read_text(encoding="utf-8")
    assert "Mislabelled-data detection" not in html and 'id="influence"' not in html
    assert mine.exists()
    now = {f.name for f in index.parent.glob("*.png")} - {"my-notes.png"}
    assert now < first  # the wmt figures of the first report are gone
    p = _Collect()
    p.feed(html)
    assert len(p.imgs) == 2 and "script" not in p.tags


def test_report_from_dicts_without_trajectories(tmp_path):
    ev = synthetic_evaluation(tasks=("rte",))
    del ev["trajectories"]
    for r in ev["results"]:
        del r["mse_by_step"], r["steps"]
    index = write_report(tmp_path, evaluation=ev, influence=synthetic_influence()["reports"])
    p = _check_page(index)
    assert len(p.imgs) == 3  # influence figures only


def test_cli_report(tmp_path, capsys):
    _write_inputs(tmp_path, mislabel=False)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "index.html" in out
    _check_page(tmp_path / "report" / "index.html")


def test_cli_missing_evaluation(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.json" in err and "not found" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("results"), "results"),
    (lambda d: d["results"][1].pop("metric"), "results[1].metric"),
    (lambda d: d["results"][0].__setitem__("mse_mean", "big"), "results[0].mse_mean"),
    (lambda d: d["results"][0].__setitem__("steps", [1, 2]), "results[0].steps"),
    (lambda d: d["trajectories"][2]["true"].pop(), "trajectories[2].true"),
    (lambda d: d["trajectories"][0]["predicted"][1].append(0.0), "trajectories[0].predicted[1]"),
])
def test_malformed_evaluation_names_file_and_field(tmp_path, capsys, mutate, field):
    ev = synthetic_evaluation(tasks=("rte",))
    mutate(ev)
    (tmp_path / "evaluation.json").write_text(json.dumps(ev), encoding="utf-8")
    with pytest.raises(GptfluenceError) as info:
        write_report(tmp_path)
    msg = str(info.value)
    assert "evaluation.json" in msg and field in msg, msg
    assert main(["report", str(tmp_path)]) == 2
    assert field in capsys.readouterr().err


def test_invalid_json_and_bad_influence(tmp_path):
    (tmp_path / "evaluation.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GptfluenceError, match="evaluation.json line 1"):
        write_report(tmp_path)
    (tmp_path / "evaluation.json").write_text(json.dumps(synthetic_evaluation(tasks=("rte",))), encoding="utf-8")
    inf = synthetic_influence()
    inf["reports"][0]["test_examples"][1]["helpful"][2]["score"] = "high"
    (tmp_path / "influence.json").write_text(json.dumps(inf), encoding="utf-8")
    with pytest.raises(GptfluenceError, match=r"influence.json.*reports\[0\].test_examples\[1\].helpful\[2\].score"):
        write_report(tmp_path)


def test_nan_tokens_are_accepted(tmp_path):
    ev = synthetic_evaluation(tasks=("rte",))
    ev["results"][0]["mse_std"] = float("nan")
    (tmp_path / "evaluation.json").write_text(json.dumps(ev), encoding="utf-8")  # writes NaN
    assert "NaN" in (tmp_path / "evaluation.json").read_text()
    index = write_report(tmp_path)
    assert index.exists()


def test_applications_only_report(tmp_path):
    """A folder holding only applications.json (benchmarks/applications_builtin.py's output) gets a
    report with the detection curves and the selection result as figures, and the unseen / peer
    tables; Simfluence's missing parameters show as n/a."""
    from gptfluence.analysis.mislabeled import detection_auc, detection_curve

    flipped = np.array([1, 0, 1, 0, 0, 1, 0, 0])
    methods = {}
    for name, s in (("gptfluence", np.arange(8.0)[::-1]), ("tracin_cp", np.arange(8.0)), ("random", np.ones(8))):
        x, y = detection_curve(s, flipped)
        methods[name] = {"auc": detection_auc(s, flipped), "curve": {"fraction_inspected": x.tolist(),
                                                                        "fraction_found": y.tolist()}}
    apps = {
        "mislabeled": {"experiments": [{"task": "sentiment " + EVIL, "methods": methods}]},
        "selection": {"budget": 4, "records": [
            {"choice": "gptfluence", "seed": 0, "actual_loss": 0.5, "actual_accuracy": 0.7},
            {"choice": "random-0", "seed": 0, "actual_loss": 0.6, "actual_accuracy": 0.6},
            {"choice": "random-1", "seed": 1, "actual_loss": 0.7, "actual_accuracy": None}]},
        "unseen": {"records": [
            {"task": "sentiment", "metric": "loss", "method": "gptfluence", "case": "both", "status": "ok",
             "mse_mean": 0.01, "spearman_final_mean": 0.8},
            {"task": "sentiment", "metric": "loss", "method": "simfluence", "case": "both",
             "status": "not_applicable", "mse_mean": None}]},
        "peer": {"records": [{"library": "captum", "method": "tracincp", "version": "0.9.0",
                              "lds": {"both": {"lds_mean": 0.25}}, "auc": 0.6},
                             {"library": EVIL, "method": AMP, "version": "1"}]},
    }
    (tmp_path / "applications.json").write_text(json.dumps(apps), encoding="utf-8")
    index = write_report(tmp_path)
    p = _check_page(index)
    html = index.read_text(encoding="utf-8")
    assert len(p.imgs) == 2  # detection curves + selection
    for want in ("Mislabelled-data detection", "Data selection", "Unseen data", "n/a (no parameters)",
                 "Peer attribution libraries", "captum", "0.250"):
        assert want in html, want
    bad = dict(apps, selection={"records": [{"seed": 0}]})
    (tmp_path / "applications.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(GptfluenceError, match=r"selection.records\[0\]"):
        write_report(tmp_path)
