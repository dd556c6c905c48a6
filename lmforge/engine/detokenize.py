"""Streaming text out of a token stream: UTF-8-safe incremental detokenizing and stop-string matching.

Why this design
---------------
* **Bytes, then an incremental UTF-8 decoder.** A byte-level BPE token is a run of *bytes*, and one
  character (an emoji: 4 bytes) may be split over several tokens. Decoding each token on its own would
  print U+FFFD halves; re-decoding the whole sequence at every step would be O(n) per token. Instead each
  token's bytes (`Tokenizer.token_bytes`) go through the standard library's incremental UTF-8 decoder,
  which emits every complete character at once and holds back only an unfinished one: O(1) amortised per
  token, and the concatenated output is exactly `bytes.decode("utf-8", errors="replace")` of all bytes,
  which is what `Tokenizer.decode` produces.
* **Stop strings on text, not tokens.** A stop string can span tokens ("\\n\\nUser:" may arrive as
  "\\n", "\\nUs", "er:"), so `StopMatcher` works on the streamed text and holds back only a tail that
  could still be the beginning of a stop string; everything else is released at once, so streaming stays
  as immediate as it can be without ever showing text that a stop would have cut.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "StopMatcher"]


class _HasTokenBytes(Protocol):
    def token_bytes(self, id: int) -> bytes: ...


class IncrementalDetokenizer:
    """Turn token ids into text one token at a time, never emitting half a character.

    Invariant: ``"".join(d.add(i) for i in ids) + d.flush() == tokenizer.decode(ids)``.

    >>> d = IncrementalDetokenizer(tok)     # "😀" = F0 9F 98 80, say as tokens [F0], [9F 98], [80]
    >>> d.add(a), d.add(b), d.add(c)        # ('', '', '😀')
    """

    def __init__(self, tokenizer: _HasTokenBytes) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text completed by this token ("" while a multi-byte character is still incomplete)."""
        return self._decoder.decode(self._token_bytes(token_id))

    def extend(self, token_ids: Iterable[int]) -> str:
        """`add` for several tokens at once (e.g. a prompt echo); returns the completed text."""
        return self._decoder.decode(b"".join(self._token_bytes(i) for i in token_ids))

    def flush(self) -> str:
        """What is left at the end: an incomplete character's bytes become U+FFFD. Resets the state."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cut a text stream at the first occurrence of any stop string, across chunk boundaries.

    Semantics (same as a non-streaming OpenAI completion): if T is the concatenation of everything
    pushed, the emitted text is ``T[:i]`` where ``i`` is the smallest START index of an occurrence of any
    stop string in T (the stop string itself is not emitted), or all of T if none occurs. Earliest start
    wins even over an occurrence that completes earlier: with stops ["abcd", "bc"], "abcd" gives "" and
    "abcX" gives "a". When two stop strings start at the same index (one is a prefix of the other) the
    output is the same whichever is chosen. The result never depends on how the text was chunked.

    `push` releases text as soon as no stop string can start in it, holding back only a tail that could
    still grow into a stop string (at most max(len(stop)) - 1 characters, plus, while an earlier-starting
    stop is still possible, the occurrence it would override). A hit is reported once it is certain: by
    `push` returning True, or, when the stream ends while undecided, by `flush` (see `stopped`).
    After a hit, `push` returns ("", True) and `flush` returns "".
    """

    def __init__(self, stops: Iterable[str]) -> None:
        if isinstance(stops, str):
            raise ValueError("stop strings must be a list of str, not one str")
        stops = list(stops)
        if any(not isinstance(s, str) for s in stops):
            raise ValueError("stop strings must be a list of str")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops: list[str] = list(dict.fromkeys(stops))  # dedupe, keep order
        self._held = ""  # text received but not yet emitted
        self.stopped = False  # True once a stop string has been hit (by push or by flush)
        self.stop_hit: str | None = None  # which stop string cut the text

    def _first_occurrence(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the earliest-starting complete occurrence in `text`, longest stop at a tie."""
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _first_partial(self, text: str) -> int:
        """Smallest j such that text[j:] is a proper prefix of some stop string (len(text) if none):
        positions from j on could still begin a stop string once more text arrives."""
        n = len(text)
        first = n
        for s in self.stops:
            # Longest candidate first: it starts earliest, so the first hit settles this stop string.
            for length in range(min(len(s) - 1, n), 0, -1):
                if n - length >= first:
                    break
                if text.endswith(s[:length]):
                    first = n - length
                    break
        return first

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        held = self._held + text
        if not self.stops:
            self._held = ""
            return held, False
        hit = self._first_occurrence(held)
        pending = self._first_partial(held)
        if hit is not None and hit[0] <= pending:
            # No stop string can start before this occurrence any more: it is the first one.
            self.stopped, self.stop_hit, self._held = True, hit[1], ""
            return held[: hit[0]], True
        # Everything before the first possible start is final; keep the rest (which may contain an
        # occurrence that an earlier-starting, still-incomplete stop string would override).
        self._held = held[pending:]
        return held[:pending], False

    def flush(self) -> str:
        """Release the held-back tail at the end of the stream, cut at a stop string if one is in it."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        hit = self._first_occurrence(held)
        if hit is not None:
            self.stopped, self.stop_hit = True, hit[1]
            return held[: hit[0]]
        return held
