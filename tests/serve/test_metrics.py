"""`GET /metrics`: scraped from a live server after known requests and parsed by prometheus_client's own
parser; every count is compared with what the requests sent and what their usage objects said."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.live import start_server

MSG = [{"role": "user", "content": "the model reads"}]


def scrape(base_url: str, **headers) -> dict[str, list]:
    """{family name: [(sample name, labels, value), ...]} of one scrape."""
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(r.text)}


def value(families: dict, sample: str, **labels) -> float | None:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    for name, got, v in families.get(family, []):
        if name == sample and got == labels:
            return v
    return None


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = start_server({"tiny": chat_model_dir}, max_batch=4, max_queue=8)
    yield s
    s.stop()


def _stream_usage(base_url: str, path: str, body: dict) -> dict:
    """The usage chunk of a streamed request (stream_options.include_usage)."""
    usage = None
    with httpx.stream("POST", base_url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
    assert usage is not None
    return usage


def test_counts_equal_what_was_sent(server):
    url = server.base_url
    usages = []
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 6,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200
    usages.append(r.json()["usage"])
    # n=2 choices of one prompt: usage counts the prompt once, and so must the metric
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "the model", "max_tokens": 5, "n": 2,
                                                  "temperature": 1.0, "seed": 3}, timeout=60)
    assert r.status_code == 200
    usages.append(r.json()["usage"])
    usages.append(_stream_usage(url, "/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 7,
                                                              "temperature": 0}))
    rows = 1 + 2 + 1
    assert httpx.get(url + "/v1/models/tiny").status_code == 200
    assert httpx.get(url + "/v1/models/no-such-model").status_code == 404
    assert httpx.get(url + "/no/such/route").status_code == 404

    m = scrape(url)
    req = "lmforge_requests_total"
    assert value(m, req, route="/v1/chat/completions", method="POST", status="200") == 2
    assert value(m, req, route="/v1/completions", method="POST", status="200") == 1
    # the route TEMPLATE, never the raw path: one series for every model id asked about
    assert value(m, req, route="/v1/models/{model_id}", method="GET", status="200") == 1
    assert value(m, req, route="/v1/models/{model_id}", method="GET", status="404") == 1
    assert value(m, req, route="unmatched", method="GET", status="404") == 1
    routes = {labels["route"] for name, labels, _ in m["lmforge_requests"] if name == req}
    assert not any("tiny" in r or "no-such" in r or "/no/" in r for r in routes), routes
    assert value(m, req, route="/metrics", method="GET", status="200") is None  # counted once answered

    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert value(m, "lmforge_prompt_tokens_total", model="tiny") == prompt
    assert value(m, "lmforge_completion_tokens_total", model="tiny") == completion
    # one first token per request; every later token of a sequence is one inter-token gap
    assert value(m, "lmforge_time_to_first_token_seconds_count", model="tiny") == 3
    assert value(m, "lmforge_time_to_first_token_seconds_sum", model="tiny") > 0
    assert value(m, "lmforge_time_per_output_token_seconds_count", model="tiny") == completion - rows
    assert value(m, "lmforge_time_to_first_token_seconds_bucket", model="tiny", le="+Inf") == 3
    assert value(m, "lmforge_time_to_first_token_seconds_bucket", model="tiny", le="0.001") is not None
    assert value(m, "lmforge_time_to_first_token_seconds_bucket", model="tiny", le="60.0") is not None

    # the loaded model's gauges, read at scrape time
    assert value(m, "lmforge_models_loaded") == 1
    assert value(m, "lmforge_queue_length", model="tiny") == 0
    assert value(m, "lmforge_busy_rows", model="tiny") == 0
    assert value(m, "lmforge_max_rows", model="tiny") == 4
    assert value(m, "lmforge_model_memory_bytes", model="tiny") > 0
    sched = server.registry.snapshot()[0].scheduler
    assert value(m, "lmforge_kv_cache_tokens", model="tiny") == sched.kv_tokens_used
    assert 0 <= value(m, "lmforge_kv_cache_usage_ratio", model="tiny") <= 1
    # the scheduler counts prompts as usage does (the n=2 copies once), and its hits are the usages' cached_tokens
    assert value(m, "lmforge_scheduler_prompt_tokens_total", model="tiny") == sched.prompt_tokens_total == prompt
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert value(m, "lmforge_prefix_cache_hit_tokens_total", model="tiny") == sched.cached_tokens_total == cached

    # the scrape itself is counted once it has been answered
    assert value(scrape(url), req, route="/metrics", method="GET", status="200") == 1
    # OpenMetrics for a scraper that asks for it
    r = httpx.get(url + "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")


def test_ollama_routes_counted_too(server):
    """Ollama's API runs its rows through the same Generation: its tokens land in the same counters."""
    url = server.base_url
    assert httpx.get(url + "/api/version").status_code == 200
    before = scrape(url)
    r = httpx.post(url + "/api/generate", json={"model": "tiny", "prompt": "the model", "stream": False,
                                                "options": {"num_predict": 4, "temperature": 0}}, timeout=60)
    assert r.status_code == 200, r.text
    done = [r.json()]
    with httpx.stream("POST", url + "/api/chat", json={"model": "tiny", "messages": MSG,
                                                       "options": {"num_predict": 5, "temperature": 0}},
                      timeout=60) as r:
        assert r.status_code == 200
        done += [json.loads(line) for line in r.iter_lines() if line.strip() and json.loads(line).get("done")]
    assert len(done) == 2
    after = scrape(url)

    def grew(sample: str, **labels) -> float:
        return (value(after, sample, **labels) or 0) - (value(before, sample, **labels) or 0)

    req = "lmforge_requests_total"
    assert grew(req, route="/api/generate", method="POST", status="200") == 1
    assert grew(req, route="/api/chat", method="POST", status="200") == 1
    assert grew("lmforge_prompt_tokens_total", model="tiny") == sum(d["prompt_eval_count"] for d in done)
    assert grew("lmforge_completion_tokens_total", model="tiny") == sum(d["eval_count"] for d in done)
    assert grew("lmforge_time_to_first_token_seconds_count", model="tiny") == 2


