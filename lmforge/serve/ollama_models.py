"""Ollama's model routes (`/api/tags`, `/api/show`, `/api/ps`, `/api/version`, `/api/copy`, `/api/delete`) and
embeddings (`/api/embed`, the legacy `/api/embeddings`), and the pieces every /api/* handler shares: the
model lookup with Ollama's 404, the warning header, the statistics clock. (Thinking, the "thinking"
capability included, lives in `engine/reasoning.py`, shared with the OpenAI routes.) `ollama.py` holds the generating routes (`/api/chat`,
`/api/generate`) and the one `OLLAMA_ROUTES` table.

Models are described from what `lmforge.store_info.show` reads (config.json or the GGUF header, the
Modelfile, lmforge.json), in Ollama's vocabulary: `details` {format, family, parameter_size,
quantization_level}, `model_info` with `general.*` and `<family>.context_length`-style keys, `capabilities`
("completion", "tools" when the template shows tools in a format `/api/chat` parses (`tools.tool_format`, the
test the chat route itself applies), "thinking" when it knows thinking; "embedding" for an encoder).
`describe` is cached by modification time (of the model's path and what its folder holds), so a client
polling /api/tags does not re-read every folder and header each time. `/api/ps` lists a loaded model from
the path it was loaded from: one deleted from the store while busy is still listed until it unloads. A
model's `digest` is a stable identifier of its name, size and modification time, not a hash of its weights
(see `digest`). `/api/copy` and `/api/delete` work on the model store (`lmforge.store`); a
server given its models on the command line refuses them. Embeddings take the path of `/v1/embeddings`
(the model's `Embedder`); `truncate` (default true) cuts an input to the model's context, false refuses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lmforge import __version__
from lmforge.engine.reasoning import supports_thinking
from lmforge.errors import UserError, one_line
from lmforge.serve import tools as tl
from lmforge.serve.models import ModelRegistry, Served
from lmforge.serve.ollama_protocol import (FOREVER, WARNING_HEADER, CopyRequest, DeleteRequest, EmbeddingsRequest,
                                           EmbedRequest, ShowRequest, not_found, parse_keep_alive, rfc3339,
                                           warnings)
from lmforge.serve.protocol import APIError, invalid, parse
from lmforge.serve.security import read_body

log = logging.getLogger("lmforge.serve")


# ----------------------------------------------------------------------------------------------------
# What every /api/* handler shares
# ----------------------------------------------------------------------------------------------------
def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def on_cpu(request: Request, fn: Callable, *args, **kwargs):
    return await request.app.state.cpu.run(fn, *args, **kwargs)


def served_name(request: Request, model: str) -> tuple[str, Path]:
    """(id, path) of a served model, or Ollama's 404."""
    try:
        return registry_of(request).path_of(model)
    except APIError as e:
        if e.code == "model_not_found":
            raise not_found(model) from None
        raise


async def use_model(request: Request, model: str, *, num_ctx: int | None = None, keep_alive: float | None = None,
                    embedding: bool = False) -> Served:
    """The loaded model (see `ModelRegistry.get`: Ollama's keep_alive and num_ctx), or Ollama's 404."""
    served_name(request, model)
    return await registry_of(request).get(model, num_ctx=num_ctx, keep_alive=keep_alive, embedding=embedding)


def warning_headers(notes: list[str]) -> dict[str, str]:
    """The warning header naming the options that had no effect (also logged)."""
    for n in notes:
        log.warning("%s", n)
    return {WARNING_HEADER: "; ".join(notes)} if notes else {}


async def release(request: Request, served: Served, keep: float | None) -> None:
    """Give the model back; with keep_alive 0, unload it now (waiting a moment for its rows to end)."""
    registry = registry_of(request)
    registry.release(served)
    if keep == 0:
        await asyncio.to_thread(registry.unload, served.name, 2.0)


