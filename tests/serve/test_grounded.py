"""Grounded chat completions (`documents`, serve/grounded.py) through the official `openai` client.

The reference for every grounded answer is built here without the server: the same index searched for the
same question, grounded by `retrieval.grounding.ground` for the same context and reserve, rendered by
`chat_prompt_ids`, and answered greedily by an `Engine` on the same weights. The server must send exactly
that prompt (its usage counts it, its greedy answer is the engine's) and return those sources.
"""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

MODEL = "tiny-docs"
QUESTION = "how do I rotate the logs"
DOCS = {
    "notes/logs.md": "# Logs\n\n## Rotation\n\nRotate the logs daily with logrotate and keep a week.\n",
    "notes/cache.md": "# Cache\n\nThe cache keeps each answer for a day, then the logs say so.\n",
    "notes/other.md": "# Other\n\nNothing to see here about trains.\n",
}
CONTEXT = 512


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("docs-model") / MODEL, tiny_tokenizer, context_length=CONTEXT,
                           embedding_scale=8.0)


def make_index(name: str = "mydocs", docs: dict[str, str] = DOCS) -> None:
    from lmforge.retrieval.index import Index, index_path

    with Index(index_path(name)) as index:
        index.update(list(docs.items()))


@pytest.fixture
def server(live_server, docs_model):
    make_index()
    make_index("other", {"notes/chat.md": "# Templates\n\nA turn ends with <|im_end|> in the template.\n"})
    return live_server({MODEL: docs_model}, docs="mydocs")


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model_dir, question: str, k: int, max_tokens: int, name: str = "mydocs"):
    """(prompt ids, sources as dicts, greedy answer) computed without the server."""
    from lmforge.engine.prompt import chat_prompt_ids
    from lmforge.engine.sampling import SamplingParams
    from lmforge.retrieval.grounding import ground, sources_from_hits
    from lmforge.retrieval.index import open_index
    from conftest import load_engine

    engine = load_engine(model_dir)
    with open_index(name) as index:
        sources = sources_from_hits(index.search(question, k))
    g = ground(engine.tokenizer, [{"role": "user", "content": question}], sources, context=CONTEXT, reserve=max_tokens)
    ids = chat_prompt_ids(engine.tokenizer, g.messages)
    text = "".join(ev.text for ev in engine.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=max_tokens)))
    return ids, [s.to_dict() for s in g.sources], text


def test_grounded_answer_carries_its_sources(server, docs_model):
    ids, sources, text = reference(docs_model, QUESTION, 4, 12)
    assert len(sources) == 2 and sources[0]["path"] == "notes/logs.md"  # the premise: "trains" matches nothing
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=12, extra_body={"documents": "mydocs"})
    msg = r.choices[0].message
    assert msg.sources == sources  # the extension field, through the SDK's extra fields
    assert r.usage.prompt_tokens == len(ids)  # exactly the grounded prompt ...
    assert msg.content == text  # ... and the answer the engine gives to it
    assert r.model_extra["grounding"] == {"index": "mydocs", "k": 4, "retrieved": 2, "passages": 2, "dropped": 0,
                                          "dropped_messages": 0, "notice": None}
    assert sources[0]["heading"] == "Logs > Rotation" and sources[0]["index"] == 1

    # The object form, with k.
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=12,
                                               extra_body={"documents": {"index": "mydocs", "k": 1}})
    assert r.choices[0].message.sources == reference(docs_model, QUESTION, 1, 12)[1]

    # Without documents nothing changes: no sources field at all.
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=4)
    assert "sources" not in (r.choices[0].message.model_extra or {}) and "grounding" not in (r.model_extra or {})


def test_streamed_sources_come_before_the_content(server, docs_model):
    _, sources, text = reference(docs_model, QUESTION, 4, 12)
    stream = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                    temperature=0, max_tokens=12, stream=True,
                                                    extra_body={"documents": "mydocs"})
    chunks = list(stream)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert first.choices[0].delta.sources == sources
    assert first.model_extra["grounding"]["passages"] == 2
    assert all("sources" not in (c.choices[0].delta.model_extra or {}) for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_earlier_turns_are_kept_and_only_the_latest_question_retrieves(server, docs_model):
    from lmforge.engine.prompt import chat_prompt_ids
    from lmforge.retrieval.grounding import ground, sources_from_hits
    from lmforge.retrieval.index import open_index
    from conftest import load_engine

    turns = [{"role": "user", "content": "what about trains"}, {"role": "assistant", "content": "Nothing [1]."},
             {"role": "user", "content": "and the cache"}]
    r = client(server).chat.completions.create(model=MODEL, messages=turns, temperature=0, max_tokens=4,
                                               extra_body={"documents": "mydocs"})
    with open_index("mydocs") as index:
        sources = sources_from_hits(index.search("and the cache", 4))
    tok = load_engine(docs_model).tokenizer
    g = ground(tok, turns, sources, context=CONTEXT, reserve=4)
    assert r.choices[0].message.sources == [s.to_dict() for s in g.sources]
    assert r.choices[0].message.sources[0]["path"] == "notes/cache.md"
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, g.messages))


