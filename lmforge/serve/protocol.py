"""The OpenAI wire format: request schemas (pydantic) and the error shape.

Requests are validated strictly, as OpenAI does: a string is not a number, a non-integral float is not an
integer, NaN and infinities are refused, and every range is checked before any model work. Where OpenAI's
API (and vLLM) are lenient we are too: an integral float (`"max_tokens": 64.0`, as JavaScript clients
serialise numbers) is the integer it is, and `null` for an optional field means the field's default
(`"n": null` is n = 1), as if it were left out. Fields we do not know
are ignored (vLLM and llama.cpp do the same, and clients such as LangChain send extras); fields we know
but cannot honour (image parts, say) are refused with a 400 that says so, never silently
dropped.

Structured output: `response_format` (`json_object`, `json_schema` with `schema` and `strict`) on chat
completions, and llama.cpp's `grammar` (GBNF, or Lark with a `start:` rule) and `json_schema` on both chat
and text completions (see engine/constrain.py); an unsupported schema feature or a grammar syntax error is a
400 naming the field.

Tool calling (serve/tools.py): `tools`, `tool_choice`, `parallel_tool_calls`, and in the history assistant
messages with `tool_calls` and `role: tool` messages with `tool_call_id`; vLLM's `chat_template_kwargs`
passes further variables to the model's chat template (`enable_thinking: false` also stops a thinking
model's answer being split into `reasoning_content`, engine/reasoning.py). A `reasoning_content` a client
sends back on an assistant message is ignored like any unknown field: templates drop earlier thoughts.

lmforge extensions, sent by the `openai` SDK through `extra_body`: `top_k`, `min_p`,
`repetition_penalty` (alias `repeat_penalty`), `repeat_last_n`, `ignore_eos`, `stop_token_ids`, and beam
search: `use_beam_search: true` with `best_of` beams (default `n`), returning the `n` best hypotheses,
scored with `length_penalty` (vLLM's former spelling of the same feature). Beam search is deterministic,
so it needs temperature 0 (the default when it is asked for) and cannot stream.

Grounded chat (`serve/grounded.py`): `documents` on a chat completion, an index name (`"mydocs"`) or
`{"index": "mydocs", "k": 4}`, retrieves the top-k passages of that index (`lmforge index`) for the latest
user message and puts them, numbered, before it; the answer's message then carries `sources`.

Every failure becomes `APIError`, which the app turns into `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from lmforge.retrieval.grounding import DEFAULT_K

MAX_N = 16  # choices per request (each is a row of the batch)
MAX_LOGPROBS = 20
MAX_STOP = 16  # stop strings (OpenAI allows 4; lm-eval sends more); each is checked on every token
MAX_LOGIT_BIAS = 300  # OpenAI's limit
DEFAULT_DOCUMENTS_K = DEFAULT_K  # passages per request, the same default as `lmforge run --docs`
MAX_DOCUMENTS_K = 32  # more passages than this cannot fit any context worth having
MAX_GRAMMAR = 100_000  # characters of a `grammar`; llguidance bounds the compiled size and per-token work too


class APIError(Exception):
    """An error the client sees: HTTP `status` and the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _integral(value: Any) -> Any:
    """An integral float (3.0) as the int it is; anything else unchanged, so 3.5 is refused as not an
    integer and "3" as not a number. Booleans stay booleans (and are refused): JSON true is not 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
"""An integer field that also takes an integral float (64.0), as OpenAI's API, vLLM and Go's JSON decoder do."""
Number = Annotated[float, Field(allow_inf_nan=False)]
"""A float field that refuses NaN and the infinities (Python's JSON parser reads them; no API means them)."""


class Strict(BaseModel):
    """Every request schema: strict types, unknown fields ignored, and `null` for an optional field that
    is not nullable treated as the field left out (its default)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            drop = _defaulted_non_nullable(cls)
            if any(data.get(k, 0) is None for k in drop):
                data = {k: v for k, v in data.items() if not (v is None and k in drop)}
        return data


def _defaulted_non_nullable(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of `cls` that have a default and whose type does not admit None (cached per class)."""
    cached = _NON_NULLABLE.get(cls)
    if cached is None:
        cached = _NON_NULLABLE[cls] = frozenset(name for name, f in cls.model_fields.items()
                                                if not f.is_required() and not _admits_none(f.annotation))
    return cached


_NON_NULLABLE: dict[type, frozenset[str]] = {}


def _admits_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    return any(_admits_none(a) for a in get_args(annotation)
               if get_origin(annotation) in (Union, UnionType))


class ContentPart(Strict):
    type: str
    text: str | None = None


class FunctionCall(Strict):
    """A call in an assistant message of the history. OpenAI sends `arguments` as a JSON string; an object
    (Ollama's and some clients' spelling) is accepted too. `serve/tools.py` holds the rest of tool calling."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(Strict):
    id: str | None = Field(None, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=128)] | None = None  # assistant messages
    tool_call_id: str | None = Field(None, max_length=200)  # tool messages: which call this answers


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    """A function the model may call: `{"type": "function", "function": {name, description, parameters,
    strict}}`, `parameters` a JSON schema of the arguments."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


class JSONSchemaFormat(Strict):
    """OpenAI's `response_format.json_schema`. `name` is optional here (OpenAI requires it; llama.cpp's
    clients leave it out, and it changes nothing for us); no `schema` means any JSON object."""

    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = False


class ResponseFormat(Strict):
    """Structured output (engine/constrain.py): plain text, any JSON object, or JSON valid under a schema.
    `schema` beside `type: json_object` is llama.cpp's spelling of a schema, accepted as such."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class _Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: str
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: Integer = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    max_tokens: Integer | None = Field(None, ge=1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[str, Number], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: Integer | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    # lmforge / vLLM extensions
    top_k: Integer | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)
    repeat_penalty: Number | None = Field(None, gt=0, le=10)
    repeat_last_n: Integer | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    use_beam_search: bool = False
    best_of: Integer | None = Field(None, ge=1, le=MAX_N)
    length_penalty: Number = 1.0
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR)  # llama.cpp: GBNF (or Lark with a `start:` rule)
    json_schema: dict[str, Any] | None = None  # llama.cpp: output valid under this JSON schema


class Documents(Strict):
    """The object form of `documents`: which index, and how many passages to retrieve."""

    index: str = Field(min_length=1, max_length=200)
    k: Integer = Field(DEFAULT_DOCUMENTS_K, ge=1, le=MAX_DOCUMENTS_K)


def _documents_form(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "dict" if isinstance(value, (dict, Documents)) else None


# A name or an object, told apart by the JSON type, so that an error inside the object names its field
# ("documents.k") instead of "none of the forms matched".
_DocumentsField = Annotated[Annotated[str, Tag("str")] | Annotated[Documents, Tag("dict")],
                            Discriminator(_documents_form, custom_error_type="invalid_documents",
                                          custom_error_message="must be an index name or {\"index\": NAME, \"k\": N}")]


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    documents: _DocumentsField | None = None  # lmforge extension (serve/grounded.py)
    max_completion_tokens: Integer | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension: more variables for the chat template


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Integer | None = Field(16, ge=0)  # OpenAI's default; 0 only makes sense with echo (score the prompt)
    logprobs: Integer | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TokenizeRequest(Strict):
    """vLLM's form (`prompt` or `messages`, `add_special_tokens`) or llama.cpp's (`content`, `add_special`,
    which defaults to false there, and `with_pieces`)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for `prompt`
    add_special: bool = False  # llama.cpp's: add BOS to `content`
    with_pieces: bool = False  # llama.cpp's: each token as {"id", "piece"}
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class FeedbackRequest(Strict):
    """A rating or a better answer from the web UI (or any client), kept as fine-tuning data."""

    model: str = Field(max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=1000)
    response: str = Field(max_length=100_000)
    rating: Literal["up", "down"] | None = None
    better: str | None = Field(None, max_length=100_000)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body into `model`, turning every problem into one 400 that names the field."""
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        loc = _field(err["loc"])
        if err["type"] == "json_invalid":
            raise invalid(f"the request body is not valid JSON: {err['msg']}", code="invalid_json") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise invalid("the request body must be a JSON object", code="invalid_json") from None
        if err["type"] == "missing":
            raise invalid(f"missing required field '{loc}'", param=loc, code="missing_required_parameter") from None
        value = err.get("input")
        shown = repr(value)[:60] if not isinstance(value, (dict, list)) else type(value).__name__
        if len(errors) > 1 and len(err["loc"]) > len(loc.split(".")):  # a union: none of its forms matched
            raise invalid(f"invalid '{loc}': not one of the accepted forms (got {shown})", param=loc) from None
        raise invalid(f"invalid '{loc}': {err['msg'].rstrip('.')} (got {shown})", param=loc) from None


def _field(loc: tuple) -> str:
    """The dotted field path of a pydantic error location, without the tags pydantic adds for the member
    of a union it tried (`str`, `list[int]`, `function-after[...]`)."""
    return ".".join(str(x) for x in loc if isinstance(x, int) or ("[" not in x and x not in _TYPE_TAGS))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}
