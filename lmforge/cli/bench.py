"""`lmforge bench`: prefill and decode speed, memory, and decode as a share of the bandwidth bound
(lmforge.bench)."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import (
    PROG, Formatter, add_model_flags, int_at_least, load_engine, para, positive_int, torch_dtype,
)


def batch_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: '1,8' -> (1, 8); each a whole number >= 1."""
    out = []
    for part in text.split(","):
        try:
            v = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"a batch size must be >= 1, got {v}")
        out.append(v)
    return tuple(dict.fromkeys(out))  # in the order given, once each


def cmd_bench(args) -> int:
    import torch

    from lmforge import bench
    from lmforge.device import resolve_device
    from lmforge.footprint import weights_bytes
    from lmforge.store import resolve

    path = resolve(args.model)  # an unknown model is one line before anything slow
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    weights = weights_bytes(path, torch_dtype(args.dtype), device=device)
    threads = torch.get_num_threads()
    print(f"{PROG} bench: loading {args.model}, then prefill {args.prompt_tokens} tokens and decode "
          f"{args.decode_tokens} tokens at batch {', '.join(map(str, args.batch))} on {device} ({threads} "
          f"thread{'s' if threads != 1 else ''}), then a ~1 s memory bandwidth read...", file=sys.stderr, flush=True)
    engine, _ = load_engine(args)
    rss = bench.current_rss()
    say = (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)) if args.verbose else None
    result = bench.run(engine, model=args.model, dtype=args.dtype, weights_bytes=weights, rss_after_load=rss,
                       prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, batches=args.batch,
                       seed=args.seed, progress=say)
    print(json.dumps(result.to_json()) if args.json else bench.format_table(result))
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `bench` to `sub`; returns the parsers whose numeric flags get short metavars."""
    b = sub.add_parser("bench", help="prefill and decode tok/s, memory, and decode as a share of the bandwidth bound",
                       formatter_class=Formatter,
                       description=para("Measure a model on this machine with the engine that serves it: prefill "
                                         "tok/s and time to first token for a prompt of random token ids, greedy "
                                         "decode tok/s at each batch size (EOS ignored, so every run decodes the same "
                                         "number of tokens), RSS after loading and peak RSS, the weights' bytes as "
                                         "loaded, and decode as a share of the bandwidth bound: the memory read "
                                         "bandwidth measured on the spot (a streaming sum, same threads) divided by "
                                         "the bytes a decode step reads (weights + KV cache). Prompts are clamped to "
                                         "the model's context."),
                       epilog="examples:\n  lmforge bench smol\n"
                              "  lmforge bench ~/models/qwen2.5-0.5b-instruct-q4_k_m.gguf --threads 4 --json\n"
                              "  lmforge bench runs/small --dtype bf16 --batch 1,4,16 --decode-tokens 64")
    add_model_flags(b)
    b.add_argument("--threads", type=positive_int, help="CPU threads PyTorch and the kernels use (default: PyTorch's "
                   "choice, usually the physical cores)")
    b.add_argument("--prompt-tokens", type=positive_int, default=512, help="prompt length of the prefill run, capped "
                   "at the context (default: 512)")
    b.add_argument("--decode-tokens", type=int_at_least(2), metavar="N", default=128, help="tokens each decode run generates per "
                   "sequence, at least 2 (default: 128)")
    b.add_argument("--batch", type=batch_sizes, default=(1, 8), metavar="N[,N...]", help="batch sizes to decode at, "
                   "comma-separated (default: 1,8)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default: 0)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.add_argument("--verbose", action="store_true", help="say on stderr which measurement is running")
    b.set_defaults(func=cmd_bench)
    return [b]

