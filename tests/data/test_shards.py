"""Tests for lmforge.data.shards: tokenize-once caching, the train/val split, and pure batch sampling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import shards
from lmforge.data.shards import TokenData, chunk_text, get_batch, prepare_data
from lmforge.errors import UserError


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes are ids 0..255, eos is 256. Exactly invertible, so round trips are exact."""

    def __init__(self, vocab_size: int = 257, salt: str = "") -> None:
        self.vocab_size = vocab_size
        self.eos_id = 256
        self.salt = salt
        self.calls = 0
        self.texts: list[str] = []

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        self.calls += 1
        self.texts.extend(texts)
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8")

    def fingerprint(self) -> str:
        return hashlib.sha256(f"bytes-{self.vocab_size}-{self.salt}".encode()).hexdigest()


def split_docs(tok: ByteTokenizer, ids: np.ndarray) -> list[str]:
    """Decode a token stream into its documents (every document ends with eos)."""
    ids = np.asarray(ids)
    assert len(ids) and ids[-1] == tok.eos_id, "stream must end with the document separator"
    ends = np.flatnonzero(ids == tok.eos_id)
    out, start = [], 0
    for e in ends:
        out.append(tok.decode(ids[start:e]))
        start = e + 1
    return out


def make_docs(n: int = 60) -> list[str]:
    return [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(5 + i % 11)) + "\n" for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def make_play(lines: int = 400) -> str:
    return "".join(f"SPEAKER {i % 5}:\nLine number {i}, with ünïcode and words.\n\n" for i in range(lines))


# --- prepare_data ----------------------------------------------------------------------------------------


def test_documents_round_trip_and_split_is_disjoint(tmp_path: Path) -> None:
    docs = make_docs(60)
    spec = str(write_jsonl(tmp_path / "docs.jsonl", docs))
    tok = ByteTokenizer()
    data = prepare_data(spec, tok, tmp_path / "cache", val_fraction=0.1, seed=3, show_progress=False)

    assert isinstance(data, TokenData) and isinstance(data.train, np.memmap)
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    train_docs, val_docs = split_docs(tok, data.train), split_docs(tok, data.val)
    assert len(val_docs) == 6 and len(train_docs) == 54
    assert not set(train_docs) & set(val_docs)
    # each split keeps the original document order; together they are the whole corpus
    assert sorted(train_docs + val_docs, key=docs.index) == docs
    assert train_docs == [d for d in docs if d in set(train_docs)]

    m = data.meta
    assert m["n_docs"] == 60 and m["n_train_docs"] == 54 and m["n_val_docs"] == 6
    assert m["train_tokens"] == len(data.train) and m["val_tokens"] == len(data.val)
    assert m["train_chars"] == sum(map(len, train_docs)) and m["val_chars"] == sum(map(len, val_docs))
    assert m["chars"] == sum(map(len, docs))
    assert m["dtype"] == "uint16" and m["val_fraction"] == 0.1 and m["seed"] == 3 and m["split"] == "documents"
    assert json.loads((data.directory / "meta.json").read_text()) == m
    assert data.directory.parent == tmp_path / "cache" and len(data.directory.name) == 16


def test_split_is_seeded(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(60)))
    tok = ByteTokenizer()
    a = prepare_data(spec, tok, tmp_path / "a", seed=1, show_progress=False)
    b = prepare_data(spec, tok, tmp_path / "b", seed=1, show_progress=False)
    c = prepare_data(spec, tok, tmp_path / "c", seed=2, show_progress=False)
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.val, c.val)
    assert a.directory.name == b.directory.name != c.directory.name


def test_val_non_empty_with_two_documents_and_tiny_fraction(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", ["first doc", "second doc"]))
    tok = ByteTokenizer()
    data = prepare_data(spec, tok, tmp_path / "cache", val_fraction=0.001, show_progress=False)
    assert len(split_docs(tok, data.val)) == 1 and len(split_docs(tok, data.train)) == 1


def test_single_document_splits_on_the_tail_at_a_newline(tmp_path: Path) -> None:
    text = make_play(400)
    p = tmp_path / "play.txt"
    p.write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    data = prepare_data(str(p), tok, tmp_path / "cache", val_fraction=0.1, show_progress=False)
    (train,), (val,) = split_docs(tok, data.train), split_docs(tok, data.val)
    assert train + val == text
    assert train.endswith("\n")  # cut at a line boundary
    assert 0.05 < len(val) / len(text) < 0.15
    assert data.meta["split"] == "characters" and data.meta["n_docs"] == 1
    assert data.meta["val_chars"] == len(val) and data.meta["train_chars"] == len(train)


def test_single_document_without_newlines_still_splits(tmp_path: Path) -> None:
    text = "x" * 1000
    p = tmp_path / "flat.txt"
    p.write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    data = prepare_data(str(p), tok, tmp_path / "cache", val_fraction=0.05, show_progress=False)
    (train,), (val,) = split_docs(tok, data.train), split_docs(tok, data.val)
    assert train + val == text and len(val) == 50


def test_long_documents_are_chunked_before_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "CHUNK_CHARS", 500)
    monkeypatch.setattr(shards, "BATCH_CHARS", 2000)
    text = make_play(300)
    p = tmp_path / "play.txt"
    p.write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    data = prepare_data(str(p), tok, tmp_path / "cache", show_progress=False)
    assert max(map(len, tok.texts)) <= 500
    assert tok.calls > 5  # several encode_batch calls, so the progress bar moves
    (train,), (val,) = split_docs(tok, data.train), split_docs(tok, data.val)
    assert train + val == text


