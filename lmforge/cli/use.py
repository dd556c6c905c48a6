"""`lmforge generate`, `score` and `run`: using a model (every decoding strategy, likelihoods, the
terminal chat); `ps` and `stop`: what a running `lmforge serve` holds in memory, and unloading it.

`run MODEL PROMPT` answers one prompt, like `ollama run MODEL PROMPT`: through the running server when one
answers at LMFORGE_HOST (`cli/client.py`; the model is then loaded once, by the server, and stays loaded
for the next question) and in-process otherwise, or when the server does not serve MODEL (a directory, say),
or with --docs or --local, or with --dtype, --device or --no-fast (they say how THIS process loads the
model; a server loads its models its own way, so they are honoured by loading here rather than dropped).
The interactive chat (`run MODEL` in a terminal) always runs in-process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli.common import (
    Formatter, add_model_flags, add_sampling_flags, float_arg, load_engine, load_model, nonneg_int, para,
    positive_int, sampling_params,
)
from lmforge.errors import UserError

from lmforge.retrieval.grounding import DEFAULT_K  # passages per turn for `run --docs`, as the server's


# ---------------------------------------------------------------------------------------------------
# generate / score / run
# ---------------------------------------------------------------------------------------------------


def _output_grammar(args):
    """The grammar of --json-schema FILE or --grammar FILE (GBNF, or Lark with a `start:` rule), or None;
    checked before the model loads, so a bad file costs no wait."""
    from lmforge.engine.constrain import Grammar, GrammarError

    path = args.json_schema or args.grammar
    if path is None:
        return None
    flag = "--json-schema" if args.json_schema else "--grammar"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if args.grammar:
            return Grammar.from_text(text)
        import json

        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag}: {path} is not JSON: {e}") from None
        return Grammar.json_schema(schema, strict=True)
    except GrammarError as e:
        raise UserError(f"{flag} {path}: {e}") from None


def cmd_generate(args) -> int:
    import math

    from lmforge.engine.constrain import GrammarError

    if args.beams > 1 and (args.json_schema or args.grammar):  # refused before the model loads
        flag = "--json-schema" if args.json_schema else "--grammar"
        raise UserError(f"--beams cannot be combined with {flag}: beam search cannot follow a grammar; "
                        f"use --beams 1 (the default)")
    grammar = _output_grammar(args)
    engine, mf = load_engine(args)
    tok = engine.tokenizer
    if grammar is not None:
        try:
            grammar.check(tok)
        except GrammarError as e:
            raise UserError(f"{'--json-schema' if args.json_schema else '--grammar'}: {e}") from None
    prompt = args.prompt
    if args.chat:
        from lmforge.engine.prompt import chat_prompt_ids

        try:
            prompt = chat_prompt_ids(tok, [{"role": "user", "content": prompt}], examples=mf.messages,
                                     system=args.system if args.system is not None else mf.system)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.beams > 1:
        params = sampling_params(args, mf.parameters, num_beams=args.beams, length_penalty=args.length_penalty,
                                  early_stopping=args.early_stopping, stop=args.stop or [], grammar=grammar,
                                  **({} if args.temperature is not None else {"temperature": 0.0}))
        try:
            beams = engine.beam_search(prompt, params, n_best=args.n_best)
        except ValueError as e:
            raise UserError(str(e)) from None
        for rank, b in enumerate(beams, 1):
            print(f"--- beam {rank}: score {b.score:.4f} (log-prob {b.sum_logprob:.3f}, {b.n_tokens} tokens, {b.finish_reason})")
            print(b.text)
        return 0
    params = sampling_params(args, mf.parameters, stop=args.stop or [], grammar=grammar,
                              logprobs=args.top_logprobs if args.show_probs else None)
    try:
        events = engine.generate([prompt], params)
        if not args.show_probs:
            if isinstance(prompt, str) and args.echo:
                print(prompt, end="", flush=True)
            finish = None
            for ev in events:
                print(ev.text, end="", flush=True)
                finish = ev.finish_reason or finish
            print()
            if args.verbose:
                print(f"[finish_reason: {finish}]", file=sys.stderr)
            return 0
        print(f"{'token':<20} {'prob':>7}   top alternatives")
        for ev in events:
            shown = repr(tok.token_text(ev.token_id))  # quoted, so spaces and newlines are visible
            alts = "  ".join(f"{tok.token_text(i)!r} {math.exp(lp):.1%}" for i, lp in (ev.top_logprobs or [])
                             if i != ev.token_id)
            print(f"{shown:<20} {math.exp(ev.logprob):>7.1%}   {alts}")
            if ev.finish_reason:
                print(f"[finish_reason: {ev.finish_reason}]")
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


def cmd_score(args) -> int:
    import math

    if (args.file is None) == (args.text is None):
        raise UserError("give exactly one of --file PATH or --text TEXT")
    if args.file is not None:
        from lmforge.data.corpus import load_documents

        text = "\n".join(load_documents(str(args.file), errors=args.errors))
    else:
        text = args.text
    engine, _ = load_engine(args)
    try:
        r = engine.score(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    tok = engine.tokenizer
    n = len(r.logprobs)
    print(f"tokens scored        {n:,} ({r.n_chars:,} characters)")
    print(f"total log-likelihood {r.total_logprob:,.3f} nats")
    print(f"mean surprisal       {-r.total_logprob / n:.4f} nats/token = {-r.total_logprob / n / math.log(2):.4f} bits/token")
    print(f"per character        {-r.total_logprob / max(1, r.n_chars):.4f} nats/char")
    print(f"perplexity           {r.perplexity:.3f}")
    offset = len(r.ids) - n  # ids[offset + i] is the token of logprobs[i]
    worst = sorted(range(n), key=lambda i: r.logprobs[i])[: args.top]
    if worst:
        print("\nmost surprising tokens (surprisal in bits, with the text before them):")
        for i in worst:
            j = offset + i
            before = tok.decode(r.ids[max(offset, j - 8):j], skip_special_tokens=True)[-40:]
            print(f"  {-r.logprobs[i] / math.log(2):6.2f}  ...{before!r} -> {tok.token_text(r.ids[j])!r}")
    return 0


def cmd_run(args) -> int:
    from lmforge.chat import ChatSession, Documents, answer_once, repl

    if args.k is not None and args.docs is None:
        raise UserError("-k is the number of passages retrieved per turn: it needs --docs INDEX")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("PROMPT is empty: give the question to answer, or leave it out to chat")
    if args.prompt is not None and args.docs is None and not args.local and not _loading_flags(args):
        answered = _run_on_server(args)
        if answered is not None:
            return answered
    # The index first: an unknown name is one line listing the known ones, before minutes of model loading.
    docs = Documents(args.docs, args.k or DEFAULT_K) if args.docs is not None else None
    loaded = load_model(args)
    try:
        session = ChatSession.from_loaded(loaded, system=args.system, fast=not args.no_fast,
                                          params=sampling_params(args, loaded.modelfile.parameters), docs=docs)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.prompt is not None or not sys.stdin.isatty():
        try:
            return answer_once(session, args.prompt if args.prompt is not None else sys.stdin.read())
        except ValueError as e:
            raise UserError(str(e)) from None
    return repl(session)


def _loading_flags(args) -> list[str]:
    """The flags given that say how to load the model here (a server has its own --dtype/--device)."""
    return [flag for flag, given in (("--dtype", getattr(args, "dtype", "auto") != "auto"),
                                     ("--device", getattr(args, "device", "auto") != "auto"),
                                     ("--no-fast", getattr(args, "no_fast", False))) if given]


def _run_on_server(args) -> int | None:
    """Answer `args.prompt` through the server at LMFORGE_HOST (streamed); None when no server answers
    there or it does not serve the model, for the caller to load it in-process instead."""
    from lmforge.chat import ThoughtView
    from lmforge.cli.client import Client, ServerError
    from lmforge.cli.common import SAMPLING_FLAGS
    from lmforge.modelfile import OLLAMA_NAME

    client = Client()
    if not client.answers():
        return None
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": args.prompt}]
    options = {OLLAMA_NAME[k]: getattr(args, k) for k in SAMPLING_FLAGS  # sampling flags are SamplingParams fields
               if getattr(args, k, None) is not None}
    body = {"model": args.model, "messages": messages, "stream": True, **({"options": options} if options else {})}
    started = False
    view = ThoughtView(sys.stdout)  # a thinking model's thought, apart from the answer, as in-process
    try:
        if "thinking" in (client.post("/api/show", {"model": args.model}).get("capabilities") or []):
            body["think"] = True  # the thought comes back as message.thinking, not as <think> text
        for obj in client.stream("/api/chat", body):
            message = obj.get("message") or {}
            if message.get("thinking"):
                started = True
                view.thought(message["thinking"])
            if message.get("content"):
                started = True
                view.text(message["content"])
    except ServerError as e:
        if e.status == 404 and not started:  # not one of the server's models: load it here
            return None
        raise
    view.close()
    print()
    return 0


# ---------------------------------------------------------------------------------------------------
# ps / stop (a running server)
# ---------------------------------------------------------------------------------------------------
def _until(expires_at: str | None, now: float | None = None) -> str:
    """`ollama ps`'s UNTIL column: "4 minutes from now", "Forever", "Stopping..."."""
    import datetime
    import re
    import time

    if not expires_at:
        return "?"
    m = re.match(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$", expires_at)
    if not m:
        return expires_at
    if int(m.group(1)[:4]) >= 9999:
        return "Forever"
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    when = datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").timestamp()
    left = when - (time.time() if now is None else now)
    if left <= 0:
        return "Stopping..."
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    n = int(left)
    return f"{n} second{'s' if n != 1 else ''} from now" if n else "Less than a second from now"


def _processor(size: int, vram: int) -> str:
    if not vram:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def cmd_ps(args) -> int:
    from lmforge.cli.client import Client
    from lmforge.cli.common import human_size

    models = Client().get("/api/ps").get("models") or []
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in models:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        rows.append((str(m.get("name") or m.get("model")), str(m.get("digest") or "")[:12], human_size(size),
                     _processor(size, vram), str(m.get("context_length") or "?"), _until(m.get("expires_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _plain_name(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


def cmd_stop(args) -> int:
    from lmforge.cli.client import Client

    client = Client()
    loaded = [str(m.get("name") or m.get("model")) for m in client.get("/api/ps").get("models") or []]
    if _plain_name(args.model) not in {_plain_name(n) for n in loaded}:
        held = f" (it holds: {', '.join(loaded)})" if loaded else " (it holds none)"
        raise UserError(f"{args.model} is not loaded on the server at {client.base}{held}")
    client.post("/api/generate", {"model": args.model, "keep_alive": 0})
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add this group's subcommands to `sub`; returns those whose numeric flags get short metavars."""
    # generate / score / run
    gen = sub.add_parser("generate", help="continue a prompt with any decoding strategy", formatter_class=Formatter,
                         description=para("Generate a continuation of --prompt with the KV-cached engine: greedy, "
                                           "sampling (temperature, top-k, top-p, min-p, penalties) or beam search, "
                                           "streamed as it is produced. --show-probs prints every token with its "
                                           "probability and the top alternatives."),
                         epilog='examples:\n  lmforge generate runs/small --prompt "The with statement" --temperature 0.7 --seed 1\n'
                                '  lmforge generate runs/small --prompt "def " --beams 4 --length-penalty 1.0\n'
                                '  lmforge generate runs/small --prompt "Return the" --show-probs')
    add_model_flags(gen)
    gen.add_argument("--prompt", default="", help="text to continue (default: empty = start from BOS)")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    gen.add_argument("--system", help="system prompt, with --chat")
    add_sampling_flags(gen)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeatable (default: none)")
    gen.add_argument("--beams", type=positive_int, default=1, help="beam search with this many beams; 1 = off (default: 1)")
    gen.add_argument("--length-penalty", type=float_arg, default=1.0, help="beam score = log-prob / length^this (default: 1.0)")
    gen.add_argument("--early-stopping", action="store_true", help="stop beam search once enough beams ended (default: off)")
    gen.add_argument("--n-best", type=positive_int, default=1, help="beam hypotheses to print (default: 1)")
    gen.add_argument("--show-probs", action="store_true", help="print each token with its probability and alternatives")
    gen.add_argument("--top-logprobs", type=nonneg_int, metavar="N", default=5, help="alternatives shown by --show-probs, up to 20 (default: 5)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE",
                       help="output JSON valid under this JSON schema (strict: objects closed unless it says otherwise)")
    shape.add_argument("--grammar", metavar="FILE", help="output that follows this GBNF (or Lark) grammar")
    gen.add_argument("--verbose", action="store_true", help="report the finish reason on stderr")
    gen.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="log-likelihood, perplexity and the most surprising tokens of a text",
                        formatter_class=Formatter,
                        description=para("Score a text under the model: total log-likelihood, perplexity, nats per "
                                          "character and the tokens the model found most surprising. Texts longer than "
                                          "the context are scored in half-overlapping windows."))
    add_model_flags(sc)
    sc.add_argument("--file", type=Path, help="text file to score")
    sc.add_argument("--text", help="text to score")
    sc.add_argument("--errors", choices=["strict", "replace"], default="strict", help="non-UTF-8 bytes in --file (default: strict)")
    sc.add_argument("--top", type=nonneg_int, default=10, help="surprising tokens to list (default: 10)")
    sc.set_defaults(func=cmd_score)

    rn = sub.add_parser("run", help="chat with a model in the terminal", formatter_class=Formatter,
                        description=para("A multi-turn chat through the model's chat template, like `ollama run`. "
                                          "Type /? for commands (/set, /show, /sources, /clear, /bye); wrap multi-line "
                                          "messages in triple quotes; Ctrl-C stops an answer. Without a terminal, reads "
                                          "one message from stdin and prints the answer.")
                        + "\n\n" + para("With --docs INDEX (built by `lmforge index`), every turn is grounded: the "
                                         "top k passages (-k) for your message are numbered [1], [2] ... and put before "
                                         "it (lowest-ranked dropped first if they do not fit the context, and a line "
                                         "says so); the model is told to answer from them and cite them; after the "
                                         "answer, a 'sources:' footer lists the passages it cited (path:lines and "
                                         "heading), and /sources shows every passage of the last turn. The "
                                         "conversation keeps your plain messages, not the passages."),
                        epilog="examples:\n  lmforge run quickstart-dpo\n"
                               "  lmforge run quickstart-dpo \"Why is the sky blue?\"   (one answer; through a running server)\n"
                               "  lmforge run qwen --docs mydocs -k 6\n"
                               "  echo 'What does textwrap.dedent do?' | lmforge run quickstart-dpo --docs pydocs")
    add_model_flags(rn)
    rn.add_argument("prompt", nargs="?", metavar="PROMPT", help="answer this one prompt and exit, through the "
                    "running server when one answers at LMFORGE_HOST (default 127.0.0.1:11435), else in-process "
                    "(default: chat)")
    rn.add_argument("--local", action="store_true", help="with PROMPT: load the model in this process even when a "
                    "server answers; --dtype, --device or --no-fast do the same, as they say how this process "
                    "loads it (default: use the server)")
    rn.add_argument("--system", help="system prompt (default: none)")
    rn.add_argument("--docs", metavar="INDEX", help="ground every answer on passages retrieved from this index "
                    "(`lmforge index ... --name INDEX`); answers cite them as [n] (default: none)")
    rn.add_argument("-k", type=positive_int, metavar="N", help=f"passages retrieved per turn, with --docs "
                    f"(default: {DEFAULT_K})")
    add_sampling_flags(rn)
    rn.set_defaults(func=cmd_run)

    ps = sub.add_parser("ps", help="the models a running server holds in memory", formatter_class=Formatter,
                        description=para("List the models the lmforge server at LMFORGE_HOST (default "
                                          "127.0.0.1:11435) has loaded, like `ollama ps`: name, id, size in memory, "
                                          "processor, context length and until when it stays loaded."))
    ps.set_defaults(func=cmd_ps)
    st = sub.add_parser("stop", help="unload a model from a running server", formatter_class=Formatter,
                        description=para("Unload MODEL from the lmforge server at LMFORGE_HOST (default "
                                          "127.0.0.1:11435) now, like `ollama stop` (its requests in flight finish "
                                          "first)."))
    st.add_argument("model", metavar="MODEL", help="a model the server has loaded (see lmforge ps)")
    st.set_defaults(func=cmd_stop)
    return [gen, sc, rn, ps, st]
