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

Gemma 2 / 3 as llama.cpp runs them (`gemma2`, `gemma3`): GGUF carries the window and which layers slide
(`attention.sliding_window_pattern`; without it llama.cpp makes every 2nd / 6th layer global), gemma3's local
RoPE base (`rope.freq_base_swa`, 10000 without it; only its global layers are rope-scaled), gemma2's soft caps
(50 / 30 without them; it always caps and always ties the output to token_embd), but no
query_pre_attn_scalar: llama.cpp derives the attention scale from the shape (`gemma_attn_scale`). Import
sets it the same way; export refuses a model with another scale, which llama.cpp would run differently.

Phi-3 (`phi3`): a partial rotation is rope.dimension_count below the head size; LongRoPE's divisors are the
tensors rope_factors_long / rope_factors_short (`with_longrope`, like Llama-3's rope_freqs read once the
config is built) with rope.scaling.original_context_length and attn_factor. A phi3 file with neither is the
Llama (or Mistral) that Phi-4 and Phi-3-mini-4k are, read from the fused layout. Its window key is honoured
on import, as transformers computes the model, though llama.cpp's phi3 graph ignores it.

A module of its own because deciding what model a file describes is separate from reading its weights:
`describe_gguf` (`lmforge list/show`) needs only this and the header, never the tensor data (bar the tiny
`rope_freqs.weight`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from lmforge.config import MAX_CONTEXT, ModelConfig, is_int
from lmforge.errors import UserError
from lmforge.loaders.gguf.reader import GGUFTensorInfo, dequantize, gguf_package, meta, short
from lmforge.loaders.gguf.names import ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, ROPE_FREQS
from lmforge.loaders.hf import GEMMA2, GEMMA3, MIXTRAL, PHI3, QWEN3_MOE, hf_architecture, is_llama_shaped
from lmforge.model.rope import LONGROPE, inverse_frequencies


SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
GEMMA_ARCHS = ("gemma2", "gemma3")
FUSED_ARCHS = ("phi3",)  # q|k|v in one attn_qkv, gate|up in one ffn_up
# The transformers class each architecture's configs must map to (a qwen3 file is Qwen3 by its name alone:
# its per-head q/k norms are what `qk_norm` says, and the tensor check then demands them; `llama` with experts
# is Mixtral).
_LLAMA_OR_QWEN2 = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_HF_CLASSES = {"llama": (*_LLAMA_OR_QWEN2, MIXTRAL), "qwen2": _LLAMA_OR_QWEN2, "qwen3": ("Qwen3ForCausalLM",),
               "qwen3moe": (QWEN3_MOE,), "gemma2": (GEMMA2,), "gemma3": (GEMMA3,),
               # Phi-3 with a partial rotation or LongRoPE; without either it is Llama (or Mistral) in Phi-3's layout
               "phi3": (PHI3, "LlamaForCausalLM", "MistralForCausalLM")}


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
        if got != want and not (arch == "phi3" and key == "rope.dimension_count" and got < want):
            raise UserError(f"{path}: {p + key} = {got} differs from the head size {want}; lmforge needs them equal")
    rotated = num("rope.dimension_count", head_dim)
    # each layer has at least 9 tensors (6 fused): refuse before looping over layers
    if n_layers * (6 if arch in FUSED_ARCHS else 9) > len(tensors):
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
        name=meta(path, metadata, "general.name", "str", arch), qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        **_bias_flags(path, tensors, arch), **experts,
    )
    if arch in GEMMA_ARCHS:
        kwargs.update(_gemma_hparams(path, metadata, arch, kwargs))
    if arch == "phi3":  # a partial rotation; a window in every layer (honoured, though llama.cpp ignores it)
        window = meta(path, metadata, p + "attention.sliding_window", "int", 0)
        # hf_class: a Phi-3 stays one on export to Hugging Face and in LoRA names, even where Llama computes it
        kwargs.update(rope_dim=rotated if rotated != head_dim else None, sliding_window=window or None, hf_class=PHI3)
    try:
        cfg = ModelConfig(**kwargs)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if hf_architecture(cfg) not in _HF_CLASSES[arch]:
        if arch in ("llama", "qwen2", "qwen3", "qwen3moe"):
            raise UserError(f"{path}: this combination of bias tensors matches no {arch} model")
        raise UserError(f"{path}: these {arch} hyperparameters (rotation, window, soft caps) match no {arch} model "
                        f"transformers computes")
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
    """Biases are told by the tensors of block 0: q/k/v only (Qwen2), q/k/v/o (attention_bias: Llama, Qwen3), MLP.
    Gemma has none (llama.cpp's gemma graphs add none; a bias tensor is then an unexpected one)."""
    if arch in (*GEMMA_ARCHS, *FUSED_ARCHS):
        return {"qkv_bias": False, "attention_bias": False, "mlp_bias": False}
    has = {k: f"blk.0.{k}.bias" in tensors for k in ("attn_q", "attn_output", "ffn_up")}
    if arch == "qwen2" and not has["attn_q"]:
        raise UserError(f"{path}: tensor 'blk.0.attn_q.bias' is missing (qwen2 has q/k/v biases)")
    return {"qkv_bias": has["attn_q"] and not has["attn_output"], "attention_bias": has["attn_output"],
            "mlp_bias": has["ffn_up"]}


