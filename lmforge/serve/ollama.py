"""Ollama's native API on the same server, models and schedulers as the OpenAI one (`OLLAMA_ROUTES`).

What clients of Ollama (its `ollama` Python and JS libraries, Open WebUI, Home Assistant, Continue) call:
`POST /api/chat`, `POST /api/generate` (NDJSON streams by default, `stream: false` for one object),
`GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`, `POST /api/embed` (and the legacy
`/api/embeddings`), `POST /api/copy`, `DELETE /api/delete`. Field names, types and units are Ollama's
(durations in nanoseconds, times in RFC 3339 with nanoseconds); `ollama_protocol` holds the schemas.

One path per job, shared with the OpenAI routes: chat prompts are built by `translate.chat_prompt_ids`
(THE chat-prompt builder), `options` become `SamplingParams` through `translate.sampling_params`, rows run
on the model's scheduler through `stream.Generation`, embeddings through the model's `Embedder` as
`/v1/embeddings` does, and `format` is `engine.constrain.Grammar` (JSON mode or a JSON schema), as
`response_format` is.

Decisions where Ollama leaves room (each one line in the report, and in these docstrings):
- `/api/generate` returns `context` (the prompt's and the answer's token ids) except in raw mode, and
  takes a `context` from an earlier answer: its ids go before the new prompt's, as Ollama does.
- `template` (a Go template in Ollama) is refused: lmforge's templates are Jinja, set by a Modelfile's
  TEMPLATE (`lmforge create`). `suffix` (fill-in-the-middle) and `images` are refused: these models read
  text only. A model without a chat template generates from the prompt text itself.
- `think`: the chat template's `enable_thinking` is set from it; `think: true` on a model whose template
  never mentions thinking is a 400 (`"MODEL" does not support thinking`, as Ollama answers). With `think`,
  what the model writes before `</think>` is returned as `thinking`, apart from `content`.
- `prompt_eval_duration` is the time from the request's rows being queued to the first token (prefill and
  any wait for a free row); `eval_duration` from the first token to the last. `prompt_eval_count` is the
  prompt's length in tokens.
- keep_alive 0 unloads the model once the answer is complete (before the final object is sent, so a
  client that sees `done` and asks /api/ps no longer finds it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from lmforge import __version__
from lmforge.errors import UserError, one_line
from lmforge.serve import tools as tl
from lmforge.serve import translate as tr
from lmforge.serve.models import ModelRegistry, Served
from lmforge.serve.ollama_protocol import (FOREVER, WARNING_HEADER, ChatRequest, CopyRequest, DeleteRequest,
                                           EmbeddingsRequest, EmbedRequest, GenerateRequest, ShowRequest,
                                           not_found, parse_keep_alive, rfc3339, sampling_fields, warnings)
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, Message, invalid, parse
from lmforge.serve.security import read_body
from lmforge.serve.stream import Generation, once

__all__ = ["OLLAMA_ROUTES"]

log = logging.getLogger("lmforge.serve")

NDJSON = "application/x-ndjson"


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _cpu(request: Request, fn: Callable, *args, **kwargs):
    return await request.app.state.cpu.run(fn, *args, **kwargs)


def _name(request: Request, model: str) -> tuple[str, Path]:
    """(id, path) of a served model, or Ollama's 404."""
    try:
        return _registry(request).path_of(model)
    except APIError as e:
        if e.code == "model_not_found":
            raise not_found(model) from None
        raise


async def _use(request: Request, model: str, *, num_ctx: int | None = None, keep_alive: float | None = None,
               embedding: bool = False) -> Served:
    _name(request, model)
    return await _registry(request).get(model, num_ctx=num_ctx, keep_alive=keep_alive, embedding=embedding)


def _headers(notes: list[str]) -> dict[str, str]:
    """The warning header naming the options that had no effect (also logged)."""
    for n in notes:
        log.warning("%s", n)
    return {WARNING_HEADER: "; ".join(notes)} if notes else {}


