"""Benchmark of the per-step measurements of dynamics collection: batched vs per-example.

Side by side in one process, repeats interleaved, medians reported:

(a) test loss of every test example: `gptfluence.lm.target_losses` (one batched forward, LM head
    only at target positions) against one Hugging Face forward per example
    (``model(input_ids, labels=...)``, full LM head); both must give the same losses;
(b) greedy generation: `gptfluence.lm.greedy_generate` (batched, left padded, KV cache) against
    ``model.generate`` per example; both must give the same texts.

It also times a fine-tuning step (`causal_lm_loss` + AdamW), which first fine-tunes the default
base model briefly on the task so that generations have realistic lengths.

    python benchmarks/collect.py                 # default: data2text, 100 test examples
    python benchmarks/collect.py --task sentiment --n-test 200 --repeats 7

Writes ``benchmarks/results/collect.json`` (``--out``) with ``speedup`` (per-example loss time /
batched loss time), ``generation_speedup``, ``max_abs_diff`` and the settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gptfluence.config import save_json  # noqa: E402
from gptfluence.lm import (  # noqa: E402
    BaseModelConfig,
    causal_lm_loss,
    ensure_default_model,
    greedy_generate,
    load_model,
    make_optimizer,
    prepare_eval,
    read_model_info,
    target_losses,
    tokenize_examples,
)
from gptfluence.types import Example  # noqa: E402

HERE = Path(__file__).resolve().parent


def synthetic_task(n_train: int, n_test: int, seed: int):
    """Data-to-text-like examples, used only when gptfluence.tasks is not available."""
    r = random.Random(seed)
    names, cities = ["Alan", "Berta", "Carlo", "Dana", "Elif", "Farid"], ["Paris", "Lima", "Oslo", "Cairo"]
    jobs = ["baker", "pilot", "doctor", "writer"]
    exs = []
    for i in range(n_train + n_test):
        n, c, j = r.choice(names), r.choice(cities), r.choice(jobs)
        exs.append(Example(i, f"Triples: {n} | city | {c} ; {n} | job | {j}\nText:", f" {n} is a {j} in {c}."))
    return exs[:n_train], [Example(i, e.prompt, e.target) for i, e in enumerate(exs[n_train:])], "generation"


def load_task(name: str, n_train: int, n_test: int, seed: int):
    try:
        from gptfluence.tasks import get_task  # type: ignore[attr-defined]
    except ImportError:
        print("gptfluence.tasks.get_task not available: using synthetic examples", file=sys.stderr)
        tr, te, kind = synthetic_task(n_train, n_test, seed)
        return tr, te, kind, "synthetic", None
    task = get_task(name, n_train, n_test, seed)
    return task.train, task.test, task.kind, name, None


def default_corpus(cfg: BaseModelConfig):
    try:
        from gptfluence.tasks import pretraining_corpus  # type: ignore[attr-defined]  # noqa: F401
        return None  # ensure_default_model's own default
    except ImportError:
        tr, _, _ = synthetic_task(cfg.corpus_texts, 1, cfg.seed + 1)
        return [e.text for e in tr]


def per_example_losses(model, tok, examples, max_length: int) -> np.ndarray:
    """The naive way: one HF forward (full LM head, HF loss) per test example."""
    te = tokenize_examples(tok, examples, max_length, append_eos=False)
    out = np.empty(len(examples))
    with torch.inference_mode():
        for i in range(len(examples)):
            b = te.batch([i])
            out[i] = model(input_ids=b["input_ids"], labels=b["labels"]).loss.item()
    return out


def per_example_generate(model, tok, eval_set, max_new_tokens: int) -> list[str]:
    out = []
    with torch.inference_mode():
        for p in eval_set.prompt_ids:
            ids = torch.tensor([p])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eval_set.stop_token_ids,
                               pad_token_id=tok.pad_token_id)
            text = tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(text.split("\n", 1)[0].strip())
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="data2text", help="built-in task (default data2text)")
    ap.add_argument("--n-test", type=int, default=100, help="test examples (default 100)")
    ap.add_argument("--n-train", type=int, default=200, help="training pool (default 200)")
    ap.add_argument("--finetune-steps", type=int, default=40, help="fine-tuning steps before measuring (default 40)")
    ap.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size (default 8)")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="generation length cap (default 24)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--model", default="default", help="'default' or a local HF causal LM folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "collect.json"))
    args = ap.parse_args(argv)

    cfg = BaseModelConfig()
    t0 = time.perf_counter()
    if args.model == "default":
        path = ensure_default_model(cfg, corpus=default_corpus(cfg))
        model, tok = load_model(str(path))
        info = read_model_info(path)
    else:
        model, tok = load_model(args.model)
        info = {}
    load_s = time.perf_counter() - t0
    max_length = cfg.max_length
    train, test, kind, task_name, _ = load_task(args.task, args.n_train, args.n_test, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    # fine-tune briefly (also times a training step)
    torch.manual_seed(args.seed)
    tr = tokenize_examples(tok, train, max_length)
    opt, sched = make_optimizer(model, args.lr, 0.001, 0, max(1, args.finetune_steps))
    rng = np.random.default_rng(args.seed)
    model.train()
    step_times = []
    for _ in range(args.finetune_steps):
        rows = rng.choice(len(train), size=args.batch_size, replace=False)
        t = time.perf_counter()
        loss = causal_lm_loss(model, tr.batch(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t)
    model.eval()

    es = prepare_eval(tok, test, max_length)
    # warm-up both paths once
    fast = target_losses(model, es)
    slow = per_example_losses(model, tok, test, max_length)
    gen_b = greedy_generate(model, tok, es, max_new_tokens=args.max_new_tokens)
    gen_s = per_example_generate(model, tok, es, args.max_new_tokens)
    times: dict[str, list[float]] = {"loss_batched": [], "loss_per_example": [], "gen_batched": [], "gen_per_example": []}
    max_diff = 0.0
    gen_mismatch = 0
    for _ in range(args.repeats):
        dt, fast = timed(lambda: target_losses(model, es))
        times["loss_batched"].append(dt)
        dt, slow = timed(lambda: per_example_losses(model, tok, test, max_length))
        times["loss_per_example"].append(dt)
        max_diff = max(max_diff, float(np.abs(fast - slow).max()))
        dt, gen_b = timed(lambda: greedy_generate(model, tok, es, max_new_tokens=args.max_new_tokens))
        times["gen_batched"].append(dt)
        dt, gen_s = timed(lambda: per_example_generate(model, tok, es, args.max_new_tokens))
        times["gen_per_example"].append(dt)
        gen_mismatch = max(gen_mismatch, sum(a != b for a, b in zip(gen_b, gen_s)))
    med = {k: statistics.median(v) for k, v in times.items()}
    gen_tokens = [len(tok.encode(g, add_special_tokens=False)) for g in gen_b]

    import transformers

    result = {
        "benchmark": "collect: per-step test measurements, batched vs one example at a time",
        "speedup": med["loss_per_example"] / med["loss_batched"],
        "generation_speedup": med["gen_per_example"] / med["gen_batched"],
        "max_abs_diff": max_diff,
        "generation_mismatches": gen_mismatch,
        "seconds": {
            "loss_batched": med["loss_batched"],
            "loss_per_example": med["loss_per_example"],
            "generation_batched": med["gen_batched"],
            "generation_per_example": med["gen_per_example"],
            "train_step": statistics.median(step_times) if step_times else None,
            "model_load_or_build": load_s,
            "pretrain": info.get("pretrain_seconds"),
        },
        "all_seconds": times,
        "sizes": {
            "task": task_name,
            "task_kind": kind,
            "n_test": len(test),
            "n_train": len(train),
            "finetune_steps": args.finetune_steps,
            "batch_size": args.batch_size,
            "max_length": max_length,
            "max_new_tokens": args.max_new_tokens,
            "mean_generated_tokens": float(np.mean(gen_tokens)),
            "mean_test_tokens": float(es.tokens.lengths.mean()),
            "repeats": args.repeats,
            "model": args.model,
            "model_config": info.get("config"),
            "n_params": n_params,
        },
        "mean_test_loss": float(fast.mean()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cpu",
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_json(result, args.out)

    rows = [
        ("test loss, batched (target_losses)", med["loss_batched"]),
        ("test loss, one forward per example", med["loss_per_example"]),
        ("greedy generation, batched", med["gen_batched"]),
        ("greedy generation, per example", med["gen_per_example"]),
        ("one fine-tuning step (batch %d)" % args.batch_size, result["seconds"]["train_step"] or float("nan")),
    ]
    print(f"\ntask {task_name}: {len(test)} test examples, model {args.model} ({n_params / 1e6:.2f} M params), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'measurement':<40} {'ms':>10}")
    for name, s in rows:
        print(f"{name:<40} {1000 * s:>10.1f}")
    print(f"loss speedup {result['speedup']:.1f}x (max abs diff {max_diff:.2e}); "
          f"generation speedup {result['generation_speedup']:.1f}x ({gen_mismatch} texts differ; "
          f"{result['sizes']['mean_generated_tokens']:.1f} tokens generated on average)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
