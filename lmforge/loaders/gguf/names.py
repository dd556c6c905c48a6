"""Tensor names and layouts, GGUF <-> Hugging Face: the name table, the tensor set a config implies, and the
`llama` rope permutation of q/k rows.

Tensor names go GGUF <-> Hugging Face <-> ours: a small explicit table here maps llama.cpp's names to
transformers' Llama/Qwen2 names, and `loaders/hf.py` does the rest (fused q/k/v, gate/up), so there is one
place that knows our own layout.

The rotary trap: llama.cpp's `llama` architecture rotates interleaved pairs (2i, 2i+1) while our model and
transformers rotate (i, i + D/2) ("rotate_half"). llama.cpp's converter therefore permutes the rows of
q_proj and k_proj (and their biases) of every head; reading undoes it, writing redoes it. The `qwen2` and
`qwen3` architectures use NEOX rope (rotate_half) in llama.cpp and are NOT permuted. The logits tests against
transformers prove both.

A module of its own because loading and writing must use the very same table and permutation (one is the
inverse of the other); it reads no file and depends on nothing but `ModelConfig`.
"""

from __future__ import annotations

import numpy as np

from lmforge.config import ModelConfig


_GLOBAL_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_TO_BLOCK = {v: k for k, v in _BLOCK_TO_HF.items()}
_HF_TO_GLOBAL = {v: k for k, v in _GLOBAL_TO_HF.items()}
ROPE_FREQS = "rope_freqs.weight"


def gguf_to_hf(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for names not in the table."""
    base, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TO_HF:
        return f"{_GLOBAL_TO_HF[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TO_HF:
        return f"model.layers.{int(parts[1])}.{_BLOCK_TO_HF[parts[2]]}.{kind}"
    return None


def hf_to_gguf(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base in _HF_TO_GLOBAL:
        return f"{_HF_TO_GLOBAL[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_HF_TO_BLOCK[rest]}.{kind}"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a model of `cfg` has, with its numpy shape; the source of truth for both the
    reader's checks (missing / unexpected / wrong shape) and the writer's."""
    C, V, F, D = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, C)
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "llama3":
        shapes[ROPE_FREQS] = (D // 2,)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (C,), b + "ffn_norm.weight": (C,), b + "attn_q.weight": (q, C),
                       b + "attn_k.weight": (kv, C), b + "attn_v.weight": (kv, C), b + "attn_output.weight": (C, q),
                       b + "ffn_gate.weight": (F, C), b + "ffn_up.weight": (F, C), b + "ffn_down.weight": (C, F)})
        if cfg.qkv_bias or cfg.attention_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if cfg.attention_bias:
            shapes[b + "attn_output.bias"] = (C,)
        if cfg.qk_norm:
            shapes.update({b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,)})
        if cfg.mlp_bias:
            shapes.update({b + "ffn_gate.bias": (F,), b + "ffn_up.bias": (F,), b + "ffn_down.bias": (C,)})
    return shapes


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate_half) rows -> GGUF `llama` (interleaved pairs) rows, per head: within each head the
    first and second halves are interleaved, so pair (i, i + D/2) becomes rows (2i, 2i + 1)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `rope_permute`: GGUF `llama` q/k rows -> the rotate_half layout our model uses."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_heads(cfg: ModelConfig, name: str) -> int | None:
    """How many heads to (un)permute for GGUF tensor `name` in the `llama` architecture, or None."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(kind)
