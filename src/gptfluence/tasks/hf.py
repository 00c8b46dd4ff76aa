"""Hugging Face ``datasets`` adapters for the paper's five data sets, with FLAN-style prompts.

Names (`HF_TASKS`) and what they read:

=================  =================================  =====================================================
name               hub data set (path, config)        columns (local files use the same names)
=================  =================================  =====================================================
glue/sst2          nyu-mll/glue, sst2                 sentence, label (0 negative / 1 positive), idx
glue/rte           nyu-mll/glue, rte                  sentence1, sentence2, label (0 entailment / 1 not)
super_glue/boolq   aps/super_glue, boolq              question, passage, label (bool, or 0 false / 1 true)
web_nlg            webnlg-challenge/web_nlg,          modified_triple_sets.mtriple_set, lex.text (nested,
                   release_v3.0_en                    as on the hub), or the simplified local schema:
                                                      triples (list of "s | p | o" strings), text (str or
                                                      list of str; the first is the reference)
wmt16/de-en        wmt/wmt16, de-en                   translation: {"de": ..., "en": ...} (or flat de, en)
=================  =================================  =====================================================

Targets: ``" positive"``/``" negative"`` (sst2), ``" yes"``/``" no"`` (rte: yes = entailment;
boolq: yes = true), else ``" " + reference text``. Rows without a label (GLUE test splits, label
-1) or without a reference text are skipped. Underscores in WebNLG triples become spaces.

With ``data_dir`` nothing is downloaded: the split ``S`` is read from ``data_dir/S.jsonl`` (or
``.json``, ``.csv``, ``.parquet``, or hub-style shards ``S-*.parquet``). In CSV files nested fields
(``translation``, ``triples``, ...) are JSON text. For web_nlg the split ``validation`` falls back to
``dev`` (the hub's name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gptfluence.errors import InputError
from gptfluence.tasks.common import check_fraction, check_sizes, flip_task_labels, make_rng, subsample
from gptfluence.tasks.io import find_split_files, read_rows
from gptfluence.types import CLASSIFICATION, GENERATION, Example, Task


class _Bad(Exception):
    """A row problem: (field, message) to be reported with the file and line."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field = field
        self.msg = msg


_MISSING = object()


def _get(row: dict[str, Any], key: str) -> Any:
    v = row.get(key, _MISSING)
    if v is _MISSING:
        raise _Bad(key, f"missing field {key!r}")
    return v


def _text(row: dict[str, Any], key: str) -> str:
    v = _get(row, key)
    if not isinstance(v, str):
        raise _Bad(key, f"field {key!r} must be a string, got {v!r}")
    return " ".join(v.split())


def _int_label(row: dict[str, Any], key: str = "label", names: dict[str, int] | None = None) -> int:
    v = _get(row, key)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if names and s in names:
            return names[s]
        if s in ("true", "false"):
            return int(s == "true")
        try:
            return int(s)
        except ValueError:
            raise _Bad(key, f"field {key!r}: cannot read label {v!r}") from None
    if isinstance(v, int):
        return v
    raise _Bad(key, f"field {key!r}: cannot read label {v!r}")


def _sst2(row: dict[str, Any]) -> tuple[str, str] | None:
    sentence = _text(row, "sentence")
    lab = _int_label(row, names={"negative": 0, "positive": 1})
    if lab == -1:
        return None
    if lab not in (0, 1):
        raise _Bad("label", f"field 'label' must be 0 (negative) or 1 (positive), got {lab}")
    prompt = f"Review:\n{sentence}\nIs this movie review sentence negative or positive?\nAnswer:"
    return prompt, " positive" if lab == 1 else " negative"


def _rte(row: dict[str, Any]) -> tuple[str, str] | None:
    premise, hyp = _text(row, "sentence1"), _text(row, "sentence2")
    lab = _int_label(row, names={"entailment": 0, "not_entailment": 1})
    if lab == -1:
        return None
    if lab not in (0, 1):
        raise _Bad("label", f"field 'label' must be 0 (entailment) or 1 (not_entailment), got {lab}")
    prompt = f"{premise}\n\nBased on the paragraph above can we conclude that \"{hyp}\"?\nAnswer:"
    return prompt, " yes" if lab == 0 else " no"


def _boolq(row: dict[str, Any]) -> tuple[str, str] | None:
    question, passage = _text(row, "question"), _text(row, "passage")
    lab = _int_label(row)
    if lab == -1:
        return None
    if lab not in (0, 1):
        raise _Bad("label", f"field 'label' must be true/false or 1/0, got {lab}")
    question = question.rstrip("?")
    prompt = f"{passage}\n\nCan we conclude that {question}?\nAnswer:"
    return prompt, " yes" if lab == 1 else " no"


def _str_list(v: Any, key: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)
    raise _Bad(key, f"field {key!r} must be a string or a list of strings, got {v!r}")


