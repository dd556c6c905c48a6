"""Streaming detokenizer (never half a character, byte-identical to decode) and stop-string matching
(chunking-independent, earliest start wins, minimal hold-back)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.engine.detokenize import IncrementalDetokenizer, StopMatcher

FIXTURE_OK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Multi-byte characters the 320-token tokenizer has never merged: they arrive one byte per token.
PIECES = list("ab the\n") + ["é", "ß", "日", "本", "€", "😀", "🚀", "👍🏽", "\u200d"]
MIXED = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


def stream(tok, ids: list[int]) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok)
    return [d.add(i) for i in ids], d.flush()


# ----------------------------------------------------------------------------------------------------
# IncrementalDetokenizer
# ----------------------------------------------------------------------------------------------------


def test_emoji_split_across_byte_tokens_is_held_back(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a😀b", allow_special=False)
    emoji = tiny_tokenizer.encode("😀", allow_special=False)
    assert len(emoji) == 4 and [len(tiny_tokenizer.token_bytes(i)) for i in emoji] == [1, 1, 1, 1]
    deltas, rest = stream(tiny_tokenizer, ids)
    assert deltas == ["a", "", "", "", "😀", "b"]
    assert rest == ""


def test_incomplete_character_at_the_end_is_replaced_on_flush(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x😀", allow_special=False)[:-1]  # drop the emoji's last byte
    deltas, rest = stream(tiny_tokenizer, ids)
    assert "".join(deltas) == "x"
    assert rest == "\ufffd"
    assert "".join(deltas) + rest == tiny_tokenizer.decode(ids)


def test_special_tokens_stream_as_their_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hi<|im_end|>")
    deltas, rest = stream(tiny_tokenizer, ids)
    assert "".join(deltas) + rest == "hi<|im_end|>" == tiny_tokenizer.decode(ids)


def test_flush_resets_and_extend_matches_add(tiny_tokenizer):
    ids = tiny_tokenizer.encode("日本 the 😀", allow_special=False)
    d = IncrementalDetokenizer(tiny_tokenizer)
    assert d.extend(ids[:-1]) + d.extend(ids[-1:]) + d.flush() == "日本 the 😀"
    assert d.add(ids[0]) + d.flush() == "\ufffd"  # the first byte of 日 alone, after a reset


class CountingTokenizer:
    """Records every lookup, to prove the detokenizer never re-decodes earlier tokens."""

    def __init__(self, table: dict[int, bytes]) -> None:
        self.table, self.calls = table, 0

    def token_bytes(self, id: int) -> bytes:
        self.calls += 1
        return self.table[id]


def test_one_lookup_per_token():
    tok = CountingTokenizer({0: b"\xf0", 1: b"\x9f\x98", 2: b"\x80 ok"})
    d = IncrementalDetokenizer(tok)
    out = [d.add(i) for i in [0, 1, 2] * 100]
    assert tok.calls == 300
    assert out[:3] == ["", "", "😀 ok"]
    assert "".join(out) + d.flush() == "😀 ok" * 100


@FIXTURE_OK
@given(text=MIXED)
def test_stream_equals_decode_for_encoded_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, allow_special=False)
    deltas, rest = stream(tiny_tokenizer, ids)
    assert "".join(deltas) + rest == tiny_tokenizer.decode(ids) == text
    for delta in deltas:
        assert "\ufffd" not in delta  # valid input never shows a replacement character mid-stream


@FIXTURE_OK
@given(data=st.data())
def test_stream_equals_decode_for_arbitrary_ids(tiny_tokenizer, data):
    # Arbitrary ids: truncated and invalid UTF-8, special tokens between the bytes of a character...
    ids = data.draw(st.lists(st.integers(0, tiny_tokenizer.vocab_size - 1), max_size=30))
    deltas, rest = stream(tiny_tokenizer, ids)
    assert "".join(deltas) + rest == tiny_tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------
# StopMatcher
# ----------------------------------------------------------------------------------------------------


def expected_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The specification: text before the earliest-starting occurrence of any stop string."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(starts)], True) if starts else (text, False)


def run_matcher(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    out, hit = [], False
    for c in chunks:
        text, hit = m.push(c)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), m.stopped, out


def test_stop_spanning_chunks():
    out, hit, parts = run_matcher(["\n\nUser:"], ["Hello", " there\n", "\nUs", "er: more", " text"])
    assert (out, hit) == ("Hello there", True)
    assert parts == ["Hello", " there", "", ""]  # the lone "\n" waited; nothing after the cut is shown


def test_holds_back_only_a_possible_prefix():
    m = StopMatcher(["END"])
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("x") == ("ENx", False)  # disambiguated: released at once
    assert m.push("yEN") == ("y", False)
    assert m.push("D tail") == ("", True)
    assert m.stop_hit == "END" and m.stopped
    assert m.push("more") == ("", True)  # after a hit nothing more comes out
    assert m.flush() == ""


def test_flush_releases_an_unfinished_prefix():
    m = StopMatcher(["END"])
    assert m.push("the EN") == ("the ", False)
    assert m.flush() == "EN"
    assert not m.stopped


def test_earliest_start_wins_over_earliest_end():
    # "bc" completes first, but "abcd" starts earlier: wait until "abcd" is decided.
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xabc") == ("x", False)
    assert m.push("d") == ("", True)
    assert m.stop_hit == "abcd"
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xabc") == ("x", False)
    assert m.push("X") == ("a", True)
    assert m.stop_hit == "bc"
    # The stream ends while undecided: flush applies the stop that did occur.
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xabc") == ("x", False)
    assert m.flush() == "a" and m.stopped and m.stop_hit == "bc"


def test_same_start_needs_no_waiting():
    m = StopMatcher(["ab", "abc"])
    assert m.push("zab") == ("z", True)  # "abc" might still follow, but the output is "z" either way
    assert m.stop_hit == "ab"
    m = StopMatcher(["ab", "abc"])
    assert m.push("zabc") == ("z", True)
    assert m.stop_hit == "abc"  # both occur at the same start: the longer one is reported


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_string_is_rejected(stops):
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(stops)


def test_a_bare_string_is_rejected():
    with pytest.raises(ValueError):
        StopMatcher("END")  # type: ignore[arg-type]


def chunkings(text: str):
    return st.lists(st.integers(0, len(text)), max_size=8).map(
        lambda cuts: [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    )


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_stop_matching_is_chunking_independent(data):
    alphabet = st.sampled_from("abc😀")
    stops = data.draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    text = data.draw(st.text(alphabet, max_size=24))
    chunks = data.draw(chunkings(text))
    assert "".join(chunks) == text

    out, hit, _ = run_matcher(stops, chunks)
    assert (out, hit) == expected_cut(text, stops)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_only_a_possible_stop_prefix_is_ever_held_back(data):
    alphabet = st.sampled_from("ab\n")
    stops = data.draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    chunks = data.draw(st.lists(st.text(alphabet, max_size=5), max_size=8))
    m, pushed, emitted = StopMatcher(stops), "", ""
    for c in chunks:
        pushed += c
        text, hit = m.push(c)
        emitted += text
        if hit:
            break
        held = pushed[len(emitted):]
        assert pushed.startswith(emitted)
        assert held == "" or any(len(held) < len(s) and s.startswith(held) for s in stops)
