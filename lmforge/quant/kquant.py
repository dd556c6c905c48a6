"""Quantizers for the GGML K-quants Q4_K, Q5_K and Q6_K: float rows -> the bytes a GGUF file stores.

gguf-py only *decodes* K-quants, and those are the types of the Q4_K_M / Q5_K_M / Q6_K files people
download, so `lmforge quantize` needs its own encoders. The block layouts are the published ones (the
ones `lmforge.quant.ggml` decodes); the way scales are chosen follows the idea of llama.cpp's reference
quantizers, re-derived here and vectorised over every block of a tensor at once:

* Q4_K / Q5_K: a 256-value super-block is eight 32-value sub-blocks, each decoded as `d*sc*q - dmin*m`
  with q in 0..15 (0..31 for Q5_K). For each sub-block we try a small grid of scales (the "stretch" that
  maps max-min onto a slightly shorter or longer code range, measured from the best min found so far),
  fit scale and min by weighted least squares to the codes each one gives, and keep the one with the
  smallest weighted squared error. The weights (`rms(sub-block) + |x|`) spend precision where the large
  values are, as llama.cpp does. The eight scales and eight mins are then quantized to 6 bits against one
  fp16 `d` and one fp16 `dmin` per super-block, and the codes are recomputed against the scales actually
  stored (so rounding of the scales is compensated rather than compounded).
* Q6_K: sixteen 16-value sub-blocks, symmetric codes in -32..31 times an int8 scale times one fp16 `d`.
  Each sub-block's scale is the best (error weighted by x^2) of nineteen candidate maps of its largest
  magnitude onto -32 +- 0.9; the sub-block scales are then rounded to int8 against `d` and the codes
  recomputed.

Everything runs in float32 on the CPU through PyTorch, a chunk of blocks at a time, so memory stays
bounded and a 135M-parameter model quantizes in seconds to tens of seconds, not minutes. The search is
the same as llama.cpp's reference quantizer's, so the bytes mostly agree with its (on Gaussian data
~99.7 % of Q4_K bytes, ~98 % of Q5_K, ~99.8 % of Q6_K; the rest differ where float sums taken in another
order tip a near-tie). The round trip is exact in the sense that matters: the bytes decode, through
gguf-py's own `gguf.quants.dequantize`, to what `lmforge.quant.ggml.dequantize` gives, and the error
equals llama.cpp's (`bench/kquant_error.py`).
"""

from __future__ import annotations

from typing import Callable

import torch

from lmforge.errors import UserError

QK_K = 256  # values per super-block
_CHUNK = 8192  # super-blocks per vectorised step: ~2M values, a few tens of MB of temporaries
_EPS = 1e-15  # below this a group counts as all zeros (llama.cpp's GROUP_MAX_EPS)


