"""Ollama's wire format (its `docs/api.md`): request schemas, the error shape, `options`, durations, times.

Kept apart from `ollama.py` (the handlers) as `protocol.py` is from `routes.py`: this is what a request may
say and how each field maps onto what lmforge already has, with no I/O.

Requests are validated like the OpenAI ones (a string is not a number; an integral float is an integer, as
Go's JSON decoder in Ollama accepts it) and unknown top-level fields are ignored. Errors on /api/* are
Ollama's `{"error": "message"}` (`security.error_response` picks the shape by path, for the guard's refusals
too), with the status of the `APIError` raised.

`options` (Ollama's Modelfile parameter names, from the one table `modelfile.OLLAMA_PARAMETERS`; their
ranges are the OpenAI schema's, `_openai_bounds`): the sampling ones become the fields of an OpenAI request
(`sampling_fields`), so that ONE function, `translate.sampling_params`, turns either API's request into
`SamplingParams`. `num_predict` -1 (no limit) and -2 (fill the context) both mean "until the context is
full"; a positive count is cut to the room the context leaves (Ollama stops at the end of the context, it
does not refuse). `num_ctx` sets the context the model is loaded with (`ModelRegistry.get`). Ollama's
runtime options (threads, GPU layers, mmap, ...) are accepted and ignored, as they describe Ollama's own
runtime; sampling options lmforge does not implement (mirostat, typical_p, tfs_z, penalize_newline) and
unknown names are ignored too, as Ollama ignores unknown ones, but each is named in a log line and in the
response header `X-Lmforge-Warning` (`warnings`), so a client can see its setting had no effect.

`keep_alive`: a number of seconds or a Go duration string ("5m", "1h30m", "300ms", "-1m"); 0 unloads the
model once the request is answered, a negative value keeps it loaded for ever (`parse_keep_alive`).
"""

from __future__ import annotations

import math
import re
import time
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from lmforge.modelfile import OLLAMA_NAME, OLLAMA_PARAMETERS, RUNTIME_OPTIONS, UNSUPPORTED_OPTIONS
from lmforge.serve.protocol import APIError, ChatCompletionRequest, Integer, Number, Strict, invalid

__all__ = ["ChatRequest", "GenerateRequest", "EmbedRequest", "EmbeddingsRequest", "ShowRequest", "CopyRequest",
           "DeleteRequest", "Options", "parse_keep_alive", "sampling_fields", "warnings",
           "rfc3339", "not_found", "option_error"]

WARNING_HEADER = "X-Lmforge-Warning"


def _openai_bounds(name: str) -> Any:
    """The field `name` with the range the OpenAI schema gives it (`protocol.ChatCompletionRequest`, which spells
    Ollama's `repeat_penalty` too), so an option is refused by the same rule on either API."""
    from annotated_types import Ge, Gt, Le, Lt

    bounds = {}
    for m in ChatCompletionRequest.model_fields[name].metadata:
        for cls, key in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(m, cls):
                bounds[key] = getattr(m, key)
    if name == "top_p":  # Ollama lets 0 through: only the most likely token (see sampling_fields)
        bounds.pop("gt", None)
        bounds["ge"] = 0
    return Field(None, **bounds)


class Options(Strict):
    """`options`: the ones lmforge uses are typed and range-checked (the OpenAI schema's ranges); every other
    key is kept (extra) so that `warnings` can name it."""

    model_config = ConfigDict(strict=True, extra="allow")

    temperature: Number | None = _openai_bounds("temperature")
    top_k: Integer | None = _openai_bounds("top_k")
    top_p: Number | None = _openai_bounds("top_p")
    min_p: Number | None = _openai_bounds("min_p")
    repeat_penalty: Number | None = _openai_bounds("repeat_penalty")
    repeat_last_n: Integer | None = _openai_bounds("repeat_last_n")
    presence_penalty: Number | None = _openai_bounds("presence_penalty")
    frequency_penalty: Number | None = _openai_bounds("frequency_penalty")
    seed: Integer | None = _openai_bounds("seed")
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    num_predict: Integer | None = Field(None, ge=-2)
    num_ctx: Integer | None = Field(None, ge=1)


KeepAlive = Annotated[float | str | None, Field(union_mode="left_to_right")]


class OllamaMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _Generating(Strict):
    model: str = Field(min_length=1, max_length=500)
    stream: bool = True
    format: Literal["", "json"] | dict | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | Literal["high", "medium", "low"] | None = None


class ChatRequest(_Generating):
    messages: list[OllamaMessage] | None = None
    tools: list[dict] | None = None


class GenerateRequest(_Generating):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[Integer] | None = None
    raw: bool = False
    images: list[Any] | None = None


class EmbedRequest(Strict):
    model: str = Field(min_length=1, max_length=500)
    input: str | Annotated[list[str], Field(max_length=2048)]
    truncate: bool = True
    dimensions: Integer | None = Field(None, ge=1)
    options: Options | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(Strict):
    """The legacy `/api/embeddings`: one `prompt`, one `embedding`."""

    model: str = Field(min_length=1, max_length=500)
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive = None


class ShowRequest(Strict):
    model: str | None = Field(None, max_length=500)
    name: str | None = Field(None, max_length=500)  # the older spelling, still sent by some clients
    verbose: bool = False

    @property
    def ref(self) -> str:
        return _one_name(self.model, self.name)