# ----------------------------------------------------------------------------------------------------
# Timing (Ollama's final-object statistics, in nanoseconds)
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Clock:
    """When a request's phases began, for Ollama's durations (monotonic nanoseconds). The token times come
    from the Generation's `metrics.GenerationTimer` (`timer`), taken on the scheduler thread as /metrics
    takes them; `token()` times them on the event loop only where no timer runs (outside a served request)."""

    start: int = dataclasses.field(default_factory=time.monotonic_ns)
    loaded: int = 0  # when the model was ours (loaded or found loaded)
    queued: int = 0  # when the rows were handed to the scheduler
    first: int | None = None  # first token
    last: int | None = None  # last token
    timer: Any = None  # the Generation's GenerationTimer, when metrics run

    def token(self) -> None:
        now = time.monotonic_ns()
        if self.first is None:
            self.first = now
        self.last = now

    def stats(self, n_prompt: int, n_out: int) -> dict[str, int]:
        now = time.monotonic_ns()
        queued, first, last = self.queued, self.first, self.last
        if self.timer is not None:
            start, t_first, t_last = self.timer.spans()
            queued = int(start * 1e9)
            first = int(t_first * 1e9) if t_first is not None else None
            last = int(t_last * 1e9) if t_last is not None else None
        first = first if first is not None else now
        last = last if last is not None else now
        return {"total_duration": max(1, now - self.start), "load_duration": max(1, self.loaded - self.start),
                "prompt_eval_count": n_prompt, "prompt_eval_duration": max(1, first - (queued or self.loaded)),
                "eval_count": n_out, "eval_duration": max(1, last - first)}


# ----------------------------------------------------------------------------------------------------
# Models: tags, show, ps, copy, delete, version
# ----------------------------------------------------------------------------------------------------
_DESCRIBED: dict[str, tuple[tuple, dict]] = {}  # path -> (modification stamp, description)
_DESCRIBED_MAX = 256


def _stamp(path: Path) -> tuple:
    """What changes when a model does: the modification times (and sizes) of its path and, for a folder, of
    what it holds (a rewritten config.json or modelfile.json changes its own time, not the folder's)."""
    try:
        st = path.stat()
        items = [("", st.st_mtime_ns, st.st_size)]
        if path.is_dir():
            with os.scandir(path) as it:
                items += sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in it)
        return tuple(items)
    except OSError:
        return ()


def describe(path: Path) -> dict:
    """`store_info.show` of a served model's path (store entry or command-line model), cached until the
    path's modification stamp (`_stamp`) changes."""
    from lmforge.store_info import show

    key, stamp = str(path), _stamp(path)
    hit = _DESCRIBED.get(key)
    if hit is not None and stamp and hit[0] == stamp:
        return hit[1]
    try:
        info = show(str(path))
    except UserError as e:
        return {"error": str(e)}
    if stamp:
        if len(_DESCRIBED) >= _DESCRIBED_MAX:
            _DESCRIBED.pop(next(iter(_DESCRIBED)), None)
        _DESCRIBED[key] = (stamp, info)
    return info


def digest(name: str, info: dict) -> str:
    """A stable identifier of a served model (64 hex digits, like Ollama's digests): NOT a hash of the weights
    (reading gigabytes for a listing is not worth it) but of its name, size and modification time, so it
    changes when the model does."""
    key = f"{name}\0{info.get('size_bytes')}\0{info.get('modified')}"
    return hashlib.sha256(key.encode()).hexdigest()


