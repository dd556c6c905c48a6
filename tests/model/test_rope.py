"""Rotary scaling (`lmforge.model.rope`) against transformers' own `ROPE_INIT_FUNCTIONS`: the inverse
frequencies and the attention factor of linear, llama3, YaRN (Qwen3's and DeepSeek's keys) and LongRoPE (short
and long divisors, partial rotation) on several configs; what `rope_scaling_problem` refuses, in one line;
and a Qwen3 with YaRN end to end (import, export, transformers' logits)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.config import ModelConfig, rope_scaling_problem
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.model.rope import inverse_frequencies, longrope_short_length, rope_tables

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

transformers.logging.set_verbosity_error()


def factors(n: int, low: float, high: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()


PHI35 = {"rope_type": "longrope", "short_factor": factors(48, 1.0, 1.1, 1), "long_factor": factors(48, 1.0, 60.0, 2)}
# name -> (transformers config class, head_dim, heads, max_position_embeddings, rope_parameters, extra kwargs)
CASES = {
    "linear": ("LlamaConfig", 64, 4, 4096, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, {}),
    "llama3": ("LlamaConfig", 64, 32, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                "rope_theta": 500000.0}, {}),
    # Qwen3's long-context recipe: factor 4 over its 32k
    "yarn-qwen3": ("Qwen3Config", 128, 16, 131072, {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32768, "rope_theta": 1e6}, {}),
    # DeepSeek's keys: mscale over mscale_all_dim, beta_fast / beta_slow
    "yarn-deepseek": ("LlamaConfig", 64, 16, 163840, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                       "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                                       "original_max_position_embeddings": 4096, "rope_theta": 10000.0}, {}),
    "yarn-mscale-untruncated": ("LlamaConfig", 64, 16, 163840, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                                                 "mscale_all_dim": 1.0, "truncate": False,
                                                                 "original_max_position_embeddings": 4096,
                                                                 "rope_theta": 10000.0}, {}),
    "yarn-given-attention": ("LlamaConfig", 64, 16, 65536, {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.5,
                                                             "beta_fast": 16, "beta_slow": 2,
                                                             "original_max_position_embeddings": 8192,
                                                             "rope_theta": 10000.0}, {}),
    # Phi-3.5-mini: factor and attention factor derived from 131072 / 4096
    "longrope-phi3.5": ("Phi3Config", 96, 32, 131072, PHI35, {"original_max_position_embeddings": 4096}),
    # Phi-4-mini: 3/4 of each head (48 frequencies of 64)
    "longrope-phi4-partial": ("Phi3Config", 128, 24, 131072, PHI35,
                              {"original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75}),
    "longrope-given-factors": ("Phi3Config", 96, 32, 131072, {**PHI35, "factor": 8.0, "attention_factor": 1.3},
                               {"original_max_position_embeddings": 4096}),
}


def theirs_and_ours(name: str, seq_len: int | None):
    cls, head_dim, heads, context, params, extra = CASES[name]
    conf = getattr(transformers, cls)(hidden_size=head_dim * heads, num_attention_heads=heads, head_dim=head_dim,
                                      max_position_embeddings=context, rope_parameters=dict(params), **extra)
    want = ROPE_INIT_FUNCTIONS[conf.rope_parameters["rope_type"]](conf, None, seq_len=seq_len)
    sc = {k: v for k, v in conf.rope_parameters.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
    sc["type"] = params["rope_type"]
    rotated = int(head_dim * extra.get("partial_rotary_factor", 1.0))
    assert rope_scaling_problem(sc, rotated) is None
    got = inverse_frequencies(rotated, conf.rope_parameters["rope_theta"], sc, context, seq_len=seq_len)
    return want, got


@pytest.mark.parametrize("name", CASES)
def test_inverse_frequencies_and_attention_factor_are_transformers(name):
    lengths = [4096, 4097, 131072] if name.startswith("longrope") else [None]
    for seq_len in lengths:  # LongRoPE: short divisors up to the original context, long ones past it
        (want, want_factor), (got, got_factor) = theirs_and_ours(name, seq_len)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert got_factor == pytest.approx(want_factor, rel=1e-12)
    if name == "longrope-phi3.5":  # sqrt(1 + ln 32 / ln 4096), and the long divisors really differ
        assert got_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
        assert not torch.allclose(theirs_and_ours(name, 4096)[1][0], theirs_and_ours(name, 4097)[1][0])
    if name == "yarn-qwen3":
        assert got_factor == pytest.approx(0.1 * math.log(4) + 1)


def test_longrope_tables_short_then_long():
    """The short table covers exactly the original context; the main table (the whole context) has the long
    divisors, and both carry the same attention factor."""
    sc = {"type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [4.0, 8.0], "original_max_position_embeddings": 8}
    assert longrope_short_length(sc, 32) == 8 and longrope_short_length(sc, 8) is None
    assert longrope_short_length({"type": "linear", "factor": 2.0}, 32) is None
    cos, _ = rope_tables(4, 10000.0, sc, 32)
    short_cos, _ = rope_tables(4, 10000.0, sc, 32, rows=8)
    factor = math.sqrt(1 + math.log(4) / math.log(8))
    assert cos.shape == (32, 4) and short_cos.shape == (8, 4)
    assert cos[0, 0].item() == pytest.approx(factor) == short_cos[0, 0].item()
    # position 1, frequency 1: 1/(divisor * 10000^(2/4)) radians
    assert short_cos[1, 1].item() == pytest.approx(factor * math.cos(1 / 100))
    assert cos[1, 1].item() == pytest.approx(factor * math.cos(1 / 800))


def test_model_keeps_both_longrope_tables_only_when_it_stretches():
    base = dict(vocab_size=64, context_length=32, d_model=32, n_layers=1, n_heads=2, rope_dim=8)
    sc = {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [3.0] * 4, "original_max_position_embeddings": 8}
    model = GPT(ModelConfig(**base, rope_scaling=sc))
    assert model.rope_short_cos.shape == (8, 8) and model.rope_cos.shape == (32, 8)
    within = GPT(ModelConfig(**{**base, "context_length": 8}, rope_scaling=sc))
    assert not hasattr(within, "rope_short_cos")


@pytest.mark.parametrize("scaling, message", [
    ({"type": "yarn"}, "needs a positive factor, got None"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "yarn needs original_max_position_embeddings"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": -1}, "beta_fast must be a positive number"),
    ({"type": "yarn", "factor": 4.0, "mscale": "1"}, "mscale must be a number >= 0"),
    ({"type": "yarn", "factor": 4.0, "truncate": "no"}, "truncate must be true or false"),
    ({"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}, "longrope needs original_max_position"),
    ({"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 3, "original_max_position_embeddings": 8},
     "long_factor must have one number per rotated frequency \\(4\\), got 3"),
    ({"type": "longrope", "short_factor": [1.0, 0.0, 1.0, 1.0], "long_factor": [1.0] * 4,
      "original_max_position_embeddings": 8}, "short_factor must be a list of positive numbers"),
    ({"type": "longrope", "short_factor": "ones", "long_factor": [1.0] * 4,
      "original_max_position_embeddings": 8}, "short_factor must be a list of positive numbers"),
    ({"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4, "factor": -2,
      "original_max_position_embeddings": 8}, "needs a positive factor"),
    ({"type": "ntk", "factor": 2.0}, "rope_scaling type must be one of linear, llama3, yarn, longrope, su"),
])
def test_bad_scaling_is_one_line(scaling, message):
    with pytest.raises(UserError, match=message) as e:
        ModelConfig(vocab_size=64, context_length=32, d_model=32, n_layers=1, n_heads=2, rope_dim=8, rope_scaling=scaling)
    assert "\n" not in str(e.value)


def test_qwen3_with_yarn_matches_transformers(tmp_path, tiny_tokenizer):
    """A Qwen3 whose rope_scaling is YaRN (factor 4 over an original 16-token context; no
    original_max_position_embeddings in the file is max_position_embeddings, as transformers has it):
    transformers' logits, cached == full and greedy tokens, on import and after our export."""
    from lmforge.loaders.hf_read import config_from_hf
    from lmforge.loaders.model_dir import load_model, write_model_files
    from tests.loaders.parity import assert_matches_transformers

    torch.manual_seed(0)
    conf = transformers.Qwen3Config(vocab_size=tiny_tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
                                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    ref = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.15)
    ref.eval().save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs")
    assert ours.config.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert_matches_transformers(ref, ours, tiny_tokenizer)

    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", ours, tokenizer=tiny_tokenizer)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["rope_scaling"]["rope_type"] == "yarn"
    assert config_from_hf(written) == ours.config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert_matches_transformers(theirs, load_model(tmp_path / "ours"), tiny_tokenizer)

    # no original context in the file: transformers takes max_position_embeddings, and so do we (written out)
    d = {**json.loads((tmp_path / "theirs" / "config.json").read_text())}
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    d.pop("rope_scaling", None)
    assert config_from_hf(d).rope_scaling["original_max_position_embeddings"] == 64
