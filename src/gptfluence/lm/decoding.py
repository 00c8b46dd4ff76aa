"""Lean greedy decoding: a prefill plus one forward pass per new token, without ``model.generate``.

Hugging Face ``generate`` spends most of its time, for the small models of a dynamics collection,
outside the model: logits processors, stopping criteria, mask and cache bookkeeping per token.
`greedy_tokens` does only what greedy decoding of a left-padded batch needs:

1. prefill: one forward pass over the prompts ``[B, W]`` (left padded) with the KV cache, position
   ids from the attention mask (``cumsum - 1``, 0 on padding, as ``generate`` makes them) and the
   LM head applied to the last position only (``logits_to_keep=1``);
2. then per new token: argmax of the last logits (in float32, like ``generate``), rows that already
   emitted a stop token get ``pad_token_id`` (like ``generate``), and one forward pass of the new
   token ``[B, 1]`` at position ``last + 1`` with the cache;
3. it stops when every row has emitted a stop token, or after ``max_new_tokens`` tokens.

The new tokens are the ones ``model.generate(do_sample=False, eos_token_id=stop_token_ids,
pad_token_id=...)`` returns after the prompt (tests/test_decoding.py checks them token for token on
CPU in fp32). Where a kernel's rounding depends on the batch shape (GPU, bf16), dropping stopped
rows from the batch or a static cache's wider attention can flip a near-tie argmax; the GPU test
asks for agreement on most tokens only.

Cache modes (``cache``):

* ``"dynamic"``: transformers' ``DynamicCache`` (grows by concatenation; the model builds the mask);
* ``"static"``: transformers' ``StaticCache`` preallocated to ``W + max_new_tokens`` slots, with the 4D
  attention mask made outside the model (``create_masks_for_generate``, as ``generate`` does for
  static caches), so that the one-token step has fixed shapes. With ``compile=True`` that step runs
  through ``torch.compile`` (mode ``reduce-overhead``, i.e. CUDA graphs, on CUDA); the compiled
  step and the caches are kept on the model (attribute ``_gptfluence_decode``) and reused by later
  calls with the same batch shape.

`DECODE_MODES` are the values of the collection option ``--decode`` (`resolve_decode`,
`lean_decode_unsupported`); `gptfluence.lm.evaluation.greedy_generate` dispatches on them and
falls back to ``model.generate`` (with a warning naming the reason) for a model the lean loop
cannot drive.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Sequence

import torch

from gptfluence.errors import InputError

#: ``--decode`` values: auto (= loop), hf (``model.generate``), loop (lean loop, dynamic cache),
#: static (lean loop, static cache), compile (static cache + torch.compile of the one-token step)
DECODE_MODES = ("auto", "hf", "loop", "static", "compile")
CACHE_MODES = ("dynamic", "static")


def resolve_decode(decode: str) -> str:
    """The decoding mode ``decode`` stands for: ``auto`` -> ``loop`` (token-identical to ``hf`` and
    faster on CPU, see benchmarks/decode_speed.py; ``compile`` is never chosen automatically).
    `InputError` naming ``--decode`` for an unknown value."""
    d = str(decode).strip().lower()
    if d not in DECODE_MODES:
        raise InputError(f"--decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
    return "loop" if d == "auto" else d


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return set()


def _cache_kwarg(params: set[str]) -> str | None:
    """The name the model's forward takes the KV cache under (transformers 5.x: ``cache``; older
    models: ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def lean_decode_unsupported(model, cache: str = "dynamic", compile: bool = False) -> str | None:
    """Why the lean loop cannot decode with ``model`` (None when it can): an encoder-decoder
    model, a forward without ``position_ids`` or a KV-cache argument, or (static cache / compile)
    a model that transformers does not mark as compilable with a static cache."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    params = _forward_params(model)
    if "position_ids" not in params:
        return f"{type(model).__name__}.forward takes no position_ids"
    if _cache_kwarg(params) is None:
        return f"{type(model).__name__}.forward takes no KV cache (cache / past_key_values)"
    if (cache == "static" or compile) and not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not support a static KV cache (transformers: _can_compile_fullgraph=False)"
    return None


class _DecodeState:
    """What the lean loop keeps on a model between calls: the compiled one-token step and the
    static caches by (rows, slots, dtype, device)."""

    def __init__(self) -> None:
        self.compiled: Any = None
        self.caches: dict[tuple, Any] = {}

    def __reduce__(self):
        # a copied (or pickled) model starts empty: the compiled call is bound to this model
        return (_DecodeState, ())


def _state(model) -> _DecodeState:
    st = model.__dict__.get("_gptfluence_decode")
    if st is None:
        st = _DecodeState()
        model.__dict__["_gptfluence_decode"] = st
    return st


def _static_cache(model, rows: int, slots: int, device: torch.device, reuse: bool):
    from transformers import StaticCache

    if not reuse:
        return StaticCache(config=model.config, max_cache_len=slots)
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (rows, slots, str(device), amp, next(model.parameters()).dtype)
    st = _state(model)
    kv = st.caches.get(key)
    if kv is None:
        kv = StaticCache(config=model.config, max_cache_len=slots)
        st.caches[key] = kv
    else:
        kv.reset()
    return kv


def _compiled_call(model, device: torch.device):
    st = _state(model)
    if st.compiled is None:
        opts: dict[str, Any] = {"fullgraph": False, "dynamic": False}
        if device.type == "cuda":
            opts["mode"] = "reduce-overhead"  # CUDA graphs: the one-token step has static shapes and addresses
        st.compiled = torch.compile(model.__call__, **opts)
    return st.compiled


def greedy_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stop_token_ids: Sequence[int], pad_token_id: int, cache: str = "dynamic",
                  compile: bool = False, stop_check_every: int | None = None,
                  compact: float = 0.75) -> torch.Tensor:
    """Greedy new tokens ``[B, n]`` (int64, on the model's device; n <= ``max_new_tokens``) of the
    left-padded prompts ``input_ids [B, W]`` / ``attention_mask [B, W]`` (1 = token, 0 = padding).

    A row's tokens after its first stop token are ``pad_token_id``; n is the step at which every
    row had stopped, else ``max_new_tokens``: the new tokens ``model.generate`` returns. Runs the
    model as given (call it under ``torch.inference_mode`` and eval mode; under an autocast
    context for bf16). ``cache``: ``"dynamic"`` or ``"static"``; ``compile``: torch.compile the
    one-token step (static cache only). ``stop_check_every``: look at the stop flags on the host
    every k tokens (default 1 on CPU, 8 on other devices, where each look waits for the device);
    it changes no token. ``compact`` (dynamic cache): when at such a look at most this fraction of
    the rows in the batch is still running, the stopped rows leave the batch and the KV cache
    (0 = never), so the rest decode with less work (same tokens on CPU in fp32, tested). `InputError` for bad arguments or a model the loop cannot drive
    (`lean_decode_unsupported`).
    """
    if cache not in CACHE_MODES:
        raise InputError(f"cache must be one of {', '.join(CACHE_MODES)} (got {cache!r})")
    if compile and cache != "static":
        raise InputError("compile=True needs cache='static' (compiled decoding needs fixed shapes)")
    if not 0.0 <= compact <= 1.0:
        raise InputError(f"compact must be in [0, 1] (got {compact})")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape or input_ids.shape[1] < 1:
        raise InputError(f"input_ids and attention_mask must both be [B, W] with W >= 1 "
                         f"(got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)})")
    if not len(stop_token_ids):
        raise InputError("stop_token_ids is empty")
    if bool((attention_mask[:, -1] == 0).any()):
        raise InputError("prompts must be left padded (attention_mask[:, -1] must be 1 in every row)")
    reason = lean_decode_unsupported(model, cache, compile)
    if reason:
        raise InputError(f"lean greedy decoding cannot drive this model: {reason}")

    params = _forward_params(model)
    cache_kw = _cache_kwarg(params)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    device = input_ids.device
    B, W = input_ids.shape
    L = W + max_new_tokens
    every = stop_check_every or (1 if device.type == "cpu" else 8)
    mask = torch.ones((B, L), dtype=torch.bool, device=device)  # new tokens: 1 (the causal mask hides the future)
    mask[:, :W] = attention_mask.bool()
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    next_pos = pos[:, -1:] + 1  # [B, 1] position of the first new token
    stop = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)
    pad = torch.tensor(int(pad_token_id), dtype=torch.long, device=device)

    if cache == "static":
        from transformers.masking_utils import create_masks_for_generate

        kv = _static_cache(model, B, L, device, reuse=compile)
        make_mask = getattr(model, "create_masks_for_generate", create_masks_for_generate)
        step_call = _compiled_call(model, device) if compile else model.__call__
    else:
        from transformers import DynamicCache

        kv = DynamicCache(config=model.config)

    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                **{cache_kw: kv}, **extra)
    logits = out.logits[:, -1]
    del out
    tokens = torch.full((B, max_new_tokens), int(pad_token_id), dtype=torch.long, device=device)
    live = torch.arange(B, device=device)  # row of `tokens` of each row still in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)
    any_alive = torch.ones(max_new_tokens, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        nxt = logits.float().argmax(-1)
        nxt = torch.where(alive, nxt, pad)
        tokens[live, i] = nxt
        alive &= ~torch.isin(nxt, stop)
        any_alive[i] = alive.any()
        if i + 1 == max_new_tokens:
            break
        if (i + 1) % every == 0:
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if cache == "dynamic" and compact and n_alive <= compact * len(live):
                # drop the stopped rows from the batch and from the KV cache (their tokens stay pad)
                keep = alive.nonzero()[:, 0]
                kv.batch_select_indices(keep)
                live, alive, nxt, mask, next_pos = live[keep], alive[keep], nxt[keep], mask[keep], next_pos[keep]
        ids = nxt[:, None]
        p = next_pos + i
        if cache == "static":
            m4 = make_mask(config=model.config,
                           inputs_embeds=torch.empty((B, 1, 0), dtype=model.dtype, device=device),
                           attention_mask=mask, cache=kv, position_ids=p)
            out = step_call(input_ids=ids, attention_mask=m4, position_ids=p, use_cache=True,
                            **{cache_kw: kv}, **extra)
            logits = out.logits[:, -1].clone()  # a CUDA-graph output is overwritten by the next replay
        else:
            out = model(input_ids=ids, attention_mask=mask[:, :W + i + 1], position_ids=p, use_cache=True,
                        **{cache_kw: kv}, **extra)
            logits = out.logits[:, -1]
        del out
    done = (~any_alive).nonzero()
    n = int(done[0, 0]) + 1 if len(done) else max_new_tokens
    return tokens[:, :n]


_WARNED: set[str] = set()


def warn_fallback(reason: str) -> None:
    """One warning per reason: the lean loop falls back to ``model.generate``."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"greedy decoding falls back to Hugging Face generate: {reason}", RuntimeWarning, stacklevel=3)
