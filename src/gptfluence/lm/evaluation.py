"""Measuring a model on a test set: per-example target loss and greedy generations.

`prepare_eval` tokenizes the test examples once. `target_losses` runs one batched forward pass per
``batch_size`` examples (rows sorted by length so that batches carry little padding) and applies
the LM head only where a target token is predicted; per example it returns the mean
cross-entropy over the target's tokens (no eos), the same value as the Hugging Face loss of that
example alone. `greedy_generate` decodes greedily from left-padded prompts with the KV cache and
stops at eos or at a newline (the lean loop of `gptfluence.lm.decoding`, or ``model.generate``). Both run under ``torch.inference_mode`` with the model in eval mode
and put the model back in train mode afterwards if it was in train mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from gptfluence.errors import InputError
from gptfluence.lm.data import TokenizedExamples, _start_token, tokenize_examples
from gptfluence.lm.training import target_token_logits
from gptfluence.types import Example


@dataclass
class EvalSet:
    """A test set prepared for `target_losses` and `greedy_generate` (row i = ``examples[i]``)."""

    ids: np.ndarray  # [M] example ids
    tokens: TokenizedExamples  # prompt + target (no eos), for the loss
    prompt_ids: list[list[int]]  # [M] prompt tokens (left-truncated to max_length) for generation
    references: list[str]  # [M] targets, stripped
    stop_token_ids: list[int]  # eos and every token whose text contains a newline
    pad_token_id: int
    max_length: int
    _order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    def __len__(self) -> int:
        return int(len(self.ids))


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus every token whose decoded text contains a newline (cached on the tokenizer)."""
    n = len(tokenizer)
    cached = getattr(tokenizer, "_gptfluence_stop_ids", None)
    if cached is not None and cached[0] == n:
        return list(cached[1])
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    ids = {i for i, t in enumerate(texts) if "\n" in t}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    out = sorted(ids)
    try:
        tokenizer._gptfluence_stop_ids = (n, tuple(out))
    except AttributeError:  # pragma: no cover - tokenizer without a __dict__
        pass
    return out


def prepare_eval(tokenizer, examples: Sequence[Example], max_length: int) -> EvalSet:
    """Tokenize a test set once for loss evaluation and generation."""
    if not examples:
        raise InputError("empty test set")
    tokens = tokenize_examples(tokenizer, examples, max_length, append_eos=False)
    prompts = generation_prompts(tokenizer, examples, max_length)
    pad = tokens.pad_token_id
    return EvalSet(
        ids=tokens.ids.copy(),
        tokens=tokens,
        prompt_ids=prompts,
        references=[e.target.strip() for e in examples],
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=pad,
        max_length=max_length,
        _order=np.argsort(-tokens.lengths, kind="stable"),
    )