def test_metrics_behind_the_api_key_and_refusals_counted(chat_model_dir):
    s = start_server({"tiny": chat_model_dir}, max_batch=2, max_queue=2, api_key="sekrit")
    try:
        assert httpx.get(s.base_url + "/metrics").status_code == 401
        cross = httpx.get(s.base_url + "/metrics", headers={"authorization": "Bearer sekrit",
                                                            "sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"})
        assert cross.status_code == 403
        m = scrape(s.base_url, authorization="Bearer sekrit")
        req = "lmforge_requests_total"
        assert value(m, req, route="/metrics", method="GET", status="401") == 1
        assert value(m, req, route="/metrics", method="GET", status="403") == 1
        # a second app in the same process has its own registry: none of the other server's requests
        assert value(m, req, route="/v1/chat/completions", method="POST", status="200") is None
        assert value(m, "lmforge_models_loaded") == 0
    finally:
        s.stop()


def test_loaded_model_gauges_from_the_scheduler():
    """The collector reads the prompt-cache figures the scheduler keeps, and reports none it lacks."""
    from lmforge.serve.metrics import Metrics

    sched = SimpleNamespace(queued=3, busy=2, max_batch=4, context_length=100, kv_tokens_used=50,
                            prompt_tokens_total=400, cached_tokens_total=300)
    old = SimpleNamespace(queued=0, busy=1, max_batch=2, context_length=10)  # a scheduler without those figures
    served = [SimpleNamespace(name="a", scheduler=sched, footprint=SimpleNamespace(total=1234), active=1,
                              embedding_only=False),
              SimpleNamespace(name="b", scheduler=old, footprint=None, active=0, embedding_only=False),
              SimpleNamespace(name="enc", scheduler=None, footprint=None, active=0, embedding_only=True)]
    text = Metrics(SimpleNamespace(snapshot=lambda: served)).render()[0].decode()
    m = {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}
    assert value(m, "lmforge_models_loaded") == 3
    assert value(m, "lmforge_queue_length", model="a") == 3 and value(m, "lmforge_busy_rows", model="a") == 2
    assert value(m, "lmforge_kv_cache_tokens", model="a") == 50
    assert value(m, "lmforge_kv_cache_usage_ratio", model="a") == pytest.approx(50 / 400)
    assert value(m, "lmforge_prefix_cache_hit_ratio", model="a") == pytest.approx(0.75)
    assert value(m, "lmforge_scheduler_prompt_tokens_total", model="a") == 400
    assert value(m, "lmforge_prefix_cache_hit_tokens_total", model="a") == 300
    assert value(m, "lmforge_model_memory_bytes", model="a") == 1234
    assert value(m, "lmforge_busy_rows", model="b") == 1
    assert value(m, "lmforge_model_memory_bytes", model="b") is None  # never counted: not reported as 0
    assert value(m, "lmforge_kv_cache_tokens", model="b") is None  # unknown, not a made-up zero
    assert value(m, "lmforge_prefix_cache_hit_ratio", model="b") is None
    assert value(m, "lmforge_busy_rows", model="enc") is None  # an encoder has no scheduler rows
    assert value(m, "lmforge_model_requests_active", model="enc") == 0


def test_route_template():
    from lmforge.serve.metrics import route_template

    assert route_template("/v1/models/{model_id:path}") == "/v1/models/{model_id}"
    assert route_template("/vendor/{path:path}") == "/vendor/{path}"
    assert route_template("/static/{name}") == "/static/{name}"
