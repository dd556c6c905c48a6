"""Cut one document into passages that keep their place: file, heading path and exact line range.

Retrieval shows a passage and says where it came from, so a passage must be a whole thought (a section's
paragraphs, a whole code fence, a whole function) and its `start_line`/`end_line` must be exact: a reader
opens the file at that line. The splitter is picked by the source's suffix:

* ``.md``/``.markdown`` -- ATX (``## Title``) and setext (``===``/``---`` underlined) headings; fenced code
  (```` ``` ```` or ``~~~``) is one unit, and a ``#`` line inside a fence is code, not a heading;
* ``.rst`` -- section titles underlined (optionally overlined) with a punctuation character; levels are
  given by the order in which the styles first appear, as docutils does;
* ``.py``/``.pyi`` -- one passage per top-level ``def``/``class`` (decorators and the comments right above
  included), the module docstring first, module-level code between them; a class too long for one
  passage is cut along its methods (heading ``("Cls", "method")``); a file that does not parse is plain
  text;
* anything else -- plain text: paragraphs separated by blank lines.

Within a section whole paragraphs are packed up to `max_chars`. One paragraph (or fence, or function
body paragraph) longer than that is cut at line boundaries, else at spaces, else anywhere, and about
`overlap` characters are repeated between consecutive pieces so a sentence cut in two is whole in one.

Lines are what `str.split("\\n")` gives after ``\\r\\n`` and lone ``\\r`` become ``\\n`` (a final newline
ends the last line, it does not start an empty one). A passage's text is then exactly its lines joined
with ``\\n`` -- or, for a piece of an over-long paragraph, a substring of them starting in `start_line` and
ending in `end_line`. Heading lines themselves are not in any passage (they are in `Chunk.heading`), so a
section with no body yields no passage, and no passage is ever empty or blank.
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import dataclass
from pathlib import PurePath

from lmforge.errors import UserError

#: Below this a passage is a phrase, not a passage; the index and the prompt would be all overhead.
MIN_MAX_CHARS = 100

MARKDOWN_SUFFIXES = (".md", ".markdown")
RST_SUFFIXES = (".rst",)
PYTHON_SUFFIXES = (".py", ".pyi")


@dataclass(frozen=True)
class Chunk:
    """One passage of one document and where it is."""

    text: str  # the passage as it will be shown and indexed
    source: str  # the document's path or name as given
    heading: tuple[str, ...]  # heading path, outermost first ("Install", "On Linux"); () when none
    start_line: int  # 1-based, inclusive, in the source document
    end_line: int  # 1-based, inclusive


# A section: its heading path and its units, each a half-open range [start, end) of 0-based line indices
# that is never cut unless it alone is longer than max_chars. Units start and end on non-blank lines.
_Section = tuple[tuple[str, ...], list[tuple[int, int]]]


def chunk_document(text: str, source: str, *, max_chars: int = 1200, overlap: int = 200,
                   title: str = "") -> list[Chunk]:
    """`text` (the content of `source`) cut into passages of at most `max_chars` characters, in order.

    `source` picks the splitter by its suffix and is copied into every `Chunk`; the file is not read.
    `title` names a document whose text does not (a docstring: `builtin:pydocs` passes the object's dotted
    name); it becomes the outermost heading of every chunk.
    """
    if not isinstance(max_chars, int) or max_chars < MIN_MAX_CHARS:
        raise UserError(f"max_chars must be an integer of at least {MIN_MAX_CHARS}, got {max_chars!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < max_chars:
        raise UserError(f"overlap must be an integer from 0 to max_chars - 1 ({max_chars - 1}), got {overlap!r}")
    lines = split_lines(text)
    suffix = PurePath(source).suffix.lower()
    if suffix in MARKDOWN_SUFFIXES:
        sections = _markdown_sections(lines)
    elif suffix in RST_SUFFIXES:
        sections = _rst_sections(lines)
    elif suffix in PYTHON_SUFFIXES:
        sections = _python_sections(lines, max_chars)
    else:
        sections = [((), _paragraphs(lines, 0, len(lines)))]
    if title:
        sections = [((title, *heading), units) for heading, units in sections]
    return _pack(lines, sections, source, max_chars, overlap)


def split_lines(text: str) -> list[str]:
    """The document's lines as `Chunk` line numbers count them (see the module docstring); a leading BOM
    is an encoding marker, not content, and is dropped."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _blank(line: str) -> bool:
    return not line.strip()


def _paragraphs(lines: list[str], start: int, end: int) -> list[tuple[int, int]]:
    """Runs of non-blank lines in [start, end)."""
    out, i = [], start
    while i < end:
        if _blank(lines[i]):
            i += 1
            continue
        j = i
        while j < end and not _blank(lines[j]):
            j += 1
        out.append((i, j))
        i = j
    return out


