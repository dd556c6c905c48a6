"""Serving under load: continuous batching against one request at a time, over real HTTP streams.

    python bench/serve_load.py                  # 32 clients, the "15M" shape (a few minutes on 2 cores)
    python bench/serve_load.py --quick          # 8 clients, short answers: a smoke run (well under a minute)
    python bench/serve_load.py --shared-prefix  # 32 clients, one 400-token system prompt: prompt cache on/off

A random-weight model of the `llama-15m` preset (llama2.c stories15M's shape: d_model 288, 6 layers, 6 heads,
context 256, vocab 32000, tied embeddings) is saved as a model directory with a byte-level BPE trained on
`--text` (tinyshakespeare). That BPE has fewer than 32000 tokens, so the embedding keeps its 32000 rows (the
15M shape and its per-token cost) and the rows past the tokenizer are zeroed: their logit is 0, far below the
top logit, so greedy decoding never picks them. The other weight matrices are scaled up (`--weight-scale`),
which makes the random model's greedy text depend on its prompt instead of repeating the prompt's last token.

`lmforge serve`'s app is started in this process on 127.0.0.1 (an ephemeral port) and spoken to over HTTP
with httpx, as any OpenAI client would (POST /v1/completions, stream=true, temperature 0, ignore_eos, each
client with its own prompt -- 1 to 4 lines of the text -- and its own max_tokens, 16..128):
  - batched: all `--clients` streams at once against a scheduler of `--max-batch` rows: wall time, aggregate
    completion tokens/s, and time to first token (TTFT, from sending the request to its first token) p50/p99;
  - one at a time: the same requests, one after another, on the same server: the same numbers;
  - correctness: every batched greedy output must equal the same request served alone (text and token count);
  - disconnects: `--disconnects` streams with long answers whose clients hang up after 0..5 tokens; then
    the scheduler must be empty (busy rows, queue, requests in flight all 0) within `--free-timeout` s, and
    the server must still answer.
The scheduler's prompt cache is off in these phases (the one-at-a-time phase repeats the batched prompts).
With `--shared-prefix` it runs one other scenario instead (on a model of the same shape with a 1024-token
context): `--clients` streams at once whose prompts are one ~`--prefix-tokens` system prompt (the start of
the text) + a question of their own (a line), 16 tokens each, first with the scheduler's prompt cache on,
then off (`Scheduler.set_prefix_cache`); a request with the system prompt goes first each time, as on a
server that has seen it before. It reports TTFT mean/p50/p90 and tokens/s for both and their ratios, and
fails (exit 1) when an answer differs between the two.

The speedup (batched / one-at-a-time tokens/s) is reported against the target (>= 3x), never asserted:
other load on the machine moves it. The exit status is 1 when any request failed, any batched output
differs from its solo run, or the disconnect test left work behind; so the bench doubles as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.train.checkpointer import Checkpointer  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.presets import get_preset  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

MODEL = "bench"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SPEEDUP_TARGET = 3.0


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
def build_model(directory: Path, preset: str, text: str, *, seed: int, weight_scale: float,
                context_length: int | None = None) -> tuple[Path, dict]:
    """Save a seeded random `preset` model with a BPE trained on `text` into `directory` (with a longer
    context than the preset's when `context_length` says so: long shared prompts need one)."""
    cfg = get_preset(preset, **({"context_length": context_length} if context_length else {}))
    t0 = time.perf_counter()
    # min_frequency 1: as many merges as the text allows (tinyshakespeare: ~22k tokens, not 32000).
    tok = train_tokenizer(text.split("\n\n"), cfg.vocab_size, min_frequency=1, show_progress=False)
    tok_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "tok_emb.weight":
                p.mul_(weight_scale)
        model.tok_emb.weight[tok.vocab_size:].zero_()  # padded rows: logit 0, never the greedy choice
    Checkpointer(directory, tokenizer=tok).save(model, None, [], {"step": 0})
    info = {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size,
            "tokenizer_vocab": tok.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "context_length": cfg.context_length, "tokenizer_train_s": tok_s}
    return directory, {"info": info, "tokenizer": tok}


# ----------------------------------------------------------------------------------------------------
# The server (what tests/serve/conftest.py does, without depending on the tests)
# ----------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model_dir: Path, *, max_batch: int, max_queue: int) -> None:
        from lmforge.serve.app import ServerOptions
        from lmforge.serve.models import ModelRegistry
        from lmforge.serve.server import build_server

        self.registry = ModelRegistry({MODEL: model_dir}, device="cpu", max_batch=max_batch, max_queue=max_queue,
                                      keep_alive=3600.0)
        self.server = build_server(self.registry, ServerOptions(), host="127.0.0.1", port=0, grace=10.0)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), name="bench-server",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def scheduler(self):
        return self.registry.loaded[MODEL].scheduler

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.registry.stop()


