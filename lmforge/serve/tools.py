"""Tool (function) calling: which format a model calls tools in, parsing its calls out of the text it
generates (whole or streamed), and the grammar that forces a call when the request demands one.

Why it looks like this
----------------------
* **The model's own chat template renders the tools.** Each family was trained on one way of being shown
  tools and of calling them; the template that ships with the checkpoint knows that way, so the request's
  `tools` reach it as its `tools` variable (`engine/prompt.py`), exactly as transformers'
  `apply_chat_template(tools=...)` does. Nothing here writes a tool prompt of its own: a template that
  does not speak of tools cannot take them, and a request with tools is then a 400 saying so (no generic
  system-prompt injection: a model never trained on it would call tools in no parseable way).
* **The call format is read from the template's text, never from the model's name**, since fine-tunes and
  merges keep the template and not the name (`tool_format`):
  - `hermes` (Qwen2.5, Hermes, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    several in a row for parallel calls, text before them kept as content;
  - `llama3` (Llama 3.1/3.2/3.3 JSON tool calling): `{"name": ..., "parameters": {...}}` as the whole
    answer, optionally after `<|python_tag|>`; several joined by `;`;
  - `mistral` (Mistral v3 style): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the newer
    `[TOOL_CALLS]name[ARGS]{...}` (which one the template writes: `mistral_variant`).
* **One parser for both paths.** `parse_tool_calls` runs the same `ToolCallStream` over the whole text that
  a streamed answer goes through piece by piece, so a streamed answer reassembled is the non-streamed one,
  however the text was chunked. The stream releases content as it comes and holds back only what might
  still be the start of a call (a partial `<tool_call>`, trailing whitespace before one, or for `llama3` an
  answer that so far is JSON).
* **Text that does not parse as a call stays content.** A half-written or malformed call is returned as
  the text the model wrote, never dropped and never an error: the client sees what happened.
* **Forced calls are constrained, not hoped for.** `tool_choice: "required"` or a named function
  constrains decoding (`engine/constrain.py`, llguidance) to the family's call syntax with each function's
  `parameters` schema inline (`serve/tool_grammar.py`), so even a small model produces a call that parses.
* **Ids.** Calls get OpenAI-style ids `call_<24 hex>`, except in the `mistral` format, whose templates
  refuse any tool-call id that is not 9 letters or digits; `template_history` maps a client's ids to such
  ids (the same id always to the same one) before a Mistral template sees them.

`tool_choice: "none"` renders no tools and parses nothing (as vLLM does by default): the model answers in
text. Ollama's `/api/chat` uses the same pieces (`parse_tools`, `tool_format`, `parse_tool_calls`,
`ToolCallStream`, `ToolCall.ollama`), with `arguments` as an object.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from lmforge.serve.protocol import invalid

__all__ = ["FORMATS", "ToolCall", "ToolCallStream", "ToolError", "ToolPlan", "new_call_id", "parse_tool_calls",
           "parse_tools", "plan_tools", "template_history", "tool_format", "tool_plan"]

FORMATS = ("hermes", "llama3", "mistral")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
_LLAMA_ENDS = ("<|eom_id|>", "<|eot_id|>")  # end-of-message tokens a template may not list as EOS
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names
_MISTRAL_ID = re.compile(r"^[A-Za-z0-9]{9}$")
MAX_TOOLS = 128  # OpenAI's limit


class ToolError(ValueError):
    """A request's tools, tool_choice or tool history that cannot be honoured; `param` names the field
    (`tools.2.function.name`), for OpenAI's error object or Ollama's one-line error."""

    def __init__(self, message: str, param: str | None = "tools", code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ToolCall:
    """One parsed call: the function's `name`, its `arguments` as an object, and the call's `id`."""

    name: str
    arguments: dict
    id: str

    def openai(self) -> dict:
        """OpenAI's shape: `arguments` is a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def ollama(self) -> dict:
        """Ollama's shape: `arguments` is an object."""
        return {"function": {"name": self.name, "arguments": self.arguments}}


