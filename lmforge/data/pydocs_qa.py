"""Built-in assistant data derived offline from the Python documentation: ``builtin:pydocs-qa`` and
``builtin:pydocs-prefs``.

Both are built from the same entries as the pretraining corpus ``builtin:pydocs``
(:func:`lmforge.data.pydocs.iter_doc_entries`), so the whole quickstart (pretrain -> SFT -> DPO) runs
on one machine without a download.

What the data looks like
------------------------
* **Questions and answers** (:func:`qa_conversations`). For every function, class, method and module
  whose docstring has a usable *summary*, one conversation::

      user:      What does `textwrap.dedent` do?
      assistant: Remove any common leading whitespace from every line in `text`.

  The answer is the docstring's summary: its first sentence (PEP 257 asks docstrings to start with a
  one-line summary), whitespace-normalised and at most :data:`MAX_ANSWER_CHARS` characters, always cut
  at a sentence boundary; entries whose first sentence is longer, looks like a call signature or
  otherwise reads badly are skipped. Help topics are skipped: their text starts with a section title,
  not a summary. The question phrasing (several per kind of object) and whether a short system prompt
  comes first are chosen by a hash of the object's name, so each entry always gets the same question.
* **Preference pairs** (:func:`preference_pairs`). The same prompt; *chosen* is the right summary;
  *rejected* is plausible but wrong: either the summary of another object (preferably of the same
  module and kind, so it talks about the same subject area; always a different text), or, for about a
  third of the pairs, the right summary cut off mid-sentence (the model must learn to finish). Both
  choices are deterministic.

The held-out split
------------------
The split is **by top-level module**: a module is held out when a hash of its top-level name falls in
a fixed tenth of the hash range (so ``email.mime.text`` goes wherever ``email`` goes). Held-out
questions are therefore about modules the SFT and DPO data never mention, which measures whether the
fine-tuned model learned to *answer from what it read in pretraining* rather than to recite its
fine-tuning answers. (Pretraining on ``builtin:pydocs`` does see the held-out docstrings; that is the
point: the knowledge comes from pretraining, the answering behaviour from fine-tuning.) The hash is
of the name only, so the split does not change when the standard library gains or loses other modules.

Everything is deterministic across runs and processes (sha256, never Python's salted ``hash``), and
built once per process (:func:`functools.lru_cache`; the entries themselves are cached by ``pydocs``).
The public functions return fresh objects on every call, so callers may mutate them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

from lmforge.errors import UserError

__all__ = [
    "MAX_ANSWER_CHARS",
    "SPLITS",
    "SYSTEM_PROMPT",
    "QAExample",
    "PreferencePairExample",
    "heldout_module",
    "preference_pairs",
    "qa_conversations",
    "qa_counts",
    "summarize_docstring",
    # the items behind both forms, for the open-book data (lmforge.data.pydocs_open)
    "QAItem",
    "check_split",
    "qa_items",
    "selected_items",
    "stable_hash",
    "truncate_answer",
]

#: Answers are the docstring's first sentence when it fits in this many characters.
MAX_ANSWER_CHARS = 200
#: Answers shorter than this (after normalisation) say too little to be worth learning.
MIN_ANSWER_CHARS = 12

#: Data splits accepted by :func:`qa_conversations` and :func:`preference_pairs`.
SPLITS = ("train", "heldout", "all")

#: One in :data:`_HELDOUT_MODULO` top-level modules is held out.
_HELDOUT_MODULO = 10
#: Salt of the module-split hash. Changing it reshuffles the split (and breaks comparisons with old runs).
_SPLIT_SALT = "lmforge/pydocs-qa/split/v1"
_CHOICE_SALT = "lmforge/pydocs-qa/choice/v1"

#: The system prompt some conversations start with (about one in four, chosen by hash), so a fine-tuned
#: model handles a conversation with or without one.
SYSTEM_PROMPT = "You are a concise assistant. Answer questions about the Python standard library in one sentence."
_SYSTEM_ONE_IN = 4
#: About one in this many preference pairs rejects a truncated answer instead of another object's.
_TRUNCATED_ONE_IN = 3

_KINDS = ("module", "class", "function", "method")

# Question phrasings per kind; `{name}` is the dotted name, e.g. "textwrap.dedent".
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "function": (
        "What does `{name}` do?",
        "What does the function `{name}` do?",
        "What is `{name}()` used for?",
        "Briefly, what does `{name}` do?",
        "In Python, what does `{name}` do?",
    ),
    "method": (
        "What does `{name}` do?",
        "What does the method `{name}` do?",
        "What is `{name}()` used for?",
        "Briefly, what does `{name}` do?",
    ),
    "class": (
        "What is `{name}`?",
        "What is the class `{name}` for?",
        "Briefly, what is `{name}`?",
        "In Python, what is `{name}`?",
    ),
    "module": (
        "What is the `{name}` module for?",
        "What does the Python module `{name}` do?",
        "Briefly, what is the `{name}` module?",
        "What is `{name}` in the standard library?",
    ),
}

# Words after which a period does not end a sentence ("e.g. the", "i.e. a", "etc. and").
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "dr", "no", "approx", "resp", "incl", "ca"})
# A sentence ends at . ! or ? followed by whitespace; the next sentence must start like a sentence.
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z0-9`'\"(\[*])")
# A call signature on the first line ("S.find(sub[, start]) -> int", "dedent(text)") or an example
# ("(typ, [data]) = <instance>.expunge()") is not a summary.
_SIGNATURE = re.compile(r"^[\w.\[\]]*\(.*\)\s*(->.*|:.*)?$")


@dataclass(frozen=True)
class QAExample:
    """One question/answer conversation about a documented object."""

    messages: list[dict]  # [system?] user assistant, as {"role": ..., "content": ...}
    module: str  # e.g. "textwrap"; "email.mime.text"
    name: str  # dotted name the question asks about, e.g. "textwrap.dedent"
    kind: str  # "module" | "class" | "function" | "method"

    @property
    def question(self) -> str:
        return self.messages[-2]["content"]

    @property
    def answer(self) -> str:
        """The reference answer (the docstring summary), for token-F1 and similar scores."""
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation without the answer: what a model is asked to continue."""
        return [dict(m) for m in self.messages[:-1]]


