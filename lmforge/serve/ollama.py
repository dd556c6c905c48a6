"""Ollama's native API on the same server, models and schedulers as the OpenAI one (`OLLAMA_ROUTES`).

What clients of Ollama (its `ollama` Python and JS libraries, Open WebUI, Home Assistant, Continue) call:
`POST /api/chat`, `POST /api/generate` (NDJSON streams by default, `stream: false` for one object),
`GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`, `POST /api/embed` (and the legacy
`/api/embeddings`), `POST /api/copy`, `DELETE /api/delete`. Field names, types and units are Ollama's
(durations in nanoseconds, times in RFC 3339 with nanoseconds); `ollama_protocol` holds the schemas,
`ollama_models` the model and embedding routes and what the handlers share; this file the generating
routes and the one `OLLAMA_ROUTES` table.

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
  what the model writes before `</think>` is returned as `thinking`, apart from `content`. With `think`, a
  `format` holds for the answer after the thought (`engine.reasoning.reason_first`, as `response_format`
  does on the OpenAI route): held from the first token, the model could never close its thinking.
- What can be refused without the model (`format`, the shape of `tools`) is refused
  before it is loaded, as on the OpenAI routes: a bad request costs no load and evicts nothing.
- `options` replace the Modelfile's parameters, `stop` included (Ollama's rule; on the OpenAI routes a
  request's `stop` adds to the Modelfile's). A value refused by the sampler names `options.<name>`.
- `prompt_eval_duration` is the time from the request's rows being queued to the first token (prefill and
  any wait for a free row); `eval_duration` from the first token to the last. `prompt_eval_count` is the
  prompt's length in tokens.
- keep_alive 0 unloads the model once the answer is complete (before the final object is sent, so a
  client that sees `done` and asks /api/ps no longer finds it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from lmforge.engine.reasoning import ThinkSplitter, opens_thought, reason_first, supports_thinking
from lmforge.serve import tools as tl
from lmforge.serve import translate as tr
from lmforge.serve.models import Served
from lmforge.serve.ollama_models import (MODEL_ROUTES, Clock, on_cpu, registry_of, release, served_name, use_model,
                                         warning_headers)
from lmforge.serve.ollama_protocol import (ChatRequest, GenerateRequest, option_error, parse_keep_alive, rfc3339,
                                           sampling_fields, warnings)
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, Message, invalid, parse
from lmforge.serve.security import read_body
from lmforge.serve.stream import CleanStream, Generation, once

__all__ = ["OLLAMA_ROUTES"]

log = logging.getLogger("lmforge.serve")

NDJSON = "application/x-ndjson"


# ----------------------------------------------------------------------------------------------------
# Building a request's rows
# ----------------------------------------------------------------------------------------------------
def _turns(req: ChatRequest) -> list[dict]:
    """Ollama's messages as the dicts the chat template reads, through `translate.message_dicts` (the
    OpenAI path's rules: roles, content, tool-call checks). Tool calls keep their arguments as objects.
    Ollama's tool results name their tool (`tool_name`) where OpenAI's name the call (`tool_call_id`): each
    is matched to the first unanswered call of that tool (any call when it names none) of the assistant
    message before it, and a result that answers no call is a 400 in Ollama's terms. Which calls are open
    follows `message_dicts`' rule exactly (only the latest assistant message's calls, closed by any message
    that is not a tool result), so every id given here is one `message_dicts` accepts: it never answers with
    a call id the client did not send."""
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
        else:  # any other message closes the calls, as in message_dicts (an assistant reply without calls too)
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
    # Built without validation (the options were validated by Ollama's rules), so its required fields are
    # given placeholders: sampling_params reads the sampling fields only.
    openai_req = cls.model_construct(model="", **({"messages": []} if chat else {"prompt": ""}), **fields)
    try:
        return tr.sampling_params(openai_req, defaults, prompt_len=n_prompt, context=served.scheduler.context_length,
                                  vocab_size=served.engine.config.vocab_size, max_tokens=None)
    except APIError as e:  # SamplingParams' own checks name no field: name the option
        raise option_error(e) from None


def _grammar(fmt: Any):
    """Ollama's `format`: "json" -> any JSON object, a JSON schema -> that schema; "" or None -> none.
    Objects that do not say otherwise take no extra keys (`strict`), as Ollama's llama.cpp schema converter
    reads them. Built and validated before the model is loaded (a bad schema costs no load, as on the
    OpenAI routes); `_with_format` compiles it against the vocabulary once the model is there."""
    if fmt in (None, ""):
        return None
    from lmforge.engine.constrain import Grammar, GrammarError

    try:
        return Grammar.json_object() if fmt == "json" else Grammar.json_schema(fmt, strict=True)
    except GrammarError as e:
        raise invalid(f"invalid 'format': {e}", param="format") from None


def _checked(grammar, tok: Any, opened: bool | None):
    """`grammar` compiled against the vocabulary; with thinking (`opened` not None: whether the prompt
    opened the thought), made to hold after the thought."""
    from lmforge.engine.constrain import GrammarError

    try:
        if opened is not None:
            grammar = reason_first(grammar, opened)
        grammar.check(tok)
    except GrammarError as e:
        raise invalid(f"invalid 'format': {e}", param="format") from None
    return grammar


async def _with_format(request: Request, params, grammar, tok: Any, splitter: ThinkSplitter | None):
    if grammar is None:
        return params
    opened = splitter.prompt_opened if splitter is not None else None
    return dataclasses.replace(params, grammar=await on_cpu(request, _checked, grammar, tok, opened))


async def _checked_request(request: Request, req: ChatRequest | GenerateRequest):
    """What can be refused before the model is loaded (a load can evict other models): `format` (built and
    validated on the worker pool) and the shape of `tools`. Returns the grammar."""
    if isinstance(req, ChatRequest) and req.tools is not None:
        try:
            tl.parse_tools(req.tools)
        except tl.ToolError as e:
            raise invalid(str(e), param=e.param, code=e.code) from None
    return await on_cpu(request, _grammar, req.format)


# ----------------------------------------------------------------------------------------------------
# /api/chat and /api/generate
# ----------------------------------------------------------------------------------------------------
async def chat(request: Request):
    req: ChatRequest = parse(ChatRequest, await read_body(request))
    keep = parse_keep_alive(req.keep_alive)
    notes = warnings(req.options)
    num_ctx = req.options.num_ctx if req.options else None
    if not req.messages:  # Ollama's "load a model" / "unload a model"
        empty = {"message": {"role": "assistant", "content": ""}}
        return await _load_or_unload(request, req.model, keep, num_ctx, empty, notes)
    clock = Clock()
    turns = _turns(req)
    grammar = await _checked_request(request, req)
    served = await use_model(request, req.model, num_ctx=num_ctx, keep_alive=keep)
    clock.loaded = time.monotonic_ns()
    handed = False
    try:
        tok, mf = served.engine.tokenizer, served.modelfile
        kwargs = _template_kwargs(served, req.model, req.think)
        plan, turns = tl.tool_plan(req.tools, None, tok.chat_template, turns)
        ids = await on_cpu(request, _prompt_ids, tok, turns, mf.system, mf.messages, kwargs, plan.tools)
        splitter = ThinkSplitter(opens_thought(tok, ids)) if kwargs.get("enable_thinking") else None
        params = await _with_format(request, _params(served, req, len(ids), chat=True), grammar, tok, splitter)

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
            return run.stream(piece, lambda: {}, headers=warning_headers(notes))
        text, thinking, n_out, reason = await run.collect()
        calls = None
        if plan.parses:
            content, found = tl.parse_tool_calls(plan.fmt, text)
            text, calls = content or "", [c.ollama() for c in found]
        return JSONResponse(run.final(piece(thinking, text, calls), n_out, reason), headers=warning_headers(notes))
    finally:
        if not handed:
            await release(request, served, keep)


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
    clock = Clock()
    grammar = await _checked_request(request, req)
    served = await use_model(request, req.model, num_ctx=num_ctx, keep_alive=keep)
    clock.loaded = time.monotonic_ns()
    handed = False
    try:
        tok, mf, vocab = served.engine.tokenizer, served.modelfile, served.engine.config.vocab_size
        bad = [t for t in req.context or [] if not 0 <= t < vocab]
        if bad:
            raise invalid(f"context token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="context")
        kwargs = {} if req.raw else _template_kwargs(served, req.model, req.think)
        if req.raw or tok.chat_template is None:  # raw: the prompt as it is; no template: a base model's text
            ids = await on_cpu(request, tok.encode, req.prompt or "") if req.prompt else []
        else:
            system = req.system if req.system is not None else mf.system
            ids = await on_cpu(request, _prompt_ids, tok, [{"role": "user", "content": req.prompt or ""}], system,
                             mf.messages, kwargs)
        ids = [*(req.context or []), *ids]
        if not ids:
            raise invalid("the prompt is empty", param="prompt")
        splitter = ThinkSplitter(opens_thought(tok, ids)) if kwargs.get("enable_thinking") else None
        params = await _with_format(request, _params(served, req, len(ids), chat=False), grammar, tok, splitter)

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
            return run.stream(piece, extra, headers=warning_headers(notes))
        text, thinking, n_out, reason = await run.collect()
        return JSONResponse({**run.final(piece(thinking, text), n_out, reason), **extra()},
                            headers=warning_headers(notes))
    finally:
        if not handed:
            await release(request, served, keep)


async def _load_or_unload(request: Request, model: str, keep: float | None, num_ctx: int | None, empty: dict,
                          notes: list[str]) -> JSONResponse:
    """A request with nothing to answer: load the model (done_reason "load"), or with keep_alive 0 unload
    it (done_reason "unload"), as Ollama does."""
    name, _ = served_name(request, model)
    if keep == 0:
        await asyncio.to_thread(registry_of(request).unload, name, 5.0)
        reason = "unload"
    else:
        served = await use_model(request, model, num_ctx=num_ctx, keep_alive=keep)
        registry_of(request).release(served)
        reason = "load"
    return JSONResponse({"model": model, "created_at": rfc3339(), **empty, "done": True, "done_reason": reason},
                        headers=warning_headers(notes))


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class _Run:
    """One answer of /api/chat or /api/generate on the model's scheduler: collected whole or streamed as
    NDJSON, with Ollama's statistics in the final object."""

    def __init__(self, request: Request, served: Served, ids: list[int], params, clock: Clock,
                 splitter: ThinkSplitter | None, keep: float | None, model: str,
                 plan: tl.ToolPlan | None = None) -> None:
        self.request, self.served, self.ids, self.clock = request, served, ids, clock
        self.splitter, self.keep, self.model = splitter, keep, model
        self.calls = tl.ToolCallStream(plan.fmt) if plan is not None else None  # streamed tool calls
        self.out_ids: list[int] = []
        clock.queued = time.monotonic_ns()
        self.gen = Generation(served, [ids], [params])
        clock.timer = self.gen.timer  # token times from the scheduler thread, as /metrics has them

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
               headers: dict[str, str] | None = None) -> CleanStream:
        registry = registry_of(self.request)
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

        return CleanStream(body(), cleanup, media_type=NDJSON, headers=headers or {})


OLLAMA_ROUTES: list[tuple[str, str, Callable]] = [
    ("POST", "/api/chat", chat),
    ("POST", "/api/generate", generate),
    *MODEL_ROUTES,
]
