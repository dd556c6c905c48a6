"""Which GGML type each tensor of a model gets for a file type ("q4_k_m" -> attn_v Q6_K in some layers, ...).

A file type names a *mix*, not one type: quantizing every tensor to the base type would cost much more
quality than the few tensors that are most sensitive are worth in bytes. These are llama.cpp's rules
(`llama_tensor_get_type` in src/llama-quant.cpp of the llama.cpp bundled with llama-cpp-python 0.3.36),
restated for the tensors our models have, so that a file we write has the types llama.cpp's own
`llama-quantize` would give it and sizes and quality compare like for like:

* Only matrices whose name ends in "weight" are quantized; vectors (norms, biases, rope_freqs) stay F32, and
  so does a mixture of experts' router (ffn_gate_inp.weight), which llama-quantize never quantizes.
* `f32` / `f16`: every matrix F32 / F16.
* Base types: q8_0 -> Q8_0, q4_0 -> Q4_0, q4_k_m -> Q4_K, q5_k_m -> Q5_K, q6_k -> Q6_K.
* output.weight -- and token_embd.weight when the embeddings are tied (no output.weight), since it is
  then also the output projection -- gets Q6_K, except that it stays Q8_0 for q8_0, and becomes Q8_0
  when its rows are not a whole number of the base type's blocks. (So a q4_0 file has a Q6_K output.)
* token_embd.weight of an untied model: the base type.
* q4_k_m and q5_k_m ("_M": medium): attn_v.weight and ffn_down.weight (ffn_down_exps.weight, all of a
  layer's experts stacked, alike) of layer i among n get Q6_K when
  "use_more_bits(i, n)": i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2 (integer division) -- the first
  and last eighth of the layers and every third layer in between. The other tensors keep the base type.
* q4_k_m and q5_k_m: a fused attn_qkv.weight (`phi3`) gets Q5_K / Q6_K in every layer, as llama-quantize's
  ATTENTION_QKV rule gives it.
* A mixture of exactly 8 experts (Mixtral-8x7B: the expert count read from ffn_gate_exps' first dimension):
  attn_k.weight and attn_v.weight get Q8_0 in every quantized mix ("trades just ~128MB", says llama.cpp),
  and attn_output.weight Q5_K in q4_k_m.
* Fallback for row lengths the chosen type cannot split into blocks (K-quants need 256-value rows):
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (32-value blocks, about the same bits per value); a row that
  still does not split (not a multiple of 32) is written F16. A 32-value type that does not fit goes
  straight to F16.

Everything here is a pure function of tensor names and shapes (no weights needed), so the mix can be shown,
tested and counted before any work is done.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from lmforge.errors import UserError

# file type -> (base GGML type, gguf.LlamaFileType member written as general.file_type)
_FTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
FTYPES = tuple(_FTYPES)
QUANTIZED_FTYPES = tuple(f for f in FTYPES if f not in ("f32", "f16"))

_BLOCK = {"F32": 1, "F16": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")

# A rough order of precision, to tell "lower" from "higher" types when re-quantizing (bits per value).
BITS_PER_VALUE = {"F32": 32.0, "BF16": 16.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K": 5.5,
                  "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q4_0": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}


def check_ftype(ftype: str) -> str:
    """The file type in canonical form ("Q4_K_M" -> "q4_k_m"); a one-line UserError listing the known ones."""
    f = str(ftype).strip().lower()
    if f not in _FTYPES:
        raise UserError(f"unknown quantization type {ftype!r}; choose one of {', '.join(FTYPES)}")
    return f


def base_type(ftype: str) -> str:
    """The GGML type most tensors of `ftype` get ("q4_k_m" -> "Q4_K")."""
    return _FTYPES[check_ftype(ftype)][0]


def file_type_name(ftype: str) -> str:
    """The `gguf.LlamaFileType` member name of `ftype` ("q4_k_m" -> "MOSTLY_Q4_K_M"), for general.file_type."""
    return _FTYPES[check_ftype(ftype)][1]


def display_name(ftype: str) -> str:
    """How llama.cpp and Ollama print the file type: "Q4_K_M", "Q8_0", "F16"."""
    return check_ftype(ftype).upper()


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in the _M mixes: the first
    and last eighth, and every third layer in between (C integer division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fits(qtype: str, row: int) -> bool:
    return row % _BLOCK[qtype] == 0


def _fallback(qtype: str, row: int) -> str:
    """llama.cpp's fallback for a row the type cannot split into blocks."""
    if _fits(qtype, row):
        return qtype
    smaller = _FALLBACK.get(qtype, qtype)
    return smaller if _fits(smaller, row) else "F16"


def tensor_types(shapes: Mapping[str, Sequence[int]], ftype: str) -> dict[str, str]:
    """{GGUF tensor name: GGML type name} for every tensor in `shapes` (GGUF names -> numpy/PyTorch shapes,
    the last dimension being the row) under file type `ftype`, by the rules in this module's docstring."""
    ftype = check_ftype(ftype)
    base = _FTYPES[ftype][0]
    tied = "output.weight" not in shapes
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    n_layers = max(layers) + 1 if layers else 0
    n_attn_v = sum(1 for n in shapes if n.endswith("attn_v.weight"))
    n_expert = next((int(shape[0]) for n, shape in shapes.items() if n.endswith("ffn_gate_exps.weight")), 0)
    out: dict[str, str] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or not name.endswith("weight") or name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            out[name] = "F32"
            continue
        if base in ("F32", "F16"):
            out[name] = base
            continue
        row = shape[-1]
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else -1
        t = base
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if not _fits(base, row):
                t = "Q8_0"
            elif base != "Q8_0":
                t = "Q6_K"
        elif ftype in ("q4_k_m", "q5_k_m"):
            if name.endswith("attn_v.weight") and use_more_bits(layer, n_attn_v):
                t = "Q6_K"
            elif name.endswith(("ffn_down.weight", "ffn_down_exps.weight")) and use_more_bits(layer, n_layers):
                t = "Q6_K"
            elif name.endswith("attn_qkv.weight"):  # a fused q|k|v (phi3): one step up, in every layer
                t = "Q5_K" if ftype == "q4_k_m" else "Q6_K"
        if n_expert == 8:  # llama.cpp's rules for 8-expert models (Mixtral-8x7B)
            if name.endswith(("attn_k.weight", "attn_v.weight")):
                t = "Q8_0"
            elif name.endswith("attn_output.weight") and ftype == "q4_k_m":
                t = "Q5_K"
        out[name] = _fallback(t, row)
    return out


def type_counts(types: Mapping[str, str]) -> dict[str, int]:
    """{GGML type: how many tensors}, most common first: what `lmforge quantize` records and prints."""
    return dict(Counter(types.values()).most_common())
