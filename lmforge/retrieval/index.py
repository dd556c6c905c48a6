"""The document index: chunks of local files in one SQLite file, searched by BM25 through FTS5.

Why SQLite + FTS5: it ships with Python's standard library, so `lmforge index` / `search` work offline
with nothing to install or start, and one file (`$LMFORGE_HOME/indexes/NAME.sqlite`) is the whole index.

Schema (version `SCHEMA_VERSION`, kept in `meta` with the chunker's settings):

    documents(path PRIMARY KEY, sha256, mtime, n_chunks)    one row per indexed file (mtime: NULL when the
                                                             text did not come from a file on disk)
    chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, path, heading, start_line, end_line, text)
    chunks_fts                                               FTS5 over chunks(text, heading), external content
                                                             with rowid = chunks.id, kept in step by triggers

Chunk ids are AUTOINCREMENT so that an id is never reused for other text after a document is rewritten:
whatever is keyed by chunk id later (vectors, citations) can never silently point at the wrong passage.

Writes: `Index.update` runs in ONE transaction (`BEGIN IMMEDIATE` ... `COMMIT`), in WAL mode. A process
killed half-way leaves the previous index intact and searchable; readers never see half an update.

Vectors (optional, `lmforge index --embed MODEL`): each chunk's embedding from one model, stored and
searched as `lmforge.retrieval.vectors` describes (why a BLOB per chunk and numpy, with the measurements);
`meta` records the model (`embed_model`: a store name or a directory's path) and `embed_dim`. An index
with vectors is searched hybrid, BM25 and cosine fused by reciprocal rank, by every caller, with the
recorded model loaded once per process. Vectors from two models never mix: asking for another model is
refused, and `--rebuild` is the way to switch.

Queries are user text. FTS5 has its own query language (`"`, `*`, `NEAR(`, `AND`, `-`, `:` ...) in which
ordinary text raises syntax errors, so `search` keeps only the words of the query, quotes each one and ORs
them: BM25 then ranks the chunks that match more (and rarer) words first. Scores are `-bm25()` so that
higher is better; in hybrid search they are the fused reciprocal-rank scores, higher better too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lmforge.errors import UserError, one_line
from lmforge.paths import home, split_name
from lmforge.retrieval import vectors
from lmforge.retrieval.chunking import chunk_document

SCHEMA_VERSION = 1
HEADING_SEP = " > "
SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".py")  # what a directory walk indexes (no HTML/PDF yet)
MAX_FILE_BYTES = 16 << 20  # a text file past this is a log or a dump, not documentation: skipped, counted
MAX_QUERY_TERMS = 64  # a pasted page as a query would make an OR of thousands of terms: keep the first 64
SKIPPED_EXAMPLES = 5
#: A query word found in a passage's heading counts this many times one in its text: a heading names what
#: the passage is about ("textwrap.dedent"), the text only mentions things.
HEADING_WEIGHT = 3.0
#: Function words dropped from queries when other words remain (as search engines' English analyzers do):
#: in "What does `os.path.join` do?" only os, path and join say what is wanted, and BM25 would otherwise
#: reward short passages that happen to say "what" and "do".
STOPWORDS = frozenset("""a an and are as at be but by can could do does did for from how i if in into is it its
me my of on or so than that the their then there these this those to was were what when where which who whom
why will with would you your""".split())
REBUILD_HINT = "rebuild it with `lmforge index --rebuild`"
EMBED_BATCH = 64  # chunks per embedding call: progress is reported, and a kill lands, between batches

log = logging.getLogger("lmforge.retrieval")

# index file -> (generation, chunk ids, vectors): each index's vectors read once per process (`_vectors`)
_MATRICES: dict[str, tuple[str | None, np.ndarray, np.ndarray]] = {}
_MATRICES_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, mtime REAL,
                                     n_chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, heading TEXT NOT NULL,
                                  start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks(path);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, content='chunks', content_rowid='id',
                                                         tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading);
END;
"""


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------
def indexes_root() -> Path:
    return home() / "indexes"


