"""Hugging Face naming: `config.json` <-> `ModelConfig`, and ONE table of tensor names per architecture family.

Why explicit maps: an importer that guesses tensor names breaks silently (a transposed or unpermuted
weight still loads, it just produces garbage). Each family here is a table of names (`TENSOR_NAMES`:
Llama-like, which covers Mistral, Qwen2 and Qwen3; Mixtral's mixture of experts; GPT-2; and our own), proved by a logits-parity test against
`transformers` (tests/loaders/test_hf.py). `family(cfg)` is the one rule for which table applies, and
everything that names a tensor asks it: import and export here, GGUF (through these names), and LoRA
targets and adapter files (`lmforge.loaders.peft`).

Our model fuses q/k/v into one projection (`attn.qkv`) and gate/up into one (`mlp.fc`) for speed; the
maps split and join them, so what lands on disk is the layout transformers, vLLM and llama.cpp's converter
expect. Configs that no transformers class describes (e.g. sinusoidal positions) are written with
`architectures: ["LmforgeForCausalLM"]`, our own tensor names and the full `ModelConfig` under `lmforge`.
The files themselves (which exist, how weights are streamed) are `lmforge.loaders.model_dir`'s.

What we refuse, and why: a config that asks for computation our model does not do (a rope scaling type we
don't implement, an activation other than the one our MLP applies, custom code behind `auto_map`) is a
`UserError` naming the key, never a model that loads and quietly computes something else.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

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
from lmforge.model.gpt import GPT, PROJECTIONS, projection_parts
from lmforge.tokenizer import load_hf_tokenizer

__all__ = [
    "GPT2",
    "GPT2_FAMILY",
    "LLAMA_FAMILY",
    "MIXTRAL",
    "MIXTRAL_FAMILY",
    "LLAMA_LIKE",
    "NATIVE",
    "NATIVE_FAMILY",
    "SUPPORTED_ARCHITECTURES",
    "TENSOR_NAMES",
    "TensorNames",
    "config_from_hf",
    "config_to_hf",
    "family",
    "hf_architecture",
    "hf_modules",
    "hf_tensor_names",
    "is_gpt2_shaped",
    "is_llama_shaped",
    "is_mixtral_shaped",
    "load_hf_tokenizer",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "tensor_names",
    "without_body",
]

LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral"}
MIXTRAL = "MixtralForCausalLM"  # Llama-like attention; a sparse mixture of SwiGLU experts in place of the MLP
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


def hf_architecture(cfg: ModelConfig) -> str:
    if cfg.n_experts:
        return MIXTRAL if is_mixtral_shaped(cfg) else NATIVE
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
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        d["attention_bias"] = cfg.attention_bias
    if arch == "LlamaForCausalLM":
        d["mlp_bias"] = cfg.mlp_bias
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        d["use_sliding_window"] = False
    if arch == MIXTRAL:  # (router_aux_loss_coef is MixtralConfig's default: our coefficient is the recipe's)
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, sliding_window=None,
                 output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
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
        d_ff=keys.size("intermediate_size"),
        norm="rmsnorm",
        norm_eps=keys.number("rms_norm_eps", defaults["rms_norm_eps"]),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        # Only Llama (and Qwen3, attention_bias) have these keys; Mistral has no biases and Qwen2 hard-codes
        # q/k/v biases. Qwen3 always normalises each query and key head.
        attention_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and keys.flag("attention_bias", False),
        qkv_bias=arch == "Qwen2ForCausalLM",
        mlp_bias=is_llama and keys.flag("mlp_bias", False),
        qk_norm=arch == "Qwen3ForCausalLM",
        **_experts(arch, keys),
        tie_embeddings=keys.flag("tie_word_embeddings", False),
        **{"name": keys.name(LLAMA_LIKE[arch]), **ours},
    ))


def _experts(arch: str, keys: _Keys) -> dict[str, Any]:
    """Mixtral's mixture of experts (every layer sparse; routing weights always renormalised over the k)."""
    if arch != MIXTRAL:
        return {}
    defaults = _LLAMA_LIKE_DEFAULTS[arch]
    return {"n_experts": keys.size("num_local_experts", defaults["num_local_experts"]),
            "experts_per_token": keys.size("num_experts_per_tok", defaults["num_experts_per_tok"])}


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


# ---------------------------------------------------------------------------------------------------
# Tensor names: ONE table per architecture family
# ---------------------------------------------------------------------------------------------------
LLAMA_FAMILY, GPT2_FAMILY, NATIVE_FAMILY, MIXTRAL_FAMILY = "llama", "gpt2", "lmforge", "mixtral"


