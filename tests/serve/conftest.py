"""Fixtures for the server tests: a tiny chat model and a factory of live servers (see live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.live import LiveServer, start_server


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with a chat template; its sharpened embeddings make greedy text vary by prompt."""
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("served") / "tiny-chat", tiny_tokenizer, context_length=128,
                           embedding_scale=8.0)


@pytest.fixture
def live_server():
    """A factory: `live_server({"name": path}, **options)` -> LiveServer; every server is stopped afterwards."""
    started: list[LiveServer] = []

    def make(models: dict[str, Path] | None, **options) -> LiveServer:
        s = start_server(models, **options)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(autouse=True)
def _kernels_built(_isolated_home):
    """Compile the CPU kernels (once per session, into the shared cache) before a server test starts: a
    model's first forward pass inside a request would otherwise spend the compile (tens of seconds) in the
    middle of an HTTP call with a client timeout of a few seconds. After the first test this costs nothing."""
    from lmforge.engine import fastpath
    from lmforge.quant import kernels

    kernels.available()
    fastpath.available()