def _enter(stack: list[tuple[int, str]], level: int, title: str) -> tuple[str, ...]:
    """Open a heading at `level`: it closes every open heading at that level or deeper."""
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, title))
    return tuple(t for _, t in stack)


# ---------------------------------------------------------------------------------------------- Markdown

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# A list item or quote followed by "---" is that block then a thematic break, never a setext title.
_NOT_A_TITLE = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)]|>)(?:[ \t]|$)")


def _fence_end(lines: list[str], i: int) -> int | None:
    """If line `i` opens a code fence, the index just past its closing line (or the end of the document
    when it is never closed, as CommonMark reads it)."""
    m = _FENCE_OPEN.match(lines[i])
    if not m or (m.group(1)[0] == "`" and "`" in m.group(2)):  # a backtick info string can't hold a backtick
        return None
    mark = m.group(1)
    close = re.compile(r"^ {0,3}" + re.escape(mark[0]) + "{" + str(len(mark)) + r",}[ \t]*$")
    for j in range(i + 1, len(lines)):
        if close.match(lines[j]):
            return j + 1
    end = len(lines)
    while end > i + 1 and _blank(lines[end - 1]):  # a unit ends on a non-blank line
        end -= 1
    return end


def _atx_title(m: re.Match) -> str:
    title = m.group(2) or ""
    title = re.sub(r"(?:^|[ \t]+)#+$", "", title)  # an optional closing sequence: "## Title ##"
    return title.strip()


def _markdown_sections(lines: list[str]) -> list[_Section]:
    sections: list[_Section] = [((), [])]
    stack: list[tuple[int, str]] = []
    para: int | None = None  # start of the paragraph being read, flushed when it ends

    def flush(end: int) -> None:
        nonlocal para
        if para is not None and end > para:
            sections[-1][1].append((para, end))
        para = None

    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        fence = _fence_end(lines, i)
        if fence is not None:
            flush(i)
            sections[-1][1].append((i, fence))
            i = fence
            continue
        atx = _ATX.match(line)
        if atx:
            flush(i)
            sections.append((_enter(stack, len(atx.group(1)), _atx_title(atx)), []))
            i += 1
            continue
        if _blank(line):
            flush(i)
            i += 1
            continue
        setext = _SETEXT.match(line)
        if setext and para is not None and not _NOT_A_TITLE.match(lines[para]):
            # The whole paragraph above the underline is the title (CommonMark), on one line.
            title = " ".join(lines[k].strip() for k in range(para, i))
            para = None
            sections.append((_enter(stack, 1 if setext.group(1)[0] == "=" else 2, title), []))
            i += 1
            continue
        if para is None:
            para = i
        i += 1
    flush(n)
    return sections


# -------------------------------------------------------------------------------------- reStructuredText

_RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}[ \t]*$")  # one punctuation character, 3+ times


def _rst_sections(lines: list[str]) -> list[_Section]:
    sections: list[_Section] = [((), [])]
    stack: list[tuple[int, str]] = []
    styles: list[tuple[str, bool]] = []  # (character, overlined) in order of first appearance = level
    title_end = 0  # a title may follow the previous title's underline directly

    def title_at(i: int) -> tuple[str, bool, int] | None:
        """(character, overlined, lines used) if a section title starts at line `i`."""
        if not (i == title_end or _blank(lines[i - 1])):
            return None
        over = _RST_ADORNMENT.match(lines[i])
        if over and i + 2 < len(lines) and not _blank(lines[i + 1]) and not _RST_ADORNMENT.match(lines[i + 1]):
            under = _RST_ADORNMENT.match(lines[i + 2])
            if under and under.group(1) == over.group(1):
                return over.group(1), True, 3
        if (i + 1 < len(lines) and not over and not _blank(lines[i]) and not lines[i][0].isspace()
                and (under := _RST_ADORNMENT.match(lines[i + 1]))):
            return under.group(1), False, 2
        return None

    i, n = 0, len(lines)
    while i < n:
        found = title_at(i)
        if found is None:
            j = i
            while j < n and not _blank(lines[j]):
                j += 1
            if j > i:
                sections[-1][1].append((i, j))
            i = max(j, i + 1)
            continue
        char, overlined, used = found
        style = (char, overlined)
        if style not in styles:
            styles.append(style)
        title = lines[i + 1 if overlined else i].strip()
        sections.append((_enter(stack, styles.index(style), title), []))
        i += used
        title_end = i
    return sections


# ------------------------------------------------------------------------------------------------ Python


