"""`lmforge run`: a multi-turn chat in the terminal, like `ollama run`.

`ChatSession` holds the conversation and the sampling settings and knows how to render them through the
model's chat template so that they fit the context (dropping the oldest turns, never the system prompt).
`repl()` is the terminal loop around it: streamed answers, `/set`, `/show`, `/clear`, `/bye`, multi-line
input between triple quotes, and Ctrl-C to stop an answer without leaving the chat.

Grounded chat (`lmforge run MODEL --docs INDEX`): with `Documents`, each turn retrieves the top-k passages
for the user's message, and THE grounded-prompt builder (`retrieval.grounding.ground`) places them before
the question and fits them in the context. The conversation keeps the plain user text: earlier turns are
never re-sent with their old passages, so [n] always means a passage of the latest answer (`/sources`).
`grounded_prompt` is the piece the server's `documents` extension shares with this chat.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import IO, Callable

from lmforge.engine.generate import Engine
from lmforge.engine.prompt import chat_prompt_ids
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
  /show              current settings and model information
  /clear             forget the conversation (keeps the system prompt)
  /sources           the passages the last answer was given (with --docs)
  /bye               leave (Ctrl-D works too)
  \"\"\"                start or end a multi-line message
Ctrl-C stops an answer and keeps you in the chat."""




def grounded_prompt(tokenizer, turns: list[dict], sources: list[Source], *, context: int, reserve: int,
                    system: str | None = None) -> tuple[list[int], Grounded]:
    """Token ids of `turns` grounded on `sources` (best first) and fitted in `context - reserve` tokens by
    `ground`, with the `Grounded` result (the sources kept, what was dropped). `lmforge run --docs` and the
    server's `documents` extension both build their prompts here. Raises ValueError (a `ChatPromptError`)
    when the template refuses the conversation."""
    grounded = ground(tokenizer, turns, sources, context=context, reserve=reserve, system=system)
    return chat_prompt_ids(tokenizer, grounded.messages), grounded


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
        if name not in SETTABLE:
            raise ValueError(f"unknown setting {name!r}; settable: system, {', '.join(sorted(SETTABLE))}")
        attr, kind = SETTABLE[name]
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{name} needs a {kind.__name__}, got {value!r}") from None
        candidate = dataclasses.replace(self.params, **{attr: parsed}).validate()
        self.params = candidate
        return f"Set parameter '{attr}' to '{parsed}'."

    def show(self) -> str:
        cfg, p = self.engine.config, self.params
        lines = [f"model: {cfg.name}: {cfg.num_params():,} parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                 f"context {cfg.context_length} tokens, vocab {cfg.vocab_size}",
                 f"system: {self.system!r}" if self.system else "system: (none)",
                 f"documents: {self.docs.name} ({self.docs.k} passages a turn)" if self.docs else "documents: (none)",
                 f"turns: {len(self.messages)} messages",
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
            ids = chat_prompt_ids(self.engine.tokenizer, self.messages, system=self.system)
            if len(ids) + reserve <= ctx or len(self.messages) <= 1:
                break
            # drop the oldest exchange (user + assistant) so the conversation still alternates
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:cut]
            dropped += cut
        if len(ids) >= ctx:
            raise ValueError(f"the message is {len(ids)} tokens with the template; the context is {ctx} tokens")
        return ids, dropped

    def reply(self, user: str, on_text: Callable[[str], None], on_notice: Callable[[str], None] | None = None) -> str:
        """Add a user turn, stream the answer through `on_text`, record it, and return it. `on_notice` hears
        about dropped turns before the answer starts. On KeyboardInterrupt the partial answer is kept in the
        conversation and the interrupt re-raised."""
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
        answer = ""
        try:
            for ev in self.engine.generate([ids], self.params):
                if ev.text:
                    answer += ev.text
                    on_text(ev.text)
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
                                        reserve=self.reserve(), system=self.system)
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
        try:
            answer = session.reply(text, lambda t: (out.write(t), out.flush()), lambda note: print(note, file=out))
            footer = session.sources_footer(answer)
            print("\n" + (f"\n{footer}\n" if footer else ""), file=out)
        except KeyboardInterrupt:
            print("\n(stopped)\n", file=out)
        except ValueError as e:
            print(f"error: {e}", file=out)


def answer_once(session: ChatSession, text: str, out: IO[str] | None = None) -> int:
    """No terminal: one message from stdin, its answer on `out` (default: the current stdout)."""
    out = out or sys.stdout
    if not text.strip():
        raise ValueError("no input: pipe a message into `lmforge run`, or run it in a terminal")
    answer = session.reply(text.strip(), lambda t: (out.write(t), out.flush()), lambda note: print(note, file=sys.stderr))
    out.write("\n")
    footer = session.sources_footer(answer)
    if footer:
        out.write(f"\n{footer}\n")
    return 0
