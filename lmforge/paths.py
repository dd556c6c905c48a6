"""Where lmforge keeps things: `$LMFORGE_HOME` (default `~/.lmforge`) holds the model store and caches."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".lmforge").expanduser()


def cache_dir(kind: str) -> Path:
    """`$LMFORGE_HOME/cache/<kind>`: derived data (token shards, trained tokenizers) safe to delete."""
    return home() / "cache" / kind
