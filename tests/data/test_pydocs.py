"""Tests for ``builtin:pydocs``, the corpus built from the running Python's own documentation.

A full build parses the standard library (about two seconds), so the tests share the
in-memory cached build and make exactly one fresh build, used both for the determinism
check and for the "nothing was imported" check.
"""

from __future__ import annotations

import sys

import pytest

from lmforge.data import pydocs
from lmforge.data.pydocs import DocEntry, iter_doc_entries, pydocs_corpus_hash, pydocs_documents

# Modules whose import has visible side effects (a browser, printed text, a display) or that
# would only be loaded by importing the stdlib wholesale.
_SIDE_EFFECT_MODULES = ("antigravity", "this", "tkinter", "idlelib", "turtle", "turtledemo", "webbrowser")


@pytest.fixture(scope="module")
def entries() -> list[DocEntry]:
    return list(iter_doc_entries())


def test_fresh_build_is_deterministic_and_imports_nothing(entries: list[DocEntry]) -> None:
    # `entries` came from the cached build; a second, uncached build must match it exactly.
    before = set(sys.modules)
    fresh = pydocs._build()
    newly_imported = set(sys.modules) - before

    assert list(fresh.entries) == entries
    for name in _SIDE_EFFECT_MODULES:
        assert name not in newly_imported
        if name in ("antigravity", "this"):
            assert name not in sys.modules
    # The only imports a build may trigger are codecs for PEP 263 coding declarations.
    assert all(name.startswith("encodings.") for name in newly_imported), sorted(newly_imported)


def test_documents_are_cached_copies_in_entry_order(entries: list[DocEntry]) -> None:
    docs = pydocs_documents()
    assert len(docs) == len(entries)
    assert docs[0] == f"{entries[0].qualname}\n\n{entries[0].text}"  # a topic: headed by its name
    docs.clear()  # a fresh list each call: mutating it must not corrupt the cache
    assert pydocs_documents()


def test_corpus_size_is_sane() -> None:
    total = sum(len(doc.encode("utf-8")) for doc in pydocs_documents())
    assert 500_000 < total < 20_000_000


def test_contains_known_function_and_its_document(entries: list[DocEntry]) -> None:
    dedent = [e for e in entries if (e.module, e.qualname, e.kind) == ("textwrap", "dedent", "function")]
    assert len(dedent) == 1
    assert dedent[0].text.startswith("Remove any common leading whitespace")
    assert f"textwrap.dedent\n\n{dedent[0].text}" in pydocs_documents()


def test_contains_methods_classes_and_modules(entries: list[DocEntry]) -> None:
    keys = {(e.module, e.qualname, e.kind) for e in entries}
    assert ("textwrap", "TextWrapper", "class") in keys
    assert ("textwrap", "TextWrapper.wrap", "method") in keys
    assert ("json", "", "module") in keys
    assert any(e.module == "email.mime.text" for e in entries)  # dotted names for packages


def test_contains_topics_first(entries: list[DocEntry]) -> None:
    topic_names = [e.qualname for e in entries if e.kind == "topic"]
    assert "assert" in topic_names
    assert all(e.module == "pydoc_data.topics" for e in entries if e.kind == "topic")
    assert topic_names == sorted(topic_names)
    n_topics = len(topic_names)
    assert all(e.kind == "topic" for e in entries[:n_topics])
    assert all(e.kind != "topic" for e in entries[n_topics:])


def test_modules_in_sorted_order(entries: list[DocEntry]) -> None:
    modules = [e.module for e in entries if e.kind != "topic"]
    assert modules == sorted(modules)


def test_no_duplicate_or_trivial_texts(entries: list[DocEntry]) -> None:
    texts = [e.text for e in entries]
    assert len(texts) == len(set(texts))
    assert all(len(t) >= pydocs.MIN_DOC_CHARS for t in texts)
    assert all(t == t.strip() for t in texts)
    assert all(line == line.rstrip() for t in texts for line in t.splitlines())


