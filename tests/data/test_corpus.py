"""Tests for lmforge.data.corpus: every spec kind loads, and every user mistake is one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.data import corpus
from lmforge.data.corpus import corpus_fingerprint, load_documents
from lmforge.errors import UserError


def _user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"UserError must be one line, got {msg!r}"
    return msg


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# --- spec kinds ------------------------------------------------------------------------------------------


def test_text_file_is_one_document(tmp_path: Path) -> None:
    text = "First line.\nSecond line, with ünïcødé.\n\nThird paragraph.\n"
    p = tmp_path / "story.txt"
    p.write_text(text, encoding="utf-8")
    assert load_documents(str(p)) == [text]


def test_markdown_and_unknown_suffix_are_one_document(tmp_path: Path) -> None:
    md = tmp_path / "notes.md"
    md.write_text("# Title\n\nbody\n", encoding="utf-8")
    other = tmp_path / "data.log"
    other.write_text("log line\n", encoding="utf-8")
    assert load_documents(str(md)) == ["# Title\n\nbody\n"]
    assert load_documents(str(other)) == ["log line\n"]


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    texts = ["alpha beta", "line\nbreaks inside", "has a raw \u2028 line separator", "ünï"]
    p = tmp_path / "docs.jsonl"
    # raw (unescaped) U+2028 is legal JSON; it must not split the line
    p.write_text(
        "\n".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)) + "\n\n",
        encoding="utf-8",
    )
    assert load_documents(str(p)) == texts


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfhello\n")
    assert load_documents(str(p)) == ["hello\n"]


def test_directory_is_recursive_sorted_and_deterministic(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".hidden").mkdir()
    # created in non-sorted order on purpose
    (d / "zeta.txt").write_text("zeta", encoding="utf-8")
    (d / "sub" / "deeper" / "x.md").write_text("deep md", encoding="utf-8")
    _jsonl(d / "sub" / "b.jsonl", ["json one", "json two"])
    (d / "alpha.md").write_text("alpha", encoding="utf-8")
    (d / "image.png").write_bytes(b"\x89PNG\xff\xfe not text")  # ignored: wrong suffix
    (d / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")  # ignored: hidden dir
    (d / ".backup.txt").write_text("hidden", encoding="utf-8")  # ignored: hidden file
    expected = ["alpha", "json one", "json two", "deep md", "zeta"]  # alpha.md, sub/b.jsonl, sub/deeper/x.md, zeta.txt
    assert load_documents(str(d)) == expected
    assert load_documents(str(d)) == expected


def test_comma_separated_specs_concatenate(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("aaa", encoding="utf-8")
    b = _jsonl(tmp_path / "b.jsonl", ["b1", "b2"])
    assert load_documents(f"{b}, {a}") == ["b1", "b2", "aaa"]


def test_whitespace_only_documents_are_dropped(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "d.jsonl", ["keep", "", "  \n\t", "also keep"])
    assert load_documents(str(p)) == ["keep", "also keep"]


def test_builtin_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(corpus._BUILTINS, "tiny", (lambda: ["doc one", "doc two"], lambda: "hash-1"))
    assert load_documents("builtin:tiny") == ["doc one", "doc two"]
    fp1 = corpus_fingerprint("builtin:tiny")
    monkeypatch.setitem(corpus._BUILTINS, "tiny", (lambda: ["doc one", "doc two"], lambda: "hash-2"))
    assert corpus_fingerprint("builtin:tiny") != fp1


def test_builtin_pydocs_real() -> None:
    pydocs = pytest.importorskip("lmforge.data.pydocs")
    docs = load_documents("builtin:pydocs")
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)
    assert len(docs) == len([d for d in pydocs.pydocs_documents() if d.strip()])
    assert corpus_fingerprint("builtin:pydocs") == corpus_fingerprint("builtin:pydocs")


# --- errors ----------------------------------------------------------------------------------------------


def test_unknown_builtin_lists_known_ones() -> None:
    msg = _user_error(load_documents, "builtin:nope")
    assert "builtin:nope" in msg and "builtin:pydocs" in msg
    assert "builtin:pydocs" in _user_error(corpus_fingerprint, "builtin:nope")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.txt"
    assert str(missing) in _user_error(load_documents, str(missing))
    assert str(missing) in _user_error(corpus_fingerprint, str(missing))


def test_directory_without_text_files(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "picture.png").write_bytes(b"\x89PNG")
    msg = _user_error(load_documents, str(d))
    assert str(d) in msg and ".txt" in msg


def test_empty_data_names_the_spec(tmp_path: Path) -> None:
    p = tmp_path / "blank.txt"
    p.write_text("   \n\n\t\n", encoding="utf-8")
    msg = _user_error(load_documents, str(p))
    assert str(p) in msg and "empty" in msg
    e = _jsonl(tmp_path / "blank.jsonl", ["", " "])
    assert str(e) in _user_error(load_documents, str(e))


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n', encoding="utf-8")
    msg = _user_error(load_documents, str(p))
    assert f"{p}:3" in msg and "JSON" in msg


@pytest.mark.parametrize(
    "line, reason",
    [('{"title": "no text"}', '"text"'), ('{"text": 42}', "int"), ('["text"]', "list"), ('"just a string"', "str")],
)
def test_jsonl_line_without_string_text(tmp_path: Path, line: str, reason: str) -> None:
    p = tmp_path / "shape.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    msg = _user_error(load_documents, str(p))
    assert f"{p}:2" in msg and reason in msg


def test_non_utf8_strict_names_file_and_offset(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("héllo".encode("utf-8") + b" caf\xe9 au lait")  # é is 2 bytes -> \xe9 at offset 10
    msg = _user_error(load_documents, str(p))
    assert str(p) in msg and "offset 10" in msg and "--errors replace" in msg


def test_non_utf8_offset_is_absolute_in_jsonl_and_after_bom(tmp_path: Path) -> None:
    first = b'{"text": "fine"}\n'
    p = tmp_path / "bad.jsonl"
    p.write_bytes(first + b'{"text": "ab\xffcd"}\n')
    assert f"offset {len(first) + 12}" in _user_error(load_documents, str(p))
    q = tmp_path / "bom.txt"
    q.write_bytes(b"\xef\xbb\xbfab\x80")
    assert "offset 5" in _user_error(load_documents, str(q))


def test_non_utf8_replace(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9 au lait")
    assert load_documents(str(p), errors="replace") == ["caf\ufffd au lait"]
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ab\xffcd"}\n')
    assert load_documents(str(j), errors="replace") == ["ab\ufffdcd"]


def test_unknown_errors_mode(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("x", encoding="utf-8")
    assert "--errors" in _user_error(load_documents, str(p), errors="ignore")


# --- fingerprint -----------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_changes(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    f = d / "a.txt"
    f.write_text("hello", encoding="utf-8")
    fp = corpus_fingerprint(str(d))
    assert fp == corpus_fingerprint(str(d))
    assert corpus_fingerprint(str(f)) == fp  # same files, same documents: same fingerprint

    f.write_text("hello, world", encoding="utf-8")  # size changes
    fp2 = corpus_fingerprint(str(d))
    assert fp2 != fp

    f.write_text("hello, wurld", encoding="utf-8")  # same size, new content
    fp3 = corpus_fingerprint(str(d))
    assert fp3 != fp2

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched only: same content, same key
    assert corpus_fingerprint(str(d)) == fp3

    (d / "b.md").write_text("more", encoding="utf-8")  # new file in the directory
    assert corpus_fingerprint(str(d)) != fp3


def test_fingerprint_hashes_content_not_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("same text", encoding="utf-8")
    (tmp_path / "b" / "x.txt").write_text("same text", encoding="utf-8")
    assert corpus_fingerprint(str(tmp_path / "a" / "x.txt")) == corpus_fingerprint(str(tmp_path / "b" / "x.txt"))