def index_path(name: str) -> Path:
    """`$LMFORGE_HOME/indexes/NAME.sqlite`. NAME follows the model store's rule (`lmforge.paths`), without
    a tag: an index has one version, the one on disk."""
    if isinstance(name, str) and ":" in name:
        raise UserError(f"invalid index name {name!r}: an index name has no :TAG")
    try:
        base, _ = split_name(name)
    except UserError as e:
        from lmforge.paths import NAME_RULE

        rule = "index names are 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"
        raise UserError(str(e).replace("invalid model name", "invalid index name").replace(NAME_RULE, rule)) from None
    root = indexes_root().resolve()
    path = (root / f"{base}.sqlite").resolve()
    if not path.is_relative_to(root):  # unreachable for a valid name, barring a planted symlink
        raise UserError(f"index name {name!r} resolves to {path}, outside {root}")
    return path


def list_indexes() -> list[str]:
    """Names of the indexes under `$LMFORGE_HOME/indexes`, sorted (for "unknown index" messages)."""
    root = indexes_root()
    return sorted(p.stem for p in root.glob("*.sqlite")) if root.is_dir() else []


def open_index(name: str) -> "Index":
    """An existing index by name; an unknown name is a UserError listing the known ones (never creates)."""
    path = index_path(name)
    if not path.is_file():
        known = ", ".join(list_indexes()) or "none yet"
        raise UserError(f"no index named {name} (known: {known}; create one with `lmforge index PATH --name {name}`)")
    return Index(path)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """What one `update` did, for the caller to report."""
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks_written: int = 0
    embedded: int = 0  # chunks given a vector in this update
    truncated: int = 0  # of those, chunks longer than the model's context: embedded from their beginning


@dataclass(frozen=True)
class Hit:
    """One ranked passage; `rank` starts at 1. `score` is higher-is-better: the BM25 score (`-bm25()`) when
    the index has no vectors, else the reciprocal-rank-fusion score sum(1 / (60 + rank)) over the BM25 and
    cosine rankings (at most 2/61 ~ 0.033, for a passage first in both). Compare scores within one result
    list only."""
    rank: int
    score: float
    path: str
    heading: str
    start_line: int
    end_line: int
    text: str


class SearchResult(list):
    """The hits of one search, best first (a plain list of `Hit`s to callers that need no more), with how
    they were ranked: `mode` "bm25" or "hybrid"; `truncated`: the query was longer than the embedding
    model's context and only its beginning was embedded."""

    def __init__(self, hits=(), *, mode: str = "bm25", truncated: bool = False) -> None:
        super().__init__(hits)
        self.mode, self.truncated = mode, truncated


# ---------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------
def _check_fts5() -> None:
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.OperationalError as e:
        raise UserError(f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5 full-text search ({one_line(e)}); "
                        "use a Python build whose sqlite3 includes FTS5 (python.org, conda and most distributions do)"
                        ) from None