def _python_sections(lines: list[str], max_chars: int) -> list[_Section]:
    """Module docstring, then each top-level def/class and the module code between them, in file order.

    A class too long for one passage is cut along its members instead (heading ``("Cls", "method")``, the
    class line, docstring and attributes under ``("Cls",)``), so a method is not split across two passages
    just because its neighbour was long. Falls back to plain text when the file does not parse (a
    fragment, Python 2, a template)."""
    try:
        tree = ast.parse("\n".join(lines))
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return [((), _paragraphs(lines, 0, len(lines)))]
    sections: list[_Section] = []

    def gap(heading: tuple[str, ...], start: int, end: int) -> None:
        if end > start and (units := _paragraphs(lines, start, end)):
            sections.append((heading, units))

    def definitions(body: list[ast.stmt], prefix: tuple[str, ...], covered: int, end: int) -> None:
        """Sections for the defs/classes in `body`, lines [covered, end), code between them under `prefix`."""
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            while start > covered and lines[start - 1].lstrip().startswith("#"):  # its comment block
                start -= 1
            gap(prefix, covered, start)
            name = (*prefix, node.name)
            too_long = sum(len(line) + 1 for line in lines[start:node.end_lineno]) - 1 > max_chars
            if isinstance(node, ast.ClassDef) and too_long:
                definitions(node.body, name, start, node.end_lineno)
            else:
                sections.append((name, _paragraphs(lines, start, node.end_lineno)))
            covered = node.end_lineno
        gap(prefix, covered, end)

    body, covered = tree.body, 0
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0]
        gap((), 0, doc.lineno - 1)  # a shebang or coding line stays with the module code
        gap((), doc.lineno - 1, doc.end_lineno)
        body, covered = body[1:], doc.end_lineno
    definitions(body, (), covered, len(lines))
    return sections


# --------------------------------------------------------------------------------------------- packing


def _pack(lines: list[str], sections: list[_Section], source: str, max_chars: int, overlap: int) -> list[Chunk]:
    """Greedily join each section's consecutive units while the joined text fits in `max_chars`."""
    offsets = [0]  # offsets[i]: where line i starts in "\n".join(lines)
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    size = lambda s, e: offsets[e] - offsets[s] - 1  # noqa: E731 - length of lines [s, e) joined

    out: list[Chunk] = []
    for heading, units in sections:
        run: tuple[int, int] | None = None

        def emit(s: int, e: int) -> None:
            out.append(Chunk("\n".join(lines[s:e]), source, heading, s + 1, e))

        for s, e in units:
            if run is not None and size(run[0], e) <= max_chars:
                run = (run[0], e)
                continue
            if run is not None:
                emit(*run)
                run = None
            if size(s, e) <= max_chars:
                run = (s, e)
            else:
                out += _split_unit(lines, s, e, offsets, source, heading, max_chars, overlap)
        if run is not None:
            emit(*run)
    return out


def _split_unit(lines: list[str], s: int, e: int, offsets: list[int], source: str,
                heading: tuple[str, ...], max_chars: int, overlap: int) -> list[Chunk]:
    """Pieces of one unit too long to keep whole. A cut goes after a newline if one falls in the second
    half of the window, else after a space there, else after any newline or space, else at the limit;
    the next piece starts `overlap` characters before the cut, moved forward to a word's start."""
    text = "\n".join(lines[s:e])
    base = offsets[s]
    starts = [offsets[k] - base for k in range(s, e)]  # where each line starts in `text`
    line_of = lambda pos: s + bisect.bisect_right(starts, pos)  # noqa: E731 - 1-based line of a position

    out: list[Chunk] = []
    a = 0
    while a < len(text):
        limit = a + max_chars
        if limit >= len(text):
            b = len(text)
        else:
            half = a + max_chars // 2
            b = -1
            for lo, seps in ((half, "\n"), (half, " \t"), (a + 1, "\n"), (a + 1, " \t")):
                b = max(text.rfind(c, lo, limit) for c in seps)
                if b >= lo:
                    b += 1  # the separator ends this piece
                    break
            else:
                b = limit
        piece_start, piece_end = a, b
        while piece_start < piece_end and text[piece_start].isspace():
            piece_start += 1
        while piece_end > piece_start and text[piece_end - 1].isspace():
            piece_end -= 1
        if piece_end > piece_start:
            out.append(Chunk(text[piece_start:piece_end], source, heading,
                             line_of(piece_start), line_of(piece_end - 1)))
        if b >= len(text):
            break
        nxt = b - overlap
        if overlap and nxt > a:
            ws = [text.find(c, nxt, b) for c in " \t\n"]
            ws = [w for w in ws if w >= 0]
            if ws:
                nxt = min(ws) + 1  # start on a word, not inside one
            a = nxt if nxt < b else b - overlap
        else:
            a = b
    return out