def test_cache_hit_does_not_read_or_tokenize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(40)))
    tok = ByteTokenizer()
    first = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    assert tok.calls > 0

    def boom(*args, **kwargs):
        raise AssertionError("cache hit must not tokenize or read the corpus")

    monkeypatch.setattr(tok, "encode_batch", boom)
    monkeypatch.setattr(shards, "load_documents", boom)
    second = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    assert second.directory == first.directory and second.meta == first.meta
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_missing_meta_means_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(40)))
    tok = ByteTokenizer()
    first = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    directory, meta = first.directory, first.meta
    expected_train, expected_val = np.array(first.train), np.array(first.val)
    del first  # unmap before the files are replaced
    (directory / "meta.json").unlink()  # as if the process died before the last write...
    (directory / "val.bin").unlink()
    (directory / "val.bin").write_bytes(b"\x00\x01")  # ...leaving junk behind
    calls = tok.calls
    again = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    assert tok.calls > calls and again.meta == meta
    assert np.array_equal(again.train, expected_train) and np.array_equal(again.val, expected_val)


def test_truncated_bin_is_not_trusted(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(40)))
    tok = ByteTokenizer()
    first = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    directory, n = first.directory, first.meta["train_tokens"]
    del first
    (directory / "train.bin").unlink()
    (directory / "train.bin").write_bytes(b"\x00\x00")
    calls = tok.calls
    again = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)
    assert tok.calls > calls and len(again.train) == n


def test_key_changes_with_tokenizer_data_and_parameters(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "docs.jsonl", make_docs(40))
    cache = tmp_path / "cache"
    base = prepare_data(str(p), ByteTokenizer(), cache, show_progress=False).directory
    other_tok = prepare_data(str(p), ByteTokenizer(salt="retrained"), cache, show_progress=False).directory
    other_frac = prepare_data(str(p), ByteTokenizer(), cache, val_fraction=0.2, show_progress=False).directory
    other_errors = prepare_data(str(p), ByteTokenizer(), cache, errors="replace", show_progress=False).directory
    write_jsonl(p, make_docs(41))
    other_data = prepare_data(str(p), ByteTokenizer(), cache, show_progress=False)
    dirs = {base, other_tok, other_frac, other_errors, other_data.directory}
    assert len(dirs) == 5
    assert other_data.meta["n_docs"] == 41


def test_too_short_corpus(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(20)))
    tok = ByteTokenizer()
    with pytest.raises(UserError) as info:
        prepare_data(spec, tok, tmp_path / "cache", block_size=100_000, show_progress=False)
    msg = str(info.value)
    assert "corpus too short" in msg and "training tokens" in msg and "100001" in msg and "--block-size" in msg
    assert "\n" not in msg

    data = prepare_data(spec, tok, tmp_path / "cache", show_progress=False)  # the cache itself is fine
    between = len(data.val) + 5  # train long enough, val not
    assert len(data.train) > between
    with pytest.raises(UserError, match="validation tokens.*--val-fraction"):
        prepare_data(spec, tok, tmp_path / "cache", block_size=between, show_progress=False)
    ok = prepare_data(spec, tok, tmp_path / "cache", block_size=len(data.val) - 1, show_progress=False)
    assert len(ok.val) == len(data.val)


