"""GGUF metadata <-> `ModelConfig`: the architecture check, the `{arch}.*` hyperparameters, biases and tied
output told by which tensors exist, a mixture of experts (`expert_count`, `expert_used_count`, ...), rope
scaling (linear as KV; Llama-3 derived back from, and written as, `rope_freqs.weight`), and the same
hyperparameters written back for export.

Mixtures of experts as llama.cpp runs them: Mixtral is arch `llama` with `llama.expert_count` > 0, its experts
as wide as `feed_forward_length`; Qwen3-MoE is arch `qwen3moe`, its experts `expert_feed_forward_length` wide
(llama.cpp falls back to feed_forward_length / expert_used_count without it, and so do we). Both route
softmax -> top k -> renormalised over the k: llama.cpp's `llama` and `qwen3moe` graphs hard-code the
renormalisation and never read `{arch}.expert_weights_norm` (its converter never writes it for them). So a
`qwen3moe` file without the key renormalises (Qwen3-MoE's norm_topk_prob true, as the released models set
it); we honour the key when a file has it, write it, and refuse to export norm_topk_prob false, which
llama.cpp would silently run renormalised.

A module of its own because deciding what model a file describes is separate from reading its weights:
`describe_gguf` (`lmforge list/show`) needs only this and the header, never the tensor data (bar the tiny
`rope_freqs.weight`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from lmforge.config import MAX_CONTEXT, ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.gguf.reader import GGUFTensorInfo, dequantize, gguf_package, meta, short
from lmforge.loaders.hf import MIXTRAL, QWEN3_MOE, hf_architecture, is_llama_shaped


SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")
# The transformers class each architecture's configs must map to (a qwen3 file is Qwen3 by its name alone:
# its per-head q/k norms are what `qk_norm` says, and the tensor check then demands them; `llama` with experts
# is Mixtral).
_LLAMA_OR_QWEN2 = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_HF_CLASSES = {"llama": (*_LLAMA_OR_QWEN2, MIXTRAL), "qwen2": _LLAMA_OR_QWEN2, "qwen3": ("Qwen3ForCausalLM",),
               "qwen3moe": (QWEN3_MOE,)}


# ---------------------------------------------------------------------------------------------------
# Config from metadata
# ---------------------------------------------------------------------------------------------------
def check_architecture(path: str, metadata: dict[str, Any]) -> str:
    parts = meta(path, metadata, "split.count", "int", 1)
    if parts > 1:
        raise UserError(f"{path}: one part of a GGUF split into {parts} files; merge them first "
                        f"(llama-gguf-split --merge)")
    arch = meta(path, metadata, "general.architecture", "str")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {short(arch)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def base_config(path: str, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo], arch: str) -> ModelConfig:
    """ModelConfig from the `{arch}.*` hyperparameters and which tensors exist (biases, tied output).
    Rope scaling from `rope_freqs.weight` is added later, once that tensor is read."""
    p = f"{arch}."

    def num(key: str, default: Any = ...) -> int:
        v = meta(path, metadata, p + key, "int", default)
        if v is not None and v <= 0:
            raise UserError(f"{path}: metadata {p + key!r} must be positive, got {v}")
        return v

    experts = _experts(path, metadata, arch)
    d_model, n_heads = num("embedding_length"), num("attention.head_count")
    n_layers, d_ff = num("block_count"), _expert_width(path, metadata, arch, experts) or num("feed_forward_length")
    n_kv = num("attention.head_count_kv", n_heads)
    context = num("context_length")
    if context > MAX_CONTEXT:  # the tables RoPE computes from it are bounded by memory when the model is built
        raise UserError(f"{path}: context_length {context} is beyond what lmforge supports ({MAX_CONTEXT})")
    head_dim = num("attention.key_length", d_model // n_heads or None)
    for key, want in (("attention.value_length", head_dim), ("rope.dimension_count", head_dim)):
        got = num(key, want)
        if got != want:
            raise UserError(f"{path}: {p + key} = {got} differs from the head size {want}; lmforge needs them equal")
    if n_layers * 9 > len(tensors):  # each layer has at least 9 tensors: refuse before looping over layers
        raise UserError(f"{path}: block_count {n_layers} but only {len(tensors)} tensors (truncated or corrupted GGUF?)")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: tensor 'token_embd.weight' is missing")
    router = tensors.get("blk.0.ffn_gate_inp.weight")
    if experts and (router is None or router.shape != (experts["n_experts"], d_model)):
        # the expert count is backed by the router's bytes before any loop over experts runs
        raise UserError(f"{path}: {p}expert_count is {experts['n_experts']} but tensor 'blk.0.ffn_gate_inp.weight' "
                        f"(the router) has shape {list(router.shape) if router is not None else 'none'}, expected "
                        f"[{experts['n_experts']}, {d_model}]")
    kwargs = dict(
        vocab_size=tensors["token_embd.weight"].shape[0], context_length=context, d_model=d_model,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff,
        norm="rmsnorm", norm_eps=meta(path, metadata, p + "attention.layer_norm_rms_epsilon", "float"),
        mlp="swiglu", positions="rope", rope_theta=meta(path, metadata, p + "rope.freq_base", "float", 10000.0),
        rope_scaling=_linear_rope_scaling(path, metadata, p), tie_embeddings="output.weight" not in tensors,
        name=meta(path, metadata, "general.name", "str", arch), qk_norm=arch in ("qwen3", "qwen3moe"),
        **_bias_flags(path, tensors, arch), **experts,
    )
    try:
        cfg = ModelConfig(**kwargs)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if hf_architecture(cfg) not in _HF_CLASSES[arch]:
        raise UserError(f"{path}: this combination of bias tensors matches no {arch} model")
    return cfg


def _experts(path: str, metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    """n_experts, experts_per_token and norm_topk_prob of a mixture of experts (nothing for a dense model),
    each count checked against the other before anything is built from them."""
    p = f"{arch}."
    count = meta(path, metadata, p + "expert_count", "int", 0)
    used = meta(path, metadata, p + "expert_used_count", "int", 0)
    if count < 0 or used < 0:
        raise UserError(f"{path}: {p}expert_count ({count}) and {p}expert_used_count ({used}) must not be negative")
    if not count:
        if arch == "qwen3moe":
            raise UserError(f"{path}: metadata {p + 'expert_count'!r} is missing or 0; a qwen3moe model has experts")
        if used:
            raise UserError(f"{path}: {p}expert_used_count is {used} but the model has no experts (expert_count 0)")
        return {}
    if arch not in ("llama", "qwen3moe"):
        raise UserError(f"{path}: experts in a {arch} model are not supported (Mixtral is llama, Qwen3-MoE qwen3moe)")
    if not 1 <= used <= count:
        raise UserError(f"{path}: {p}expert_used_count is {used}; it must be between 1 and expert_count ({count})")
    renorm = meta(path, metadata, p + "expert_weights_norm", "bool", True)
    if arch == "llama" and not renorm:  # transformers' Mixtral renormalises too: no class computes it
        raise UserError(f"{path}: {p}expert_weights_norm is false; llama.cpp's llama architecture always "
                        f"renormalises the chosen experts' weights, and lmforge runs Mixtral as it does")
    return {"n_experts": count, "experts_per_token": used, "norm_topk_prob": renorm}


def _expert_width(path: str, metadata: dict[str, Any], arch: str, experts: dict[str, Any]) -> int | None:
    """qwen3moe's expert width: expert_feed_forward_length, else feed_forward_length / expert_used_count as
    llama.cpp computes it (feed_forward_length is the width of dense layers there). None elsewhere: a
    `llama` file's experts are feed_forward_length wide."""
    if arch != "qwen3moe":
        return None
    key = "qwen3moe.expert_feed_forward_length"
    width = meta(path, metadata, key, "int", None)
    if width is None:
        width = meta(path, metadata, "qwen3moe.feed_forward_length", "int") // experts["experts_per_token"]
    if width <= 0:
        raise UserError(f"{path}: the experts' width ({key}, else feed_forward_length / expert_used_count) must "
                        f"be positive, got {width}")
    return width


