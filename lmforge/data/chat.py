"""Chat (SFT) and preference (DPO) data: read and validate JSONL, tokenize with a loss mask, batch for `fit()`.

Formats
-------
* **Conversations** (``lmforge finetune --data``): one JSON object per line with an OpenAI-style
  ``messages`` list: an optional ``system`` message first, then ``user`` and ``assistant`` turns
  alternating, starting with ``user`` and ending with ``assistant``. ``builtin:pydocs-qa`` (the train
  split), ``builtin:pydocs-qa:heldout`` and ``builtin:pydocs-qa:all`` name the built-in data
  (:mod:`lmforge.data.pydocs_qa`).
* **Preferences** (``lmforge align --data``): one object per line with ``prompt``, ``chosen`` and
  ``rejected``. ``prompt`` is a string (one user turn) or a messages list ending with a user turn;
  ``chosen``/``rejected`` are strings (the assistant reply) or message lists whose last message is the
  assistant reply (TRL's conversational format: ``[{"role": "assistant", "content": ...}]``, or the whole
  conversation repeating the prompt). Without ``prompt``, two message lists that share everything but
  their last message give the prompt implicitly (TRL's "implicit prompt" format).
  ``builtin:pydocs-prefs[:train|:heldout|:all]`` names the built-in pairs.

Bad records are skipped, each reported with its line number and the reason (`ChatData.problems`); a
file without a single usable record is a `UserError` that shows the first problems.

The loss mask
-------------
`encode_sft` renders the conversation with the tokenizer's own chat template (any Hugging Face Jinja
template) and labels exactly the tokens of each assistant reply *and the token(s) that close it* (for
ChatML ``<|im_end|>``), so a fine-tuned model learns to stop. Everything else is `IGNORE_INDEX`: the
system and user turns and the role headers (``<|im_start|>assistant\\n``), which the inference prompt
already contains. The spans are found generically: for assistant turn *i* the template renders
``messages[:i]`` with ``add_generation_prompt=True`` (the text a model sees before it answers) and
``messages[:i+1]``; the characters between the two are the reply as the template writes it. Each must be
a prefix of the next and of the whole conversation (true of every sane template; one that breaks it is a
`UserError`, because there is then no way to tell which tokens the model produced). The rendered text
is tokenized with character offsets, in pieces cut at the start of each reply (so a reply's tokens are
exactly the ones a model produces after its prompt at inference; with ChatML's special tokens the cut
changes nothing), and the tokens inside a reply's span are labelled, minus the whitespace a template adds
after the closing token (ChatML's ``"\\n"`` after ``<|im_end|>`` belongs to the next prompt). If a reply
does not end with one of `Tokenizer.eos_ids` (a template without an end-of-turn token), the EOS id is
inserted right after it and labelled, or generation would never stop. Literal special-token text inside a
message (``"<|im_end|>"``) becomes the control token, exactly as in `Tokenizer.encode_chat` and
transformers; data that contains such text should be cleaned first.

**The pad == eos trap.** Many tokenizers use their EOS as padding. Masking the loss by comparing ids
with the pad id would then also mask every real EOS, and the model would never learn to stop. Here
padding is masked *by position* (everything past an example's length is `IGNORE_INDEX`); ids are never
compared with the pad id.

**Too long: dropped, not truncated.** A conversation whose tokens do not fit the context is dropped and
counted ("dropped 3 of 120 conversations longer than the context (256 tokens)"). Truncating from the left
cuts off the question (the reply then answers nothing, and the system prompt is lost); truncating from
the right cuts off the end of the reply and its end-of-turn token, teaching the model to stop mid-sentence
or never. Neither is what the user asked for, so we keep only whole conversations and say how many went.

Batches
-------
`SFTBatches` and `PreferenceBatches` implement `lmforge.train.loop.DataSource`. A batch is a pure
function of ``(seed, step, micro)``: the examples are visited in a fresh permutation per epoch drawn from
``np.random.default_rng([seed, epoch])``, and the k-th example of the whole run is found by arithmetic, so
a resumed run sees exactly the batches it would have seen. Each batch is right-padded to its longest
example; labels are already shifted for next-token prediction (``labels[:, t]`` is the target of position
``t``). There is no packing: examples packed into one row would attend to each other unless the attention
mask were made block-diagonal, and with right padding plus the causal mask a real token never attends
to padding (padding only ever comes after it), so padded batches are simply correct. The price is
compute spent on padding, which is small for chat data of similar lengths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.train.losses import IGNORE_INDEX

__all__ = [
    "ChatData",
    "PreferenceData",
    "Preference",
    "SFTExample",
    "PreferenceExample",
    "EncodedSFT",
    "EncodedPreferences",
    "SFTBatches",
    "PreferenceBatches",
    "read_conversations",
    "read_preferences",
    "encode_sft",
    "encode_preference",
    "encode_conversations",
    "encode_preferences",
    "check_conversation",
    "train_val_split",
]

ROLES = ("system", "user", "assistant")
_SHOWN_PROBLEMS = 3  # problems quoted in a summary line or an error message

_CHAT_BUILTINS = {"pydocs-qa"}
_PREF_BUILTINS = {"pydocs-prefs"}
_BUILTIN_SPLITS = ("train", "heldout", "all")


# ----------------------------------------------------------------------------------------------------
# Data containers
# ----------------------------------------------------------------------------------------------------


def _fmt_problems(problems: Sequence[tuple[int, str]], limit: int = _SHOWN_PROBLEMS) -> str:
    shown = "; ".join(f"line {line}: {reason}" for line, reason in problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


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
        line = f"{self.source}: {len(self.conversations)} conversations from {self.records} records"
        if self.problems:
            line += f"; skipped {len(self.problems)}: {_fmt_problems(self.problems)}"
        return line


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
        line = f"{self.source}: {len(self.pairs)} preference pairs from {self.records} records"
        if self.problems:
            line += f"; skipped {len(self.problems)}: {_fmt_problems(self.problems)}"
        return line


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


def _clean(messages: list) -> list[dict]:
    """Keep only role and content (tool calls, names and other keys are not part of the format)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_conversation_record(obj: Any) -> tuple[list[dict] | None, str | None]:
    if not isinstance(obj, dict):
        return None, f'expected a JSON object with a "messages" list, got {_json_type(obj)}'
    if "messages" not in obj:
        return None, 'no "messages" list'
    reason = check_conversation(obj["messages"])
    return (None, reason) if reason else (_clean(obj["messages"]), None)


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
        return last["content"], _clean(value[:-1]), None
    if value is None:
        return None, None, f'no "{key}"'
    return None, None, f'"{key}" must be a string or a list of messages, got {_json_type(value)}'


