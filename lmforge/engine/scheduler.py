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

**Prompt caching.** A request's row is not wiped when it ends: it stays *parked* with its prompt and
answer, and a later prompt sharing a prefix with a parked or a busy row copies those keys and values and
reads only the rest (engine/prefix_cache.py explains the design). `prefix_cache=False` turns it off; the
outputs are the same either way up to floating-point rounding (decode writes keys/values one token at a
time, a prefill in batches, and the last bits differ), which can flip a greedy near-tie.

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

from lmforge.engine.admission import Admission, FillingGroup, select
from lmforge.engine.generate import Engine, SequenceState, TokenEvent, choose_tokens
from lmforge.engine.prefix_cache import PromptCache
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
    # a further copy of the previous request's prompt in one API request (its n > 1 choices): left out of the
    # prompt/cached totals, as usage counts a prompt once, and what it copies from the first is no reuse
    repeat: bool = False

    def cancel(self) -> None:
        """Stop this request at the next step boundary and free its row (thread-safe: a flag)."""
        self.cancelled = True


class _Row:
    __slots__ = ("req", "state", "pos", "next_token")

    def __init__(self, req: Request, state: SequenceState, pos: int, next_token: int) -> None:
        self.req, self.state, self.pos, self.next_token = req, state, pos, next_token


MAX_PREFILL_TOKENS = 4096  # prompt tokens one turn reads while nothing decodes (the default)


