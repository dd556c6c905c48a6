"""The grammar that forces a tool call: `tool_choice: "required"` or a named function constrains decoding
(`engine/constrain.py`, llguidance) to the model's own call syntax, with each function's `parameters`
schema inline, so even a small model produces a call that `serve/tools.py` parses.

Why it looks like this
----------------------
* **The syntax is the one the template teaches** (`ToolPlan.fmt` and, for Mistral, `ToolPlan.variant`),
  never a generic one: a model forced into a syntax it was not trained on writes worse arguments. Mistral
  has two: v3's `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` and the newer
  `[TOOL_CALLS]name[ARGS]{...}` (optionally `[CALL_ID]id` before `[ARGS]`), one call per `[TOOL_CALLS]`.
* **Markers are written as the tokenizer has them** (`_token_literal`): a control token (`[TOOL_CALLS]`,
  `[ARGS]`, a Hermes `<tool_call>` that a tokenizer marks special) has no text a grammar could match, so it
  is the token itself (`<[id]>`); text otherwise.
* **JSON is written the way the templates' `tojson` writes it**: `constrain.JSON_DEFAULTS` (no free
  whitespace, `json.dumps`'s separators) and, for a `strict` tool, `constrain.closed_schema` (OpenAI's
  strict mode), the same rules as `response_format` (one copy of each).

Kept apart from `serve/tools.py` (format detection and parsing), which needs no grammar engine.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from lmforge.engine.constrain import JSON_DEFAULTS, closed_schema
from lmforge.serve.tools import HERMES_CLOSE, HERMES_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID, MISTRAL_OPEN, ToolPlan

__all__ = ["call_schema", "tool_grammar"]


def call_schema(tool: dict, key: str) -> dict:
    """The JSON schema of one call of `tool`: its name, then its arguments under `key`. A `strict` tool's
    objects allow no properties beyond those listed, as OpenAI's strict function calling."""
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, key: _arguments_schema(fn)},
            "required": ["name", key], "additionalProperties": False, "x-guidance": dict(JSON_DEFAULTS)}


def _arguments_schema(fn: dict) -> dict:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return closed_schema(copy.deepcopy(params)) if fn.get("strict") else params


def _lark_str(text: str) -> str:
    return json.dumps(text)  # a lark string literal has JSON's escapes


def _token_literal(tokenizer: Any, text: str) -> str:
    """`text` in a grammar: `<[id]>` when the tokenizer has it as one control token, else the string."""
    if tokenizer is not None:
        control = getattr(tokenizer, "control_token_texts", lambda: [])()
        if text in control:
            ids = tokenizer.encode(text, add_bos=False)
            if len(ids) == 1:
                return f"<[{ids[0]}]>"
    return _lark_str(text)


def tool_grammar(plan: ToolPlan, tokenizer: Any = None) -> str:
    """A Lark grammar (llguidance's dialect, with inline `%json` schemas) that accepts only a tool call in
    the plan's syntax: of the forced function, or of any offered one (several in a row when `parallel`);
    each call's arguments follow that function's `parameters` schema."""
    if not plan.constrained or plan.tools is None:
        raise ValueError("only a plan with a required or named tool choice has a grammar")
    tools = [t for t in plan.tools if plan.forced is None or t["function"]["name"] == plan.forced]
    many = plan.parallel and plan.fmt != "llama3"
    lit = lambda text: _token_literal(tokenizer, text)  # noqa: E731
    if plan.fmt == "mistral" and plan.variant.startswith("args"):
        # [TOOL_CALLS]name[ARGS]{...}: the name is plain text, the arguments the function's schema
        call_id = f' {lit(MISTRAL_CALL_ID)} /[A-Za-z0-9]{{9}}/' if plan.variant == "args+id" else ""
        lines = [f"args{j}: %json {json.dumps({**_arguments_schema(t['function']), 'x-guidance': dict(JSON_DEFAULTS)})}"
                 for j, t in enumerate(tools)]
        lines += [f"fn{j}: {_lark_str(t['function']['name'])}{call_id} {lit(MISTRAL_ARGS)} args{j}"
                  for j, t in enumerate(tools)]
        lines.append(f"call: {lit(MISTRAL_OPEN)} (" + " | ".join(f"fn{j}" for j in range(len(tools))) + ")")
        lines.append("start: call+" if many else "start: call")
        return "\n".join(lines) + "\n"
    key = "parameters" if plan.fmt == "llama3" else "arguments"
    lines = [f"fn{j}: %json {json.dumps(call_schema(t, key))}" for j, t in enumerate(tools)]
    lines.append("body: " + " | ".join(f"fn{j}" for j in range(len(tools))))
    if plan.fmt == "hermes":
        lines.append(f'call: {lit(HERMES_OPEN)} "\\n" body "\\n" {lit(HERMES_CLOSE)}')
        lines.append('start: call ("\\n" call)*' if many else "start: call")
    elif plan.fmt == "mistral":  # v3: [TOOL_CALLS] [{...}, {...}]
        opener = f'{lit(MISTRAL_OPEN)} {_lark_str(" [" if plan.variant == "list" else "[")}'
        lines.append(f'start: {opener} body (", " body)* "]"' if many else f'start: {opener} body "]"')
    else:
        lines.append("start: body")
    return "\n".join(lines) + "\n"
