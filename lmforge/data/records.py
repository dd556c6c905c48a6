"""Chat (SFT) and preference (DPO) records: read and validate JSONL conversations and preference pairs.

Formats
-------
* **Conversations** (``lmforge finetune --data``): one JSON object per line with an OpenAI-style
  ``messages`` list: an optional ``system`` message first, then ``user`` and ``assistant`` turns
  alternating, starting with ``user`` and ending with ``assistant``. ``builtin:pydocs-qa`` (the train
  split), ``builtin:pydocs-qa:heldout`` and ``builtin:pydocs-qa:all`` name the built-in data
  (:mod:`lmforge.data.pydocs_qa`); ``builtin:pydocs-qa-open[:split]`` its open-book form, each question
  with retrieved sources (:mod:`lmforge.data.pydocs_open`).
* **Preferences** (``lmforge align --data``): one object per line with ``prompt``, ``chosen`` and
  ``rejected``. ``prompt`` is a string (one user turn) or a messages list ending with a user turn;
  ``chosen``/``rejected`` are strings (the assistant reply) or message lists whose last message is the
  assistant reply (TRL's conversational format: ``[{"role": "assistant", "content": ...}]``, or the whole
  conversation repeating the prompt). Without ``prompt``, two message lists that share everything but
  their last message give the prompt implicitly (TRL's "implicit prompt" format).
  ``builtin:pydocs-prefs[:train|:heldout|:all]`` names the built-in pairs, ``builtin:pydocs-prefs-open`` the
  open-book ones.
* **Feedback** (what `lmforge serve`'s chat UI collects, `feedback.jsonl`): one object per line with
  ``messages`` (ending with the user turn), the model's ``response``, a ``rating`` ("up"/"down"/null) and
  a ``better`` answer or null. Both readers take it as it is: as a conversation, the better answer or a
  thumbed-up response ends ``messages``; as a preference, the better answer is chosen over the response.
  A record with nothing to learn for that kind (a thumbs-down without a better answer) is skipped.

Bad records are skipped, each reported with its line number and the reason (`ChatData.problems`); a
file without a single usable record is a `UserError` that shows the first problems.

Tokenizing them is :mod:`lmforge.data.sft` (conversations) and :mod:`lmforge.data.preferences` (pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from lmforge.errors import UserError

__all__ = [
    "ChatData",
    "PreferenceData",
    "Preference",
    "read_conversations",
    "read_preferences",
    "check_conversation",
    "clean_messages",
    "train_val_split",
]

ROLES = ("system", "user", "assistant")
_SHOWN_PROBLEMS = 3  # problems quoted in a summary line or an error message

_CHAT_BUILTINS = {"pydocs-qa", "pydocs-qa-open"}  # closed-book, and open-book (lmforge.data.pydocs_open)
_PREF_BUILTINS = {"pydocs-prefs", "pydocs-prefs-open"}
_BUILTIN_SPLITS = ("train", "heldout", "all")


# ----------------------------------------------------------------------------------------------------
# Data containers
# ----------------------------------------------------------------------------------------------------


def _fmt_problems(problems: Sequence[tuple[int, str]], limit: int = _SHOWN_PROBLEMS) -> str:
    shown = "; ".join(f"line {line}: {reason}" for line, reason in problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def _summary(source: str, kept: int, what: str, records: int, problems: Sequence[tuple[int, str]]) -> str:
    line = f"{source}: {kept} {what} from {records} records"
    if problems:
        line += f"; skipped {len(problems)}: {_fmt_problems(problems)}"
    return line


@dataclass
class ChatData:
    """Validated conversations from one spec, plus every skipped record's (line number, reason)."""

    source: str
    conversations: list[list[dict]]
    problems: list[tuple[int, str]] = field(default_factory=list)
    records: int = 0  # non-blank lines (or built-in items) read

    def __len__(self) -> int:
        return len(self.conversations)

    def summary(self) -> str:
        """One line, e.g. ``chat.jsonl: 118 conversations from 120 records; skipped 2: line 4: ...``."""
        return _summary(self.source, len(self.conversations), "conversations", self.records, self.problems)


