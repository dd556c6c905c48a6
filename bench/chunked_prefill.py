"""Chunked prefill: how long a long prompt stalls the streams already running, chunked against unchunked.

    python bench/chunked_prefill.py            # the `base` shape (48M, context 1024), a 900-token prompt
    python bench/chunked_prefill.py --quick    # the `small` shape, a 200-token prompt, chunks of 64: a smoke run

A seeded random model of `--preset` (with a BPE trained on tinyshakespeare, as in bench/serve_load.py) is
served by the scheduler directly (no HTTP). `--streams` greedy requests with short prompts start decoding;
once each has produced a few tokens, one request with a `--long`-token prompt arrives. For each
`prefill_chunk` setting -- "off" (the whole prompt in one pass, as before chunking) and the chunk sizes given --
the bench reports, for the running streams, the longest gap between two of their tokens while the long
prompt was being read, and for the long request its time to first token (TTFT).

The figure of merit is the ratio of the longest gap unchunked to chunked (how much less a running stream
stutters); its price is the TTFT of the long prompt. A second table checks that `--streams` long prompts
arriving together with nothing else running are read side by side, not one after another: the time until
the last of them has its first token should not grow with chunking. Each request's greedy tokens must be the same under
every setting (chunking changes when the work is done, not what is computed): the exit status is 1 if not.
Nothing is asserted about speed: other load on the machine moves it.
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


def run_once(engine: Engine, chunk: int, short_prompts: list[list[int]], long_prompt: list[int], *,
             short_tokens: int, long_tokens: int) -> dict:
    sched = Scheduler(engine, max_batch=len(short_prompts) + 1, prefill_chunk=chunk)
    try:
        times: dict[int, list[float]] = {i: [] for i in range(len(short_prompts) + 1)}
        ids: dict[int, list[int]] = {i: [] for i in times}
        done = threading.Semaphore(0)
        warm = threading.Barrier(len(short_prompts) + 1)

        def emit_for(i: int):
            def emit(ev):
                if ev is None:
                    done.release()
                    if reqs[i].error is not None:
                        print(f"request {i} failed: {reqs[i].error}", file=sys.stderr)
                        warm.abort()
                    return
                times[i].append(time.perf_counter())
                ids[i].append(ev.token_id)
                if i < len(short_prompts) and len(ids[i]) == 3:
                    threading.Thread(target=warm.wait, daemon=True).start()
            return emit

        k = len(short_prompts)
        reqs = [Request(p, SamplingParams(temperature=0, max_new_tokens=short_tokens, ignore_eos=True), emit_for(i))
                for i, p in enumerate(short_prompts)]
        reqs.append(Request(long_prompt, SamplingParams(temperature=0, max_new_tokens=long_tokens, ignore_eos=True),
                            emit_for(k)))
        for r in reqs[:k]:
            sched.submit(r)
        warm.wait(timeout=120)  # every running stream has produced a few tokens
        t_submit = time.perf_counter()
        sched.submit(reqs[k])
        for _ in range(k + 1):
            assert done.acquire(timeout=600), "a request never finished"
        t_first = times[k][0]
        gaps = [b - a for i in range(k) for a, b in zip(times[i], times[i][1:]) if b > t_submit and a < t_first]
        all_gaps = [b - a for i in range(k) for a, b in zip(times[i], times[i][1:])]
        return {"chunk": chunk, "max_gap_ms": 1000 * max(gaps, default=0.0),
                "median_gap_ms": 1000 * statistics.median(all_gaps), "ttft_ms": 1000 * (t_first - t_submit),
                "ids": ids}
    finally:
        sched.stop()


def burst(engine: Engine, chunk: int, prompts: list[list[int]]) -> dict:
    """All `prompts` at once with nothing else running: the time until the last of them has its first token
    (chunking must not read them one after another), and their greedy tokens."""
    sched = Scheduler(engine, max_batch=len(prompts), prefill_chunk=chunk)
    try:
        first: dict[int, float] = {}
        ids: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        done = threading.Semaphore(0)

        def emit_for(i: int):
            def emit(ev):
                if ev is None:
                    done.release()
                else:
                    first.setdefault(i, time.perf_counter())
                    ids[i].append(ev.token_id)
            return emit

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            sched.submit(Request(p, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True), emit_for(i)))
        for _ in prompts:
            assert done.acquire(timeout=600), "a request never finished"
        return {"chunk": chunk, "last_ttft_ms": 1000 * (max(first.values()) - t0), "ids": ids}
    finally:
        sched.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base", help="model shape (default: base, 48M parameters, context 1024)")
    ap.add_argument("--long", type=int, default=900, help="tokens in the long prompt (default: 900)")
    ap.add_argument("--streams", type=int, default=4, help="requests already decoding (default: 4)")
    ap.add_argument("--chunks", default="512,256,128", help="prefill_chunk sizes to compare with 'off' "
                    "(default: 512,256,128)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text for the tokenizer and the prompts "
                    "(default: ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--quick", action="store_true", help="the `small` shape, a 200-token prompt and chunks of 64: "
                    "a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.long, args.chunks = "small", 200, "64"
    torch.set_num_threads(args.threads)
    text = args.text.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built = build_model(Path(tmp) / "m", args.preset, text, seed=0, weight_scale=3.0)
        loaded = load(model_dir)
        engine = Engine(loaded.model, loaded.tokenizer, fast=False)
        info = built["info"]
        tok = built["tokenizer"]
        words = tok.encode(text[:400_000])
        long_prompt = words[:args.long]
        start = len(words) // 2
        short_prompts = [words[start + 40 * i: start + 40 * i + 8 + i] for i in range(args.streams)]
        assert len(long_prompt) == args.long and all(short_prompts), "the text is too short for these prompts"
        ctx = info["context_length"]
        short_tokens = min(ctx - 20, 400)
        print(f"model: {args.preset} shape, {info['params'] / 1e6:.1f}M parameters, context {ctx}; "
              f"{args.streams} streams decoding, then a {len(long_prompt)}-token prompt arrives; "
              f"{args.threads} threads\n", flush=True)
        settings = [ctx] + [int(c) for c in args.chunks.split(",") if c.strip()]
        results = [run_once(engine, c, short_prompts, long_prompt, short_tokens=short_tokens, long_tokens=8)
                   for c in settings]
        burst_prompts = [words[len(words) // 4 + 1000 * i:][:args.long] for i in range(args.streams)]
        bursts = [burst(engine, c, burst_prompts) for c in settings]
    base = results[0]
    print("| prefill_chunk | longest stall of a running stream (ms) | median token gap (ms) | long prompt TTFT (ms) "
          "| stall vs off |")
    print("|---|---|---|---|---|")
    for r in results:
        name = "off" if r is base else str(r["chunk"])
        ratio = "(baseline)" if r is base else f"{base['max_gap_ms'] / max(r['max_gap_ms'], 1e-9):.2f}x shorter"
        print(f"| {name} | {r['max_gap_ms']:.0f} | {r['median_gap_ms']:.1f} | {r['ttft_ms']:.0f} | {ratio} |")
    print(f"\n{args.streams} long prompts at once, nothing else running (e.g. an n={args.streams} request):\n")
    print("| prefill_chunk | time to the last first token (ms) |")
    print("|---|---|")
    for r in bursts:
        print(f"| {'off' if r is bursts[0] else r['chunk']} | {r['last_ttft_ms']:.0f} |")
    same = all(r["ids"] == base["ids"] for r in results) and all(r["ids"] == bursts[0]["ids"] for r in bursts)
    print(f"\ngreedy tokens identical under every setting: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
