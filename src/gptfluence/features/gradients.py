"""Loss-gradient features of a causal LM: a second representation for GPTfluence's factors.

For an example z (prompt + target), ``g(z)`` is the gradient of the mean cross-entropy over z's
target tokens with respect to every trainable parameter of the model (by default the store's base
model, before fine-tuning), randomly projected to ``dim`` dimensions (a seeded Gaussian map,
generated in chunks, so no ``[params, dim]`` matrix is ever held). To first order, one SGD step on
z changes the loss of z' by ``-lr <g(z), g(z')>`` (Grad-Dot / TracIn); GPTfluence
(``similarity="grad"``) turns these vectors into learned-weight terms of every factor. Johnson-Lindenstrauss: inner products are kept up to a relative error of about
``1/sqrt(dim)``.

Checkpoints (TracIn-CP): with a `CheckpointReplay`, the gradients are taken at K steps of one
fine-tuning run of the store, re-trained with the store's collection settings (`replay_run`), and
the K projected gradients are concatenated, ``[N, K * dim]`` (block c = checkpoint c, unscaled, so
their norms are kept). The fine-tuned model is what the training examples act on after the first
steps; the base model's gradients alone miss how that changes.

K-FAC preconditioning (``preconditioner="kfac"``): each ``nn.Linear`` layer's gradient G (out x
in, the bias as an extra input column of ones) is whitened by that layer's Kronecker-factored
curvature at the same checkpoint, ``S^{-1/2} G A^{-1/2}`` in the factors' eigenbases with damping:
``Q_S^T G Q_A / sqrt(lambda_S lambda_A^T + damping * mean(lambda_S lambda_A^T))``, where A is the
mean over tokens of the layer's input outer products and S the mean over examples of the outer
products of the gradients at its output, both over ``factor_examples`` (the store's training pool).
Inner products of whitened gradients are then ``g_i^T (S (x) A + damping)^{-1} g_m``, the K-FAC
influence (as kronfluence's ``kfac`` strategy, here with the empirical Fisher of the true targets);
only the Linear layers' parameters enter (embeddings and layer norms are left out).

Cost: one forward and backward pass per example and checkpoint plus ``params x dim`` multiply-adds
per checkpoint (the default 2-layer base model: 231k parameters, ~2 s for 300 examples on 2 cores
at dim 1024), and for checkpoints one replayed run without evaluation (~1 s for the default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptfluence.errors import InputError
from gptfluence.types import Example, examples_sha256

PROJECTION_CHUNK = 4096  # parameters per generated block of the projection


@dataclasses.dataclass
class CheckpointReplay:
    """Where checkpoint gradients come from: run ``run_id`` of the store ``dynamics``, re-trained,
    read at ``steps`` (0 = the base model)."""

    dynamics: Any
    run_id: str
    steps: list[int]

    @classmethod
    def evenly_spaced(cls, dynamics: Any, run_id: str, k: int) -> "CheckpointReplay":
        """``k`` steps evenly spaced over the run's T steps, both ends included (k = 1: step 0)."""
        T = int(dynamics.run(run_id).curriculum.shape[0])
        steps = sorted({int(round(x)) for x in np.linspace(0, T, max(1, int(k)))})
        return cls(dynamics, run_id, steps)

    def spec(self) -> dict[str, Any]:
        """What decides the checkpoints: the run (id, seed, curriculum), the collection settings and
        training examples (hashes), the steps; ``store`` (where it was, resolved) is informational."""
        cfg = self.dynamics.manifest.get("config") or {}
        run = self.dynamics.run(self.run_id)
        cur = np.ascontiguousarray(run.curriculum, dtype=np.int64)
        return {"run_id": self.run_id, "run_seed": run.seed, "steps": list(self.steps),
                "curriculum_sha256": hashlib.sha256(cur.tobytes()).hexdigest(),
                "collection_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                "train_examples_sha256": (self.dynamics.manifest.get("examples_sha256") or {}).get("train"),
                "store": str(Path(self.dynamics.root).resolve()) if self.dynamics.root else None}


REPLAY_IDENTITY = ("run_seed", "curriculum_sha256", "collection_sha256", "train_examples_sha256")


def replay_matches(spec: dict[str, Any], dynamics: Any) -> bool:
    """Whether ``dynamics`` holds the run a checkpoint spec was made from (same run, seed,
    curriculum, collection settings and training examples; the store's location may differ)."""
    if spec.get("run_id") not in set(dynamics.run_ids):
        return False
    mine = CheckpointReplay(dynamics, spec["run_id"], list(spec.get("steps", []))).spec()
    return all(mine[k] == spec.get(k) for k in REPLAY_IDENTITY)