@dataclass(frozen=True)
class Preference:
    """One validated preference pair: `prompt` messages (ending with a user turn) and two replies."""

    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class PreferenceData:
    """Validated preference pairs from one spec, plus every skipped record's (line number, reason)."""

    source: str
    pairs: list[Preference]
    problems: list[tuple[int, str]] = field(default_factory=list)
    records: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        return _summary(self.source, len(self.pairs), "preference pairs", self.records, self.problems)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _check_messages(messages: Any, *, what: str = "messages") -> str | None:
    """Why `messages` is not a list of {"role", "content"} dicts with known roles, string contents and the
    system message (if any) first; None when it is."""
    if not isinstance(messages, list):
        return f'"{what}" must be a list of messages, got {type(messages).__name__}'
    if not messages:
        return f'"{what}" is an empty list'
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, Mapping):
            return f"message {i} of \"{what}\" is not an object (got {type(m).__name__})"
        role = m.get("role")
        if role not in ROLES:
            return (f"message {i} of \"{what}\" has unknown role {role!r} (expected system, user or assistant)"
                    if "role" in m else f"message {i} of \"{what}\" has no \"role\"")
        if not isinstance(m.get("content"), str):
            got = "no content" if m.get("content") is None else f"a {type(m['content']).__name__}"
            return f"message {i} ({role}) of \"{what}\" has non-string content ({got})"
        if role == "system" and i != 1:
            return f"message {i} is a system message; only the first message may be one"
    return None


def check_conversation(messages: Any) -> str | None:
    """Why `messages` cannot be trained on, or None when it can: valid messages, user and assistant turns
    alternating after an optional system message, starting with user and ending with a non-empty assistant
    reply (every assistant reply must be non-empty: an empty reply teaches the model to say nothing)."""
    reason = _check_messages(messages)
    if reason:
        return reason
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in turns):
        return "no assistant message: nothing to train on"
    expected = "user"
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns, start=offset + 1):
        if m["role"] != expected:
            if i == offset + 1:
                return f"message {i} is from the {m['role']}; the conversation must start with a user message"
            return f"message {i} is a second {m['role']} message in a row; user and assistant must alternate"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"message {i} is an empty assistant reply"
        expected = "assistant" if expected == "user" else "user"
    if turns[-1]["role"] != "assistant":
        return f"the last message ({len(messages)}) is from the user; a training conversation ends with the assistant's reply"
    return None


