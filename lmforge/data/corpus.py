"""Turn a user's data spec into a list of documents, and fingerprint it cheaply.

A *spec* is what the user types after `--data`:

* ``builtin:NAME`` -- a corpus shipped with lmforge (``builtin:pydocs``);
* a path to a ``.jsonl`` file -- one JSON object per line with a string ``text`` field, one document each;
* a path to any other file (``.txt``, ``.md``, ...) -- the whole file is one document;
* a directory -- every ``.txt``/``.md``/``.jsonl`` file below it, in sorted relative-path order, so the same
  directory always yields the same documents in the same order (the train/val split and the cache depend
  on it). Hidden files and directories (names starting with ``.``) are skipped: they are editor backups,
  ``.git`` internals or notebook checkpoints, never training text;
* several of the above separated by commas (``a.txt,more/,builtin:pydocs``), concatenated in that order.

Every user mistake (missing path, malformed JSONL, undecodable bytes, no text at all) is a `UserError`
with one actionable line naming the offending file, so the CLI can print it without a traceback.

Documents that are empty or whitespace-only are dropped: they carry nothing to learn from and would
only add lone end-of-text separators to the token stream.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from lmforge.errors import UserError

#: File suffixes picked up when a directory is given (compared case-insensitively).
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")

_ERROR_MODES = ("strict", "replace")
_UTF8_BOM = b"\xef\xbb\xbf"


def _pydocs_documents() -> list[str]:
    from lmforge.data.pydocs import pydocs_documents  # lazy: the corpus is only built when asked for

    return pydocs_documents()


def _pydocs_hash() -> str:
    from lmforge.data.pydocs import pydocs_corpus_hash

    return pydocs_corpus_hash()


#: name -> (documents loader, cheap content hash). Imported lazily so that using a file spec never pays
#: for building a builtin corpus.
_BUILTINS: dict[str, tuple[Callable[[], list[str]], Callable[[], str]]] = {
    "pydocs": (_pydocs_documents, _pydocs_hash),
}


def _split_spec(spec: str) -> list[str]:
    """Split a comma-separated spec, unless the whole string is an existing path (commas in file names)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty --data spec: give a text/.jsonl file, a directory, or builtin:NAME")
    spec = spec.strip()
    if "," in spec and not os.path.exists(spec):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise UserError(f"empty --data spec {spec!r}: give a text/.jsonl file, a directory, or builtin:NAME")
        return parts
    return [spec]


def _builtin(name: str) -> tuple[Callable[[], list[str]], Callable[[], str]]:
    if name not in _BUILTINS:
        known = ", ".join(f"builtin:{k}" for k in sorted(_BUILTINS))
        raise UserError(f"unknown builtin corpus 'builtin:{name}'; known builtins: {known}")
    return _BUILTINS[name]


def _check_errors_mode(errors: str) -> None:
    if errors not in _ERROR_MODES:
        raise UserError(f"unknown --errors mode {errors!r}; use 'strict' or 'replace'")


def _existing_path(part: str) -> Path:
    path = Path(part).expanduser()
    if not path.exists():
        raise UserError(f"data path does not exist: {part} (give a text/.jsonl file, a directory, or builtin:NAME)")
    return path


def _is_hidden(rel: Path) -> bool:
    return any(p.startswith(".") for p in rel.parts)


def _dir_files(directory: Path) -> list[Path]:
    """All text files below `directory`, sorted by relative POSIX path so the order is platform-independent."""
    found = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not _is_hidden(rel):
            found.append((rel.as_posix(), p))
    if not found:
        raise UserError(
            f"directory {directory} contains no .txt, .md or .jsonl files (searched recursively); "
            "point --data at a directory with text files"
        )
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def _expand(part: str) -> list[Path]:
    """The files one (non-builtin) spec part stands for."""
    path = _existing_path(part)
    if path.is_dir():
        return _dir_files(path)
    return [path]


def _decode(data: bytes, path: Path, errors: str, base_offset: int = 0) -> str:
    """UTF-8-decode `data`; in strict mode a bad byte becomes a UserError naming the file and byte offset.

    A leading UTF-8 byte-order mark (as written by some Windows editors) is dropped rather than becoming
    a U+FEFF character at the start of the first document.
    """
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        offset = base_offset + skip + e.start
        raise UserError(
            f"{path}: not valid UTF-8 at byte offset {offset} (byte 0x{data[skip + e.start]:02x}); "
            "fix or re-encode the file as UTF-8, or pass --errors replace to substitute U+FFFD"
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None


def _load_jsonl(path: Path, errors: str) -> list[str]:
    """One document per non-blank line: the line's JSON object's ``text`` string.

    The whole file is decoded at once so that a decode error's offset is already absolute within the file.
    Lines are split on ``\\n`` only (not `str.splitlines`), because JSON strings may legally contain raw
    U+2028/U+2029, which `splitlines` would treat as line breaks.
    """
    text = _decode(_read_bytes(path), path, errors)
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                'each line must be a JSON object like {"text": "..."}'
            ) from None
        if not isinstance(obj, dict) or "text" not in obj:
            kind = "object without a \"text\" field" if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f'{path}:{lineno}: expected a JSON object with a "text" string field, got a {kind}')
        if not isinstance(obj["text"], str):
            raise UserError(
                f'{path}:{lineno}: the "text" field must be a string, got {type(obj["text"]).__name__}'
            )
        docs.append(obj["text"])
    return docs


def _load_file(path: Path, errors: str) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, errors)
    return [_decode(_read_bytes(path), path, errors)]


def load_documents(spec: str, *, errors: str = "strict") -> list[str]:
    """Load the documents `spec` names (see the module docstring for the spec forms).

    ``errors="strict"`` refuses non-UTF-8 bytes (naming file and byte offset) because silently replacing
    them would train the model on garbage the user never saw; ``errors="replace"`` is the explicit opt-in
    that decodes them as U+FFFD.

    Raises `UserError` for a missing path, a directory without text files, a malformed JSONL line, bad
    bytes in strict mode, an unknown builtin, or when no document contains any non-whitespace text.
    """
    _check_errors_mode(errors)
    docs: list[str] = []
    for part in _split_spec(spec):
        if part.startswith("builtin:"):
            load, _ = _builtin(part[len("builtin:"):])
            docs.extend(load())
        else:
            for path in _expand(part):
                docs.extend(_load_file(path, errors))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"no text in --data {spec}: every document is empty or whitespace; add some text")
    return docs


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, streamed; memoised per (path, size, mtime) within a process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def corpus_fingerprint(spec: str) -> str:
    """A hex digest of the content `spec` stands for: the data cache key.

    Files are hashed by content (sha256, streamed at disk speed: far cheaper than tokenizing them), so
    touching or copying a file keeps its cache while any edit invalidates it. Builtins contribute their own
    source hash. The same missing-path/empty-directory/unknown-builtin errors as `load_documents` are
    raised here, so a bad spec fails before anything else happens.
    """
    entries: list[list] = []
    for part in _split_spec(spec):
        if part.startswith("builtin:"):
            name = part[len("builtin:"):]
            _, content_hash = _builtin(name)
            entries.append(["builtin", name, content_hash()])
        else:
            for path in _expand(part):
                st = path.stat()
                entries.append(["file", path.name, _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)])
    blob = json.dumps({"corpus_fingerprint_version": 2, "entries": entries}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
