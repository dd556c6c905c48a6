"""Hybrid search: vectors find a paraphrase BM25 misses, RRF arithmetic, incremental embedding, one model
per index, a kill during `update(embedder=...)`, and a real tiny BERT end to end (library and CLI)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import writer_killed_midway

from lmforge.errors import UserError
from lmforge.retrieval import embed as embed_module
from lmforge.retrieval.index import Index
from lmforge.retrieval.vectors import RRF_K, fuse, nearest
from tests.retrieval.test_index import CORPUS

# Words that mean the same thing share a dimension, so a paraphrase with no word in common with a passage
# still lands next to it; every other word gets a dimension of its own (by first appearance).
CONCEPTS = [{"cat", "cats", "kitten", "feline"}, {"purr", "rumbling", "rumble"}, {"log", "logs", "journal"},
            {"rotate", "rotation", "logrotate", "cycle"}, {"backup", "backups", "snapshot", "copy"}]


class FakeEmbedder:
    """Deterministic concept bag-of-words vectors; records what it was asked to embed."""

    dim, max_tokens = 256, 12

    def __init__(self, model_id: str = "fake") -> None:
        self.model_id = model_id
        self.seen: list[str] = []
        self.words: dict[str, int] = {}

    def embed(self, texts):
        self.seen += texts
        out = np.zeros((len(texts), self.dim), np.float32)
        cut = []
        for i, t in enumerate(texts):
            words = re.findall(r"\w+", t.lower())
            cut.append(len(words) > self.max_tokens)
            for w in words[: self.max_tokens]:
                dim = next((j for j, c in enumerate(CONCEPTS) if w in c), None)
                if dim is None:
                    dim = len(CONCEPTS) + self.words.setdefault(w, len(self.words)) % (self.dim - len(CONCEPTS))
                out[i, dim] += 1.0
            out[i] /= max(np.linalg.norm(out[i]), 1e-12)
        return out, cut


def build(path: Path, embedder=None, docs=CORPUS) -> Index:
    index = Index(path)
    index.update(docs.items(), embedder=embedder)
    return index


def test_vectors_find_the_paraphrase_bm25_misses(tmp_path):
    query = "why does my kitten make a rumbling"
    with build(tmp_path / "plain.sqlite") as plain:
        assert plain.search(query) == [] and plain.search(query).mode == "bm25"  # no word in common
    fake = FakeEmbedder()
    with build(tmp_path / "h.sqlite", fake) as index:
        assert index.embed_model == "fake"
        hits = index.search(query, k=3, embedder=fake)
        assert hits.mode == "hybrid" and not hits.truncated
        assert hits[0].path == "cats.txt" and [h.rank for h in hits] == [1, 2, 3]
        # a query both rankings agree on: first in both, so the best score RRF can give
        top = index.search("rotate the logs", k=2, embedder=fake)
        assert top[0].path == "logs.md" and top[0].score == pytest.approx(2 / (RRF_K + 1))
        assert top[0].score > top[1].score
        assert index.search("cat " * 20, embedder=fake).truncated


def test_fusion_and_nearest_arithmetic():
    assert fuse([1, 2, 3], [3, 1]) == [(1, 1 / 61 + 1 / 62), (3, 1 / 63 + 1 / 61), (2, 1 / 62)]
    ids = np.array([10, 20, 30])
    m = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    assert nearest(ids, m, np.array([1, 0], np.float32), 2) == [10, 20]
    assert nearest(ids, m, np.array([0, 1], np.float32), 5) == [30, 20, 10]
    assert nearest(ids[:0], m[:0], np.array([0, 1], np.float32), 5) == []


def test_only_new_chunks_are_embedded_and_the_recorded_model_is_reused(tmp_path, monkeypatch):
    fake = FakeEmbedder()
    index = build(tmp_path / "h.sqlite", fake)
    assert len(fake.seen) == len(CORPUS)  # one chunk per small document
    again = FakeEmbedder()
    docs = {**CORPUS, "cats.txt": "Kittens purr.\n"}
    stats = index.update(docs.items(), embedder=again)
    assert (stats.changed, stats.embedded) == (1, 1) and again.seen == ["Kittens purr."]
    # without an embedder, an index with vectors embeds its new chunks with its recorded model
    loaded = []
    monkeypatch.setattr(embed_module, "embedder_for", lambda mid: loaded.append(mid) or again)
    stats = index.update({**docs, "new.md": "Zebras graze.\n"}.items())
    assert loaded == ["fake"] and stats.embedded == 1 and again.seen[-1] == "Zebras graze."
    assert index.search("zebras graze")[0].path == "new.md"  # hybrid, with the recorded model
    # a removed document takes its vector with it
    index.update({"cats.txt": "Kittens purr.\n"}.items(), complete=True)
    assert index._db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 1
    index.close()


def test_another_model_is_refused_naming_both(tmp_path):
    with build(tmp_path / "h.sqlite", FakeEmbedder("bge")) as index:
        for call in (lambda: index.update(CORPUS.items(), embedder=FakeEmbedder("minilm")),
                     lambda: index.search("logs", embedder=FakeEmbedder("minilm"))):
            with pytest.raises(UserError, match=r"vectors from model bge, not minilm.*--rebuild --embed minilm"):
                call()
    with build(tmp_path / "plain.sqlite") as plain:
        with pytest.raises(UserError, match="has no vectors"):
            plain.search("logs", embedder=FakeEmbedder())
    # switching models: --rebuild starts afresh
    with Index(tmp_path / "h.sqlite", rebuild=True) as index:
        index.update(CORPUS.items(), embedder=FakeEmbedder("minilm"))
        assert index.embed_model == "minilm"


KILLED_EMBED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, "tests")  # test_hybrid imports from conftest, as pytest lets it
    from lmforge.retrieval.index import Index
    from tests.retrieval.test_hybrid import FakeEmbedder
    def slow(n):
        print("embedded", n, flush=True)
        time.sleep(60)  # inside the transaction: the parent kills us here
    docs = [("garden.md", "# Garden\\n\\nMulch the strawberries.\\n"), ("new.md", "Zebras graze.\\n")]
    Index(sys.argv[1]).update(docs, embedder=FakeEmbedder(), embed_progress=slow)
""")


