"""Running the app: uvicorn with lmforge's limits, and a graceful shutdown.

On SIGTERM (or the first Ctrl-C) the server keeps listening but answers every new request with 503, lets
the requests in flight finish (streams included) for up to `grace` seconds, then stops and exits 0. A
second Ctrl-C stops at once. Plain uvicorn would instead close its socket at once, so a client arriving
during the drain would see "connection refused" rather than an answer it can act on.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

import uvicorn

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
        self.opts.draining = True
        self.registry.close()
        log.warning("shutting down: finishing %d request(s) in flight (at most %.0fs)", self.registry.in_flight,
                    self.grace)

        def wait() -> None:
            t0 = time.monotonic()
            while self.registry.in_flight and time.monotonic() - t0 < self.grace:
                time.sleep(0.05)
            self.drained_in = time.monotonic() - t0
            self.should_exit = True

        threading.Thread(target=wait, name="lmforge-drain", daemon=True).start()

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]


def build_server(registry: ModelRegistry, opts: ServerOptions, *, host: str = "127.0.0.1", port: int = 11435,
                 grace: float = 30.0, log_level: str = "warning") -> DrainingServer:
    app = create_app(registry, opts)
    config = uvicorn.Config(
        app.state.guarded, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
        server_header=False, date_header=True, h11_max_incomplete_event_size=opts.max_header_bytes,
        timeout_keep_alive=5, timeout_graceful_shutdown=5,
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
