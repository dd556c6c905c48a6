"""Tool calling against a live server, spoken to by the official `openai` client: a forced call, the two-step
round trip with the call and its result in the history, streamed tool-call deltas that reassemble to the
non-streamed call, and every bad tool request a 400 naming the field (never a 500)."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.serve.live import start_server  # noqa: E402
from tests.serve.tool_templates import family_tokenizer, hf_tokenizer  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}, "strict": True}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}, "strict": True}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def qwen_tok(tiny_tokenizer):
    return family_tokenizer(tiny_tokenizer, "hermes")


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen_tok, chat_model_dir):
    from conftest import save_tiny_model

    qwen = save_tiny_model(tmp_path_factory.mktemp("tools") / "qwen", qwen_tok, context_length=1024,
                           embedding_scale=8.0)
    s = start_server({"qwen": qwen, "plain": chat_model_dir}, max_batch=4, max_queue=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="anything", max_retries=0, timeout=120)


def check_call(call, names=SCHEMAS) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)  # OpenAI's arguments: a JSON string
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_forced_call_and_the_round_trip(client, qwen_tok):
    first = client.chat.completions.create(
        model="qwen", messages=[USER], tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = check_call(call)

    # The client appends the assistant message as it came and the tool's result; the second request
    # renders both through the model's template, token for token as transformers does.
    history = [USER, choice.message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    second = client.chat.completions.create(model="qwen", messages=history, tools=TOOLS, temperature=0, max_tokens=4)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    hf = hf_tokenizer(qwen_tok)
    as_transformers = [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        history[2]]
    text = hf.apply_chat_template(as_transformers, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text and "<tool_call>" in text
    assert second.usage.prompt_tokens == len(hf(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_call_deltas_reassemble_to_the_call(client, choice):
    kwargs = dict(model="qwen", messages=[USER], tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120,
                  parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                got = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                got["id"] = d.id or got["id"]
                got["name"] += (d.function.name or "") if d.function else ""
                got["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == want
    assert all(calls[i]["id"].startswith("call_") for i in calls)
    check_call(whole.message.tool_calls[0])
    if isinstance(choice, dict):
        assert want[0][0] == "get_time"


def test_tool_choice_none_and_auto_answer_in_text(client):
    none = client.chat.completions.create(model="qwen", messages=[USER], tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=6)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    # none shows no tools: the prompt is the one without them
    plain = client.chat.completions.create(model="qwen", messages=[USER], temperature=0, max_tokens=6)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    auto = client.chat.completions.create(model="qwen", messages=[USER], tools=TOOLS, temperature=0, max_tokens=6)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # auto shows them


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}
BAD = [
    ("tool without a name", "qwen", {"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools.0.function.name"),
    ("tool name with a space", "qwen", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools.0.function.name"),
    ("two tools of one name", "qwen", {"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ("parameters not an object schema", "qwen",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ("tool_choice naming a missing tool", "qwen",
     {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("tool_choice without tools", "qwen", {"tool_choice": "required"}, "tool_choice"),
    ("tool_choice of an unknown kind", "qwen", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("tools for a template without tools", "plain", {"tools": TOOLS}, "tools"),
    ("a required call and a response_format", "qwen",
     {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ("tool message without tool_call_id", "qwen",
     {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}]},
     "messages.2.tool_call_id"),
    ("tool message answering no call", "qwen",
     {"messages": [USER, {"role": "tool", "content": "x", "tool_call_id": "call_9"}]}, "messages.1.tool_call_id"),
    ("tool_calls with arguments that are not JSON", "qwen",
     {"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ("tool_calls without a function name", "qwen",
     {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {}}]}]},
     "messages.1.tool_calls.0.function.name"),
    ("tool_calls without an id", "qwen",
     {"messages": [USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "messages.1.tool_calls.0.id"),
    ("tool history for a template without tools", "plain",
     {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]},
                   {"role": "tool", "content": "x", "tool_call_id": "call_1"}]}, "messages.1"),
    ("tools with documents", "qwen", {"tools": TOOLS, "documents": "docs"}, "tools"),
]


@pytest.mark.parametrize("what,model,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_400s_naming_the_field(server, what, model, extra, param):
    body = {"model": model, "messages": [USER], "max_tokens": 2, **extra}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