def clean_messages(messages: list) -> list[dict]:
    """Keep only role and content (tool calls, names and other keys are not part of the format)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _is_feedback(obj: Any) -> bool:
    return isinstance(obj, dict) and "response" in obj and "messages" in obj and "prompt" not in obj


def _feedback_parts(obj: dict) -> tuple[list | None, str | None, str | None, str | None]:
    """(messages, response, better, reason) of a feedback record, strings checked."""
    response, better = obj.get("response"), obj.get("better")
    if not isinstance(response, str) or not (better is None or isinstance(better, str)):
        return None, None, None, 'feedback "response" must be a string and "better" a string or null'
    if obj.get("rating") not in ("up", "down", None):
        return None, None, None, f'feedback "rating" must be "up", "down" or null, got {obj.get("rating")!r}'
    better = better.strip() if better and better.strip() else None
    return obj["messages"], response, better, None


def _check_conversation_record(obj: Any) -> tuple[list[dict] | None, str | None]:
    if not isinstance(obj, dict):
        return None, f'expected a JSON object with a "messages" list, got {_json_type(obj)}'
    if "messages" not in obj:
        return None, 'no "messages" list'
    if _is_feedback(obj):
        messages, response, better, reason = _feedback_parts(obj)
        if reason:
            return None, reason
        answer = better if better is not None else (response if obj.get("rating") == "up" and response.strip() else None)
        if answer is None:
            return None, "feedback with no answer to learn from (no better answer, not a thumbs-up)"
        if not isinstance(messages, list):
            return None, f'"messages" must be a list, got {_json_type(messages)}'
        obj = {"messages": [*messages, {"role": "assistant", "content": answer}]}
    reason = check_conversation(obj["messages"])
    return (None, reason) if reason else (clean_messages(obj["messages"]), None)


def _reply(value: Any, key: str) -> tuple[str | None, list[dict] | None, str | None]:
    """(reply text, messages before the reply or None, reason) for a chosen/rejected value."""
    if isinstance(value, str):
        if not value.strip():
            return None, None, f'empty "{key}" reply'
        return value, None, None
    if isinstance(value, list):
        reason = _check_messages(value, what=key)
        if reason:
            return None, None, reason
        last = value[-1]
        if last["role"] != "assistant":
            return None, None, f'the last message of "{key}" must be the assistant\'s reply, not {last["role"]}'
        if not last["content"].strip():
            return None, None, f'empty "{key}" reply'
        return last["content"], clean_messages(value[:-1]), None
    if value is None:
        return None, None, f'no "{key}"'
    return None, None, f'"{key}" must be a string or a list of messages, got {_json_type(value)}'


def _check_preference_record(obj: Any) -> tuple[Preference | None, str | None]:
    if not isinstance(obj, dict):
        return None, f'expected a JSON object with "prompt", "chosen" and "rejected", got {_json_type(obj)}'
    if _is_feedback(obj):
        messages, response, better, reason = _feedback_parts(obj)
        if reason:
            return None, reason
        if better is None or better == response.strip():
            return None, "feedback with no better answer that differs from the response"
        obj = {"prompt": messages, "chosen": better, "rejected": response}
    prompt_value = obj.get("prompt")
    prompt: list[dict] | None
    if prompt_value is None:
        prompt = None
    elif isinstance(prompt_value, str):
        if not prompt_value.strip():
            return None, "empty prompt"
        prompt = [{"role": "user", "content": prompt_value}]
    elif isinstance(prompt_value, list):
        reason = _check_messages(prompt_value, what="prompt")
        if reason:
            return None, reason
        if prompt_value[-1]["role"] != "user":
            return None, f"the prompt must end with a user message, not {prompt_value[-1]['role']}"
        prompt = clean_messages(prompt_value)
    else:
        return None, f'"prompt" must be a string or a list of messages, got {_json_type(prompt_value)}'

    chosen, chosen_prefix, reason = _reply(obj.get("chosen"), "chosen")
    if reason:
        return None, reason
    rejected, rejected_prefix, reason = _reply(obj.get("rejected"), "rejected")
    if reason:
        return None, reason
    assert chosen is not None and rejected is not None
    if prompt is None:
        # TRL's implicit prompt: two full conversations sharing all but their last message.
        if not chosen_prefix or chosen_prefix != rejected_prefix:
            return None, 'no "prompt" (and "chosen"/"rejected" are not two conversations sharing a prompt)'
        prompt = chosen_prefix
        if prompt[-1]["role"] != "user":
            return None, f"the shared prompt must end with a user message, not {prompt[-1]['role']}"
    else:
        for key, prefix in (("chosen", chosen_prefix), ("rejected", rejected_prefix)):
            if prefix and prefix != prompt:
                return None, f'"{key}" has messages before its reply that differ from the prompt'
    if chosen.strip() == rejected.strip():
        return None, '"chosen" and "rejected" are the same reply: nothing to prefer'
    reason = check_conversation(prompt + [{"role": "assistant", "content": chosen}])  # alternation, order
    if reason:
        return None, f"prompt: {reason}"
    return Preference(prompt, chosen, rejected), None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _parse_builtin(spec: str, known: set[str], other: set[str], what: str, other_cmd: str) -> tuple[str, str]:
    body = spec[len("builtin:"):]
    name, _, split = body.partition(":")
    if name in other:
        raise UserError(f"{spec} is {'preference' if what == 'conversation' else 'conversation'} data; "
                        f"use it with `lmforge {other_cmd}`")
    if name not in known:
        raise UserError(f"unknown built-in {what} data {spec!r}; known: "
                        + ", ".join(f"builtin:{k}[:{'|'.join(_BUILTIN_SPLITS)}]" for k in sorted(known)))
    split = split or "train"
    if split not in _BUILTIN_SPLITS:
        raise UserError(f"unknown split {split!r} in {spec!r}; use one of: {', '.join(_BUILTIN_SPLITS)}")
    return name, split


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, reason) for every non-blank line, decoding each line on its own
    so that one bad byte costs one record, not the file."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"data file does not exist: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a .jsonl file with one record per line") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    with fh:
        # Lines end at b"\n" only: JSON strings may hold raw U+2028, which str.splitlines would split on.
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark from a Windows editor
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _read_file(spec: str, check, *, limit: int | None, what: str, example: str):
    path = Path(spec).expanduser()
    items, problems, records = [], [], 0
    for lineno, obj, reason in _iter_jsonl(path):
        records += 1
        item = None
        if reason is None:
            item, reason = check(obj)
        if reason is not None:
            problems.append((lineno, reason))
            continue
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        if records == 0:
            raise UserError(f"{spec} has no records; expected one JSON object per line like {example}")
        raise UserError(f"{spec}: no usable {what} in {records} records: {_fmt_problems(problems)}")
    return items, problems, records


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"the record limit must be a positive integer, got {limit!r}")


@dataclass(frozen=True)
class _Kind:
    """What differs between reading conversations and reading preference pairs (the rest is `_read`)."""

    plural: str  # "conversations"
    what: str  # one record, in messages: "conversation"
    builtins: set[str]  # our builtin:NAME data of this kind
    others: set[str]  # the other kind's, named in the message that says which command takes them
    other_cmd: str
    builtin_items: Callable[[str, str], list]  # (name, split) -> records
    check: Callable[[Any], tuple[Any, str | None]]  # JSON object -> (record, None) or (None, reason)
    example: str  # one line of the file format


def _read(spec: str, limit: int | None, kind: _Kind) -> tuple[str, list, list, int]:
    """(spec, records, problems, records seen) from a JSONL file or builtin:NAME[:split]."""
    _check_limit(limit)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty --data: give a .jsonl file of {kind.plural} or builtin:{min(kind.builtins)}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name, split = _parse_builtin(spec, kind.builtins, kind.others, kind.what, kind.other_cmd)
        items = kind.builtin_items(name, split)
        return spec, items[:limit] if limit else items, [], len(items)
    return (spec, *_read_file(spec, kind.check, limit=limit, what=kind.what, example=kind.example))


def _builtin_conversations(name: str, split: str) -> list:
    if name == "pydocs-qa-open":
        from lmforge.data.pydocs_open import open_conversations

        return [ex.messages for ex in open_conversations(split)]
    from lmforge.data.pydocs_qa import qa_conversations

    return [qa.messages for qa in qa_conversations(split)]


def _builtin_preferences(name: str, split: str) -> list:
    if name == "pydocs-prefs-open":
        from lmforge.data.pydocs_open import open_preference_pairs

        return [Preference(p.prompt, p.chosen, p.rejected) for p in open_preference_pairs(split)]
    from lmforge.data.pydocs_qa import preference_pairs

    return [Preference(p.prompt, p.chosen, p.rejected) for p in preference_pairs(split)]


_CONVERSATIONS = _Kind("conversations", "conversation", _CHAT_BUILTINS, _PREF_BUILTINS, "align",
                       _builtin_conversations, _check_conversation_record,
                       '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
_PREFERENCES = _Kind("preference pairs", "preference pair", _PREF_BUILTINS, _CHAT_BUILTINS, "finetune",
                     _builtin_preferences, _check_preference_record, '{"prompt": "...", "chosen": "...", "rejected": "..."}')


def read_conversations(spec: str, *, limit: int | None = None) -> ChatData:
    """Read and validate conversations from a JSONL file or ``builtin:pydocs-qa[:train|:heldout|:all]``
    (``builtin:pydocs-qa`` alone is the train split). Keeps at most `limit` conversations.

    Bad records are skipped and listed in `ChatData.problems` with line numbers; a missing file, or one
    without any usable record, raises `UserError`.
    """
    return ChatData(*_read(spec, limit, _CONVERSATIONS))


def read_preferences(spec: str, *, limit: int | None = None) -> PreferenceData:
    """Read and validate preference pairs from a JSONL file or ``builtin:pydocs-prefs[:train|:heldout|:all]``
    (``builtin:pydocs-prefs`` alone is the train split). Keeps at most `limit` pairs.

    Bad records (no prompt, an empty or identical chosen/rejected reply, a prompt not ending with a user
    turn, ...) are skipped and listed with line numbers; a file without any usable record raises `UserError`.
    """
    return PreferenceData(*_read(spec, limit, _PREFERENCES))


def train_val_split(items: Sequence[Any], *, val_fraction: float = 0.05, seed: int = 0,
                    min_val: int = 1) -> tuple[list[Any], list[Any]]:
    """Split `items` into (train, validation) deterministically: a seeded permutation picks
    ``max(min_val, round(val_fraction * n))`` validation items (none when fewer than 2 items); both parts
    keep the original order."""
    n = len(items)
    if not 0 <= val_fraction < 1:
        raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(min_val, round(val_fraction * n)))
    val_idx = set(np.random.default_rng([seed, n]).permutation(n)[:n_val].tolist())
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val