def _web_nlg(row: dict[str, Any]) -> tuple[str, str] | None:
    if "triples" in row or "modified_triple_sets" not in row:
        triples = _str_list(_get(row, "triples"), "triples")
        texts = _str_list(_get(row, "text"), "text")
    else:
        mts = row["modified_triple_sets"]
        if not isinstance(mts, dict) or "mtriple_set" not in mts:
            raise _Bad("modified_triple_sets", "field 'modified_triple_sets' must be an object with 'mtriple_set'")
        sets = mts["mtriple_set"]
        if not isinstance(sets, (list, tuple)) or not sets:
            raise _Bad("modified_triple_sets", "field 'modified_triple_sets.mtriple_set' must be a non-empty list")
        triples = _str_list(sets[0], "modified_triple_sets.mtriple_set")
        lex = _get(row, "lex")
        if not isinstance(lex, dict) or "text" not in lex:
            raise _Bad("lex", "field 'lex' must be an object with 'text'")
        texts = _str_list(lex["text"], "lex.text")
    texts = [" ".join(t.split()) for t in texts if t and t.strip()]
    if not texts:
        return None
    if not triples:
        raise _Bad("triples", "no triples")
    for t in triples:
        if t.count("|") != 2:
            raise _Bad("triples", f"triple {t!r} is not 'subject | predicate | object'")
    clean = [" | ".join(" ".join(p.replace("_", " ").split()) for p in t.split("|")) for t in triples]
    prompt = f"Generate a sentence about this data: {' ; '.join(clean)}\nSentence:"
    return prompt, " " + texts[0]


def _wmt16_de_en(row: dict[str, Any]) -> tuple[str, str] | None:
    if "translation" in row or not ("de" in row and "en" in row):
        tr = _get(row, "translation")
        if not isinstance(tr, dict):
            raise _Bad("translation", f"field 'translation' must be an object with 'de' and 'en', got {tr!r}")
        for lang in ("de", "en"):
            if lang not in tr:
                raise _Bad("translation", f"field 'translation' has no {lang!r}")
        de, en = tr["de"], tr["en"]
    else:
        de, en = row["de"], row["en"]
    if not isinstance(de, str) or not isinstance(en, str):
        raise _Bad("translation", "field 'translation': 'de' and 'en' must be strings")
    de, en = " ".join(de.split()), " ".join(en.split())
    if not de or not en:
        return None
    return f"Translate to English:\n\n{de}\nEnglish:", " " + en


@dataclass(frozen=True)
class HFSpec:
    """How one data set is fetched and turned into examples."""

    hub_path: str
    hub_config: str | None
    kind: str
    labels: tuple[str, ...]
    columns: tuple[str, ...]          # the columns a row needs (for the error message)
    convert: Callable[[dict[str, Any]], tuple[str, str] | None]
    split_aliases: tuple[tuple[str, str], ...] = ()


HF_SPECS: dict[str, HFSpec] = {
    "glue/sst2": HFSpec("nyu-mll/glue", "sst2", CLASSIFICATION, ("positive", "negative"),
                        ("sentence", "label"), _sst2),
    "glue/rte": HFSpec("nyu-mll/glue", "rte", CLASSIFICATION, ("yes", "no"),
                       ("sentence1", "sentence2", "label"), _rte),
    "super_glue/boolq": HFSpec("aps/super_glue", "boolq", CLASSIFICATION, ("yes", "no"),
                               ("question", "passage", "label"), _boolq),
    "web_nlg": HFSpec("webnlg-challenge/web_nlg", "release_v3.0_en", GENERATION, (),
                      ("triples", "text"), _web_nlg, (("validation", "dev"),)),
    "wmt16/de-en": HFSpec("wmt/wmt16", "de-en", GENERATION, (), ("translation",), _wmt16_de_en),
}
HF_TASKS = tuple(HF_SPECS)

def _split_names(spec: HFSpec, split: str) -> list[str]:
    return [split] + [b for a, b in spec.split_aliases if a == split]


def _local_rows(name: str, spec: HFSpec, data_dir: str | Path, split: str
                ) -> tuple[list[tuple[str, int, str, dict[str, Any]]], list[str]]:
    """(file, position, position word, row) of every row of ``split``; and the files read."""
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError(f"{name}: data_dir {d} is not a folder")
    files: list[Path] = []
    for s in _split_names(spec, split):
        files = find_split_files(d, s)
        if files:
            break
    if not files:
        tried = ", ".join(f"{s}.jsonl/.json/.csv/.parquet" for s in _split_names(spec, split))
        raise InputError(f"{name}: no file for split {split!r} in {d} (looked for {tried})")
    out = []
    for f in files:
        rows, pos = read_rows(f, json_cells=True)
        if rows:
            _check_columns(name, spec, str(f), rows[0][1])
        out += [(str(f), n, pos, r) for n, r in rows]
    return out, [str(f) for f in files]


def _check_columns(name: str, spec: HFSpec, source: str, row: dict[str, Any]) -> None:
    if name == "web_nlg" and "modified_triple_sets" in row and "triples" not in row:
        need: tuple[str, ...] = ("modified_triple_sets", "lex")
    elif name == "wmt16/de-en" and "translation" not in row and "de" in row and "en" in row:
        need = ("de", "en")
    else:
        need = spec.columns
    missing = [c for c in need if c not in row]
    if missing:
        raise InputError(f"{source}: missing column {missing[0]!r} ({name} needs {', '.join(need)}; "
                         f"found {', '.join(sorted(row)) or 'none'})")