@dataclass(frozen=True)
class PreferencePairExample:
    """One preference pair: `prompt` (messages ending with the user's question), the right `chosen`
    reply and a plausible but wrong `rejected` reply (plain strings)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    rejected_kind: str  # "other" (another object's summary) | "truncated" (the right summary, cut off)
    module: str
    name: str


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------


def _first_sentence_end(text: str) -> int | None:
    """Index just past the period that ends the first sentence of `text` (whitespace-normalised), or
    None when `text` is a single sentence (or none)."""
    for m in _SENTENCE_END.finditer(text):
        word = text[: m.start()].rsplit(" ", 1)[-1].lower()
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue  # "e.g. Foo", an initial "J. Smith"
        if word.count("(") > word.count(")"):
            continue  # inside parentheses, e.g. "(see os.path. For ...)"
        return m.end()
    return None


def summarize_docstring(text: str, name: str = "") -> str | None:
    """The summary of a cleaned docstring: its first sentence, whitespace-normalised, or None when the
    docstring has no usable summary (the first sentence is too long or too short, looks like a call
    signature or code, or is not a sentence).

    >>> summarize_docstring("Remove any common leading whitespace from every line in `text`.\\n\\nThis can ...")
    'Remove any common leading whitespace from every line in `text`.'
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if not paragraphs:
        return None
    first = paragraphs[0]
    head = first.strip().split("\n", 1)[0].strip()
    if _SIGNATURE.match(head) or "<instance>" in head or (name and head.startswith(name.rsplit(".", 1)[-1] + "(")):
        # A signature line first (old-style docstrings): the summary is what follows it.
        rest = first.strip().split("\n", 1)[1] if "\n" in first.strip() else ""
        first = rest if rest.strip() else (paragraphs[1] if len(paragraphs) > 1 else "")
    elif len(paragraphs) > 1 and len(first.split()) == 1:
        first = paragraphs[1]  # a title line ("distutils.command.build") first: the summary follows it
    para = " ".join(first.split())
    if not para:
        return None
    end = _first_sentence_end(para)
    sentence = para if end is None else para[:end]
    if sentence[-1] not in ".!?":
        # A one-line paragraph without a final period ("Handler for clicking on key") is still a summary
        # when it ends like a phrase; not "Return the following:" or lines running into a list or a table.
        if end is not None or "\n" in first.strip() or not (sentence[-1].isalnum() or sentence[-1] in ")`'\""):
            return None
        sentence += "."
    if not (MIN_ANSWER_CHARS <= len(sentence) <= MAX_ANSWER_CHARS) or len(sentence.split()) < 3:
        return None
    if not (sentence[0].isalpha() or sentence[0] in "`'\"*"):
        return None  # starts with a symbol or a number: usually code, a table or a version note
    if ">>>" in sentence or "::" in sentence or sentence.count("`") % 2 or sentence.count('"') % 2:
        return None  # code, reST directives or an unbalanced quote: the sentence was cut inside markup
    return sentence