# ---------------------------------------------------------------------------------------------------
# Gemma 2 / Gemma 3: what llama.cpp reads (src/models/gemma2.cpp, gemma3.cpp) and assumes without a key
# ---------------------------------------------------------------------------------------------------
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # without attention.sliding_window_pattern: every 2nd / 6th layer global
_GEMMA2_WINDOW, _GEMMA2_ATTN_CAP, _GEMMA2_FINAL_CAP = 4096, 50.0, 30.0  # gemma2 without the keys
_GEMMA3_LOCAL_THETA = 10000.0  # gemma3's sliding layers without rope.freq_base_swa (llama-hparams.h)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_attn_scale(arch: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> float:
    """The query scale llama.cpp uses: GGUF has no query_pre_attn_scalar, so llama.cpp derives it from the
    model's size, as gemma_pytorch does: 1/sqrt(d_model / n_heads) (integer division) for the 27B models,
    which it tells by their layer count (46 for gemma2, 62 for gemma3), 1/sqrt(head_dim) for every other."""
    return (d_model // n_heads if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim) ** -0.5


def swa_pattern_layers(n: int, n_layers: int) -> list[bool]:
    """llama.cpp's integer sliding_window_pattern n: layer i slides unless it is the last of each group of n
    (n = 0: every layer slides; n = 1: none)."""
    return [n == 0 or i % n < n - 1 for i in range(n_layers)]


def _gemma_sliding(path: str, metadata: dict[str, Any], arch: str, n_layers: int) -> dict[str, Any]:
    """sliding_window and sliding_layers as llama.cpp runs them: gemma2 always has a window (4096 without
    the key), gemma3 one only where attention.sliding_window is above 0; the layers from
    attention.sliding_window_pattern (one bool per layer, or llama.cpp's integer pattern), else the arch's default."""
    p = f"{arch}.attention."
    window = meta(path, metadata, p + "sliding_window", "int", _GEMMA2_WINDOW if arch == "gemma2" else 0)
    if window <= 0:
        if arch == "gemma2":  # llama.cpp would then mask every key of the sliding layers
            raise UserError(f"{path}: {p}sliding_window must be positive, got {window}")
        return {"sliding_window": None, "sliding_layers": None}
    pattern = metadata.get(p + "sliding_window_pattern", _SWA_PATTERN[arch])
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(b, bool) for b in pattern):
            raise UserError(f"{path}: {p}sliding_window_pattern must hold one true/false per layer ({n_layers}), "
                            f"got {len(pattern)} values")
        slides = pattern
    elif is_int(pattern) and pattern >= 0:
        slides = swa_pattern_layers(pattern, n_layers)
    else:
        raise UserError(f"{path}: {p}sliding_window_pattern must be an integer >= 0 or a list of booleans, "
                        f"got {short(pattern)}")
    layers = [i for i, s in enumerate(slides) if s]
    if not layers:
        return {"sliding_window": None, "sliding_layers": None}
    return {"sliding_window": window, "sliding_layers": None if len(layers) == n_layers else layers}


