"""The GPT being fine-tuned: a small default GPT-NeoX built and pre-trained locally, or any HF causal LM.

The default model is made entirely on this machine, nothing is downloaded:

1. a byte-level BPE tokenizer is trained with ``tokenizers`` on a text corpus (by default
   ``gptfluence.tasks.tokenizer_corpus``: the built-in pre-training corpus plus a word list), with the special tokens ``<|endoftext|>`` (bos, eos)
   and ``<|pad|>``; every label word of `BaseModelConfig.label_words` (``" positive"``, ...)
   is made a single token;
2. a GPT-NeoX (Pythia architecture: parallel residual, partial rotary embeddings, no dropout,
   untied input/output embeddings) is built from `BaseModelConfig`;
3. it is pre-trained briefly with the causal LM loss on all tokens of the corpus (texts joined by
   ``<|endoftext|>`` and cut into blocks of ``max_length`` tokens);
4. it is saved as a standard Hugging Face folder (``save_pretrained`` of the model and of a
   ``PreTrainedTokenizerFast``) plus ``gptfluence_model.json`` (config, corpus hash, versions,
   timings) under ``cache_dir("models")/<name>-<hash of config and corpus>``.

The folder is written under a temporary name and renamed, so a half-written model is never
reused; a later call with the same config and corpus reuses it. Everything is deterministic
given ``seed`` (on a given machine and library versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.config import arg, from_dict, save_json, to_dict
from gptfluence.errors import GptfluenceError
from gptfluence.paths import cache_dir as _cache_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_INFO_FILE = "gptfluence_model.json"
FORMAT_VERSION = 1  # bump when the way a default model is built changes (invalidates caches)


@dataclass
class BaseModelConfig:
    """How the default small GPT-NeoX base model is built and pre-trained."""

    num_layers: int = arg(2, "number of transformer layers of the default GPT-NeoX")
    hidden_size: int = arg(64, "hidden size of the default GPT-NeoX")
    num_heads: int = arg(4, "attention heads of the default GPT-NeoX")
    intermediate_size: int = arg(256, "MLP width of the default GPT-NeoX")
    vocab_size: int = arg(1024, "size of the byte-level BPE vocabulary trained on the corpus")
    max_length: int = arg(64, "pre-training block length in tokens (also the fine-tuning length cap)")
    rotary_pct: float = arg(0.25, "fraction of each head's dimensions that get rotary embeddings")
    pretrain_steps: int = arg(600, "pre-training optimizer steps (about 40 s on 2 CPU cores)")
    pretrain_batch_size: int = arg(16, "pre-training batch size (blocks of max_length tokens)")
    pretrain_lr: float = arg(2e-3, "pre-training peak learning rate (AdamW, 5% warmup, linear decay)")
    corpus_texts: int = arg(4000, "texts of the built-in pre-training corpus used when no corpus is given")
    label_words: list[str] = arg(
        [" positive", " negative", " yes", " no"],
        "words (with their leading space) that must each be a single token",
    )
    seed: int = arg(0, "seed of tokenizer corpus order, initialisation and pre-training batches")

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
                     "max_length", "pretrain_batch_size"):
            if getattr(self, name) <= 0:
                raise GptfluenceError(f"BaseModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise GptfluenceError(f"BaseModelConfig.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if self.hidden_size % self.num_heads:
            raise GptfluenceError(
                f"BaseModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.vocab_size < 300:
            raise GptfluenceError(f"BaseModelConfig.vocab_size must be >= 300 (256 bytes + specials), got {self.vocab_size}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise GptfluenceError(f"BaseModelConfig.rotary_pct must be in [0, 1], got {self.rotary_pct}")


class quiet_transformers:
    """Hide transformers' own progress bars (weight loading/saving) inside the block."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()
        return False


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def corpus_sha256(corpus: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in corpus:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def model_key(cfg: BaseModelConfig, corpus_hash: str) -> str:
    """Short hash identifying a default model: its config, its corpus and the build format."""
    payload = json.dumps({"config": to_dict(cfg), "corpus": corpus_hash, "format": FORMAT_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def model_name(cfg: BaseModelConfig) -> str:
    return f"gpt-neox-l{cfg.num_layers}-h{cfg.hidden_size}-v{cfg.vocab_size}"


def _default_corpus(cfg: BaseModelConfig) -> list[str]:
    """``gptfluence.tasks.tokenizer_corpus`` (the pre-training corpus plus one line listing every
    word of the built-in tasks, so the tokenizer has seen them all), else ``pretraining_corpus``."""
    try:
        import gptfluence.tasks as tasks
    except ImportError as e:  # pragma: no cover
        raise GptfluenceError(f"no corpus given and gptfluence.tasks cannot be imported ({e})") from None
    make = getattr(tasks, "tokenizer_corpus", None) or getattr(tasks, "pretraining_corpus", None)
    if make is None:
        raise GptfluenceError("no corpus given and gptfluence.tasks has no pretraining_corpus; "
                              "pass corpus=[...] to ensure_default_model")
    return list(make(cfg.corpus_texts, cfg.seed))


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(corpus: Sequence[str], vocab_size: int, label_words: Sequence[str] = (),
                    seed: int = 0):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on ``corpus``.

    Label words are made single tokens by adding them to the training text often enough that BPE
    learns their merges first; any that still are not single tokens are added as tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [w for w in label_words if w]
    boost = max(1000, len(corpus))

    def texts():
        yield from corpus
        if words:
            # one line per word repeated `boost` times: these become the most frequent words
            for w in words:
                yield w * boost

    tok.train_from_iterator(texts(), trainer=trainer, length=len(corpus) + len(words))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=None)
    missing = [w for w in words if len(fast.encode(w, add_special_tokens=False)) != 1]
    if missing:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(w, normalized=False, single_word=True) for w in missing])
    still = [w for w in words if len(fast.encode(w, add_special_tokens=False)) != 1]
    if still:  # pragma: no cover - defensive
        raise GptfluenceError(f"could not make label words single tokens: {still!r}")
    fast.model_input_names = ["input_ids", "attention_mask"]
    return fast


