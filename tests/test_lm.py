"""gptfluence.lm: the default base model, tokenized data, losses, generation (tiny model, own cache)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gptfluence.errors import GptfluenceError, InputError
from gptfluence.lm import (
    BaseModelConfig,
    causal_lm_loss,
    ensure_default_model,
    greedy_generate,
    load_model,
    make_optimizer,
    masked_target_loss,
    prepare_eval,
    target_losses,
    tokenize_examples,
)
from gptfluence.lm import model as lm_model
from gptfluence.lm.evaluation import _decode
from gptfluence.types import Example

TINY = BaseModelConfig(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=300,
                       max_length=48, pretrain_steps=30, pretrain_batch_size=8, pretrain_lr=3e-3, seed=0)

NAMES = ["Alan", "Berta", "Carlo", "Dana", "Elif", "Farid"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito"]


def make_examples(n: int, seed: int = 0, start: int = 0) -> list[Example]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        name, city = r.choice(NAMES), r.choice(CITIES)
        if i % 3 == 0:
            lab = r.choice(["positive", "negative"])
            out.append(Example(start + i, f"Review: {name} liked {city} a lot {'!' * (i % 4)}\nSentiment:", f" {lab}"))
        elif i % 3 == 1:
            out.append(Example(start + i, f"Q: is {city} in {city}?\nA:", " yes" if i % 2 else " no"))
        else:
            out.append(Example(start + i, f"Data: name[{name}] city[{city}]" + " x" * (i % 5) + "\nText:",
                               f" {name} lives in {city}."))
    return out


CORPUS = [e.text for e in make_examples(300, seed=1)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptfluence-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLUENCE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_path(cache):
    return ensure_default_model(TINY, corpus=CORPUS, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model, tok = load_model(str(tiny_path))
    return model, tok


def test_default_model_is_cached_in_gptfluence_cache(cache, tiny_path, monkeypatch, capsys):
    assert tiny_path.parent == cache / "models"
    assert (tiny_path / "config.json").exists() and (tiny_path / "gptfluence_model.json").exists()
    info = lm_model.read_model_info(tiny_path)
    assert info["config"]["num_layers"] == 1 and info["corpus_texts"] == len(CORPUS)
    assert info["final_loss"] < info["first_loss"]
    assert lm_model.base_config_of(tiny_path) == TINY

    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(lm_model, "pretrain", boom)
    again = ensure_default_model(TINY, corpus=CORPUS, progress=True)
    assert again == tiny_path
    assert "reusing cached base model at" in capsys.readouterr().err
    # a different corpus or config is a different model
    assert lm_model.model_key(TINY, lm_model.corpus_sha256(CORPUS[:-1])) not in tiny_path.name
    assert not list((cache / "models").glob(".*tmp*"))


def test_default_model_is_deterministic(tiny_path, tmp_path):
    other = ensure_default_model(TINY, corpus=CORPUS, cache_dir=tmp_path, progress=False)
    assert other.name == tiny_path.name
    a, ta = load_model(str(tiny_path))
    b, tb = load_model(str(other))
    assert ta.get_vocab() == tb.get_vocab()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_tokenizer_and_architecture(tiny):
    model, tok = tiny
    for w in TINY.label_words:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    cfg = model.config
    assert cfg.model_type == "gpt_neox" and cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert cfg.hidden_dropout == 0 and cfg.attention_dropout == 0
    assert not model.training
    assert "token_type_ids" not in tok("hello")


def test_load_model_errors(tmp_path):
    with pytest.raises(GptfluenceError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(GptfluenceError, match="no config.json"):
        load_model(str(tmp_path))
    from transformers import T5Config

    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8, vocab_size=10).save_pretrained(tmp_path / "t5")
    with pytest.raises(GptfluenceError, match="not a causal LM"):
        load_model(str(tmp_path / "t5"))


def test_tokenize_examples_masks_prompt_and_padding(tiny):
    _, tok = tiny
    exs = [Example(7, "Q: is it?\nA:", " yes"), Example(3, "Data: a b c d e f g h\nText:", " a b c.")]
    te = tokenize_examples(tok, exs, max_length=48)
    assert te.ids.tolist() == [7, 3]
    eos = tok.eos_token_id
    for row, ex in enumerate(exs):
        p = tok.encode(ex.prompt, add_special_tokens=False)
        t = tok.encode(ex.target, add_special_tokens=False) + [eos]
        n = len(p) + len(t)
        assert te.prompt_lengths[row] == len(p) and te.lengths[row] == n
        assert te.input_ids[row, :n].tolist() == p + t
        assert te.labels[row, : len(p)].eq(-100).all() and te.labels[row, len(p): n].tolist() == t
        assert te.labels[row, n:].eq(-100).all() and te.attention_mask[row, n:].eq(0).all()
        assert te.input_ids[row, n:].eq(tok.pad_token_id).all()
    b = te.batch([0])
    assert b["input_ids"].shape == (1, te.lengths[0])
    assert te.rows_for_ids([3, 7]).tolist() == [1, 0]
    with pytest.raises(InputError):
        te.rows_for_ids([99])
    # no eos for the loss metric
    te2 = tokenize_examples(tok, exs, max_length=48, append_eos=False)
    assert (te2.lengths == te.lengths - 1).all()


def test_truncation_cuts_prompt_from_the_left(tiny):
    _, tok = tiny
    ex = Example(0, "Data:" + " word" * 80 + "\nText:", " Alan lives in Paris.")
    te = tokenize_examples(tok, [ex], max_length=20)
    t = tok.encode(ex.target, add_special_tokens=False) + [tok.eos_token_id]
    p = tok.encode(ex.prompt, add_special_tokens=False)
    assert te.lengths[0] == 20 and te.truncated[0]
    assert te.input_ids[0].tolist() == p[-(20 - len(t)):] + t
    assert (te.labels[0] != -100).sum() == len(t)


def test_masked_target_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    got = masked_target_loss(logits, labels)
    lp = torch.log_softmax(logits, -1)
    want0 = -(lp[0, 1, 3] + lp[0, 2, 4]) / 2
    want1 = -(lp[1, 0, 1] + lp[1, 1, 2] + lp[1, 2, 6] + lp[1, 3, 0]) / 4
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-6)


def test_target_losses_equal_naive_per_example_loss(tiny):
    model, tok = tiny
    exs = make_examples(23, seed=3, start=100)
    es = prepare_eval(tok, exs, max_length=48)
    model.train()
    fast = target_losses(model, es, batch_size=8)  # several length-sorted chunks
    assert model.training  # train mode restored
    model.eval()
    assert fast.dtype == np.float64 and fast.shape == (23,)
    naive, by_hand = [], []
    with torch.no_grad():
        for ex in exs:
            p = tok.encode(ex.prompt, add_special_tokens=False)
            t = tok.encode(ex.target, add_special_tokens=False)
            ids = torch.tensor([p + t])
            labels = ids.clone()
            labels[0, : len(p)] = -100
            out = model(input_ids=ids, labels=labels)
            naive.append(out.loss.item())
            by_hand.append(masked_target_loss(out.logits, labels).item())
    np.testing.assert_allclose(fast, naive, atol=1e-5)
    np.testing.assert_allclose(fast, by_hand, atol=1e-5)
    np.testing.assert_allclose(target_losses(model, es), fast, atol=1e-5)  # one batch
    np.testing.assert_allclose(target_losses(model, es, max_tokens=64), fast, atol=1e-5)  # token budget


def test_causal_lm_loss_matches_hf_loss_and_gradients(tiny):
    model, tok = tiny
    te = tokenize_examples(tok, make_examples(6, seed=4), max_length=48)
    b = te.batch([0, 2, 5])
    model.zero_grad()
    ours = causal_lm_loss(model, b)
    ours.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(**b).loss
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    assert abs(causal_lm_loss(model, b, head_only=False).item() - ref.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(g1[n], p.grad, atol=1e-6), n
    model.zero_grad()


def test_make_optimizer_groups_and_schedule(tiny):
    model, _ = tiny
    opt, sched = make_optimizer(model, lr=1e-3, weight_decay=0.1, warmup_steps=4, total_steps=10)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    n_params = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 5e-3 / 6, 4e-3 / 6, 3e-3 / 6, 2e-3 / 6, 1e-3 / 6])
    opt, sched = make_optimizer(model, lr=1e-3, warmup_steps=0, total_steps=5, schedule="constant")
    for _ in range(5):
        assert opt.param_groups[0]["lr"] == 1e-3
        opt.step()
        sched.step()
    with pytest.raises(GptfluenceError):
        make_optimizer(model, lr=1e-3, schedule="cosine")


def test_greedy_generate_batched_equals_per_example(tiny):
    model, tok = tiny
    exs = make_examples(12, seed=5, start=200)  # prompts of different lengths: real left padding
    es = prepare_eval(tok, exs, max_length=48)
    assert len({len(p) for p in es.prompt_ids}) > 1
    model.train()
    batched = greedy_generate(model, tok, es, max_new_tokens=12, batch_size=5)
    assert model.training
    model.eval()
    assert len(batched) == 12 and all(isinstance(s, str) and "\n" not in s for s in batched)
    for ex, got in zip(exs, batched):
        ids = torch.tensor([tok.encode(ex.prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, eos_token_id=es.stop_token_ids,
                                 pad_token_id=tok.pad_token_id)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        assert got == want
    assert es.references[0] == exs[0].target.strip()


def test_decode_stops_at_eos_and_newline(tiny):
    _, tok = tiny
    ids = tok.encode(" Alan lives\nin Paris", add_special_tokens=False)
    stop = {tok.eos_token_id} | {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    assert _decode(tok, ids, stop) == "Alan lives"
    ids = tok.encode(" Alan", add_special_tokens=False) + [tok.eos_token_id] + tok.encode(" more", add_special_tokens=False)
    assert _decode(tok, ids, stop) == "Alan"


def test_bad_inputs(tiny):
    _, tok = tiny
    with pytest.raises(InputError):
        tokenize_examples(tok, [], max_length=10)
    with pytest.raises(InputError, match="empty target"):
        tokenize_examples(tok, [Example(0, "a", "")], max_length=10, append_eos=False)
    with pytest.raises(InputError, match="duplicate id"):
        tokenize_examples(tok, [Example(0, "a", " b"), Example(0, "c", " d")], max_length=10)
    with pytest.raises(GptfluenceError):
        BaseModelConfig(hidden_size=30, num_heads=4)
