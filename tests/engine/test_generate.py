"""The engine: cached decoding vs recomputation, greedy equivalences, batching, stops, UTF-8, seeds, scoring."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.engine.sampling import SamplingParams
from conftest import load_engine, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with a sharp output distribution, so greedy and sampled texts are varied but
    reproducible."""
    return save_tiny_model(tmp_path_factory.mktemp("model"), tiny_tokenizer, context_length=128, embedding_scale=8.0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def test_cached_decoding_equals_full_recomputation(engine):
    prompt = engine.encode_prompt("the model reads")
    c = engine.complete([prompt], greedy(max_new_tokens=64, ignore_eos=True, logprobs=0))[0]
    assert len(c.ids) == 64
    with torch.no_grad():
        full = torch.log_softmax(engine.model(torch.tensor([prompt + c.ids])).float(), dim=-1)[0]
    for i, tok in enumerate(c.ids):
        expected = full[len(prompt) - 1 + i, tok].item()
        assert abs(c.logprobs[i] - expected) < 1e-5, (i, c.logprobs[i], expected)
        assert tok == int(full[len(prompt) - 1 + i].argmax())


def test_top_k_1_and_temperature_0_equal_greedy(engine):
    ref = engine.complete(["a token"], greedy(max_new_tokens=24, ignore_eos=True))[0].ids
    for params in (SamplingParams(top_k=1, temperature=1.3, top_p=1.0, min_p=0.0, seed=5, max_new_tokens=24, ignore_eos=True),
                   SamplingParams(temperature=0.0, top_k=40, seed=9, max_new_tokens=24, ignore_eos=True)):
        assert engine.complete(["a token"], params)[0].ids == ref


def test_num_beams_1_equals_greedy(engine):
    ref = engine.complete(["the cache"], greedy(max_new_tokens=16, ignore_eos=True))[0].ids
    hyp = engine.beam_search("the cache", greedy(max_new_tokens=16, ignore_eos=True, num_beams=1))[0]
    assert hyp.ids == ref


def test_batched_generation_equals_each_prompt_alone(engine):
    prompts = ["the", "each layer writes the value.", "our loss counts every byte and"]
    params = greedy(max_new_tokens=20, logprobs=2)
    batched = engine.complete(prompts, params)
    for p, b in zip(prompts, batched):
        alone = engine.complete([p], params)[0]
        assert b.ids == alone.ids and b.text == alone.text and b.finish_reason == alone.finish_reason
        assert b.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_same_seed_same_text_and_different_seed_differs(engine):
    params = lambda seed: SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_new_tokens=32,
                                         ignore_eos=True)
    a, b, c = (engine.complete(["the data"], params(s))[0].text for s in (1, 1, 2))
    assert a == b and a != c


def test_stop_string_across_token_boundaries(engine):
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_new_tokens=40, ignore_eos=True)
    full = engine.complete(["the model"], SamplingParams(**params))[0]
    pieces = [engine.tokenizer.decode([i]) for i in full.ids]
    # a stop string made of the end of one token and the start of the next (ASCII, so no partial characters)
    k = next(k for k in range(5, len(pieces) - 1) if pieces[k].isascii() and pieces[k + 1].isascii()
             and pieces[k] and pieces[k + 1])
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    cut = full.text.find(stop)
    got = engine.complete(["the model"], SamplingParams(**params, stop=[stop]))[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[:cut] and stop not in got.text


def test_streamed_deltas_are_valid_utf8_and_concatenate_to_the_text(engine):
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_new_tokens=60, ignore_eos=True)
    deltas, ids = [], []
    for ev in engine.generate(["日本語 😀"], params):
        deltas.append(ev.text)
        ids.append(ev.token_id)
    for d in deltas:
        d.encode("utf-8")  # every delta is whole characters (no lone surrogates, no split bytes)
    assert "".join(deltas) == engine.tokenizer.decode(ids)


def test_eos_and_length_finish_reasons(engine):
    out = engine.complete(["the"], SamplingParams(max_new_tokens=5, ignore_eos=True, seed=0))[0]
    assert out.finish_reason == "length" and len(out.ids) == 5
    eos = engine.tokenizer.eos_ids[0]
    out = engine.complete(["the"], SamplingParams(max_new_tokens=50, seed=0, logit_bias={eos: 100.0}))[0]
    assert out.finish_reason == "stop" and out.ids == [eos] and out.text == ""


