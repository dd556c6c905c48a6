"""Feedback from the chat UI, kept as training data for the next round of fine-tuning.

One JSONL file, `$LMFORGE_HOME/feedback/feedback.jsonl` (or under the server's `--feedback-dir`), one line
per piece of feedback, each written once:

    {"model", "time", "messages", "response", "rating": "up" | "down" | null, "better": text | null}

lmforge's trainers read it as it is (`lmforge.data.records`): `lmforge finetune --data feedback.jsonl`
trains on every answer a user wrote or approved (a better answer, or a thumbs-up), and `lmforge align
--data feedback.jsonl` on every better answer that differs from the model's, as chosen over the model's.
(Earlier versions wrote up to three copies of a record, to ratings.jsonl, sft.jsonl and preferences.jsonl;
the readers still take those files.)

Each record is one `write` of one line to a file opened for appending, under a lock, so concurrent
requests never interleave their lines.

Limits, because feedback is written to disk by anyone who can reach the server: a record (one line) is at
most `max_record` bytes (413), a file stops growing at `max_file` bytes (507: move it away, or train on it),
and `RateLimit` lets a steady `per_minute` records through (429 with Retry-After beyond). Text with a control
token's literal text is refused before anything is written, by the rule the chat routes use
(`Tokenizer.control_token_in`): in a training file it would become real turn boundaries.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from lmforge.paths import home

_lock = threading.Lock()
FILE = "feedback.jsonl"


class FeedbackRefused(Exception):
    """Feedback that is not written: `status` and `code` for the HTTP error."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class RateLimit:
    """A token bucket: `per_minute` records a minute on average, bursts of up to `burst`."""

    def __init__(self, per_minute: float, burst: int = 10, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60.0, burst, clock
        self.tokens, self.last = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when a record may be written now (and counts it), else the seconds until one may."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate if self.rate > 0 else float("inf")


def feedback_dir(override: Path | None = None) -> Path:
    return Path(override) if override is not None else home() / "feedback"


def _line(record: dict, max_record: int) -> bytes:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    if len(line) > max_record:
        raise FeedbackRefused(413, f"this feedback is {len(line)} bytes as a record; the limit is {max_record}",
                              "feedback_too_large")
    return line


def _append(path: Path, line: bytes, max_file: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size + len(line) > max_file:
            raise FeedbackRefused(507, f"{path.name} has reached its size limit ({max_file} bytes): move it "
                                  f"away (or train on it) to collect more", "feedback_full")
        os.write(fd, line)
    finally:
        os.close(fd)


def save_feedback(directory: Path | None, model: str, messages: list[dict], response: str, rating: str | None,
                  better: str | None, *, max_record: int = 256 * 1024, max_file: int = 64 << 20) -> list[str]:
    """Record one piece of feedback; returns the name of the file written (no path: it goes to clients).
    `FeedbackRefused` when a limit says no; then nothing is written."""
    d = feedback_dir(directory)
    better = better.strip() if better and better.strip() else None
    line = _line({"model": model, "time": time.time(), "messages": messages, "response": response,
                  "rating": rating, "better": better}, max_record)
    d.mkdir(parents=True, exist_ok=True)
    with _lock:
        _append(d / FILE, line, max_file)
    return [FILE]
