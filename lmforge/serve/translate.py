"""OpenAI requests -> engine inputs, and engine outputs -> OpenAI response objects.

Pure functions, no I/O: `routes.py` calls them between the HTTP layer and the scheduler, and tests can check
the wire format without a server.

Sampling defaults, from weakest to strongest: lmforge's (`SamplingParams`, Ollama's values), then the
model's Modelfile `PARAMETER`s, then the request. So a request that says nothing about temperature gets
the model's own default, as with Ollama's OpenAI endpoint.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import time
import uuid
from typing import Any, Sequence

from lmforge.engine.constrain import Grammar, GrammarError
from lmforge.engine.prompt import ChatPromptError
from lmforge.engine.prompt import chat_prompt_ids as build_chat_prompt
from lmforge.engine.sampling import SamplingParams
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, Message, invalid

FINGERPRINT = "lmforge"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------
def message_dicts(messages: Sequence[Message]) -> list[dict]:
    """Plain dicts for the chat template, in the shape transformers' templates expect. `developer` is
    OpenAI's new name for `system`; text parts are joined. An assistant message's `tool_calls` become
    `{"type": "function", "function": {"name", "arguments": <object>}, "id"}` (templates write the arguments
    with `tojson`, so the JSON string OpenAI sends is parsed here), and a `tool` message
    `{"role": "tool", "content", "tool_call_id", "name"?}`. A tool message must answer a call of the
    assistant message before it (as OpenAI requires), so a history that lost a message is a 400, not a
    prompt that silently makes no sense. (The Modelfile's SYSTEM and MESSAGE examples are added by the one
    chat-prompt builder, `chat_prompt_ids`.)"""
    out: list[dict] = []
    open_calls: set[str] = set()  # ids of the latest assistant message's calls
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise invalid(f"content parts of type '{p.type}' are not supported: these models read text only",
                                  param=f"messages.{i}.content.{j}.type")
                parts.append(p.text)
            text = "".join(parts)
        else:
            text = m.content or ""
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.tool_calls is not None and m.role != "assistant":
            raise invalid("only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
        if m.tool_calls:
            d["tool_calls"] = [_tool_call_dict(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls)]
            if m.content is None:
                d["content"] = None  # as the client sent it: templates test `message.content` (None is left out)
            open_calls = {c["id"] for c in d["tool_calls"]}
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise invalid(f"message {i} has role 'tool' but no tool_call_id saying which call it answers",
                              param=f"messages.{i}.tool_call_id", code="missing_required_parameter")
            if m.tool_call_id not in open_calls:
                raise invalid(f"message {i} answers tool call {m.tool_call_id[:80]!r}, which no assistant message "
                              f"before it made", param=f"messages.{i}.tool_call_id")
            d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        else:
            open_calls = set()
        out.append(d)
    if out[-1]["role"] == "system":
        raise invalid("the conversation has no user message after the system prompt", param="messages")
    return out


def _tool_call_dict(call: Any, where: str) -> dict:
    """One call of the history as templates expect it, its JSON-string arguments parsed into an object."""
    if call.id is None:
        raise invalid(f"{where}.id is missing: every tool call needs the id its tool message answers",
                      param=f"{where}.id", code="missing_required_parameter")
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise invalid(f"{where}.function.arguments is not valid JSON: {e}", param=f"{where}.function.arguments") \
                from None
    if not isinstance(args, dict):
        raise invalid(f"{where}.function.arguments must be a JSON object", param=f"{where}.function.arguments")
    return {"type": "function", "function": {"name": call.function.name, "arguments": args}, "id": call.id}


def chat_prompt_ids(tokenizer: Any, turns: list[dict], system: str | None = None, examples: Sequence[dict] = (),
                    add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
    """The request's `turns` (after the Modelfile's `system` and `examples`, unless the turns hold their own
    system message) as token ids, by the one chat-prompt builder (`engine/prompt.py`), with `tools` (plain
    dicts, `serve/tools.py`) and `template_kwargs` for the template; what it refuses becomes a 400 naming
    the part of the request at fault."""
    try:
        return build_chat_prompt(tokenizer, turns, system=system, examples=examples,
                                 add_generation_prompt=add_generation_prompt, tools=tools,
                                 template_kwargs=template_kwargs)
    except ChatPromptError as e:
        raise invalid(str(e), param=e.param, **({"code": e.code} if e.code else {})) from None


def completion_prompts(tokenizer: Any, prompt: Any, vocab_size: int) -> list[list[int]]:
    """`prompt` as OpenAI allows it (a string, strings, token ids, lists of token ids) -> token id lists.
    Text gets the tokenizer's BOS, as the engine's own encoding does."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        else:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise invalid(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
            ids = list(p)
        if not ids:
            if tokenizer.bos_id is None:
                raise invalid("the prompt is empty and this model has no BOS token to start from", param="prompt")
            ids = [tokenizer.bos_id]
        out.append(ids)
    return out


