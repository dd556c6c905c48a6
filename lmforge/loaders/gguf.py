"""GGUF import and export (llama.cpp's single-file format): a bounds-checked reader and a writer.

Why our own reader: `gguf.GGUFReader` trusts the counts in the file, so a hostile or damaged file can make
it allocate or loop without limit. Here every count, length and offset is checked with Python ints
against a cap and against the bytes that are left *before* anything is allocated or looped over, and each
problem is one `UserError` line naming the file. Tensor data is read through `numpy.memmap` (the file is
never copied whole) and dequantized with `gguf.quants`, llama.cpp's own Python (de)quantizers.

Tensor names go GGUF <-> Hugging Face <-> ours: a small explicit table here maps llama.cpp's names to
transformers' Llama/Qwen2 names, and `loaders/hf.py` does the rest (fused q/k/v, gate/up), so there is one
place that knows our own layout.

The rotary trap: llama.cpp's `llama` architecture rotates interleaved pairs (2i, 2i+1) while our model and
transformers rotate (i, i + D/2) ("rotate_half"). llama.cpp's converter therefore permutes the rows of
q_proj and k_proj (and their biases) of every head; reading undoes it, writing redoes it. The `qwen2`
architecture uses NEOX rope (rotate_half) in llama.cpp and is NOT permuted. The logits tests against
transformers prove both.

Supported: architectures `llama` and `qwen2` (Mistral 7B GGUFs are `llama`); rope scaling "linear" (as
KV) and Llama-3 (as llama.cpp's `rope_freqs.weight` tensor: derived back to the four llama3 numbers and
verified); tokenizers `gpt2` (byte-level BPE; pre-tokenizers llama-bpe/llama3, qwen2, gpt-2/default,
smollm) and `llama` (SentencePiece BPE, rebuilt as a byte-fallback BPE like transformers does). An unknown
pre-tokenizer name is refused rather than guessed (llama.cpp refuses it too); a missing one falls back to
GPT-2's, as llama.cpp does, with a warning. Export writes f32/f16/q8_0/q4_0.

Not supported (each refused with a clear error): other architectures (llama4, mistral3, gemma, phi3, MoE
tensors...), YaRN/LongRoPE scaling, partial rotary (rope.dimension_count < head size), split files
(`split.count` > 1: merge them with llama.cpp's gguf-split first), GGUF v1 and big-endian files, and
tensor types gguf-py cannot dequantize (I8..I64, Q8_K). Export cannot write K-quants (gguf-py has no
K-quant quantizer) or BF16.
"""

from __future__ import annotations

from collections.abc import Mapping

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.io import atomic_write
from lmforge.loaders.hf import hf_architecture, is_llama_shaped, state_dict_from_hf, state_dict_to_hf
from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer

__all__ = [
    "GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFModel",
    "GGUFTensorInfo",
    "describe_file_type",
    "read_gguf",
    "read_gguf_header",
    "write_gguf",
]

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # what write_gguf accepts
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Caps. Real files stay far below each one; a hostile file that claims more is refused before we allocate.
_MAX_KV = 1 << 16  # metadata pairs (real files: ~50)
_MAX_TENSORS = 1 << 20  # tensors (the largest MoE files: a few thousand)
_MAX_KEY_BYTES = 1 << 16
_MAX_STRING_BYTES = 1 << 26  # 64 MiB: chat templates are kilobytes
_MAX_NAME_BYTES = 256  # ggml itself allows 63
_MAX_ARRAY = 1 << 26  # elements of one metadata array (vocabularies: ~256k)
_MAX_ARRAY_DEPTH = 3  # arrays of arrays of arrays
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 48  # elements of one tensor
_MAX_ALIGNMENT = 1 << 16
_MAX_CONTEXT = 1 << 24  # longest context_length we believe (the model builds a rope table this long)
_SMALL_ARRAY = 1024  # longer arrays are left out of `metadata` (they are vocabularies, not settings)
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")

# GGUF metadata value types: id -> (struct format, size). 7 is bool (one byte), 8 string, 9 array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_F32, _BOOL, _STRING, _ARRAY = 6, 7, 8, 9
_U64 = struct.Struct("<Q")

# tokenizer.ggml.token_type values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _quant():
    """The gguf package, imported on first use (it pulls in yaml/requests, which `lmforge list` on
    safetensors models never needs)."""
    import gguf
    import gguf.quants

    return gguf