def _count(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _family(info: dict) -> str:
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    fam = cfg.get("model_type") or cfg.get("architecture") or info.get("architecture") or "unknown"
    return str(fam).lower().removesuffix("forcausallm")


def details(path: Path, info: dict) -> dict:
    from lmforge.paths import GGUF_IN_STORE

    gguf = path.is_file() or (path / GGUF_IN_STORE).is_file()
    quant = info.get("quantization") or {}
    level = (quant.get("type") if isinstance(quant, dict) else None) or str(info.get("dtype") or "F32")
    level = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(level, level.upper())
    fam = _family(info)
    return {"parent_model": "", "format": "gguf" if gguf else "safetensors", "family": fam, "families": [fam],
            "parameter_size": _count(info.get("parameters")), "quantization_level": level}


async def tags(request: Request):
    registry, models = registry_of(request), []
    for name, _created in registry.ids():
        try:
            path = registry.path_of(name)[1]
        except APIError:  # deleted since the listing was read
            continue
        info = await on_cpu(request, describe, path)
        models.append({"name": name, "model": name, "modified_at": rfc3339(info.get("modified") or 0),
                       "size": int(info.get("size_bytes") or 0), "digest": digest(name, info),
                       "details": details(path, info)})
    return {"models": models}


def capabilities(info: dict) -> list[str]:
    if info.get("kind") == "embedding":
        return ["embedding"]
    template = info.get("chat_template") or ""
    caps = ["completion"]
    if tl.tool_format(template) is not None:  # what /api/chat's tools need, not just the word in the text
        caps.append("tools")
    if supports_thinking(template):
        caps.append("thinking")
    return caps


def _parameters_text(defaults: dict, num_ctx: int | None) -> str:
    """The `parameters` of /api/show, in Ollama's names (`modelfile.OLLAMA_NAME`, the one table): settings
    Ollama has no name for (lmforge's own) are left out, as an Ollama client could not send them back."""
    from lmforge.modelfile import OLLAMA_NAME

    lines = []
    for key, value in defaults.items():
        name = OLLAMA_NAME.get(key)
        if name is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{name:<30} {json.dumps(v) if isinstance(v, str) else v}")
    if num_ctx is not None:
        lines.append(f"{'num_ctx':<30} {num_ctx}")
    return "\n".join(lines)


def _modelfile_text(name: str, info: dict, params: str) -> str:
    out = [f"# Modelfile of {name}, as lmforge serves it", f"FROM {name}"]
    if info.get("chat_template"):
        out.append(f'TEMPLATE """{info["chat_template"]}"""')
    if info.get("system"):
        out.append(f'SYSTEM """{info["system"]}"""')
    out += [f"PARAMETER {line}" for line in params.splitlines()]
    for m in (info.get("modelfile") or {}).get("messages") or []:
        out.append(f'MESSAGE {m.get("role")} """{m.get("content")}"""')
    if info.get("license"):
        out.append(f'LICENSE """{info["license"]}"""')
    return "\n".join(out) + "\n"


async def show(request: Request):
    req: ShowRequest = parse(ShowRequest, await read_body(request))
    name, path = served_name(request, req.ref)
    info = await on_cpu(request, describe, path)
    if info.get("error") and "name" not in info:
        raise invalid(f"cannot describe {name}: {info['error']}")
    fam = _family(info)
    mf = info.get("modelfile") or {}
    params = _parameters_text(info.get("defaults") or {}, mf.get("num_ctx"))
    model_info = {"general.architecture": fam, "general.parameter_count": info.get("parameters"),
                  "general.basename": name}
    for key in ("context_length", "embedding_length"):
        if info.get(key) is not None:
            model_info[f"{fam}.{key}"] = info[key]
    if info.get("layers") is not None:
        model_info[f"{fam}.block_count"] = info["layers"]
    body = {"modelfile": _modelfile_text(name, info, params), "parameters": params,
            "template": info.get("chat_template") or "", "details": details(path, info), "model_info": model_info,
            "capabilities": capabilities(info), "modified_at": rfc3339(info.get("modified") or 0)}
    if info.get("system"):
        body["system"] = info["system"]
    if info.get("license"):
        body["license"] = info["license"]
    return body


async def ps(request: Request):
    registry, models = registry_of(request), []
    for s in sorted(registry.snapshot(), key=lambda s: s.name):
        path = s.path if s.path is not None else registry.path_of(s.name)[1]  # still loaded if deleted since
        info = await on_cpu(request, describe, path)
        size = s.footprint.total if s.footprint is not None else 0
        expires = registry.expires_at(s)
        models.append({"name": s.name, "model": s.name, "size": size, "digest": digest(s.name, info),
                       "details": details(path, info), "expires_at": FOREVER if expires is None else rfc3339(expires),
                       "size_vram": size if registry.processor(s).endswith("GPU") else 0,
                       "context_length": s.scheduler.context_length})
    return {"models": models}


async def version(request: Request):
    return {"version": __version__}


def _store_only(request: Request, what: str) -> None:
    if registry_of(request).fixed is not None:
        raise invalid(f"this server serves the models named on its command line, not the model store: {what} them "
                      f"with `lmforge cp` / `lmforge rm`, and serve the store (`lmforge serve` with no MODEL)")


def _store_error(e: UserError) -> APIError:
    msg = one_line(e)
    return APIError(404 if msg.startswith("no model named") else 400, msg, code="invalid_value")


async def copy(request: Request):
    req: CopyRequest = parse(CopyRequest, await read_body(request))
    _store_only(request, "copy")
    served_name(request, req.source)
    from lmforge.store import copy as store_copy

    try:
        await asyncio.to_thread(store_copy, req.source, req.destination)
    except UserError as e:
        raise _store_error(e) from None
    return Response(status_code=200)


async def delete(request: Request):
    req: DeleteRequest = parse(DeleteRequest, await read_body(request))
    _store_only(request, "delete")
    name, _ = served_name(request, req.ref)
    from lmforge.store import remove

    await asyncio.to_thread(registry_of(request).unload, name, 0.0)  # goes when its requests end
    try:
        await asyncio.to_thread(remove, req.ref)
    except UserError as e:
        raise _store_error(e) from None
    return Response(status_code=200)


# ----------------------------------------------------------------------------------------------------
# Embeddings (the path of /v1/embeddings: the model's Embedder)
# ----------------------------------------------------------------------------------------------------
async def _vectors(request: Request, model: str, texts: list[str], keep: float | None, truncate: bool,
                   dimensions: int | None) -> tuple[list[list[float]], int, Clock]:
    """The vectors of `texts` through `embeddings.embed_inputs`, the one path /v1/embeddings takes too (the
    same refusals and limits); `truncate` cuts an input to the model's context, false refuses it."""
    from lmforge.serve.embeddings import embed_inputs

    clock = Clock()
    served = await use_model(request, model, keep_alive=keep, embedding=True)
    clock.loaded = time.monotonic_ns()
    try:
        clock.queued = time.monotonic_ns()
        vectors, n_tokens = await embed_inputs(request, served, texts, None, dimensions, truncate=truncate)
        return [[float(x) for x in v] for v in vectors], n_tokens, clock
    finally:
        await release(request, served, keep)


async def embed(request: Request):
    req: EmbedRequest = parse(EmbedRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if texts == [""]:
        texts = []  # Ollama: an empty input only loads the model
    vectors, n_tokens, clock = await _vectors(request, req.model, texts, keep, req.truncate, req.dimensions)
    stats = clock.stats(n_tokens, 0)
    return JSONResponse({"model": req.model, "embeddings": vectors, "total_duration": stats["total_duration"],
                         "load_duration": stats["load_duration"], "prompt_eval_count": n_tokens},
                        headers=warning_headers(warnings(req.options)))


async def embeddings(request: Request):
    req: EmbeddingsRequest = parse(EmbeddingsRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    vectors, _, _ = await _vectors(request, req.model, [req.prompt] if req.prompt else [], keep, True, None)
    return JSONResponse({"embedding": vectors[0] if vectors else []}, headers=warning_headers(warnings(req.options)))


MODEL_ROUTES: list[tuple[str, str, Callable]] = [
    ("GET", "/api/tags", tags),
    ("POST", "/api/show", show),
    ("GET", "/api/ps", ps),
    ("GET", "/api/version", version),
    ("POST", "/api/embed", embed),
    ("POST", "/api/embeddings", embeddings),
    ("POST", "/api/copy", copy),
    ("DELETE", "/api/delete", delete),
]
