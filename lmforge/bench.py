"""`lmforge bench`: how fast a model runs on this machine, and how close that is to what its memory allows.

Decoding one token reads every weight once (plus the KV cache so far), so a batch-1 decode can go no
faster than memory bandwidth / bytes per token: the *bandwidth bound*. llama.cpp gets close to it on a
CPU; a share far below it says the kernels, not the machine, are the limit. The bound is measured on the
spot -- a streaming `torch.sum` over a buffer several times the last-level cache, best of a few runs, with
the same threads the model gets -- because a datasheet figure says nothing about two threads on a shared
laptop.

What is measured, with the engine's own paths (`Engine.generate`: prefill, then the KV-cached decode
step; greedy, EOS ignored so every run decodes the same number of tokens), after a short warm-up run
(kernels compile and thread pools start on first use):
- prefill: one prompt of `prompt_tokens` random ids (drawn from the vocabulary with a fixed seed, clamped
  to the context); the time to its first token is the time to first token, and prompt / that time is the
  prefill rate;
- decode at each batch size: that many prompts of 32 random ids, `decode_tokens` new tokens each; the rate
  counts the tokens after the first step (the first comes out of the prefill) over the time they took;
- memory: the RSS right after loading and the process's peak RSS (`getrusage` maxrss) before the bandwidth
  buffer is allocated, and the weights' bytes as loaded (`lmforge.footprint.weights_bytes`). Weights
  kept as views of a memory-mapped file (GGUF, 16-bit safetensors) enter the RSS as they are first read,
  so the RSS after loading can be below their size; the peak includes them.

Bytes per decode step = weights + rows x KV bytes per position x the mean length over the run; the bound
for a batch of b rows is b x bandwidth / that. The weights counted are all of them: for an untied model
the embedding table is counted though a step reads one row of it, which lowers the bound by that table's
share (a few percent on 7B models), so the share it reports errs high by as much.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from lmforge.footprint import kv_cache_bytes

DECODE_PROMPT = 32  # prompt ids per row of the decode runs (bench/decode.py's and llama-bench's habit)


@dataclass
class DecodeRun:
    batch: int
    prompt_tokens: int
    new_tokens: int  # per row
    tok_s: float  # all rows together
    bound_tok_s: float  # the bandwidth bound for this batch
    bandwidth_share_pct: float  # tok_s / bound_tok_s, in percent


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    threads: int
    weights_bytes: int
    prompt_tokens: int
    prefill_tok_s: float
    ttft_s: float
    rss_after_load_bytes: int
    peak_rss_bytes: int
    bandwidth_bytes_s: float
    decode: list[DecodeRun] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# The machine: memory, bandwidth
# ---------------------------------------------------------------------------------------------------
def current_rss() -> int:
    """Resident bytes of this process now (/proc/self/statm), or the peak so far where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """The peak resident bytes of this process (`getrusage` maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (Linux sysfs), or 32 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/size") as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            if digits.isdigit():
                best = max(best, int(digits) * scale)
    except OSError:
        pass
    return best or 32 << 20


def read_bandwidth(device: str | torch.device = "cpu", seconds: float = 1.0) -> float:
    """Bytes/s this process reads from memory on `device`: the best of several `torch.sum` passes over a
    float32 buffer far larger than the caches (8x the last-level cache, at least 256 MiB, on the CPU;
    1 GiB on a GPU), for about `seconds`."""
    dev = torch.device(device)
    size = (1 << 30) if dev.type == "cuda" else min(1 << 30, max(256 << 20, 8 * last_level_cache()))
    buf = torch.ones(size // 4, dtype=torch.float32, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    buf.sum()  # first touch: page faults are not bandwidth
    sync()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 3 or (time.perf_counter() - start < seconds and runs < 50):
        t = time.perf_counter()
        buf.sum()
        sync()
        best = min(best, time.perf_counter() - t)
        runs += 1
    del buf
    return size / best


def bandwidth_bound(bandwidth: float, weights_bytes: int, kv_bytes_per_position: int, mean_length: float,
                    batch: int) -> float:
    """Tokens/s that `batch` rows can decode at most when every step reads all weights once and each row's
    KV cache of `mean_length` positions: batch x bandwidth / bytes per step."""
    return batch * bandwidth / (weights_bytes + batch * kv_bytes_per_position * mean_length)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
def random_prompts(vocab: int, rows: int, length: int, seed: int) -> list[list[int]]:
    """`rows` prompts of `length` ids drawn uniformly from [0, vocab) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, length), generator=g).tolist()


