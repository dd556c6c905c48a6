"""Modelfile parsing: Ollama's syntax, our Jinja TEMPLATE, and one clear error per mistake."""

from __future__ import annotations

import pytest

from lmforge.errors import UserError
from lmforge.modelfile import Modelfile, parse

FULL = '''# a comment
FROM smol
system """You are terse.
Answer in one line."""
PARAMETER temperature 0.2
PARAMETER top_k 20
PARAMETER repeat_penalty 1.1
PARAMETER num_predict 64
PARAMETER stop "<|im_end|>"
PARAMETER stop "\\nUser:"
PARAMETER num_ctx 4096
MESSAGE user Hi
MESSAGE assistant """Hello."""
LICENSE """MIT"""
'''


def test_full_modelfile():
    mf = parse(FULL)
    assert mf.base == "smol"
    assert mf.system == "You are terse.\nAnswer in one line."
    assert mf.parameters == {"temperature": 0.2, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 64,
                             "stop": ["<|im_end|>", "\nUser:"]}
    assert mf.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert mf.license == "MIT"
    assert mf.ignored == [] and mf.num_ctx == 4096  # the context the server loads it with
    assert Modelfile.from_json(mf.to_json()) == mf


def test_jinja_template_accepted_and_single_line_triple_quotes():
    mf = parse('FROM ./base\nTEMPLATE """{% for m in messages %}{{ m.content }}{% endfor %}"""\n')
    assert mf.template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert mf.base == "./base"


def test_merge_over_parent():
    parent = parse("FROM a\nSYSTEM one\nPARAMETER temperature 0.5\nPARAMETER top_k 7\n")
    child = parse("FROM b\nPARAMETER temperature 0.1\n").merged_over(parent)
    assert child.system == "one" and child.parameters == {"temperature": 0.1, "top_k": 7}


@pytest.mark.parametrize("text, message", [
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM a\nFROM b\n", "Modelfile:2: a Modelfile has one FROM"),
    ("FROM a\nBANANA x\n", "Modelfile:2: unknown instruction 'BANANA'"),
    ("FROM a\nPARAMETER warmth 2\n", "Modelfile:2: unknown parameter 'warmth'"),
    ("FROM a\nPARAMETER top_k many\n", "Modelfile:2: PARAMETER top_k needs an integer"),
    ("FROM a\nPARAMETER temperature\n", "PARAMETER temperature needs a value"),
    ("FROM a\nPARAMETER top_p 1.5\n", "top_p"),
    ('FROM a\nSYSTEM """never closed\n', "Modelfile:2: the \"\"\" opened here is never closed"),
    ('FROM a\nPARAMETER stop "open\n', "Modelfile:2: unterminated or malformed quoted string"),
    ("FROM a\nMESSAGE robot hi\n", "MESSAGE role must be one of"),
    ('FROM a\nTEMPLATE """{{ .System }} {{ .Prompt }}"""\n', "Ollama Go template"),
    ('FROM a\nTEMPLATE """{% for x in %}"""\n', "not valid Jinja"),
    ("FROM\n", "FROM needs a value"),
])
def test_mistakes_name_the_line(text, message):
    with pytest.raises(UserError, match=None) as e:
        parse(text)
    assert message in str(e.value)


# Chat templates `lmforge create` must refuse (issue 13 #2), with what the refusal says; test_cli uses them too.
HOSTILE_TEMPLATES = [
    # before: accepted (create only compiled it), then froze every chat with the model
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop steps"),
    # before: hung inside parse(), compiling (Jinja folded the gigabyte into the compiled code)
    ("{{ 'a' * 10**9 }}", "1,000,000,000 characters"),
    ("{{ '%0900000000d' % 1 }}", "900,000,000 characters"),
    # before: accepted; every chat then rendered 100 MB
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output of"),
    # before: accepted; every chat then failed with a RecursionError traceback
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    # before: accepted; every chat then failed
    ("{{ raise_exception('this model takes no chats') }}", "this model takes no chats"),
]


@pytest.mark.parametrize("template, says", HOSTILE_TEMPLATES)
def test_a_template_that_fails_or_breaks_the_limits_on_a_sample_chat_is_refused(template, says):
    with pytest.raises(UserError) as e:
        parse(f'FROM a\nTEMPLATE """{template}"""\n')
    message = str(e.value)
    assert message.startswith("Modelfile:2: TEMPLATE refused: chat template") and says in message, message
    assert "\n" not in message and "sample conversation" in message


def test_a_template_that_refuses_system_messages_is_accepted():
    # Gemma's templates raise on a system message; the sample is tried again without one.
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert parse(f'FROM a\nTEMPLATE """{template}"""\n').template == template


def test_ollamas_names_are_one_table_for_modelfiles_and_options():
    """A Modelfile and a request's options treat Ollama's parameters alike: runtime ones (num_keep, num_gpu)
    pass silently, unimplemented sampling ones (typical_p) are named."""
    from lmforge.modelfile import OLLAMA_NAME, OLLAMA_PARAMETERS
    from lmforge.serve.ollama_protocol import Options, warnings

    mf = parse("FROM smol\nPARAMETER num_keep 4\nPARAMETER num_gpu 1\nPARAMETER typical_p 0.7\n")
    assert mf.ignored == ["typical_p"]
    assert warnings(Options(num_keep=4, num_gpu=1, typical_p=0.7)) == [
        "option 'typical_p' is not supported by lmforge and was ignored"]
    assert set(OLLAMA_PARAMETERS) <= set(Options.model_fields) | {"num_predict"}
    assert OLLAMA_NAME["repetition_penalty"] == "repeat_penalty" and OLLAMA_NAME["max_new_tokens"] == "num_predict"
