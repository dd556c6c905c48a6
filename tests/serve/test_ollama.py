"""Ollama's native API (/api/*), spoken to by the official `ollama` client against a live server, with the
answers checked against the engine run alone and field for field against Ollama's documentation."""

from __future__ import annotations

import copy
import json
import re
import time

import httpx
import pytest

ollama = pytest.importorskip("ollama")

from tests.serve.live import start_server, wait_until  # noqa: E402

MSG = [{"role": "user", "content": "the model reads"}]
RFC3339_NS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
THINK_TEMPLATE_TAIL = "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def model_dirs(chat_model_dir, tiny_tokenizer, tmp_path_factory):
    """The plain tiny chat model, the same weights with a Hermes tool-calling template, and with a template
    that knows `enable_thinking`."""
    from conftest import save_tiny_model
    from tests.serve.tool_templates import family_tokenizer

    root = tmp_path_factory.mktemp("ollama-models")
    thinking = copy.copy(tiny_tokenizer)
    thinking.chat_template = tiny_tokenizer.chat_template + THINK_TEMPLATE_TAIL
    return {"tiny": chat_model_dir,
            "tools": save_tiny_model(root / "tools", family_tokenizer(tiny_tokenizer, "hermes"), context_length=1024,
                                     embedding_scale=8.0),
            "think": save_tiny_model(root / "think", thinking, context_length=128, embedding_scale=8.0)}


@pytest.fixture(scope="module")
def server(model_dirs):
    s = start_server(model_dirs, max_batch=4, max_queue=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base_url, timeout=60)


@pytest.fixture(scope="module")
def engine(chat_model_dir):
    from conftest import load_engine

    return load_engine(chat_model_dir)


def greedy_alone(engine, ids, n):
    from lmforge.engine.sampling import SamplingParams

    return engine.complete([ids], SamplingParams(temperature=0, max_new_tokens=n))[0]


def check_final(obj: dict, model: str, prompt_tokens: int, out_tokens: int) -> None:
    """The final object's fields as Ollama's docs give them: types, units (ns > 0), counts."""
    assert obj["model"] == model and obj["done"] is True
    assert obj["done_reason"] in ("stop", "length")
    assert RFC3339_NS.match(obj["created_at"]), obj["created_at"]
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(obj[key], int) and obj[key] > 0, key
    assert obj["total_duration"] >= obj["eval_duration"]
    assert obj["prompt_eval_count"] == prompt_tokens and obj["eval_count"] == out_tokens


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60, **kw)


# -- chat and generate ------------------------------------------------------------------------------------------
def test_chat_matches_the_engine_field_for_field(server, engine):
    r = post(server, "/api/chat", {"model": "tiny", "messages": MSG, "stream": False,
                                   "options": {"temperature": 0, "num_predict": 10}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    ids = engine.tokenizer.encode_chat(MSG, add_generation_prompt=True)
    alone = greedy_alone(engine, ids, 10)
    assert body["message"] == {"role": "assistant", "content": alone.text}
    check_final(body, "tiny", len(ids), len(alone.ids))
    assert body["done_reason"] == alone.finish_reason


def test_chat_streams_ndjson_that_adds_up_to_the_answer(server, client):
    opts = {"temperature": 0, "num_predict": 8}
    whole = client.chat(model="tiny", messages=MSG, options=opts)
    with httpx.stream("POST", server.base_url + "/api/chat", json={"model": "tiny", "messages": MSG, "options": opts},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert all(o["done"] is False and o["message"]["role"] == "assistant" for o in lines[:-1])
    assert "".join(o["message"]["content"] for o in lines) == whole.message.content
    check_final(lines[-1], "tiny", whole.prompt_eval_count, whole.eval_count)
    streamed = list(client.chat(model="tiny", messages=MSG, options=opts, stream=True))
    assert "".join(c.message.content for c in streamed) == whole.message.content and streamed[-1].done


def test_generate_templates_the_prompt_and_returns_its_context(client, engine):
    r = client.generate(model="tiny", prompt="the model reads", options={"temperature": 0, "num_predict": 6})
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "the model reads"}], add_generation_prompt=True)
    alone = greedy_alone(engine, ids, 6)
    assert r.response == alone.text and r.eval_count == len(alone.ids) and r.prompt_eval_count == len(ids)
    assert list(r.context) == ids + alone.ids  # Ollama's conversational memory
    chunks = list(client.generate(model="tiny", prompt="the model reads", stream=True,
                                  options={"temperature": 0, "num_predict": 6}))
    assert "".join(c.response for c in chunks) == r.response and list(chunks[-1].context) == list(r.context)
    # the context given back continues the conversation: its ids go before the new prompt's
    nxt = client.generate(model="tiny", prompt="a token", context=r.context, options={"temperature": 0, "num_predict": 3})
    more = engine.tokenizer.encode_chat([{"role": "user", "content": "a token"}], add_generation_prompt=True)
    assert nxt.prompt_eval_count == len(r.context) + len(more)
    assert nxt.response == greedy_alone(engine, list(r.context) + more, 3).text


