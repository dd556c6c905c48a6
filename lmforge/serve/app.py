"""The HTTP server: an OpenAI-compatible API, the tokenizer routes lm-evaluation-harness uses, feedback
collection, and the web chat UI.

Layers, each in its own file: `protocol` (the wire format: request schemas and the error shape) ->
`translate` (requests to token ids and `SamplingParams`, results to response objects) -> the engine's
`Scheduler` (continuous batching), reached through `models.ModelRegistry` (lazy loading, keep-alive).
This file only wires them to HTTP. Every route is in the one `ROUTES` table at the bottom.

Security, by default: the key (when one is set) is compared in constant time; on a loopback address the
Host header must name loopback too (a DNS-rebinding page cannot reach us through a name it controls);
no CORS unless origins are given; bodies over `max_body` bytes are refused before they are read in full;
errors never carry a path or a traceback; every response carries a Content-Security-Policy under which
the UI runs only its own scripts, so model output cannot run any.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.engine.sampling import SamplingParams
from lmforge.serve import translate as tr
from lmforge.serve.feedback import save_feedback
from lmforge.serve.models import ModelRegistry, Served
from lmforge.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    FeedbackRequest, TokenizeRequest, invalid, parse)

log = logging.getLogger("lmforge.serve")

WEB_DIR = Path(__file__).parent / "web"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PUBLIC_PATHS = ("/", "/health", "/static/", "/vendor/", "/favicon.ico")  # reachable without the API key


@dataclass
class ServerOptions:
    api_key: str | None = None
    loopback: bool = True  # bound to a loopback address: check the Host header (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()  # extra Host names to accept (e.g. a reverse proxy's name)
    cors_origins: tuple[str, ...] = ()
    max_body: int = 1 << 20  # bytes; 413 beyond
    max_header_bytes: int = 16 * 1024  # request headers, all together; 431 beyond
    feedback_dir: Path | None = None  # default $LMFORGE_HOME/feedback
    stream_ping: float = 15.0  # seconds between SSE keep-alive comments while waiting
    draining: bool = field(default=False, init=False)  # set on shutdown: new requests get 503


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


# ----------------------------------------------------------------------------------------------------
# The outer guard: host check, draining, auth, body size, security headers (plain ASGI, before routing)
# ----------------------------------------------------------------------------------------------------
class Guard:
    def __init__(self, app: Any, opts: ServerOptions) -> None:
        self.app, self.opts = app, opts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        problem = (APIError(431, f"the request headers are {size} bytes; the limit is {self.opts.max_header_bytes}",
                            code="headers_too_large") if size > self.opts.max_header_bytes
                   else self._check(scope, headers))

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if problem is not None:
            return await _error(problem)(scope, receive, send_secured)
        return await self.app(scope, _limited(receive, self.opts.max_body), send_secured)

    def _check(self, scope, headers: dict[str, str]) -> APIError | None:
        opts = self.opts
        if opts.loopback:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name.lower() not in LOOPBACK_HOSTS and name.lower() not in opts.allowed_hosts:
                return APIError(400, "invalid Host header: this server only answers to loopback names "
                                "(start it with --host, or --allowed-host NAME, to serve other names)",
                                code="invalid_host")
        if opts.draining:
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                            headers={"retry-after": "5", "connection": "close"})
        path = scope["path"]
        if opts.api_key is not None and scope["method"] != "OPTIONS" and not (
                path == "/" or any(path.startswith(p) for p in PUBLIC_PATHS[1:])):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), opts.api_key.encode()):
                return APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                                type="invalid_request_error", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return invalid("invalid Content-Length header", code="invalid_request")
            if int(length) > opts.max_body:
                return APIError(413, f"the request body is {int(length)} bytes; the limit is {opts.max_body}",
                                code="request_too_large")
        return None


class _BodyTooLarge(Exception):
    pass


def _limited(receive, limit: int):
    """`receive` that stops a chunked body (no Content-Length) once it passes `limit` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped


async def read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except _BodyTooLarge:
        raise APIError(413, "the request body is larger than the limit", code="request_too_large") from None