def test_no_private_names_tests_or_main(entries: list[DocEntry]) -> None:
    for e in entries:
        if e.kind == "topic":
            continue
        for part in e.module.split(".") + (e.qualname.split(".") if e.qualname else []):
            assert not part.startswith("_") or (part.startswith("__") and part.endswith("__")), e
            assert part.isidentifier(), e
        assert not any(part.startswith("__") and part.endswith("__") for part in e.qualname.split(".")), e
        parts = e.module.split(".")
        assert "test" not in parts and "tests" not in parts and "idle_test" not in parts, e
        assert "site-packages" not in e.module and parts[-1] != "__main__", e
        assert e.kind in {"module", "class", "function", "method"}, e


def test_corpus_hash_is_stable_and_cheap() -> None:
    first = pydocs_corpus_hash()
    assert first == pydocs_corpus_hash()
    assert len(first) == 64 and int(first, 16) >= 0


def test_module_name_rules() -> None:
    assert pydocs._module_name("email/mime/text.py") == "email.mime.text"
    assert pydocs._module_name("email/__init__.py") == "email"
    assert pydocs._module_name("__future__.py") == "__future__"
    assert pydocs._module_name("json/__main__.py") is None
    assert pydocs._module_name("_pydecimal.py") is None
    assert pydocs._module_name("importlib/_bootstrap.py") is None
    assert pydocs._module_name("config-3.11-x86_64-linux-gnu/python-config.py") is None


def test_walk_skips_nested_functions_private_and_dunder(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "site-packages").mkdir()
    long = "x" * pydocs.MIN_DOC_CHARS
    (pkg / "__init__.py").write_text(f'"""Package docs {long}."""\n')
    (pkg / "mod.py").write_text(
        f'"""Module docs {long}."""\n'
        "import sys\n"
        "if sys.platform == 'win32':\n"
        f"    def plat():\n        '''Windows flavour {long}.'''\n"
        "else:\n"
        f"    def plat():\n        '''Windows flavour {long}.'''\n"
        f"def outer():\n    '''Outer docs {long}.'''\n"
        f"    def inner():\n        '''Inner docs {long}.'''\n"
        f"def _private():\n    '''Private docs {long}.'''\n"
        "def short():\n    '''Too short.'''\n"
        f"class Thing:\n    '''Thing docs {long}.'''\n"
        f"    def __init__(self):\n        '''Init docs {long}.'''\n"
        f"    async def run(self):\n        '''Run docs {long}.'''\n"
        f"    class Inner:\n        '''Inner class docs {long}.'''\n"
    )
    (pkg / "broken.py").write_text("def (:\n")
    (tmp_path / "test" / "test_x.py").write_text(f'"""Test docs {long}."""\n')
    (tmp_path / "site-packages" / "third.py").write_text(f'"""Third-party docs {long}."""\n')
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text(
        f"topics = {{'zeta': 'Zeta topic {long}\\n', 'alpha': 'Alpha topic ' 'concatenated {long}'}}\n"
    )

    build = pydocs._build(str(tmp_path))
    got = [(e.module, e.qualname, e.kind) for e in build.entries]
    assert got == [
        ("pydoc_data.topics", "alpha", "topic"),
        ("pydoc_data.topics", "zeta", "topic"),
        ("pkg", "", "module"),
        ("pkg.mod", "", "module"),
        ("pkg.mod", "plat", "function"),  # the identical else-branch docstring is deduplicated
        ("pkg.mod", "outer", "function"),
        ("pkg.mod", "Thing", "class"),
        ("pkg.mod", "Thing.run", "method"),
        ("pkg.mod", "Thing.Inner", "class"),
    ]
    assert build.entries[0].text == f"Alpha topic concatenated {long}"
    assert build.entries[1].text == f"Zeta topic {long}"
    assert build.skipped_files == ("pkg/broken.py",)