def _hub_rows(name: str, spec: HFSpec, split: str) -> tuple[list[tuple[str, int, str, dict[str, Any]]], list[str]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise InputError(f"{name}: the 'datasets' package is needed to load from the hub ({e})") from None
    err: Exception | None = None
    for s in _split_names(spec, split):
        try:
            ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=s)
            break
        except Exception as e:  # noqa: BLE001 - network, missing split, offline mode ...
            err = e
    else:
        raise InputError(f"{name}: could not load {spec.hub_path} ({spec.hub_config}) split {split!r} from the "
                         f"Hugging Face hub: {err}. Give local files in the dataset's schema with --data-dir (data_dir=) instead") from None
    source = f"{spec.hub_path}/{spec.hub_config}:{s}"
    rows = [(source, i, "row", r) for i, r in enumerate(ds, 1)]
    if rows:
        _check_columns(name, spec, source, rows[0][3])
    return rows, [source]


def _convert(name: str, spec: HFSpec, rows: list[tuple[str, int, str, dict[str, Any]]], max_chars: int | None
             ) -> tuple[list[tuple[str, str, dict[str, Any]]], dict[str, int]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    seen: set[str] = set()
    stats = {"rows": len(rows), "unlabelled": 0, "duplicates": 0, "too_long": 0}
    for source, pos, word, row in rows:
        try:
            conv = spec.convert(row)
        except _Bad as b:
            raise InputError(f"{source} {word} {pos}: {b.msg}") from None
        if conv is None:
            stats["unlabelled"] += 1
            continue
        prompt, target = conv
        if max_chars is not None and len(prompt) + len(target) > max_chars:
            stats["too_long"] += 1
            continue
        if prompt in seen:
            stats["duplicates"] += 1
            continue
        seen.add(prompt)
        meta: dict[str, Any] = {"task": name, "source": source, word: pos}
        if "idx" in row:
            meta["idx"] = row["idx"]
        out.append((prompt, target, meta))
    return out, stats


def hf_task(name: str, n_train: int = 200, n_test: int = 100, seed: int = 0, data_dir: str | Path | None = None,
            split_train: str = "train", split_test: str = "validation", flip_fraction: float = 0.0,
            max_chars: int | None = None) -> Task:
    """A task from one of `HF_TASKS`: ``n_train`` / ``n_test`` examples sampled with ``seed``.

    Reads ``data_dir`` when given (no network), else calls ``datasets.load_dataset``. Examples
    keep their source order; ids are 0..N-1. Test examples whose prompt occurs anywhere in the
    train split are dropped before sampling. ``max_chars`` drops examples whose prompt + target
    is longer (characters). ``flip_fraction`` flips training labels (classification only).
    """
    if name not in HF_SPECS:
        raise InputError(f"unknown Hugging Face task {name!r}; known: {', '.join(HF_TASKS)}")
    check_sizes(name, n_train, n_test)
    spec = HF_SPECS[name]
    flip_fraction = check_fraction(name, flip_fraction)
    if flip_fraction > 0 and spec.kind != CLASSIFICATION:
        raise InputError(f"task {name!r} is a generation task: flip_fraction applies only to classification "
                         f"tasks (got flip_fraction={flip_fraction})")
    load = (lambda s: _local_rows(name, spec, data_dir, s)) if data_dir is not None else (
        lambda s: _hub_rows(name, spec, s))
    tr_rows, tr_files = load(split_train)
    te_rows, te_files = load(split_test)
    tr, tr_stats = _convert(name, spec, tr_rows, max_chars)
    te, te_stats = _convert(name, spec, te_rows, max_chars)
    train_prompts = {p for p, _, _ in tr}
    te = [x for x in te if x[0] not in train_prompts]
    for what, items, n, files in (("train", tr, n_train, tr_files), ("test", te, n_test, te_files)):
        if len(items) < n:
            raise InputError(f"{name}: {', '.join(files)} has {len(items)} usable distinct examples for the "
                             f"{what} split; asked for n_{what}={n}")
    tr = subsample(tr, n_train, make_rng("gptfluence-hf", name, seed, "train"))
    te = subsample(te, n_test, make_rng("gptfluence-hf", name, seed, "test"))
    train = [Example(i, p, t, m) for i, (p, t, m) in enumerate(tr)]
    test = [Example(i, p, t, m) for i, (p, t, m) in enumerate(te)]
    task = Task(name, train, test, kind=spec.kind, labels=spec.labels, metadata={
        "generator": f"gptfluence.tasks.hf/{name}", "seed": seed, "n_train": n_train, "n_test": n_test,
        "source": "local" if data_dir is not None else "hub",
        "hub": [spec.hub_path, spec.hub_config], "train_files": tr_files, "test_files": te_files,
        "split_train": split_train, "split_test": split_test, "max_chars": max_chars,
        "train_stats": tr_stats, "test_stats": te_stats,
    })
    return flip_task_labels(task, flip_fraction, seed)
