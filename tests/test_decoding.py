"""gptfluence.lm.decoding: the lean greedy loop (dynamic and static KV cache) gives the tokens of
Hugging Face ``generate``; ``--decode`` in the collection config (tiny model, own cache)."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import TINY_COLLECT, private_model_cache
from gptfluence.errors import InputError
from gptfluence.lm import BaseModelConfig, causal_lm_loss, ensure_default_model, load_model, make_optimizer, \
    prepare_eval, tokenize_examples
from gptfluence.lm.decoding import DECODE_MODES, greedy_tokens, lean_decode_unsupported, resolve_decode
from gptfluence.lm.evaluation import _hf_generate, greedy_generate
from gptfluence.types import Example

TINY = BaseModelConfig(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=300,
                       max_length=48, pretrain_steps=30, pretrain_batch_size=8, pretrain_lr=3e-3, seed=0)
NAMES = ["Alan", "Berta", "Carlo", "Dana", "Elif", "Farid"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito"]


def make_examples(n: int, seed: int, start: int = 0) -> list[Example]:
    """Data-to-text prompts of different lengths (real left padding in a batch)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        name, city = r.choice(NAMES), r.choice(CITIES)
        out.append(Example(start + i, f"Data: name[{name}] city[{city}]" + " x" * (i % 6) + "\nText:",
                           f" {name} lives in {city}."))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in a collection worker (tiny ops on a shared machine's busy cores are
    far slower with more); the caller's setting comes back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny pre-trained model (1 layer, 32 wide) and its tokenizer."""
    root = tmp_path_factory.mktemp("decode-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLUENCE_CACHE", str(root))
        path = ensure_default_model(TINY, corpus=[e.text for e in make_examples(200, seed=1)], progress=False)
        model, tok = load_model(str(path))
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def tuned(base):
    """A copy fine-tuned 40 steps on the data-to-text examples (targets end with eos), so that
    greedy continuations are task-like and many rows stop early."""
    model, tok = base
    model = copy.deepcopy(model)
    data = tokenize_examples(tok, make_examples(64, seed=2), 48)
    torch.manual_seed(0)
    opt, _ = make_optimizer(model, lr=3e-3, weight_decay=0.0, warmup_steps=0, total_steps=40)
    model.train()
    for t in range(40):
        rows = [(8 * t + j) % 64 for j in range(8)]
        loss = causal_lm_loss(model, data.batch(rows))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def left_padded(es):
    """``input_ids``, ``attention_mask`` [B, W] of the eval set's prompts, left padded."""
    width = max(len(p) for p in es.prompt_ids)
    ids = torch.full((len(es), width), es.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(es), width), dtype=torch.long)
    for j, p in enumerate(es.prompt_ids):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    return ids, mask


def hf_tokens(model, ids, mask, n, es):
    with torch.inference_mode():
        return _hf_generate(model, ids, mask, n, list(es.stop_token_ids), es.pad_token_id)


def lean_tokens(model, ids, mask, n, es, **kw):
    with torch.inference_mode():
        return greedy_tokens(model, ids, mask, n, es.stop_token_ids, es.pad_token_id, **kw)


def first_stop(row, stop) -> int | None:
    return next((i for i, t in enumerate(row) if t in stop), None)


@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_lean_loop_gives_the_tokens_of_hf_generate(which, cache, base, tuned):
    model, tok = base if which == "base" else tuned
    exs = make_examples(10, seed=7, start=500)
    es = prepare_eval(tok, exs, max_length=48)
    ids, mask = left_padded(es)
    assert len(set(mask.sum(1).tolist())) > 2  # prompts of several lengths: real left padding
    stop = set(es.stop_token_ids)
    for n in (3, 16):
        want = hf_tokens(model, ids, mask, n, es)
        got = lean_tokens(model, ids, mask, n, es, cache=cache)
        assert got.dtype == torch.long and got.shape == want.shape, (got.shape, want.shape)
        assert torch.equal(got, want)
        # the same tokens when the stop flags are looked at only every 3 tokens, and whether stopped
        # rows leave the batch as soon as one stops (compact=1), at the default fraction, or never (0)
        assert torch.equal(lean_tokens(model, ids, mask, n, es, cache=cache, stop_check_every=3), want)
        for compact in (0.0, 1.0):
            assert torch.equal(lean_tokens(model, ids, mask, n, es, cache=cache, compact=compact), want)
    if which == "tuned":
        # the fine-tuned model ends most continuations: rows stop early (then pad) before other rows end
        rows = want.tolist()
        stops = [first_stop(r, stop) for r in rows]
        assert any(s is not None and s < want.shape[1] - 1 for s in stops), stops
        for r, s in zip(rows, stops):
            if s is not None:
                assert all(t == es.pad_token_id for t in r[s + 1:])
        # with 3 new tokens no row is done: the max_new_tokens limit ends decoding
        assert hf_tokens(model, ids, mask, 3, es).shape[1] == 3


def test_lean_loop_ends_when_every_row_has_stopped(tuned):
    model, tok = tuned
    exs = make_examples(6, seed=9, start=700)
    es = prepare_eval(tok, exs, max_length=48)
    ids, mask = left_padded(es)
    want = hf_tokens(model, ids, mask, 40, es)
    assert want.shape[1] < 40  # every row stopped before the limit: generate ended early
    for cache in ("dynamic", "static"):
        got = lean_tokens(model, ids, mask, 40, es, cache=cache)
        assert torch.equal(got, want)
        # the last step is the one at which the last running row emitted its stop token
        stop = set(es.stop_token_ids)
        assert max(first_stop(r, stop) for r in got.tolist()) == got.shape[1] - 1


