"""The OpenAI-compatible API, spoken to by the official `openai` client against a live server."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.serve.live import start_server, wait_until  # noqa: E402

MSG = [{"role": "user", "content": "the model reads"}]


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = start_server({"tiny": chat_model_dir}, max_batch=4, max_queue=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="anything", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(chat_model_dir):
    from conftest import load_engine

    return load_engine(chat_model_dir)


def greedy_alone(engine, messages, max_new_tokens):
    from lmforge.engine.sampling import SamplingParams

    ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    return engine.complete([ids], SamplingParams(temperature=0, max_new_tokens=max_new_tokens))[0]


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "lmforge"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.code == "model_not_found"


def test_chat_completion_matches_the_engine(client, engine):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    alone = greedy_alone(engine, MSG, 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == alone.text
    assert r.choices[0].finish_reason == alone.finish_reason
    assert r.usage.prompt_tokens == len(alone.prompt_ids)
    assert r.usage.completion_tokens == len(alone.ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_chunks_follow_the_openai_order(client, engine):
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason is not None and body[-1].choices[0].delta.content is None
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    alone = greedy_alone(engine, MSG, 12)
    assert text == alone.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_field(server):
    with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(ln[6:]) for ln in lines[:-1])
    assert r.headers["content-type"].startswith("text/event-stream")


def test_n_choices_sampled_with_a_seed_are_reproducible(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, n=3, seed=7)
    a = client.chat.completions.create(**{k: v for k, v in kw.items() if k not in ("top_k", "min_p")},
                                       extra_body={"top_k": 0, "min_p": 0.0})
    b = client.chat.completions.create(**{k: v for k, v in kw.items() if k not in ("top_k", "min_p")},
                                       extra_body={"top_k": 0, "min_p": 0.0})
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice has its own random stream
    assert a.usage.completion_tokens == sum(8 if c.finish_reason == "length" else 0 for c in a.choices) or \
        a.usage.completion_tokens > 0


def test_n_choices_stream_interleave_with_their_index(client):
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0, n=2, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and texts[0] == texts[1]  # greedy: both the same


def test_logprobs_are_the_models_and_match_the_stream(client, engine):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    alone = greedy_alone(engine, MSG, 6)
    assert [c.bytes for c in content] == [list(engine.tokenizer.token_bytes(i)) for i in alone.ids]
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)  # greedy picks the top token
        assert sum(pow(2.718281828, t.logprob) for t in c.top_logprobs) <= 1.0 + 1e-5
    streamed = [lp for ch in client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                                           logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert [s.logprob for s in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_stop_strings_cut_the_answer(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 4
    stop = full[3:5]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=0, stop=[stop, "zzz"],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=9, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_completions_with_strings_token_ids_and_echo(client, engine):
    prompts = ["the model", "a token reads"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = engine.complete(prompts, __import__("lmforge.engine.sampling", fromlist=["x"]).SamplingParams(
        temperature=0, max_new_tokens=4))
    assert [c.text for c in r.choices] == [alone[0].text, alone[0].text, alone[1].text, alone[1].text]
    ids = engine.tokenizer.encode("the model")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == alone[0].text
    echo = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith(engine.tokenizer.decode(ids))
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = engine.score_ids(ids)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(scored.logprobs, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_completion_stream_and_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt="the data", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 or chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_beam_search_extension(client, engine):
    from lmforge.engine.sampling import SamplingParams

    ids = engine.tokenizer.encode_chat(MSG, add_generation_prompt=True)
    plain = engine.beam_search(ids, SamplingParams(temperature=0, num_beams=3, max_new_tokens=6), n_best=2)
    stop = plain[0].text[2:4] or "e"  # a stop string inside the best beam's text: both sides must cut there
    for extra in ({}, {"stop": [stop]}):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, n=2,
                                           extra_body={"use_beam_search": True, "best_of": 3}, **extra)
        want = engine.beam_search(ids, SamplingParams(temperature=0, num_beams=3, max_new_tokens=6, **extra), n_best=2)
        assert [(c.message.content, c.finish_reason) for c in r.choices] == [(b.text, b.finish_reason) for b in want]
        assert r.usage.completion_tokens == sum(b.n_tokens for b in want)
    assert stop not in want[0].text and want[0].finish_reason == "stop"


def test_tokenizer_routes_for_lm_eval(server, engine):
    info = httpx.get(server.base_url + "/tokenizer_info").json()
    assert info["eos_token"] == engine.tokenizer.eos_token and "chat_template" in info
    toks = httpx.post(server.base_url + "/tokenize", json={"prompt": "the model", "add_special_tokens": False}).json()
    assert toks["tokens"] == engine.tokenizer.encode("the model", add_bos=False)
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": toks["tokens"]}).json()
    assert back["prompt"] == "the model"


def test_feedback_lands_as_training_data(server, monkeypatch, tmp_path):
    from lmforge.data.records import read_conversations, read_preferences

    monkeypatch.setattr(server.opts, "feedback_dir", tmp_path)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    r = httpx.post(server.base_url + "/v1/feedback", json={"model": "tiny", "messages": conv, "response": "5",
                                                            "rating": "down", "better": "4"})
    assert r.status_code == 200 and r.json()["saved"] == ["feedback.jsonl"]
    for body in ({"response": "4", "rating": "up"}, {"response": "5", "rating": "down"}):
        httpx.post(server.base_url + "/v1/feedback", json={"model": "tiny", "messages": conv, **body})
    assert len((tmp_path / "feedback.jsonl").read_text().splitlines()) == 3  # one line per feedback, once
    prefs = read_preferences(str(tmp_path / "feedback.jsonl"))  # the trainers read the one file as it is
    assert len(prefs.pairs) == 1 and prefs.pairs[0].chosen == "4" and prefs.pairs[0].rejected == "5"
    assert prefs.pairs[0].prompt == conv and [line for line, _ in prefs.problems] == [2, 3]
    sft = read_conversations(str(tmp_path / "feedback.jsonl"))
    assert [c[-1]["content"] for c in sft.conversations] == ["4", "4"]  # the better answer, the thumbed-up one
    assert [line for line, _ in sft.problems] == [3]  # a thumbs-down alone teaches nothing


def test_a_client_that_hangs_up_frees_its_slot(server, monkeypatch):
    import time

    httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    model = server.registry.loaded["tiny"].engine.model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # 100 tokens take seconds, so the request is surely still running
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    sched = None
    with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": MSG, "max_tokens": 100, "stream": True,
                            "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
        sched = server.registry.loaded["tiny"].scheduler
        assert sched.busy == 1
        steps = sched.steps
    wait_until(lambda: not (sched.busy or server.registry.in_flight))
    assert sched.busy == 0 and server.registry.in_flight == 0
    assert sched.steps - steps < 50  # it stopped soon after the client left, not after all 100 tokens


def test_concurrent_requests_share_decode_steps(server, engine):
    """8 greedy requests at once: every answer equals the request served alone, in fewer steps than tokens."""
    prompts = [[{"role": "user", "content": p}] for p in
               ("the model", "a token", "each layer learns", "the data", "our loss counts", "the cache writes",
                "a long sentence", "every byte")]
    sched = server.registry.loaded.get("tiny") or None
    before = server.registry.loaded["tiny"].scheduler.steps if sched else 0
    results = [None] * len(prompts)

    def ask(i):
        results[i] = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                                json={"model": "tiny", "messages": prompts[i], "max_tokens": 20, "temperature": 0,
                                      "ignore_eos": True}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = server.registry.loaded["tiny"].scheduler.steps - before
    for i, r in enumerate(results):
        assert r["choices"][0]["message"]["content"] == greedy_alone(engine, prompts[i], 20).text
    assert steps < 8 * 19  # batched: far fewer forward passes than tokens


def test_long_prompts_are_read_in_chunks_over_http(chat_model_dir, live_server, engine):
    """With --prefill-chunk 8, long chat prompts (an n = 2 request and a second one) are read in chunks
    beside a running stream; each answer and its logprobs equal the request served alone."""
    s = live_server({"tiny": chat_model_dir}, max_batch=4, prefill_chunk=8)
    long_msgs = [[{"role": "user", "content": "the model reads the next word and a token writes some text " * k}]
                 for k in (1, 2)]
    assert all(len(engine.tokenizer.encode_chat(m, add_generation_prompt=True)) > 24 for m in long_msgs)
    results = {}

    def ask(key, messages, n, max_tokens):
        results[key] = httpx.post(s.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": messages, "n": n, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "ignore_eos": True}).json()

    threads = [threading.Thread(target=ask, args=("short", MSG, 1, 40))]
    threads += [threading.Thread(target=ask, args=(i, m, 2 - i, 6)) for i, m in enumerate(long_msgs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, messages in [("short", MSG), (0, long_msgs[0]), (1, long_msgs[1])]:
        from lmforge.engine.sampling import SamplingParams

        ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        n_tok = 40 if key == "short" else 6
        ref = engine.complete([ids], SamplingParams(temperature=0, max_new_tokens=n_tok, ignore_eos=True, logprobs=0))[0]
        for choice in results[key]["choices"]:
            assert choice["message"]["content"] == ref.text, key
            got = [t["logprob"] for t in choice["logprobs"]["content"]]
            assert got == pytest.approx(ref.logprobs, abs=1e-4), key
    sched = s.registry.loaded["tiny"].scheduler
    wait_until(lambda: sched.busy == 0)
    assert sched.filling is None and sched.queued == 0


def test_queue_full_is_429_and_the_server_recovers(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, max_batch=1, max_queue=1)
    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # load it
    sched = s.registry.loaded["tiny"].scheduler
    release = threading.Event()
    sched.call(lambda: release.wait(30))  # hold the scheduler thread: what is submitted now stays queued
    waiting = threading.Thread(target=lambda: httpx.post(s.base_url + "/v1/chat/completions", timeout=60,
                                                         json={"model": "tiny", "messages": MSG, "max_tokens": 3}))
    waiting.start()
    wait_until(lambda: sched.queued >= 1)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)
        assert e.value.code == "queue_full" and e.value.response.headers.get("retry-after")
    finally:
        release.set()
    waiting.join(60)
    assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices[0].message is not None
    assert sched.busy == 0 and sched.queued == 0


def test_models_load_lazily_and_unload_when_idle(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, keep_alive=0.0)
    assert s.registry.loaded == {}
    httpx.post(s.base_url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 1})
    assert "tiny" in s.registry.loaded
    assert s.registry.unload_idle() == ["tiny"] and s.registry.loaded == {}
    assert httpx.get(s.base_url + "/health").json()["models_loaded"] == []


def test_the_whole_store_is_served_by_name(chat_model_dir, live_server):
    from lmforge.store import import_model

    import_model(chat_model_dir, "store-tiny")
    s = live_server(None)
    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["store-tiny"]
    assert c.chat.completions.create(model="store-tiny:latest", messages=MSG, max_tokens=2).model == "store-tiny:latest"
    with pytest.raises(openai.NotFoundError):  # a path is never a model id
        c.chat.completions.create(model=str(chat_model_dir), messages=MSG, max_tokens=2)


def test_a_model_that_does_not_fit_in_memory_is_refused_before_loading(chat_model_dir, live_server, monkeypatch):
    from lmforge.serve import models

    s = live_server({"tiny": chat_model_dir})
    monkeypatch.setattr(models, "available_memory", lambda: 1000)
    r = httpx.post(s.base_url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
    assert "GiB" in r.json()["error"]["message"] and s.registry.loaded == {}
    monkeypatch.setattr(models, "available_memory", lambda: None)
    r = httpx.post(s.base_url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 1})
    assert r.status_code == 200


def test_a_vanishing_temperature_decodes_greedily(client, engine):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=1e-300)
    assert r.choices[0].message.content == greedy_alone(engine, MSG, 6).text


def test_choice_i_of_a_seeded_request_is_the_request_with_seed_plus_i(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, extra_body={"top_k": 0, "min_p": 0.0})
    three = client.chat.completions.create(n=3, seed=40, **kw)
    singles = [client.chat.completions.create(n=1, seed=40 + i, **kw).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in three.choices] == singles
    prompts = ["the model", "a token"]
    two = client.completions.create(model="tiny", prompt=prompts, n=2, seed=5, max_tokens=6, temperature=1.0,
                                    extra_body={"top_k": 0, "min_p": 0.0})
    alone = [client.completions.create(model="tiny", prompt=p, n=1, seed=5 + i, max_tokens=6, temperature=1.0,
                                       extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text
             for p in prompts for i in range(2)]
    assert [c.text for c in two.choices] == alone


def test_echo_with_logprobs_0_keeps_every_list_aligned(client, engine):
    ids = engine.tokenizer.encode("the model reads")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, logprobs=0, echo=True)
    lp = r.choices[0].logprobs
    n = len(ids) + 2
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n


def test_streamed_completion_usage_counts_each_prompt_once(client, engine):
    chunks = list(client.completions.create(model="tiny", prompt="the model", max_tokens=3, n=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.prompt_tokens == len(engine.tokenizer.encode("the model"))
    assert chunks[-1].usage.completion_tokens == 6


def test_a_scheduler_that_stops_mid_answer_is_a_503_not_a_short_success(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir})
    httpx.post(s.base_url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 1})
    sched = s.registry.loaded["tiny"].scheduler
    release = threading.Event()
    sched.call(lambda: release.wait(30))
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        s.base_url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "the", "max_tokens": 5})))
    t.start()
    wait_until(lambda: sched.queued >= 1)
    threading.Thread(target=sched.stop).start()
    release.set()
    t.join(30)
    assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "shutting_down"
