"""A Jinja sandbox whose renders are bounded in time, steps and size: what chat templates render in.

Jinja's sandbox stops a template from reaching Python's internals, not from running forever or filling memory,
and a chat template is untrusted code rendered inside a request: one hostile template must not freeze a
server or take its memory. So every render runs under a `TemplateLimits` budget (defaults in brackets):

  - time [2 s]: checked at every loop step, call, filter, attribute or item access, operator and output,
    so a render stops within one operation of its deadline;
  - steps [1,000,000]: loop iterations, `range` items, calls and filters, so nested loops end however fast or
    slow the machine is;
  - size [1,000,000 characters]: the rendered text, and any one string, list or dict the template builds.
    Where one operation can multiply sizes it is refused *before* it runs: `*`, `+`, `**`, `%` (widths and
    precisions read from the format), `str.format` (each field's spec), `~`, the string methods center/ljust/
    rjust/zfill/expandtabs/replace/join/translate, `int.to_bytes`, the filters center/indent/wordwrap/format/
    join/replace/batch/slice/sum/urlize, `tojson` (measured as it is encoded), `lipsum`; everything else a
    call or filter returns is checked after;
  - work [16 × size]: all the text a render builds along the way (output captured by macros and blocks is
    counted where it is written, intermediate strings), which bounds its memory.

A render past a limit raises `TemplateLimitError`, one line.

Where: inside the render, not around it. A Python thread cannot be killed, so a render abandoned at its
deadline would go on burning a core and memory for as long as its loops run; a process per render costs tens of
milliseconds, and a pool of them its own supervisor. Here the render itself stops: `BoundedSandbox` parses a
template and rewrites it (`_Rewrite`) so that every `for` loop, every piece of output, every `~` and every
literal list or dict passes through the budget; its hooks (`call`, `getattr`, `getitem`, `call_binop`,
`str.format`) check it; `range` counts its items; every filter is wrapped. What it cannot stop is one built-in
operation already under way; the size limit keeps each one's inputs to a million characters, so it ends in
milliseconds. Callers should still render off an event loop: two seconds is long for a server to stand still.

Why one file of ~700 lines: it is one mechanism -- the budget, the checks that consult it, and the sandbox
hooks and rewrite that call them -- and split in two, two dozen private helpers would become an API that no
other module should use.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import chain
from typing import Any

import jinja2.nodes as nodes
from jinja2.filters import FILTERS
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from lmforge.errors import UserError

__all__ = ["DEFAULT_LIMITS", "BoundedSandbox", "TemplateLimitError", "TemplateLimits", "check_size",
           "render_bounded"]

_WORK_FACTOR = 16  # all the text a render builds, as a multiple of max_output
_MAX_RANGE = 100_000  # items in one range(), as Jinja's own sandbox (and so transformers) allows
_MAX_INT_BITS = 1 << 16  # ~20,000 digits: more than Python will print (4,300)
_MAX_JSON_INDENT = 100  # characters of tojson indent per level
_TEXT = (str, bytes, bytearray)
_SEQUENCES = (str, bytes, bytearray, list, tuple)


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may spend; the module docstring says where each limit is enforced."""

    timeout: float = 2.0  # seconds
    max_output: int = 1_000_000  # characters in the output, and in any one value the template builds
    max_steps: int = 1_000_000  # loop iterations, range items, calls and filters

    @property
    def max_work(self) -> int:
        """Characters the render may build in all, intermediate text included."""
        return _WORK_FACTOR * self.max_output


DEFAULT_LIMITS = TemplateLimits()


class TemplateLimitError(UserError):
    """A template ran past its time, step or size limit."""


class _Exceeded(Exception):
    """A limit hit inside a render. Not a ValueError, TypeError or LookupError: Jinja's filters and sandbox
    catch those and carry on with an Undefined."""


class _Budget:
    """The limits of one render and what it has spent so far."""

    __slots__ = ("limits", "deadline", "steps", "work")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout
        self.steps = 0
        self.work = 0

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"chat template ran longer than the {self.limits.timeout:g} s limit")

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise _Exceeded(f"chat template ran more than {self.limits.max_steps:,} loop steps and calls")
        self.clock()

    def fits(self, size: int, what: str = "a value") -> None:
        if size > self.limits.max_output:
            raise _Exceeded(f"chat template would build {what} of {size:,} characters; "
                            f"the limit is {self.limits.max_output:,}")

    def spend(self, size: int) -> None:
        self.work += size
        if self.work > self.limits.max_work:
            raise _Exceeded(f"chat template built more than {self.limits.max_work:,} characters of text in all")

    def built(self, value: Any, *, spend: bool = True) -> Any:
        """Check a value an operation has just built, and count it as work; returns it."""
        if isinstance(value, _TEXT):
            size = flat = len(value)
        elif _parts(value) is not None:
            size, flat = _size(value, self.limits.max_output), len(value) if hasattr(value, "__len__") else 1
        else:
            return value
        self.fits(size)
        if spend:
            self.spend(flat)
        return value


