"""Hugging Face model directories: `config.json` <-> `ModelConfig`, and explicit tensor-name maps.

Why explicit maps: an importer that guesses tensor names breaks silently (a transposed or unpermuted
weight still loads, it just produces garbage). Each architecture here is a table of names, proved by a
logits-parity test against `transformers`.

Our model fuses q/k/v into one projection (`attn.qkv`) and gate/up into one (`mlp.fc`) for speed; the
maps split and join them, so what lands on disk is the layout transformers, vLLM and llama.cpp's converter
expect. Configs that no transformers class describes (e.g. sinusoidal positions) are written with
`architectures: ["LmforgeForCausalLM"]`, our own tensor names and the full `ModelConfig` under `lmforge`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
NATIVE = "LmforgeForCausalLM"
SUPPORTED_ARCHITECTURES = [*LLAMA_LIKE, NATIVE]
TRAINING_ONLY_FIELDS = ("dropout", "init_std", "name")


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
def is_llama_shaped(cfg: ModelConfig) -> bool:
    """True when `LlamaForCausalLM` (or Qwen2, for q/k/v biases) computes exactly what our model does."""
    if (cfg.norm, cfg.mlp, cfg.positions) != ("rmsnorm", "swiglu", "rope"):
        return False
    # q/k/v-only biases exist in Qwen2, which has no other bias; any mix of the two has no HF class.
    return not (cfg.qkv_bias and (cfg.attention_bias or cfg.mlp_bias))


def hf_architecture(cfg: ModelConfig) -> str:
    if not is_llama_shaped(cfg):
        return NATIVE
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def config_to_hf(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """The config.json for `cfg`: transformers' own keys for Llama-shaped models, ours otherwise."""
    arch = hf_architecture(cfg)
    common = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype, "dtype": dtype}
    if arch == NATIVE:
        return {"architectures": [NATIVE], "model_type": "lmforge", "lmforge": cfg.to_dict(), **common}
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": LLAMA_LIKE[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        **common,
        # What transformers has no key for (training-time settings); read back by config_from_hf.
        "lmforge": {k: getattr(cfg, k) for k in TRAINING_ONLY_FIELDS},
    }
    if arch == "LlamaForCausalLM":
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = cfg.mlp_bias
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        kind = sc.pop("type", None) or sc.pop("rope_type")
        d["rope_scaling"] = {"rope_type": kind, **sc}
    return d


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json (4.x and 5.x spellings) or one of ours into a `ModelConfig`."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else None
    if arch == NATIVE or d.get("model_type") == "lmforge":
        if not isinstance(d.get("lmforge"), dict):
            raise UserError(f"{source}: an lmforge config without its 'lmforge' section")
        return ModelConfig.from_dict(d["lmforge"])
    if arch not in LLAMA_LIKE:
        raise UserError(f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    # transformers 5 renamed rope_scaling -> rope_parameters and may keep rope_theta only inside it.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if kind not in ("default", None):
        scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
        scaling["type"] = kind
    n_heads = d["num_attention_heads"]
    ours = {k: v for k, v in (d.get("lmforge") or {}).items() if k in TRAINING_ONLY_FIELDS}
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"],
            context_length=d.get("max_position_embeddings", 2048),
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            d_ff=d["intermediate_size"],
            norm="rmsnorm",
            norm_eps=d.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            positions="rope",
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_embeddings=bool(d.get("tie_word_embeddings", arch != "LlamaForCausalLM" and arch != "MistralForCausalLM")),
            **{"name": d.get("_name_or_path") or LLAMA_LIKE[arch], **ours},
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------
def _split_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> the checkpoint's names (a new dict; tied lm_head left out)."""
    if hf_architecture(cfg) == NATIVE:
        out = dict(sd)
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[p + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
        for kind in ("weight", "bias"):
            if p + f"attn.qkv.{kind}" in sd:
                q, k, v = sd[p + f"attn.qkv.{kind}"].split(_split_sizes(cfg), dim=0)
                out[h + f"self_attn.q_proj.{kind}"], out[h + f"self_attn.k_proj.{kind}"], out[h + f"self_attn.v_proj.{kind}"] = q, k, v
            if p + f"attn.proj.{kind}" in sd:
                out[h + f"self_attn.o_proj.{kind}"] = sd[p + f"attn.proj.{kind}"]
            if p + f"mlp.fc.{kind}" in sd:
                gate, up = sd[p + f"mlp.fc.{kind}"].chunk(2, dim=0)
                out[h + f"mlp.gate_proj.{kind}"], out[h + f"mlp.up_proj.{kind}"] = gate, up
            if p + f"mlp.proj.{kind}" in sd:
                out[h + f"mlp.down_proj.{kind}"] = sd[p + f"mlp.proj.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_from_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors -> our parameter names. Missing tensors are a clear error, never zeros."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: tensor {name!r} is missing")
        return tensors[name]

    if hf_architecture(cfg) == NATIVE:
        out = dict(tensors)
        if cfg.tie_embeddings:
            out["lm_head.weight"] = take("tok_emb.weight")
        return out
    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    # Tied checkpoints sometimes still ship lm_head; the embedding is the one we keep.
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    has_qkv_bias = cfg.attention_bias or cfg.qkv_bias
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "norm1.weight"] = take(h + "input_layernorm.weight")
        out[p + "norm2.weight"] = take(h + "post_attention_layernorm.weight")
        out[p + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0)
        out[p + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
        if has_qkv_bias:
            out[p + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{x}_proj.bias") for x in "qkv"], dim=0)
        if cfg.attention_bias:
            out[p + "attn.proj.bias"] = take(h + "self_attn.o_proj.bias")
        out[p + "mlp.fc.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")], dim=0)
        out[p + "mlp.proj.weight"] = take(h + "mlp.down_proj.weight")
        if cfg.mlp_bias:
            out[p + "mlp.fc.bias"] = torch.cat([take(h + "mlp.gate_proj.bias"), take(h + "mlp.up_proj.bias")], dim=0)
            out[p + "mlp.proj.bias"] = take(h + "mlp.down_proj.bias")
    return out
