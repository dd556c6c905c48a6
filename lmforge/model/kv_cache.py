"""A preallocated key/value cache for incremental decoding.

Why preallocate: growing tensors with `torch.cat` every step allocates and copies the whole cache per
token; writing into a fixed buffer with `index_copy_` costs only the new entries (gpt-fast, vLLM).

Layout: one buffer per kind, `(n_layers, batch, n_kv_heads, max_len, head_dim)`. Every sequence of a batch
shares the *slot* axis (slot = step in the batch's timeline); where a sequence's own token positions
differ (left-padded prompts of different lengths), the caller passes positions and a padding mask
separately, so slots and positions are decoupled.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # slots [0, length) hold valid entries for at least one sequence

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None, **kw) -> "KVCache":
        return cls(config.n_layers, batch_size, config.n_kv_heads, max_len or config.context_length,
                   config.head_dim, **kw)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every entry (the buffers are reused, not reallocated)."""
        self.length = 0

    def advance(self, slots: torch.Tensor) -> int:
        """Record that `slots` (1-D, ascending) are about to be written; returns the new valid length."""
        end = int(slots[-1]) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache is full: slot {end - 1} >= capacity {self.max_len}")
        self.length = max(self.length, end)
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, n_kv, T, hd) at `slots` (T,) of `layer`; return all valid keys and values.

        The returned views cover slots [0, length): attention then needs a mask only for what is not yet
        causal (later slots of this very chunk) or is padding.
        """
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]