@pytest.mark.parametrize("embedded_before", [False, True])
def test_a_kill_during_embedding_leaves_the_previous_index_searchable(tmp_path, embedded_before):
    path = tmp_path / "t.sqlite"
    build(path, FakeEmbedder() if embedded_before else None).close()
    with writer_killed_midway(KILLED_EMBED, path, "embedded"):
        pass
    with Index(path) as index:
        fake = FakeEmbedder()
        assert index.embed_model == ("fake" if embedded_before else None)
        hits = index.search("tomatoes", embedder=fake if embedded_before else None)
        assert hits[0].path == "garden.md" and hits.mode == ("hybrid" if embedded_before else "bm25")
        assert "new.md" not in index.documents() and len(index.documents()) == 10
        stats = index.update(CORPUS.items(), complete=True, embedder=fake)  # and it can be written again
        assert stats.unchanged == 10 and stats.embedded == (0 if embedded_before else 10)


def test_real_tiny_bert_end_to_end(tmp_path, capsys):
    from conftest import run_cli
    from conftest import save_tiny_bert as bert_dir

    bert = bert_dir(tmp_path / "bert")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ops.md").write_text("# Logs\n\nrotate the logs.\n")
    (docs / "b.txt").write_text("backup at night.\n")
    (docs / "c.txt").write_text("the cat sat on the mat. " * 4 + "\n")  # 50 tokens: longer than 16 positions
    code, out, err = run_cli(capsys, "index", docs, "--name", "d", "--embed", bert)
    assert code == 0, err
    assert "3 chunks embedded with" in out and "1 of them longer than" in err
    code, out, err = run_cli(capsys, "search", "d", "rotate logs")
    assert code == 0 and "hybrid" in out and out.splitlines()[1].startswith("[1]") and "ops.md" in out
    code, out, err = run_cli(capsys, "search", "d", "the cat " * 10)
    assert code == 0 and "longer than" in err and "only its beginning" in err
    # the library gives the same vectors the embedder does
    e = embed_module.Embedder.load(bert)
    with Index(tmp_path / "home-independent.sqlite") as index:
        index.update([("x.md", "rotate the logs.\n")], embedder=e)
        ids, matrix = index._vectors(e.dim)
        (text,) = index._db.execute("SELECT text FROM chunks").fetchone()
        np.testing.assert_allclose(matrix[0], e.embed([text])[0][0], atol=1e-6)
    code, _, err = run_cli(capsys, "index", docs, "--name", "d", "--embed", tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and "nope" in err


def test_an_index_whose_model_is_gone_says_how_to_get_out(tmp_path):
    with build(tmp_path / "h.sqlite", FakeEmbedder(str(tmp_path / "gone-model"))) as index:
        for call in (lambda: index.search("logs"), lambda: index.update(CORPUS.items())):
            with pytest.raises(UserError, match=r"embedded with model .*gone-model, which cannot be loaded now "
                                                 r"\(.*no such file.*--rebuild"):
                call()


def test_the_vectors_are_read_once_and_again_after_each_update(tmp_path, monkeypatch):
    from lmforge.retrieval import vectors

    fake = FakeEmbedder()
    build(tmp_path / "h.sqlite", fake).close()
    reads = []
    real = vectors.read_matrix
    monkeypatch.setattr(vectors, "read_matrix", lambda db, dim: reads.append(dim) or real(db, dim))
    for _ in range(3):  # a server opens the index per request: the matrix is still read once
        with Index(tmp_path / "h.sqlite") as index:
            index.search("rotate the logs", embedder=fake)
    assert len(reads) == 1
    with Index(tmp_path / "h.sqlite") as index:
        index.update({**CORPUS, "new.md": "Zebras graze.\n"}.items(), embedder=fake)
        new_id = index.chunk_ids("new.md")[0]
    with Index(tmp_path / "h.sqlite") as index:  # another connection sees the commit
        assert index.search("zebras graze", k=1, embedder=fake)[0].path == "new.md"
        assert new_id in index._vectors(fake.dim)[0] and len(reads) == 2


def test_a_chat_model_can_embed_an_index_with_a_note(tmp_path, capsys, tiny_tokenizer):
    from conftest import run_cli, save_tiny_model

    model = save_tiny_model(tmp_path / "chat", tiny_tokenizer, context_length=32)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Logs\n\nrotate the logs daily.\n")
    code, out, err = run_cli(capsys, "index", docs, "--name", "d", "--embed", model)
    assert code == 0 and "1 chunks embedded" in out and "note:" in err and "retrieve worse" in err
    code, out, _ = run_cli(capsys, "search", "d", "logs")
    assert code == 0 and out.startswith("hybrid search") and "a.md" in out
