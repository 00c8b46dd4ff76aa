"""Influence scores from maintained attribution libraries (peers), run through their own APIs.

A peer scores ONE model: the fine-tuning of a store run re-trained (`load_peer_inputs`: the
store's base model, collection settings, the run's curriculum and seed, replayed to a step,
default the final one). Each example is tokenised as our gradients see it
(`gptfluence.features.per_example.tokenized_rows`: training examples as the training step sees
them, with eos; test examples as the loss metric sees them, without), and every library gets
the same per-example loss: the mean cross-entropy over the example's target tokens
(`gptfluence.lm.metrics.masked_target_loss`), the loss our stores record. Rows are right padded
and no attention mask is passed: under causal attention a real token never sees padding, so the
loss equals the unpadded one.

Two outputs per method (`PEERS`, names ``library/method``):

* `peer_scores` -> ``[N_train, M_test]`` float64. SIGN: positive = helpful (training on the
  example lowers the test example's loss, to first order); each library's own convention is
  stated on its function below and flipped where needed.
* `peer_self_influence` -> ``[N_train]`` float64: the library's self-influence (an example's
  score for itself; LARGER = more suspicious, e.g. mislabelled). A method whose library offers
  none raises `MethodUnavailable` (`PeerSpec.self_influence` is False) instead of inventing one.

Libraries are optional (``make setup-peers``; README, "Peer libraries"): a missing one is an
`InputError` naming the install command. Library settings are passed explicitly (never through
a library's module-level defaults, which dattri mutates in place); libraries are not patched.

A linear datamodel turns scores into a curriculum prediction: the sum of the scores of the
examples it holds, with repeats (`gptfluence.analysis.lds.datamodel_predict`, sign -1 for loss).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gptfluence.errors import InputError, MethodUnavailable
from gptfluence.features.per_example import eager_copy

INSTALL_HINT = "make setup-peers (or: pip install -e '.[peers]' && pip install --no-deps kronfluence==1.0.1); see README, Peer libraries"


# ---------------------------------------------------------------------------------------------
# inputs: one model, tokenised examples


@dataclasses.dataclass
class PeerInputs:
    """What every peer scores: ``model`` (a private copy with eager attention, eval mode),
    ``train_rows`` / ``test_rows`` (``(input_ids [N, L], labels [N, L])``, -100 outside the target),
    the ids of their rows (``train_ids [N]``, ``test_ids [M]``), and where the model came from."""

    model: Any
    train_ids: np.ndarray
    test_ids: np.ndarray
    train_rows: tuple[Any, Any]
    test_rows: tuple[Any, Any]
    run_id: str = ""
    step: int = -1

    def fresh_model(self) -> Any:
        """A copy of ``model`` for a library that wraps or modifies the model it is given."""
        m = copy.deepcopy(self.model)
        m.eval()
        return m


def make_inputs(model: Any, tokenizer: Any, train_examples: Sequence[Any], test_examples: Sequence[Any],
                max_length: int, run_id: str = "", step: int = -1) -> PeerInputs:
    """`PeerInputs` of ``model`` (copied, eager attention) and the examples (tokenised as our
    gradients see them: training with eos, test without)."""
    from gptfluence.features.per_example import tokenized_rows

    if not train_examples or not test_examples:
        raise InputError("peers need at least one training and one test example")
    return PeerInputs(eager_copy(model), np.asarray([e.id for e in train_examples], np.int64),
                      np.asarray([e.id for e in test_examples], np.int64),
                      tokenized_rows(tokenizer, train_examples, max_length, append_eos=True),
                      tokenized_rows(tokenizer, test_examples, max_length, append_eos=False), run_id, step)


def load_peer_inputs(dynamics: Any, run_id: str, step: int | None = None, train_ids: Sequence[int] | None = None,
                     test_ids: Sequence[int] | None = None, device: str = "cpu") -> PeerInputs:
    """Re-train store run ``run_id`` (`gptfluence.dynamics.collect.replay_run`) to ``step``
    (default: its last, T) and return `PeerInputs` of that model and the store's training pool /
    test set (or the given ids, in that order)."""
    from gptfluence.dynamics.collect import replay_run
    from gptfluence.simulators.tracin import _model_or_unavailable
    from gptfluence.types import rows_for

    _model_or_unavailable(dynamics)
    run = dynamics.run(run_id)
    T = run.num_steps if step is None else int(step)
    tr_ids = dynamics.train_ids if train_ids is None else np.asarray(train_ids, np.int64)
    te_ids = dynamics.test_ids if test_ids is None else np.asarray(test_ids, np.int64)
    train = [dynamics.task.train[r] for r in rows_for(tr_ids.tolist(), dynamics.train_row, "training")]
    test = [dynamics.task.test[r] for r in rows_for(te_ids.tolist(), dynamics.test_row, "test")]
    max_len = int((dynamics.manifest.get("config") or {}).get("max_length", 64))
    for s, model, tok in replay_run(dynamics, run_id, [T], device):
        return make_inputs(model, tok, train, test, max_len, run_id=run_id, step=s)
    raise InputError(f"run {run_id!r}: replay yielded no model at step {T}")  # pragma: no cover


def example_loss(model: Any, input_ids: Any, labels: Any) -> Any:
    """``[B]`` per-example mean target-token cross-entropy (nats per token) of right-padded rows,
    no attention mask (see the module doc)."""
    from gptfluence.lm.metrics import masked_target_loss

    return masked_target_loss(model(input_ids=input_ids, use_cache=False).logits, labels)


def _require(module: str, dist: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"peer library {dist} is not installed ({e.name or module}): {INSTALL_HINT}") from None


def library_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (`InputError` when it is missing)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"peer library {dist} is not installed: {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------
# captum: TracInCP


def _captum_parts(inputs: PeerInputs) -> tuple[Any, Any, Any]:
    import torch

    from gptfluence.lm.metrics import masked_target_loss

    class LogitsModel(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Any) -> Any:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    class PerExampleLoss(torch.nn.Module):
        reduction = "none"  # captum: per-example losses -> per-example gradients

        def forward(self, logits: Any, labels: Any) -> Any:
            return masked_target_loss(logits, labels)

    wrapped = LogitsModel(inputs.fresh_model())
    train = torch.utils.data.TensorDataset(*inputs.train_rows)
    return wrapped, PerExampleLoss(), train


def _captum_tracin(inputs: PeerInputs, self_only: bool, batch_size: int = 32) -> np.ndarray:
    """captum ``TracInCP`` with one checkpoint (the scored model) and learning-rate weight 1:
    ``score[i, m] = <grad loss(train_i), grad loss(test_m)>`` over every parameter (captum:
    positive = proponent = helpful; no flip). Self-influence: ``|grad loss(train_i)|^2``."""
    import torch

    tr = _require("captum.influence", "captum")
    wrapped, loss, train = _captum_parts(inputs)
    with tempfile.TemporaryDirectory(prefix="gptfluence-captum-") as tmp:
        ck = str(Path(tmp) / "model.pt")
        torch.save(wrapped.state_dict(), ck)

        def load(model: Any, path: str) -> float:
            model.load_state_dict(torch.load(path, weights_only=True))
            return 1.0  # learning-rate weight of the checkpoint: plain gradient dot products

        t = tr.TracInCP(wrapped, train, checkpoints=[ck], checkpoints_load_func=load, loss_fn=loss,
                        batch_size=batch_size, sample_wise_grads_per_batch=False)
        if self_only:
            return t.self_influence(show_progress=False).detach().double().numpy()
        s = t.influence(tuple(inputs.test_rows), show_progress=False)  # [M, N]
    return s.detach().double().numpy().T


# ---------------------------------------------------------------------------------------------
# kronfluence: EK-FAC, K-FAC, diagonal, identity preconditioners


def _kron_task(kron_task_mod: Any, seed: int) -> Any:
    import torch

    from gptfluence.lm.metrics import masked_target_loss

    class LMTask(kron_task_mod.Task):
        """Summed per-example target losses (kronfluence wants the batch SUM); ``sample=True``
        draws the target tokens from the model (true Fisher), as kronfluence's LM examples do,
        from a generator seeded with ``seed`` (the scores are reproducible)."""

        gen = torch.Generator().manual_seed(int(seed))

        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1].detach().float(), -1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=self.gen)
                    drawn = drawn.view(probs.shape[:2]).to(labels.device)
                labels = labels.clone()
                labels[:, 1:] = torch.where(labels[:, 1:] != -100, drawn, labels[:, 1:])
            return masked_target_loss(logits, labels).sum()

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            return masked_target_loss(model(input_ids=batch["input_ids"], use_cache=False).logits,
                                      batch["labels"]).sum()

        def get_attention_mask(self, batch: Any) -> Any:
            return batch["attention_mask"]  # padding stays out of the activation covariances

    return LMTask()


class _Rows:
    """A map-style dataset of dict rows (kronfluence's dataloaders collate them)."""

    def __init__(self, rows: tuple[Any, Any]) -> None:
        import torch

        ids, labels = rows
        has = labels != -100
        last = torch.where(has.any(1), (has * torch.arange(labels.shape[1])).argmax(1), 0)
        self.ids, self.labels = ids, labels
        self.mask = (torch.arange(ids.shape[1])[None, :] <= last[:, None]).long()  # the target ends each row

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "attention_mask": self.mask[i]}


