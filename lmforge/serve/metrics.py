"""`GET /metrics`: what the server is doing, in Prometheus' text format (through `prometheus-client`).

Three sources, each measured where it is cheapest and exact:
- HTTP requests, counted by `RequestCounter`, plain ASGI outside the guard, so refused requests (401, 403,
  413, 503 while draining) count too. The `route` label is the route's TEMPLATE (`/v1/models/{model_id}`),
  never the raw path, and the method is one of the HTTP verbs or "other": whatever clients send, the number
  of series stays bounded. A path no route serves is `route="unmatched"`.
- Tokens and latency, recorded by `stream.Generation` (every generating route, OpenAI's and Ollama's, runs
  its rows through one) via a `GenerationTimer`: prompt tokens as the usage objects count them (n > 1
  choices of one prompt count it once), completion tokens, the time to the first token of a request and the
  time between two tokens of one sequence. Times are taken on the scheduler thread when a token is emitted,
  not when the event loop gets round to sending it, and they start when the rows are submitted to the
  scheduler (after tokenizing: queueing and prefill are in, template rendering is not). Beam search and
  echo-only scoring run as scheduler jobs, not rows, and are not in these counters.
- The state of each loaded model (queue length, busy rows, KV-cache use, prefix-cache hits, memory), read
  from `ModelRegistry.snapshot()` when Prometheus scrapes (`_LoadedModels`, a custom collector): nothing
  is pushed, and a model that unloads simply disappears from the next scrape.

Every app has its own `CollectorRegistry` (never prometheus_client's global one), so two servers in one
process (the tests) keep separate counts. `/metrics` sits behind the same guard as the API: the API key
when one is set, and no cross-site callers (a page elsewhere cannot make the browser fetch it; Prometheus,
like every non-browser client, sends no Origin and is unaffected).

How `Generation` finds its app's metrics without every route passing them: `RequestCounter` puts them in a
context variable for the request's task (`current()`); a Generation made outside a served request (a unit
test) finds none and records nothing.
"""

from __future__ import annotations

import contextvars
import re
import time
from typing import Any, Iterable

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from starlette.routing import Match

# 1 ms to a minute: a token on a GPU takes a few ms, a first token on a CPU behind a long prompt tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

_current: contextvars.ContextVar["Metrics | None"] = contextvars.ContextVar("lmforge_metrics", default=None)


def current() -> "Metrics | None":
    """The metrics of the app serving the request this code runs for (None outside one)."""
    return _current.get()