class LossGradientEncoder:
    """``encode_examples(examples) -> float32 [N, out_dim]`` projected target-loss gradients.

    ``model``: ``"default:<base-model name>"`` (the cached default base model of that name, see
    `gptfluence.lm.ensure_default_model`), or a local folder / hub name of a causal LM.
    ``encode(texts)`` uses every token of each text as target (for callers without a
    prompt/target split).
    """

    kind = "loss-gradient"

    def __init__(self, model: str, dim: int = 1024, max_length: int = 64, seed: int = 0, device: str = "cpu",
                 replay: CheckpointReplay | None = None, preconditioner: str = "none", damping: float = 0.1,
                 factor_examples: Sequence[Example] | None = None) -> None:
        if dim < 1:
            raise InputError(f"gradient features: dim must be >= 1, got {dim}")
        if preconditioner not in PRECONDITIONERS:
            raise InputError(f"gradient features: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        if not (np.isfinite(damping) and damping > 0):
            raise InputError(f"gradient features: damping must be > 0, got {damping}")
        if preconditioner != "none" and not factor_examples:
            raise InputError(f"gradient features: preconditioner={preconditioner!r} needs the examples its curvature "
                             "is estimated on (factor_examples: the store's training pool)")
        self.preconditioner = preconditioner
        self.damping = float(damping)
        self.factor_examples = list(factor_examples or []) if preconditioner != "none" else []
        self.model_id = str(model)
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.device = device
        self.replay = replay
        self._model: Any = None
        self._tok: Any = None
        self._checkpoints: list[dict[str, Any]] | None = None  # replayed weights (CPU state dicts), kept
        self._kfac: list[dict[str, tuple[Any, Any]]] = []  # K-FAC factors per checkpoint, computed once

    @property
    def out_dim(self) -> int:
        """Width of the features: ``dim`` per checkpoint (twice that with ``"none+kfac"``: the raw
        and the whitened block of each checkpoint, in that order)."""
        return self.dim * (len(self.replay.steps) if self.replay is not None else 1) * blocks_per_checkpoint(self.preconditioner)

    def spec(self) -> dict[str, Any]:
        out = {"kind": self.kind, "model": self.model_id, "dim": self.dim, "max_length": self.max_length,
               "seed": self.seed, "params": "all"}
        if self.preconditioner != "none":
            out["params"] = "linear layers" if self.preconditioner == "kfac" else "all, then linear layers (K-FAC)"
            out["preconditioner"] = {"kind": self.preconditioner, "damping": self.damping,
                                     "factor_examples_sha256": examples_sha256(self.factor_examples),
                                     "n_factor_examples": len(self.factor_examples)}
        if self.replay is not None:  # CUDA replays train under bf16 autocast: other checkpoints
            out["checkpoints"] = {**self.replay.spec(), "device": "cuda" if str(self.device).startswith("cuda") else "cpu",
                                  "blocks": "concatenated projected gradients"}
        return out

    @classmethod
    def for_dynamics(cls, dynamics: Any, dim: int = 1024, seed: int = 0, checkpoints: int = 1,
                     run_id: str | None = None, device: str = "cpu", preconditioner: str = "none",
                     damping: float = 0.1) -> "LossGradientEncoder":
        """The encoder for a store's base model and tokenisation length; ``checkpoints`` > 1: at
        that many steps evenly spaced over run ``run_id`` (one of the runs a simulator is fitted
        on), re-trained with the store's settings."""
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
        replay = None
        if checkpoints > 1:
            if run_id is None:
                raise InputError("gradient features at checkpoints need the id of the run to replay")
            replay = CheckpointReplay.evenly_spaced(dynamics, run_id, checkpoints)
        return cls(model, dim=dim, max_length=int(cfg.get("max_length", 64)), seed=seed, device=device, replay=replay,
                   preconditioner=preconditioner, damping=damping,
                   factor_examples=list(dynamics.task.train) if preconditioner != "none" else None)

    # -- model ----------------------------------------------------------------------------------
    def _path(self) -> str:
        if self.model_id.startswith("default:"):
            from gptfluence.dynamics.collect import cached_base_model

            return str(cached_base_model(self.model_id.split(":", 1)[1]))
        return self.model_id

    def _load(self) -> None:
        if self._model is None:
            from gptfluence.lm import load_model

            self._model, self._tok = load_model(self._path(), device=self.device, progress=False)
            self._model.eval()

    # -- features -------------------------------------------------------------------------------
    def encode_examples(self, examples: Sequence[Example]) -> np.ndarray:
        return self.encode_groups([examples])[0]

    def embed(self, examples: Sequence[Example], cache_dir: str | os.PathLike | None = None,
              use_cache: bool = True) -> np.ndarray:
        """`encode_examples` through the on-disk feature cache (`gptfluence.features.cache`; key:
        this spec and the example's prompt and target), so no gradient is computed twice: one
        encoder call for all examples not cached yet."""
        from gptfluence.features.cache import embed_texts

        keys = [json.dumps([e.prompt, e.target], ensure_ascii=False) for e in examples]
        ids = {k: e.id for k, e in zip(keys, examples)}  # errors name the example's id
        return embed_texts(_PromptTargetTexts(self, ids), keys, cache_dir=cache_dir, use_cache=use_cache)

    def encode_groups(self, groups: Sequence[Sequence[Example]]) -> list[np.ndarray]:
        """`encode_examples` of several lists (e.g. training and test examples, whose ids may
        coincide) with one projection pass per model: ``[float32 [len(g), out_dim] for g in groups]``."""
        import torch

        groups = [list(g) for g in groups]
        sizes = [len(g) for g in groups]
        if not sum(sizes):
            return [np.zeros((0, self.out_dim), dtype=np.float32) for _ in groups]
        blocks = []
        for c, (model, tok) in enumerate(self._models()):
            grads = torch.cat([self._gradients(model, tok, g) for g in groups if g])
            if self.preconditioner != "kfac":
                blocks.append(self._project(grads))
            if self.preconditioner != "none":
                if c == len(self._kfac):  # checkpoint c's factors: computed on the first call only
                    self._kfac.append(kfac_factors(model, tok, self.factor_examples, self.max_length))
                blocks.append(self._project(kfac_whiten_gradients(model, grads, self._kfac[c], self.damping)))
        out = torch.cat(blocks, 1).numpy()
        return list(np.split(out, np.cumsum(sizes)[:-1]))

    def _models(self) -> Any:
        """Yield ``(model, tokenizer)``: the model once without a replay, else at each replay
        step. The run is replayed once per encoder; the checkpoints' weights are kept on the CPU
        (K copies of the model) for later calls."""
        if self.replay is None:
            self._load()
            yield self._model, self._tok
        elif self._checkpoints is None:
            from gptfluence.dynamics.collect import replay_run

            kept = []
            for _, model, tok in replay_run(self.replay.dynamics, self.replay.run_id, self.replay.steps, self.device):
                kept.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
                self._model, self._tok = model, tok
                yield model, tok
            self._checkpoints = kept
        else:
            for state in self._checkpoints:
                self._model.load_state_dict(state)
                self._model.eval()
                yield self._model, self._tok

    def _gradients(self, model: Any, tokenizer: Any, examples: list[Example]) -> Any:
        """Unprojected gradients ``[N, params]`` float32 of each example's mean target loss."""
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.empty(len(examples), sum(p.numel() for p in params), dtype=torch.float32)
        for i, loss in per_example_losses(model, tokenizer, examples, self.max_length):
            if not torch.isfinite(loss):
                raise InputError(f"example id {examples[i].meta.get('id', examples[i].id)}: no target tokens within "
                                 f"max_length={self.max_length}")
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


PRECONDITIONERS = ("none", "kfac", "none+kfac")


def blocks_per_checkpoint(preconditioner: str) -> int:
    """Feature blocks per checkpoint: 2 with ``"none+kfac"`` (raw, then whitened), else 1."""
    return 2 if preconditioner == "none+kfac" else 1


def per_example_losses(model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int) -> Any:
    """Yield ``(i, loss)``: example i's mean target loss (a 0-d tensor with a graph, NaN when no
    target token fits in ``max_length``), one forward pass at a time, gradients zeroed before each."""
    from gptfluence.lm import tokenize_examples
    from gptfluence.lm.metrics import masked_target_loss

    toks = tokenize_examples(tokenizer, list(examples), max_length)
    dev = next(model.parameters()).device
    for i in range(len(examples)):
        model.zero_grad(set_to_none=True)
        n = int(toks.lengths[i])
        logits = model(input_ids=toks.input_ids[i:i + 1, :n].to(dev),
                       attention_mask=toks.attention_mask[i:i + 1, :n].to(dev)).logits
        yield i, masked_target_loss(logits, toks.labels[i:i + 1, :n].to(dev))[0]


def _linear_layers(model: Any) -> list[Any]:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]