@pytest.mark.parametrize("decode", ["hf", "loop", "static", "auto"])
def test_greedy_generate_modes_give_the_same_texts(decode, tuned):
    model, tok = tuned
    exs = make_examples(13, seed=11, start=900)
    es = prepare_eval(tok, exs, max_length=48)
    model.train()
    got = greedy_generate(model, tok, es, max_new_tokens=12, batch_size=5, decode=decode)
    assert model.training  # train mode restored
    model.eval()
    want = greedy_generate(model, tok, es, max_new_tokens=12, batch_size=13, decode="hf")
    assert got == want
    assert sum(bool(s) for s in want) >= 10 and len(set(want)) > 1  # real continuations, not all alike


def test_bad_arguments(tuned):
    model, tok = tuned
    es = prepare_eval(tok, make_examples(4, seed=3), max_length=48)
    ids, mask = left_padded(es)
    with pytest.raises(InputError, match="--decode"):
        resolve_decode("beam")
    with pytest.raises(InputError, match="--decode"):
        greedy_generate(model, tok, es, decode="fast")
    assert resolve_decode("AUTO") == "loop" and set(DECODE_MODES) >= {"hf", "loop", "static", "compile"}
    with pytest.raises(InputError, match="cache"):
        lean_tokens(model, ids, mask, 4, es, cache="paged")
    with pytest.raises(InputError, match="static"):
        lean_tokens(model, ids, mask, 4, es, cache="dynamic", compile=True)
    with pytest.raises(InputError, match="max_new_tokens"):
        lean_tokens(model, ids, mask, 0, es)
    with pytest.raises(InputError, match="compact"):
        lean_tokens(model, ids, mask, 4, es, compact=1.5)
    with pytest.raises(InputError, match="left padded"):
        lean_tokens(model, ids, mask.flip(1), 4, es)
    with pytest.raises(InputError, match=r"\[B, W\]"):
        lean_tokens(model, ids[0], mask[0], 4, es)
    with pytest.raises(InputError, match="stop_token_ids"):
        with torch.inference_mode():
            greedy_tokens(model, ids, mask, 4, [], es.pad_token_id)


def test_a_model_the_loop_cannot_drive_falls_back_to_generate(tuned):
    """A forward without ``position_ids``: the loop refuses it, greedy_generate warns and uses generate."""
    model, tok = tuned
    plain = type(model)

    class NoPositions(plain):
        def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
            return plain.forward(self, input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)

    odd = copy.deepcopy(model)
    odd.__class__ = NoPositions
    assert "position_ids" in lean_decode_unsupported(odd)
    assert lean_decode_unsupported(model) is None and lean_decode_unsupported(model, "static") is None
    es = prepare_eval(tok, make_examples(5, seed=4), max_length=48)
    ids, mask = left_padded(es)
    with pytest.raises(InputError, match="position_ids"):
        lean_tokens(odd, ids, mask, 4, es)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = greedy_generate(odd, tok, es, max_new_tokens=6, decode="loop")
    assert any("falls back to Hugging Face generate" in str(w.message) for w in caught)
    assert got == greedy_generate(odd, tok, es, max_new_tokens=6, decode="hf")


def test_a_copied_model_does_not_share_the_compiled_step_or_caches(base):
    from gptfluence.lm.decoding import _state

    model, _ = base
    st = _state(model)
    st.caches[("probe",)] = torch.zeros(1)
    try:
        twin = copy.deepcopy(model)
        assert _state(twin) is not st and not _state(twin).caches and _state(twin).compiled is None
        assert _state(model) is st
    finally:
        st.caches.pop(("probe",))


# ---------------------------------------------------------------------------------------------
# the collection option


def test_collect_config_names_a_bad_decode():
    from gptfluence.dynamics.collect import CollectConfig

    with pytest.raises(InputError, match="--decode"):
        CollectConfig(decode="beam").validate()
    CollectConfig(decode="static").validate()


def test_decode_does_not_change_the_store_and_a_store_resumes_under_another(tmp_path_factory, tmp_path):
    from gptfluence.dynamics.collect import CollectConfig, collect

    cfg = CollectConfig(task="data2text", **TINY_COLLECT)
    with private_model_cache(tmp_path_factory, "decode-collect", cfg):
        quiet = dict(workers=1, progress=False, log=lambda s: None)
        a = collect(CollectConfig(task="data2text", decode="hf", **TINY_COLLECT), tmp_path / "a", runs=1, **quiet)
        b = collect(CollectConfig(task="data2text", decode="loop", **TINY_COLLECT), tmp_path / "b", runs=1, **quiet)
        ra, rb = a.run("run-0000"), b.run("run-0000")
        assert set(ra.metrics) == {"loss", "bleu", "rougeL"}
        for m in ra.metrics:
            assert ra.values[m].tobytes() == rb.values[m].tobytes(), m
        assert np.isfinite(ra.values["bleu"]).all()
        # the hf store resumes with the lean loop (decode is not part of the identity)
        a2 = collect(CollectConfig(task="data2text", decode="static", **TINY_COLLECT), tmp_path / "a", runs=2, **quiet)
        assert a2.run_ids == ["run-0000", "run-0001"]
        assert "decode" not in (a2.manifest.get("config") or {})
