"""Continuous batching: many requests, one forward pass per decode step.

A server that runs requests one after another leaves the CPU (or GPU) mostly idle: a decode step of a
small model streams every weight from memory to produce one token, and the same weights could produce a
token for 32 requests in barely more time. `Scheduler` therefore keeps a batch of *rows*, one per running
sequence, and loops:

    1. drop the rows whose client went away or that finished (their slots are free at once);
    2. admit waiting requests into free rows: prefill their prompts, together, into their rows of the KV
       cache (one forward pass for prompts of similar length);
    3. one forward pass over all busy rows (each row at its own position), then each row picks its next
       token with its own sampling settings and streams it out;
    4. prefill the next chunk of a long prompt, if one is being read (below).

**Chunked prefill.** Reading a prompt holds up every running stream for as long as its forward pass
takes (seconds for a few thousand tokens on a CPU). So while other rows are decoding, a loop turn reads at
most about `prefill_chunk` prompt tokens: short prompts (up to `prefill_chunk` tokens) are admitted until
that budget is used, and longer ones are read in chunks, one chunk per turn, with a decode step for the
running rows in between. The long prompts admitted together form one *filling group* in the top rows of the
cache, read side by side (the budget shared between them), the shortest (to read) in the lowest row: prompts
finish shortest first, so the group shrinks from the bottom and stays contiguous, and each finished prompt's row
moves down to the end of the busy rows and decodes from the next step on. With nothing decoding there is
nothing to hold up, and the budget is `max_prefill_tokens` (vLLM's chunked prefill answers the same
problem with a per-step token budget).

Requests join and leave between steps (vLLM's and TGI's "continuous" or "in-flight" batching), so a short
answer never waits for a long one. Each row keeps its own timeline in the cache (slot = position, see
`KVCache`), and busy rows are kept packed at the front, so a step runs over exactly the busy rows.

**Prompt caching.** A chat re-sends the whole conversation every turn, and many requests share a system
prompt: reading those tokens again is most of a long chat's time to first token on a CPU. So a request's
row is not wiped when it ends: it is *parked*, still holding its prompt and answer (every token written to
the cache, i.e. up to `pos`), and a new request whose prompt shares a prefix of at least `MIN_REUSE`
tokens with a parked row -- or with a busy row, whose prompt never changes while it runs -- gets those
keys and values and reads only the rest (`prompt[L:]` at slots L.., always at least its last token, whose
logits choose the first answer token). The source row is used in place when it is the row the request
lands in anyway, else its first L slots are copied (a memcpy: a few MB at most, where reading the same
tokens streams every weight of the model once per chunk). What a newcomer displaces is saved into the least
recently used free row when it is worth more (`ParkedRows`), and a leaving row is *swapped* with the last
busy row instead of overwritten by it, so its content survives in the row that becomes free. Long prompts
gain the same way: only their uncached part counts against the chunk budget, and a filling group's members
each start at their own cached length. Prompts arriving together that share a long uncached prefix (an
n > 1 request's copies, clients with one system prompt) do not all read it: the first does, the others wait
a turn and copy it (`MIN_SHARED`). Any failure forgets every parked row (the cache may be what failed).
This is llama.cpp's per-slot `cache_prompt` generalised to any row, rather than vLLM's block table or
SGLang's radix tree: those share blocks between sequences but need attention over a block table (paged
kernels), while here every row is one contiguous timeline that the plain attention reads as is; the price
is that a free row remembers one conversation, so at most `max_batch` - busy ones are remembered, least
recently used first to go. `prefix_cache=False` turns it off (the outputs are the same either way).

The scheduler owns the model: all model work runs on its one thread, which keeps PyTorch single-owner
and lets other work (scoring a prompt, beam search) be queued as a `call()` between steps. Requests and
their events cross threads through a callback, so the asyncio server and a plain thread both consume it.

Greedy output is the same as the request served alone (the same prefill, the same per-row arithmetic),
up to floating-point differences between batch sizes in the matrix kernels.
"""

from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lmforge.engine.generate import Engine, SequenceState, TokenEvent, choose_tokens
from lmforge.engine.prefix_cache import MIN_SHARED, PromptCache, common_prefix
from lmforge.engine.sampling import SamplingParams, sample_from, token_logprobs
from lmforge.model.kv_cache import KVCache


