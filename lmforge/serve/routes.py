"""Every HTTP route of the server, and the one `ROUTES` table that lists them.

The handlers only wire HTTP to the layers below: `protocol` parses and validates the body, `translate`
turns it into token ids and `SamplingParams` (and results back into OpenAI's response objects), `stream`
runs the rows on the model's scheduler, and `models.ModelRegistry` lends the model for the request (each
handler releases it when done, or hands that to the stream it returns). What reaches a handler has
already passed the guard in `security`.

Routes: the OpenAI API (models, chat and text completions, with the `documents` extension of `grounded`),
the index listing, the tokenizer routes lm-evaluation-harness uses, feedback collection, and the web chat
UI's files. Errors never carry a path or a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response

from lmforge.engine.reasoning import ThinkSplitter, opens_thought, reason_first, split_reasoning, thinking_on
from lmforge.engine.sampling import SamplingParams
from lmforge.serve import grounded as gr
from lmforge.serve import tools as tl
from lmforge.serve import translate as tr
from lmforge.serve.feedback import FeedbackRefused, save_feedback
from lmforge.serve.models import ModelRegistry, Served
from lmforge.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    FeedbackRequest, TokenizeRequest, invalid, parse)
from lmforge.serve.security import AUTHORIZED, read_body
from lmforge.serve.stream import Generation, SSEResponse, check_sequences, collect, once, run_job, sse_stream
from lmforge.serve.web_assets import ASSET_TYPES  # what the UI's pages load (one table, setup.py reads it too)

WEB_DIR = Path(__file__).parent / "web"


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _use(request: Request, model_id: str) -> Served:
    return await _registry(request).get(model_id)


# -- info routes -----------------------------------------------------------------------------------------
async def health(request: Request):
    status = "draining" if request.app.state.opts.draining else "ok"
    if not request.scope.get(AUTHORIZED, True):  # with --api-key, strangers learn only that it is up
        return {"status": status}
    loaded = _registry(request).snapshot()
    return {"status": status,
            "models_loaded": sorted(s.name for s in loaded),
            "busy_slots": sum(s.scheduler.busy for s in loaded),
            "queued": sum(s.scheduler.queued for s in loaded)}


async def list_models(request: Request):
    return {"object": "list", "data": [tr.model_card(name, created) for name, created in _registry(request).ids()]}


async def get_model(request: Request, model_id: str):
    name, path = _registry(request).path_of(model_id)
    created = dict(_registry(request).ids()).get(name, int(path.stat().st_mtime))
    return tr.model_card(name, created)


# -- chat completions --------------------------------------------------------------------------------------
async def chat_completions(request: Request):
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_body(request))
    grammar = await _cpu(request, tr.check_chat_request, req)  # a big grammar takes a while to validate
    turns = tr.message_dicts(req.messages)
    if req.documents is not None and req.tools and req.tool_choice != "none":
        raise invalid("documents (grounded chat) cannot be combined with tools yet; send one or the other",
                      param="tools")
    # Retrieval needs no model: an unknown index is a 404 before one is loaded.
    found = await _cpu(request, gr.search, req.documents, turns) if req.documents is not None else None
    served = await _use(request, req.model)
    streaming = False
    try:
        tok, mf = served.engine.tokenizer, served.modelfile
        ctx = served.scheduler.context_length
        plan, turns = tl.tool_plan(req.tools, req.tool_choice, tok.chat_template, turns, req.parallel_tool_calls)
        ids = await _cpu(request, tr.chat_prompt_ids, tok, turns, mf.system, mf.messages, tools=plan.tools,
                         template_kwargs=req.chat_template_kwargs)  # checks the turns
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        grounding = None
        if found is not None:
            default_max = mf.parameters.get("max_new_tokens", SamplingParams.max_new_tokens)
            ids, grounded = await _cpu(request, gr.grounded_ids, tok, turns, found, context=ctx, max_tokens=max_tokens,
                                       default_max_new=default_max, system=mf.system, examples=mf.messages,
                                       template_kwargs=req.chat_template_kwargs)
            grounding = (gr.grounding_info(found, grounded), [s.to_dict() for s in grounded.sources])
        # A thinking template's output is split into reasoning_content and content (engine/reasoning.py);
        # `opened` is None when it is not split, else whether the prompt already opened the thought.
        opened = opens_thought(tok, ids) if thinking_on(tok.chat_template, req.chat_template_kwargs) else None
        # on the worker pool: a response_format is compiled against the vocabulary (a second, the first time, for
        # a 150k-token one) and the result attached to the grammar, which the scheduler's rows only copy
        params = await _cpu(request, tr.sampling_params, req, mf.parameters, prompt_len=len(ids), context=ctx,
                            vocab_size=served.engine.config.vocab_size, max_tokens=max_tokens, tokenizer=tok,
                            grammar=grammar)
        if plan.parses and params.num_beams > 1:
            raise invalid("beam search cannot be combined with tools", param="use_beam_search")
        if plan.constrained:
            params = await _cpu(request, _forced_call, req, plan, params, tok)
        if opened is not None and params.grammar is not None and req.grammar is None:
            # response_format, json_schema and forced calls hold for the answer, after the thought; llama.cpp's
            # raw `grammar` is the whole output's, as written (it may spell out the thought itself)
            params = await _cpu(request, _reason_first, params, opened, tok)
        if params.num_beams > 1:
            return await _beam_chat(served, request, req, ids, params, grounding, opened)
        gen = Generation(served, [ids] * req.n, [params] * req.n)
        rid, created = tr.new_id("chatcmpl"), int(time.time())
        if req.stream:
            streaming = True  # the stream releases the model when it ends
            cleanup = once(lambda: (gen.cancel(), _registry(request).release(served)))
            return SSEResponse(_chat_stream(served, request, gen, req, rid, created, len(ids), cleanup, grounding,
                                            plan, opened), cleanup)
        choices = await collect(gen, request, req.n)
        body = tr.chat_response(rid, req.model, [
            _answer(i, c.text, c.finish_reason or "stop",
                    tr.chat_logprobs(tok, c.ids, c.logprobs, c.tops) if req.logprobs else None, grounding, plan, opened)
            for i, c in enumerate(choices)], tr.usage(len(ids), sum(len(c.ids) for c in choices), gen.cached_tokens), created)
        return JSONResponse(_with_grounding(body, grounding))
    finally:
        if not streaming:
            _registry(request).release(served)


def _forced_call(req: ChatCompletionRequest, plan: tl.ToolPlan, params: SamplingParams, tok) -> SamplingParams:
    """`params` constrained to a call in the model's format (tool_choice "required" or a named function):
    the grammar of `serve/tool_grammar.py`, compiled against the model's vocabulary here, on the worker pool."""
    from lmforge.engine.constrain import Grammar, GrammarError
    from lmforge.serve.tool_grammar import tool_grammar

    if params.grammar is not None:
        raise invalid("response_format (or grammar) and a required tool_choice both constrain the output; send one",
                      param="tool_choice")
    try:
        grammar = Grammar.lark(tool_grammar(plan, tok))
        grammar.check(tok)
    except GrammarError as e:
        raise invalid(f"invalid 'tools': a call to these functions cannot be constrained: {e}", param="tools") \
            from None
    return dataclasses.replace(params, grammar=grammar)


