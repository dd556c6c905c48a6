"""``builtin:pydocs``: the documentation of the running Python, as a training corpus.

lmforge needs a default corpus that is present on every machine it runs on, costs no
download and carries no licensing surprises. The Python installation that runs lmforge
already ships a few megabytes of well-edited English prose about programming: the
``pydoc_data.topics`` help topics (the text behind ``help("assert")``) and the docstrings
of the standard library. This module turns those into a list of plain-text documents.

Design choices, and why:

* **Docstrings come from the source files, parsed with** :mod:`ast`, never from importing
  the modules. Importing the standard library wholesale has side effects (``antigravity``
  opens a web browser, ``this`` prints the Zen of Python, ``idlelib`` and ``tkinter`` may
  want a display), is slow, and depends on which optional C extensions were built. Parsing
  is side-effect free and gives the same answer on every machine with the same sources.
  ``pydoc_data/topics.py`` is parsed the same way: its ``topics`` dict is a literal, so
  :func:`ast.literal_eval` reads it without executing anything.
* **Deterministic order.** Directories and files are walked sorted, topics come first
  (sorted by name), then modules sorted by dotted name. A corpus whose order changes from
  run to run would make tokenizer training and data splits irreproducible.
* **Deduplication.** The standard library repeats itself: ``typing.overload`` stubs,
  platform-specific branches (``if sys.platform == "win32": def f(): ...``), re-implemented
  ABC methods and copied docstrings. Repeated text would be over-weighted in training and
  leak between train and validation splits, so each distinct text is kept once, at its
  first occurrence in the deterministic order.
* **Filtering.** Private names (a leading underscore, in the module path or the qualified
  name), dunder methods, functions nested in functions, ``__main__.py``, test packages and
  ``site-packages`` are skipped: they are implementation detail, test scaffolding or not
  part of the installation's own documentation. Docstrings shorter than
  :data:`MIN_DOC_CHARS` (``"Return self."``) carry almost no language and are dropped.
* **Cheap fingerprint.** :func:`pydocs_corpus_hash` only stats files, so callers can key
  caches of derived artefacts (token ids, trained tokenizers) on it without rebuilding the
  corpus.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterator

__all__ = ["DocEntry", "iter_doc_entries", "pydocs_documents", "pydocs_corpus_hash", "named_documents"]

#: Docstrings (and topics) shorter than this many characters are dropped: one-liners such
#: as "Return self." teach a language model nothing and only add near-duplicates.
MIN_DOC_CHARS = 40

#: Bump when the extraction rules change, so fingerprints of old corpora stop matching.
_EXTRACTOR_VERSION = 1

#: Directory names never descended into: third-party code, test suites and caches are not
#: the installation's own documentation (``lib2to3/tests`` and ``idlelib/idle_test`` included).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

#: Where the help topics live, relative to the stdlib directory.
_TOPICS_RELPATH = "pydoc_data/topics.py"
_TOPICS_MODULE = "pydoc_data.topics"

# ast.TryStar exists from Python 3.11 on; on 3.10 the tuple simply lacks it.
_BLOCK_NODES: tuple[type[ast.AST], ...] = tuple(
    node for node in (ast.If, ast.Try, getattr(ast, "TryStar", None), ast.With) if node is not None
)


@dataclass(frozen=True)
class DocEntry:
    """One piece of documentation: a module, class, function or method docstring, or a help topic."""

    module: str  # e.g. "textwrap", "email.mime.text"; "pydoc_data.topics" for topics
    qualname: str  # e.g. "dedent", "TextWrapper.wrap"; "" for a module docstring; the topic name for topics
    kind: str  # "module" | "class" | "function" | "method" | "topic"
    text: str  # cleaned docstring (ast.get_docstring(clean=True), i.e. inspect.cleandoc, minus trailing whitespace)

    @property
    def heading(self) -> str:
        """The line naming the object, e.g. ``textwrap.dedent``; topics are named by themselves."""
        if self.kind == "topic":
            return self.qualname
        return f"{self.module}.{self.qualname}" if self.qualname else self.module


@dataclass(frozen=True)
class _SourceFile:
    relpath: str  # POSIX-style, relative to the stdlib directory
    path: str
    module: str  # dotted module name ("email.mime.text"; a package's __init__.py names the package)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Build:
    """Result of one full corpus build; ``skipped_files`` counts sources that failed to read or parse."""

    entries: tuple[DocEntry, ...]
    files_parsed: int
    skipped_files: tuple[str, ...]


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _normalize(text: str) -> str:
    """Strip trailing whitespace from every line and blank lines from both ends.

    ``inspect.cleandoc`` (used by ``ast.get_docstring``) keeps the whitespace-only last line
    of a one-line docstring whose closing quotes sit indented on their own line, and its
    whitespace handling differs between Python versions. Trailing whitespace carries no
    meaning, would only teach the model to emit it, and would defeat deduplication of
    otherwise identical texts, so it is removed.
    """
    # split("\n"), not splitlines(): the latter also splits on form feeds and U+2028.
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _is_private(name: str) -> bool:
    """A leading underscore marks a private name; dunders (``__future__``) are public."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(relpath: str) -> str | None:
    """Dotted module name for a stdlib-relative ``.py`` path, or None if it is not documentation we want."""
    parts = relpath[: -len(".py")].split("/")
    if parts[-1] == "__main__":
        return None  # a script entry point, not API documentation
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts:
        return None
    if not all(part.isidentifier() for part in parts):
        return None  # e.g. "config-3.11-x86_64-linux-gnu": not importable, so not a module
    if any(_is_private(part) for part in parts):
        return None  # private module (_pydecimal, _pyio, ...): implementation detail
    return ".".join(parts)


