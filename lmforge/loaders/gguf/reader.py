"""Bounds-checked reading of a GGUF file: the header (magic, version, metadata, tensor infos) and one tensor's data.

Why our own reader: `gguf.GGUFReader` trusts the counts in the file, so a hostile or damaged file can make
it allocate or loop without limit. Here every count, length and offset is checked with Python ints
against a cap and against the bytes that are left *before* anything is allocated or looped over, and each
problem is one `UserError` line naming the file. Tensor data is read through `numpy.memmap` (the file is
never copied whole) and dequantized with `gguf.quants`, llama.cpp's own Python (de)quantizers.

A module of its own because it is the one place that handles untrusted bytes: everything downstream (names,
config, vocab, load, write) works on the checked header it returns, through the typed metadata accessor
`meta` defined here.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import UserError


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
_SMALL_ARRAY = 1024  # longer arrays are left out of `metadata` (they are vocabularies, not settings)
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")

# GGUF metadata value types: id -> (struct format, size). 7 is bool (one byte), 8 string, 9 array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_F32, _BOOL, _STRING, _ARRAY = 6, 7, 8, 9
_U64 = struct.Struct("<Q")


def gguf_package():
    """The gguf package, imported on first use (it pulls in yaml/requests, which `lmforge list` on
    safetensors models never needs)."""
    import gguf
    import gguf.quants

    return gguf


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
        return gguf_package().GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def slice(self, i: int) -> GGUFTensorInfo:
        """Matrix `i` of a 3-D tensor (one expert of llama.cpp's stacked `ffn_*_exps`) as a 2-D tensor of its
        own: the outermost dimension varies slowest in the file, so its bytes are one contiguous run, and
        rows are whole blocks, so every slice starts on a block."""
        if len(self.shape) != 3 or not 0 <= i < self.shape[0]:
            raise ValueError(f"no slice {i} of tensor {self.name!r} with shape {list(self.shape)}")
        size = self.n_bytes // self.shape[0]
        return GGUFTensorInfo(self.name, self.shape[1:], self.ggml_type, self.offset + i * size, size)

    def rows(self, start: int, stop: int) -> GGUFTensorInfo:
        """Rows [start, stop) of a 2-D tensor (q, k or v of `phi3`'s fused attn_qkv) as a tensor of their own:
        each row is a whole number of blocks, so a run of rows is a contiguous run of bytes."""
        if len(self.shape) != 2 or not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"no rows {start}:{stop} of tensor {self.name!r} with shape {list(self.shape)}")
        size = self.n_bytes // self.shape[0]
        return GGUFTensorInfo(self.name, (stop - start, self.shape[1]), self.ggml_type, self.offset + start * size,
                              (stop - start) * size)


# ---------------------------------------------------------------------------------------------------
# The bounds-checked parser
# ---------------------------------------------------------------------------------------------------
@dataclass
class GGUFHeader:
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


def parse_file(path: str | os.PathLike) -> GGUFHeader:
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


def _parse_buffer(buf: Any, size: int, path: str) -> GGUFHeader:
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
    return GGUFHeader(version, metadata, tensors, alignment, data_start, size)


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
            raise c.fail(f"metadata key {short(key)} appears twice")
        what = f"metadata {short(key)}"
        vtype = c.u32(f"the type of {what}")
        metadata[key] = c.value(vtype, what)
    return metadata


def _alignment(c: _Cursor, metadata: dict[str, Any]) -> int:
    a = metadata.get("general.alignment", 32)
    if not is_int(a) or not 0 < a <= _MAX_ALIGNMENT or a & (a - 1):
        raise c.fail(f"general.alignment is {short(a)}; it must be a power of two up to {_MAX_ALIGNMENT}")
    return a


def _read_tensor_info(c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """(name, ggml dims, type, relative offset), with the dims and type checked."""
    gguf = gguf_package()
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
    gguf = gguf_package()
    name, dims, ggml_type, offset = info
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    n_bytes = math.prod(dims) // block * type_size
    if offset % alignment:
        raise c.fail(f"tensor {name!r} has offset {offset}, not a multiple of the alignment {alignment}")
    start = data_start + offset
    if start + n_bytes > c.size:
        raise c.fail(f"tensor {name!r} data (bytes {start}..{start + n_bytes}) runs past the end of the file ({c.size} bytes)")
    return GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, start, n_bytes)


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata without the vocabulary-sized arrays (they are data, not settings to show)."""
    return {k: v for k, v in metadata.items()
            if k not in _VOCAB_KEYS and not (isinstance(v, list) and len(v) > _SMALL_ARRAY)}


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata and tensor infos of a GGUF file, without reading tensor data (for `list` / `show`).

    Arrays of more than 1024 elements (the vocabulary, merges, scores and token types) are left out of
    the metadata. The whole header is validated, so a file this accepts has every tensor inside it.
    """
    header = parse_file(path)
    return public_metadata(header.metadata), header.tensors


def describe_file_type(metadata: dict[str, Any], tensors: list[GGUFTensorInfo]) -> str:
    """What `lmforge list` shows: llama.cpp's file type name ("Q4_K_M") when the file records one, else
    the type of the matrices ("Q8_0"), or "mixed (Q4_K, Q6_K)"."""
    gguf = gguf_package()
    ft = metadata.get("general.file_type")
    if is_int(ft):
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
def short(v: Any, limit: int = 60, *, repr_: bool = True) -> str:
    """A value for an error message, cut to about `limit` characters: a hostile file's strings and arrays
    must not flood the one-line error (nor cost a repr of 64 MiB)."""
    if isinstance(v, (str, list)) and len(v) > limit:
        v = v[:limit]
    r = repr(v) if repr_ else str(v)
    return r if len(r) <= limit else r[:limit] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def meta(path: str, metadata: dict[str, Any], key: str, kind: str, default: Any = ...) -> Any:
    """metadata[key] checked to be of `kind` ("int", "float", "str", "bool", "list"); missing -> default,
    or a UserError naming the key when there is no default."""
    if key not in metadata:
        if default is ...:
            raise UserError(f"{path}: metadata key {key!r} is missing")
        return default
    v = metadata[key]
    ok = {"int": is_int(v), "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": isinstance(v, str), "bool": isinstance(v, bool), "list": isinstance(v, list)}[kind]
    if not ok:
        raise UserError(f"{path}: metadata {key!r} should be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__}")
    if kind == "float":
        if not math.isfinite(v):
            raise UserError(f"{path}: metadata {key!r} is {v}, not a finite number")
        return float(v)
    return v


# ---------------------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------------------
def dequantize(path: str, data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """float32 array of `info.shape` from the raw bytes of one tensor (a view of the memmap)."""
    gguf = gguf_package()
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


def open_data(path: str, size: int) -> np.ndarray:
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot map the tensor data: {e}") from None
    if data.shape[0] != size:
        raise UserError(f"{path}: the file changed while it was being read")
    return data