# ----------------------------------------------------------------------------------------------------
# The clients
# ----------------------------------------------------------------------------------------------------
@dataclass
class Job:
    prompt: str
    max_tokens: int
    prompt_tokens: int


@dataclass
class Result:
    text: str = ""
    tokens: int = 0  # token events received (chunks with a choice)
    usage_tokens: int | None = None  # completion_tokens of the final usage chunk
    finish_reason: str | None = None
    ttft: float | None = None  # seconds from sending the request to the first token
    total: float = 0.0
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)


def make_jobs(tok, text: str, n: int, *, min_tokens: int, max_tokens: int, context: int, seed: int) -> list[Job]:
    """`n` requests with different prompts (1-4 consecutive lines of `text`) and answer lengths."""
    rng = random.Random(seed)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 8]
    budgets = [min_tokens + round(i * (max_tokens - min_tokens) / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(budgets)
    jobs = []
    for i in range(n):
        start = (i * 997 + 13) % (len(lines) - 4)
        prompt = " ".join(lines[start:start + 1 + i % 4])
        n_prompt = len(tok.encode(prompt))
        jobs.append(Job(prompt, max(1, min(budgets[i], context - n_prompt - 1)), n_prompt))
    return jobs


def payload(job: Job, *, logprobs: bool) -> dict:
    body = {"model": MODEL, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if logprobs:
        body["logprobs"] = 0
    return body


async def stream_one(client, url: str, body: dict, *, hang_up_after: int | None = None) -> Result:
    """One streaming completion; with `hang_up_after`, close the connection after that many tokens."""
    r = Result()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            if hang_up_after == 0:
                return r  # hang up right after the headers (the request is queued or running)
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"error in stream: {chunk['error']}"
                    break
                if chunk.get("usage"):
                    r.usage_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - t0
                    r.tokens += 1
                    r.text += c.get("text") or ""
                    if c.get("logprobs"):
                        r.logprobs.extend(c["logprobs"]["token_logprobs"])
                    if c.get("finish_reason"):
                        r.finish_reason = c["finish_reason"]
                if hang_up_after is not None and r.tokens >= hang_up_after:
                    return r  # leaving the `async with` closes this connection mid-stream
    except Exception as e:  # noqa: BLE001 -- a failed client is a result, not a crash of the bench
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.total = time.perf_counter() - t0
    return r


def _client(n: int):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=n + 4,
                                                                               max_keepalive_connections=n + 4))


async def run_batched(url: str, jobs: list[Job], logprobs: bool) -> tuple[list[Result], float]:
    async with _client(len(jobs)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, payload(j, logprobs=logprobs)) for j in jobs))
        return list(results), time.perf_counter() - t0


async def run_sequential(url: str, jobs: list[Job], logprobs: bool) -> tuple[list[Result], float]:
    async with _client(1) as client:
        t0 = time.perf_counter()
        results = [await stream_one(client, url, payload(j, logprobs=logprobs)) for j in jobs]
        return results, time.perf_counter() - t0