def _list_source_files(root: str) -> list[_SourceFile]:
    """All stdlib ``.py`` files we read, in sorted walk order. Only stats, never reads."""
    found: list[_SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk itself descend in a deterministic order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            module = _TOPICS_MODULE if relpath == _TOPICS_RELPATH else _module_name(relpath)
            if module is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling symlink or a file removed mid-walk: not part of the corpus
            found.append(_SourceFile(relpath, path, module, st.st_size, st.st_mtime_ns))
    return found


def _topic_entries(tree: ast.Module) -> list[DocEntry]:
    """Help topics from the parsed ``pydoc_data/topics.py``: the literal ``topics = {...}`` dict."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "topics"
        ):
            topics = ast.literal_eval(node.value)
            break
    else:
        return []
    entries = []
    for name in sorted(topics):
        text = topics[name]
        if isinstance(name, str) and isinstance(text, str):
            entries.append(DocEntry(_TOPICS_MODULE, name, "topic", _normalize(text)))
    return entries


def _walk_body(body: list[ast.stmt], module: str, prefix: str, in_class: bool) -> Iterator[DocEntry]:
    """Docstrings of the classes and functions defined in ``body``, depth first in source order.

    Conditional and guarded definitions (``if``/``try``/``with`` blocks at module or class
    level) are followed, since much of the stdlib defines its API that way (``os``,
    ``shutil``). Function bodies are not entered: nested functions and local classes are
    not reachable API.
    """
    for node in body:
        if isinstance(node, _BLOCK_NODES):
            for block in _sub_blocks(node):
                yield from _walk_body(block, module, prefix, in_class)
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue  # private, or a dunder method: "__init__" docs mostly restate the class docs
        qualname = f"{prefix}{node.name}"
        doc = _docstring(node)
        if isinstance(node, ast.ClassDef):
            if doc:
                yield DocEntry(module, qualname, "class", doc)
            yield from _walk_body(node.body, module, qualname + ".", in_class=True)
        elif doc:
            yield DocEntry(module, qualname, "method" if in_class else "function", doc)


def _sub_blocks(node: ast.stmt) -> list[list[ast.stmt]]:
    """The statement lists nested in an if/try/with statement, in source order."""
    blocks: list[list[ast.stmt]] = [node.body]  # type: ignore[attr-defined]
    for handler in getattr(node, "handlers", ()):
        blocks.append(handler.body)
    for attr in ("orelse", "finalbody"):
        blocks.append(getattr(node, attr, []))
    return blocks


def _docstring(node: ast.AST) -> str:
    """The cleaned docstring of a module/class/function node, or "" if it has none."""
    doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
    return _normalize(doc) if doc else ""


def _file_entries(tree: ast.Module, module: str) -> Iterator[DocEntry]:
    doc = _docstring(tree)
    if doc:
        yield DocEntry(module, "", "module", doc)
    yield from _walk_body(tree.body, module, "", in_class=False)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, restoring its previous state afterwards.

    ast.parse allocates hundreds of thousands of node objects, which keeps triggering full
    collections that find nothing (AST nodes hold no back-references; each tree is freed by
    reference counting as soon as its file is done). Pausing the collector makes a build
    about 20% faster and cannot leak: nothing cyclic outlives the build.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build(root: str | None = None) -> _Build:
    """Build the corpus from scratch (uncached); see :func:`_build_unpaused`."""
    with _gc_paused():
        return _build_unpaused(root)


def _build_unpaused(root: str | None = None) -> _Build:
    """Build the corpus from scratch (uncached): parse every source file once, then order and dedupe.

    Kept separate from the cached public functions so tests can compare two fresh builds.
    """
    root = _stdlib_dir() if root is None else root
    topics: list[DocEntry] = []
    per_module: list[tuple[str, list[DocEntry]]] = []
    skipped: list[str] = []
    parsed = 0
    for src in _list_source_files(root):
        try:
            with open(src.path, "rb") as fh:
                data = fh.read()
            # ast.parse on bytes honours PEP 263 coding declarations, like the interpreter would.
            tree = ast.parse(data, filename=src.path)
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            skipped.append(src.relpath)  # broken or non-Python-3 file: not fatal, but counted
            continue
        parsed += 1
        if src.module == _TOPICS_MODULE:
            try:
                topics = _topic_entries(tree)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                skipped.append(src.relpath)
            continue
        per_module.append((src.module, list(_file_entries(tree, src.module))))

    # Path order is not dotted-name order: "xml/dom/NodeFilter.py" sorts before
    # "xml/dom/__init__.py" (uppercase < "_") although module "xml.dom" precedes
    # "xml.dom.NodeFilter". sorted() is stable, so within a module source order is kept.
    per_module.sort(key=lambda item: item[0])

    seen: set[str] = set()
    entries: list[DocEntry] = []
    for entry in topics + [e for _, module_entries in per_module for e in module_entries]:
        if len(entry.text) < MIN_DOC_CHARS or entry.text in seen:
            continue
        seen.add(entry.text)
        entries.append(entry)
    return _Build(tuple(entries), parsed, tuple(skipped))


@functools.lru_cache(maxsize=1)
def _cached_build() -> _Build:
    return _build()


def iter_doc_entries() -> Iterator[DocEntry]:
    """All entries, deduplicated: topics first (by name), then modules sorted by dotted name.

    The first call parses the standard library (about two seconds); later calls reuse the
    in-memory result.
    """
    return iter(_cached_build().entries)


def _document(entry: DocEntry) -> str:
    return f"{entry.heading}\n\n{entry.text}"


def named_documents(prefix: str = "builtin:pydocs") -> Iterator[tuple[str, str, str]]:
    """(name, text, title) per entry, as `lmforge index builtin:pydocs` indexes them: one document per
    object, named `<prefix>/<heading>` (a repeated heading -- overloads, platform variants -- gets `#2`,
    `#3` ...), its text the docstring and its title the object's dotted name."""
    seen: dict[str, int] = {}
    for entry in _cached_build().entries:
        name = f"{prefix}/{entry.heading}"
        seen[name] = seen.get(name, 0) + 1
        yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), entry.text, entry.heading


