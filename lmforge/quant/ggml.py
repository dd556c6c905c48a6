"""GGML block types, decoded in PyTorch from the bytes a GGUF file stores.

A GGUF tensor is a run of fixed-size blocks: each block packs `block_size` values of one row into
`type_size` bytes (fp16 scales followed by 4/5/6/8-bit codes). Keeping those bytes as they are and decoding
only the rows a computation needs is what lets a 4-bit 7B model live in ~4 GB instead of ~28 GB of fp32.

The layouts follow the published GGML formats (ggml-quants.c, mirrored by gguf-py's `gguf/quants.py`); the
block and type sizes come from `gguf.GGML_QUANT_SIZES`, the one table of them. Every decoder here does the
same float32 operations in the same order as gguf-py's, so the results are bit-identical to
`gguf.quants.dequantize` (the tests hold both to exact equality). This is the plain, vectorised PyTorch
version, correct on any device; fused kernels that never materialise fp32 come in a later step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lmforge.errors import UserError

QK_K = 256  # values per super-block of the K-quants

# One byte per 2-bit / 4-bit field position, as small tensors built once.
_NIBBLES = torch.tensor([0, 4], dtype=torch.uint8)
_CRUMBS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BITS = torch.arange(8, dtype=torch.uint8)


def _f16(cols: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) float32: the little-endian fp16 they hold."""
    return cols.contiguous().view(torch.float16).float()