# ----------------------------------------------------------------------------------------------------
# Timing (Ollama's final-object statistics, in nanoseconds)
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Clock:
    start: int = dataclasses.field(default_factory=time.monotonic_ns)
    loaded: int = 0  # when the model was ours (loaded or found loaded)
    queued: int = 0  # when the rows were handed to the scheduler
    first: int | None = None  # first token
    last: int | None = None  # last token

    def token(self) -> None:
        now = time.monotonic_ns()
        if self.first is None:
            self.first = now
        self.last = now

    def stats(self, n_prompt: int, n_out: int) -> dict[str, int]:
        now = time.monotonic_ns()
        first = self.first if self.first is not None else now
        last = self.last if self.last is not None else now
        return {"total_duration": max(1, now - self.start), "load_duration": max(1, self.loaded - self.start),
                "prompt_eval_count": n_prompt, "prompt_eval_duration": max(1, first - (self.queued or self.loaded)),
                "eval_count": n_out, "eval_duration": max(1, last - first)}


# ----------------------------------------------------------------------------------------------------
# Thinking: what a reasoning model writes before </think>, apart from its answer
# ----------------------------------------------------------------------------------------------------
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def supports_thinking(template: str | None) -> bool:
    """Whether a chat template knows about thinking (Qwen3's `enable_thinking`, DeepSeek-R1's `<think>`,
    a `reasoning_content` field): Ollama's "thinking" capability."""
    return bool(template) and any(k in template for k in ("enable_thinking", THINK_OPEN, "reasoning_content",
                                                            "thinking"))


class ThinkSplitter:
    """Splits streamed text into (thinking, content): everything up to `</think>` (after an optional
    leading `<think>`, which the template may already have written) is thinking. A tag cut across two
    tokens is held back until it is whole."""

    def __init__(self) -> None:
        self.buf, self.thinking, self.opened, self.answered = "", True, False, False

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        if not self.thinking:
            return "", self._content(self._take())
        if not self.opened:
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.buf, self.opened = s[len(THINK_OPEN):], True
            elif THINK_OPEN.startswith(s):
                return "", ""  # still possibly the opening tag
            else:
                self.opened = True
        i = self.buf.find(THINK_CLOSE)
        if i >= 0:
            thought, rest = self.buf[:i], self.buf[i + len(THINK_CLOSE):]
            self.buf, self.thinking = "", False
            return thought, self._content(rest)
        keep = next((k for k in range(min(len(THINK_CLOSE) - 1, len(self.buf)), 0, -1)
                     if THINK_CLOSE.startswith(self.buf[-k:])), 0)
        thought, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return thought, ""

    def flush(self) -> tuple[str, str]:
        rest = self._take()
        return (rest, "") if self.thinking else ("", self._content(rest))

    def _take(self) -> str:
        out, self.buf = self.buf, ""
        return out

    def _content(self, text: str) -> str:
        if not self.answered:
            text = text.lstrip()
            self.answered = bool(text)
        return text


# ----------------------------------------------------------------------------------------------------
# Building a request's rows
# ----------------------------------------------------------------------------------------------------
def _turns(req: ChatRequest) -> list[dict]:
    """Ollama's messages as the dicts the chat template reads, through `translate.message_dicts` (the
    OpenAI path's rules: roles, content, tool-call checks). Tool calls keep their arguments as objects.
    Ollama's tool results name their tool (`tool_name`) where OpenAI's name the call (`tool_call_id`): each
    is matched to the first unanswered call of that tool (any call when it names none) of the assistant
    message before it, and a result that answers no call is a 400."""
    msgs: list[dict] = []
    open_calls: list[tuple[str, str]] = []  # (id, function name) of calls not answered yet
    for i, m in enumerate(req.messages or []):
        if m.images:
            raise invalid("images are not supported: these models read text only", param=f"messages.{i}.images")
        d: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            d["tool_calls"] = [_tool_call(c, i, j) for j, c in enumerate(m.tool_calls)]
            open_calls = [(c["id"], c["function"]["name"]) for c in d["tool_calls"]]
        elif m.role == "tool":
            k = next((k for k, (_, fn) in enumerate(open_calls) if m.tool_name in (None, fn)), None)
            if k is None:
                named = f" of '{m.tool_name[:64]}'" if m.tool_name else ""
                raise invalid(f"message {i} is a tool result{named}, but no assistant message before it called "
                              f"{'that tool' if named else 'a tool'}", param=f"messages.{i}")
            call_id, fn = open_calls.pop(k)
            d["tool_call_id"], d["name"] = call_id, m.tool_name or fn
        elif m.role != "assistant":
            open_calls = []
        msgs.append(d)
    try:
        messages = [Message.model_validate(d) for d in msgs]
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"])
        raise invalid(f"invalid 'messages.{where}': {err['msg']}", param=f"messages.{where}") from None
    return tr.message_dicts(messages)


