"""Per-example target-loss gradients with ``torch.func`` and their exact train x test dot products.

For an example z (tokens of prompt + target, right padded), ``g(z)`` is the gradient of the mean
cross-entropy over z's target tokens (labels != -100) with respect to every trainable parameter
of ``model``, at its current weights. Gradients come from ``vmap(grad(loss))`` over chunks of
examples (one batched forward/backward per chunk instead of one per example); the padding is on
the right and no attention mask is passed, so under causal attention a real token never sees a
pad token and the positions are the unpadded ones: the result equals the per-example loop of
`gptfluence.features.gradients.LossGradientEncoder._gradients` (tested). The model must run
without an attention mask under vmap: it is used as loaded (eager or sdpa without mask both work
for the default GPT-NeoX; sdpa *with* a mask does not).

Dot products ``D [N, M] float64 = <g(train_i), g(test_m)>`` are exact up to float32 rounding
(float32 block products accumulated in float64, see `dot_matrix`) unless a projection is asked for: ``project_dim > 0`` maps every gradient
with a seeded CountSketch (a hash to one of ``project_dim`` buckets and a random sign per
parameter; unbiased, ``E <Sa, Sb> = <a, b>``, relative error about ``sqrt(2 / project_dim)``), so no
``[N, params]`` matrix needs to be kept for large models. At the default base model's size (231k
parameters) the exact gradients of 300 examples take 0.28 GB: no projection is needed.

Units: loss in nats per target token; gradients in nats per parameter unit; dot products in
nats^2 per parameter-unit^2. To first order, one SGD step of learning rate ``eta`` on z changes
the loss of z' by ``-eta <g(z), g(z')>``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gptfluence.errors import InputError

DEFAULT_CHUNK = 32  # examples per vmap call


def eager_copy(model: Any) -> Any:
    """A copy of ``model`` with eager attention (vmap and double backward work through it), in
    eval mode; the original keeps its own attention implementation."""
    import copy

    m = copy.deepcopy(model)
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    m.eval()
    return m


def trainable_parameters(model: Any) -> dict[str, Any]:
    """``{name: tensor}`` of the parameters that require grad (detached), in ``named_parameters`` order."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def num_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


class CountSketch:
    """Seeded CountSketch of ``num_params``-dim vectors to ``dim`` buckets: ``S(x)[k] = sum_{p: h(p)=k}
    sign(p) x[p]``; ``E <S(a), S(b)> = <a, b>``. Hashes and signs come from a seeded generator."""

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        import torch

        if dim < 1:
            raise InputError(f"projection dim must be >= 1, got {dim}")
        gen = torch.Generator().manual_seed(int(seed))
        self.dim = int(dim)
        self.bucket = torch.randint(0, self.dim, (int(num_params),), generator=gen, dtype=torch.int64)
        self.sign = torch.randint(0, 2, (int(num_params),), generator=gen).float() * 2 - 1

    def __call__(self, grads: Any) -> Any:
        """``[n, params] -> [n, dim]`` float32."""
        import torch

        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float32, device=grads.device)
        out.index_add_(1, self.bucket.to(grads.device), grads.float() * self.sign.to(grads.device))
        return out


