"""Tensor names and layouts, GGUF <-> Hugging Face: the name table, the tensor set a config implies, the
stacked expert tensors of a mixture of experts, and the `llama` rope permutation of q/k rows.

Tensor names go GGUF <-> Hugging Face <-> ours: a small explicit table here maps llama.cpp's names to
transformers' Llama/Qwen2 names (and a second one to Gemma's, where one HF name means another norm), and
`loaders/hf_tensors.py` does the rest (fused q/k/v, gate/up), so there is one place that knows our own layout.
Gemma's norm weights are w in transformers and 1 + w in GGUF (`is_offset_norm`): the writer adds 1, the
reader takes it off.

Mixtures of experts (`llama` with `expert_count` = Mixtral, `qwen3moe`): llama.cpp keeps the router as
`blk.N.ffn_gate_inp.weight` (experts x hidden) and stacks each expert matrix of a layer into one 3-D tensor,
`blk.N.ffn_{gate,up,down}_exps.weight`, numpy shape (experts, rows, cols): expert e's matrix is slice e,
contiguous in the file. Which Hugging Face tensor each slice is depends on the family (Mixtral's
`block_sparse_moe.experts.E.w1`, Qwen3-MoE's `mlp.experts.E.gate_proj`), so `moe_sources` asks
`hf_tensor_names` rather than keeping a second table. Files written before llama.cpp stacked experts hold
one 2-D tensor per expert, `blk.N.ffn_gate.E.weight`: read too, never written.

The rotary trap: llama.cpp's `llama` architecture rotates interleaved pairs (2i, 2i+1) while our model and
transformers rotate (i, i + D/2) ("rotate_half"). llama.cpp's converter therefore permutes the rows of
q_proj and k_proj (and their biases) of every head; reading undoes it, writing redoes it. The `qwen2` and
`qwen3` architectures use NEOX rope (rotate_half) in llama.cpp and are NOT permuted. The logits tests against
transformers prove both.

A module of its own because loading and writing must use the very same table and permutation (one is the
inverse of the other); it reads no file and depends on nothing but `ModelConfig` and the Hugging Face tables.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from lmforge.config import ModelConfig
from lmforge.loaders.hf_tensors import hf_tensor_names


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
# Gemma 2/3 (`gemma2`, `gemma3`): a norm before and after each sublayer. One HF name means different things in
# the two families: Gemma's post_attention_layernorm is the norm of the attention's output (llama.cpp's
# post_attention_norm), while Llama's is the norm before the MLP (ffn_norm), which Gemma calls
# pre_feedforward_layernorm.
_GEMMA_BLOCK_TO_HF = {
    **_BLOCK_TO_HF,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# (GGUF kind -> HF module, HF module -> GGUF kind), by whether the family has Gemma's post-norms
_TABLES = {gemma: (t, {v: k for k, v in t.items()}) for gemma, t in ((False, _BLOCK_TO_HF), (True, _GEMMA_BLOCK_TO_HF))}
_HF_TO_GLOBAL = {v: k for k, v in _GLOBAL_TO_HF.items()}
ROPE_FREQS = "rope_freqs.weight"
# Phi-3's LongRoPE divisors (one per rotated frequency): llama.cpp's `phi3` picks the long ones when its
# context is longer than rope.scaling.original_context_length
ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
# Where a Hugging Face tensor lives in a GGUF one: the whole tensor (None), expert e of a stacked 3-D tensor
# (an int), or rows [start, stop) of a fused 2-D one (q, k or v of `phi3`'s attn_qkv, gate or up of its ffn_up)
Part = int | tuple[int, int] | None


def _block_tables(cfg: ModelConfig | None) -> tuple[dict[str, str], dict[str, str]]:
    """llama.cpp's block tensor kind <-> the HF module under model.layers.N, for the family of `cfg`."""
    return _TABLES[cfg is not None and cfg.post_norms]