def _greedy(new_tokens: int):
    from lmforge.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def time_to_first_token(engine, prompt: list[int]) -> float:
    """Seconds from asking for one token after `prompt` to having it: the prefill, as a user waits for it."""
    start = time.perf_counter()
    for _ in engine.generate([prompt], _greedy(1)):
        break
    return time.perf_counter() - start


def decode_rate(engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of the decode steps for `prompts` decoded together: the tokens after each row's first
    (which the prefill produced), over the time from the first token to the last."""
    first = None
    count = 0
    for _ in engine.generate(prompts, _greedy(new_tokens)):
        count += 1
        if first is None:
            first = time.perf_counter()
    elapsed = time.perf_counter() - first
    decoded = count - len(prompts)
    return decoded / elapsed if decoded > 0 and elapsed > 0 else 0.0


def run(engine, *, model: str, dtype: str, weights_bytes: int, rss_after_load: int, prompt_tokens: int = 512,
        decode_tokens: int = 128, batches: tuple[int, ...] = (1, 8), seed: int = 0,
        progress: Callable[[str], None] | None = None) -> BenchResult:
    """Benchmark a loaded `engine` (see the module docstring for what each figure is and how it is
    measured). `weights_bytes` and `rss_after_load` come from the caller, which loaded the model."""
    cfg = engine.config
    ctx = cfg.context_length
    vocab = engine.text_vocab
    prompt_tokens = max(1, min(prompt_tokens, ctx - 1))  # room for the one token the prefill run asks for
    decode_prompt = max(1, min(DECODE_PROMPT, ctx - 2))
    decode_tokens = max(2, min(decode_tokens, ctx - decode_prompt))
    say = progress or (lambda _: None)

    say("warming up")
    for b in batches:  # kernels compile, thread pools start, the allocator grows: not what a step costs
        engine.complete(random_prompts(vocab, b, min(8, decode_prompt), seed + 1), _greedy(2))
    say(f"prefill of {prompt_tokens} tokens")
    ttft = time_to_first_token(engine, random_prompts(vocab, 1, prompt_tokens, seed)[0])
    runs = []
    for b in batches:
        say(f"decode of {decode_tokens} tokens at batch {b}")
        rate = decode_rate(engine, random_prompts(vocab, b, decode_prompt, seed + 2), decode_tokens)
        runs.append((b, rate))
    peak = peak_rss()  # before the bandwidth buffer, which is not the model's
    say("measuring the memory bandwidth")
    bandwidth = read_bandwidth(engine.device)
    per_position = kv_cache_bytes(cfg, 1, 1, engine.dtype)
    mean_length = decode_prompt + decode_tokens / 2
    decode = []
    for b, rate in runs:
        bound = bandwidth_bound(bandwidth, weights_bytes, per_position, mean_length, b)
        decode.append(DecodeRun(b, decode_prompt, decode_tokens, rate, bound, 100 * rate / bound))
    return BenchResult(model=model, device=str(engine.device), dtype=dtype, threads=torch.get_num_threads(),
                       weights_bytes=weights_bytes, prompt_tokens=prompt_tokens, prefill_tok_s=prompt_tokens / ttft,
                       ttft_s=ttft, rss_after_load_bytes=rss_after_load, peak_rss_bytes=peak,
                       bandwidth_bytes_s=bandwidth, decode=decode)


def format_table(r: BenchResult) -> str:
    """The result as a small table for a terminal."""
    mib = 2**20
    lines = [f"{r.model} on {r.device}, {r.threads} thread{'s' if r.threads != 1 else ''}, dtype {r.dtype}",
             f"  {'prefill':<13} {r.prompt_tokens:>5} tokens  {r.prefill_tok_s:10.1f} tok/s   "
             f"time to first token {r.ttft_s * 1000:.0f} ms"]
    for d in r.decode:
        lines.append(f"  {'decode b=' + str(d.batch):<13} {d.new_tokens:>5} tokens  {d.tok_s:10.1f} tok/s   "
                     f"{d.bandwidth_share_pct:5.1f} % of the bandwidth bound ({d.bound_tok_s:.1f} tok/s)")
    lines += [f"  {'memory':<13} weights {r.weights_bytes / mib:.1f} MiB, RSS after load "
              f"{r.rss_after_load_bytes / mib:.0f} MiB, peak RSS {r.peak_rss_bytes / mib:.0f} MiB",
              f"  {'bandwidth':<13} {r.bandwidth_bytes_s / 1e9:.1f} GB/s read, measured now with "
              f"{r.threads} thread{'s' if r.threads != 1 else ''}"]
    return "\n".join(lines)
