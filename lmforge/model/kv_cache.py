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

Sliding-window layers (Mistral; Gemma's local layers) never look further back than their window W, so they
keep only a ring of R slots (slot s at index s % R), as llama.cpp's SWA cache does: Gemma 3 at a 32k context
keeps 1 of its layers in 6 whole and the other 5 in a ring of a few hundred slots. R must hold, besides the
window, everything one forward call writes: a call writing C slots per row needs R >= W + C - 1, so that its
first query's window is not overwritten by its own later keys. Callers say C (`max_write`); without it every
layer keeps every slot. Which slot each ring index holds is computed, not stored (`ring_slots`).
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
        ring_layers: tuple[int, ...] = (),
        ring: int | None = None,
        window: int | None = None,
    ) -> None:
        self.max_len = max_len
        self.length = 0  # slots [0, length) hold valid entries for at least one sequence
        self.ring = ring if ring_layers and ring is not None and ring < max_len else None
        self.window = window if self.ring else None  # the sliding window the rings serve
        ring_layers = tuple(ring_layers) if self.ring else ()
        # layer -> (buffer, index in it): whole layers in k/v, sliding ones (if any) in the rings
        self._where = {layer: ("ring", ring_layers.index(layer)) if layer in ring_layers
                       else ("full", layer - sum(r < layer for r in ring_layers)) for layer in range(n_layers)}
        full = (n_layers - len(ring_layers), batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(full, dtype=dtype, device=device)
        self.v = torch.zeros(full, dtype=dtype, device=device)
        ringed = (len(ring_layers), batch_size, n_kv_heads, self.ring or 0, head_dim)
        self.k_ring = torch.zeros(ringed, dtype=dtype, device=device)
        self.v_ring = torch.zeros(ringed, dtype=dtype, device=device)
        # Per row, one past the furthest slot its rings were ever written at (padding and copied rows included):
        # what a ring may hold beyond the tokens a row is known by (`reusable`).
        self.reach = torch.zeros(batch_size, dtype=torch.long)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None, *, max_write: int | None = None,
                  **kw) -> "KVCache":
        """A cache for `config`'s model. `max_write`: the most slots one forward call writes per row; with it,
        sliding-window layers keep a ring of window + max_write - 1 slots instead of `max_len`."""
        max_len = max_len or config.context_length
        ring_layers = tuple(i for i in range(config.n_layers) if config.slides(i)) if max_write else ()
        ring = config.sliding_window + max_write - 1 if ring_layers else None
        return cls(config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim, ring_layers=ring_layers,
                   ring=ring, window=config.sliding_window, **kw)

    def rings(self, layer: int) -> bool:
        """True when `layer` keeps a ring of `self.ring` slots rather than every slot."""
        return self._where[layer][0] == "ring"

    def rows(self, stop: int, start: int = 0) -> "KVCache":
        """A cache over rows [start, stop) that shares this one's buffers (writes land here). It starts
        empty (length 0): its users give explicit per-row slots, and the first write sets its length."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.k_ring, view.v_ring = self.k_ring[:, start:stop], self.v_ring[:, start:stop]
        view.reach = self.reach[start:stop]  # a view: the rows' reach is recorded here
        view.max_len, view.length, view.ring, view.window, view._where = self.max_len, 0, self.ring, self.window, self._where
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (compacting the busy rows); a ring is
        copied whole."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.k_ring[:, dst] = self.k_ring[:, src]
        self.v_ring[:, dst] = self.v_ring[:, src]
        self.reach[dst] = self.reach[src]

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
        for buf in (self.k_ring, self.v_ring):
            buf[:, [a, b]] = buf[:, [b, a]]
        self.reach[[a, b]] = self.reach[[b, a]]

    def reusable(self, row: int, n: int) -> bool:
        """Can `row` serve a new sequence that shares its first `n` slots? Always, unless its rings have since
        been written so far past n (its own later tokens, padding, or a longer row's rings copied in) that part
        of the last `window` slots of those n is overwritten: slot s shares its index with s + ring."""
        return self.ring is None or int(self.reach[row]) - n <= self.ring - self.window

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
        if self.ring is not None:
            ends = slots.amax(-1).cpu() + 1 if slots.dim() == 2 else torch.full_like(self.reach, end)
            torch.maximum(self.reach, ends, out=self.reach)
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, n_kv, T, hd) at `slots` ((T,) or (B, T)) of `layer`; return all valid keys and
        values.

        The returned views cover slots [0, length): attention then needs a mask only for what is not yet
        causal (later slots of this very chunk) or is padding. A ring layer returns its ring's indices
        [0, min(length, ring)) instead, whose slots `ring_slots` gives.
        """
        kind, i = self._where[layer]
        K, V = (self.k_ring, self.v_ring) if kind == "ring" else (self.k, self.v)
        at = slots % self.ring if kind == "ring" else slots
        if slots.dim() == 2:  # per-row slots: row b writes its T entries at slots[b]
            index = at[:, None, :, None].expand(k.shape)
            K[i].scatter_(2, index, k.to(K.dtype))
            V[i].scatter_(2, index, v.to(V.dtype))
        else:
            K[i].index_copy_(2, at, k.to(K.dtype))
            V[i].index_copy_(2, at, v.to(V.dtype))
        n = min(self.length, self.ring) if kind == "ring" else self.length
        return K[i, :, :, :n], V[i, :, :, :n]

    def ring_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The slot each ring index holds once `slots` ((T,) or (B, T)) are written: (1, R') or (B, R') for
        R' = min(length, ring); -1 where nothing was written yet. Index i holds the latest slot s <= last with
        s % ring == i, where last is the row's last slot written (every slot up to it has been)."""
        n = min(self.length, self.ring)
        last = slots.amax(-1, keepdim=True) if slots.dim() == 2 else slots.max().reshape(1, 1)  # (B|1, 1)
        i = torch.arange(n, device=slots.device)
        held = last - (last - i) % self.ring
        return torch.where(held >= 0, held, -1)