def gguf_to_hf(name: str, cfg: ModelConfig | None = None) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (Gemma's names for a `cfg` with
    post-norms); None for names not in the table."""
    base, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TO_HF:
        return f"{_GLOBAL_TO_HF[base]}.{kind}"
    parts, table = base.split("."), _block_tables(cfg)[0]
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"model.layers.{int(parts[1])}.{table[parts[2]]}.{kind}"
    return None


def hf_to_gguf(name: str, cfg: ModelConfig | None = None) -> str:
    base, _, kind = name.rpartition(".")
    if base in _HF_TO_GLOBAL:
        return f"{_HF_TO_GLOBAL[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_block_tables(cfg)[1][rest]}.{kind}"


def is_offset_norm(cfg: ModelConfig, name: str) -> bool:
    """True for a GGUF norm weight stored as 1 + w: llama.cpp's converter adds 1 to every Gemma norm (the
    q/k norms of Gemma 3 too), whose RMSNorm transformers and we compute as (1 + w)."""
    return cfg.norm_offset and name.endswith("norm.weight")


def per_expert_layout(names: Collection[str]) -> bool:
    """True for a file that holds one tensor per expert (`blk.N.ffn_down.E.weight`, before llama.cpp stacked
    them) rather than the stacked `blk.N.ffn_down_exps.weight`."""
    return "blk.0.ffn_down_exps.weight" not in names and "blk.0.ffn_down.0.weight" in names


def expected_shapes(cfg: ModelConfig, *, per_expert: bool = False, fused: bool = False) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a model of `cfg` has, with its numpy shape; the source of truth for both the
    reader's checks (missing / unexpected / wrong shape) and the writer's. `per_expert`: the old layout of
    a mixture of experts, one tensor per expert instead of the stacked ones. `fused`: `phi3`'s layout, q|k|v
    in one attn_qkv and gate|up in one ffn_up (2 x feed_forward_length rows), LongRoPE's divisors as tensors."""
    C, V, F, D, E = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.head_dim, cfg.n_experts
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, C)
    kind = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) if cfg.rope_scaling else None
    if kind == "llama3":
        shapes[ROPE_FREQS] = (D // 2,)
    if fused and kind in ("longrope", "su"):
        shapes.update({ROPE_FACTORS_LONG: ((cfg.rope_dim or D) // 2,), ROPE_FACTORS_SHORT: ((cfg.rope_dim or D) // 2,)})
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (C,), b + "ffn_norm.weight": (C,), b + "attn_output.weight": (C, q)})
        if fused:
            shapes.update({b + "attn_qkv.weight": (q + 2 * kv, C), b + "ffn_up.weight": (2 * F, C),
                           b + "ffn_down.weight": (C, F)})
            continue
        shapes.update({b + "attn_q.weight": (q, C), b + "attn_k.weight": (kv, C), b + "attn_v.weight": (kv, C)})
        if cfg.post_norms:  # Gemma: the attention's and the MLP's outputs normed before each residual add
            shapes.update({b + "post_attention_norm.weight": (C,), b + "post_ffw_norm.weight": (C,)})
        if E and per_expert:
            shapes[b + "ffn_gate_inp.weight"] = (E, C)
            for e in range(E):
                shapes.update({f"{b}ffn_gate.{e}.weight": (F, C), f"{b}ffn_up.{e}.weight": (F, C),
                               f"{b}ffn_down.{e}.weight": (C, F)})
        elif E:
            shapes.update({b + "ffn_gate_inp.weight": (E, C), b + "ffn_gate_exps.weight": (E, F, C),
                           b + "ffn_up_exps.weight": (E, F, C), b + "ffn_down_exps.weight": (E, C, F)})
        else:
            shapes.update({b + "ffn_gate.weight": (F, C), b + "ffn_up.weight": (F, C), b + "ffn_down.weight": (C, F)})
        if cfg.qkv_bias or cfg.attention_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if cfg.attention_bias:
            shapes[b + "attn_output.bias"] = (C,)
        if cfg.qk_norm:
            shapes.update({b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,)})
        if cfg.mlp_bias and not E:
            shapes.update({b + "ffn_gate.bias": (F,), b + "ffn_up.bias": (F,), b + "ffn_down.bias": (C,)})
    return shapes


def moe_sources(cfg: ModelConfig, *, per_expert: bool = False) -> dict[str, tuple[str, int | None]]:
    """Hugging Face name -> (GGUF tensor, expert slice) for the router and every expert matrix: the slice
    is the expert's index into a stacked tensor, None for a tensor that is the whole matrix (the router,
    and each expert's own tensor in the per-expert layout). Empty for a dense model."""
    out: dict[str, tuple[str, int | None]] = {}
    for i in range(cfg.n_layers if cfg.n_experts else 0):
        (router,) = hf_tensor_names(cfg, f"blocks.{i}.mlp.router.weight")
        out[router] = (f"blk.{i}.ffn_gate_inp.weight", None)
        for e in range(cfg.n_experts):
            gate, up = hf_tensor_names(cfg, f"blocks.{i}.mlp.experts.{e}.fc.weight")  # fc's rows: gate | up
            (down,) = hf_tensor_names(cfg, f"blocks.{i}.mlp.experts.{e}.proj.weight")
            for theirs, kind in ((gate, "ffn_gate"), (up, "ffn_up"), (down, "ffn_down")):
                out[theirs] = (f"blk.{i}.{kind}.{e}.weight", None) if per_expert else (f"blk.{i}.{kind}_exps.weight", e)
    return out


def fused_sources(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """`phi3`'s layout: Hugging Face name -> (attn_qkv or ffn_up, rows or None). attn_qkv's rows are q | k | v
    and ffn_up's gate | up (llama.cpp's SwiGLU activates the first half), exactly the rows of our fused
    attn.qkv and mlp.fc, so a family that keeps them fused (Phi-3) maps to the whole tensor and one that
    splits them (a Phi-3 that Llama computes) to row ranges of it."""
    from lmforge.model.gpt import projection_parts

    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for i in range(cfg.n_layers):
        for module, kind in (("attn.qkv", "attn_qkv"), ("mlp.fc", "ffn_up")):
            theirs = hf_tensor_names(cfg, f"blocks.{i}.{module}.weight")
            name = f"blk.{i}.{kind}.weight"
            if len(theirs) == 1:
                out[theirs[0]] = (name, None)
            else:
                out.update({t: (name, (start, stop)) for t, (_, start, stop) in zip(theirs, projection_parts(cfg, module))})
    return out


def hf_sources(cfg: ModelConfig, *, per_expert: bool = False, fused: bool = False) -> dict[str, tuple[str, Part]]:
    """Hugging Face name -> (GGUF tensor, part of it: see `Part`) for every tensor of a model of `cfg` (the
    dense ones by the table above, the experts by `moe_sources`, `phi3`'s fused ones by `fused_sources`);
    rope_freqs and LongRoPE's factors, which have no HF name, left out."""
    shapes = expected_shapes(cfg, per_expert=per_expert, fused=fused)
    fused_names = {f"blk.{i}.{k}.weight" for i in range(cfg.n_layers) for k in ("attn_qkv", "ffn_up")} if fused else set()
    out: dict[str, tuple[str, Part]] = {gguf_to_hf(n, cfg): (n, None) for n in shapes
                                        if gguf_to_hf(n, cfg) and n not in fused_names}
    out.update(moe_sources(cfg, per_expert=per_expert))
    if fused:
        out.update(fused_sources(cfg))
    return out


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