@functools.lru_cache(maxsize=1)
def _cached_documents() -> tuple[str, ...]:
    return tuple(_document(entry) for entry in _cached_build().entries)


def pydocs_documents() -> list[str]:
    """One training document per entry: a heading line naming the object, a blank line, the text.

    E.g. ``"textwrap.dedent\\n\\nRemove any common leading whitespace..."``; topics are
    headed by the topic name. The heading gives the model the association between a name and
    its documentation, which is what a reader of help() relies on too. Returns a fresh list
    each call, so callers may mutate it without corrupting the cache.
    """
    return list(_cached_documents())


def pydocs_corpus_hash() -> str:
    """A cheap fingerprint of everything the corpus is derived from, without building it.

    Covers the Python version, the stdlib path, the extractor version and the sorted
    ``(relpath, size, mtime_ns)`` of every source file read, so a cache keyed on it goes stale
    exactly when an upgrade or edit could change the corpus. It only stats files (a few
    milliseconds), so callers can check their caches before paying for a build.
    """
    root = _stdlib_dir()
    h = hashlib.sha256()
    header = f"pydocs-v{_EXTRACTOR_VERSION}\0{MIN_DOC_CHARS}\0{sys.version}\0{sys.implementation.cache_tag}\0{root}\0"
    h.update(header.encode("utf-8", "surrogateescape"))
    for src in sorted(_list_source_files(root), key=lambda s: s.relpath):
        h.update(f"{src.relpath}\0{src.size}\0{src.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