class Index:
    """One index file. Opening creates it (and its directory) if missing; `rebuild=True` starts it afresh,
    which is the way out of a corrupt file. `max_chars`/`overlap` are the chunker's settings: a change from
    what the file was built with re-chunks every document on the next `update`."""

    def __init__(self, path: str | os.PathLike, *, max_chars: int = 1200, overlap: int = 200, rebuild: bool = False):
        _check_fts5()
        self.path = Path(path)
        chunk_document("", "settings.txt", max_chars=max_chars, overlap=overlap)  # bad settings: now, not mid-update
        self.settings = {"max_chars": str(max_chars), "overlap": str(overlap)}
        if rebuild:
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                p.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one update is exactly one transaction.
        with self._errors():
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            with self._errors():
                self._open()
        except BaseException:
            self._db.close()  # a refused file is not left open (and locked, on Windows)
            raise

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if tables and "meta" not in tables:
            raise UserError(f"{self.path} is not an lmforge index (it has other tables); "
                            "choose another name, or delete it")
        if not {"meta", "chunks_fts"} <= tables:  # a built index is opened without writing, so a search
            self._create()                         # can open it while an update holds the write lock
        version = self._meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise UserError(f"index {self.path} has schema version {version}, this lmforge reads "
                            f"{SCHEMA_VERSION}: {REBUILD_HINT}")

    def _create(self) -> None:
        try:  # one script, one transaction: two processes opening a new index at once create it once
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "INSERT OR IGNORE INTO meta VALUES "
                                   f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's damage and contention errors as one line each; anything else is a bug and propagates."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise UserError(f"index {self.path} is being written by another process; try again when it "
                                "finishes") from None
            if "unable to open" in msg or "readonly" in msg:
                raise UserError(f"cannot open index {self.path} for writing ({one_line(e)}); "
                                "is it a writable file?") from None
            if isinstance(e, sqlite3.OperationalError) and "malformed" not in msg and "corrupt" not in msg:
                raise
            raise UserError(f"index {self.path} is corrupt ({one_line(e)}): {REBUILD_HINT}") from None

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -----------------------------------------------------------------------------------------------
    @property
    def embed_model(self) -> str | None:
        """The model this index's vectors come from (as `Embedder.model_id`), None without vectors."""
        with self._errors():
            return self._meta("embed_model")

    def check_model(self, model_id: str, dim: int | None = None) -> None:
        """Refuse model `model_id` (of `dim` dimensions) when the index holds vectors of another model or
        size: one index, one model (cosine between two models' vectors means nothing)."""
        recorded = self.embed_model
        if recorded is None:
            return
        if recorded != model_id:
            raise UserError(f"index {self.path.stem} has vectors from model {recorded}, not {model_id}; "
                            f"use {recorded}, or switch with `lmforge index --rebuild --embed {model_id}`")
        have = self._meta("embed_dim")
        if dim is not None and have != str(dim):
            raise UserError(f"index {self.path.stem} has {have}-dimensional vectors but {model_id} makes "
                            f"{dim}-dimensional ones (the model changed since?): {REBUILD_HINT} --embed {model_id}")

    def _recorded_embedder(self, model: str):
        """The embedder of the model this index records, loaded once per process; a model that is gone
        (removed from the store, a moved directory) is one line saying how to get out."""
        from lmforge.retrieval.embed import embedder_for

        try:
            return embedder_for(model)
        except UserError as e:
            raise UserError(f"index {self.path.stem} was embedded with model {model}, which cannot be loaded now "
                            f"({e}); bring the model back, or rebuild the index with `lmforge index --rebuild` "
                            "(with or without --embed)") from None

    def update(self, files: Iterable[tuple[str, str] | tuple[str, str, str]], *, complete: bool = False,
               progress: Callable[[str], None] | None = None, embedder=None,
               embed_progress: Callable[[int], None] | None = None) -> Stats:
        """Index (path, text) pairs, or (path, text, title) for documents whose text does not name them
        (see `chunk_document`): a document whose text hash is unchanged is left alone (its chunk ids
        too), a new or changed one is re-chunked and rewritten. With `complete=True` the pairs are the whole
        collection, so documents not among them are removed. All of it is one transaction: on any error, or
        a kill, the index is as it was. `progress(path)` is called after each document rewritten (the CLI
        shows progress with it).

        `embedder` (a `lmforge.retrieval.embed.Embedder`) gives a vector to every chunk that has none, in
        the same transaction; an index that already has vectors gets them for its new chunks from its
        recorded model even without one (loaded once per process), so it never becomes half-embedded.
        `embed_progress(n)` is called after each batch of `n` chunks embedded."""
        if embedder is None and self.embed_model is not None:
            embedder = self._recorded_embedder(self.embed_model)
        if embedder is not None:
            self.check_model(embedder.model_id, embedder.dim)
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stats = self._update(files, complete, progress)
                if embedder is not None:
                    self.check_model(embedder.model_id, embedder.dim)  # again: another writer may have been first
                    embedded, truncated = self._embed(embedder, embed_progress)
                    stats = Stats(**{**stats.__dict__, "embedded": embedded, "truncated": truncated})
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stats

    def _embed(self, embedder, progress: Callable[[int], None] | None) -> tuple[int, int]:
        """Vectors for the chunks without one (inside `update`'s transaction); (embedded, truncated)."""
        for statement in vectors.SCHEMA:  # DDL in the transaction: rolled back with it
            self._db.execute(statement)
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [("embed_model", embedder.model_id), ("embed_dim", str(embedder.dim))])
        todo = vectors.missing(self._db)
        truncated = 0
        for start in range(0, len(todo), EMBED_BATCH):
            batch = todo[start:start + EMBED_BATCH]
            # The heading path says what a passage is about ("Logging > Rotation") when its text does not.
            texts = [f"{heading}\n\n{text}" if heading and not text.startswith(heading) else text
                     for _id, heading, text in batch]
            rows, cut = embedder.embed(texts)
            truncated += sum(cut)
            self._db.executemany("INSERT INTO vectors(chunk_id, v) VALUES (?, ?)",
                                 [(cid, vectors.to_blob(row)) for (cid, _h, _t), row in zip(batch, rows)])
            if progress is not None:
                progress(len(batch))
        return len(todo), truncated

    def _update(self, files, complete, progress) -> Stats:
        rechunk_all = any(self._meta(k) not in (None, v) for k, v in self.settings.items())
        old = {p: h for p, h in self._db.execute("SELECT path, sha256 FROM documents")}
        seen: set[str] = set()
        added = changed = unchanged = written = 0
        max_chars, overlap = int(self.settings["max_chars"]), int(self.settings["overlap"])
        for path, text, *title in files:
            title = title[0] if title else ""
            if path in seen:
                raise UserError(f"{path} is given twice; each document path must be unique in one update")
            seen.add(path)
            sha = hashlib.sha256((text + ("\0" + title if title else "")).encode("utf-8", "surrogatepass")).hexdigest()
            if old.get(path) == sha and not rechunk_all:
                unchanged += 1
                continue
            chunks = chunk_document(text, path, max_chars=max_chars, overlap=overlap, title=title)
            self._db.execute("DELETE FROM chunks WHERE path = ?", (path,))
            self._db.executemany(
                "INSERT INTO chunks(path, heading, start_line, end_line, text) VALUES (?, ?, ?, ?, ?)",
                [(path, HEADING_SEP.join(c.heading), c.start_line, c.end_line, c.text) for c in chunks])
            self._db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?)",
                             (path, sha, _mtime(path), len(chunks)))
            written += len(chunks)
            if path in old:
                changed += 1
            else:
                added += 1
            if progress is not None:
                progress(path)
        removed = 0
        if complete:
            for path in sorted(set(old) - seen):
                self._db.execute("DELETE FROM chunks WHERE path = ?", (path,))
                self._db.execute("DELETE FROM documents WHERE path = ?", (path,))
                removed += 1
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [*self.settings.items(), ("generation", uuid.uuid4().hex)])  # see `_vectors`
        return Stats(added=added, changed=changed, unchanged=unchanged, removed=removed, chunks_written=written)

    # -----------------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, embedder=None) -> SearchResult:
        """The `k` best chunks for `query`: by BM25, or hybrid when the index has vectors (BM25 and cosine
        rankings fused, see `lmforge.retrieval.vectors`), with `embedder` or else the recorded model
        (loaded once per process). A query of only punctuation/operators has no words for BM25 (an
        empty BM25 list); a blank query is a UserError. A query longer than the model's context is embedded
        from its beginning: the result's `truncated` says so, and it is logged."""
        if not isinstance(query, str) or not query.strip():
            raise UserError("the search query is empty; give some words to search for")
        if k < 1:
            raise UserError(f"k must be at least 1 (got {k})")
        model = self.embed_model
        if model is None and embedder is None:
            return SearchResult(self._bm25(query, k))
        if model is None:
            raise UserError(f"index {self.path.stem} has no vectors to search with {embedder.model_id}; "
                            f"add them with `lmforge index ... --name {self.path.stem} --embed {embedder.model_id}`")
        if embedder is None:
            embedder = self._recorded_embedder(model)
        self.check_model(embedder.model_id, embedder.dim)
        (q,), (cut,) = embedder.embed([query])
        if cut:
            log.warning("the query is longer than %s's context of %d tokens; only its beginning was embedded",
                        embedder.model_id, embedder.max_tokens)
        depth = max(k, vectors.CANDIDATES)
        lexical = [h[0] for h in self._bm25(query, depth, ids=True)]
        ids, matrix = self._vectors(embedder.dim)
        fused = vectors.fuse(lexical, vectors.nearest(ids, matrix, q, depth))[:k]
        with self._errors():
            rows = {r[0]: r[1:] for r in self._db.execute(
                "SELECT id, path, heading, start_line, end_line, text FROM chunks WHERE id IN "
                f"({','.join('?' * len(fused))})", [cid for cid, _ in fused])}
        found = [(score, rows[cid]) for cid, score in fused if cid in rows]  # a chunk just removed is left out
        return SearchResult([Hit(i + 1, score, *row) for i, (score, row) in enumerate(found)], mode="hybrid",
                            truncated=cut)

    def _bm25(self, query: str, k: int, *, ids: bool = False) -> list:
        """BM25's `k` best: `Hit`s, or (chunk id,) rows with `ids=True`."""
        match = fts5_query(query)
        if match is None:
            return []
        cols = "c.id" if ids else "-bm25(chunks_fts, 1.0, {w}), c.path, c.heading, c.start_line, c.end_line, c.text"
        with self._errors():
            rows = self._db.execute(
                f"SELECT {cols.format(w=HEADING_WEIGHT)} FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
                f"WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts, 1.0, {HEADING_WEIGHT}), c.id LIMIT ?",
                (match, k)).fetchall()
        return rows if ids else [Hit(i + 1, *row) for i, row in enumerate(rows)]

    def _vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, matrix) of the stored vectors, read once per process and index file, and again
        only after an update committed (each writes a new `generation` to `meta`): a server opens the
        index for every request, and reading 6000 vectors costs ~20 ms where a query costs 0.2."""
        with self._errors():
            generation = self._meta("generation")
            key = str(self.path.resolve())
            with _MATRICES_LOCK:
                cached = _MATRICES.get(key)
            if cached is not None and cached[0] == generation:
                return cached[1], cached[2]
            try:
                ids, matrix = vectors.read_matrix(self._db, dim)
            except ValueError as e:
                raise UserError(f"index {self.path} is damaged ({e}): {REBUILD_HINT}") from None
        with _MATRICES_LOCK:
            _MATRICES[key] = (generation, ids, matrix)
        return ids, matrix

    def chunk_ids(self, path: str) -> list[int]:
        """Ids of a document's chunks, in order (what vectors and citations key on)."""
        return [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE path = ? ORDER BY id", (path,))]

    def documents(self) -> dict[str, int]:
        """path -> number of chunks, for every indexed document."""
        return dict(self._db.execute("SELECT path, n_chunks FROM documents ORDER BY path"))


def fts5_query(query: str) -> str | None:
    """User text -> an FTS5 MATCH expression that cannot be a syntax error: the words of `query`, each
    quoted as a string (so `AND`, `NEAR`, `*` are plain words or gone), ORed. None when it has no words.

    Function words (`STOPWORDS`) are dropped unless the query has nothing else.

    >>> fts5_query('rotate the "logs" AND -x*')
    '"rotate" OR "logs" OR "AND" OR "x"'
    """
    terms = re.findall(r"\w+", query)
    if not terms:
        return None
    terms = ([t for t in terms if t.lower() not in STOPWORDS] or terms)[:MAX_QUERY_TERMS]
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except (OSError, ValueError):  # not a file on disk (a builtin corpus), or a name no file system takes
        return None


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
@dataclass
class Skipped:
    """Files left out of a walk: how many, and the first few as `path (why)`, for one line of report."""
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, path: str, why: str) -> None:
        self.count += 1
        if len(self.examples) < SKIPPED_EXAMPLES:
            self.examples.append(f"{path} ({why})")


