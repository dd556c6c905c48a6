"""`lmforge run`: a multi-turn chat in the terminal, like `ollama run`.

`ChatSession` holds the conversation and the sampling settings and knows how to render them through the
model's chat template so that they fit the context (dropping the oldest turns, never the system prompt).
`repl()` is the terminal loop around it: streamed answers, `/set`, `/show`, `/clear`, `/bye`, multi-line
input between triple quotes, and Ctrl-C to stop an answer without leaving the chat.

Thinking models (a chat template that knows `<think>`, `engine/reasoning.py`): the thought is shown apart
from the answer (dimmed on a terminal, between "Thinking..." and "...done thinking." elsewhere, as Ollama
prints it) and never kept in the conversation; `/set think off` (`/set nothink`) and `/set think on` set the
template's `enable_thinking`.

Grounded chat (`lmforge run MODEL --docs INDEX`): with `Documents`, each turn retrieves the top-k passages
for the user's message, and THE grounded-prompt builder (`retrieval.grounding.ground`) places them before
the question and fits them in the context. The conversation keeps the plain user text: earlier turns are
never re-sent with their old passages, so [n] always means a passage of the latest answer (`/sources`).
`grounded_prompt` is the piece the server's `documents` extension shares with this chat.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Callable

from lmforge.engine.generate import Engine
from lmforge.engine.prompt import chat_prompt_ids
from lmforge.engine.reasoning import ThinkSplitter, opens_thought, supports_thinking, thinking_on
from lmforge.engine.sampling import SamplingParams
from lmforge.errors import UserError
from lmforge.retrieval.grounding import Grounded, Source, cited, ground, sources_from_hits

# /set names, with the Ollama spellings as aliases (num_predict, repeat_penalty).
SETTABLE = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "repetition_penalty": ("repetition_penalty", float),
    "repeat_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "repeat_last_n": ("repeat_last_n", int),
    "seed": ("seed", int), "max_new_tokens": ("max_new_tokens", int), "num_predict": ("max_new_tokens", int),
}

HELP = """Commands:
  /set PARAM VALUE   change a sampling setting: temperature, top_k, top_p, min_p, repetition_penalty,
                     presence_penalty, frequency_penalty, repeat_last_n, seed, max_new_tokens
  /set system TEXT   change the system prompt (clears nothing else)
  /set think on|off  a thinking model thinks before it answers (shown dimmed), or answers at once
                     (/set nothink is /set think off)
  /show              current settings and model information
  /clear             forget the conversation (keeps the system prompt)
  /sources           the passages the last answer was given (with --docs)
  /bye               leave (Ctrl-D works too)
  \"\"\"                start or end a multi-line message