class QueueFull(Exception):
    """Raised by `submit` when `max_queue` requests are already waiting."""


class SchedulerClosed(Exception):
    """Raised by `submit` after `close()`: the server is shutting down."""


@dataclass
class Request:
    """One prompt to complete. `emit` receives every `TokenEvent` (on the scheduler thread; keep it quick)
    and finally None when the request is over (finished, cancelled or failed; `error` says which)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent | None], None]
    seq: int = 0  # the index reported in its events (choice index of an n > 1 request)
    seed_offset: int | None = None  # added to params.seed for this sequence's draws (default: seq)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens found in the cache at admission (OpenAI's usage.cached_tokens)

    def cancel(self) -> None:
        """Stop this request at the next step boundary and free its row (thread-safe: a flag)."""
        self.cancelled = True


class _Row:
    __slots__ = ("req", "state", "pos", "next_token")

    def __init__(self, req: Request, state: SequenceState, pos: int, next_token: int) -> None:
        self.req, self.state, self.pos, self.next_token = req, state, pos, next_token


class _Filling:
    """Long prompts being prefilled side by side in the top cache rows (see the module docstring), the one
    with the least left to read lowest. Member i started at slot `starts[i]` (its cached prefix) and every
    member has read `read` tokens since: they started together and read equal chunks."""

    __slots__ = ("reqs", "starts", "read")

    def __init__(self, reqs: list[Request], starts: list[int]) -> None:
        self.reqs, self.starts, self.read = reqs, starts, 0

    def written(self, i: int) -> int:
        """The slots of member i's row that hold its prompt so far."""
        return min(len(self.reqs[i].prompt_ids), self.starts[i] + self.read)

    def finished(self, i: int) -> bool:
        return self.starts[i] + self.read >= len(self.reqs[i].prompt_ids)