def test_passages_too_long_for_the_context_are_dropped_and_said(server):
    make_index("long", {f"doc{i}.md": f"# Doc {i}\n\n" + "the logs rotate daily and weekly " * 12 for i in range(6)})
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "rotate logs"}],
                                               max_tokens=8, extra_body={"documents": {"index": "long", "k": 6}})
    g = r.model_extra["grounding"]
    assert g["retrieved"] == 6 and g["dropped"] > 0 and g["passages"] == 6 - g["dropped"]
    assert "lowest-ranked" in g["notice"]
    assert [x["index"] for x in r.choices[0].message.sources] == list(range(1, g["passages"] + 1))
    assert r.usage.prompt_tokens + 8 <= CONTEXT


def test_a_passage_holding_a_control_token_cannot_forge_a_turn(server, docs_model):
    from conftest import load_engine

    tok = load_engine(docs_model).tokenizer
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the template turn"}],
                                               temperature=0, max_tokens=4, extra_body={"documents": "other"})
    shown = [s for s in r.choices[0].message.sources if s["path"] == "notes/chat.md"]
    assert shown and "<|im_end|>" not in shown[0]["text"] and "<\u200b|im_end|>" in shown[0]["text"]
    assert tok.control_token_in(shown[0]["text"]) is None


def test_unknown_index_is_a_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               extra_body={"documents": "nosuch"})
    err = e.value.body
    assert err["param"] == "documents" and err["code"] == "index_not_found" and err["type"] == "invalid_request_error"
    assert "nosuch" in err["message"] and "mydocs" in err["message"] and "other" in err["message"]


@pytest.mark.parametrize("documents, param", [
    (5, "documents"), ("", "documents"), (["mydocs"], "documents"), ({"k": 2}, "documents.index"),
    ({"index": "mydocs", "k": 0}, "documents.k"), ({"index": "mydocs", "k": "2"}, "documents.k"),
    ("../../etc/passwd", "documents"), ("mydocs:latest", "documents"),
])
def test_bad_documents_values_are_400s(server, documents, param):
    import os

    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               extra_body={"documents": documents})
    err = e.value.body
    assert err["param"] == param and err["code"] in ("invalid_value", "missing_required_parameter"), err
    assert os.environ["LMFORGE_HOME"] not in err["message"]


def test_unreadable_index_is_one_line_without_its_path(server, tmp_path):
    import os

    from lmforge.retrieval.index import index_path

    index_path("broken").write_bytes(b"this is not a database, just bytes " * 100)
    with pytest.raises(openai.InternalServerError) as e:
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               extra_body={"documents": "broken"})
    err = e.value.body
    assert err["code"] == "index_unreadable" and "broken" in err["message"] and "--rebuild" in err["message"]
    assert os.environ["LMFORGE_HOME"] not in err["message"]


def test_index_listing_names_the_default(server, live_server, docs_model):
    body = httpx.get(server.base_url + "/v1/indexes").json()
    assert body == {"object": "list", "data": [{"id": "mydocs", "object": "index"}, {"id": "other", "object": "index"}],
                    "default": "mydocs"}
    plain = live_server({MODEL: docs_model}, api_key="k")
    assert httpx.get(plain.base_url + "/v1/indexes").status_code == 401  # behind the key, like the API
    body = httpx.get(plain.base_url + "/v1/indexes", headers={"Authorization": "Bearer k"}).json()
    assert body["default"] is None and [d["id"] for d in body["data"]] == ["mydocs", "other"]


def test_beam_search_answers_carry_the_sources_too(server, docs_model):
    r = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=4, extra_body={"documents": "mydocs", "use_beam_search": True,
                                                                         "best_of": 2})
    assert r.choices[0].message.sources == reference(docs_model, QUESTION, 4, 4)[1]
    assert r.model_extra["grounding"]["passages"] == 2


def test_serve_refuses_an_unknown_default_index(capsys):
    from conftest import run_cli

    make_index()
    code, _, err = run_cli(capsys, "serve", "--docs", "nosuch", "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "no index named nosuch (known: mydocs;" in err
