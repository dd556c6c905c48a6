"""Reading a Hugging Face `config.json` (transformers 4.x and 5.x spellings) into a `ModelConfig`.

What we refuse, and why: a config that asks for computation our model does not do (a rope scaling type we
don't implement, an activation other than the one our MLP applies, custom code behind `auto_map`) is a
`UserError` naming the key, never a model that loads and quietly computes something else. Every value is
checked for its type and range as it is read (`ConfigKeys`), so a damaged or hostile file is refused in one
line too.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import MAX_CONTEXT, MAX_LAYERS, MAX_SIZE, ROPE_SCALING_TYPES, TRAINING_ONLY_FIELDS, ModelConfig, finite_number, is_int, shown
from lmforge.errors import UserError, one_line
from lmforge.loaders.hf import (
    GEMMA,
    GEMMA2,
    GEMMA3,
    GEMMA3_MM,
    GPT2,
    LLAMA_LIKE,
    MIXTRAL,
    NATIVE,
    PHI3,
    QWEN2_MOE,
    QWEN3_MOE,
    SUPPORTED_ARCHITECTURES,
)

__all__ = ["ConfigKeys", "config_from_hf"]

# A config.json without "architectures" still names its family in model_type (transformers' Auto classes
# dispatch on it too); this is read from the file, never guessed from a path.
MODEL_TYPES = {**{v: k for k, v in LLAMA_LIKE.items()}, **{v: k for k, v in GEMMA.items()}, "phi3": PHI3, "gpt2": GPT2,
               "lmforge": NATIVE}

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
    # Qwen2MoeConfig (Qwen1.5-MoE-A2.7B's shape)
    QWEN2_MOE: {"max_position_embeddings": 32768, "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "num_experts": 60,
                "num_experts_per_tok": 4, "norm_topk_prob": False, "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632},
}
_SILU = ("silu", "swish")  # the same function under two names in transformers' ACT2FN
# GPT-2's activation names that compute the tanh approximation of GELU, which is what our MLP applies
# (gelu_new and gelu_fast write the same formula out by hand; gelu_pytorch_tanh calls F.gelu(approximate="tanh")).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


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
        causal = "/".join(a.removesuffix("ForCausalLM") for a in SUPPORTED_ARCHITECTURES if a.endswith("ForCausalLM"))
        others = ", ".join(a for a in SUPPORTED_ARCHITECTURES if not a.endswith("ForCausalLM"))
        raise UserError(f"{source}: architecture {shown(arch)} is not supported; supported: {causal}ForCausalLM, {others}")
    return arch


class ConfigKeys:
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

    def count(self, key: str, default: Any = ..., *, limit: int = MAX_SIZE) -> int:
        """An integer from 0 up to `limit` (a key left out or null gives `default`)."""
        v = self._get(key, default)
        if not is_int(v) or not 0 <= v <= limit:
            raise UserError(f"{self.source}: {key} must be an integer from 0 to {limit}, got {shown(v)}")
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

    Every value is checked as it is read (`ConfigKeys`); any other failure on a malformed file is still one
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
        # (hf_class is the architecture read here, never what a file's lmforge section claims)
        ours = {k: v for k, v in section.items() if k in TRAINING_ONLY_FIELDS and k != "hf_class"}
        keys = ConfigKeys(d, source)
        if arch == GPT2:
            return _gpt2_config(keys, ours)
        if arch in GEMMA:
            return _gemma_config(arch, keys, ours)
        if arch == PHI3:
            return _phi3_config(keys, ours)
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


def _rope(keys: ConfigKeys, default_theta: float = 10000.0, *, context: int | None = None,
          phi3_original: int | None = None) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling or None) from either spelling.

    transformers 5 renamed rope_scaling -> rope_parameters and may keep rope_theta only inside it. With the
    model's `context` (max_position_embeddings), what transformers derives from it is written into the dict:
    YaRN's and LongRoPE's original context when the dict has none, and LongRoPE's factor (context / original),
    so that the attention factor it sets does not change if the context is later shortened. Phi-3 keeps its
    original context at the top level, which transformers prefers to the dict's (`phi3_original`), and knows
    LongRoPE by its two old names too (su, yarn).
    """
    d, source = keys.d, keys.source
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: rope_parameters/rope_scaling should be an object, got {shown(params)}")
    theta = ConfigKeys(params, source).number("rope_theta") if params.get("rope_theta") else keys.number("rope_theta", default_theta)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, None
    if phi3_original is not None:
        if kind not in ("longrope", "su", "yarn"):
            raise UserError(f"{source}: rope scaling type {shown(kind)} is not supported for Phi-3 (transformers' Phi3 "
                            "has only longrope)")
        kind = "longrope"
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(f"{source}: rope scaling type {shown(kind)} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)}); "
                        "loading it anyway would change every position's rotation")
    kind = "longrope" if kind == "su" else kind
    # (partial_rotary_factor is a property of the attention, read by the family that has it)
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    scaling["type"] = kind
    if phi3_original is not None:
        scaling["original_max_position_embeddings"] = phi3_original
    if kind in ("yarn", "longrope") and context is not None:
        scaling.setdefault("original_max_position_embeddings", context)
        orig = scaling["original_max_position_embeddings"]
        if kind == "longrope" and scaling.get("factor") is None and is_int(orig) and orig > 0:
            scaling["factor"] = context / orig
    return theta, scaling  # its values are checked by ModelConfig