def test_context_limit_finishes_with_length(engine):
    prompt = engine.tokenizer.encode("the model reads the value. " * 30)[:120]
    out = engine.complete([prompt], greedy(max_new_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(prompt) + len(out.ids) == 128


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"), (dict(num_beams=0), "num_beams"),
])
def test_bad_params_raise_value_error(engine, kw, match):
    with pytest.raises(ValueError, match=match):
        list(engine.generate(["the"], SamplingParams(**kw)))


def test_prompt_errors(engine):
    with pytest.raises(ValueError, match="context"):
        engine.encode_prompt(list(range(4, 4 + 128)))
    assert engine.encode_prompt("") == [engine.tokenizer.bos_id]  # empty prompt starts from BOS

    class NoBos:
        bos_id = None

        @staticmethod
        def encode(text):
            return []

    real = engine.tokenizer
    engine.tokenizer = NoBos()
    try:
        with pytest.raises(ValueError, match="no BOS"):
            engine.encode_prompt("")
    finally:
        engine.tokenizer = real


def test_score_matches_a_full_forward(engine):
    text = "the model reads the next word. each layer counts the value."
    r = engine.score(text)
    ids = r.ids
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids])).float(), dim=-1)[0]
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert r.logprobs == pytest.approx(expected, abs=1e-5)
    assert r.perplexity == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-5)


def test_score_longer_than_context_uses_overlapping_windows(engine):
    long_text = "the model reads the next word and each layer counts the value. " * 30
    r = engine.score(long_text)
    assert len(r.logprobs) == len(r.ids) - 1 and all(lp <= 0 for lp in r.logprobs)


def test_prompt_logprobs_on_request(engine):
    c = engine.complete(["the model reads the value."], greedy(max_new_tokens=2, prompt_logprobs=True))[0]
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(c.prompt_ids)
    assert c.prompt_logprobs[1:] == pytest.approx(engine.score_ids(c.prompt_ids).logprobs, abs=1e-6)


def test_repetition_penalty_reaches_the_engine(engine):
    plain = engine.complete(["the"], greedy(max_new_tokens=30, ignore_eos=True))[0].ids
    assert len(set(plain)) < len(plain)  # this random model repeats itself when left alone
    prompt = engine.encode_prompt("the")
    out = engine.complete([prompt], greedy(max_new_tokens=30, ignore_eos=True, repetition_penalty=1e4,
                                           repeat_last_n=-1))[0].ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


def test_ids_past_the_tokenizers_vocabulary_are_never_chosen(tiny_tokenizer):
    """A model with more embedding rows than its tokenizer has tokens (as Qwen2 pads its vocabulary): those
    ids have no text, and used to end a generation with IndexError. Here they are the most likely ones."""
    from lmforge.engine.generate import Engine
    from lmforge.engine.scheduler import Request, Scheduler
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset
    from conftest import wait_until

    torch.manual_seed(0)
    extra = 16
    model = GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size + extra, context_length=64,
                           tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight[-extra:] *= 50.0  # make the padded ids win the argmax
    engine = Engine(model, tiny_tokenizer, fast=False)
    V = tiny_tokenizer.vocab_size
    for params in (greedy(max_new_tokens=8, ignore_eos=True, logprobs=3),
                   SamplingParams(temperature=1.0, seed=3, max_new_tokens=8, ignore_eos=True)):
        c = engine.complete(["the model"], params)[0]
        assert len(c.ids) == 8 and max(c.ids) < V
        assert all(i < V for top in c.top_logprobs for i, _ in top)
    assert max(engine.beam_search("the model", greedy(num_beams=3, max_new_tokens=6, ignore_eos=True))[0].ids) < V
    got, done = [], []
    sched = Scheduler(engine, max_batch=2)
    try:
        sched.submit(Request(engine.encode_prompt("the model"), greedy(max_new_tokens=6, ignore_eos=True),
                             lambda ev: done.append(1) if ev is None else got.append(ev.token_id)))
        assert wait_until(lambda: done, timeout=30)
    finally:
        sched.stop()
    assert len(got) == 6 and max(got) < V
    assert max(engine.score_ids(engine.encode_prompt("the model reads"), top_k=3).top_logprobs[-1])[0] < V
