"""Beam search: one beam is greedy decoding, scores are the model's own log-probabilities, results match
transformers' `generate(num_beams=k)` hypothesis for hypothesis, and bad arguments are refused."""

from __future__ import annotations

import functools

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine.beam import beam_search
from lmforge.model.gpt import GPT

PROMPT = [5, 9, 17, 3]
VARIANTS = {
    "llama": dict(),
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True),
}


def tiny_model(seed: int = 0, **kw) -> GPT:
    base = dict(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                init_std=0.1)
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def eos_heavy_model(eos: int = 2, boost: float = 3.0) -> GPT:
    """A tiny model whose EOS logit is scaled up, so that some beams end on EOS and others run to the limit."""
    model = tiny_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[eos] *= boost
    return model


def greedy(model: GPT, prompt: list[int], n: int, eos: tuple[int, ...] = ()) -> list[int]:
    """The reference: argmax of a full forward pass per token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] in eos:
                break
    return ids[len(prompt):]


def full_forward_logprob(model: GPT, prompt: list[int], ids: list[int]) -> float:
    """Sum of log p(ids | prompt) from one uncached forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).sum())


# ---------------------------------------------------------------------------------------------------
# Our own invariants
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_beam_is_greedy(variant):
    model = tiny_model(**VARIANTS[variant])
    expected = greedy(model, PROMPT, 20)
    (hyp,) = beam_search(model, PROMPT, num_beams=1, max_new_tokens=20)
    assert hyp.ids == expected and hyp.finish_reason == "length"

    eos = expected[6]  # a token greedy decoding produces, so it stops there
    expected = greedy(model, PROMPT, 20, eos=(eos,))
    for early_stopping in (True, False, "never"):  # with one beam, transformers decodes greedily in every mode
        (hyp,) = beam_search(model, PROMPT, num_beams=1, max_new_tokens=20, eos_ids=(eos,),
                             early_stopping=early_stopping)
        assert hyp.ids == expected and hyp.ids[-1] == eos and hyp.finish_reason == "stop"


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_are_the_models_logprobs(variant):
    """Every hypothesis' sum_logprob equals an uncached forward pass over prompt + ids, which proves the cache
    rows were reordered with their beams; score = sum / len ** length_penalty."""
    model = tiny_model(**VARIANTS[variant])
    eos = greedy(model, PROMPT, 8)[3]
    hyps = beam_search(model, PROMPT, num_beams=4, max_new_tokens=16, length_penalty=0.7, eos_ids=(eos,), n_best=4)
    assert len(hyps) == 4
    for h in hyps:
        assert h.sum_logprob == pytest.approx(full_forward_logprob(model, PROMPT, h.ids), abs=1e-4)
        assert h.score == pytest.approx(h.sum_logprob / len(h.ids) ** 0.7, rel=1e-5)


def test_finish_reasons_order_and_n_best():
    eos = 2
    model = eos_heavy_model(eos)
    hyps = beam_search(model, PROMPT, num_beams=5, max_new_tokens=10, eos_ids=(eos,), n_best=5)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert {h.finish_reason for h in hyps} == {"stop", "length"}
    for h in hyps:
        if h.finish_reason == "stop":
            assert h.ids[-1] == eos and eos not in h.ids[:-1]
        else:
            assert h.finish_reason == "length" and len(h.ids) == 10 and eos not in h.ids
    top2 = beam_search(model, PROMPT, num_beams=5, max_new_tokens=10, eos_ids=(eos,), n_best=2)
    assert top2 == hyps[:2]


def test_context_limit_caps_the_budget():
    model = tiny_model()  # context_length 48
    prompt = list(range(1, 46))  # 45 tokens: room for 3
    hyps = beam_search(model, prompt, num_beams=3, max_new_tokens=50, n_best=3)
    assert len(hyps) == 3 and all(len(h.ids) == 3 and h.finish_reason == "length" for h in hyps)


