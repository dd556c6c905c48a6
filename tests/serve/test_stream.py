"""The bridge between the event loop and the work: CPU work off the loop, one cap on sequences, and jobs
that stop when their client leaves (issue 13, findings 4 and 5). Against live servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.live import wait_until

MSG = [{"role": "user", "content": "the model reads"}]


def test_tokenizing_a_flood_of_big_prompts_leaves_the_server_answering(chat_model_dir, live_server):
    """Four concurrent 1 MB /tokenize requests used to hold the event loop (/health: 6 ms -> 5.75 s). The
    tokenizing now runs on the worker pool: /health answers while they are still being tokenized."""
    s = live_server({"tiny": chat_model_dir}, max_body=2 << 20)
    text = ("the model reads the next word. " * 40000)[:1_000_000]
    assert httpx.post(s.base_url + "/tokenize", json={"model": "tiny", "prompt": "x"}, timeout=300).status_code == 200
    done: list[float] = []

    def flood():
        r = httpx.post(s.base_url + "/tokenize", json={"model": "tiny", "prompt": text}, timeout=300)
        assert r.status_code == 200 and r.json()["count"] > 100_000
        done.append(time.monotonic())

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    pool = s.server.app.state.cpu
    assert wait_until(lambda: pool.waiting >= 2, timeout=60)  # the tokenizing has started
    r = httpx.get(s.base_url + "/health", timeout=60)
    answered = time.monotonic()
    for t in threads:
        t.join(300)
    assert r.json()["status"] == "ok" and len(done) == 4
    assert answered < min(done)  # /health did not wait for any of them


def test_too_many_echoed_prompts_are_refused_by_the_one_cap(chat_model_dir, live_server):
    """echo + max_tokens 0 took 20,000 prompts from a 160 KB body (24.5 s of scheduler time)."""
    s = live_server({"tiny": chat_model_dir}, max_batch=2, max_queue=4)
    prompts = [[5, 6, 7]] * 7
    r = httpx.post(s.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "7 sequences" in r.text
    r = httpx.post(s.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompts[:6], "echo": True, "max_tokens": 0, "logprobs": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 6


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": [[5, 6, 7]] * 2, "best_of": 4, "n": 1}),  # 2 prompts x 4 beams = 8
    ("/v1/chat/completions", {"messages": MSG, "best_of": 8, "n": 1}),  # 8 beams
])
def test_beams_count_against_the_one_cap(chat_model_dir, live_server, route, body):
    """5 prompts x 16 beams returned 80 choices with no cap; beams are sequences like any other."""
    s = live_server({"tiny": chat_model_dir}, max_batch=2, max_queue=4)
    r = httpx.post(s.base_url + route, timeout=60, json={"model": "tiny", "use_beam_search": True, "temperature": 0,
                                                          "max_tokens": 4, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of" and "8 sequences" in r.text, r.text


def test_an_abandoned_beam_search_stops(chat_model_dir, live_server, monkeypatch):
    """An abandoned beam request kept the model ~27 s after its client left; now the search is told to
    stop at its next step. The search here is a stand-in that takes 20 s unless stopped."""
    from lmforge.engine.beam import Cancelled
    from lmforge.engine.generate import Engine

    outcome: list[str] = []

    def slow_beam_search(self, prompt, params, n_best=1, should_stop=None):
        for _ in range(400):
            if should_stop is not None and should_stop():
                outcome.append("stopped")
                raise Cancelled("stopped")
            time.sleep(0.05)
        outcome.append("ran to the end")
        return []

    monkeypatch.setattr(Engine, "beam_search", slow_beam_search)
    s = live_server({"tiny": chat_model_dir})
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second
        httpx.post(s.base_url + "/v1/chat/completions", timeout=1.0,
                   json={"model": "tiny", "messages": MSG, "use_beam_search": True, "best_of": 2, "temperature": 0})
    assert wait_until(lambda: outcome, timeout=15) and outcome == ["stopped"]
    served = s.registry.snapshot()[0]
    assert wait_until(lambda: served.scheduler.idle, timeout=10)


def test_engine_jobs_stop_when_asked(chat_model_dir):
    from conftest import load_engine
    from lmforge.engine.beam import Cancelled
    from lmforge.engine.sampling import SamplingParams

    engine = load_engine(chat_model_dir)
    with pytest.raises(Cancelled):
        engine.beam_search([5, 6], SamplingParams(temperature=0, num_beams=2, max_new_tokens=8), should_stop=lambda: True)
    with pytest.raises(Cancelled):
        engine.score_ids([5, 6, 7], should_stop=lambda: True)
    assert len(engine.score_ids([5, 6, 7], should_stop=lambda: False).logprobs) == 2


def test_a_template_that_would_loop_forever_neither_freezes_the_server_nor_answers(tmp_path, chat_model_dir,
                                                                                  live_server):
    """A model whose chat template nests range(100000) loops used to freeze /health and chat to *another*
    model (rendered on the event loop, unbounded). Now the render stops at its step limit with a 400, on a
    worker thread, and the other model and /health answer meanwhile."""
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(chat_model_dir, hostile)
    (hostile / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    s = live_server({"tiny": chat_model_dir, "hostile": hostile})
    results: dict[str, httpx.Response] = {}

    def ask_hostile():
        results["hostile"] = httpx.post(s.base_url + "/v1/chat/completions", timeout=120,
                                        json={"model": "hostile", "messages": MSG, "max_tokens": 2})

    t = threading.Thread(target=ask_hostile)
    t.start()
    other = httpx.post(s.base_url + "/v1/chat/completions", timeout=120,
                       json={"model": "tiny", "messages": MSG, "max_tokens": 2})
    health = httpx.get(s.base_url + "/health", timeout=120)
    t.join(120)
    assert other.status_code == 200 and health.status_code == 200
    r = results["hostile"]
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"], r.text