def _kronfluence(inputs: PeerInputs, self_only: bool, strategy: str, batch_size: int = 32,
                 damping: float | None = None, seed: int = 0) -> np.ndarray:
    """kronfluence ``Analyzer``: factors fitted on the training pool with ``strategy`` (ekfac,
    kfac, diagonal, identity), then ``g_test^T (H + damping I)^-1 g_train`` over the Linear layers
    kronfluence tracks (not the embeddings). kronfluence: positive = the training example lowers
    the measurement (our loss) = helpful; no flip. ``damping``: None = the library's default
    (kronfluence 1.0.1: 1e-8); ``seed``: of the sampled labels of the Fisher factors.
    Self-influence: ``compute_self_scores`` (``g^T H^-1 g``)."""
    import logging

    _require("kronfluence", "kronfluence")
    analyzer_mod = _require("kronfluence.analyzer", "kronfluence")
    args_mod = _require("kronfluence.arguments", "kronfluence")
    task = _kron_task(_require("kronfluence.task", "kronfluence"), seed)
    model = analyzer_mod.prepare_model(inputs.fresh_model(), task)
    train, test = _Rows(inputs.train_rows), _Rows(inputs.test_rows)
    score_kw = {} if damping is None else {"damping_factor": float(damping)}
    with tempfile.TemporaryDirectory(prefix="gptfluence-kronfluence-") as tmp:
        an = analyzer_mod.Analyzer(analysis_name="peer", model=model, task=task, cpu=True, disable_tqdm=True,
                                   log_level=logging.WARNING, output_dir=tmp, disable_model_save=True)
        an.fit_all_factors("f", train, per_device_batch_size=batch_size,
                           factor_args=args_mod.FactorArguments(strategy=strategy))
        if self_only:
            an.compute_self_scores("s", "f", train, per_device_train_batch_size=batch_size,
                                   score_args=args_mod.ScoreArguments(**score_kw))
            out = an.load_self_scores("s")["all_modules"]  # [N]
            return out.detach().double().numpy()
        an.compute_pairwise_scores("s", "f", test, train, per_device_query_batch_size=batch_size,
                                   per_device_train_batch_size=batch_size,
                                   score_args=args_mod.ScoreArguments(**score_kw))
        out = an.load_pairwise_scores("s")["all_modules"]  # [M, N]
    return out.detach().double().numpy().T


