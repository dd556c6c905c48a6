"""The bridge from the engine's scheduler thread to asyncio, and the SSE framing of streamed responses.

The scheduler runs in its own thread and reports tokens through callbacks; `Generation` turns the rows of
one request into an async stream of (choice, event) pairs, `collect` runs it to the end for a plain JSON
answer, and `sse_stream` / `SSEResponse` frame it as server-sent events. `run_job` runs other model work
(beam search, scoring an echoed prompt) on the scheduler thread and cancels it when its client hangs up.
`WorkerPool` runs the CPU work of a request that is not the model's (tokenizing, rendering a chat
template, detokenizing) on a few threads: the event loop never does it, so one 1 MB prompt cannot stall
/health or the other streams. `check_sequences` is the one cap on how many sequences a request may ask
for, whatever path makes them (n, prompt lists, beams, echo).

Kept apart from the handlers because this is where cancellation (a client that hangs up) and clean-up
(releasing the model) must be right for every route, in one place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.engine.sampling import SamplingParams
from lmforge.serve import metrics
from lmforge.serve.models import Served
from lmforge.serve.protocol import APIError, invalid

log = logging.getLogger("lmforge.serve")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# ----------------------------------------------------------------------------------------------------
# Generation: one or more rows of the scheduler, as an async stream of (choice index, event)
# ----------------------------------------------------------------------------------------------------
def busy() -> APIError:
    """429 for work that would wait past the queue's bound (rows, model jobs or CPU jobs)."""
    return APIError(429, "the server is busy: too many requests are waiting; retry shortly", type="rate_limit_error",
                    code="queue_full", headers={"retry-after": "1"})


def shutting_down() -> APIError:
    """503 for work that arrives or is still waiting once the scheduler has closed."""
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def check_sequences(served: Served, count: int, what: str, param: str = "n") -> None:
    """THE cap on the sequences one request may ask for (choices x prompts, beams x prompts, echoed prompts):
    what the model's scheduler runs and queues at most. A 400 naming the request's `what` beyond it."""
    sched = served.scheduler
    limit = sched.max_batch + sched.max_queue
    if count > limit:
        raise invalid(f"this request needs {count} sequences ({what}); this server runs at most {limit} at once",
                      param=param)


