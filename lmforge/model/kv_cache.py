"""A preallocated key/value cache for incremental decoding.

Why preallocate: growing tensors with `torch.cat` every step allocates and copies the whole cache per
token; writing into a fixed buffer with `index_copy_` costs only the new entries (gpt-fast, vLLM).

Layout: one buffer per kind, `(n_layers, batch, n_kv_heads, max_len, head_dim)`. Every sequence of a batch
shares the *slot* axis (slot = step in the batch's timeline); where a sequence's own token positions
differ (left-padded prompts of different lengths), the caller passes positions and a padding mask
separately, so slots and positions are decoupled.

Continuous batching (the server's scheduler) instead gives every *row* its own timeline: slots are then a
(B, T) tensor, one write position per row (its token positions), so a request can join a running batch in
any free row and leave it without moving the others. `rows(n)` is a view of the first n rows that shares
the buffers, so a step over the n busy rows reads and writes the one cache.
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

    def rows(self, stop: int, start: int = 0) -> "KVCache":
        """A cache over rows [start, stop) that shares this one's buffers (writes land here). It starts
        empty (length 0): its users give explicit per-row slots, and the first write sets its length."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len, view.length = self.max_len, 0
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (compacting the busy rows)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap_rows(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchange the first `len_a` slots of row `a` with the first `len_b` slots of row `b` (the
        scheduler keeps a row's content when another takes its place: see its prompt cache). One of the two
        goes through a temporary copy, so this costs about one and a half row copies."""
        if a == b:
            return
        k, v = self.k[:, a, :, :len_a].clone(), self.v[:, a, :, :len_a].clone()
        self.k[:, a, :, :len_b] = self.k[:, b, :, :len_b]
        self.v[:, a, :, :len_b] = self.v[:, b, :, :len_b]
        self.k[:, b, :, :len_a] = k
        self.v[:, b, :, :len_a] = v

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every entry (the buffers are reused, not reallocated)."""
        self.length = 0

    def mask(self, slots: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention mask (B|1, 1, T, S) for queries written at `slots`, True = may attend, where S is
        the valid length once they are written.

        (T,) slots share one timeline: a query sees the slots at or before its own (causal over slots);
        `key_mask` (B, >=S) then removes each row's padding (False), and a query at a padding slot still
        sees itself, because a softmax over no key at all is NaN, which would leak into later layers
        through its cached values. (B, T) slots give each row its own timeline: row b's slot j holds its
        position j, so a query sees exactly its row's slots up to its own, never what a finished request
        left further along the row.
        """
        S = max(self.length, int(slots.max()) + 1)
        keys = torch.arange(S, device=slots.device)
        if slots.dim() == 2:
            return (keys[None, None, :] <= slots[:, :, None])[:, None]  # (B, 1, T, S)
        mask = (keys[None, :] <= slots[:, None])[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            itself = (keys[None, :] == slots[:, None])[None, None]
            mask = (mask & key_mask[:, None, None, :S]) | itself  # (B, 1, T, S)
        return mask

    def advance(self, slots: torch.Tensor) -> int:
        """Record that `slots` ((T,) ascending, or (B, T) per row) are about to be written; returns the new
        valid length."""
        end = int(slots.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache is full: slot {end - 1} >= capacity {self.max_len}")
        self.length = max(self.length, end)
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, n_kv, T, hd) at `slots` ((T,) or (B, T)) of `layer`; return all valid keys and
        values.

        The returned views cover slots [0, length): attention then needs a mask only for what is not yet
        causal (later slots of this very chunk) or is padding.
        """
        if slots.dim() == 2:  # per-row slots: row b writes its T entries at slots[b]
            index = slots[:, None, :, None].expand(k.shape)
            self.k[layer].scatter_(2, index, k.to(self.k.dtype))
            self.v[layer].scatter_(2, index, v.to(self.v.dtype))
        else:
            self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]
