"""Encoders and the embedding cache (offline, CPU, fast)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib

import numpy as np
import pytest

from gptfluence.errors import GptfluenceError
from gptfluence.features import (CausalLMEncoder, Encoder, HFEncoder, SentenceTransformerEncoder, embed_examples,
                                 embed_texts, embed_texts_with_stats, load_encoder, minilm_path, spec_key)
from gptfluence.types import Example


class FakeEncoder:
    """Deterministic vectors from the text hash; counts every text it encodes."""

    def __init__(self, pooling: str = "mean", max_length: int = 128, dim: int = 8, name: str = "fake") -> None:
        self.name, self.pooling, self.max_length, self.dim = name, pooling, max_length, dim
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for k, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(f"{self.pooling}|{t}".encode()).digest()[:4], "little")
            out[k] = np.random.default_rng(seed).standard_normal(self.dim)
        return out

    def spec(self):
        return {"kind": "fake", "name": self.name, "pooling": self.pooling, "max_length": self.max_length,
                "normalize": False}

    @property
    def n_encoded(self) -> int:
        return sum(len(c) for c in self.calls)


class Spy:
    """Wraps an encoder, counting the texts it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.pooling, self.max_length, self.dim = inner.name, inner.pooling, inner.max_length, inner.dim
        self.n_encoded = 0

    def encode(self, texts, batch_size=64):
        self.n_encoded += len(texts)
        return self.inner.encode(texts, batch_size)

    def spec(self):
        return self.inner.spec()


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


def test_minilm_offline_unit_vectors(minilm, tmp_path):
    assert isinstance(minilm, Encoder) and isinstance(minilm, SentenceTransformerEncoder)
    assert minilm.dim == 384 and minilm.pooling == "mean" and minilm.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.spec() == {"kind": "sentence-transformers", "name": "sentence-transformers/all-MiniLM-L6-v2",
                             "pooling": "mean", "max_length": 128, "normalize": True}
    texts = ["The film was wonderful and moving.", "The movie was great and touching.",
             "Quarterly tax filings are due in April."]
    spy = Spy(minilm)
    e = embed_texts(spy, texts, cache_dir=tmp_path)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    # cached: the encoder does not run again, and the vectors are identical
    e2, st = embed_texts_with_stats(spy, texts[::-1], cache_dir=tmp_path)
    assert spy.n_encoded == 3 and st.n_encoded == 0 and st.n_cached == 3
    assert np.array_equal(e2, e[::-1])


def test_cache_only_encodes_missing_texts_in_order(tmp_path):
    enc = FakeEncoder()
    a = embed_texts(enc, ["a", "b", "c"], cache_dir=tmp_path)
    assert enc.n_encoded == 3
    b, st = embed_texts_with_stats(enc, ["c", "d", "a", "d", "e"], cache_dir=tmp_path)
    assert enc.calls[-1] == ["d", "e"]  # only the new ones, each once
    assert (st.n_texts, st.n_unique, st.n_cached, st.n_encoded) == (5, 4, 2, 2)
    assert np.array_equal(b[0], a[2]) and np.array_equal(b[2], a[0]) and np.array_equal(b[1], b[3])
    assert np.array_equal(b, FakeEncoder().encode(["c", "d", "a", "d", "e"]))
    # a fresh process (simulated by a fresh encoder + cleared in-memory index) reads the shards
    from gptfluence.features import cache as cache_mod

    cache_mod._INDEXES.clear()
    enc2 = FakeEncoder()
    c = embed_texts(enc2, ["e", "b"], cache_dir=tmp_path)
    assert enc2.n_encoded == 0
    assert np.array_equal(c, FakeEncoder().encode(["e", "b"]))
    assert embed_texts(enc2, [], cache_dir=tmp_path).shape == (0, 8)


def test_cache_keys_differ_by_pooling_and_max_length(tmp_path):
    base = FakeEncoder()
    embed_texts(base, ["x", "y"], cache_dir=tmp_path)
    for other in (FakeEncoder(pooling="cls"), FakeEncoder(max_length=64), FakeEncoder(name="other")):
        assert spec_key(other.spec()) != spec_key(base.spec())
        embed_texts(other, ["x", "y"], cache_dir=tmp_path)
        assert other.n_encoded == 2
    same = FakeEncoder()
    embed_texts(same, ["x", "y"], cache_dir=tmp_path)
    assert same.n_encoded == 0
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 4