def new_call_id(fmt: str | None = None) -> str:
    """A fresh call id: `call_` + 24 hex digits, or 9 letters/digits for the `mistral` format (its
    templates refuse any other)."""
    if fmt == "mistral":
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------------------------------
# Requests: the tools offered, the format, the choice
# ----------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def parse_tools(tools: Sequence[Any] | None) -> list[dict]:
    """The request's `tools` (dicts or validated protocol models) as the plain dicts a chat template expects,
    `{"type": "function", "function": {"name", "description"?, "parameters"?}}`, checked: every tool a
    function with a name of letters, digits, `_`, `.` or `-` (at most 64), names unique, `parameters` a JSON
    schema object. A `ToolError` naming the field otherwise. Ollama's tools have the same shape."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools may be offered, got {len(tools)}", param="tools")
    out, seen = [], set()
    for i, raw in enumerate(tools):
        tool = _plain(raw)
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise ToolError(f"{where} must be an object", param=where)
        if tool.get("type", "function") != "function":
            raise ToolError(f"{where}.type must be 'function', got {tool.get('type')!r}", param=f"{where}.type")
        fn = _plain(tool.get("function"))
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function is missing or not an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"{where}.function.name is missing: every tool needs a name", param=f"{where}.function.name",
                            code="missing_required_parameter")
        if not _NAME.match(name):
            raise ToolError(f"{where}.function.name {name[:80]!r} must be 1-64 letters, digits, '_', '.' or '-'",
                            param=f"{where}.function.name")
        if name in seen:
            raise ToolError(f"two tools are named {name!r}; names must be unique", param=f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ToolError(f"{where}.function.parameters must be a JSON schema of type 'object'",
                            param=f"{where}.function.parameters")
        # What the template sees: the fields given, in OpenAI's order (name, description, parameters, strict).
        clean: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if fn.get(key) is not None:
                clean[key] = fn[key]
        out.append({"type": "function", "function": clean})
    return out


def tool_format(template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, from the template's own text: `hermes`,
    `llama3`, `mistral`, or None when it does not speak of tools in a format we can parse."""
    if not template or "tools" not in template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_OPEN in template or "[AVAILABLE_TOOLS]" in template:
        return "mistral"
    if PYTHON_TAG in template or ('"parameters"' in template and "<|start_header_id|>" in template):
        return "llama3"
    return None


@dataclass
class ToolPlan:
    """What a request's tools mean for one model: `fmt` (None: no tools in play), the `tools` rendered
    into the prompt (None: none), `mode` ("auto", "none" or "required"), the `forced` function name, and
    for `mistral` which of its call syntaxes the template writes (`variant`)."""

    fmt: str | None = None
    tools: list[dict] | None = None
    mode: str = "none"
    forced: str | None = None
    parallel: bool = True
    variant: str = ""  # mistral: the call syntax its template writes (`mistral_variant`), for the grammar

    @property
    def parses(self) -> bool:
        """Whether calls are parsed out of the output."""
        return self.fmt is not None and self.mode != "none"

    @property
    def constrained(self) -> bool:
        return self.parses and (self.mode == "required" or self.forced is not None)


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any, template: str | None,
               parallel: bool | None = None) -> ToolPlan:
    """The `ToolPlan` of a request: its `tools` (see `parse_tools`) and `tool_choice` ("auto" (default),
    "none", "required", or `{"type": "function", "function": {"name": ...}}`) for a model with chat
    `template`. `ToolError`s: a choice without tools, a named function not among the tools, tools for a
    template that cannot take them."""
    offered = parse_tools(tools)
    choice = _plain(tool_choice)
    if choice is not None and not offered:
        if choice == "none":
            return ToolPlan()
        raise ToolError("tool_choice needs tools: no tools were given", param="tool_choice")
    if not offered:
        return ToolPlan()
    mode, forced = "auto", None
    if choice is None or choice in ("auto", "none", "required"):
        mode = choice or "auto"
    elif isinstance(choice, dict):
        name = (_plain(choice.get("function")) or {}).get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": NAME}}", param="tool_choice")
        if name not in {t["function"]["name"] for t in offered}:
            raise ToolError(f"tool_choice names the function {name[:80]!r}, which is not among the tools",
                            param="tool_choice.function.name")
        mode, forced = "required", name
    else:
        raise ToolError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                        "\"function\": {\"name\": NAME}}", param="tool_choice")
    if mode == "none":
        return ToolPlan(mode="none")  # as vLLM: the tools are not shown, and nothing is parsed
    fmt = tool_format(template)
    if fmt is None:
        raise ToolError("this model's chat template cannot take tools (it shows the model no tools in a "
                        "format lmforge can parse: Hermes <tool_call>, Llama 3 JSON or Mistral [TOOL_CALLS])",
                        param="tools", code="tools_not_supported")
    # A named function is forced by the grammar; the prompt still shows every tool, as OpenAI's models see them.
    return ToolPlan(fmt=fmt, tools=offered, mode=mode, forced=forced, parallel=parallel is not False and forced is None,
                    variant=mistral_variant(template) if fmt == "mistral" else "")