def test_generate_raw_is_the_prompt_as_it_is(client, engine):
    r = client.generate(model="tiny", prompt="the cache writes", raw=True, options={"temperature": 0, "num_predict": 5})
    ids = engine.tokenizer.encode("the cache writes")
    assert r.response == greedy_alone(engine, ids, 5).text and r.prompt_eval_count == len(ids)
    assert r.context is None  # raw mode returns no context, as Ollama's docs say


def test_options_reach_the_sampler(client):
    short = client.chat(model="tiny", messages=MSG, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    unlimited = client.chat(model="tiny", messages=MSG, options={"temperature": 0, "num_predict": -1})
    assert unlimited.prompt_eval_count + unlimited.eval_count <= 128
    assert unlimited.message.content.startswith(short.message.content)
    seeded = [client.chat(model="tiny", messages=MSG, options={"temperature": 1.5, "top_k": 0, "top_p": 1, "min_p": 0,
                                                                "seed": 7, "num_predict": 12}).message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    other = {client.chat(model="tiny", messages=MSG, options={"temperature": 1.5, "top_k": 0, "top_p": 1, "min_p": 0,
                                                             "seed": s, "num_predict": 12}).message.content
             for s in range(8, 12)}
    assert len(other | {seeded[0]}) > 1  # the seed, not the prompt alone, decides
    if short.message.content:
        stop = short.message.content[-1]
        stopped = client.chat(model="tiny", messages=MSG, options={"temperature": 0, "num_predict": 3, "stop": [stop]})
        assert stop not in stopped.message.content and stopped.done_reason == "stop"


def test_unknown_and_unsupported_options_are_ignored_with_a_warning_header(server, client):
    r = post(server, "/api/chat", {"model": "tiny", "messages": MSG, "stream": False,
                                   "options": {"num_predict": 2, "num_thread": 4, "mirostat": 1, "xyz": 1}})
    assert r.status_code == 200
    warning = r.headers["x-lmforge-warning"]
    assert "unknown option 'xyz'" in warning and "'mirostat' is not supported" in warning
    assert "num_thread" not in warning  # Ollama's runtime options are silently ignored, as Ollama does
    plain = post(server, "/api/chat", {"model": "tiny", "messages": MSG, "stream": False, "options": {"num_predict": 2}})
    assert "x-lmforge-warning" not in plain.headers


def test_format_json_schema_constrains_the_answer(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    r = client.chat(model="tiny", messages=MSG, format=schema, options={"temperature": 0.8, "seed": 1, "num_predict": 60})
    jsonschema.validate(json.loads(r.message.content), schema)
    g = client.generate(model="tiny", prompt="the data", format="json", options={"seed": 2, "num_predict": 60})
    assert g.response.lstrip().startswith("{")  # a random model may not close it within 60 tokens
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)


def test_think_sets_the_templates_enable_thinking(client):
    on = client.chat(model="think", messages=MSG, think=True, options={"num_predict": 2})
    off = client.chat(model="think", messages=MSG, think=False, options={"num_predict": 2})
    assert on.prompt_eval_count > off.prompt_eval_count  # "<think>\n" opens the answer
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MSG, think=True)
    assert e.value.status_code == 400 and e.value.error == '"tiny" does not support thinking'


@pytest.mark.parametrize("route, body", [("/api/chat", {"messages": MSG}), ("/api/generate", {"prompt": "x"})])
def test_think_with_a_format_holds_the_format_after_the_thought(server, route, body):
    """The format constrains the answer, not the thought (engine/reasoning.py's `reason_first`, as on the
    OpenAI route): this template opens the thought, and the tiny model, free to think, never closes it."""
    r = post(server, route, {"model": "think", **body, "think": True, "format": "json", "stream": False,
                             "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text
    out = r.json()
    answer = out["message"] if route == "/api/chat" else out
    assert answer.get("thinking") and answer.get("content", answer.get("response")) == ""


def test_think_splitter_separates_thinking_however_the_text_is_cut():
    from lmforge.engine.reasoning import ThinkSplitter

    text = "<think>\nfirst, the cause</think>\n\nThe answer."
    for cut in range(1, len(text)):
        sp = ThinkSplitter()
        parts = [sp.feed(text[:cut]), sp.feed(text[cut:]), sp.flush()]
        assert "".join(p[0] for p in parts) == "\nfirst, the cause"
        assert "".join(p[1] for p in parts) == "The answer."


def test_tools_are_rendered_by_the_template_and_a_round_trip_is_accepted(client):
    plain = client.chat(model="tools", messages=MSG, options={"num_predict": 2})
    offered = client.chat(model="tools", messages=MSG, tools=[WEATHER], options={"num_predict": 2})
    assert offered.prompt_eval_count > plain.prompt_eval_count + 20  # the tool's JSON is in the prompt
    history = MSG + [{"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    after = client.chat(model="tools", messages=history, tools=[WEATHER], options={"num_predict": 2})
    assert after.prompt_eval_count > offered.prompt_eval_count
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MSG, tools=[WEATHER])  # a template that shows no tools
    assert e.value.status_code == 400


def test_tool_calls_come_out_as_ollama_objects_streamed_or_not():
    """The output side of tools, on text a model could write (a tiny random model writes none): parsed by
    serve/tools.py, arguments as objects, the same calls streamed in any cut as parsed whole."""
    from lmforge.serve import tools as tl
    from lmforge.serve.ollama import _Run

    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = tl.parse_tool_calls("hermes", text)
    assert content == "Let me look." and [c.ollama() for c in calls] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]

    def piece(thinking, content, calls=None):
        return {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}}

    for cut in (3, 15, 30, len(text) - 4):
        run = _Run.__new__(_Run)
        run.model, run.calls = "tools", tl.ToolCallStream("hermes")
        lines = run._lines(piece, "", text[:cut]) + run._lines(piece, "", text[cut:], end=True)
        objs = [json.loads(b) for b in lines]
        assert "".join(o["message"]["content"] for o in objs) == "Let me look."
        assert [c for o in objs for c in o["message"].get("tool_calls", [])] == [c.ollama() for c in calls]


# -- load, unload, keep_alive, num_ctx, ps -------------------------------------------------------------------
def test_keep_alive_load_unload_and_ps(server, client):
    loaded = post(server, "/api/generate", {"model": "tiny"}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load" and loaded["response"] == ""
    client.chat(model="tiny", messages=MSG, keep_alive="1h", options={"num_predict": 1})
    (m,) = [m for m in client.ps().models if m.model == "tiny"]
    assert 3500 < m.expires_at.timestamp() - time.time() <= 3600
    assert m.size == server.registry.loaded["tiny"].footprint.total  # its memory as counted before loading
    assert m.size_vram == 0 and m.context_length == 128 and len(m.digest) == 64  # on the CPU here
    assert m.details.format == "safetensors" and m.details.parameter_size
    client.chat(model="tiny", messages=MSG, keep_alive=-1, options={"num_predict": 1})
    assert [m for m in client.ps().models if m.model == "tiny"][0].expires_at.year == 9999  # for ever
    r = client.chat(model="tiny", messages=MSG, keep_alive=0, options={"num_predict": 2})
    assert r.done and "tiny" not in [m.model for m in client.ps().models]  # gone before `done` was sent
    *_, last = client.generate(model="tiny", prompt="the", keep_alive=0, stream=True, options={"num_predict": 2})
    assert last.done and "tiny" not in [m.model for m in client.ps().models]
    client.chat(model="tiny", messages=MSG, options={"num_predict": 1})
    unloaded = post(server, "/api/chat", {"model": "tiny", "messages": [], "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload" and unloaded["message"] == {"role": "assistant", "content": ""}
    assert "tiny" not in [m.model for m in client.ps().models]


def test_num_ctx_sets_the_context_the_model_is_loaded_with(server, client):
    client.chat(model="tiny", messages=MSG, options={"num_ctx": 64, "num_predict": 1})
    assert server.registry.loaded["tiny"].scheduler.context_length == 64
    assert [m.context_length for m in client.ps().models if m.model == "tiny"] == [64]
    r = client.chat(model="tiny", messages=MSG, options={"num_ctx": 64, "num_predict": -1})
    assert r.prompt_eval_count + r.eval_count <= 64
    client.chat(model="tiny", messages=MSG, options={"num_ctx": 100000, "num_predict": 1})  # bounded by the model's
    assert server.registry.loaded["tiny"].scheduler.context_length == 128


def test_num_ctx_is_capped_by_max_context_and_does_not_stick(live_server, chat_model_dir):
    s = live_server({"tiny": chat_model_dir}, max_context=64)
    c = ollama.Client(host=s.base_url, timeout=60)

    def context() -> int:
        return s.registry.loaded["tiny"].scheduler.context_length

    c.chat(model="tiny", messages=MSG, options={"num_ctx": 100000, "num_predict": 1})
    assert context() == 64  # a client cannot make the server allocate past --max-context
    c.generate(model="tiny", prompt="the", raw=True, options={"num_ctx": 1, "num_predict": 1})
    assert context() == 4  # floored, as Ollama does
    c.chat(model="tiny", messages=MSG, options={"num_predict": 1})
    assert context() == 64  # no num_ctx: back to the default, for every client
    assert s.registry.context_for(None, 48) == 48 and s.registry.context_for(100, 48) == 64
    assert s.registry.context_for(100, 96) == 96  # a Modelfile's own larger context stays reachable


def test_models_list_show_copy_delete_through_the_store(live_server, chat_model_dir, tmp_path):
    from lmforge import store

    store.add("tiny", chat_model_dir)
    (tmp_path / "Modelfile").write_text("FROM tiny\nSYSTEM Be brief.\nPARAMETER temperature 0.3\nPARAMETER num_ctx 48\n")
    store.create("tiny32", tmp_path / "Modelfile")
    s = live_server(None)
    c = ollama.Client(host=s.base_url, timeout=60)
    assert sorted(m.model for m in c.list().models) == ["tiny", "tiny32"]
    listed = {m.model: m for m in c.list().models}["tiny"]
    assert listed.size > 0 and len(listed.digest) == 64 and listed.details.family
    shown = c.show("tiny32")
    assert "completion" in shown.capabilities and shown.template
    assert "num_ctx" in shown.parameters and "temperature" in shown.parameters
    assert "FROM tiny32" in shown.modelfile and "SYSTEM" in shown.modelfile
    assert shown.modelinfo["general.architecture"] == shown.details.family
    assert shown.modelinfo[f"{shown.details.family}.context_length"] == 128
    # PARAMETER num_ctx: the context the server loads the model with
    c.generate(model="tiny32", prompt="the model", options={"num_predict": 1})
    assert s.registry.loaded["tiny32"].scheduler.context_length == 48
    assert [m.context_length for m in c.ps().models] == [48]
    assert c.copy("tiny", "tiny-copy").status == "success"
    assert "tiny-copy" in [m.model for m in c.list().models]
    assert c.delete("tiny-copy").status == "success"
    assert "tiny-copy" not in [m.model for m in c.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("tiny-copy")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        c.copy("tiny", "tiny32")  # exists
    assert e.value.status_code == 400 and "tiny32" in e.value.error


def test_copy_and_delete_refused_for_command_line_models(client):
    for call in (lambda: client.copy("tiny", "other"), lambda: client.delete("tiny")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and "command line" in e.value.error


def test_version(client):
    from lmforge import __version__

    assert client._request_raw("GET", "/api/version").json() == {"version": __version__}


# -- embeddings ---------------------------------------------------------------------------------------------
def test_embed_matches_the_openai_route(server, client):
    r = client.embed(model="tiny", input=["the cat sat", "a dog ran"])
    ref = post(server, "/v1/embeddings", {"model": "tiny", "input": ["the cat sat", "a dog ran"]}).json()
    assert r.model == "tiny" and len(r.embeddings) == 2
    for got, want in zip(r.embeddings, ref["data"]):
        assert got == pytest.approx(want["embedding"], abs=1e-6)
    assert r.prompt_eval_count == ref["usage"]["prompt_tokens"] and r.total_duration > 0
    legacy = client.embeddings(model="tiny", prompt="the cat sat")
    assert legacy.embedding == pytest.approx(r.embeddings[0], abs=1e-6)
    long = "the cat sat " * 100
    assert len(client.embed(model="tiny", input=long).embeddings) == 1  # truncate: true (the default) cuts it
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input=long, truncate=False)
    assert e.value.status_code == 400 and "truncate" in e.value.error


# -- bad input: Ollama's {"error": "..."}, a 4xx, never a 500 ------------------------------------------------------
BAD = [
    ("/api/chat", {"model": "tiny", "messages": MSG, "keep_alive": "5 minutes"}, 400, "keep_alive"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "keep_alive": True}, 400, "keep_alive"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "keep_alive": "1x"}, 400, "keep_alive"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "format": "xml"}, 400, "format"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "format": {"type": "object", "not": {}}}, 400, "format"),
    ("/api/chat", {"model": "nope", "messages": MSG}, 404, 'model "nope"'),
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, 'model "nope"'),
    ("/api/show", {"model": "nope"}, 404, 'model "nope"'),
    ("/api/embed", {"model": "nope", "input": "x"}, 404, 'model "nope"'),
    ("/api/generate", {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [10 ** 6]}, 400, "context"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "options": {"num_ctx": 0}}, 400, "num_ctx"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "tool", "content": "x", "tool_name": "f"}]}, 400, "tool"),
    ("/api/chat", {"model": "tools", "messages": MSG, "tools": [{"type": "function", "function": {}}]}, 400, "name"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"model": "tiny", "messages": MSG, "options": {"temperature": 3}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": MSG + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "assistant", "content": "no call here"}, {"role": "tool", "content": "x", "tool_name": "f"}]},
     400, "tool result of 'f'"),
    ("/api/chat", {"messages": MSG}, 400, "model"),
    ("/api/show", {}, 400, "model"),
    ("/api/copy", {"source": "tiny"}, 400, "destination"),
    ("/api/pull", {"model": "tiny"}, 404, "no route"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p} {w}" for p, _, _, w in BAD])