@pytest.mark.parametrize("bad, match", [
    (dict(num_beams=0), "num_beams"),
    (dict(n_best=4), "n_best"),
    (dict(n_best=0), "n_best"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1] * 48), "no room"),
])
def test_bad_arguments_are_refused(bad, match):
    args = dict(prompt=PROMPT, num_beams=3, max_new_tokens=5, n_best=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        beam_search(tiny_model(), args.pop("prompt"), **args)


# ---------------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def hf_pair(head_scale: float, eos_boost: float, eos: int):
    """A tiny random LlamaForCausalLM and our GPT with the same weights. Scaling the output head makes the
    distributions peaky (so beams diverge clearly) and boosting the EOS row makes beams finish early."""
    transformers = pytest.importorskip("transformers")
    from lmforge.loaders.hf_read import config_from_hf
    from lmforge.loaders.hf_tensors import state_dict_from_hf

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ref = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(head_scale)
        ref.lm_head.weight[eos].mul_(eos_boost)
    cfg = config_from_hf({**conf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    ours = GPT(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(cfg, ref.state_dict()))
    return ref, ours


# (head scale, EOS boost, eos ids, beams, length_penalty, early_stopping, some beam stops on EOS): picked so that
# beams finish on EOS at different steps, and the early_stopping modes and length penalties give different results.
PARITY = [
    (30.0, 2.0, (2,), 4, 1.0, True, True),
    (30.0, 2.0, (2,), 4, 1.0, False, True),
    (30.0, 2.0, (2,), 4, 0.5, True, True),
    (30.0, 2.0, (2,), 4, 0.5, False, True),
    (10.0, 4.0, (2,), 4, 1.0, False, True),
    (10.0, 4.0, (2,), 4, 1.0, "never", True),
    (10.0, 4.0, (2,), 4, -0.5, False, True),  # a negative penalty favours short hypotheses
    (10.0, 4.0, (2,), 4, 2.0, "never", False),  # "never" with a positive penalty: scored at max length
    (30.0, 2.0, (2, 40, 6), 3, 1.0, False, True),  # several EOS ids: 3k candidates per step
]


@pytest.mark.parametrize("scale, boost, eos, num_beams, length_penalty, early_stopping, stops", PARITY)
def test_matches_transformers(scale, boost, eos, num_beams, length_penalty, early_stopping, stops):
    ref, ours = hf_pair(scale, boost, eos[0])
    out = ref.generate(torch.tensor([PROMPT]), num_beams=num_beams, do_sample=False, max_new_tokens=12,
                       num_return_sequences=num_beams, output_scores=True, return_dict_in_generate=True,
                       eos_token_id=list(eos), pad_token_id=0, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    hyps = beam_search(ours, PROMPT, num_beams=num_beams, max_new_tokens=12, length_penalty=length_penalty,
                       early_stopping=early_stopping, eos_ids=eos, n_best=num_beams)
    expected = []
    for row in out.sequences[:, len(PROMPT):].tolist():  # finished rows are padded after their EOS
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        expected.append(row[:end])
    assert [h.ids for h in hyps] == expected
    torch.testing.assert_close(torch.tensor([h.score for h in hyps]), out.sequences_scores, atol=1e-4, rtol=1e-4)
    assert any(h.finish_reason == "stop" for h in hyps) == stops
    for h in hyps:
        assert h.finish_reason == ("stop" if h.ids[-1] in eos else "length")


def test_matches_transformers_through_sliding_windows():
    """Beams of a Gemma 2 (alternating 4-token windows, soft caps, (1 + w) norms) reorder their cache rows
    every step: the hypotheses and scores are transformers'."""
    transformers = pytest.importorskip("transformers")
    from lmforge.loaders.hf_read import config_from_hf
    from lmforge.loaders.hf_tensors import state_dict_from_hf

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    conf = transformers.Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                                     sliding_window=4, query_pre_attn_scalar=8, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, tie_word_embeddings=False)
    ref = transformers.Gemma2ForCausalLM(conf).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(30.0)
    cfg = config_from_hf(conf.to_dict() | {"architectures": ["Gemma2ForCausalLM"]})
    assert cfg.sliding_window == 4 and cfg.sliding_layers == [0]
    ours = GPT(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(cfg, ref.state_dict()))
    out = ref.generate(torch.tensor([PROMPT]), num_beams=3, do_sample=False, max_new_tokens=12, num_return_sequences=3,
                       output_scores=True, return_dict_in_generate=True, eos_token_id=[2], pad_token_id=0)
    hyps = beam_search(ours, PROMPT, num_beams=3, max_new_tokens=12, eos_ids=(2,), n_best=3)
    expected = []
    for row in out.sequences[:, len(PROMPT):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t == 2), len(row))
        expected.append(row[:end])
    assert [h.ids for h in hyps] == expected
    torch.testing.assert_close(torch.tensor([h.score for h in hyps]), out.sequences_scores, atol=1e-4, rtol=1e-4)


class _Letters:
    """A tokenizer stand-in: id i is the letter chr(97 + i)."""

    def token_bytes(self, i):
        return chr(97 + i).encode()


@pytest.mark.parametrize("ids, reason, stop, eos, want_text, want_reason, want_ids", [
    ([0, 1, 2], "length", (), (), "abc", "length", [0, 1, 2]),  # nothing to do
    ([0, 1, 25], "stop", (), (25,), "ab", "stop", [0, 1]),  # the EOS that ended it is dropped
    ([0, 25, 1], "length", (), (25,), "azb", "length", [0, 25, 1]),  # an EOS id inside stays (ignore_eos runs)
    ([0, 1, 2, 3], "length", ("c",), (), "ab", "stop", [0, 1, 2, 3]),  # cut before a stop string
    ([0, 1, 2, 3], "length", ("d", "bc"), (), "a", "stop", [0, 1, 2, 3]),  # the earliest stop string wins
    ([0, 1, 25], "stop", ("z",), (25,), "ab", "stop", [0, 1]),  # the dropped EOS is not text to stop on
])
def test_finish_beams(ids, reason, stop, eos, want_text, want_reason, want_ids):
    from lmforge.engine.beam import BeamHypothesis, finish_beams

    (r,) = finish_beams(_Letters(), [BeamHypothesis(ids, -0.5, -1.5, reason)], stop=stop, eos_ids=eos)
    assert (r.text, r.finish_reason, r.ids) == (want_text, want_reason, want_ids)
    assert (r.score, r.sum_logprob, r.n_tokens) == (-0.5, -1.5, len(ids))  # the search's ranking is kept
