"""The SQLite FTS5 index: BM25 ranking on a hand-made corpus, incremental and transactional updates, hostile
queries, damaged files, and the file walk that feeds it."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from conftest import writer_killed_midway

from lmforge.errors import UserError
from lmforge.retrieval.index import Index, collect_files, fts5_query, index_path, list_indexes, open_index

# Ten small documents on distinct topics, written so that each query below has exactly one right answer.
CORPUS = {
    "logs.md": "# Logging\n\n## Rotation\n\nRotate the log files daily with logrotate; keep seven compressed copies.\n",
    "backup.md": "# Backups\n\nSnapshot the database every night and copy the dump to offsite storage.\n",
    "network.md": "# Networking\n\n## Firewall\n\nOpen port 443 for HTTPS and block every other inbound port.\n",
    "install.md": "# Installation\n\n## On Linux\n\nInstall the package with pip inside a virtual environment.\n",
    "gpu.txt": "CUDA drivers must match the toolkit version; check nvidia-smi before training on the GPU.\n",
    "cooking.rst": "Bread\n=====\n\nKnead the dough for ten minutes, let it rise, then bake at 220 degrees.\n",
    "garden.md": "# Garden\n\nWater tomatoes in the morning and prune the suckers weekly.\n",
    "tokenizer.py": ('def train_bpe(corpus):\n    """Learn byte-pair merges from a text corpus for the tokenizer."""\n'
                     "    return corpus\n"),
    "security.md": "# Security\n\nRotate API keys every quarter and never commit secrets to git.\n",
    "cats.txt": "Cats purr when content and knead blankets with their paws.\n",
}
QUERIES = [
    ("how do I rotate the logs", "logs.md"),
    ("nightly database backup", "backup.md"),
    ("which firewall port for https", "network.md"),
    ("install with pip on linux", "install.md"),
    ("cuda driver version mismatch", "gpu.txt"),
    ("how long to knead bread dough", "cooking.rst"),
    ("when to water tomatoes", "garden.md"),
    ("learn bpe merges for a tokenizer", "tokenizer.py"),
    ("rotate api keys secrets", "security.md"),
    ("why do cats purr", "cats.txt"),
]


def build(path: Path, docs: dict[str, str] = CORPUS, **kw) -> Index:
    index = Index(path)
    index.update(docs.items(), **kw)
    return index


@pytest.fixture
def index(tmp_path):
    with build(tmp_path / "t.sqlite") as idx:
        yield idx


@pytest.mark.parametrize("query, expected", QUERIES)
def test_bm25_puts_the_right_document_first(index, query, expected):
    hits = index.search(query, k=3)
    assert hits and hits[0].path == expected, [(h.path, round(h.score, 3)) for h in hits]
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))  # higher is better, in order
    assert hits[0].score > 0


def test_a_hit_carries_its_place_in_the_document(index):
    hit = index.search("firewall 443")[0]
    assert (hit.path, hit.heading, hit.start_line) == ("network.md", "Networking > Firewall", 5)
    assert hit.end_line >= hit.start_line and "443" in hit.text


def test_reindex_touches_only_the_changed_file(tmp_path):
    index = build(tmp_path / "t.sqlite")
    before = {p: index.chunk_ids(p) for p in CORPUS}
    docs = dict(CORPUS, **{"garden.md": "# Garden\n\nMulch the strawberries before the frost.\n"})
    stats = index.update(docs.items(), complete=True)
    assert (stats.added, stats.changed, stats.unchanged, stats.removed) == (0, 1, 9, 0)
    assert stats.chunks_written == len(index.chunk_ids("garden.md")) >= 1
    after = {p: index.chunk_ids(p) for p in CORPUS}
    assert all(after[p] == before[p] for p in CORPUS if p != "garden.md")
    assert not set(after["garden.md"]) & set(before["garden.md"])  # new ids: never reused for other text
    assert index.search("strawberries")[0].path == "garden.md"
    assert index.search("tomatoes") == []  # the old text is gone from the full-text index too
    again = index.update(docs.items(), complete=True)
    assert (again.unchanged, again.chunks_written) == (10, 0)


def test_new_documents_are_added_and_missing_ones_removed_only_when_complete(tmp_path):
    index = build(tmp_path / "t.sqlite")
    stats = index.update([("new.md", "# New\n\nZebras graze.\n")])  # not complete: the rest stays
    assert (stats.added, stats.removed) == (1, 0) and len(index.documents()) == 11
    kept = {k: v for k, v in CORPUS.items() if k != "cats.txt"}
    stats = index.update(kept.items(), complete=True)
    assert (stats.added, stats.unchanged, stats.removed) == (0, 9, 2)
    assert set(index.documents()) == set(kept)
    assert index.search("purr") == [] and index.search("zebras") == []


def test_a_failed_update_changes_nothing(tmp_path):
    index = build(tmp_path / "t.sqlite")

    def docs():
        yield "garden.md", "# Garden\n\nMulch the strawberries.\n"
        raise OSError("disk went away")

    with pytest.raises(OSError):
        index.update(docs(), complete=True)
    assert index.search("tomatoes")[0].path == "garden.md" and index.search("strawberries") == []
    assert len(index.documents()) == 10


def test_a_duplicate_path_is_one_line(tmp_path):
    index = Index(tmp_path / "t.sqlite")
    with pytest.raises(UserError, match="given twice"):
        index.update([("a.md", "x"), ("a.md", "y")])
    assert index.documents() == {}


KILLED_UPDATE = textwrap.dedent("""
    import sys, time
    from lmforge.retrieval.index import Index
    def slow(path):
        print("written", path, flush=True)
        time.sleep(60)  # inside the transaction: the parent kills us here
    docs = [("garden.md", "# Garden\\n\\nMulch the strawberries.\\n"), ("new.md", "Zebras graze.\\n")]
    Index(sys.argv[1]).update(docs, complete=True, progress=slow)
