"""Tokenize a corpus once into flat token-id files, split off validation data, and serve batches.

Training reads random windows of a long 1-D token stream, so the tokenized corpus is stored as two raw
arrays, ``train.bin`` and ``val.bin``, opened as numpy memmaps: nothing is loaded into RAM up front and a
corpus bigger than memory still works. Tokenizing is the slow part, so the result is cached under
``cache_dir/<key>/`` where the key hashes everything that determines the arrays (corpus fingerprint,
tokenizer fingerprint, split parameters, format version). ``meta.json`` is written last: its presence is
what marks a cache entry as complete, so a run killed mid-write is simply redone next time.

Layout of each split: every document's tokens followed by ``tokenizer.eos_id``, concatenated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.corpus import corpus_fingerprint, load_documents
from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json

#: Bump when the on-disk layout or the split/chunking rules change: old caches then miss instead of lying.
FORMAT_VERSION = 2  # 2: special-token text in documents is encoded as plain text

#: Documents longer than this are cut (at a newline when possible) before `encode_batch`, so one huge
#: file never becomes one huge tokenizer call: memory stays bounded and the progress bar keeps moving.
CHUNK_CHARS = 100_000

#: Roughly how many characters go into one `encode_batch` call.
BATCH_CHARS = 1_000_000


@dataclass
class TokenData:
    """A prepared corpus: memmapped train/val token streams plus the metadata describing them."""

    train: np.ndarray
    val: np.ndarray
    directory: Path
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use versus uint32 and suffices for vocabularies up to 65535."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def cache_key(corpus_fp: str, tokenizer_fp: str, val_fraction: float, seed: int, errors: str) -> str:
    """sha256 over everything that determines the token arrays.

    ``errors`` is included because a cache built with ``--errors replace`` must not be served to a later
    strict run, which is supposed to refuse the undecodable file.
    """
    blob = json.dumps(
        {
            "corpus": corpus_fp,
            "tokenizer": tokenizer_fp,
            "val_fraction": float(val_fraction),
            "seed": int(seed),
            "errors": errors,
            "version": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def chunk_text(text: str, max_chars: int | None = None) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` (default `CHUNK_CHARS`), cutting just after a newline.

    ``"".join(chunk_text(t)) == t`` always. The cut points depend only on the text, so tokenizing the
    chunks is deterministic (ids may differ slightly from one whole-document call right at a cut, which is
    acceptable: cutting after a newline keeps that to the rare merge across a line break). A piece with
    no newline in its window is cut hard at `max_chars`.
    """
    if max_chars is None:
        max_chars = CHUNK_CHARS
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    chunks = []
    start, n = 0, len(text)
    while n - start > max_chars:
        nl = text.rfind("\n", start, start + max_chars)
        end = nl + 1 if nl >= start else start + max_chars
        chunks.append(text[start:end])
        start = end
    if start < n or not chunks:
        chunks.append(text[start:])
    return chunks