def _tool_call(call: Any, i: int, j: int) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise invalid(f"messages.{i}.tool_calls.{j} needs function.name", param=f"messages.{i}.tool_calls.{j}")
    args = fn.get("arguments", {})
    return {"id": call.get("id") or f"call_{i}_{j}", "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def _template_kwargs(served: Served, model: str, think: Any) -> dict:
    """`enable_thinking` for the chat template, from Ollama's `think` (a level string means on)."""
    if think is None:
        return {}
    tok = served.engine.tokenizer
    if not supports_thinking(tok.chat_template):
        if think:
            raise invalid(f'"{model}" does not support thinking', param="think")
        return {}
    return {"enable_thinking": bool(think)}


def _prompt_ids(tok: Any, turns: list[dict], system: str | None, examples: list[dict], kwargs: dict,
                tools: list[dict] | None = None) -> list[int]:
    return tr.chat_prompt_ids(tok, turns, system, examples, tools=tools, template_kwargs=kwargs or None)


def _params(served: Served, req: ChatRequest | GenerateRequest, n_prompt: int, chat: bool):
    """`SamplingParams` of an Ollama request: its options as an OpenAI request's fields, through the one
    `translate.sampling_params`; then `format` as a grammar."""
    fields, defaults = sampling_fields(req.options, served.modelfile.parameters)
    cls = ChatCompletionRequest if chat else CompletionRequest
    openai_req = cls.model_construct(**fields)
    return tr.sampling_params(openai_req, defaults, prompt_len=n_prompt, context=served.scheduler.context_length,
                              vocab_size=served.engine.config.vocab_size, max_tokens=None)


def _grammar(fmt: Any, tok: Any):
    """Ollama's `format`: "json" -> any JSON object, a JSON schema -> that schema; "" or None -> none."""
    if fmt in (None, ""):
        return None
    from lmforge.engine.constrain import Grammar, GrammarError

    try:
        g = Grammar.json_object() if fmt == "json" else Grammar.json_schema(fmt)
        g.check(tok)
    except GrammarError as e:
        raise invalid(f"invalid 'format': {e}", param="format") from None
    return g


async def _with_format(request: Request, params, fmt: Any, tok: Any):
    grammar = await _cpu(request, _grammar, fmt, tok)
    return params if grammar is None else dataclasses.replace(params, grammar=grammar)


def _tool_plan(req: ChatRequest, tok: Any, turns: list[dict]) -> tuple[tl.ToolPlan, list[dict]]:
    """Ollama's `tools` through `serve/tools.py`, as the OpenAI route takes them (Ollama has no tool_choice:
    "auto"), and the turns made fit for the model's template; a `ToolError` is a 400 naming the field."""
    try:
        plan = tl.plan_tools(req.tools, None, tok.chat_template)
        return plan, tl.template_history(tok.chat_template, turns)
    except tl.ToolError as e:
        raise invalid(str(e), param=e.param, code=e.code) from None


# ----------------------------------------------------------------------------------------------------
# /api/chat and /api/generate
# ----------------------------------------------------------------------------------------------------
async def chat(request: Request):
    req: ChatRequest = parse(ChatRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    notes = warnings(req.options)
    num_ctx = req.options.num_ctx if req.options else None
    if not req.messages:  # Ollama's "load a model" / "unload a model"
        return await _load_or_unload(request, req.model, keep, num_ctx, {"message": {"role": "assistant", "content": ""}},
                                     notes)
    turns = _turns(req)
    clock = _Clock()
    served = await _use(request, req.model, num_ctx=num_ctx, keep_alive=keep)
    clock.loaded = time.monotonic_ns()
    handed = False
    try:
        tok, mf = served.engine.tokenizer, served.modelfile
        kwargs = _template_kwargs(served, req.model, req.think)
        plan, turns = _tool_plan(req, tok, turns)
        ids = await _cpu(request, _prompt_ids, tok, turns, mf.system, mf.messages, kwargs, plan.tools)
        params = await _with_format(request, _params(served, req, len(ids), chat=True), req.format, tok)
        splitter = ThinkSplitter() if kwargs.get("enable_thinking") else None

        def piece(thinking: str, content: str, calls: list[dict] | None = None) -> dict:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if splitter is not None and thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            return {"message": msg}

        run = _Run(request, served, ids, params, clock, splitter, keep, req.model, plan if plan.parses else None)
        if req.stream:
            handed = True
            return run.stream(piece, lambda: {}, headers=_headers(notes))
        text, thinking, n_out, reason = await run.collect()
        calls = None
        if plan.parses:
            content, found = tl.parse_tool_calls(plan.fmt, text)
            text, calls = content or "", [c.ollama() for c in found]
        return JSONResponse(run.final(piece(thinking, text, calls), n_out, reason), headers=_headers(notes))
    finally:
        if not handed:
            await _release(request, served, keep)


async def generate(request: Request):
    req: GenerateRequest = parse(GenerateRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    notes = warnings(req.options)
    num_ctx = req.options.num_ctx if req.options else None
    if req.images:
        raise invalid("images are not supported: these models read text only", param="images")
    if req.suffix:
        raise invalid("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.template:
        raise invalid("template overrides are not supported: lmforge's chat templates are Jinja; set one with a "
                      "Modelfile TEMPLATE (lmforge create)", param="template")
    if not req.prompt and not req.context:
        return await _load_or_unload(request, req.model, keep, num_ctx, {"response": ""}, notes)
    clock = _Clock()
    served = await _use(request, req.model, num_ctx=num_ctx, keep_alive=keep)
    clock.loaded = time.monotonic_ns()
    handed = False
    try:
        tok, mf, vocab = served.engine.tokenizer, served.modelfile, served.engine.config.vocab_size
        bad = [t for t in req.context or [] if not 0 <= t < vocab]
        if bad:
            raise invalid(f"context token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="context")
        kwargs = {} if req.raw else _template_kwargs(served, req.model, req.think)
        if req.raw or tok.chat_template is None:  # raw: the prompt as it is; no template: a base model's text
            ids = await _cpu(request, tok.encode, req.prompt or "") if req.prompt else []
        else:
            system = req.system if req.system is not None else mf.system
            ids = await _cpu(request, _prompt_ids, tok, [{"role": "user", "content": req.prompt or ""}], system,
                             mf.messages, kwargs)
        ids = [*(req.context or []), *ids]
        if not ids:
            raise invalid("the prompt is empty", param="prompt")
        params = await _with_format(request, _params(served, req, len(ids), chat=False), req.format, tok)
        splitter = ThinkSplitter() if kwargs.get("enable_thinking") else None

        def piece(thinking: str, content: str) -> dict:
            out = {"response": content}
            if splitter is not None and thinking:
                out["thinking"] = thinking
            return out

        run = _Run(request, served, ids, params, clock, splitter, keep, req.model)

        def extra() -> dict:
            return {} if req.raw else {"context": ids + run.out_ids}

        if req.stream:
            handed = True
            return run.stream(piece, extra, headers=_headers(notes))
        text, thinking, n_out, reason = await run.collect()
        return JSONResponse({**run.final(piece(thinking, text), n_out, reason), **extra()}, headers=_headers(notes))
    finally:
        if not handed:
            await _release(request, served, keep)


async def _release(request: Request, served: Served, keep: float | None) -> None:
    """Give the model back; with keep_alive 0, unload it now (waiting a moment for its rows to end)."""
    registry = _registry(request)
    registry.release(served)
    if keep == 0:
        await asyncio.to_thread(registry.unload, served.name, 2.0)


async def _load_or_unload(request: Request, model: str, keep: float | None, num_ctx: int | None, empty: dict,
                          notes: list[str]) -> JSONResponse:
    """A request with nothing to answer: load the model (done_reason "load"), or with keep_alive 0 unload
    it (done_reason "unload"), as Ollama does."""
    name, _ = _name(request, model)
    if keep == 0:
        await asyncio.to_thread(_registry(request).unload, name, 5.0)
        reason = "unload"
    else:
        served = await _use(request, model, num_ctx=num_ctx, keep_alive=keep)
        _registry(request).release(served)
        reason = "load"
    return JSONResponse({"model": model, "created_at": rfc3339(), **empty, "done": True, "done_reason": reason},
                        headers=_headers(notes))


class NDJSONResponse(StreamingResponse):
    """A streaming NDJSON response whose clean-up runs even if its body never starts (see SSEResponse)."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(body, media_type=NDJSON, headers=headers)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class _Run:
    """One answer of /api/chat or /api/generate on the model's scheduler: collected whole or streamed as
    NDJSON, with Ollama's statistics in the final object."""

    def __init__(self, request: Request, served: Served, ids: list[int], params, clock: _Clock,
                 splitter: ThinkSplitter | None, keep: float | None, model: str,
                 plan: tl.ToolPlan | None = None) -> None:
        self.request, self.served, self.ids, self.clock = request, served, ids, clock
        self.splitter, self.keep, self.model = splitter, keep, model
        self.calls = tl.ToolCallStream(plan.fmt) if plan is not None else None  # streamed tool calls
        self.out_ids: list[int] = []
        clock.queued = time.monotonic_ns()
        self.gen = Generation(served, [ids], [params])

    def _split(self, text: str) -> tuple[str, str]:
        return self.splitter.feed(text) if self.splitter is not None else ("", text)

    def final(self, body: dict, n_out: int, reason: str | None) -> dict:
        return {"model": self.model, "created_at": rfc3339(), **body, "done": True, "done_reason": reason or "stop",
                **self.clock.stats(len(self.ids), n_out)}

    async def collect(self) -> tuple[str, str, int, str | None]:
        """(content, thinking, tokens, finish reason); a client that hangs up cancels the rows."""
        content, thinking, reason = [], [], None
        checked = time.monotonic()
        async for _, ev in self.gen.events(ping=1.0):
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.gen.cancel()
                    break
            if ev is None:
                continue
            if ev.token_id is not None:
                self.out_ids.append(ev.token_id)
                self.clock.token()
            t, c = self._split(ev.text)
            thinking.append(t)
            content.append(c)
            reason = ev.finish_reason or reason
        if self.splitter is not None:
            t, c = self.splitter.flush()
            thinking.append(t)
            content.append(c)
        return "".join(content), "".join(thinking), len(self.out_ids), reason

    def _lines(self, piece: Callable[..., dict], thinking: str, content: str, end: bool = False) -> list[bytes]:
        """The NDJSON objects of some new text: thinking and content, content through the tool-call stream
        (each call, once whole, an object of its own with `message.tool_calls`)."""
        out = []
        if self.calls is None:
            if thinking or content:
                out.append(piece(thinking, content))
        else:
            if thinking:
                out.append(piece(thinking, ""))
            events = self.calls.push(content) + (self.calls.finish() if end else [])
            for e in events:
                out.append(piece("", e) if isinstance(e, str) else piece("", "", [e.ollama()]))
        return [_line({"model": self.model, "created_at": rfc3339(), **p, "done": False}) for p in out]

    def stream(self, piece: Callable[..., dict], extra: Callable[[], dict],
               headers: dict[str, str] | None = None) -> NDJSONResponse:
        registry = _registry(self.request)
        cleanup = once(lambda: (self.gen.cancel(), registry.release(self.served)))

        async def body() -> AsyncIterator[bytes]:
            reason = None
            try:
                async for _, ev in self.gen.events(ping=self.request.app.state.opts.stream_ping):
                    if ev is None:
                        continue
                    if ev.token_id is not None:
                        self.out_ids.append(ev.token_id)
                        self.clock.token()
                    reason = ev.finish_reason or reason
                    for line in self._lines(piece, *self._split(ev.text)):
                        yield line
                tail = self.splitter.flush() if self.splitter is not None else ("", "")
                for line in self._lines(piece, *tail, end=True):
                    yield line
                final = self.final(piece("", ""), len(self.out_ids), reason)
                final.update(extra())
                cleanup()  # the model is released (and unloaded with keep_alive 0) before `done` goes out
                if self.keep == 0:
                    await asyncio.to_thread(registry.unload, self.served.name, 2.0)
                yield _line(final)
            except APIError as e:
                yield _line({"error": e.message})
            finally:
                cleanup()

        return NDJSONResponse(body(), cleanup, headers or {})


# ----------------------------------------------------------------------------------------------------
# Models: tags, show, ps, copy, delete, version
# ----------------------------------------------------------------------------------------------------
def _describe(path: Path) -> dict:
    """`store_info.show` of a served model's path (store entry or command-line model)."""
    from lmforge.store_info import show

    try:
        return show(str(path))
    except UserError as e:
        return {"error": str(e)}


def _digest(name: str, info: dict) -> str:
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


def _details(path: Path, info: dict) -> dict:
    from lmforge.paths import GGUF_IN_STORE

    gguf = path.is_file() or (path / GGUF_IN_STORE).is_file()
    quant = info.get("quantization") or {}
    level = (quant.get("type") if isinstance(quant, dict) else None) or str(info.get("dtype") or "F32")
    level = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(level, level.upper())
    fam = _family(info)
    return {"parent_model": "", "format": "gguf" if gguf else "safetensors", "family": fam, "families": [fam],
            "parameter_size": _count(info.get("parameters")), "quantization_level": level}


async def tags(request: Request):
    registry, models = _registry(request), []
    for name, _created in registry.ids():
        path = registry.path_of(name)[1]
        info = await _cpu(request, _describe, path)
        models.append({"name": name, "model": name, "modified_at": rfc3339(info.get("modified") or 0),
                       "size": int(info.get("size_bytes") or 0), "digest": _digest(name, info),
                       "details": _details(path, info)})
    return {"models": models}


def capabilities(info: dict) -> list[str]:
    if info.get("kind") == "embedding":
        return ["embedding"]
    template = info.get("chat_template") or ""
    caps = ["completion"]
    if "tools" in template:
        caps.append("tools")
    if supports_thinking(template):
        caps.append("thinking")
    return caps


# SamplingParams field -> Ollama's PARAMETER name, for the Modelfile and `parameters` text of /api/show.
_OLLAMA_NAMES = {"repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}


def _parameters_text(defaults: dict, num_ctx: int | None) -> str:
    lines = []
    for key, value in defaults.items():
        name = _OLLAMA_NAMES.get(key, key)
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
    name, path = _name(request, req.ref)
    info = await _cpu(request, _describe, path)
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
            "template": info.get("chat_template") or "", "details": _details(path, info), "model_info": model_info,
            "capabilities": capabilities(info), "modified_at": rfc3339(info.get("modified") or 0)}
    if info.get("system"):
        body["system"] = info["system"]
    if info.get("license"):
        body["license"] = info["license"]
    return body


async def ps(request: Request):
    registry, models = _registry(request), []
    for s in sorted(registry.snapshot(), key=lambda s: s.name):
        path = registry.path_of(s.name)[1]
        info = await _cpu(request, _describe, path)
        size = s.footprint.total if s.footprint is not None else 0
        expires = registry.expires_at(s)
        models.append({"name": s.name, "model": s.name, "size": size, "digest": _digest(s.name, info),
                       "details": _details(path, info), "expires_at": FOREVER if expires is None else rfc3339(expires),
                       "size_vram": size if registry.processor(s).endswith("GPU") else 0,
                       "context_length": s.scheduler.context_length})
    return {"models": models}


async def version(request: Request):
    return {"version": __version__}


def _store_only(request: Request, what: str) -> None:
    if _registry(request).fixed is not None:
        raise invalid(f"this server serves the models named on its command line, not the model store: {what} them "
                      f"with `lmforge cp` / `lmforge rm`, and serve the store (`lmforge serve` with no MODEL)")


def _store_error(e: UserError) -> APIError:
    msg = one_line(e)
    return APIError(404 if msg.startswith("no model named") else 400, msg, code="invalid_value")


async def copy(request: Request):
    req: CopyRequest = parse(CopyRequest, await read_body(request))
    _store_only(request, "copy")
    _name(request, req.source)
    from lmforge.store import copy as store_copy

    try:
        await asyncio.to_thread(store_copy, req.source, req.destination)
    except UserError as e:
        raise _store_error(e) from None
    return Response(status_code=200)


async def delete(request: Request):
    req: DeleteRequest = parse(DeleteRequest, await read_body(request))
    _store_only(request, "delete")
    name, _ = _name(request, req.ref)
    from lmforge.store import remove

    await asyncio.to_thread(_registry(request).unload, name, 0.0)  # goes when its requests end
    try:
        await asyncio.to_thread(remove, req.ref)
    except UserError as e:
        raise _store_error(e) from None
    return Response(status_code=200)


# ----------------------------------------------------------------------------------------------------
# Embeddings (the path of /v1/embeddings: the model's Embedder)
# ----------------------------------------------------------------------------------------------------
async def _vectors(request: Request, model: str, texts: list[str], keep: float | None, truncate: bool,
                   dimensions: int | None) -> tuple[list[list[float]], int, _Clock]:
    clock = _Clock()
    registry = _registry(request)
    served = await _use(request, model, keep_alive=keep, embedding=True)
    clock.loaded = time.monotonic_ns()
    try:
        embedder = served.embedder if served.embedding_only else registry.embedder(served)
        if dimensions is not None and dimensions != embedder.dim:
            raise invalid(f"'dimensions' {dimensions} is not available: {served.name} makes {embedder.dim}-dimensional "
                          f"vectors and does not shorten them; omit 'dimensions' or send {embedder.dim}",
                          param="dimensions")
        for i, t in enumerate(texts):
            if not t:
                raise invalid(f"'input' item {i} is an empty string; every input needs some text", param="input")
        rows = await _cpu(request, embedder.tokenize, texts) if texts else []
        for i, r in enumerate(rows):
            if len(r) > embedder.max_tokens:
                if not truncate:
                    raise invalid(f"input {i} has {len(r)} tokens, more than this model's context of "
                                  f"{embedder.max_tokens}; shorten it, or send truncate: true", param="input")
                rows[i] = r[:embedder.max_tokens]
        clock.queued = time.monotonic_ns()
        try:
            vectors = await asyncio.to_thread(embedder.embed_ids, rows) if rows else []
        except UserError as e:
            raise invalid(one_line(e), param="input") from None
        return [[float(x) for x in v] for v in vectors], sum(map(len, rows)), clock
    finally:
        await _release(request, served, keep)


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
                        headers=_headers(warnings(req.options)))


async def embeddings(request: Request):
    req: EmbeddingsRequest = parse(EmbeddingsRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    vectors, _, _ = await _vectors(request, req.model, [req.prompt] if req.prompt else [], keep, True, None)
    return JSONResponse({"embedding": vectors[0] if vectors else []}, headers=_headers(warnings(req.options)))


OLLAMA_ROUTES: list[tuple[str, str, Callable]] = [
    ("POST", "/api/chat", chat),
    ("POST", "/api/generate", generate),
    ("GET", "/api/tags", tags),
    ("POST", "/api/show", show),
    ("GET", "/api/ps", ps),
    ("GET", "/api/version", version),
    ("POST", "/api/embed", embed),
    ("POST", "/api/embeddings", embeddings),
    ("POST", "/api/copy", copy),
    ("DELETE", "/api/delete", delete),
]
