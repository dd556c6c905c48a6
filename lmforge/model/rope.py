"""Rotary position embeddings (Su et al. 2021) and the ways released models stretch them to longer contexts.

Pure functions of a few numbers (rotated dims, base, scaling dict, context length), so that the model, the
importers and the tests compute the very same tables. Which scaling dicts are valid is the config's to say
(`lmforge.config.rope_scaling_problem`); these functions trust what it accepted.

- The rotation: each pair (i, i + R/2) of the first R dims of a head turns by angle position * freq_i (HF's
  half-split layout). R is the head's dims unless a model rotates only part of them (Phi-4-mini: 3/4).
- Scaling types (the list is `config.ROPE_SCALING_TYPES`): `linear` (position interpolation), `llama3`
  (per band), `yarn` (per band, and a sharper softmax), `longrope` (Phi-3.5/4: one divisor per frequency,
  learned; `su` is its old name). The formulas are those of transformers' `modeling_rope_utils`, which the
  tests compare against on several configs (tests/model/test_rope.py).
- LongRoPE has two sets of divisors: the short ones while a sequence fits the original (pretraining)
  context, the long ones beyond it. `longrope_short_length` says up to which length the short table serves;
  the model keeps both tables and picks one per call (`GPT.forward`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

LONGROPE = ("longrope", "su")


def scaling_type(scaling: dict[str, Any] | None) -> str | None:
    """The scaling dict's type under either spelling (`type`, or transformers' `rope_type`); None for none."""
    return scaling.get("type", scaling.get("rope_type")) if scaling else None


def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None = None,
                        context_length: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies theta^(-2i/dim) for i < dim/2 after scaling, attention factor).

    `context_length` is the model's (transformers' max_position_embeddings), from which LongRoPE derives its
    factor when the dict has none; `seq_len` (default: context_length) is the length the frequencies will
    serve, which picks LongRoPE's short or long divisors. The attention factor multiplies cos and sin (so
    both queries and keys, hence the scores by its square): 1 for the plain and the interpolating types.

    - linear (Chen et al. 2023, "position interpolation"): every frequency divided by `factor`.
    - llama3: high frequencies (short wavelengths) are kept, low ones divided by `factor`, and the band in
      between interpolated smoothly, so that local word order is untouched while long-range positions
      stretch to the longer context.
    - yarn (Peng et al. 2023): the same idea with the band set by how many turns a frequency makes over the
      original context (beta_fast and beta_slow turns), plus an attention factor 0.1 ln(factor) + 1 that
      sharpens the softmax the stretch flattened (DeepSeek's mscale / mscale_all_dim give a ratio of two).
    - longrope (Ding et al. 2024): each frequency divided by its own searched factor (`short_factor` up to
      the original context, `long_factor` beyond it), attention factor sqrt(1 + ln(factor) / ln(original)).
    """
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # theta^(2i/dim): the wavelengths / 2pi
    inv_freq = 1.0 / base
    kind = scaling_type(scaling)
    if kind is None:
        return inv_freq.float(), 1.0
    if kind in LONGROPE:
        return _longrope(base, scaling, context_length, seq_len if seq_len is not None else context_length)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        between = (wavelen <= orig / low) & (wavelen >= orig / high)
        return torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float(), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, inv_freq, factor, scaling, context_length)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def _yarn(dim: int, theta: float, inv_freq: torch.Tensor, factor: float, scaling: dict[str, Any],
          context_length: int | None) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies that turn more than beta_fast times over the original context are kept, those that
    turn fewer than beta_slow times are divided by `factor`, and the dims in between ramp linearly."""
    orig = scaling.get("original_max_position_embeddings") or context_length

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_turning(turns: float) -> float:
        """The (fractional) dim index whose frequency makes `turns` full turns over the original context."""
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0: kept, 1: divided
    return (inv_freq * (1 - ramp) + inv_freq / factor * ramp).float(), float(attention)


def _longrope(base: torch.Tensor, scaling: dict[str, Any], context_length: int | None,
              seq_len: int | None) -> tuple[torch.Tensor, float]:
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # Phi-3/4 files give none: the stretch from the original context to the model's
        if context_length is None:
            raise ValueError("longrope without a factor needs the context length")
        factor = context_length / orig
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    divisors = scaling["long_factor"] if seq_len is not None and seq_len > orig else scaling["short_factor"]
    return (1.0 / (torch.tensor(divisors, dtype=torch.float64) * base)).float(), float(attention)


def longrope_short_length(scaling: dict[str, Any] | None, context_length: int) -> int | None:
    """For LongRoPE that stretches past its original context: that original length, up to which (a sequence
    whose last position is below it) the short divisors apply. None when one table serves every length."""
    if scaling_type(scaling) not in LONGROPE:
        return None
    orig = scaling["original_max_position_embeddings"]
    return orig if orig < context_length else None


def rope_tables(dim: int, theta: float, scaling: dict[str, Any] | None, context_length: int,
                rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (rows, dim) for positions 0..rows-1 (default: the whole context), halves repeated
    to match `rotate_half`, with the attention factor applied. `rows` is also the length the frequencies
    serve (LongRoPE's short table is `rows=longrope_short_length(...)`)."""
    rows = context_length if rows is None else rows
    inv_freq, attention_factor = inverse_frequencies(dim, theta, scaling, context_length, seq_len=rows)
    t = torch.arange(rows, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, dim)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = cos.shape[-1] dims of each head in pairs (i, i + R/2); the rest pass through.

    x: (B, H, T, D); cos/sin: (B or 1, 1, T, R). The dot product of a rotated query and key then depends
    only on their distance, which is what lets attention generalise across positions.
    """
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    rot, rest = x[..., :R], x[..., R:]
    return torch.cat([(rot * cos + rotate_half(rot) * sin).to(x.dtype), rest], dim=-1)