def test_bad_requests_are_one_clear_ollama_error(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err, str) and words in err and "Traceback" not in err


@pytest.mark.parametrize("raw", [b"{nope", b"", b"3", b"null", b"[1, 2]", b'{"model": "\xff"}'])
def test_a_body_that_is_not_a_json_object(server, raw):
    r = httpx.post(server.base_url + "/api/chat", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_no_500_and_still_healthy_after_every_bad_request(server, client):
    statuses = [post(server, path, body).status_code for path, body, *_ in BAD]
    assert all(400 <= s < 500 for s in statuses), statuses
    assert wait_until(lambda: server.registry.in_flight == 0)
    assert client.chat(model="tiny", messages=MSG, options={"num_predict": 2}).done


def test_the_guards_refusals_on_api_routes_are_ollama_shaped(server):
    r = httpx.post(server.base_url + "/api/chat", content=b"{}", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and isinstance(r.json()["error"], str)
    openai_shaped = httpx.post(server.base_url + "/v1/chat/completions", content=b"{}",
                               headers={"content-type": "text/plain"})
    assert openai_shaped.status_code == r.status_code and isinstance(openai_shaped.json()["error"], dict)


@pytest.mark.parametrize("given,seconds", [("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("1.5h", 5400.0),
                                           (10, 10.0), (2.5, 2.5), ("0", 0.0), (0, 0.0), ("-1m", float("inf")),
                                           (-1, float("inf")), (None, None)])
def test_keep_alive_durations(given, seconds):
    from lmforge.serve.ollama_protocol import parse_keep_alive

    assert parse_keep_alive(given) == (pytest.approx(seconds) if seconds not in (None, float("inf")) else seconds)


@pytest.mark.parametrize("given", ["5", "5 m", "m", "", "1h-30m", "forever", "1d", True])
def test_keep_alive_garbage_is_a_400(given):
    from lmforge.serve.ollama_protocol import parse_keep_alive
    from lmforge.serve.protocol import APIError

    with pytest.raises(APIError) as e:
        parse_keep_alive(given)
    assert e.value.status == 400 and "keep_alive" in e.value.message


def test_num_predict_against_the_modelfiles_default():
    from lmforge.serve.ollama_protocol import Options, sampling_fields

    mf = {"max_new_tokens": 64, "temperature": 0.2}
    assert sampling_fields(Options(num_predict=5), mf)[1] == {"max_new_tokens": 5, "temperature": 0.2}
    for lift in (-1, -2):  # no limit / fill the context: the context decides
        assert sampling_fields(Options(num_predict=lift), mf)[1] == {"temperature": 0.2}
    fields, _ = sampling_fields(Options(temperature=0.5, repeat_penalty=1.1, seed=-1, stop="x", top_p=0), mf)
    assert fields == {"temperature": 0.5, "repeat_penalty": 1.1, "stop": ["x"], "top_p": 1e-9}


def test_a_bad_format_or_tools_is_refused_before_the_model_loads(server):
    post(server, "/api/chat", {"model": "tools", "messages": [], "keep_alive": 0})
    assert "tools" not in server.registry.loaded
    for body in ({"format": {"type": "object", "not": {}}}, {"tools": [{"type": "function", "function": {}}]}):
        r = post(server, "/api/chat", {"model": "tools", "messages": MSG, **body})
        assert r.status_code == 400, r.text
        assert "tools" not in server.registry.loaded  # no load (nor an eviction) for a request refused anyway


def test_options_replace_the_modelfiles_stop_list():
    from lmforge.serve.ollama_protocol import Options, sampling_fields

    mf = {"stop": ["<|im_end|>", "User:"], "temperature": 0.2}
    fields, defaults = sampling_fields(Options(stop=["END"]), mf)
    assert fields["stop"] == ["END"] and "stop" not in defaults  # Ollama: options replace parameters
    assert sampling_fields(Options(temperature=0.5), mf)[1]["stop"] == ["<|im_end|>", "User:"]


def test_a_refused_option_value_names_the_option():
    from lmforge.serve.ollama_protocol import option_error
    from lmforge.serve.protocol import invalid

    e = option_error(invalid("repetition_penalty must be > 0 (1 = off), got 0"))
    assert e.param == "options.repeat_penalty" and "options.repeat_penalty" in e.message
    assert option_error(invalid("x", param="stop")).param == "stop"


def test_capabilities_promise_tools_only_for_a_format_chat_parses(model_dirs):
    from lmforge.serve.ollama_models import capabilities

    assert capabilities({"chat_template": "{% if tools %}{{ tools | tojson }}{% endif %}"}) == ["completion"]
    assert "tools" in capabilities({"chat_template": (model_dirs["tools"] / "tokenizer_config.json").read_text()})


def test_show_prints_ollamas_parameter_names_only():
    from lmforge.serve.ollama_models import _parameters_text

    text = _parameters_text({"repetition_penalty": 1.1, "max_new_tokens": 9, "logit_bias": {5: 2.0},
                             "stop": ["a", "b"]}, 64)
    assert text.split("\n") == [f"{'repeat_penalty':<30} 1.1", f"{'num_predict':<30} 9", f"{'stop':<30} \"a\"",
                                 f"{'stop':<30} \"b\"", f"{'num_ctx':<30} 64"]


def test_durations_come_from_the_generations_timer():
    from types import SimpleNamespace

    from lmforge.serve.ollama_models import Clock

    clock = Clock(start=0, loaded=10)
    clock.token()  # an event-loop time, which the scheduler thread's times replace
    clock.timer = SimpleNamespace(spans=lambda: (1.0, 3.0, 7.5))
    stats = clock.stats(5, 4)
    assert stats["prompt_eval_duration"] == 2_000_000_000 and stats["eval_duration"] == 4_500_000_000


def test_describe_is_cached_until_the_model_changes(chat_model_dir, tmp_path, monkeypatch):
    import shutil

    from lmforge import store_info
    from lmforge.serve import ollama_models

    model = shutil.copytree(chat_model_dir, tmp_path / "m")
    calls = []
    real = store_info.show
    monkeypatch.setattr(store_info, "show", lambda p: calls.append(p) or real(p))
    first = ollama_models.describe(model)
    assert ollama_models.describe(model) == first and len(calls) == 1  # a poll re-reads nothing
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    ollama_models.describe(model)
    assert len(calls) == 2


def test_ps_lists_a_loaded_model_deleted_from_the_store(live_server, chat_model_dir):
    from lmforge import store

    store.add("gone", chat_model_dir)
    s = live_server(None)
    c = ollama.Client(host=s.base_url, timeout=60)
    c.generate(model="gone", prompt="the", options={"num_predict": 1}, keep_alive=-1)
    store.remove("gone")  # as a busy model deleted through /api/delete: still loaded until it is idle
    assert [m.model for m in c.ps().models] == ["gone"]
    assert "gone" not in [m.model for m in c.list().models]


def test_embed_shares_the_openai_routes_limits(server, client, monkeypatch):
    from lmforge.serve import embeddings

    monkeypatch.setattr(embeddings, "MAX_TOTAL_TOKENS", 10)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input=["the cat sat on the mat"] * 3)
    assert e.value.status_code == 400 and "in all" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input="the", dimensions=3)
    assert e.value.status_code == 400 and "dimensions" in e.value.error
