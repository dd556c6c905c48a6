"""The built-in assistant data derived from the Python docs: builtin:pydocs-qa and builtin:pydocs-prefs."""

from __future__ import annotations

import pytest

from lmforge.data import pydocs_qa
from lmforge.data.records import check_conversation
from lmforge.data.pydocs_qa import (
    MAX_ANSWER_CHARS,
    heldout_module,
    preference_pairs,
    qa_conversations,
    qa_counts,
    summarize_docstring,
)
from lmforge.errors import UserError


def top(module: str) -> str:
    return module.split(".", 1)[0]


def test_heldout_modules_are_disjoint_from_train():
    train, heldout = qa_conversations("train"), qa_conversations("heldout")
    train_tops, heldout_tops = {top(q.module) for q in train}, {top(q.module) for q in heldout}
    assert train_tops and heldout_tops and not train_tops & heldout_tops
    assert all(heldout_module(q.module) for q in heldout) and not any(heldout_module(q.module) for q in train)
    assert len(qa_conversations("all")) == len(train) + len(heldout)
    # The pairs follow the same split, and a rejected answer never comes from the other split.
    heldout_answers = {q.answer for q in heldout}
    for p in preference_pairs("heldout"):
        assert heldout_module(p.module)
        assert p.rejected_kind == "truncated" or p.rejected in heldout_answers
    assert not any(heldout_module(p.module) for p in preference_pairs("train"))


def test_conversations_are_valid_nonempty_and_deterministic():
    qa = qa_conversations("all")
    for q in qa:
        assert check_conversation(q.messages) is None
        assert q.question.strip() and f"`{q.name}" in q.question
        assert q.answer.strip() and len(q.answer) <= MAX_ANSWER_CHARS and q.answer[-1] in ".!?"
        assert q.kind in ("module", "class", "function", "method")
    assert len({q.name for q in qa}) == len(qa)  # one question per object
    assert sum(q.messages[0]["role"] == "system" for q in qa) > len(qa) // 10  # some have a system prompt
    assert len({q.question.replace(q.name, "X") for q in qa}) >= 10  # several phrasings

    # A rebuild from the (cached) doc entries gives the same data; results are fresh copies.
    pydocs_qa.qa_items.cache_clear()
    pydocs_qa._pairs.cache_clear()
    assert qa_conversations("all") == qa
    qa[0].messages[-1]["content"] = "changed"
    assert qa_conversations("all")[0].answer != "changed"


def test_every_pair_rejects_something_else():
    pairs = preference_pairs("all")
    answers = {q.name: q for q in qa_conversations("all")}
    kinds = set()
    for p in pairs:
        assert p.chosen.strip() and p.rejected.strip() and p.rejected != p.chosen
        assert p.chosen == answers[p.name].answer and p.prompt == answers[p.name].prompt_messages
        if p.rejected_kind == "truncated":
            assert p.chosen.startswith(p.rejected) and len(p.rejected) < len(p.chosen)
        kinds.add(p.rejected_kind)
    assert kinds == {"other", "truncated"}
    assert preference_pairs("train") == preference_pairs("train")


def test_counts_are_reasonable():
    c = qa_counts()
    assert c["train_conversations"] > 2000 and c["heldout_conversations"] > 100
    total = c["train_conversations"] + c["heldout_conversations"]
    assert 0.03 < c["heldout_conversations"] / total < 0.2
    assert c["heldout_modules"] >= 5 and c["train_modules"] > 5 * c["heldout_modules"]
    assert c["train_pairs"] == len(preference_pairs("train")) > 0.9 * c["train_conversations"]
    assert c["heldout_pairs"] == len(preference_pairs("heldout")) > 0.9 * c["heldout_conversations"]


def test_summaries():
    doc = "Remove any common leading whitespace from every line in `text`.\n\nThis can be used ..."
    assert summarize_docstring(doc) == "Remove any common leading whitespace from every line in `text`."
    assert summarize_docstring("Return the value, e.g. the number. More text follows here.") == \
        "Return the value, e.g. the number."
    assert summarize_docstring("S.find(sub[, start]) -> int\n\nReturn the lowest index.\nMore.", "find") == \
        "Return the lowest index."
    assert summarize_docstring("distutils.command.build\n\nImplements the 'build' command.") == \
        "Implements the 'build' command."
    assert summarize_docstring("Handler for clicking on a key\n\nDetails.") == "Handler for clicking on a key."
    assert summarize_docstring("Return the following:\n  a, b") is None
    assert summarize_docstring("Internal class.") is None  # too short to be an answer
    assert summarize_docstring("Word " * 60 + "end.") is None  # first sentence too long
    assert summarize_docstring(">>> f(1)\n2") is None


def test_unknown_split():
    with pytest.raises(UserError, match="unknown split"):
        qa_conversations("test")
