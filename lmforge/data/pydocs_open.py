"""Open-book assistant data: ``builtin:pydocs-qa-open`` and ``builtin:pydocs-prefs-open``.

The closed-book data (:mod:`lmforge.data.pydocs_qa`) asks a model to *know* what a standard-library object
does; a few-million-parameter model pretrained for minutes cannot (issue 5's evidence). Open-book, the
question comes with passages retrieved from the documentation, and the model's job is the one retrieval-
augmented assistants do: find the passage that answers, say its first sentence, cite it -- and say so when
no passage does. That is behaviour, which fine-tuning can teach; the knowledge stays in the index.

How one example is made (deterministic; the same questions, answers and split as the closed-book data):

1. The question is asked of a BM25 index of ``builtin:pydocs`` built with `INDEX_SETTINGS` (the same
   settings `lmforge quickstart` registers as the `pydocs` index, so chat sees what training saw). The top
   `K` passages become the sources, through THE grounded-prompt builder
   (:func:`lmforge.retrieval.grounding.ground`): numbered, best first, in the system turn.
2. The retrieval is real, so the right passage is sometimes missing or not first. When a source holds the
   object's summary, the answer is that summary followed by its number (``"... [2]"``); when none does,
   the answer is :data:`~lmforge.retrieval.grounding.NOT_IN_SOURCES`.
3. Training only: for about one question in `_ABSENT_ONE_IN` the right passage is taken out of the
   sources (the next-ranked passage takes its place), so that the model sees enough questions whose
   answer is absent to learn to say so instead of copying whatever passage came first.

Preference pairs share the prompt; *chosen* is the grounded answer and *rejected* one of (chosen by hash):
``other`` -- another source's first sentence, cited (the wrong passage); ``uncited`` -- the right summary
without its citation; ``truncated`` -- the right summary cut short, cited; ``confident`` -- when the
answer is absent, a confident answer anyway (the top source's first sentence, cited).

The held-out split is the closed-book one (by top-level module), so held-out questions ask about modules
SFT and DPO never saw; their sources come from the same index, which holds every module (as a user's
index holds documents no fine-tuning saw).

Building the index takes a few seconds on first use; it is cached under ``$LMFORGE_HOME/cache/pydocs-open``
keyed by the corpus, the settings and the retrieval code's version, and the examples per process.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.pydocs_qa import check_split, stable_hash, QAItem, selected_items, truncate_answer, summarize_docstring
from lmforge.retrieval.grounding import NOT_IN_SOURCES, Source, ground, sources_from_hits

__all__ = ["INDEX_SETTINGS", "K", "OpenExample", "OpenPair", "open_conversations", "open_preference_pairs",
           "pydocs_index", "retrieval_recall"]

#: Chunking of the index the data is retrieved from: passages short enough that `K` of them, the
#: question and the answer fit the quickstart model's 512-token context.
INDEX_SETTINGS = {"max_chars": 400, "overlap": 80}
#: Sources per question.
K = 3
_ABSENT_ONE_IN = 10
_SALT = "lmforge/pydocs-open/v1"
_VERSION = 1  # bump when the index or the example rules change: the cache key changes with it


@dataclass(frozen=True)
class OpenExample:
    """One open-book conversation: `messages` (system with the sources, user question, assistant answer),
    the `sources` shown, which of them holds the answer (`answer_source`, 1-based; None when absent),
    the closed-book reference `summary`, and whether the right passage was taken out on purpose."""

    messages: list[dict]
    sources: list[Source]
    answer_source: int | None
    summary: str
    module: str
    name: str
    removed: bool = False

    @property
    def prompt_messages(self) -> list[dict]:
        return [dict(m) for m in self.messages[:-1]]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def question(self) -> str:
        return self.messages[-2]["content"]


@dataclass(frozen=True)
class OpenPair:
    prompt: list[dict]
    chosen: str
    rejected: str
    rejected_kind: str  # other | uncited | truncated | confident
    module: str
    name: str


def _index_path() -> Path:
    from lmforge.data.pydocs import pydocs_corpus_hash
    from lmforge.paths import cache_dir

    key = hashlib.sha256(f"{pydocs_corpus_hash()}|{sorted(INDEX_SETTINGS.items())}|{_VERSION}".encode()).hexdigest()
    return cache_dir("pydocs-open") / f"{key[:16]}.sqlite"


def pydocs_index(path: Path | None = None):
    """The BM25 index of ``builtin:pydocs`` with `INDEX_SETTINGS` at `path` (default: the data's cache),
    built if missing or incomplete. `lmforge quickstart` registers the same as the `pydocs` index."""
    from lmforge.data.pydocs import named_documents
    from lmforge.retrieval.index import Index

    path = path or _index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    index = Index(path, **INDEX_SETTINGS)
    docs = list(named_documents())
    if len(index.documents()) != len(docs):
        index.update(docs, complete=True)
    return index


def _contains(text: str, summary: str) -> bool:
    return summary.rstrip(".!?") in " ".join(text.split())


def _first_sentence(source: Source) -> str | None:
    return summarize_docstring(source.text, "")


@functools.lru_cache(maxsize=1)
def _retrieved() -> dict[str, tuple[Source, ...]]:
    """name -> the top K+1 sources for its question (one spare for when the right one is taken out)."""
    from lmforge.data.pydocs_qa import qa_items

    index = pydocs_index()
    try:
        return {it.name: tuple(sources_from_hits(index.search(it.question, k=K + 1))) for it in qa_items()}
    finally:
        index.close()


def _example(it: QAItem, train: bool) -> OpenExample:
    hits = list(_retrieved()[it.name])
    removed = False
    right = next((i for i, s in enumerate(hits[:K]) if _contains(s.text, it.answer)), None)
    if train and right is not None and stable_hash(_SALT, "absent", it.name) % _ABSENT_ONE_IN == 0:
        del hits[right]
        removed = True
    sources = [Source(i + 1, s.path, s.heading, s.start_line, s.end_line, s.text, s.score) for i, s in enumerate(hits[:K])]
    n = next((s.n for s in sources if _contains(s.text, it.answer)), None)
    answer = f"{it.answer} [{n}]" if n is not None else NOT_IN_SOURCES
    turns = [{"role": "user", "content": it.question}]
    messages = ground(None, turns, sources).messages + [{"role": "assistant", "content": answer}]
    return OpenExample(messages, sources, n, it.answer, it.module, it.name, removed)


@functools.lru_cache(maxsize=3)
def _examples(split: str) -> tuple[OpenExample, ...]:
    check_split(split)
    return tuple(_example(it, train=not it.heldout) for it in selected_items(split))


def open_conversations(split: str = "train") -> list[OpenExample]:
    """The open-book conversations of `split` ("train", "heldout" or "all"), deterministic order."""
    return list(_examples(split))


def _rejected(ex: OpenExample) -> tuple[str, str] | None:
    h = stable_hash(_SALT, "reject", ex.name)
    others = [(s.n, _first_sentence(s)) for s in ex.sources if s.n != ex.answer_source]
    others = [(n, t) for n, t in others if t and t != ex.summary]
    if ex.answer_source is None:
        if others:
            n, t = others[0]
            return f"{t} [{n}]", "confident"
        return f"{ex.summary} [1]", "confident"
    choice = h % 4
    if choice <= 1 and others:
        n, t = others[h // 4 % len(others)]
        return f"{t} [{n}]", "other"
    if choice == 2:
        cut = truncate_answer(ex.summary)
        if cut:
            return f"{cut} [{ex.answer_source}]", "truncated"
    return ex.summary, "uncited"


def open_preference_pairs(split: str = "train") -> list[OpenPair]:
    """One preference pair per open-book conversation of `split` (see the module docstring)."""
    out = []
    for ex in _examples(split):
        rejected, kind = _rejected(ex)
        if rejected != ex.answer:
            out.append(OpenPair(ex.prompt_messages, ex.answer, rejected, kind, ex.module, ex.name))
    return out


def retrieval_recall(split: str = "heldout") -> float:
    """Share of `split`'s questions whose answer is in the top-K sources (nothing taken out)."""
    items = selected_items(split)
    found = sum(any(_contains(s.text, it.answer) for s in _retrieved()[it.name][:K]) for it in items)
    return found / max(1, len(items))

