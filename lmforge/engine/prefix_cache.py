"""The scheduler's prompt cache: which tokens each KV-cache row holds, and moving rows to reuse them.

A chat re-sends the whole conversation every turn, and many requests share a system prompt: reading those
tokens again is most of a long chat's time to first token on a CPU. So the scheduler (engine/scheduler.py)
does not wipe a request's row when it ends: the row is *parked*, still holding its prompt and answer (every
token written to the cache, i.e. up to its position), and a new request whose prompt shares a prefix of at
least `MIN_REUSE` tokens with a parked row -- or with a busy row, whose prompt never changes while it runs
-- gets those keys and values and reads only the rest (`prompt[L:]` at slots L.., always at least its last
token, whose logits choose the first answer token). The source row is used in place when it is the row the
request lands in anyway, else its first L slots are copied (a memcpy: a few MB at most, where reading the
same tokens streams every weight of the model once per chunk). What a newcomer displaces is saved into the
least recently used free row when it is worth more (`ParkedRows`), and a leaving row is *swapped* with the
last busy row instead of overwritten by it, so its content survives in the row that becomes free. Long
prompts gain the same way: only their uncached part counts against the chunk budget, and a filling group's
members each start at their own cached length. Prompts arriving together that share a long uncached prefix
(an n > 1 request's copies, clients with one system prompt) do not all read it: the first does, the others
wait a turn and copy it (`MIN_SHARED`). Any failure forgets every parked row (the cache may be what failed).

This is llama.cpp's per-slot `cache_prompt` generalised to any row, rather than vLLM's block table or
SGLang's radix tree: those share blocks between sequences but need attention over a block table (paged
kernels), while here every row is one contiguous timeline that the plain attention reads as is; the price
is that a free row remembers one conversation, so at most `max_batch` - busy ones are remembered, least
recently used first to go. The outputs are those without the cache up to floating-point rounding: keys and
values written one token at a time while decoding differ in the last bits from a batched prefill's, which
can flip a greedy near-tie (fp32 greedy answers were identical in every test).

`ParkedRows` holds the token lists of the parked rows and decides which to give up first (plain Python, no
tensors); `PromptCache` finds the row a new prompt shares most with and moves rows in the `KVCache`
accordingly. The scheduler owns the batch (which rows are busy, free or filling) and tells `PromptCache`
which are which; it lives in its own module so that batching and caching read separately.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from lmforge.model.kv_cache import KVCache

# Shorter matches are not worth moving a row for: every chat prompt starts with the same few template
# tokens (BOS, a role header), which say nothing about the rest and save almost no reading.
MIN_REUSE = 8
# A waiting request that shares at least this many not-yet-cached prompt tokens with one admitted in the
# same turn (the n copies of an n > 1 request, clients arriving together with one system prompt) waits a
# turn and then copies them from that one's row, rather than reading them alongside it.
MIN_SHARED = 32


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """The number of leading tokens `a` and `b` share, at most `limit`.

    The scheduler asks this for every waiting prompt against every row, each loop turn, so it must cost
    what the match is long, not what the prompts are: list slices compare in C, in slices of doubling
    length from 16 tokens (most rows differ within a chat template's first tokens), and the slice holding
    the first difference is then halved until it is found; about 2 x the match length in comparisons."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    lo, step = 0, 16
    while lo < n:
        hi = min(n, lo + step)
        if a[lo:hi] == b[lo:hi]:
            lo, step = hi, step * 2
            continue
        while hi - lo > 1:  # a[:lo] == b[:lo]; the first difference is in [lo, hi)
            mid = (lo + hi) // 2
            if a[lo:mid] == b[lo:mid]:
                lo = mid
            else:
                hi = mid
        return lo
    return max(n, 0)


class ParkedRows:
    """What each cache row holds while no request uses it: `tokens[row]` (their keys and values are at slots
    0..len-1 of that row), or None when the row holds nothing usable. `stamp[row]` orders rows by last use,
    so the least recently used content is the first given up."""

    def __init__(self, n_rows: int) -> None:
        self.tokens: list[list[int] | None] = [None] * n_rows
        self.stamp = [0] * n_rows
        self._tick = 0

    def length(self, row: int) -> int:
        t = self.tokens[row]
        return len(t) if t else 0

    def park(self, row: int, tokens: list[int]) -> None:
        """Row `row` now holds `tokens` (a request just left it), the most recently used content."""
        self.tokens[row] = tokens or None
        self.touch(row)

    def touch(self, row: int) -> None:
        """Row `row`'s content was just reused: it is worth keeping longer."""
        self._tick += 1
        self.stamp[row] = self._tick

    def drop(self, row: int) -> None:
        """Row `row` is about to be overwritten (a request takes it)."""
        self.tokens[row] = None

    def copy(self, src: int, dst: int) -> None:
        """The cache copied row `src`'s content into row `dst`."""
        self.tokens[dst], self.stamp[dst] = self.tokens[src], self.stamp[src]

    def swap(self, a: int, b: int) -> None:
        """The cache exchanged the contents of rows `a` and `b`."""
        self.tokens[a], self.tokens[b] = self.tokens[b], self.tokens[a]
        self.stamp[a], self.stamp[b] = self.stamp[b], self.stamp[a]

    def clear(self) -> None:
        """Forget everything (after a failure: the cache itself may be what failed)."""
        self.tokens = [None] * len(self.tokens)

    def victim(self, rows: Iterable[int]) -> int | None:
        """The row of `rows` whose content is least worth keeping: an empty one, else the least recently
        used; None when `rows` is empty."""
        return min(rows, key=lambda r: (self.tokens[r] is not None, self.stamp[r]), default=None)

    def less_valuable(self, a: int, b: int) -> bool:
        """Whether row `a`'s content is worth less than row `b`'s (so `b`'s may be saved over it)."""
        return self.tokens[a] is None or (self.tokens[b] is not None and self.stamp[a] < self.stamp[b])


# A busy row as the prompt cache sees it: its tokens so far (prompt + answer) and how many of them are in
# the cache (the last chosen token is not written until the next step).
Busy = tuple[Sequence[int], int]


class PromptCache:
    """Reuse of cached prefixes across requests, over the scheduler's `cache` (see the module docstring).

    Row indices are cache rows. `free` lists the rows no request uses (their content is in `parked`) and
    `busy` the rows in use, row i being `busy[i]` (busy rows are packed at the front). Nothing here runs
    when `enabled` is False, except the counting."""

    def __init__(self, cache: KVCache, enabled: bool = True) -> None:
        self.cache, self.enabled = cache, enabled
        self.parked = ParkedRows(cache.batch_size)
        # Prompt tokens admitted so far, each prompt of an API request once (`record`), and of those the ones
        # the cache served rather than read; what the n copies of one prompt copy from each other is not counted.
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.copied_slots = 0  # row slots copied to reuse or keep cached content (its cost, for benches)

    def best_source(self, prompt: Sequence[int], free: list[int], busy: Sequence[Busy],
                    prefer: int | None = None) -> tuple[int | None, int]:
        """The row holding the longest prefix of `prompt` and that length, at most len(prompt) - 1 (the
        last prompt token is always read, for the logits of the first answer token); on a tie `prefer` (the
        row the request lands in: no copy), then a free row. (None, 0) when no row shares a token. A row
        whose sliding-window rings went too far past the shared prefix to still hold its last window is
        passed over (`KVCache.reusable`)."""
        limit = len(prompt) - 1
        best, best_len = None, 0
        for j in ([prefer] if prefer in free else []) + free:
            tokens = self.parked.tokens[j]
            if tokens:
                n = common_prefix(prompt, tokens, limit)
                if n > best_len and self.cache.reusable(j, n):
                    best, best_len = j, n
        for i, (tokens, written) in enumerate(busy):  # busy row i is cache row i
            n = common_prefix(prompt, tokens, min(limit, written))
            if n > best_len and self.cache.reusable(i, n):
                best, best_len = i, n
        return best, best_len

    def estimate(self, prompt: Sequence[int], free: list[int], busy: Sequence[Busy]) -> tuple[int | None, int]:
        """How many of `prompt`'s tokens the cache holds now (the admission budget counts the rest), and the
        free row holding them (None when a busy row does, or none). Changes nothing: most requests asked
        about are not admitted this turn, and must not make the rows they match look recently used."""
        if not self.enabled:
            return None, 0
        src, n = self.best_source(prompt, free, busy)
        if n < MIN_REUSE:
            return None, 0
        return (src if src >= len(busy) else None), n

    def reserve(self, rows: Iterable[int | None]) -> None:
        """Free `rows` hold the prefixes of requests just admitted: the most recently used, so the claims
        made before theirs save other content over them last."""
        for row in rows:
            if row is not None:
                self.parked.touch(row)

    def shares(self, prompt: Sequence[int], unread: int, others: Iterable[Sequence[int]]) -> bool:
        """Whether a prompt with `unread` tokens left to read should wait a turn because one of `others`
        (admitted this turn) reads at least `MIN_SHARED` of those very tokens: next turn they are in that
        one's row, ready to copy."""
        if not self.enabled or unread < MIN_SHARED:
            return False
        cached, limit = len(prompt) - unread, len(prompt) - 1
        return any(common_prefix(prompt, other, limit) - cached >= MIN_SHARED for other in others)

    def claim(self, prompt: Sequence[int], t: int, free: list[int], busy: Sequence[Busy]) -> int:
        """Make free row `t` (in `free`) hold the longest cached prefix of `prompt` for the request about
        to take it; returns that prefix's length, the slot its reading starts at. What `t` held is saved
        into the least valuable other free row when it is worth more than that row's content."""
        n = 0
        if self.enabled:
            parked = self.parked
            src, n = self.best_source(prompt, free, busy, prefer=t)
            if n < MIN_REUSE:
                src, n = None, 0
            if src == t:  # in place; keep what lies beyond the prefix if it is worth a copy
                if parked.length(t) - n >= MIN_REUSE:
                    self._save(t, free, avoid=t)
            elif src is not None and src >= len(busy) and n == parked.length(src):
                # a free row that this request uses up entirely: the two rows swap contents
                self._swap(t, src, parked.length(t), n)
            else:
                self._save(t, free, avoid=src)
                if src is not None:
                    self._copy(src, t, n)
                    if src >= len(busy):
                        parked.touch(src)
            parked.drop(t)
        return n

    def release(self, t: int, held: list[int]) -> None:
        """Claimed row `t`, holding `held` (the prefix its claim found), goes back unused: the request that
        claimed it waits for another turn (the scheduler's re-check of its reading)."""
        if self.enabled:
            self.parked.park(t, held)

    def record(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count an admitted prompt: its length and how much of it the cache served."""
        self.prompt_tokens_total += prompt_tokens
        self.cached_tokens_total += cached_tokens

    def leave(self, row: int, last: int, tokens: list[int], last_len: int) -> None:
        """Busy `row` (holding `tokens`) ends and the last busy row, `last` (holding `last_len` slots), moves
        into it: swapped, so that `tokens` stay parked in `last`, which becomes free (or, off, copied)."""
        if row != last:  # (off, `tokens` is not looked at)
            if self.enabled:
                self._swap(row, last, len(tokens), last_len)
            else:
                self.cache.copy_row(last, row, last_len)
        if self.enabled:
            self.parked.park(last, tokens)

    def relocate(self, src: int, dst: int, n: int) -> None:
        """A row not in `busy` nor free (a prompt being read) with `n` slots moves into free row `dst`;
        what `dst` held moves up into `src`, which becomes free."""
        if src == dst:
            return
        if self.enabled:
            self._swap(src, dst, n, self.parked.length(dst))
        else:
            self.cache.copy_row(src, dst, n)

    def clear(self) -> None:
        self.parked.clear()

    def _save(self, t: int, free: list[int], avoid: int | None) -> None:
        if not self.parked.length(t):
            return
        v = self.parked.victim(j for j in free if j != t and j != avoid)
        if v is not None and self.parked.less_valuable(v, t):
            self._copy(t, v, self.parked.length(t))
            self.parked.copy(t, v)

    def _copy(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_row(src, dst, n)
        self.copied_slots += n

    def _swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        self.cache.swap_rows(a, b, len_a, len_b)
        self.copied_slots += len_a + len_b
        self.parked.swap(a, b)