def _gemma_hparams(path: str, metadata: dict[str, Any], arch: str, base: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields that make a Gemma: (1 + w) norms, post-norms, scaled embeddings, GeGLU, the
    attention scale llama.cpp derives, soft caps, sliding layers and their RoPE base."""
    p = f"{arch}."

    def cap(key: str, default: float | None) -> float | None:
        v = meta(path, metadata, p + key, "float", default)
        if v is not None and v < 0:
            raise UserError(f"{path}: metadata {p + key!r} must not be negative, got {v}")
        return v or None  # llama.cpp's gemma3 skips a cap of 0

    swa_theta = meta(path, metadata, p + "rope.freq_base_swa", "float", None)
    if swa_theta is not None and not swa_theta > 0:
        raise UserError(f"{path}: metadata {p + 'rope.freq_base_swa'!r} must be positive, got {swa_theta}")
    if arch == "gemma2":
        if swa_theta is not None and swa_theta != base["rope_theta"]:
            raise UserError(f"{path}: gemma2 with rope.freq_base_swa ({swa_theta}) unlike rope.freq_base "
                            f"({base['rope_theta']}) is not supported (no Gemma 2 has a local RoPE base of its own)")
        local_theta, caps = None, (cap("attn_logit_softcapping", _GEMMA2_ATTN_CAP),
                                   cap("final_logit_softcapping", _GEMMA2_FINAL_CAP))
        if None in caps:
            raise UserError(f"{path}: gemma2 logit soft-capping of 0 is not supported (llama.cpp divides by it)")
    else:
        local_theta, caps = swa_theta or _GEMMA3_LOCAL_THETA, (None, cap("final_logit_softcapping", None))
    return dict(
        norm_offset=True, post_norms=True, embed_scale=True, mlp="geglu", attn_softcap=caps[0], final_softcap=caps[1],
        attn_scale=gemma_attn_scale(arch, base["n_layers"], base["d_model"], base["n_heads"], base["head_dim"]),
        rope_local_theta=local_theta, **_gemma_sliding(path, metadata, arch, base["n_layers"]),
        # llama.cpp's gemma2 always computes the output from token_embd (an output.weight is then unexpected)
        tie_embeddings=True if arch == "gemma2" else base["tie_embeddings"],
    )


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


def with_longrope(path: str, cfg: ModelConfig, arch: str, metadata: dict[str, Any], data: np.ndarray,
                  tensors: dict[str, GGUFTensorInfo]) -> ModelConfig:
    """Phi-3's LongRoPE from `rope_factors_long` / `rope_factors_short` (one divisor per rotated frequency),
    rope.scaling.original_context_length and rope.scaling.attn_factor (which multiplies cos and sin, as
    transformers' attention_factor does). The factor is the stretch from the original context to the file's,
    as transformers derives it; an attention factor other than the one that factor implies is kept explicitly."""
    if arch != "phi3":
        raise UserError(f"{path}: LongRoPE factors (rope_factors_long/short) in a {arch} model are not supported")
    if cfg.rope_scaling is not None:
        raise UserError(f"{path}: both rope.scaling.type and LongRoPE factors are set; lmforge cannot combine them")
    half = (cfg.rope_dim or cfg.head_dim) // 2
    lists = {}
    for key, name in (("long_factor", ROPE_FACTORS_LONG), ("short_factor", ROPE_FACTORS_SHORT)):
        info = tensors.get(name)
        if info is None or info.shape != (half,):
            raise UserError(f"{path}: tensor {name!r} has shape {list(info.shape) if info else 'none'}, expected [{half}]")
        values = dequantize(path, data, info).astype(np.float64)
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise UserError(f"{path}: {name} holds factors that are not positive finite numbers")
        lists[key] = [float(v) for v in values]
    p = f"{arch}.rope.scaling."
    orig = meta(path, metadata, p + "original_context_length", "int", cfg.context_length)
    attention = meta(path, metadata, p + "attn_factor", "float", 1.0)
    if orig <= 0 or not attention > 0:
        raise UserError(f"{path}: {p}original_context_length ({orig}) and attn_factor ({attention}) must be positive")
    scaling = {"type": "longrope", **lists, "original_max_position_embeddings": orig, "factor": cfg.context_length / orig}
    implied = inverse_frequencies(2 * half, cfg.rope_theta, scaling, cfg.context_length)[1]
    if not math.isclose(attention, implied, rel_tol=1e-6):
        scaling["attention_factor"] = attention
    try:
        return cfg.replace(rope_scaling=scaling)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


ROPE_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)


def with_rope_tensors(path: str, cfg: ModelConfig, arch: str, metadata: dict[str, Any], data: np.ndarray | None,
                      tensors: dict[str, GGUFTensorInfo]) -> ModelConfig:
    """Rope scaling that a file keeps in tensors: Llama-3's rope_freqs, Phi-3's LongRoPE factors (`data`, the
    mapped file, is needed only when it has some of ROPE_TENSORS)."""
    if ROPE_FREQS in tensors:
        cfg = with_llama3_rope(path, cfg, arch, metadata, data, tensors[ROPE_FREQS])
    if ROPE_FACTORS_LONG in tensors or ROPE_FACTORS_SHORT in tensors:
        cfg = with_longrope(path, cfg, arch, metadata, data, tensors)
    elif meta(path, metadata, f"{arch}.rope.scaling.attn_factor", "float", 1.0) != 1.0:
        # llama.cpp multiplies every rotation by it, in any arch; lmforge only as LongRoPE's attention factor
        raise UserError(f"{path}: {arch}.rope.scaling.attn_factor without LongRoPE factors is not supported")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Config to metadata (export)
# ---------------------------------------------------------------------------------------------------
def export_arch(cfg: ModelConfig) -> str:
    """'llama', 'qwen2', 'qwen3', 'qwen3moe', 'gemma2', 'gemma3' or 'phi3' for the configs llama.cpp runs as such
    (Mixtral is 'llama' with experts; a Phi-3 that Llama computes and that came from no Phi-3 file, 'llama');
    a UserError for the rest."""
    hf, kind = hf_architecture(cfg), scaling_kind(cfg)
    if hf == PHI3:  # a partial rotation or LongRoPE (is_phi3_shaped admits no other scaling)
        return "phi3"
    if kind not in (None, "linear", "llama3"):
        raise UserError(f"GGUF export: rope scaling {short(kind)} is not supported (linear and Llama-3 are); "
                        f"export this model with --format hf")
    if hf in (GEMMA2, GEMMA3):
        return _gemma_export_arch(cfg, "gemma2" if hf == GEMMA2 else "gemma3", kind)
    if cfg.n_experts and hf not in (MIXTRAL, QWEN3_MOE):
        raise UserError("GGUF export of a mixture of experts needs Mixtral's or Qwen3-MoE's shape (rmsnorm, "
                        "swiglu, rope; no biases but Qwen3-MoE's attention ones); export this one with --format hf")
    if not cfg.n_experts and not is_llama_shaped(cfg):
        raise UserError("GGUF export supports Llama- and Qwen2-shaped models (rmsnorm, swiglu, rope), Mixtral, "
                        f"Qwen3-MoE, Gemma 2 and Gemma 3; this model has norm={cfg.norm}, mlp={cfg.mlp}, "
                        f"positions={cfg.positions}")
    arch = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", QWEN3_MOE: "qwen3moe"}.get(hf, "llama")
    if arch != "llama" and kind == "llama3":
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no Llama-3 rope scaling")
    if arch in ("qwen3", "qwen3moe") and cfg.attention_bias:  # llama.cpp loads q/k/v biases but no o_proj bias
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no output-projection bias (attention_bias)")
    if arch == "qwen3moe" and not cfg.norm_topk_prob:
        raise UserError("GGUF export: llama.cpp's qwen3moe architecture always renormalises the chosen experts' "
                        "weights; this model has norm_topk_prob false (export it with --format hf)")
    return arch


def _gemma_export_arch(cfg: ModelConfig, arch: str, rope_kind: str | None) -> str:
    """Refuse the Gemmas llama.cpp would run differently: it derives the attention scale (`gemma_attn_scale`),
    has no attention biases, and gemma2 always soft-caps, always ties the output to token_embd and rotates
    every layer alike."""
    ours = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
    theirs = gemma_attn_scale(arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim)
    if not math.isclose(ours, theirs, rel_tol=1e-6):
        raise UserError(f"GGUF export: llama.cpp's {arch} scales queries by {theirs:.6g} for this shape (GGUF has no "
                        f"query_pre_attn_scalar), this model by {ours:.6g}; export it with --format hf")
    if cfg.attention_bias:
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no attention biases")
    if rope_kind not in (None, "linear"):
        raise UserError(f"GGUF export: llama.cpp's {arch} architecture has no {rope_kind} rope scaling")
    if arch == "gemma2":
        if cfg.attn_softcap is None or cfg.final_softcap is None:
            raise UserError("GGUF export: llama.cpp's gemma2 always soft-caps attention scores and logits; this model "
                            "leaves one uncapped (export it with --format hf)")
        if not cfg.tie_embeddings:
            raise UserError("GGUF export: llama.cpp's gemma2 computes the output from the token embeddings; this "
                            "model has an output projection of its own (export it with --format hf)")
    elif cfg.attn_softcap is not None:
        raise UserError("GGUF export: llama.cpp's gemma3 has no attention soft-capping (attn_softcap)")
    return arch


def _add_gemma_hparams(w: Any, cfg: ModelConfig, arch: str) -> None:
    """Window, layer pattern (llama.cpp's integer form where one gives the same layers, else one bool per
    layer), local RoPE base and soft caps, every one written even where llama.cpp's default would do."""
    slides = [cfg.slides(i) for i in range(cfg.n_layers)]
    if not any(slides):  # gemma2 always has sliding layers in llama.cpp: none slide, and the window is moot
        if arch == "gemma2":
            w.add_sliding_window(cfg.context_length)
            w.add_sliding_window_pattern(1)
    else:
        w.add_sliding_window(cfg.sliding_window)
        n = next((n for n in (_SWA_PATTERN[arch], 0, *range(1, cfg.n_layers + 1))
                  if swa_pattern_layers(n, cfg.n_layers) == slides), None)
        w.add_sliding_window_pattern(n if n is not None else slides)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta)
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_softcap)


