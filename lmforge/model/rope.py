"""Rotary position embeddings (Su et al. 2021) and the ways released models stretch them to longer contexts.

Pure functions of a few numbers (rotated dims, base, scaling dict, context length), so that the model, the
importers and the tests compute the very same tables. Which scaling dicts are valid is the config's to say
(`lmforge.config.rope_scaling_problem`); these functions trust what it accepted.

- The rotation: each pair (i, i + R/2) of the first R dims of a head turns by angle position * freq_i (HF's
  half-split layout). R is the head's dims unless a model rotates only part of them (Phi-4-mini: 3/4).
- Scaling types: `linear` (position interpolation), `llama3` (per-band); the list is `config.ROPE_SCALING_TYPES`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None = None,
                        context_length: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies theta^(-2i/dim) for i < dim/2 after scaling, attention factor).

    The attention factor multiplies cos and sin (so both queries and keys): 1 for the plain and the
    interpolating types; the types that change the softmax's temperature with the stretch set it.

    - linear (Chen et al. 2023, "position interpolation"): every frequency divided by `factor`.
    - llama3: high frequencies (short wavelengths) are kept, low ones divided by `factor`, and the band in
      between interpolated smoothly, so that local word order is untouched while long-range positions
      stretch to the longer context.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor_out = 1.0
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = float(scaling["factor"])
        if kind == "linear":
            inv_freq = inv_freq / factor
        elif kind == "llama3":
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            orig = float(scaling.get("original_max_position_embeddings", 8192))
            wavelen = 2 * math.pi / inv_freq
            smooth = ((orig / wavelen) - low) / (high - low)
            scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
            between = (wavelen <= orig / low) & (wavelen >= orig / high)
            inv_freq = torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float(), factor_out


def rope_tables(dim: int, theta: float, scaling: dict[str, Any] | None, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (context_length, dim), halves repeated to match `rotate_half`, with the
    attention factor applied."""
    inv_freq, attention_factor = inverse_frequencies(dim, theta, scaling, context_length)
    t = torch.arange(context_length, dtype=torch.float32)
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
