"""What the server lets in: the ASGI guard in front of the app, CORS, and the request-body limit.

`secure(app, opts)` is the app as it is served: the `Guard` (Host check, draining, API key, header and
body sizes, security headers) runs before routing, as plain ASGI, so a refused request costs nothing:
no route, no parsing, no model. Routes read their bodies through `read_body`, which turns a chunked body
that outgrows the limit into a 413. Kept apart from the handlers so that all of this can be read, and
reviewed, in one place. `ServerOptions` lives here because most of its fields are these limits.

Security, by default: the key (when one is set) is compared in constant time; on a loopback address the
Host header must name loopback too (a DNS-rebinding page cannot reach us through a name it controls);
no CORS unless origins are given; bodies over `max_body` bytes are refused before they are read in full;
every response carries a Content-Security-Policy under which the UI runs only its own scripts, so model
output cannot run any.

Other web pages cannot drive the server (a page the user visits could otherwise plant training data
through /v1/feedback or burn CPU, with no key to stop it). The browser tells us where a request comes from:
- a request with an `Origin` other than our own (scheme://host:port of the Host header) or a `--cors-origin`
  is refused with 403, whatever the method;
- a request a page made without an `Origin` (an <img>, a <script>, a no-cors fetch) still carries
  `Sec-Fetch-Site: cross-site` or `same-site` (another port of localhost is "same-site"): refused too, except
  a plain navigation to the UI's own pages (following a link to http://127.0.0.1:11435/);
- a state-changing request (anything but GET, HEAD, OPTIONS) must send `Content-Type: application/json`:
  a browser's "simple request" (text/plain, a form post) is the one cross-site request that skips CORS's
  preflight, and no client of a JSON API needs it.
Clients that are not browsers (the openai and ollama libraries, curl, lm-evaluation-harness) send no
`Origin` and no `Sec-Fetch-Site`, and are not affected beyond the JSON content type.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse

from lmforge.serve.protocol import APIError, invalid

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
UI_PATHS = ("/", "/static/", "/vendor/", "/favicon.ico")  # the pages a link from elsewhere may open
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
AUTHORIZED = "lmforge.authorized"  # scope key: whether the request carried the API key (or none is set)


@dataclass
class ServerOptions:
    api_key: str | None = None
    loopback: bool = True  # bound to a loopback address: check the Host header (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()  # extra Host names to accept (e.g. a reverse proxy's name)
    cors_origins: tuple[str, ...] = ()
    max_body: int = 1 << 20  # bytes; 413 beyond
    max_header_bytes: int = 16 * 1024  # request headers, all together; 431 beyond
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send a request's body
    feedback_dir: Path | None = None  # default $LMFORGE_HOME/feedback
    docs: str | None = None  # `serve --docs`: the index the web UI grounds on by default (the API only when asked)
    feedback_per_minute: float = 60.0  # records a minute, on average (bursts of 10); 429 beyond
    feedback_max_record: int = 256 * 1024  # bytes of one feedback record; 413 beyond
    feedback_max_file: int = 64 << 20  # bytes a feedback file may grow to; 507 beyond
    cpu_workers: int = 2  # threads for tokenizing and template rendering (never on the event loop)
    max_cpu_jobs: int = 64  # such jobs that may wait; 429 beyond
    stream_ping: float = 15.0  # seconds between SSE keep-alive comments while waiting
    draining: bool = field(default=False, init=False)  # set on shutdown: new requests get 503


def error_response(e: APIError, path: str = "") -> JSONResponse:
    """OpenAI's error body; Ollama's `{"error": "message"}` on its routes (/api/*, `serve/ollama.py`)."""
    body = {"error": e.message} if path.startswith("/api/") else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers or None)


def secure(app: Any, opts: ServerOptions) -> Any:
    """`app` as it is served: behind the `Guard`, with CORS (only when origins are given) inside it."""
    inner: Any = app
    if opts.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        inner = CORSMiddleware(app, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                               allow_headers=["authorization", "content-type"])
    return Guard(inner, opts)


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
            return await error_response(problem, scope["path"])(scope, receive, send_secured)
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
        path, method = scope["path"], scope["method"]
        problem = self._cross_site(path, method, headers)
        if problem is not None:
            return problem
        authorized = opts.api_key is None
        if not authorized:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            authorized = hmac.compare_digest(given.encode(), opts.api_key.encode())
        scope[AUTHORIZED] = authorized
        if not authorized and method != "OPTIONS" and not _under(path, PUBLIC_PATHS):
            return APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                            type="invalid_request_error", code="invalid_api_key")
        if method not in SAFE_METHODS:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"send the request body as JSON (Content-Type: application/json), not "
                                f"{kind or 'no content type'}", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return invalid("invalid Content-Length header", code="invalid_request")
            if int(length) > opts.max_body:
                return APIError(413, f"the request body is {int(length)} bytes; the limit is {opts.max_body}",
                                code="request_too_large")
        return None

    def _cross_site(self, path: str, method: str, headers: dict[str, str]) -> APIError | None:
        """A 403 for a request another web page made (see the module docstring), else None."""
        origin = headers.get("origin")
        if origin is not None:
            if origin in self.opts.cors_origins or "*" in self.opts.cors_origins or _same_origin(origin, headers):
                return None
            return APIError(403, f"cross-origin request from {origin[:100]} refused: only this server's own "
                            f"pages (and --cors-origin ones) may call it", code="cross_origin")
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site") and not (
                method == "GET" and headers.get("sec-fetch-mode") == "navigate" and _under(path, UI_PATHS)):
            return APIError(403, "request from another site refused: only this server's own pages (and "
                            "--cors-origin ones) may call it", code="cross_origin")
        return None


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    """`path` is one of `prefixes` ("/" only as itself) or lies under one."""
    return any(path == p if p == "/" else path.startswith(p) for p in prefixes)


def _same_origin(origin: str, headers: dict[str, str]) -> bool:
    """Whether `origin` (scheme://host[:port]) names the host the request was sent to."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    host = headers.get("host", "").lower()
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host


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

