"""The ``batched`` collection backend: R fine-tuning runs at once in one process (``torch.func``).

The model's trainable parameters are stacked along a new leading run axis (``[R, ...]``); one
``vmap(grad_and_value(loss))`` call over ``functional_call`` computes every run's loss and
gradient on its own batch, and one AdamW over the stacked tensors updates them. Because AdamW
is elementwise, this equals R separate optimizers exactly when the hyper-parameters agree:
the same two parameter groups as `gptfluence.lm.make_optimizer` (weight decay on tensors with
>= 2 dimensions per run, none on biases / LayerNorm), the same warmup / schedule function
(taken from `make_optimizer` itself), and gradient clipping with each run's own global norm
(``clip_grad_norm_``'s formula, per run).

Differences from the sequential path (`RunCollector`), all within floating-point tolerance:

* batches carry no attention mask: rows are right padded (causal attention never looks right,
  so target-token losses are unchanged), which lets ``sdpa`` run under ``vmap``; batches of
  the R runs are padded to a common width and row count (padding rows have no targets);
* the training loss is the masked full-logit cross-entropy (`causal_lm_loss(head_only=False)`);
* the test loss runs the base model (vectorised on GPUs, one run after another on CPUs, where
  that is faster) and the LM head only at target positions, with the chunks and order of
  `gptfluence.lm.target_losses`;
* all torch threads of the process are used (the local backend uses one per run).

Measured on the tiny model, recorded losses agree with the sequential path to ~5e-7 nats
(tests/test_scale.py checks 1e-4). Generation metrics (greedy decoding) and step hooks
(checkpoint captures) fall back to one run at a time: the run's current weights are copied
into the plain model and `greedy_generate` runs as usual. Dropout draws different random
numbers than the sequential path (``randomness="different"``): models with dropout are not
comparable run by run (the default model has none).

Runs are grouped by curriculum length (the schedule depends on it) and trained ``runs_per_batch``
at a time; ``runs_per_batch = 0`` picks R from free memory (`auto_runs_per_batch`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from gptfluence.errors import GptfluenceError, InputError

IGNORE_INDEX = -100
MAX_AUTO_RUNS = {"cpu": 8, "cuda": 64}  # caps of the automatic choice (CPU gains little beyond a few)


# ---------------------------------------------------------------------------------------------
# sizing


def free_memory_bytes(device: str) -> int:
    """Free memory of ``device`` in bytes: ``cudaMemGetInfo`` on CUDA, ``MemAvailable`` of
    /proc/meminfo on CPU (else physical pages available, else 4 GiB)."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 << 30


def bytes_per_run(n_params: int, vocab: int, hidden: int, layers: int, batch_size: int, max_length: int,
                  eval_tokens: int) -> int:
    """Rough memory of one run in the batched step (bytes, fp32): weights, gradient and two
    AdamW moments (16 bytes per parameter), training activations (~24 floats per hidden unit
    and layer per token, plus 3 logit-sized tensors per token) and one evaluation chunk's logits."""
    tokens = batch_size * max_length
    act = tokens * (layers * hidden * 24 + 3 * vocab) * 4
    return int(16 * n_params + act + eval_tokens * (hidden + vocab) * 4)


def auto_runs_per_batch(model: Any, cfg: Any, device: str, n_runs: int, fraction: float = 0.5) -> int:
    """R for ``runs_per_batch = 0``: as many runs as fit in ``fraction`` of the free memory by
    `bytes_per_run`, at least 1, at most ``n_runs`` and `MAX_AUTO_RUNS` of the device type."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    vocab = int(getattr(c, "vocab_size", 50_000))
    hidden = int(getattr(c, "hidden_size", 768))
    layers = int(getattr(c, "num_hidden_layers", 12))
    eval_tokens = min(cfg.eval_batch_size * cfg.max_length, 2048 if device == "cpu" else 1 << 20)
    need = bytes_per_run(n_params, vocab, hidden, layers, cfg.batch_size, cfg.max_length, eval_tokens)
    fit = int(fraction * free_memory_bytes(device) // max(need, 1))
    cap = MAX_AUTO_RUNS["cuda" if device.startswith("cuda") else "cpu"]
    return max(1, min(n_runs, cap, fit))


# ---------------------------------------------------------------------------------------------
# the vectorised trainer


def _set_attention(model: Any, impl: str) -> None:
    """Switch a Hugging Face model's attention implementation (no-op where it cannot)."""
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter(impl)
        else:  # pragma: no cover - older transformers
            model.config._attn_implementation = impl
    except (ValueError, AttributeError, NotImplementedError):  # pragma: no cover
        pass