def max_write(prefill_chunk: int, max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> int:
    """The most slots a scheduler with these settings writes into one row in one pass: a short prompt at
    once, or a long prompt's chunk of a turn's budget (which sizes the sliding-window rings)."""
    return max(prefill_chunk, max_prefill_tokens)


class Scheduler:
    """Serve `engine` to many concurrent requests with continuous batching.

    `max_batch` rows run at once (the KV cache holds `max_batch` full contexts); up to `max_queue` more
    wait for a row, and `submit` raises `QueueFull` beyond that, so overload is refused at once instead of
    queueing without end. While rows are decoding, a loop turn reads about `prefill_chunk` prompt tokens at
    most; longer prompts are read in chunks between decode steps (see the module docstring).
    `prefix_cache` reuses the keys and values of earlier requests' prompts and answers (engine/prefix_cache.py);
    `prompt_tokens_total`, `cached_tokens_total` and `kv_tokens_used` report on it.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, prefill_chunk: int = 512, prefix_cache: bool = True) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_prefill_tokens, self.prefill_chunk = max_prefill_tokens, prefill_chunk
        cfg = engine.config
        # Every row can hold a whole context; `max_context` caps that for long-context models, whose full
        # context times max_batch would not fit in memory.
        self.context_length = min(cfg.context_length, max_context or cfg.context_length)
        # Sliding-window layers keep rings sized for the widest pass a turn writes (KVCache's docstring).
        self.cache = KVCache.for_model(cfg, max_batch, self.context_length, max_write=max_write(prefill_chunk, max_prefill_tokens),
                                       dtype=engine.dtype, device=engine.device)
        self.rows: list[_Row] = []  # busy rows; row i lives in cache row i
        self.filling: FillingGroup | None = None  # long prompts being prefilled into the top cache rows
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
        """Prompt tokens of the requests admitted so far, the n copies of one prompt once (`Request.repeat`)."""
        return self.pcache.prompt_tokens_total

    @property
    def cached_tokens_total(self) -> int:
        """Of `prompt_tokens_total`, those found in the cache rather than read (reuse across requests)."""
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
        """Move waiting requests into free rows (`admission.select` decides which, on a snapshot of the queue,
        outside the lock `submit()` waits on): short prompts are prefilled together (`_prefill`), long ones
        start a filling group (`_fill`)."""
        with self._wake:
            queue = list(self.waiting)
        if not queue:
            return
        free, busy, sources = self._free_rows(), self._busy_rows(), {}

        def cached(req: Request) -> int:
            sources[req.id], n = self.pcache.estimate(req.prompt_ids, free, busy)
            return n
        def shares(req: Request, n: int, others: list[Request]) -> bool:
            return self.pcache.shares(req.prompt_ids, n, [o.prompt_ids for o in others])
        plan = select(queue, free=len(free), budget=self._turn_budget, prefill_chunk=self.prefill_chunk,
                      max_prefill_tokens=self.max_prefill_tokens, filling=self.filling is not None, cached=cached,
                      shares=shares)
        with self._wake:  # `submit()` may have dropped (and told) cancelled requests meanwhile: apply to the rest
            present = {r.id for r in self.waiting}
            taken = plan.taken
            self.waiting = collections.deque(r for r in self.waiting if r.id not in taken)
        plan = plan.only(present)
        for req in plan.gone:
            _tell(req)
        self.pcache.reserve(sources.get(r.id) for r in plan.longs + [r for g in plan.groups for r in g])
        for group in plan.groups:
            self._prefill_group(group, plan)
        self._retire(lambda r: False)  # a first token can already finish a request
        if plan.longs:
            self._start_filling(plan.longs)

    def _start_filling(self, reqs: list[Request]) -> None:
        """`reqs` (least left to read first) become the filling group, in the top rows: free, above the busy rows."""
        states = self._states(reqs)
        longs = [r for r in reqs if r.id in states]
        if not longs:
            return
        top, claimed = self.max_batch - len(longs), set()
        try:
            starts = [self._claim(req, top + i, claimed) for i, req in enumerate(longs)]
        except Exception as e:
            self.pcache.clear()
            for req in longs:
                req.error = e
                _tell(req)
            return
        for req, n in zip(longs, starts):
            self._admitted(req, n)
        self.filling = FillingGroup(longs, starts, states)

    # -- the prompt cache (see engine/prefix_cache.py) -----------------------------------------------------
    def _free_rows(self, claimed: set[int] = frozenset()) -> list[int]:
        return [j for j in range(len(self.rows), self.max_batch - self._n_filling) if j not in claimed]

    def _busy_rows(self) -> list[tuple[list[int], int]]:
        return [(row.state.history, row.pos) for row in self.rows]

    def _claim(self, req: Request, t: int, claimed: set[int]) -> int:
        """Free row `t` becomes `req`'s, holding the longest cached prefix of its prompt; returns its length
        (the slot its reading starts at). `claimed`: the rows already taken this turn, t added."""
        n = self.pcache.claim(req.prompt_ids, t, self._free_rows(claimed), self._busy_rows())
        claimed.add(t)
        return n

    def _admitted(self, req: Request, cached: int) -> None:
        req.cached_tokens = cached
        if not req.repeat:
            self.pcache.record(len(req.prompt_ids), cached)

    def _states(self, reqs: list[Request]) -> dict[int, SequenceState]:
        """Each request's SequenceState by id, made before it takes a row. One that cannot be made (its
        grammar, its settings) ends that request alone with the error, not the group admitted with it."""
        states = {}
        for req in reqs:
            try:
                budget = min(req.params.max_new_tokens, self.context_length - len(req.prompt_ids))
                states[req.id] = SequenceState(self.engine.tokenizer, req.prompt_ids, req.params, budget, req.seq,
                                               self.engine.eos_ids(req.params), self.engine.device,
                                               seed_offset=req.seed_offset)
            except Exception as e:
                req.error = e
                _tell(req)
        return states

    def _prefill_group(self, reqs: list[Request], plan: Admission) -> None:
        states, later = self._states(reqs), []
        try:
            self._prefill([r for r in reqs if r.id in states], states, plan.unread, later)
        except Exception as e:  # fail these requests, keep the others running
            self.pcache.clear()
            for req in reqs:
                if req.id in states and req not in later:
                    req.error = e
                    _tell(req)
        if later:
            with self._wake:
                self.waiting.extendleft(reversed(later))

    def _prefill(self, reqs: list[Request], states: dict[int, SequenceState], unread: dict[int, int],
                 later: list[Request]) -> None:
        """Run the prompts of `reqs` through the model in one right-padded pass, each into its own free row
        (see `_forward_padded`), and emit each first generated token. Each reads only what its row does not
        already hold (see `_claim`); one whose counted prefix was displaced since admission (an earlier claim
        saved over it) would read more than the turn allows: it gives its row back and goes into `later`,
        to be admitted again, first in the queue, with a fresh estimate."""
        first, claimed, taken, starts = len(self.rows), set(), [], []
        for req in reqs:
            t = first + len(taken)
            n = self._claim(req, t, claimed)
            if len(req.prompt_ids) - n > unread[req.id]:
                claimed.discard(t)
                self.pcache.release(t, req.prompt_ids[:n])
                later.append(req)
                continue
            taken.append(req)
            starts.append(n)
            self._admitted(req, n)
        if not taken:
            return
        logits = self._forward_padded([r.prompt_ids[s:] for r, s in zip(taken, starts)], starts=starts, first_row=first)
        rows = [_Row(req, states[req.id], len(req.prompt_ids), -1) for req in taken]
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

    def _fill(self) -> None:
        """Read the next chunk of every prompt of the filling group, in one right-padded pass over the top
        rows; the turn's budget is shared equally. Members whose prompt is now in move down to the end of
        the busy rows, choose their first token and decode from the next step on. A failure ends the
        group's requests (and forgets the parked rows); the running rows go on."""
        f = self.filling
        for req in f.drop_cancelled(self.cache, self.max_batch):
            _tell(req)
        if not f.reqs:
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

    def _fill_chunk(self, f: FillingGroup) -> None:
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
            rows.append(_Row(req, f.states.pop(req.id), len(req.prompt_ids), -1))
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
