"""A thinking model's `<think>...</think>` apart from its answer on the OpenAI route: `reasoning_content` on
the message and in stream deltas (read by the real `openai` client), tool calls and structured output on the
answer only, nothing split with `enable_thinking: false` or for a template that does not think, a template
whose generation prompt opens the thought, and a template's `raise_exception` as a 400.

A tiny random model writes no tags of its own: llama.cpp's `grammar` field (which holds for the whole
output as written) makes it write a known thought and answer, so what is checked is the split, not luck."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.live import start_server
from tests.serve.tool_templates import family_tokenizer
from tests.tokenizer.family_templates import FAMILIES

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
SAID = '"<think>" "add two and two" "</think>" "\\n\\nIt is four."'  # GBNF: the model's whole output
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


@pytest.fixture(scope="module")
def server(tiny_tokenizer, chat_model_dir, tmp_path_factory):
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("thinking-models")
    models = {"plain": chat_model_dir}
    for name in ("qwen3", "opens-thought", "gemma3"):
        models[name] = save_tiny_model(root / name, family_tokenizer(tiny_tokenizer, name, FAMILIES),
                                       context_length=512, embedding_scale=8.0)
    s = start_server(models, max_batch=4, max_queue=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _said(client, model, grammar=SAID, **extra):
    return client.chat.completions.create(model=model, messages=ASK, max_tokens=60, temperature=0,
                                          extra_body={"grammar": f"root ::= {grammar}", **extra})


# -- the OpenAI route, through the openai client ------------------------------------------------------------
def test_reasoning_content_apart_from_the_answer(client):
    msg = _said(client, "qwen3").choices[0].message
    assert msg.reasoning_content == "add two and two"  # an unknown field, as the SDK exposes it
    assert msg.model_extra["reasoning_content"] == "add two and two"
    assert msg.content == "It is four."


def test_streamed_deltas_carry_reasoning_then_content(client):
    stream = client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=60, temperature=0, stream=True,
                                            extra_body={"grammar": f"root ::= {SAID}"})
    thought, answer, order = "", "", []
    for chunk in stream:
        for c in chunk.choices:
            r = getattr(c.delta, "reasoning_content", None)
            if r:
                thought += r
                order.append("r")
            if c.delta.content:
                answer += c.delta.content
                order.append("c")
    assert (thought, answer) == ("add two and two", "It is four.")
    assert order == sorted(order, reverse=True)  # all the reasoning before any content


def test_thinking_off_splits_nothing(client):
    msg = _said(client, "qwen3", chat_template_kwargs={"enable_thinking": False}).choices[0].message
    assert msg.content == "<think>add two and two</think>\n\nIt is four."
    assert "reasoning_content" not in msg.model_extra


def test_a_template_that_does_not_think_splits_nothing(client):
    msg = _said(client, "plain").choices[0].message
    assert msg.content.startswith("<think>") and "reasoning_content" not in msg.model_extra


def test_a_prompt_that_opened_the_thought(client):
    msg = _said(client, "opens-thought", grammar='"still thinking" "</think>" "Four."').choices[0].message
    assert (msg.reasoning_content, msg.content) == ("still thinking", "Four.")


def test_an_answer_without_a_thought(client):
    msg = _said(client, "qwen3", grammar='"Four."').choices[0].message
    assert msg.content == "Four." and msg.reasoning_content is None


CALLS = ('"<think>" "I will add" "</think>" "\\n\\n<tool_call>\\n" '
         '"{\\"name\\": \\"add\\", \\"arguments\\": {\\"a\\": 2}}" "\\n</tool_call>"')


def test_tool_calls_are_parsed_from_the_answer_only(client):
    choice = _said(client, "qwen3", grammar=CALLS, tools=[ADD]).choices[0]
    assert choice.message.reasoning_content == "I will add"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("add", {"a": 2})]
    assert choice.finish_reason == "tool_calls" and not choice.message.content


def test_streamed_tool_calls_follow_the_streamed_thought(client):
    stream = client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=60, temperature=0, stream=True,
                                            tools=[ADD], extra_body={"grammar": f"root ::= {CALLS}"})
    thought, content, calls, finish = "", "", [], None
    for chunk in stream:
        for c in chunk.choices:
            thought += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            calls += [(t.function.name, json.loads(t.function.arguments)) for t in c.delta.tool_calls or []]
            finish = c.finish_reason or finish
    assert (thought, content, calls, finish) == ("I will add", "", [("add", {"a": 2})], "tool_calls")


@pytest.mark.parametrize("model", ["qwen3", "opens-thought"])
def test_structured_output_holds_for_the_answer_after_the_thought(client, tiny_tokenizer, model):
    """response_format constrains the answer, not the thought: the model may think first and close its
    thought (here pushed to at once, by a logit bias on `</think>`), then must write the JSON."""
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
    tok = family_tokenizer(tiny_tokenizer, model, FAMILIES)
    bias = {str(tok.encode("</think>", add_bos=False)[0]): 100}
    out = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=40, temperature=0, logit_bias=bias,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    msg = out.choices[0].message
    assert json.loads(msg.content)["a"] in (1, 2)
    assert msg.reasoning_content is None  # the thought was empty: the bias closed it at once


def test_raise_exception_in_a_template_is_a_400(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": "gemma3", "messages": ASK + ASK, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages"
    assert "Conversation roles must alternate" in err["message"] and "\n" not in err["message"]


def test_a_grounded_request_passes_enable_thinking_to_the_template_too(client):
    from lmforge.retrieval.index import Index, index_path

    with Index(index_path("notes")) as index:
        index.update([("notes/sum.md", "# Sums\n\nTwo and two make four.\n")])

    def prompt_tokens(**kwargs):
        return client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=1, temperature=0,
                                              extra_body={"documents": "notes", **kwargs}).usage.prompt_tokens

    # thinking off: the template writes its empty thought into the prompt, grounded or not
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) > prompt_tokens()