def mistral_variant(template: str) -> str:
    """Which Mistral call syntax `template` writes in its history: "list" (v3: `[TOOL_CALLS] [{...}]`),
    "list-tight" (the same without the space), "args" (`[TOOL_CALLS]name[ARGS]{...}`) or "args+id"
    (`[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`). The parser reads all of them; a forced call's grammar
    (`serve/tool_grammar.py`) writes the one the model was trained on."""
    if MISTRAL_ARGS in template:
        return "args+id" if MISTRAL_CALL_ID in template else "args"
    return "list-tight" if MISTRAL_OPEN + "[" in template else "list"


def template_history(template: str | None, turns: list[dict]) -> list[dict]:
    """`turns` made fit for the model's template: assistant tool calls and tool results are refused (a
    `ToolError` naming the message) when the template cannot show them, and for the `mistral` format
    tool-call ids that are not 9 letters/digits are replaced by ones that are (the same id always by the
    same replacement, so a call and its result still match)."""
    fmt = tool_format(template)
    for i, m in enumerate(turns):
        if (m.get("tool_calls") or m.get("role") == "tool") and fmt is None:
            what = "tool calls" if m.get("tool_calls") else "tool results (role 'tool')"
            raise ToolError(f"message {i} holds {what}, which this model's chat template cannot show",
                            param=f"messages.{i}", code="tools_not_supported")
    if fmt != "mistral":
        return turns
    out = []
    for m in turns:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": _mistral_id(c.get("id"))} for c in m["tool_calls"]]
        if m.get("role") == "tool" and m.get("tool_call_id") is not None:
            m["tool_call_id"] = _mistral_id(m["tool_call_id"])
        out.append(m)
    return out


def tool_plan(tools: Sequence[Any] | None, tool_choice: Any, template: str | None, turns: list[dict],
              parallel: bool | None = None) -> tuple[ToolPlan, list[dict]]:
    """What both APIs' chat handlers need: the request's `plan_tools` and its `turns` through
    `template_history`, with a `ToolError` turned into the API's 400 naming the field (`APIError`; Ollama's
    routes answer it in their own one-line shape). Ollama has no tool_choice: it passes None ("auto")."""
    try:
        return plan_tools(tools, tool_choice, template, parallel), template_history(template, turns)
    except ToolError as e:
        raise invalid(str(e), param=e.param, code=e.code) from None


def _mistral_id(given: Any) -> str:
    if isinstance(given, str) and _MISTRAL_ID.match(given):
        return given
    return hashlib.sha256(str(given).encode()).hexdigest()[:9]


# ----------------------------------------------------------------------------------------------------
# Parsing the output
# ----------------------------------------------------------------------------------------------------
_decoder = json.JSONDecoder()