_BUDGET: ContextVar[_Budget | None] = ContextVar("lmforge_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the render under way. Without one (Jinja folding constants at compile time) this
    raises, so nothing a budget guards is ever evaluated unguarded."""
    budget = _BUDGET.get()
    if budget is None:
        raise RuntimeError("a bounded template renders only through render_bounded")
    return budget


def check_size(value: Any, what: str) -> None:
    """Refuse, inside a render, a value larger than the size limit (for objects the template fills itself)."""
    budget = _budget()
    budget.fits(_size(value, budget.limits.max_output), what)


# -- measuring ----------------------------------------------------------------------------------------------


def _parts(value: Any) -> Any:
    """The parts of a container, as its str() shows them; None for anything else."""
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView)):
        return value
    if isinstance(value, Mapping):
        return chain.from_iterable(value.items())
    if isinstance(value, ItemsView):
        return chain.from_iterable(value)
    if isinstance(value, Namespace):  # its attributes live in a name-mangled dict (see jinja2.utils)
        return chain.from_iterable(object.__getattribute__(value, "_Namespace__attrs").items())
    return None


def _size(value: Any, stop: int) -> int:
    """About how many characters str(value) has, counting a shared part every time it appears (a list of a
    million references to one string is as long as its text), in time proportional to the distinct parts.
    Stops counting once past `stop`."""
    if isinstance(value, _TEXT):
        return len(value)
    sizes: dict[int, int] = {}

    def walk(v: Any) -> int:
        if isinstance(v, _TEXT):
            return len(v)
        if isinstance(v, int):
            return v.bit_length() // 3 + 1
        parts = _parts(v)
        if parts is None:
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        sizes[key] = 3  # a reference back to v while walking it prints as [...]
        total = 2
        for part in parts:
            total += walk(part) + 2
            if total > stop:
                break
        sizes[key] = total
        return total

    return walk(value)


def _percent_size(fmt: str | bytes, values: Any, stop: int) -> int:
    """An upper bound on len(fmt % values), read from the conversion specs (width, precision, `*`) and the
    sizes of the values: '%0900000000d' % 1 and '%s%s...' % (big, big, ...) are refused unbuilt. Follows the
    grammar of Python's own parser; where that fails, so will the `%` itself."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    positional = list(values) if isinstance(values, tuple) else [values]
    mapping = values if isinstance(values, Mapping) else None
    escape = 6 if isinstance(fmt, Markup) else 1  # Markup % escapes its arguments: '&' -> '&amp;'
    taken = 0

    def take() -> Any:
        nonlocal taken
        taken += 1
        return positional[taken - 1] if taken <= len(positional) else None

    def number(k: int) -> tuple[int, int]:
        if k < len(text) and text[k] == "*":
            value = take()
            return (abs(value) if isinstance(value, int) else 0), k + 1
        end = k
        while end < len(text) and text[end] in "0123456789":
            end += 1
        return int(text[k:end] or 0), end

    total, i = 0, 0
    while (j := text.find("%", i)) >= 0:
        total += j - i
        k, key = j + 1, None
        if k < len(text) and text[k] == "(":
            depth, k = 1, k + 1
            while k < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[k], 0)
                k += 1
            key = text[j + 2:k - 1]
        while k < len(text) and text[k] in "-+ #0":
            k += 1
        width, k = number(k)
        precision = None
        if k < len(text) and text[k] == ".":
            precision, k = number(k + 1)
        while k < len(text) and text[k] in "hlL":
            k += 1
        if k >= len(text):
            return total  # "incomplete format": Python raises
        conversion, i = text[k], k + 1
        if conversion == "%":
            total += max(width, 1)
            continue
        value = (mapping.get(key) if mapping is not None else None) if key is not None else take()
        if conversion in "sra":
            size = len(value) if conversion == "s" and isinstance(value, (str, bytes)) else 10 * _size(value, stop) + 2
            size = min(size, precision) if precision is not None else size
        elif conversion == "c":
            size = 1
        else:  # numbers: digits (a float has at most ~310) plus the precision's
            digits = value.bit_length() // 3 + 2 if isinstance(value, int) else 330
            size = digits + (precision if precision is not None else 6) + 2
        total += max(width, size * escape)
        if total > stop:
            return total
    return total + len(text) - i


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    """Refuse `*`, `+`, `**` and `%` whose result would be too big, before computing it."""
    stop = budget.limits.max_output
    if op == "*":
        if isinstance(left, int) and isinstance(right, _SEQUENCES):
            left, right = right, left
        if isinstance(left, _SEQUENCES) and isinstance(right, int) and right > 0:
            budget.fits(_size(left, stop) * right, "a repeated sequence")
        elif isinstance(left, int) and isinstance(right, int):
            _fits_int(left.bit_length() + right.bit_length())
    elif op == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            budget.fits(_size(left, stop) + _size(right, stop), "a joined sequence")
        elif isinstance(left, int) and isinstance(right, int):
            _fits_int(max(left.bit_length(), right.bit_length()) + 1)
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _fits_int(left.bit_length() * right)
    elif op == "%" and isinstance(left, (str, bytes)):
        budget.fits(_percent_size(left, right, stop), "a formatted string")