def truncate_answer(answer: str) -> str | None:
    """The answer cut off mid-sentence (a bit under half its words, without the final period), or None
    when it is too short for a cut to still read as the start of the same answer."""
    words = answer.split()
    if len(words) < 6:
        return None
    cut = " ".join(words[: max(3, (len(words) * 2) // 5)]).rstrip(".,;:!? ")
    return cut if cut and cut != answer else None


# ----------------------------------------------------------------------------------------------------
# Split and deterministic choices
# ----------------------------------------------------------------------------------------------------


def stable_hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8")).digest()[:8], "big")


def heldout_module(module: str) -> bool:
    """True when `module` (dotted) belongs to the held-out split; decided by its top-level package."""
    top = module.split(".", 1)[0]
    return stable_hash(_SPLIT_SALT, top) % _HELDOUT_MODULO == 0


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} of the pydocs QA data; use one of: {', '.join(SPLITS)}")


@dataclass(frozen=True)
class QAItem:
    module: str
    name: str
    kind: str
    question: str
    system: bool
    answer: str
    heldout: bool


@functools.lru_cache(maxsize=1)
def qa_items() -> tuple[QAItem, ...]:
    """Every usable entry as one QA item, in the corpus' deterministic order (cached)."""
    from lmforge.data.pydocs import iter_doc_entries

    items: list[QAItem] = []
    seen: set[str] = set()
    for entry in iter_doc_entries():
        if entry.kind not in _KINDS:
            continue  # help topics: their text opens with a section title, not a one-sentence summary
        name = entry.heading
        if name in seen:
            continue
        answer = summarize_docstring(entry.text, entry.qualname or entry.module)
        if answer is None:
            continue
        seen.add(name)
        h = stable_hash(_CHOICE_SALT, "question", name)
        phrasings = _QUESTIONS[entry.kind]
        question = phrasings[h % len(phrasings)].format(name=name)
        system = (h // len(phrasings)) % _SYSTEM_ONE_IN == 0
        items.append(QAItem(entry.module, name, entry.kind, question, system, answer, heldout_module(entry.module)))
    return tuple(items)


def selected_items(split: str) -> list[QAItem]:
    check_split(split)
    items = qa_items()
    if split == "all":
        return list(items)
    want = split == "heldout"
    return [it for it in items if it.heldout == want]


def _prompt(item: QAItem) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if item.system else []
    messages.append({"role": "user", "content": item.question})
    return messages


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def qa_conversations(split: str = "train") -> list[QAExample]:
    """The QA conversations of `split` ("train", "heldout" or "all"), in a deterministic order.

    The first call builds the corpus (a couple of seconds); later calls reuse it.
    """
    return [
        QAExample(_prompt(it) + [{"role": "assistant", "content": it.answer}], it.module, it.name, it.kind)
        for it in selected_items(split)
    ]


@functools.lru_cache(maxsize=len(SPLITS))
def _pairs(split: str) -> tuple[tuple[QAItem, str, str], ...]:
    """(item, rejected, rejected_kind) per item of `split`; rejected answers come from the same split, so
    no held-out text leaks into training pairs."""
    items = selected_items(split)
    by_module_kind: dict[tuple[str, str], list[QAItem]] = {}
    by_module: dict[str, list[QAItem]] = {}
    by_top_kind: dict[tuple[str, str], list[QAItem]] = {}
    by_kind: dict[str, list[QAItem]] = {}
    for it in items:
        by_module_kind.setdefault((it.module, it.kind), []).append(it)
        by_module.setdefault(it.module, []).append(it)
        by_top_kind.setdefault((it.module.split(".", 1)[0], it.kind), []).append(it)
        by_kind.setdefault(it.kind, []).append(it)

    def other_answer(it: QAItem) -> str | None:
        h = stable_hash(_CHOICE_SALT, "other", it.name)
        pools: Iterable[list[QAItem]] = (
            by_module_kind[(it.module, it.kind)],
            by_module[it.module],
            by_top_kind[(it.module.split(".", 1)[0], it.kind)],
            by_kind[it.kind],
        )
        for pool in pools:
            # Walk the pool from a hashed start so the choice is deterministic but spread out.
            n = len(pool)
            for k in range(n):
                cand = pool[(h + k) % n]
                if cand.answer != it.answer and cand.name != it.name:
                    return cand.answer
        return None

    out = []
    for it in items:
        rejected, kind = None, "other"
        if stable_hash(_CHOICE_SALT, "mode", it.name) % _TRUNCATED_ONE_IN == 0:
            rejected, kind = truncate_answer(it.answer), "truncated"
        if rejected is None:
            rejected, kind = other_answer(it), "other"
        if rejected is None or rejected == it.answer:
            continue  # a split with a single distinct answer: no pair to make
        out.append((it, rejected, kind))
    return tuple(out)


def preference_pairs(split: str = "train") -> list[PreferencePairExample]:
    """The preference pairs of `split` ("train", "heldout" or "all"): one per QA conversation, with the
    same prompt; `rejected` always differs from `chosen`."""
    check_split(split)
    return [
        PreferencePairExample(_prompt(it), it.answer, rejected, kind, it.module, it.name)
        for it, rejected, kind in _pairs(split)
    ]


def qa_counts() -> dict[str, int]:
    """Sizes of the built-in data: conversations and pairs per split, and top-level modules per split."""
    items = qa_items()
    tops = {it.module.split(".", 1)[0]: it.heldout for it in items}
    return {
        "train_conversations": sum(not it.heldout for it in items),
        "heldout_conversations": sum(it.heldout for it in items),
        "train_pairs": len(_pairs("train")),
        "heldout_pairs": len(_pairs("heldout")),
        "train_modules": sum(not h for h in tops.values()),
        "heldout_modules": sum(tops.values()),
    }
