"""Hugging Face model directories: `config.json` <-> `ModelConfig`, and explicit tensor-name maps.

Why explicit maps: an importer that guesses tensor names breaks silently (a transposed or unpermuted
weight still loads, it just produces garbage). Each architecture here is a table of names, proved by a
logits-parity test against `transformers` (tests/loaders/test_hf.py).

Our model fuses q/k/v into one projection (`attn.qkv`) and gate/up into one (`mlp.fc`) for speed; the
maps split and join them, so what lands on disk is the layout transformers, vLLM and llama.cpp's converter
expect. Configs that no transformers class describes (e.g. sinusoidal positions) are written with
`architectures: ["LmforgeForCausalLM"]`, our own tensor names and the full `ModelConfig` under `lmforge`.

What we refuse, and why: a config that asks for computation our model does not do (a rope scaling type we
don't implement, an activation other than the one our MLP applies, custom code behind `auto_map`) is a
`UserError` naming the key, never a model that loads and quietly computes something else.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ROPE_SCALING_TYPES, ModelConfig
from lmforge.errors import UserError
from lmforge.tokenizer import load_hf_tokenizer

__all__ = [
    "GPT2",
    "LLAMA_LIKE",
    "NATIVE",
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "hf_architecture",
    "hf_dtype",
    "is_gpt2_shaped",
    "is_llama_shaped",
    "load_hf_tokenizer",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
GPT2 = "GPT2LMHeadModel"
NATIVE = "LmforgeForCausalLM"
SUPPORTED_ARCHITECTURES = [*LLAMA_LIKE, GPT2, NATIVE]
# A config.json without "architectures" still names its family in model_type (transformers' Auto classes
# dispatch on it too); this is read from the file, never guessed from a path.
MODEL_TYPES = {**{v: k for k, v in LLAMA_LIKE.items()}, "gpt2": GPT2, "lmforge": NATIVE}
TRAINING_ONLY_FIELDS = ("dropout", "init_std", "name")

# transformers' defaults for keys a config.json may leave out (the values its config classes use, so a
# sparse file means what it means there). Mistral and Qwen2 do NOT default num_key_value_heads to the head
# count.
_LLAMA_LIKE_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "num_key_value_heads": None, "rms_norm_eps": 1e-6},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                           "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "rms_norm_eps": 1e-6},
}
_SILU = ("silu", "swish")  # the same function under two names in transformers' ACT2FN
# GPT-2's activation names that compute the tanh approximation of GELU, which is what our MLP applies
# (gelu_new and gelu_fast write the same formula out by hand; gelu_pytorch_tanh calls F.gelu(approximate="tanh")).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------------------------------------------
# Which transformers class describes a ModelConfig
# ---------------------------------------------------------------------------------------------------
def is_llama_shaped(cfg: ModelConfig) -> bool:
    """True when `LlamaForCausalLM` (or Qwen2, for q/k/v biases) computes exactly what our model does."""
    if (cfg.norm, cfg.mlp, cfg.positions) != ("rmsnorm", "swiglu", "rope"):
        return False
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
    )


def hf_architecture(cfg: ModelConfig) -> str:
    if is_gpt2_shaped(cfg):
        return GPT2
    if is_llama_shaped(cfg):
        return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
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
        **ours,
    }
    if arch == "LlamaForCausalLM":
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = cfg.mlp_bias
    if arch == "Qwen2ForCausalLM":
        d["use_sliding_window"] = False
    rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        kind = sc.pop("type", None) or sc.pop("rope_type")
        sc.pop("rope_type", None)
        rope = {"rope_type": kind, **sc}
        d["rope_scaling"] = dict(rope)
    d["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    return d


# ---------------------------------------------------------------------------------------------------
# config.json: reading
# ---------------------------------------------------------------------------------------------------
def hf_dtype(d: dict[str, Any]) -> torch.dtype | None:
    """The checkpoint's declared dtype (`dtype` in transformers 5, `torch_dtype` before), if it names one."""
    name = d.get("dtype") or d.get("torch_dtype")
    if isinstance(name, str):
        name = name.removeprefix("torch.")
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            return dt
    return None


def _architecture(d: dict[str, Any], source: str) -> str:
    auto_map = d.get("auto_map")
    if isinstance(auto_map, dict) and any(k == "AutoConfig" or k.startswith("AutoModel") for k in auto_map):
        where = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") or next(iter(auto_map.values()))
        raise UserError(f"{source}: this model needs its own Python code ({where}, via auto_map; transformers' "
                        "trust_remote_code), and lmforge never runs code from a model directory")
    archs = d.get("architectures")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:
        arch = MODEL_TYPES.get(d.get("model_type"), d.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json (4.x and 5.x spellings) or one of ours into a `ModelConfig`."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: not a JSON object")
    arch = _architecture(d, source)
    if arch == NATIVE:
        if not isinstance(d.get("lmforge"), dict):
            raise UserError(f"{source}: an lmforge config without its 'lmforge' section")
        return ModelConfig.from_dict(d["lmforge"])
    ours = {k: v for k, v in (d.get("lmforge") or {}).items() if k in TRAINING_ONLY_FIELDS}
    try:
        if arch == GPT2:
            return _gpt2_config(d, ours, source)
        return _llama_like_config(arch, d, ours, source)
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}") from None


