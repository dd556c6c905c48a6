"""Shared fixtures: an isolated LMFORGE_HOME for every test, a tiny trained tokenizer, a tiny corpus."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Caches and the model store of a test never touch the user's ~/.lmforge."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path_factory.mktemp("lmforge_home")))
    monkeypatch.setenv("TQDM_DISABLE", "1")


def make_corpus(n_lines: int = 3000, seed: int = 0) -> str:
    """Repetitive but structured English-like text: learnable in a few dozen steps by a tiny model."""
    rng = random.Random(seed)
    subjects = ["the model", "a token", "the cache", "our loss", "each layer", "the data"]
    verbs = ["reads", "writes", "predicts", "learns", "counts", "returns"]
    objects = ["the next word", "a long sentence", "the value", "every byte", "some text", "the answer"]
    return "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([make_corpus()], 320, show_progress=False)
