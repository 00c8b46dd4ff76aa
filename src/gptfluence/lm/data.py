"""Examples as token tensors for fine-tuning and loss evaluation.

Each example becomes ``prompt tokens + target tokens (+ eos)``, with prompt and target tokenized
separately (no special tokens), so the boundary is exact. Conventions:

* ``labels`` equal ``input_ids`` on target tokens and are -100 on prompt and padding tokens: the
  loss is on target tokens only.
* ``append_eos=True`` (the default, used for training) appends the eos token to the target and
  counts it as a target token, so the fine-tuned model learns to stop after the target (greedy
  generation stops at eos). Loss evaluation (`gptfluence.lm.evaluation.prepare_eval`) uses
  ``append_eos=False``: the test loss metric is over the target's own tokens only.
* Sequences longer than ``max_length`` lose prompt tokens from the left (at least one prompt
  token is kept); a target that alone does not fit is cut on the right.
* An empty prompt is replaced by the bos (else eos) token so that the first target token has
  something to be predicted from.
* Rows are right padded with the pad token to the longest sequence of the set; `batch` trims a
  batch to its own longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from gptfluence.errors import InputError
from gptfluence.types import Example, id_to_row, rows_for

IGNORE_INDEX = -100


@dataclass
class TokenizedExamples:
    """Token tensors of a list of examples, row i = ``examples[i]``."""

    ids: np.ndarray  # [N] int64 example ids
    input_ids: torch.Tensor  # [N, L] int64, right padded
    attention_mask: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N, L] int64, -100 on prompt and padding
    prompt_lengths: np.ndarray  # [N] tokens of the (possibly truncated) prompt
    lengths: np.ndarray  # [N] tokens of prompt + target (+ eos)
    pad_token_id: int = 0
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [N] prompt cut
    _row: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._row:
            self._row = id_to_row(self.ids, "tokenized examples")

    def __len__(self) -> int:
        return int(len(self.ids))

    @property
    def target_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths

    def rows_for_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of the given example ids (an `InputError` names an unknown id)."""
        return rows_for(ids, self._row, "example")

    def batch(self, rows: np.ndarray | Sequence[int], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask", "labels"}`` of ``rows``, trimmed to the batch's longest row."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise InputError("empty batch")
        if idx.min() < 0 or idx.max() >= len(self):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise InputError(f"row {int(bad)} out of range for {len(self)} tokenized examples")
        width = int(self.lengths[idx].max())
        t = torch.from_numpy(idx)
        out = {
            "input_ids": self.input_ids[t, :width],
            "attention_mask": self.attention_mask[t, :width],
            "labels": self.labels[t, :width],
        }
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _start_token(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise InputError("tokenizer has neither a bos nor an eos token to start an empty prompt")
    return int(tid)


def encode_pairs(tokenizer, examples: Sequence[Example], max_length: int, append_eos: bool
                 ) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Token ids of each example's (truncated) prompt and target, and whether the prompt was cut."""
    if max_length < 2:
        raise InputError(f"max_length must be at least 2, got {max_length}")
    prompts = _encode(tokenizer, [e.prompt for e in examples])
    targets = _encode(tokenizer, [e.target for e in examples])
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise InputError("append_eos needs a tokenizer with an eos token")
    out_p, out_t, cut = [], [], np.zeros(len(examples), dtype=bool)
    for i, (ex, p, t) in enumerate(zip(examples, prompts, targets)):
        p = list(p) or [_start_token(tokenizer)]
        t = list(t) + ([int(eos)] if append_eos else [])
        if not t:
            raise InputError(f"example {ex.id} has an empty target")
        if len(t) > max_length - 1:
            t = t[: max_length - 1]
        room = max_length - len(t)
        if len(p) > room:
            p = p[len(p) - room:]
            cut[i] = True
        out_p.append(p)
        out_t.append(t)
    return out_p, out_t, cut


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int,
                      append_eos: bool = True) -> TokenizedExamples:
    """Tokenize ``examples`` (rows in order) for fine-tuning or loss evaluation; see the module doc."""
    if not examples:
        raise InputError("no examples to tokenize")
    prompts, targets, cut = encode_pairs(tokenizer, examples, max_length, append_eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad if pad is not None else 0)
    lengths = np.array([len(p) + len(t) for p, t in zip(prompts, targets)], dtype=np.int64)
    plens = np.array([len(p) for p in prompts], dtype=np.int64)
    n, width = len(examples), int(lengths.max())
    input_ids = np.full((n, width), pad, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        seq = p + t
        input_ids[i, : len(seq)] = seq
        labels[i, len(p): len(seq)] = t
        mask[i, : len(seq)] = 1
    return TokenizedExamples(
        ids=np.array([int(e.id) for e in examples], dtype=np.int64),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        prompt_lengths=plens,
        lengths=lengths,
        pad_token_id=pad,
        truncated=cut,
    )
