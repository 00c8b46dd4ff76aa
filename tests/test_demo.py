"""The demo end to end at the packaged `tiny` scale: the same code path as `make demo`, sized by flags."""

import json
from html.parser import HTMLParser

from gptfluence.cli import main

REQUIRED = {"method", "task", "metric", "mse_mean", "mse_std", "mae_mean", "mae_std", "spearman_final_mean",
            "spearman_final_std", "curriculum_spearman_mean"}


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag == "script":
            self.scripts += 1


def test_demo_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "tiny", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gptfluence" in printed and "mean_curve" in printed and "report:" in printed

    ev = json.loads((out / "evaluation.json").read_text())
    methods = {r["method"] for r in ev["results"]}
    assert methods == {"gptfluence", "simfluence", "constant", "mean_curve"}
    assert {r["task"] for r in ev["results"]} == {"sentiment", "data2text"}
    assert {(r["task"], r["metric"]) for r in ev["results"]} >= {
        ("sentiment", "loss"), ("sentiment", "accuracy"), ("data2text", "loss"), ("data2text", "bleu"), ("data2text", "rougeL")}
    for r in ev["results"]:
        assert REQUIRED <= set(r)
        assert r["mse_mean"] is not None and r["mse_mean"] >= 0
    tr = ev["trajectories"][0]
    assert {"run_id", "test_ids", "steps", "true", "predicted"} <= set(tr)
    assert len(tr["true"]) == len(tr["steps"]) == len(tr["predicted"])
    # the held-out runs never touch fitting
    for task, sp in ev["splits"].items():
        assert not set(sp["test"]) & (set(sp["fit"]) | set(sp["val"]))

    infl = json.loads((out / "influence.json").read_text())
    assert infl["reports"] and infl["reports"][0]["test_examples"]
    assert "helpful" in infl["reports"][0]["sign"]

    index = out / "report" / "index.html"
    parser = _Images()
    parser.feed(index.read_text())
    assert parser.srcs and parser.scripts == 0
    for src in parser.srcs:
        p = index.parent / src
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "demo_config.json").read_text())
    assert cfg["runs"] == 6 and cfg["tasks"] == ["sentiment", "data2text"]

    # the same influence from the command line, on any run; bad ids are clean errors
    sp = ev["splits"]["sentiment"]
    args = ["influence", str(out / "simulators" / "sentiment" / "gptfluence-loss"), "--dynamics",
            str(out / "dynamics" / "sentiment"), "--k", "2"]
    assert main([*args, "--run", sp["test"][0], "--test-ids", "0", "1", "--out", str(tmp_path / "i.json")]) == 0
    rep = json.loads((tmp_path / "i.json").read_text())["reports"][0]
    assert [e["test_id"] for e in rep["test_examples"]] == [0, 1] and rep["run_id"] == sp["test"][0]
    assert all(h["score"] > 0 for e in rep["test_examples"] for h in e["helpful"])
    assert main([*args, "--run", "run-9999", "--out", str(tmp_path / "j.json")]) == 2
    assert "unknown run id 'run-9999'" in capsys.readouterr().err

    # a second run reuses the collected dynamics (and says so) and gives the same table
    assert main(["demo", "--scale", "tiny", "--out", str(out), "--quiet"]) == 0
    again = capsys.readouterr().out
    assert "6 cached" in again and "resuming: 6 of 6 runs" in again
    ev2 = json.loads((out / "evaluation.json").read_text())
    assert [r["mse_mean"] for r in ev2["results"]] == [r["mse_mean"] for r in ev["results"]]


def test_demo_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"runs": "many"}))
    assert main(["demo", "--scale", "tiny", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "c.json, field 'runs': expected an integer" in err and "Traceback" not in err