def _shifted(b: torch.Tensor, shifts: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Bytes (n, groups*width) -> (n, groups, len(shifts), width): each byte shifted right by each shift,
    the order in which GGML lays out the fields packed into one byte."""
    return b.reshape(b.shape[0], groups, 1, width) >> shifts.to(b.device).reshape(1, 1, -1, 1)


def _bits_of(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) of its bits, bit 0 first."""
    return ((qh.unsqueeze(-1) >> _BITS.to(qh.device)) & 1).reshape(qh.shape[0], 32)


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """Bytes (n, m) -> (n, m // half, 2 * half): per run of `half` bytes, the low nibbles then the high ones."""
    n = qs.shape[0]
    return (_shifted(qs, _NIBBLES, qs.shape[1] // half, half) & 0x0F).reshape(n, -1, 2 * half)


# ---- one decoder per type: blocks (n, type_size) uint8 -> (n, block_size) float32 --------------------


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | 32 x int8
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | 16 bytes: value j in the low nibble of byte j, value j+16 in its high nibble; offset 8
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | m fp16 | 16 bytes of nibbles as Q4_0, no offset
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """The 5-bit codes of Q5_0/Q5_1: low nibbles as Q4_0, the fifth bit of value j is bit j of qh."""
    return _nibbles(qs, 16).reshape(qs.shape[0], 32) | (_bits_of(qh) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | qh 4 bytes | 16 bytes of low nibbles; offset 16
    q = _q5(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | m fp16 | qh 4 bytes | 16 bytes of low nibbles
    return _f16(b[:, :2]) * _q5(b[:, 4:8], b[:, 8:]).float() + _f16(b[:, 2:4])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins (n, 8) each: bytes 0-3
    hold scales 0-3 (low 6 bits), 4-7 mins 0-3, and 8-11 the low 4 bits of scales/mins 4-7, whose top two
    bits sit in the spare top bits of bytes 0-3 / 4-7."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales 16 (low nibble scale, high nibble min) | qs 64 (2-bit) | d fp16 | dmin fp16
    n = b.shape[0]
    s = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (s & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (s >> 4).float()).reshape(n, 16, 1)
    q = (_shifted(b[:, 16:80], _CRUMBS, 2, 32) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask 32 | qs 64 (low 2 bits) | scales 12 (16 x 6-bit, offset 32) | d fp16
    n = b.shape[0]
    s = b[:, 96:108]
    lo = _shifted(s[:, :8], _NIBBLES, 1, 8).reshape(n, 16)
    hi = _shifted(s[:, 8:], _CRUMBS, 1, 4).reshape(n, 16)
    sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32
    dl = (_f16(b[:, 108:110]) * sc.float()).reshape(n, 16, 1)
    ql = (_shifted(b[:, 32:96], _CRUMBS, 2, 32).reshape(n, 16, 16) & 3).to(torch.int8)
    qh = (_shifted(b[:, :32], _BITS, 1, 32).reshape(n, 16, 16) & 1) ^ 1  # a set bit means no -4
    q = (ql - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales 12 | qs 128: eight sub-blocks of 32, each d*sc*q - dmin*m
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales 12 | qh 32 (bit i of byte j: fifth bit of value j of sub-block i) | qs 128
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    qh = (_shifted(b[:, 16:48], _BITS, 1, 32) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql 128 (low nibbles) | qh 64 (high 2 bits) | scales 16 x int8 | d fp16; offset 32
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = (_shifted(b[:, 128:192], _CRUMBS, 2, 32) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * sc).reshape(n, 16, 1)
    return (d * q).reshape(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return _f16(b)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()  # exact: bf16 is the top half of an fp32


DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16_values, "BF16": _bf16,
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
SUPPORTED = tuple(DECODERS)


# ---- the public face --------------------------------------------------------------------------------


def qtype_name(qtype: int | str) -> str:
    """The GGML type's name ("Q4_0") for a GGUF type id (2), a name in any case, or a
    `gguf.GGMLQuantizationType`; a one-line UserError for an unknown or unsupported one."""
    from gguf import GGMLQuantizationType

    try:
        if isinstance(qtype, str):
            name = GGMLQuantizationType[qtype.strip().upper()].name
        else:
            name = GGMLQuantizationType(int(qtype)).name
    except (KeyError, ValueError, TypeError):
        raise UserError(f"unknown GGML type {qtype!r} (supported: {', '.join(SUPPORTED)})") from None
    if name not in DECODERS:
        raise UserError(f"GGML type {name} is not supported yet (supported: {', '.join(SUPPORTED)})")
    return name


def block_sizes(qtype: int | str) -> tuple[int, int]:
    """(values per block, bytes per block) of a supported type, from `gguf.GGML_QUANT_SIZES`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name(qtype)]]


def packed_nbytes(qtype: int | str, shape: tuple[int, ...]) -> int:
    """How many bytes a tensor of `shape` (PyTorch order: the last dimension is the packed row) takes in
    this type; a one-line UserError when its rows are not whole blocks."""
    name = qtype_name(qtype)
    block, size = block_sizes(name)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise UserError(f"a {name} tensor needs a shape of non-negative sizes, got {shape}")
    if shape[-1] % block:
        raise UserError(f"a {name} row of {shape[-1]} values is not a whole number of {block}-value blocks "
                        f"(shape {shape})")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def dequantize(packed: torch.Tensor, qtype: int | str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that `packed` (uint8: the tensor's raw bytes as a GGUF file stores
    them, any shape, on any device) encodes in GGML type `qtype`. Bit-identical to
    `gguf.quants.dequantize`; a one-line UserError for an unsupported type or a byte count that does not
    fit the shape."""
    name = qtype_name(qtype)
    want = packed_nbytes(name, shape)
    if packed.dtype != torch.uint8:
        raise UserError(f"packed {name} weights must be raw bytes (torch.uint8), got {packed.dtype}")
    if packed.numel() != want:
        raise UserError(f"a {name} tensor of shape {tuple(shape)} takes {want} bytes, got {packed.numel()}")
    _, size = block_sizes(name)
    blocks = packed.reshape(-1, size)
    return DECODERS[name](blocks).reshape(tuple(shape))


def quantize(weight: torch.Tensor, qtype: int | str) -> torch.Tensor:
    """`weight` (float, rows of whole blocks) packed into GGML type `qtype` as uint8 bytes, on the CPU.
    The K-quants Q4_K, Q5_K and Q6_K go to lmforge's own quantizers (`lmforge.quant.kquant`: gguf-py only
    decodes them); F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 to gguf-py's reference quantizers
    (numpy). Any other type is a one-line UserError."""
    from gguf import GGMLQuantizationType
    from gguf import quants

    from lmforge.quant.kquant import KQUANTS, quantize_k

    name = qtype_name(qtype)
    packed_nbytes(name, tuple(weight.shape))  # rows of whole blocks, or a one-line error
    if name in KQUANTS:
        return quantize_k(weight, name)
    try:
        out = quants.quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType[name])
    except NotImplementedError:
        raise UserError(f"lmforge cannot quantize to {name} (it can: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
                        f"Q5_1, {', '.join(KQUANTS)})") from None
    return torch.from_numpy(out.copy()).view(torch.uint8).reshape(-1)
