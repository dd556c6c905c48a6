"""Hugging Face configs: which transformers architecture computes what a `ModelConfig` does, and the
`config.json` we write for it.

Reading a config.json is `lmforge.loaders.hf_read`'s; the tensor names of each family (one table per
family) and the state-dict maps are `lmforge.loaders.hf_tensors`'.

Configs that no transformers class describes (e.g. sinusoidal positions) are written with
`architectures: ["LmforgeForCausalLM"]`, our own tensor names and the full `ModelConfig` under `lmforge`.
The files themselves (which exist, how weights are streamed) are `lmforge.loaders.model_dir`'s.

What we refuse, and why: a config that asks for computation our model does not do (a rope scaling type we
don't implement, an activation other than the one our MLP applies, custom code behind `auto_map`) is a
`UserError` naming the key, never a model that loads and quietly computes something else.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import (
    TRAINING_ONLY_FIELDS,
    ModelConfig,
)
from lmforge.model.rope import LONGROPE, scaling_type
from lmforge.tokenizer import load_hf_tokenizer

__all__ = [
    "GEMMA2",
    "GEMMA3",
    "GEMMA3_MM",
    "GPT2",
    "MIXTRAL",
    "QWEN2_MOE",
    "QWEN3_MOE",
    "LLAMA_LIKE",
    "NATIVE",
    "PHI3",
    "SUPPORTED_ARCHITECTURES",
    "config_to_hf",
    "hf_architecture",
    "is_gemma_shaped",
    "is_gpt2_shaped",
    "is_llama_shaped",
    "is_mixtral_shaped",
    "is_phi3_shaped",
    "is_qwen2_moe_shaped",
    "is_qwen3_moe_shaped",
    "load_hf_tokenizer",
]

LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
              "Qwen2MoeForCausalLM": "qwen2_moe"}
MIXTRAL = "MixtralForCausalLM"  # Llama-like attention; a sparse mixture of SwiGLU experts in place of the MLP
QWEN3_MOE = "Qwen3MoeForCausalLM"  # Qwen3's attention (q/k norms); Mixtral-like experts, renormalised or not
QWEN2_MOE = "Qwen2MoeForCausalLM"  # Qwen2's attention (q/k/v biases); Qwen3-MoE's experts plus a gated shared one
GPT2 = "GPT2LMHeadModel"
# Gemma 2 and 3: (1 + w) norms around each sublayer, scaled embeddings, GeGLU, local/global layers; Gemma 3
# adds q/k norms and a RoPE base of their own for the local layers, Gemma 2 soft-caps scores and logits. The
# multimodal Gemma 3 checkpoints hold the same text model (vision tower and projector ignored).
GEMMA2, GEMMA3, GEMMA3_MM = "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"
GEMMA = {GEMMA2: "gemma2", GEMMA3: "gemma3_text", GEMMA3_MM: "gemma3"}
# Phi-3/3.5/4-mini: Llama's computation with q|k|v and gate|up stored fused, LongRoPE, and (Phi-4-mini) a
# rotation of only the first part of each head.
PHI3 = "Phi3ForCausalLM"
NATIVE = "LmforgeForCausalLM"
SUPPORTED_ARCHITECTURES = [*LLAMA_LIKE, *GEMMA, PHI3, GPT2, NATIVE]
# ---------------------------------------------------------------------------------------------------
# Which transformers class describes a ModelConfig
# ---------------------------------------------------------------------------------------------------
def _gemma_only(cfg: ModelConfig, *, partial_rotation: bool = False) -> bool:
    """Any of the features only the Gemma classes have (or Phi's partial rotation, which only Phi-3 has:
    `partial_rotation=True` leaves it out)."""
    return (cfg.norm_offset or cfg.post_norms or cfg.embed_scale or cfg.attn_scale is not None
            or (cfg.rope_dim is not None and not partial_rotation)
            or cfg.attn_softcap is not None or cfg.final_softcap is not None or cfg.rope_local_theta is not None)


def _every_layer_slides(cfg: ModelConfig) -> bool:
    return cfg.sliding_window is None or cfg.sliding_layers is None or len(cfg.sliding_layers) == cfg.n_layers


def is_llama_shaped(cfg: ModelConfig) -> bool:
    """True when `LlamaForCausalLM` (or Mistral, for a sliding window; Qwen2, for q/k/v biases; Qwen3, for q/k
    norms) computes exactly what our model does."""
    if (cfg.norm, cfg.mlp, cfg.positions) != ("rmsnorm", "swiglu", "rope") or cfg.n_experts or _gemma_only(cfg):
        return False
    if cfg.sliding_window is not None and not (cfg.qk_norm or cfg.qkv_bias):  # Mistral: every layer or none
        return _every_layer_slides(cfg) and not (cfg.attention_bias or cfg.mlp_bias)
    if cfg.qk_norm:  # Qwen3: biases on all four attention projections or none, never on the MLP
        return not (cfg.qkv_bias or cfg.mlp_bias)
    # q/k/v-only biases exist in Qwen2, which has no other bias; any mix of the two has no HF class.
    return not (cfg.qkv_bias and (cfg.attention_bias or cfg.mlp_bias))


def is_gpt2_shaped(cfg: ModelConfig) -> bool:
    """True when `GPT2LMHeadModel` computes exactly what our model does: LayerNorm, tanh-GELU, learned
    positions, biases everywhere, plain multi-head attention whose heads tile d_model.

    Untied output heads are included: transformers (and vLLM) honour `tie_word_embeddings: false` for GPT-2
    and then read `lm_head.weight`, so import and export stay symmetric.
    """
    return (
        (cfg.norm, cfg.mlp, cfg.positions) == ("layernorm", "gelu", "learned")
        and cfg.attention_bias and cfg.mlp_bias  # qkv_bias is implied by attention_bias in our model
        and cfg.n_kv_heads == cfg.n_heads
        and cfg.head_dim * cfg.n_heads == cfg.d_model
        # none of what GPT-2 does not compute: q/k norms, windows, and Gemma's extras
        and not (cfg.qk_norm or cfg.sliding_window is not None or _gemma_only(cfg))
    )


def is_mixtral_shaped(cfg: ModelConfig) -> bool:
    """True when `MixtralForCausalLM` computes exactly what our model does: Llama's attention without biases,
    experts chosen softmax -> top k -> renormalised."""
    return (bool(cfg.n_experts) and (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
            and cfg.norm_topk_prob and not (cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias or cfg.qk_norm)
            and not cfg.shared_expert_d_ff and not _gemma_only(cfg) and _every_layer_slides(cfg))


def is_qwen3_moe_shaped(cfg: ModelConfig) -> bool:
    """True when `Qwen3MoeForCausalLM` computes exactly what our model does: Qwen3's attention (q/k norms, all
    four attention biases or none), experts in every layer chosen softmax -> top k, renormalised or not."""
    return (bool(cfg.n_experts) and cfg.qk_norm and (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
            and not (cfg.qkv_bias or cfg.mlp_bias or cfg.shared_expert_d_ff) and not _gemma_only(cfg)
            and _every_layer_slides(cfg))


def is_qwen2_moe_shaped(cfg: ModelConfig) -> bool:
    """True when `Qwen2MoeForCausalLM` computes exactly what our model does: Qwen2's attention (q/k/v biases or
    none), experts in every layer chosen softmax -> top k (renormalised or not) and a shared expert with its
    sigmoid gate."""
    return (bool(cfg.n_experts and cfg.shared_expert_d_ff) and (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
            and not (cfg.attention_bias or cfg.mlp_bias or cfg.qk_norm) and not _gemma_only(cfg))


def is_phi3_shaped(cfg: ModelConfig) -> bool:
    """True when `Phi3ForCausalLM` computes exactly what our model does: Llama's blocks without biases or q/k
    norms, heads that tile d_model, plain RoPE or LongRoPE (its only scaling) over the first rope_dim dims of
    each head (a rope_dim that partial_rotary_factor = rope_dim / head_dim gives back), a window in every
    layer or none."""
    rotated = cfg.rope_dim or cfg.head_dim
    return ((cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope") and not cfg.n_experts
            and not (cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias or cfg.qk_norm)
            and not _gemma_only(cfg, partial_rotation=True) and _every_layer_slides(cfg)
            and cfg.head_dim * cfg.n_heads == cfg.d_model and int(cfg.head_dim * (rotated / cfg.head_dim)) == rotated
            and (cfg.rope_scaling is None or scaling_type(cfg.rope_scaling) in LONGROPE))


def is_gemma_shaped(cfg: ModelConfig) -> bool:
    """True when `Gemma2ForCausalLM` or `Gemma3ForCausalLM` computes exactly what our model does: (1 + w)
    RMSNorms before and after each sublayer, embeddings scaled by sqrt(d_model), GeGLU, no MLP biases,
    all four attention biases or none, every rotation over the whole head."""
    return ((cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "geglu", "rope") and cfg.norm_offset and cfg.post_norms
            and cfg.embed_scale and not (cfg.n_experts or cfg.qkv_bias or cfg.mlp_bias) and cfg.rope_dim is None
            and (cfg.rope_local_theta is None if not cfg.qk_norm else not (cfg.rope_local_theta is None and cfg.rope_scaling)))
# (Gemma 2 has one RoPE for every layer; Gemma 3 scales only the global layers' rotation, so a model whose
# sliding layers share a scaled one has no transformers class.)


def hf_architecture(cfg: ModelConfig) -> str:
    if is_gemma_shaped(cfg):  # q/k norms (and a local RoPE base) tell Gemma 3 from Gemma 2
        return GEMMA3 if cfg.qk_norm else GEMMA2
    if cfg.n_experts:  # q/k norms tell Qwen3-MoE from Mixtral, a shared expert Qwen2-MoE
        for arch, shaped in ((MIXTRAL, is_mixtral_shaped), (QWEN3_MOE, is_qwen3_moe_shaped), (QWEN2_MOE, is_qwen2_moe_shaped)):
            if shaped(cfg):
                return arch
        return NATIVE
    if is_gpt2_shaped(cfg):
        return GPT2
    # Phi-3 for what only it computes (a partial rotation), for LongRoPE, whose home it is, and for what came
    # from a Phi-3 file (a Phi-3 with neither is exactly Llama / Mistral, and a model trained here is written
    # as those)
    if is_phi3_shaped(cfg) and (cfg.rope_dim is not None or scaling_type(cfg.rope_scaling) in LONGROPE
                                or cfg.hf_class == PHI3):
        return PHI3
    if is_llama_shaped(cfg):
        if cfg.qk_norm or cfg.qkv_bias:
            return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM"
        return "MistralForCausalLM" if cfg.sliding_window is not None else "LlamaForCausalLM"
    return NATIVE


# ---------------------------------------------------------------------------------------------------
# config.json: writing
# ---------------------------------------------------------------------------------------------------
def config_to_hf(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """The config.json for `cfg`: transformers' own keys where a transformers class fits, ours otherwise.

    Both spellings of renamed keys are written (`torch_dtype`/`dtype`; `rope_scaling`/`rope_parameters`), so
    transformers 4.x and 5.x and tools that read either find what they look for.
    """
    arch = hf_architecture(cfg)
    common = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype, "dtype": dtype}
    # What transformers has no key for (training-time settings); read back by config_from_hf.
    ours = {"lmforge": {k: getattr(cfg, k) for k in TRAINING_ONLY_FIELDS}}
    if arch == NATIVE:
        return {"architectures": [NATIVE], "model_type": "lmforge", "lmforge": cfg.to_dict(), **common}
    if arch in GEMMA:
        return _gemma_config_to_hf(cfg, arch, {**common, **ours})
    if arch == PHI3:
        return _phi3_config_to_hf(cfg, {**common, **ours})
    if arch == GPT2:
        return {
            "architectures": [GPT2],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.context_length,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "use_cache": True,
            **common,
            **ours,
        }
    d: dict[str, Any] = {
        **_decoder_keys(cfg, arch, LLAMA_LIKE[arch]),
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        **common,
        **ours,
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE):
        d["attention_bias"] = cfg.attention_bias
    if arch == "LlamaForCausalLM":
        d["mlp_bias"] = cfg.mlp_bias
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE, QWEN2_MOE):
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["max_window_layers"] = 0  # which layers slide is said by layer_types
    if arch in ("MistralForCausalLM", MIXTRAL, "Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE, QWEN2_MOE):
        d["sliding_window"] = cfg.sliding_window
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN2_MOE):
        d["layer_types"] = _layer_types(cfg)
    if arch == MIXTRAL:  # (router_aux_loss_coef is MixtralConfig's default: our coefficient is the recipe's)
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                 output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
    if arch == QWEN3_MOE:  # every layer sparse; intermediate_size (of dense layers) is written alike, unused
        d.update(num_experts=cfg.n_experts, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                 norm_topk_prob=cfg.norm_topk_prob, moe_intermediate_size=cfg.d_ff, decoder_sparse_step=1,
                 mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001)
    if arch == QWEN2_MOE:  # every layer sparse, with the shared expert; intermediate_size is for dense layers
        d.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, norm_topk_prob=cfg.norm_topk_prob,
                 moe_intermediate_size=cfg.d_ff, shared_expert_intermediate_size=cfg.shared_expert_d_ff,
                 decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=cfg.qkv_bias, output_router_logits=False,
                 router_aux_loss_coef=0.001)
    d.update(_rope_keys(cfg))
    return d


def _decoder_keys(cfg: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    """The keys every Llama-descended config class (Llama, Mistral, Qwen, Phi-3, Gemma) spells alike."""
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _rope_keys(cfg: ModelConfig) -> dict[str, Any]:
    """rope_scaling (transformers 4.x) and rope_parameters (5.x) of the global layers."""
    out: dict[str, Any] = {}
    rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        kind = sc.pop("type", None) or sc.pop("rope_type")
        kind = "longrope" if kind == "su" else kind  # transformers knows LongRoPE by its new name only
        sc.pop("rope_type", None)
        rope = {"rope_type": kind, **sc}
        out["rope_scaling"] = dict(rope)
    out["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    return out


def _layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.slides(i) else "full_attention" for i in range(cfg.n_layers)]


def _gemma_config_to_hf(cfg: ModelConfig, arch: str, extra: dict[str, Any]) -> dict[str, Any]:
    scalar = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale ** -2  # scale = query_pre_attn_scalar^-1/2
    d: dict[str, Any] = {
        **_decoder_keys(cfg, arch, GEMMA[arch]),
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": cfg.attention_bias,
        "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": _layer_types(cfg),
        "final_logit_softcapping": cfg.final_softcap,
        "attn_logit_softcapping": cfg.attn_softcap,
        **extra,
    }
    global_rope = _rope_keys(cfg)
    if arch == GEMMA2:
        return {**d, **global_rope}
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    d["rope_local_base_freq"] = local
    if "rope_scaling" in global_rope:
        d["rope_scaling"] = global_rope["rope_scaling"]
    d["rope_parameters"] = {"full_attention": global_rope["rope_parameters"],
                            "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return d


def _phi3_config_to_hf(cfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Phi3Config's keys: the original (pretraining) context at the top level, where Phi-3 keeps it and
    transformers reads it first; the rotated fraction as partial_rotary_factor (top level for 4.x, in
    rope_parameters for 5.x)."""
    rotated = cfg.rope_dim or cfg.head_dim
    fraction = 1.0 if rotated == cfg.head_dim else rotated / cfg.head_dim
    original = (cfg.rope_scaling or {}).get("original_max_position_embeddings", cfg.context_length)
    d: dict[str, Any] = {
        **_decoder_keys(cfg, PHI3, "phi3"),
        "hidden_act": "silu",
        "original_max_position_embeddings": original,
        "partial_rotary_factor": fraction,
        "sliding_window": cfg.sliding_window,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "use_cache": True,
        **extra,
    }
    # Phi3Config's default pad id (32000) is an embedding row of Phi-3-mini's vocabulary only (transformers
    # refuses it as padding_idx beyond a smaller one); Phi's releases pad with their end-of-text token.
    d["pad_token_id"] = d["eos_token_id"] if isinstance(d["eos_token_id"], int) else None
    rope = _rope_keys(cfg)
    rope["rope_parameters"]["partial_rotary_factor"] = fraction
    return {**d, **rope}