def _reason_first(params: SamplingParams, opened: bool, tok) -> SamplingParams:
    """`params` whose grammar (structured output, a forced tool call) waits for the end of the thought
    (`reasoning.reason_first`), compiled against the model's vocabulary here, on the worker pool."""
    grammar = reason_first(params.grammar, opened)
    grammar.check(tok)
    return dataclasses.replace(params, grammar=grammar)


def _answer(i: int, text: str, reason: str, logprobs: dict | None, grounding: tuple[dict, list[dict]] | None,
            plan: tl.ToolPlan | None, opened: bool | None) -> dict:
    """One chat choice from a whole output: the thought as `message.reasoning_content` (when `opened` is
    not None: the output is split), tool calls parsed out of the answer only."""
    reasoning = None
    if opened is not None:
        reasoning, text = split_reasoning(text, opened)
    choice = tr.chat_choice(i, text, reason, logprobs, grounding[1] if grounding else None, reasoning=reasoning)
    return _with_tool_calls(choice, plan, text) if plan is not None else choice


def _with_tool_calls(choice: dict, plan: tl.ToolPlan, text: str) -> dict:
    """A chat choice with the tool calls parsed out of its text: `message.tool_calls` (arguments as JSON
    strings), the text around them as `content` (null when there is none), finish reason "tool_calls"."""
    if not plan.parses:
        return choice
    content, calls = tl.parse_tool_calls(plan.fmt, text)
    if not plan.parallel:
        calls = calls[:1]
    if calls:
        choice["message"]["content"] = content
        choice["message"]["tool_calls"] = [c.openai() for c in calls]
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
    return choice


