"""Request schemas: strict where OpenAI is strict, lenient where OpenAI's API and vLLM are lenient."""

from __future__ import annotations

import json

import httpx
import pytest

from lmforge.serve.embeddings import EmbeddingRequest
from lmforge.serve.ollama_protocol import ChatRequest as OllamaChat
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from tests.serve.live import start_server

U = [{"role": "user", "content": "hi"}]


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": U, **kw}).encode()


def test_null_for_an_optional_field_is_its_default():
    r = parse(ChatCompletionRequest, body(n=None, stream=None, logprobs=None, ignore_eos=None, length_penalty=None,
                                          temperature=None, max_tokens=None, tools=None, response_format=None))
    plain = parse(ChatCompletionRequest, body())
    assert r.model_dump() == plain.model_dump()


def test_null_keeps_its_meaning_where_the_field_is_nullable():
    # completions' max_tokens defaults to 16, and null asks for "no limit but the context" (vLLM's reading)
    assert parse(CompletionRequest, json.dumps({"model": "m", "prompt": "x"}).encode()).max_tokens == 16
    assert parse(CompletionRequest, json.dumps({"model": "m", "prompt": "x", "max_tokens": None}).encode()).max_tokens is None


def test_a_required_field_may_not_be_null():
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, json.dumps({"model": None, "messages": U}).encode())
    assert e.value.param == "model"


@pytest.mark.parametrize("field,value", [("max_tokens", 64.0), ("n", 2.0), ("seed", 7.0), ("top_k", 5.0),
                                         ("top_logprobs", 3.0), ("max_completion_tokens", 9.0)])
def test_an_integral_float_is_the_integer(field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    r = parse(ChatCompletionRequest, body(**{field: value}, **extra))
    got = getattr(r, field)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [2.5, True, "5", 1e400])
def test_other_non_integers_are_still_refused(value):
    raw = body(max_tokens=0).replace(b'"max_tokens": 0', b'"max_tokens": ' + (b"1e400" if value == 1e400 else
                                                                            json.dumps(value).encode()))
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, raw)
    assert e.value.status == 400 and e.value.param == "max_tokens"


def test_the_other_schemas_share_the_rules():
    assert parse(EmbeddingRequest, b'{"model": "m", "input": "x", "dimensions": 8.0, "encoding_format": null}'
                 ).dimensions == 8
    r = parse(OllamaChat, b'{"model": "m", "stream": null, "options": {"num_predict": 4.0, "seed": null}}')
    assert r.stream is True and r.options.num_predict == 4


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = start_server({"tiny": chat_model_dir})
    yield s
    s.stop()


def test_tokenize_takes_llama_cpp_content(server, chat_model_dir):
    from conftest import load_engine

    tok = load_engine(chat_model_dir).tokenizer
    url = server.base_url + "/tokenize"
    plain = httpx.post(url, json={"content": "the model"}).json()
    assert plain["tokens"] == tok.encode("the model", add_bos=False)  # llama.cpp: add_special defaults to false
    assert httpx.post(url, json={"content": "the model", "add_special": True}).json()["tokens"] == tok.encode("the model")
    pieces = httpx.post(url, json={"content": "the model", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces) == tok.decode(plain["tokens"])
    # a token that is part of a UTF-8 character comes back as its byte values, as llama.cpp answers
    emoji = httpx.post(url, json={"content": "a😀", "with_pieces": True}).json()["tokens"]
    raw = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in emoji)
    assert raw == "a😀".encode() and any(isinstance(p["piece"], list) for p in emoji), emoji
    assert "\ufffd" not in json.dumps(emoji)
    both = httpx.post(url, json={"content": "a", "prompt": "b"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
