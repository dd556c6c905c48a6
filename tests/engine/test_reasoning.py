"""engine/reasoning.py: a thinking model's output cut into (reasoning, answer) however its tokens fall, where
the thought starts (read from the rendered prompt), whether a template thinks at all (read from the template),
and a grammar made to hold after the thought. The server's use of it: tests/serve/test_reasoning.py."""

from __future__ import annotations

import pytest

from lmforge.engine.reasoning import ThinkSplitter, opens_thought, split_reasoning, supports_thinking, thinking_on
from tests.serve.tool_templates import family_tokenizer
from tests.tokenizer.family_templates import FAMILIES

ASK = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("opened, text, thought, answer", [
    (False, "<think>\nfirst, the cause</think>\n\nThe answer.", "\nfirst, the cause", "The answer."),
    (False, "  <think>a</think>b", "a", "b"),
    (False, "The answer at once.", "", "The answer at once."),
    (False, "<thi", "", "<thi"),  # never got past a possible tag: the answer
    (True, "inside</think>\nout", "inside", "out"),
    (True, "never closed", "never closed", ""),
    (True, "<think>redundant</think>x", "redundant", "x"),
])
def test_the_splitter_however_the_text_is_cut(opened, text, thought, answer):
    assert split_reasoning(text, opened) == (thought, answer)
    for cut in range(1, len(text)):
        sp = ThinkSplitter(opened)
        parts = [sp.feed(text[:cut]), sp.feed(text[cut:]), sp.flush()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == (thought, answer), cut


def test_thinking_is_read_from_the_template_not_the_name(tiny_tokenizer):
    qwen = family_tokenizer(tiny_tokenizer, "qwen3", FAMILIES)
    opens = family_tokenizer(tiny_tokenizer, "opens-thought", FAMILIES)
    assert supports_thinking(qwen.chat_template) and not supports_thinking(tiny_tokenizer.chat_template)
    assert thinking_on(qwen.chat_template, None) and thinking_on(qwen.chat_template, {"enable_thinking": True})
    assert not thinking_on(qwen.chat_template, {"enable_thinking": False})
    from lmforge.engine.prompt import chat_prompt_ids

    assert not opens_thought(qwen, chat_prompt_ids(qwen, ASK))
    assert opens_thought(opens, chat_prompt_ids(opens, ASK))
    assert not opens_thought(opens, chat_prompt_ids(opens, ASK, template_kwargs={"enable_thinking": False}))


def test_reason_first_lets_the_grammar_hold_after_the_thought(tiny_tokenizer):
    from lmforge.engine.constrain import Grammar
    from lmforge.engine.reasoning import reason_first

    tok = family_tokenizer(tiny_tokenizer, "qwen3", FAMILIES)

    def accepts(grammar, text):
        c = grammar.constraint(tok)
        for t in tok.encode(text, add_bos=False):
            if not c.allowed()[t]:
                return False
            c.advance(t)
        return c.done

    for inner, good, bad in [(Grammar.json_object(), '{"a": 1}', "yes"), (Grammar.gbnf('root ::= "yes"'), "yes", "{}")]:
        closed = reason_first(inner, False)
        assert accepts(closed, "<think>the model reads</think>\n\n" + good) and accepts(closed, good)
        assert not accepts(closed, "<think>the model reads</think>\n\n" + bad)
        assert not accepts(closed, "<think>a</think>b</think>" + good)  # the thought ends at its first tag
        opened = reason_first(inner, True)
        assert accepts(opened, "the model reads</think>" + good) and not accepts(opened, good)