# ----------------------------------------------------------------------------------------------------
# Generation: one or more rows of the scheduler, as an async stream of (choice index, event)
# ----------------------------------------------------------------------------------------------------
class Generation:
    """The rows of one API request on a model's scheduler. Iterate to get (choice, TokenEvent) pairs in
    order; `cancel()` (or leaving the iteration) frees the rows at the scheduler's next step."""

    def __init__(self, served: Served, prompts: list[list[int]], params: list[SamplingParams],
                 seed_offsets: list[int] | None = None) -> None:
        from lmforge.engine.scheduler import QueueFull, Request as Row, SchedulerClosed

        sched = served.scheduler
        if len(prompts) > sched.max_batch + sched.max_queue:
            raise invalid(f"this request needs {len(prompts)} sequences (prompts x n); this server runs at most "
                          f"{sched.max_batch + sched.max_queue} at once", param="n")
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rows: list[Row] = []
        self.open = len(prompts)
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                row = Row(ids, p, self._emitter(i), seq=i, seed_offset=seed_offsets[i] if seed_offsets else None)
                self.rows.append(row)
                served.scheduler.submit(row)
        except QueueFull:
            self.cancel()
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"retry-after": "1"}) from None
        except SchedulerClosed:
            self.cancel()
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except ValueError as e:
            self.cancel()
            raise invalid(str(e), code="context_length_exceeded") from None

    def _emitter(self, i: int) -> Callable:
        def emit(ev):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
        return emit

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    async def events(self, ping: float | None = None) -> AsyncIterator[tuple[int, Any]]:
        """(choice, event) until every row is over; (-1, None) every `ping` seconds of silence."""
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
                        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
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


class _Stream(StreamingResponse):
    """A streaming response whose clean-up runs even when its body never starts (a client that hangs up
    before the first chunk: Starlette then cancels the body task before it runs, so the generator's own
    `finally` would never execute)."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()
    return run


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _sse_stream(request: Request, gen: Generation, head: list[dict], chunks: Callable[[int, Any], list[dict]],
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


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------
def create_app(registry: ModelRegistry, opts: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving `registry`'s models. Wrap nothing around it: `app.state.guarded` is the
    ASGI callable to serve (the guard runs before routing, so a refused request costs nothing)."""
    opts = opts or ServerOptions()
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.opts = registry, opts

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        return _error(invalid(f"invalid '{loc}': {err.get('msg', 'invalid value')}", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        return _error(APIError(e.status_code, message, code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, "internal server error (details are in the server log)", type="server_error",
                               code="internal_error", headers={"x-should-retry": "false"}))

    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)

    inner: Any = app
    if opts.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        inner = CORSMiddleware(app, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                               allow_headers=["authorization", "content-type"])
    app.state.guarded = Guard(inner, opts)
    return app


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _use(request: Request, model_id: str) -> Served:
    return await _registry(request).get(model_id)


# -- info routes -----------------------------------------------------------------------------------------
async def health(request: Request):
    loaded = _registry(request).snapshot()
    return {"status": "draining" if request.app.state.opts.draining else "ok",
            "models_loaded": sorted(s.name for s in loaded),
            "busy_slots": sum(s.scheduler.busy for s in loaded),
            "queued": sum(s.scheduler.queued for s in loaded)}


async def list_models(request: Request):
    return {"object": "list", "data": [tr.model_card(name, created) for name, created in _registry(request).ids()]}


async def get_model(request: Request, model_id: str):
    name, path = _registry(request).path_of(model_id)
    created = dict(_registry(request).ids()).get(name, int(path.stat().st_mtime))
    return tr.model_card(name, created)


# -- chat completions --------------------------------------------------------------------------------------
async def chat_completions(request: Request):
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_body(request))
    tr.check_chat_request(req)
    served = await _use(request, req.model)
    streaming = False
    try:
        tok, mf = served.engine.tokenizer, served.modelfile
        messages = tr.message_dicts(req.messages, mf.system, mf.messages)
        ids = tr.chat_prompt_ids(tok, messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = tr.sampling_params(req, mf.parameters, prompt_len=len(ids), context=served.scheduler.context_length,
                                    vocab_size=served.engine.config.vocab_size, max_tokens=max_tokens)
        if params.num_beams > 1:
            return await _beam_chat(served, req, ids, params)
        gen = Generation(served, [ids] * req.n, [params] * req.n)
        rid, created = tr.new_id("chatcmpl"), int(time.time())
        if req.stream:
            streaming = True  # the stream releases the model when it ends
            cleanup = _once(lambda: (gen.cancel(), _registry(request).release(served)))
            return _Stream(_chat_stream(served, request, gen, req, rid, created, len(ids), cleanup), cleanup)
        choices = await collect(gen, request, req.n)
        body = tr.chat_response(rid, req.model, [
            tr.chat_choice(i, c.text, c.finish_reason or "stop",
                           tr.chat_logprobs(tok, c.ids, c.logprobs, c.tops) if req.logprobs else None)
            for i, c in enumerate(choices)], tr.usage(len(ids), sum(len(c.ids) for c in choices)), created)
        return JSONResponse(body)
    finally:
        if not streaming:
            _registry(request).release(served)


def _chat_stream(served: Served, request: Request, gen: Generation, req: ChatCompletionRequest, rid: str,
                 created: int, n_prompt: int, cleanup: Callable[[], None]) -> AsyncIterator[bytes]:
    tok = served.engine.tokenizer
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict]) -> dict:
        return tr.chat_chunk(rid, req.model, created, choices, with_usage)

    def chunks(i: int, ev) -> list[dict]:
        out = []
        lp = None
        if req.logprobs and ev.token_id is not None:
            lp = tr.chat_logprobs(tok, [ev.token_id], [ev.logprob], [ev.top_logprobs or []])
        if ev.text or lp is not None:
            out.append(chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}]))
        if ev.finish_reason:
            out.append(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}]))
        return out

    head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            for i in range(req.n)]
    usage_chunk = (lambda n_out: {**tr.chat_chunk(rid, req.model, created, [], False),
                                  "usage": tr.usage(n_prompt, n_out)}) if with_usage else None
    return _sse_stream(request, gen, head, chunks, usage_chunk, cleanup)