def test_dtype_follows_vocab_size(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(20)))
    small = prepare_data(spec, ByteTokenizer(vocab_size=65535), tmp_path / "cache", show_progress=False)
    big = prepare_data(spec, ByteTokenizer(vocab_size=70_000), tmp_path / "cache", show_progress=False)
    assert small.train.dtype == np.uint16 and small.meta["dtype"] == "uint16"
    assert big.train.dtype == np.uint32 and big.meta["dtype"] == "uint32"
    assert np.array_equal(small.train, big.train)


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(20)))
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="--val-fraction"):
            prepare_data(spec, ByteTokenizer(), tmp_path / "cache", val_fraction=frac, show_progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(str(tmp_path / "nope.txt"), ByteTokenizer(), tmp_path / "cache", show_progress=False)


def test_with_real_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real BPE tokenizer (when lmforge.tokenizer is importable) produces a usable, cached corpus."""
    tokenizer_mod = pytest.importorskip("lmforge.tokenizer")
    docs = make_docs(80)
    tok = tokenizer_mod.train_tokenizer(docs, 300, show_progress=False)
    spec = str(write_jsonl(tmp_path / "docs.jsonl", docs))
    data = prepare_data(spec, tok, tmp_path / "cache", block_size=16, show_progress=False)
    assert data.train.dtype == np.uint16 and len(data.val) > 17
    assert int(np.asarray(data.train).max()) < tok.vocab_size
    assert np.count_nonzero(np.asarray(data.train) == tok.eos_id) == data.meta["n_train_docs"]
    if hasattr(tok, "decode"):  # tokens decode back to the documents, separated by <|endoftext|>
        for ids, n_docs in ((data.train, data.meta["n_train_docs"]), (data.val, data.meta["n_val_docs"])):
            parts = tok.decode([int(i) for i in ids]).split("<|endoftext|>")
            assert parts[-1] == "" and len(parts) - 1 == n_docs and all(p in docs for p in parts[:-1])
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("cache hit must not tokenize"))
    assert prepare_data(spec, tok, tmp_path / "cache", show_progress=False).meta == data.meta


# --- chunk_text ------------------------------------------------------------------------------------------


def test_chunk_text_prefers_newlines() -> None:
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    assert chunk_text(text, 7) == ["aaaa\n", "bbbb\n", "cccc\n", "dddd\n"]
    assert chunk_text("x" * 10, 4) == ["xxxx", "xxxx", "xx"]
    assert chunk_text("", 4) == [""]
    assert chunk_text("short", 100) == ["short"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\n é", max_size=300), st.integers(min_value=1, max_value=50))
def test_chunk_text_is_lossless_and_bounded(text: str, max_chars: int) -> None:
    chunks = chunk_text(text, max_chars)
    assert "".join(chunks) == text
    assert all(0 < len(c) <= max_chars for c in chunks) or chunks == [""]
    assert chunk_text(text, max_chars) == chunks


# --- get_batch -------------------------------------------------------------------------------------------


def test_get_batch_shapes_dtype_and_shift() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 32, seed=0, step=0)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # tokens are arange, so targets are inputs shifted by one
    assert int(y.max()) <= 999 and int(x.min()) >= 0


def test_get_batch_is_a_pure_function_of_seed_and_step() -> None:
    tokens = np.random.default_rng(0).integers(0, 50_000, size=5000).astype(np.uint16)
    a = get_batch(tokens, 4, 16, seed=7, step=123)
    get_batch(tokens, 4, 16, seed=7, step=5)  # interleaved calls carry no state
    b = get_batch(tokens, 4, 16, seed=7, step=123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], get_batch(tokens, 4, 16, seed=7, step=124)[0])
    assert not torch.equal(a[0], get_batch(tokens, 4, 16, seed=8, step=123)[0])


def test_get_batch_matches_slicing_and_reaches_the_end() -> None:
    tokens = np.arange(20, dtype=np.uint32)
    seen_last = False
    for step in range(200):
        x, y = get_batch(tokens, 3, 19, seed=1, step=step)  # only one valid window: start 0
        assert torch.equal(x[0], torch.arange(19)) and torch.equal(y[0], torch.arange(1, 20))
    for step in range(200):
        x, y = get_batch(tokens, 2, 5, seed=1, step=step)
        for row_x, row_y in zip(x, y):
            i = int(row_x[0])
            assert torch.equal(row_x, torch.from_numpy(tokens[i : i + 5].astype(np.int64)))
            assert torch.equal(row_y, torch.from_numpy(tokens[i + 1 : i + 6].astype(np.int64)))
            seen_last |= int(row_y[-1]) == 19
    assert seen_last


def test_get_batch_on_memmap(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "docs.jsonl", make_docs(40)))
    data = prepare_data(spec, ByteTokenizer(), tmp_path / "cache", show_progress=False)
    x, y = get_batch(data.train, 4, 8, seed=0, step=0)
    assert x.shape == (4, 8) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_get_batch_too_short() -> None:
    with pytest.raises(UserError, match="corpus too short"):
        get_batch(np.arange(10, dtype=np.uint16), 2, 10, seed=0, step=0)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\n", min_size=2, max_size=200), st.floats(min_value=0.001, max_value=0.999))
def test_tail_split_is_lossless_and_leaves_both_sides_non_empty(text: str, frac: float) -> None:
    train, val, how = shards._split([text], frac, seed=0)
    assert how == "characters" and train[0] + val[0] == text and train[0] and val[0]