def generation_prompts(tokenizer, examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Prompt tokens for generation: no special tokens, left-truncated to ``max_length`` tokens."""
    enc = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    start = None
    out = []
    for p in enc:
        if not p:
            start = start if start is not None else _start_token(tokenizer)
            p = [start]
        out.append(list(p[-max_length:]))
    return out


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode + inference mode inside; the previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(order), size):
        yield order[s: s + size]


def _token_chunks(order: np.ndarray, lengths: np.ndarray, size: int, max_tokens: int | None) -> Iterator[np.ndarray]:
    """Chunks of ``order`` (sorted by decreasing length) of at most ``size`` rows and, when
    ``max_tokens`` is set, at most ``max_tokens`` padded tokens (rows x longest row)."""
    s, n = 0, len(order)
    while s < n:
        rows = size
        if max_tokens:
            rows = max(1, min(size, max_tokens // max(1, int(lengths[order[s]]))))
        yield order[s: s + rows]
        s += rows


CPU_MAX_TOKENS = 2048  # padded tokens per forward pass on CPU (larger batches lose cache locality)


def target_losses(model, eval_set: EvalSet, batch_size: int = 256, max_tokens: int | None = None) -> np.ndarray:
    """Per-example mean cross-entropy over target tokens, ``[M]`` float64 in ``eval_set`` order.

    Rows go through the model longest first, in chunks of at most ``batch_size`` rows and
    ``max_tokens`` padded tokens (default: `CPU_MAX_TOKENS` on CPU, no limit on other devices).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    device = _device(model)
    if max_tokens is None and device.type == "cpu":
        max_tokens = CPU_MAX_TOKENS
    m = len(eval_set)
    sums = torch.zeros(m, dtype=torch.float64)
    counts = torch.zeros(m, dtype=torch.float64)
    with evaluating(model):
        for rows in _token_chunks(eval_set._order, eval_set.tokens.lengths, batch_size, max_tokens):
            b = eval_set.tokens.batch(rows, device=device)
            logits, targets, brow = target_token_logits(model, b["input_ids"], b["attention_mask"], b["labels"])
            ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            grow = torch.from_numpy(rows)[brow.cpu()]
            sums.index_add_(0, grow, ce.double().cpu())
            counts.index_add_(0, grow, torch.ones_like(ce, dtype=torch.float64).cpu())
    return (sums / counts.clamp_min(1)).numpy()


def _decode(tokenizer, seq: list[int], stop: set[int]) -> str:
    out = []
    for t in seq:
        if t in stop:
            # a newline token may carry text before its newline: keep that part
            if t != tokenizer.eos_token_id:
                out.append(t)
            break
        out.append(t)
    text = tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.split("\n", 1)[0].strip()


def greedy_generate(model, tokenizer, eval_set: EvalSet, max_new_tokens: int = 24,
                    batch_size: int = 128, decode: str = "auto") -> list[str]:
    """Greedy continuations of every prompt (batched, left padded, KV cache), cut at eos/newline.

    ``decode`` (`gptfluence.lm.decoding.DECODE_MODES`): ``hf`` runs ``model.generate`` per batch;
    ``loop`` / ``static`` / ``compile`` the lean loop `gptfluence.lm.decoding.greedy_tokens`
    (dynamic cache / static cache / static cache + torch.compile), which gives the same tokens;
    ``auto`` = ``loop``. A model the lean loop cannot drive falls back to ``hf`` with a warning."""
    from gptfluence.lm.decoding import greedy_tokens, lean_decode_unsupported, resolve_decode, warn_fallback

    if batch_size < 1 or max_new_tokens < 1:
        raise InputError(f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}")
    mode = resolve_decode(decode)
    cache, compile_step = ("static", mode == "compile") if mode in ("static", "compile") else ("dynamic", False)
    if mode != "hf":
        reason = lean_decode_unsupported(model, cache, compile_step)
        if reason:
            warn_fallback(f"{reason} (--decode {decode})")
            mode = "hf"
    device = _device(model)
    stop = list(eval_set.stop_token_ids)
    stop_set = set(stop)
    pad = eval_set.pad_token_id
    plen = np.array([len(p) for p in eval_set.prompt_ids])
    order = np.argsort(-plen, kind="stable")
    # compiled decoding: one prompt width for every batch, so that every batch has the same shapes
    fixed_width = int(plen.max()) if compile_step else 0
    out: list[str] = [""] * len(eval_set)
    with evaluating(model):
        for rows in _chunks(order, batch_size):
            width = max(fixed_width, int(plen[rows].max()))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                p = eval_set.prompt_ids[r]
                ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[j, width - len(p):] = 1
            if mode == "hf":
                new = _hf_generate(model, ids.to(device), mask.to(device), max_new_tokens, stop, pad)
            else:
                new = greedy_tokens(model, ids.to(device), mask.to(device), max_new_tokens, stop, pad,
                                    cache=cache, compile=compile_step)
            new = new.tolist()
            for j, r in enumerate(rows):
                out[int(r)] = _decode(tokenizer, new[j], stop_set)
    return out


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: list[int],
                 pad: int) -> torch.Tensor:
    """New tokens ``[B, n]`` of Hugging Face greedy ``generate`` from left-padded ``ids``."""
    from transformers import GenerationConfig

    gcfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            eos_token_id=stop, pad_token_id=pad, use_cache=True)
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg)
    return gen[:, ids.shape[1]:]
