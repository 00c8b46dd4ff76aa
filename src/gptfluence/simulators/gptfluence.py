"""GPTfluence: the featurized n-th order simulator (Chai et al., EMNLP 2024).

Factors from frozen text features h (encoder embeddings of prompt + target, centred on the mean
feature of the examples seen in fitting)::

    A_j(i, m) = < f_j(h_i), g_j(h_m) > + w_j s(i, m) + c_j          j = 1..n
    B(i, m)   = < f_B(h_i), g_B(h_m) > + w_B s(i, m) + c_B
    D_l(i, m) = v_l s(i, m)                                           l = 1..L (``b_lags``)
    phi_t[m]  = (1 + sum_{i in c_t} A_1(i, m)) phi_{t-1}[m] + sum_{j>=2} (sum_i A_j(i, m)) phi_{t-j}[m]
                + sum_{i in c_t} B(i, m) + sum_l sum_{i in c_{t-l}} D_l(i, m)

f, g: projections H -> proj_dim, linear by default (``hidden=0``) or 2-layer MLPs (H -> hidden ->
proj_dim, ReLU). c_j: one learned scalar per factor (``factor_bias``, init 0).

s(i, m), the similarity term (``similarity``; w_j learned, init 0): the cosine of a second
representation of the two examples, centred on the fitted training pool's mean direction (so a
random batch adds nothing on average: with ``detrend`` the trend holds the average effect) and
scaled to unit spread. ``"grad"``: projected target-loss gradients of the store's GPT
(`gptfluence.features.LossGradientEncoder`) at ``similarity_checkpoints`` steps evenly spaced
over the first fit run, re-trained with the store's settings (the base model alone when 1); one
such term per checkpoint, each with its own weight (w_j s = sum_c w_jc s_c), as TracIn-CP sums
over checkpoints, and with ``similarity_norms`` (default) one more per checkpoint on the dot
product of the gradients, each side divided by its pool's mean norm (the cosine drops how
strongly an example moves or is moved). To first order one SGD step on i changes m's loss by
``-lr <g_i, g_m>``, which is what B has to learn, and a low-rank projection of sentence features
cannot express such an identity-like inner product. ``similarity_preconditioner="kfac"``: the
gradients are first whitened by each Linear layer's K-FAC curvature over the training pool (dot
products = K-FAC influences, as kronfluence's); ``"none+kfac"`` (default) keeps both kinds of
terms, which ranks held-out curricula better on the built-in generation tasks and somewhat worse
on order-only ones than raw gradients (``"none"``) (README, "What raised LDS (3)").
``"features"``: the cosine of h itself. ``lexical`` (default): one more term, the cosine of the
word TF-IDF vectors of the two texts (`gptfluence.features.lexical`), beside whichever of these.
``"none"``: the paper's factors. ``"auto"`` (default): grad when the store names its model.

Defaults and the paper. The authors' exact configuration is the method ``gptfluence_paper``
(``gptfluence fit --preset paper``; every item and its source in `gptfluence.simulators.presets`):
MiniLM CLS features (unnormalised, 512 tokens), one 384-384-384 MLP per factor for both the train
and the test side (g_j = f_j), alpha_1 = sum A_1 without offset or bias, PyTorch's default
initialisation, raw values, Adam with coupled weight decay 1e-5, lr 1e-4, batch 128, 200 warm-up
steps then linear decay to 0 at epoch 300, their early-stopping rule, zero history padding. (An
earlier version of this docstring named a flag set with lr 1e-3, 60 epochs and our optimizer and
schedule as "the authors' configuration"; it was not.) With g = f the factor <f(h_i), f(h_m)> is
a positive semi-definite kernel: similar examples can only *raise* each other's factor, while for
a loss similar training examples lower it; and the MLPs overfit 25 runs. Measured on the built-in
tasks (README, "Accuracy"), the shared projection stays at the mean-curve reference, so the
defaults are: separate linear projections to 32 dimensions of centred MiniLM features, the
gradient similarity terms and the lexical (word TF-IDF cosine) term, fitted on the deviations from
the fit runs' mean trajectory.

Pool-mean A (``a_factors="pool_mean"``, default; ``"pair"``: the paper's). The model is fitted
with per-pair A_j(i, m) as above; after fitting, every A_j(i, m) is replaced by its mean over the
fitted training pool, ``<f_j(mean of h_i), g_j(h_m)> + c_j`` (the similarity terms' pool mean is 0 by
their centring; for the default linear projections this is exactly the mean of the fitted values).
The dynamics alpha_j of a step then depend on the test example and the batch size only; *which*
examples a batch holds acts through B, and the order of the curriculum through how the dynamics
carry earlier B forward. Measured on the built-in tasks, the per-pair variation of the fitted A is
mostly noise for ranking curricula (README, "What raised LDS (7)"): averaging it out raises LDS and
lowers the held-out trajectory MSE, although the fit seems to need it (in a quick run, not
committed, fitting A from the test side only ranked curricula worse than averaging after the fit).
The same holds for B's projection term when the similarity terms are the GPT's gradients
(``b_projection="auto"``, default: ``pool_mean`` then, ``pair`` otherwise): after fitting its training
side is the projection of the pool's mean feature, so which training example acts on which test
example is carried by the similarity terms alone (README, "What raised LDS (8)"); with encoder-cosine
and TF-IDF terms only (no model) that loses a label task's same-label effect, so ``auto`` keeps
``pair`` there.

Lagged additive factors (``b_lags`` L, default 24; 0: the paper's model). beta_t also gets, for
l = 1..L, ``sum_{i in c_{t-l}} D_l(i, m)`` with ``D_l(i, m) = sum_t v_lt s_t(i, m)``: the similarity
terms (no projection, no bias, so a random batch adds nothing on average) of the batch l steps
back, each lag with its own learned weights v_l (init 0: the fit starts from the paper's model).
An example can thus move a test example's value for a few steps and then undo part of it, or
more: on the built-in generation tasks a training example similar to the test example raises its
loss right after it is trained on (a transient interference) while lowering it in the long run,
so the *order* of a curriculum matters through the last few batches, which the paper's
recurrence of the current batch alone cannot express (README, "What raised LDS (9)"). With 24
lags (half of a built-in run's 48 steps) the weights v_l give each term a free profile over how
long ago a batch was trained, e.g. an effect that fades as later batches overwrite it, which the
recurrence's carry-forward (the same alpha for every past batch) cannot; loss LDS rose with the lag
count up to 24 and fell at 48 (README, "What raised LDS (12)"). Batches before the first simulated
step count as padding. `factors` returns A and B only.

Stability at initialisation (``residual=True``, default): alpha_1 carries a fixed identity offset
(alpha_1 = 1 + sum A_1) and the projections' last layers are scaled so that |A|, |B| ~ ``init_std``:
the first rollouts are ~constant instead of diverging. For full batches of size b this is the
paper's model with A_1^paper = A_1 + 1/b (a reparametrisation); a short (padded) batch keeps the
offset. ``residual=False`` gives the paper's literal alpha_1 = sum A_1 (then c_1 starts at 1/b;
without ``factor_bias``, as in the authors' code, there is no offset at all).

Values are fitted in normalised units (metric / scale, scale = mean |value| over the fit runs);
simulate() takes and returns metric units. The simulator holds features (and gradient features)
by example id, so it simulates training and test examples it never saw in fitting once their
features are known (`set_examples`, or `fit`/`load_simulator(..., dynamics=...)`, which embed
missing examples); the feature centres stay those computed in fitting (saved with the artifact).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from gptfluence.config import arg
from gptfluence.dynamics.store import Dynamics
from gptfluence.errors import ArtifactMismatchError, InputError
from gptfluence.simulators import engine
from gptfluence.simulators.common import (FitConfig, RecurrenceSimulator, config_error, config_from, flag_name,
                                         stored_config, write_artifact)
from gptfluence.features.cache import embed_examples
from gptfluence.features.encoders import Encoder, resolve_encoder
from gptfluence.features.lexical import TfidfFeatures
from gptfluence.types import Example


SIMILARITIES = ("auto", "grad", "features", "none")
B_LAGS_LR_SCALINGS = ("batch", "batch_and_step")
A_FACTORS = ("pair", "pool_mean")
B_PROJECTIONS = ("auto", "pair", "pool_mean")
INITS = ("scaled", "pytorch_default")
# Largest similarity tensor [terms, N, M] (elements) that `_factor_fn` computes once and keeps
# (64 Mi elements = 256 MiB in float32); larger pools recompute it on every call.
SIMILARITY_PRECOMPUTE_MAX = 64 * 2**20


@dataclasses.dataclass
class GPTfluenceConfig(FitConfig):
    """Hyper-parameters of the featurized simulator (see module doc)."""

    order: int = arg(3, "Markov order n (3: against n = 1 it lowers the held-out loss MSE on all five built-in tasks and raises the mean LDS over them, 0.315 -> 0.384, README \"Checking attribution\"; the paper's main tables use 1)")
    hidden: int = arg(0, "hidden width of each factor projection; 0 = a linear projection (authors' code: an MLP with 384)")
    proj_dim: int = arg(32, "output width d of each factor projection (authors' code: 384). 1 (a rank-one learned pair term, the similarity terms carrying which examples act on which) ranked held-out curricula better on the first task-data draw of the built-in tasks but worse on the second (yesno and translation random curricula), so 32 stays the default (README \"What raised LDS (5)\")")
    share_projection: bool = arg(False, "one projection per factor for both the train and the test side (authors' code); its factor is a PSD kernel, so similar examples can only raise each other's factor")
    center_features: bool = arg(True, "subtract the mean feature of the fitted examples before projecting (false: the authors' raw features)")
    similarity: str = arg("auto", "a learned-weight similarity term in every factor: 'grad' (cosine of the GPT's projected loss gradients, the first-order estimate of how training on one example moves another's loss), 'features' (cosine of the encoder features), 'none' (the paper's factors); 'auto' = 'grad' when the store records the model it was collected with, else 'features'")
    similarity_dim: int = arg(1024, "similarity='grad': dimensions of the random projection of the gradients (per checkpoint)")
    similarity_norms: bool = arg(True, "similarity='grad': besides each checkpoint's cosine, a learned-weight term on the dot product of gradients scaled by their pool's mean norm (keeps how strongly an example moves or is moved, which the cosine drops)")
    similarity_preconditioner: str = arg("none+kfac", "similarity='grad': none (raw projected gradients), kfac (each Linear layer's gradient whitened by its K-FAC curvature over the training pool at the same checkpoint, so that dot products are K-FAC influences; only Linear layers; see gptfluence.features.gradients) or none+kfac (both, each with its own terms). The default none+kfac raises loss LDS over held-out curricula against none (mean over the five built-in tasks and three validation splits, random curricula 0.433 -> 0.492, membership-only 0.453 -> 0.522) and lowers it on order-only curricula (0.287 -> 0.248); benchmarks/results/lds_kfac*.md")
    similarity_damping: float = arg(0.1, "similarity_preconditioner kfac / none+kfac: damping, as a fraction of the mean eigenvalue product of each layer's factors")
    similarity_checkpoints: int = arg(4, "similarity='grad': gradients at this many steps evenly spaced over the first fit run (its fine-tuning re-trained with the store's settings), one learned-weight cosine term per checkpoint (TracIn-CP sums over checkpoints); 1 = the base model only")
    lexical: bool = arg(True, "one more learned-weight similarity term in every factor: the cosine of the word TF-IDF vectors of the two examples' texts (gptfluence.features.lexical: sublinear tf, idf over the fitted store's training and test texts), the shared rare words that the sentence encoder blurs; it needs no model, so stores without one (imported GPTDynamics) get it too. Against no lexical term (the default until this version) it raises loss LDS over held-out curricula on the built-in tasks (mean over five tasks and three validation splits: random curricula 0.492 -> 0.502, membership-only 0.522 -> 0.531, order-only 0.248 -> 0.250; the second task-data draw 0.487 -> 0.497 and 0.521 -> 0.532; without a model 0.365 -> 0.401; benchmarks/results/lds_lexical_splits.md, lds_lexical_draw1.md) and lowers the held-out trajectory MSE on 8 of the 12 (task, metric) rows")
    lexical_max_features: int = arg(8192, "lexical: vocabulary size (the most frequent words of the store's texts)")
    a_factors: str = arg("pool_mean", "the multiplicative factors A_1..A_n in simulation: pair (the paper: A_j(i, m) from the training example i and the test example m) or pool_mean (our variant: fitted as pair, then each A_j(i, m) is replaced by its mean over the fitted training pool, <f_j(mean h_i), g_j(h_m)> + c_j; the similarity terms' pool mean is 0 by their centring), so a batch acts on the recurrence's dynamics alpha_j by its size alone and which examples it holds acts through B). Against pair (the default until this version) it raises loss LDS over held-out curricula on the built-in tasks (ensembles of 3, mean over five tasks and nine validation splits: random curricula 0.507 -> 0.527, membership-only 0.519 -> 0.535, order-only 0.272 -> 0.320; the second task-data draw, three splits: 0.498 -> 0.504, 0.514 -> 0.527, 0.296 -> 0.298; without a model 0.403 -> 0.430, 0.403 -> 0.422, 0.213 -> 0.261; benchmarks/results/lds_a_factors_*.md) and lowers the held-out trajectory MSE (README \"What raised LDS (7)\"); it is lower on sentiment's order-only curricula and on the second draw's sentiment")
    b_projection: str = arg("auto", "the projection term <f_B(h_i), g_B(h_m)> of the additive factor B in simulation: pair (the paper), pool_mean (fitted as pair, then the training side is the projection of the fitted pool's mean feature, so which training example acts on which test example is carried by the similarity terms alone) or auto (the default: pool_mean when the similarity terms are the model's gradients, similarity 'grad', else pair). With gradient terms pool_mean raises loss LDS over held-out curricula on the built-in tasks (ensembles with pool-mean A, mean over five tasks and nine validation splits: random curricula 0.527 -> 0.540, membership-only 0.535 -> 0.551, order-only 0.320 -> 0.330; data2text 0.661 -> 0.701; the second task-data draw 0.504 -> 0.523, 0.527 -> 0.546, 0.298 -> 0.301) at a held-out trajectory MSE within -1.7 % to +2.4 % of pair's; without a model (encoder-cosine and TF-IDF terms, which do not carry a label task's same-label effect) it ranks the label tasks' curricula near chance (sentiment 0.380 -> 0.091), hence auto (README \"What raised LDS (8)\", benchmarks/results/lds_b_projection_*.md)")
    b_lags: int = arg(24, "lagged additive factors (our extension, 0 = the paper's model): beta_t also gets, for l = 1..b_lags, D_l(c_{t-l}) = the batch l steps back, each example's D_l a learned-weight sum of its similarity terms with the test example (no projection), so a batch can move a test example's value for a few steps and then partly or wholly undo it (a transient effect, e.g. a similar example raising the loss right after it is trained on while helping in the long run). Without similarity terms (similarity none and no lexical term) there are none; fitted with the other factors. 3 lags against 0 raised loss LDS over held-out curricula on the built-in tasks (ensembles, mean over five tasks and nine validation splits: random curricula 0.540 -> 0.570, membership-only 0.551 -> 0.573, order-only 0.330 -> 0.365; data2text 0.701 -> 0.755, its order-only curricula 0.152 -> 0.296; the second task-data draw 0.523 -> 0.554, 0.546 -> 0.569, 0.301 -> 0.378; without a model 0.430 -> 0.458; benchmarks/results/lds_b_lags_*.md; README \"What raised LDS (9)\"). 6 (the default of a later version) against 3: 0.575 / 0.578 / 0.370 -> 0.590 / 0.607 / 0.397 over three validation splits, 0.554 / 0.569 / 0.378 -> 0.564 / 0.590 / 0.395 on the second draw (benchmarks/results/lds_b_lags6_*.md; README \"What raised LDS (11)\"). 24 (the default since the version after that; half of a built-in run's 48 steps) against 6: 0.594 / 0.615 / 0.402 -> 0.658 / 0.660 / 0.482 on split seed 0 (12 lags 0.622 / 0.638 / 0.444, 48 lags 0.650 / 0.650 / 0.442), 0.563 / 0.589 / 0.396 -> 0.636 / 0.634 / 0.440 on the second draw (three splits), accuracy 0.380 -> 0.472, BLEU 0.232 -> 0.245, ROUGE-L 0.259 -> 0.267 (benchmarks/results/lds_b_lags_long.md, lds_b_lags24_*.md; README \"What raised LDS (12)\"). Each lag adds one weight per similarity term; fit and rollout time grow with the lag count (24 lags fit in 1.6x the time of 6 and roll out in 2.6x on sentiment's loss, benchmarks/results/lag_cost.json). Test examples the fit never saw are predicted worse with more lags: data2text's unseen test examples have loss MSE 0.0138 with 6 lags, 0.0216 with 24, the mean curve 0.0184 (benchmarks/results/unseen_b_lags/); simulating such test examples, prefer 6")
    b_lags_lr_scaling: str = arg("batch_and_step", "with step_lr_scaling and b_lags under a schedule that is not constant: batch (each lagged factor D_l of the batch of step t-l times w_{t-l}, its own step's learning rate over the peak; the default of earlier versions) or batch_and_step (our variant: times w_t as well, the learning rate of the step t at which it acts: that later update is what carries the batch's delayed effect, so a step with learning rate 0 changes nothing). No effect on a constant schedule without warmup (the built-in default). On an entailment store trained under warmup and linear decay (the one it was chosen on) batch_and_step raises loss LDS over held-out curricula from 0.604 / 0.588 / 0.359 to 0.712 / 0.620 / 0.383 (random / membership-only / order-only, mean over three validation splits), and on the decaying-rate sentiment store no default was chosen on from 0.425 / 0.418 / 0.121 to 0.462 / 0.461 / 0.132 (benchmarks/results/lds_b_lags_lr_draw3.md, lds_b_lags_lr_draw2.md; README \"What raised LDS (13)\"); held-out trajectory MSE rose on the entailment store (+2.9 to +6.4 % over three splits) and fell on the sentiment one (-0.3 to -2.1 %; benchmarks/results/evaluate_decay*.md)")
    ensemble: int = arg(3, "bagged ensemble: fit this many members, the first on the given fit / validation split, each further one validating on other runs of the same pool (fit + validation runs) and fitting on the rest, with its own initialisation seed (seed + k); the simulator's factors are the members' mean, so it is still one recurrence (rollouts, influence scores and artifacts as for one model). Trend and scale then come from the runs no member validates on. Costs k fits. One model (1, the default until this version) depends strongly on which runs validate it (data2text loss LDS 0.61-0.73 over nine validation splits of the built-in store); 3 members lower the held-out trajectory MSE on 8 of the 12 built-in (task, metric) rows (loss -4 to -12 %) and, averaged over nine validation splits, raise loss LDS (mean over the five built-in tasks: random curricula 0.496 -> 0.507, membership-only 0.513 -> 0.519, order-only 0.257 -> 0.272; the second task-data draw 0.471 -> 0.498, 0.488 -> 0.514, 0.280 -> 0.296) with about half the spread over splits on four of the five tasks; data2text's random and membership-only LDS stay where they were (README \"What raised LDS (6)\", benchmarks/results/lds_ensemble_splits.md)")
    objective: str = arg("auto", "fitting loss: teacher_forcing (the paper: one-step MSE from true previous values), rollout (MSE of whole autoregressive rollouts of the fit runs, backpropagated through time), teacher_forcing_then_rollout (teacher forcing to its best validation epoch, then rollout from those weights, kept only if a rollout epoch beats them on the validation runs) or auto (the default: rollout for the metrics of decoded text, bleu, rougeL and accuracy; teacher_forcing_then_rollout for loss and any other metric). The two-phase objective raises loss LDS over held-out curricula on the built-in tasks (mean over the five tasks, random curricula 0.384 -> 0.440, membership-only 0.414 -> 0.459, order-only 0.262 -> 0.311; measured with raw gradient features, benchmarks/results/lds_builtin_raw_gradients.json) at a held-out trajectory MSE that was lower or equal on 8 of the 12 (task, metric) rows and up to 17 % higher on sentiment (README \"Accuracy on the built-in tasks\"); teacher_forcing keeps the lower MSE there. On bleu, rougeL and accuracy a rollout fit from the initial factors ranks held-out curricula better than the two-phase fit, whose rollout phase starts from teacher-forced weights that learned the metrics' step-to-step jumps (benchmarks/results/lds_objective_metrics.md; keeping the rollout phase's best epoch always changes nothing: lds_objective_keep_best_epoch.md). Both rollout objectives and the K-FAC terms make the simulator extrapolate worse to extreme curricula (one label only), which the data-selection search visits: `gptfluence select` fits with teacher_forcing and raw gradients (--fit-preset selection)")
    rollout_runs: int = arg(4, "objective=rollout / the rollout phase: fit runs per optimizer step (0 = all)")
    lr: float = arg(3e-4, "AdamW learning rate (after warmup)")
    epochs: int = arg(100, "maximum epochs over all teacher-forcing transitions of the fit runs (rollout phase: over the fit runs)")
    patience: int = arg(15, "stop after this many epochs without a better validation rollout MSE (0 = never)")
    residual: bool = arg(True, "alpha_1 = 1 + sum A_1 (stable start); false = the paper's literal alpha_1 = sum A_1 (gptfluence with factor_bias: c_1 starts at 1/batch; simfluence: N(0,1)-initialised A is then the whole alpha)")
    factor_bias: bool = arg(True, "a learned scalar offset per factor (lets A take either sign with a shared MLP)")
    init: str = arg("scaled", "initialisation. gptfluence: scaled (last layers scaled so that |A|, |B| ~ init_std) or pytorch_default (nn.Linear's own, the authors' code); simfluence: zeros or normal (N(0, 1), nn.Embedding's default in the authors' code)")
    init_std: float = arg(1e-3, "init=scaled: target RMS of the initial per-pair factors A, B (normalised units)")
    history_padding: str = arg("start", "order n > 1: the values before the first one of a trajectory (teacher forcing and rollouts): start (= the first value) or zeros (the authors' code)")
    encoder: str = arg("minilm", "text encoder spec for features ('minilm', a model path, or 'bow[:DIM]')")

    def validate(self) -> None:
        super().validate()
        for name, low in (("order", 1), ("proj_dim", 1), ("similarity_dim", 1), ("similarity_checkpoints", 1),
                          ("hidden", 0), ("lexical_max_features", 1), ("ensemble", 1), ("b_lags", 0)):
            if getattr(self, name) < low:
                raise config_error(self, name, f">= {low}")
        if not self.init_std > 0:
            raise config_error(self, "init_std", "> 0")
        if not self.similarity_damping > 0:
            raise config_error(self, "similarity_damping", "> 0")
        from gptfluence.features.gradients import PRECONDITIONERS

        for name, allowed in (("similarity", SIMILARITIES), ("a_factors", A_FACTORS), ("b_projection", B_PROJECTIONS),
                              ("b_lags_lr_scaling", B_LAGS_LR_SCALINGS),
                              ("init", INITS), ("history_padding", engine.HISTORY_PADDINGS),
                              ("similarity_preconditioner", PRECONDITIONERS)):
            engine.check_choice(flag_name(name), getattr(self, name), allowed)


class Projection(nn.Module):
    """h [N, H] -> [N, d]: Linear(H, d) when ``hidden == 0``, else Linear(H, hidden) -> ReLU ->
    Linear(hidden, d). ``l2`` is always the last layer."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        if hidden < 0:
            raise InputError(f"gptfluence: hidden must be >= 0 (0 = linear), got {hidden}")
        self.l1 = nn.Linear(in_dim, hidden) if hidden else None
        self.l2 = nn.Linear(hidden or in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.l2(h if self.l1 is None else torch.relu(self.l1(h)))


class FeaturizedFactors(nn.Module):
    """The n+1 factors (A_1..A_n, B) as inner products of projected features.

    `pair(k, h_train, h_test)` computes factor k for matching rows (the per-pair form the
    reference loop uses); `forward(H_train [N, H], H_test [M, H]) -> F [n+1, N, M]` is the matrix
    form: each projection runs once per call over all N + M examples. Features are centred on the
    buffer ``center [H]`` (zeros = no centring) before projecting.
    """

    def __init__(self, in_dim: int, hidden: int, proj_dim: int, order: int, share: bool, factor_bias: bool,
                 sim_dim: int = 0, sim_blocks: int = 1, sim_norms: bool = False, lex_dim: int = 0,
                 lags: int = 0) -> None:
        super().__init__()
        k = order + 1
        self.order = order
        self.lags = int(lags)
        # per-pair factors as fitted; GPTfluenceSimulator._apply_pooling sets False after fitting / loading:
        # a_pair (a_factors="pool_mean"): A_1..A_n from the training pool's mean feature; b_pair
        # (b_projection resolves to "pool_mean"): B's projection term likewise (B keeps its similarity terms)
        self.a_pair = True
        self.b_pair = True
        self.share = share
        self.f = nn.ModuleList(Projection(in_dim, hidden, proj_dim) for _ in range(k))
        self.g = None if share else nn.ModuleList(Projection(in_dim, hidden, proj_dim) for _ in range(k))
        self.bias = nn.Parameter(torch.zeros(k)) if factor_bias else None
        self.register_buffer("center", torch.zeros(in_dim))
        self.register_buffer("train_mean", torch.zeros(in_dim))  # mean feature of the fitted training pool
        self.sim_dim = int(sim_dim) + int(lex_dim)  # width of the similarity features s: main blocks, then lexical
        self.sim_blocks = int(sim_blocks) if sim_dim else 0
        self.sim_norms = bool(sim_norms) and bool(sim_dim)
        self.lex_dim = int(lex_dim)
        if sim_dim and (self.sim_blocks < 1 or sim_dim % self.sim_blocks):
            raise InputError(f"gptfluence: similarity width {sim_dim} is not {sim_blocks} equal blocks")
        # block widths of s: the main source's equal blocks, then the lexical block (if any)
        self.block_widths = [int(sim_dim) // self.sim_blocks] * self.sim_blocks if sim_dim else []
        if self.lex_dim:
            self.block_widths.append(self.lex_dim)
        # terms: (block, kind) with kind 'cos' for every block, then 'dot' for the main blocks with sim_norms
        self.term_blocks = list(range(len(self.block_widths))) + (list(range(self.sim_blocks)) if self.sim_norms else [])
        if self.sim_dim:  # factor k += sum_t sim_weight[k, t] * <v_it - sim_center[t], v_mt> / sim_scale[t]
            n = self.sim_terms
            self.sim_weight = nn.Parameter(torch.zeros(k, n))
            # per term its centre (width = its block's), all terms' centres concatenated
            self.register_buffer("sim_center", torch.zeros(sum(self.block_widths[b] for b in self.term_blocks)))
            self.register_buffer("sim_scale", torch.ones(n))
            if self.sim_norms:  # mean block norm of the fitted training / test examples
                self.register_buffer("sim_norm_train", torch.ones(self.sim_blocks))
                self.register_buffer("sim_norm_test", torch.ones(self.sim_blocks))
        if not self.sim_dim:
            self.lags = 0  # D_l are made of similarity terms: without any, no lagged factors
        if self.lags:  # D_l(i, m) = sum_t lag_weight[l-1, t] * similarity term t (b_lags)
            self.lag_weight = nn.Parameter(torch.zeros(self.lags, self.sim_terms))

    @property
    def sim_terms(self) -> int:
        """Similarity terms per factor: one cosine per block (the lexical block included), plus one
        norm-keeping dot product per main block with ``sim_norms``."""
        return len(self.term_blocks)

    def _g(self, k: int) -> Projection:
        return self.f[k] if self.g is None else self.g[k]

    def _views(self, s: torch.Tensor, side: str) -> list[torch.Tensor]:
        """``s [N, sim_dim]`` -> one ``[N, width]`` tensor per term: each block scaled to unit length
        (cosine terms), then with ``sim_norms`` each main block divided by the fitted examples' mean
        block norm on this ``side`` ('train' / 'test'), so an example's gradient norm (how strongly
        it moves, or is moved) is kept (dot-product terms)."""
        parts = torch.split(s, self.block_widths, dim=1)
        views = [nn.functional.normalize(x, dim=-1) for x in parts]
        if self.sim_norms:
            norm = self.sim_norm_train if side == "train" else self.sim_norm_test
            views += [parts[b] / norm[b] for b in range(self.sim_blocks)]
        return views

    def _centers(self) -> list[torch.Tensor]:
        return list(torch.split(self.sim_center, [self.block_widths[b] for b in self.term_blocks]))

    def similarity(self, s_train: torch.Tensor, s_test: torch.Tensor) -> torch.Tensor:
        """``[terms, N, M]``: per block (one checkpoint's gradients, the whole encoder vector, the
        lexical TF-IDF vector) the cosine (and with ``sim_norms`` the norm-keeping dot product) of
        the similarity features, centred on the fitted training pool's mean (so a random batch adds
        nothing on average) and scaled to unit spread."""
        a, b = self._views(s_train, "train"), self._views(s_test, "test")
        return torch.stack([(x - c) @ y.T for x, c, y in zip(a, self._centers(), b)]) / self.sim_scale[:, None, None]

    def forward(self, h_train: torch.Tensor, h_test: torch.Tensor, s_train: torch.Tensor | None = None,
                s_test: torch.Tensor | None = None, similarity: torch.Tensor | None = None) -> torch.Tensor:
        """``similarity``: ``self.similarity(s_train, s_test)`` computed beforehand (it has no
        learned parameters, so a fit computes it once instead of on every step)."""
        out = self._projected(h_train, h_test)
        if self.bias is not None:
            out = out + self.bias[:, None, None]
        if self.sim_dim:
            if similarity is None:
                if s_train is None or s_test is None:
                    raise InputError("gptfluence: this simulator has a similarity term; give s_train and s_test")
                similarity = self.similarity(s_train, s_test)
            out = out + torch.einsum("kb,bnm->knm", self._sim_weight(), similarity)
            if self.lags:  # the lagged additive factors D_1..D_L: similarity terms only
                out = torch.cat([out, torch.einsum("lb,bnm->lnm", self.lag_weight, similarity)])
        return out

    def _sim_weight(self) -> torch.Tensor:
        """``[n+1, terms]``: the similarity weights; the A rows zero without ``a_pair`` (the pool mean
        of a centred similarity term is 0)."""
        if self.a_pair:
            return self.sim_weight
        return torch.cat([torch.zeros_like(self.sim_weight[:self.order]), self.sim_weight[self.order:]])

    def _train_side(self, k: int, h_train: torch.Tensor) -> torch.Tensor:
        """Factor k's training-side projection of centred ``h_train [N, H]`` -> [N, d]. Without
        ``a_pair`` an A factor (without ``b_pair`` B) projects the fitted pool's mean feature instead,
        the same vector on every row (for linear projections the pool mean of the per-example
        projections)."""
        if (self.a_pair if k < self.order else self.b_pair):
            return self.f[k](h_train)
        return self.f[k]((self.train_mean - self.center)[None]).expand(h_train.shape[0], -1)

    def _projected(self, h_train: torch.Tensor, h_test: torch.Tensor) -> torch.Tensor:
        h_train, h_test = h_train - self.center, h_test - self.center
        return torch.stack([self._train_side(k, h_train) @ self._g(k)(h_test).T for k in range(self.order + 1)])

    def pair(self, k: int, h_train: torch.Tensor, h_test: torch.Tensor, s_train: torch.Tensor | None = None,
             s_test: torch.Tensor | None = None) -> torch.Tensor:
        """Factor k for rows of ``h_train [b, H]`` against one ``h_test [H]`` -> [b] (k > n: the
        lagged additive factor D_{k-n})."""
        if k > self.order:
            return self.lag_weight[k - self.order - 1] @ self.similarity(s_train, s_test[None])[:, :, 0]
        out = self._train_side(k, h_train - self.center) @ self._g(k)((h_test - self.center)[None])[0]
        if self.bias is not None:
            out = out + self.bias[k]
        if self.sim_dim:
            out = out + self._sim_weight()[k] @ self.similarity(s_train, s_test[None])[:, :, 0]
        return out

    @torch.no_grad()
    def init_similarity(self, s_train: torch.Tensor, s_test: torch.Tensor) -> None:
        """Set the buffers from the fitted examples: with ``sim_norms`` the mean block norms of
        each side, then ``sim_center`` (per term: mean training vector) and ``sim_scale`` (per
        term: spread of the centred values over these pairs)."""
        if self.sim_norms:
            for side, s in (("train", s_train), ("test", s_test)):
                main = s[:, :self.sim_dim - self.lex_dim]
                n = main.reshape(s.shape[0], self.sim_blocks, -1).norm(dim=-1).mean(0)
                getattr(self, f"sim_norm_{side}").copy_(torch.where(n > 1e-12, n, torch.ones_like(n)))
        self.sim_center.copy_(torch.cat([v.mean(0) for v in self._views(s_train, "train")]))
        self.sim_scale.fill_(1.0)
        if s_train.shape[0] * s_test.shape[0] > 1:
            sd = self.similarity(s_train, s_test).reshape(self.sim_terms, -1).std(1)
            self.sim_scale.copy_(torch.where(torch.isfinite(sd) & (sd > 1e-12), sd, torch.ones_like(sd)))

    @torch.no_grad()
    def rescale_init(self, h_train: torch.Tensor, h_test: torch.Tensor, target_std: float) -> None:
        """Scale each factor's last layers so that the RMS of its pair values is ``target_std``."""
        F = self._projected(h_train, h_test)
        for k in range(self.order + 1):
            s = float(F[k].pow(2).mean().sqrt()) if F[k].numel() else 0.0  # RMS: mean and spread
            if s <= 0 or not np.isfinite(s):
                continue
            per = (target_std / s) ** 0.5  # the factor is bilinear in the two sides' outputs
            mods = [self.f[k]] if self.g is None else [self.f[k], self.g[k]]
            for m in mods:
                m.l2.weight.mul_(per)
                m.l2.bias.mul_(per)


class FactorEnsemble(nn.Module):
    """Bagged GPTfluence (``ensemble = k``): ``forward`` returns the mean of its members' factors
    ``F [n+1, N, M]``. The members share their fixed buffers (feature centres, similarity centres and
    scales: computed from the same examples), so one ``similarity`` tensor serves them all."""

    def __init__(self, members: Sequence[FeaturizedFactors]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise InputError("gptfluence: an ensemble needs at least one member")
        first = dict(members[0].named_buffers())
        for m in members[1:]:
            for name, buf in m.named_buffers():
                if name not in first or first[name].shape != buf.shape or not torch.equal(first[name], buf):
                    raise ArtifactMismatchError(f"gptfluence ensemble: members differ in the fixed buffer {name!r}")
        self.members = nn.ModuleList(members)

    @property
    def sim_dim(self) -> int:
        return self.members[0].sim_dim

    @property
    def sim_terms(self) -> int:
        return self.members[0].sim_terms

    @property
    def lex_dim(self) -> int:
        return self.members[0].lex_dim

    @property
    def order(self) -> int:
        return self.members[0].order

    @property
    def lags(self) -> int:
        return self.members[0].lags

    @property
    def center(self) -> torch.Tensor:
        """The feature centre ``[H]`` (the same in every member)."""
        return self.members[0].center

    def similarity(self, s_train: torch.Tensor, s_test: torch.Tensor) -> torch.Tensor:
        return self.members[0].similarity(s_train, s_test)

    def forward(self, h_train: torch.Tensor, h_test: torch.Tensor, s_train: torch.Tensor | None = None,
                s_test: torch.Tensor | None = None, similarity: torch.Tensor | None = None) -> torch.Tensor:
        if self.sim_dim and similarity is None and s_train is not None and s_test is not None:
            similarity = self.similarity(s_train, s_test)  # once for all members
        return torch.stack([m(h_train, h_test, s_train, s_test, similarity=similarity) for m in self.members]).mean(0)

    def pair(self, k: int, h_train: torch.Tensor, h_test: torch.Tensor, s_train: torch.Tensor | None = None,
             s_test: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([m.pair(k, h_train, h_test, s_train, s_test) for m in self.members]).mean(0)


class FeatureTable:
    """Features of examples by id: ``ids [N]`` int64 and ``values [N, D]`` float32."""

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self._row: dict[int, int] = {}
        self._vals: list[np.ndarray] = []
        self._cache: np.ndarray | None = None

    def __contains__(self, i: int) -> bool:
        return int(i) in self._row

    def __len__(self) -> int:
        return len(self._row)

    def add(self, ids: Sequence[int], values: np.ndarray, what: str) -> None:
        values = np.asarray(values, dtype=np.float32)
        ids = [int(i) for i in ids]
        if values.ndim != 2 or values.shape[0] != len(ids):
            raise InputError(f"{what} features must be [{len(ids)}, dim], got shape {values.shape}")
        if self.dim is None:
            self.dim = values.shape[1]
        elif values.shape[1] != self.dim:
            raise ArtifactMismatchError(f"{what} features have dim {values.shape[1]}, the simulator uses {self.dim}")
        for i, v in zip(ids, values):
            if i in self._row:
                self._vals[self._row[i]] = v
            else:
                self._row[i] = len(self._vals)
                self._vals.append(v)
        self._cache = None

    @property
    def matrix(self) -> np.ndarray:
        if self._cache is None:
            self._cache = np.stack(self._vals) if self._vals else np.zeros((0, self.dim or 0), np.float32)
        return self._cache

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(list(self._row), dtype=np.int64)

    def missing(self, ids: Sequence[int]) -> list[int]:
        return [int(i) for i in ids if int(i) not in self._row]

    def get(self, ids: Sequence[int], what: str) -> np.ndarray:
        miss = self.missing(ids)
        if miss:
            raise InputError(f"gptfluence has no features for {what} id {miss[0]}"
                             + (f" (and {len(miss) - 1} more)" if len(miss) > 1 else "")
                             + "; give its example with set_examples(...) or load the simulator with dynamics=...")
        rows = np.fromiter((self._row[int(i)] for i in ids), dtype=np.int64, count=len(ids))
        return self.matrix[rows]


class _SimilarityFeatures:
    """The similarity features s of one side: the rows of several `FeatureTable`s (the main source,
    then the lexical one) side by side, ``get(ids, what) -> [len(ids), sum of dims]``."""

    def __init__(self, tables: Sequence[FeatureTable]) -> None:
        self.tables = list(tables)

    @property
    def dim(self) -> int:
        return sum(int(t.dim or 0) for t in self.tables)

    def get(self, ids: Sequence[int], what: str) -> np.ndarray:
        parts = [t.get(ids, what) for t in self.tables]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


class GPTfluenceSimulator(RecurrenceSimulator):
    """The featurized simulator. ``encoder``: an object with spec()/dim/encode() (see
    `gptfluence.features.encoders`), or a spec string (= the config field); if no object is
    given, ``config.encoder`` is resolved on first need."""

    method = "gptfluence"
    simulates_unseen_examples = True

    def __init__(self, metric: str = "loss", config: GPTfluenceConfig | dict | None = None,
                 encoder: Encoder | None = None, **overrides: Any) -> None:
        super().__init__(metric)
        if isinstance(encoder, str):  # the config field (a spec string), not an encoder object
            overrides["encoder"], encoder = encoder, None
        self.config: GPTfluenceConfig = config_from(GPTfluenceConfig, config, overrides, "gptfluence config")
        self.order = self.config.order
        self.residual = self.config.residual
        self.encoder = encoder
        self.encoder_spec: dict[str, Any] | None = encoder.spec() if encoder is not None else None
        self.train_features = FeatureTable()
        self.test_features = FeatureTable()
        self.similarity_kind: str | None = None  # 'grad' / 'features' / 'none' once resolved
        self.similarity_encoder: Any = None
        self.similarity_spec: dict[str, Any] | None = None
        self.sim_train_features = FeatureTable()
        self.sim_test_features = FeatureTable()
        self.lexical: TfidfFeatures | None = None  # fitted on the store's texts when config.lexical
        self.lex_train_features = FeatureTable()
        self.lex_test_features = FeatureTable()
        self.module: FeaturizedFactors | FactorEnsemble | None = None

    # -- features -----------------------------------------------------------------------------
    def _get_encoder(self) -> Encoder:
        if self.encoder is None:
            enc = resolve_encoder(self.config.encoder)
            if self.encoder_spec is not None and enc.spec() != self.encoder_spec:
                raise ArtifactMismatchError(f"encoder {self.config.encoder!r} gives spec {enc.spec()}, but the "
                                            f"simulator's features come from {self.encoder_spec}")
            self.encoder = enc
            self.encoder_spec = enc.spec()
        return self.encoder

    def set_examples(self, train: Sequence[Example] = (), test: Sequence[Example] = (),
                     features: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Make examples simulatable: embed them with the encoder, or take ``features`` =
        (train [len(train), D], test [len(test), D]) computed elsewhere with the same encoder."""
        train, test = list(train), list(test)
        if features is None:
            enc = self._get_encoder()
            ftr, fte = embed_examples(enc, train), embed_examples(enc, test)
        else:
            ftr, fte = features
            if self.encoder_spec is None:
                self.encoder_spec = {"name": "precomputed", "spec": self.config.encoder}
        if train:
            self.train_features.add([e.id for e in train], ftr, "training")
        if test:
            self.test_features.add([e.id for e in test], fte, "test")
        if self.similarity_kind == "grad":
            self._add_gradients(train, test)
        self._add_lexical(train, test)

    # -- the similarity term ------------------------------------------------------------------
    def _resolve_similarity(self, dynamics: Dynamics, fit_runs: Sequence[str]) -> None:
        """Decide the similarity afresh for a (re)fit: the kind from the config and, for 'auto',
        the store; checkpoint gradients replay ``fit_runs[0]``. Drops earlier gradient features."""
        kind = self.config.similarity
        if kind == "auto":
            kind = "grad" if (dynamics.manifest.get("config") or {}).get("model") else "features"
        self.similarity_encoder, self.similarity_spec = None, None
        self.sim_train_features, self.sim_test_features = FeatureTable(), FeatureTable()
        if kind == "grad":
            from gptfluence.features.gradients import LossGradientEncoder

            c = self.config
            if c.similarity_checkpoints < 1:
                raise InputError(f"gptfluence: similarity_checkpoints must be >= 1, got {c.similarity_checkpoints}")
            self.similarity_encoder = LossGradientEncoder.for_dynamics(
                dynamics, dim=c.similarity_dim, seed=c.seed, checkpoints=c.similarity_checkpoints,
                run_id=fit_runs[0], device=self.device, preconditioner=c.similarity_preconditioner,
                damping=c.similarity_damping)
            self.similarity_spec = self.similarity_encoder.spec()
        self.similarity_kind = kind
        self.lex_train_features, self.lex_test_features = FeatureTable(), FeatureTable()
        self.lexical = None
        if self.config.lexical:
            self.lexical = TfidfFeatures.for_task(dynamics.task, max_features=self.config.lexical_max_features)

    def _add_lexical(self, train: Sequence[Example], test: Sequence[Example]) -> None:
        """TF-IDF features of ``train`` and ``test`` (when the simulator has a lexical term)."""
        if self.lexical is None:
            return
        if train:
            self.lex_train_features.add([e.id for e in train], self.lexical.encode([e.text for e in train]),
                                        "training (lexical)")
        if test:
            self.lex_test_features.add([e.id for e in test], self.lexical.encode([e.text for e in test]), "test (lexical)")

    def _get_similarity_encoder(self, dynamics: Dynamics | None = None) -> Any:
        """The gradient encoder; for an artifact's spec rebuilt from it (checkpoint gradients: from
        ``dynamics`` when it holds the replayed run, else from the store path the spec records)."""
        if self.similarity_encoder is None:
            from gptfluence.features.gradients import CheckpointReplay, LossGradientEncoder, replay_matches

            spec = dict(self.similarity_spec or {})
            if spec.get("kind") != LossGradientEncoder.kind:
                raise ArtifactMismatchError(f"gptfluence: unknown similarity encoder {spec}")
            replay = None
            ck = spec.get("checkpoints")
            if ck:
                source = dynamics if dynamics is not None and replay_matches(ck, dynamics) else None
                if source is None and ck.get("store") and Path(ck["store"]).is_dir():
                    other = Dynamics.open(ck["store"])
                    source = other if replay_matches(ck, other) else None
                if source is None:
                    raise InputError(f"gptfluence: gradient features of new examples need the fine-tuning run "
                                     f"{ck.get('run_id')!r} of the store the simulator was fitted on, which is not "
                                     f"at {ck.get('store')} (moved or changed) and not the store given; give that "
                                     f"store as dynamics (load_simulator(path, dynamics=...), --dynamics)")
                replay = CheckpointReplay(source, ck["run_id"], [int(x) for x in ck["steps"]])
            pre = spec.get("preconditioner") or {}
            factor_examples = None
            if pre:  # the curvature's examples: the training pool of the store given or recorded
                from gptfluence.types import examples_sha256

                pools = [replay.dynamics] if replay is not None else []
                if dynamics is not None:
                    pools.append(dynamics)
                factor_examples = next((list(d.task.train) for d in pools
                                        if examples_sha256(list(d.task.train)) == pre.get("factor_examples_sha256")), None)
                if factor_examples is None:
                    raise InputError("gptfluence: K-FAC gradient features of new examples need the training pool the "
                                     "curvature was estimated on (the store the simulator was fitted on); give that "
                                     "store as dynamics (load_simulator(path, dynamics=...), --dynamics)")
            self.similarity_encoder = LossGradientEncoder(spec["model"], dim=int(spec["dim"]),
                                                          max_length=int(spec["max_length"]), seed=int(spec["seed"]),
                                                          device=self.device, replay=replay,
                                                          preconditioner=pre.get("kind", "none"),
                                                          damping=float(pre.get("damping", 0.1)),
                                                          factor_examples=factor_examples)
        return self.similarity_encoder

    def _add_gradients(self, train: Sequence[Example], test: Sequence[Example]) -> None:
        """Gradient features of ``train`` and ``test``: from the on-disk feature cache, the rest in
        one encoder call (one replay, one projection pass)."""
        train, test = list(train), list(test)
        if not train and not test:
            return
        gtr, gte = np.split(self._get_similarity_encoder().embed(train + test), [len(train)])
        if train:
            self.sim_train_features.add([e.id for e in train], gtr, "training (gradient)")
        if test:
            self.sim_test_features.add([e.id for e in test], gte, "test (gradient)")

    def _sim_dim(self) -> int:
        """Width of the main similarity features (gradients or encoder features; 0: none)."""
        if self.similarity_kind == "none":
            return 0
        return int((self.sim_train_features if self.similarity_kind == "grad" else self.train_features).dim or 0)

    def _lex_dim(self) -> int:
        """Width of the lexical (TF-IDF) features (0: no lexical term)."""
        return self.lexical.dim if self.lexical is not None else 0

    def _sim_blocks(self) -> int:
        """Blocks of the similarity features, each with its own centre, scale and learned weight:
        one per checkpoint for checkpoint gradients, else 1."""
        ck = (self.similarity_spec or {}).get("checkpoints") if self.similarity_kind == "grad" else None
        from gptfluence.features.gradients import blocks_per_checkpoint

        pre = ((self.similarity_spec or {}).get("preconditioner") or {}).get("kind", "none")
        return (len(ck["steps"]) if ck else 1) * blocks_per_checkpoint(pre)

    def _sim_norms(self) -> bool:
        """Norm-keeping dot-product terms: for gradient features (encoder features are unit vectors)."""
        return self.similarity_kind == "grad" and self.config.similarity_norms

    def _sim_tables(self) -> tuple["_SimilarityFeatures", "_SimilarityFeatures"]:
        """The similarity features s of each side: the main source's, then the lexical ones."""
        tables: list[tuple[FeatureTable, FeatureTable]] = []
        if self.similarity_kind == "grad":
            tables.append((self.sim_train_features, self.sim_test_features))
        elif self.similarity_kind != "none":
            tables.append((self.train_features, self.test_features))
        if self.lexical is not None:
            tables.append((self.lex_train_features, self.lex_test_features))
        return _SimilarityFeatures([t[0] for t in tables]), _SimilarityFeatures([t[1] for t in tables])

    def set_features(self, split: str, ids: Sequence[int], values: np.ndarray) -> None:
        """Add precomputed features [len(ids), D] for ``split`` ('train' or 'test') ids."""
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        if self.encoder_spec is None:
            self.encoder_spec = {"name": "precomputed", "spec": self.config.encoder}
        (self.train_features if split == "train" else self.test_features).add(ids, values, split)

    def prepare(self, dynamics: Dynamics, train_ids: Sequence[int] = (), test_ids: Sequence[int] = ()) -> None:
        """`Simulator.prepare`: `ensure_features` (embed the examples without features)."""
        self.ensure_features(dynamics, train_ids, test_ids)

    def ensure_features(self, dynamics: Dynamics, train_ids: Sequence[int] = (), test_ids: Sequence[int] = ()) -> None:
        """Embed the dynamics' examples among ``train_ids``/``test_ids`` that have no features yet
        (and, once fitting has fixed the similarity kind and the vocabulary, their gradient and
        TF-IDF features)."""
        if self.similarity_kind == "grad":
            self._get_similarity_encoder(dynamics)  # built with this store when it holds the replayed run
        mtr = self.train_features.missing(train_ids)
        mte = self.test_features.missing(test_ids)
        if mtr or mte:
            self.set_examples([dynamics.train_example(i) for i in mtr], [dynamics.test_example(i) for i in mte])
        # every example with features gets its gradient and TF-IDF features (set_features and set_examples
        # may have added examples before fitting fixed the similarity kind and the vocabulary)
        if self.similarity_kind == "grad":
            self._add_gradients(*self._lacking(dynamics, self.sim_train_features, self.sim_test_features,
                                               train_ids, test_ids))
        if self.lexical is not None:
            self._add_lexical(*self._lacking(dynamics, self.lex_train_features, self.lex_test_features,
                                             train_ids, test_ids))

    def _lacking(self, dynamics: Dynamics, train_table: FeatureTable, test_table: FeatureTable,
                 train_ids: Sequence[int], test_ids: Sequence[int]) -> tuple[list[Example], list[Example]]:
        """The examples of ``dynamics`` that have encoder features or are asked for (``train_ids``,
        ``test_ids``) but are missing from ``train_table`` / ``test_table``."""
        out = []
        for feats, table, ids, known, example in (
                (self.train_features, train_table, train_ids, dynamics.train_ids, dynamics.train_example),
                (self.test_features, test_table, test_ids, dynamics.test_ids, dynamics.test_example)):
            known = set(map(int, known))
            want = sorted({*(i for i in map(int, feats.ids) if i in known), *map(int, ids)})
            out.append([example(i) for i in table.missing(want)])
        return out[0], out[1]

    # -- hooks ----------------------------------------------------------------------------------
    def _init_params(self, dynamics: Dynamics, train_ids: np.ndarray, test_ids: np.ndarray,
                     fit_train_ids: np.ndarray, fit_runs: Sequence[str]) -> None:
        self._resolve_similarity(dynamics, fit_runs)
        self.ensure_features(dynamics, train_ids, test_ids)
        self._new_member(dynamics, train_ids, test_ids, self.config.seed)

    def _new_member(self, dynamics: Dynamics, train_ids: np.ndarray, test_ids: np.ndarray, seed: int) -> None:
        """A freshly initialised `FeaturizedFactors` (seed ``seed``) as ``self.module``; its fixed
        buffers from the features of ``train_ids`` / ``test_ids``."""
        c = self.config
        torch.manual_seed(seed)
        str_, ste_ = self._sim_tables()
        self.module = FeaturizedFactors(self.train_features.dim or 0, c.hidden, c.proj_dim, c.order,
                                        c.share_projection, c.factor_bias, sim_dim=self._sim_dim(),
                                        sim_blocks=self._sim_blocks(), sim_norms=self._sim_norms(),
                                        lex_dim=self._lex_dim(), lags=c.b_lags)
        htr = torch.as_tensor(self.train_features.get(train_ids, "training"))
        hte = torch.as_tensor(self.test_features.get(test_ids, "test"))
        if self.module.sim_dim:
            self.module.init_similarity(torch.as_tensor(str_.get(train_ids, "training")),
                                        torch.as_tensor(ste_.get(test_ids, "test")))
        with torch.no_grad():
            self.module.train_mean.copy_(htr.mean(0))
            if c.center_features:
                self.module.center.copy_(torch.cat([htr, hte]).mean(0))
        if c.init == "scaled":
            self.module.rescale_init(htr, hte, c.init_std)
        if not c.residual and self.module.bias is not None:  # without a bias (authors' code): no offset at all
            b = max(1, int(np.max([dynamics.run(r).curriculum.shape[1] for r in dynamics.run_ids[:1]])))
            with torch.no_grad():
                self.module.bias[0] = 1.0 / b

    def _factor_fn(self, train_ids: np.ndarray, test_ids: np.ndarray, unseen: str) -> Callable[[], torch.Tensor]:
        assert self.module is not None
        dev = self.device
        htr = torch.as_tensor(self.train_features.get(train_ids, "training"), device=dev)
        hte = torch.as_tensor(self.test_features.get(test_ids, "test"), device=dev)
        module = self.module.to(dev)
        if not module.sim_dim:
            return lambda: module(htr, hte)
        str_, ste_ = self._sim_tables()
        s_tr = torch.as_tensor(str_.get(train_ids, "training (similarity)"), device=dev)
        s_te = torch.as_tensor(ste_.get(test_ids, "test (similarity)"), device=dev)
        if module.sim_terms * len(train_ids) * len(test_ids) > SIMILARITY_PRECOMPUTE_MAX:
            return lambda: module(htr, hte, s_tr, s_te)
        with torch.no_grad():  # fixed buffers only: the same tensor on every call
            sim = module.similarity(s_tr, s_te)
        return lambda: module(htr, hte, similarity=sim)

    def _combine(self, modules: list[nn.Module]) -> nn.Module:
        return FactorEnsemble(modules)  # type: ignore[arg-type]

    def fit(self, dynamics: Dynamics, fit_runs: Sequence[str], val_runs: Sequence[str] = (),
            progress: bool = False) -> dict[str, Any]:
        """`RecurrenceSimulator.fit`; then with ``a_factors="pool_mean"`` the fitted per-pair A factors
        are replaced by their training-pool mean, with ``b_projection="pool_mean"`` B's projection term
        likewise (the history's validation numbers are those of the per-pair fit)."""
        hist = super().fit(dynamics, fit_runs, val_runs, progress=progress)
        self._apply_pooling()
        hist.update(a_factors=self.config.a_factors, b_projection=self.b_projection(), b_lags=self.lags)
        return hist

    def _apply_pooling(self) -> None:
        """Set every member's factors to what the config simulates (``a_factors``, `b_projection`):
        after fitting, and on an artifact's fitted weights when it is loaded."""
        assert self.module is not None
        members = self.module.members if isinstance(self.module, FactorEnsemble) else [self.module]
        for m in members:
            m.a_pair = self.config.a_factors == "pair"
            m.b_pair = self.b_projection() == "pair"

    def b_projection(self) -> str:
        """The B projection this simulator uses: ``config.b_projection``, with ``auto`` resolved
        (``pool_mean`` when its similarity terms are gradients, else ``pair``)."""
        if self.config.b_projection != "auto":
            return self.config.b_projection
        return "pool_mean" if self.similarity_kind == "grad" else "pair"

    # -- artifacts ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``weights.safetensors`` (projection weights, feature centre, features by id)."""
        if self.module is None:
            raise InputError("gptfluence simulator is not fitted; nothing to save")
        meta = self._meta()
        meta["encoder_spec"] = self.encoder_spec
        meta["feature_dim"] = self.train_features.dim
        meta["similarity_kind"] = self.similarity_kind
        meta["similarity_spec"] = self.similarity_spec
        tensors: dict[str, Any] = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        tensors.update({"features.train.ids": self.train_features.ids, "features.train.values": self.train_features.matrix,
                        "features.test.ids": self.test_features.ids, "features.test.values": self.test_features.matrix})
        if self.lexical is not None:
            meta["lexical_state"] = self.lexical.state()
            tensors.update({"lexfeatures.train.ids": self.lex_train_features.ids,
                            "lexfeatures.train.values": self.lex_train_features.matrix,
                            "lexfeatures.test.ids": self.lex_test_features.ids,
                            "lexfeatures.test.values": self.lex_test_features.matrix})
        if self.similarity_kind == "grad":
            tensors.update({"simfeatures.train.ids": self.sim_train_features.ids,
                            "simfeatures.train.values": self.sim_train_features.matrix,
                            "simfeatures.test.ids": self.sim_test_features.ids,
                            "simfeatures.test.values": self.sim_test_features.matrix})
        return write_artifact(path, meta, tensors, overwrite=overwrite)

    @classmethod
    def _from_artifact(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray], encoder: Encoder | None = None
                       ) -> "GPTfluenceSimulator":
        sim = cls(meta["metric"], stored_config(meta, GPTfluenceConfig))
        sim._load_meta(meta)
        sim.encoder_spec = meta.get("encoder_spec")
        if encoder is not None:
            if sim.encoder_spec is not None and encoder.spec() != sim.encoder_spec:
                raise ArtifactMismatchError(f"simulator features come from encoder {sim.encoder_spec}, "
                                            f"but encoder {encoder.spec()} was given")
            sim.encoder = encoder
        c = sim.config
        sim.train_features.add(tensors["features.train.ids"].tolist(), tensors["features.train.values"], "training")
        sim.test_features.add(tensors["features.test.ids"].tolist(), tensors["features.test.values"], "test")
        sim.similarity_kind = meta.get("similarity_kind") or "none"  # artifacts before the term: none
        sim.similarity_spec = meta.get("similarity_spec")
        if sim.similarity_kind == "grad":
            sim.sim_train_features.add(tensors["simfeatures.train.ids"].tolist(), tensors["simfeatures.train.values"],
                                       "training (gradient)")
            sim.sim_test_features.add(tensors["simfeatures.test.ids"].tolist(), tensors["simfeatures.test.values"],
                                      "test (gradient)")
        if meta.get("lexical_state") is not None:
            sim.lexical = TfidfFeatures.from_state(meta["lexical_state"])
            sim.lex_train_features.add(tensors["lexfeatures.train.ids"].tolist(), tensors["lexfeatures.train.values"],
                                       "training (lexical)")
            sim.lex_test_features.add(tensors["lexfeatures.test.ids"].tolist(), tensors["lexfeatures.test.values"],
                                      "test (lexical)")
        def member() -> FeaturizedFactors:
            return FeaturizedFactors(int(meta["feature_dim"]), c.hidden, c.proj_dim, c.order, c.share_projection,
                                     c.factor_bias, sim_dim=sim._sim_dim(), sim_blocks=sim._sim_blocks(),
                                     sim_norms=sim._sim_norms(), lex_dim=sim._lex_dim(), lags=c.b_lags)

        state = {k[len("module."):]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith("module.")}
        if c.ensemble > 1:
            members = [member() for _ in range(c.ensemble)]
            for k, m in enumerate(members):  # buffers first, so that the ensemble's check sees the saved ones
                pre = f"members.{k}."
                # written before a_factors (then per-pair A, which never reads it)
                state.setdefault(pre + "train_mean", torch.zeros(int(meta["feature_dim"])))
                try:
                    m.load_state_dict({n[len(pre):]: v for n, v in state.items() if n.startswith(pre)})
                except RuntimeError as e:
                    raise ArtifactMismatchError(f"gptfluence ensemble member {k}: weights do not match its config ({e})") from None
            sim.module = FactorEnsemble(members)
            sim.module.eval()
            sim._apply_pooling()
            return sim
        sim.module = member()
        state.setdefault("center", torch.zeros(int(meta["feature_dim"])))  # artifacts written before centring
        state.setdefault("train_mean", torch.zeros(int(meta["feature_dim"])))  # before a_factors (pair: unused)
        if "sim_weight" in state and state["sim_weight"].ndim == 1:  # written before blocks: one block
            state["sim_weight"] = state["sim_weight"][:, None]
            state["sim_center"] = state["sim_center"][None]
            state["sim_scale"] = state["sim_scale"].reshape(1)
        if "sim_center" in state:  # written before per-term widths: [terms, width], now concatenated
            state["sim_center"] = state["sim_center"].reshape(-1)
        try:
            sim.module.load_state_dict(state)
        except RuntimeError as e:
            raise ArtifactMismatchError(f"gptfluence weights do not match its config ({e})") from None
        sim.module.eval()
        sim._apply_pooling()
        return sim
