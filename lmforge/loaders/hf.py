"""Hugging Face configs: `config.json` <-> `ModelConfig`, and which architecture a config is.

The tensor names of each family (one table per family) and the state-dict maps live beside this module, in
`lmforge.loaders.hf_tensors`.

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
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_SIZE,
    ROPE_SCALING_TYPES,
    TRAINING_ONLY_FIELDS,
    ModelConfig,
    finite_number,
    is_int,
    shown,
)
from lmforge.errors import UserError, one_line
from lmforge.tokenizer import load_hf_tokenizer

__all__ = [
    "GPT2",
    "MIXTRAL",
    "QWEN3_MOE",
    "LLAMA_LIKE",
    "NATIVE",
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "hf_architecture",
    "is_gpt2_shaped",
    "is_llama_shaped",
    "is_mixtral_shaped",
    "is_qwen3_moe_shaped",
    "load_hf_tokenizer",
]

LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
MIXTRAL = "MixtralForCausalLM"  # Llama-like attention; a sparse mixture of SwiGLU experts in place of the MLP
QWEN3_MOE = "Qwen3MoeForCausalLM"  # Qwen3's attention (q/k norms); Mixtral-like experts, renormalised or not
GPT2 = "GPT2LMHeadModel"
NATIVE = "LmforgeForCausalLM"
SUPPORTED_ARCHITECTURES = [*LLAMA_LIKE, GPT2, NATIVE]
# A config.json without "architectures" still names its family in model_type (transformers' Auto classes
# dispatch on it too); this is read from the file, never guessed from a path.
MODEL_TYPES = {**{v: k for k, v in LLAMA_LIKE.items()}, "gpt2": GPT2, "lmforge": NATIVE}

# transformers' defaults for keys a config.json may leave out (the values its config classes use, so a
# sparse file means what it means there). Mistral and Qwen2 do NOT default num_key_value_heads to the head
# count.
_LLAMA_LIKE_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "num_key_value_heads": None, "rms_norm_eps": 1e-6},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                           "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "rms_norm_eps": 1e-6},
    # Qwen3's head_dim defaults to 128 whatever hidden_size / num_attention_heads is (Qwen3Config).
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
                         "head_dim": 128},
    "MixtralForCausalLM": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": None, "rms_norm_eps": 1e-5,
                           "rope_theta": 1e6, "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2},
    # Qwen3MoeConfig: head_dim derived from the shape (unlike dense Qwen3), no renormalisation unless asked.
    QWEN3_MOE: {"max_position_embeddings": 32768, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": False, "moe_intermediate_size": 768},
}
_SILU = ("silu", "swish")  # the same function under two names in transformers' ACT2FN
# GPT-2's activation names that compute the tanh approximation of GELU, which is what our MLP applies
# (gelu_new and gelu_fast write the same formula out by hand; gelu_pytorch_tanh calls F.gelu(approximate="tanh")).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------------------------------------------
# Which transformers class describes a ModelConfig
# ---------------------------------------------------------------------------------------------------
def is_llama_shaped(cfg: ModelConfig) -> bool:
    """True when `LlamaForCausalLM` (or Qwen2, for q/k/v biases; Qwen3, for q/k norms) computes exactly what
    our model does."""
    if (cfg.norm, cfg.mlp, cfg.positions) != ("rmsnorm", "swiglu", "rope") or cfg.n_experts:
        return False
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
    )


def is_mixtral_shaped(cfg: ModelConfig) -> bool:
    """True when `MixtralForCausalLM` computes exactly what our model does: Llama's attention without biases,
    experts chosen softmax -> top k -> renormalised."""
    return (bool(cfg.n_experts) and (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
            and cfg.norm_topk_prob and not (cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias or cfg.qk_norm))


def is_qwen3_moe_shaped(cfg: ModelConfig) -> bool:
    """True when `Qwen3MoeForCausalLM` computes exactly what our model does: Qwen3's attention (q/k norms, all
    four attention biases or none), experts in every layer chosen softmax -> top k, renormalised or not."""
    return (bool(cfg.n_experts) and cfg.qk_norm and (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
            and not (cfg.qkv_bias or cfg.mlp_bias))


def hf_architecture(cfg: ModelConfig) -> str:
    if cfg.n_experts:  # q/k norms tell Qwen3-MoE from Mixtral
        return MIXTRAL if is_mixtral_shaped(cfg) else QWEN3_MOE if is_qwen3_moe_shaped(cfg) else NATIVE
    if is_gpt2_shaped(cfg):
        return GPT2
    if is_llama_shaped(cfg):
        return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
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
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE):
        d["attention_bias"] = cfg.attention_bias
    if arch == "LlamaForCausalLM":
        d["mlp_bias"] = cfg.mlp_bias
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE):
        d["use_sliding_window"] = False
    if arch == MIXTRAL:  # (router_aux_loss_coef is MixtralConfig's default: our coefficient is the recipe's)
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, sliding_window=None,
                 output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
    if arch == QWEN3_MOE:  # every layer sparse; intermediate_size (of dense layers) is written alike, unused
        d.update(num_experts=cfg.n_experts, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                 norm_topk_prob=cfg.norm_topk_prob, moe_intermediate_size=cfg.d_ff, decoder_sparse_step=1,
                 mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001)
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
def _architecture(d: dict[str, Any], source: str) -> str:
    auto_map = d.get("auto_map")
    if isinstance(auto_map, dict) and any(k == "AutoConfig" or k.startswith("AutoModel") for k in auto_map):
        where = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") or next(iter(auto_map.values()))
        where = where if isinstance(where, str) and len(where) <= 100 else shown(where)
        raise UserError(f"{source}: this model needs its own Python code ({where}, via auto_map; "
                        "transformers' trust_remote_code), and lmforge never runs code from a model directory")
    archs = d.get("architectures")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:
        arch = d.get("model_type")
        arch = MODEL_TYPES.get(arch, arch) if isinstance(arch, str) else arch
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{source}: architecture {shown(arch)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


class _Keys:
    """The values of one config.json, each checked for its type and range as it is read, so that a damaged
    or hostile file is refused in one line naming its key (a string rms_norm_eps, a bool layer count, a
    context of 10**9), never a TypeError from deep inside, nor a model built from it."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d, self.source = d, source

    def _get(self, key: str, default: Any) -> Any:
        if self.d.get(key) is not None:
            return self.d[key]
        if default is ...:
            raise UserError(f"{self.source}: missing key {key!r}")
        return default

    def size(self, key: str, default: Any = ..., *, limit: int = MAX_SIZE) -> Any:
        """A positive integer up to `limit`; a key left out or null gives `default` (which may be None,
        transformers' "derive it")."""
        v = self._get(key, default)
        if v is None:
            return None
        if not is_int(v) or v <= 0:
            raise UserError(f"{self.source}: {key} must be a positive integer, got {shown(v)}")
        if v > limit:
            raise UserError(f"{self.source}: {key} is {v}, beyond what lmforge supports ({limit})")
        return v

    def number(self, key: str, default: Any = ...) -> float:
        """A positive finite number (an epsilon, a rope base)."""
        v = self._get(key, default)
        if not finite_number(v) or v <= 0:
            raise UserError(f"{self.source}: {key} must be a positive number, got {shown(v)}")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise UserError(f"{self.source}: {key} must be true or false, got {shown(v)}")
        return v

    def name(self, default: str) -> str:
        v = self.d.get("_name_or_path")
        return v if isinstance(v, str) and v else default  # informational only: any other value is ignored


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json (4.x and 5.x spellings) or one of ours into a `ModelConfig`.

    Every value is checked as it is read (`_Keys`); any other failure on a malformed file is still one
    `UserError` naming the file, never a traceback."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: not a JSON object")
    try:
        arch = _architecture(d, source)
        if arch == NATIVE:
            if not isinstance(d.get("lmforge"), dict):
                raise UserError(f"{source}: an lmforge config without its 'lmforge' section")
            return _model_config(source, d["lmforge"])
        section = d.get("lmforge") if isinstance(d.get("lmforge"), dict) else {}
        ours = {k: v for k, v in section.items() if k in TRAINING_ONLY_FIELDS}
        keys = _Keys(d, source)
        if arch == GPT2:
            return _gpt2_config(keys, ours)
        return _llama_like_config(arch, keys, ours)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as e:
        raise UserError(f"{source}: malformed config ({type(e).__name__}: {one_line(e, 120)})") from None