async def run_disconnects(url: str, jobs: list[Job]) -> list[Result]:
    """Every client on its own connection, hanging up after 0..5 tokens."""

    async def one(i: int, job: Job) -> Result:
        async with _client(1) as client:
            return await stream_one(client, url, payload(job, logprobs=False), hang_up_after=i % 6)

    return list(await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs))))


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(mode: str, results: list[Result], wall: float, steps: int) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {"mode": mode, "requests": len(results), "failed": len(results) - len(ok), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
            # a request's first token comes from its prefill, the others from decode steps
            "decode_steps": steps, "mean_rows_per_step": (tokens - len(ok)) / steps if steps else 0.0}


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def wait_free(server: Server, timeout: float) -> tuple[dict, float]:
    """Poll until the scheduler and the registry hold no work; returns what is left and the time taken."""
    sched, reg = server.scheduler, server.registry
    t0 = time.perf_counter()
    while True:
        left = {"busy": sched.busy, "queued": sched.queued, "in_flight": reg.in_flight}
        if not any(left.values()) or time.perf_counter() - t0 > timeout:
            return left, time.perf_counter() - t0
        await asyncio.sleep(0.01)


async def bench(args, server: Server, tok, text: str, context: int) -> dict:
    url = server.base_url
    # Warm-up: loads the model (lazily, on first use) and builds the matrix-vector kernel; not timed.
    warm = make_jobs(tok, text, 2, min_tokens=4, max_tokens=8, context=context, seed=args.seed + 1)
    async with _client(2) as client:
        for j in warm:
            r = await stream_one(client, url, payload(j, logprobs=False))
            if r.error:
                raise RuntimeError(f"warm-up request failed: {r.error}")
        await asyncio.gather(*(stream_one(client, url, payload(j, logprobs=False)) for j in warm))
    sched = server.scheduler
    # The one-at-a-time phase repeats the batched phase's prompts, which the prompt cache would hand it
    # ready-made: off here, so that both phases read their prompts (--shared-prefix measures the cache).
    await asyncio.to_thread(sched.set_prefix_cache, False)

    jobs = make_jobs(tok, text, args.clients, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                     context=context, seed=args.seed)

    s0 = sched.steps
    batched, wall_a = await run_batched(url, jobs, args.logprobs)
    a = summarize("batched", batched, wall_a, sched.steps - s0)
    left_a, _ = await wait_free(server, args.free_timeout)

    s0 = sched.steps
    solo, wall_b = await run_sequential(url, jobs, args.logprobs)
    b = summarize("one at a time", solo, wall_b, sched.steps - s0)

    mismatches = []
    for i, (x, y, job) in enumerate(zip(batched, solo, jobs)):
        problems = []
        for name, r in (("batched", x), ("alone", y)):
            if r.error:
                problems.append(f"{name} failed: {r.error}")
            elif r.tokens != job.max_tokens or r.usage_tokens != job.max_tokens or r.finish_reason != "length":
                problems.append(f"{name}: {r.tokens} tokens (usage {r.usage_tokens}, finish {r.finish_reason}), "
                                f"expected {job.max_tokens} and 'length'")
        if not problems and x.text != y.text:
            k = first_difference(x.text, y.text)
            problems.append(f"text differs at char {k}: batched {x.text[k:k + 20]!r} vs alone {y.text[k:k + 20]!r}")
        if problems:
            mismatches.append({"request": i, "prompt_tokens": job.prompt_tokens, "max_tokens": job.max_tokens,
                               "problems": problems})
    lp_diff = None
    if args.logprobs:
        diffs = [abs(p - q) for x, y in zip(batched, solo) for p, q in zip(x.logprobs, y.logprobs)
                 if p is not None and q is not None]
        lp_diff = max(diffs) if diffs else None

    # Disconnects: long answers, every client hangs up early.
    djobs = make_jobs(tok, text, args.disconnects, min_tokens=10**6, max_tokens=10**6, context=context,
                      seed=args.seed + 2)
    peak = [0]

    async def watch() -> None:  # the rows really were busy when the clients hung up
        while True:
            peak[0] = max(peak[0], sched.busy)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    dres = await run_disconnects(url, djobs)
    hung_up = time.perf_counter() - t0
    watcher.cancel()
    left, free_s = await wait_free(server, args.free_timeout)
    derr = [r.error for r in dres if r.error]
    async with _client(1) as client:  # the server still serves afterwards
        after = await stream_one(client, url, payload(jobs[0], logprobs=False))
    disconnect = {"clients": args.disconnects, "tokens_before_hang_up": [r.tokens for r in dres],
                  "client_errors": derr, "hang_up_s": hung_up, "peak_busy": peak[0], "left": left, "freed_in_s": free_s,
                  "server_answers_after": after.error is None and after.text == solo[0].text,
                  "steps_total": sched.steps}
    disconnect["ok"] = not any(left.values()) and not derr and disconnect["server_answers_after"]

    speedup = a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else float("nan")
    return {"phases": [a, b], "speedup": speedup, "speedup_target": SPEEDUP_TARGET,
            "matches": args.clients - len(mismatches), "mismatches": mismatches, "max_logprob_diff": lp_diff,
            # how many different answers the prompts gave: the equality check means little if all are alike
            "distinct_outputs": len({r.text for r in solo}),
            "left_after_batched": left_a, "disconnect": disconnect,
            "requests": [{**asdict(j), "batched_ttft_ms": x.ttft and x.ttft * 1e3,
                          "alone_ttft_ms": y.ttft and y.ttft * 1e3, "text": y.text}
                         for j, x, y in zip(jobs, batched, solo)]}