def _tail_cut(text: str, val_fraction: float) -> int:
    """Where a single document splits into train (before) and validation (after): nanoGPT's tail split.

    The nominal cut leaves the last `val_fraction` of the characters for validation; it is moved to just
    after the nearest newline within half the validation length, so validation starts on a fresh line.
    The result always leaves both sides non-empty (the caller guarantees ``len(text) >= 2``).
    """
    n = len(text)
    cut = min(max(n - int(round(n * val_fraction)), 1), n - 1)
    window = max(1, (n - cut) // 2)
    before = text.rfind("\n", max(0, cut - window), cut)
    after = text.find("\n", cut, min(n, cut + window))
    candidates = [p + 1 for p in (before, after) if p >= 0 and 0 < p + 1 < n]
    if candidates:
        cut = min(candidates, key=lambda p: (abs(p - cut), p))
    return cut


def _split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str]:
    """Return (train_docs, val_docs, how). Whole documents when there are several, else the text's tail.

    Splitting by whole documents keeps validation text unseen in any form during training. With one
    document (a single big text file) that is impossible, so its last `val_fraction` becomes validation.
    Documents keep their original order within each split; which ones go to validation is a seeded draw.
    """
    if len(docs) == 1:
        text = docs[0]
        if len(text) < 2:
            raise UserError("corpus too short: a single document of 1 character cannot be split into train and validation")
        cut = _tail_cut(text, val_fraction)
        return [text[:cut]], [text[cut:]], "characters"
    n_val = min(max(1, int(round(len(docs) * val_fraction))), len(docs) - 1)
    rng = np.random.default_rng(seed)
    val_idx = set(rng.permutation(len(docs))[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val, "documents"


def _encoded_batches(docs: list[str], tokenizer, bar: tqdm) -> Iterator[np.ndarray]:
    """Yield int64 id arrays for `docs` (each document followed by eos), batching chunks for encode_batch."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    pending: list[str] = []  # chunks waiting for the next encode_batch call
    ends_doc: list[bool] = []  # whether chunk i is the last chunk of its document
    pending_chars = 0

    def flush() -> np.ndarray:
        encoded = tokenizer.encode_batch(pending, allow_special=False)
        if len(encoded) != len(pending):
            raise RuntimeError(f"encode_batch returned {len(encoded)} results for {len(pending)} texts")
        parts: list[np.ndarray] = []
        for ids, last in zip(encoded, ends_doc):
            parts.append(np.asarray(ids, dtype=np.int64))
            if last:
                parts.append(eos)
        bar.update(pending_chars)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    for doc in docs:
        chunks = chunk_text(doc)
        for j, chunk in enumerate(chunks):
            pending.append(chunk)
            ends_doc.append(j == len(chunks) - 1)
            pending_chars += len(chunk)
            if pending_chars >= BATCH_CHARS or len(pending) >= 4096:
                yield flush()
                pending, ends_doc, pending_chars = [], [], 0
    if pending:
        yield flush()


def _write_tokens(path: Path, docs: list[str], tokenizer, dtype: np.dtype, bar: tqdm) -> int:
    """Stream `docs`' token ids into `path` atomically; return the number of tokens written."""
    count = 0
    limit = int(tokenizer.vocab_size)

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "wb") as f:
            for ids in _encoded_batches(docs, tokenizer, bar):
                if ids.size and (ids.min() < 0 or ids.max() >= limit):
                    bad = int(ids.max()) if ids.max() >= limit else int(ids.min())
                    raise RuntimeError(f"tokenizer produced id {bad} outside its vocabulary of {limit}")
                f.write(ids.astype(dtype).tobytes())
                count += int(ids.size)

    atomic_write(path, write)
    return count


def _open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _load_cached(directory: Path, key: str) -> TokenData | None:
    """The cache entry in `directory` if it is complete and consistent, else None (then it is rebuilt)."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            n = int(meta[f"{split}_tokens"])
            path = directory / f"{split}.bin"
            if n <= 0 or path.stat().st_size != n * dtype.itemsize:
                return None
            arrays.append(_open_tokens(path, dtype, n))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenData(train=arrays[0], val=arrays[1], directory=directory, meta=meta)


def _check_block_size(data: TokenData, block_size: int | None) -> None:
    if block_size is None:
        return
    need = block_size + 1
    n_train, n_val = len(data.train), len(data.val)
    if n_train < need:
        raise UserError(
            f"corpus too short: {n_train} training tokens, fewer than one context window of "
            f"block_size+1 = {need} tokens; use more text or a smaller --block-size"
        )
    if n_val < need:
        raise UserError(
            f"corpus too short: {n_val} validation tokens, fewer than one context window of "
            f"block_size+1 = {need} tokens; use more text, a larger --val-fraction or a smaller --block-size"
        )


def prepare_data(
    spec: str,
    tokenizer,
    cache_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    errors: str = "strict",
    block_size: int | None = None,
    show_progress: bool = True,
) -> TokenData:
    """Tokenize the corpus `spec` with `tokenizer` into cached memmap shards, or reuse the cached ones.

    `tokenizer` needs ``encode_batch(list[str], allow_special=False) -> list[list[int]]`` (no BOS; special-token text in raw documents stays text), ``eos_id``, ``vocab_size``
    and ``fingerprint()``. The cache key covers the corpus fingerprint (cheap: paths, sizes, mtimes),
    the tokenizer fingerprint, `val_fraction`, `seed`, `errors` and the format version, so a repeat run
    opens the memmaps without reading or tokenizing any text. `block_size` is not part of the key: it
    only checks that each split holds at least one ``block_size + 1`` window, raising `UserError` if not.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if block_size is not None and block_size < 1:
        raise UserError(f"--block-size must be a positive integer, got {block_size}")
    corpus_fp = corpus_fingerprint(spec)
    tokenizer_fp = tokenizer.fingerprint()
    key = cache_key(corpus_fp, tokenizer_fp, val_fraction, seed, errors)
    directory = Path(cache_dir) / key[:16]

    data = _load_cached(directory, key)
    if data is None:
        data = _build(spec, tokenizer, directory, key, corpus_fp, tokenizer_fp,
                      val_fraction=val_fraction, seed=seed, errors=errors, show_progress=show_progress)
    _check_block_size(data, block_size)
    return data


def _build(
    spec: str,
    tokenizer,
    directory: Path,
    key: str,
    corpus_fp: str,
    tokenizer_fp: str,
    *,
    val_fraction: float,
    seed: int,
    errors: str,
    show_progress: bool,
) -> TokenData:
    docs = load_documents(spec, errors=errors)
    train_docs, val_docs, how = _split(docs, val_fraction, seed)
    del docs
    dtype = token_dtype(int(tokenizer.vocab_size))
    train_chars = sum(len(d) for d in train_docs)
    val_chars = sum(len(d) for d in val_docs)

    directory.mkdir(parents=True, exist_ok=True)
    # A stale or partial meta.json must not vouch for the files being rewritten below.
    (directory / "meta.json").unlink(missing_ok=True)
    with tqdm(total=train_chars + val_chars, unit="char", unit_scale=True, desc="tokenizing",
              disable=not show_progress) as bar:
        train_tokens = _write_tokens(directory / "train.bin", train_docs, tokenizer, dtype, bar)
        val_tokens = _write_tokens(directory / "val.bin", val_docs, tokenizer, dtype, bar)

    meta = {
        "version": FORMAT_VERSION,
        "key": key,
        "spec": spec,
        "corpus_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "dtype": dtype.name,
        "split": how,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "errors": errors,
        "n_docs": len(train_docs) + len(val_docs) if how == "documents" else 1,
        "n_train_docs": len(train_docs),
        "n_val_docs": len(val_docs),
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "chars": train_chars + val_chars,
        "train_chars": train_chars,
        "val_chars": val_chars,
    }
    atomic_write_json(directory / "meta.json", meta)  # last: its presence marks the entry complete
    return TokenData(
        train=_open_tokens(directory / "train.bin", dtype, train_tokens),
        val=_open_tokens(directory / "val.bin", dtype, val_tokens),
        directory=directory,
        meta=meta,
    )


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, *, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` random windows of `block_size` tokens: inputs x and next-token targets y.

    This is a pure function of ``(tokens, batch_size, block_size, seed, step)``: window starts come from
    ``np.random.default_rng([seed, step])`` and no state is carried between calls. That is what makes a
    resumed run exact -- the data position is just the step number, so restoring the step restores the
    batch stream without saving any sampler state. Returns ``x = tokens[i:i+T]`` and
    ``y = tokens[i+1:i+T+1]`` per row as contiguous ``torch.int64`` tensors of shape ``(B, T)``.
    """
    n = len(tokens)
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
    if n < block_size + 1:
        raise UserError(
            f"corpus too short: {n} tokens, fewer than one context window of block_size+1 = {block_size + 1} "
            "tokens; use more text or a smaller --block-size"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - block_size, size=batch_size)  # high is exclusive: last start n-T-1
    windows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y
