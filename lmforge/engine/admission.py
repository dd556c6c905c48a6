"""Admission: which waiting requests take the scheduler's free rows this loop turn, and in which groups.

The scheduler (engine/scheduler.py, whose docstring explains chunked prefill and the filling group) asks
`select` once per loop turn, and keeps the long prompts it admits together as a `FillingGroup`. `select` is
plain Python over a snapshot of the wait queue -- no tensors, no lock --
for two reasons. The policy reads and is tested apart from the model work. And the scheduler runs it
*outside* the lock that `submit()` takes: estimating how much of each prompt the prompt cache already holds
compares it with every row (up to max_queue waiting x max_batch rows x the match length), and the event
loop, submitting a new request, must not wait for that.

The estimates are only estimates: a prefix counted here can be displaced before the request claims its row
(an earlier claim of the same turn saves or copies over it). The scheduler therefore checks each short
prompt's real reading after claiming and sends one that would read more than counted back to the queue's
front (`Scheduler._prefill`), so the limits chosen here hold for the reading actually done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lmforge.model.kv_cache import KVCache


@dataclass
class Admission:
    """The outcome of one turn's admission. Requests are the scheduler's (anything with `id`, `prompt_ids`
    and `cancelled`); `unread[id]` is the prompt tokens each is expected to read (its cached prefix left out)."""

    groups: list[list[Any]] = field(default_factory=list)  # short prompts: one right-padded prefill pass each
    longs: list[Any] = field(default_factory=list)  # long prompts: a new filling group, least left to read first
    gone: list[Any] = field(default_factory=list)  # cancelled while waiting: to be told and dropped
    unread: dict[int, int] = field(default_factory=dict)

    @property
    def taken(self) -> set[int]:
        """The ids that leave the queue: admitted or gone."""
        return {r.id for g in self.groups for r in g} | {r.id for r in self.longs} | {r.id for r in self.gone}

    def only(self, ids: set[int]) -> "Admission":
        """This admission restricted to the requests in `ids` (those still queued when it is applied:
        `submit()` may have dropped a cancelled one meanwhile, and told it so)."""
        groups = [[r for r in g if r.id in ids] for g in self.groups]
        return Admission([g for g in groups if g], [r for r in self.longs if r.id in ids],
                         [r for r in self.gone if r.id in ids], self.unread)


def select(waiting: Sequence[Any], *, free: int, budget: int, prefill_chunk: int, max_prefill_tokens: int,
           filling: bool, cached: Callable[[Any], int], shares: Callable[[Any, int, list[Any]], bool]) -> Admission:
    """Choose, in queue order, the waiting requests that take the `free` rows this turn.

    Short prompts (at most `prefill_chunk` tokens to read) are admitted until `budget` tokens are read
    (the first always is); long ones start a filling group when none is under way (`filling` False), and
    otherwise keep their place without holding up the short prompts behind them. `cached(req)` estimates the
    cached prefix (asked only while a row is still free: once the rows are taken, the rest cost nothing); a
    request for which `shares(req, unread, admitted)` holds waits a turn, to copy what an admitted one reads.
    Short prompts of similar length share a prefill pass of at most `max_prefill_tokens` (padded); in a
    pass, those with a cached prefix claim their rows first, before others displace it."""
    out = Admission()
    admitted: list[Any] = []
    shorts: list[Any] = []
    spent = 0
    for req in waiting:
        if req.cancelled:
            out.gone.append(req)
            continue
        n = len(req.prompt_ids) - (cached(req) if free else 0)
        out.unread[req.id] = n
        if free == 0 or shares(req, n, admitted):
            continue
        if n > prefill_chunk:
            if filling:
                continue
            out.longs.append(req)
        elif not shorts or spent + n <= budget:
            shorts.append(req)
            spent += n
        else:
            continue
        admitted.append(req)
        free -= 1
    unread = out.unread
    shorts.sort(key=lambda r: unread[r.id])
    groups: list[list[Any]] = [[]]
    for req in shorts:
        if groups[-1] and (len(groups[-1]) + 1) * unread[req.id] > max_prefill_tokens:
            groups.append([])
        groups[-1].append(req)
    out.groups = [sorted(g, key=lambda r: unread[r.id] - len(r.prompt_ids)) for g in groups if g]
    out.longs.sort(key=lambda r: unread[r.id])  # the least left to read lowest (see Scheduler._fill_chunk)
    return out


class FillingGroup:
    """Long prompts being prefilled side by side in the top cache rows (see the scheduler's docstring), the
    one with the least left to read lowest. Member i started at slot `starts[i]` (its cached prefix) and every
    member has read `read` tokens since: they started together and read equal chunks. `states[id]` holds
    each member's SequenceState, made at admission."""

    __slots__ = ("reqs", "starts", "read", "states")

    def __init__(self, reqs: list[Any], starts: list[int], states: dict[int, Any]) -> None:
        self.reqs, self.starts, self.read, self.states = reqs, starts, 0, states

    def written(self, i: int) -> int:
        """The slots of member i's row that hold its prompt so far."""
        return min(len(self.reqs[i].prompt_ids), self.starts[i] + self.read)

    def finished(self, i: int) -> bool:
        return self.starts[i] + self.read >= len(self.reqs[i].prompt_ids)

    def drop_cancelled(self, cache: KVCache, max_batch: int) -> list[Any]:
        """Remove the cancelled members (returned, to be told): the members below a dropped one move up in
        `cache`, so the group stays in the top rows of the `max_batch`."""
        if not any(r.cancelled for r in self.reqs):
            return []
        top = max_batch - len(self.reqs)
        keep = [i for i, r in enumerate(self.reqs) if not r.cancelled]
        dropped = [r for r in self.reqs if r.cancelled]
        for j in reversed(range(len(keep))):  # moving up: the highest first, so no source is overwritten
            src, dst = top + keep[j], max_batch - len(keep) + j
            if src != dst and self.written(keep[j]):
                cache.copy_row(src, dst, self.written(keep[j]))
        self.reqs, self.starts = [self.reqs[i] for i in keep], [self.starts[i] for i in keep]
        for r in dropped:
            self.states.pop(r.id, None)
        return dropped
