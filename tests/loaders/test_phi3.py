"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`), end to end, proved against `transformers` on tiny random
models built from `Phi3Config` (no downloads).

What each variant exercises: q|k|v and gate|up stored fused (`self_attn.qkv_proj`, `mlp.gate_up_proj`);
Phi-3-mini's window in every layer, at a length past it; Phi-4 (14B), which is Llama in Phi-3's layout;
Phi-4-mini's rotation of 3/4 of each head, tied embeddings and LongRoPE at lengths past its original context
(the long divisors); Phi-3.5's LongRoPE within it (the short divisors), with a window. Each gives
transformers' logits (fp32, 1e-4), cached decoding equal to full recomputation, and the same 16 greedy tokens
through our Engine (`tests.loaders.parity`), on import and after our export, which transformers loads back.
A direct check switches between the two LongRoPE tables by length as transformers does, call by call.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.hf import PHI3, config_to_hf, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.hf_tensors import PHI3_FAMILY, family, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from lmforge.loaders.model_dir import build_model, load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.model.kv_cache import KVCache  # noqa: E402
from tests.loaders.parity import assert_adapter_matches_peft, assert_matches_transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def factors(n: int, low: float, high: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()


def longrope(rotated: int) -> dict:
    """Phi-3.5/4's rope_scaling: one short and one long divisor per rotated frequency, no factor (derived
    from max_position_embeddings / original_max_position_embeddings, as in the released files)."""
    return {"type": "longrope", "short_factor": factors(rotated // 2, 1.0, 2.0, 1),
            "long_factor": factors(rotated // 2, 2.0, 20.0, 2)}


# variant -> Phi3Config kwargs. The parity run covers positions 0..34.
VARIANTS = {
    # Phi-3-mini-4k: full rotation, no scaling, a sliding window in every layer (2047 there), untied
    "phi3-mini": dict(sliding_window=8, tie_word_embeddings=False),
    # Phi-4 (14B): exactly Llama's computation, stored in Phi-3's fused layout
    "phi4": dict(tie_word_embeddings=False, rope_theta=250000.0),
    # Phi-4-mini: 3/4 of each head rotated, tied, LongRoPE; every position here is past the original 4
    "phi4-mini": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, original_max_position_embeddings=4,
                      rope_scaling=longrope(12)),
    # Phi-3.5-mini: LongRoPE; every position here within the original 48 (the short divisors); its window
    # (262144 there) here 8, so that Phi3's own class slides too
    "phi3.5-mini": dict(tie_word_embeddings=False, original_max_position_embeddings=48, rope_scaling=longrope(16),
                        sliding_window=8),
}


def hf_phi3(vocab: int, **kw) -> torch.nn.Module:
    """A seeded Phi3ForCausalLM with every parameter random (norm weights too, so a mis-mapped vector shows)."""
    torch.manual_seed(0)
    conf = transformers.Phi3Config(vocab_size=vocab, **{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.05 if "embed" in name else 0.15)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_and_export_match_transformers(variant, tmp_path, tiny_tokenizer):
    ref = hf_phi3(tiny_tokenizer.vocab_size, **VARIANTS[variant])
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs")
    cfg = ours.config
    if variant in ("phi3-mini", "phi4"):
        assert (cfg.sliding_window, cfg.sliding_layers, cfg.rope_dim, cfg.rope_scaling, cfg.tie_embeddings) == \
               (8 if variant == "phi3-mini" else None, None, None, None, False)
    else:
        assert cfg.rope_scaling["type"] == "longrope" and cfg.rope_scaling["factor"] == 64 / cfg.rope_scaling[
            "original_max_position_embeddings"]
        assert cfg.sliding_window == (8 if variant == "phi3.5-mini" else None) and cfg.sliding_layers is None
    if variant == "phi4-mini":
        assert (cfg.rope_dim, cfg.tie_embeddings, cfg.rope_scaling["original_max_position_embeddings"]) == (12, True, 4)
        assert hasattr(ours, "rope_short_cos")  # both tables: positions 0..3 use the short divisors
    assert_matches_transformers(ref, ours, tiny_tokenizer)

    # Exported, loaded by transformers and by us: as Phi-3 again, even where a Phi-3 (neither a partial rotation
    # nor LongRoPE) computes exactly what Mistral (a window in every layer) or Llama does - the config remembers
    # the class, so that tools and LoRA adapters find the fused layout they expect of a Phi-3.
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", ours, tokenizer=tiny_tokenizer)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [PHI3] and cfg.hf_class == PHI3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    again = load_model(tmp_path / "ours")
    assert again.config == cfg
    assert_matches_transformers(theirs, again, tiny_tokenizer)


def test_fused_tensor_names_are_transformers_own(tiny_tokenizer):
    """What we write is exactly the state dict Phi3ForCausalLM has (tied: no lm_head), with qkv_proj and
    gate_up_proj whole."""
    ref = hf_phi3(tiny_tokenizer.vocab_size, **VARIANTS["phi4-mini"])
    cfg = config_from_hf({**ref.config.to_dict(), "architectures": [PHI3]})
    assert family(cfg) == PHI3_FAMILY
    ours = state_dict_to_hf(cfg, GPT(cfg).state_dict())
    theirs = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_longrope_switches_tables_by_length_as_transformers_does(tiny_tokenizer):
    """Below the original context the short divisors, past it the long ones: full forward passes of 12 and 30
    tokens (original 16) both give transformers' logits. Cached decoding that crosses 16 picks the table per
    call, so keys cached before the crossing keep the short rotation: it is not the full recomputation past
    the crossing, but it is exactly what transformers' own model computes called the same way (its generate
    instead recomputes the whole sequence at the crossing; our Engine does not)."""
    ref = hf_phi3(tiny_tokenizer.vocab_size, partial_rotary_factor=0.75, original_max_position_embeddings=16,
                  rope_scaling=longrope(12))
    cfg = config_from_hf({**ref.config.to_dict(), "architectures": [PHI3]})
    ours = build_model(cfg, state_dict_from_hf(cfg, ref.state_dict()), source="reference")
    idx = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for T in (12, 16, 17, 30):
            torch.testing.assert_close(ours(idx[:, :T]), ref(idx[:, :T]).logits, atol=1e-4, rtol=1e-4)
        cache = KVCache.for_model(cfg, 2)
        mine = torch.cat([ours(idx[:, :12], cache=cache)] + [ours(idx[:, t:t + 1], cache=cache) for t in range(12, 20)], 1)
        past = transformers.DynamicCache(config=ref.config)
        theirs = [ref(idx[:, :12], cache=past, use_cache=True).logits]
        theirs += [ref(idx[:, t:t + 1], cache=past, use_cache=True).logits for t in range(12, 20)]
        torch.testing.assert_close(mine, torch.cat(theirs, 1), atol=1e-4, rtol=1e-4)
        # within the original context, cached decoding is the full recomputation (short divisors throughout);
        # past it, the full recomputation turns every key with the long ones, the cache kept the short ones
        torch.testing.assert_close(mine[:, :16], ours(idx[:, :16]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mine[:, 16:], ours(idx[:, :20])[:, 16:], atol=1e-3)


def test_a_model_trained_here_in_phi3s_shape_is_written_as_llama_or_mistral():
    """Without a Phi-3 file behind it, a config Llama computes exactly is Llama's (Mistral's with a window)."""
    from lmforge.loaders.hf import hf_architecture

    cfg = config_from_hf({**transformers.Phi3Config(vocab_size=64, **BASE, sliding_window=8).to_dict(),
                          "architectures": [PHI3]})
    assert hf_architecture(cfg) == PHI3
    assert hf_architecture(cfg.replace(hf_class=None)) == "MistralForCausalLM"
    assert hf_architecture(cfg.replace(hf_class=None, sliding_window=None)) == "LlamaForCausalLM"


def test_config_both_ways(tiny_tokenizer):
    """transformers' config -> ours -> config.json -> ours is the identity, and transformers reads our
    config.json as the same Phi-3 (rotated fraction, original context, LongRoPE lists)."""
    for variant in ("phi4-mini", "phi3.5-mini"):
        conf = transformers.Phi3Config(vocab_size=tiny_tokenizer.vocab_size, **{**BASE, **VARIANTS[variant]})
        cfg = config_from_hf({**conf.to_dict(), "architectures": [PHI3]})
        written = json.loads(json.dumps(config_to_hf(cfg)))
        assert config_from_hf(written) == cfg and hf_architecture(cfg) == PHI3
        back = transformers.Phi3Config(**{k: v for k, v in written.items() if k not in ("architectures", "lmforge")})
        assert back.rope_parameters["partial_rotary_factor"] == conf.rope_parameters["partial_rotary_factor"]
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            assert back.rope_parameters[key] == conf.rope_parameters[key]
        assert back.original_max_position_embeddings == conf.original_max_position_embeddings


def test_old_names_of_longrope_and_the_top_level_original_context():
    """Phi-3-mini-128k's files say "su" (and some "yarn"), both LongRoPE in transformers' Phi3; the top-level
    original_max_position_embeddings wins over one in the dict, as transformers has it."""
    for old in ("su", "yarn"):
        d = {"architectures": [PHI3], "vocab_size": 64, **BASE, "original_max_position_embeddings": 16,
             "rope_scaling": {"type": old, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                              "original_max_position_embeddings": 99}}
        sc = config_from_hf(d).rope_scaling
        assert (sc["type"], sc["original_max_position_embeddings"], sc["factor"]) == ("longrope", 16, 4.0)


@pytest.mark.parametrize("edits, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"partial_rotary_factor": 0.4375}, "partial_rotary_factor must be in"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor must be in"),
    ({"head_dim": 8}, "head_dim 8 other than"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear' is not supported for Phi-3"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}},
     "short_factor must have one number per rotated frequency \\(8\\), got 7"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7 + [-1]}},
     "long_factor must be a list of positive numbers"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                       "attention_factor": "big"}}, "attention_factor must be a positive number"),
])
def test_bad_configs_are_one_line(edits, message):
    d = {"architectures": [PHI3], "vocab_size": 64, **BASE, **edits}
    with pytest.raises(UserError, match=message) as e:
        config_from_hf(d, source="cfg.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant, targets", [("phi4-mini", "qkv_proj,gate_up_proj"), ("phi3-mini", "q_proj,v_proj,down_proj"),
                                              ("phi3.5-mini", "all-linear")])
def test_lora_adapter_loads_in_peft(variant, targets, tmp_path, tiny_tokenizer):
    """LoRA on Phi-3 under PEFT's names, its fused modules (qkv_proj, gate_up_proj) or their parts: peft puts
    our adapter on transformers' Phi-3 and computes our logits, adapted and merged."""
    hf_phi3(tiny_tokenizer.vocab_size, **VARIANTS[variant]).save_pretrained(tmp_path / "base")
    assert_adapter_matches_peft(tmp_path / "base", targets, tmp_path)