class Metrics:
    """One app's metrics: its own registry, the counters and histograms the request path updates, and the
    collector that reads the loaded models at scrape time."""

    def __init__(self, models: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of generation requests (as in usage)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds",
                              "Seconds from a request's rows reaching the scheduler to its first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds",
                              "Seconds between two consecutive tokens of one sequence", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        r.register(_LoadedModels(models))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) in the format the scraper's Accept header asks for: Prometheus' text
        format, or OpenMetrics when asked (prometheus_client's own negotiation)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def timer(self, model: str, prompts: list[list[int]]) -> "GenerationTimer":
        return GenerationTimer(self, model, prompts)


class GenerationTimer:
    """The metrics of one `Generation`: made just before its rows are submitted, `submitted()` once they all
    are, `token(row)` for every token emitted (always on the scheduler thread, so no lock is needed here; prometheus_client locks its own)."""

    def __init__(self, metrics: Metrics, model: str, prompts: list[list[int]]) -> None:
        self.start = time.monotonic()
        self.last: list[float | None] = [None] * len(prompts)
        self.first_seen = False
        self.first: float | None = None  # the request's first token, and its latest one (any row)
        self.latest: float | None = None
        self.ttft = metrics.ttft.labels(model)
        self.tpot = metrics.tpot.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        # Rows repeating the previous row's prompt list are the n > 1 choices of one prompt: usage counts it once.
        self.n_prompt = sum(len(p) for i, p in enumerate(prompts) if i == 0 or p is not prompts[i - 1])

    def submitted(self) -> None:
        self.prompt_tokens.inc(self.n_prompt)

    def token(self, row: int) -> None:
        now = time.monotonic()
        self.completion_tokens.inc()
        last = self.last[row]
        if last is not None:
            self.tpot.observe(now - last)
        elif not self.first_seen:
            self.first_seen = True
            self.first = now
            self.ttft.observe(now - self.start)
        self.last[row] = now
        self.latest = now

    def spans(self) -> tuple[float, float | None, float | None]:
        """(rows submitted, first token, latest token) in `time.monotonic()` seconds, as timed on the scheduler
        thread: what Ollama's prompt_eval_duration and eval_duration are read from, so they agree with the
        histograms here rather than include the event loop's lag."""
        return self.start, self.first, self.latest


class _LoadedModels:
    """Gauges (and the scheduler's own counters) of every loaded model, read when Prometheus scrapes.
    The prompt-cache figures come from the scheduler when it keeps them (`prompt_tokens_total`,
    `cached_tokens_total`, `kv_tokens_used`); a scheduler without them reports none rather than zeros."""

    def __init__(self, models: Any) -> None:
        self.models = models

    def describe(self) -> Iterable:
        return []  # families appear and go with models: nothing to check names against at registration

    def collect(self) -> Iterable:
        loaded = self.models.snapshot()
        count = GaugeMetricFamily("lmforge_models_loaded", "Models loaded now")
        count.add_metric([], len(loaded))
        yield count

        def family(kind: type, name: str, doc: str) -> Any:
            return kind(name, doc, labels=["model"])

        memory = family(GaugeMetricFamily, "lmforge_model_memory_bytes",
                        "Memory counted for a loaded model before it loaded (weights, KV cache, runtime)")
        active = family(GaugeMetricFamily, "lmforge_model_requests_active", "Requests using the model now")
        queued = family(GaugeMetricFamily, "lmforge_queue_length", "Sequences waiting for a scheduler row")
        busy = family(GaugeMetricFamily, "lmforge_busy_rows", "Scheduler rows generating now")
        rows = family(GaugeMetricFamily, "lmforge_max_rows", "Scheduler rows (sequences decoded at once)")
        kv_used = family(GaugeMetricFamily, "lmforge_kv_cache_tokens", "KV-cache positions holding tokens")
        kv_frac = family(GaugeMetricFamily, "lmforge_kv_cache_usage_ratio",
                         "Fraction of the KV cache holding tokens (rows x context length)")
        prompt = family(CounterMetricFamily, "lmforge_scheduler_prompt_tokens",
                        "Prompt tokens admitted by the scheduler, cached or not (as usage counts: "
                        "the n copies of one prompt once), since the model loaded")
        cached = family(CounterMetricFamily, "lmforge_prefix_cache_hit_tokens",
                        "Prompt tokens reused from earlier requests' cache rows instead of prefilled, "
                        "since the model loaded")
        hit = family(GaugeMetricFamily, "lmforge_prefix_cache_hit_ratio",
                     "Cached / prompt tokens since the model loaded (use the two counters for a rate)")
        for s in loaded:
            if s.footprint is not None:
                memory.add_metric([s.name], s.footprint.total)
            active.add_metric([s.name], s.active)
            if s.embedding_only:
                continue
            sched = s.scheduler
            queued.add_metric([s.name], sched.queued)
            busy.add_metric([s.name], sched.busy)
            rows.add_metric([s.name], sched.max_batch)
            used = getattr(sched, "kv_tokens_used", None)
            if used is not None:
                kv_used.add_metric([s.name], used)
                kv_frac.add_metric([s.name], used / max(1, sched.max_batch * sched.context_length))
            n_prompt = getattr(sched, "prompt_tokens_total", None)
            n_cached = getattr(sched, "cached_tokens_total", None)
            if n_prompt is not None and n_cached is not None:
                prompt.add_metric([s.name], n_prompt)
                cached.add_metric([s.name], n_cached)
                hit.add_metric([s.name], n_cached / n_prompt if n_prompt else 0.0)
        yield from (memory, active, queued, busy, rows, kv_used, kv_frac, prompt, cached, hit)


# ----------------------------------------------------------------------------------------------------
# Requests by route template and status: plain ASGI around the guarded app
# ----------------------------------------------------------------------------------------------------
def route_template(path: str) -> str:
    """'/v1/models/{model_id:path}' -> '/v1/models/{model_id}': the label without Starlette's converters."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


class RequestCounter:
    """Counts every HTTP request once its response has been sent (a stream: once it ends), by route
    template, method and status, and makes the app's `Metrics` `current()` for the request's task."""

    def __init__(self, inner: Any, app: Any, metrics: Metrics) -> None:
        self.inner, self.app, self.metrics = inner, app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        status: int | None = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _current.set(self.metrics)
        try:
            await self.inner(scope, receive, send_counted)
        except BaseException:
            status = status or 500
            raise
        finally:
            _current.reset(token)
            method = scope.get("method", "")
            # no response at all: the client left before one started (nginx's 499, as our own client_closed)
            self.metrics.requests.labels(self._route(scope), method if method in METHODS else "other",
                                         str(status or 499)).inc()

    def _route(self, scope) -> str:
        """The template of the route that served (or would have served) the request: Starlette's router
        records it in the scope; a request the guard refused before routing is matched here."""
        route = scope.get("route")
        if route is None:
            probe = {"type": "http", "path": scope.get("path", ""), "method": scope.get("method", ""),
                     "root_path": scope.get("root_path", "")}
            for r in self.app.router.routes:
                match, _ = r.matches(probe)
                if match is Match.FULL:
                    route = r
                    break
                if match is Match.PARTIAL and route is None:
                    route = r
        path = getattr(route, "path", None)
        return route_template(path) if path else "unmatched"


async def metrics_endpoint(request: Request):
    body, content_type = request.app.state.metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