def per_example_gradients(model: Any, input_ids: Any, labels: Any, chunk: int = DEFAULT_CHUNK,
                          project: CountSketch | None = None) -> Any:
    """Gradients of each row's mean target loss: ``input_ids [N, L]``, ``labels [N, L]`` (-100 on
    prompt and padding; rows right padded) -> float32 ``[N, params]`` on the CPU, or ``[N, dim]``
    through ``project``. Parameter order: `trainable_parameters`. A row without target tokens is
    an `InputError`."""
    import torch
    from torch.func import functional_call, grad, vmap

    n = int(input_ids.shape[0])
    has_target = (labels[:, 1:] != -100).any(1)
    if n and not bool(has_target.all()):
        raise InputError(f"row {int((~has_target).nonzero()[0, 0])}: no target tokens to take a loss gradient of")
    params = trainable_parameters(model)
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    dev = next(iter(params.values())).device

    def loss(p: dict[str, Any], ids: Any, lab: Any) -> Any:
        logits = functional_call(model, (p, buffers), (), {"input_ids": ids[None], "use_cache": False}).logits[0, :-1]
        tgt = lab[1:]
        mask = tgt != -100
        ce = torch.nn.functional.cross_entropy(logits.float(), tgt.clamp_min(0), reduction="none")
        return (ce * mask).sum() / mask.sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))
    width = project.dim if project is not None else sum(v.numel() for v in params.values())
    out = torch.empty(n, width, dtype=torch.float32)
    for start in range(0, n, max(1, int(chunk))):
        ids = input_ids[start:start + chunk]
        lab = labels[start:start + chunk]
        # the target ends every sequence: trim the chunk's common right padding after its last target token
        L = int((lab != -100).nonzero()[:, 1].max()) + 1
        grads = g(params, ids[:, :L].to(dev), lab[:, :L].to(dev))
        flat = torch.cat([grads[k].reshape(ids.shape[0], -1) for k in params], 1)
        out[start:start + ids.shape[0]] = (project(flat) if project is not None else flat.float()).cpu()
    return out


def tokenized_rows(tokenizer: Any, examples: Sequence[Any], max_length: int, append_eos: bool) -> tuple[Any, Any]:
    """``(input_ids, labels)`` of examples as the training step (``append_eos=True``) or the loss
    metric (``append_eos=False``) sees them (`gptfluence.lm.tokenize_examples`)."""
    from gptfluence.lm import tokenize_examples

    tok = tokenize_examples(tokenizer, list(examples), max_length, append_eos=append_eos)
    return tok.input_ids, tok.labels


def dot_matrix(a: Any, b: Any, block: int = 1 << 14) -> np.ndarray:
    """``a [N, P] @ b [M, P].T`` -> ``[N, M]`` float64: float32 products over blocks of ``block``
    columns, accumulated in float64 (relative error ~1e-7 of the largest entry, the precision of
    the float32 gradients themselves; 4x faster than float64 products on a CPU)."""
    import torch

    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for s in range(0, a.shape[1], block):
        out += (a[:, s:s + block].float() @ b[:, s:s + block].float().T).double()
    return out.numpy()


def gradient_dots(model: Any, train_rows: tuple[Any, Any], test_rows: tuple[Any, Any], chunk: int = DEFAULT_CHUNK,
                  project_dim: int = 0, seed: int = 0, self_dots: bool = False) -> Any:
    """``D [N, M]`` float64, ``D[i, m] = <g(train_i), g(test_m)>`` at ``model``'s current weights
    (``train_rows`` / ``test_rows``: ``(input_ids, labels)``, see `tokenized_rows`). Exact for
    ``project_dim = 0``, else through a CountSketch of that dim (seed ``seed``). With
    ``self_dots``: also ``[N]`` float64 ``<g(train_i), g(train_i)>`` (returns ``(D, self)``).
    Only the test gradients and one chunk of training gradients are held at a time."""
    proj = CountSketch(num_parameters(model), project_dim, seed) if project_dim > 0 else None
    N, M = int(train_rows[0].shape[0]), int(test_rows[0].shape[0])
    D = np.zeros((N, M), dtype=np.float64)
    own = np.zeros(N, dtype=np.float64)
    gb = per_example_gradients(model, *test_rows, chunk=chunk, project=proj) if M else None
    step = max(1, int(chunk))
    for s in range(0, N if (M or self_dots) else 0, step):
        ga = per_example_gradients(model, train_rows[0][s:s + step], train_rows[1][s:s + step], chunk=step,
                                   project=proj)
        if gb is not None:
            D[s:s + step] = dot_matrix(ga, gb)
        if self_dots:
            own[s:s + step] = (ga.double() ** 2).sum(1).numpy()
    return (D, own) if self_dots else D