# --------------------------------------------------------------------------------------------
# model


def build_model(cfg: BaseModelConfig, vocab_size: int, tokenizer) -> Any:
    """A freshly initialised GPT-NeoX (Pythia architecture) seeded with ``cfg.seed``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    mcfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": float(cfg.rotary_pct)},
        max_position_embeddings=max(2048, 4 * cfg.max_length),
        initializer_range=0.02,
        use_parallel_residual=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        classifier_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    mcfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = GPTNeoXForCausalLM(mcfg)
    return model


def _pack_blocks(tokenizer, corpus: Sequence[str], block: int) -> np.ndarray:
    """All texts joined by eos and cut into blocks of ``block`` tokens (the remainder is dropped)."""
    enc = tokenizer(list(corpus), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in enc:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // block
    if n == 0:
        arr = np.full((1, block), tokenizer.pad_token_id, dtype=np.int64)
        arr[0, : len(stream)] = stream
        return arr
    return np.asarray(stream[: n * block], dtype=np.int64).reshape(n, block)


def pretrain(model, tokenizer, corpus: Sequence[str], cfg: BaseModelConfig, progress: bool = True) -> dict:
    """Causal LM pre-training on all tokens of ``corpus``; returns timing and loss figures."""
    import torch

    from gptfluence.lm.training import make_optimizer

    blocks = torch.from_numpy(_pack_blocks(tokenizer, corpus, cfg.max_length))
    pad = tokenizer.pad_token_id
    rng = np.random.default_rng(cfg.seed)
    steps = cfg.pretrain_steps
    bs = min(cfg.pretrain_batch_size, len(blocks))
    opt, sched = make_optimizer(model, lr=cfg.pretrain_lr, weight_decay=0.01,
                                warmup_steps=max(1, steps // 20), total_steps=max(1, steps))
    model.train()
    order = np.empty(0, dtype=np.int64)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = None
    if progress and steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="pre-training base model", unit="step", leave=False, file=sys.stderr)
    for step in range(steps):
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(blocks))])
        rows, order = order[:bs], order[bs:]
        ids = blocks[torch.from_numpy(rows)]
        labels = ids.masked_fill(ids == pad, -100)
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    secs = time.perf_counter() - t0
    return {
        "pretrain_seconds": secs,
        "pretrain_blocks": int(len(blocks)),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "seconds_per_step": secs / steps if steps else None,
    }


def ensure_default_model(cfg: BaseModelConfig | None = None, corpus: Sequence[str] | None = None,
                         cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of the default base model for ``cfg`` and ``corpus``, building it if not cached.

    ``corpus`` defaults to ``gptfluence.tasks.tokenizer_corpus(cfg.corpus_texts, cfg.seed)``;
    ``cache_dir`` defaults to ``gptfluence.paths.cache_dir("models")``.
    """
    import torch

    cfg = cfg if cfg is not None else BaseModelConfig()
    corpus = list(corpus) if corpus is not None else _default_corpus(cfg)
    if not corpus:
        raise GptfluenceError("the pre-training corpus is empty")
    root = Path(cache_dir) if cache_dir is not None else _cache_dir("models")
    root.mkdir(parents=True, exist_ok=True)
    chash = corpus_sha256(corpus)
    final = root / f"{model_name(cfg)}-{model_key(cfg, chash)}"
    if (final / MODEL_INFO_FILE).exists():
        _log(progress, f"reusing cached base model at {final}")
        return final

    _log(progress, f"building base model {final.name} ({len(corpus)} corpus texts) ...")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.label_words, cfg.seed)
    t_tok = time.perf_counter() - t0
    model = build_model(cfg, len(tokenizer), tokenizer)
    stats = pretrain(model, tokenizer, corpus, cfg, progress=progress)
    n_params = sum(p.numel() for p in model.parameters())

    import tokenizers
    import transformers

    tmp = root / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir(parents=True)
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        save_json({
            "config": to_dict(cfg),
            "corpus_sha256": chash,
            "corpus_texts": len(corpus),
            "format": FORMAT_VERSION,
            "n_params": n_params,
            "tokenizer_vocab": len(tokenizer),
            "tokenizer_seconds": t_tok,
            **stats,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, tmp / MODEL_INFO_FILE)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MODEL_INFO_FILE).exists():  # another process won the race: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"base model ready at {final} ({n_params / 1e6:.2f} M parameters, "
                   f"pre-trained {stats['pretrain_seconds']:.1f} s, final loss {stats['final_loss']})")
    return final