def _rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling or None) from either spelling.

    transformers 5 renamed rope_scaling -> rope_parameters and may keep rope_theta only inside it.
    """
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: rope_parameters/rope_scaling should be an object, got {params!r}")
    theta = params.get("rope_theta") or d.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)}); "
                        "loading it anyway would change every position's rotation")
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    scaling["type"] = kind
    return float(theta), scaling


def _sliding_window(arch: str, d: dict[str, Any]) -> int | None:
    """The attention window if any layer of this model uses one (transformers' rules), else None."""
    if arch == "MistralForCausalLM":
        return d.get("sliding_window", _LLAMA_LIKE_DEFAULTS[arch]["sliding_window"])
    if arch == "Qwen2ForCausalLM":
        window = d.get("sliding_window") if d.get("use_sliding_window") else None
        if window is None:
            return None
        layer_types = d.get("layer_types")
        if isinstance(layer_types, list):
            return window if "sliding_attention" in layer_types else None
        # Without layer_types, layers from max_window_layers on slide (Qwen2Config).
        return window if d["num_hidden_layers"] > d.get("max_window_layers", 28) else None
    return None


def _llama_like_config(arch: str, d: dict[str, Any], ours: dict[str, Any], source: str) -> ModelConfig:
    defaults = _LLAMA_LIKE_DEFAULTS[arch]
    act = d.get("hidden_act", "silu")
    if act not in _SILU:
        raise UserError(f"{source}: hidden_act {act!r} is not supported for {arch} (our SwiGLU MLP uses silu)")
    theta, scaling = _rope(d, source)
    n_heads = d["num_attention_heads"]
    context = d.get("max_position_embeddings", defaults["max_position_embeddings"])
    window = _sliding_window(arch, d)
    if window is not None and window < context:
        # Our attention has no sliding window. Within `window` tokens a sliding-window model attends to
        # every earlier token (transformers masks keys with q - k >= window), i.e. it computes exactly
        # what full attention computes; so we cap the context there rather than be silently wrong beyond.
        context = window
    is_llama = arch == "LlamaForCausalLM"
    return ModelConfig(
        vocab_size=d["vocab_size"],
        context_length=context,
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        d_ff=d["intermediate_size"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", defaults["rms_norm_eps"]),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        # Only Llama has these keys; Mistral has no biases and Qwen2 hard-codes q/k/v biases.
        attention_bias=is_llama and bool(d.get("attention_bias", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        mlp_bias=is_llama and bool(d.get("mlp_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        **{"name": d.get("_name_or_path") or LLAMA_LIKE[arch], **ours},
    )


def _gpt2_config(d: dict[str, Any], ours: dict[str, Any], source: str) -> ModelConfig:
    act = d.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UserError(f"{source}: GPT-2 activation_function {act!r} is not supported "
                        f"(our GELU is the tanh approximation: {', '.join(_TANH_GELU)})")
    if not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{source}: GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                        "(scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true)")
    # transformers' GPT2Config defaults (GPT-2 small) for keys left out.
    d_model, n_heads = d.get("n_embd", 768), d.get("n_head", 12)
    if n_heads <= 0 or d_model % n_heads:
        raise UserError(f"{source}: n_embd ({d_model}) must be a multiple of n_head ({n_heads})")
    return ModelConfig(
        vocab_size=d.get("vocab_size", 50257),
        context_length=d.get("n_positions", d.get("n_ctx", 1024)),
        d_model=d_model,
        n_layers=d.get("n_layer", 12),
        n_heads=n_heads,
        d_ff=d.get("n_inner") or 4 * d_model,
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        positions="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        **{"name": d.get("_name_or_path") or "gpt2", **ours},
    )


# ---------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------
# GPT-2, per layer: (ours under blocks.N., theirs under transformer.h.N., is a Conv1D weight). GPT-2's
# Conv1D stores its weight as (in, out) and computes x @ W + b, so its weights are the transpose of our
# nn.Linear (out, in). c_attn's output columns are q | k | v, heads contiguous inside each, exactly the
# rows of our fused attn.qkv.
_GPT2_LAYER = [
    ("norm1.weight", "ln_1.weight", False), ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True), ("attn.proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False), ("norm2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True), ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True), ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_GPT2_TOP = [("tok_emb.weight", "wte.weight"), ("pos_emb.weight", "wpe.weight"),
             ("norm.weight", "ln_f.weight"), ("norm.bias", "ln_f.bias")]
# (attn.bias / attn.masked_bias in older GPT-2 files are causal-mask buffers, not weights: never read.)


def _split_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> the checkpoint's names (a new dict; tied lm_head left out)."""
    arch = hf_architecture(cfg)
    if arch == NATIVE:
        out = dict(sd)
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    if arch == GPT2:
        out = {"transformer." + theirs: sd[mine] for mine, theirs in _GPT2_TOP}
        for i in range(cfg.n_layers):
            for mine, theirs, conv1d in _GPT2_LAYER:
                w = sd[f"blocks.{i}.{mine}"]
                out[f"transformer.h.{i}.{theirs}"] = w.t() if conv1d else w
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        return {k: v.contiguous() for k, v in out.items()}
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
    """A checkpoint's tensors -> our parameter names. Missing tensors are a clear error, never zeros;
    tensors we have no use for (rotary inv_freq, GPT-2's attention-mask buffers) are ignored."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: tensor {name!r} is missing")
        return tensors[name]

    arch = hf_architecture(cfg)
    if arch == NATIVE:
        out = dict(tensors)
        if cfg.tie_embeddings:
            out["lm_head.weight"] = take("tok_emb.weight")
        return out
    if arch == GPT2:
        # GPT2LMHeadModel saves under "transformer."; files saved from the bare GPT2Model (the original
        # openai-community/gpt2 upload among them) have no prefix.
        pre = "transformer." if "transformer.wte.weight" in tensors or "wte.weight" not in tensors else ""
        out = {mine: take(pre + theirs) for mine, theirs in _GPT2_TOP}
        for i in range(cfg.n_layers):
            for mine, theirs, conv1d in _GPT2_LAYER:
                w = take(f"{pre}h.{i}.{theirs}")
                out[f"blocks.{i}.{mine}"] = w.t() if conv1d else w
        out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
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
