"""A small HTTP client for a running `lmforge serve`, for the verbs that talk to it (`ps`, `stop`, `run`).

Where the server is: `LMFORGE_HOST` (as `OLLAMA_HOST` for ollama): `host`, `host:port`, or a URL
(`http://host:port`); the default is 127.0.0.1:11435, `lmforge serve`'s own default. With `LMFORGE_API_KEY`
set, requests carry it (a server started with --api-key wants it).

The standard library's urllib, not httpx: the CLI needs no HTTP dependency beyond what Python ships.
Every failure is a `UserError` (one line, exit code 2): `ServerUnavailable` when nothing answers at that
address, the server's own message when it refuses a request.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Iterator
from urllib.parse import urlsplit

from lmforge.errors import UserError

DEFAULT_HOST = "127.0.0.1:11435"


class ServerUnavailable(UserError):
    """No lmforge server answers at the address."""


class ServerError(UserError):
    """The server answered with an error; `status` is its HTTP status, None for an error in the middle of a
    stream (the response had already begun as 200 OK, so the line carries no status of its own)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


def base_url(host: str | None = None) -> str:
    """`http://host:port` of `host` (default: $LMFORGE_HOST, else 127.0.0.1:11435)."""
    raw = (host if host is not None else os.environ.get("LMFORGE_HOST", "")).strip() or DEFAULT_HOST
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"LMFORGE_HOST {raw!r} is not an address: use host, host:port or http://host:port")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 11435)
    except ValueError:
        raise UserError(f"LMFORGE_HOST {raw!r} has a bad port") from None
    host_part = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host_part}:{port}"


class Client:
    """Requests to one server. `timeout` bounds connecting and each read, in seconds."""

    def __init__(self, host: str | None = None, timeout: float = 600.0) -> None:
        self.base = base_url(host)
        self.timeout = timeout
        self.key = os.environ.get("LMFORGE_API_KEY") or None

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise ServerError(_message(e), e.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnavailable(f"no lmforge server answers at {self.base} ({reason}); start one with "
                                    f"`lmforge serve`, or set LMFORGE_HOST to where it runs") from None

    def get(self, path: str, timeout: float | None = None) -> Any:
        with self._request("GET", path, timeout=timeout) as r:
            return _json(r.read())

    def post(self, path: str, body: Any, timeout: float | None = None) -> Any:
        with self._request("POST", path, body, timeout=timeout) as r:
            return _json(r.read())

    def stream(self, path: str, body: Any) -> Iterator[dict]:
        """The objects of an NDJSON response, as they arrive; an `{"error": ...}` line is a ServerError."""
        with self._request("POST", path, body) as r:
            for line in r:
                if not line.strip():
                    continue
                obj = _json(line)
                if isinstance(obj, dict) and "error" in obj:
                    raise ServerError(str(obj["error"]), None)  # not a 500: it may be the request's fault
                yield obj

    def answers(self) -> bool:
        """Whether an lmforge server answers here (a quick GET /api/version)."""
        try:
            self.get("/api/version", timeout=2.0)
            return True
        except ServerUnavailable:
            return False
        except ServerError:  # something answers, and is not an lmforge server we can use (or wants a key)
            return True


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise UserError("the server answered with something that is not JSON (is LMFORGE_HOST an lmforge "
                        "server?)") from None


def _message(e: urllib.error.HTTPError) -> str:
    """The server's one-line reason: Ollama's {"error": "..."} or OpenAI's {"error": {"message": ...}}."""
    try:
        body = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        body = {}
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err) if err else f"the server answered {e.code} {e.reason}"