def kfac_factors(model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int) -> dict[str, tuple[Any, Any]]:
    """``{linear layer's name in model.named_modules(): (A, S)}`` float64: A = mean over all
    tokens of ``[a, 1] [a, 1]^T`` (the layer's input, with a 1 for the bias when it has one), S =
    mean over examples of the sum over tokens of ``d d^T`` (d = gradient of the example's mean
    target loss at the layer's output). Keyed by name, so the factors of a checkpoint apply to any
    model object holding its weights."""
    import torch

    layers = _linear_layers(model)
    A = {m: torch.zeros(m.in_features + (m.bias is not None), m.in_features + (m.bias is not None), dtype=torch.float64)
         for m in layers}
    S = {m: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for m in layers}
    inputs: dict[Any, Any] = {}
    n_tokens = {m: 0 for m in layers}

    def forward_hook(mod: Any, inp: Any, out: Any) -> None:
        inputs[mod] = inp[0].detach()

    def backward_hook(mod: Any, grad_in: Any, grad_out: Any) -> None:
        a = inputs[mod].reshape(-1, mod.in_features).double().cpu()
        if mod.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        d = grad_out[0].detach().reshape(-1, mod.out_features).double().cpu()
        A[mod] += a.T @ a
        S[mod] += d.T @ d
        n_tokens[mod] += a.shape[0]

    hooks = [h for m in layers for h in (m.register_forward_hook(forward_hook), m.register_full_backward_hook(backward_hook))]
    try:
        for _, loss in per_example_losses(model, tokenizer, examples, max_length):
            if torch.isfinite(loss):
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    names = {m: name for name, m in model.named_modules()}
    return {names[m]: (A[m] / max(n_tokens[m], 1), S[m] / max(len(examples), 1)) for m in layers}


