"""Batches for `fit()` from encoded chat examples: what SFT and preference batches share.

`lmforge.data.sft.SFTBatches` and `lmforge.data.preferences.PreferenceBatches` implement
`lmforge.train.loop.DataSource`. A batch is a pure function of ``(seed, step, micro)``: the examples are
visited in a fresh permutation per epoch drawn from ``np.random.default_rng([seed, epoch])``, and the k-th
example of the whole run is found by arithmetic, so a resumed run sees exactly the batches it would have
seen. Each batch is right-padded to its longest example; labels are already shifted for next-token
prediction (``labels[:, t]`` is the target of position ``t``). There is no packing: examples packed into one
row would attend to each other unless the attention mask were made block-diagonal, and with right padding
plus the causal mask a real token never attends to padding (padding only ever comes after it), so padded
batches are simply correct. The price is compute spent on padding, which is small for chat data of similar
lengths.

**Length grouping** (`group_by_length=True`, as transformers' `group_by_length`): the price of padding is
not small when lengths vary, as with grounded prompts (80 to 400 tokens): a random batch of 16 is padded
to its longest, and ~40% of the compute is padding. With grouping, each window of `LENGTH_GROUP` batches'
worth of the epoch's permutation is sorted by length and cut into batches, and the window's batches are
visited in a seeded random order: batches hold examples of similar length, and which examples are seen
when stays random at the scale of windows. Still a pure function of ``(seed, step, micro)``.

**The pad == eos trap.** Many tokenizers use their EOS as padding. Masking the loss by comparing ids
with the pad id would then also mask every real EOS, and the model would never learn to stop. Here
padding is masked *by position* (everything past an example's length is `IGNORE_INDEX`); ids are never
compared with the pad id.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.errors import UserError

__all__ = ["IGNORE_INDEX", "LENGTH_GROUP", "ExampleBatches", "EpochSampler", "check_batching", "shift_and_pad"]

# The label of a token that is not a target. It must equal `lmforge.train.losses.IGNORE_INDEX`, the loss's
# default ignore_index (tests/data checks the labels against it); it is defined here because data/ does
# not import train/.
IGNORE_INDEX = -100
#: Batches per length-sorted window with `group_by_length`.
LENGTH_GROUP = 16


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def shift_and_pad(ids_rows: Sequence[Sequence[int]], label_rows: Sequence[Sequence[int]], pad_id: int,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, lengths): inputs ids[:-1], targets labels[1:], right-padded to `width` (default:
    the longest row). Padding is masked by position -- labels past a row's length are IGNORE_INDEX --
    never by comparing ids with `pad_id`, which may equal a real EOS (the pad == eos trap)."""
    inputs = [r[:-1] for r in ids_rows]
    targets = [r[1:] for r in label_rows]
    lengths = torch.tensor([len(r) for r in inputs], dtype=torch.long)
    w = max(len(r) for r in inputs) if width is None else width
    return _pad(inputs, w, pad_id), _pad(targets, w, IGNORE_INDEX), lengths


class EpochSampler:
    """Which example is the k-th of the run: epoch k // n is a permutation drawn from rng([seed, epoch]).
    A pure function of (seed, k); the small cache only saves recomputing permutations."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache[epoch] = perm
        return perm

    def indices(self, first: int, count: int) -> list[int]:
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(first, first + count)]


def check_batching(n: int, batch_size: int, grad_accum: int, what: str) -> None:
    if n == 0:
        raise UserError(f"no {what} to train on (all were dropped or the data is empty)")
    for name, v in (("batch size", batch_size), ("gradient accumulation", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"the {name} must be a positive integer, got {v!r}")


class ExampleBatches:
    """The `DataSource` machinery both batch kinds share: the micro-batch (step, micro) holds the examples
    number ``(step * grad_accum + micro) * batch_size ...`` of an endless sequence of seeded per-epoch
    permutations, so batches are a pure function of (seed, step, micro); `val_batches()` covers
    `val_examples` once, in order, and is built once.

    A subclass names its examples (`what`, for errors), counts the input tokens of one example
    (`input_tokens`, for `tokens_per_batch`) and collates a list of examples into tensors (`_collate`).
    """

    what = "examples"

    def __init__(self, examples: Sequence[Any], *, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 val_examples: Sequence[Any] = (), pad_id: int | None = 0,
                 device: torch.device | str | None = None, group_by_length: bool = False) -> None:
        check_batching(len(examples), batch_size, grad_accum, self.what)
        self.examples, self.val_examples = list(examples), list(val_examples)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.device = torch.device(device) if device is not None else None
        self._sampler = EpochSampler(len(self.examples), seed)
        self.group_by_length = group_by_length
        self._lengths = [self.input_tokens(e) for e in self.examples]
        mean_len = sum(self._lengths) / len(self.examples)
        self.tokens_per_batch = max(1, round(batch_size * mean_len))  # an average: rows vary in length
        self._val: list[dict] | None = None

    @staticmethod
    def input_tokens(example: Any) -> int:
        """Tokens the model reads for `example` (all its sequences, each but its last id)."""
        raise NotImplementedError

    def _collate(self, items: Sequence[Any], index: Sequence[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps to see every training example once."""
        return math.ceil(len(self.examples) / (self.batch_size * self.grad_accum))

    def _batch(self, items: Sequence[Any], index: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self._collate(items, index)
        return {k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        j, b = step * self.grad_accum + micro, self.batch_size  # the j-th batch of the run
        if not self.group_by_length:
            idx = self._sampler.indices(j * b, b)
        else:
            window, g = divmod(j, LENGTH_GROUP)
            pool = self._sampler.indices(window * LENGTH_GROUP * b, LENGTH_GROUP * b)
            pool.sort(key=lambda i: (self._lengths[i], i))
            slot = int(np.random.default_rng([self.seed, window, 1]).permutation(LENGTH_GROUP)[g])
            idx = pool[slot * b:(slot + 1) * b]
        return self._batch([self.examples[i] for i in idx], idx)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val is None:
            n, b = len(self.val_examples), self.batch_size
            self._val = [self._batch(self.val_examples[i:i + b], range(i, min(i + b, n))) for i in range(0, n, b)]
        return self._val
