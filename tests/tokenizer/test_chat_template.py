"""Tests for lmforge.tokenizer.chat_template: the ChatML default, transformers' variables and filters,
template errors as one-line UserErrors, and the sandbox."""

from __future__ import annotations

import pytest

from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 😀 What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  leading space and <b>html</b> & \"quotes\""},
]


@pytest.fixture
def tok(tiny_tokenizer) -> Tokenizer:
    """Any trained tokenizer: these tests are about rendering templates, not about the vocabulary."""
    return tiny_tokenizer


def test_default_template_shape(tok):
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not out.startswith("<|endoftext|>")


def test_template_variables_and_tojson(tok):
    t = Tokenizer(
        tok.backend,
        chat_template="{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ messages | tojson }}|{{ extra }}"
        "{% if add_generation_prompt %}!{% endif %}",
    )
    out = t.apply_chat_template([{"role": "user", "content": "<é>", "name": None}], add_generation_prompt=True,
                                extra="x", bos_token="B")
    # tojson does not HTML-escape and keeps non-ASCII; None-valued keys are dropped like transformers does.
    assert out == 'B|<|endoftext|>|<|pad|>|[{"role": "user", "content": "<é>"}]|x!'


def test_raise_exception_is_user_error(tok):
    t = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role allowed') }}")
    with pytest.raises(UserError, match="no system role allowed"):
        t.apply_chat_template(MESSAGES)
    with pytest.raises(UserError, match="role"):
        tok.apply_chat_template([{"role": "user"}])  # the default template checks content


def test_sandbox_blocks_unsafe_access(tok):
    harmless = Tokenizer(tok.backend, chat_template="{{ ''.__class__ }}")
    assert "class" not in harmless.apply_chat_template(MESSAGES)  # an unsafe attribute is undefined, not leaked
    evil = Tokenizer(tok.backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError, match="sandbox"):
        evil.apply_chat_template(MESSAGES)
    ns = Tokenizer(tok.backend, chat_template="{% set n = namespace(_x=1) %}{{ n }}")
    with pytest.raises(UserError, match="sandbox"):
        ns.apply_chat_template(MESSAGES)


def test_template_errors(tok):
    with pytest.raises(UserError, match="not valid Jinja"):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template(MESSAGES)
    with pytest.raises(UserError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template(MESSAGES)
    with pytest.raises(UserError, match="empty"):
        tok.apply_chat_template([])


# ------------------------------------------------------------------------------------------------ limits
# Issue 13 #2: a template could freeze the server. Each case below used to hang (stopped only by a timeout),
# allocate up to a gigabyte, or escape as a traceback; now each stops inside the render with one line. The
# limits are tiny so that every case ends at once; no timing is asserted, only that it stops.

from lmforge.tokenizer.chat_template import (  # noqa: E402 - grouped with the tests that need them
    TemplateLimitError,
    TemplateLimits,
    check_chat_template,
    compile_chat_template,
    render_chat_template,
)

TINY = TemplateLimits(timeout=5.0, max_output=10_000, max_steps=10_000)
HI = [{"role": "user", "content": "hi"}]
LONG_CHAT = [{"role": "user", "content": "hi"}] * 200


@pytest.mark.parametrize("template, says", [
    # before: hung (10^10 iterations); now: the step limit
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop steps"),
    # before: hung; a loop over a long string or list, nested
    ("{% set s = 'ab' * 5000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "loop steps"),
    ("{% for m in messages %}{% for n in messages %}{% if m == n %}{% endif %}{% endfor %}{% endfor %}", "loop steps"),
    # before: 900 MB, and a hang at compile time (Jinja folded the constant into the compiled code)
    ("{{ '%0900000000d' % 1 }}", "would build a formatted string of 900,000,000 characters"),
    ("{{ '%0900000000d'|format(1) }}", "900,000,000 characters"),
    ("{{ '{:>900000000}'.format(1) }}", "would build a formatted string"),
    ("{{ ('{0}' * 3000).format('x' * 5000) }}", "would build a formatted string"),
    # before: 1 GB, and a hang at compile time
    ("{{ 'a' * 10**9 }}", "would build a repeated sequence of 1,000,000,000 characters"),
    ("{{ 'x'.center(900000000) }}", "900,000,000"),
    ("{{ 'x'|center(900000000) }}", "900,000,000"),
    ("{{ ('a' * 100).replace('a', 'b' * 100000) }}", "characters"),
    ("{{ ('x' * 5000).join(range(2000)|map('string')) }}", "would build a joined string"),
    ("{{ 2 ** 100000 }}", "bits"),
    ("{{ lipsum(100000) }}", "lorem ipsum"),
    # before: rendered 100 MB; the output limit
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "would build output of"),
    # output captured by a block or a macro counts where it is written
    ("{% set x %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}{{ x|length }}", "in all"),
    ("{% macro f() %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}{{ f()|length }}", "in all"),
    # doubling a string, a list or a nested list in a namespace
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "characters"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}", "characters"),
    ("{% for i in range(1000000) %}{% endfor %}", "range of more than 100,000 items"),
    ("{{ {'a': 1}|tojson(indent=1000000) }}", "tojson(indent=1000000)"),
])
def test_hostile_templates_stop_with_one_line(template, says):
    with pytest.raises(TemplateLimitError) as e:
        render_chat_template(template, LONG_CHAT, limits=TINY)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_time_limit_stops_loops_within_the_step_limit():
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimitError, match="longer than the 0.2 s limit"):
        render_chat_template(slow, HI, limits=TemplateLimits(timeout=0.2, max_steps=10**12))