def _fits_int(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise _Exceeded(f"chat template would build a number of about {bits:,} bits; the limit is {_MAX_INT_BITS:,}")


def _check_call(budget: _Budget, func: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse a method call whose result would be too big, before making it; returns the arguments to call
    with (an iterable given to join is read into a list first, to be measured)."""
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", None)
    if isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if isinstance(length, int):
            budget.fits(length, "bytes")
    if not isinstance(owner, _TEXT):
        return args
    text = owner
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        budget.fits(max(len(text), args[0]), "a padded string")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            tabs = text.count("\t" if isinstance(text, str) else b"\t")
            budget.fits(len(text) + tabs * max(tabsize, 0), "a string")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, type(text)) for a in args[:2]):
        budget.fits(_replaced_size(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1)))
    elif name == "join" and args:
        items = list(args[0])
        joined = sum(len(x) for x in items if isinstance(x, _TEXT))
        budget.fits(joined + len(text) * max(len(items) - 1, 0), "a joined string")
        return (items, *args[1:])
    elif name == "translate" and isinstance(text, str) and args:
        table = args[0]
        values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        budget.fits(len(text) * max(longest, 1), "a translated string")
    return args


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    n = len(text) + 1 if len(old) == 0 else text.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(text) + n * max(0, len(new) - len(old))


# -- filters: every one is a step and has its result checked; these are also measured before they run ------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _center(b: _Budget, a: dict) -> None:
    if isinstance(a["width"], int):
        b.fits(max(_size(a["value"], b.limits.max_output), a["width"]))


def _indent(b: _Budget, a: dict) -> None:
    width = a["width"] if isinstance(a["width"], int) else len(a["width"]) if isinstance(a["width"], str) else 0
    s = a["s"] = _text(a["s"])
    b.fits(len(s) + (s.count("\n") + 1) * max(width, 0))


def _wordwrap(b: _Budget, a: dict) -> None:
    s = a["s"] = _text(a["s"])
    b.fits(len(s) * (1 + (len(a["wrapstring"]) if isinstance(a["wrapstring"], str) else 1)))  # a break per character


def _format(b: _Budget, a: dict) -> None:
    b.fits(_percent_size(_text(a["value"]), a["kwargs"] or a["args"], b.limits.max_output))


def _join(b: _Budget, a: dict) -> None:
    items = a["value"] = list(a["value"])
    joined = sum(_size(x, b.limits.max_output) for x in items)
    b.fits(joined + len(_text(a["d"])) * max(len(items) - 1, 0))


def _replace(b: _Budget, a: dict) -> None:
    s = a["s"] = _text(a["s"])
    if isinstance(a["old"], str) and isinstance(a["new"], str):
        b.fits(_replaced_size(s, a["old"], a["new"], -1 if a["count"] is None else a["count"]))


def _batch(b: _Budget, a: dict) -> None:
    if a["fill_with"] is not None and isinstance(a["linecount"], int):
        b.fits(a["linecount"] * (_size(a["fill_with"], b.limits.max_output) + 2))


def _slice(b: _Budget, a: dict) -> None:
    if isinstance(a["slices"], int):
        fill = 0 if a["fill_with"] is None else _size(a["fill_with"], b.limits.max_output) + 2
        b.fits(a["slices"] * (2 + fill))


def _sum(b: _Budget, a: dict) -> None:
    # Summing lists copies the running total at every step: that quadratic copying is work.
    if isinstance(a["start"], (int, float)):
        return
    items = a["iterable"] = list(a["iterable"])
    running = _size(a["start"], b.limits.max_output)
    for item in items:
        b.spend(running)
        running += _size(item, b.limits.max_output)
    b.fits(running)


def _urlize(b: _Budget, a: dict) -> None:
    text = a["value"] = _text(a["value"])
    extra = sum(len(x) for x in (a["target"], a["rel"]) if isinstance(x, str)) + 64
    links = sum(1 for word in text.split() if "." in word or "@" in word or ":" in word)
    b.fits(3 * len(text) + links * extra)


_FILTER_CHECKS = {"center": _center, "indent": _indent, "wordwrap": _wordwrap, "format": _format, "join": _join,
                  "replace": _replace, "batch": _batch, "slice": _slice, "sum": _sum, "urlize": _urlize}


def _bounded_filter(name: str, func: Any) -> Any:
    check = _FILTER_CHECKS.get(name)
    target = inspect.unwrap(func)
    signature = inspect.signature(target) if check is not None else None
    # Jinja's sync/async filter pairs take an eval context first that the sync function does not declare.
    extra = 1 if getattr(func, "jinja_async_variant", False) and not hasattr(target, "jinja_pass_arg") else 0

    @functools.wraps(func)  # keeps Jinja's pass_context/pass_eval_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if signature is not None:
            bound = signature.bind(*args[extra:], **kwargs)
            bound.apply_defaults()
            check(budget, bound.arguments)
            args, kwargs = (*args[:extra], *bound.args), bound.kwargs
        return budget.built(func(*args, **kwargs))

    return bounded


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson (Jinja's own HTML-escapes <, >, & and ', which would corrupt prompts), encoded piece
    # by piece so that indentation repeated over a deep structure is stopped at the limit rather than after it.
    budget = _budget()
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > _MAX_JSON_INDENT:
        raise _Exceeded(f"chat template asked for tojson(indent={width}); the limit is {_MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    pieces, size = [], 0
    for piece in encoder.iterencode(x):
        size += len(piece)
        budget.fits(size, "JSON")
        pieces.append(piece)
        if len(pieces) % 4096 == 0:
            budget.clock()
    return "".join(pieces)


# -- range, lipsum, and what the rewritten template calls ---------------------------------------------------


def _counted(items: Any) -> Any:
    """Iterate `items`, each item a step. Takes the budget now: a generator's body runs late."""
    budget = _budget()

    def steps() -> Any:
        for item in items:
            budget.step()
            yield item

    return steps()


class _Range:
    """`range` for templates: the same values, length, indexing and repr, each item taken a step."""

    __slots__ = ("_range",)

    def __init__(self, r: range) -> None:
        self._range = r

    def __iter__(self) -> Any:
        return _counted(self._range)

    def __reversed__(self) -> Any:
        return _counted(reversed(self._range))

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        item = self._range[index]
        return _Range(item) if isinstance(item, range) else item

    def __contains__(self, value: Any) -> bool:
        return value in self._range

    def __eq__(self, other: Any) -> bool:
        return self._range == (other._range if isinstance(other, _Range) else other)

    def __hash__(self) -> int:
        return hash(self._range)

    def __repr__(self) -> str:
        return repr(self._range)

    start = property(lambda self: self._range.start)
    stop = property(lambda self: self._range.stop)
    step = property(lambda self: self._range.step)

    def count(self, value: Any) -> int:
        return self._range.count(value)

    def index(self, value: Any) -> int:
        return self._range.index(value)


def _bounded_range(*args: Any) -> _Range:
    r = range(*args)
    try:
        too_long = len(r) > _MAX_RANGE
    except OverflowError:  # more items than an index can count
        too_long = True
    if too_long:
        raise _Exceeded(f"chat template asked for a range of more than {_MAX_RANGE:,} items")
    return _Range(r)


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    if isinstance(n, int) and isinstance(max, int):
        _budget().fits(n * (max * 15 + 20), "lorem ipsum")
    return generate_lorem_ipsum(n, html, min, max)


def _emit(value: Any) -> str:
    """Every piece of output, output captured by macros and blocks included."""
    budget = _budget()
    if not isinstance(value, str):
        if _parts(value) is not None:
            budget.fits(_size(value, budget.limits.max_output), "output")
        value = str(value)
    budget.fits(len(value), "output")
    budget.spend(len(value))
    return value


def _concat(parts: tuple) -> str:
    """`a ~ b ~ ...` (Jinja's str_join), with the parts measured before they are joined."""
    budget = _budget()
    texts = []
    for part in parts:
        if not isinstance(part, str):
            budget.fits(_size(part, budget.limits.max_output))
            part = str(part)
        texts.append(part)
    budget.fits(sum(map(len, texts)), "a string")
    return budget.built("".join(texts))


def _built(value: Any) -> Any:
    """Literal lists, tuples and dicts (many references to one big string are big) and the text captured by
    `{% set x %}...{% endset %}`."""
    return _budget().built(value)


_ITER, _EMIT, _CONCAT, _BUILT = "<iter>", "<emit>", "<concat>", "<built>"  # names no template can write
_FILTERS = {**{name: _bounded_filter(name, f) for name, f in FILTERS.items()},
            "tojson": _bounded_filter("tojson", _tojson),
            _ITER: _counted, _EMIT: _emit, _CONCAT: _concat, _BUILT: _built}


def _internal(node: nodes.Expr | None, name: str, lineno: int) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=lineno)


class _Rewrite(NodeTransformer):
    """Route through the budget what the sandbox's hooks do not see: every `for` loop's iterable, every piece
    of output, every `~`, every `{% set %}` block's text and every literal list, tuple or dict holding
    variables (one made only of constants is no bigger than the template's source). What renders is unchanged."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _internal(node.iter, _ITER, node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_internal(child, _EMIT, child.lineno or node.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _internal(nodes.Tuple(node.nodes, "load", lineno=node.lineno), _CONCAT, node.lineno)

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.Node:
        self.generic_visit(node)
        if node.filter is None:  # an AssignBlock's filter receives the captured text
            node.filter = _internal(None, _BUILT, node.lineno)
        return node

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        parts = [p for i in node.items for p in ((i.key, i.value) if isinstance(i, nodes.Pair) else (i,))]
        return node if all(isinstance(p, nodes.Const) for p in parts) else _internal(node, _BUILT, node.lineno)

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)


# -- the sandbox --------------------------------------------------------------------------------------------


class _BoundedFields:
    """str.format for templates: each field is measured (its spec's width and precision included) before it is
    formatted, and all of them together: '{:>900000000}' or '{0}{0}{0}...' is refused unbuilt."""

    _total = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = 0
        return super().vformat(format_string, args, kwargs)  # type: ignore[misc]

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = _budget()
        budget.clock()
        base = len(value) if isinstance(value, str) else 10 * _size(value, budget.limits.max_output) + 340
        # A digit used as the fill character only makes this more cautious.
        self._total += base + max((int(n) for n in re.findall(r"[0-9]+", format_spec)), default=0)
        budget.fits(self._total, "a formatted string")
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _Formatter(_BoundedFields, SandboxedFormatter):
    pass


class _EscapeFormatter(_BoundedFields, SandboxedEscapeFormatter):
    pass


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with `range`, `lipsum`, every filter and every hook it offers checking the
    budget of the render under way. Compile with `compile_bounded`, render with `render_bounded`."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})  # which also keeps them from being folded at compile time

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = dict(_FILTERS)
        self.globals.update(range=_bounded_range, lipsum=_bounded_lipsum)

    def compile_bounded(self, source: str) -> Any:
        """`from_string`, with the parsed template rewritten so that its renders are bounded (`_Rewrite`)."""
        tree = _Rewrite().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.clock()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept quick
            budget.fits(len(left) + len(right), "a string")
        else:
            _check_binop(budget, operator, left, right)
        return budget.built(self.binop_table[operator](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().clock()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().clock()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - as Jinja's
        budget = _budget()
        budget.step()
        args = _check_call(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        # A macro's text was counted as it was written inside it; it must still fit.
        return budget.built(result, spend=not isinstance(__obj, Macro))

    def wrap_str_format(self, value: Any) -> Any:
        # Jinja's own, with the measuring formatters.
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        f_self = value.__self__
        formatter = _EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup) else _Formatter(self)
        is_format_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    return fmt(*args, **kwargs)  # which raises Jinja's TypeError
                args, kwargs = (), args[0]
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(bounded_format, value)


def render_bounded(template: Any, context: dict[str, Any], limits: TemplateLimits = DEFAULT_LIMITS) -> str:
    """Render a template from `BoundedSandbox.compile_bounded` within `limits`, or raise `TemplateLimitError`.
    Other errors (Jinja's, or Python's from inside the template) propagate for the caller to word."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    pieces = template.generate(**context)
    try:
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            budget.fits(size, "output")
            out.append(piece)
        return "".join(out)
    except _Exceeded as e:
        raise TemplateLimitError(str(e)) from None
    finally:
        pieces.close()
        _BUDGET.reset(token)
