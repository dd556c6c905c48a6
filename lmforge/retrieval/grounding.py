"""Grounded prompts: numbered passages before the question, fitted to the model's context.

THE one place a question plus retrieved passages becomes a conversation: `lmforge run --docs`, the server's
`documents` extension, and the quickstart's open-book training and evaluation data all call `ground`, so a
model fine-tuned here sees at inference exactly the layout it was trained on.

The layout (documented in the README, "Ground it"):

    system:     INSTRUCTIONS                       <- followed by the conversation's own system prompt, if any
                                                   (blank line)
                [1] heading of the best passage    <- `Source.label`: the heading, else the file name
                text of the best passage
                                                   (blank line)
                [2] ...
    user:       the question
    assistant:  an answer that cites its sources, like "... [1]."

The passages go in the **system turn** when the model's template renders one, else at the top of the
**latest user turn** (Gemma's templates refuse a system role; some others silently drop it): `placement`
decides once per tokenizer by rendering a marker. Earlier turns keep their text but not their passages: only
the latest question's sources are in the prompt, so the citation numbers always refer to the sources shown
with the latest answer.

Fitting: passages are untrusted text of any length and the context is fixed. `ground` keeps the
best-ranked passages that fit in `context - reserve` tokens, **dropping the lowest-ranked first** (and says
how many it dropped); when even the best one alone does not fit, its text is cut to fit (and marked cut).
Older turns are dropped before any passage, as `lmforge run` drops them without sources.

Passages are untrusted text that goes through the chat template, whose output is encoded with control
tokens recognised: a document about chat templates that says `<|im_end|>` would end the turn early and
forge the conversation. The one chat-prompt builder rightly refuses such text from the user; in a passage
(text or heading) `ground` breaks it instead with a zero-width space after its first character
(`inert`): a reader sees the same characters, the tokenizer ordinary ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

__all__ = ["DEFAULT_K", "INSTRUCTIONS", "NOT_IN_SOURCES", "Source", "Grounded", "ground", "inert", "placement", "cited",
           "strip_citations", "sources_from_hits"]

#: What the model is told. Short on purpose: the quickstart's 6.5M-parameter model reads it every turn.
INSTRUCTIONS = ("Answer from the numbered sources below and cite them like [1]. "
                "If they do not contain the answer, say it is not in the sources.")
#: Passages retrieved per question when the caller does not say (`lmforge run --docs`, the API's `documents`).
DEFAULT_K = 4
#: The answer the quickstart teaches when the right passage was not retrieved.
NOT_IN_SOURCES = "That is not in the sources."

_ZWSP = "\u200b"
_CITATION = re.compile(r"\[(\d{1,3})\]")
_MARKER = "\x1flmforge-system-marker\x1f"


@dataclass(frozen=True)
class Source:
    """One numbered passage of a grounded prompt, as the API returns it (`to_dict`) and `/sources` prints it."""

    n: int  # the citation number, [n]
    path: str
    heading: str
    start_line: int
    end_line: int
    text: str  # what the model was shown (possibly cut: see `cut`)
    score: float = 0.0
    cut: bool = False  # the text was shortened to fit the context

    @property
    def label(self) -> str:
        return self.heading or self.path.rsplit("/", 1)[-1]

    def block(self) -> str:
        return f"[{self.n}] {self.label}\n{self.text}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.n, "path": self.path, "heading": self.heading, "start_line": self.start_line,
                "end_line": self.end_line, "score": self.score, "text": self.text, "truncated": self.cut}


@dataclass
class Grounded:
    """A conversation with its passages: `messages` to render through the chat template, the `sources`
    kept (numbered 1..n in rank order), and how many retrieved passages were `dropped` to fit."""

    messages: list[dict]
    sources: list[Source] = field(default_factory=list)
    dropped: int = 0
    dropped_turns: int = 0

    def notice(self) -> str | None:
        """A line for the user when passages or turns had to go, else None."""
        parts = []
        if self.dropped:
            parts.append(f"dropped the {self.dropped} lowest-ranked passage{'s' * (self.dropped > 1)}")
        if any(s.cut for s in self.sources):
            parts.append("cut the best passage short")
        if self.dropped_turns:
            parts.append(f"dropped the {self.dropped_turns} oldest messages")
        return f"({'; '.join(parts)} to fit the context)" if parts else None


def sources_from_hits(hits: Sequence[Any]) -> list[Source]:
    """Number index hits (`lmforge.retrieval.index.Hit`, best first) as sources [1], [2], ..."""
    return [Source(i + 1, h.path, h.heading, h.start_line, h.end_line, h.text, float(h.score))
            for i, h in enumerate(hits)]


_PLACEMENTS: dict[tuple[str, str], str] = {}


def _placement(tokenizer: Any) -> str:
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": _MARKER},
                                              {"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that raises on a system role: Gemma's "System role not supported"
        return "user"
    return "system" if _MARKER in text else "user"


def placement(tokenizer: Any) -> str:
    """"system" when the tokenizer's chat template renders a system turn, else "user". No tokenizer (data
    written for any model, as the quickstart's): "system", the common case."""
    if tokenizer is None:
        return "system"
    if tokenizer.chat_template is None:
        return "user"
    key = (tokenizer.chat_template, tokenizer.fingerprint())
    if key not in _PLACEMENTS:
        _PLACEMENTS[key] = _placement(tokenizer)
    return _PLACEMENTS[key]


