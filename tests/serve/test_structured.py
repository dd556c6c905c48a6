"""Structured output through the server: `response_format` and the `grammar` / `json_schema` extensions,
spoken to by the official `openai` client. The model is tiny and random, so every string in the schemas has
a maxLength and every number a bound (it would otherwise repeat a digit until max_tokens); what is checked
is the grammar's promise: every finished answer parses and validates."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from conftest import save_tiny_model

openai = pytest.importorskip("openai")

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                 "nick": {"type": "string", "maxLength": 4}},
                 "required": ["id", "nick"]},
        "ok": {"type": "boolean"}}, "required": ["user", "ok"]},
    "array": {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 2, "maxItems": 4}}, "required": ["scores"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"]},
    "bounds": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
        "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10}}, "required": ["x", "n"]},
    "required": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "title": {"type": "string", "maxLength": 5},
                                                  "note": {"type": "string", "maxLength": 3}},
                 "required": ["id", "title"], "additionalProperties": False},
}
U = [{"role": "user", "content": "Describe it as JSON."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("structured") / "m", tiny_tokenizer, context_length=256,
                           embedding_scale=8.0)


@pytest.fixture
def server(live_server, model_dir):
    return live_server({"tiny": model_dir}, max_batch=8)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="anything", max_retries=0, timeout=120)


def schema_format(name: str, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": strict}}


def test_200_seeded_requests_validate_under_five_schemas(client):
    names = list(SCHEMAS)

    def ask(seed: int):
        name = names[seed % len(names)]
        r = client.chat.completions.create(model="tiny", messages=U, temperature=1.0, seed=seed, max_tokens=150,
                                           response_format=schema_format(name, strict=name != "required"))
        return name, r.choices[0]

    # strict (OpenAI's structured outputs) closes the objects; "required" closes its own (additionalProperties)
    with ThreadPoolExecutor(8) as pool:  # concurrent: the rows share the scheduler's batch
        answers = list(pool.map(ask, range(200)))
    texts = {name: set() for name in names}
    for name, choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
        texts[name].add(choice.message.content)
    assert all(len(t) > 3 for t in texts.values()), texts  # seeded sampling: the answers differ


def test_n_and_streaming(client):
    stream = client.chat.completions.create(model="tiny", messages=U, temperature=1.0, seed=4, n=3, max_tokens=150,
                                            stream=True, response_format=schema_format("nested"))
    parts, finish = ["", "", ""], [None, None, None]
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop"] * 3
    for text in parts:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])
    whole = client.chat.completions.create(model="tiny", messages=U, temperature=1.0, seed=4, n=3, max_tokens=150,
                                           response_format=schema_format("nested"))
    assert [c.message.content for c in whole.choices] == parts  # the stream is the same answer, in pieces


def test_json_object_mode(client):
    finished = 0
    for seed in range(12):
        r = client.chat.completions.create(model="tiny", messages=U, temperature=1.0, seed=seed, max_tokens=60,
                                           response_format={"type": "json_object"})
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{")
        if reason == "stop":  # a random model may repeat a digit until max_tokens; what ends is an object
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 2


def test_the_sdks_parse_helper(client):
    """`chat.completions.parse` sends a strict json_schema built from a pydantic model and parses the answer."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        age: int = Field(ge=0, le=20)

    r = client.chat.completions.parse(model="tiny", messages=U, temperature=1.0, seed=1, max_tokens=60,
                                      response_format=Pet)
    assert isinstance(r.choices[0].message.parsed, Pet)


def test_grammar_extension_gbnf_and_lark(client, server):
    yes_no = 'root ::= "yes" | "no"'
    for seed in range(4):
        r = client.completions.create(model="tiny", prompt="Is it? ", temperature=1.0, seed=seed, max_tokens=10,
                                      extra_body={"grammar": yes_no})
        assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=U, temperature=0, max_tokens=40,
                                       extra_body={"grammar": 'start: "answer: " ("red" | "green") "."'})
    assert r.choices[0].message.content in ("answer: red.", "answer: green.")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 80, "temperature": 1.0, "seed": 2,
            "json_schema": SCHEMAS["enum"]}
    got = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
    jsonschema.validate(json.loads(got["choices"][0]["text"]), SCHEMAS["enum"])


