"""Prompt caching across the turns of a chat: time to first token per turn, with and without the cache.

    python bench/prompt_cache.py               # 10 turns, 3 repeats (about a minute on 2 cores)
    python bench/prompt_cache.py --repeats 1   # quicker
    python bench/prompt_cache.py --http        # the same chat against `lmforge serve`'s app, over HTTP

A chat re-sends the whole conversation every turn, so without a prompt cache turn k reads every earlier
turn again and its time to first token (TTFT) grows with the conversation; with the scheduler's prompt
cache (engine/scheduler.py) the previous turn's prompt and answer are still in its cache row and turn k
reads only its new message. Measured on the `Scheduler` directly (no HTTP), on a random-weight model of
the `llama-15m` shape with a 1024-token context (see bench/serve_load.py's `build_model`), greedy: each
turn's prompt is the previous prompt + its answer + a new user line of tinyshakespeare, after a ~200-token
system prompt. TTFT is from `submit` to the first token's event. Every repeat, cache on or off, must give
the same answers token for token (exit status 1 otherwise); the table shows the median TTFT per turn.

With `--http` the chat goes to the server instead (the app started in this process, as bench/serve_load.py
does), as a client would send it: POST /v1/completions, streaming, the conversation so far as text (so
each turn's prompt is re-tokenized, and the cached prefix may stop a token or two before the previous
answer's end); TTFT is from sending the request to the first streamed token, the cache switched with
`Scheduler.set_prefix_cache`, and the answers' texts must be identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import DEFAULT_TEXT, MODEL, Server, _client, build_model, stream_one  # noqa: E402

from lmforge.engine.generate import Engine  # noqa: E402
from lmforge.engine.sampling import SamplingParams  # noqa: E402
from lmforge.engine.scheduler import Request, Scheduler  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402


def ask(sched: Scheduler, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
    """(answer ids, seconds to the first token, cached prompt tokens) of one request."""
    ids: list[int] = []
    first: list[float] = []
    done = threading.Event()

    def emit(ev) -> None:
        if ev is None:
            done.set()
            return
        if not first:
            first.append(time.perf_counter())
        ids.append(ev.token_id)

    t0 = time.perf_counter()
    req = sched.submit(Request(list(prompt), params, emit))
    if not done.wait(300) or req.error:
        raise RuntimeError(f"request failed: {req.error}")
    return ids, first[0] - t0, req.cached_tokens


def chat(engine: Engine, system: list[int], users: list[list[int]], params: SamplingParams, cache: bool,
         max_batch: int) -> list[dict]:
    sched = Scheduler(engine, max_batch=max_batch, prefix_cache=cache)
    try:
        prompt, turns = list(system), []
        for user in users:
            prompt = prompt + user
            answer, ttft, cached = ask(sched, prompt, params)
            turns.append({"prompt": len(prompt), "cached": cached, "ttft": ttft, "answer": answer})
            prompt = prompt + answer
        return turns
    finally:
        sched.stop()


async def http_chats(args, server: Server, system: str, users: list[str]) -> dict[bool, list[list[dict]]]:
    """`args.repeats` chats per mode against the server; per turn: prompt and cached tokens, TTFT, answer."""
    url = server.base_url
    body = {"model": MODEL, "max_tokens": args.answer_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    runs: dict[bool, list[list[dict]]] = {True: [], False: []}
    async with _client(1) as client:
        await stream_one(client, url, {**body, "prompt": system + users[0]})  # loads the model: not measured
        sched = server.scheduler
        for r in range(args.repeats):
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                await asyncio.to_thread(sched.set_prefix_cache, cache)  # (which also forgets what was cached)
                prompt, turns = system, []
                for user in users:
                    prompt += user
                    p0, c0 = sched.prompt_tokens_total, sched.cached_tokens_total
                    res = await stream_one(client, url, {**body, "prompt": prompt})
                    if res.error or res.ttft is None:
                        raise RuntimeError(f"request failed: {res.error}")
                    turns.append({"prompt": sched.prompt_tokens_total - p0, "cached": sched.cached_tokens_total - c0,
                                  "ttft": res.ttft, "answer": res.text})
                    prompt += res.text
                runs[cache].append(turns)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="chats per mode; the table shows medians (default 3)")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--system-tokens", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--preset", default="llama-15m")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--http", action="store_true", help="chat with the server over HTTP (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.text.read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 30]
    user_texts = [f"\nUSER: {lines[37 * k + 5]}\nASSISTANT:" for k in range(args.turns)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built = build_model(Path(tmp) / "m", args.preset, text, seed=0, weight_scale=3.0,
                                       context_length=args.context)
        tok = built["tokenizer"]
        system = tok.encode(text[:4000], allow_special=False)[:args.system_tokens]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} shape, context "
              f"{args.context}; system prompt {len(system)} tokens, {args.turns} turns of {args.answer_tokens}-token "
              f"answers, max_batch {args.max_batch}, {args.repeats} repeats{', over HTTP' if args.http else ''}\n",
              flush=True)
        if args.http:
            server = Server(model_dir, max_batch=args.max_batch, max_queue=8)
            try:
                runs = asyncio.run(http_chats(args, server, tok.decode(system), user_texts))
            finally:
                server.stop()
        else:
            loaded = load(model_dir)
    if not args.http:
        engine = Engine(loaded.model, loaded.tokenizer, fast=False)
        system = engine.encode_prompt(tok.decode(system))
        users = [tok.encode(u, allow_special=False) for u in user_texts]
        params = SamplingParams(temperature=0, max_new_tokens=args.answer_tokens, ignore_eos=True)
        chat(engine, system, users[:2], params, True, args.max_batch)  # warm-up, not measured
        runs = {True: [], False: []}
        for r in range(args.repeats):
            for cache in ((True, False) if r % 2 == 0 else (False, True)):  # neither mode always goes first
                runs[cache].append(chat(engine, system, users, params, cache, args.max_batch))
    reference = [t["answer"] for t in runs[False][0]]
    same = all([t["answer"] for t in r] == reference for mode in runs.values() for r in mode)

    print("| turn | prompt tokens | cached tokens | TTFT cache on ms | TTFT cache off ms | off / on |")
    print("|---|---|---|---|---|---|")
    tot_on = tot_off = 0.0
    for k in range(args.turns):
        on = statistics.median(r[k]["ttft"] for r in runs[True]) * 1e3
        off = statistics.median(r[k]["ttft"] for r in runs[False]) * 1e3
        tot_on, tot_off = tot_on + on, tot_off + off
        t = runs[True][0][k]
        print(f"| {k + 1} | {t['prompt']} | {t['cached']} | {on:.1f} | {off:.1f} | {off / on:.1f}x |")
    print(f"| all | | | {tot_on:.0f} | {tot_off:.0f} | {tot_off / tot_on:.1f}x |")
    print(f"\nanswers identical with and without the cache (every repeat): {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