def _sliding_window(arch: str, keys: ConfigKeys) -> dict[str, Any]:
    """`sliding_window` and `sliding_layers` of our config from transformers' rules for `arch`: Mistral and
    Mixtral slide in every layer, Qwen2/Qwen3 where `layer_types` says (or from `max_window_layers` on), and
    only when `use_sliding_window`; Qwen3-MoE in every layer when it is set."""
    n_layers = keys.size("num_hidden_layers", limit=MAX_LAYERS)
    layers = None
    if arch in ("MistralForCausalLM", MIXTRAL):
        # absent: the class's default; null: no window
        window = keys.size("sliding_window", None) if "sliding_window" in keys.d else _LLAMA_LIKE_DEFAULTS[arch]["sliding_window"]
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE, QWEN2_MOE):
        # (absent: the config class's 4096; null: no window, whatever use_sliding_window says)
        window = ((keys.size("sliding_window", None) if "sliding_window" in keys.d else 4096)
                  if keys.flag("use_sliding_window", False) else None)
        if window is not None and arch != QWEN3_MOE:
            first = keys.count("max_window_layers", 28, limit=MAX_LAYERS)  # 0: every layer slides
            # (Qwen2MoeConfig's own rule differs: every other layer, below max_window_layers)
            rule = (lambda i: (i + 1) % 2 == 1 and i < first) if arch == QWEN2_MOE else (lambda i: i >= first)
            layers = _sliding_layers(keys, n_layers, rule)
    else:
        return {}
    if window is None or layers == []:
        return {}
    return {"sliding_window": window, "sliding_layers": None if layers is None or len(layers) == n_layers else layers}


def _sliding_layers(keys: ConfigKeys, n_layers: int, slides_by_default) -> list[int]:
    """The indices of the layers `layer_types` marks "sliding_attention" (checked: one known type per layer);
    without `layer_types`, those for which `slides_by_default(i)`."""
    types = keys.d.get("layer_types")
    if types is None:
        return [i for i in range(n_layers) if slides_by_default(i)]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{keys.source}: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                        f"{n_layers} layers, got {shown(types)}")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _llama_like_config(arch: str, keys: ConfigKeys, ours: dict[str, Any]) -> ModelConfig:
    defaults, source = _LLAMA_LIKE_DEFAULTS[arch], keys.source
    act = keys.d.get("hidden_act", "silu")
    if act not in _SILU:
        raise UserError(f"{source}: hidden_act {shown(act)} is not supported for {arch} (our SwiGLU MLP uses silu)")
    context = keys.size("max_position_embeddings", defaults["max_position_embeddings"], limit=MAX_CONTEXT)
    theta, scaling = _rope(keys, defaults.get("rope_theta", 10000.0), context=context)
    d_model, n_heads = keys.size("hidden_size"), keys.size("num_attention_heads")
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
        d_ff=keys.size("moe_intermediate_size", defaults["moe_intermediate_size"]) if arch in (QWEN3_MOE, QWEN2_MOE)
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
        qkv_bias=arch == "Qwen2ForCausalLM" or (arch == QWEN2_MOE and keys.flag("qkv_bias", True)),
        mlp_bias=is_llama and keys.flag("mlp_bias", False),
        qk_norm=arch in ("Qwen3ForCausalLM", QWEN3_MOE),
        **_experts(arch, keys),
        **_sliding_window(arch, keys),
        tie_embeddings=keys.flag("tie_word_embeddings", False),
        **{"name": keys.name(LLAMA_LIKE[arch]), **ours},
    ))


def _experts(arch: str, keys: ConfigKeys) -> dict[str, Any]:
    """Mixtral's mixture of experts (every layer sparse; routing weights always renormalised over the k), or
    Qwen3-MoE's / Qwen2-MoE's (renormalised if norm_topk_prob; dense layers mixed in refused; Qwen2-MoE's
    gated shared expert)."""
    if arch in (QWEN3_MOE, QWEN2_MOE):
        return _qwen_moe_experts(arch, keys)
    if arch != MIXTRAL:
        return {}
    defaults = _LLAMA_LIKE_DEFAULTS[arch]
    return {"n_experts": keys.size("num_local_experts", defaults["num_local_experts"]),
            "experts_per_token": keys.size("num_experts_per_tok", defaults["num_experts_per_tok"])}