def test_bad_schemas_are_400s_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=U, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {
                "^a": {}}, "propertyNames": {"maxLength": 3}}}})
    err = e.value.body
    assert err["param"] == "response_format.json_schema.schema"
    assert err["message"] == "invalid 'response_format.json_schema.schema': unsupported keyword 'propertyNames'"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"grammar": 'root ::= "a" | ('})
    assert e.value.body["param"] == "grammar" and "GBNF syntax error" in e.value.body["message"]


def test_which_spellings_close_objects():
    """OpenAI's json_schema closes objects only with strict; llama.cpp's spellings always (as its converter)."""
    from lmforge.engine.constrain import Grammar
    from lmforge.serve import translate as tr
    from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest

    schema = SCHEMAS["enum"]

    def chat(**kw):
        return ChatCompletionRequest.model_validate({"model": "m", "messages": U, **kw})

    strict, loose = Grammar.json_schema(schema, strict=True), Grammar.json_schema(schema)
    assert strict != loose
    assert tr.request_grammar(chat(response_format=schema_format("enum", strict=False))) == loose
    assert tr.request_grammar(chat(response_format=schema_format("enum", strict=True))) == strict
    assert tr.request_grammar(chat(response_format={"type": "json_object", "schema": schema})) == strict
    assert tr.request_grammar(CompletionRequest.model_validate({"model": "m", "prompt": "x", "json_schema": schema})) \
        == strict
    assert tr.request_grammar(chat(response_format={"type": "json_object"})) == Grammar.json_object()
    assert tr.request_grammar(chat(response_format={"type": "text"})) is None


def test_grammars_are_built_once_per_request_and_only_on_the_worker_pool(server, monkeypatch):
    """Validating and compiling a grammar take a quarter second for a big one: never on the event loop
    (every stream would stall) nor on the scheduler's thread (every row would), and once per request, not
    once per prompt."""
    import threading

    from lmforge.engine import constrain
    from lmforge.engine.constrain import Grammar

    validated, compiled = [], []
    real_validated, real_compiled = Grammar._validated.__func__, constrain._compiled

    def spy_validated(cls, kind, spec):
        validated.append(threading.current_thread().name)
        return real_validated(cls, kind, spec)

    def spy_compiled(lltok, spec):
        compiled.append(threading.current_thread().name)
        return real_compiled(lltok, spec)

    monkeypatch.setattr(Grammar, "_validated", classmethod(spy_validated))
    monkeypatch.setattr(constrain, "_compiled", spy_compiled)
    body = {"model": "tiny", "prompt": ["a", "b c", "d e f"], "max_tokens": 30, "n": 2, "json_schema": SCHEMAS["enum"]}
    got = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert got.status_code == 200 and len(got.json()["choices"]) == 6
    assert len(validated) == 1 and len(compiled) == 1
    body = {"model": "tiny", "messages": U, "max_tokens": 30, "response_format": schema_format("nested")}
    assert httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert len(validated) == 2 and len(compiled) == 2
    assert all(name.startswith("lmforge-cpu") for name in validated + compiled), validated + compiled


def test_a_grammar_failing_mid_answer_is_a_400_not_a_500(client, monkeypatch):
    """llguidance's per-token limits can stop a hostile grammar in the middle of an answer: the client gets
    a 400 saying so (the server keeps serving)."""
    from lmforge.engine.constrain import Constraint, GrammarError

    real, calls = Constraint._allowed, []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:
            raise GrammarError("the grammar failed: lexer too complex")
        return real(self)

    monkeypatch.setattr(Constraint, "_allowed", failing)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=U, max_tokens=40, response_format={"type": "json_object"})
    assert e.value.body["code"] == "grammar_failed" and "lexer too complex" in e.value.body["message"]
    r = client.chat.completions.create(model="tiny", messages=U, max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")
