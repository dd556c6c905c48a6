"""THE one place a chat becomes token ids: `lmforge run`, `generate --chat`, the server and the evaluation.

Why one place: each path used to render the template and encode the text itself, and they drifted. `run`
encoded the rendered text with `tokenizer.encode`, which prepends the tokenizer's BOS for Llama/Mistral-
style tokenizers, while their templates already write `{{ bos_token }}`: every real Llama 2/3 and Mistral
model got a doubled BOS there and nowhere else. Here the rule is written once, as transformers'
`apply_chat_template(tokenize=True)` has it: the template owns every special token of a chat, so the
rendered text is encoded with no BOS of ours (`Tokenizer.encode_chat`).

Also decided here, for every path alike:
- the conversation: the system prompt and the Modelfile's example messages go first, unless the turns bring
  their own system message (Ollama's rule);
- message text may not contain the literal text of a control token (`<|im_end|>`, ...): the rendered
  template is encoded with control tokens recognised, so such text would forge turn boundaries;
- a template that refuses the messages (roles out of order, ...) is a `ChatPromptError` naming it;
- function tools (OpenAI's `tools`, as JSON-schema dicts) reach the template as its `tools` variable, and
  extra variables (`template_kwargs`: vLLM's `chat_template_kwargs`, Ollama's `think`) as themselves, the
  way transformers' `apply_chat_template(tools=..., **kwargs)` passes them; so a model sees tools in the
  format it was trained on, whatever that is.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from lmforge.errors import UserError

__all__ = ["ChatPromptError", "RESERVED_KWARGS", "chat_prompt_ids", "conversation"]

# Template variables a request's kwargs may not set: what the render passes itself (transformers' names and
# `tokenizer.chat_template.render_chat_template`'s own arguments). Special-token variables (`bos_token`,
# `additional_special_tokens`, ...) are refused by their suffix.
RESERVED_KWARGS = frozenset({"messages", "conversation", "add_generation_prompt", "continue_final_message",
                             "tools", "documents", "special_tokens", "limits", "template", "chat_template",
                             "tokenize", "return_dict"})


class ChatPromptError(ValueError):
    """The conversation cannot be rendered for this model. `param` names the part of a request at fault
    ("messages", "messages.N.content", "model") and `code` a machine-readable reason, for the server's
    error objects; the CLI prints the message."""

    def __init__(self, message: str, *, param: str = "messages", code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def conversation(turns: Sequence[dict], *, system: str | None = None, examples: Sequence[dict] = ()) -> list[dict]:
    """The messages a model sees: `system` and the `examples` (a Modelfile's MESSAGE lines) before the
    `turns`, unless the turns already hold a system message, which then replaces both."""
    turns = [dict(m) for m in turns]
    if any(m.get("role") == "system" for m in turns):
        return turns
    return ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in examples] + turns


def chat_prompt_ids(tokenizer: Any, turns: Sequence[dict], *, system: str | None = None,
                    examples: Sequence[dict] = (), add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """The `conversation` of `turns` (with `system` and `examples`) rendered through the model's chat
    template (ending with the assistant header when `add_generation_prompt`) and encoded exactly as
    transformers' `apply_chat_template(tokenize=True)`: no BOS beyond what the template writes.

    Only `turns` are checked for control-token text, and errors count messages as the caller numbered
    them: the system prompt and the examples are the model's own (its Modelfile).

    `tools` (a non-empty list) becomes the template's `tools` variable; `template_kwargs` are further
    template variables. A key the render sets itself (`RESERVED_KWARGS`: `messages`, `tools`, the render's
    own arguments) or a special-token variable (`bos_token`, ...) is refused, not overridden: a client's
    `{"bos_token": "<|im_end|>..."}` would forge turns, and `limits` would lift the render limits. Tool
    definitions, the tool calls in the turns and the kwargs' values are checked for control-token text as
    message text is: all are written into the prompt verbatim."""
    if tokenizer.chat_template is None:
        raise ChatPromptError("this model has no chat template (tokenizer_config.json chat_template); use text "
                              "completion instead (lmforge generate, /v1/completions)", param="model",
                              code="model_not_chat")
    for i, m in enumerate(turns):
        content = m.get("content")
        hit = tokenizer.control_token_in(content) if isinstance(content, str) else None
        if hit is not None:
            raise ChatPromptError(f"message {i} contains the control token {hit!r}, which would forge the "
                                  f"conversation's structure", param=f"messages.{i}.content")
        if m.get("tool_calls"):
            hit = tokenizer.control_token_in(json.dumps(m["tool_calls"], ensure_ascii=False))
            if hit is not None:
                raise ChatPromptError(f"the tool calls of message {i} contain the control token {hit!r}, which "
                                      f"would forge the conversation's structure", param=f"messages.{i}.tool_calls")
    if tools:
        hit = tokenizer.control_token_in(json.dumps(tools, ensure_ascii=False))
        if hit is not None:
            raise ChatPromptError(f"the tools contain the control token {hit!r}, which would forge the "
                                  f"conversation's structure", param="tools")
    extra = dict(template_kwargs or {})
    reserved = sorted(k for k in extra if k in RESERVED_KWARGS or k.endswith("_token") or k.endswith("_tokens"))
    if reserved:
        raise ChatPromptError(f"chat_template_kwargs cannot set {reserved[0]!r}: the chat template's messages, "
                              f"tools, special tokens and render settings are lmforge's", param="chat_template_kwargs")
    if extra:
        hit = tokenizer.control_token_in(json.dumps(extra, ensure_ascii=False, default=str))
        if hit is not None:
            raise ChatPromptError(f"chat_template_kwargs contain the control token {hit!r}, which would forge the "
                                  f"conversation's structure", param="chat_template_kwargs")
    if tools:
        extra["tools"] = list(tools)
    try:
        return tokenizer.encode_chat(conversation(turns, system=system, examples=examples),
                                     add_generation_prompt=add_generation_prompt, **extra)
    except UserError as e:  # the template raised (e.g. roles that do not alternate)
        raise ChatPromptError(f"the model's chat template refused these messages: {e}") from None