def _qwen_moe_experts(arch: str, keys: ConfigKeys) -> dict[str, Any]:
    d, source, defaults = keys.d, keys.source, _LLAMA_LIKE_DEFAULTS[arch]
    dense = d.get("mlp_only_layers")
    if dense is not None and dense != []:
        raise UserError(f"{source}: mlp_only_layers {shown(dense)} is not supported (dense layers mixed in with "
                        "sparse ones; our mixture of experts is in every layer)")
    step = keys.size("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(f"{source}: decoder_sparse_step {step} is not supported (dense layers mixed in with sparse "
                        "ones; our mixture of experts is in every layer)")
    shared = {}
    if arch == QWEN2_MOE:  # one gated shared expert (a width of 0 would be an empty MLP: none)
        shared = {"shared_expert_d_ff": keys.size("shared_expert_intermediate_size",
                                                  defaults["shared_expert_intermediate_size"])}
    else:
        for key in ("shared_expert_intermediate_size", "num_shared_experts", "n_shared_experts"):
            if d.get(key):
                raise UserError(f"{source}: shared experts ({key} {shown(d[key])}) are not supported for {arch}")
    # num_experts in Qwen's files and transformers 4.x; transformers 5 writes it as num_local_experts
    experts = keys.size("num_experts", None) or keys.size("num_local_experts", defaults["num_experts"])
    return {"n_experts": experts, **shared,
            "experts_per_token": keys.size("num_experts_per_tok", defaults["num_experts_per_tok"]),
            "norm_topk_prob": keys.flag("norm_topk_prob", defaults["norm_topk_prob"])}


def _phi3_config(keys: ConfigKeys, ours: dict[str, Any]) -> ModelConfig:
    """Phi-3, Phi-3.5 and Phi-4-mini (transformers' Phi3Config defaults for keys left out): Llama's computation
    without biases, with a rotation of the first partial_rotary_factor of each head (Phi-4-mini: 0.75),
    LongRoPE, and a window in every layer when sliding_window is set (Phi-3-mini-4k: 2047)."""
    source, d = keys.source, keys.d
    act = d.get("hidden_act", "silu")
    if act not in _SILU:
        raise UserError(f"{source}: hidden_act {shown(act)} is not supported for {PHI3} (our SwiGLU MLP uses silu)")
    d_model, n_heads = keys.size("hidden_size", 3072), keys.size("num_attention_heads", 32)
    head_dim = d_model // n_heads
    if keys.size("head_dim", head_dim) != head_dim:  # Phi3Config sizes the rotation from hidden / heads
        raise UserError(f"{source}: head_dim {d['head_dim']} other than hidden_size / num_attention_heads ({head_dim}) "
                        f"is not supported for {PHI3}")
    context = keys.size("max_position_embeddings", 4096, limit=MAX_CONTEXT)
    original = keys.size("original_max_position_embeddings", 4096, limit=MAX_CONTEXT)
    theta, scaling = _rope(keys, 10000.0, context=context, phi3_original=original)
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    fraction = next((v for v in (d.get("partial_rotary_factor"), params.get("partial_rotary_factor")) if v is not None), 1.0)
    rotated = int(head_dim * fraction) if finite_number(fraction) and 0 < fraction <= 1 else 0
    if rotated <= 0 or rotated % 2:
        raise UserError(f"{source}: partial_rotary_factor must be in (0, 1] and turn an even number of the {head_dim} "
                        f"dims of a head, got {shown(fraction)}")
    return _model_config(source, dict(
        vocab_size=keys.size("vocab_size", 32064),
        context_length=context,
        d_model=d_model,
        n_layers=keys.size("num_hidden_layers", 32, limit=MAX_LAYERS),
        n_heads=n_heads,
        n_kv_heads=keys.size("num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_ff=keys.size("intermediate_size", 8192),
        norm="rmsnorm",
        norm_eps=keys.number("rms_norm_eps", 1e-5),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_dim=None if rotated == head_dim else rotated,
        sliding_window=keys.size("sliding_window", None, limit=MAX_CONTEXT),  # every layer (Mistral's mask)
        tie_embeddings=keys.flag("tie_word_embeddings", False),
        hf_class=PHI3,  # kept: Phi-3-mini-4k and Phi-4 compute exactly what Mistral / Llama do
        **{"name": keys.name("phi3"), **ours},
    ))


# transformers' Gemma2Config / Gemma3TextConfig defaults for keys a config.json may leave out.
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    GEMMA2: {"max_position_embeddings": 8192, "rope_theta": 10000.0, "final_logit_softcapping": 30.0,
             "attn_logit_softcapping": 50.0, "pattern": 2},
    GEMMA3: {"max_position_embeddings": 131072, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
             "final_logit_softcapping": None, "attn_logit_softcapping": None, "pattern": 6},
}


def _gemma_config(arch: str, keys: ConfigKeys, ours: dict[str, Any]) -> ModelConfig:
    """Gemma 2 or Gemma 3 (text, or the language model of a multimodal Gemma 3 checkpoint, whose
    `text_config` holds it)."""
    source = keys.source
    if arch == GEMMA3_MM:
        text = keys.d.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"{source}: a Gemma 3 multimodal config without its text_config")
        keys, arch = ConfigKeys(text, f"{source} text_config"), GEMMA3
    defaults = _GEMMA_DEFAULTS[arch]
    d = keys.d
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _TANH_GELU:
        raise UserError(f"{source}: hidden_activation {shown(act)} is not supported for {arch} (our GeGLU uses the tanh GELU)")
    if d.get("use_bidirectional_attention"):
        raise UserError(f"{source}: use_bidirectional_attention (an embedding model) is not supported: our models are causal")
    n_layers = keys.size("num_hidden_layers", 26, limit=MAX_LAYERS)
    n_heads = keys.size("num_attention_heads", 8)
    head_dim = keys.size("head_dim", 256)
    # absent: the class's 4096; null: no window at all
    window = keys.size("sliding_window", None, limit=MAX_CONTEXT) if "sliding_window" in d else 4096
    pattern = keys.size("sliding_window_pattern", defaults["pattern"], limit=MAX_LAYERS)
    layers = _sliding_layers(keys, n_layers, lambda i: bool((i + 1) % pattern)) if window is not None else []
    theta, scaling, local_theta = _gemma_rope(arch, keys, defaults)

    def cap(key: str) -> float | None:
        return keys.number(key) if d.get(key) is not None else (None if key in d else defaults[key])

    return _model_config(source, dict(
        vocab_size=keys.size("vocab_size", 256000 if arch == GEMMA2 else 262208),
        context_length=keys.size("max_position_embeddings", defaults["max_position_embeddings"], limit=MAX_CONTEXT),
        d_model=keys.size("hidden_size", 2304),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=keys.size("num_key_value_heads", 4),
        head_dim=head_dim,
        d_ff=keys.size("intermediate_size", 9216),
        norm="rmsnorm", norm_offset=True, post_norms=True, embed_scale=True,
        norm_eps=keys.number("rms_norm_eps", 1e-6),
        mlp="geglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        attention_bias=keys.flag("attention_bias", False),
        qk_norm=arch == GEMMA3,
        attn_scale=keys.number("query_pre_attn_scalar", 256) ** -0.5,
        attn_softcap=cap("attn_logit_softcapping"),
        final_softcap=cap("final_logit_softcapping"),
        sliding_window=window if layers else None,
        sliding_layers=None if not layers or len(layers) == n_layers else layers,
        tie_embeddings=keys.flag("tie_word_embeddings", True),
        **{"name": keys.name("gemma2" if arch == GEMMA2 else "gemma3"), **ours},
    ))