def test_cache_compaction_and_default_dir(tmp_path, monkeypatch):
    from gptfluence.features import cache as cache_mod

    monkeypatch.setenv("GPTFLUENCE_CACHE", str(tmp_path / "home"))
    monkeypatch.setattr(cache_mod, "MAX_SHARDS", 3)
    enc = FakeEncoder()
    for k in range(6):
        embed_texts(enc, [f"t{k}"])
    folder = next((tmp_path / "home" / "embeddings").iterdir())
    assert len(list(folder.glob("shard-*.safetensors"))) <= 3
    cache_mod._INDEXES.clear()
    enc2 = FakeEncoder()
    out = embed_texts(enc2, [f"t{k}" for k in range(6)])
    assert enc2.n_encoded == 0 and np.array_equal(out, FakeEncoder().encode([f"t{k}" for k in range(6)]))


def test_embed_examples_uses_prompt_plus_target(tmp_path):
    enc = FakeEncoder()
    exs = [Example(3, "Q: hi\nA:", " yes"), Example(1, "Q: ho\nA:", " no")]
    out = embed_examples(enc, exs, cache_dir=tmp_path)
    assert enc.calls[0] == ["Q: hi\nA: yes", "Q: ho\nA: no"]
    assert out.shape == (2, 8)


def test_hf_encoder_cls_vs_mean(tmp_path):
    path = str(minilm_path())
    mean = HFEncoder(path, pooling="mean", normalize=True)
    cls = load_encoder(f"hf:{path}", pooling="cls")
    assert isinstance(cls, HFEncoder) and cls.pooling == "cls" and cls.normalize is False
    texts = ["a short one", "a rather longer sentence about films and stories"]
    em, ec = mean.encode(texts, batch_size=1), cls.encode(texts)
    assert em.shape == ec.shape == (2, 384)
    assert not np.allclose(em / np.linalg.norm(em, axis=1, keepdims=True),
                           ec / np.linalg.norm(ec, axis=1, keepdims=True), atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(em, axis=1), 1.0, atol=1e-5)
    # padding in a batch does not change a text's vector
    np.testing.assert_allclose(mean.encode(texts, batch_size=2), em, atol=1e-5)
    assert spec_key(mean.spec()) != spec_key(cls.spec())


def _tiny_gpt():
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))  # any local tokenizer will do
    cfg = GPTNeoXConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(cfg), tok


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_causal_lm_encoder_padding_independent(pooling):
    model, tok = _tiny_gpt()
    enc = CausalLMEncoder(model=model, tokenizer=tok, name="tiny-neox", pooling=pooling)
    assert enc.dim == 32 and enc.spec()["kind"] == "causal-lm"
    texts = ["short", "a considerably longer text with many more tokens in it", "mid length text"]
    together = enc.encode(texts, batch_size=3)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    assert together.shape == (3, 32) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_causal_lm_encoder_from_folder(tmp_path):
    model, tok = _tiny_gpt()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    enc = load_encoder(f"gpt:{tmp_path / 'm'}", max_length=16)
    assert isinstance(enc, CausalLMEncoder) and enc.pooling == "last" and enc.max_length == 16
    ref = CausalLMEncoder(model=model, tokenizer=tok, name="x", max_length=16)
    np.testing.assert_allclose(enc.encode(["hello there"]), ref.encode(["hello there"]), atol=1e-5)


def test_load_encoder_errors(tmp_path):
    with pytest.raises(GptfluenceError, match="not found"):
        load_encoder(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(GptfluenceError, match="not found"):
        load_encoder(f"gpt:{tmp_path / 'nope'}")
    with pytest.raises(GptfluenceError, match="unknown encoder"):
        load_encoder("bogus-encoder")
    with pytest.raises(GptfluenceError):
        load_encoder("hf:")
    with pytest.raises(GptfluenceError, match="pooling"):
        HFEncoder(str(minilm_path()), pooling="max")
