"""Tests of gptfluence.tasks: built-in generators, HF adapters on local files, the file reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gptfluence.config import from_dict
from gptfluence.errors import InputError
from gptfluence.tasks import (
    BUILTIN_TASKS,
    HF_TASKS,
    MIX_MEMBERS,
    TaskConfig,
    get_task,
    hf_task,
    load_task,
    pretraining_corpus,
    read_task_file,
    tokenizer_corpus,
)
from gptfluence.types import examples_sha256

DATA = Path(__file__).parent / "data" / "tasks"
CLASSIFICATION_TASKS = ("sentiment", "entailment", "yesno")
GENERATION_TASKS = ("data2text", "translation")


def _sig(task):
    return examples_sha256(task.train), examples_sha256(task.test)


# ------------------------------------------------------------------------------------------
# built-in tasks


def test_builtin_names():
    assert BUILTIN_TASKS == ("sentiment", "entailment", "yesno", "data2text", "translation", "mix")
    with pytest.raises(InputError, match="known: sentiment, entailment"):
        get_task("sst3")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_deterministic_and_seed_dependent(name):
    a, b, c = get_task(name, seed=3), get_task(name, seed=3), get_task(name, seed=4)
    assert _sig(a) == _sig(b)
    assert [e.meta for e in a.train] == [e.meta for e in b.train]
    assert _sig(a) != _sig(c)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_shape(name):
    t = get_task(name, n_train=60, n_test=30, seed=1)
    assert len(t.train) == 60 and len(t.test) == 30
    assert [e.id for e in t.train] == list(range(60)) and [e.id for e in t.test] == list(range(30))
    prompts = [e.prompt for e in t.train + t.test]
    assert len(set(prompts)) == len(prompts)
    assert not {e.text for e in t.train} & {e.text for e in t.test}
    for e in t.train + t.test:
        assert not e.prompt.endswith(" ") and e.target.startswith(" ") and e.target.strip()
        assert len(e.text) <= 175, e.text          # ~48 tokens of a 1024-token byte-level BPE
        assert len(e.text.split()) <= 30
    md = t.metadata
    assert md["generator"].endswith(name) and md["seed"] == 1
    assert (md["n_train"], md["n_test"], md["flip_fraction"], md["flipped_ids"]) == (60, 30, 0.0, [])


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_targets_and_balance(name):
    t = get_task(name, n_train=101, n_test=40)
    assert t.kind == "classification"
    assert t.labels == (("positive", "negative") if name == "sentiment" else ("yes", "no"))
    for split, n in ((t.train, 101), (t.test, 40)):
        counts = Counter(e.target for e in split)
        assert set(counts) == {" " + lab for lab in t.labels}
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == n


@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_generation_targets(name):
    t = get_task(name)
    assert t.kind == "generation" and t.labels == ()
    lens = [len(e.target.split()) for e in t.train + t.test]
    assert 4 <= min(lens) and max(lens) <= 15
    assert len({e.target for e in t.train}) > 150    # free text, not a handful of labels


def test_examples_share_structure():
    """Entities / words recur across examples, so some training examples are much closer to a
    test example than others."""
    t = get_task("data2text")
    subj = Counter(e.prompt.split("|")[0].split(": ")[1].strip() for e in t.train)
    assert subj.most_common(1)[0][1] >= 2
    s = get_task("sentiment")
    words = Counter(w for e in s.train for w in e.prompt.split())
    assert sum(1 for w, c in words.items() if c >= 5) >= 20


def test_sentiment_polarity_consistent():
    from gptfluence.tasks.builtin import NEGATIVE_WORDS, POSITIVE_WORDS

    t = get_task("sentiment", n_train=300)
    for e in t.train:
        text = e.prompt.split("Review: ")[1].split("\n")[0]
        if " but " in text or " not " in text:
            continue
        words = set(text.rstrip(".").split())
        pol = {"positive" for w in words if w in POSITIVE_WORDS} | {"negative" for w in words if w in NEGATIVE_WORDS}
        assert pol == {e.target.strip()}, e.text


def test_translation_lexicon_consistent():
    from gptfluence.tasks.builtin import VELTISH

    back = {v: k for k, v in VELTISH.items()}
    t = get_task("translation", n_train=50, n_test=10)
    for e in t.train:
        src = e.prompt.split("Veltish: ")[1].split("\n")[0].rstrip(".").split()
        content = [back[w] for w in src if w in back]
        assert sorted(content) == sorted(w for w in e.target.rstrip(".").split() if w not in ("the", "in"))


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_flip_fraction(name):
    base = get_task(name, n_train=100, n_test=20, seed=2)
    t = get_task(name, n_train=100, n_test=20, seed=2, flip_fraction=0.1)
    flipped = t.metadata["flipped_ids"]
    assert flipped == sorted(flipped) and len(flipped) == 10 and t.flipped_ids == flipped
    assert t.metadata["flip_fraction"] == 0.1
    for b, e in zip(base.train, t.train):
        assert b.prompt == e.prompt
        if e.id in flipped:
            assert e.target != b.target and e.target.strip() in t.labels
            assert e.meta["original_target"] == b.target
        else:
            assert e.target == b.target and "original_target" not in e.meta
    assert _sig(t)[1] == _sig(base)[1]   # test set untouched
    assert get_task(name, n_train=100, n_test=20, seed=2, flip_fraction=0.1).metadata["flipped_ids"] == flipped


@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_flip_fraction_generation_rejected(name):
    with pytest.raises(InputError, match="classification"):
        get_task(name, flip_fraction=0.1)


def test_bad_arguments():
    with pytest.raises(InputError, match="flip_fraction"):
        get_task("sentiment", flip_fraction=1.5)
    with pytest.raises(InputError, match="n_train"):
        get_task("sentiment", n_train=0)
    with pytest.raises(InputError, match="unknown option 'foo'"):
        get_task("sentiment", foo=1)
    with pytest.raises(InputError, match="at most"):
        get_task("yesno", n_train=10**6)


def test_mix():
    t = get_task("mix", n_train=52, n_test=25, seed=0, flip_fraction=0.2)
    assert t.kind == "generation"
    assert [e.id for e in t.train] == list(range(52)) and [e.id for e in t.test] == list(range(25))
    counts = Counter(e.meta["task"] for e in t.train)
    assert set(counts) == set(MIX_MEMBERS) and max(counts.values()) - min(counts.values()) <= 1
    assert Counter(e.meta["task"] for e in t.test) == {m: 5 for m in MIX_MEMBERS}
    from gptfluence.tasks import INSTRUCTIONS

    for e in t.train + t.test:
        assert e.prompt.startswith(INSTRUCTIONS[e.meta["task"]] + "\n")
        assert e.meta["kind"] == ("classification" if e.meta["task"] in CLASSIFICATION_TASKS else "generation")
    assert not {e.text for e in t.train} & {e.text for e in t.test}
    flipped = t.metadata["flipped_ids"]
    assert flipped and all(t.train[i].meta["task"] in CLASSIFICATION_TASKS for i in flipped)
    assert all(t.train[i].target != t.train[i].meta["original_target"] for i in flipped)
    assert t.metadata["members"] == list(MIX_MEMBERS)
    only = get_task("mix", n_train=10, n_test=4, members=("data2text", "translation"))
    assert {e.meta["task"] for e in only.train} == {"data2text", "translation"}
    with pytest.raises(InputError, match="no classification member"):
        get_task("mix", n_train=10, n_test=4, members=("data2text",), flip_fraction=0.1)


def test_pretraining_corpus_disjoint_from_test_sets():
    corpus = pretraining_corpus()
    assert len(corpus) == 4000 and corpus == pretraining_corpus()
    assert pretraining_corpus(100, seed=1) != pretraining_corpus(100, seed=2)
    assert all(isinstance(c, str) and c for c in corpus)
    formatted = [c for c in corpus if "\n" in c]  # labelled task-format examples (prompt\ntarget)
    assert 700 <= len(formatted) <= 900  # task_format_fraction 0.2
    assert any(c.startswith("Review:") and c.endswith((" positive", " negative")) for c in formatted)
    from gptfluence.tasks.builtin import reserved_for_pretraining
    assert all(reserved_for_pretraining(c[:c.rindex(":") + 1]) for c in formatted)
    texts = set(corpus) | set(pretraining_corpus(4000, seed=0))
    for name in BUILTIN_TASKS:
        for seed in range(10):
            for n_train, n_test in ((200, 100), (100, 50), (24, 10)):
                t = get_task(name, n_train=n_train, n_test=n_test, seed=seed)
                for e in t.train + t.test:
                    assert e.text not in texts and e.prompt not in texts
                    core = e.prompt.split("\n", 1)[1] if name == "mix" else e.prompt
                    assert not reserved_for_pretraining(core)
    vocab_line = tokenizer_corpus(50)[-1]
    assert "astronaut" in vocab_line and "Paris" in vocab_line


# ------------------------------------------------------------------------------------------
# Hugging Face adapters on local files


def test_hf_sst2_local():
    t = hf_task("glue/sst2", n_train=6, n_test=3, seed=0, data_dir=DATA / "sst2")
    assert t.kind == "classification" and t.labels == ("positive", "negative")
    assert len(t.train) == 6 and len(t.test) == 3
    e = t.train[0]
    assert e.prompt.startswith("Review:\n") and e.prompt.endswith("\nAnswer:")
    assert e.target in (" positive", " negative")
    # the validation row that repeats a training sentence is never in the test set
    assert all("lifeless" not in x.prompt for x in t.test)
    assert _sig(t) == _sig(hf_task("glue/sst2", n_train=6, n_test=3, seed=0, data_dir=DATA / "sst2"))
    assert _sig(t) != _sig(hf_task("glue/sst2", n_train=6, n_test=3, seed=1, data_dir=DATA / "sst2"))
    with pytest.raises(InputError, match="usable distinct examples"):
        hf_task("glue/sst2", n_train=6, n_test=4, data_dir=DATA / "sst2")


def test_hf_rte_csv_and_boolq():
    t = hf_task("glue/rte", n_train=6, n_test=3, data_dir=DATA / "rte")
    assert t.labels == ("yes", "no")
    nurse = next(e for e in t.train if "Anna works as a nurse" in e.prompt)
    assert nurse.target == " yes" and "Based on the paragraph above" in nurse.prompt
    assert next(e for e in t.train if "Tom is a farmer" in e.prompt).target == " no"
    b = hf_task("super_glue/boolq", n_train=4, n_test=2, data_dir=DATA / "boolq")
    paris = next(e for e in b.train if "Paris" in e.prompt)
    assert paris.target == " yes" and paris.prompt.endswith("Can we conclude that is paris the capital of france?\nAnswer:")
    assert Counter(e.target for e in b.test) == {" yes": 1, " no": 1}
    f = hf_task("super_glue/boolq", n_train=4, n_test=2, data_dir=DATA / "boolq", flip_fraction=0.5)
    assert len(f.metadata["flipped_ids"]) == 2


def test_hf_web_nlg_nested_and_simple():
    t = hf_task("web_nlg", n_train=3, n_test=2, data_dir=DATA / "web_nlg")   # 'validation' -> dev.jsonl
    assert t.kind == "generation" and t.metadata["test_files"][0].endswith("dev.jsonl")
    assert t.metadata["train_stats"]["unlabelled"] == 1                    # empty lex.text skipped
    e = next(x for x in t.train if "Wheeler" in x.prompt)
    assert "Alan Bean | birthPlace | Wheeler, Texas ; Alan Bean | nationality | United States" in e.prompt
    assert e.target == " Alan Bean, an American, was born in Wheeler, Texas."
    s = hf_task("web_nlg", n_train=3, n_test=1, data_dir=DATA / "web_nlg_simple")
    assert s.test[0].target == " Buzz Aldrin was an astronaut."
    assert s.test[0].prompt == "Generate a sentence about this data: Buzz Aldrin | occupation | astronaut\nSentence:"
    with pytest.raises(InputError, match="generation task"):
        hf_task("web_nlg", n_train=3, n_test=1, data_dir=DATA / "web_nlg_simple", flip_fraction=0.1)


def test_hf_wmt16_jsonl_and_parquet(tmp_path):
    t = hf_task("wmt16/de-en", n_train=4, n_test=2, data_dir=DATA / "wmt16")
    e = next(x for x in t.train if "Hund" in x.prompt)
    assert e.prompt == "Translate to English:\n\nDer Hund schläft.\nEnglish:" and e.target == " The dog is sleeping."
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, src in (("train", "train.jsonl"), ("validation", "validation.jsonl")):
        rows = [json.loads(line) for line in (DATA / "wmt16" / src).read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}-00000-of-00001.parquet")
    p = hf_task("wmt16/de-en", n_train=4, n_test=2, data_dir=tmp_path)
    assert _sig(p) == _sig(t)


def test_hf_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"sentence": "hi", "label": 1}) + "\n")
    with pytest.raises(InputError, match=r"train\.jsonl: missing column 'sentence'"):
        hf_task("glue/sst2", n_train=1, n_test=1, data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"sentence": "ok", "label": 1}) + "\n" + json.dumps({"sentence": "bad"}) + "\n")
    with pytest.raises(InputError, match=r"train\.jsonl line 2: missing field 'label'"):
        hf_task("glue/sst2", n_train=1, n_test=1, data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"sentence": "ok", "label": 7}) + "\n")
    with pytest.raises(InputError, match=r"line 1: field 'label' must be 0"):
        hf_task("glue/sst2", n_train=1, n_test=1, data_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no file for split 'train'"):
        hf_task("glue/rte", n_train=1, n_test=1, data_dir=tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"):
        hf_task("glue/rte", n_train=1, n_test=1, data_dir=tmp_path / "nowhere")
    with pytest.raises(InputError, match="known: glue/sst2"):
        hf_task("glue/cola")
    assert HF_TASKS == ("glue/sst2", "glue/rte", "super_glue/boolq", "web_nlg", "wmt16/de-en")


# ------------------------------------------------------------------------------------------
# generic file reader


def test_read_jsonl_train_test():
    t = read_task_file(DATA / "files" / "train.jsonl", test_path=DATA / "files" / "test.jsonl", id_column="id")
    assert t.name == "train" and t.kind == "classification" and t.labels == ("no", "yes")
    assert [e.id for e in t.train] == list(range(10, 16)) and [e.id for e in t.test] == [0, 1]
    assert t.train[0].text == "Q: is red a color?\nA: yes"
    assert t.metadata["files"][1].endswith("test.jsonl")
    f = read_task_file(DATA / "files" / "train.jsonl", name="colors", test_path=DATA / "files" / "test.jsonl",
                       id_column="id", flip_fraction=0.5, seed=1)
    assert f.name == "colors" and len(f.flipped_ids) == 3 and set(f.flipped_ids) <= set(range(10, 16))
    g = read_task_file(DATA / "files" / "train.jsonl", test_path=DATA / "files" / "test.jsonl", kind="generation")
    assert g.kind == "generation" and [e.id for e in g.train] == list(range(6))
    sub = read_task_file(DATA / "files" / "train.jsonl", test_path=DATA / "files" / "test.jsonl", id_column="id",
                         n_train=3)
    assert len(sub.train) == 3 and all(10 <= e.id < 16 for e in sub.train)


def test_read_csv_split_column():
    t = read_task_file(DATA / "files" / "split.csv")
    assert t.kind == "generation" and len(t.train) == 3 and len(t.test) == 1
    assert t.train[0].prompt == "Translate: chat\nEnglish:" and t.train[0].target == " cat"
    assert t.train[0].meta["line"] == 2
    cfg = from_dict(TaskConfig, {"name": "french", "path": str(DATA / "files" / "split.csv")})
    assert load_task(cfg).name == "french"


def _write(p: Path, rows) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_read_errors_name_file_line_field(tmp_path):
    good = {"prompt": "a:", "target": " b", "split": "train"}
    p = _write(tmp_path / "train.jsonl", [good] * 6 + [{"prompt": "x:", "split": "train"}])
    with pytest.raises(InputError, match=r"train\.jsonl line 7: missing field 'target'"):
        read_task_file(p)
    p = _write(tmp_path / "t.jsonl", [good, {**good, "split": "dev"}])
    with pytest.raises(InputError, match=r"t\.jsonl line 2: field 'split' must be 'train' or 'test'"):
        read_task_file(p)
    p = _write(tmp_path / "ids.jsonl", [{**good, "id": 1}, {**good, "id": 2}, {**good, "id": 1}])
    with pytest.raises(InputError, match=r"ids\.jsonl line 3: duplicate id 1 .*first on line 1"):
        read_task_file(p, id_column="id", test_path=p)
    p = _write(tmp_path / "badid.jsonl", [{**good, "id": "x"}])
    with pytest.raises(InputError, match=r"badid\.jsonl line 1: field 'id' must be an integer"):
        read_task_file(p, id_column="id", test_path=p)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "target": "b"}\n{oops\n')
    with pytest.raises(InputError, match=r"broken\.jsonl line 2: invalid JSON"):
        read_task_file(tmp_path / "broken.jsonl")
    (tmp_path / "c.csv").write_text("prompt,answer,split\nq:,yes,train\n")
    with pytest.raises(InputError, match=r"c\.csv line 2: missing field 'target'"):
        read_task_file(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("prompt,target,split\nq:,yes,train\nq2:,no\n")
    with pytest.raises(InputError, match=r"d\.csv line 3: 2 cells"):
        read_task_file(tmp_path / "d.csv")
    p = _write(tmp_path / "notest.jsonl", [good])
    with pytest.raises(InputError, match="no test examples"):
        read_task_file(p)
    with pytest.raises(InputError, match="file not found"):
        read_task_file(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------
# TaskConfig / load_task


def test_load_task_dispatch():
    t = load_task(TaskConfig(name="yesno", n_train=20, n_test=10, seed=5, flip_fraction=0.1))
    assert _sig(t) == _sig(get_task("yesno", 20, 10, seed=5, flip_fraction=0.1))
    d = load_task(TaskConfig())
    assert d.name == "sentiment" and len(d.train) == 200 and len(d.test) == 100
    h = load_task(TaskConfig(name="glue/rte", n_train=6, n_test=3, data_dir=str(DATA / "rte")))
    assert h.name == "glue/rte"
    with pytest.raises(InputError, match="unknown task 'nope'.*sentiment.*glue/sst2"):
        load_task(TaskConfig(name="nope"))
    cfg = from_dict(TaskConfig, {"name": "mix", "n_train": 10, "n_test": 5})
    assert load_task(cfg).metadata["n_train"] == 10