def kfac_whiten(G: Any, A: Any, S: Any, damping: float) -> Any:
    """``G [N, out, in] -> [N, out * in]``: ``Q_S^T G Q_A / sqrt(l_S l_A^T + damping * mean(l_S l_A^T))``
    (eigendecompositions A = Q_A diag(l_A) Q_A^T, S likewise; negative eigenvalues clipped to 0), so
    that ``<whiten(G_i), whiten(G_m)> = vec(G_i)^T (S (x) A + lambda I)^{-1} vec(G_m)`` with
    lambda = damping x the mean eigenvalue product."""
    import torch

    la, qa = torch.linalg.eigh(A.double())
    ls, qs = torch.linalg.eigh(S.double())
    lam = torch.outer(ls.clamp(min=0), la.clamp(min=0))
    scale = (lam + damping * lam.mean() + 1e-30).rsqrt()
    out = (qs.T @ G.double() @ qa) * scale
    return out.reshape(G.shape[0], -1).float()


def kfac_whiten_gradients(model: Any, grads: Any, factors: dict[str, tuple[Any, Any]], damping: float) -> Any:
    """Flat per-example gradients ``[N, params]`` (in ``model.parameters()`` order) -> the
    K-FAC-whitened gradients of the Linear layers, concatenated ``[N, sum out x (in + bias)]``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    where = {id(p): (int(offsets[k]), int(offsets[k + 1])) for k, p in enumerate(params)}
    modules = dict(model.named_modules())
    parts = []
    for name, (A, S) in factors.items():
        m = modules[name]
        s, e = where[id(m.weight)]
        G = grads[:, s:e].reshape(-1, m.out_features, m.in_features)
        if m.bias is not None:
            s, e = where[id(m.bias)]
            G = torch.cat([G, grads[:, s:e].reshape(-1, m.out_features, 1)], 2)
        parts.append(kfac_whiten(G, A, S, damping))
    return torch.cat(parts, 1)


class _PromptTargetTexts:
    """`LossGradientEncoder` seen by the text-feature cache: a "text" is the JSON ``[prompt, target]``."""

    def __init__(self, encoder: LossGradientEncoder, ids: dict[str, int]) -> None:
        self.encoder = encoder
        self.ids = ids
        self.dim = encoder.out_dim
        self.name = f"loss-gradient({encoder.model_id})"

    def spec(self) -> dict[str, Any]:
        # nested: the cache's spec.json keeps the vector width in its own top-level "dim"; the
        # store's location is not part of the key (a moved store keeps its cached features)
        spec = self.encoder.spec()
        if "checkpoints" in spec:
            spec["checkpoints"] = {k: v for k, v in spec["checkpoints"].items() if k != "store"}
        return {"kind": "loss-gradient-features", "encoder": spec, "input": "json [prompt, target]"}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        pairs = [json.loads(t) for t in texts]
        # positional ids (training and test ids may coincide); meta["id"]: the id errors name
        return self.encoder.encode_examples([Example(k, p, tg, meta={"id": self.ids.get(t, k)})
                                             for k, (t, (p, tg)) in enumerate(zip(texts, pairs))])
