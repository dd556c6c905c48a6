"""Feedback from the chat UI, kept as training data for the next round of fine-tuning.

Three JSONL files under `$LMFORGE_HOME/feedback/` (or the server's `--feedback-dir`), each in a format
lmforge's trainers read directly:

* `ratings.jsonl`     every rating: {"model", "time", "messages", "response", "rating", "better"} (the log);
* `sft.jsonl`         {"messages": [..., {"role": "assistant", "content": answer}]} for every answer a user
                      wrote or approved (a better answer, or a thumbs-up)  ->  `lmforge finetune --data`;
* `preferences.jsonl` {"prompt": messages, "chosen": better, "rejected": response} for every better answer
                      that differs from the model's  ->  `lmforge align --data`.

Each record is one `write` of one line to a file opened for appending, under a lock, so concurrent
requests never interleave their lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from lmforge.paths import home

_lock = threading.Lock()


def feedback_dir(override: Path | None = None) -> Path:
    return Path(override) if override is not None else home() / "feedback"


def _append(path: Path, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def save_feedback(directory: Path | None, model: str, messages: list[dict], response: str, rating: str | None,
                  better: str | None) -> list[str]:
    """Record one piece of feedback; returns the names of the files written (no paths: they go to clients)."""
    d = feedback_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    better = better.strip() if better and better.strip() else None
    _append(d / "ratings.jsonl", {"model": model, "time": time.time(), "messages": messages, "response": response,
                                  "rating": rating, "better": better})
    saved = ["ratings.jsonl"]
    answer = better if better is not None else (response if rating == "up" and response.strip() else None)
    if answer is not None:
        _append(d / "sft.jsonl", {"messages": [*messages, {"role": "assistant", "content": answer}]})
        saved.append("sft.jsonl")
    if better is not None and better != response.strip():
        _append(d / "preferences.jsonl", {"prompt": messages, "chosen": better, "rejected": response})
        saved.append("preferences.jsonl")
    return saved