async def bench_shared_prefix(args, server: Server, tok, text: str) -> dict:
    """The `--shared-prefix` scenario (see the module docstring)."""
    url, sched = server.base_url, None
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 8]
    system, k = "", 0
    while len(tok.encode(system)) < args.prefix_tokens:
        system += lines[k] + "\n"
        k += 1
    questions = [lines[k + 50 + 13 * i] for i in range(args.clients + 1)]
    jobs = [Job(system + "QUESTION: " + q, args.shared_tokens, len(tok.encode(system + "QUESTION: " + q)))
            for q in questions]
    warm, jobs = jobs[0], jobs[1:]
    out = {"system_tokens": len(tok.encode(system)), "prompt_tokens": sum(j.prompt_tokens for j in jobs),
           "modes": {}}
    async with _client(2) as client:  # loads the model (not timed)
        await stream_one(client, url, payload(warm, logprobs=False))
    sched = server.scheduler
    for on in (True, False):
        await asyncio.to_thread(sched.set_prefix_cache, on)
        async with _client(2) as client:  # the system prompt has been seen before (a no-op with the cache off)
            r = await stream_one(client, url, payload(warm, logprobs=False))
            if r.error:
                raise RuntimeError(f"warm-up request failed: {r.error}")
        c0, p0 = sched.cached_tokens_total, sched.prompt_tokens_total
        results, wall = await run_batched(url, jobs, False)
        ok = [r for r in results if r.error is None]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        out["modes"]["on" if on else "off"] = {
            "failed": len(results) - len(ok), "wall_s": wall, "tokens": sum(r.tokens for r in ok),
            "tokens_per_s": sum(r.tokens for r in ok) / wall, "ttft_mean_ms": statistics.fmean(ttfts) * 1e3,
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p90_ms": percentile(ttfts, 90) * 1e3,
            "cached_tokens": sched.cached_tokens_total - c0, "prompt_tokens": sched.prompt_tokens_total - p0,
            "texts": [r.text for r in results]}
        await wait_free(server, args.free_timeout)
    await asyncio.to_thread(sched.set_prefix_cache, True)
    on, off = out["modes"]["on"], out["modes"]["off"]
    out["differ"] = [i for i, (a, b) in enumerate(zip(on["texts"], off["texts"])) if a != b]
    out["ok"] = not on["failed"] and not off["failed"] and not out["differ"]
    return out