def _add_phi3_hparams(w: Any, cfg: ModelConfig) -> None:
    """`phi3`'s window key (0 for none, as llama.cpp's converter writes it; llama.cpp's phi3 graph ignores it,
    hence the context made the window, see `add_hparams`) and LongRoPE's numbers: the original context, past
    which llama.cpp's context picks the long factors, and the attention factor computed from the model's own
    (unshortened) context. No rope.scaling.type, as the converter: the factors are tensors
    (`write.py`)."""
    w.add_sliding_window(cfg.sliding_window or 0)
    if scaling_kind(cfg) in LONGROPE:
        sc = cfg.rope_scaling
        w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
        w.add_rope_scaling_attn_factors(inverse_frequencies(cfg.rope_dim or cfg.head_dim, cfg.rope_theta, sc,
                                                            cfg.context_length)[1])


def scaling_kind(cfg: ModelConfig) -> str | None:
    sc = cfg.rope_scaling or {}
    return sc.get("type", sc.get("rope_type"))


def add_hparams(w: Any, cfg: ModelConfig, name: str) -> None:
    """{arch}.* hyperparameters under the keys llama.cpp reads.

    A sliding window in llama / qwen2 / qwen3 / qwen3moe / phi3: llama.cpp's graphs for these archs read no
    window key (phi3's reads one and ignores it) and attend over the whole context. Within the window, sliding-window attention IS full attention, so
    such a model (Mistral's 4096, a Qwen2 with use_sliding_window) is written with context_length = its
    window (when that is shorter): exact up to that length, where llama.cpp stops (or warns, if asked for a
    longer context); read back, it is a model without a window whose context is the window."""
    gguf = gguf_package()
    arch = w.arch
    w.add_type("model")
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    window = cfg.sliding_window if arch not in GEMMA_ARCHS and any(map(cfg.slides, range(cfg.n_layers))) else None
    w.add_context_length(min(cfg.context_length, window or cfg.context_length))
    if arch == "phi3":
        _add_phi3_hparams(w, cfg)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rope_dim or cfg.head_dim)
    if arch in GEMMA_ARCHS:
        _add_gemma_hparams(w, cfg, arch)
    if cfg.head_dim * cfg.n_heads != cfg.d_model or cfg.qk_norm or arch in GEMMA_ARCHS:  # as llama.cpp's converter
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