class Generation:
    """The rows of one API request on a model's scheduler. Iterate to get (choice, TokenEvent) pairs in
    order; `cancel()` (or leaving the iteration) frees the rows at the scheduler's next step."""

    def __init__(self, served: Served, prompts: list[list[int]], params: list[SamplingParams],
                 seed_offsets: list[int] | None = None) -> None:
        from lmforge.engine.scheduler import QueueFull, Request as Row, SchedulerClosed

        check_sequences(served, len(prompts), "prompts x n")
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rows: list[Row] = []
        self.open = len(prompts)
        # Token counts and latencies for /metrics (`serve/metrics.py`), timed from here: the rows' submission.
        m = metrics.current()
        self.timer = m.timer(served.name, prompts) if m is not None else None
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                # a row repeating the previous row's prompt list is one of the n > 1 choices of one prompt
                row = Row(ids, p, self._emitter(i), seq=i, seed_offset=seed_offsets[i] if seed_offsets else None,
                          repeat=i > 0 and ids is prompts[i - 1])
                self.rows.append(row)
                served.scheduler.submit(row)
        except QueueFull:
            self.cancel()
            raise busy() from None
        except SchedulerClosed:
            self.cancel()
            raise shutting_down() from None
        except ValueError as e:
            self.cancel()
            raise invalid(str(e), code="context_length_exceeded") from None
        if self.timer is not None:
            self.timer.submitted()  # prompt tokens count once every row is in (a refused request has none)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prompt cache served from earlier requests, counted as usage counts prompts: each
        prompt once, by its first row. Its further copies (n > 1) copy what the first reads, so their counts
        say nothing about the cache (a cold n=4 request would report its whole prompt cached); the scheduler's
        totals leave them out the same way (`Request.repeat`). Read once the rows are admitted."""
        return sum(row.cached_tokens for row in self.rows if not row.repeat)

    def _emitter(self, i: int) -> Callable:
        def emit(ev):  # on the scheduler thread: the latency measured is the engine's, not the event loop's
            if self.timer is not None and ev is not None and ev.token_id is not None:
                self.timer.token(i)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
        return emit

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    async def events(self, ping: float | None = None) -> AsyncIterator[tuple[int, Any]]:
        """(choice, event) until every row is over; (-1, None) every `ping` seconds of silence."""
        from lmforge.engine.constrain import GrammarError
        from lmforge.engine.scheduler import SchedulerClosed

        try:
            while self.open:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), ping) if ping else await self.queue.get()
                except asyncio.TimeoutError:
                    yield -1, None
                    continue
                if ev is None:
                    self.open -= 1
                    row = self.rows[i]
                    if isinstance(row.error, SchedulerClosed):
                        raise shutting_down()
                    if isinstance(row.error, GrammarError):  # the request's grammar hit llguidance's limits
                        raise invalid(f"the output's grammar could not be followed: {row.error}",
                                      code="grammar_failed")
                    if row.error is not None:
                        log.error("generation failed: %r", row.error)
                        raise APIError(500, "generation failed inside the server", type="server_error",
                                       code="generation_failed", headers={"x-should-retry": "false"})
                    continue
                yield i, ev
        finally:
            self.cancel()


@dataclass
class Choice:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)


async def collect(gen: Generation, request: Request, n: int) -> list[Choice]:
    """Run a non-streaming generation to the end; a client that hangs up cancels it."""
    out = [Choice() for _ in range(n)]
    checked = time.monotonic()
    async for i, ev in gen.events(ping=1.0):
        if time.monotonic() - checked >= 1.0:  # whether tokens flow or not, notice a client that left
            checked = time.monotonic()
            if await request.is_disconnected():
                gen.cancel()
                return out
        if i < 0:
            continue
        c = out[i]
        if ev.token_id is not None:
            c.ids.append(ev.token_id)
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
            c.tops.append(ev.top_logprobs or [])
        c.text += ev.text
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return out


# ----------------------------------------------------------------------------------------------------
# Other model work on the scheduler thread, and CPU work on a worker pool
# ----------------------------------------------------------------------------------------------------
async def run_job(served: Served, request: Request, job: Callable[[Callable[[], bool]], Any]) -> Any:
    """`job(should_stop)` on the model's scheduler thread, between two decode steps; its result. While it
    waits or runs, a client that hangs up makes `should_stop()` true, so a beam search or a scoring pass
    stops at its next step instead of holding the model for others (the job raises beam.Cancelled, and the
    answer no one reads is dropped)."""
    from lmforge.engine.beam import Cancelled
    from lmforge.engine.scheduler import QueueFull, SchedulerClosed

    gone = threading.Event()
    try:
        fut = served.scheduler.call(lambda: job(gone.is_set))
    except QueueFull:
        raise busy() from None
    except SchedulerClosed:
        raise shutting_down() from None
    waiting = asyncio.wrap_future(fut)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                gone.set()
                fut.cancel()  # not started yet: it never will be
    except asyncio.CancelledError:
        gone.set()
        fut.cancel()
        raise
    try:
        if waiting.cancelled():  # only ever cancelled because the client left before the job started
            raise Cancelled("the client left before the job started")
        return waiting.result()
    except Cancelled:
        raise APIError(499, "the client closed the request", code="client_closed") from None
    except ValueError as e:
        raise invalid(str(e)) from None


class WorkerPool:
    """A few threads for a request's CPU work that is not the model's (tokenizing, rendering a chat
    template, detokenizing), so the event loop stays free for /health and the streams; at most `max_waiting`
    jobs wait (429 beyond), so a flood of big requests queues here, bounded, instead of everywhere."""

    def __init__(self, workers: int = 2, max_waiting: int = 64) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmforge-cpu")
        self.max_waiting, self.waiting = max_waiting, 0
        # Start every thread now: ThreadPoolExecutor starts them on demand, and starting a thread waits for
        # it to run, which (while another worker holds the GIL in a tokenizer) stalled the event loop.
        started = threading.Barrier(workers + 1)
        for _ in range(workers):
            self.pool.submit(started.wait)
        started.wait()

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.waiting >= self.max_waiting:  # only the event loop's thread counts, so no lock is needed
            raise busy()
        self.waiting += 1
        try:
            return await asyncio.wrap_future(self.pool.submit(fn, *args, **kwargs))
        finally:
            self.waiting -= 1


# ----------------------------------------------------------------------------------------------------
# Server-sent events: the response class and the framing both streaming routes share
# ----------------------------------------------------------------------------------------------------
class CleanStream(StreamingResponse):
    """A streaming response whose clean-up runs even when its body never starts (a client that hangs up
    before the first chunk: Starlette then cancels the body task before it runs, so the generator's own
    `finally` would never execute). SSE here, NDJSON on Ollama's routes."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], None], *, media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, media_type=media_type, headers=headers)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class SSEResponse(CleanStream):
    """Server-sent events (OpenAI's streaming), with CleanStream's clean-up."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(body, cleanup, media_type="text/event-stream", headers=SSE_HEADERS)


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, run at most once however often it is called (a stream's clean-up has two callers)."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()
    return run


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_stream(request: Request, gen: Generation, head: list[dict], chunks: Callable[[int, Any], list[dict]],
                     usage_chunk: Callable[[int], dict] | None, cleanup: Callable[[], None]) -> AsyncIterator[bytes]:
    """The SSE framing both streaming routes share: the `head` chunks, then `chunks(choice, event)` for every
    event, a keep-alive comment in silences, the usage chunk (when asked) once every row is done, then
    `[DONE]`. An error after the first byte can only be an error event (the 200 is already out)."""
    n_out = 0
    try:
        for c in head:
            yield _sse(c)
        async for i, ev in gen.events(ping=request.app.state.opts.stream_ping):
            if i < 0:
                yield b": ping\n\n"
                continue
            if ev.token_id is not None:
                n_out += 1
            for c in chunks(i, ev):
                yield _sse(c)
        if usage_chunk is not None:
            yield _sse(usage_chunk(n_out))
        yield b"data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())
    finally:
        cleanup()