def _check_preference_record(obj: Any) -> tuple[Preference | None, str | None]:
    if not isinstance(obj, dict):
        return None, f'expected a JSON object with "prompt", "chosen" and "rejected", got {_json_type(obj)}'
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
        prompt = _clean(prompt_value)
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


def read_conversations(spec: str, *, limit: int | None = None) -> ChatData:
    """Read and validate conversations from a JSONL file or ``builtin:pydocs-qa[:train|:heldout|:all]``
    (``builtin:pydocs-qa`` alone is the train split). Keeps at most `limit` conversations.

    Bad records are skipped and listed in `ChatData.problems` with line numbers; a missing file, or one
    without any usable record, raises `UserError`.
    """
    _check_limit(limit)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty --data: give a .jsonl file of conversations or builtin:pydocs-qa")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        _, split = _parse_builtin(spec, _CHAT_BUILTINS, _PREF_BUILTINS, "conversation", "align")
        from lmforge.data.pydocs_qa import qa_conversations

        convs = [qa.messages for qa in qa_conversations(split)]
        records = len(convs)
        return ChatData(spec, convs[:limit] if limit else convs, [], records)
    convs, problems, records = _read_file(
        spec, _check_conversation_record, limit=limit, what="conversation",
        example='{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    )
    return ChatData(spec, convs, problems, records)


def read_preferences(spec: str, *, limit: int | None = None) -> PreferenceData:
    """Read and validate preference pairs from a JSONL file or ``builtin:pydocs-prefs[:train|:heldout|:all]``
    (``builtin:pydocs-prefs`` alone is the train split). Keeps at most `limit` pairs.

    Bad records (no prompt, an empty or identical chosen/rejected reply, a prompt not ending with a user
    turn, ...) are skipped and listed with line numbers; a file without any usable record raises `UserError`.
    """
    _check_limit(limit)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty --data: give a .jsonl file of preference pairs or builtin:pydocs-prefs")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        _, split = _parse_builtin(spec, _PREF_BUILTINS, _CHAT_BUILTINS, "preference", "finetune")
        from lmforge.data.pydocs_qa import preference_pairs

        pairs = [Preference(p.prompt, p.chosen, p.rejected) for p in preference_pairs(split)]
        records = len(pairs)
        return PreferenceData(spec, pairs[:limit] if limit else pairs, [], records)
    pairs, problems, records = _read_file(
        spec, _check_preference_record, limit=limit, what="preference pair",
        example='{"prompt": "...", "chosen": "...", "rejected": "..."}',
    )
    return PreferenceData(spec, pairs, problems, records)


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


# ----------------------------------------------------------------------------------------------------
# Tokenization with the loss mask
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """Token ids of one rendered conversation and their labels, *aligned* (not shifted): ``labels[t]`` is
    ``ids[t]`` where the token belongs to an assistant reply or its end-of-turn, else `IGNORE_INDEX`."""

    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PreferenceExample:
    """One encoded pair. Both sequences start with the same `prompt_len` prompt tokens; labels are aligned
    with the ids and are `IGNORE_INDEX` on the prompt, the ids themselves on the completion."""

    prompt_len: int
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def _stop_id(tokenizer: Any) -> int:
    """The id appended after a reply whose template does not close it with an EOS/EOT token."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if tokenizer.eos_ids:
        return tokenizer.eos_ids[0]
    raise UserError("the tokenizer has no EOS token, so a fine-tuned model could not learn to stop; "
                    "give it an eos_token in tokenizer_config.json")


def _render(tokenizer: Any, messages: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=gen)


def _prefix_error(turn: int, what: str) -> UserError:
    return UserError(
        f"the chat template does not render assistant turn {turn} as a continuation of {what}, so the "
        "assistant tokens cannot be located for the loss mask; use a template that renders a conversation "
        "as a prefix of any longer one"
    )


def _assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of each assistant reply as the template
    writes it (from just after the generation prompt to the end of the turn)."""
    full = _render(tokenizer, messages, False)
    spans = []
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for n, i in enumerate(indices, start=1):
        before = _render(tokenizer, messages[:i], True)
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not through.startswith(before):
            raise _prefix_error(n, "its prompt (rendered with add_generation_prompt=True)")
        if not full.startswith(through):
            raise _prefix_error(n, "the conversation before it, within the whole conversation")
        spans.append((len(before), len(through)))
    return full, spans


def _encode_pieces(tokenizer: Any, text: str, cuts: Sequence[tuple[int, int | None]]
                   ) -> tuple[list[int], list[tuple[int, int]], set[int]]:
    """Token ids of `text` tokenized piecewise between the cut positions, each token's character span in
    `text`, and the positions of inserted ids: a cut ``(pos, id)`` with an id inserts that id at ``pos``."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    inserted: set[int] = set()
    prev = 0
    for pos, insert in [*sorted(cuts, key=lambda c: c[0]), (len(text), None)]:
        if pos > prev:
            enc = tokenizer.backend.encode(text[prev:pos], add_special_tokens=False)
            ids.extend(enc.ids)
            offsets.extend((prev + a, prev + b) for a, b in enc.offsets)
        if insert is not None:
            inserted.add(len(ids))
            ids.append(insert)
            offsets.append((pos, pos))
        prev = max(prev, pos)
    return ids, offsets, inserted


def _reply_end(text: str, start: int, end: int) -> int:
    """Where the reply span [start, end) really ends: before the whitespace a template writes after the
    turn (ChatML's "\n" after <|im_end|>), which belongs to the next prompt, not to the reply."""
    return start + len(text[start:end].rstrip())


def _sft(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, aligned labels) for a validated conversation; see "The loss mask" in the module docstring.

    The text is tokenized in pieces cut at the start of every reply, so a reply's tokens are exactly those
    a model produces after the prompt at inference (which encodes the prompt on its own): with a template
    whose generation prompt ends in a space ("Assistant: "), one tokenization of the whole text would glue
    that space to the reply's first word. Where a reply has no end-of-turn token, a cut at its end inserts
    the EOS (so it also stays apart from the template's line break: ".\n" is often one token).
    """
    text, spans = _assistant_spans(tokenizer, messages)
    spans = [(s, _reply_end(text, s, e)) for s, e in spans]
    eos = set(tokenizer.eos_ids)
    cuts: list[tuple[int, int | None]] = []
    for n, (s, e) in enumerate(spans, start=1):
        reply = tokenizer.backend.encode(text[s:e], add_special_tokens=False).ids
        if not reply:
            raise UserError(f"the chat template rendered assistant turn {n} as nothing (does it drop replies?)")
        cuts.append((s, None))
        if reply[-1] not in eos:
            cuts.append((e, _stop_id(tokenizer)))  # no end-of-turn token from the template: add the EOS
    ids, offsets, inserted = _encode_pieces(tokenizer, text, cuts)
    labels = [IGNORE_INDEX] * len(ids)
    for j in inserted:
        labels[j] = ids[j]
    k = 0
    for j, (a, b) in enumerate(offsets):  # tokens and spans are both in text order
        if j in inserted or b <= a:
            continue
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and spans[k][0] <= a and b <= spans[k][1]:
            labels[j] = ids[j]
    return ids, labels


def _fits(n_ids: int, max_len: int) -> bool:
    # The model reads ids[:-1] and predicts ids[1:]: the last id is only ever a target.
    return n_ids - 1 <= max_len


def _check_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise UserError(f"the maximum length must be a positive integer, got {max_len!r}")


def encode_sft(tokenizer: Any, messages: list[dict], max_len: int) -> SFTExample | None:
    """Render `messages` with the tokenizer's chat template, tokenize, and label the assistant replies.

    Returns None when the conversation does not fit `max_len` (the model's context length: the input,
    every id but the last, must have at most `max_len` tokens). Raises `UserError` for an invalid
    conversation (see `check_conversation`) or a template whose renders are not prefixes of each other.
    No BOS is added: the template owns every special token of a chat, as in `Tokenizer.encode_chat`.
    """
    _check_max_len(max_len)
    reason = check_conversation(messages)
    if reason:
        raise UserError(f"cannot train on this conversation: {reason}")
    ids, labels = _sft(tokenizer, _clean(messages))
    if not _fits(len(ids), max_len):
        return None
    return SFTExample(ids, labels)


def _completion(tokenizer: Any, prompt: list[dict], reply: str) -> tuple[str, list[int]]:
    """The prompt text (with the generation prompt) and the reply's token ids as the template closes it."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    before = _render(tokenizer, prompt, True)
    through = _render(tokenizer, messages, False)
    if not through.startswith(before):
        raise _prefix_error(1, "its prompt (rendered with add_generation_prompt=True)")
    text = through[len(before):]
    text = text[: _reply_end(text, 0, len(text))]
    ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
    if not ids:
        raise UserError("the chat template rendered the assistant reply as nothing (does it drop replies?)")
    if ids[-1] not in set(tokenizer.eos_ids):
        ids.append(_stop_id(tokenizer))
    return before, ids


def encode_preference(tokenizer: Any, pair: Preference, max_len: int) -> PreferenceExample | None:
    """Encode a preference pair: the prompt rendered with the generation prompt, then each completion (the
    reply and the token(s) closing the turn, plus an EOS if the template has none), labelled only on the
    completion.

    The prompt and the completions are tokenized separately, exactly as at inference (the engine encodes
    the prompt, the model then produces the reply), so both sequences share the same prompt ids. Returns
    None when either sequence does not fit `max_len`.
    """
    _check_max_len(max_len)
    if not isinstance(pair, Preference):
        raise TypeError(f"encode_preference wants a Preference, got {type(pair).__name__}")
    prompt_text, chosen = _completion(tokenizer, pair.prompt, pair.chosen)
    _, rejected = _completion(tokenizer, pair.prompt, pair.rejected)
    prompt_ids = tokenizer.encode(prompt_text, add_bos=False)
    if not _fits(len(prompt_ids) + max(len(chosen), len(rejected)), max_len):
        return None
    p = len(prompt_ids)
    ignore = [IGNORE_INDEX] * p
    return PreferenceExample(p, prompt_ids + chosen, ignore + chosen, prompt_ids + rejected, ignore + rejected)


@dataclass
class Encoded:
    """Encoded examples that fit the context, and how many were dropped because they did not."""

    examples: list
    total: int
    max_len: int
    what: str = "conversations"  # or "preference pairs": how the summary names them

    @property
    def dropped(self) -> int:
        return self.total - len(self.examples)

    def summary(self) -> str:
        if self.dropped:
            return (f"dropped {self.dropped} of {self.total} {self.what} longer than the context "
                    f"({self.max_len} tokens)")
        return f"all {self.total} {self.what} fit the context ({self.max_len} tokens)"


EncodedSFT = Encoded  # list[SFTExample]
EncodedPreferences = Encoded  # list[PreferenceExample], what="preference pairs"


def encode_conversations(tokenizer: Any, conversations: ChatData | Iterable[list[dict]], max_len: int) -> EncodedSFT:
    """`encode_sft` over many conversations; too-long ones are dropped and counted (see `EncodedSFT.summary`)."""
    convs = conversations.conversations if isinstance(conversations, ChatData) else list(conversations)
    examples = [ex for ex in (encode_sft(tokenizer, m, max_len) for m in convs) if ex is not None]
    return Encoded(examples, len(convs), max_len)


def encode_preferences(tokenizer: Any, pairs: PreferenceData | Iterable[Preference], max_len: int) -> EncodedPreferences:
    """`encode_preference` over many pairs; too-long ones are dropped and counted."""
    items = pairs.pairs if isinstance(pairs, PreferenceData) else list(pairs)
    examples = [ex for ex in (encode_preference(tokenizer, p, max_len) for p in items) if ex is not None]
    return Encoded(examples, len(items), max_len, "preference pairs")


# ----------------------------------------------------------------------------------------------------
# Batches for fit()
# ----------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _shifted(ids_rows: Sequence[Sequence[int]], label_rows: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, lengths): inputs ids[:-1], targets labels[1:], right-padded to `width` (default:
    the longest row). Padding is masked by position -- labels past a row's length are IGNORE_INDEX --
    never by comparing ids with `pad_id`, which may equal a real EOS (the pad == eos trap)."""
    inputs = [r[:-1] for r in ids_rows]
    targets = [r[1:] for r in label_rows]
    lengths = torch.tensor([len(r) for r in inputs], dtype=torch.long)
    w = max(len(r) for r in inputs) if width is None else width
    return _pad(inputs, w, pad_id), _pad(targets, w, IGNORE_INDEX), lengths


class _EpochSampler:
    """Which example is the k-th of the run: epoch k // n is a permutation drawn from rng([seed, epoch]).
    A pure function of (seed, k); the small cache only saves recomputing permutations."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache[epoch] = perm
        return perm

    def indices(self, first: int, count: int) -> list[int]:
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(first, first + count)]


def _check_batching(n: int, batch_size: int, grad_accum: int, what: str) -> None:
    if n == 0:
        raise UserError(f"no {what} to train on (all were dropped or the data is empty)")
    for name, v in (("batch size", batch_size), ("gradient accumulation", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"the {name} must be a positive integer, got {v!r}")


class SFTBatches:
    """`DataSource` of supervised fine-tuning batches (see the module docstring for why there is no packing).

    ``train_batch(step, micro)`` -> dict of
      * ``input_ids``  (B, T) long: right-padded with `pad_id` (any id works: padding sits after every real
        token, so the causal mask already hides it, and its labels are ignored),
      * ``labels``     (B, T) long: the target of each position (already shifted), IGNORE_INDEX off the
        assistant replies and on padding,
      * ``attention_mask`` (B, T) long: 1 on real tokens, 0 on padding; ``lengths`` (B,) long,
      * ``index``      (B,) long: each row's position in `examples` (or `val_examples`), e.g. for caching.
    T is the longest input of the batch. The micro-batch (step, micro) holds the examples number
    ``(step * grad_accum + micro) * batch_size ...`` of an endless sequence of seeded per-epoch permutations,
    so batches are a pure function of (seed, step, micro). `val_batches()` covers `val_examples` once, in
    order, and is built once.
    """

    def __init__(self, examples: Sequence[SFTExample], *, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 val_examples: Sequence[SFTExample] = (), pad_id: int | None = 0,
                 device: torch.device | str | None = None) -> None:
        _check_batching(len(examples), batch_size, grad_accum, "conversations")
        self.examples, self.val_examples = list(examples), list(val_examples)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.device = torch.device(device) if device is not None else None
        self._sampler = _EpochSampler(len(self.examples), seed)
        mean_len = sum(len(e.ids) - 1 for e in self.examples) / len(self.examples)
        self.tokens_per_batch = max(1, round(batch_size * mean_len))  # an average: rows vary in length
        self._val: list[dict] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps to see every training example once."""
        return math.ceil(len(self.examples) / (self.batch_size * self.grad_accum))

    def _batch(self, items: Sequence[SFTExample], index: Sequence[int]) -> dict[str, torch.Tensor]:
        input_ids, labels, lengths = _shifted([e.ids for e in items], [e.labels for e in items], self.pad_id)
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "lengths": lengths,
                 "index": torch.tensor(list(index), dtype=torch.long)}
        return {k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * self.grad_accum + micro) * self.batch_size
        idx = self._sampler.indices(first, self.batch_size)
        return self._batch([self.examples[i] for i in idx], idx)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val is None:
            n, b = len(self.val_examples), self.batch_size
            self._val = [self._batch(self.val_examples[i:i + b], range(i, min(i + b, n))) for i in range(0, n, b)]
        return self._val


class PreferenceBatches:
    """`DataSource` of preference batches for DPO-style objectives; sampled like `SFTBatches`.

    ``train_batch(step, micro)`` -> dict with ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (all (B, T) long, one common T so chosen and rejected can be
    concatenated into one (2B, T) forward pass; labels shifted and IGNORE_INDEX on the prompt and padding),
    ``chosen_attention_mask``/``rejected_attention_mask`` (B, T), ``chosen_lengths``/``rejected_lengths``,
    ``prompt_lens`` (B,) and ``index`` (B,) (row positions in `examples`/`val_examples`, e.g. to look up
    reference log-probs computed once).
    """

    def __init__(self, examples: Sequence[PreferenceExample], *, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, val_examples: Sequence[PreferenceExample] = (), pad_id: int | None = 0,
                 device: torch.device | str | None = None) -> None:
        _check_batching(len(examples), batch_size, grad_accum, "preference pairs")
        self.examples, self.val_examples = list(examples), list(val_examples)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.device = torch.device(device) if device is not None else None
        self._sampler = _EpochSampler(len(self.examples), seed)
        mean_len = sum(len(e.chosen_ids) + len(e.rejected_ids) - 2 for e in self.examples) / len(self.examples)
        self.tokens_per_batch = max(1, round(batch_size * mean_len))
        self._val: list[dict] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / (self.batch_size * self.grad_accum))

    def _batch(self, items: Sequence[PreferenceExample], index: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in items) - 1
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids, labels, lengths = _shifted([getattr(e, f"{side}_ids") for e in items],
                                            [getattr(e, f"{side}_labels") for e in items], self.pad_id, width)
            batch[f"{side}_input_ids"], batch[f"{side}_labels"], batch[f"{side}_lengths"] = ids, labels, lengths
            batch[f"{side}_attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch["prompt_lens"] = torch.tensor([e.prompt_len for e in items], dtype=torch.long)
        batch["index"] = torch.tensor(list(index), dtype=torch.long)
        return {k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * self.grad_accum + micro) * self.batch_size
        idx = self._sampler.indices(first, self.batch_size)
        return self._batch([self.examples[i] for i in idx], idx)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val is None:
            n, b = len(self.val_examples), self.batch_size
            self._val = [self._batch(self.val_examples[i:i + b], range(i, min(i + b, n))) for i in range(0, n, b)]
        return self._val
