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