@pytest.mark.parametrize("template, says", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),  # before: a traceback
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "RecursionError"),
    ("{{ raise_exception('no system role allowed') }}", "no system role allowed"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
])
def test_other_template_failures_are_one_line_user_errors(template, says):
    with pytest.raises(UserError, match=says) as e:
        render_chat_template(template, HI, limits=TINY)
    assert "\n" not in str(e.value)


def test_output_just_under_the_limit_renders_and_just_over_is_refused():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert len(render_chat_template(template, [{"role": "user", "content": "x" * 10_000}], limits=TINY)) == 10_000
    with pytest.raises(TemplateLimitError, match="output of 10,001 characters; the limit is 10,000"):
        render_chat_template(template, [{"role": "user", "content": "x" * 10_001}], limits=TINY)


def test_hostile_constants_are_not_computed_at_compile_time():
    # Jinja folds constant expressions into the compiled code; `'a' * 10**9` used to hang compile_chat_template
    # (and so `lmforge create`). The bounded operators are not folded, and compiling is instant.
    compiled = compile_chat_template("{{ 'a' * 10**9 }}{{ 'x'|center(10**9) }}")
    with pytest.raises(RuntimeError, match="render_bounded"):
        compiled.render(messages=HI)  # rendered around the limits, it refuses to run at all


FEATURES = """\
{%- macro show(m, i) -%}[{{ i }}:{{ m.role|upper }}]{{ m.content|trim }}{%- endmacro -%}
{%- set ns = namespace(n=0, acc='') -%}
{%- for m in messages if m.role != 'tool' -%}
{%- set ns.n = ns.n + 1 %}{% set ns.acc = ns.acc ~ m.role[0] -%}
{{ show(m, loop.index) }}{{ loop.length }}{{ loop.revindex }}{{ loop.last }}{{ loop.cycle('a', 'b') }}
{%- endfor %}{{ ns.n }}{{ ns.acc }}{{ ns }}
{% for i in range(messages|length - 1, -1, -1) %}{{ messages[i].role }}{% endfor %}|{{ range(5) }}|{{ range(9)[2:8:2] }}
{{- range(5)|reverse|list }}{{ range(6)|batch(4, 'x')|list }}{{ range(7)|slice(3)|list }}{{ 3 in range(5) }}
{{ '%s|%5s|%03d|%.2f|%r|%%' % ('a', 'bc', 7, 3.14159, 'q') }}{{ '{}/{:>6}/{:.3}/{!r}'.format(1, 'r', 'long', 'q') }}
{{- '{a}'.format_map({'a': 1}) }}{{ 'c'.center(9, '*') }}{{ '42'.zfill(5) }}{{ 'a b'.replace(' ', '_') }}
{{- '/'.join(['x', 'y']) }}
{{ messages|map(attribute='role')|join(', ') }}|{{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{{- messages[0]|tojson(indent=2) }}{{ messages|tojson }}{{ 'a\nb'|indent(2, true) }}{{ ('word ' * 4)|wordwrap(7) }}
{{- '%s-%d'|format('x', 3) }}{{ [[1], [2, 3]]|sum(start=[]) }}{{ 'ab' * 3 }}{{ [1, 2] * 2 }}{{ 2 ** 10 }}
{{- 'a' ~ 1 ~ none }}
{%- set block %}{% for m in messages %}{{ m.role }},{% endfor %}{% endset %}{{ block }}
{%- filter upper %}{{ bos_token }}shout{% endfilter %}{% set d = {'k': messages[0].role, 'n': [1, 2]} %}{{ d }}
{%- for item in [{'n': 'a', 'c': [{'n': 'b', 'c': []}]}] recursive %}{{ item.n }}({{ loop(item.c) }}){% endfor %}
{%- for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_bounded_rendering_matches_transformers_on_every_feature(tok, add_generation_prompt):
    # Macros, namespaces, loop variables, range, %, str.format, the measured filters and methods, blocks,
    # recursive loops and {% generation %}: the rewriting that bounds a render must not change what it renders.
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    theirs = chat_template_utils._compile_jinja_template(FEATURES).render(
        messages=MESSAGES, add_generation_prompt=add_generation_prompt, tools=None, documents=None, bos_token="<s>")
    ours = render_chat_template(FEATURES, MESSAGES, add_generation_prompt=add_generation_prompt,
                                special_tokens={"bos_token": "<s>"})
    assert ours == theirs and "range(0, 5)" in ours and '"role": "system"' in ours


def test_check_chat_template(tok):
    check_chat_template(tok.chat_template)  # the default ChatML template passes
    gemma_like = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                  "{% for m in messages %}{{ m.content }}{% endfor %}")
    check_chat_template(gemma_like)  # tried again without the system message
    with pytest.raises(UserError, match="chat template failed: nope .rendering a sample conversation"):
        check_chat_template("{{ raise_exception('nope') }}")
    with pytest.raises(TemplateLimitError, match="loop steps and calls .rendering a sample conversation"):
        check_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            limits=TINY)
    with pytest.raises(UserError, match="not valid Jinja"):
        check_chat_template("{% for %}")
