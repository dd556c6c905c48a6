"""`lmforge serve`: the OpenAI-compatible server and the web chat UI (lmforge.serve)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmforge.cli.common import (
    DTYPES, PROG, Formatter, add_device_flag, float_arg, name_from_path, nonneg_int, para, positive_int, torch_dtype,
)
from lmforge.errors import UserError


# ---------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from lmforge.serve.app import ServerOptions
    from lmforge.serve.models import ModelRegistry
    from lmforge.serve.server import build_server, is_loopback, keep_alive_loop
    from lmforge.store import resolve, validate_name
    from lmforge.device import resolve_device

    fixed = None
    if args.models:
        fixed = {}
        for ref in args.models:
            path = resolve(ref)
            try:
                name = validate_name(ref)
                name = name[: -len(":latest")] if name.endswith(":latest") else name
            except UserError:
                name = name_from_path(path)
            if name in fixed:
                raise UserError(f"two models would be served as {name!r}; serve one of them from the store under another name")
            fixed[name] = path
    if args.docs is not None:  # an unknown index: one line listing the known ones, before anything starts
        from lmforge.retrieval.index import open_index

        open_index(args.docs).close()
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None  # an empty key means none, never ""
    loopback = is_loopback(args.host)
    if not loopback and api_key is None:
        print(f"{PROG}: WARNING: serving on {args.host} with no API key: anyone who can reach this machine can use "
              f"these models and write feedback files. Use --api-key (or bind 127.0.0.1).", file=sys.stderr)
    registry = ModelRegistry(fixed, device=str(resolve_device(args.device)), max_batch=args.max_concurrency,
                             max_queue=args.max_queue, max_context=args.max_context, keep_alive=args.keep_alive,
                             fast=not args.no_fast, prefill_chunk=args.prefill_chunk,
                             dtype=torch_dtype(args.dtype), prompt_cache=not args.no_prompt_cache)
    opts = ServerOptions(api_key=api_key, loopback=loopback, allowed_hosts=tuple(h.lower() for h in args.allowed_host),
                         cors_origins=tuple(args.cors_origin), max_body=args.max_body_kb * 1024,
                         feedback_dir=Path(args.feedback_dir).expanduser() if args.feedback_dir else None,
                         docs=args.docs)
    names = [n for n, _ in registry.ids()]
    server = build_server(registry, opts, host=args.host, port=args.port, grace=args.grace)
    keep_alive_loop(registry, server)

    async def announce() -> None:
        import asyncio

        while not server.started:
            await asyncio.sleep(0.05)
        where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{server.port}"
        print(f"serving {', '.join(names) if names else 'the model store (empty so far)'}\n"
              f"  API: {where}/v1   web UI: {where}/   (Ctrl-C to stop)"
              + (f"\n  the web UI grounds answers on the index {args.docs} (the API when a request sends "
                 f"documents)" if args.docs else ""), flush=True)

    import asyncio

    async def run() -> None:
        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    try:
        asyncio.run(run())
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    finally:
        registry.stop()
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add this group's subcommands to `sub`; returns those whose numeric flags get short metavars."""
    sv = sub.add_parser("serve", help="serve models over an OpenAI-compatible API, with a web chat UI at /",
                        formatter_class=Formatter,
                        description=para("Serve models to the openai SDK, Open WebUI, LangChain or lm-evaluation-harness "
                                          "(/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, "
                                          "/tokenizer_info, /health) and a chat UI in the browser at /, which collects "
                                          "ratings and better answers as fine-tuning data under $LMFORGE_HOME/feedback. "
                                          "Concurrent requests share one forward pass per step (continuous batching). "
                                          "Models load on first use and unload after --keep-alive seconds idle. A model "
                                          "loads only if its weights (at their stored size, or --dtype), its KV cache "
                                          "(--max-concurrency requests of --max-context tokens) and runtime fit in the "
                                          "memory free on --device; idle models are unloaded to make room, least "
                                          "recently used first, else the request gets 503 insufficient_memory. SIGTERM "
                                          "or Ctrl-C finishes the requests in flight (new ones get 503), then exits.")
                        + "\n\n" + para("Answers grounded in your documents: a chat completion with the extension "
                                         "field documents (an index name from `lmforge index`, or {\"index\": NAME, "
                                         "\"k\": N}; k defaults to 4) retrieves the top-k passages for the latest user "
                                         "message, puts them numbered before it, and returns them as "
                                         "choices[i].message.sources (streaming: in the first chunk's delta.sources); "
                                         "an unknown index is a 404. GET /v1/indexes lists the indexes. --docs INDEX "
                                         "makes that index the web UI's default collection; the API grounds only "
                                         "requests that ask."),
                        epilog="examples:\n  lmforge serve\n"
                               "  lmforge serve quickstart-dpo smol --port 8000 --api-key \"$KEY\" --max-concurrency 8\n"
                               "  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:11435/v1', "
                               "api_key='x'); print(c.chat.completions.create(model='quickstart-dpo', messages=[{'role': "
                               "'user', 'content': 'What does os.getcwd do?'}]).choices[0].message.content)\"\n"
                               "  lmforge serve quickstart-dpo --docs pydocs     # then, in Python:\n"
                               "    c.chat.completions.create(..., extra_body={'documents': 'pydocs'}).choices[0].message.sources")
    sv.add_argument("models", nargs="*", metavar="MODEL", help="store names, model directories or .gguf files to serve "
                    "(default: every model in the store, by name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server to "
                    "your network (default: 127.0.0.1)")
    sv.add_argument("--port", type=nonneg_int, default=11435, help="TCP port; 0 picks a free one (default: 11435)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $LMFORGE_API_KEY, "
                    "else no key)")
    sv.add_argument("--max-concurrency", type=positive_int, default=8, help="requests decoded together in one batch, "
                    "per model (default: 8)")
    sv.add_argument("--max-queue", type=nonneg_int, default=64, help="requests that may wait for a batch slot; more "
                    "get 429 (default: 64)")
    sv.add_argument("--max-context", type=positive_int, default=4096, help="tokens per request at most (prompt + "
                    "answer), capped at the model's context; the KV cache holds max-concurrency of these. An Ollama "
                    "request's num_ctx is capped at it too, or at a Modelfile's larger num_ctx (default: 4096)")
    sv.add_argument("--prefill-chunk", type=positive_int, default=512, help="while requests are decoding, read "
                    "about this many prompt tokens per step, longer prompts in chunks between decode steps, so new "
                    "prompts do not stall the running streams (default: 512)")
    sv.add_argument("--no-prompt-cache", action="store_true", help="re-read every prompt in full instead of reusing "
                    "the keys/values of a prefix already in the cache (the previous turn of a chat, a shared system "
                    "prompt); outputs are the same either way up to floating-point rounding, which can flip a near-tie "
                    "between two tokens (default: the cache is on)")
    sv.add_argument("--keep-alive", type=float_arg, default=300.0, help="seconds an unused model stays loaded (default: 300)")
    sv.add_argument("--grace", type=float_arg, default=30.0, help="seconds to finish requests in flight on shutdown "
                    "(default: 30)")
    sv.add_argument("--max-body-kb", type=positive_int, default=1024, help="largest request body in KiB; more gets 413 "
                    "(default: 1024)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser pages from "
                    "this origin to call the API (repeatable; default: no CORS)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="also accept this Host header "
                    "name on a loopback bind, e.g. behind a reverse proxy (repeatable; default: loopback names only)")
    sv.add_argument("--docs", metavar="INDEX", help="the index the web UI grounds answers on by default (it can "
                    "pick another, or none); API requests are grounded only when they send documents (default: none)")
    sv.add_argument("--feedback-dir", help="where UI feedback is written (default: $LMFORGE_HOME/feedback)")
    add_device_flag(sv)
    sv.add_argument("--dtype", choices=list(DTYPES), default="auto", help="precision the served models' weights are "
                    "held in: auto keeps what each file stores (a GGUF's quantized blocks, 16-bit safetensors) and "
                    "computes in fp32; fp32/bf16/fp16 (or f32/f16) convert on load (default: auto)")
    sv.add_argument("--no-fast", action="store_true", help="don't use lmforge's CPU kernel for batch-1 decoding")
    sv.set_defaults(func=cmd_serve)
    return [sv]