def request_grammar(req: ChatCompletionRequest | CompletionRequest, tokenizer: Any = None,
                    built: Grammar | None = None) -> Grammar | None:
    """The structured output a request asks for (`response_format`, or llama.cpp's `grammar` /
    `json_schema`), or None for free text. One of them at most; a grammar that cannot be used is a 400
    naming the field and what is wrong (`invalid 'response_format.json_schema.schema': unsupported keyword
    'not'`). llama.cpp's spellings (`json_schema`, `response_format.schema`) close objects that do not say
        otherwise, as llama.cpp's converter does; OpenAI's `json_schema` does so only with `strict: true`. With
    `tokenizer`, the grammar is also compiled against its vocabulary (a special token it lacks is refused
    here, not in the middle of generation). `built`: the grammar an earlier call made for this request
    (`check_chat_request`), reused rather than built and validated again. Slow for big grammars (a quarter
    second for an 80 KB GBNF): the server calls it on its worker pool, never on the event loop."""
    asked: list[tuple[str, Any]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type != "text":
        if rf.type == "json_schema":
            if rf.json_schema is None:
                raise invalid("response_format of type 'json_schema' needs a 'json_schema' object",
                              param="response_format.json_schema", code="missing_required_parameter")
            js = rf.json_schema
            if js.schema_ is None:
                asked.append(("response_format", Grammar.json_object))
            else:
                asked.append(("response_format.json_schema.schema",
                              lambda: Grammar.json_schema(js.schema_, strict=bool(js.strict))))
        elif rf.schema_ is not None:  # llama.cpp: {"type": "json_object", "schema": {...}}
            asked.append(("response_format.schema", lambda: Grammar.json_schema(rf.schema_, strict=True)))
        else:
            asked.append(("response_format", Grammar.json_object))
    if req.grammar is not None:
        asked.append(("grammar", lambda: Grammar.from_text(req.grammar)))
    if req.json_schema is not None:
        asked.append(("json_schema", lambda: Grammar.json_schema(req.json_schema, strict=True)))
    if not asked:
        return None
    if len(asked) > 1:
        raise invalid(f"{asked[0][0].split('.')[0]} and {asked[1][0].split('.')[0]} both constrain the output; "
                      f"send one", param=asked[1][0].split(".")[0])
    param, build = asked[0]
    try:
        grammar = built if built is not None else build()
        if tokenizer is not None:
            grammar.check(tokenizer)
    except GrammarError as e:
        raise invalid(f"invalid '{param}': {e}", param=param) from None
    return grammar


def sampling_params(req: ChatCompletionRequest | CompletionRequest, defaults: dict, *, prompt_len: int,
                    context: int, vocab_size: int, max_tokens: int | None, tokenizer: Any = None,
                    grammar: Grammar | None = None) -> SamplingParams:
    """A validated `SamplingParams` for one request (one prompt), or a 400 naming the field.

    The token budget: the request's max tokens, else the Modelfile's `num_predict`, else all the room the
    context leaves. An explicit budget that does not fit is refused (`context_length_exceeded`), as OpenAI
    does, rather than silently shortened. Structured output: see `request_grammar` (`tokenizer` lets it
    compile the grammar against the model's vocabulary before anything is queued; `grammar` is the one
    `check_chat_request` / `check_completion_request` already built for this request)."""
    given: dict[str, Any] = dict(defaults)
    if max_tokens is not None:
        if prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                           f"completion). Please reduce the length of the messages or completion.",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        given["max_new_tokens"] = max_tokens
    if prompt_len >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt is "
                       f"{prompt_len} tokens, which leaves no room for a completion.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    given["max_new_tokens"] = min(given.get("max_new_tokens", context), context - prompt_len)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed", "repeat_last_n"):
        if getattr(req, name) is not None:
            given[name] = getattr(req, name)
    if req.top_k is not None:
        given["top_k"] = max(0, req.top_k)  # vLLM spells "off" -1, we spell it 0
    rp = req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty
    if rp is not None:
        given["repetition_penalty"] = rp
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if any(s == "" for s in stops):
            raise invalid("stop strings must not be empty", param="stop")
        given["stop"] = [*given.get("stop", []), *stops]
    if req.stop_token_ids:
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise invalid(f"stop token id {bad[0]} is outside the vocabulary", param="stop_token_ids")
        given["stop_token_ids"] = list(req.stop_token_ids)
    given["ignore_eos"] = req.ignore_eos
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab_size:
                raise invalid(f"logit_bias keys must be token ids in 0..{vocab_size - 1}, got {key!r}", param="logit_bias")
            if not -100 <= value <= 100:
                raise invalid(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
            bias[int(key)] = float(value)
        given["logit_bias"] = bias
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        given["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    else:
        given["logprobs"] = req.logprobs
    grammar = request_grammar(req, tokenizer, grammar)
    if grammar is not None:
        given["grammar"] = grammar
    if req.use_beam_search:
        if grammar is not None:
            raise invalid("beam search cannot follow a grammar (structured output); leave use_beam_search out",
                          param="use_beam_search")
        if req.stream:
            raise invalid("beam search returns whole hypotheses and cannot stream", param="stream")
        if req.temperature not in (None, 0):
            raise invalid("beam search is deterministic: use temperature 0 (or leave it out)", param="temperature")
        beams = req.best_of or req.n
        if beams < req.n:
            raise invalid(f"best_of ({beams}) must be >= n ({req.n})", param="best_of")
        given.update(temperature=0.0, num_beams=max(2, beams), length_penalty=req.length_penalty)
    elif req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of other than n needs use_beam_search: true", param="best_of")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    try:
        return SamplingParams(**{k: v for k, v in given.items() if k in fields}).validate()
    except ValueError as e:
        raise invalid(str(e)) from None


def check_chat_request(req: ChatCompletionRequest) -> Grammar | None:
    """Refuse what lmforge cannot honour instead of ignoring it; the request's grammar (validated, not yet
    compiled against a vocabulary), for `sampling_params` to reuse. Run it on the worker pool: a big grammar
    takes a while to validate."""
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    return request_grammar(req)  # a bad schema or grammar is a 400 before any model is loaded


def check_completion_request(req: CompletionRequest) -> Grammar | None:
    """As `check_chat_request`, for /v1/completions."""
    if req.suffix:
        raise invalid("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    if req.max_tokens == 0 and not req.echo:
        raise invalid("max_tokens must be >= 1 (0 is only meaningful with echo: score the prompt)", param="max_tokens")
    return request_grammar(req)


# ----------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------
def token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    return {"token": tokenizer.token_text(token_id), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Sequence[tuple[int, float]]]) -> dict:
    return {"content": [
        {**token_entry(tokenizer, t, lp), "top_logprobs": [token_entry(tokenizer, a, alp) for a, alp in top]}
        for t, lp, top in zip(ids, logprobs, tops)], "refusal": None}


def completion_logprobs(tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[Sequence[tuple[int, float]] | None], offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists, top alternatives as {token: logprob} dicts.

    `text_offset` is where each token starts in the text, in characters (after `offset` ones): the
    characters completed before it, so the bytes of one character split over two tokens (half of an "é")
    both start at that character, and the offsets agree with the streamed text."""
    tokens, offsets = [], []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pos = offset
    for t in ids:
        tokens.append(tokenizer.token_text(t))
        offsets.append(pos)
        pos += len(decoder.decode(tokenizer.token_bytes(t)))
    return {"tokens": tokens, "token_logprobs": list(logprobs),
            "top_logprobs": [None if top is None else {tokenizer.token_text(a): alp for a, alp in top} for top in tops],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; `cached_tokens`, when known, is how many prompt tokens the prompt cache served
    (`prompt_tokens_details.cached_tokens`, as OpenAI and vLLM report it)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage_}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None,
                sources: list[dict] | None = None, reasoning: str | None = None) -> dict:
    """One choice of a chat completion; `sources` (a grounded request's passages, `Source.to_dict()`) is
    the lmforge extension field `message.sources`, present only on grounded requests. `reasoning` (a
    thinking model's thought, "" when it wrote none) is `message.reasoning_content`, as vLLM and
    DeepSeek's API name it, present only when the output was split (null for an empty thought)."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning or None
    if sources is not None:
        message["sources"] = sources
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": FINGERPRINT, "choices": choices}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lmforge"}