def _rows_to_blocks(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Any float tensor whose last dimension is a whole number of 256-value super-blocks -> (n, 256) f32."""
    if weight.ndim == 0 or weight.shape[-1] % QK_K:
        raise UserError(f"{name} needs rows of a whole number of {QK_K}-value super-blocks, got shape "
                        f"{tuple(weight.shape)}")
    x = weight.detach().to("cpu", torch.float32).reshape(-1, QK_K)
    if not torch.isfinite(x).all():
        raise UserError(f"cannot quantize to {name}: the tensor holds NaN or infinite values")
    return x


def _fp16_bytes(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float32 -> (the fp16 values as float32, their (n, 2) little-endian bytes)."""
    h = v.to(torch.float16)
    return h.float(), h.view(torch.uint8).reshape(-1, 2) if h.numel() else torch.empty(0, 2, dtype=torch.uint8)


# ---- Q4_K / Q5_K: asymmetric sub-blocks with 6-bit scales and mins ----------------------------------


def _fit_scale_min(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `x` (..., g): the (scale >= 0, min <= 0) with codes q = clamp(round((x - min) / scale),
    0, nmax) that minimise sum w (scale*q + min - x)^2, w = rms(group) + |x|, over a grid of nstep + 1
    stretches of the range plus the plain min/max map. Returns (scale, -min), each shaped x.shape[:-1]."""
    w = x.square().mean(-1, keepdim=True).sqrt() + x.abs()
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)  # the min is never above zero: zero stays representable
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    wx = w * x
    sw, swx, swx2 = w.sum(-1, keepdim=True), wx.sum(-1, keepdim=True), (wx * x).sum(-1, keepdim=True)

    def error(s, m, sl, sl2, sxl):
        # sum w (s q + m - x)^2, expanded into the sums already at hand (no pass over the values)
        return swx2 + s * s * sl2 + m * m * sw + 2 * s * m * sl - 2 * s * sxl - 2 * m * swx

    def sums(q):
        wq = w * q
        return wq.sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True), (wq * x).sum(-1, keepdim=True)

    # the plain map: min..max onto 0..nmax
    scale = span / nmax
    best_min = lo.clone()
    best_err = error(scale, lo, *sums(torch.clamp(torch.round((x - lo) * (nmax / span)), 0, nmax)))
    for step in range(nstep + 1):
        # Each candidate stretches the range from the best min found so far (not the first one): a better
        # min moves the grid of the candidates after it, as in llama.cpp's search, which this matches.
        reach = hi - best_min
        live = reach > 0
        reach = torch.where(live, reach, torch.ones_like(reach))
        q = torch.clamp(torch.round((x - best_min) * ((rmin + rdelta * step + nmax) / reach)), 0, nmax)
        sl, sl2, sxl = sums(q)
        det = sw * sl2 - sl * sl
        ok = (det > 0) & live
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - swx * sl) / det
        m = (sl2 * swx - sl * sxl) / det
        pos = m > 0  # a positive min would lose exact zeros: refit the scale alone with min = 0
        s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = error(s, m, sl, sl2, sxl)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        best_min = torch.where(better, m, best_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale).clamp(min=0.0)
    return scale.squeeze(-1), (-best_min).squeeze(-1)


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 8) non-negative -> (6-bit codes (n, 8), fp16 super-scale as f32 (n,), its bytes (n, 2)):
    the largest value maps to 63."""
    top = values.amax(-1)
    inv = torch.where(top > 0, 63.0 / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    codes = torch.clamp(torch.round(values * inv.unsqueeze(-1)), 0, 63).to(torch.uint8)
    d, d_bytes = _fp16_bytes(top / 63.0)
    return codes, d, d_bytes


def _pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (n, 8) -> the 12 bytes Q4_K/Q5_K store: bytes 0-3 scales 0-3, 4-7 mins
    0-3, 8-11 the low nibbles of scale/min 4-7; the top two bits of scale/min 4-7 ride in bits 6-7 of
    bytes 0-3 / 4-7."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], 1)


def _affine_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K shared part for blocks x (n, 256): (codes (n, 8, 32) uint8, d bytes, dmin bytes, 12 scale bytes)."""
    n = x.shape[0]
    g = x.reshape(n, 8, 32)
    scale, neg_min = _fit_scale_min(g, nmax, rmin, 0.1, nstep)
    sc, d, d_bytes = _six_bit(scale)
    mn, dmin, dmin_bytes = _six_bit(neg_min)
    ds = (d.unsqueeze(-1) * sc.float()).unsqueeze(-1)  # (n, 8, 1): the scales as stored
    dm = (dmin.unsqueeze(-1) * mn.float()).unsqueeze(-1)
    safe = torch.where(ds != 0, ds, torch.ones_like(ds))
    q = torch.where(ds != 0, torch.clamp(torch.round((g + dm) / safe), 0, nmax), torch.zeros_like(g))
    return q.to(torch.uint8), d_bytes, dmin_bytes, _pack_scales(sc, mn)


def _nibble_pairs(q: torch.Tensor) -> torch.Tensor:
    """Codes (n, 8, 32) (low 4 bits used) -> 128 bytes: sub-block 2k in the low nibbles of bytes
    32k..32k+31, sub-block 2k+1 in their high nibbles."""
    q = q & 0x0F
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], 128)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales 12 | qs 128
    q, d, dmin, scales = _affine_k(x, 15, -1.0, 20)
    return torch.cat([d, dmin, scales, _nibble_pairs(q)], 1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales 12 | qh 32 (bit i of byte j: bit 4 of value j of sub-block i) | qs 128
    q, d, dmin, scales = _affine_k(x, 31, -0.5, 15)
    bits = ((q >> 4) & 1).to(torch.int32) << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)
    qh = bits.sum(1).to(torch.uint8)  # (n, 32)
    return torch.cat([d, dmin, scales, qh, _nibble_pairs(q)], 1)


# ---- Q6_K: symmetric 16-value sub-blocks, int8 scales -------------------------------------------------


def _fit_symmetric(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Per group of `x` (..., g): the scale s (signed) with codes clamp(round(x / s), -nmax, nmax - 1)
    minimising sum x^2 (s*q - x)^2 over 19 maps of the largest-magnitude value onto -(nmax + 0.1 k),
    k = -9..9, with s refitted by least squares for each. 0 for an all-zero group."""
    idx = x.abs().argmax(-1, keepdim=True)
    peak = torch.gather(x, -1, idx)  # the signed value of largest magnitude
    zero = peak.abs() < _EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    best_s = torch.zeros_like(peak)
    best = torch.full_like(peak, -1.0)  # maximise sumlx^2 / suml2 (= the error reduction)
    for k in [0, *range(-9, 0), *range(1, 10)]:
        q = torch.clamp(torch.round(x * (-(nmax + 0.1 * k) / peak)), -nmax, nmax - 1)
        slx, sl2 = (w * x * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        ok = sl2 > 0
        s = slx / torch.where(ok, sl2, torch.ones_like(sl2))
        gain = torch.where(ok, s * slx, torch.full_like(s, -1.0))
        better = gain > best
        best = torch.where(better, gain, best)
        best_s = torch.where(better, s, best_s)
    return torch.where(zero, torch.zeros_like(best_s), best_s).squeeze(-1)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    # ql 128 | qh 64 | scales 16 x int8 | d fp16
    n = x.shape[0]
    g = x.reshape(n, 16, 16)
    s = _fit_symmetric(g, 32)  # (n, 16)
    idx = s.abs().argmax(-1, keepdim=True)
    top = torch.gather(s, -1, idx).squeeze(-1)  # the signed sub-scale of largest magnitude -> int8 -128
    empty = top.abs() < _EPS
    inv = torch.where(empty, torch.zeros_like(top), -128.0 / torch.where(empty, torch.ones_like(top), top))
    d, d_bytes = _fp16_bytes(torch.where(empty, torch.zeros_like(top), 1.0 / torch.where(empty, torch.ones_like(inv), inv)))
    sc = torch.clamp(torch.round(s * inv.unsqueeze(-1)), -128, 127)
    ds = (d.unsqueeze(-1) * sc).unsqueeze(-1)  # (n, 16, 1) as stored
    safe = torch.where(ds != 0, ds, torch.ones_like(ds))
    q = torch.where(ds != 0, torch.clamp(torch.round(g / safe), -32, 31), torch.zeros_like(g)) + 32
    q = q.to(torch.uint8).reshape(n, 2, 4, 32)  # per 128-value half: four runs of 32
    lo, hi = q & 0x0F, q >> 4
    ql = torch.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2).reshape(n, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat([ql, qh, scales, d_bytes], 1)
    out[empty] = 0  # an all-zero super-block is all zero bytes (d = +0.0)
    return out


_BLOCKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks, "Q6_K": _q6_k_blocks,
}
KQUANTS = tuple(_BLOCKS)


def quantize_k(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """`weight` (any float tensor whose rows are whole 256-value super-blocks) packed as GGML `qtype`
    ("Q4_K", "Q5_K" or "Q6_K"): a flat uint8 tensor of the bytes a GGUF file stores, row after row.
    A one-line UserError for another type, a row that is not whole super-blocks, or NaN/inf values."""
    name = str(qtype).upper()
    if name not in _BLOCKS:
        raise UserError(f"no K-quant quantizer for {qtype!r} (have: {', '.join(KQUANTS)})")
    x = _rows_to_blocks(weight, name)
    encode = _BLOCKS[name]
    with torch.no_grad():
        parts = [encode(x[i:i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts).reshape(-1)


def quantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes of `weight` (see `quantize_k`): 4.5 bits per value."""
    return quantize_k(weight, "Q4_K")


def quantize_q5_k(weight: torch.Tensor) -> torch.Tensor:
    """Q5_K bytes of `weight` (see `quantize_k`): 5.5 bits per value."""
    return quantize_k(weight, "Q5_K")


def quantize_q6_k(weight: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes of `weight` (see `quantize_k`): 6.5625 bits per value."""
    return quantize_k(weight, "Q6_K")
