"""One fine-tuning step's pieces: the target-token loss and the optimizer with its schedule.

`causal_lm_loss` is the mean cross-entropy over every target token of the batch (tokens where
``labels != -100``, predicted from the token before): the standard Hugging Face causal LM loss,
computed with the LM head applied only at those positions, which is several times faster for
small models and gives the same value (and gradients).

`make_optimizer` returns AdamW with two parameter groups (weight decay on matrices and embeddings,
none on biases and LayerNorm parameters, i.e. on every parameter with fewer than 2 dimensions)
and a `LambdaLR` schedule: linear warmup from 0 to ``lr`` over ``warmup_steps`` steps, then
linear decay to 0 at ``total_steps`` (``schedule="linear"``, the Hugging Face default), or
constant after warmup (``schedule="constant"``). Call ``scheduler.step()`` after every
``optimizer.step()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptfluence.errors import GptfluenceError

IGNORE_INDEX = -100


def _base_and_head(model):
    """(base model returning final hidden states, output embedding) when the head can be split off.

    Returns None for models whose logits are not just ``head(hidden)`` (logit scaling or
    soft-capping), which then take the full forward pass.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    return base, head


def target_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a target token.

    Returns ``(logits [K, V], targets [K], rows [K])`` where the K positions are every (b, t) with
    ``labels[b, t + 1] != -100`` and ``rows`` is the batch row of each.
    """
    shifted = labels[:, 1:]
    pos = (shifted != IGNORE_INDEX).nonzero(as_tuple=False)  # [K, 2] (row, t)
    rows, cols = pos[:, 0], pos[:, 1]
    targets = shifted[rows, cols]
    split = _base_and_head(model)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[rows, cols], targets, rows
    base, head = split
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden[rows, cols]), targets, rows


def causal_lm_loss(model, batch: dict[str, torch.Tensor], head_only: bool = True) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of ``batch`` (keys input_ids, attention_mask, labels).

    ``head_only=True`` applies the LM head only where a target token is predicted (fast, but its
    shapes depend on the data: not usable under ``torch.func.vmap``); ``head_only=False`` computes
    the full logits and masks them (vmap-friendly; same value).
    """
    labels = batch["labels"]
    if not head_only:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False).logits[:, :-1].float()
        shifted = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        return ce / (shifted != IGNORE_INDEX).sum().clamp_min(1)
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise GptfluenceError("batch has no target tokens to compute a loss on")
    logits, targets, _ = target_token_logits(model, batch["input_ids"], batch.get("attention_mask"), labels)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def make_optimizer(model, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                   total_steps: int = 1, schedule: str = "linear", betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(AdamW, LambdaLR)``: warmup then linear decay to 0 at ``total_steps`` (or constant)."""
    _check_schedule(schedule, warmup_steps, total_steps)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, schedule)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check_schedule(schedule: str, warmup_steps: int, total_steps: int) -> None:
    if schedule not in ("linear", "constant"):
        raise GptfluenceError(f"unknown learning-rate schedule {schedule!r} (linear or constant)")
    if total_steps < 1 or warmup_steps < 0:
        raise GptfluenceError(f"invalid schedule: total_steps={total_steps}, warmup_steps={warmup_steps}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over the peak lr, as `make_optimizer`'s
    schedule sets it: (step + 1) / (warmup + 1) during warmup, then 1 (``"constant"``) or linear
    decay to 0 at ``total_steps`` (``"linear"``)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def schedule_factors(num_steps: int, warmup_steps: int, schedule: str) -> np.ndarray:
    """``[num_steps]`` float64: `lr_factor` of steps 1..T of a fine-tuning of ``num_steps`` steps."""
    _check_schedule(schedule, warmup_steps, num_steps)
    return np.asarray([lr_factor(t, warmup_steps, num_steps, schedule) for t in range(int(num_steps))], dtype=np.float64)