# ---------------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry, already checked against the file (its bytes lie inside it)."""

    name: str
    shape: tuple[int, ...]  # numpy/PyTorch order: GGUF stores the dims reversed (ne[0] is the row length)
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return _quant().GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFModel:
    """What `read_gguf` returns: everything needed to build `GPT(config)` and run it."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # our parameter names, lm_head.weight included even when tied
    tokenizer: Tokenizer
    metadata: dict[str, Any]  # the KV metadata, without the vocabulary arrays (tokens, merges, ...)
    file_type: str  # "F32", "F16", "Q8_0", "Q4_K_M", "mixed (Q4_K, Q6_K)", ...


# ---------------------------------------------------------------------------------------------------
# The bounds-checked parser
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Header:
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    size: int


class _Cursor:
    """Reads little-endian GGUF fields from a buffer; every read first checks that the bytes exist."""

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path}: {what} (truncated or corrupted GGUF?)")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file ends {self.left()} bytes later")

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def string(self, what: str, cap: int, *, strict: bool = False) -> str:
        """A GGUF string: u64 length, then that many UTF-8 bytes. Keys and tensor names must be valid
        UTF-8 (strict); values get U+FFFD for bad bytes, as a lenient reader would."""
        n = self.u64(f"the length of {what}")
        if n > cap:
            raise self.fail(f"{what} claims {n} bytes (limit {cap})")
        b = self.raw(n, what)
        try:
            return b.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            v = self.unpack(fmt, size, what)
            if vtype == _F32:  # the shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06
                return float(str(np.float32(v)))
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what, _MAX_STRING_BYTES)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list:
        """u32 element type, u64 count, elements. The count is checked against the bytes left at the
        smallest size one element can take, so a claimed 2**40 elements is refused at once."""
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        etype = self.u32(f"the element type of {what}")
        n = self.u64(f"the length of {what}")
        if etype in _SCALARS:
            min_size = _SCALARS[etype][1]
        elif etype in (_STRING, _ARRAY):
            min_size = 8 if etype == _STRING else 12
        else:
            raise self.fail(f"{what} has unknown element type {etype}")
        if n > _MAX_ARRAY or n * min_size > self.left():
            raise self.fail(f"{what} claims {n} elements, more than the {self.left()} bytes left can hold")
        if etype in _SCALARS:
            data = np.frombuffer(self.raw(n * min_size, what), dtype=_NUMPY[etype])
            return [bool(x) for x in data] if etype == _BOOL else data.tolist()
        if etype == _STRING:
            return self.strings(n, what)
        return [self.value(etype, what, depth + 1) for _ in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings: the same checks as `string`, in one tight loop (vocabularies hold ~10^5 of them)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack, append = _U64.unpack_from, out.append
        for _ in range(n):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"the length of a string in {what}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > _MAX_STRING_BYTES or length > size - pos:
                self.pos = pos
                raise self.fail(f"a string in {what} claims {length} bytes, more than the {size - pos} left")
            append(buf[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out


def _open_error(path: Path, e: OSError) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path}: is a directory, not a GGUF file")
    return UserError(f"{path}: cannot read the file: {e.strerror or e}")


def _parse_file(path: str | os.PathLike) -> _Header:
    """Parse the header of a GGUF file (metadata and tensor infos, no tensor data) via mmap."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _open_error(path, e) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UserError(f"{path}: the file is empty (truncated or corrupted GGUF?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_buffer(mm, size, str(path))


def _parse_buffer(buf: Any, size: int, path: str) -> _Header:
    """The whole header: magic, version, counts, metadata, tensor infos, alignment, data offsets."""
    c = _Cursor(buf, size, path)
    magic = c.raw(4, "the magic number") if size >= 4 else bytes(buf[:size])
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    version = _read_version(c)
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    # Each pair needs >= 13 bytes (empty key, type, 1-byte value); each tensor info >= 28.
    if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV or 13 * n_kv + 28 * n_tensors > c.left():
        raise c.fail(f"the header claims {n_tensors} tensors and {n_kv} metadata pairs, more than the file can hold")
    metadata = _read_metadata(c, n_kv)
    alignment = _alignment(c, metadata)
    infos = [_read_tensor_info(c) for _ in range(n_tensors)]
    _check_unique(c, [t[0] for t in infos])
    data_start = -(-c.pos // alignment) * alignment
    tensors = [_place_tensor(c, info, data_start, alignment) for info in infos]
    return _Header(version, metadata, tensors, alignment, data_start, size)


def _read_version(c: _Cursor) -> int:
    version = c.u32("the version")
    if version in (2, 3):
        return version
    if version == 1:
        raise UserError(f"{c.path}: GGUF version 1 is too old to read; convert the model again with a current llama.cpp")
    if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
        raise UserError(f"{c.path}: a big-endian GGUF file; only little-endian GGUF is supported")
    raise c.fail(f"unsupported GGUF version {version} (expected 2 or 3)")


def _read_metadata(c: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key", _MAX_KEY_BYTES, strict=True)
        if key in metadata:
            raise c.fail(f"metadata key {_short(key)} appears twice")
        what = f"metadata {_short(key)}"
        vtype = c.u32(f"the type of {what}")
        metadata[key] = c.value(vtype, what)
    return metadata


def _alignment(c: _Cursor, metadata: dict[str, Any]) -> int:
    a = metadata.get("general.alignment", 32)
    if not _is_int(a) or not 0 < a <= _MAX_ALIGNMENT or a & (a - 1):
        raise c.fail(f"general.alignment is {_short(a)}; it must be a power of two up to {_MAX_ALIGNMENT}")
    return a


def _read_tensor_info(c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """(name, ggml dims, type, relative offset), with the dims and type checked."""
    gguf = _quant()
    name = c.string("a tensor name", _MAX_NAME_BYTES, strict=True)
    n_dims = c.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
    dims = tuple(c.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims))
    ggml_type = c.u32(f"the type of tensor {name!r}")
    offset = c.u64(f"the data offset of tensor {name!r}")
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise c.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise c.fail(f"tensor {name!r} has ggml type {qtype.name}, whose size is unknown")
    if math.prod(dims) > _MAX_ELEMENTS:
        raise c.fail(f"tensor {name!r} claims dims {list(dims)}, more than {_MAX_ELEMENTS} elements")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if dims[0] % block:
        raise c.fail(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the {qtype.name} block size {block}")
    return name, dims, ggml_type, offset


def _check_unique(c: _Cursor, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise c.fail(f"tensor name {name!r} appears twice")
        seen.add(name)


def _place_tensor(c: _Cursor, info: tuple[str, tuple[int, ...], int, int], data_start: int,
                  alignment: int) -> GGUFTensorInfo:
    """Absolute offset and byte size of one tensor, refused unless it lies wholly inside the file."""
    gguf = _quant()
    name, dims, ggml_type, offset = info
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    n_bytes = math.prod(dims) // block * type_size
    if offset % alignment:
        raise c.fail(f"tensor {name!r} has offset {offset}, not a multiple of the alignment {alignment}")
    start = data_start + offset
    if start + n_bytes > c.size:
        raise c.fail(f"tensor {name!r} data (bytes {start}..{start + n_bytes}) runs past the end of the file ({c.size} bytes)")
    return GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, start, n_bytes)


def _public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata without the vocabulary-sized arrays (they are data, not settings to show)."""
    return {k: v for k, v in metadata.items()
            if k not in _VOCAB_KEYS and not (isinstance(v, list) and len(v) > _SMALL_ARRAY)}


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata and tensor infos of a GGUF file, without reading tensor data (for `list` / `show`).

    Arrays of more than 1024 elements (the vocabulary, merges, scores and token types) are left out of
    the metadata. The whole header is validated, so a file this accepts has every tensor inside it.
    """
    header = _parse_file(path)
    return _public_metadata(header.metadata), header.tensors


def describe_file_type(metadata: dict[str, Any], tensors: list[GGUFTensorInfo]) -> str:
    """What `lmforge list` shows: llama.cpp's file type name ("Q4_K_M") when the file records one, else
    the type of the matrices ("Q8_0"), or "mixed (Q4_K, Q6_K)"."""
    gguf = _quant()
    ft = metadata.get("general.file_type")
    if _is_int(ft):
        try:
            name = gguf.LlamaFileType(ft).name
        except ValueError:
            name = "GUESSED"
        if name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    types = sorted({t.type_name for t in tensors if len(t.shape) >= 2})
    if not types:
        return "F32"
    return types[0] if len(types) == 1 else f"mixed ({', '.join(types)})"


# ---------------------------------------------------------------------------------------------------
# Typed metadata access
# ---------------------------------------------------------------------------------------------------
def _short(v: Any, limit: int = 60, *, repr_: bool = True) -> str:
    """A value for an error message, cut to about `limit` characters: a hostile file's strings and arrays
    must not flood the one-line error (nor cost a repr of 64 MiB)."""
    if isinstance(v, (str, list)) and len(v) > limit:
        v = v[:limit]
    r = repr(v) if repr_ else str(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _meta(path: str, metadata: dict[str, Any], key: str, kind: str, default: Any = ...) -> Any:
    """metadata[key] checked to be of `kind` ("int", "float", "str", "bool", "list"); missing -> default,
    or a UserError naming the key when there is no default."""
    if key not in metadata:
        if default is ...:
            raise UserError(f"{path}: metadata key {key!r} is missing")
        return default
    v = metadata[key]
    ok = {"int": _is_int(v), "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": isinstance(v, str), "bool": isinstance(v, bool), "list": isinstance(v, list)}[kind]
    if not ok:
        raise UserError(f"{path}: metadata {key!r} should be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__}")
    if kind == "float":
        if not math.isfinite(v):
            raise UserError(f"{path}: metadata {key!r} is {v}, not a finite number")
        return float(v)
    return v


# ---------------------------------------------------------------------------------------------------
# Names and layouts: GGUF <-> Hugging Face
# ---------------------------------------------------------------------------------------------------
_GLOBAL_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_TO_BLOCK = {v: k for k, v in _BLOCK_TO_HF.items()}
_HF_TO_GLOBAL = {v: k for k, v in _GLOBAL_TO_HF.items()}
_ROPE_FREQS = "rope_freqs.weight"


def _gguf_to_hf(name: str) -> str | None:
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


def _hf_to_gguf(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base in _HF_TO_GLOBAL:
        return f"{_HF_TO_GLOBAL[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_HF_TO_BLOCK[rest]}.{kind}"


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a model of `cfg` has, with its numpy shape; the source of truth for both the
    reader's checks (missing / unexpected / wrong shape) and the writer's."""
    C, V, F, D = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, C)
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "llama3":
        shapes[_ROPE_FREQS] = (D // 2,)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (C,), b + "ffn_norm.weight": (C,), b + "attn_q.weight": (q, C),
                       b + "attn_k.weight": (kv, C), b + "attn_v.weight": (kv, C), b + "attn_output.weight": (C, q),
                       b + "ffn_gate.weight": (F, C), b + "ffn_up.weight": (F, C), b + "ffn_down.weight": (C, F)})
        if cfg.qkv_bias or cfg.attention_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if cfg.attention_bias:
            shapes[b + "attn_output.bias"] = (C,)
        if cfg.mlp_bias:
            shapes.update({b + "ffn_gate.bias": (F,), b + "ffn_up.bias": (F,), b + "ffn_down.bias": (C,)})
    return shapes


def _rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate_half) rows -> GGUF `llama` (interleaved pairs) rows, per head: within each head the
    first and second halves are interleaved, so pair (i, i + D/2) becomes rows (2i, 2i + 1)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `_rope_permute`: GGUF `llama` q/k rows -> the rotate_half layout our model uses."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_heads(cfg: ModelConfig, name: str) -> int | None:
    """How many heads to (un)permute for GGUF tensor `name` in the `llama` architecture, or None."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(kind)


# ---------------------------------------------------------------------------------------------------
# Config from metadata
# ---------------------------------------------------------------------------------------------------
def _check_architecture(path: str, metadata: dict[str, Any]) -> str:
    parts = _meta(path, metadata, "split.count", "int", 1)
    if parts > 1:
        raise UserError(f"{path}: one part of a GGUF split into {parts} files; merge them first "
                        f"(llama-gguf-split --merge)")
    arch = _meta(path, metadata, "general.architecture", "str")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {_short(arch)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _base_config(path: str, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo], arch: str) -> ModelConfig:
    """ModelConfig from the `{arch}.*` hyperparameters and which tensors exist (biases, tied output).
    Rope scaling from `rope_freqs.weight` is added later, once that tensor is read."""
    p = f"{arch}."

    def num(key: str, default: Any = ...) -> int:
        v = _meta(path, metadata, p + key, "int", default)
        if v is not None and v <= 0:
            raise UserError(f"{path}: metadata {p + key!r} must be positive, got {v}")
        return v

    d_model, n_heads = num("embedding_length"), num("attention.head_count")
    n_layers, d_ff = num("block_count"), num("feed_forward_length")
    n_kv = num("attention.head_count_kv", n_heads)
    context = num("context_length")
    if context > _MAX_CONTEXT:
        raise UserError(f"{path}: context_length {context} is beyond what lmforge supports ({_MAX_CONTEXT})")
    head_dim = num("attention.key_length", d_model // n_heads or None)
    for key, want in (("attention.value_length", head_dim), ("rope.dimension_count", head_dim)):
        got = num(key, want)
        if got != want:
            raise UserError(f"{path}: {p + key} = {got} differs from the head size {want}; lmforge needs them equal")
    if n_layers * 9 > len(tensors):  # each layer has at least 9 tensors: refuse before looping over layers
        raise UserError(f"{path}: block_count {n_layers} but only {len(tensors)} tensors (truncated or corrupted GGUF?)")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: tensor 'token_embd.weight' is missing")
    kwargs = dict(
        vocab_size=tensors["token_embd.weight"].shape[0], context_length=context, d_model=d_model,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff,
        norm="rmsnorm", norm_eps=_meta(path, metadata, p + "attention.layer_norm_rms_epsilon", "float"),
        mlp="swiglu", positions="rope", rope_theta=_meta(path, metadata, p + "rope.freq_base", "float", 10000.0),
        rope_scaling=_linear_rope_scaling(path, metadata, p), tie_embeddings="output.weight" not in tensors,
        name=_meta(path, metadata, "general.name", "str", arch), **_bias_flags(path, tensors, arch),
    )
    try:
        cfg = ModelConfig(**kwargs)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if hf_architecture(cfg) not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        raise UserError(f"{path}: this combination of bias tensors matches no Llama or Qwen2 model")
    return cfg


def _bias_flags(path: str, tensors: dict[str, GGUFTensorInfo], arch: str) -> dict[str, bool]:
    """Biases are told by the tensors of block 0: q/k/v only (Qwen2), q/k/v/o (attention_bias), MLP."""
    has = {k: f"blk.0.{k}.bias" in tensors for k in ("attn_q", "attn_output", "ffn_up")}
    if arch == "qwen2" and not has["attn_q"]:
        raise UserError(f"{path}: tensor 'blk.0.attn_q.bias' is missing (qwen2 has q/k/v biases)")
    return {"qkv_bias": has["attn_q"] and not has["attn_output"], "attention_bias": has["attn_output"],
            "mlp_bias": has["ffn_up"]}


def _linear_rope_scaling(path: str, metadata: dict[str, Any], p: str) -> dict[str, Any] | None:
    kind = _meta(path, metadata, p + "rope.scaling.type", "str", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise UserError(f"{path}: rope scaling {_short(kind)} is not supported (only linear, and Llama-3's rope_freqs)")
    factor = _meta(path, metadata, p + "rope.scaling.factor", "float")
    if not factor > 0:
        raise UserError(f"{path}: rope.scaling.factor must be positive, got {factor}")
    return {"type": "linear", "factor": factor}


def _base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    D = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))


def _llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
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
        rebuilt = _llama3_rope_factors(cfg.replace(rope_scaling=scaling))
    except (UserError, ValueError, ZeroDivisionError):
        rebuilt = None
    if rebuilt is None or not np.allclose(rebuilt, factors, rtol=1e-4, atol=0):
        raise UserError(f"{path}: rope_freqs.weight holds per-frequency rope factors that are not Llama-3 rope "
                        f"scaling; lmforge cannot run them")
    return scaling


# ---------------------------------------------------------------------------------------------------
# Tokenizer from metadata
# ---------------------------------------------------------------------------------------------------
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre name -> our pipeline. The first name of each group is what the writer emits.
_PRE_ALIASES = {"llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "qwen2": "qwen2",
                "deepseek-r1-qwen": "qwen2", "gpt-2": "gpt2", "default": "gpt2", "smollm": "smollm"}
_PRE_EXPORT_NAME = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2", "smollm": "smollm"}
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _pipeline(kind: str) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) of a byte-level BPE family, as in the original tokenizer.json files."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split(pattern: str) -> Any:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    if kind == "llama3":
        return None, split(SPLIT_PATTERN)
    if kind == "qwen2":
        return normalizers.NFC(), split(_QWEN2_SPLIT)
    if kind == "smollm":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_list(path: str, metadata: dict[str, Any]) -> tuple[list[str], list[int]]:
    tokens = _meta(path, metadata, "tokenizer.ggml.tokens", "list")
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens should be a non-empty list of strings")
    types = _meta(path, metadata, "tokenizer.ggml.token_type", "list", None)
    if types is None:
        types = [_NORMAL] * len(tokens)
    if len(types) != len(tokens) or not all(_is_int(t) for t in types):
        raise UserError(f"{path}: tokenizer.ggml.token_type should hold one integer per token")
    return tokens, types


def _special_token(path: str, metadata: dict[str, Any], key: str, tokens: list[str]) -> str | None:
    i = _meta(path, metadata, f"tokenizer.ggml.{key}", "int", None)
    if i is None:
        return None
    if not 0 <= i < len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary of {len(tokens)} tokens")
    return tokens[i]


def _add_special_tokens(tk: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (matched in raw text, skipped by skip_special_tokens);
    user-defined ones become ordinary added tokens. Both keep their ids (they are in the vocabulary)."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)


def _bpe_backend(path: str, metadata: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from tokens + merges + the pre-tokenizer name."""
    import tokenizers
    from tokenizers import decoders, models

    pre = _meta(path, metadata, "tokenizer.ggml.pre", "str", None)
    if pre is None:
        warnings.warn(f"{path}: no tokenizer.ggml.pre; using GPT-2's pre-tokenizer as llama.cpp does "
                      f"(text may be split differently from the original tokenizer)", stacklevel=3)
        pre = "default"
    if pre not in _PRE_ALIASES:
        raise UserError(f"{path}: tokenizer.ggml.pre {_short(pre)} is not supported; supported: {', '.join(_PRE_ALIASES)}")
    kind = _PRE_ALIASES[pre]
    merges = []
    for m in _meta(path, metadata, "tokenizer.ggml.merges", "list", []):
        pair = m.split(" ") if isinstance(m, str) else []
        if len(pair) != 2:
            raise UserError(f"{path}: tokenizer.ggml.merges holds {_short(m)}, not a pair \"a b\"")
        merges.append((pair[0], pair[1]))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated token string keeps its first id
    try:
        # Llama 3 (in transformers and llama.cpp alike) takes a word that is itself a token whole.
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=kind == "llama3")
    except Exception as e:  # the Rust side raises plain Exception for merges of unknown tokens
        raise UserError(f"{path}: the tokenizer's merges do not fit its tokens: {_short(' '.join(str(e).split()), 120, repr_=False)}") from None
    tk = tokenizers.Tokenizer(model)
    tk.normalizer, tk.pre_tokenizer = _pipeline(kind)
    tk.decoder = decoders.ByteLevel()
    _add_special_tokens(tk, tokens, types)
    return tk


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: SentencePiece joins the adjacent pair
    whose joined piece has the highest score, so every split of a normal piece into two pieces that exist
    is a merge, ranked by the joined piece's score (ties: lower ids first)."""
    ids = {}
    for i, t in enumerate(tokens):
        if types[i] == _NORMAL:
            ids.setdefault(t, i)
    found = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], i, ids[left], ids[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _spm_backend(path: str, metadata: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama GGUFs) as a `tokenizers` BPE with byte
    fallback: spaces become "▁", a "▁" is prepended unless add_space_prefix is false, unknown characters
    fall back to the <0xXX> byte tokens. This is what transformers builds from the same vocabulary."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    scores = _meta(path, metadata, "tokenizer.ggml.scores", "list")
    if len(scores) != len(tokens) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise UserError(f"{path}: tokenizer.ggml.scores should hold one number per token")
    unk = _special_token(path, metadata, "unknown_token_id", tokens)
    if unk is None:
        unk = next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    try:
        model = models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                           fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise UserError(f"{path}: cannot build the SentencePiece tokenizer: {_short(' '.join(str(e).split()), 120, repr_=False)}") from None
    tk = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if _meta(path, metadata, "tokenizer.ggml.add_space_prefix", "bool", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tk.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _meta(path, metadata, "tokenizer.ggml.add_space_prefix", "bool", True):
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    _add_special_tokens(tk, tokens, [_CONTROL if k == _UNKNOWN else k for k in types])
    return tk


def _tokenizer_from_metadata(path: str, metadata: dict[str, Any]) -> Tokenizer:
    """lmforge `Tokenizer` from the tokenizer.* metadata: vocabulary, merges, special-token roles, BOS
    policy and chat template."""
    model = _meta(path, metadata, "tokenizer.ggml.model", "str")
    tokens, types = _token_list(path, metadata)
    if model == "gpt2":
        tk = _bpe_backend(path, metadata, tokens, types)
        add_bos_default = False  # llama.cpp: a BPE vocabulary without the key adds no BOS
    elif model == "llama":
        tk = _spm_backend(path, metadata, tokens, types)
        add_bos_default = True  # SentencePiece Llama models always started with <s>
    else:
        raise UserError(f"{path}: tokenizer model {_short(model)} is not supported (supported: gpt2, llama)")

    def role(key: str) -> str | None:
        return _special_token(path, metadata, key, tokens)

    eot = role("eot_token_id")
    if eot is None:  # llama.cpp also recognises the end-of-turn token by its text
        eot = next((t for t, k in zip(tokens, types) if k == _CONTROL and t in _EOT_TEXTS), None)
    eom = role("eom_token_id")
    template = _meta(path, metadata, "tokenizer.chat_template", "str", None)
    add_bos = _meta(path, metadata, "tokenizer.ggml.add_bos_token", "bool", add_bos_default)
    try:
        return Tokenizer(tk, chat_template=template, bos_token=role("bos_token_id"), eos_token=role("eos_token_id"),
                         eot_token=eot, pad_token=role("padding_token_id"), add_bos=add_bos,
                         extra_eos_tokens=[eom] if eom is not None else [])
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def _check_tensor_set(path: str, cfg: ModelConfig, tensors: dict[str, GGUFTensorInfo]) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor before any data is read."""
    want = _expected_shapes(cfg)
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{path}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise UserError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"{path}: tensor {extra[0]!r} is not part of a {hf_architecture(cfg)}-shaped model "
                        f"({len(extra)} unexpected tensors)")


def _dequantize(path: str, data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """float32 array of `info.shape` from the raw bytes of one tensor (a view of the memmap)."""
    gguf = _quant()
    t = gguf.GGMLQuantizationType(info.ggml_type)
    raw = data[info.offset:info.offset + info.n_bytes]
    direct = {gguf.GGMLQuantizationType.F32: "<f4", gguf.GGMLQuantizationType.F16: "<f2",
              gguf.GGMLQuantizationType.F64: "<f8"}
    with np.errstate(all="ignore"):
        if t in direct:
            out = raw.view(direct[t]).astype(np.float32)  # astype copies: nothing keeps the memmap alive
        else:
            row_bytes = info.shape[-1] // gguf.GGML_QUANT_SIZES[t][0] * gguf.GGML_QUANT_SIZES[t][1]
            try:
                out = gguf.quants.dequantize(raw.reshape(-1, row_bytes), t)
            except NotImplementedError:
                raise UserError(f"{path}: tensor {info.name!r} has type {t.name}, which lmforge cannot dequantize") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)


def _open_data(path: str, size: int) -> np.ndarray:
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot map the tensor data: {e}") from None
    if data.shape[0] != size:
        raise UserError(f"{path}: the file changed while it was being read")
    return data


class _LazyTensors(Mapping):
    """HF-named tensors of a GGUF file, dequantized (and un-permuted) only when asked for.

    `state_dict_from_hf` concatenates q|k|v and gate|up as it goes; reading each source when it is needed
    lets it be freed right after, so a load holds about one float copy of the weights, not two.
    """

    def __init__(self, path: str, cfg: ModelConfig, arch: str, header: _Header, data: np.ndarray,
                 dtype: torch.dtype) -> None:
        self.path, self.cfg, self.arch, self.data, self.dtype = path, cfg, arch, data, dtype
        self.infos = {_gguf_to_hf(t.name): t for t in header.tensors if t.name != _ROPE_FREQS}

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        arr = _dequantize(self.path, self.data, info)
        heads = _permute_heads(self.cfg, info.name) if self.arch == "llama" else None
        if heads is not None:
            arr = _rope_unpermute(arr, heads)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.dtype)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _read_tensors(path: str, cfg: ModelConfig, arch: str, header: _Header, data: np.ndarray,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict: dequantize each tensor, undo the llama rope permutation, rename GGUF -> HF -> ours."""
    return state_dict_from_hf(cfg, _LazyTensors(path, cfg, arch, header, data, dtype), source=path)


def describe_gguf(path: str | os.PathLike, *, check_tokenizer: bool = True) -> dict[str, Any]:
    """What `lmforge list/show/import` need, from the header alone (no tensor is dequantized): the config,
    architecture, parameter count, file type and chat template. Validates the header, the tensor table
    against the config and (unless `check_tokenizer=False`) the tokenizer metadata."""
    path_str = str(path)
    header = _parse_file(path)
    tensors = {t.name: t for t in header.tensors}
    arch = _check_architecture(path_str, header.metadata)
    cfg = _base_config(path_str, header.metadata, tensors, arch)
    if _ROPE_FREQS in tensors:
        data = _open_data(path_str, header.size)
        try:
            cfg = _with_llama3_rope(path_str, cfg, arch, header.metadata, data, tensors[_ROPE_FREQS])
        finally:
            del data
    _check_tensor_set(path_str, cfg, tensors)
    if check_tokenizer:
        _tokenizer_from_metadata(path_str, header.metadata)
    template = header.metadata.get("tokenizer.chat_template")
    return {"architecture": arch, "config": cfg, "file_type": describe_file_type(header.metadata, header.tensors),
            "parameters": sum(t.n_elements for t in header.tensors if t.name != _ROPE_FREQS),
            "chat_template": template if isinstance(template, str) else None}


def read_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> GGUFModel:
    """Load a llama / qwen2 GGUF file: config, our state dict (float32 unless `dtype`), tokenizer.

    Every structural problem, unsupported feature or inconsistency is a one-line `UserError` naming the
    file; nothing is allocated from a count the file has not been shown to back with bytes.
    """
    path_str = str(path)
    header = _parse_file(path)
    tensors = {t.name: t for t in header.tensors}
    arch = _check_architecture(path_str, header.metadata)
    cfg = _base_config(path_str, header.metadata, tensors, arch)
    data = _open_data(path_str, header.size)
    try:
        if _ROPE_FREQS in tensors:
            cfg = _with_llama3_rope(path_str, cfg, arch, header.metadata, data, tensors[_ROPE_FREQS])
        _check_tensor_set(path_str, cfg, tensors)
        tokenizer = _tokenizer_from_metadata(path_str, header.metadata)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"{path_str}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd only "
                            f"{cfg.vocab_size} rows")
        state_dict = _read_tensors(path_str, cfg, arch, header, data, dtype or torch.float32)
    finally:
        mm = getattr(data, "_mmap", None)
        del data
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it later
                pass
    return GGUFModel(cfg, state_dict, tokenizer, _public_metadata(header.metadata),
                     describe_file_type(header.metadata, header.tensors))


def _with_llama3_rope(path: str, cfg: ModelConfig, arch: str, metadata: dict[str, Any], data: np.ndarray,
                      info: GGUFTensorInfo) -> ModelConfig:
    if arch != "llama":
        raise UserError(f"{path}: rope_freqs.weight in a {arch} model is not supported")
    if cfg.rope_scaling is not None:
        raise UserError(f"{path}: both rope.scaling.type and rope_freqs.weight are set; lmforge cannot combine them")
    if info.shape != (cfg.head_dim // 2,):
        raise UserError(f"{path}: tensor 'rope_freqs.weight' has shape {list(info.shape)}, expected [{cfg.head_dim // 2}]")
    factors = _dequantize(path, data, info).astype(np.float64)
    if not np.all(np.isfinite(factors)) or not np.all(factors >= 1 - 1e-6):
        raise UserError(f"{path}: rope_freqs.weight holds factors below 1 or not finite; lmforge cannot run them")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return cfg
    orig = _meta(path, metadata, f"{arch}.rope.scaling.original_context_length", "int", None)
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
# Writing
# ---------------------------------------------------------------------------------------------------
def _export_arch(cfg: ModelConfig) -> str:
    """'llama' or 'qwen2' for the configs llama.cpp runs as such; a UserError for the rest."""
    if not is_llama_shaped(cfg):
        raise UserError("GGUF export supports Llama- and Qwen2-shaped models (rmsnorm, swiglu, rope); this model "
                        f"has norm={cfg.norm}, mlp={cfg.mlp}, positions={cfg.positions}")
    arch = "qwen2" if hf_architecture(cfg) == "Qwen2ForCausalLM" else "llama"
    kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    if arch == "qwen2" and kind == "llama3":
        raise UserError("GGUF export: llama.cpp's qwen2 architecture has no Llama-3 rope scaling")
    return arch


def _plain(obj: Any) -> Any:
    """A tokenizer component's JSON without fields that never change ids (offsets trimming)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k != "trim_offsets"}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _component_json(normalizer: Any, pre_tokenizer: Any) -> tuple[Any, Any]:
    import tokenizers
    from tokenizers import models

    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer, tk.pre_tokenizer = normalizer, pre_tokenizer
    j = json.loads(tk.to_str())
    return _plain(j["normalizer"]), _plain(j["pre_tokenizer"])


def _export_pre_name(tok: Tokenizer) -> tuple[str, dict[str, Any]]:
    """(tokenizer.ggml.pre name, the backend's JSON) for a byte-level BPE tokenizer llama.cpp knows."""
    j = json.loads(tok.backend.to_str())
    model, dec = j.get("model") or {}, j.get("decoder") or {}
    if model.get("type") != "BPE" or dec.get("type") != "ByteLevel" or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError("GGUF export supports byte-level BPE tokenizers (like lmforge's own); this one is "
                        f"{model.get('type')} with a {dec.get('type')} decoder")
    ours = (_plain(j.get("normalizer")), _plain(j.get("pre_tokenizer")))
    for kind, name in _PRE_EXPORT_NAME.items():
        norm, pre = _component_json(*_pipeline(kind))
        if ours[1] == pre and ours[0] in (norm, None):
            return name, j
    raise UserError("GGUF export: the tokenizer's pre-tokenizer matches none llama.cpp knows "
                    f"({', '.join(_PRE_EXPORT_NAME.values())})")


def _export_vocab(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """tokens / token types / merges in llama.cpp's form, padded to the model's vocab_size."""
    pre, j = _export_pre_name(tok)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        t = tok.backend.id_to_token(i)
        if t is None:  # holes and the model's spare rows, as llama.cpp's converter fills them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(t)
            types.append((_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"].get("merges", [])]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges}


def _export_tensors(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, q/k permuted for `llama`, rope_freqs added for Llama-3 scaling."""
    want = _expected_shapes(cfg)
    _check_our_keys(cfg, want, state_dict)
    hf = state_dict_to_hf(cfg, state_dict)
    out: dict[str, np.ndarray] = {}
    if _ROPE_FREQS in want:
        out[_ROPE_FREQS] = _llama3_rope_factors(cfg)
    for hf_name, t in hf.items():
        name = _hf_to_gguf(hf_name)
        arr = t.detach().to("cpu", torch.float32).numpy()
        if tuple(arr.shape) != want.get(name):
            raise UserError(f"GGUF export: {hf_name} has shape {list(arr.shape)}, expected {list(want.get(name, ()))}")
        heads = _permute_heads(cfg, name) if arch == "llama" else None
        out[name] = _rope_permute(arr, heads) if heads is not None else arr
    missing = sorted(set(want) - set(out))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor for {missing[0]}")
    return out


def _check_our_keys(cfg: ModelConfig, want: dict[str, tuple[int, ...]], state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict with missing or extra parameters (extra ones, e.g. unmerged LoRA or quantized
    weights, would otherwise be silently dropped). The expected names come from mapping the expected GGUF
    tensors back through `state_dict_from_hf` on the meta device: nothing is allocated."""
    hf = {_gguf_to_hf(n): torch.empty(shape, device="meta") for n, shape in want.items() if n != _ROPE_FREQS}
    expected = set(state_dict_from_hf(cfg, hf))
    missing = sorted(expected - set(state_dict))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor {missing[0]!r}")
    extra = sorted(set(state_dict) - expected)
    if extra:
        raise UserError(f"GGUF export: unexpected tensor {extra[0]!r} in the state dict (merge LoRA adapters and "
                        f"undo quantization before exporting)")


def _storage_type(name: str, arr: np.ndarray, qtype: str, tied: bool) -> Any:
    """The ggml type one tensor is written as. Vectors (norms, biases, rope_freqs) stay F32 as in
    llama.cpp; for q4_0 the output projection (token_embd when tied) keeps Q8_0, as llama.cpp keeps it at
    a higher precision than the rest; rows that don't split into blocks fall back to F16."""
    T = _quant().GGMLQuantizationType
    if arr.ndim == 1 or qtype == "f32":
        return T.F32
    if qtype == "f16":
        return T.F16
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    want = T.Q8_0 if qtype == "q8_0" or output else T.Q4_0
    return want if arr.shape[-1] % _quant().GGML_QUANT_SIZES[want][0] == 0 else T.F16


def _encode_tensor(arr: np.ndarray, t: Any) -> np.ndarray:
    gguf = _quant()
    if t == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _add_hparams(w: Any, cfg: ModelConfig, name: str) -> None:
    """{arch}.* hyperparameters under the keys llama.cpp reads."""
    gguf = _quant()
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
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    sc = cfg.rope_scaling or {}
    kind = sc.get("type", sc.get("rope_type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    elif kind == "llama3":  # the factors themselves travel as rope_freqs.weight
        w.add_rope_scaling_orig_ctx_len(int(sc.get("original_max_position_embeddings", 8192)))


def _add_tokenizer(w: Any, tok: Tokenizer, vocab: dict[str, Any], eos_token_ids: list[int] | None) -> None:
    """tokenizer.* keys. GGUF has one EOS and one EOT id: eos_token_ids[0] (or the tokenizer's EOS) and the
    tokenizer's end-of-turn token (or eos_token_ids[1]); further ids have no key to go to."""
    eos_ids = list(eos_token_ids or [])
    eos = eos_ids[0] if eos_ids else tok.eos_id
    eot = tok.eot_id if tok.eot_id is not None else next((i for i in eos_ids[1:] if i != eos), None)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, eos), (w.add_eot_token_id, eot),
                   (w.add_pad_token_id, tok.pad_id)):
        if i is not None:
            add(int(i))
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
               *, qtype: str = "f16", name: str | None = None, eos_token_ids: list[int] | None = None) -> None:
    """Write a llama.cpp-loadable GGUF (arch `llama`, or `qwen2` for q/k/v biases), atomically.

    `qtype` is one of GGUF_TYPES: f32; f16 (matrices F16); q8_0 (matrices Q8_0); q4_0 (matrices Q4_0, the
    output projection Q8_0). Vectors stay F32, and matrices whose rows don't split into 32-value blocks
    are written F16. `name` defaults to `cfg.name`. GGUF has one EOS id and one end-of-turn id:
    `eos_token_ids[0]` (default: the tokenizer's EOS) and the tokenizer's end-of-turn token (default:
    the next of `eos_token_ids`); llama.cpp stops on both. Everything is checked (architecture,
    tokenizer, tensor names and shapes) before the temp file is created, so a refused export leaves
    nothing behind.
    """
    gguf = _quant()
    qtype = str(qtype).lower()
    if qtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {_short(qtype)} is not supported for export; choose one of {', '.join(GGUF_TYPES)}")
    arch = _export_arch(cfg)
    vocab = _export_vocab(cfg, tokenizer)
    tensors = _export_tensors(cfg, state_dict, arch)
    encoded = {}
    for tname, arr in tensors.items():
        t = _storage_type(tname, arr, qtype, cfg.tie_embeddings)
        encoded[tname] = (_encode_tensor(arr, t), t)
    quantized = any(t not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) for _, t in encoded.values())

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        _add_hparams(w, cfg, name or cfg.name)
        w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[qtype]])
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer, vocab, eos_token_ids)
        for tname in _write_order(encoded):
            data, t = encoded[tname]
            w.add_tensor(tname, data, raw_dtype=t if data.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


def _write_order(encoded: dict[str, Any]) -> list[str]:
    """token_embd, rope_freqs, blocks in order, output_norm, output: the order llama.cpp's converter uses."""
    def key(n: str) -> tuple[int, int, str]:
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, _ROPE_FREQS: 0}.get(n, 2), 0, n)

    return sorted(encoded, key=key)

