"""Built-in offline tasks shaped like the paper's five, generated deterministically from a seed.

Names (`BUILTIN_TASKS`):

* ``sentiment``   (SST-2-like)  ``"Review: the plot was gripping.\\nSentiment:"`` + ``" positive"``
* ``entailment``  (RTE-like)    ``"Premise: ...\\nHypothesis: ...\\nEntailment:"`` + ``" yes"``/``" no"``
* ``yesno``       (BoolQ-like)  ``"Passage: ...\\nQuestion: ...?\\nAnswer:"`` + ``" yes"``/``" no"``
* ``data2text``   (WebNLG-like) ``"Triples: Anna Berg | birthPlace | Oslo\\nText:"`` + ``" Anna Berg was born in Oslo."``
* ``translation`` (WMT-like)    ``"Veltish: ...\\nEnglish:"`` + ``" the old dog saw the cat."``
* ``mix``         (FLAN-like)   all five, each prompt preceded by an instruction line.

All tasks draw from one small shared world (first names, surnames, jobs, cities, hobbies, animals,
film words, the invented language *Veltish*), so examples share words, entities, relations and
templates: some training examples help some test examples much more than others. Texts are short
(prompt + target <= ~25 words, <= 48 tokens of a 1024-token byte-level BPE).

Conventions: ids are 0..N-1 within each split; no prompt (hence no text) of the test set occurs in
the train pool; classification labels are balanced exactly within each split (up to one for odd
sizes); everything is a pure function of (name, sizes, seed, options) via string-seeded
`random.Random`, so identical on every machine.

`pretraining_corpus` gives plain text in the same vocabulary (never in task format, never equal
to a test text) to train the default GPT's tokenizer and pre-train it.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from gptfluence.errors import InputError
from gptfluence.tasks.common import check_fraction, check_sizes, flip_examples, make_rng
from gptfluence.types import CLASSIFICATION, GENERATION, Example, Task

GENERATOR_VERSION = 2

# One eighth of the prompt space of every member task is reserved for the pre-training corpus:
# task generators never emit a prompt in it and the corpus's task-format lines come only from it,
# so no pre-training text can equal a train or test example of any seed or size.
PRETRAINING_PARTITION = 8


def reserved_for_pretraining(prompt: str) -> bool:
    """True if ``prompt`` (without a mix instruction prefix) lies in the pre-training partition."""
    import hashlib

    return hashlib.sha256(("gptfluence-partition\n" + prompt).encode("utf-8")).digest()[0] % PRETRAINING_PARTITION == 0

BUILTIN_TASKS = ("sentiment", "entailment", "yesno", "data2text", "translation", "mix")
MIX_MEMBERS = ("sentiment", "entailment", "yesno", "data2text", "translation")

# --------------------------------------------------------------------------------------------
# the shared world

FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Ella", "Felix", "Grace", "Hugo", "Iris", "Jack",
               "Karen", "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tara", "Victor")
SURNAMES = ("Bean", "Berg", "Cole", "Dunn", "Ford", "Grant", "Hale", "Kerr", "Lowe", "Marsh",
            "Moss", "Reed")
JOBS = ("teacher", "doctor", "pilot", "farmer", "painter", "lawyer", "nurse", "chef", "singer",
        "writer", "engineer", "astronaut")
CITIES = ("Paris", "Berlin", "Oslo", "Madrid", "Rome", "Lisbon", "Vienna", "Dublin", "Prague",
          "Athens", "Boston", "Denver")
HOBBIES = ("chess", "tennis", "music", "painting", "hiking", "cooking", "dancing", "reading",
           "golf", "swimming")
ANIMALS = ("fox", "owl", "bear", "frog", "whale", "eagle", "rabbit", "wolf", "seal", "camel")
HABITATS = ("forest", "desert", "ocean", "river", "mountains", "jungle", "snow", "grassland")
FOODS = ("fish", "insects", "berries", "grass", "seeds", "mice", "leaves", "fruit")

# sentiment
FILM_PARTS = ("film", "movie", "plot", "story", "acting", "music", "ending", "cast", "script",
              "dialogue", "soundtrack", "direction")
POSITIVE_WORDS = ("great", "wonderful", "moving", "brilliant", "charming", "funny", "beautiful",
                  "clever", "delightful", "superb", "gripping", "touching")
NEGATIVE_WORDS = ("dull", "awful", "boring", "terrible", "weak", "clumsy", "bland", "silly",
                  "tedious", "messy", "poor", "predictable")
INTENSIFIERS = ("", "", "very ", "really ", "truly ", "quite ")

# data2text: relation -> (object vocabulary, English phrasing of the predicate)
UNIVERSITIES = ("Oxford", "Yale", "Harvard", "Cambridge", "Stanford", "Princeton")
NATIONALITIES = ("French", "German", "Spanish", "Italian", "Irish", "Greek", "American", "Czech")
AWARDS = ("Nobel Prize", "Gold Medal", "Turing Award", "Pulitzer Prize", "Oscar")


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


RELATIONS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "occupation": (JOBS, lambda o: f"worked as {_article(o)}"),
    "birthPlace": (CITIES, lambda o: f"was born in {o}"),
    "almaMater": (UNIVERSITIES, lambda o: f"studied at {o}"),
    "hobby": (HOBBIES, lambda o: f"enjoyed {o}"),
    "nationality": (NATIONALITIES, lambda o: f"was {o}"),
    "award": (AWARDS, lambda o: f"won the {o}"),
    "residence": (CITIES, lambda o: f"lived in {o}"),
}

# translation: English words and their invented Veltish counterparts
TR_NOUNS = ("man", "woman", "child", "dog", "cat", "bird", "horse", "farmer", "king", "girl",
            "boy", "teacher", "fish", "fox")
TR_ADJECTIVES = ("old", "young", "big", "small", "red", "black", "happy", "tired", "white", "quiet")
TR_VERBS = ("saw", "found", "followed", "helped", "called", "pushed", "liked", "fed", "watched",
            "heard")
TR_PLACES = ("garden", "house", "forest", "market", "park", "river")
_SYLLABLES = tuple(c + v for c in "kmtlnsrpvz" for v in "aeiou")  # 50 syllables


def _make_lexicon() -> dict[str, str]:
    """English -> Veltish, a fixed invented lexicon (two syllables for nouns/adjectives/places,
    three for verbs), built by a deterministic walk over 50 syllables; all words distinct."""
    words = TR_NOUNS + TR_ADJECTIVES + TR_PLACES + TR_VERBS
    out: dict[str, str] = {}
    n = len(_SYLLABLES)
    for i, w in enumerate(words):
        s = _SYLLABLES[(7 * i + 3) % n] + _SYLLABLES[(11 * i + 17) % n]
        if w in TR_VERBS:
            s += _SYLLABLES[(3 * i + 29) % n]
        out[w] = s
    assert len(set(out.values())) == len(out), "Veltish lexicon is not one-to-one"
    return out


VELTISH = _make_lexicon()
VELTISH_OBJECT = "ko"   # particle after the object
VELTISH_PLACE = "ne"    # particle after a place ("in the X")

INSTRUCTIONS = {
    "sentiment": "Is the review positive or negative?",
    "entailment": "Is the hypothesis true?",
    "yesno": "Answer the question.",
    "data2text": "Describe the triples.",
    "translation": "Translate to English.",
}

LABELS = {"sentiment": ("positive", "negative"), "entailment": ("yes", "no"), "yesno": ("yes", "no")}

Sample = tuple[str, str, dict[str, Any]]  # (prompt, target, meta)
MAX_EXAMPLES = 20000  # per member task, train + test
D2T_MAX_CHARS = 135   # data2text: longest prompt + target, characters
MAX_TRIES = 2000      # draws per example before giving up on finding a new prompt

# --------------------------------------------------------------------------------------------
# one example per task, given the rng (and the label for classification tasks)


def _polar(rng: random.Random, positive: bool) -> str:
    return rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)


def _review(rng: random.Random, positive: bool) -> tuple[str, str]:
    """A one-sentence review whose sentiment is ``positive``; returns (text, template name)."""
    part, part2 = rng.sample(FILM_PARTS, 2)
    t = rng.choices(("plain", "pair", "but", "found", "not"), weights=(4, 2, 2, 2, 1))[0]
    if t == "plain":
        return f"the {part} was {rng.choice(INTENSIFIERS)}{_polar(rng, positive)}.", t
    if t == "pair":
        a, b = rng.sample(POSITIVE_WORDS if positive else NEGATIVE_WORDS, 2)
        return f"a {a} and {b} {part}.", t
    if t == "but":
        return f"the {part} was {_polar(rng, not positive)} but the {part2} was {_polar(rng, positive)}.", t
    if t == "found":
        return f"{rng.choice(FIRST_NAMES)} found the {part} {rng.choice(INTENSIFIERS)}{_polar(rng, positive)}.", t
    return f"the {part} was not {_polar(rng, not positive)}.", t


def _sentiment(rng: random.Random, label: str) -> Sample:
    text, template = _review(rng, label == "positive")
    return f"Review: {text}\nSentiment:", " " + label, {"template": template}


def _person_facts(rng: random.Random) -> dict[str, str]:
    return {"name": rng.choice(FIRST_NAMES), "job": rng.choice(JOBS), "city": rng.choice(CITIES),
            "hobby": rng.choice(HOBBIES)}


_FACT_PHRASE = {
    "job": lambda f: f"{f['name']} is {_article(f['job'])}.",
    "city": lambda f: f"{f['name']} lives in {f['city']}.",
    "hobby": lambda f: f"{f['name']} likes {f['hobby']}.",
}
_FACT_VOCAB = {"job": JOBS, "city": CITIES, "hobby": HOBBIES}


def _entailment(rng: random.Random, label: str) -> Sample:
    f = _person_facts(rng)
    t = rng.choice(("job_city", "job_hobby", "city_hobby"))
    if t == "job_city":
        premise, slots = f"{f['name']} is {_article(f['job'])} who lives in {f['city']}.", ("job", "city")
    elif t == "job_hobby":
        premise, slots = f"{f['name']}, {_article(f['job'])}, likes {f['hobby']}.", ("job", "hobby")
    else:
        premise, slots = f"{f['name']} lives in {f['city']} and likes {f['hobby']}.", ("city", "hobby")
    slot = rng.choice(slots)
    h = dict(f)
    how = "same"
    if label == "no":
        if rng.random() < 0.25:  # the fact holds for someone else
            h["name"] = rng.choice([n for n in FIRST_NAMES if n != f["name"]])
            how = "other_name"
        else:
            h[slot] = rng.choice([v for v in _FACT_VOCAB[slot] if v != f[slot]])
            how = "other_value"
    hyp = _FACT_PHRASE[slot](h)
    return (f"Premise: {premise}\nHypothesis: {hyp}\nEntailment:", " " + label,
            {"template": t, "slot": slot, "how": how})


def _yesno(rng: random.Random, label: str) -> Sample:
    yes = label == "yes"
    if rng.random() < 0.5:  # an animal passage
        animal = rng.choice(ANIMALS)
        habitat, food = rng.choice(HABITATS), rng.choice(FOODS)
        passage = f"the {animal} lives in the {habitat} and eats {food}."
        if rng.random() < 0.5:
            q_hab = habitat if yes else rng.choice([h for h in HABITATS if h != habitat])
            question, t = f"does the {animal} live in the {q_hab}?", "animal_habitat"
        else:
            q_food = food if yes else rng.choice([x for x in FOODS if x != food])
            question, t = f"does the {animal} eat {q_food}?", "animal_food"
    else:  # a person passage, sometimes with a second person as a distractor
        a, b = rng.sample(FIRST_NAMES, 2)
        job, city, job_b = rng.choice(JOBS), rng.choice(CITIES), rng.choice(JOBS)
        passage = f"{a} works as {_article(job)} in {city}."
        two = rng.random() < 0.4
        if two:
            passage += f" {b} is {_article(job_b)}."
        if two and rng.random() < 0.5:
            q_job = job_b if yes else rng.choice([j for j in JOBS if j != job_b])
            question, t = f"is {b} {_article(q_job)}?", "person_second"
        elif rng.random() < 0.5:
            q_city = city if yes else rng.choice([c for c in CITIES if c != city])
            question, t = f"does {a} work in {q_city}?", "person_city"
        else:
            q_job = job if yes else rng.choice([j for j in JOBS if j != job])
            question, t = f"is {a} {_article(q_job)}?", "person_job"
    return f"Passage: {passage}\nQuestion: {question}\nAnswer:", " " + label, {"template": t}


def _triples_and_text(rng: random.Random) -> tuple[list[str], str, list[str]]:
    subject = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    k = rng.choices((1, 2), weights=(2, 3))[0]
    rels = rng.sample(sorted(RELATIONS), k)
    if "birthPlace" in rels and "residence" in rels:
        rels.remove("residence")
    triples, phrases = [], []
    for r in rels:
        vocab, phrase = RELATIONS[r]
        o = rng.choice(vocab)
        triples.append(f"{subject} | {r} | {o}")
        phrases.append(phrase(o))
    text = f"{subject} {phrases[0]}" + (f" and {phrases[1]}" if len(phrases) > 1 else "") + "."
    return triples, text, rels


def _data2text(rng: random.Random, label: str | None = None) -> Sample:
    while True:  # keep prompt + target <= D2T_MAX_CHARS (two long triples are redrawn)
        triples, text, rels = _triples_and_text(rng)
        prompt, target = f"Triples: {' ; '.join(triples)}\nText:", " " + text
        if len(prompt) + len(target) <= D2T_MAX_CHARS:
            return prompt, target, {"relations": rels}


def _english_sentence(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    """A random English clause as (role, word) pairs, and its template name."""
    n1, n2 = rng.sample(TR_NOUNS, 2)
    a1 = rng.choice(TR_ADJECTIVES) if rng.random() < 0.5 else None
    a2 = rng.choice(TR_ADJECTIVES) if rng.random() < 0.5 else None
    place = rng.choice(TR_PLACES) if rng.random() < 0.4 and not (a1 and a2) else None  # <= 11 words
    parts: list[tuple[str, str]] = [("subj", n1), ("subj_adj", a1 or ""), ("verb", rng.choice(TR_VERBS)), ("obj", n2),
             ("obj_adj", a2 or ""), ("place", place or "")]
    return parts, ("place" if place else "plain")


def _render_english(parts: list[tuple[str, str]]) -> str:
    d = dict(parts)
    s = "the " + (d["subj_adj"] + " " if d["subj_adj"] else "") + d["subj"]
    s += " " + d["verb"] + " the " + (d["obj_adj"] + " " if d["obj_adj"] else "") + d["obj"]
    if d["place"]:
        s += " in the " + d["place"]
    return s + "."


def _render_veltish(parts: list[tuple[str, str]]) -> str:
    """Word order rule: [place ne] subject [adjective] object [adjective] ko verb."""
    d = dict(parts)
    v = VELTISH
    words: list[str] = []
    if d["place"]:
        words += [v[d["place"]], VELTISH_PLACE]
    words.append(v[d["subj"]])
    if d["subj_adj"]:
        words.append(v[d["subj_adj"]])
    words.append(v[d["obj"]])
    if d["obj_adj"]:
        words.append(v[d["obj_adj"]])
    words += [VELTISH_OBJECT, v[d["verb"]]]
    return " ".join(words) + "."


def _translation(rng: random.Random, label: str | None = None) -> Sample:
    parts, t = _english_sentence(rng)
    return f"Veltish: {_render_veltish(parts)}\nEnglish:", " " + _render_english(parts), {"template": t}


_GENERATORS: dict[str, Callable[[random.Random, Any], Sample]] = {
    "sentiment": _sentiment,
    "entailment": _entailment,
    "yesno": _yesno,
    "data2text": _data2text,
    "translation": _translation,
}

# --------------------------------------------------------------------------------------------
# building tasks


def _balanced_labels(labels: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    out = [labels[i % len(labels)] for i in range(n)]
    rng.shuffle(out)
    return out


def _generate(name: str, n_train: int, n_test: int, seed: int, prefix: str = ""
              ) -> tuple[list[Example], list[Example]]:
    """Unique examples of member task ``name``: train then test, prompts never repeated."""
    gen = _GENERATORS[name]
    rng = make_rng("gptfluence-builtin", GENERATOR_VERSION, name, seed)
    labels = LABELS.get(name)
    total = n_train + n_test
    if total > MAX_EXAMPLES:
        raise InputError(f"built-in task {name!r} makes at most {MAX_EXAMPLES} distinct examples; "
                         f"asked for n_train + n_test = {n_train} + {n_test} = {total}")
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for split, n in (("train", n_train), ("test", n_test)):
        wanted = _balanced_labels(labels, n, rng) if labels else [None] * n
        out: list[Example] = []
        for label in wanted:
            for _ in range(MAX_TRIES):
                prompt, target, meta = gen(rng, label)
                if reserved_for_pretraining(prompt):
                    continue
                prompt = prefix + prompt
                if prompt not in seen:
                    break
            else:
                raise InputError(
                    f"built-in task {name!r} cannot make {total} distinct examples "
                    f"(n_train={n_train}, n_test={n_test}, seed {seed}): no new one after "
                    f"{len(seen)}; ask for fewer examples")
            seen.add(prompt)
            meta = {"task": name, "split": split, **meta}
            out.append(Example(len(out), prompt, target, meta))
        splits.append(out)
    return splits[0], splits[1]


def _metadata(name: str, n_train: int, n_test: int, seed: int, flip_fraction: float,
              flipped: list[int], **extra: Any) -> dict[str, Any]:
    return {"generator": f"gptfluence.tasks.builtin/{name}", "generator_version": GENERATOR_VERSION,
            "seed": seed, "n_train": n_train, "n_test": n_test, "flip_fraction": flip_fraction,
            "flipped_ids": flipped, **extra}


def _member_task(name: str, n_train: int, n_test: int, seed: int, flip_fraction: float) -> Task:
    if flip_fraction > 0 and name not in LABELS:
        raise InputError(f"task {name!r} is a generation task: flip_fraction applies only to "
                         f"classification tasks (sentiment, entailment, yesno, or their share of mix); "
                         f"got flip_fraction={flip_fraction}")
    train, test = _generate(name, n_train, n_test, seed)
    flipped: list[int] = []
    if name in LABELS and flip_fraction > 0:
        train, flipped = flip_examples(train, LABELS[name], flip_fraction,
                                       make_rng("gptfluence-flip", name, seed))
    kind = CLASSIFICATION if name in LABELS else GENERATION
    return Task(name, train, test, kind=kind, labels=LABELS.get(name, ()),
                metadata=_metadata(name, n_train, n_test, seed, flip_fraction, flipped))


def _split_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _mix_task(n_train: int, n_test: int, seed: int, flip_fraction: float,
              members: tuple[str, ...] = MIX_MEMBERS) -> Task:
    members = tuple(members)
    bad = [m for m in members if m not in MIX_MEMBERS]
    if not members or bad or len(set(members)) != len(members):
        raise InputError(f"mix: members must be distinct names among {', '.join(MIX_MEMBERS)}; got {members!r}")
    if flip_fraction > 0 and not any(m in LABELS for m in members):
        raise InputError(f"mix of {members!r} has no classification member: flip_fraction must be 0")
    if n_train < len(members) or n_test < len(members):
        raise InputError(f"mix: n_train and n_test must be >= the number of members ({len(members)}), "
                         f"got n_train={n_train}, n_test={n_test}")
    tr_sizes, te_sizes = _split_sizes(n_train, len(members)), _split_sizes(n_test, len(members))
    train: list[Example] = []
    test: list[Example] = []
    flipped: list[int] = []
    for m, ntr, nte in zip(members, tr_sizes, te_sizes):
        mtr, mte = _generate(m, ntr, nte, seed, prefix=INSTRUCTIONS[m] + "\n")
        if m in LABELS and flip_fraction > 0:
            mtr, mflip = flip_examples(mtr, LABELS[m], flip_fraction, make_rng("gptfluence-flip", "mix", m, seed))
            flipped += [len(train) + i for i in mflip]  # member ids are rows: shift into mix ids
        kind = CLASSIFICATION if m in LABELS else GENERATION
        for dst, src in ((train, mtr), (test, mte)):
            base = len(dst)
            for ex in src:
                dst.append(Example(base + ex.id, ex.prompt, ex.target,
                                   {**ex.meta, "source_id": ex.id, "kind": kind}))
    # interleave is not needed: curricula sample and shuffle; member blocks keep ids readable
    return Task("mix", train, test, kind=GENERATION, labels=(),
                metadata=_metadata("mix", n_train, n_test, seed, flip_fraction, sorted(flipped),
                                   members=list(members),
                                   member_sizes={m: {"n_train": a, "n_test": b}
                                                 for m, a, b in zip(members, tr_sizes, te_sizes)},
                                   member_labels={m: list(LABELS[m]) for m in members if m in LABELS}))


def get_task(name: str, n_train: int = 200, n_test: int = 100, seed: int = 0,
             flip_fraction: float = 0.0, **options: Any) -> Task:
    """A built-in task (one of `BUILTIN_TASKS`): ``n_train`` training and ``n_test`` test examples.

    ``flip_fraction`` in [0, 1] flips that fraction of the training labels of a classification
    task (of each classification member for ``mix``), recorded in ``metadata["flipped_ids"]`` and
    ``example.meta["original_target"]``. Options: ``members`` (``mix`` only: which tasks to mix).
    ``mix`` is of kind ``"generation"``; each example's ``meta`` has ``task`` (source task),
    ``source_id`` and ``kind``, and training ids are contiguous blocks per member.
    """
    if name not in BUILTIN_TASKS:
        raise InputError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_TASKS)}")
    check_sizes(name, n_train, n_test)
    flip_fraction = check_fraction(name, flip_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"task {name!r}: seed must be an integer, got {seed!r}")
    allowed = {"members"} if name == "mix" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"task {name!r}: unknown option {unknown[0]!r}"
                         + (f" (known: {', '.join(sorted(allowed))})" if allowed else " (it takes none)"))
    if name == "mix":
        return _mix_task(n_train, n_test, seed, flip_fraction, **options)
    return _member_task(name, n_train, n_test, seed, flip_fraction)


# --------------------------------------------------------------------------------------------
# pre-training corpus

FORMAT_LINES = (
    "Review: a short opinion about a film.",
    "Sentiment: positive or negative.",
    "Premise: a statement about a person.",
    "Hypothesis: another statement.",
    "Entailment: yes or no.",
    "Passage: a few facts.",
    "Question: a question with a yes or no answer?",
    "Answer: yes or no.",
    "Triples: subject | relation | object ; subject | relation | object",
    "Text: one sentence that says what the triples say.",
    "Veltish: a sentence in Veltish.",
    "English: the same sentence in English.",
    *INSTRUCTIONS.values(),
)


GLOSSARY: dict[str, tuple[str, ...]] = {
    "people": FIRST_NAMES, "family names": SURNAMES, "jobs": JOBS, "cities": CITIES,
    "hobbies": HOBBIES, "animals": ANIMALS, "places animals live": HABITATS, "foods": FOODS,
    "parts of a film": FILM_PARTS, "good words": POSITIVE_WORDS, "bad words": NEGATIVE_WORDS,
    "universities": UNIVERSITIES, "nationalities": NATIONALITIES, "awards": AWARDS,
    "relations": tuple(RELATIONS), "nouns": TR_NOUNS, "adjectives": TR_ADJECTIVES,
    "verbs": TR_VERBS, "places": TR_PLACES, "Veltish words": tuple(VELTISH.values()),
}


def _corpus_line(rng: random.Random) -> str:
    """One plain text; about half carry a task field name (``Review:``, ``Triples:``, ...) as a
    prefix so the tokenizer learns those words, but never a whole prompt with its answer."""
    kind = rng.choices(("review", "fact", "animal", "question", "relation", "triple", "lexicon",
                        "english", "veltish", "format", "glossary", "bio"),
                       weights=(16, 10, 7, 7, 12, 8, 6, 9, 9, 16, 14, 10))[0]
    tag = rng.random() < 0.5

    def pre(field: str, text: str) -> str:
        return f"{field}: {text}" if tag else text

    if kind == "review":
        text, _ = _review(rng, rng.random() < 0.5)
        return pre("Review", text) if rng.random() < 0.8 else f"{rng.choice(FIRST_NAMES)} wrote: {text}"
    if kind == "fact":
        f = _person_facts(rng)
        text = rng.choice((
            f"{f['name']} is {_article(f['job'])} who lives in {f['city']}.",
            f"{f['name']}, {_article(f['job'])}, likes {f['hobby']}.",
            f"{f['name']} lives in {f['city']} and likes {f['hobby']}.",
            f"{f['name']} works as {_article(f['job'])} in {f['city']}.",
            f"{f['name']} likes {f['hobby']}. {f['name']} lives in {f['city']}.",
        ))
        return pre(rng.choice(("Premise", "Hypothesis", "Passage")), text)
    if kind == "animal":
        a = rng.choice(ANIMALS)
        return pre("Passage", f"the {a} lives in the {rng.choice(HABITATS)} and eats {rng.choice(FOODS)}.")
    if kind == "question":
        return pre("Question", rng.choice((f"does the {rng.choice(ANIMALS)} eat {rng.choice(FOODS)}?",
                                           f"does the {rng.choice(ANIMALS)} live in the {rng.choice(HABITATS)}?",
                                           f"is {rng.choice(FIRST_NAMES)} {_article(rng.choice(JOBS))}?",
                                           f"does {rng.choice(FIRST_NAMES)} work in {rng.choice(CITIES)}?")))
    if kind == "relation":
        _, text, _ = _triples_and_text(rng)
        return pre("Text", text)
    if kind == "triple":
        triples, _, _ = _triples_and_text(rng)
        return pre("Triples", " ; ".join(triples))
    if kind == "bio":
        who = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        return pre("Text", f"{who} was {rng.choice(NATIONALITIES)}, studied at {rng.choice(UNIVERSITIES)} "
                           f"and won the {rng.choice(AWARDS)}.")
    if kind == "glossary":
        cat = rng.choice(sorted(GLOSSARY))
        words = rng.sample(GLOSSARY[cat], min(3, len(GLOSSARY[cat])))
        return f"{cat}: {', '.join(words[:-1])} and {words[-1]}."
    if kind == "lexicon":
        w = rng.choice(sorted(VELTISH))
        return f"the Veltish word {VELTISH[w]} means {w}."
    parts, _ = _english_sentence(rng)
    if kind == "english":
        return pre("English", _render_english(parts))
    if kind == "veltish":
        return pre("Veltish", _render_veltish(parts))
    return rng.choice(FORMAT_LINES)


def pretraining_corpus(n_texts: int = 4000, seed: int = 12345, task_format_fraction: float = 0.2) -> list[str]:
    """``n_texts`` short plain texts in the built-in tasks' vocabulary, deterministic from ``seed``.

    Reviews without labels, facts about people and animals, questions without answers, sentences
    describing triples, bare triples, Veltish dictionary lines, English and Veltish sentences
    (never paired), and the tasks' format and instruction lines; plus a ``task_format_fraction``
    of labelled examples in the five member tasks' formats, drawn only from the prompt partition
    that task generators never use (`reserved_for_pretraining`), so that the base model knows the
    formats (as a real pre-trained LM roughly would) while no pre-training text equals a training
    or test example of any seed or size. Meant for training the default GPT's tokenizer and for
    its brief pre-training. Texts may span two lines (prompt and target of a task example).
    """
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise InputError(f"pretraining_corpus: n_texts must be a positive integer, got {n_texts!r}")
    rng = make_rng("gptfluence-pretraining", GENERATOR_VERSION, seed)
    out = list(FORMAT_LINES[: min(len(FORMAT_LINES), n_texts)])
    # every lexicon entry once, so each Veltish word is seen
    for w in sorted(VELTISH):
        if len(out) >= n_texts:
            break
        out.append(f"the Veltish word {VELTISH[w]} means {w}.")
    n_format = int(round(n_texts * task_format_fraction))
    formatted: list[str] = []
    names = list(MIX_MEMBERS)
    while len(formatted) < n_format:
        name = names[len(formatted) % len(names)]
        labels = LABELS.get(name)
        for _ in range(MAX_TRIES * PRETRAINING_PARTITION):
            prompt, target, _meta = _GENERATORS[name](rng, rng.choice(labels) if labels else None)
            if reserved_for_pretraining(prompt):
                formatted.append(prompt + target)
                break
        else:  # pragma: no cover - the partition is 1/8 of a large space
            raise InputError(f"pretraining_corpus: could not draw a reserved {name!r} example")
    while len(out) < n_texts - n_format:
        out.append(_corpus_line(rng))
    out += formatted
    rng.shuffle(out)
    return out


def tokenizer_corpus(n_texts: int = 4000, seed: int = 12345) -> list[str]:
    """`pretraining_corpus` plus one line listing every word of the built-in vocabulary, so a
    tokenizer trained on it has seen every word the built-in tasks use."""
    vocab = sorted(set(FIRST_NAMES + SURNAMES + JOBS + CITIES + HOBBIES + ANIMALS + HABITATS + FOODS
                       + FILM_PARTS + POSITIVE_WORDS + NEGATIVE_WORDS + UNIVERSITIES + NATIONALITIES
                       + AWARDS + TR_NOUNS + TR_ADJECTIVES + TR_VERBS + TR_PLACES
                       + tuple(VELTISH.values()) + tuple(RELATIONS)))
    return pretraining_corpus(n_texts, seed) + [" ".join(vocab)]