def _break_control_text(tokenizer: Any, text: str) -> str:
    for _ in range(64):  # each pass breaks every occurrence of one control token; a model has a few
        hit = tokenizer.control_token_in(text)
        if hit is None:
            break
        text = text.replace(hit, hit[:1] + _ZWSP + hit[1:])
    return text


def inert(tokenizer: Any, source: Source) -> Source:
    """`source` with any control-token text in its text, heading or path broken (see the module docstring)."""
    if tokenizer is None:
        return source
    fields = {k: _break_control_text(tokenizer, getattr(source, k)) for k in ("text", "heading", "path")}
    return source if all(fields[k] == getattr(source, k) for k in fields) else replace(source, **fields)


def _messages(turns: list[dict], sources: list[Source], system: str | None, where: str) -> list[dict]:
    own = [m for m in turns if m.get("role") == "system"]
    rest = [dict(m) for m in turns if m.get("role") != "system"]
    system_text = "\n\n".join(t for t in [system] + [m.get("content") or "" for m in own] if t)
    head = INSTRUCTIONS + ("\n" + system_text if system_text else "")
    body = "\n\n".join([head] + [s.block() for s in sources])
    if where == "system":
        return [{"role": "system", "content": body}] + rest
    last = max(i for i, m in enumerate(rest) if m.get("role") == "user")
    rest[last] = {**rest[last], "content": body + "\n\nQuestion: " + str(rest[last].get("content") or "")}
    return rest


def ground(tokenizer: Any, turns: Sequence[dict], sources: Sequence[Source], *, context: int | None = None,
           reserve: int = 0, system: str | None = None) -> Grounded:
    """The conversation `turns` (ending with the user's question) with `sources` (best first) placed as the
    model's template allows, fitted in `context - reserve` tokens when `context` is given (see the module
    docstring). `system` is the model's own system prompt (a Modelfile's SYSTEM); a system message in
    `turns` replaces it, as `conversation` does without sources."""
    from lmforge.engine.prompt import chat_prompt_ids

    turns = [dict(m) for m in turns]
    if not any(m.get("role") == "user" for m in turns):
        raise ValueError("a grounded prompt needs a user message to answer")
    if any(m.get("role") == "system" for m in turns):
        system = None
    where = placement(tokenizer)
    sources = [inert(tokenizer, replace(s, n=i + 1)) for i, s in enumerate(sources)]
    if context is None:
        return Grounded(_messages(turns, sources, system, where), sources)

    budget = context - reserve

    def size(msgs: list[dict]) -> int:
        return len(chat_prompt_ids(tokenizer, msgs))

    dropped_turns = 0
    # Older turns go first (never the latest question), measured with no passage at all.
    while size(_messages(turns, [], system, where)) > budget and _droppable(turns):
        cut = 2 if turns[-1].get("role") == "user" and len([m for m in turns if m.get("role") != "system"]) > 2 else 1
        first = next(i for i, m in enumerate(turns) if m.get("role") != "system")
        del turns[first:first + cut]
        dropped_turns += cut
    kept = list(sources)
    while kept and size(_messages(turns, kept, system, where)) > budget:
        if len(kept) > 1:
            kept.pop()
            continue
        kept = [_cut_to_fit(kept[0], lambda s: size(_messages(turns, [s], system, where)) <= budget)]
        break
    kept = [s for s in kept if s.text]
    return Grounded(_messages(turns, kept, system, where), kept, len(sources) - len(kept), dropped_turns)


def _droppable(turns: list[dict]) -> bool:
    return len([m for m in turns if m.get("role") != "system"]) > 1


def _cut_to_fit(source: Source, fits) -> Source:
    """The longest prefix of the passage (cut at a word boundary, marked " ...") for which `fits` holds;
    an empty text when none does."""
    lo, hi, best = 0, len(source.text), replace(source, text="", cut=True)
    while lo <= hi:
        mid = (lo + hi) // 2
        text = source.text[:mid].rsplit(" ", 1)[0].rstrip() + " ..." if mid < len(source.text) else source.text
        cand = replace(source, text=text, cut=mid < len(source.text))
        if fits(cand):
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    return best


def cited(answer: str, n_sources: int | None = None) -> list[int]:
    """The source numbers an answer cites ([1], [2] ...), in order of first appearance, without repeats;
    numbers past `n_sources` are not citations of anything shown, and are left out."""
    out: list[int] = []
    for m in _CITATION.finditer(answer):
        k = int(m.group(1))
        if k >= 1 and (n_sources is None or k <= n_sources) and k not in out:
            out.append(k)
    return out


def strip_citations(answer: str) -> str:
    """The answer without its [n] markers (for scoring its words against a reference)."""
    return " ".join(_CITATION.sub(" ", answer).split())
