"""`lmforge sweep` (issue 18): being built; registers nothing yet."""

from __future__ import annotations

import argparse


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `sweep` to `sub`; returns the parsers whose numeric flags get short metavars."""
    return []