# ---------------------------------------------------------------------------------------------
# dattri: TracIn (projected), TRAK


def _dattri_task(inputs: PeerInputs, target: str) -> tuple[Any, Any, Any, Any]:
    """(AttributionTask, model, train loader, test loader). ``target``: ``loss`` (the mean target
    loss) or ``margin`` (TRAK's ``log p / (1 - p)`` with ``p = exp(-loss)``, larger = better)."""
    import torch
    from torch.func import functional_call

    from gptfluence.lm.metrics import masked_target_loss

    task_mod = _require("dattri.task", "dattri")
    model = inputs.fresh_model()

    def loss(params: Any, data: Any) -> Any:
        ids, labels = data
        logits = functional_call(model, params, (), {"input_ids": ids[None], "use_cache": False}).logits
        return masked_target_loss(logits, labels[None])[0]

    def margin(params: Any, data: Any) -> Any:
        lo = loss(params, data)
        return -lo - torch.log(-torch.expm1(-lo))

    f = loss if target == "loss" else margin
    task = task_mod.AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())

    def loader(rows: tuple[Any, Any]) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*rows), batch_size=32, shuffle=False)

    return task, model, loader(inputs.train_rows), loader(inputs.test_rows)


def _projector(proj_dim: int, seed: int) -> dict[str, Any] | None:
    """dattri projector settings, a fresh dict per attributor (dattri's module default is shared
    and mutated by every constructor that is given kwargs: never pass them through it)."""
    if proj_dim <= 0:
        return None
    return {"proj_dim": int(proj_dim), "proj_max_batch_size": 32, "proj_seed": int(seed), "device": "cpu",
            "proj_type": "normal"}


def _dattri_tracin(inputs: PeerInputs, self_only: bool, proj_dim: int = 512, seed: int = 0) -> np.ndarray:
    """dattri ``TracInAttributor`` with one checkpoint of weight 1 (Grad-Dot at the scored model)
    on gradients randomly projected to ``proj_dim`` (dattri's default 512, normal projection;
    0 = unprojected): ``score[i, m] = <P g_train_i, P g_test_m>`` (dattri: positive = helpful; no
    flip). Self-influence: ``self_attribute`` (``|P g_train_i|^2``)."""
    import torch

    alg = _require("dattri.algorithm.tracin", "dattri")
    task, _, train, test = _dattri_task(inputs, "loss")
    att = alg.TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False, projector_kwargs=None,
                               device="cpu")
    att.projector_kwargs = _projector(proj_dim, seed)  # the constructor left dattri's shared default in place
    out = att.self_attribute(train) if self_only else att.attribute(train, test)
    return out.detach().double().numpy()


