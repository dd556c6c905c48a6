"""`lmforge run`: a multi-turn chat in the terminal, like `ollama run`.

`ChatSession` holds the conversation and the sampling settings and knows how to render them through the
model's chat template so that they fit the context (dropping the oldest turns, never the system prompt).
`repl()` is the terminal loop around it: streamed answers, `/set`, `/show`, `/clear`, `/bye`, multi-line
input between triple quotes, and Ctrl-C to stop an answer without leaving the chat.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import IO, Callable

from lmforge.engine.generate import Engine
from lmforge.engine.prompt import chat_prompt_ids
from lmforge.engine.sampling import SamplingParams

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
  /bye               leave (Ctrl-D works too)
  \"\"\"                start or end a multi-line message
Ctrl-C stops an answer and keeps you in the chat."""


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def from_loaded(cls, loaded, *, system: str | None = None, params: SamplingParams | None = None,
                    fast: bool = True) -> "ChatSession":
        """A session over a loaded model (`loaders.auto.load`), as `lmforge run` starts one: the Modelfile's
        SYSTEM, PARAMETERs and MESSAGE examples unless `system` / `params` say otherwise."""
        mf = loaded.modelfile
        if loaded.tokenizer.chat_template is None:
            raise ValueError(f"{loaded.source} has no chat template (tokenizer_config.json chat_template); use "
                             f"`lmforge generate` for plain text completion")
        return cls(Engine(loaded.model, loaded.tokenizer, fast=fast), system=system if system is not None else mf.system,
                   params=params or SamplingParams(**mf.parameters).validate(), messages=[dict(m) for m in mf.messages])

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
                 f"turns: {len(self.messages)} messages",
                 "parameters: " + ", ".join(f"{a}={getattr(p, a)}" for a in (
                     "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "repeat_last_n", "seed", "max_new_tokens"))]
        return "\n".join(lines)

    def prompt_ids(self) -> tuple[list[int], int]:
        """Token ids of the rendered conversation (with the assistant header), and how many of the oldest
        turns had to be dropped to leave room for an answer. The latest user turn is never dropped."""
        ctx = self.engine.config.context_length
        reserve = min(self.params.max_new_tokens, max(16, ctx // 4))
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
            ids, dropped = self.prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        if dropped and on_notice:
            on_notice(f"(dropped the {dropped} oldest messages to fit the {self.engine.config.context_length}-token context)")
        answer = ""
        try:
            for ev in self.engine.generate([ids], self.params):
                if ev.text:
                    answer += ev.text
                    on_text(ev.text)
        finally:
            self.messages.append({"role": "assistant", "content": answer})
        return answer

    def clear(self) -> None:
        self.messages.clear()


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
            session.reply(text, lambda t: (out.write(t), out.flush()), lambda note: print(note, file=out))
            print("\n", file=out)
        except KeyboardInterrupt:
            print("\n(stopped)\n", file=out)
        except ValueError as e:
            print(f"error: {e}", file=out)


def answer_once(session: ChatSession, text: str, out: IO[str] | None = None) -> int:
    """No terminal: one message from stdin, its answer on `out` (default: the current stdout)."""
    out = out or sys.stdout
    if not text.strip():
        raise ValueError("no input: pipe a message into `lmforge run`, or run it in a terminal")
    session.reply(text.strip(), lambda t: (out.write(t), out.flush()), lambda note: print(note, file=sys.stderr))
    out.write("\n")
    return 0
