"""The planning presets of 2026's small open models are their published shapes: `phi4-mini` is what
Phi-4-mini-instruct's config.json describes (3,836,021,760 parameters) and `gemma3-1b` what Gemma-3-1B's does
(999,885,952), each counted by transformers building the model from that config.json on the meta device, and
each what our importer reads from it."""

from __future__ import annotations

import pytest
import torch

from lmforge.loaders.hf import PHI3, config_to_hf, hf_architecture
from lmforge.loaders.hf_read import config_from_hf
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# microsoft/Phi-4-mini-instruct's config.json as released, but for the 48 learned long divisors (a stand-in
# here: the count and shape do not depend on them).
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072,
    "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "lm_head_bias": False,
    "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0 + i for i in range(48)]},
}
# google/gemma-3-1b-it's config.json as released.
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "attention_bias": False, "bos_token_id": 2, "eos_token_id": [1, 106],
    "pad_token_id": 0,
}


def transformers_count(d: dict) -> tuple[str, int]:
    """(class, parameter count) of the model transformers builds from a config.json, on the meta device."""
    conf = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items()
                                                                if k not in ("architectures", "model_type", "lmforge")})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    return type(model).__name__, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published, count", [("phi4-mini", PHI4_MINI, 3_836_021_760),
                                                    ("gemma3-1b", GEMMA3_1B, 999_885_952)])
def test_presets_are_the_published_shapes(name, published, count):
    cfg = get_preset(name)
    assert transformers_count(published) == (published["architectures"][0], count)
    assert cfg.num_params() == count
    with torch.device("meta"):
        assert GPT(cfg).num_params() == count
    # our config.json of the preset builds the same class and count in transformers
    assert hf_architecture(cfg) == published["architectures"][0]
    assert transformers_count(config_to_hf(cfg)) == (published["architectures"][0], count)
    # and importing the published config.json gives the preset (Phi-4-mini's 262144 window is beyond its
    # context, so it changes nothing; its long divisors are the file's own)
    imported = config_from_hf(published)
    if name == "phi4-mini":
        assert imported.sliding_window == 262144 and imported.rope_scaling["factor"] == 32.0
        imported = imported.replace(sliding_window=None, rope_scaling={
            k: v for k, v in imported.rope_scaling.items() if k != "factor"} | {"long_factor": cfg.rope_scaling["long_factor"]})
    assert imported == cfg


def test_phi4_mini_preset_rotates_three_quarters_with_longrope():
    cfg = get_preset("phi4-mini")
    assert (cfg.head_dim, cfg.rope_dim, len(cfg.rope_scaling["short_factor"])) == (128, 96, 48)
    assert hf_architecture(cfg) == PHI3 and config_to_hf(cfg)["partial_rotary_factor"] == 0.75
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.rope_short_cos.shape == (4096, 96) and model.rope_cos.shape == (131072, 96)