class Scheduler:
    """Serve `engine` to many concurrent requests with continuous batching.

    `max_batch` rows run at once (the KV cache holds `max_batch` full contexts); up to `max_queue` more
    wait for a row, and `submit` raises `QueueFull` beyond that, so overload is refused at once instead of
    queueing without end. While rows are decoding, a loop turn reads about `prefill_chunk` prompt tokens at
    most; longer prompts are read in chunks between decode steps (see the module docstring).
    `prefix_cache` reuses the keys and values of earlier requests' prompts and answers (module docstring);
    `prompt_tokens_total`, `cached_tokens_total` and `kv_tokens_used` report on it.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 max_prefill_tokens: int = 4096, prefill_chunk: int = 512, prefix_cache: bool = True) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_prefill_tokens, self.prefill_chunk = max_prefill_tokens, prefill_chunk
        cfg = engine.config
        # Every row can hold a whole context; `max_context` caps that for long-context models, whose full
        # context times max_batch would not fit in memory.
        self.context_length = min(cfg.context_length, max_context or cfg.context_length)
        self.cache = KVCache.for_model(cfg, max_batch, self.context_length, dtype=engine.dtype, device=engine.device)
        self.rows: list[_Row] = []  # busy rows; row i lives in cache row i
        self.filling: _Filling | None = None  # long prompts being prefilled into the top cache rows
        self.waiting: collections.deque[Request] = collections.deque()
        self.calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._stopped = False
        self.steps = 0  # decode steps run (for tests and stats)
        self.pcache = PromptCache(self.cache, prefix_cache)  # what the rows hold, reused across requests
        self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    # -- the public, thread-safe side ------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue `req`; its events arrive through `req.emit`. The prompt must leave room for one token."""
        if len(req.prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt is {len(req.prompt_ids)} tokens; the context is {self.context_length}")
        with self._wake:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            gone = self._purge_cancelled()
            if len(self.waiting) >= self.max_queue:
                full = True
            else:
                full = False
                self.waiting.append(req)
                self._wake.notify()
        for r in gone:
            r.emit(None)
        if full:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        return req

    def _purge_cancelled(self) -> list[Request]:
        """Drop cancelled requests from the wait queue (call with the lock held); returns them, to be told."""
        gone = [r for r in self.waiting if r.cancelled]
        if gone:
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        return gone

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the scheduler thread between two steps (other model work: scoring, beam search)."""
        fut: Future = Future()
        with self._wake:
            if self._stopped:
                raise SchedulerClosed("the scheduler has stopped")
            if len(self.calls) >= max(1, self.max_queue):
                raise QueueFull(f"{len(self.calls)} other jobs are already waiting")
            self.calls.append((fn, fut))
            self._wake.notify()
        return fut

    @property
    def busy(self) -> int:
        """Rows running now (a long prompt being prefilled counts)."""
        return len(self.rows) + self._n_filling

    @property
    def kv_tokens_used(self) -> int:
        """Cache slots that busy rows (and prompts being read) hold now. Read from any thread (metrics): it
        works on snapshots of lists the scheduler thread may be changing, so it is exact only between steps."""
        f = self.filling
        filling = 0
        if f is not None:
            reqs, starts, read = list(f.reqs), list(f.starts), f.read
            filling = sum(min(len(r.prompt_ids), s + read) for r, s in zip(reqs, starts))
        return sum(row.pos for row in list(self.rows)) + filling

    @property
    def prefix_cache(self) -> bool:
        return self.pcache.enabled

    @property
    def prompt_tokens_total(self) -> int:
        """Prompt tokens of the requests admitted so far."""
        return self.pcache.prompt_tokens_total

    @property
    def cached_tokens_total(self) -> int:
        """Of `prompt_tokens_total`, those found in the cache rather than read."""
        return self.pcache.cached_tokens_total

    def set_prefix_cache(self, on: bool) -> None:
        """Turn prompt caching on or off while serving (between two steps; off forgets the parked rows)."""
        def switch() -> None:
            self.pcache.enabled = on
            self.pcache.clear()
        self.call(switch).result()

    @property
    def _turn_budget(self) -> int:
        """Prompt tokens a loop turn may read: `prefill_chunk` while rows decode (they wait for it), else
        `max_prefill_tokens` (nothing decoding: nothing to stall)."""
        return self.prefill_chunk if self.rows else self.max_prefill_tokens

    @property
    def _n_filling(self) -> int:
        return len(self.filling.reqs) if self.filling is not None else 0

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.rows and self.filling is None and not self.waiting and not self.calls

    def close(self) -> None:
        """Refuse new requests; those already submitted still finish (see `stop` to end the thread)."""
        with self._wake:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """End the scheduler thread; whatever still runs or waits ends with `SchedulerClosed`."""
        with self._wake:
            self._closed = True
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the scheduler thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self.rows or self.filling or self.waiting or self.calls or self._stopped):
                            self._wake.wait()
                        if self._stopped:
                            break
                        gone = self._purge_cancelled()
                    for r in gone:
                        r.emit(None)
                    try:
                        self._run_call()
                        self._retire(lambda r: r.req.cancelled)
                        self._admit()
                        if self.rows:
                            self._step()
                        if self.filling:
                            self._fill()
                    except Exception as e:  # a bug or out-of-memory: fail the running requests, keep serving
                        self._fail_rows(e)
        finally:  # stopped, or the thread itself is dying: nobody may be left waiting for an answer
            with self._wake:
                self._closed = self._stopped = True
                waiting, self.waiting = list(self.waiting), collections.deque()
                calls, self.calls = list(self.calls), collections.deque()
            closed = SchedulerClosed("the server is shutting down")
            self._fail_rows(closed)
            for req in waiting:
                req.error = closed
                _tell(req)
            for _, fut in calls:
                if not fut.cancelled():
                    try:
                        fut.set_exception(closed)
                    except Exception:  # already resolved or cancelled meanwhile
                        pass

    def _fail_rows(self, error: BaseException) -> None:
        """End every running row with `error`, without touching the cache (it may be what failed), and
        forget what the free rows held."""
        self.pcache.clear()
        rows, self.rows = self.rows, []
        reqs = [row.req for row in rows]
        if self.filling is not None:
            reqs += self.filling.reqs
            self.filling = None
        for req in reqs:
            req.error = req.error or error
            _tell(req)

    def _run_call(self) -> None:
        """Run one queued `call()` (one per loop turn, so decoding goes on between long jobs)."""
        with self._wake:
            if not self.calls:
                return
            fn, fut = self.calls.popleft()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _retire(self, done: Callable[[_Row], bool]) -> None:
        """Remove the rows for which `done(row)` holds, keeping the busy rows packed at the front: the last
        busy row moves into each freed row. With the prompt cache the two rows swap contents, so the freed
        row's tokens stay parked in the row that becomes free; without it the last row is simply copied."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if not (done(row) or row.state.finished):
                i += 1
                continue
            last = len(self.rows) - 1
            held = row.state.history[:row.pos] if self.prefix_cache else []
            self.pcache.leave(i, last, held, self.rows[last].pos)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            _tell(row.req)

    def _admit(self) -> None:
        """Move waiting requests into free rows, in queue order: short prompts are prefilled together (see
        `_prefill`) within this turn's token budget; long ones start a filling group (see `_fill`) when none is
        under way, and otherwise keep their place without holding up the short prompts behind them."""
        budget = self._turn_budget
        new: list[Request] = []
        longs: list[Request] = []
        gone: list[Request] = []
        unread: dict[int, int] = {}  # prompt tokens to read, the cached prefix left out (an estimate)
        spent = 0
        with self._wake:
            free = self.max_batch - len(self.rows) - self._n_filling
            kept: collections.deque[Request] = collections.deque()
            while self.waiting:
                req = self.waiting.popleft()
                n = len(req.prompt_ids)
                if free and not req.cancelled:
                    n -= self.pcache.estimate(req.prompt_ids, self._free_rows(), self._busy_rows())
                unread[req.id] = n
                if req.cancelled:
                    gone.append(req)
                elif free == 0 or self._shares_with(req, n, new + longs):
                    kept.append(req)
                elif n > self.prefill_chunk:
                    if self.filling is None:
                        longs.append(req)
                        free -= 1
                    else:
                        kept.append(req)
                elif not new or spent + n <= budget:
                    new.append(req)
                    spent += n
                    free -= 1
                else:
                    kept.append(req)
            self.waiting = kept
        for req in gone:
            _tell(req)
        # Prompts of similar length share a prefill pass; a pass holds at most `max_prefill_tokens` (padded).
        new.sort(key=lambda r: unread[r.id])
        groups: list[list[Request]] = [[]]
        for req in new:
            if groups[-1] and (len(groups[-1]) + 1) * unread[req.id] > self.max_prefill_tokens:
                groups.append([])
            groups[-1].append(req)
        for group in groups:
            if group:  # those with a cached prefix take their rows first, before others displace it
                group.sort(key=lambda r: unread[r.id] - len(r.prompt_ids))
                self._prefill_group(group)
        self._retire(lambda r: False)  # a first token can already finish a request
        if longs:  # rows [max_batch - len(longs), max_batch): free, above the busy rows
            longs.sort(key=lambda r: unread[r.id])  # the least left to read lowest (see `_fill_chunk`)
            top, claimed = self.max_batch - len(longs), set()
            try:
                starts = [self._claim(req, top + i, claimed) for i, req in enumerate(longs)]
            except Exception as e:
                self.pcache.clear()
                for req in longs:
                    req.error = e
                    _tell(req)
                return
            self.filling = _Filling(longs, starts)

    # -- the prompt cache (see the module docstring and engine/prefix_cache.py) ---------------------------
    def _shares_with(self, req: Request, unread: int, admitted: list[Request]) -> bool:
        """Whether `req` should wait a turn because a request admitted this turn reads at least `MIN_SHARED`
        of the tokens `req` would have to read too: next turn they are in that one's row, ready to copy."""
        if not self.prefix_cache or unread < MIN_SHARED:
            return False
        cached, limit = len(req.prompt_ids) - unread, len(req.prompt_ids) - 1
        return any(common_prefix(req.prompt_ids, other.prompt_ids, limit) - cached >= MIN_SHARED
                   for other in admitted)

    def _free_rows(self, claimed: set[int] = frozenset()) -> list[int]:
        return [j for j in range(len(self.rows), self.max_batch - self._n_filling) if j not in claimed]

    def _busy_rows(self) -> list[tuple[list[int], int]]:
        return [(row.state.history, row.pos) for row in self.rows]

    def _claim(self, req: Request, t: int, claimed: set[int]) -> int:
        """Free row `t` becomes `req`'s, holding the longest cached prefix of its prompt; returns its length
        (the slot its reading starts at). `claimed`: the rows already taken this turn, t added."""
        n = self.pcache.claim(req.prompt_ids, t, self._free_rows(claimed), self._busy_rows())
        claimed.add(t)
        req.cached_tokens = n
        return n

    def _prefill_group(self, reqs: list[Request]) -> None:
        try:
            self._prefill(reqs)
        except Exception as e:  # fail these requests, keep the others running
            self.pcache.clear()
            for req in reqs:
                req.error = e
                _tell(req)

    def _prefill(self, reqs: list[Request]) -> None:
        """Run the prompts of `reqs` through the model in one right-padded pass, each into its own free row
        (see `_forward_padded`), and emit each first generated token. Each reads only what its row does not
        already hold (see `_claim`)."""
        first, claimed = len(self.rows), set()
        starts = [self._claim(req, first + b, claimed) for b, req in enumerate(reqs)]
        logits = self._forward_padded([r.prompt_ids[s:] for r, s in zip(reqs, starts)], starts=starts, first_row=first)
        rows = [self._new_row(req) for req in reqs]
        self.rows.extend(rows)
        self._choose(rows, logits)

    def _forward_padded(self, pieces: list[list[int]], *, starts: list[int], first_row: int) -> torch.Tensor:
        """One forward pass of token lists `pieces`, right-padded into a (B, W) batch, into cache rows
        first_row.. (piece b at slots starts[b]..); the logits (B, V) after each piece's last real token.

        A row's padding lands at slots after its real tokens, which its own queries never see (slot >
        position) and which its later tokens overwrite, in order, before they become visible. Padding that
        would run past the context is clamped to its last slot: past every real token of a prompt that fits."""
        engine, dev, B = self.engine, self.engine.device, len(pieces)
        lengths = [len(x) for x in pieces]
        width = max(lengths)
        pad = engine.tokenizer.pad_id if engine.tokenizer.pad_id is not None else 0
        idx = torch.full((B, width), pad, dtype=torch.long)
        for b, x in enumerate(pieces):
            idx[b, :lengths[b]] = torch.tensor(x)
        slots = (torch.tensor(starts)[:, None] + torch.arange(width)).clamp_(max=self.context_length - 1).to(dev)
        view = self.cache.rows(first_row + B, first_row)
        logits = engine.model(idx.to(dev), cache=view, slots=slots, mask=view.mask(slots),
                            output_positions=torch.tensor(lengths, device=dev) - 1)[:, -1]
        return engine.text_logits(logits)

    def _new_row(self, req: Request) -> _Row:
        """The row of a request whose prompt is in the cache (its first token is still to be chosen)."""
        engine, n = self.engine, len(req.prompt_ids)
        budget = min(req.params.max_new_tokens, self.context_length - n)
        state = SequenceState(engine.tokenizer, req.prompt_ids, req.params, budget, req.seq,
                              engine.eos_ids(req.params), engine.device, seed_offset=req.seed_offset)
        return _Row(req, state, n, -1)

    def _fill(self) -> None:
        """Read the next chunk of every prompt of the filling group, in one right-padded pass over the top
        rows; the turn's budget is shared equally. Members whose prompt is now in move down to the end of
        the busy rows, choose their first token and decode from the next step on. A failure ends the
        group's requests (and forgets the parked rows); the running rows go on."""
        f = self.filling
        if any(r.cancelled for r in f.reqs):  # the members below a dropped one move up: the group stays at the top
            top = self.max_batch - len(f.reqs)
            keep = [i for i, r in enumerate(f.reqs) if not r.cancelled]
            dropped = [r for r in f.reqs if r.cancelled]
            for j in reversed(range(len(keep))):  # moving up: the highest first, so no source is overwritten
                src, dst = top + keep[j], self.max_batch - len(keep) + j
                if src != dst and f.written(keep[j]):
                    self.cache.copy_row(src, dst, f.written(keep[j]))
            f.reqs, f.starts = [f.reqs[i] for i in keep], [f.starts[i] for i in keep]
            for req in dropped:
                _tell(req)
            if not keep:
                self.filling = None
                return
        try:
            self._fill_chunk(f)
        except Exception as e:
            self.filling = None
            self.pcache.clear()
            for req in f.reqs:
                req.error = req.error or e
                _tell(req)

    def _fill_chunk(self, f: _Filling) -> None:
        k = len(f.reqs)
        c = max(1, self._turn_budget // k)
        top = self.max_batch - k
        at = [s + f.read for s in f.starts]
        logits = self._forward_padded([r.prompt_ids[a:a + c] for r, a in zip(f.reqs, at)], starts=at, first_row=top)
        f.read += c
        done = [i for i in range(k) if f.finished(i)]
        if not done:
            return
        # The finished members go to the bottom of the group (they normally are there already: the least left
        # to read is lowest, unless a cached prefix moved between admission and `_claim`), keeping their order.
        order = list(range(k))  # order[p] = the member now in row top + p
        for p, i in enumerate(done):
            q = order.index(i)
            if q != p:
                self.cache.swap_rows(top + q, top + p, f.written(i), f.written(order[p]))
                order[p], order[q] = i, order[p]
        logits = logits[done]
        f.reqs, f.starts = [f.reqs[i] for i in order], [f.starts[i] for i in order]
        rows: list[_Row] = []
        for p in range(len(done)):  # moving down in order never overwrites a member not yet moved (dst <= src)
            req = f.reqs.pop(0)
            f.starts.pop(0)
            src, dst = top + p, len(self.rows)
            self.pcache.relocate(src, dst, len(req.prompt_ids))  # what dst held moves up into src, now free
            rows.append(self._new_row(req))
            self.rows.append(rows[-1])
        if not f.reqs:
            self.filling = None
        self._choose(rows, logits)
        self._retire(lambda r: False)  # a first token may already finish a request

    def _step(self) -> None:
        """One forward pass over every busy row, each at its own position, then each row's next token."""
        n = len(self.rows)
        dev = self.engine.device
        tokens = torch.tensor([[row.next_token] for row in self.rows], device=dev)
        slots = torch.tensor([[row.pos] for row in self.rows], device=dev)
        view = self.cache.rows(n)
        logits = self.engine.text_logits(self.engine.model(tokens, cache=view, slots=slots, mask=view.mask(slots))[:, -1])
        for row in self.rows:
            row.pos += 1
        self.steps += 1
        self._choose(self.rows, logits)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token with its own settings and emit it. Rows that share plain greedy
        settings are decided by one argmax; the others one by one. A row whose settings fail (a bug, or
        numbers no check foresaw) ends with its error; the other rows of the step go on."""
        plain = [i for i, row in enumerate(rows) if row.req.params.plain_greedy]
        chosen: list[int | None] = [None] * len(rows)
        if plain:
            group = logits[plain] if len(plain) < len(rows) else logits
            for i, t in zip(plain, sample_from(group, rows[plain[0]].req.params).tolist()):
                chosen[i] = t
        for i, row in enumerate(rows):
            try:
                if chosen[i] is None:
                    chosen[i] = int(choose_tokens(logits[i:i + 1], row.req.params, [row.state])[0])
                p = row.req.params
                lp = top = None
                if p.logprobs is not None:
                    l, ti, tl = token_logprobs(logits[i:i + 1], torch.tensor([chosen[i]], device=logits.device),
                                               p.logprobs)
                    lp, top = float(l[0]), list(zip(ti[0].tolist(), tl[0].tolist()))
                ev = row.state.push(chosen[i], lp, top)
            except Exception as e:
                row.req.error = e
                row.state.finished = True
                continue
            row.next_token = chosen[i]
            if not row.state.finished and row.pos >= self.context_length:
                ev.finish_reason = "length"  # no slot left for another token (budget normally stops first)
                row.state.finished = True
            row.req.emit(ev)


def _tell(req: Request) -> None:
    """Tell a request it is over, whatever its consumer does with that."""
    try:
        req.emit(None)
    except Exception:  # the consumer is gone (e.g. its event loop closed): nothing left to tell
        pass