@dataclass(frozen=True)
class TensorNames:
    """How one architecture family names our modules, in its model files and in PEFT adapters for it.

    A module of ours is `tok_emb`, `norm`, `lm_head` (top level) or `blocks.N.<module>`; theirs is
    `body + top[...]`, `head`, or `body + layer.format(N) + block[<module>]`. A `block` entry that is a
    dict names each row slice of one of our fused projections (`lmforge.model.gpt.projection_parts`:
    q|k|v of attn.qkv, gate|up of a SwiGLU mlp.fc) as a module of its own, as Llama does; a string is one
    module holding all the rows, as GPT-2's c_attn holds q|k|v. In a mixture of experts' entries, "{}" is
    the expert's number (`mlp.experts.{}.fc`), whose parts are those of the dense mlp.fc.
    """

    family: str
    title: str  # how messages name the family
    body: str  # prefix of every module but the output head: "model." (Llama), "transformer." (GPT-2)
    layer: str  # block N under `body`, a format string
    top: dict[str, str]
    block: dict[str, str | dict[str, str]]
    transposed: frozenset[str] = frozenset()  # weights stored (in, out): GPT-2's Conv1D computes x @ W + b
    body_optional: bool = False  # files may leave `body` out (GPT-2 saved from the bare GPT2Model)
    head: str = "lm_head"