def _gemma_rope(arch: str, keys: ConfigKeys, defaults: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float | None]:
    """(global base, global scaling, local base or None): Gemma 3's rope_parameters hold one entry per layer
    type in transformers 5 (rope_theta / rope_local_base_freq / rope_scaling before)."""
    params = keys.d.get("rope_parameters")
    if arch == GEMMA2 or not (isinstance(params, dict) and "full_attention" in params):
        theta, scaling = _rope(keys, defaults["rope_theta"])
        if arch == GEMMA2:
            return theta, scaling, None
        return theta, scaling, keys.number("rope_local_base_freq", defaults["rope_local_base_freq"])
    full, local = params.get("full_attention"), params.get("sliding_attention") or {}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise UserError(f"{keys.source}: rope_parameters entries must be objects, got {shown(params)}")
    theta, scaling = _rope(ConfigKeys({"rope_parameters": full, "rope_theta": full.get("rope_theta")}, keys.source),
                           defaults["rope_theta"])
    local_theta, local_scaling = _rope(ConfigKeys({"rope_parameters": local}, keys.source), defaults["rope_local_base_freq"])
    if local_scaling is not None:
        raise UserError(f"{keys.source}: RoPE scaling of the sliding layers ({shown(local)}) is not supported")
    return theta, scaling, local_theta


def _gpt2_config(keys: ConfigKeys, ours: dict[str, Any]) -> ModelConfig:
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