def report_shared_prefix(args, res: dict) -> bool:
    print(f"{args.clients} streaming clients at once, one {res['system_tokens']}-token system prompt + a question "
          f"each ({res['prompt_tokens']:,} prompt tokens in all), {args.shared_tokens} tokens each, greedy\n")
    print("| prompt cache | cached prompt tokens | wall s | tokens/s | TTFT mean ms | TTFT p50 ms | TTFT p90 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, m in res["modes"].items():
        failed = f" ({m['failed']} failed)" if m["failed"] else ""
        print(f"| {name}{failed} | {m['cached_tokens']:,} / {m['prompt_tokens']:,} | {m['wall_s']:.2f} | "
              f"{m['tokens_per_s']:,.0f} | {m['ttft_mean_ms']:,.0f} | {m['ttft_p50_ms']:,.0f} | "
              f"{m['ttft_p90_ms']:,.0f} |")
    on, off = res["modes"]["on"], res["modes"]["off"]
    print(f"\ncache on / off: TTFT mean {off['ttft_mean_ms'] / on['ttft_mean_ms']:.1f}x lower, p90 "
          f"{off['ttft_p90_ms'] / on['ttft_p90_ms']:.1f}x lower; "
          f"throughput {on['tokens_per_s'] / off['tokens_per_s']:.1f}x")
    print(f"answers identical with and without the cache: "
          f"{'yes' if not res['differ'] else 'NO, requests ' + str(res['differ'])}")
    print(f"\n{'PASS' if res['ok'] else 'FAIL'}")
    return res["ok"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    ap.add_argument("--max-batch", type=int, default=32, help="scheduler rows (default: 32)")
    ap.add_argument("--max-queue", type=int, default=64, help="scheduler queue limit (default: 64)")
    ap.add_argument("--disconnects", type=int, default=20, help="clients in the disconnect test (default: 20)")
    ap.add_argument("--min-tokens", type=int, default=16, help="shortest max_tokens of a client (default: 16)")
    ap.add_argument("--max-tokens", type=int, default=128, help="longest max_tokens of a client (default: 128)")
    ap.add_argument("--preset", default="llama-15m", help="model shape (default: llama-15m)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                    help=f"text for the tokenizer and the prompts (default: {DEFAULT_TEXT})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--weight-scale", type=float, default=3.0,
                    help="scale of the random non-embedding matrices; >1 makes greedy text prompt-dependent "
                         "(default: 3.0)")
    ap.add_argument("--seed", type=int, default=0, help="weights and request mix (default: 0)")
    ap.add_argument("--free-timeout", type=float, default=10.0,
                    help="seconds to wait for the scheduler to empty after the hang-ups (default: 10)")
    ap.add_argument("--logprobs", action="store_true",
                    help="also request each token's logprob and report the largest batched/alone difference "
                         "(adds per-row work to both modes)")
    ap.add_argument("--quick", action="store_true",
                    help="8 clients, max_batch 8, 8..32 tokens, 6 disconnects: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="run the shared-system-prompt scenario (prompt cache on vs off) instead")
    ap.add_argument("--prefix-tokens", type=int, default=400, help="its system prompt's length (default: 400)")
    ap.add_argument("--shared-tokens", type=int, default=16, help="its answers' length (default: 16)")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.disconnects, args.min_tokens, args.max_tokens = 8, 6, 8, 32
        args.max_batch = min(args.max_batch, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_queue < args.clients:
        ap.error("--max-queue must be >= --clients")
    if not args.text.is_file():
        ap.error(f"no text file {args.text} (give one with --text)")
    text = args.text.read_text(encoding="utf-8")

    if args.shared_prefix:
        return shared_prefix_main(args, text)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built = build_model(Path(tmp) / "model", args.preset, text, seed=args.seed,
                                       weight_scale=args.weight_scale)
        info, tok = built["info"], built["tokenizer"]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}: "
              f"{info['params'] / 1e6:.2f}M params (d_model {info['d_model']}, {info['n_layers']} layers, "
              f"context {info['context_length']}, vocab {info['vocab_size']}: {info['tokenizer_vocab']} BPE tokens "
              f"+ {info['vocab_size'] - info['tokenizer_vocab']} zeroed rows)")
        print(f"{args.clients} streaming clients, prompts of 1-4 lines, "
              f"max_tokens {args.min_tokens}..{args.max_tokens}, greedy, ignore_eos; "
              f"scheduler max_batch {args.max_batch}\n", flush=True)
        server = Server(model_dir, max_batch=args.max_batch, max_queue=args.max_queue)
        try:
            res = asyncio.run(bench(args, server, tok, text, info["context_length"]))
        finally:
            server.stop()

    print("| mode | requests | completion tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | rows/step |")
    print("|---|---|---|---|---|---|---|---|")
    for p in res["phases"]:
        failed = f" ({p['failed']} failed)" if p["failed"] else ""
        print(f"| {p['mode']} | {p['requests']}{failed} | {p['completion_tokens']:,} | {p['wall_s']:.1f} | "
              f"{p['tokens_per_s']:,.0f} | {p['ttft_p50_ms']:,.0f} | {p['ttft_p99_ms']:,.0f} | "
              f"{p['mean_rows_per_step']:.1f} |")
    sp = res["speedup"]
    print(f"\nspeedup batched / one at a time: {sp:.2f}x (target >= {SPEEDUP_TARGET:.0f}x: "
          f"{'met' if sp >= SPEEDUP_TARGET else 'NOT met'})")
    print(f"greedy outputs equal to the request served alone: {res['matches']}/{args.clients} "
          f"({res['distinct_outputs']} distinct outputs)")
    for m in res["mismatches"]:
        print(f"  request {m['request']} ({m['prompt_tokens']} prompt tokens, max_tokens {m['max_tokens']}): "
              + "; ".join(m["problems"]))
    if res["max_logprob_diff"] is not None:
        print(f"largest |logprob(batched) - logprob(alone)| of a chosen token: {res['max_logprob_diff']:.2e}")
    d = res["disconnect"]
    print(f"disconnects: {d['clients']} clients hung up after {min(d['tokens_before_hang_up'])}.."
          f"{max(d['tokens_before_hang_up'])} tokens (up to {d['peak_busy']} rows busy); "
          f"left {d['freed_in_s'] * 1e3:.0f} ms later: "
          f"{d['left']['busy']} busy rows, {d['left']['queued']} queued, {d['left']['in_flight']} in flight; "
          f"server answers afterwards: {'yes' if d['server_answers_after'] else 'NO'}"
          + (f"; client errors: {d['client_errors']}" if d["client_errors"] else ""))
    if any(res["left_after_batched"].values()):
        print(f"work left after the batched phase: {res['left_after_batched']}")
    ok = (not res["mismatches"] and d["ok"] and not any(p["failed"] for p in res["phases"])
          and not any(res["left_after_batched"].values()))
    print(f"\n{'PASS' if ok else 'FAIL'}")

    if args.json:
        out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(), "model": info, **res, "ok": ok}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


def shared_prefix_main(args, text: str) -> int:
    context = max(1024, args.prefix_tokens + 256)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built = build_model(Path(tmp) / "model", args.preset, text, seed=args.seed,
                                       weight_scale=args.weight_scale, context_length=context)
        info = built["info"]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} shape with context "
              f"{context}: {info['params'] / 1e6:.2f}M params; scheduler max_batch {args.max_batch}", flush=True)
        server = Server(model_dir, max_batch=args.max_batch, max_queue=args.max_queue)
        try:
            res = asyncio.run(bench_shared_prefix(args, server, built["tokenizer"], text))
        finally:
            server.stop()
    ok = report_shared_prefix(args, res)
    if args.json:
        args.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}, **res}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