_OURS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc", "mlp.proj")
# A mixture of experts' modules under blocks.N (`lmforge.model.gpt.MoE`); "{}" is the expert's number, and an
# expert's fc / proj split into parts as the dense mlp.fc / mlp.proj do.
_OURS_MOE = ("mlp.router", "mlp.experts.{}.fc", "mlp.experts.{}.proj")
TENSOR_NAMES: dict[str, TensorNames] = {
    # Llama, Mistral, Qwen2 and Qwen3 name their tensors alike (Qwen2 adds q/k/v biases under the same modules;
    # Qwen3 its per-head q/k norms, which only models with `qk_norm` have).
    LLAMA_FAMILY: TensorNames(
        LLAMA_FAMILY, "Llama-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={"norm1": "input_layernorm",
               "attn.qkv": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
               "attn.proj": "self_attn.o_proj",
               "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
               "norm2": "post_attention_layernorm",
               "mlp.fc": {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
               "mlp.proj": "mlp.down_proj"}),
    # Mixtral: Llama's attention; w1 = gate, w3 = up, w2 = down of each expert (in transformers 5 the
    # in-memory layout is fused 3-D tensors, but files are saved and read under these names).
    MIXTRAL_FAMILY: TensorNames(
        MIXTRAL_FAMILY, "Mixtral-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={"norm1": "input_layernorm",
               "attn.qkv": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
               "attn.proj": "self_attn.o_proj",
               "norm2": "post_attention_layernorm",
               "mlp.router": "block_sparse_moe.gate",
               "mlp.experts.{}.fc": {"gate": "block_sparse_moe.experts.{}.w1", "up": "block_sparse_moe.experts.{}.w3"},
               "mlp.experts.{}.proj": "block_sparse_moe.experts.{}.w2"}),
    # GPT-2's c_attn output columns are q | k | v, heads contiguous inside each: exactly the rows of our
    # fused attn.qkv. (attn.bias / attn.masked_bias in older files are causal-mask buffers, never read.)
    GPT2_FAMILY: TensorNames(
        GPT2_FAMILY, "GPT-2-style", "transformer.", "h.{}.",
        top={"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"},
        block={"norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "norm2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"},
        transposed=frozenset({"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}), body_optional=True),
    # Shapes no transformers class describes are saved under our own names (architecture LmforgeForCausalLM).
    NATIVE_FAMILY: TensorNames(
        NATIVE_FAMILY, "lmforge-native", "", "blocks.{}.",
        top={"tok_emb": "tok_emb", "pos_emb": "pos_emb", "norm": "norm"},
        block={m: m for m in (*_OURS, *_OURS_MOE)}),
}


def family(cfg: ModelConfig) -> str:
    """THE rule for which table names a model's tensors: the family of the transformers class that
    computes exactly what `cfg` does (`hf_architecture`), else our own. Exporting, importing, LoRA target
    names and adapter files all ask this, so they cannot disagree."""
    arch = hf_architecture(cfg)
    if arch == MIXTRAL:
        return MIXTRAL_FAMILY
    return GPT2_FAMILY if arch == GPT2 else NATIVE_FAMILY if arch == NATIVE else LLAMA_FAMILY


def tensor_names(cfg: ModelConfig) -> TensorNames:
    return TENSOR_NAMES[family(cfg)]


def hf_modules(cfg: ModelConfig, module: str) -> dict[str, list[str]]:
    """Their module name (under the layer prefix) -> the parts of our per-block `module` it holds, in row
    order: {"self_attn.q_proj": ["q"], ...} where a family splits it, {"attn.c_attn": ["q", "k", "v"]} where not."""
    theirs = tensor_names(cfg).block[module]
    parts = [p for p, _, _ in projection_parts(cfg, module)]
    if isinstance(theirs, dict):
        return {theirs[p]: [p] for p in parts}
    return {theirs: parts}


def hf_tensor_names(cfg: ModelConfig, ours: str) -> list[str]:
    """Our tensor name -> the checkpoint's (several, in row order, for a fused projection a family splits)."""
    names = tensor_names(cfg)
    module, _, kind = ours.rpartition(".")
    if module == "lm_head":
        return [f"{names.head}.{kind}"]
    if module.startswith("blocks."):
        _, layer, mine = module.split(".", 2)
        prefix = names.body + names.layer.format(layer)
        expert = _EXPERT.fullmatch(mine)
        if expert:  # mlp.experts.E.fc -> the entry "mlp.experts.{}.fc", its parts those of the dense mlp.fc
            entry = names.block[f"mlp.experts.{{}}.{expert[2]}"]
            parts = [p for p, _, _ in projection_parts(cfg, _projection(mine))]
            theirs = [entry[p] for p in parts] if isinstance(entry, dict) else [entry]
            theirs = [t.format(expert[1]) for t in theirs]
        else:
            theirs = list(hf_modules(cfg, mine)) if mine in PROJECTIONS else [names.block[mine]]
        return [f"{prefix}{t}.{kind}" for t in theirs]
    return [f"{names.body}{names.top[module]}.{kind}"]


_EXPERT = re.compile(r"mlp\.experts\.([0-9]+)\.(fc|proj)")


def _projection(module: str) -> str:
    """The per-block projection whose row parts `module` has: an expert's fc / proj are shaped as mlp.fc / mlp.proj."""
    expert = _EXPERT.fullmatch(module)
    return f"mlp.{expert[2]}" if expert else module


def _our_names(cfg: ModelConfig) -> list[str]:
    """Our tensor names for `cfg`, from a model built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return list(GPT(cfg).state_dict())


def _is_transposed(names: TensorNames, ours: str) -> bool:
    module, _, kind = ours.rpartition(".")
    return kind == "weight" and module.startswith("blocks.") and module.split(".", 2)[2] in names.transposed


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> the checkpoint's names (a new dict; tied lm_head left out)."""
    if family(cfg) == NATIVE_FAMILY:  # our own names: nothing to rename
        out = dict(sd)
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    names = tensor_names(cfg)
    out = {}
    for ours in _our_names(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w, theirs = sd[ours], hf_tensor_names(cfg, ours)
        if len(theirs) > 1:  # q|k|v or gate|up: one tensor per part
            module = _projection(ours.rpartition(".")[0].split(".", 2)[2])
            out.update(zip(theirs, w.split([stop - start for _, start, stop in projection_parts(cfg, module)], dim=0)))
        else:
            out[theirs[0]] = w.t() if _is_transposed(names, ours) else w
    return {k: v.contiguous() for k, v in out.items()}


def without_body(cfg: ModelConfig, tensors: Collection[str]) -> bool:
    """True when a checkpoint leaves out its family's optional `body` prefix: GPT2LMHeadModel saves under
    "transformer.", but files saved from the bare GPT2Model (the original openai-community/gpt2 upload
    among them) have no prefix."""
    names = tensor_names(cfg)
    first = f"{names.top['tok_emb']}.weight"
    return names.body_optional and names.body + first not in tensors and first in tensors


def state_dict_from_hf(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors -> our parameter names. Missing tensors are a clear error, never zeros;
    tensors we have no use for (rotary inv_freq, GPT-2's attention-mask buffers) are ignored."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: tensor {name!r} is missing")
        return tensors[name]

    if family(cfg) == NATIVE_FAMILY:
        out = dict(tensors)
        if cfg.tie_embeddings:
            out["lm_head.weight"] = take("tok_emb.weight")
        return out
    names = tensor_names(cfg)
    bare = without_body(cfg, tensors)
    out = {}
    for ours in _our_names(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied checkpoints sometimes still ship lm_head; the embedding is the one we keep
        theirs = [t.removeprefix(names.body) if bare else t for t in hf_tensor_names(cfg, ours)]
        if len(theirs) > 1:
            out[ours] = torch.cat([take(t) for t in theirs], dim=0)
        else:
            w = take(theirs[0])
            out[ours] = w.t() if _is_transposed(names, ours) else w
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