Ctrl-C stops an answer and keeps you in the chat."""




def grounded_prompt(tokenizer, turns: list[dict], sources: list[Source], *, context: int, reserve: int,
                    system: str | None = None, template_kwargs: dict | None = None) -> tuple[list[int], Grounded]:
    """Token ids of `turns` grounded on `sources` (best first) and fitted in `context - reserve` tokens by
    `ground`, with the `Grounded` result (the sources kept, what was dropped); `template_kwargs` reach the
    template (`enable_thinking`). `lmforge run --docs` and the server's `documents` extension both build
    their prompts here. Raises ValueError (a `ChatPromptError`) when the template refuses the conversation."""
    grounded = ground(tokenizer, turns, sources, context=context, reserve=reserve, system=system)
    return chat_prompt_ids(tokenizer, grounded.messages, template_kwargs=template_kwargs), grounded


def answer_reserve(context: int, max_new_tokens: int) -> int:
    """Tokens kept free for the answer when a conversation is fitted in `context`: `max_new_tokens`, but
    at most a quarter of the context (at least 16), so a large answer budget does not starve the
    conversation and its passages. (An explicit budget, like the API's max_tokens, is reserved whole.)"""
    return min(max_new_tokens, max(16, context // 4))


def source_place(s: Source) -> str:
    """`path:start-end` (or `path:line`) of a passage."""
    lines = str(s.start_line) if s.start_line == s.end_line else f"{s.start_line}-{s.end_line}"
    return f"{s.path}:{lines}"


class Documents:
    """The index a grounded chat retrieves from, `k` passages per message. Opening it checks the name
    (an unknown one is a UserError listing the known indexes), so `lmforge run` fails before loading a
    model it could not ground."""

    def __init__(self, name: str, k: int) -> None:
        from lmforge.retrieval.index import open_index

        if k < 1:
            raise UserError(f"-k must be at least 1 (got {k})")
        self.name, self.k = name, k
        self.index = open_index(name)

    def search(self, query: str) -> list[Source]:
        """The top-k passages for `query`, numbered [1], [2] ... in rank order."""
        return sources_from_hits(self.index.search(query, self.k))

    def close(self) -> None:
        self.index.close()


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict] = field(default_factory=list)
    docs: Documents | None = None  # ground every turn on passages retrieved from this index
    grounded: Grounded | None = None  # the latest grounded turn: its sources are what [n] refers to
    think: bool | None = None  # `enable_thinking` for a thinking template; None: the template's default

    @classmethod
    def from_loaded(cls, loaded, *, system: str | None = None, params: SamplingParams | None = None,
                    fast: bool = True, docs: Documents | None = None) -> "ChatSession":
        """A session over a loaded model (`loaders.auto.load`), as `lmforge run` starts one: the Modelfile's
        SYSTEM, PARAMETERs and MESSAGE examples unless `system` / `params` say otherwise; grounded on `docs`
        when given."""
        mf = loaded.modelfile
        if loaded.tokenizer.chat_template is None:
            raise ValueError(f"{loaded.source} has no chat template (tokenizer_config.json chat_template); use "
                             f"`lmforge generate` for plain text completion")
        return cls(Engine(loaded.model, loaded.tokenizer, fast=fast), system=system if system is not None else mf.system,
                   params=params or SamplingParams(**mf.parameters).validate(), messages=[dict(m) for m in mf.messages],
                   docs=docs)

    def set(self, name: str, value: str) -> str:
        """Apply `/set name value`; returns a confirmation line. Raises ValueError for a bad name or value."""
        if name == "system":
            self.system = value or None
            return "Set system prompt."
        if name in ("think", "nothink"):
            return self._set_think(name, value)
        if name not in SETTABLE:
            raise ValueError(f"unknown setting {name!r}; settable: system, think, {', '.join(sorted(SETTABLE))}")
        attr, kind = SETTABLE[name]
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{name} needs a {kind.__name__}, got {value!r}") from None
        candidate = dataclasses.replace(self.params, **{attr: parsed}).validate()
        self.params = candidate
        return f"Set parameter '{attr}' to '{parsed}'."

    def _set_think(self, name: str, value: str) -> str:
        """`/set think on|off` (bare `/set think` is on, `/set nothink` off): the template's `enable_thinking`,
        only for a template that knows thinking."""
        words = {"on": True, "true": True, "off": False, "false": False, "": True}
        if name == "nothink" and value == "":
            on = False
        elif name == "think" and value.lower() in words:
            on = words[value.lower()]
        else:
            raise ValueError(f"use /set think on, /set think off or /set nothink, not {f'{name} {value}'.strip()!r}")
        if not supports_thinking(self.engine.tokenizer.chat_template):
            raise ValueError("this model's chat template has no thinking to turn on or off")
        self.think = on
        return "Set 'think' mode: the model thinks before it answers." if on else \
            "Set 'nothink' mode: the model answers without thinking."

    def template_kwargs(self) -> dict | None:
        """The template variables the session sets: `enable_thinking` once `/set think` has said."""
        return {"enable_thinking": self.think} if self.think is not None else None

    def thinking(self) -> str:
        """What /show says about thinking."""
        if not supports_thinking(self.engine.tokenizer.chat_template):
            return "thinking: (this model does not think)"
        return "thinking: " + {None: "the template's default", True: "on", False: "off"}[self.think]

    def show(self) -> str:
        cfg, p = self.engine.config, self.params
        lines = [f"model: {cfg.name}: {cfg.num_params():,} parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                 f"context {cfg.context_length} tokens, vocab {cfg.vocab_size}",
                 f"system: {self.system!r}" if self.system else "system: (none)",
                 f"documents: {self.docs.name} ({self.docs.k} passages a turn)" if self.docs else "documents: (none)",
                 f"turns: {len(self.messages)} messages", self.thinking(),
                 "parameters: " + ", ".join(f"{a}={getattr(p, a)}" for a in (
                     "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "repeat_last_n", "seed", "max_new_tokens"))]
        return "\n".join(lines)

    def reserve(self) -> int:
        return answer_reserve(self.engine.config.context_length, self.params.max_new_tokens)

    def prompt_ids(self) -> tuple[list[int], int]:
        """Token ids of the rendered conversation (with the assistant header), and how many of the oldest
        turns had to be dropped to leave room for an answer. The latest user turn is never dropped."""
        ctx = self.engine.config.context_length
        reserve = self.reserve()
        dropped = 0
        while True:
            ids = chat_prompt_ids(self.engine.tokenizer, self.messages, system=self.system,
                                  template_kwargs=self.template_kwargs())
            if len(ids) + reserve <= ctx or len(self.messages) <= 1:
                break
            # drop the oldest exchange (user + assistant) so the conversation still alternates
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:cut]
            dropped += cut
        if len(ids) >= ctx:
            raise ValueError(f"the message is {len(ids)} tokens with the template; the context is {ctx} tokens")
        return ids, dropped

    def reply(self, user: str, on_text: Callable[[str], None], on_notice: Callable[[str], None] | None = None,
              on_thought: Callable[[str], None] | None = None) -> str:
        """Add a user turn, stream the answer through `on_text`, record it, and return it. `on_notice` hears
        about dropped turns before the answer starts. A thinking model's thought streams through `on_thought`
        (dropped without one) and is neither returned nor kept: only the answer joins the conversation, as
        thinking templates drop earlier thoughts anyway. On KeyboardInterrupt the partial answer is kept in
        the conversation and the interrupt re-raised."""
        self.messages.append({"role": "user", "content": user})
        try:
            if self.docs is None:
                ids, dropped = self.prompt_ids()
                notices = [f"(dropped the {dropped} oldest messages to fit the "
                           f"{self.engine.config.context_length}-token context)"] if dropped else []
            else:
                ids, notices = self._grounded_ids(user)
        except ValueError:
            self.messages.pop()
            raise
        for note in notices:
            if on_notice:
                on_notice(note)
        tok = self.engine.tokenizer
        splitter = ThinkSplitter(opens_thought(tok, ids)) if thinking_on(tok.chat_template,
                                                                         self.template_kwargs()) else None
        answer = ""

        def show(thought: str, text: str) -> None:
            nonlocal answer
            if thought and on_thought is not None:
                on_thought(thought)
            if text:
                answer += text
                on_text(text)

        try:
            for ev in self.engine.generate([ids], self.params):
                if ev.text:
                    show(*(splitter.feed(ev.text) if splitter is not None else ("", ev.text)))
            if splitter is not None:
                show(*splitter.flush())
        finally:
            self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _grounded_ids(self, user: str) -> tuple[list[int], list[str]]:
        """The prompt of a grounded turn: retrieve for the user's message, ground the conversation (the
        stored one keeps the plain text), and keep the result for /sources and the footer. Turns `ground`
        had to drop are dropped from the conversation too, as `prompt_ids` drops them."""
        ctx = self.engine.config.context_length
        sources = self.docs.search(user)
        ids, grounded = grounded_prompt(self.engine.tokenizer, self.messages, sources, context=ctx,
                                        reserve=self.reserve(), system=self.system,
                                        template_kwargs=self.template_kwargs())
        if len(ids) >= ctx:
            raise ValueError(f"the message is {len(ids)} tokens with the template; the context is {ctx} tokens")
        if grounded.dropped_turns:
            keep = [m for m in self.messages if m.get("role") == "system"]
            rest = [m for m in self.messages if m.get("role") != "system"]
            self.messages[:] = keep + rest[grounded.dropped_turns:]
        self.grounded = grounded
        notices = [] if sources else [f"(no passage of {self.docs.name} matched this message)"]
        note = grounded.notice()
        return ids, notices + ([note] if note else [])

    def sources_footer(self, answer: str) -> str | None:
        """The compact list of the passages `answer` cited ([n], path:lines, heading), printed after it;
        None without documents or passages."""
        if self.docs is None or self.grounded is None or not self.grounded.sources:
            return None
        shown = self.grounded.sources
        refs = cited(answer, len(shown))
        if not refs:
            return f"sources: none cited (/sources shows the {len(shown)} passage{'s' * (len(shown) > 1)} it was given)"
        lines = ["sources:"]
        for n in refs:
            s = shown[n - 1]
            lines.append(f"  [{n}] {source_place(s)}" + (f"  {s.heading}" if s.heading else ""))
        return "\n".join(lines)

    def show_sources(self, max_lines: int = 3, width: int = 100) -> str:
        """What `/sources` prints: every passage of the latest grounded turn, numbered as the answer cites
        them, with its place, heading and first lines."""
        if self.docs is None:
            return "no documents: start the chat with --docs INDEX to ground answers on an index"
        if self.grounded is None:
            return "no sources yet: ask something first"
        if not self.grounded.sources:
            return f"the last message matched no passage of {self.docs.name}"
        out = []
        for s in self.grounded.sources:
            out.append(f"[{s.n}] {source_place(s)}" + (f"  {s.heading}" if s.heading else "")
                       + f"  (score {s.score:.3g}{', cut to fit' if s.cut else ''})")
            lines = [ln.strip() for ln in s.text.splitlines() if ln.strip()]
            for ln in lines[:max_lines]:
                out.append("    " + (ln if len(ln) <= width else ln[:width - 3] + "..."))
            if len(lines) > max_lines:
                out.append("    ...")
        return "\n".join(out)

    def clear(self) -> None:
        self.messages.clear()
        self.grounded = None


class ThoughtView:
    """Writes a reply to `out` with its thought apart: dimmed (ANSI dim) on a terminal, unless NO_COLOR is
    set; elsewhere between "Thinking..." and "...done thinking." lines, so a pipe reads plain text."""

    def __init__(self, out: IO[str]) -> None:
        self.out, self.open, self.written = out, False, False
        tty = bool(getattr(out, "isatty", lambda: False)())
        self.dim = tty and not os.environ.get("NO_COLOR")

    def thought(self, text: str) -> None:
        if not self.written:  # the blank lines after <think> are not shown
            text = text.lstrip("\n")
            self.written = bool(text)
        if text and not self.open:
            self.open = True
            self._write("\x1b[2m" if self.dim else "Thinking...\n")
        self._write(text)

    def text(self, text: str) -> None:
        self.close()
        self._write(text)

    def close(self) -> None:
        """End a thought that is still open (the answer starts, or the reply stopped)."""
        if self.open:
            self.open = False
            self._write("\x1b[0m\n\n" if self.dim else "\n...done thinking.\n\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, or everything between two lines of triple quotes."""
    line = read_line(">>> ")
    if not line.strip().startswith('"""'):
        return line
    parts = [line.strip()[3:]]
    while True:
        more = read_line("... ")
        if more.rstrip().endswith('"""'):
            parts.append(more.rstrip()[:-3])
            return "\n".join(p for p in parts).strip("\n")
        parts.append(more)


def repl(session: ChatSession, *, out: IO[str] | None = None, read_line: Callable[[str], str] = input) -> int:
    """The interactive loop on `out` (default: the current stdout). Returns the exit code (0)."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("Chatting with the model. Type /? for help, /bye to leave.", file=out)
    while True:
        try:
            text = _read_message(read_line)
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\nUse /bye or Ctrl-D to leave.", file=out)
            continue
        cmd = text.strip()
        if not cmd:
            continue
        if cmd.startswith("/"):
            name, _, rest = cmd.partition(" ")
            if name in ("/bye", "/exit", "/quit"):
                return 0
            if name in ("/?", "/help"):
                print(HELP, file=out)
            elif name == "/show":
                print(session.show(), file=out)
            elif name == "/sources":
                print(session.show_sources(), file=out)
            elif name == "/clear":
                session.clear()
                print("Cleared the conversation.", file=out)
            elif name == "/set":
                key, _, value = rest.strip().partition(" ")
                try:
                    print(session.set(key, value.strip()), file=out)
                except ValueError as e:
                    print(f"error: {e}", file=out)
            else:
                print(f"unknown command {name}; type /? for help", file=out)
            continue
        view = ThoughtView(out)
        try:
            answer = session.reply(text, view.text, lambda note: print(note, file=out), view.thought)
            view.close()
            footer = session.sources_footer(answer)
            print("\n" + (f"\n{footer}\n" if footer else ""), file=out)
        except KeyboardInterrupt:
            view.close()
            print("\n(stopped)\n", file=out)
        except ValueError as e:
            print(f"error: {e}", file=out)


def answer_once(session: ChatSession, text: str, out: IO[str] | None = None) -> int:
    """No terminal: one message from stdin, its answer on `out` (default: the current stdout)."""
    out = out or sys.stdout
    if not text.strip():
        raise ValueError("no input: pipe a message into `lmforge run`, or run it in a terminal")
    view = ThoughtView(out)
    answer = session.reply(text.strip(), view.text, lambda note: print(note, file=sys.stderr), view.thought)
    view.close()
    out.write("\n")
    footer = session.sources_footer(answer)
    if footer:
        out.write(f"\n{footer}\n")
    return 0