async def _beam_chat(served: Served, req: ChatCompletionRequest, ids: list[int], params: SamplingParams):
    hyps = await _beam(served, ids, params, req.n)
    tok = served.engine.tokenizer
    choices = [tr.chat_choice(i, text, reason, None) for i, (text, _, reason) in enumerate(_beam_texts(tok, hyps, params))]
    n_out = sum(len(h.ids) for h in hyps)
    return JSONResponse(tr.chat_response(tr.new_id("chatcmpl"), req.model, choices, tr.usage(len(ids), n_out)))


async def _beam(served: Served, ids: list[int], params: SamplingParams, n: int):
    fut = served.scheduler.call(lambda: served.engine.beam_search(ids, params, n_best=n))
    try:
        return await asyncio.wrap_future(fut)
    except ValueError as e:
        raise invalid(str(e)) from None


def _beam_texts(tok, hyps, params: SamplingParams) -> list[tuple[str, list[int], str]]:
    """Text, ids and finish reason of each hypothesis: the EOS dropped, cut at the first stop string."""
    eos = set(tok.eos_ids) | set(params.stop_token_ids)
    out = []
    for h in hyps:
        ids = h.ids[:-1] if h.ids and h.ids[-1] in eos else list(h.ids)
        text, reason = tok.decode(ids), h.finish_reason
        cuts = [text.find(s) for s in params.stop if s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        out.append((text, ids, reason))
    return out


# -- text completions ---------------------------------------------------------------------------------------
async def completions(request: Request):
    req: CompletionRequest = parse(CompletionRequest, await read_body(request))
    tr.check_completion_request(req)
    served = await _use(request, req.model)
    streaming = False
    try:
        tok, cfg, mf = served.engine.tokenizer, served.engine.config, served.modelfile
        prompts = tr.completion_prompts(tok, req.prompt, cfg.vocab_size)
        ctx = served.scheduler.context_length
        max_tokens = req.max_tokens
        params = [tr.sampling_params(req, mf.parameters, prompt_len=len(p), context=ctx, vocab_size=cfg.vocab_size,
                                     max_tokens=max_tokens if max_tokens else None) for p in prompts]
        if req.echo and req.stream:
            raise invalid("echo cannot be combined with stream", param="echo")
        k = req.logprobs
        echoed = None
        if req.echo and k is not None:
            echoed = await asyncio.wrap_future(served.scheduler.call(
                lambda: [served.engine.score_ids(p, top_k=k) for p in prompts]))
        if req.max_tokens == 0:  # echo only: score the prompt, generate nothing
            choices = [tr.completion_choice(j, tok.decode(p) if req.echo else "", "length",
                                            _echo_logprobs(tok, p, echoed[j], k) if echoed else None)
                       for j, p in enumerate(prompts)]
            return JSONResponse(tr.completion_response(tr.new_id("cmpl"), req.model, choices,
                                                       tr.usage(sum(map(len, prompts)), 0)))
        if params[0].num_beams > 1:
            results = []
            for p, sp in zip(prompts, params):
                hyps = await _beam(served, p, sp, req.n)
                results.extend(_beam_texts(tok, hyps, sp))
            choices = [tr.completion_choice(j, text, reason, None) for j, (text, _, reason) in enumerate(results)]
            return JSONResponse(tr.completion_response(tr.new_id("cmpl"), req.model, choices,
                                                       tr.usage(sum(map(len, prompts)), sum(len(r[1]) for r in results))))
        rows_prompts = [p for p in prompts for _ in range(req.n)]
        rows_params = [sp for sp in params for _ in range(req.n)]
        # sample i of every prompt draws from seed + i, as if that prompt had been sent alone
        gen = Generation(served, rows_prompts, rows_params, seed_offsets=[i for _ in prompts for i in range(req.n)])
        rid, created = tr.new_id("cmpl"), int(time.time())
        if req.stream:
            streaming = True
            cleanup = _once(lambda: (gen.cancel(), _registry(request).release(served)))
            return _Stream(_completion_stream(served, request, gen, req, rid, created, sum(map(len, prompts)),
                                              cleanup), cleanup)
        results = await collect(gen, request, len(rows_prompts))
        choices = []
        for j, c in enumerate(results):
            p = rows_prompts[j]
            text, lp = c.text, None
            if k is not None:
                lp = tr.completion_logprobs(tok, c.ids, c.logprobs, c.tops,
                                            offset=len(tok.decode(p)) if req.echo else 0)
            if req.echo:
                prompt_text = tok.decode(p)
                text = prompt_text + text
                if lp is not None:
                    head = _echo_logprobs(tok, p, echoed[j // req.n], k)
                    lp = {key: head[key] + lp[key] for key in lp}
            choices.append(tr.completion_choice(j, text, c.finish_reason or "stop", lp))
        return JSONResponse(tr.completion_response(rid, req.model, choices,
                                                   tr.usage(sum(map(len, prompts)), sum(len(c.ids) for c in results)),
                                                   created))
    finally:
        if not streaming:
            _registry(request).release(served)


def _echo_logprobs(tok, prompt: list[int], scored, k: int) -> dict:
    """Logprobs of the prompt's own tokens (the first has no context: null, as OpenAI does)."""
    tops = scored.top_logprobs if scored.top_logprobs is not None else [[] for _ in scored.logprobs]
    return tr.completion_logprobs(tok, prompt, [None, *scored.logprobs], [None, *tops])


def _completion_stream(served: Served, request: Request, gen: Generation, req: CompletionRequest, rid: str,
                       created: int, n_prompt: int, cleanup: Callable[[], None]) -> AsyncIterator[bytes]:
    tok = served.engine.tokenizer
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    offsets = [0] * len(gen.rows)

    def chunks(i: int, ev) -> list[dict]:
        lp = None
        if req.logprobs is not None and ev.token_id is not None:
            lp = tr.completion_logprobs(tok, [ev.token_id], [ev.logprob], [ev.top_logprobs or []], offset=offsets[i])
        offsets[i] += len(ev.text)
        chunk = tr.completion_response(rid, req.model, [tr.completion_choice(i, ev.text, ev.finish_reason, lp)],
                                       None, created)
        if not with_usage:
            chunk.pop("usage")
        return [chunk]

    usage_chunk = (lambda n_out: tr.completion_response(rid, req.model, [], tr.usage(n_prompt, n_out), created)) \
        if with_usage else None
    return _sse_stream(request, gen, [], chunks, usage_chunk, cleanup)


# -- tokenizer routes (vLLM's shapes, which lm-evaluation-harness's local-completions probes) -------------------
async def _tokenizer_model(request: Request, model_id: str | None) -> Served:
    if model_id is None:
        ids = _registry(request).ids()
        if len(ids) != 1:
            raise invalid("several models are served here: say which with 'model'", param="model",
                          code="missing_required_parameter")
        model_id = ids[0][0]
    return await _use(request, model_id)


async def tokenize(request: Request):
    req: TokenizeRequest = parse(TokenizeRequest, await read_body(request))
    if (req.prompt is None) == (req.messages is None):
        raise invalid("send exactly one of 'prompt' or 'messages'", param="prompt")
    served = await _tokenizer_model(request, req.model)
    try:
        tok = served.engine.tokenizer
        if req.messages is not None:
            ids = tr.chat_prompt_ids(tok, tr.message_dicts(req.messages), add_generation_prompt=req.add_generation_prompt)
        else:
            ids = tok.encode(req.prompt, add_bos=None if req.add_special_tokens else False)
        return {"count": len(ids), "max_model_len": served.scheduler.context_length, "tokens": ids}
    finally:
        _registry(request).release(served)


async def detokenize(request: Request):
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_body(request))
    served = await _tokenizer_model(request, req.model)
    try:
        vocab = served.engine.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": served.engine.tokenizer.decode(req.tokens)}
    finally:
        _registry(request).release(served)


async def tokenizer_info(request: Request, model: str | None = None):
    served = await _tokenizer_model(request, model)
    try:
        tok = served.engine.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": tok.chat_template, "model_max_length": served.scheduler.context_length,
                "vocab_size": served.engine.config.vocab_size, "tokenizer_class": "PreTrainedTokenizerFast"}
    finally:
        _registry(request).release(served)


# -- feedback ---------------------------------------------------------------------------------------------------
async def feedback(request: Request):
    req: FeedbackRequest = parse(FeedbackRequest, await read_body(request))
    _registry(request).path_of(req.model)  # only feedback about a model served here
    if req.rating is None and not (req.better and req.better.strip()):
        raise invalid("send a rating ('up' or 'down') or a better answer", param="rating")
    messages = tr.message_dicts(req.messages)
    if messages[-1]["role"] != "user":
        raise invalid("messages must end with the user turn the response answers", param="messages")
    saved = await asyncio.to_thread(save_feedback, request.app.state.opts.feedback_dir, req.model, messages,
                                    req.response, req.rating, req.better)
    return {"object": "feedback", "saved": saved}


# -- the web UI ---------------------------------------------------------------------------------------------------
async def index(request: Request):
    page = WEB_DIR / "index.html"
    if not page.is_file():
        raise APIError(404, "the web UI is not installed", code="not_found")
    return FileResponse(page, media_type="text/html; charset=utf-8")


def _safe_file(root: Path, rel: str) -> Path:
    """`root/rel` if that is a regular file inside `root` (no '..', no absolute paths, no symlink escape)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        raise APIError(404, "not found", code="not_found")
    base = root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise APIError(404, "not found", code="not_found")
    return path


async def static(request: Request, name: str):
    return FileResponse(_safe_file(WEB_DIR, name))


async def vendor(request: Request, path: str):
    modules = WEB_DIR / "node_modules"
    if not modules.is_dir():
        raise APIError(404, "the web UI's libraries are not installed (run the set-up: make setup)", code="not_found")
    return FileResponse(_safe_file(modules, path))


ROUTES: list[tuple[str, str, Callable]] = [
    ("GET", "/health", health),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model_id:path}", get_model),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
    ("POST", "/v1/feedback", feedback),
    ("GET", "/", index),
    ("GET", "/static/{name}", static),
    ("GET", "/vendor/{path:path}", vendor),
]
