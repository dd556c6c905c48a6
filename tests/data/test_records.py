"""Chat and preference records (lmforge.data.records): validation with line numbers, built-in data, splits."""

from __future__ import annotations

import json

import pytest

from lmforge.data.records import check_conversation, read_conversations, read_preferences, train_val_split
from lmforge.errors import UserError


def write_jsonl(path, lines: list) -> str:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return str(path)


# ----------------------------------------------------------------------------------------------------
# Reading conversations
# ----------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]}


def test_each_bad_conversation_record_is_reported_with_its_line(tmp_path):
    u, a = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "r"})
    lines = [
        GOOD,  # 1
        "{not json",  # 2
        [1, 2],  # 3
        {"text": "hi"},  # 4
        {"messages": [u, {"role": "bot", "content": "x"}]},  # 5
        {"messages": [u, {"role": "assistant", "content": ["x"]}]},  # 6
        {"messages": [u, {"role": "assistant", "content": "  "}]},  # 7
        {"messages": [u]},  # 8
        {"messages": [u, a, {"role": "system", "content": "s"}, u, a]},  # 9
        "",  # 10: blank lines are skipped silently
        b"\xff\xfe not utf-8",  # 11
        {"messages": [a, u, a]},  # 12
        {"messages": [u, u, a]},  # 13
        {"messages": [u, a, u]},  # 14
        {"messages": []},  # 15
        {"messages": [{"role": "system", "content": "s"}, u, a], "id": 7},  # 16: extra keys are fine
        {"messages": [u, {"role": "assistant"}]},  # 17
    ]
    data = read_conversations(write_jsonl(tmp_path / "chat.jsonl", lines))
    assert len(data) == 2 and data.records == 16
    reasons = dict(data.problems)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 17]
    expect = {
        2: "not valid JSON", 3: "expected a JSON object", 4: 'no "messages"', 5: "unknown role 'bot'",
        6: "non-string content", 7: "empty assistant reply", 8: "no assistant message", 9: "only the first",
        11: "not valid UTF-8", 12: "must start with a user message", 13: "must alternate", 14: "ends with the assistant",
        15: "empty list", 17: "non-string content (no content)",
    }
    for line, needle in expect.items():
        assert needle in reasons[line], (line, reasons[line])
    assert data.summary().startswith(f"{tmp_path / 'chat.jsonl'}: 2 conversations from 16 records; skipped 14: line 2:")
    assert data.conversations[1] == [{"role": "system", "content": "s"}, u, a]


def test_a_file_without_usable_records_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"messages": "x"}])
    with pytest.raises(UserError, match=r"bad\.jsonl: no usable conversation in 2 records: line 1: not valid JSON"):
        read_conversations(path)
    with pytest.raises(UserError, match="no records"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(UserError, match="does not exist"):
        read_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="preference data"):
        read_conversations("builtin:pydocs-prefs")
    with pytest.raises(UserError, match="unknown split"):
        read_conversations("builtin:pydocs-qa:test")
    with pytest.raises(UserError, match="unknown built-in"):
        read_conversations("builtin:nope")


def test_limit_and_builtin_specs():
    data = read_conversations("builtin:pydocs-qa:heldout", limit=5)
    assert len(data) == 5 and check_conversation(data.conversations[0]) is None
    assert len(read_conversations("builtin:pydocs-qa")) == len(read_conversations("builtin:pydocs-qa:train"))


def test_train_val_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = train_val_split(items, val_fraction=0.1, seed=3)
    assert (train, val) == train_val_split(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert train_val_split([1], val_fraction=0.1) == ([1], [])


# ----------------------------------------------------------------------------------------------------
# Reading preference pairs
# ----------------------------------------------------------------------------------------------------


def test_preference_formats_and_bad_records(tmp_path):
    u = {"role": "user", "content": "q"}
    lines = [
        {"prompt": "What is it?", "chosen": "A cache.", "rejected": "A dog."},  # 1
        {"prompt": [{"role": "system", "content": "s"}, u], "chosen": [{"role": "assistant", "content": "yes."}],
         "rejected": [{"role": "assistant", "content": "no."}]},  # 2: TRL conversational
        {"chosen": [u, {"role": "assistant", "content": "yes."}], "rejected": [u, {"role": "assistant", "content": "no."}]},  # 3
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # 4
        {"prompt": "q", "chosen": "", "rejected": "x"},  # 5
        {"chosen": "a", "rejected": "b"},  # 6
        {"prompt": [u, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},  # 7
        {"prompt": "q", "chosen": "a"},  # 8
        {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # 9
        {"prompt": 5, "chosen": "a", "rejected": "b"},  # 10
        {"prompt": "  ", "chosen": "a", "rejected": "b"},  # 11
        {"prompt": "q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
         "rejected": "b"},  # 12
    ]
    data = read_preferences(write_jsonl(tmp_path / "prefs.jsonl", lines))
    assert [p.chosen for p in data.pairs] == ["A cache.", "yes.", "yes."]
    assert data.pairs[0].prompt == [{"role": "user", "content": "What is it?"}]
    assert data.pairs[1].prompt[0]["role"] == "system" and data.pairs[2].prompt == [u]
    reasons = dict(data.problems)
    expect = {4: "the same reply", 5: 'empty "chosen"', 6: 'no "prompt"', 7: "must end with a user message",
              8: 'no "rejected"', 9: "must be the assistant's reply", 10: '"prompt" must be a string',
              11: "empty prompt", 12: "differ from the prompt"}
    assert sorted(reasons) == sorted(expect)
    for line, needle in expect.items():
        assert needle in reasons[line], (line, reasons[line])
    with pytest.raises(UserError, match="no usable preference pair"):
        read_preferences(write_jsonl(tmp_path / "bad.jsonl", [lines[3]]))
    with pytest.raises(UserError, match="conversation data"):
        read_preferences("builtin:pydocs-qa")
