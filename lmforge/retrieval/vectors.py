"""Chunk vectors inside the index file, and the cosine + BM25 fusion that hybrid search ranks by.

Storage: one little-endian float32 BLOB per chunk in `vectors(chunk_id, v)`, read once per process into a
numpy matrix and searched by brute force (a matrix-vector product). Chosen by measurement over the
alternative, the `sqlite-vec` extension (vec0 table, cosine distance), with 6000 chunks x 384 dimensions
(the size of the builtin:pydocs index with a MiniLM/bge-small encoder), on this project's 2-core machine:

    storage             file size   query (k=50)        first query of a process   inserting 6000
    BLOB + numpy        12.3 MB     0.15 ms             + 19 ms to read the matrix  0.05 s
    sqlite-vec 0.1.9     9.6 MB     5.5 ms              6 ms                        1.4 s

(File sizes: the vectors alone.) Brute force over a cached matrix is 35x faster per query and needs no
native extension, which would also have to be loadable: the sqlite3 module of some Python builds (this
project's venv among them: no `enable_load_extension`) cannot load extensions at all. The price
is 2.7 MB more on disk (a 1.5 KB row leaves a quarter of each 4 KB page unused) and the matrix in memory
(n x dim x 4 bytes: 9 MB here). At a million chunks a real vector index would be worth its dependency.
End to end, a hybrid query on such an index (a bge-small-shaped encoder: 12 layers, 384 wide) is
dominated by embedding the query: ~180-280 ms on the shared 2 cores, then BM25's top 50 (up to ~30 ms
when every chunk matches) and the cosine top 50 (0.15 ms).

A chunk's vector goes when its chunk does (a trigger), and vectors are written in the same transaction as
the chunks they belong to (`Index.update`), so a committed index never has a vector pointing at other text
(chunk ids are never reused) and a kill mid-way leaves the previous index, vectors included.

Fusion: reciprocal-rank fusion (Cormack, Clarke & Buettcher 2009), score(d) = sum over the two rankings
of 1 / (RRF_K + rank(d)), over the top `CANDIDATES` of each. It needs no calibration between BM25's and
cosine's scales, which have nothing in common; RRF_K = 60 is the constant of the paper, used as is by
most hybrid search engines.
"""

from __future__ import annotations

import sqlite3

import numpy as np

RRF_K = 60
CANDIDATES = 50  # how deep each ranking is read before fusing

# Statements, run one by one inside the writer's transaction (`executescript` would commit it first).
SCHEMA = ("CREATE TABLE IF NOT EXISTS vectors(chunk_id INTEGER PRIMARY KEY, v BLOB NOT NULL)",
          "CREATE TRIGGER IF NOT EXISTS chunks_vectors_ad AFTER DELETE ON chunks BEGIN "
          "DELETE FROM vectors WHERE chunk_id = old.id; END")


def to_blob(row: np.ndarray) -> bytes:
    return np.asarray(row, dtype="<f4").tobytes()


def has_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'vectors'").fetchone() is not None


def missing(db: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """(chunk id, heading, text) of the chunks that have no vector yet, in id order."""
    return db.execute("SELECT c.id, c.heading, c.text FROM chunks c LEFT JOIN vectors v ON v.chunk_id = c.id "
                      "WHERE v.chunk_id IS NULL ORDER BY c.id").fetchall()


def read_matrix(db: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids (n,), unit vectors (n, dim) float32) of every stored vector whose chunk exists."""
    rows = db.execute("SELECT v.chunk_id, v.v FROM vectors v JOIN chunks c ON c.id = v.chunk_id "
                      "ORDER BY v.chunk_id").fetchall()
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    blob = b"".join(r[1] for r in rows)
    if len(blob) != len(rows) * dim * 4:
        raise ValueError(f"vectors of {len(blob) // max(len(rows), 1) // 4} values where the index records {dim}")
    return ids, np.frombuffer(blob, "<f4").reshape(len(rows), dim).astype(np.float32, copy=False)


def nearest(ids: np.ndarray, matrix: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """Chunk ids of the `k` rows most similar (cosine: rows and query are unit vectors) to `query`, best
    first; ties by chunk id, so a ranking is reproducible."""
    if not len(ids):
        return []
    scores = matrix @ np.asarray(query, np.float32)
    k = min(k, len(ids))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
    top = top[np.lexsort((ids[top], -scores[top]))]
    return [int(i) for i in ids[top]]


def fuse(*rankings: list[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of rankings of chunk ids (best first): (id, score) sorted by score, higher
    better; ties by chunk id. A chunk in only one ranking still counts, with that ranking's share."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, start=1):
            score[cid] = score.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(score.items(), key=lambda item: (-item[1], item[0]))