def _with_grounding(body: dict, grounding: tuple[dict, list[dict]] | None) -> dict:
    """`body` with the top-level `grounding` extension object of a grounded request (`serve/grounded.py`)."""
    return {**body, "grounding": grounding[0]} if grounding else body


def _chat_stream(served: Served, request: Request, gen: Generation, req: ChatCompletionRequest, rid: str,
                 created: int, n_prompt: int, cleanup: Callable[[], None],
                 grounding: tuple[dict, list[dict]] | None = None,
                 plan: tl.ToolPlan | None = None, opened: bool | None = None) -> AsyncIterator[bytes]:
    """The SSE chunks of a chat completion. A thinking model's text (`opened` not None) goes through a
    `reasoning.ThinkSplitter` first: `reasoning_content` deltas while it thinks, `content` after. With
    tools, the answer then goes through a `tools.ToolCallStream`: content deltas as usual (text that may
    begin a call is held back), then each call, once complete, as one OpenAI tool-call delta (`index`,
    `id`, `type`, `function.name` and the whole `function.arguments`), and finish reason "tool_calls"."""
    tok = served.engine.tokenizer
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    parsing = plan is not None and plan.parses
    streams = [tl.ToolCallStream(plan.fmt) for _ in range(req.n)] if parsing else []
    sent = [0] * req.n  # tool calls sent per choice
    splitters = [ThinkSplitter(opened) for _ in range(req.n)] if opened is not None else []

    def chunk(choices: list[dict]) -> dict:
        return tr.chat_chunk(rid, req.model, created, choices, with_usage)

    def chunks(i: int, ev) -> list[dict]:
        out = []
        lp = None
        if req.logprobs and ev.token_id is not None:
            lp = tr.chat_logprobs(tok, [ev.token_id], [ev.logprob], [ev.top_logprobs or []])
        thought, text, calls = "", ev.text, []
        if splitters:
            thought, text = splitters[i].feed(ev.text)
            if ev.finish_reason:
                rest = splitters[i].flush()
                thought, text = thought + rest[0], text + rest[1]
        if parsing:
            events = streams[i].push(text) + (streams[i].finish() if ev.finish_reason else [])
            text = "".join(e for e in events if isinstance(e, str))
            calls = [e for e in events if isinstance(e, tl.ToolCall)]
        if thought:
            out.append(chunk([{"index": i, "delta": {"reasoning_content": thought}, "logprobs": lp,
                               "finish_reason": None}]))
            lp = None  # the token's logprobs ride on its first delta
        if text or lp is not None:
            out.append(chunk([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}]))
        for call in calls:
            if sent[i] and not plan.parallel:
                break
            out.append(chunk([{"index": i, "delta": {"tool_calls": [{"index": sent[i], **call.openai()}]},
                               "logprobs": None, "finish_reason": None}]))
            sent[i] += 1
        if ev.finish_reason:
            reason = "tool_calls" if sent[i] and ev.finish_reason == "stop" else ev.finish_reason
            out.append(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out

    # A grounded request's sources ride on the first chunk of each choice, before any content.
    extra = {"sources": grounding[1]} if grounding else {}
    head = [_with_grounding(chunk([{"index": i, "delta": {"role": "assistant", "content": "", **extra}, "logprobs": None,
                                    "finish_reason": None}]), grounding) for i in range(req.n)]
    usage_chunk = (lambda n_out: {**tr.chat_chunk(rid, req.model, created, [], False),
                                  "usage": tr.usage(n_prompt, n_out, gen.cached_tokens)}) if with_usage else None
    return sse_stream(request, gen, head, chunks, usage_chunk, cleanup)


async def _beam_chat(served: Served, request: Request, req: ChatCompletionRequest, ids: list[int],
                     params: SamplingParams, grounding: tuple[dict, list[dict]] | None = None,
                     opened: bool | None = None):
    check_sequences(served, params.num_beams, "beams", param="best_of")
    beams = await _beam(served, request, ids, params, req.n)
    choices = [_answer(i, b.text, b.finish_reason, None, grounding, None, opened) for i, b in enumerate(beams)]
    usage = tr.usage(len(ids), sum(b.n_tokens for b in beams))
    return JSONResponse(_with_grounding(tr.chat_response(tr.new_id("chatcmpl"), req.model, choices, usage), grounding))


async def _beam(served: Served, request: Request, ids: list[int], params: SamplingParams, n: int):
    """The `n` best beams, finished as the CLI finishes them (`Engine.beam_search` -> `finish_beams`); a
    client that hangs up stops the search at its next step."""
    return await run_job(served, request, lambda stop: served.engine.beam_search(ids, params, n_best=n, should_stop=stop))


async def _cpu(request: Request, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` on the server's worker pool: tokenizing and template rendering never run on the
    event loop."""
    return await request.app.state.cpu.run(fn, *args, **kwargs)


async def _json(request: Request, body: dict) -> Response:
    """A JSON response serialised on the worker pool (200,000 token ids take the event loop a second)."""
    raw = await _cpu(request, json.dumps, body, ensure_ascii=False, separators=(",", ":"))
    return Response(raw.encode(), media_type="application/json")


# -- document indexes (for the web UI's collection picker) --------------------------------------------------
async def list_indexes(request: Request):
    return await _cpu(request, gr.index_listing, request.app.state.opts.docs)


# -- text completions ---------------------------------------------------------------------------------------
async def completions(request: Request):
    req: CompletionRequest = parse(CompletionRequest, await read_body(request))
    grammar = await _cpu(request, tr.check_completion_request, req)  # built once, for every prompt
    served = await _use(request, req.model)
    streaming = False
    try:
        tok, cfg, mf = served.engine.tokenizer, served.engine.config, served.modelfile
        prompts = await _cpu(request, tr.completion_prompts, tok, req.prompt, cfg.vocab_size)
        ctx = served.scheduler.context_length
        max_tokens = req.max_tokens
        params = await _cpu(request, lambda: [  # on the worker pool: a grammar is compiled here (see chat)
            tr.sampling_params(req, mf.parameters, prompt_len=len(p), context=ctx, vocab_size=cfg.vocab_size,
                               max_tokens=max_tokens if max_tokens else None, tokenizer=tok, grammar=grammar)
            for p in prompts])
        if req.echo and req.stream:
            raise invalid("echo cannot be combined with stream", param="echo")
        k = req.logprobs
        beams = params[0].num_beams if params[0].num_beams > 1 else 0
        check_sequences(served, len(prompts) * (beams or req.n), "prompts x best_of beams" if beams else "prompts x n",
                        param="best_of" if beams else "n")
        echoed = None
        if req.echo and k is not None:
            echoed = await run_job(served, request, lambda stop: [served.engine.score_ids(p, top_k=k, should_stop=stop)
                                                                  for p in prompts])
        if req.max_tokens == 0:  # echo only: score the prompt, generate nothing
            choices = [tr.completion_choice(j, tok.decode(p) if req.echo else "", "length",
                                            _echo_logprobs(tok, p, echoed[j], k) if echoed else None)
                       for j, p in enumerate(prompts)]
            return JSONResponse(tr.completion_response(tr.new_id("cmpl"), req.model, choices,
                                                       tr.usage(sum(map(len, prompts)), 0)))
        if beams:
            found = [b for p, sp in zip(prompts, params) for b in await _beam(served, request, p, sp, req.n)]
            choices = [tr.completion_choice(j, b.text, b.finish_reason, None) for j, b in enumerate(found)]
            return JSONResponse(tr.completion_response(tr.new_id("cmpl"), req.model, choices,
                                                       tr.usage(sum(map(len, prompts)), sum(b.n_tokens for b in found))))
        rows_prompts = [p for p in prompts for _ in range(req.n)]
        rows_params = [sp for sp in params for _ in range(req.n)]
        # sample i of every prompt draws from seed + i, as if that prompt had been sent alone
        gen = Generation(served, rows_prompts, rows_params, seed_offsets=[i for _ in prompts for i in range(req.n)])
        rid, created = tr.new_id("cmpl"), int(time.time())
        if req.stream:
            streaming = True
            cleanup = once(lambda: (gen.cancel(), _registry(request).release(served)))
            return SSEResponse(_completion_stream(served, request, gen, req, rid, created, sum(map(len, prompts)),
                                              cleanup), cleanup)
        results = await collect(gen, request, len(rows_prompts))
        choices = []
        for j, c in enumerate(results):
            p = rows_prompts[j]
            text, lp = c.text, None
            if k is not None:
                lp = tr.completion_logprobs(tok, c.ids, c.logprobs, c.tops,
                                            offset=len(tok.decode(p)) if req.echo else 0)
            if req.echo:
                prompt_text = tok.decode(p)
                text = prompt_text + text
                if lp is not None:
                    head = _echo_logprobs(tok, p, echoed[j // req.n], k)
                    lp = {key: head[key] + lp[key] for key in lp}
            choices.append(tr.completion_choice(j, text, c.finish_reason or "stop", lp))
        return JSONResponse(tr.completion_response(rid, req.model, choices,
                                                   tr.usage(sum(map(len, prompts)), sum(len(c.ids) for c in results),
                                                            gen.cached_tokens),
                                                   created))
    finally:
        if not streaming:
            _registry(request).release(served)


def _echo_logprobs(tok, prompt: list[int], scored, k: int) -> dict:
    """Logprobs of the prompt's own tokens (the first has no context: null, as OpenAI does)."""
    tops = scored.top_logprobs if scored.top_logprobs is not None else [[] for _ in scored.logprobs]
    return tr.completion_logprobs(tok, prompt, [None, *scored.logprobs], [None, *tops])


def _completion_stream(served: Served, request: Request, gen: Generation, req: CompletionRequest, rid: str,
                       created: int, n_prompt: int, cleanup: Callable[[], None]) -> AsyncIterator[bytes]:
    tok = served.engine.tokenizer
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    offsets = [0] * len(gen.rows)

    def chunks(i: int, ev) -> list[dict]:
        lp = None
        if req.logprobs is not None and ev.token_id is not None:
            lp = tr.completion_logprobs(tok, [ev.token_id], [ev.logprob], [ev.top_logprobs or []], offset=offsets[i])
        offsets[i] += len(ev.text)
        chunk = tr.completion_response(rid, req.model, [tr.completion_choice(i, ev.text, ev.finish_reason, lp)],
                                       None, created)
        if not with_usage:
            chunk.pop("usage")
        return [chunk]

    usage_chunk = (lambda n_out: tr.completion_response(rid, req.model, [], tr.usage(n_prompt, n_out, gen.cached_tokens),
                                                                  created)) \
        if with_usage else None
    return sse_stream(request, gen, [], chunks, usage_chunk, cleanup)


# -- tokenizer routes (vLLM's shapes, which lm-evaluation-harness's local-completions probes) -------------------
async def _tokenizer_model(request: Request, model_id: str | None) -> Served:
    if model_id is None:
        ids = _registry(request).ids()
        if len(ids) != 1:
            raise invalid("several models are served here: say which with 'model'", param="model",
                          code="missing_required_parameter")
        model_id = ids[0][0]
    return await _use(request, model_id)


async def tokenize(request: Request):
    req: TokenizeRequest = parse(TokenizeRequest, await read_body(request))
    if sum(x is not None for x in (req.prompt, req.content, req.messages)) != 1:
        raise invalid("send exactly one of 'prompt' (or llama.cpp's 'content') or 'messages'", param="prompt")
    served = await _tokenizer_model(request, req.model)
    try:
        tok = served.engine.tokenizer
        if req.messages is not None:
            ids = await _cpu(request, tr.chat_prompt_ids, tok, tr.message_dicts(req.messages),
                             add_generation_prompt=req.add_generation_prompt)
        else:
            special = req.add_special_tokens if req.content is None else req.add_special
            ids = await _cpu(request, tok.encode, req.prompt if req.content is None else req.content,
                             add_bos=None if special else False)
        tokens: list = await _cpu(request, _pieces, tok, ids) if req.with_pieces else ids
        return await _json(request, {"count": len(ids), "max_model_len": served.scheduler.context_length,
                                     "tokens": tokens})
    finally:
        _registry(request).release(served)


def _pieces(tok, ids: list[int]) -> list[dict]:
    """llama.cpp's `with_pieces`: each token with its text, or, when its bytes are not whole UTF-8 characters
    on their own (half of an emoji), the list of those byte values, as llama.cpp answers (decoding one token
    alone would give U+FFFD). One call for the whole prompt: no round trip per token."""
    out = []
    for t in ids:
        raw = tok.token_bytes(t)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return out


async def detokenize(request: Request):
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_body(request))
    served = await _tokenizer_model(request, req.model)
    try:
        vocab = served.engine.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return await _json(request, {"prompt": await _cpu(request, served.engine.tokenizer.decode, req.tokens)})
    finally:
        _registry(request).release(served)


async def tokenizer_info(request: Request, model: str | None = None):
    served = await _tokenizer_model(request, model)
    try:
        tok = served.engine.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": tok.chat_template, "model_max_length": served.scheduler.context_length,
                "vocab_size": served.engine.config.vocab_size, "tokenizer_class": "PreTrainedTokenizerFast"}
    finally:
        _registry(request).release(served)


# -- feedback ---------------------------------------------------------------------------------------------------
async def feedback(request: Request):
    req: FeedbackRequest = parse(FeedbackRequest, await read_body(request))
    _registry(request).path_of(req.model)  # only feedback about a model served here
    if req.rating is None and not (req.better and req.better.strip()):
        raise invalid("send a rating ('up' or 'down') or a better answer", param="rating")
    messages = tr.message_dicts(req.messages)
    if messages[-1]["role"] != "user":
        raise invalid("messages must end with the user turn the response answers", param="messages")
    wait = request.app.state.feedback_rate.take()
    if wait:
        raise APIError(429, "too much feedback at once; try again shortly", code="rate_limited",
                       headers={"retry-after": str(max(1, math.ceil(wait)))})
    served = await _use(request, req.model)  # its tokenizer says which text would forge turns
    try:
        tok = served.engine.tokenizer
        texts = [(f"messages.{i}.content", m["content"]) for i, m in enumerate(messages)]
        for param, text in [*texts, ("response", req.response), ("better", req.better or "")]:
            hit = tok.control_token_in(text)
            if hit is not None:
                raise invalid(f"{param} contains the control token {hit!r}, which would forge the conversation's "
                              f"structure in the training data", param=param)
    finally:
        _registry(request).release(served)
    opts = request.app.state.opts
    try:
        saved = await asyncio.to_thread(save_feedback, opts.feedback_dir, req.model, messages, req.response,
                                        req.rating, req.better, max_record=opts.feedback_max_record,
                                        max_file=opts.feedback_max_file)
    except FeedbackRefused as e:
        raise APIError(e.status, str(e), code=e.code) from None
    return {"object": "feedback", "saved": saved}


# -- the web UI ---------------------------------------------------------------------------------------------------
async def index(request: Request):
    page = WEB_DIR / "index.html"
    if not page.is_file():
        raise APIError(404, "the web UI is not installed", code="not_found")
    return FileResponse(page, media_type="text/html; charset=utf-8")


def _safe_file(root: Path, rel: str) -> Path:
    """`root/rel` if that is a regular file inside `root` (no '..', no absolute paths, no symlink escape)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        raise APIError(404, "not found", code="not_found")
    base = root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise APIError(404, "not found", code="not_found")
    return path


def _asset(root: Path, rel: str) -> FileResponse:
    path = _safe_file(root, rel)
    if path.suffix not in ASSET_TYPES:
        raise APIError(404, "not found", code="not_found")
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix])


async def static(request: Request, name: str):
    return _asset(WEB_DIR, name)


async def vendor(request: Request, path: str):
    modules = WEB_DIR / "node_modules"
    if not modules.is_dir():
        raise APIError(404, "the web UI's libraries are not installed (in a checkout: make setup; a wheel "
                       "built with LMFORGE_WEB=skip has none)", code="not_found")
    return _asset(modules, path)


ROUTES: list[tuple[str, str, Callable]] = [
    ("GET", "/health", health),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model_id:path}", get_model),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("GET", "/v1/indexes", list_indexes),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
    ("POST", "/v1/feedback", feedback),
    ("GET", "/", index),
    ("GET", "/static/{name}", static),
    ("GET", "/vendor/{path:path}", vendor),
]
