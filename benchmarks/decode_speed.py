"""Benchmark of greedy decoding during collection: Hugging Face ``generate`` vs the lean loop.

Side by side in one process, on the same model and prompts, repeats interleaved, medians reported:
`gptfluence.lm.greedy_generate` with ``decode`` = ``hf`` (``model.generate`` per batch), ``loop``
(lean loop, dynamic KV cache), ``static`` (lean loop, static KV cache) and, on CUDA or with
``--compile``, ``compile`` (static cache + torch.compile of the one-token step).

Models: the default base model ``gptfluence collect`` builds (2 layers, 64 wide; built offline and
cached) and the tiny model of the tests (1 layer, 32 wide), each fine-tuned briefly on the task
first so that continuations have realistic lengths. Prompts: the task's test set (default:
data2text, 200 examples), batches of ``--batch-size`` (the collection's ``eval_batch_size``),
``--max-new-tokens`` (the collection's ``gen_max_new_tokens``). On CUDA generation runs under bf16
autocast, as in collection. ``tokens_identical`` compares the new tokens of every batch (and the
texts) with ``hf``.

    python benchmarks/decode_speed.py                      # CPU, 1 torch thread (a collection worker's setting)
    python benchmarks/decode_speed.py --device cuda        # adds the compiled mode

Writes ``benchmarks/results/decode_speed.json`` (``--out``): per model and mode the median ms per
``greedy_generate`` call and per batch, ``speedup`` over ``hf`` (ratio of medians), the first
call's ms (warm-up; includes compilation for ``compile``), ``tokens_identical``, the machine,
torch threads and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gptfluence.config import save_json  # noqa: E402
from gptfluence.dynamics.collect import CollectConfig, load_task_for, model_spec  # noqa: E402
from gptfluence.lm import causal_lm_loss, ensure_default_model, load_model, make_optimizer, prepare_eval, \
    tokenize_examples  # noqa: E402
from gptfluence.lm.decoding import greedy_tokens  # noqa: E402
from gptfluence.lm.evaluation import _hf_generate, evaluating, greedy_generate  # noqa: E402

from collect_scale import machine  # noqa: E402  (the machine's name, as collect_scale.json records it)

HERE = Path(__file__).resolve().parent
# model name -> CollectConfig fields (the default collection model; the tests' tiny model)
MODELS = {"default": {}, "tiny": dict(model_layers=1, model_hidden=32, model_pretrain_steps=20)}


def batches(es, batch_size: int):
    """The left-padded batches greedy_generate makes (longest prompts first)."""
    plen = np.array([len(p) for p in es.prompt_ids])
    order = np.argsort(-plen, kind="stable")
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        width = int(plen[rows].max())
        ids = torch.full((len(rows), width), es.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            p = es.prompt_ids[r]
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        yield ids, mask


def finetune(model, tok, train, steps: int, max_length: int, device: str, seed: int) -> None:
    data = tokenize_examples(tok, train, max_length)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt, _ = make_optimizer(model, 3e-4, 0.001, 0, max(1, steps))
    model.train()
    for _ in range(steps):
        b = data.batch(rng.choice(len(train), size=8, replace=False))
        b = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in b.items()}
        loss = causal_lm_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def bench_model(name: str, args, modes: list[str]) -> dict:
    cfg = CollectConfig(task=args.task, n_test=args.n_test, n_train=args.n_train, **MODELS[name])
    task = load_task_for(cfg)
    _, base = model_spec(cfg)
    path = ensure_default_model(base, progress=False)
    model, tok = load_model(str(path), device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    finetune(model, tok, task.train, args.finetune_steps, cfg.max_length, args.device, args.seed)
    es = prepare_eval(tok, task.test, cfg.max_length)
    n_batches = -(-len(es) // args.batch_size)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device.startswith("cuda") \
        else contextlib.nullcontext

    def run(mode):
        with autocast():
            return greedy_generate(model, tok, es, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   decode=mode)

    # token identity, batch by batch, against generate (and the texts greedy_generate returns)
    identical = {}
    with evaluating(model), autocast():
        ref = [_hf_generate(model, i.to(args.device), m.to(args.device), args.max_new_tokens,
                            list(es.stop_token_ids), es.pad_token_id).cpu() for i, m in batches(es, args.batch_size)]
        gen_tokens = float(np.mean([(~torch.isin(r, torch.tensor(es.stop_token_ids))).cumprod(1).sum(1).float().mean()
                                    for r in ref]))
        for mode in modes:
            if mode in ("hf", "compile"):
                continue
            cache = "static" if mode == "static" else "dynamic"
            got = [greedy_tokens(model, i.to(args.device), m.to(args.device), args.max_new_tokens, es.stop_token_ids,
                                 es.pad_token_id, cache=cache).cpu() for i, m in batches(es, args.batch_size)]
            identical[mode] = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, ref))
    texts, first = {}, {}
    for mode in modes:  # also the warm-up (and the compilation) of every mode
        t = time.perf_counter()
        texts[mode] = run(mode)
        first[mode] = time.perf_counter() - t
    mismatches = {mode: sum(a != b for a, b in zip(texts[mode], texts["hf"])) for mode in modes}
    for mode in modes:
        if mode not in identical:  # compile (padded to one width): texts only
            identical[mode] = mode == "hf" or mismatches[mode] == 0

    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            t = time.perf_counter()
            run(mode)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {
        "model": name, "model_config": {k: getattr(cfg, k) for k in ("model_layers", "model_hidden",
                                                                      "model_pretrain_steps")},
        "n_params": n_params, "prompts": len(es), "batches": n_batches,
        "mean_prompt_tokens": float(np.mean([len(p) for p in es.prompt_ids])),
        "mean_generated_tokens": gen_tokens,
        "modes": {m: {"ms_per_call": 1000 * med[m], "ms_per_batch": 1000 * med[m] / n_batches,
                      "speedup": med["hf"] / med[m], "tokens_identical": bool(identical[m]),
                      "texts_differing": int(mismatches[m]), "first_call_ms": 1000 * first[m],
                      "all_ms": [1000 * t for t in times[m]]}
                  for m in modes},
    }
    print(f"\nmodel {name} ({n_params / 1e6:.2f} M params): {len(es)} prompts of {out['mean_prompt_tokens']:.1f} "
          f"tokens in {n_batches} batches, {gen_tokens:.1f} new tokens per row on average "
          f"(max {args.max_new_tokens}), median of {args.repeats}")
    print(f"{'decode':<10} {'ms/call':>10} {'ms/batch':>10} {'speedup':>9} {'1st call ms':>12}  tokens identical to hf")
    for m in modes:
        r = out["modes"][m]
        print(f"{m:<10} {r['ms_per_call']:>10.1f} {r['ms_per_batch']:>10.1f} {r['speedup']:>8.2f}x "
              f"{r['first_call_ms']:>12.0f}  "
              f"{'yes' if r['tokens_identical'] else 'NO'} ({r['texts_differing']} texts differ)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="data2text", help="built-in generation task (default data2text)")
    ap.add_argument("--n-test", type=int, default=200, help="test prompts (default 200)")
    ap.add_argument("--n-train", type=int, default=200, help="training pool for the brief fine-tuning (default 200)")
    ap.add_argument("--finetune-steps", type=int, default=30, help="fine-tuning steps before measuring (default 30)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--max-new-tokens", type=int, default=CollectConfig().gen_max_new_tokens,
                    help="max new tokens (default: the collection's gen_max_new_tokens)")
    ap.add_argument("--batch-size", type=int, default=CollectConfig().eval_batch_size,
                    help="prompts per batch (default: the collection's eval_batch_size)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on CPU (default 1: what each local collection worker uses)")
    ap.add_argument("--compile", action="store_true", help="also time decode=compile (always on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "decode_speed.json"))
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    modes = ["hf", "loop", "static"] + (["compile"] if args.compile or args.device.startswith("cuda") else [])

    import transformers

    results = [bench_model(name, args, modes) for name in args.models]
    result = {
        "benchmark": "decode_speed: greedy decoding of a collection's test prompts, HF generate vs the lean loop",
        "command": "python benchmarks/decode_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "speedup": {r["model"]: {m: v["speedup"] for m, v in r["modes"].items()} for r in results},
        "tokens_identical": {r["model"]: {m: v["tokens_identical"] for m, v in r["modes"].items()} for r in results},
        "models": results,
        "settings": {"task": args.task, "n_test": args.n_test, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "finetune_steps": args.finetune_steps, "repeats": args.repeats},
        "device": args.device,
        "machine": machine(args.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_json(result, args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
