"""Prompt caching across the turns of a chat: time to first token per turn, with and without the cache.

    python bench/prompt_cache.py               # 10 turns, 3 repeats (about a minute on 2 cores)
    python bench/prompt_cache.py --repeats 1   # quicker

A chat re-sends the whole conversation every turn, so without a prompt cache turn k reads every earlier
turn again and its time to first token (TTFT) grows with the conversation; with the scheduler's prompt
cache (engine/scheduler.py) the previous turn's prompt and answer are still in its cache row and turn k
reads only its new message. Measured on the `Scheduler` directly (no HTTP), on a random-weight model of
the `llama-15m` shape with a 1024-token context (see bench/serve_load.py's `build_model`), greedy: each
turn's prompt is the previous prompt + its answer + a new user line of tinyshakespeare, after a ~200-token
system prompt. TTFT is from `submit` to the first token's event. Every repeat, cache on or off, must give
the same answers token for token (exit status 1 otherwise); the table shows the median TTFT per turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import DEFAULT_TEXT, build_model  # noqa: E402

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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.text.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built = build_model(Path(tmp) / "m", args.preset, text, seed=0, weight_scale=3.0,
                                       context_length=args.context)
        loaded = load(model_dir)
    engine = Engine(loaded.model, loaded.tokenizer, fast=False)
    tok = loaded.tokenizer
    system = engine.encode_prompt(text[:4000])[:args.system_tokens]
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 30]
    users = [tok.encode(f"\nUSER: {lines[37 * k + 5]}\nASSISTANT:", allow_special=False) for k in range(args.turns)]
    params = SamplingParams(temperature=0, max_new_tokens=args.answer_tokens, ignore_eos=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} shape, context "
          f"{args.context}; system prompt {len(system)} tokens, {args.turns} turns of {args.answer_tokens}-token "
          f"answers, max_batch {args.max_batch}, {args.repeats} repeats\n", flush=True)

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
