"""A thinking model's reasoning, apart from its answer: the one home of `<think>...</think>` handling for
every API (OpenAI's `reasoning_content`, Ollama's `thinking`, which the web UI reads) and `lmforge run`.
It lives in the engine, below both the server and the terminal chat, because both use it.

What is decided here, once:
- whether a model thinks at all is read from its chat template (`supports_thinking`), never its name;
- whether a request thinks (`thinking_on`): the template supports it and the request did not turn it off
  with `enable_thinking: false` (vLLM's `chat_template_kwargs`, Ollama's `think: false`, `/set think off`);
- where the output starts (`opens_thought`): a template whose generation prompt already wrote `<think>`
  (DeepSeek-R1's, or Qwen3's with thinking forced) makes the model's first token part of the thought; any
  other template's output is the answer unless it begins with `<think>` itself;
- `ThinkSplitter` cuts streamed text into (reasoning, content), holding back a tag cut across two tokens;
- `reason_first` lets a grammar (structured output, a forced tool call) hold for the answer only, after a
  free thought, as vLLM's reasoning parsers do: held from the first token, it would never let the model
  write its `</think>`, and the whole answer would come back as reasoning.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def supports_thinking(template: str | None) -> bool:
    """Whether a chat template knows about thinking (Qwen3's `enable_thinking`, DeepSeek-R1's `<think>`,
    a `reasoning_content` field): Ollama's "thinking" capability."""
    return bool(template) and any(k in template for k in ("enable_thinking", THINK_OPEN, "reasoning_content",
                                                            "thinking"))


def thinking_on(template: str | None, template_kwargs: dict | None) -> bool:
    """Whether a request's output is split: the template supports thinking and `enable_thinking` is not
    set false (absent means the template's own default, which for a thinking template is to think)."""
    return supports_thinking(template) and (template_kwargs or {}).get("enable_thinking") is not False


def opens_thought(tokenizer: Any, prompt_ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside an open thought (its generation prompt wrote `<think>`), read from
    the last few tokens of the prompt itself, so the answer does not depend on how the template says it."""
    tail = tokenizer.decode(list(prompt_ids[-16:])) if prompt_ids else ""
    return tail.rstrip().endswith(THINK_OPEN)


class ThinkSplitter:
    """Splits streamed text into (thinking, content). With `opened` (the prompt ends inside `<think>`),
    everything up to `</think>` is thinking; otherwise only text that begins with `<think>` (after
    whitespace) is, and any other start is the answer at once. A tag cut across two tokens is held back
    until it is whole; the answer's leading whitespace (the blank line after `</think>`) is dropped."""

    def __init__(self, opened: bool = False) -> None:
        self.buf, self.thinking, self.started, self.answered = "", True, False, False
        self.prompt_opened = opened

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        if not self.thinking:
            return "", self._content(self._take())
        if not self.started:
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.buf, self.started = s[len(THINK_OPEN):], True
            elif THINK_OPEN.startswith(s):
                return "", ""  # still possibly the opening tag
            elif self.prompt_opened:
                self.started = True
            else:  # the model answered without thinking
                self.thinking = False
                return "", self._content(self._take())
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
        """What is still held back, at the end of the output: an unfinished thought stays thinking, and
        text that never got past a possible `<think>` is the answer (unless the prompt opened one)."""
        rest = self._take()
        if self.thinking and (self.started or self.prompt_opened):
            return rest, ""
        return "", self._content(rest)

    def _take(self) -> str:
        out, self.buf = self.buf, ""
        return out

    def _content(self, text: str) -> str:
        if not self.answered:
            text = text.lstrip()
            self.answered = bool(text)
        return text


def split_reasoning(text: str, opened: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole output, cut exactly as its stream would be."""
    sp = ThinkSplitter(opened)
    parts = [sp.feed(text), sp.flush()]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


# The thought a grammar lets through before the answer it constrains: any text up to the first `</think>`,
# tag included, as ONE lexeme (a thought lexeme followed by a separate "</think>" one would end the thought
# at the tag's last character, where the tag could no longer be read); then at most four blank characters
# (the usual blank line), bounded so that a model cannot pad forever instead of answering.
_THOUGHT_LARK = r"""
start: {thought} GAP? @answer
THOUGHT: /(?s:.*)<\/think>/ & ~/(?s:.*<\/think>.+)/
GAP: /[ \t\r\n]{1,4}/
"""


def reason_first(grammar: Any, opened: bool) -> Any:
    """`grammar` (an `engine.constrain.Grammar`) applied to the answer only: before it, a free thought
    closed by `</think>` (opened by `<think>`, unless the prompt already opened it; a model that skips
    thinking goes straight to the answer). Built as one llguidance grammar that names the original as a
    sub-grammar, so every kind (JSON schema, Lark, GBNF) is wrapped alike. The original was validated when
    it was built and the wrapping is fixed text, so the result is checked where every grammar is compiled:
    `Grammar.check` against the model's vocabulary (a GrammarError there, as for any grammar)."""
    from lmforge.engine.constrain import Grammar

    spec = grammar.spec
    if spec.lstrip().startswith("{"):  # a JSON schema's top-level grammar list: take its one grammar
        inner = dict(json.loads(spec)["grammars"][0])
    else:  # Lark text (GBNF arrives converted to Lark)
        inner = {"lark_grammar": spec}
    inner["name"] = "answer"
    # not opened: the model may skip thinking, or open it itself
    thought = _THOUGHT_LARK.replace("{thought}", "THOUGHT" if opened else '("<think>" THOUGHT)?')
    spec = json.dumps({"grammars": [{"lark_grammar": thought}, inner]})
    return Grammar(grammar.kind, spec)