def _bias_flags(path: str, tensors: dict[str, GGUFTensorInfo], arch: str) -> dict[str, bool]:
    """Biases are told by the tensors of block 0: q/k/v only (Qwen2), q/k/v/o (attention_bias: Llama, Qwen3), MLP."""
    has = {k: f"blk.0.{k}.bias" in tensors for k in ("attn_q", "attn_output", "ffn_up")}
    if arch == "qwen2" and not has["attn_q"]:
        raise UserError(f"{path}: tensor 'blk.0.attn_q.bias' is missing (qwen2 has q/k/v biases)")
    return {"qkv_bias": has["attn_q"] and not has["attn_output"], "attention_bias": has["attn_output"],
            "mlp_bias": has["ffn_up"]}


def _linear_rope_scaling(path: str, metadata: dict[str, Any], p: str) -> dict[str, Any] | None:
    kind = meta(path, metadata, p + "rope.scaling.type", "str", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise UserError(f"{path}: rope scaling {short(kind)} is not supported (only linear, and Llama-3's rope_freqs)")
    factor = meta(path, metadata, p + "rope.scaling.factor", "float")
    if not factor > 0:
        raise UserError(f"{path}: rope.scaling.factor must be positive, got {factor}")
    return {"type": "linear", "factor": factor}


def _base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    D = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs.weight` for Llama-3 rope scaling: per frequency,
    the divisor that turns the unscaled inverse frequency into the scaled one (1 = untouched)."""
    from lmforge.model.gpt import rope_frequencies

    scaled = rope_frequencies(cfg).double().numpy()
    return (_base_inv_freq(cfg) / scaled).astype(np.float32)


def _llama3_scaling_from_factors(path: str, cfg: ModelConfig, factors: np.ndarray, orig: int | None) -> dict[str, Any]:
    """Recover {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} from the
    per-frequency divisors, then verify that they reproduce every divisor (else refuse).

    The divisors only pin the two boundary wavelengths orig/low and orig/high, so `orig` comes from the
    file's rope.scaling.original_context_length (or 8192, Llama 3's). Between the boundaries,
    1/f = (1 - s)/factor + s with s linear in 1/wavelength: two such points fix both boundaries.
    """
    orig = orig or 8192
    factor = float(factors.max())
    wavelen = 2 * math.pi / _base_inv_freq(cfg)
    s = (1.0 / factors.astype(np.float64) - 1.0 / factor) / (1.0 - 1.0 / factor) if factor > 1 else None
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    low, high = 1.0, 4.0  # Llama 3's, when the divisors don't pin them
    if s is not None and mid.sum() >= 2:
        slope, icept = np.polyfit(1.0 / wavelen[mid], s[mid], 1)
        if slope > 0 and icept < 0:
            low, high = orig * (-icept / slope), orig * ((1 - icept) / slope)
            low, high = float(f"{low:.6g}"), float(f"{high:.6g}")
    scaling = {"type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": orig}
    try:
        rebuilt = llama3_rope_factors(cfg.replace(rope_scaling=scaling))
    except (UserError, ValueError, ZeroDivisionError):
        rebuilt = None
    if rebuilt is None or not np.allclose(rebuilt, factors, rtol=1e-4, atol=0):
        raise UserError(f"{path}: rope_freqs.weight holds per-frequency rope factors that are not Llama-3 rope "
                        f"scaling; lmforge cannot run them")
    return scaling


def with_llama3_rope(path: str, cfg: ModelConfig, arch: str, metadata: dict[str, Any], data: np.ndarray,
                      info: GGUFTensorInfo) -> ModelConfig:
    if arch != "llama":
        raise UserError(f"{path}: rope_freqs.weight in a {arch} model is not supported")
    if cfg.rope_scaling is not None:
        raise UserError(f"{path}: both rope.scaling.type and rope_freqs.weight are set; lmforge cannot combine them")
    if info.shape != (cfg.head_dim // 2,):
        raise UserError(f"{path}: tensor 'rope_freqs.weight' has shape {list(info.shape)}, expected [{cfg.head_dim // 2}]")
    factors = dequantize(path, data, info).astype(np.float64)
    if not np.all(np.isfinite(factors)) or not np.all(factors >= 1 - 1e-6):
        raise UserError(f"{path}: rope_freqs.weight holds factors below 1 or not finite; lmforge cannot run them")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return cfg
    orig = meta(path, metadata, f"{arch}.rope.scaling.original_context_length", "int", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # polyfit's RankWarning on degenerate factors: verified below anyway
            scaling = _llama3_scaling_from_factors(path, cfg, factors, orig)
    except UserError:
        raise
    except Exception:  # any numerical failure on hostile factors is the same refusal
        scaling = None
    if scaling is None:
        raise UserError(f"{path}: rope_freqs.weight holds per-frequency rope factors that are not Llama-3 rope "
                        f"scaling; lmforge cannot run them")
    return cfg.replace(rope_scaling=scaling)


# ---------------------------------------------------------------------------------------------------
# Config to metadata (export)
# ---------------------------------------------------------------------------------------------------
def export_arch(cfg: ModelConfig) -> str:
    """'llama', 'qwen2', 'qwen3' or 'qwen3moe' for the configs llama.cpp runs as such (Mixtral is 'llama' with
    experts); a UserError for the rest."""
    hf = hf_architecture(cfg)
    if cfg.n_experts and hf not in (MIXTRAL, QWEN3_MOE):
        raise UserError("GGUF export of a mixture of experts needs Mixtral's or Qwen3-MoE's shape (rmsnorm, "
                        "swiglu, rope; no biases but Qwen3-MoE's attention ones); export this one with --format hf")
    if not cfg.n_experts and not is_llama_shaped(cfg):
        raise UserError("GGUF export supports Llama- and Qwen2-shaped models (rmsnorm, swiglu, rope); this model "
                        f"has norm={cfg.norm}, mlp={cfg.mlp}, positions={cfg.positions}")
    arch = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", QWEN3_MOE: "qwen3moe"}.get(hf, "llama")
    kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    if arch != "llama" and kind == "llama3":
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no Llama-3 rope scaling")
    if arch in ("qwen3", "qwen3moe") and cfg.attention_bias:  # llama.cpp loads q/k/v biases but no o_proj bias
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no output-projection bias (attention_bias)")
    if arch == "qwen3moe" and not cfg.norm_topk_prob:
        raise UserError("GGUF export: llama.cpp's qwen3moe architecture always renormalises the chosen experts' "
                        "weights; this model has norm_topk_prob false (export it with --format hf)")
    return arch


def add_hparams(w: Any, cfg: ModelConfig, name: str) -> None:
    """{arch}.* hyperparameters under the keys llama.cpp reads."""
    gguf = gguf_package()
    w.add_type("model")
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.d_model or cfg.qk_norm:  # qwen3: always, as llama.cpp's converter
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        if cfg.qk_norm:  # qwen3moe: the experts' width has a key of its own (feed_forward_length is dense layers')
            w.add_expert_feed_forward_length(cfg.d_ff)
            w.add_expert_weights_norm(cfg.norm_topk_prob)
    sc = cfg.rope_scaling or {}
    kind = sc.get("type", sc.get("rope_type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    elif kind == "llama3":  # the factors themselves travel as rope_freqs.weight
        w.add_rope_scaling_orig_ctx_len(int(sc.get("original_max_position_embeddings", 8192)))
