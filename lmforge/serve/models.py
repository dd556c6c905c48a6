"""Which models a server offers, and loading them on demand (Ollama's keep-alive).

A request names a model by id. The id is looked up, never resolved as a path: the models are either the
ones given on the command line (store names, directories or .gguf files, resolved once at start-up by
the operator) or the entries of the model store, matched by validated store name. So no request can make
the server open a file outside what it was told to serve.

Models load on first use, in a worker thread, and unload after `keep_alive` seconds without requests.
Each loaded model has its own `Scheduler` (continuous batching).

Before a model loads, its memory is counted as it will really be held (`lmforge.footprint.estimate`: the
weights at their stored size per tensor type, or at `--dtype`, plus the KV cache for `max_batch` requests
of the model's context, plus runtime) against what is free on the device it will run on. When it does not
fit, idle models (no request in flight, nothing queued) are unloaded, least recently used first, until it
does; only when none is left to unload is the request refused, 503 `insufficient_memory`, saying how much
the model needs and how much there is. Memory decisions are taken one at a time (`_room`), and a load in
progress keeps its share reserved, so two models loading at once cannot both count the same free bytes.

Embedding models (BERT encoders in the store or on the command line) are served the same way, for
`POST /v1/embeddings` only: they load on first use into a `Served` without an engine (`_Embedding` stands
in for the scheduler, always idle), are counted in memory as their fp32 weights plus the activations of one
embedding batch (`encoder_footprint`), and unload like any other. A chat model embeds too (`embedder`
makes an `Embedder` around the model already loaded). Asking an embedding model for text is a 400.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.device import available_memory
from lmforge.errors import UserError
from lmforge.footprint import Footprint, estimate, free_memory, gib
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
    footprint: Footprint | None = None  # its memory as estimated before loading: what unloading it frees
    embedder: Any = None  # `lmforge.retrieval.embed.Embedder`, made on the first embeddings request
    embedding_only: bool = False  # an encoder: no engine, cannot generate
    keep_alive: float | None = None  # seconds unused before unloading, set by the last request that said; None:
    # the server's default; math.inf: never (Ollama's negative keep_alive); 0: as soon as it is idle
    num_ctx: int | None = None  # the context it was loaded for (`context_for`); None: the model's whole context
    path: Path | None = None  # where it was loaded from: a busy model deleted from the store is still listed by it


class _Embedding:
    """The scheduler slot of an embedding model: nothing is ever queued on it (its requests run in their own
    thread, one at a time per model, under the embedder's lock), so it is always idle and stopping is a no-op."""

    idle, busy, queued, context_length = True, 0, 0, 0

    def stop(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


#: Rows of one embedding batch counted as runtime memory (`Embedder.embed_ids` batches at most this many).
EMBED_BATCH_ROWS = 32


def encoder_footprint(path: Path) -> Footprint:
    """An encoder's memory once loaded: the tensors `load_encoder` keeps (not a checkpoint's pooler head),
    as float32, from the safetensors header, plus one batch's activations at its full context: attention
    scores and their softmax per head, the MLP's intermediate, a few hidden-size buffers."""
    import math

    from lmforge.loaders.bert import encoder_config, tensor_map
    from lmforge.loaders.model_dir import WeightFiles

    cfg = encoder_config(path)
    shapes = WeightFiles(path).shapes()
    prefix = "bert." if any(k.startswith("bert.") for k in shapes) else ""
    weights = sum(math.prod(shapes.get(prefix + theirs, ())) for theirs in tensor_map(cfg).values()) * 4
    t, b = cfg.max_position_embeddings, EMBED_BATCH_ROWS
    per_row = (2 * cfg.num_attention_heads * t * t + 2 * cfg.intermediate_size * t + 6 * cfg.hidden_size * t) * 4
    return Footprint(weights=weights, kv_cache=0, runtime=b * per_row, batch=b, tokens=t)


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:  # removed since the server started: still listed, and a request gets the load error
        return 0


def _return_freed_memory(device: torch.device) -> None:
    """Hand the memory of an unloaded model back to where the next load is counted from: the CUDA
    allocator's cache to the driver, and glibc's freed heap pages to the OS (`malloc_trim`), which otherwise
    keeps them for this process while MemAvailable no longer shows them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator returns memory its own way
        pass


class ModelRegistry:
    """The served models. `fixed` maps ids to paths (command-line models); None serves the whole store."""

    def __init__(self, fixed: dict[str, Path] | None = None, *, device: str = "cpu", max_batch: int = 8,
                 max_queue: int = 64, max_context: int | None = 4096, keep_alive: float = 300.0,
                 fast: bool = True, prefill_chunk: int = 512, dtype: torch.dtype | str = "auto",
                 prompt_cache: bool = True) -> None:
        self.fixed = fixed
        self.prompt_cache = prompt_cache  # reuse cached prompt prefixes across requests (Scheduler.prefix_cache)
        self.device, self.max_batch, self.max_queue = device, max_batch, max_queue
        self.dtype = dtype  # "auto": every model in its stored precision (`lmforge serve --dtype`)
        self.prefill_chunk = prefill_chunk
        self.max_context, self.keep_alive, self.fast = max_context, keep_alive, fast
        self.loaded: dict[str, Served] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()
        self._reported: set[tuple[str, str]] = set()  # damaged store entries already logged
        self._room = threading.Lock()  # one memory decision at a time
        self._reserved = 0  # bytes counted for loads in progress, not yet visible as used memory

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
    async def get(self, model_id: str, *, embedding: bool = False, num_ctx: int | None = None,
                  keep_alive: float | None = None) -> Served:
        """The loaded model `model_id`, loading it first if needed. Marks it in use: call `release`.
        An embedding model is refused (400) unless `embedding` (the embeddings route) asks for one.

        Ollama's per-request settings: `keep_alive` (seconds; math.inf = never unload, 0 = as soon as it is
        idle) replaces the model's keep-alive from now on; `num_ctx` asks for that context (bounded by the
        model's own), and a model loaded with another one is reloaded with it once its requests are done,
        as Ollama does: the KV cache is sized at load, so a context is a property of the loaded model."""
        from lmforge.loaders.model_dir import is_encoder_dir

        name, path = self.path_of(model_id)
        encoder = path.is_dir() and is_encoder_dir(path)
        if encoder and not embedding:
            raise APIError(400, f"'{name}' is an embedding model: it cannot generate text; use it with "
                           "POST /v1/embeddings, and a chat model here", param="model", code="model_not_supported")
        with self._guard:
            lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            with self._guard:  # the keep-alive thread unloads under the same lock
                served = self.loaded.get(name)
            if served is not None and not served.embedding_only:
                wanted = self.context_for(num_ctx, getattr(served.modelfile, "num_ctx", None))
                if min(wanted or math.inf, served.engine.config.context_length) != served.scheduler.context_length:
                    out, served = [served], None  # no reference of ours may keep its memory alive
                    await self._unload_for_reload(out, wanted)
            with self._guard:
                if served is not None:
                    served.active += 1
            if served is None:
                served = await asyncio.to_thread(self._load_encoder if encoder else self._load, name, path,
                                                 *(() if encoder else (num_ctx,)))
                with self._guard:
                    self.loaded[name] = served
                    served.active += 1
            served.last_used = time.monotonic()
            if keep_alive is not None:
                served.keep_alive = keep_alive
            return served

    def context_for(self, num_ctx: int | None, modelfile_ctx: int | None) -> int | None:
        """The context a model is served with (before the model's own bound; None: the model's whole context).
        No request num_ctx: the Modelfile's `PARAMETER num_ctx`, else --max-context. A request's num_ctx is
        floored at 4 (as Ollama does) and capped at the larger of those two: --max-context is the operator's
        bound on what any client may make the server allocate, and a context is sized for `max_batch` rows,
        so one request asking for the model's full context could push idle models out (`_make_room`)."""
        default = modelfile_ctx if modelfile_ctx is not None else self.max_context
        if num_ctx is None:
            return default
        ceiling = None if self.max_context is None else max(self.max_context, default or 0)
        return max(4, num_ctx if ceiling is None else min(num_ctx, ceiling))

    async def _unload_for_reload(self, out: list[Served], num_ctx: int | None) -> None:
        """Take the model in `out` out to load it again at another context: once its requests are over (the
        caller holds the model's lock, so no new one starts on it meanwhile)."""
        served = out.pop()
        log.info("reloading %s with a context of %d (was %d)", served.name,
                 min(num_ctx or math.inf, served.engine.config.context_length), served.scheduler.context_length)
        while True:
            with self._guard:
                if served.active == 0 and served.scheduler.idle:
                    self.loaded.pop(served.name, None)
                    break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(served.scheduler.stop, 5)
        del served
        await asyncio.to_thread(_return_freed_memory, torch.device(self.device))

    def release(self, served: Served) -> None:
        with self._guard:
            served.active -= 1
            served.last_used = time.monotonic()

    def _load(self, name: str, path: Path, num_ctx: int | None = None) -> Served:
        """Load `name` with the context `context_for` gives for a request's `num_ctx` (bounded by the model's
        own context)."""
        from lmforge.engine.generate import Engine
        from lmforge.engine.scheduler import Scheduler, max_write
        from lmforge.loaders.auto import load, read_modelfile

        try:
            context = self.context_for(num_ctx, getattr(read_modelfile(path), "num_ctx", None)
                                       if path.is_dir() else None)
            need = estimate(path, dtype=self.dtype, device=self.device, batch=self.max_batch,
                            tokens=context, chunk=self.prefill_chunk, max_write=max_write(self.prefill_chunk))
        except UserError as e:
            raise self._load_failed(name, e) from None
        self._make_room(name, need)
        try:
            loaded = load(path, device=self.device, dtype=self.dtype)
            engine = Engine(loaded.model, loaded.tokenizer, fast=self.fast)
            scheduler = Scheduler(engine, max_batch=self.max_batch, max_queue=self.max_queue,
                                  max_context=context, prefill_chunk=self.prefill_chunk,
                                  prefix_cache=self.prompt_cache)
        except UserError as e:
            raise self._load_failed(name, e) from None
        finally:
            with self._guard:
                self._reserved -= need.total
        created = int(path.stat().st_mtime)
        return Served(name, engine, scheduler, loaded.modelfile, created, footprint=need, num_ctx=context, path=path)

    def _load_encoder(self, name: str, path: Path) -> Served:
        from lmforge.loaders.bert import load_encoder

        try:
            need = encoder_footprint(path)
        except UserError as e:
            raise self._load_failed(name, e) from None
        self._make_room(name, need)
        try:
            from lmforge.retrieval.embed import Embedder

            encoder, tokenizer = load_encoder(path, device=self.device)
            embedder = Embedder.from_encoder(encoder, tokenizer, model_id=name)
        except UserError as e:
            raise self._load_failed(name, e) from None
        finally:
            with self._guard:
                self._reserved -= need.total
        return Served(name, None, _Embedding(), None, int(path.stat().st_mtime), footprint=need, embedder=embedder,
                      embedding_only=True, path=path)

    def embedder(self, served: Served) -> Any:
        """The `Embedder` of a loaded model (made once around a chat model's own weights, so embedding with
        it costs no second copy)."""
        with self._guard:
            if served.embedder is None:
                from lmforge.retrieval.embed import Embedder

                served.embedder = Embedder.from_decoder(served.engine.model, served.engine.tokenizer,
                                                        model_id=served.name)
            return served.embedder

    @staticmethod
    def _load_failed(name: str, e: UserError) -> APIError:
        """A damaged model: the reason (with its paths) goes to the log, not the client."""
        log.error("cannot load %s: %s", name, e)
        return APIError(500, f"model '{name}' could not be loaded (the reason is in the server log)",
                        type="server_error", code="model_load_failed", headers={"x-should-retry": "false"})

    def _free(self) -> int | None:
        """Bytes free on the device models run on (the CPU's through this module's `available_memory`,
        which is what tests replace)."""
        dev = torch.device(self.device)
        return available_memory() if dev.type != "cuda" else free_memory(dev)

    def _make_room(self, name: str, need: Footprint) -> None:
        """Reserve `need` for loading `name`, unloading idle models (least recently used first) until it
        fits; 503 `insufficient_memory` when it cannot, decided before anything is unloaded (no model is
        unloaded in vain). Unknown free memory (None) refuses nothing."""
        with self._room:
            free = self._free()
            if free is not None:
                idle = self._idle(except_name=name)
                reclaimable = sum(s.footprint.total for s in idle if s.footprint is not None)
                if need.total > free - self._reserved + reclaimable:
                    raise self._no_room(name, need, free - self._reserved, idle)
            while free is not None and need.total > free - self._reserved:
                victim = self._pop_idle_lru(except_name=name)
                if victim is None:  # what was idle a moment ago got a request meanwhile
                    raise self._no_room(name, need, free - self._reserved, [])
                log.info("unloading %s (idle, least recently used) to make room for %s, which needs %s",
                         victim.name, name, gib(need.total))
                victim.scheduler.stop(timeout=5)
                freed = victim.footprint.total if victim.footprint is not None else 0
                del victim
                _return_freed_memory(torch.device(self.device))
                # What this process freed is ours to reuse even where the allocator keeps it from the OS.
                now = self._free()
                free = None if now is None else max(now, free + freed)
            with self._guard:
                self._reserved += need.total

    def _idle(self, except_name: str) -> list[Served]:
        """The loaded models that could be unloaded now: no request in flight, nothing queued."""
        with self._guard:
            return self._idle_locked(except_name)

    def _idle_locked(self, except_name: str) -> list[Served]:
        """`_idle`, for a caller that holds `_guard`."""
        return [s for s in self.loaded.values() if s.active == 0 and s.scheduler.idle and s.name != except_name]

    def _pop_idle_lru(self, except_name: str) -> Served | None:
        """Take out of `loaded` the idle model used least recently, if any (under the guard, so that a
        request cannot start on it meanwhile: `get` then loads it again)."""
        with self._guard:  # the same lock as _idle's: what it lists is what may go
            idle = self._idle_locked(except_name)
            if not idle:
                return None
            victim = min(idle, key=lambda s: s.last_used)
            del self.loaded[victim.name]
            return victim

    def _no_room(self, name: str, need: Footprint, free: int, idle: list[Served]) -> APIError:
        """The 503 for a model that cannot fit: what it needs, part by part, and what there is."""
        names = {s.name for s in idle}
        busy = [s.name for s in self.snapshot() if s.name not in names and s.name != name]
        there = f"{gib(max(free, 0))} is available on {self.device}"
        if idle:
            there += (f", {gib(sum(s.footprint.total for s in idle if s.footprint is not None))} more once the idle "
                      f"models ({', '.join(sorted(names))}) are unloaded")
        if busy:
            there += f"; the models in use ({', '.join(sorted(busy))}) stay loaded"
        hint = " (the KV cache shrinks with --max-concurrency and --max-context)" if need.kv_cache * 4 >= need.total else ""
        return APIError(503, f"not enough memory to load '{name}': it needs about {need.describe()} and {there}{hint}",
                        type="server_error", code="insufficient_memory", headers={"x-should-retry": "false"})

    def keep_alive_of(self, served: Served) -> float:
        """Seconds `served` stays loaded once unused: its last request's keep_alive, else the server's."""
        return self.keep_alive if served.keep_alive is None else served.keep_alive

    def expires_at(self, served: Served) -> float | None:
        """Unix time `served` will be unloaded if no request comes (counted from now while it is in use, as
        its keep-alive only starts when the last request ends); None: never."""
        keep = self.keep_alive_of(served)
        if math.isinf(keep):
            return None
        with self._guard:
            in_use = served.active > 0 or not served.scheduler.idle
            since = 0.0 if in_use else time.monotonic() - served.last_used
        return time.time() - since + keep

    def processor(self, served: Served) -> str:
        """Where the model runs, as `ollama ps` shows it: "100% GPU" or "100% CPU" (never split)."""
        return "100% GPU" if torch.device(self.device).type == "cuda" else "100% CPU"

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload the models unused for their keep-alive (`keep_alive_of`); returns their names."""
        now = time.monotonic() if now is None else now
        with self._guard:
            gone = [self.loaded.pop(n) for n, s in list(self.loaded.items())
                    if s.active == 0 and s.scheduler.idle and now - s.last_used >= self.keep_alive_of(s)]
        names = [s.name for s in gone]
        for s in gone:
            s.scheduler.stop()
        if gone:
            del gone, s
            _return_freed_memory(torch.device(self.device))
        return names

    def unload(self, model_id: str, wait: float = 0.0) -> bool:
        """Unload `model_id` (Ollama's keep_alive 0, `lmforge stop`): now if it is idle (waiting up to `wait`
        seconds for its requests to end), else as soon as it is (its keep-alive becomes 0). True when it
        is no longer loaded. Blocking: call it from a worker thread."""
        name, _ = self.path_of(model_id)
        deadline = time.monotonic() + wait
        while True:
            with self._guard:
                served = self.loaded.get(name)
                if served is None:
                    return True
                served.keep_alive = 0.0
                if served.active == 0 and served.scheduler.idle:
                    del self.loaded[name]
                    break
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        served.scheduler.stop(timeout=5)
        del served
        _return_freed_memory(torch.device(self.device))
        return True

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