class DeleteRequest(ShowRequest):
    pass


class CopyRequest(Strict):
    source: str = Field(min_length=1, max_length=500)
    destination: str = Field(min_length=1, max_length=500)


def _one_name(model: str | None, name: str | None) -> str:
    ref = model or name
    if not ref:
        raise invalid("missing required field 'model'", param="model", code="missing_required_parameter")
    return ref


# ----------------------------------------------------------------------------------------------------
# Errors and times
# ----------------------------------------------------------------------------------------------------
def not_found(model: str) -> APIError:
    shown = model if len(model) <= 80 else model[:77] + "..."
    return APIError(404, f'model "{shown}" is not served here (GET /api/tags lists the models; '
                         f'`lmforge pull` or `lmforge import` adds one to the store)', param="model",
                    code="model_not_found")


def rfc3339(t: float | None = None, ns: int | None = None) -> str:
    """A UTC time as RFC 3339 with nanoseconds (`2024-07-22T20:33:28.123648123Z`), as Ollama writes them.
    `t` in seconds, or `ns` in nanoseconds since the epoch; now when neither is given."""
    if ns is None:
        ns = time.time_ns() if t is None else int(t * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


FOREVER = "9999-12-31T23:59:59.999999999Z"  # expires_at of a model kept loaded for ever (keep_alive < 0)


# ----------------------------------------------------------------------------------------------------
# keep_alive
# ----------------------------------------------------------------------------------------------------
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: float | str | None) -> float | None:
    """Seconds to keep the model loaded after this request (math.inf: for ever), or None (not given: the
    model keeps what it had). A number is seconds; a string is a Go duration ("5m", "1h30m", "-1s", "0").
    Anything else is a 400 naming the field."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid("invalid 'keep_alive': a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise invalid(f"invalid 'keep_alive': {value} is not a duration", param="keep_alive")
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == "0":
            seconds = 0.0
        else:
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise invalid(f"invalid 'keep_alive' {value[:40]!r}: a duration such as \"5m\", \"1h30m\" or "
                              f"\"300s\", or a number of seconds", param="keep_alive")
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    return math.inf if seconds < 0 else seconds


# ----------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------
def warnings(options: Options | None) -> list[str]:
    """One line for each option that had no effect: not one lmforge implements, or not one Ollama knows."""
    out = []
    for name in sorted((options.model_extra or {}) if options is not None else {}):
        if name in RUNTIME_OPTIONS:
            continue
        if name in UNSUPPORTED_OPTIONS:
            out.append(f"option '{name}' is not supported by lmforge and was ignored")
        else:
            out.append(f"unknown option '{name[:60]}' was ignored")
    return out


def sampling_fields(options: Options | None, defaults: dict) -> tuple[dict[str, Any], dict]:
    """(fields of an OpenAI request, Modelfile defaults) carrying `options`, for `translate.sampling_params`.

    An option replaces the Modelfile's parameter of that name, as in Ollama: `stop` included (the Modelfile's
    stop strings are dropped from the defaults, so `translate.sampling_params`, which adds an OpenAI
    request's `stop` to the Modelfile's, has only the request's to add).

    `num_predict` is applied to the defaults (so it is cut to the room the context leaves rather than
    refused, as Ollama does): a positive count is the budget, -1 and -2 lift the Modelfile's own."""
    defaults = dict(defaults)
    if options is None:
        return {}, defaults
    fields: dict[str, Any] = {}
    for name in OLLAMA_PARAMETERS.keys() - {"seed", "stop", "num_predict"}:  # the OpenAI request spells these so
        value = getattr(options, name)
        if value is not None:
            fields[name] = value
    if options.top_p == 0:  # Ollama lets 0 through; it keeps only the most likely token, as 1e-9 would
        fields["top_p"] = 1e-9
    if options.seed is not None and options.seed >= 0:  # Ollama's -1: a random seed
        fields["seed"] = options.seed
    if options.stop is not None:
        fields["stop"] = [options.stop] if isinstance(options.stop, str) else list(options.stop)
        if any(s == "" for s in fields["stop"]):
            raise invalid("options.stop strings must not be empty", param="options.stop")
        defaults.pop("stop", None)  # Ollama's options replace the Modelfile's stop list (OpenAI's stop adds to it)
    n = options.num_predict
    if n is not None:
        if n == 0:
            raise invalid("options.num_predict must be a positive number of tokens, or -1 (no limit) or -2 "
                          "(fill the context)", param="options.num_predict")
        if n > 0:
            defaults["max_new_tokens"] = n
        else:
            defaults.pop("max_new_tokens", None)
    return fields, defaults


def option_error(e: APIError) -> APIError:
    """An `APIError` of `translate.sampling_params` refusing a value with no field named (SamplingParams'
    own checks, "temperature must be >= 0 ...") as the `options.<name>` it came from, in Ollama's names."""
    if e.param is not None or e.status != 400:
        return e
    word = e.message.split(" ", 1)[0]
    name = OLLAMA_NAME.get(word)
    if name is None:
        return e
    return invalid(f"invalid 'options.{name}': {e.message}", param=f"options.{name}")