def _call_from(obj: Any, fmt: str) -> ToolCall | None:
    """A ToolCall from one decoded JSON object, or None if it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args, new_call_id(fmt))


def _json_objects(text: str, seps: str) -> list[Any] | None:
    """Every JSON value in `text`, one after another with whitespace or `seps` characters between; None if
    anything else is there."""
    out, i, n = [], 0, len(text)
    while True:
        while i < n and (text[i].isspace() or text[i] in seps):
            i += 1
        if i >= n:
            return out
        try:
            obj, i = _decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(obj)


def _parse_block(fmt: str, body: str) -> list[ToolCall] | None:
    """The calls in the text after an opener (for `hermes` between `<tool_call>` and `</tool_call>`), or
    None if that text is not calls in the format."""
    body = body.strip()
    if fmt == "llama3":
        for end in _LLAMA_ENDS:
            body = body.removesuffix(end).rstrip()
        objs = _json_objects(body, ";")
    elif fmt == "mistral":
        body = body.removesuffix("</s>").rstrip()
        if MISTRAL_ARGS in body and not body.startswith(("[", "{")):
            return _parse_mistral_args(body)
        objs = _json_objects(body, ",")
        if objs is not None and len(objs) == 1 and isinstance(objs[0], list):
            objs = objs[0]
    else:
        objs = _json_objects(body, "")
    if not objs:
        return None
    calls = [_call_from(o, fmt) for o in objs]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _parse_mistral_args(body: str) -> list[ToolCall] | None:
    # name[ARGS]{...}, possibly several, each after its own [TOOL_CALLS]
    calls = []
    for part in body.split(MISTRAL_OPEN):
        part = part.strip()
        if not part:
            continue
        name, sep, args = part.partition(MISTRAL_ARGS)
        name = name.split(MISTRAL_CALL_ID)[0].strip()
        objs = _json_objects(args, "") if sep else None
        if not objs or len(objs) != 1:
            return None
        call = _call_from({"name": name, "arguments": objs[0]}, "mistral")
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _partial_suffix(text: str, opener: str) -> int:
    """Where the longest suffix of `text` that is a proper prefix of `opener` starts (len(text): none)."""
    for k in range(min(len(opener) - 1, len(text)), 0, -1):
        if opener.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class ToolCallStream:
    """Split a model's output, as it streams, into content and tool calls in format `fmt`.

    `push(text)` and, at the end, `finish()` return a list of events in order: `str` (content to show) or
    `ToolCall` (a whole call, once its text is complete). Content is released at once except what could
    still begin a call: a partial opener and the whitespace before it, or, for `llama3`, an answer that so
    far is nothing but JSON. Whatever was chunked how, the events' content joined and the calls are the
    same (`parse_tool_calls` is this over the whole text). `calls` counts the calls returned so far.
    """

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.pending = ""  # text not yet released
        self.in_call = False  # after an opener, before its call is complete
        self.opener = ""  # the text that began the current call (the opener and the whitespace before it)
        self.shown = False  # any non-whitespace content released yet
        self.calls = 0
        self._after_call = False  # the last thing was a call: drop the whitespace that follows it

    def _openers(self) -> tuple[str, ...]:
        return {"hermes": (HERMES_OPEN,), "llama3": (PYTHON_TAG,), "mistral": (MISTRAL_OPEN,)}[self.fmt]

    def push(self, text: str) -> list[str | ToolCall]:
        self.pending += text
        out: list[str | ToolCall] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list) -> bool:
        """Advance once; True when called again might do more."""
        if self.in_call:
            if self.fmt != "hermes":
                return False  # llama3 and mistral calls run to the end of the output
            end = self.pending.find(HERMES_CLOSE)
            if end < 0:
                return False
            body, self.pending = self.pending[:end], self.pending[end + len(HERMES_CLOSE):]
            self.in_call = False
            calls = _parse_block(self.fmt, body)
            if calls is None:  # not a call after all: it is content, as written
                self._content(out, self.opener + body + HERMES_CLOSE)
            else:
                self._emit_calls(out, calls)
            return True
        text = self.pending
        if self._after_call:
            stripped = text.lstrip()
            if not stripped:
                self.pending = ""
                return False
            text = self.pending = stripped
            self._after_call = False
        if self.fmt == "llama3" and not self.shown and self.calls == 0:
            head = text.lstrip()
            if head.startswith("{"):  # the answer so far is JSON: a call, or content known at the end
                self.in_call, self.opener, self.pending = True, text[:len(text) - len(head)], head
                return False
            if not head or PYTHON_TAG.startswith(head):
                return False
        hits = [(text.find(o), o) for o in self._openers()]
        hits = [(i, o) for i, o in hits if i >= 0]
        if hits:
            i, opener = min(hits)
            before = text[:i].rstrip()
            self._content(out, before)
            # the whitespace before the opener goes with the call (dropped, or given back if it is none)
            self.in_call, self.opener, self.pending = True, text[len(before):i] + opener, text[i + len(opener):]
            return True
        hold = min(_partial_suffix(text, o) for o in self._openers())
        while hold > 0 and text[hold - 1].isspace():
            hold -= 1
        self._content(out, text[:hold])
        self.pending = text[hold:]
        return False

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(text)
            self.shown = self.shown or not text.isspace()

    def _emit_calls(self, out: list, calls: list[ToolCall]) -> None:
        out.extend(calls)
        self.calls += len(calls)
        self._after_call = True

    def finish(self) -> list[str | ToolCall]:
        """The events the end of the output decides: a call still open is parsed (or given back as
        content), and held text is released."""
        out: list[str | ToolCall] = []
        if self.in_call:
            self.in_call = False
            calls = _parse_block(self.fmt, self.pending)
            if calls is None:
                self._content(out, self.opener + self.pending)
            else:
                self._emit_calls(out, calls)
        elif not (self._after_call and self.pending.isspace()):
            if not (self.calls and self.pending.isspace()):
                self._content(out, self.pending)
        self.pending = ""
        return out


def parse_tool_calls(fmt: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output in format `fmt`: the text outside the calls (None when there
    are calls and no other text, as OpenAI answers) and each call, arguments as an object. Exactly what a
    `ToolCallStream` returns for the same text streamed."""
    stream = ToolCallStream(fmt)
    events = stream.push(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    if calls and not content.strip():
        return None, calls
    return content, calls