def read_model_info(path: str | os.PathLike) -> dict:
    """The ``gptfluence_model.json`` of a default model folder ({} for other models)."""
    p = Path(path) / MODEL_INFO_FILE
    if not p.exists():
        return {}
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def base_config_of(path: str | os.PathLike) -> BaseModelConfig | None:
    info = read_model_info(path)
    return from_dict(BaseModelConfig, info["config"], source=str(Path(path) / MODEL_INFO_FILE)) if info else None


# --------------------------------------------------------------------------------------------
# loading


def load_model(name_or_path: str = "default", device: Any = "cpu", dtype: Any = None,
               base_config: BaseModelConfig | None = None, corpus: Sequence[str] | None = None,
               attn_implementation: str | None = "sdpa", progress: bool = True):
    """``(model, tokenizer)`` for ``"default"`` (the local base model), a local folder or a hub name.

    The model comes in eval mode on ``device`` (in ``dtype`` when given). The tokenizer always
    has a pad token (eos when it had none) and returns only input ids and attention masks;
    padding sides are set explicitly by the functions of `gptfluence.lm`. ``attn_implementation``
    is "sdpa" by default (as fast as "eager" on CPU for the default model, faster on GPU; use
    "eager" under ``torch.func.vmap``). ``progress=False`` silences the cache message.
    """
    if name_or_path == "default":
        path: str = str(ensure_default_model(base_config, corpus=corpus, progress=progress))
    else:
        path = str(name_or_path)
        p = Path(path).expanduser()
        looks_local = p.exists() or path.startswith((".", "/", "~")) or os.sep in path and p.parent.exists()
        if looks_local:
            if not p.is_dir():
                raise GptfluenceError(f"model {path!r}: no such folder")
            if not (p / "config.json").exists():
                raise GptfluenceError(f"model {path!r}: folder has no config.json (not a Hugging Face model)")
            path = str(p)
    with quiet_transformers():
        return _load(name_or_path, path, device, dtype, attn_implementation)


def _load(name_or_path: str, path: str, device: Any, dtype: Any, attn_implementation: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GptfluenceError(f"model {name_or_path!r}: cannot load its config ({str(e).splitlines()[0]})") from None
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "attn" in msg.lower() or "sdpa" in msg.lower():
            kwargs.pop("attn_implementation", None)
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        else:
            raise GptfluenceError(f"model {name_or_path!r} is not a causal LM ({msg})") from None
    except OSError as e:
        raise GptfluenceError(f"model {name_or_path!r}: cannot load weights ({str(e).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GptfluenceError(f"model {name_or_path!r}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    prepare_tokenizer(tokenizer, model)
    model.to(device)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer, model=None):
    """Give ``tokenizer`` a pad token (eos if missing) and drop ``token_type_ids`` from its outputs."""
    if tokenizer.eos_token_id is None:
        raise GptfluenceError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer
