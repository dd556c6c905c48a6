"""chunk_document: every splitter on small hand-made documents, and for every chunk its line range checked
against the source lines (a reader opens the file at start_line and must find the passage there)."""

from __future__ import annotations

import pytest

from lmforge.errors import UserError
from lmforge.retrieval.chunking import Chunk, chunk_document, split_lines


def check_ranges(text: str, chunks: list[Chunk], max_chars: int = 1200) -> None:
    """Every chunk non-blank, within max_chars, starting in its start_line and ending in its end_line."""
    lines = split_lines(text)
    for c in chunks:
        assert c.text.strip(), c
        assert len(c.text) <= max_chars, c
        assert 1 <= c.start_line <= c.end_line <= len(lines), c
        window = "\n".join(lines[c.start_line - 1 : c.end_line])
        at = window.find(c.text)
        assert at >= 0, c
        assert at <= len(lines[c.start_line - 1]), c  # starts in start_line
        assert at + len(c.text) > len(window) - len(lines[c.end_line - 1]) - 1, c  # ends in end_line
        assert not c.text.startswith("\n") and not c.text.endswith("\n"), c


def whole(text: str, c: Chunk) -> bool:
    """The chunk is exactly its lines (not a piece of an over-long paragraph)."""
    return c.text == "\n".join(split_lines(text)[c.start_line - 1 : c.end_line])


MARKDOWN = """\
Intro before any heading.

# Install

Run the installer.

```bash
# not a heading: a shell comment
pip install lmforge
```

## On Linux

Use the package manager.

## Empty

### Deeper

Deep text.

Setext Title
============

Under the setext title.

Sub two
line title
-------

Under the sub.

---

After a thematic break.

~~~
# still code
~~~
"""


def test_markdown_headings_fences_and_setext():
    chunks = chunk_document(MARKDOWN, "docs/guide.md")
    check_ranges(MARKDOWN, chunks)
    assert all(whole(MARKDOWN, c) for c in chunks)
    got = [(c.heading, c.text.splitlines()[0]) for c in chunks]
    assert got == [
        ((), "Intro before any heading."),
        (("Install",), "Run the installer."),
        (("Install", "On Linux"), "Use the package manager."),
        (("Install", "Empty", "Deeper"), "Deep text."),  # "Empty" has no body: no chunk of its own
        (("Setext Title",), "Under the setext title."),
        (("Setext Title", "Sub two line title"), "Under the sub."),
    ]
    install = chunks[1]
    assert "# not a heading" in install.text and install.text.endswith("```")  # the fence stays with it
    last = chunks[-1]
    assert "After a thematic break." in last.text and last.text.endswith("~~~")
    assert not any("# still code" == h for c in chunks for h in c.heading)
    assert all(c.source == "docs/guide.md" for c in chunks)


def test_markdown_heading_lines_are_in_no_chunk_and_closing_hashes_are_dropped():
    text = "## Title ##\n\nbody\n\n#hashtag is text\n####### seven is text\n"
    chunks = chunk_document(text, "a.md")
    check_ranges(text, chunks)
    assert [(c.heading, c.text) for c in chunks] == [
        (("Title",), "body\n\n#hashtag is text\n####### seven is text")]
    assert (chunks[0].start_line, chunks[0].end_line) == (3, 6)


def test_markdown_sections_are_packed_separately_and_paragraphs_up_to_max_chars():
    para = "word " * 30  # 150 characters with the trailing space
    text = f"# A\n\n{para}\n\n{para}\n\n{para}\n\n# B\n\nshort\n"
    chunks = chunk_document(text, "x.md", max_chars=320, overlap=20)
    check_ranges(text, chunks, 320)
    assert [(c.heading, c.start_line, c.end_line) for c in chunks] == [
        (("A",), 3, 5), (("A",), 7, 7), (("B",), 11, 11)]


def test_a_huge_code_block_is_split_with_overlap_and_a_small_one_is_kept_whole():
    code = "\n".join(f"x_{i} = {i}  # line {i}" for i in range(200))
    text = f"# Code\n\nsmall:\n\n```\nprint(1)\n```\n\nbig:\n\n```python\n{code}\n```\n"
    chunks = chunk_document(text, "c.md", max_chars=400, overlap=60)
    check_ranges(text, chunks, 400)
    assert whole(text, chunks[0]) and chunks[0].text == "small:\n\n```\nprint(1)\n```\n\nbig:"  # packed
    pieces = [c for c in chunks if "x_" in c.text]
    assert len(pieces) > 5 and all(c.heading == ("Code",) for c in pieces)
    assert pieces[0].text.startswith("```python\nx_0 = 0") and pieces[-1].text.endswith("x_199 = 199  # line 199\n```")
    for one, two in zip(pieces, pieces[1:]):
        assert two.start_line <= one.end_line  # consecutive pieces share a line: the overlap
        assert one.text.splitlines()[-1] in two.text
    joined = "\n".join(p.text for p in pieces)
    assert all(f"x_{i} = {i}  # line {i}" in joined for i in range(200))  # nothing lost


def test_a_list_or_quote_above_dashes_is_not_a_setext_title():
    text = "- item\n---\n\n> quote\n---\n\n1. first\n===\n"
    chunks = chunk_document(text, "l.md")
    check_ranges(text, chunks)
    assert [(c.heading, c.text) for c in chunks] == [((), text.rstrip("\n"))]


def test_an_unclosed_fence_runs_to_the_end_and_hides_headings():
    text = "# Top\n\n```\n# inside\ncode\n\n\n"
    chunks = chunk_document(text, "u.md")
    check_ranges(text, chunks)
    assert [(c.heading, c.text) for c in chunks] == [(("Top",), "```\n# inside\ncode")]


def test_windows_line_endings_and_no_final_newline():
    text = "# T\r\n\r\none\r\ntwo\r\n\r\nthree"
    chunks = chunk_document(text, "w.md")
    check_ranges(text, chunks)
    assert [(c.text, c.start_line, c.end_line) for c in chunks] == [("one\ntwo\n\nthree", 3, 6)]
    assert "\r" not in chunks[0].text


def test_empty_and_heading_only_documents_give_no_chunks():
    assert chunk_document("", "e.md") == []
    assert chunk_document("\n\n  \n", "e.txt") == []
    assert chunk_document("# Only\n## Headings\n", "h.md") == []


RST = """\
=========
 Project
=========

Overview text.

Install
=======

Install text.

From source
-----------

Build it.

Details
~~~~~~~
Tilde level.

Usage
=====

Use it.

----------

After a transition.
"""


def test_rst_heading_levels_follow_the_order_of_appearance():
    chunks = chunk_document(RST, "README.rst")
    check_ranges(RST, chunks)
    assert [(c.heading, c.text.splitlines()[0]) for c in chunks] == [
        (("Project",), "Overview text."),
        (("Project", "Install"), "Install text."),
        (("Project", "Install", "From source"), "Build it."),
        (("Project", "Install", "From source", "Details"), "Tilde level."),
        (("Project", "Usage"), "Use it."),
    ]
    assert chunks[-1].text == "Use it.\n\n----------\n\nAfter a transition."


PYTHON = '''\
#!/usr/bin/env python
"""Module docstring.

Second paragraph.
"""

import os

LIMIT = 3


# A comment about helper.
@decorator
@other(1)
def helper(x):
    """Help."""

    return x + 1


class Thing(Base):
    """A thing."""

    def method(self):
        return 1


async def fetch():
    pass

if __name__ == "__main__":
    helper(1)
'''


def test_python_one_chunk_per_top_level_definition():
    chunks = chunk_document(PYTHON, "pkg/mod.py")
    check_ranges(PYTHON, chunks)
    assert all(whole(PYTHON, c) for c in chunks)
    got = [(c.heading, c.start_line, c.end_line) for c in chunks]
    assert got == [
        ((), 1, 1),  # the shebang: module code before the docstring
        ((), 2, 5),  # the module docstring
        ((), 7, 9),  # imports and constants
        (("helper",), 12, 18),  # comment and decorators included
        (("Thing",), 21, 25),
        (("fetch",), 28, 29),
        ((), 31, 32),
    ]
    assert chunks[1].text.startswith('"""Module docstring.')
    assert chunks[3].text.startswith("# A comment about helper.\n@decorator")
    assert chunks[4].text.endswith("return 1")


def test_a_long_function_is_split_but_keeps_its_name():
    body = "\n\n".join(f"    y{i} = {i} * 2" + "  # padding" * 8 for i in range(20))
    text = f"def long():\n{body}\n"
    chunks = chunk_document(text, "l.py", max_chars=300, overlap=50)
    check_ranges(text, chunks, 300)
    assert len(chunks) > 1 and all(c.heading == ("long",) for c in chunks)


def test_a_long_class_is_cut_along_its_methods():
    body = "\n\n".join(f"    def m{i}(self):\n        \"\"\"Method {i}.\"\"\"\n\n        return {i}" for i in range(12))
    text = f"class Big:\n    \"\"\"Big.\"\"\"\n\n    # about m0\n    @property\n{body}\n\n\ndef after():\n    pass\n"
    chunks = chunk_document(text, "big.py", max_chars=200, overlap=20)
    check_ranges(text, chunks, 200)
    assert all(whole(text, c) for c in chunks)
    assert [c.heading for c in chunks] == [("Big",)] + [("Big", f"m{i}") for i in range(12)] + [("after",)]
    assert chunks[0].text == 'class Big:\n    """Big."""'
    assert chunks[1].text.startswith("    # about m0\n    @property\n    def m0(self):")
    assert chunks[1].text.endswith("return 0")
    small = chunk_document(text, "big.py")  # fits in 1200: one passage for the class
    assert [c.heading for c in small] == [("Big",), ("after",)]


def test_python_that_does_not_parse_is_plain_text():
    text = "def broken(:\n    pass\n\nprint 'py2'\n"
    chunks = chunk_document(text, "bad.py")
    check_ranges(text, chunks)
    assert [(c.heading, c.text) for c in chunks] == [((), "def broken(:\n    pass\n\nprint 'py2'")]


def test_plain_text_is_paragraphs_whatever_the_suffix():
    text = "# not a heading in a .txt\n\npara two\n"
    chunks = chunk_document(text, "notes.txt", max_chars=100, overlap=0)
    check_ranges(text, chunks, 100)
    assert [(c.heading, c.text) for c in chunks] == [((), "# not a heading in a .txt\n\npara two")]
    assert chunk_document(text, "notes")[0].heading == ()


def test_a_long_paragraph_is_split_at_spaces_with_overlap():
    words = [f"w{i:03d}" for i in range(300)]
    text = "Before.\n\n" + " ".join(words) + "\n\nAfter.\n"
    chunks = chunk_document(text, "long.txt", max_chars=200, overlap=50)
    check_ranges(text, chunks, 200)
    assert chunks[0].text == "Before." and chunks[-1].text == "After."
    pieces = chunks[1:-1]
    assert len(pieces) > 5 and all(c.start_line == c.end_line == 3 for c in pieces)
    for one, two in zip(pieces, pieces[1:]):
        first_word = two.text.split()[0]
        assert first_word in one.text.split()  # whole words, repeated across the cut
        shared = one.text[one.text.index(first_word):]
        assert two.text.startswith(shared) and 30 <= len(shared) <= 50
    assert [w for w in words if not any(w in p.text.split() for p in pieces)] == []


def test_a_line_without_spaces_is_cut_at_max_chars():
    text = "x" * 450
    chunks = chunk_document(text, "blob.txt", max_chars=200, overlap=20)
    check_ranges(text, chunks, 200)
    assert [len(c.text) for c in chunks] == [200, 200, 90]


@pytest.mark.parametrize("kwargs, match", [
    ({"max_chars": 99}, "max_chars must be an integer of at least 100"),
    ({"max_chars": 200, "overlap": 200}, "overlap must be an integer from 0 to max_chars - 1"),
    ({"overlap": -1}, "overlap must be"),
])
def test_bad_sizes_are_one_line_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        chunk_document("text", "a.txt", **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".md", ".rst", ".py", ".txt"])
def test_random_documents_keep_every_invariant(suffix):
    """Seeded jumbles of headings, fences, underlines, code and long lines: every chunk's range is exact,
    none is blank or too long, and every non-blank line outside headings is in some chunk."""
    import random

    rng = random.Random(1234)
    pieces = ["# H1", "## H2", "### H3", "Title", "=====", "-----", "~~~~~", "```", "~~~", "", "", "",
              "text line", "    indented code", "def f(x):", "    return x", "class C:", "@deco",
              "\"\"\"doc\"\"\"", "word " * 60, "x" * 330, "\r", "  # comment", "- item"]
    for _ in range(60):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60)))
        if rng.random() < 0.5:
            text = text.replace("\n", "\r\n")
        max_chars = rng.choice([100, 150, 400])
        overlap = rng.choice([0, 10, 99])
        chunks = chunk_document(text, "doc" + suffix, max_chars=max_chars, overlap=overlap)
        check_ranges(text, chunks, max_chars)
        if suffix == ".txt":
            covered = {n for c in chunks for n in range(c.start_line, c.end_line + 1)}
            assert {i + 1 for i, line in enumerate(split_lines(text)) if line.strip()} <= covered
