"""Loss-gradient features of a causal LM: a second representation for GPTfluence's factors.

For an example z (prompt + target), ``g(z)`` is the gradient of the mean cross-entropy over z's
target tokens with respect to every trainable parameter of the model *before fine-tuning* (the
store's base model), randomly projected to ``dim`` dimensions (a seeded Gaussian map, generated in
chunks, so no ``[params, dim]`` matrix is ever held). To first order, one SGD step on z changes the
loss of z' by ``-lr <g(z), g(z')>``: the cosine of these vectors is the Grad-Dot / TracIn
similarity, which GPTfluence uses (``similarity="grad"``) as one learned-weight term of every
factor. Johnson-Lindenstrauss: inner products are kept up to a relative error of about
``1/sqrt(dim)``.

Cost: one forward and backward pass per example plus ``params x dim`` multiply-adds (the default
2-layer base model: 231k parameters, ~2 s for 300 examples on 2 cores at dim 1024).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.errors import InputError
from gptfluence.types import Example

PROJECTION_CHUNK = 4096  # parameters per generated block of the projection


class LossGradientEncoder:
    """``encode_examples(examples) -> float32 [N, dim]`` projected target-loss gradients.

    ``model``: ``"default:<base-model name>"`` (the cached default base model of that name, see
    `gptfluence.lm.ensure_default_model`), or a local folder / hub name of a causal LM.
    ``encode(texts)`` uses every token of each text as target (for callers without a
    prompt/target split).
    """

    kind = "loss-gradient"

    def __init__(self, model: str, dim: int = 1024, max_length: int = 64, seed: int = 0, device: str = "cpu") -> None:
        if dim < 1:
            raise InputError(f"gradient features: dim must be >= 1, got {dim}")
        self.model_id = str(model)
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.device = device
        self._model: Any = None
        self._tok: Any = None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model_id, "dim": self.dim, "max_length": self.max_length,
                "seed": self.seed, "params": "all"}

    @classmethod
    def for_dynamics(cls, dynamics: Any, dim: int = 1024, seed: int = 0) -> "LossGradientEncoder":
        """The encoder for a store's base model (before fine-tuning) and tokenisation length."""
        cfg = dynamics.manifest.get("config") or {}
        name = cfg.get("model", "default")
        if name == "default":
            base = cfg.get("base_model")
            if not base:
                raise InputError(f"{dynamics.root or 'dynamics'}: manifest config has no 'base_model'; cannot find the "
                                 f"model for gradient features (use similarity='features' or 'none')")
            model = f"default:{Path(str(base)).name}"
        else:
            model = str(name)
        return cls(model, dim=dim, max_length=int(cfg.get("max_length", 64)), seed=seed)

    # -- model ----------------------------------------------------------------------------------
    def _path(self) -> str:
        if self.model_id.startswith("default:"):
            from gptfluence.paths import cache_dir

            path = cache_dir("models") / self.model_id.split(":", 1)[1]
            if not (path / "config.json").exists():
                raise InputError(f"gradient features need the base model {self.model_id.split(':', 1)[1]!r}, not found in "
                                 f"{path.parent} (GPTFLUENCE_CACHE={os.environ.get('GPTFLUENCE_CACHE', '')!r}); "
                                 f"collect once with the same settings to rebuild it")
            return str(path)
        return self.model_id

    def _load(self) -> None:
        if self._model is None:
            from gptfluence.lm import load_model

            self._model, self._tok = load_model(self._path(), device=self.device, progress=False)
            self._model.eval()

    # -- features -------------------------------------------------------------------------------
    def encode_examples(self, examples: Sequence[Example]) -> np.ndarray:
        return self.encode_groups([examples])[0]

    def encode_groups(self, groups: Sequence[Sequence[Example]]) -> list[np.ndarray]:
        """`encode_examples` of several lists (e.g. training and test examples, whose ids may
        coincide) with one projection pass: ``[float32 [len(g), dim] for g in groups]``."""
        import torch

        groups = [list(g) for g in groups]
        sizes = [len(g) for g in groups]
        if not sum(sizes):
            return [np.zeros((0, self.dim), dtype=np.float32) for _ in groups]
        self._load()
        grads = torch.cat([self._gradients(g) for g in groups if g])
        out = self._project(grads).numpy()
        return list(np.split(out, np.cumsum(sizes)[:-1]))

    def _gradients(self, examples: list[Example]) -> Any:
        """Unprojected gradients ``[N, params]`` float32 of each example's mean target loss."""
        import torch

        from gptfluence.lm import tokenize_examples
        from gptfluence.lm.metrics import masked_target_loss

        model = self._model
        params = [p for p in model.parameters() if p.requires_grad]
        toks = tokenize_examples(self._tok, examples, self.max_length)
        grads = torch.empty(len(examples), sum(p.numel() for p in params), dtype=torch.float32)
        dev = next(model.parameters()).device
        for i in range(len(examples)):
            model.zero_grad(set_to_none=True)
            n = int(toks.lengths[i])
            logits = model(input_ids=toks.input_ids[i:i + 1, :n].to(dev),
                           attention_mask=toks.attention_mask[i:i + 1, :n].to(dev)).logits
            loss = masked_target_loss(logits, toks.labels[i:i + 1, :n].to(dev))[0]
            if not torch.isfinite(loss):
                raise InputError(f"example id {examples[i].id}: no target tokens within max_length={self.max_length}")
            loss.backward()
            grads[i] = torch.cat([p.grad.reshape(-1).float().cpu() for p in params])
        model.zero_grad(set_to_none=True)
        return grads

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_examples([Example(i, "", t, meta={}) for i, t in enumerate(texts)])

    def _project(self, grads: Any) -> Any:
        """``grads [N, P] -> [N, dim]`` with a seeded Gaussian map (entries N(0, 1/dim)), block by block."""
        import torch

        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, grads.shape[1], PROJECTION_CHUNK):
            block = grads[:, start:start + PROJECTION_CHUNK]
            R = torch.randn(block.shape[1], self.dim, generator=gen, dtype=torch.float32)
            out += (block @ R).double()
        return (out / self.dim ** 0.5).float()

    def __repr__(self) -> str:
        return f"LossGradientEncoder({self.spec()})"
