"""Exact-name model presets. A preset is looked up by its full name, never guessed from a path.

`tiny` exists for tests; `small` trains usefully on a 2-core laptop CPU in minutes; `base` is the size
one GPU pretrains in hours. The `llama-*` and `gpt2` presets copy the shapes of well-known open models
(for benchmarks and memory planning), and train here from scratch like any other preset.

`moe-small` is `small` as a mixture of experts, and shows the trade: each of its 8 experts is half of
`small`'s MLP, and each token runs through 2 of them, so a token costs what it costs in `small` (plus a
router, 8 logits per layer) while the model holds 4 times the MLP weights (16.3M parameters, 6.5M active
per token). More capacity for the same compute per token, paid for in memory. `mixtral-8x7b` is the
published Mixtral shape, for planning (46.7B parameters, 12.9B active); `phi4-mini` (3,836,021,760 parameters)
and `gemma3-1b` (999,885,952) are those of Phi-4-mini and Gemma-3-1B, counted as transformers builds them.
"""

from __future__ import annotations

from lmforge.config import ModelConfig
from lmforge.errors import UserError

_PRESETS: dict[str, dict] = {
    # ~0.13M parameters: fast enough for unit tests.
    "tiny": dict(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192),
    # ~6.5M parameters, Llama-shaped: the laptop default.
    "small": dict(vocab_size=8192, context_length=256, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704),
    # ~48M parameters, Llama-shaped.
    "base": dict(vocab_size=32000, context_length=1024, d_model=512, n_layers=10, n_heads=8, n_kv_heads=8, d_ff=1408),
    # nanoGPT-style small model: learned positions, LayerNorm, GELU, biases (for comparison with `small`).
    "gpt-small": dict(vocab_size=8192, context_length=256, d_model=256, n_layers=6, n_heads=8, d_ff=1024,
                      norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True),
    # GPT-2 (124M) shape.
    "gpt2": dict(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True),
    # llama2.c "stories15M" shape.
    "llama-15m": dict(vocab_size=32000, context_length=256, d_model=288, n_layers=6, n_heads=6, d_ff=768),
    # SmolLM2-135M shape.
    "llama-135m": dict(vocab_size=49152, context_length=2048, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                       d_ff=1536, rope_theta=100000.0),
    # Llama-3.2-1B shape (GQA, Llama-3 rope scaling, tied embeddings): for memory and compute planning.
    "llama-1b": dict(vocab_size=128256, context_length=131072, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     d_ff=8192, rope_theta=500000.0,
                     rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3-0.6B shape (head_dim 128 > d_model / n_heads, per-head q/k norms, tied embeddings): for planning.
    "qwen3-0.6b": dict(vocab_size=151936, context_length=40960, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True),
    # Phi-4-mini-instruct shape (3.8B; 3/4 of each head rotated, tied, LongRoPE from 4k to 128k): for planning.
    # The short divisors are its 1.0s; the long ones are a stand-in ramp to 32 (the published list is learned,
    # and an import reads it from config.json), so the shape and cost are right, not the long-context rotation.
    "phi4-mini": dict(vocab_size=200064, context_length=131072, d_model=3072, n_layers=32, n_heads=24, n_kv_heads=8,
                      d_ff=8192, rope_theta=10000.0, rope_dim=96, tie_embeddings=True,
                      rope_scaling={"type": "longrope", "original_max_position_embeddings": 4096,
                                    "short_factor": [1.0] * 48, "long_factor": [min(32.0, 1.1183 ** i) for i in range(48)]}),
    # Gemma-3-1B shape (1.0B; five sliding layers of 512 to each global one, local RoPE 10k / global 1M, one
    # key/value head of 256 dims, GeGLU, (1 + w) norms around both sublayers, scaled embeddings): for planning.
    "gemma3-1b": dict(vocab_size=262144, context_length=32768, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                      head_dim=256, d_ff=6912, norm_eps=1e-6, mlp="geglu", rope_theta=1e6, rope_local_theta=1e4,
                      attn_scale=256 ** -0.5, sliding_window=512, sliding_layers=[i for i in range(26) if (i + 1) % 6],
                      norm_offset=True, post_norms=True, embed_scale=True, qk_norm=True, tie_embeddings=True),
    # `small` with 8 half-width experts, 2 per token: small's FLOPs per token, 4x its MLP weights (see above).
    "moe-small": dict(vocab_size=8192, context_length=256, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=352,
                      n_experts=8, experts_per_token=2),
    # Mixtral-8x7B shape (8 experts, top-2, untied output): for planning.
    "mixtral-8x7b": dict(vocab_size=32000, context_length=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         d_ff=14336, rope_theta=1000000.0, tie_embeddings=False, n_experts=8, experts_per_token=2),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """The config called exactly `name`, with `overrides` applied (e.g. vocab_size from the tokenizer)."""
    if name not in _PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides, "name": name})