def _dattri_trak(inputs: PeerInputs, self_only: bool, proj_dim: int = 128, regularization: float = 0.0,
                 seed: int = 0) -> np.ndarray:
    """dattri ``TRAKAttributor`` (one model): gradients of the margin ``f = log p / (1 - p)``,
    ``p = exp(-loss)`` projected to ``proj_dim`` (default 128, fewer than the 200 examples of a
    built-in pool: with more dimensions than training examples and no regularization TRAK's
    kernel is singular), ``score = f_test^T (F^T F + reg I)^-1 f_train (1 - p_train)`` (dattri /
    TRAK: positive = raises the test margin = helpful; no flip). Self-influence:
    ``self_attribute``."""
    alg = _require("dattri.algorithm.trak", "dattri")
    task, model, train, test = _dattri_task(inputs, "margin")
    from gptfluence.lm.metrics import masked_target_loss
    import torch
    from torch.func import functional_call

    def correct_probability(params: Any, data: Any) -> Any:  # dattri passes the parameters as a dict
        ids, labels = data
        logits = functional_call(model, params, (), {"input_ids": ids[None], "use_cache": False}).logits
        return torch.exp(-masked_target_loss(logits, labels[None])[0])

    att = alg.TRAKAttributor(task=task, correct_probability_func=correct_probability, projector_kwargs=None,
                             device="cpu", regularization=float(regularization))
    att.projector_kwargs = _projector(proj_dim, seed)
    if self_only:
        return att.self_attribute(train).detach().double().numpy()
    att.cache(train)
    return att.attribute(test).detach().double().numpy()


# ---------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """One peer method: ``name`` (``library/method``), the PyPI distribution ``library``, the
    function ``run(inputs, self_only, **options) -> array`` and whether the library offers a
    self-influence (``self_influence``)."""

    name: str
    library: str
    run: Callable[..., np.ndarray]
    self_influence: bool
    description: str


PEERS: dict[str, PeerSpec] = {}


def register_peer(spec: PeerSpec) -> None:
    PEERS[spec.name] = spec


register_peer(PeerSpec("captum/tracincp", "captum", _captum_tracin, True,
                       "captum TracInCP at one checkpoint (the scored model), lr weight 1: exact gradient dot products"))
for _s in ("ekfac", "kfac", "diagonal", "identity"):
    register_peer(PeerSpec(f"kronfluence/{_s}", "kronfluence",
                           lambda inputs, self_only, _s=_s, **kw: _kronfluence(inputs, self_only, _s, **kw), True,
                           f"kronfluence influence function, {_s} Hessian approximation over Linear layers"))
register_peer(PeerSpec("dattri/tracin", "dattri", _dattri_tracin, True,
                       "dattri TracIn at one checkpoint (Grad-Dot), gradients projected to 512 dims (dattri's default)"))
register_peer(PeerSpec("dattri/trak", "dattri", _dattri_trak, True,
                       "dattri TRAK, one model, margin gradients projected to 128 dims"))


def peer_spec(name: str) -> PeerSpec:
    if name not in PEERS:
        raise InputError(f"unknown peer method {name!r}; choose from {', '.join(PEERS)}")
    return PEERS[name]


def peer_version(name: str) -> str:
    """The installed version of ``name``'s library (`InputError` when missing)."""
    return library_version(peer_spec(name).library)


def _threads_kept(fn: Callable[[], np.ndarray]) -> np.ndarray:
    import torch

    n = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def peer_scores(name: str, inputs: PeerInputs, **options: Any) -> np.ndarray:
    """``[N_train, M_test]`` float64 influence scores of method ``name`` (`PEERS`) on ``inputs``;
    positive = helpful (see the module doc). ``options``: the method's keyword settings."""
    spec = peer_spec(name)
    library_version(spec.library)
    out = _threads_kept(lambda: spec.run(inputs, False, **options))
    N, M = inputs.train_rows[0].shape[0], inputs.test_rows[0].shape[0]
    if out.shape != (N, M):  # pragma: no cover - a library changed its layout
        raise InputError(f"{name}: scores of shape {out.shape}, expected ({N}, {M})")
    return np.asarray(out, dtype=np.float64)


def peer_self_influence(name: str, inputs: PeerInputs, **options: Any) -> np.ndarray:
    """``[N_train]`` float64 self-influence of method ``name`` (larger = more suspicious);
    `MethodUnavailable` when the library offers none for this method."""
    spec = peer_spec(name)
    library_version(spec.library)
    if not spec.self_influence:
        raise MethodUnavailable(f"{name}: the library offers no self-influence")
    out = _threads_kept(lambda: spec.run(inputs, True, **options))
    return np.asarray(out, dtype=np.float64).reshape(-1)
