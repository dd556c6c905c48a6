"""Grounded chat completions: the `documents` extension, and the index listing the web UI picks from.

A chat completion with `documents` (an index name, or `{"index": NAME, "k": N}`; the `openai` SDK sends it
through `extra_body`) is answered from that index (`lmforge index`): the top-k passages for the latest user
message are retrieved, and the conversation is grounded on them by the same builder as `lmforge run
--docs` (`lmforge.chat.grounded_prompt` -> `retrieval.grounding.ground`), fitted in the model's context
with the request's `max_tokens` (else the Modelfile's, capped as the terminal chat caps it) kept for the
answer. The passages shown to the model come back with the answer, numbered as it cites them:

    non-streaming   choices[i].message.sources = [{index, path, heading, start_line, end_line, score,
                                                   text, truncated}, ...]
    streaming       the first chunk (the one with the role, before any content) carries
                    choices[i].delta.sources
    both            a top-level `grounding` object: the index, k, how many passages were retrieved and
                    kept, how many were dropped to fit (lowest-ranked first) and how many old messages,
                    and the notice line when anything was dropped (never a silent truncation)

Errors: an unknown index is a 404 (`param: "documents"`, code `index_not_found`, the message lists the
known indexes, as `lmforge run --docs` does); a malformed `documents` value is a 400; an index that exists
but cannot be read (corrupt, built by a newer lmforge) is a 500 whose message names the index and the way
out, never the file's path (the details go to the server's log).

Retrieval is SQLite (and, for an index with vectors, an encoder's forward pass): it runs on the server's
worker pool, never on the event loop. Each request opens the index in the worker that searches it (a
SQLite connection belongs to the thread that made it); opening is a file open and a schema read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmforge.chat import answer_reserve, grounded_prompt
from lmforge.engine.prompt import ChatPromptError
from lmforge.errors import UserError
from lmforge.paths import home
from lmforge.retrieval.grounding import Grounded, Source, sources_from_hits
from lmforge.retrieval.index import index_path, list_indexes, open_index
from lmforge.serve.protocol import DEFAULT_DOCUMENTS_K, APIError, Documents, invalid

log = logging.getLogger("lmforge.serve")

__all__ = ["Retrieved", "documents_spec", "search", "grounded_ids", "grounding_info", "index_listing"]


@dataclass(frozen=True)
class Retrieved:
    """What one request retrieved: the index, k, and the passages, best first."""

    index: str
    k: int
    sources: list[Source]


def documents_spec(documents: str | Documents) -> tuple[str, int]:
    """(index name, k) of a request's `documents`, in either form."""
    if isinstance(documents, str):
        return documents, DEFAULT_DOCUMENTS_K
    return documents.index, documents.k


def latest_user_text(turns: list[dict]) -> str:
    """The query: the text of the latest user message (the earlier ones were answered already)."""
    return next((str(m.get("content") or "") for m in reversed(turns) if m.get("role") == "user"), "")


def search(documents: str | Documents, turns: list[dict]) -> Retrieved:
    """Retrieve for the latest user message of `turns` (blocking: call it on the worker pool)."""
    name, k = documents_spec(documents)
    if len(name) > 200:  # longer than any valid name: not worth echoing back
        raise invalid("invalid 'documents': an index name is 1-64 characters of a-z 0-9 . _ -", param="documents")
    try:
        path = index_path(name)
    except UserError as e:
        message = str(e) if str(home()) not in str(e) else f"invalid index name {name!r}"
        raise invalid(f"invalid 'documents': {message}", param="documents") from None
    if not path.is_file():
        raise _not_found(name)
    query = latest_user_text(turns)
    if not query.strip():  # nothing to search for: grounded on no passage, the model says so
        return Retrieved(name, k, [])
    try:
        with open_index(name) as index:
            hits = index.search(query, k)
    except UserError as e:
        if not path.is_file():  # removed since we looked
            raise _not_found(name) from None
        log.warning("index %s cannot be searched: %s", name, e)
        raise APIError(500, f"the index {name!r} cannot be searched (the server's log says why; rebuilding it "
                       f"with `lmforge index --rebuild` usually helps)", type="server_error", param="documents",
                       code="index_unreadable") from None
    return Retrieved(name, k, sources_from_hits(hits))


def _not_found(name: str) -> APIError:
    known = ", ".join(list_indexes()) or "none yet"
    return APIError(404, f"no index named {name!r} (known: {known}; create one with `lmforge index PATH --name "
                    f"{name}`)", param="documents", code="index_not_found")


def grounded_ids(tokenizer, turns: list[dict], retrieved: Retrieved, *, context: int, max_tokens: int | None,
                 default_max_new: int, system: str | None = None, examples: list[dict] | tuple = (),
                 template_kwargs: dict | None = None) -> tuple[list[int], Grounded]:
    """Token ids of the request's conversation grounded on `retrieved`, fitted in `context` minus the
    answer's budget: `max_tokens` when the request gives one, else `answer_reserve` of the model's default.
    The Modelfile's `system` and `examples` are kept as `chat_prompt_ids` keeps them (not when the request
    brings its own system message); `template_kwargs` (the request's `chat_template_kwargs`) reach the template."""
    reserve = max_tokens if max_tokens is not None else answer_reserve(context, default_max_new)
    conv = list(turns) if any(m.get("role") == "system" for m in turns) else [*map(dict, examples), *turns]
    try:
        return grounded_prompt(tokenizer, conv, retrieved.sources, context=context, reserve=reserve, system=system,
                               template_kwargs=template_kwargs)
    except ChatPromptError as e:
        raise invalid(str(e), param=e.param, **({"code": e.code} if e.code else {})) from None


def grounding_info(retrieved: Retrieved, grounded: Grounded) -> dict:
    """The response's top-level `grounding` extension object."""
    return {"index": retrieved.index, "k": retrieved.k, "retrieved": len(retrieved.sources),
            "passages": len(grounded.sources), "dropped": grounded.dropped, "dropped_messages": grounded.dropped_turns,
            "notice": grounded.notice()}


def index_listing(default: str | None) -> dict:
    """`GET /v1/indexes`: the index names (sorted), and the collection `lmforge serve --docs` chose for the
    web UI (null when none was chosen, or it has gone since)."""
    names = list_indexes()
    return {"object": "list", "data": [{"id": n, "object": "index"} for n in names],
            "default": default if default in names else None}