def _model_config(source: str, fields: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _rope(keys: _Keys, default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling or None) from either spelling.

    transformers 5 renamed rope_scaling -> rope_parameters and may keep rope_theta only inside it.
    """
    d, source = keys.d, keys.source
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: rope_parameters/rope_scaling should be an object, got {shown(params)}")
    theta = _Keys(params, source).number("rope_theta") if params.get("rope_theta") else keys.number("rope_theta", default_theta)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(f"{source}: rope scaling type {shown(kind)} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)}); "
                        "loading it anyway would change every position's rotation")
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    scaling["type"] = kind
    return theta, scaling  # its values are checked by ModelConfig


def _sliding_window(arch: str, keys: _Keys) -> int | None:
    """The attention window if any layer of this model uses one (transformers' rules), else None."""
    if arch in ("MistralForCausalLM", MIXTRAL):
        return keys.size("sliding_window", _LLAMA_LIKE_DEFAULTS[arch]["sliding_window"])
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):  # the same rules in both config classes
        window = keys.size("sliding_window", None) if keys.flag("use_sliding_window", False) else None
        if window is None:
            return None
        layer_types = keys.d.get("layer_types")
        if isinstance(layer_types, list):
            return window if "sliding_attention" in layer_types else None
        # Without layer_types, layers from max_window_layers on slide (Qwen2Config, Qwen3Config).
        return window if keys.size("num_hidden_layers", limit=MAX_LAYERS) > keys.size("max_window_layers", 28) else None
    if arch == QWEN3_MOE:  # Qwen3MoeConfig: every layer slides when use_sliding_window is set
        return keys.size("sliding_window", 4096) if keys.flag("use_sliding_window", False) else None
    return None


def _llama_like_config(arch: str, keys: _Keys, ours: dict[str, Any]) -> ModelConfig:
    defaults, source = _LLAMA_LIKE_DEFAULTS[arch], keys.source
    act = keys.d.get("hidden_act", "silu")
    if act not in _SILU:
        raise UserError(f"{source}: hidden_act {shown(act)} is not supported for {arch} (our SwiGLU MLP uses silu)")
    theta, scaling = _rope(keys, defaults.get("rope_theta", 10000.0))
    d_model, n_heads = keys.size("hidden_size"), keys.size("num_attention_heads")
    context = keys.size("max_position_embeddings", defaults["max_position_embeddings"], limit=MAX_CONTEXT)
    window = _sliding_window(arch, keys)
    if window is not None and window < context:
        # Our attention has no sliding window. Within `window` tokens a sliding-window model attends to
        # every earlier token (transformers masks keys with q - k >= window), i.e. it computes exactly
        # what full attention computes; so we cap the context there rather than be silently wrong beyond.
        context = window
    is_llama = arch == "LlamaForCausalLM"
    return _model_config(source, dict(
        vocab_size=keys.size("vocab_size"),
        context_length=context,
        d_model=d_model,
        n_layers=keys.size("num_hidden_layers", limit=MAX_LAYERS),
        n_heads=n_heads,
        n_kv_heads=keys.size("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
        head_dim=keys.size("head_dim", defaults.get("head_dim")) or d_model // n_heads,
        # Qwen3-MoE's experts have their own width (intermediate_size is for dense layers, which we refuse)
        d_ff=keys.size("moe_intermediate_size", defaults["moe_intermediate_size"]) if arch == QWEN3_MOE
        else keys.size("intermediate_size"),
        norm="rmsnorm",
        norm_eps=keys.number("rms_norm_eps", defaults["rms_norm_eps"]),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        # Only Llama (and Qwen3 / Qwen3-MoE, attention_bias) have these keys; Mistral has no biases and Qwen2
        # hard-codes q/k/v biases. Qwen3 and Qwen3-MoE always normalise each query and key head.
        attention_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE) and keys.flag("attention_bias", False),
        qkv_bias=arch == "Qwen2ForCausalLM",
        mlp_bias=is_llama and keys.flag("mlp_bias", False),
        qk_norm=arch in ("Qwen3ForCausalLM", QWEN3_MOE),
        **_experts(arch, keys),
        tie_embeddings=keys.flag("tie_word_embeddings", False),
        **{"name": keys.name(LLAMA_LIKE[arch]), **ours},
    ))


def _experts(arch: str, keys: _Keys) -> dict[str, Any]:
    """Mixtral's mixture of experts (every layer sparse; routing weights always renormalised over the k), or
    Qwen3-MoE's (renormalised if norm_topk_prob; dense layers mixed in and shared experts refused)."""
    if arch == QWEN3_MOE:
        return _qwen3_moe_experts(keys)
    if arch != MIXTRAL:
        return {}
    defaults = _LLAMA_LIKE_DEFAULTS[arch]
    return {"n_experts": keys.size("num_local_experts", defaults["num_local_experts"]),
            "experts_per_token": keys.size("num_experts_per_tok", defaults["num_experts_per_tok"])}


def _qwen3_moe_experts(keys: _Keys) -> dict[str, Any]:
    d, source, defaults = keys.d, keys.source, _LLAMA_LIKE_DEFAULTS[QWEN3_MOE]
    dense = d.get("mlp_only_layers")
    if dense is not None and dense != []:
        raise UserError(f"{source}: mlp_only_layers {shown(dense)} is not supported (dense layers mixed in with "
                        "sparse ones; our mixture of experts is in every layer)")
    step = keys.size("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(f"{source}: decoder_sparse_step {step} is not supported (dense layers mixed in with sparse "
                        "ones; our mixture of experts is in every layer)")
    for key in ("shared_expert_intermediate_size", "num_shared_experts", "n_shared_experts"):
        if d.get(key):
            raise UserError(f"{source}: shared experts ({key} {shown(d[key])}) are not supported")
    # num_experts in Qwen's files and transformers 4.x; transformers 5 writes it as num_local_experts
    experts = keys.size("num_experts", None) or keys.size("num_local_experts", defaults["num_experts"])
    return {"n_experts": experts,
            "experts_per_token": keys.size("num_experts_per_tok", defaults["num_experts_per_tok"]),
            "norm_topk_prob": keys.flag("norm_topk_prob", defaults["norm_topk_prob"])}


def _gpt2_config(keys: _Keys, ours: dict[str, Any]) -> ModelConfig:
    source = keys.source
    act = keys.d.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UserError(f"{source}: GPT-2 activation_function {shown(act)} is not supported "
                        f"(our GELU is the tanh approximation: {', '.join(_TANH_GELU)})")
    if not keys.flag("scale_attn_weights", True) or keys.flag("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{source}: GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                        "(scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true)")
    # transformers' GPT2Config defaults (GPT-2 small) for keys left out.
    d_model, n_heads = keys.size("n_embd", 768), keys.size("n_head", 12)
    if d_model % n_heads:
        raise UserError(f"{source}: n_embd ({d_model}) must be a multiple of n_head ({n_heads})")
    context = keys.size("n_positions", None, limit=MAX_CONTEXT) or keys.size("n_ctx", 1024, limit=MAX_CONTEXT)
    return _model_config(source, dict(
        vocab_size=keys.size("vocab_size", 50257),
        context_length=context,
        d_model=d_model,
        n_layers=keys.size("n_layer", 12, limit=MAX_LAYERS),
        n_heads=n_heads,
        d_ff=keys.size("n_inner", None) or 4 * d_model,
        norm="layernorm",
        norm_eps=keys.number("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        positions="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=keys.flag("tie_word_embeddings", True),
        **{"name": keys.name("gpt2"), **ours},
    ))