def _module_prefix(model: Any, sub: Any) -> str | None:
    for name, mod in model.named_modules():
        if mod is sub:
            return name
    return None


class BatchedTrainer:
    """R runs of one `RunCollector`'s model, stacked. ``params[name]`` is ``[R, *shape]``."""

    def __init__(self, collector: Any) -> None:
        from gptfluence.lm.training import _base_and_head

        import copy

        self.c = collector
        self.model = collector.model  # the plain model: generation and hooks, one run at a time
        # a copy with eager attention runs under vmap (sdpa has no batching rule on CPU and
        # falls back to a loop); its own weights are never used (functional_call)
        model = copy.deepcopy(collector.model)
        if os.environ.get("GPTFLUENCE_BATCHED_ATTN", "eager") == "eager":
            _set_attention(model, "eager")
        self.fmodel = model
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.init = {n: collector.init_state[n].detach().clone() for n in self.names}
        split = _base_and_head(model)
        self.split = None
        if split is not None:
            base, head = split
            bp, hp = _module_prefix(model, base), _module_prefix(model, head)
            if bp and hp:
                self.split = (base, bp, head, hp)

    # -- pure functions (vmapped) ----------------------------------------------------------
    def _full(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**params, **self.frozen}

    def _train_loss(self, params: dict[str, Any], input_ids: Any, labels: Any) -> Any:
        import torch
        from torch.func import functional_call

        logits = functional_call(self.fmodel, (self._full(params), self.buffers), args=(),
                                 kwargs={"input_ids": input_ids, "use_cache": False}).logits[:, :-1].float()
        shifted = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        return ce / (shifted != IGNORE_INDEX).sum().clamp_min(1)

    def _eval_ce(self, params: dict[str, Any], input_ids: Any, rows: Any, cols: Any, targets: Any) -> Any:
        import torch
        from torch.func import functional_call

        full = self._full(params)
        if self.split is None:
            logits = functional_call(self.fmodel, (full, self.buffers), args=(),
                                     kwargs={"input_ids": input_ids, "use_cache": False}).logits[rows, cols]
        else:
            base, bp, head, hp = self.split

            def sub(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
                n = len(prefix) + 1
                return {k[n:]: v for k, v in d.items() if k.startswith(prefix + ".")}

            hidden = functional_call(base, (sub(bp, full), sub(bp, self.buffers)), args=(),
                                     kwargs={"input_ids": input_ids, "use_cache": False}).last_hidden_state
            logits = functional_call(head, (sub(hp, full), sub(hp, self.buffers)), (hidden[rows, cols],))
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")

    # -- helpers -----------------------------------------------------------------------------
    def load_run(self, params: dict[str, Any], r: int) -> None:
        """Copy run ``r``'s current weights into the plain model (for generation and hooks)."""
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in params:
                    p.copy_(params[n][r])

    def eval_losses(self, params: dict[str, Any]) -> np.ndarray:
        """Per-run, per-example mean target loss ``[R, M]`` (float64), as `target_losses`."""
        import torch
        from torch.func import vmap

        from gptfluence.lm.evaluation import CPU_MAX_TOKENS, _token_chunks

        c = self.c
        es = c.eval_set
        device = torch.device(c.device)
        R = next(iter(params.values())).shape[0]
        M = len(es)
        sums = torch.zeros(R, M, dtype=torch.float64)
        counts = torch.zeros(M, dtype=torch.float64)
        max_tokens = CPU_MAX_TOKENS if device.type == "cpu" else None
        vec = vmap(self._eval_ce, in_dims=(0, None, None, None, None))

        def fn(*args: Any) -> Any:
            if device.type != "cpu":  # GPUs: one vectorised call (small-model steps are launch-bound)
                return vec(params, *args)
            # CPU (compute-bound): one run after another is faster than the vmapped batch matmuls
            return torch.stack([self._eval_ce({n: p[r] for n, p in params.items()}, *args) for r in range(R)])

        was = self.fmodel.training
        self.fmodel.eval()
        try:
            with torch.inference_mode(), c.autocast():
                for rows in _token_chunks(es._order, es.tokens.lengths, c.cfg.eval_batch_size, max_tokens):
                    b = es.tokens.batch(rows, device=device)
                    shifted = b["labels"][:, 1:]
                    pos = (shifted != IGNORE_INDEX).nonzero(as_tuple=False)
                    br, bc = pos[:, 0], pos[:, 1]
                    ce = fn(b["input_ids"], br, bc, shifted[br, bc])  # [R, K]
                    grow = torch.from_numpy(rows)[br.cpu()]
                    sums.index_add_(1, grow, ce.double().cpu())
                    counts.index_add_(0, grow, torch.ones(len(grow), dtype=torch.float64))
        finally:
            if was:
                self.fmodel.train()
        return (sums / counts.clamp_min(1)).numpy()

    def stacked_batch(self, run_ids: Sequence[str], batches: Sequence[np.ndarray], step: int) -> tuple[Any, Any]:
        """``(input_ids, labels)`` ``[R, B, L]``: run r's batch (ids, -1 = padding) in rows
        0..n_r-1, right padded to the widest row of all runs; missing rows have no targets."""
        import torch

        c = self.c
        td = c.train_data
        row_lists = []
        for rid, ids in zip(run_ids, batches):
            rows = [c.train_row[int(i)] for i in ids if i >= 0]
            if not rows:
                raise InputError(f"run {rid!r}, step {step}: the batch holds only padding (empty batch)")
            row_lists.append(rows)
        B = max(len(r) for r in row_lists)
        L = max(int(td.lengths[r].max()) for r in row_lists)
        R = len(row_lists)
        input_ids = torch.full((R, B, L), td.pad_token_id, dtype=torch.long)
        labels = torch.full((R, B, L), IGNORE_INDEX, dtype=torch.long)
        for r, rows in enumerate(row_lists):
            t = torch.as_tensor(rows, dtype=torch.long)
            input_ids[r, :len(rows)] = td.input_ids[t, :L]
            labels[r, :len(rows)] = td.labels[t, :L]
        dev = torch.device(c.device)
        return input_ids.to(dev), labels.to(dev)

    def train(self, run_ids: Sequence[str], seeds: Sequence[int], curricula: Sequence[np.ndarray]):
        """Fine-tune R runs from the initial weights, one curriculum ``[T, b_r]`` each (equal T):
        yields ``(0, lr, params)`` before the first update, then ``(t, lr of step t, params)``
        after every step, ``params[name]`` = ``[R, *shape]`` stacked weights after step t."""
        import torch
        from torch.func import grad_and_value, vmap

        from gptfluence.lm import make_optimizer

        cfg = self.c.cfg
        R = len(run_ids)
        T = int(curricula[0].shape[0])
        if any(int(cur.shape[0]) != T for cur in curricula):
            raise ValueError("BatchedTrainer.train: the runs of one batch must have equal curriculum lengths")
        torch.manual_seed(int(seeds[0]))  # only dropout would draw (randomness="different")
        params = {n: self.init[n].unsqueeze(0).repeat(R, *([1] * self.init[n].ndim)).contiguous()
                  for n in self.names}
        # the schedule function of the sequential path, from make_optimizer itself
        _, seq_sched = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      warmup_steps=cfg.warmup_steps, total_steps=T, schedule=cfg.lr_schedule)
        factor = seq_sched.lr_lambdas[0]
        decay = [params[n] for n in self.names if self.init[n].ndim >= 2]
        no_decay = [params[n] for n in self.names if self.init[n].ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        step_fn = vmap(grad_and_value(self._train_loss), in_dims=(0, 0, 0), randomness="different")
        self.fmodel.train()
        yield 0, float(sched.get_last_lr()[0]), params
        for t in range(1, T + 1):
            input_ids, labels = self.stacked_batch(run_ids, [cur[t - 1] for cur in curricula], t)
            lr = float(sched.get_last_lr()[0])
            try:
                with self.c.autocast():
                    grads, losses = step_fn(params, input_ids, labels)
            except RuntimeError as e:  # a model whose forward torch.func cannot vectorise
                if t > 1:
                    raise
                raise GptfluenceError(f"model {cfg.model!r} cannot be trained under torch.func.vmap "
                                      f"({str(e).splitlines()[0][:200]}); use --backend local") from None
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise InputError(f"run {run_ids[r]!r}, step {t}: training loss is {float(losses[r])} (lower --lr?)")
            if cfg.max_grad_norm > 0:
                norms = torch.stack([grads[n].reshape(R, -1).float().norm(dim=1) for n in self.names], dim=1)
                total = norms.norm(dim=1)  # [R], each run's global gradient norm
                coef = (cfg.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
                for n in self.names:
                    grads[n] = grads[n] * coef.view(R, *([1] * (grads[n].ndim - 1))).to(grads[n].dtype)
            for n in self.names:
                params[n].grad = grads[n].to(params[n].dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            yield t, lr, params


# ---------------------------------------------------------------------------------------------
# the backend


def run_batch(collector: Any, trainer: BatchedTrainer, items: Sequence[tuple[str, int, np.ndarray]], store: Any,
              hooks: Sequence[Any] = (), on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Train and record the runs ``items`` ((run_id, seed, curriculum), equal curriculum lengths)
    together and commit each to ``store`` (atomic per run). Returns the `Run` objects."""
    from gptfluence.dynamics.store import Run
    from gptfluence.lm import generation_metrics, greedy_generate

    cfg = collector.cfg
    t0 = time.time()
    run_ids = [i[0] for i in items]
    R = len(items)
    T = int(items[0][2].shape[0])
    M = len(collector.task.test)
    values = [{m: np.full((T + 1, M), np.nan, dtype=np.float32) for m in collector.metrics} for _ in items]
    lrs = np.zeros(T, dtype=np.float64)
    k = cfg.gen_every
    with contextlib.ExitStack() as stack:
        stagings = [stack.enter_context(store.stage_run(rid)) for rid in run_ids]
        for t, lr, params in trainer.train(run_ids, [i[1] for i in items], [i[2] for i in items]):
            if t:
                lrs[t - 1] = lr
            losses = trainer.eval_losses(params)
            for r in range(R):
                values[r]["loss"][t] = losses[r]
            gen = k > 0 and (t % k == 0 or t == T)
            if gen or hooks:
                for r in range(R):  # one run at a time in the plain model
                    trainer.load_run(params, r)
                    if gen:
                        with collector.autocast():
                            preds = greedy_generate(collector.model, collector.tokenizer, collector.eval_set,
                                                    max_new_tokens=collector.gen_tokens,
                                                    batch_size=cfg.eval_batch_size, decode=cfg.decode)
                        scores = generation_metrics(preds, collector.eval_set.references, collector.task.kind)
                        for m in collector.gen_metrics:
                            values[r][m][t] = np.asarray(scores[m])
                    for h in hooks:
                        h(t, collector.model, lr, lambda st=stagings[r]: st.captures_dir)
            if on_step and t:
                on_step(R)
        wall = time.time() - t0
        out = []
        for (rid, seed, cur), vals, st in zip(items, values, stagings):
            run = Run(run_id=rid, curriculum=cur, steps=np.arange(T + 1), test_ids=[e.id for e in collector.task.test],
                      values=vals, lr=lrs.copy(), seed=seed,
                      config={"lr": cfg.lr, "batch_size": int(cur.shape[1]), "epochs": cfg.epochs,
                              "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps, "model": cfg.model},
                      info={"wall_seconds": round(wall / R, 3), "device": collector.device, "backend": "batched",
                            "runs_per_batch": R})
            st.commit(run)
            out.append(run)
    return out


def plan_batches(todo: Sequence[tuple[str, int, np.ndarray]], runs_per_batch: int) -> list[list[tuple[str, int, np.ndarray]]]:
    """Group runs by curriculum length (in plan order) and cut each group into batches of at
    most ``runs_per_batch``."""
    groups: dict[int, list] = {}
    for item in todo:
        groups.setdefault(int(item[2].shape[0]), []).append(item)
    out = []
    for items in groups.values():
        for s in range(0, len(items), runs_per_batch):
            out.append(items[s:s + runs_per_batch])
    return out


def collect_batched(cfg: Any, task: Any, device: str, store: Any, todo: Sequence[tuple[str, int, np.ndarray]],
                    runs_per_batch: int = 0, on_step: Callable[[int], None] | None = None,
                    on_run: Callable[[int], None] | None = None, log: Callable[[str], None] = print) -> int:
    """Collect ``todo`` into ``store`` ``runs_per_batch`` runs at a time (0 = `auto_runs_per_batch`).
    Returns the R used."""
    from gptfluence.dynamics.collect import CheckpointCapture, RunCollector

    if runs_per_batch < 0:
        raise InputError(f"--runs-per-batch must be >= 0 (got {runs_per_batch})")
    collector = RunCollector(cfg, task, device, threads=None)
    trainer = BatchedTrainer(collector)
    R = runs_per_batch or auto_runs_per_batch(collector.model, cfg, device, len(todo))
    if not runs_per_batch:
        log(f"batched backend: {R} runs per batch (from free memory; --runs-per-batch overrides)")
    hooks = [CheckpointCapture(cfg.capture_every)] if cfg.capture_every > 0 else []
    for items in plan_batches(todo, R):
        run_batch(collector, trainer, items, store, hooks=hooks, on_step=on_step)
        if on_run:
            on_run(len(items))
    return R
