"""A live lmforge server on 127.0.0.1 (port 0) in a background thread, for tests that speak HTTP to it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import wait_until  # noqa: F401  (re-exported: the server tests wait on the server thread)


class LiveServer:
    def __init__(self, server, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def registry(self):
        return self.server.registry

    @property
    def opts(self):
        return self.server.opts

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.server.registry.stop()


def start_server(models: dict[str, Path] | None, **options) -> LiveServer:
    """Start a server for `models` (None: the store) with ServerOptions/ModelRegistry `options`."""
    import asyncio

    from lmforge.serve.app import ServerOptions
    from lmforge.serve.models import ModelRegistry
    from lmforge.serve.server import build_server

    reg_keys = {"max_batch", "max_queue", "max_context", "keep_alive", "fast", "prefill_chunk",
                "prompt_cache"}
    registry = ModelRegistry(models, device="cpu", **{k: v for k, v in options.items() if k in reg_keys})
    grace = options.pop("grace", 10.0)
    opts = ServerOptions(**{k: v for k, v in options.items() if k not in reg_keys})
    server = build_server(registry, opts, host="127.0.0.1", port=0, grace=grace)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(server, thread)
