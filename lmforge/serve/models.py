"""Which models a server offers, and loading them on demand (Ollama's keep-alive).

A request names a model by id. The id is looked up, never resolved as a path: the models are either the
ones given on the command line (store names, directories or .gguf files, resolved once at start-up by
the operator) or the entries of the model store, matched by validated store name. So no request can make
the server open a file outside what it was told to serve.

Models load on first use, in a worker thread, after a memory check (weights plus KV cache against the
memory the OS says is available), and unload after `keep_alive` seconds without requests, freeing memory
for the next one. Each loaded model has its own `Scheduler` (continuous batching).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.device import available_memory
from lmforge.errors import UserError
from lmforge.serve.protocol import APIError

log = logging.getLogger("lmforge.serve")


@dataclass
class Served:
    """A loaded model: its engine, scheduler, Modelfile settings and when it was last used."""

    name: str
    engine: Any
    scheduler: Any
    modelfile: Any
    created: int
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # requests in flight: a model in use is never unloaded


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:  # removed since the server started: still listed, and a request gets the load error
        return 0


def _weights_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".gguf", ".bin"))


class ModelRegistry:
    """The served models. `fixed` maps ids to paths (command-line models); None serves the whole store."""

    def __init__(self, fixed: dict[str, Path] | None = None, *, device: str = "cpu", max_batch: int = 8,
                 max_queue: int = 64, max_context: int | None = 4096, keep_alive: float = 300.0,
                 fast: bool = True, prefill_chunk: int = 512) -> None:
        self.fixed = fixed
        self.device, self.max_batch, self.max_queue = device, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.max_context, self.keep_alive, self.fast = max_context, keep_alive, fast
        self.loaded: dict[str, Served] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()
        self._reported: set[tuple[str, str]] = set()  # damaged store entries already logged

    # -- naming ---------------------------------------------------------------------------------------
    def ids(self) -> list[tuple[str, int]]:
        """(id, created unix time) of every model offered. A damaged store entry is left out (and logged
        once), never a reason for the listing, or the server's start, to fail."""
        if self.fixed is not None:
            return [(name, _mtime(path)) for name, path in self.fixed.items()]
        from lmforge.store import list_models

        try:
            entries = list_models()
        except UserError as e:  # the store directory itself is unreadable
            log.error("%s", e)
            return []
        out = []
        for e in entries:
            if e.error is None:
                name = e.name[: -len(":latest")] if e.name.endswith(":latest") else e.name
                out.append((name, int(e.modified)))
            elif (e.name, e.error) not in self._reported:
                self._reported.add((e.name, e.error))
                log.warning("not serving %s, a damaged store entry: %s", e.name, e.error)
        return out

    def path_of(self, model_id: str) -> tuple[str, Path]:
        """(canonical id, path) of a requested id, or 404 `model_not_found`."""
        if self.fixed is not None:
            if model_id in self.fixed:
                return model_id, self.fixed[model_id]
        else:
            from lmforge.store import model_path, validate_name

            try:
                norm = validate_name(model_id)
                path = model_path(norm)
            except UserError:
                path = None
            if path is not None and path.is_dir():
                return (norm[: -len(":latest")] if norm.endswith(":latest") else norm), path
        shown = model_id if len(model_id) <= 80 else model_id[:77] + "..."
        raise APIError(404, f"The model '{shown}' does not exist (GET /v1/models lists the models served here)",
                       type="invalid_request_error", param="model", code="model_not_found")

    # -- loading --------------------------------------------------------------------------------------
    async def get(self, model_id: str) -> Served:
        """The loaded model `model_id`, loading it first if needed. Marks it in use: call `release`."""
        name, path = self.path_of(model_id)
        with self._guard:
            lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            with self._guard:  # the keep-alive thread unloads under the same lock
                served = self.loaded.get(name)
                if served is not None:
                    served.active += 1
            if served is None:
                served = await asyncio.to_thread(self._load, name, path)
                with self._guard:
                    self.loaded[name] = served
                    served.active += 1
            served.last_used = time.monotonic()
            return served

    def release(self, served: Served) -> None:
        with self._guard:
            served.active -= 1
            served.last_used = time.monotonic()

    def _load(self, name: str, path: Path) -> Served:
        from lmforge.engine.generate import Engine
        from lmforge.engine.scheduler import Scheduler
        from lmforge.loaders.auto import load

        need = _weights_bytes(path)
        free = available_memory()
        if free is not None and need * 1.2 > free:
            raise APIError(503, f"not enough memory to load '{name}': it needs about {need / 2**30:.1f} GiB and "
                           f"{free / 2**30:.1f} GiB is available", type="server_error", code="insufficient_memory",
                           headers={"x-should-retry": "false"})
        try:
            loaded = load(path, device=self.device)
        except UserError as e:  # a damaged model: the reason (with its paths) goes to the log, not the client
            log.error("cannot load %s: %s", name, e)
            raise APIError(500, f"model '{name}' could not be loaded (the reason is in the server log)",
                           type="server_error", code="model_load_failed", headers={"x-should-retry": "false"}) from None
        engine = Engine(loaded.model, loaded.tokenizer, fast=self.fast)
        cfg = engine.config
        ctx = min(cfg.context_length, self.max_context or cfg.context_length)
        cache = 2 * cfg.n_layers * self.max_batch * cfg.n_kv_heads * ctx * cfg.head_dim * engine.dtype.itemsize
        free = available_memory()
        if free is not None and cache * 1.1 > free:
            raise APIError(503, f"not enough memory for '{name}': its KV cache for {self.max_batch} requests of "
                           f"{ctx} tokens needs {cache / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is available "
                           f"(lower --max-concurrency or --max-context)", type="server_error",
                           code="insufficient_memory", headers={"x-should-retry": "false"})
        scheduler = Scheduler(engine, max_batch=self.max_batch, max_queue=self.max_queue, max_context=self.max_context,
                              prefill_chunk=self.prefill_chunk)
        created = int(path.stat().st_mtime)
        return Served(name, engine, scheduler, loaded.modelfile, created)

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload the models unused for `keep_alive` seconds; returns their names."""
        now = time.monotonic() if now is None else now
        with self._guard:
            gone = [self.loaded.pop(n) for n, s in list(self.loaded.items())
                    if s.active == 0 and s.scheduler.idle and now - s.last_used >= self.keep_alive]
        for s in gone:
            s.scheduler.stop()
        return [s.name for s in gone]

    def snapshot(self) -> list[Served]:
        """The loaded models now (the keep-alive thread may unload one at any moment)."""
        with self._guard:
            return list(self.loaded.values())

    @property
    def in_flight(self) -> int:
        return sum(s.active for s in self.snapshot())

    def close(self) -> None:
        for s in self.snapshot():
            s.scheduler.close()

    def stop(self) -> None:
        for s in self.snapshot():
            s.scheduler.stop(timeout=5)
        with self._guard:
            self.loaded.clear()