""")


def test_a_killed_update_leaves_the_previous_index_searchable(tmp_path):
    path = tmp_path / "t.sqlite"
    build(path).close()
    with writer_killed_midway(KILLED_UPDATE, path, "written garden.md"):
        with Index(path) as reader:  # WAL: a search while an update runs sees the last committed index
            assert reader.search("tomatoes")[0].path == "garden.md" and reader.search("zebras") == []
    with Index(path) as index:
        assert index.search("tomatoes")[0].path == "garden.md"
        assert index.search("strawberries") == [] and index.search("zebras") == []
        assert len(index.documents()) == 10
        assert index.update(CORPUS.items(), complete=True).unchanged == 10  # and it can be written again


@pytest.mark.parametrize("query", ['"', 'a AND', "*", "NEAR(", "-", "rotate*", 'logs" OR "x', "NOT logs",
                                   "col:logs", "^logs", "(logs", "logs)", "AND", "a - b", "\u00e9t\u00e9 \u2603"])
def test_hostile_queries_never_raise(index, query):
    hits = index.search(query)
    assert isinstance(hits, list)


def test_operator_words_are_plain_words(index):
    assert fts5_query('rotate "logs" AND -x*') == '"rotate" OR "logs" OR "x"'  # "and" is a function word
    assert fts5_query('rotate "logs" NEAR -x*') == '"rotate" OR "logs" OR "NEAR" OR "x"'
    assert fts5_query('"*-()') is None
    assert index.search("NOT logs")[0].path == "logs.md"  # NOT is a word here, not a negation


@pytest.mark.parametrize("query", ["", "   ", "\n"])
def test_an_empty_query_is_one_line(index, query):
    with pytest.raises(UserError, match="empty"):
        index.search(query)


def test_a_corrupt_file_is_one_line_suggesting_rebuild(tmp_path):
    path = tmp_path / "t.sqlite"
    path.write_bytes(b"this is not a database " * 200)
    with pytest.raises(UserError, match="--rebuild") as e:
        Index(path)
    assert "\n" not in str(e.value)
    with Index(path, rebuild=True) as index:  # the way out the message names
        index.update(CORPUS.items())
        assert index.search("purr")[0].path == "cats.txt"


def test_damaged_pages_are_one_line_suggesting_rebuild(tmp_path):
    path = tmp_path / "t.sqlite"
    build(path, {f"d{i}.md": f"# D{i}\n\n" + "lorem ipsum dolor " * 200 for i in range(30)}).close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4096:len(data)] = b"\xff" * (len(data) - 4096)  # every page after the first
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="--rebuild") as e:
        Index(path).search("lorem")
    assert "\n" not in str(e.value)


def test_another_sqlite_file_is_refused(tmp_path):
    import sqlite3
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers(name)")
    with pytest.raises(UserError, match="not an lmforge index"):
        Index(path)


def test_changed_chunker_settings_rechunk_everything(tmp_path):
    path = tmp_path / "t.sqlite"
    build(path).close()
    with Index(path, max_chars=400, overlap=50) as index:
        stats = index.update(CORPUS.items())
        assert stats.changed == 10 and stats.unchanged == 0
        assert index.update(CORPUS.items()).unchanged == 10
    with pytest.raises(UserError, match="overlap"):
        Index(path, max_chars=400, overlap=400)


def test_index_names_live_in_the_home_and_are_validated():
    path = index_path("mydocs")
    assert path.name == "mydocs.sqlite" and path.parent.name == "indexes"
    assert path.is_relative_to(Path(os.environ["LMFORGE_HOME"]).resolve())
    for bad in ["../x", "My", "a:b", "", ".x", "con"]:
        with pytest.raises(UserError, match="invalid index name"):
            index_path(bad)
    with pytest.raises(UserError, match=r"no index named nope \(known: none yet"):
        open_index("nope")
    Index(index_path("mydocs")).close()
    assert list_indexes() == ["mydocs"]
    with pytest.raises(UserError, match=r"known: mydocs"):
        open_index("nope")
    open_index("mydocs").close()


def test_collect_files_walks_text_files_and_reports_what_it_skips(tmp_path):
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n")
    (tmp_path / "docs" / "deep" / "b.py").write_text("x = 1\n")
    (tmp_path / "docs" / "c.rst").write_bytes("\ufeffC\n".encode("utf-8"))
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "blob.txt").write_bytes(b"abc\x00def")
    (tmp_path / "docs" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "docs" / ".hidden.md").write_text("secret")
    (tmp_path / ".git" / "notes.md").write_text("git internals")
    files = collect_files([tmp_path])
    got = dict(files)
    root = tmp_path.resolve()
    assert got == {str(root / "docs" / "a.md"): "# A\n", str(root / "docs" / "c.rst"): "C\n",
                   str(root / "docs" / "deep" / "b.py"): "x = 1\n"}
    assert files.skipped.count == 2
    assert any("blob.txt (binary)" in s for s in files.skipped.examples)
    assert any("latin1.txt (not UTF-8" in s for s in files.skipped.examples)


def test_collect_files_strict_names_the_bad_file(tmp_path):
    (tmp_path / "ok.md").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8"):
        list(collect_files([tmp_path], strict=True))
    with pytest.raises(UserError, match="no such file"):
        collect_files([tmp_path / "missing"])


def test_collect_files_feeds_update(tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\n\n## Logs\n\nRotate them weekly.\n")
    with Index(tmp_path / "i.sqlite") as index:
        stats = index.update(collect_files([tmp_path]), complete=True)
        assert stats.added == 1
        hit = index.search("rotate logs")[0]
        assert hit.path == str((tmp_path / "notes.md").resolve()) and hit.heading == "Notes > Logs"



def test_an_unopenable_place_is_one_line(tmp_path):
    (tmp_path / "t.sqlite").mkdir()  # a directory where the file should be (permissions can't be tested as root)
    with pytest.raises(UserError, match="cannot open index .* for writing"):
        Index(tmp_path / "t.sqlite")


def test_function_words_are_dropped_unless_nothing_else_is_left():
    assert fts5_query("What does `textwrap.dedent` do?") == '"textwrap" OR "dedent"'
    assert fts5_query("to be or not") == '"not"'
    assert fts5_query("what is it") == '"what" OR "is" OR "it"'


def test_a_title_heads_every_chunk_and_weighs_more_than_text(tmp_path):
    with Index(tmp_path / "t.sqlite") as ix:
        ix.update([("doc/a", "Mentions dedent once among other words about text.", ""),
                   ("doc/b", "Remove common leading whitespace.", "textwrap.dedent")])
        hits = ix.search("dedent")
    assert [h.path for h in hits] == ["doc/b", "doc/a"]
    assert hits[0].heading == "textwrap.dedent" and hits[0].text == "Remove common leading whitespace."
