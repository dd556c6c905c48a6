"""The HTTP server's app: the OpenAI-compatible API, the tokenizer routes lm-evaluation-harness uses,
feedback collection and the web chat UI, assembled from the modules that do each job.

Layers, each in its own file: `protocol` (the wire format: request schemas and the error shape) ->
`translate` (requests to token ids and `SamplingParams`, results to response objects) -> the engine's
`Scheduler` (continuous batching), reached through `models.ModelRegistry` (lazy loading, keep-alive).
The HTTP side: `security` (the ASGI guard before routing), `stream` (the scheduler thread -> asyncio
bridge and SSE), `routes` (every handler, in the one `ROUTES` table), `ollama` (Ollama's native API on /api/*,
`OLLAMA_ROUTES`, whose errors take Ollama's `{"error": "..."}` shape). This file only assembles them
(`create_app`): error handlers that give every error OpenAI's shape, the routes, CORS, the guard, and
`metrics` (`GET /metrics`, with requests counted around the guard so that refused ones count too).
Imports flow one way: app -> routes -> stream / security -> protocol, translate, models, engine.

`ServerOptions` and `Guard` are re-exported here, where callers have always imported them from.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.embeddings import ROUTES as EMBEDDING_ROUTES
from lmforge.serve.feedback import RateLimit
from lmforge.serve.metrics import Metrics, RequestCounter, metrics_endpoint
from lmforge.serve.models import ModelRegistry
from lmforge.serve.ollama import OLLAMA_ROUTES
from lmforge.serve.protocol import APIError, invalid
from lmforge.serve.routes import ROUTES
from lmforge.serve.security import Guard, ServerOptions, error_response, secure
from lmforge.serve.stream import WorkerPool

__all__ = ["Guard", "ServerOptions", "create_app"]

log = logging.getLogger("lmforge.serve")


def _error(request: Request, e: APIError):
    """The error in the shape of the API the path belongs to: Ollama's `{"error": "..."}` on its routes
    (/api/*, `serve/ollama.py`), OpenAI's `{"error": {message, type, param, code}}` everywhere else."""
    return error_response(e, request.url.path)


def create_app(registry: ModelRegistry, opts: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving `registry`'s models. Wrap nothing around it: `app.state.guarded` is the
    ASGI callable to serve (the guard runs before routing, so a refused request costs nothing)."""
    opts = opts or ServerOptions()
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.opts = registry, opts
    app.state.feedback_rate = RateLimit(opts.feedback_per_minute)
    app.state.cpu = WorkerPool(opts.cpu_workers, opts.max_cpu_jobs)
    app.state.metrics = Metrics(registry)  # this app's own Prometheus registry (`serve/metrics.py`)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        return _error(request, invalid(f"invalid '{loc}': {err.get('msg', 'invalid value')}", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        return _error(request, APIError(e.status_code, message, code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(request, APIError(500, "internal server error (details are in the server log)",
                                       type="server_error", code="internal_error", headers={"x-should-retry": "false"}))

    for method, path, endpoint in ROUTES + EMBEDDING_ROUTES + OLLAMA_ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    # Requests are counted outside the guard, so the ones it refuses are counted too.
    app.state.guarded = RequestCounter(secure(app, opts), app, app.state.metrics)
    return app