class collect_files:  # noqa: N801 - used like a function: `for path, text in collect_files(paths)`
    """(path, text) of every indexable file under `paths`, in sorted order, as absolute paths.

    Directories are walked for `SUFFIXES` files, skipping hidden directories and files (`.git`, `.venv`,
    `.env`) and not following symlinked directories (no loops). A file named explicitly is read whatever
    its suffix: the user asked for it. Binary (a NUL byte), non-UTF-8, unreadable and oversized files are
    skipped and recorded in `.skipped`; with `strict=True` each of them is a UserError naming it instead.
    A path that does not exist is always a UserError.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], *, strict: bool = False):
        self.paths = [Path(p).expanduser() for p in paths]
        self.strict = strict
        self.skipped = Skipped()
        for p in self.paths:
            if not p.exists():
                raise UserError(f"{p}: no such file or directory")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for root in self.paths:
            if root.is_file():
                found = self._read(root)
                if found is not None:
                    yield found
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                        found = self._read(Path(dirpath) / name)
                        if found is not None:
                            yield found

    def _read(self, path: Path) -> tuple[str, str] | None:
        shown = str(path.resolve())
        try:
            size = path.stat().st_size
            data = b"" if size > MAX_FILE_BYTES else path.read_bytes()
        except OSError as e:
            return self._skip(shown, f"unreadable: {one_line(e.strerror or e)}")
        if size > MAX_FILE_BYTES:
            return self._skip(shown, f"larger than {MAX_FILE_BYTES >> 20} MiB")
        if b"\x00" in data:
            return self._skip(shown, "binary")
        try:
            return shown, data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return self._skip(shown, f"not UTF-8 (byte {e.start})")

    def _skip(self, path: str, why: str) -> None:
        if self.strict:
            raise UserError(f"{path}: {why}; convert or remove it, or index without --strict to skip it")
        self.skipped.add(path, why)
