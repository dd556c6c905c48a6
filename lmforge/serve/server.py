"""Running the app: uvicorn with lmforge's limits, and a graceful shutdown.

On SIGTERM (or the first Ctrl-C) the server keeps listening but answers every new request with 503, lets
the requests in flight finish (streams included) for up to `grace` seconds, then stops and exits 0. A
second Ctrl-C stops at once. Plain uvicorn would instead close its socket at once, so a client arriving
during the drain would see "connection refused" rather than an answer it can act on.

Slow clients are dropped: uvicorn waits for a request's headers and body for as long as the client likes,
so a few hundred connections that trickle a byte a second hold the server's sockets and memory for good
(slowloris). `TimedH11Protocol` gives every request `header_timeout` seconds from its first byte (or from
the connection, for one that sends nothing) to finish its headers, and `body_timeout` seconds to finish its
body; past either, the connection is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.serve.app import ServerOptions, create_app
from lmforge.serve.models import ModelRegistry

log = logging.getLogger("lmforge.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines for a request's headers and for its body (see above)."""

    header_timeout = 10.0  # set per server by `build_server`
    body_timeout = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm("headers")  # a request has begun and its headers are not complete yet
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # between requests uvicorn's keep-alive timeout applies

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, what: str) -> None:
        if self._waiting_for == what:
            return
        self._disarm()
        self._waiting_for = what
        timeout = self.header_timeout if what == "headers" else self.body_timeout
        self._deadline = self.loop.call_later(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.warning("dropped a client too slow to send its request %s", self._waiting_for)
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains instead of stopping."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, opts: ServerOptions, grace: float) -> None:
        super().__init__(config)
        self.registry, self.opts, self.grace = registry, opts, grace
        self.drained_in: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.opts.draining:  # second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Refuse new requests with 503, wait for those in flight (at most `grace` s), then stop."""
        # The guard now answers 503 to every new request. Requests already admitted finish, even one that
        # has its model but has not reached the scheduler yet (still tokenizing on the worker pool): closing
        # the schedulers here refused those with 503 mid-drain, and the drain, seeing nothing in flight,
        # stopped the server early.
        self.opts.draining = True
        log.warning("shutting down: finishing %d request(s) in flight (at most %.0fs)", self.registry.in_flight,
                    self.grace)

        def wait() -> None:
            t0 = time.monotonic()
            while self.registry.in_flight and time.monotonic() - t0 < self.grace:
                time.sleep(0.05)
            self.drained_in = time.monotonic() - t0
            self.should_exit = True

        threading.Thread(target=wait, name="lmforge-drain", daemon=True).start()

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        self.app.state.cpu.pool.shutdown(wait=False)  # the worker pool's threads end with the server

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]


def build_server(registry: ModelRegistry, opts: ServerOptions, *, host: str = "127.0.0.1", port: int = 11435,
                 grace: float = 30.0, log_level: str = "warning") -> DrainingServer:
    app = create_app(registry, opts)
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": opts.header_timeout,
                                                      "body_timeout": opts.body_timeout})
    config = uvicorn.Config(
        app.state.guarded, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
        server_header=False, date_header=True, h11_max_incomplete_event_size=opts.max_header_bytes,
        timeout_keep_alive=5, timeout_graceful_shutdown=5, http=protocol,
    )
    server = DrainingServer(config, registry, opts, grace)
    server.app = app  # type: ignore[attr-defined]
    return server


def keep_alive_loop(registry: ModelRegistry, server: DrainingServer, interval: float = 5.0) -> threading.Thread:
    """Unload idle models every `interval` seconds while the server runs."""

    def loop() -> None:
        while not server.should_exit:
            time.sleep(interval)
            for name in registry.unload_idle():
                log.warning("unloaded %s (idle for %.0fs)", name, registry.keep_alive)

    t = threading.Thread(target=loop, name="lmforge-keep-alive", daemon=True)
    t.start()
    return t
