"""Lexical features: word TF-IDF vectors of example texts (prompt + target).

A second view of "which training examples resemble this test example", beside the sentence
encoder: the MiniLM cosine blurs the shared tokens (a relation, a value, a name) that decide
how training on one generation example moves another's loss, while TF-IDF weights exactly those
rare shared words. Used by the `tfidf_sum` reference of `gptfluence lds` and by GPTfluence's
``lexical`` similarity term.

>>> tf = TfidfFeatures.for_task(task)                 # fitted on the task's training and test texts
>>> X = tf.encode([e.text for e in task.train])     # float32 [N, V], rows L2-normalised (or zero)

Definition (scikit-learn's ``TfidfVectorizer``, fixed options): lower-cased word tokens of two or
more word characters (``(?u)\\b\\w\\w+\\b``); term frequency 1 + log(count) (``sublinear_tf``);
idf = 1 + log((1 + n) / (1 + df)) over the ``n`` texts it was fitted on (``smooth_idf``); the
``max_features`` most frequent words; each row divided by its Euclidean norm. Words not in the
vocabulary are ignored, so a text with none of them is a zero row (cosine 0 with everything).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from gptfluence.errors import ArtifactMismatchError, InputError

TOKEN_PATTERN = r"(?u)\b\w\w+\b"


def _vectorizer(vocabulary: Sequence[str] | None = None, max_features: int | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, sublinear_tf=True, smooth_idf=True,
                           norm="l2", max_features=max_features, vocabulary=vocabulary, dtype=np.float32)


class TfidfFeatures:
    """Word TF-IDF vectors with a fixed vocabulary and idf (see the module doc)."""

    kind = "tfidf"

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray) -> None:
        vocabulary = [str(w) for w in vocabulary]
        idf = np.asarray(idf, dtype=np.float64).reshape(-1)
        if len(vocabulary) != idf.size:
            raise ArtifactMismatchError(f"tfidf features: {len(vocabulary)} words but {idf.size} idf values")
        if len(set(vocabulary)) != len(vocabulary):
            raise ArtifactMismatchError("tfidf features: the vocabulary repeats a word")
        self.vocabulary = vocabulary
        self.idf = idf
        self._vec: Any = None

    @classmethod
    def fit(cls, texts: Sequence[str], max_features: int = 8192) -> "TfidfFeatures":
        """Vocabulary (the ``max_features`` most frequent words) and idf from ``texts``."""
        texts = [str(t) for t in texts]
        if max_features < 1:
            raise InputError(f"tfidf features: max_features must be >= 1, got {max_features}")
        if not texts:
            raise InputError("tfidf features: no texts to fit on")
        vec = _vectorizer(max_features=max_features)
        try:
            vec.fit(texts)
        except ValueError as e:  # e.g. "empty vocabulary": no text has a word of 2+ characters
            raise InputError(f"tfidf features: cannot fit on these {len(texts)} texts ({e})") from None
        vocab = [w for w, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]
        return cls(vocab, vec.idf_)

    @classmethod
    def for_task(cls, task: Any, max_features: int = 8192) -> "TfidfFeatures":
        """Fitted on the texts of ``task``'s training and test examples: the features of the
        `tfidf_sum` LDS reference and of GPTfluence's ``lexical`` term."""
        return cls.fit([e.text for e in task.train] + [e.text for e in task.test], max_features=max_features)

    @property
    def dim(self) -> int:
        return len(self.vocabulary)

    def _fitted_vectorizer(self) -> Any:
        if self._vec is None:
            vec = _vectorizer(vocabulary=self.vocabulary)
            vec.idf_ = self.idf
            self._vec = vec
        return self._vec

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, rows L2-normalised (zero rows for texts without a known word)."""
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._fitted_vectorizer().transform([str(t) for t in texts]).toarray(), dtype=np.float32)

    def spec(self) -> dict[str, Any]:
        """Identifies the features: options, size and a digest of vocabulary + idf."""
        h = hashlib.sha256(json.dumps(self.vocabulary).encode())
        h.update(np.ascontiguousarray(self.idf, dtype=np.float64).tobytes())
        return {"name": self.kind, "token_pattern": TOKEN_PATTERN, "sublinear_tf": True, "dim": self.dim,
                "sha256": h.hexdigest()[:16]}

    def state(self) -> dict[str, Any]:
        """JSON-able state (``TfidfFeatures.from_state`` rebuilds the same features)."""
        return {"vocabulary": list(self.vocabulary), "idf": [float(x) for x in self.idf]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TfidfFeatures":
        try:
            return cls(state["vocabulary"], np.asarray(state["idf"], dtype=np.float64))
        except (KeyError, TypeError) as e:
            raise ArtifactMismatchError(f"tfidf features: bad saved state ({e!r})") from None
