"""`POST /v1/embeddings` through the official `openai` client against a live server: an encoder and a chat
model, float and base64 (the client's default), token-id inputs, the memory accounting of an encoder, and
every mistake a 4xx in OpenAI's error shape."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from lmforge.retrieval.embed import Embedder
from lmforge.serve import models

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def bge_dir(tmp_path_factory):
    from conftest import save_tiny_bert as bert_dir

    return bert_dir(tmp_path_factory.mktemp("enc") / "bge", cls_pooling=True)


@pytest.fixture
def server(live_server, bge_dir, chat_model_dir):
    return live_server({"bge": bge_dir, "chat": chat_model_dir})


def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="anything", max_retries=0, timeout=60)


def post(server, body) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=60)


TEXTS = ["the cat sat on the mat.", "a dog ran", "rotate the logs"]


def test_an_encoder_through_the_openai_client_float_and_base64(server, bge_dir):
    want, _ = Embedder.load(bge_dir).embed(TEXTS)
    c = client(server)
    for fmt in ("base64", "float"):  # the client asks for base64 unless told, and decodes it to floats
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        r = c.embeddings.create(model="bge", input=TEXTS, **kw)
        assert r.model == "bge" and [d.index for d in r.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, atol=1e-6)
        tokens = sum(len(x) for x in Embedder.load(bge_dir).tokenize(TEXTS))
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    raw = post(server, {"model": "bge", "input": "a dog ran", "encoding_format": "base64"}).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    vec = np.frombuffer(__import__("base64").b64decode(raw["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, want[1], atol=1e-6)
    assert c.embeddings.create(model="bge", input="a", dimensions=32).data[0].embedding  # its own size: fine


def test_token_id_inputs_are_embedded_as_given(server, bge_dir):
    e = Embedder.load(bge_dir)
    rows = e.tokenize(TEXTS[:2])
    r = client(server).embeddings.create(model="bge", input=rows, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), e.embed(TEXTS[:2])[0], atol=1e-6)
    one = client(server).embeddings.create(model="bge", input=rows[1], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, r.data[1].embedding, atol=1e-6)


def test_a_chat_model_embeds_too(server, chat_model_dir):
    r = client(server).embeddings.create(model="chat", input=["hello there", "the"], encoding_format="float")
    got = np.array([d.embedding for d in r.data])
    want, _ = Embedder.load(chat_model_dir).embed(["hello there", "the"])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)  # the served model may run the fast path's kernels
    # and it still chats afterwards: the embedding hook only acts while embedding
    done = client(server).completions.create(model="chat", prompt="the", max_tokens=2)
    assert done.usage.completion_tokens == 2


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": "nope", "input": "x"}, 404, "model", "does not exist"),
    ({"model": "bge", "input": []}, 400, "input", "empty"),
    ({"model": "bge", "input": ""}, 400, "input", "empty string"),
    ({"model": "bge", "input": ["a", ""]}, 400, "input", "item 1"),
    ({"model": "bge", "input": [[]]}, 400, "input", None),
    ({"model": "bge", "input": ["a"] * 2049}, 400, "input", None),
    ({"model": "bge", "input": 5}, 400, "input", None),
    ({"model": "bge", "input": "a", "dimensions": 8}, 400, "dimensions", "makes 32-dimensional"),
    ({"model": "bge", "input": "a", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": "bge", "input": [[5, 10**6]]}, 400, "input", "outside the vocabulary"),
    ({"model": "bge", "input": "cat " * 40}, 400, "input", "maximum context of 16"),
    ({"input": "x"}, 400, "model", "missing"),
])
def test_mistakes_are_4xx_in_openai_shape(server, body, status, param, needle):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and "\n" not in err["message"]
    assert needle is None or needle in err["message"], err


def test_over_the_context_is_context_length_exceeded(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).embeddings.create(model="bge", input=["a dog", "cat " * 40])
    assert e.value.code == "context_length_exceeded" and "input 1 has 42 tokens" in e.value.message


def test_an_embedding_model_cannot_chat(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="bge", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_supported" and "embedding model" in e.value.message
    assert "bge" not in server.registry.loaded  # refused before loading


def test_an_encoder_is_counted_in_memory_and_unloaded_like_any_model(server, bge_dir, monkeypatch):
    need = models.encoder_footprint(bge_dir)
    weights = sum(p.numel() for p in Embedder.load(bge_dir).model.parameters()) * 4
    assert need.weights == weights and need.runtime > 0 and need.kv_cache == 0
    monkeypatch.setattr(models, "available_memory", lambda: need.total - 1)
    r = post(server, {"model": "bge", "input": "a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
    monkeypatch.setattr(models, "available_memory", lambda: need.total)
    assert post(server, {"model": "bge", "input": "a"}).status_code == 200
    assert server.registry.loaded["bge"].footprint == need
    assert server.registry.unload_idle(now=float("inf")) == ["bge"]
